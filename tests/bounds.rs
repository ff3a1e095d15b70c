//! Every call is bounded where its bytes are: a request written on a pooled connection, by
//! pinpool's methods, by `PooledClient::raw` or through `&tokio_postgres::Client`, stops at
//! `query_timeout` and at the cutoff of the invocation it runs in, whenever its client was
//! checked out. Also: what an error says, and when a failed cached statement runs again.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{admin, builder};
use pinpool::{Error, PooledClient, TimeoutCause};

fn in_ms(ms: u64) -> SystemTime {
    SystemTime::now() + Duration::from_millis(ms)
}

/// Code written for the driver's client, as a migration tool or another crate has it.
async fn legacy_sleep(c: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    c.simple_query("SELECT pg_sleep(3)").await.map(|_| ())
}

/// Within `limit`, generous for a loaded machine, yet well short of the 3 s sleep.
fn assert_stopped_early(started: Instant, limit: Duration) {
    let took = started.elapsed();
    assert!(took < limit, "the call ran {took:?}, past its bound");
}

/// Runs `call` on a fresh client inside an invocation 1 s from its deadline (200 ms margin):
/// it must fail with the driver's closed error well before the 3 s sleep, and leave nothing
/// unanswered in the pool.
async fn stops_at_the_cutoff<F>(app: &str, call: F)
where
    F: AsyncFnOnce(&PooledClient) -> Result<(), tokio_postgres::Error>,
{
    let pool = builder(app)
        .deadline_margin(Duration::from_millis(200))
        .build()
        .unwrap();
    let t = Instant::now();
    let err = pool
        .invocation(in_ms(1000), async {
            let c = pool.get().await.unwrap();
            call(&c).await.unwrap_err()
        })
        .await;
    assert!(err.is_closed(), "{err:?}");
    assert_stopped_early(t, Duration::from_millis(2500));
    let s = pool.status();
    assert_eq!((s.idle, s.in_use), (0, 0), "{s:?}");
}

#[tokio::test]
async fn a_raw_call_stops_at_the_invocations_cutoff() {
    stops_at_the_cutoff("bnd_raw_inv", async |c| {
        PooledClient::raw(c)
            .simple_query("SELECT pg_sleep(3)")
            .await
            .map(drop)
    })
    .await;
}

#[tokio::test]
async fn a_call_through_the_drivers_client_stops_at_the_invocations_cutoff() {
    stops_at_the_cutoff("bnd_deref_inv", async |c| legacy_sleep(c).await).await;
}

