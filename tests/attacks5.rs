//! Attacks on what this session merged: the wire's copy bookkeeping against a COPY the server
//! ends, the configuration as data, and the driver's client reached through `Deref`.

mod common;

use std::time::{Duration, Instant};

use common::{admin, backends, builder};

/// tokio-postgres cannot feed a `COPY ... FROM STDIN` sent as a simple Query: its
/// `simple_query` fails at the CopyInResponse. The server stays in copy mode until the next
/// message that is not copy data, which fails the copy; everything after is answered as usual.
/// The connection is idle and clean afterwards, so it goes back to the pool, and its socket
/// bound must still stop a raw call that outlives `query_timeout`.
#[tokio::test]
async fn a_simple_query_copy_does_not_leave_later_raw_calls_unbounded() {
    let app = "att5_copy_stuck";
    let admin = admin().await;
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS att5_copy_target (x int)")
        .await
        .unwrap();
    let pool = builder(app)
        .max_size(1)
        .query_timeout(Some(Duration::from_secs(1)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    assert!(
        c.simple_query("COPY att5_copy_target FROM STDIN")
            .await
            .is_err()
    );
    // The next call's Parse ends the copy on the server (with an error for the copy).
    let _ = c.query_one("SELECT 1", &[]).await;
    let pid = backends(&admin, app).await;
    drop(c);
    let c = pool.get().await.unwrap();
    if backends(&admin, app).await != pid {
        // The connection was closed on return: nothing stuck can follow.
        return;
    }
    // The driver's client through deref: each request is bounded at the socket by
    // query_timeout (1 s).
    let start = Instant::now();
    let raw: &tokio_postgres::Client = &c;
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        raw.query("SELECT pg_sleep(20)", &[]),
    )
    .await
    .expect("the socket's bound stops the call, or the sleep ends");
    assert!(
        r.is_err(),
        "a 20 s raw call ran to its end past query_timeout (1 s), took {:?}",
        start.elapsed()
    );
}

#[cfg(feature = "serde")]
mod config_data {
    use pinpool::{Config, Error};

    fn config(json: serde_json::Value) -> Config {
        serde_json::from_value(json).unwrap()
    }

    fn option_of(c: Config) -> &'static str {
        match c.builder().build() {
            Err(Error::Config { option, .. }) => option,
            Err(other) => panic!("not a configuration error: {other:?}"),
            Ok(_) => panic!("built"),
        }
    }

    /// `host` and `hosts` both given: which one the data means is unclear (the URL's hosts
    /// beside either are refused); they are silently joined.
    #[test]
    fn host_and_hosts_together_are_refused() {
        let c = config(serde_json::json!({
            "host": "db-a.example", "hosts": ["db-b.example"], "user": "app"
        }));
        let option = option_of(c);
        assert!(option == "host" || option == "hosts", "{option}");
    }

    /// Port 0 cannot be connected to: refused at `build()`, naming `port`, as a bad port in a
    /// URL is.
    #[test]
    fn port_zero_is_refused_naming_port() {
        let c = config(serde_json::json!({ "host": "127.0.0.1", "port": 0, "user": "app" }));
        assert_eq!(option_of(c), "port");
        let c = config(serde_json::json!({ "url": "postgres://app@127.0.0.1:0/app" }));
        assert_eq!(option_of(c), "port");
    }

    /// The error names the option as the data spells it: `hosts`, not `host`.
    #[test]
    fn a_bad_hosts_list_is_named_hosts() {
        let c = config(serde_json::json!({ "hosts": [], "user": "app" }));
        assert_eq!(option_of(c), "hosts");
        let c = config(serde_json::json!({ "hosts": ["db.example", ""], "user": "app" }));
        assert_eq!(option_of(c), "hosts");
    }

    /// A duration's error says which option it is about: a file with ten durations and the
    /// message "this duration cannot be off at line 1 column 40" leaves the reader counting
    /// columns (an environment variable read by envy has no line or column at all).
    #[test]
    fn a_bad_duration_names_its_option() {
        let e = serde_json::from_value::<Config>(serde_json::json!({
            "pool": { "acquire_timeout": "off" }
        }))
        .unwrap_err();
        assert!(e.to_string().contains("acquire_timeout"), "{e}");
        let e = serde_json::from_value::<Config>(serde_json::json!({
            "pool": { "query_timeout": true }
        }))
        .unwrap_err();
        assert!(e.to_string().contains("query_timeout"), "{e}");
    }

    /// A Unix socket directory and an application_name with spaces are ordinary data.
    #[test]
    fn a_unix_socket_and_a_spaced_application_name_build() {
        let c = config(serde_json::json!({
            "host": "/var/run/postgresql", "user": "app",
            "application_name": "my service (eu-west-1)"
        }));
        c.builder().build().unwrap();
    }

    /// Secrets given in odd places stay out of `Debug`: a key-value `url` with a password and
    /// a password field beside it.
    #[test]
    fn a_key_value_url_with_a_password_is_not_printed() {
        let c = config(serde_json::json!({
            "url": "host=db.example user=app password=kv-secret-7",
            "password": "field-secret-8"
        }));
        let shown = format!("{c:?} {:?}", c.builder().build().map(|p| format!("{p:?}")));
        assert!(!shown.contains("kv-secret-7"), "{shown}");
        assert!(!shown.contains("field-secret-8"), "{shown}");
    }

    /// Absurd durations that parse are refused or held, never a panic at build or first use.
    #[tokio::test]
    async fn huge_durations_do_not_panic() {
        let c = config(serde_json::json!({
            "url": crate::common::url_for("att5_huge"),
            "pool": {
                "max_size": usize::MAX, "acquire_timeout": 1e15, "connect_timeout": "1e15",
                "query_timeout": 1e15, "idle_timeout": 1e15, "max_lifetime": 86000,
                "validate_timeout": 1e15, "held_too_long": 1e15, "refill_after_invocation": 1e15
            }
        }));
        let pool = match c.builder().build() {
            Ok(p) => p,
            Err(e) => {
                assert!(matches!(e, Error::Config { .. }), "{e:?}");
                return;
            }
        };
        let client = pool.get().await.unwrap();
        client.query_one("SELECT 1", &[]).await.unwrap();
        drop(client);
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(30);
        pool.invocation(deadline, async {
            let c = pool.get().await.unwrap();
            c.query_one("SELECT 1", &[]).await.unwrap();
        })
        .await;
    }
}

