//! A second round of attacks on the protocol observer, on the fixes of the first round
//! (`tests/wire_attacks.rs`) and what is near them. Each failed against the code it was
//! written for; a test is named, and its comment written, for the way it broke that code,
//! and its assertions state the behaviour that holds now.

mod common;

use std::time::{Duration, Instant};

use common::{admin, builder};
use pinpool::PooledClient;

async fn fresh_table(name: &str) {
    admin()
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (v int)"
        ))
        .await
        .unwrap();
}

/// The server's own word on the sessions tagged `app` (pg_stat_activity.state).
async fn backend_states(app: &str) -> Vec<String> {
    common::backend_states(&admin().await, app).await
}

/// Classifies `sql` on another thread; `None` when it has not finished within `limit`.
fn classify_within(sql: String, limit: Duration) -> Option<Duration> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let _ = pinpool::pinning::classify(&sql);
        let _ = tx.send(t.elapsed());
    });
    rx.recv_timeout(limit).ok()
}

/// `U&"..."` makes the lexer look ahead two tokens for a `UESCAPE` clause by calling
/// `next()`, which lexes the next `U&"..."` with its own two-token lookahead, and so on;
/// then it rewinds, and the main loop lexes those tokens again. The work grows like the
/// Fibonacci numbers in the count of consecutive `U&"..."` names. The wire classifies every
/// Query on the connection task, so one such statement (under 1 KB, far from the 16 KB
/// capture) wedges the connection task (and its runtime worker) for ever: no deadline can
/// cut it. (The same lexer runs inside DO bodies and in `Refuse`'s pre-check.)
#[test]
fn a_run_of_unicode_quoted_names_takes_exponential_time_to_classify() {
    let small = format!("SELECT {}", vec![r#"U&"a""#; 20].join(" "));
    let t_small = classify_within(small, Duration::from_secs(30)).expect("20 names");
    let big = format!("SELECT {}", vec![r#"U&"a""#; 36].join(" "));
    let t_big = classify_within(big.clone(), Duration::from_secs(5));
    assert!(
        t_big.is_some(),
        "classify() of a {}-byte statement (36 U&\"a\" names) did not finish in 5 s \
         (20 names took {t_small:?})",
        big.len()
    );
}

/// `TxnMark` marks a ROLLBACK as queued whenever it is dropped unfinished, also when
/// `start()` failed before tokio-postgres made a transaction, so none was queued (its own
/// RollbackIfNotDone guard only exists once `start()` is polled). A caller's `BEGIN` and
/// INSERT through `batch_execute`, then `transaction()` once the deadline (`get_by`) has
/// passed: it fails before sending anything, the mark says "ROLLBACK queued", status `T`
/// passes as "rolling back", and the connection goes back idle inside the open transaction. Outside an invocation nothing settles it: the next
/// caller's acknowledged, "autocommitted" INSERT runs inside it and is lost with it.
#[tokio::test]
async fn a_transaction_start_past_the_deadline_returns_an_open_transaction() {
    use std::time::SystemTime;
    let app = "attack2_start_late";
    let table = "attack2_start_late_t";
    fresh_table(table).await;
    let pool = builder(app)
        .max_size(1)
        .deadline_margin(Duration::from_millis(10))
        .build()
        .unwrap();
    {
        let deadline = SystemTime::now() + Duration::from_millis(400);
        let mut c = pool.get_by(deadline).await.unwrap();
        c.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let e = c.transaction().await.err().expect("past the deadline");
        assert!(matches!(e, pinpool::Error::Timeout { .. }), "{e:?}");
    }
    let states = backend_states(app).await;
    {
        let c = pool.get().await.unwrap();
        c.execute(&*format!("INSERT INTO {table} VALUES (2)"), &[])
            .await
            .unwrap();
    }
    drop(pool);
    let n: i64 = admin()
        .await
        .query_one(&format!("SELECT count(*) FROM {table} WHERE v = 2"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n, 1,
        "the next caller's acknowledged INSERT was lost; server states then: {states:?}"
    );
}

/// A TCP relay to the database that passes what the server sends in batches: after the first
/// bytes it gathers more until the server has been quiet for `quiet`, then forwards them in
/// one write (a network that coalesces segments, a busy connection task, a TLS record holding
/// several messages: one socket read then holds messages of several requests).
async fn coalescing_relay(quiet: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    common::relay(move |mut sr, mut cw| async move {
        let mut buf = vec![0u8; 64 * 1024];
        'outer: loop {
            let mut batch = Vec::new();
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => batch.extend_from_slice(&buf[..n]),
            }
            loop {
                match tokio::time::timeout(quiet, sr.read(&mut buf)).await {
                    Err(_) => break,
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        let _ = cw.write_all(&batch).await;
                        break 'outer;
                    }
                    Ok(Ok(n)) => batch.extend_from_slice(&buf[..n]),
                }
            }
            if cw.write_all(&batch).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    })
    .await
}

/// `Wire::settled` after a call waits for "the next ReadyForQuery" whenever the ANSWERING bit
/// is set, but the bit says only that *some* request's answer has begun. When the socket read
/// that brought the call's own ReadyForQuery also brought the start of the next pipelined
/// request's answer, the call waits for that request's ReadyForQuery. For a `COPY FROM
/// STDIN` pipelined behind it (its CopyInResponse sets the bit), that ReadyForQuery comes only
/// after the copy is finished, which the caller can do only once this call returns: a
/// `join!` of a fast query and a copy_in on one client stalls for the whole query_timeout
/// (30 s by default; for ever with none). Round one's fix of "a statement waits for a slower
/// one pipelined behind it" holds only when the two answers arrive in separate reads.
#[tokio::test]
async fn a_call_waits_for_the_ready_for_query_of_a_copy_pipelined_behind_it() {
    use futures_util::SinkExt;
    let table = "attack2_pipe_copy_t";
    fresh_table(table).await;
    let port = coalescing_relay(Duration::from_millis(30)).await;
    let pool = common::relayed(port, "attack2_pipe_copy")
        .max_size(1)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    c.query("SELECT 1", &[]).await.unwrap(); // prepared and cached: one Bind/Execute/Sync
    let copy_stmt = c
        .prepare(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap();
    let start = Instant::now();
    let fast = async {
        c.query("SELECT 1", &[]).await.unwrap();
        start.elapsed()
    };
    let copy = async { c.copy_in::<_, bytes::Bytes>(&copy_stmt).await.unwrap() };
    // Stalled, it would wait for the whole query_timeout (30 s).
    let joined =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(fast, copy) }).await;
    let Ok((fast_took, sink)) = joined else {
        panic!("SELECT 1 pipelined ahead of a COPY FROM STDIN had not returned after 10 s");
    };
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(b"1\n")).await.unwrap();
    sink.as_mut().finish().await.unwrap();
    assert!(
        fast_took < Duration::from_secs(5),
        "SELECT 1 took {fast_took:?}: it waited for the COPY's ReadyForQuery"
    );
}

/// f7bb85a scans a DO block's body "as SQL", but a PL/pgSQL body is not a list of SQL
/// statements, and its text is taken as written:
/// - a statement inside `BEGIN ... END` is led by `BEGIN`, so the statement-level rules (SET,
///   RESET, LISTEN, PREPARE...) never see their keyword; statement_timeout is not a reported
///   setting, so no ParameterStatus catches the SET either;
/// - dynamic SQL (`EXECUTE '...'`, PL/pgSQL's everyday tool) is a string literal to the scan;
/// - a body in a standard string is scanned raw, with its quotes still doubled: `''--''` is
///   a string `'--'` to the server and an empty string and a comment to the end of the line
///   to the scan, which then misses the rest of the line. (An `E'...'` body mixing `\'` and
///   `''` does the same with an unterminated literal.)
/// Each leaves its state on the connection for the next caller.
#[tokio::test]
async fn state_left_by_a_do_block_still_reaches_the_next_caller() {
    let pool = builder("attack2_do_block").max_size(1).build().unwrap();
    let lock = |k: i32| {
        format!(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND objid = {k} AND pid = pg_backend_pid()"
        )
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "DO $$ BEGIN SET statement_timeout = 4321; END $$",
            "SELECT current_setting('statement_timeout') = '4321ms'".into(),
        ),
        (
            "DO $$ BEGIN LISTEN attack2_do_chan; END $$",
            "SELECT count(*) > 0 FROM pg_listening_channels()".into(),
        ),
        (
            "DO $$ BEGIN EXECUTE 'SELECT pg_advisory_lock(774421)'; END $$",
            lock(774421),
        ),
        (
            "DO 'BEGIN PERFORM ''--''; PERFORM pg_advisory_lock(774422); END'",
            lock(774422),
        ),
        (
            r"DO E'BEGIN PERFORM \'x''; PERFORM pg_advisory_lock(774423); END'",
            lock(774423),
        ),
    ];
    let mut leaked = Vec::new();
    for (sql, probe) in &cases {
        let c = pool.get().await.unwrap();
        c.batch_execute(sql).await.unwrap();
        let pinned = PooledClient::pin_state(&c).is_pinned();
        drop(c);
        let c = pool.get().await.unwrap();
        let left: bool = c.query_one_scalar(probe.as_str(), &[]).await.unwrap();
        // Whatever the probe found, close this connection before the next case.
        c.batch_execute("SET application_name = 'attack2_do_block'")
            .await
            .unwrap();
        drop(c);
        if left {
            leaked.push((*sql, pinned));
        }
    }
    assert!(
        leaked.is_empty(),
        "the next caller inherited the state of (statement, pinned): {leaked:#?}"
    );
}