#[tokio::test]
async fn a_raw_call_outside_any_invocation_stops_at_query_timeout() {
    let pool = builder("bnd_raw_qt")
        .query_timeout(Some(Duration::from_millis(700)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let t = Instant::now();
    let err = legacy_sleep(&c).await.unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert_stopped_early(t, Duration::from_millis(2500));
    drop(c);
    assert_eq!(pool.status().idle, 0);
    // The pool goes on with a fresh connection.
    let c = pool.get().await.unwrap();
    c.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn a_driver_client_kept_across_a_pinpool_call_keeps_its_bound() {
    // A borrowed driver client is used, then a pinpool call, then the borrowed client again
    // well after the pinpool call's own bound would have passed: it is not cut short.
    let pool = builder("bnd_keep")
        .query_timeout(Some(Duration::from_millis(1500)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let raw = PooledClient::raw(&c);
    raw.simple_query("SELECT 1").await.unwrap();
    c.query_one("SELECT 1", &[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    raw.simple_query("SELECT pg_sleep(0.2)")
        .await
        .expect("within its own query_timeout");
}

#[tokio::test]
async fn a_client_checked_out_before_an_invocation_stops_at_its_cutoff() {
    let pool = builder("bnd_before")
        .deadline_margin(Duration::from_millis(200))
        .build()
        .unwrap();
    // Checked out during INIT, kept in the handler's state.
    let c = pool.get().await.unwrap();
    let t = Instant::now();
    let err = pool
        .invocation(in_ms(1000), async {
            c.query("SELECT pg_sleep(3)", &[]).await.unwrap_err()
        })
        .await;
    assert!(
        matches!(
            err,
            Error::Timeout {
                cause: TimeoutCause::Deadline,
                ..
            }
        ),
        "{err:?}"
    );
    assert_stopped_early(t, Duration::from_millis(2500));
    drop(c);

    // The same through the driver's client.
    let c = pool.get().await.unwrap();
    let t = Instant::now();
    let err = pool
        .invocation(in_ms(1000), async { legacy_sleep(&c).await.unwrap_err() })
        .await;
    assert!(err.is_closed(), "{err:?}");
    assert_stopped_early(t, Duration::from_millis(2500));
}

#[tokio::test]
async fn a_client_kept_from_an_earlier_invocation_works_in_the_next() {
    let pool = builder("bnd_kept").build().unwrap();
    let c = pool
        .invocation(in_ms(1000), async { pool.get().await.unwrap() })
        .await;
    // The first invocation's cutoff has passed; the next one's has not.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let one: i32 = pool
        .invocation(in_ms(5000), async {
            c.query_one("SELECT 1", &[]).await.map(|r| r.get(0))
        })
        .await
        .expect("bounded by the invocation it runs in");
    assert_eq!(one, 1);
    let kept_cutoff = PooledClient::cutoff(&c).expect("checked out in an invocation");
    assert!(
        kept_cutoff <= tokio::time::Instant::now(),
        "outside an invocation, the checkout's cutoff applies"
    );
}

#[tokio::test]
async fn a_statement_error_says_what_the_server_said() {
    let admin = admin().await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS bnd_err_t; CREATE TABLE bnd_err_t (k text PRIMARY KEY);
             INSERT INTO bnd_err_t VALUES ('secret-value-4711')",
        )
        .await
        .unwrap();
    let pool = builder("bnd_err").build().unwrap();
    let c = pool.get().await.unwrap();
    let e = c
        .query("SELECT * FROM bnd_err_no_such_table", &[])
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("ERROR 42P01"), "{msg}");
    assert!(msg.contains("bnd_err_no_such_table"), "{msg}");
    assert!(!msg.contains("db error"), "{msg}");
    // The detail quotes the row's value; the message does not carry it, nor the parameter.
    let e = c
        .execute("INSERT INTO bnd_err_t VALUES ($1)", &[&"secret-value-4711"])
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("ERROR 23505"), "{msg}");
    assert!(msg.contains("bnd_err_t_pkey"), "{msg}");
    assert!(!msg.contains("secret-value-4711"), "{msg}");
    // The connection is still usable.
    c.query_one("SELECT 1", &[]).await.unwrap();
    drop(c);
    admin.batch_execute("DROP TABLE bnd_err_t").await.unwrap();
}

/// A function that advances a sequence, then raises `code` with `message`. A sequence does
/// not roll back: its value counts the function's runs.
async fn raising_function(admin: &tokio_postgres::Client, name: &str, code: &str, message: &str) {
    admin
        .batch_execute(&format!(
            "DROP FUNCTION IF EXISTS {name}(); DROP SEQUENCE IF EXISTS {name}_runs;
             CREATE SEQUENCE {name}_runs;
             CREATE FUNCTION {name}() RETURNS int LANGUAGE plpgsql AS $f$
             BEGIN
               PERFORM nextval('{name}_runs');
               RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{message}';
             END $f$;"
        ))
        .await
        .unwrap();
}

async fn runs(admin: &tokio_postgres::Client, name: &str) -> i64 {
    let row = admin
        .query_one(
            &format!("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {name}_runs"),
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn an_error_raised_while_running_is_never_taken_for_a_stale_statement() {
    let admin = admin().await;
    let cases = [
        (
            "bnd_stale_a",
            "0A000",
            "cached plan must not change result type",
        ),
        (
            "bnd_stale_b",
            "26000",
            "prepared statement \"s1\" does not exist",
        ),
    ];
    let pool = builder("bnd_stale").max_size(1).build().unwrap();
    for (name, code, message) in cases {
        raising_function(&admin, name, code, message).await;
        let c = pool.get().await.unwrap();
        let sql = format!("SELECT {name}()");
        let e = c.query(sql.as_str(), &[]).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some(code), "{e:?}");
        assert_eq!(
            runs(&admin, name).await,
            1,
            "{name}: one call ran it more than once"
        );
        drop(c);
        admin
            .batch_execute(&format!(
                "DROP FUNCTION {name}(); DROP SEQUENCE {name}_runs"
            ))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_statement_the_server_no_longer_has_is_prepared_again() {
    let pool = builder("bnd_dealloc").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    c.query_one("SELECT 41 + 1", &[]).await.unwrap();
    // Drops the cached statement on the server (and marks the connection pinned: it is
    // closed on return).
    c.batch_execute("DEALLOCATE ALL").await.unwrap();
    let row = c
        .query_one("SELECT 41 + 1", &[])
        .await
        .expect("prepared again after the server said it does not exist");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(pool.status().cache_misses, 2);
}
