//! Pin tracking in the pool, and an oracle: what the rules call safe leaves no session state
//! on a real PostgreSQL, and what they call pinning does where the server can show it.

mod common;

use common::{admin, builder};
use pinpool::pinning::{PinRules, Reason, classify};
use pinpool::{CloseReason, Error, PinPolicy, PooledClient};

async fn pid(c: &PooledClient) -> i32 {
    c.query_one_scalar("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
}

async fn work_mem(c: &PooledClient) -> String {
    c.query_one_scalar("SELECT current_setting('work_mem')", &[])
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pinned_connection_is_closed_on_return_and_the_next_get_is_fresh() {
    let pool = builder("pp_close").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let default = work_mem(&c).await;
    let first = pid(&c).await;
    assert!(!PooledClient::pin_state(&c).is_pinned());
    c.batch_execute("SET work_mem = '7MB'").await.unwrap();
    let state = PooledClient::pin_state(&c);
    assert_eq!(state.reasons.iter().collect::<Vec<_>>(), [Reason::Set]);
    assert_eq!(
        state.first_statement.as_deref(),
        Some("SET work_mem = '7MB'")
    );
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::Pinned), 1);
    assert_eq!(pool.status().pinned, 1);
    let c = pool.get().await.unwrap();
    assert_ne!(pid(&c).await, first);
    assert_eq!(
        work_mem(&c).await,
        default,
        "no session state leaks into the next checkout"
    );
    assert!(!PooledClient::pin_state(&c).is_pinned());
}

#[tokio::test]
async fn the_keep_policy_only_observes() {
    let pool = builder("pp_keep")
        .max_size(1)
        .pin_policy(PinPolicy::Keep)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let first = pid(&c).await;
    c.query("SELECT set_config('work_mem', '9MB', false)", &[])
        .await
        .unwrap();
    assert!(
        PooledClient::pin_state(&c)
            .reasons
            .contains(Reason::SetConfig)
    );
    drop(c);
    let c = pool.get().await.unwrap();
    assert_eq!(pid(&c).await, first);
    assert_eq!(work_mem(&c).await, "9MB");
    assert!(
        PooledClient::pin_state(&c).is_pinned(),
        "the pin stays with the connection"
    );
    assert_eq!(pool.status().closed.total(), 0);
}

#[tokio::test]
async fn the_strict_policy_refuses_before_sending() {
    let pool = builder("pp_refuse")
        .max_size(1)
        .pin_policy(PinPolicy::Refuse)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let default = work_mem(&c).await;
    let err = c
        .batch_execute("SELECT 1; SET work_mem = '11MB'")
        .await
        .unwrap_err();
    match &err {
        Error::PinRefused { reasons, statement } => {
            assert!(reasons.contains(Reason::Set));
            assert!(statement.contains("SET work_mem"));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("set"), "{err}");
    assert_eq!(work_mem(&c).await, default, "nothing was sent");
    let stmt = c
        .prepare("SELECT set_config('work_mem', '12MB', false)")
        .await
        .unwrap();
    assert!(matches!(
        c.query(&stmt, &[]).await,
        Err(Error::PinRefused { .. })
    ));
    assert_eq!(work_mem(&c).await, default);
    assert!(!PooledClient::pin_state(&c).is_pinned());
    drop(c);
    let s = pool.status();
    assert_eq!((s.refused, s.closed.total()), (2, 0), "{s:?}");
}

#[tokio::test]
async fn prepared_statements_pin_when_executed_not_when_prepared() {
    let admin = admin().await;
    admin
        .batch_execute("DROP SEQUENCE IF EXISTS pp_seq; CREATE SEQUENCE pp_seq")
        .await
        .unwrap();
    let pool = builder("pp_prepared").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let stmt = c.prepare("SELECT nextval('pp_seq')").await.unwrap();
    assert!(!PooledClient::pin_state(&c).is_pinned());
    let _: i64 = c.query_one_scalar(&stmt, &[]).await.unwrap();
    assert!(
        PooledClient::pin_state(&c)
            .reasons
            .contains(Reason::SequenceFunction)
    );
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::Pinned), 1);
    admin.batch_execute("DROP SEQUENCE pp_seq").await.unwrap();
}

#[tokio::test]
async fn legacy_rules_pin_every_parse_but_not_simple_queries() {
    let pool = builder("pp_legacy")
        .max_size(1)
        .pin_rules(PinRules::legacy())
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    assert!(!PooledClient::pin_state(&c).is_pinned());
    c.query("SELECT $1::int", &[&1i32]).await.unwrap();
    assert!(PooledClient::pin_state(&c).reasons.contains(Reason::Parse));
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::Pinned), 1);
}