/// The per-call wait compares the ReadyForQuery count modulo 16 with the mark it took: when
/// the call's wait began one request early (as above) and sixteen ReadyForQuery messages
/// then arrive before it is polled again (one socket read of sixteen short answers: nothing
/// unusual for pipelined statements), the count is back at the mark, and the call waits for
/// a seventeenth that never comes. Every answer is in, every other call has returned, and
/// this one sits until query_timeout (30 s by default, for ever without one). With fifteen
/// it returns as soon as they arrive.
#[tokio::test]
async fn sixteen_ready_for_query_messages_in_one_read_lose_a_waiting_call() {
    let port = coalescing_relay(Duration::from_millis(30)).await;
    let pool = common::relayed(port, "attack2_mod16")
        .max_size(1)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    c.query("SELECT 1", &[]).await.unwrap(); // prepared and cached
    let start = Instant::now();
    let fast = async {
        c.query("SELECT 1", &[]).await.unwrap();
        start.elapsed()
    };
    // Its RowDescription and first (large) row are sent at once; then it sleeps.
    let slow = async {
        c.simple_query("SELECT repeat('x', 20000) UNION ALL SELECT pg_sleep(0.3)::text")
            .await
            .unwrap();
    };
    // Fifteen short answers right behind it: with the slow one's, sixteen ReadyForQuery.
    let rest = futures_util::future::join_all((0..15).map(|_| c.query("SELECT 1", &[])));
    // Lost, it would wait for the whole query_timeout (30 s).
    let joined = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(fast, slow, rest)
    })
    .await;
    let Ok((fast_took, (), rest)) = joined else {
        panic!(
            "SELECT 1 had not returned after 10 s, though every answer arrived within about 0.4 s"
        );
    };
    assert!(rest.iter().all(Result::is_ok));
    assert!(
        fast_took < Duration::from_secs(5),
        "SELECT 1 took {fast_took:?}"
    );
}

