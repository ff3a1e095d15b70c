//! The first time a statement pins a connection, pinpool logs it once per distinct statement
//! and process: its digest (no literal it carried) and the line of the handler's code that
//! sent it; `pinpool_pinned` counts every time.

mod common;

use pinpool::GenericClient;

/// The once-per-statement lines of the pin log.
fn pin_lines(log: &common::Captured) -> Vec<String> {
    log.text()
        .lines()
        .filter(|l| l.contains("a statement pinned the connection"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn a_pin_is_logged_once_per_statement_with_its_digest_and_the_callers_line() {
    let (log, _guard) = common::capture(tracing::Level::WARN);
    let pool = common::builder("pin_log").build().unwrap();
    let this_file = file!();

    let c = pool.get().await.unwrap();
    let line = line!() + 1;
    c.batch_execute("SET work_mem = '77MB'").await.unwrap();
    drop(c);
    let lines = pin_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert!(l.contains("set work_mem = ?"), "{l}");
    assert!(!l.contains("77MB"), "a literal reached the log: {l}");
    assert!(l.contains(&format!("{this_file}:{line}:")), "{l}");

    // The same statement on another connection: counted, not logged again.
    let c = pool.get().await.unwrap();
    c.batch_execute("SET work_mem = '78MB'").await.unwrap();
    drop(c);
    assert_eq!(pin_lines(&log).len(), 1);
    assert_eq!(pool.status().pinned, 2);

    // Another statement, through a transaction and through GenericClient: its own line.
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let line = line!() + 1;
    tx.query(
        "SELECT set_config('pin_log.x', $1, false)",
        &[&"secret-value"],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    drop(c);
    let c = pool.get().await.unwrap();
    let generic_line = line!() + 1;
    GenericClient::execute(&c, "SELECT pg_advisory_lock(4242)", &[])
        .await
        .unwrap();
    drop(c);
    let lines = pin_lines(&log);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[1].contains("select set_config(?, $1, false)"),
        "{}",
        lines[1]
    );
    assert!(!lines[1].contains("secret-value"));
    assert!(
        lines[1].contains(&format!("{this_file}:{line}:")),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("select pg_advisory_lock(?)"),
        "{}",
        lines[2]
    );
    assert!(
        lines[2].contains(&format!("{this_file}:{generic_line}:")),
        "{}",
        lines[2]
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever form a literal takes, its value never reaches the digest.
    #[test]
    fn a_digest_never_holds_a_literal(
        value in "[A-Za-z][A-Za-z0-9]{7,15}",
        number in 1000u64..u64::MAX,
        form in 0usize..6,
        tail in "( |, |;|\n-- note\n)",
    ) {
        let literal = match form {
            0 => format!("'{value}'"),
            1 => format!("E'{value}\\'x'"),
            2 => format!("$tag${value}$tag$"),
            3 => format!("U&'{value}'"),
            4 => format!("N'{value}'"),
            _ => format!("'{value}''{value}'"),
        };
        let sql = format!("SET app.x = {literal}{tail}SELECT {number}.5, {literal}");
        let d = pinpool::pinning::digest(&sql);
        proptest::prop_assert!(!d.contains(&value), "{sql} -> {d}");
        proptest::prop_assert!(!d.contains(&number.to_string()), "{sql} -> {d}");
    }
}
