//! Attacks on the bounds at the socket, the per-call cutoff, the client's `Deref`, the
//! stale-statement rerun and the error's message: what a production handler or a hostile
//! caller relies on.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{admin, builder};
use futures_util::SinkExt;
use pinpool::PooledClient;

fn in_ms(ms: u64) -> SystemTime {
    SystemTime::now() + Duration::from_millis(ms)
}

/// A handler keeps a client and a prepared statement in its state from one invocation to the
/// next (the README says a kept client works in the next invocation). Dropping the statement
/// in a later invocation writes a Close and a Sync that no pinpool call bounded: they must not
/// inherit the earlier invocation's cutoff, long past, and close a healthy socket.
#[tokio::test]
async fn dropping_a_statement_kept_from_an_earlier_invocation_leaves_the_client_working() {
    let pool = builder("att4_kept_stmt")
        .deadline_margin(Duration::from_millis(100))
        .build()
        .unwrap();
    let (c, stmt) = pool
        .invocation(in_ms(800), async {
            let c = pool.get().await.unwrap();
            let stmt = c.prepare("SELECT 1").await.unwrap();
            c.query_one(&stmt, &[]).await.unwrap();
            (c, stmt)
        })
        .await;
    // The first invocation's cutoff passes; the environment waits for the next event.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = pool
        .invocation(in_ms(10_000), async {
            // The handler replaces what it kept: the old statement goes.
            drop(stmt);
            // Anything that yields (an HTTP call, a log flush) lets the connection task write.
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.query_one("SELECT 2", &[])
                .await
                .map(|r| r.get::<_, i32>(0))
        })
        .await;
    assert_eq!(
        r.expect("10 s were left in this invocation; nothing timed out"),
        2
    );
}

/// Two statements pipelined on one client (`tokio::join!`): the first is stale (DDL changed its
/// result type) and is prepared and run again, as it should be; the second ran (its function
/// advanced a sequence) and then failed with SQLSTATE 26000 from an SQL-level `EXECUTE`. The
/// second must never run twice.
#[tokio::test]
async fn a_pipelined_statement_that_ran_is_never_run_again_beside_a_stale_one() {
    let admin = admin().await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS att4_pipe_t; CREATE TABLE att4_pipe_t (a int);
             INSERT INTO att4_pipe_t VALUES (1);
             DROP FUNCTION IF EXISTS att4_pipe_f(bool); DROP SEQUENCE IF EXISTS att4_pipe_runs;
             CREATE SEQUENCE att4_pipe_runs;
             CREATE FUNCTION att4_pipe_f(go bool) RETURNS int LANGUAGE plpgsql AS $f$
             BEGIN
               IF go THEN
                 PERFORM nextval('att4_pipe_runs');
                 EXECUTE 'EXECUTE att4_no_such_statement';
               END IF;
               RETURN 0;
             END $f$;",
        )
        .await
        .unwrap();
    let pool = builder("att4_pipe").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    // Both statements cached on the connection.
    c.query("SELECT * FROM att4_pipe_t", &[]).await.unwrap();
    c.query_one("SELECT att4_pipe_f($1)", &[&false])
        .await
        .unwrap();
    admin
        .batch_execute("ALTER TABLE att4_pipe_t ADD COLUMN b int")
        .await
        .unwrap();
    let (stale, ran) = tokio::join!(
        c.query("SELECT * FROM att4_pipe_t", &[]),
        c.query_one("SELECT att4_pipe_f($1)", &[&true]),
    );
    let e = ran.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("26000"), "{e:?}");
    let runs: i64 = admin
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM att4_pipe_runs",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 1, "a statement that ran was run a second time");
    // The stale one may or may not run again; it must not have run twice either way.
    if let Ok(rows) = stale {
        assert_eq!(rows.len(), 1);
    }
    drop(c);
    admin
        .batch_execute(
            "DROP TABLE att4_pipe_t; DROP FUNCTION att4_pipe_f(bool);
             DROP SEQUENCE att4_pipe_runs",
        )
        .await
        .unwrap();
}