/// The ROLLBACK mark holds only while `sent` has not moved, and the dropped transaction's
/// own ROLLBACK moves it: once the connection task has written it (microseconds later, at the
/// first `.await` or on another worker thread at once), the wire decides alone, and it says
/// "in transaction, one request outstanding" until the ROLLBACK's ReadyForQuery is back, a
/// round trip later (about 1 ms through RDS Proxy). A handler that drops a transaction, does
/// any async work, and then returns its client in that window has a clean connection closed
/// (UnknownState) and pays a reconnect. Round one's flag kept it; the fix lost that.
#[tokio::test]
async fn a_dropped_transactions_rollback_once_written_closes_the_connection() {
    let port = common::slow_relay(Duration::from_millis(200)).await;
    let pool = common::relayed(port, "attack2_rb_written")
        .connect_timeout(Duration::from_secs(20))
        .max_size(1)
        .build()
        .unwrap();
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    drop(tx); // ROLLBACK queued
    tokio::time::sleep(Duration::from_millis(20)).await; // written, not yet answered
    drop(c);
    let s = pool.status();
    assert_eq!(
        s.closed.total(),
        0,
        "a connection whose ROLLBACK was on its way was closed: {s:?}"
    );
}

/// Polls `fut` exactly once (so tokio-postgres queues its request) and drops it.
async fn poll_once_and_drop<F: std::future::Future>(fut: F) {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        let _ = fut.as_mut().poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

/// The raw-access settle at checkout is one round trip bounded by query_timeout (30 s), not
/// by acquire_timeout: whatever raw access left queued runs to its end inside the next
/// caller's `get()`. A raw statement dropped after it was queued (a 6 s report query here)
/// makes `get()`, configured to wait at most 500 ms, take 6 s; a connection whose queue
/// holds unknown work is worth less than that wait (closing it would end the work).
#[tokio::test]
async fn get_waits_for_whatever_raw_access_left_queued() {
    let pool = builder("attack2_raw_settle_wait")
        .max_size(1)
        .acquire_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    {
        let c = pool.get().await.unwrap();
        poll_once_and_drop(PooledClient::raw(&c).batch_execute("SELECT pg_sleep(6)")).await;
    }
    let start = Instant::now();
    let c = pool.get().await;
    let took = start.elapsed();
    drop(c);
    // 2.5 s past the bound, 3 s before the report query's end.
    assert!(
        took < Duration::from_secs(3),
        "get() with acquire_timeout 500 ms took {took:?}"
    );
}
