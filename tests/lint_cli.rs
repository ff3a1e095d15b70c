//! The `pinpool-lint` command: output and exit status.
#![cfg(feature = "cli")]

use std::process::Command;

fn lint(args: &[&str], sql: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("pinpool-lint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let file = dir.join(format!("q{n}.sql"));
    std::fs::write(&file, sql).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pinpool-lint"))
        .args(args)
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout)
        .unwrap()
        .replace(file.to_str().unwrap(), "q.sql");
    (out.status.code().unwrap(), stdout)
}

const SQL: &str =
    "SELECT 1;\n\n-- comment; with a semicolon\nSET search_path = app;\nSET LOCAL a = 1;\n";

#[test]
fn json_has_one_object_per_statement_and_exit_1_when_anything_pins() {
    let (code, out) = lint(&["--format", "json"], SQL);
    assert_eq!(code, 1);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"file":"q.sql","statement":1,"line":1,"pins":false,"possibly":false,"reasons":[]}"#,
            r#"{"file":"q.sql","statement":2,"line":4,"pins":true,"possibly":false,"reasons":["set"]}"#,
            r#"{"file":"q.sql","statement":3,"line":5,"pins":true,"possibly":true,"reasons":["set_local"]}"#,
        ]
    );
}

#[test]
fn set_local_safe_and_legacy_parse_change_the_verdict() {
    let (code, out) = lint(&["--format", "json", "--set-local-safe"], "SET LOCAL a = 1");
    assert_eq!(code, 0);
    assert!(
        out.contains(r#""pins":false,"possibly":true,"reasons":["set_local"]"#),
        "{out}"
    );
    let (code, out) = lint(&["--format=json", "--legacy-parse"], "SELECT 1");
    assert_eq!(code, 1);
    assert!(out.contains(r#""reasons":["parse"]"#), "{out}");
}

#[test]
fn text_names_the_line_and_the_advice_and_clean_files_exit_0() {
    let (code, out) = lint(&[], SQL);
    assert_eq!(code, 1);
    assert!(
        out.contains("q.sql:4: statement 2 pins (set): SET search_path = app"),
        "{out}"
    );
    assert!(out.contains("ALTER ROLE"), "{out}");
    let (code, out) = lint(&[], "SELECT 1; INSERT INTO t VALUES (1)");
    assert_eq!((code, out.as_str()), (0, ""));
}

#[test]
fn unreadable_input_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_pinpool-lint"))
        .arg("/nonexistent/pinpool.sql")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}