/// Two calls at once on one client (`join!` on `&PooledClient`, as a handler fanning out does).
/// Each takes the number its request will have before either is written, so both take the
/// same one. The first runs a cached statement DDL made stale: the server fails it at Bind.
/// The second calls a function that fails with the same SQLSTATE and routine after running
/// (a nontransactional `nextval` first). The stale rule must not read the first call's failure
/// at Bind as the second's: the second call ran, and must not run again.
#[tokio::test]
async fn a_concurrent_calls_failure_at_bind_does_not_rerun_a_call_that_ran() {
    let admin = admin().await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS att5_rr_p, att5_rr_b; DROP SEQUENCE IF EXISTS att5_rr_s;
             CREATE TABLE att5_rr_p (x int); CREATE TABLE att5_rr_b (x int);
             CREATE SEQUENCE att5_rr_s;
             CREATE OR REPLACE FUNCTION att5_rr_f() RETURNS int LANGUAGE plpgsql AS $$
             BEGIN PERFORM nextval('att5_rr_s'); EXECUTE 'EXECUTE att5_rr_q'; RETURN 1; END $$;",
        )
        .await
        .unwrap();
    let pool = builder("att5_rerun")
        .max_size(1)
        .pin_policy(pinpool::PinPolicy::Keep)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute("PREPARE att5_rr_q AS SELECT * FROM att5_rr_p")
        .await
        .unwrap();
    // Both statements cached.
    c.query("SELECT * FROM att5_rr_b", &[]).await.unwrap();
    c.query_one("SELECT att5_rr_f()", &[]).await.unwrap();
    admin
        .batch_execute(
            "ALTER TABLE att5_rr_p ADD COLUMN y int; ALTER TABLE att5_rr_b ADD COLUMN y int",
        )
        .await
        .unwrap();
    let before: i64 = admin
        .query_one("SELECT last_value FROM att5_rr_s", &[])
        .await
        .unwrap()
        .get(0);
    let (b, a) = tokio::join!(
        c.query("SELECT * FROM att5_rr_b", &[]),
        c.query_one("SELECT att5_rr_f()", &[])
    );
    drop(b);
    assert!(a.is_err(), "the function fails");
    let after: i64 = admin
        .query_one("SELECT last_value FROM att5_rr_s", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        after - before,
        1,
        "the function ran {} times for one call",
        after - before
    );
}

async fn advisory_locks(admin: &tokio_postgres::Client, key: i64) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::int8::oid",
            &[&key],
        )
        .await
        .unwrap()
        .get(0)
}

async fn lock_through<G: pinpool::GenericClient>(g: &G, key: i64) -> Result<(), pinpool::Error> {
    let stmt = g
        .prepare_typed_cached(
            "SELECT pg_advisory_lock($1)",
            &[tokio_postgres::types::Type::INT8],
        )
        .await?;
    g.query(&stmt, &[&key]).await.map(drop)
}

