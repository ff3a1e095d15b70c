//! `pinpool-lint` on Rust sources and directories: each call shape, what is not read, the
//! `--proxy` profiles, the JSON, text and SARIF outputs, the exit status.
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const CALLS: &str = "tests/fixtures/lint/calls.rs";
const CLEAN: &str = "tests/fixtures/lint/clean.rs";
const BROKEN: &str = "tests/fixtures/lint/broken.rs";
const ALLOW: &str = "tests/fixtures/lint/allow.rs";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs pinpool-lint in the crate's directory, so that paths stay relative.
fn run(args: &[&str]) -> Run {
    run_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn run_in(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_pinpool-lint"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The JSON objects of a run, one a line.
fn objects(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The 1-based line and column where `needle` starts in the fixture (unique there).
fn at(fixture: &str, needle: &str) -> (u64, u64) {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(fixture)).unwrap();
    assert_eq!(text.matches(needle).count(), 1, "{needle} is not unique");
    let offset = text.find(needle).unwrap();
    let line = text[..offset].matches('\n').count() + 1;
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line as u64, column as u64)
}

/// The statement objects of the literal that starts with `needle`.
fn of<'a>(found: &'a [Value], needle: &str) -> Vec<&'a Value> {
    let (line, column) = at(CALLS, needle);
    found
        .iter()
        .filter(|o| o["line"] == line && o["column"] == column && o.get("statement").is_some())
        .collect()
}

fn reasons(o: &Value) -> Vec<&str> {
    o["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect()
}

/// The reasons of the one statement of the literal that starts with `needle`, and its call.
fn check<'a>(found: &'a [Value], needle: &str) -> (Vec<&'a str>, String) {
    let o = of(found, needle);
    assert_eq!(o.len(), 1, "{needle}: {o:?}");
    (reasons(o[0]), o[0]["call"].as_str().unwrap().to_owned())
}