/// A `COPY ... FROM STDIN` through the driver's client (`&tokio_postgres::Client`) whose
/// server stops reading (here a row trigger that sleeps; in production a stalled proxy): the
/// promise is that every copy, through any API, stops at the invocation's cutoff.
#[tokio::test]
async fn a_copy_through_the_drivers_client_whose_server_stalls_stops_at_the_cutoff() {
    let admin = admin().await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS att4_copy_t;
             CREATE TABLE att4_copy_t (a text);
             CREATE OR REPLACE FUNCTION att4_copy_stall() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
               IF NEW.a = 'stall' THEN PERFORM pg_sleep(20); END IF;
               RETURN NEW;
             END $f$;
             CREATE TRIGGER att4_copy_stall BEFORE INSERT ON att4_copy_t
               FOR EACH ROW EXECUTE FUNCTION att4_copy_stall();",
        )
        .await
        .unwrap();
    let pool = builder("att4_copy")
        .deadline_margin(Duration::from_millis(200))
        .build()
        .unwrap();
    let t = Instant::now();
    let outcome = pool
        .invocation(in_ms(2000), async {
            let c = pool.get().await.unwrap();
            let raw: &tokio_postgres::Client = &c;
            let sink = raw
                .copy_in::<_, bytes::Bytes>("COPY att4_copy_t FROM STDIN")
                .await?;
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from_static(b"stall\n")).await?;
            // Far more than the socket buffers hold: the writes block while the server sleeps.
            let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
            for _ in 0..64 {
                sink.send(chunk.clone()).await?;
            }
            sink.as_mut().finish().await.map(drop)
        })
        .await;
    let took = t.elapsed();
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'att4_copy'",
            &[],
        )
        .await
        .unwrap();
    admin
        .batch_execute("DROP TABLE att4_copy_t; DROP FUNCTION att4_copy_stall()")
        .await
        .unwrap();
    assert!(
        took < Duration::from_secs(10),
        "the copy ran {took:?} with a 2 s invocation ({outcome:?})"
    );
    assert!(outcome.is_err(), "the copy cannot have finished");
}

/// The message of an error is what the on-call reads and what a 503 body may carry: the
/// README says it never carries a parameter. A parameter the server fails to parse is quoted
/// in the server's own message.
#[tokio::test]
async fn an_error_message_never_quotes_a_parameter_value() {
    let pool = builder("att4_leak").build().unwrap();
    let c = pool.get().await.unwrap();
    let e = c
        .query_one("SELECT $1::text::int", &[&"hunter2-card-4111"])
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("22P02"), "{msg}");
    assert!(
        !msg.contains("hunter2-card-4111"),
        "the parameter's value is in the message: {msg}"
    );
    assert!(
        msg.contains("type integer"),
        "still says what failed: {msg}"
    );
    // A value that holds quotes itself, out of range for its type.
    let e = c
        .query_one("SELECT $1::text::date", &[&"a\"b\"secret-2024-99-99"])
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("ERROR 22"), "{msg}");
    assert!(!msg.contains("secret"), "{msg}");
    // Other classes keep their quoted names: they are the useful part.
    let e = c
        .query("SELECT * FROM att4_no_such_table", &[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("\"att4_no_such_table\""), "{e}");
}

/// A real DDL change (`ADD COLUMN` under a cached `SELECT *`) still reruns the statement once,
/// with pinpool's and the driver's client used side by side on one checkout.
#[tokio::test]
async fn a_select_star_made_stale_by_add_column_runs_again_after_raw_use() {
    let admin = admin().await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS att4_ddl_t; CREATE TABLE att4_ddl_t (a int);
             INSERT INTO att4_ddl_t VALUES (1)",
        )
        .await
        .unwrap();
    let pool = builder("att4_ddl").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    c.query("SELECT * FROM att4_ddl_t", &[]).await.unwrap();
    let raw: &tokio_postgres::Client = &c;
    raw.batch_execute("ALTER TABLE att4_ddl_t ADD COLUMN b int")
        .await
        .unwrap();
    let rows = c
        .query("SELECT * FROM att4_ddl_t", &[])
        .await
        .expect("prepared again after the DDL");
    assert_eq!(rows[0].len(), 2);
    drop(c);
    admin.batch_execute("DROP TABLE att4_ddl_t").await.unwrap();
}

/// A pinpool stream waiting for rows at the invocation's cutoff fails with the typed timeout;
/// its connection is closed and the next checkout is served.
#[tokio::test]
async fn a_pinpool_stream_at_the_cutoff_times_out_typed_and_the_pool_serves_on() {
    let pool = builder("att4_typed")
        .deadline_margin(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = pool
        .invocation(in_ms(1200), async {
            let c = pool.get().await.unwrap();
            let s = c.query_raw("SELECT pg_sleep(5)", Vec::<i32>::new()).await;
            match s {
                Ok(s) => {
                    futures_util::pin_mut!(s);
                    futures_util::StreamExt::next(&mut s)
                        .await
                        .unwrap()
                        .unwrap_err()
                }
                Err(e) => e,
            }
        })
        .await;
    assert!(
        err.is_timeout(),
        "a pinpool stream's bound gives a typed error: {err:?}"
    );
    let c = pool.get().await.unwrap();
    assert!(!PooledClient::is_closed(&c));
    c.query_one("SELECT 1", &[]).await.unwrap();
}

/// A pinpool stream waiting for rows when the invocation's cutoff passes: its bound and the
/// socket's are the same instant, and whichever timer runs first, the caller gets the typed
/// timeout pinpool's methods promise (not the driver's closed-connection error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinpool_stream_at_the_cutoff_always_fails_with_a_typed_timeout() {
    let pool = builder("att4_stream_race")
        .deadline_margin(Duration::from_millis(50))
        .build()
        .unwrap();
    for round in 0..15 {
        let err = pool
            .invocation(in_ms(250), async {
                let c = pool.get().await.unwrap();
                match c.query_raw("SELECT pg_sleep(3)", Vec::<i32>::new()).await {
                    Ok(s) => {
                        futures_util::pin_mut!(s);
                        futures_util::StreamExt::next(&mut s)
                            .await
                            .expect("an item")
                            .unwrap_err()
                    }
                    Err(e) => e,
                }
            })
            .await;
        assert!(err.is_timeout(), "round {round}: {err:?}");
    }
}