/// `PinPolicy::Refuse` and a pinning statement from `prepare_typed_cached`, through
/// `GenericClient`, on a client and in a transaction, with the cache on and off: refused,
/// and nothing taken on the server.
#[tokio::test]
async fn refuse_stops_a_pinning_statement_from_prepare_typed_cached() {
    let admin = admin().await;
    for (capacity, key) in [(64usize, 5_150_001i64), (0, 5_150_002)] {
        let pool = builder("att5_refuse")
            .pin_policy(pinpool::PinPolicy::Refuse)
            .statement_cache_capacity(capacity)
            .build()
            .unwrap();
        let mut c = pool.get().await.unwrap();
        let e = lock_through(&c, key).await.unwrap_err();
        assert!(matches!(e, pinpool::Error::PinRefused { .. }), "{e:?}");
        let e = c
            .query("SELECT pg_advisory_lock($1)", &[&key])
            .await
            .unwrap_err();
        assert!(matches!(e, pinpool::Error::PinRefused { .. }), "{e:?}");
        let t = c.transaction().await.unwrap();
        let e = lock_through(&t, key).await.unwrap_err();
        assert!(matches!(e, pinpool::Error::PinRefused { .. }), "{e:?}");
        t.commit().await.unwrap();
        assert_eq!(advisory_locks(&admin, key).await, 0);
        assert!(!pinpool::PooledClient::pin_state(&c).is_pinned());
    }
}

/// A driver `Statement` prepared through deref in one checkout and run in the next on the same
/// connection: the wire still knows what it pins, and the lock does not outlive the checkout.
#[tokio::test]
async fn a_driver_statement_kept_across_checkouts_pins_when_run() {
    let admin = admin().await;
    let key = 5_150_003i64;
    let pool = builder("att5_kept_driver_stmt")
        .max_size(1)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let raw: &tokio_postgres::Client = &c;
    let st = raw
        .prepare(&format!("SELECT pg_advisory_lock({key})"))
        .await
        .unwrap();
    drop(c);
    let c = pool.get().await.unwrap();
    let raw: &tokio_postgres::Client = &c;
    raw.query(&st, &[]).await.unwrap();
    assert!(pinpool::PooledClient::pin_state(&c).is_pinned());
    drop(st);
    drop(c);
    let c = pool.get().await.unwrap();
    c.query_one("SELECT 1", &[]).await.unwrap();
    assert!(
        common::eventually(10, || async { advisory_locks(&admin, key).await == 0 }).await,
        "the session lock outlived the checkout that took it"
    );
}

