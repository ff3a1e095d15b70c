//! Attacks on the pin log's digest, the statement methods' futures and the DO-body rules.

mod common;

use common::capture;

fn debug_log() -> (common::Captured, tracing::subscriber::DefaultGuard) {
    capture(tracing::Level::DEBUG)
}

/// With `standard_conforming_strings = off` (a role's or the server's default), `\'` escapes a
/// quote in a plain literal. The digest read the text the standard way: the literal ended at
/// the backslash, and the words after it (the rest of the value) were written as names.
#[test]
fn the_digest_keeps_no_value_whatever_standard_conforming_strings_says() {
    for sql in [
        r"SELECT set_config('app.note', 'O\'Brien hunter2', false)",
        r"SET application_name = 'it\'s hunter2 here'",
        r"SELECT set_config('a', 'x\\', false), 'hunter2'",
    ] {
        let d = pinpool::pinning::digest(sql);
        assert!(!d.contains("hunter2"), "{sql} -> {d}");
        assert!(!d.contains("brien"), "{sql} -> {d}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_pin_on_a_connection_without_standard_strings_logs_no_value() {
    let (log, _guard) = debug_log();
    let url = format!(
        "{}&options=-c%20standard_conforming_strings%3Doff",
        common::url_for("attacks7_sco")
    );
    let pool = pinpool::Pool::builder(&url).build().unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute(r"SELECT set_config('attacks7.note', 'O\'Brien hunter2 x', false)")
        .await
        .unwrap();
    drop(c);
    assert_eq!(pool.status().pinned, 1);
    let text = log.text();
    assert!(text.contains("a statement pinned"), "{text}");
    assert!(!text.contains("hunter2"), "a value reached the log: {text}");
}

/// The statement methods are `#[track_caller]` functions returning `impl Future`: their
/// futures must still be `Send` and `'static` once their arguments are owned, as users spawn
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn statement_futures_can_be_spawned_and_used_generically() {
    use pinpool::GenericClient;

    async fn generic<C: GenericClient + Sync>(c: &C, sql: &str) -> i32 {
        c.query_one(sql, &[]).await.unwrap().get(0)
    }
    fn assert_send<T: Send>(t: T) -> T {
        t
    }

    let pool = common::builder("attacks7_spawn").build().unwrap();
    let p = pool.clone();
    let got = tokio::spawn(async move {
        let mut c = p.get().await.unwrap();
        let sql = String::from("SELECT 1");
        let a: i32 = c.query_one(&sql, &[]).await.unwrap().get(0);
        let b = assert_send(generic(&c, "SELECT 2")).await;
        let tx = c.transaction().await.unwrap();
        let t = assert_send(generic(&tx, "SELECT 3")).await;
        let n: i64 = 4;
        let r: i64 = tx.query_one("SELECT $1::int8", &[&n]).await.unwrap().get(0);
        tx.commit().await.unwrap();
        a + b + t + r as i32
    })
    .await
    .unwrap();
    assert_eq!(got, 10);
}

/// A `SET`'s value may be a name, bare or double-quoted (`SET app.key = s3cr3t`): PostgreSQL
/// takes it as the value. The digest kept it as a name, at WARN in the pin log.
#[test]
fn the_digest_keeps_no_set_value_given_as_a_name() {
    for (sql, want) in [
        ("SET app.secret = hunter2", "set app.secret = ?"),
        (
            "SET LOCAL app.secret TO \"hunter2\"",
            "set local app.secret to ?",
        ),
        (
            "SET search_path TO app, public; SELECT a.b FROM t",
            "set search_path to ?, ?; select a.b from t",
        ),
        ("UPDATE t SET c = d", "update t set c = d"),
    ] {
        assert_eq!(pinpool::pinning::digest(sql), want, "{sql}");
    }
}

/// Two statements pin one connection for different reasons: each is logged once, with its own
/// digest and line. The log took the connection's first pinning statement for every report:
/// the LISTEN was logged (at DEBUG only, the SET's digest being known) as the SET, at the
/// LISTEN's line.
#[tokio::test(flavor = "current_thread")]
async fn a_second_pinning_statement_on_a_pinned_connection_is_logged_as_itself() {
    let (log, _guard) = debug_log();
    let pool = common::builder("attacks7_second").build().unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute("SET work_mem = '64MB'").await.unwrap();
    let line = line!() + 1;
    c.batch_execute("LISTEN attacks7_chan").await.unwrap();
    drop(c);
    let text = log.text();
    let warns: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("a statement pinned the connection"))
        .collect();
    assert_eq!(warns.len(), 2, "{text}");
    assert!(warns[0].contains("set work_mem = ?"), "{text}");
    assert!(warns[1].contains("listen attacks7_chan"), "{text}");
    assert!(warns[1].contains(&format!("attacks7.rs:{line}:")), "{text}");
}

/// A statement retried on a fresh connection (the first one was found closed before anything
/// was sent) is logged at its own line: the swap built the fresh connection's guard with the
/// checkout's line.
#[tokio::test(flavor = "current_thread")]
async fn a_retried_statement_that_pins_is_logged_at_its_own_line() {
    let (log, _guard) = debug_log();
    let app = "attacks7_retry";
    let pool = common::builder(app).max_size(2).build().unwrap();
    let c = pool.get().await.unwrap();
    let admin = common::admin().await;
    assert_eq!(common::kill_backends(&admin, app).await, 1);
    common::until_closed(&c).await;
    // Each test pins with a statement of its own: the log is once per statement and process,
    // and `cargo test` runs a file's tests in one process.
    let line = line!() + 1;
    c.batch_execute("SET maintenance_work_mem = '66MB'")
        .await
        .unwrap();
    assert_eq!(pool.status().retries, 1);
    drop(c);
    let text = log.text();
    let warn = text
        .lines()
        .find(|l| l.contains("a statement pinned the connection"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(warn.contains(&format!("attacks7.rs:{line}:")), "{text}");
}

/// Under the strict policy a refused statement was logged at WARN with its text, and its error
/// displayed it: the value the pin log's digest keeps out (a password set with set_config)
/// reached the log all the same.
#[tokio::test(flavor = "current_thread")]
async fn a_refused_statement_reaches_no_log_with_its_values() {
    let (log, _guard) = debug_log();
    let pool = common::builder("attacks7_refuse")
        .pin_policy(pinpool::PinPolicy::Refuse)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let err = c
        .batch_execute("SELECT set_config('app.password', 'hunter2', false)")
        .await
        .unwrap_err();
    let pinpool::Error::PinRefused { statement, .. } = &err else {
        panic!("{err:?}");
    };
    // The caller's own error still holds the text it sent.
    assert!(statement.contains("hunter2"), "{statement}");
    let shown = err.to_string();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("set_config(?, ?, false)"), "{shown}");
    let text = log.text();
    assert!(text.contains("refused a statement"), "{text}");
    assert!(!text.contains("hunter2"), "a value reached the log: {text}");
}

/// A statement sent through generic code (`C: GenericClient`) is logged at the generic
/// code's line, not at pinpool's trait impl.
#[tokio::test(flavor = "current_thread")]
async fn a_pin_through_a_generic_client_is_logged_at_the_generic_callers_line() {
    use pinpool::GenericClient;

    async fn set_it<C: GenericClient>(c: &C) -> u32 {
        let line = line!() + 1;
        c.batch_execute("SET temp_buffers = '67MB'").await.unwrap();
        line
    }
    let (log, _guard) = debug_log();
    let pool = common::builder("attacks7_generic").build().unwrap();
    let c = pool.get().await.unwrap();
    let line = set_it(&c).await;
    drop(c);
    let text = log.text();
    let warn = text
        .lines()
        .find(|l| l.contains("a statement pinned the connection"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(warn.contains(&format!("attacks7.rs:{line}:")), "{text}");
}

/// The wire keeps the first 120 characters of a pinning statement: two statements alike that
/// far, pinning for different reasons after it, have one digest. The second was never logged
/// at WARN (its digest was known), so its reason had no advice line.
#[tokio::test(flavor = "current_thread")]
async fn statements_alike_for_120_characters_pinning_differently_are_each_logged() {
    let (log, _guard) = debug_log();
    let pool = common::builder("attacks7_prefix").build().unwrap();
    let prefix = format!("SELECT 1 AS {}", "x".repeat(120));
    let c = pool.get().await.unwrap();
    c.batch_execute(&format!("{prefix}, set_config('attacks7.a', 'b', false)"))
        .await
        .unwrap();
    drop(c);
    let c = pool.get().await.unwrap();
    c.batch_execute(&format!("{prefix}, pg_advisory_lock(7)"))
        .await
        .unwrap();
    drop(c);
    let text = log.text();
    let warns: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("a statement pinned the connection"))
        .collect();
    assert_eq!(warns.len(), 2, "{text}");
    assert!(warns[1].contains("advisory_lock"), "{text}");
}