/// The same for `copy_out`, whose stream waits for data that a slow query holds back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinpool_copy_out_at_the_cutoff_always_fails_with_a_typed_timeout() {
    let pool = builder("att4_copy_race")
        .deadline_margin(Duration::from_millis(50))
        .build()
        .unwrap();
    for round in 0..15 {
        let err = pool
            .invocation(in_ms(250), async {
                let c = pool.get().await.unwrap();
                match c.copy_out("COPY (SELECT pg_sleep(3)) TO STDOUT").await {
                    Ok(s) => {
                        futures_util::pin_mut!(s);
                        futures_util::StreamExt::next(&mut s)
                            .await
                            .expect("an item")
                            .unwrap_err()
                    }
                    Err(e) => e,
                }
            })
            .await;
        assert!(err.is_timeout(), "round {round}: {err:?}");
    }
}

/// A fresh table `name (a int)` and a one-connection pool with a 600 ms `query_timeout`, for
/// the raw COPY tests: each then waits past that bound and checks the connection still serves.
async fn copy_table_and_pool(admin: &tokio_postgres::Client, name: &str) -> pinpool::Pool {
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (a int)"
        ))
        .await
        .unwrap();
    builder(name)
        .max_size(1)
        .query_timeout(Some(Duration::from_millis(600)))
        .build()
        .unwrap()
}