/// The driver's row stream and copy sink hold no borrow of the client: kept past the
/// checkout, they must not leave the next checkout a connection mid-answer or mid-copy.
#[tokio::test]
async fn driver_streams_kept_past_the_checkout() {
    use futures_util::{SinkExt, StreamExt};
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS att5_ci; CREATE TABLE att5_ci (x int)")
        .await
        .unwrap();
    let pool = builder("att5_driver_streams").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let raw: &tokio_postgres::Client = &c;
    let rows = raw
        .query_raw(
            "SELECT generate_series(1, 200000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    drop(c);
    let c = pool.get().await.unwrap();
    assert_eq!(
        c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
    let mut rows = Box::pin(rows);
    while let Some(r) = rows.next().await {
        if r.is_err() {
            break;
        }
    }
    drop(c);
    let c = pool.get().await.unwrap();
    let raw: &tokio_postgres::Client = &c;
    let sink = raw
        .copy_in::<_, bytes::Bytes>("COPY att5_ci FROM STDIN")
        .await
        .unwrap();
    drop(c);
    let c = pool.get().await.unwrap();
    assert_eq!(
        c.query_one("SELECT 8", &[]).await.unwrap().get::<_, i32>(0),
        8
    );
    let mut sink = Box::pin(sink);
    let _ = sink.send(bytes::Bytes::from_static(b"1\n")).await;
    let _ = sink.as_mut().finish().await;
    assert_eq!(
        c.query_one("SELECT 9", &[]).await.unwrap().get::<_, i32>(0),
        9
    );
    let n: i64 = admin
        .query_one("SELECT count(*) FROM att5_ci", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 0,
        "a copy from a returned checkout wrote into the next one's session"
    );
}

/// A raw `BEGIN` and a raw `LISTEN` through deref, then the client dropped: the next checkout
/// is outside any transaction and hears nothing.
#[tokio::test]
async fn raw_begin_and_listen_do_not_reach_the_next_checkout() {
    let pool = builder("att5_raw_state").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    (*c).batch_execute("BEGIN; LISTEN att5_ch").await.unwrap();
    drop(c);
    let c = pool.get().await.unwrap();
    assert!(!common::in_transaction_block(&c).await);
    let listening: i64 = c
        .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listening, 0);
}

/// A connection string that fails to parse never has its password quoted back, wherever the
/// password sits and whatever else is wrong.
#[cfg(feature = "serde")]
#[test]
fn a_bad_url_never_quotes_its_password() {
    for url in [
        "postgres://app@db/app?password=se%ZZcret91",
        "postgres://app@db/app?password=secret91&sslmode=bogus",
        "postgres://app@db/app?sslmode=bogus&password=secret91",
        "postgres://app@db/app?password=secret91&port=notaport",
        "postgres://app@db/app?options=-c%20x%3Dsecret91&port=x",
        "postgres://app:secret91@db:5432,db2:x/app",
        "postgres://app:secret91@[::1/app",
        "postgres://app@db/app?password=secret91&password",
        "postgresql://app:secret91@db/app?application_name=%FF",
        "host=db password=secret91 port=x",
        "host=db password='secret91",
    ] {
        let c: pinpool::Config = serde_json::from_value(serde_json::json!({ "url": url })).unwrap();
        let r = c.builder().build();
        let shown = match r {
            Ok(p) => format!("{p:?}"),
            Err(e) => format!("{e} {e:?}"),
        };
        assert!(!shown.contains("secret91"), "{url}: {shown}");
        assert!(!shown.contains("cret91"), "{url}: {shown}");
    }
}

/// The driver's client borrowed once, before the invocation (a repository built over
/// `&tokio_postgres::Client` at start-up, used by every event), and used inside it: a request
/// is bounded by "the cutoff of the invocation it was sent in", so a statement that would
/// outlive the deadline is stopped there, not at `query_timeout`.
#[tokio::test]
async fn a_driver_client_borrowed_before_the_invocation_stops_at_its_cutoff() {
    let pool = builder("att5_early_borrow")
        .query_timeout(Some(Duration::from_secs(60)))
        .deadline_margin(Duration::from_millis(200))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let raw: &tokio_postgres::Client = &c;
    raw.query_one("SELECT 1", &[]).await.unwrap();
    let deadline = std::time::SystemTime::now() + Duration::from_millis(1500);
    let start = Instant::now();
    let r = pool
        .invocation(deadline, async {
            tokio::time::timeout(
                Duration::from_secs(60),
                raw.query("SELECT pg_sleep(15)", &[]),
            )
            .await
        })
        .await
        .expect("pg_sleep ends in 15 s");
    assert!(
        r.is_err(),
        "a 15 s statement sent in an invocation with 1.5 s left ran to its end ({:?})",
        start.elapsed()
    );
}

/// deadpool-postgres code runs `prepare_cached` then `query(&stmt)`. After DDL the statement
/// is stale: that call fails (the caller holds it), but the cache must not keep handing out
/// the stale statement for the connection's lifetime: the next `prepare_cached` gives one
/// that runs, on the client and through `GenericClient` in a transaction.
#[tokio::test]
async fn a_stale_statement_from_prepare_cached_is_not_handed_out_again() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS att5_pc; CREATE TABLE att5_pc (x int)")
        .await
        .unwrap();
    let pool = builder("att5_stale_cached").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let sql = "SELECT * FROM att5_pc";
    let stmt = c.prepare_cached(sql).await.unwrap();
    c.query(&stmt, &[]).await.unwrap();
    admin
        .batch_execute("ALTER TABLE att5_pc ADD COLUMN y int")
        .await
        .unwrap();
    assert!(
        c.query(&stmt, &[]).await.is_err(),
        "stale, held by the caller"
    );
    drop(stmt);
    let stmt = c.prepare_cached(sql).await.unwrap();
    let r = c.query(&stmt, &[]).await;
    assert!(
        r.is_ok(),
        "the cache handed the stale statement out again: {r:?}"
    );
    let typed = c
        .prepare_typed_cached(
            "SELECT * FROM att5_pc WHERE x = $1",
            &[tokio_postgres::types::Type::INT4],
        )
        .await
        .unwrap();
    c.query(&typed, &[&1i32]).await.unwrap();
    // A stream's statement, by its text: the same.
    rows(&c, sql).await.unwrap();
    admin
        .batch_execute("ALTER TABLE att5_pc ADD COLUMN z int")
        .await
        .unwrap();
    assert!(rows(&c, sql).await.is_err(), "stale");
    let r = rows(&c, sql).await;
    assert!(
        r.is_ok(),
        "the stream's stale statement stayed cached: {r:?}"
    );
}

async fn rows(c: &pinpool::PooledClient, sql: &str) -> Result<(), pinpool::Error> {
    c.query_raw(sql, std::iter::empty::<i32>()).await.map(drop)
}