#[test]
fn each_call_shape_is_read_at_its_literal() {
    let r = run(&["--format", "json", CALLS]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let found = objects(&r.stdout);
    let cases: &[(&str, &[&str], &str)] = &[
        // A method call of tokio-postgres or pinpool.
        (r#""SET search_path = app""#, &["set"], ".query"),
        (
            r#""SELECT nextval('typed_seq')""#,
            &["sequence_function"],
            ".query_typed",
        ),
        (r#""SELECT 1""#, &[], ".prepare"),
        // Function calls by path, with a turbofish.
        (
            r#""SELECT pg_try_advisory_lock(1)""#,
            &["advisory_lock"],
            "sqlx::query",
        ),
        (
            r#""SELECT setval('s', 1)""#,
            &["sequence_function"],
            "sqlx::query_as",
        ),
        (
            r#""CREATE TEMP TABLE scratch (a int)""#,
            &["temp_object"],
            "diesel::sql_query",
        ),
        // sqlx's macros: the SQL first, or second after the output type.
        (
            r#""SELECT nextval('macro_seq') AS n""#,
            &["sequence_function"],
            "sqlx::query!",
        ),
        (r#""DISCARD ALL""#, &["discard"], "sqlx::query_as!"),
        (r#""SELECT 1 AS one""#, &[], "sqlx::query_scalar!"),
        // A raw string.
        (
            r##"r#"SELECT set_config('app.user', "x", false)"#"##,
            &["set_config"],
            ".simple_query",
        ),
        // Inside other macros' bodies.
        (r#""LOAD 'auto_explain'""#, &["load"], ".query_one"),
        // tokio::select!: neither expressions nor statements.
        (
            r#""SELECT pg_advisory_lock(42)""#,
            &["advisory_lock"],
            ".query",
        ),
        (r#""SET lock_timeout = 0""#, &["set"], ".batch_execute"),
        (
            r#""DECLARE c CURSOR FOR SELECT 1""#,
            &["cursor"],
            ".execute",
        ),
        // Names bound to literals: a let in scope, a const, an associated const.
        (r#""RESET ALL""#, &["set"], ".execute"),
        (
            r#""SELECT pg_advisory_lock(7)""#,
            &["advisory_lock"],
            ".query_opt",
        ),
        (r#""LISTEN jobs_ready""#, &["listen"], ".batch_execute"),
        (
            r#""SET LOCAL statement_timeout = 0""#,
            &["set_local"],
            ".simple_query",
        ),
        (r#""SELECT 4""#, &[], ".query"),
        // sqlx's Executor given a &str.
        (
            r#""SELECT pg_advisory_lock(5)""#,
            &["advisory_lock"],
            ".fetch_all",
        ),
        // A statement prepared in scope: its SQL is read at the prepare, its uses are not
        // counted as calls not read.
        (r#""SELECT pg_advisory_unlock_all()""#, &[], ".prepare"),
    ];
    for (needle, want, call) in cases {
        let (got, got_call) = check(&found, needle);
        assert_eq!((&got[..], got_call.as_str()), (*want, *call), "{needle}");
    }
    // concat! of literals: two statements at the macro's position.
    let concat = of(&found, "concat!(");
    assert_eq!(concat.len(), 2, "{concat:?}");
    assert_eq!(reasons(concat[0]), ["set"]);
    assert_eq!(concat[1]["statement"], 2);
    assert!(!concat[1]["pins"].as_bool().unwrap());
    // Possible reasons say so.
    let local = of(&found, r#""SET LOCAL statement_timeout = 0""#);
    assert_eq!(local[0]["possibly"], true);
}

#[test]
fn what_is_not_a_query_call_is_not_read() {
    let r = run(&["--format", "json", CALLS]);
    for needle in [
        "SET x = 1",
        "SET search_path = nowhere",
        "LISTEN nothing",
        "SET inside_macro_rules",
        "SET outer_binding",
        "SET role = admin",
    ] {
        let (line, _) = at(CALLS, needle);
        assert!(
            !objects(&r.stdout).iter().any(|o| o["line"] == line),
            "{needle}: {}",
            r.stdout
        );
    }
}

#[test]
fn query_calls_not_read_are_counted_and_listed() {
    let r = run(&["--format", "json", CALLS]);
    assert!(
        r.stderr
            .contains("pinpool-lint: 6 query calls with SQL built at run time were not checked"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("2 query calls read SQL from a file (include_str!, query_file!)"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("unchecked"));

    let r = run(&["--format", "json", "--list-unchecked", CALLS]);
    let unchecked: Vec<(u64, String, String)> = objects(&r.stdout)
        .into_iter()
        .filter(|o| o.get("unchecked").is_some())
        .map(|o| {
            (
                o["line"].as_u64().unwrap(),
                o["call"].as_str().unwrap().to_owned(),
                o["unchecked"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let line = |needle| at(CALLS, needle).0;
    let want = [
        (line("client.query(&sql"), ".query", "not_literal"),
        (line("sqlx::query(&format!"), "sqlx::query", "not_literal"),
        (line("queries::INSERT"), ".execute", "not_literal"),
        (line("*boxed_sql"), ".query", "not_literal"),
        (
            line("batch_execute(&shadowed)"),
            ".batch_execute",
            "not_literal",
        ),
        (line("query_file!"), "sqlx::query_file!", "sql_file"),
        (line("client.query(REPORT"), ".query", "sql_file"),
        (
            line("batch_execute(hidden)"),
            ".batch_execute",
            "not_literal",
        ),
    ];
    let want: Vec<(u64, String, String)> = want
        .into_iter()
        .map(|(l, c, u)| (l, c.to_owned(), u.to_owned()))
        .collect();
    assert_eq!(unchecked, want);

    // Each at its argument, whatever its shape.
    let (l, c) = at(CALLS, "*boxed_sql");
    let deref = objects(&r.stdout)
        .into_iter()
        .find(|o| o["line"] == l && o.get("unchecked").is_some())
        .unwrap();
    assert_eq!(deref["column"], c);

    let r = run(&["--list-unchecked", CALLS]);
    let (l, c) = at(CALLS, "client.query(&sql");
    let c = c + "client.query(".len() as u64;
    assert!(
        r.stdout.contains(&format!(
            "{CALLS}:{l}:{c}: .query: not checked: its SQL is not a literal"
        )),
        "{}",
        r.stdout
    );
}

#[test]
fn text_names_file_line_column_and_call() {
    let r = run(&[CALLS]);
    assert_eq!(r.code, 1);
    let (l, c) = at(CALLS, r#""SET search_path = app""#);
    assert!(
        r.stdout.contains(&format!(
            "{CALLS}:{l}:{c}: .query: statement 1 pins (set): SET search_path = app\n    set: "
        )),
        "{}",
        r.stdout
    );
    let (l, c) = at(CALLS, r#""SET LOCAL"#);
    assert!(
        r.stdout.contains(&format!(
            "{CALLS}:{l}:{c}: .simple_query: statement 1 possibly pins (set_local)"
        )),
        "{}",
        r.stdout
    );
}

#[test]
fn exit_status_clean_findings_and_unparsable() {
    let r = run(&[CLEAN]);
    assert_eq!((r.code, r.stdout.as_str(), r.stderr.as_str()), (0, "", ""));
    let r = run(&["--format", "json", CLEAN]);
    assert_eq!(r.code, 0);
    assert_eq!(objects(&r.stdout).len(), 5, "{}", r.stdout);

    // A file that does not parse: exit 2, the others still reported.
    let r = run(&[BROKEN, CALLS]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains(&format!("pinpool-lint: cannot parse {BROKEN}:2:")),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("SET search_path = app"), "{}", r.stdout);

    // Usage errors: exit 2.
    let r = run(&["--proxy", "pgbouncer-session", CALLS]);
    assert_eq!(r.code, 2);
    let r = run(&["--legacy-parse", "--proxy", "rds-proxy", CALLS]);
    assert_eq!(r.code, 2);
    // --help names the exit status.
    let r = run(&["--help"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("Exit status: 0 when no statement"),
        "{}",
        r.stdout
    );
}

#[test]
fn rds_proxy_2023_pins_every_extended_protocol_call() {
    for args in [
        &["--format", "json", "--proxy", "rds-proxy-2023", CALLS][..],
        &["--format", "json", "--legacy-parse", CALLS][..],
    ] {
        let r = run(args);
        let found = objects(&r.stdout);
        assert_eq!(check(&found, r#""SELECT 1""#).0, ["parse"]);
        assert_eq!(check(&found, r#""SELECT 2""#).0, ["parse"]);
        assert_eq!(check(&found, r#""SELECT 1 AS one""#).0, ["parse"]);
        assert_eq!(
            check(&found, r#""SET search_path = app""#).0,
            ["set", "parse"]
        );
        // The simple protocol sends no Parse.
        assert_eq!(
            check(&found, r#""SET LOCAL statement_timeout = 0""#).0,
            ["set_local"]
        );
        assert!(of(&found, "concat!(")[1]["reasons"] == serde_json::json!([]));
    }
}

#[test]
fn pgbouncer_transaction_flags_named_statements_not_transaction_scoped_state() {
    let r = run(&[
        "--format",
        "json",
        "--proxy",
        "pgbouncer-transaction",
        CALLS,
    ]);
    assert_eq!(r.code, 1);
    let found = objects(&r.stdout);
    // tokio-postgres and pinpool prepare every &str as a named statement; so does sqlx unless
    // told .persistent(false).
    assert_eq!(check(&found, r#""SELECT 1""#).0, ["named_statement"]);
    assert_eq!(check(&found, r#""SELECT 4""#).0, ["named_statement"]);
    assert_eq!(
        check(&found, r#""SET search_path = app""#).0,
        ["set", "named_statement"]
    );
    assert_eq!(check(&found, r#""SELECT 1 AS one""#).0, ["named_statement"]);
    assert_eq!(
        check(&found, r#""SELECT pg_try_advisory_lock(1)""#).0,
        ["advisory_lock", "named_statement"]
    );
    // The unnamed statement, and the simple protocol.
    assert_eq!(check(&found, r#""SELECT 2""#).0, Vec::<&str>::new());
    assert_eq!(
        check(&found, r#""SELECT nextval('typed_seq')""#).0,
        ["sequence_function"]
    );
    assert_eq!(
        check(&found, r#""CREATE TEMP TABLE scratch (a int)""#).0,
        ["temp_object"]
    );
    // What a transaction keeps to itself is safe on a transaction pooler.
    let local = of(&found, r#""SET LOCAL statement_timeout = 0""#);
    assert_eq!(local[0]["pins"], false, "{local:?}");
    let r = run(&["--proxy", "pgbouncer-transaction", CALLS]);
    assert!(
        r.stdout.contains(
            ".query: statement 1 breaks on a transaction pooler (named_statement): SELECT 4"
        ),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("PgBouncer before 1.21"), "{}", r.stdout);
    // SQL files: session state only.
    let sql = "SET search_path = app; SET LOCAL a = 1; SELECT 1";
    let dir = temp_tree("pgbouncer-sql");
    std::fs::write(dir.join("q.sql"), sql).unwrap();
    let r = run_in(
        &dir,
        &[
            "--format",
            "json",
            "--proxy",
            "pgbouncer-transaction",
            "q.sql",
        ],
    );
    let pins: Vec<bool> = objects(&r.stdout)
        .iter()
        .map(|o| o["pins"].as_bool().unwrap())
        .collect();
    assert_eq!(pins, [true, false, false]);
}

#[test]
fn sarif_log_has_rules_results_and_notifications() {
    let r = run(&["--format", "sarif", CALLS, CLEAN]);
    assert_eq!(r.code, 1);
    let log: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(log["version"], "2.1.0");
    assert!(log["$schema"].as_str().unwrap().contains("sarif-2.1.0"));
    let run0 = &log["runs"][0];
    let driver = &run0["tool"]["driver"];
    assert_eq!(driver["name"], "pinpool-lint");
    assert!(
        driver["informationUri"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );
    let rule_ids: Vec<&str> = driver["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for id in [
        "set",
        "set_local",
        "advisory_lock",
        "parse",
        "named_statement",
    ] {
        assert!(rule_ids.contains(&id), "{id}: {rule_ids:?}");
    }
    let results = run0["results"].as_array().unwrap();
    let (l, c) = at(CALLS, r#""SET search_path = app""#);
    let set: Vec<&Value> = results
        .iter()
        .filter(|r| r["locations"][0]["physicalLocation"]["region"]["startLine"] == l)
        .collect();
    assert_eq!(set.len(), 1, "{set:?}");
    let set = set[0];
    assert_eq!(set["ruleId"], "set");
    assert_eq!(rule_ids[set["ruleIndex"].as_u64().unwrap() as usize], "set");
    assert_eq!(set["level"], "error");
    assert!(
        set["message"]["text"]
            .as_str()
            .unwrap()
            .contains("SET search_path = app"),
        "{set}"
    );
    let loc = &set["locations"][0]["physicalLocation"];
    assert_eq!(loc["artifactLocation"]["uri"], CALLS);
    assert_eq!(loc["region"]["startColumn"], c);
    // A possible reason is a warning; statements that break nothing are not results.
    let local = results.iter().find(|r| r["ruleId"] == "set_local").unwrap();
    assert_eq!(local["level"], "warning");
    assert_eq!(results.len(), 18, "{results:#?}");
    assert!(
        !results
            .iter()
            .any(|r| r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == CLEAN)
    );
    // The calls not read are notes of the run's invocation.
    let invocation = &run0["invocations"][0];
    assert_eq!(invocation["executionSuccessful"], true);
    let notes = invocation["toolExecutionNotifications"].as_array().unwrap();
    assert_eq!(notes.len(), 8);
    assert!(notes.iter().all(|n| n["level"] == "note"));
    assert_eq!(run0["properties"]["uncheckedQueryCalls"], 8);

    // A file not parsed: the invocation did not succeed, and says why.
    let r = run(&["--format", "sarif", BROKEN]);
    assert_eq!(r.code, 2);
    let log: Value = serde_json::from_str(&r.stdout).unwrap();
    let invocation = &log["runs"][0]["invocations"][0];
    assert_eq!(invocation["executionSuccessful"], false);
    assert_eq!(
        invocation["toolExecutionNotifications"][0]["level"],
        "error"
    );
}

#[test]
fn sarif_uris_are_relative_and_sql_files_have_columns() {
    let dir = temp_tree("sarif-sql");
    std::fs::create_dir_all(dir.join("db")).unwrap();
    std::fs::write(
        dir.join("db/q.sql"),
        "SELECT 1;\n  SET search_path = app;\n",
    )
    .unwrap();
    // A path under the working directory, given absolute, is written relative.
    let absolute = dir.join("db/q.sql");
    for arg in ["db/q.sql", "./db/q.sql", absolute.to_str().unwrap()] {
        let r = run_in(&dir, &["--format", "sarif", arg]);
        let log: Value = serde_json::from_str(&r.stdout).unwrap();
        let loc = &log["runs"][0]["results"][0]["locations"][0]["physicalLocation"];
        assert_eq!(loc["artifactLocation"]["uri"], "db/q.sql", "{arg}");
        assert_eq!(loc["region"]["startLine"], 2);
        assert_eq!(loc["region"]["startColumn"], 3);
    }
    // Characters a URI cannot hold are percent-encoded; a file outside the working directory
    // gets a file URI.
    std::fs::create_dir_all(dir.join("a dir")).unwrap();
    std::fs::write(dir.join("a dir/q%.sql"), "LISTEN x;").unwrap();
    let uri_of = |cwd: &Path, arg: &str| {
        let r = run_in(cwd, &["--format", "sarif", arg]);
        let log: Value = serde_json::from_str(&r.stdout).unwrap();
        log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(uri_of(&dir, "a dir/q%.sql"), "a%20dir/q%25.sql");
    let outside = dir.join("a dir");
    assert_eq!(
        uri_of(&outside, absolute.to_str().unwrap()),
        format!("file://{}", absolute.to_str().unwrap())
    );
}

/// A new directory under the system's temporary one.
fn temp_tree(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pinpool-lint-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The temporary directory may be a symbolic link: the path the lint's working directory
    // resolves to.
    dir.canonicalize().unwrap()
}

#[test]
fn directories_are_walked_for_rust_and_sql_files() {
    let dir = temp_tree("walk");
    let write = |path: &str, text: &str| {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    let rust = |sql: &str| format!("fn f(c: &Client) {{ c.batch_execute(\"{sql}\"); }}\n");
    write("src/main.rs", &rust("SET a = 1"));
    write("src/db/mod.rs", &rust("LISTEN b"));
    write("migrations/1.sql", "SELECT 1;\nDISCARD ALL;\n");
    write("notes.txt", "SET c = 1;");
    write("target/debug/build/out.rs", &rust("SET d = 1"));
    write(".git/hooks/x.sql", "SET e = 1;");
    write("src/.hidden/y.rs", &rust("SET f = 1"));
    let r = run_in(&dir, &["--format", "json", "."]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let found = objects(&r.stdout);
    let files: Vec<(&str, Vec<&str>)> = found
        .iter()
        .map(|o| (o["file"].as_str().unwrap(), reasons(o)))
        .collect();
    assert_eq!(
        files,
        [
            ("./migrations/1.sql", vec![]),
            ("./migrations/1.sql", vec!["discard"]),
            ("./src/db/mod.rs", vec!["listen"]),
            ("./src/main.rs", vec!["set"]),
        ]
    );
    // A file named on the command line is read whatever its name: as SQL unless it ends in .rs.
    let r = run_in(&dir, &["--format", "json", "notes.txt", "src"]);
    let found = objects(&r.stdout);
    let files: Vec<&str> = found.iter().map(|o| o["file"].as_str().unwrap()).collect();
    assert_eq!(files, ["notes.txt", "src/db/mod.rs", "src/main.rs"]);
    // A path that does not exist: exit 2, the rest still checked.
    let r = run_in(&dir, &["missing", "src"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cannot read missing"), "{}", r.stderr);
    assert!(r.stdout.contains("src/main.rs:1:"), "{}", r.stdout);
}

#[test]
fn allow_comments_allow_the_rules_they_name_and_are_counted() {
    let r = run(&["--format", "json", ALLOW]);
    assert_eq!(r.code, 1);
    let found = objects(&r.stdout);
    let line = |needle| at(ALLOW, needle).0;
    let on = |needle| -> Vec<(bool, Value)> {
        found
            .iter()
            .filter(|o| o["line"] == line(needle))
            .map(|o| (o["pins"].as_bool().unwrap(), o["allowed"].clone()))
            .collect()
    };
    let allowed = |ids: &[&str]| serde_json::json!(ids);
    // On the line above, naming the rule.
    assert_eq!(on("overflow"), [(false, allowed(&["temp_object"]))]);
    // On the same line: only the rule named is allowed, the SET of the next statement pins.
    assert_eq!(
        on("t2 (a int)"),
        [(false, allowed(&["temp_object"])), (true, Value::Null)]
    );
    // Every rule.
    assert_eq!(on("LISTEN everything"), [(false, allowed(&["listen"]))]);
    assert_eq!(on("LISTEN not_allowed"), [(true, Value::Null)]);
    assert!(
        r.stderr.contains(
            "pinpool-lint: 3 statements breaking a rule were allowed by pinpool-lint: allow comments"
        ),
        "{}",
        r.stderr
    );
    let r = run(&[ALLOW]);
    let (l, _) = at(ALLOW, "LISTEN everything");
    assert!(
        r.stdout.contains(&format!(
            "{ALLOW}:{l}:24: .batch_execute: statement 1 allowed by a pinpool-lint: allow comment (listen)"
        )),
        "{}",
        r.stdout
    );

    // SARIF: the allowed ones are results suppressed in the source.
    let r = run(&["--format", "sarif", ALLOW]);
    let log: Value = serde_json::from_str(&r.stdout).unwrap();
    let results = log["runs"][0]["results"].as_array().unwrap();
    let suppressed: Vec<&str> = results
        .iter()
        .filter(|r| r["suppressions"][0]["kind"] == "inSource")
        .map(|r| r["ruleId"].as_str().unwrap())
        .collect();
    assert_eq!(suppressed, ["temp_object", "temp_object", "listen"]);
    assert_eq!(results.len(), 5);

    // In SQL files too.
    let dir = temp_tree("allow-sql");
    std::fs::write(
        dir.join("q.sql"),
        "-- pinpool-lint: allow: the proxy's initialization query sets it anyway\nSET search_path = app;\nSET role = x;\n",
    )
    .unwrap();
    let r = run_in(&dir, &["--format", "json", "q.sql"]);
    let pins: Vec<bool> = objects(&r.stdout)
        .iter()
        .map(|o| o["pins"].as_bool().unwrap())
        .collect();
    assert_eq!(pins, [false, true]);
}