#[tokio::test]
async fn set_local_pins_unless_declared_safe() {
    for (safe, closed) in [(false, 1), (true, 0)] {
        let app = if safe { "pp_local_safe" } else { "pp_local" };
        let pool = builder(app)
            .max_size(1)
            .pin_rules(PinRules::new().set_local_safe(safe))
            .build()
            .unwrap();
        let mut c = pool.get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        tx.batch_execute("SET LOCAL work_mem = '5MB'")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        drop(c);
        assert_eq!(
            pool.status().closed.get(CloseReason::Pinned),
            closed,
            "safe = {safe}"
        );
    }
}

/// With `standard_conforming_strings` off, `'a\''` is a whole string and the lock after it
/// is taken: the observer reads what it sends as the server reported the setting, at the
/// connection's start (here its `options`) or after a `SET LOCAL` inside a transaction.
#[tokio::test]
async fn strings_are_read_as_the_server_reads_them_and_the_lock_never_reaches_the_next_caller() {
    let held = |k: i64| {
        format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = {k} AND pid = pg_backend_pid()"
        )
    };
    let off = format!(
        "{}&options=-c%20standard_conforming_strings%3Doff",
        common::url_for("pp_strings_off")
    );
    let pool = pinpool::Pool::builder(off).max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute(r"SELECT 'a\'' , pg_advisory_lock(774431), 'b'")
        .await
        .unwrap();
    assert!(
        PooledClient::pin_state(&c)
            .reasons
            .contains(Reason::AdvisoryLock)
    );
    drop(c);
    let c = pool.get().await.unwrap();
    let left: i64 = c
        .query_one_scalar(held(774431).as_str(), &[])
        .await
        .unwrap();
    assert_eq!(left, 0, "the next caller holds the lock");
    drop(c);

    // SET LOCAL, with rules that let SET LOCAL itself pass.
    let pool = builder("pp_strings_local")
        .max_size(1)
        .pin_rules(PinRules::new().set_local_safe(true))
        .build()
        .unwrap();
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL standard_conforming_strings = off")
        .await
        .unwrap();
    tx.batch_execute(r"SELECT 'a\'' , pg_advisory_lock(774432), 'b'")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        PooledClient::pin_state(&c)
            .reasons
            .contains(Reason::AdvisoryLock)
    );
    drop(c);
    let c = pool.get().await.unwrap();
    let left: i64 = c
        .query_one_scalar(held(774432).as_str(), &[])
        .await
        .unwrap();
    assert_eq!(left, 0, "the next caller holds the lock");
    // Back to `on` after the commit: the same text is a string and a bit string, an error.
    assert!(
        c.batch_execute(r"SELECT 'a\'' , pg_advisory_lock(774433), 'b'")
            .await
            .is_err()
    );
}

const SETUP: &str = "
DROP SCHEMA IF EXISTS pin_oracle CASCADE;
CREATE SCHEMA pin_oracle;
CREATE TABLE pin_oracle.t (id int PRIMARY KEY, v text, n bigint, a int);
CREATE TABLE pin_oracle.x (id int, a int);
CREATE TABLE pin_oracle.temp (id int);
CREATE TABLE pin_oracle.stats (nextval_count int);
CREATE TABLE pin_oracle.\"nextval\" (id int);
CREATE TABLE pin_oracle.\"SET\" (\"a\"\"b\" int);
CREATE SEQUENCE pin_oracle.s;
CREATE FUNCTION pin_oracle.my_func() RETURNS int LANGUAGE sql AS 'SELECT 1';
CREATE PROCEDURE pin_oracle.my_proc() LANGUAGE sql AS 'SELECT 1';
INSERT INTO pin_oracle.t VALUES (1, 'a', 1, 1);
";

/// Statements the rules call safe, runnable in the oracle schema. `true`: run inside a
/// transaction (it writes; state is inspected before the rollback). Transaction-level advisory
/// locks run in autocommit: a session-level lock would outlive the statement, theirs does not.
const SAFE: &[(&str, bool)] = &[
    ("SELECT 1", false),
    ("SELECT * FROM t WHERE id = 1", false),
    ("INSERT INTO t (id, v) VALUES (2, 'b')", true),
    ("UPDATE t SET v = 'z' WHERE id = 1", true),
    ("DELETE FROM t WHERE id = 1", true),
    (
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        true,
    ),
    ("SELECT 1 AS a INTO t2 FROM x", true),
    ("SELECT pg_advisory_xact_lock(1)", false),
    ("SELECT pg_advisory_xact_lock_shared(1)", false),
    ("SELECT pg_try_advisory_xact_lock(1)", false),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", false),
    ("SELECT pg_advisory_unlock(1)", false),
    ("SELECT 'SET a = 1'", false),
    ("SELECT $$ SET a = 1; nextval('s') $$", false),
    ("SELECT 1 -- nextval('s')", false),
    (
        "SELECT 1 /* outer /* nextval('s') */ still comment */",
        false,
    ),
    ("SELECT \"nextval\" FROM (SELECT 1 AS nextval) q", false),
    ("SELECT id FROM \"nextval\"", false),
    ("INSERT INTO nextval (id) VALUES (1)", true),
    ("CREATE TABLE t3 (id bigint DEFAULT nextval('s'))", true),
    ("SELECT nextval_count FROM stats", false),
    (
        "WITH nextval (n) AS (SELECT 1) SELECT n FROM nextval",
        false,
    ),
    ("SELECT \"a\"\"b\" FROM \"SET\"", false),
    ("SELECT currval('s') WHERE false", false),
    ("SELECT my_func()", false),
    ("CALL my_proc()", false),
    ("SHOW search_path", false),
    ("SELECT current_setting('search_path')", false),
    ("CREATE TABLE t4 (id int)", true),
    ("CREATE VIEW v AS SELECT 1", true),
    ("CREATE SEQUENCE s2", true),
    ("INSERT INTO temp VALUES (1)", true),
    ("UNLISTEN *", false),
    ("NOTIFY chan, 'SET a = 1'", false),
    ("VACUUM t", false),
    ("ANALYZE t", false),
    ("EXPLAIN SELECT 1", false),
    ("TRUNCATE x", true),
    ("ALTER TABLE x SET (fillfactor = 70)", true),
    ("ALTER TABLE x ALTER COLUMN a SET DEFAULT 1", true),
];