/// A COPY through the driver's client that ends in time leaves nothing bounded behind: the
/// connection, idle past `query_timeout` afterwards, still serves, and goes back to the pool.
#[tokio::test]
async fn a_copy_through_the_drivers_client_that_ends_leaves_the_connection_usable() {
    let admin = admin().await;
    let pool = copy_table_and_pool(&admin, "att4_copy_ok").await;
    let c = pool.get().await.unwrap();
    {
        let raw: &tokio_postgres::Client = &c;
        let sink = raw
            .copy_in::<_, bytes::Bytes>("COPY att4_copy_ok FROM STDIN")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        let rows: String = (0..1000).map(|i| format!("{i}\n")).collect();
        sink.send(bytes::Bytes::from(rows)).await.unwrap();
        assert_eq!(sink.as_mut().finish().await.unwrap(), 1000);
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM att4_copy_ok", &[])
        .await
        .expect("the connection outlived the copy's bound")
        .get(0);
    assert_eq!(n, 1000);
    drop(c);
    assert_eq!(pool.status().idle, 1, "{:?}", pool.status());
    admin
        .batch_execute("DROP TABLE att4_copy_ok")
        .await
        .unwrap();
}

/// A COPY through the driver's client that the server rejects (a bad row), and one the caller
/// abandons (the sink dropped): neither leaves a bound behind that closes the connection
/// later.
#[tokio::test]
async fn a_failed_or_abandoned_copy_through_the_drivers_client_leaves_no_bound_behind() {
    let admin = admin().await;
    let pool = copy_table_and_pool(&admin, "att4_copy_bad").await;
    let c = pool.get().await.unwrap();
    {
        let raw: &tokio_postgres::Client = &c;
        let sink = raw
            .copy_in::<_, bytes::Bytes>("COPY att4_copy_bad FROM STDIN")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        let _ = sink
            .send(bytes::Bytes::from_static(b"not-a-number\n"))
            .await;
        assert!(sink.as_mut().finish().await.is_err());
    }
    {
        let raw: &tokio_postgres::Client = &c;
        let sink = raw
            .copy_in::<_, bytes::Bytes>("COPY att4_copy_bad FROM STDIN")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n")).await.unwrap();
        // Dropped unfinished: the driver aborts the copy.
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM att4_copy_bad", &[])
        .await
        .expect("the connection outlived the copies' bounds")
        .get(0);
    assert_eq!(n, 0);
    drop(c);
    admin
        .batch_execute("DROP TABLE att4_copy_bad")
        .await
        .unwrap();
}

/// Tests of one binary share a process: one that pauses tokio's clock and advances it (a day
/// here) must not move the socket bounds of a test on a real clock in the same process.
#[test]
fn a_paused_clock_in_one_runtime_leaves_the_socket_bounds_of_another_on_time() {
    let real = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let paused = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let pool = real.block_on(async {
        builder("att4_paused")
            .query_timeout(Some(Duration::from_millis(500)))
            .build()
            .unwrap()
    });
    let c = real.block_on(pool.get()).unwrap();
    // A test on a paused clock a day ahead makes a call with a deadline (only the cutoff is
    // set; nothing is written from there).
    paused.block_on(async {
        tokio::time::advance(Duration::from_secs(24 * 3600)).await;
        let _ = pinpool::PooledClient::cutoff(&c);
        let other = builder("att4_paused_other").build().unwrap();
        let _ = other
            .invocation(in_ms(60_000), async {
                let _ = pinpool::PooledClient::raw(&c);
            })
            .await;
    });
    let t = Instant::now();
    let r = real.block_on(async {
        PooledClient::raw(&c)
            .simple_query("SELECT pg_sleep(3)")
            .await
    });
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "query_timeout is 500 ms; the call ran {took:?} ({r:?})"
    );
}

/// The other side of clearing an ended invocation's cutoff: a client kept from an earlier
/// invocation, used through the driver's client in the next, still stops at the next one's
/// cutoff.
#[tokio::test]
async fn a_kept_clients_raw_call_in_a_later_invocation_stops_at_that_invocations_cutoff() {
    let pool = builder("att4_kept_raw")
        .deadline_margin(Duration::from_millis(100))
        .build()
        .unwrap();
    let c = pool
        .invocation(in_ms(5000), async {
            let c = pool.get().await.unwrap();
            PooledClient::raw(&c)
                .simple_query("SELECT 1")
                .await
                .unwrap();
            c
        })
        .await;
    let t = Instant::now();
    let r = pool
        .invocation(in_ms(800), async {
            PooledClient::raw(&c)
                .simple_query("SELECT pg_sleep(3)")
                .await
                .map(drop)
        })
        .await;
    let took = t.elapsed();
    assert!(r.is_err(), "{r:?}");
    assert!(took < Duration::from_millis(2500), "ran {took:?}");
}

/// Two invocations at once (Lambda Managed Instances) sharing a client kept in the handler's
/// state: one with little time left takes the driver's client while the other's statement is
/// queued. The other's statement belongs to an invocation with 10 s left and must not stop at
/// its neighbour's cutoff.
#[tokio::test]
async fn a_statement_of_one_invocation_never_stops_at_a_concurrent_invocations_cutoff() {
    let pool = builder("att4_cross")
        .deadline_margin(Duration::from_millis(100))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    // Cached: the statement is queued in the turn its handler reaches the client.
    c.query_one("SELECT pg_sleep($1)", &[&0.0f64])
        .await
        .unwrap();
    // The short invocation is running (its handler awaits something); the long one's
    // statement is queued; then the short one's handler reaches the client, before the
    // connection task has written the statement.
    let long = pool
        .invocation(in_ms(600), async {
            let short = pinpool::Invocation::current().unwrap();
            pool.invocation(in_ms(10_000), async {
                let mut stmt = Box::pin(c.query_one("SELECT pg_sleep($1)", &[&1.5f64]));
                assert!(futures_util::FutureExt::now_or_never(&mut stmt).is_none());
                short
                    .scope(async {
                        // Code written for the driver's client looks at it; sends nothing.
                        let _ = PooledClient::raw(&c).is_closed();
                    })
                    .await;
                stmt.await.map(drop)
            })
            .await
        })
        .await;
    long.expect("this invocation had 10 s; its statement took 1.5 s");
}

/// The per-request bookkeeping must stay linear under a deep pipeline (bulk inserts as
/// `join_all` of thousands of statements on one client, a common tokio-postgres pattern): a
/// statement in a pipeline eight times deeper costs about the same (under five times, for a
/// noisy machine), not eight times more.
#[tokio::test]
async fn a_deep_pipeline_costs_each_statement_about_what_a_shallow_one_does() {
    let pool = builder("att4_pipeline").build().unwrap();
    let c = pool.get().await.unwrap();
    c.execute("SELECT 1", &[]).await.unwrap();
    let mut each = Vec::new();
    for n in [2_000u32, 16_000] {
        let t = Instant::now();
        let all = futures_util::future::join_all((0..n).map(|_| c.execute("SELECT 1", &[]))).await;
        assert!(all.iter().all(Result::is_ok));
        each.push(t.elapsed() / n);
    }
    assert!(
        each[1] < each[0] * 5,
        "a statement costs {:?} in a pipeline of 2,000 and {:?} in one of 16,000",
        each[0],
        each[1]
    );
}