/// Statements the rules call pinning, and a query that shows the state they leave.
const PINNING: &[(&str, &str)] = &[
    ("SET work_mem = '3MB'", "settings"),
    ("SET SESSION search_path = pin_oracle, public", "settings"),
    ("SELECT set_config('work_mem', '3MB', false)", "settings"),
    ("PREPARE q(int) AS SELECT $1", "prepared"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursors"),
    ("LISTEN pin_oracle_chan", "listening"),
    ("CREATE TEMP TABLE tt (id int)", "temp_objects"),
    ("CREATE TEMP SEQUENCE ts", "temp_objects"),
    ("SELECT 1 AS a INTO TEMP tt2", "temp_objects"),
    ("SELECT nextval('s')", "sequence"),
    ("SELECT setval('s', 5)", "sequence"),
    ("SELECT pg_advisory_lock(42)", "advisory"),
    ("SELECT pg_try_advisory_lock_shared(43)", "advisory"),
];

const INSPECT: &str = "SELECT \
 (SELECT count(*) FROM pg_settings WHERE source = 'session') AS settings, \
 (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS prepared, \
 (SELECT count(*) FROM pg_cursors WHERE name <> '') AS cursors, \
 (SELECT count(*) FROM pg_listening_channels()) AS listening, \
 (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temp_objects, \
 (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory";

/// The session state of `client`, by kind, as the server shows it.
async fn session_state(client: &tokio_postgres::Client) -> Vec<(&'static str, i64)> {
    let row = client.query_one(INSPECT, &[]).await.unwrap();
    let names = [
        "settings",
        "prepared",
        "cursors",
        "listening",
        "temp_objects",
        "advisory",
    ];
    let mut state: Vec<(&'static str, i64)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, row.get::<_, i64>(i)))
        .filter(|(_, v)| *v > 0)
        .collect();
    // lastval() works only after nextval, currval() after nextval or setval of that sequence,
    // in this session. Asked last: in a transaction their error aborts it.
    if client.simple_query("SELECT lastval()").await.is_ok()
        || client
            .simple_query("SELECT currval('pin_oracle.s')")
            .await
            .is_ok()
    {
        state.push(("sequence", 1));
    }
    state
}

async fn fresh_session() -> tokio_postgres::Client {
    // The schema comes in the startup packet, not through SET (which would show as session state).
    let url = common::url_for("pp_oracle");
    let mut cfg: tokio_postgres::Config = url.parse().unwrap();
    cfg.options("-c search_path=pin_oracle");
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test]
async fn oracle_safe_statements_leave_no_session_state_and_pinning_ones_do() {
    let admin = admin().await;
    admin.batch_execute(SETUP).await.unwrap();
    let mut failures = Vec::new();
    for (sql, in_txn) in SAFE {
        assert!(
            !classify(sql).may_pin(),
            "{sql} is labelled safe but classified as pinning"
        );
        let client = fresh_session().await;
        if *in_txn {
            client.batch_execute("BEGIN").await.unwrap();
        }
        if let Err(e) = client.simple_query(sql).await {
            failures.push(format!("{sql}: did not run: {e}"));
            continue;
        }
        let state = session_state(&client).await;
        if !state.is_empty() {
            failures.push(format!("{sql}: classified safe but left {state:?}"));
        }
    }
    for (sql, kind) in PINNING {
        assert!(
            classify(sql).may_pin(),
            "{sql} is labelled pinning but classified as safe"
        );
        let client = fresh_session().await;
        client.simple_query(sql).await.unwrap();
        let state = session_state(&client).await;
        if !state.iter().any(|(k, _)| k == kind) {
            failures.push(format!("{sql}: expected {kind} state, saw {state:?}"));
        }
    }
    admin
        .batch_execute("DROP SCHEMA pin_oracle CASCADE")
        .await
        .unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
