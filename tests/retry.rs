//! The safe retry: a statement whose connection turns out to be closed before any byte of it
//! was sent runs once more on a fresh connection, within its bound; anything that may have
//! reached the server is never run twice.
//!
//! Connections are closed through the emulator (its idle-client timeout, a restart on the same
//! port) or through a relay to PostgreSQL that cuts chosen connections at chosen moments.
#![cfg(feature = "emulator")]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::SeqCst;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use common::{admin, assert_quiet, cutting_relay, emulator, eventually, relayed, until_closed};
use futures_util::{SinkExt, StreamExt};
use pinpool::emulator::Emulator;
use pinpool::{CloseReason, Error, Phase, PinPolicy, Pool, PooledClient, TimeoutCause};

/// Stops `emu` (every client socket closes), waits until `c` has seen its connection close,
/// and starts the emulator again on the same port, as a proxy restart does.
async fn restarted(emu: Emulator, app: &str, c: &PooledClient) -> Emulator {
    let addr = emu.addr();
    drop(emu);
    until_closed(c).await;
    emulator(app, 2, |e| e.listen(addr)).await
}

fn pool_on(emu: &Emulator) -> Pool {
    Pool::builder(emu.url("postgres", "postgres"))
        .max_size(1)
        .build()
        .unwrap()
}

fn closed_error(r: Result<impl std::fmt::Debug, Error>) -> Error {
    let e = r.expect_err("the statement must fail");
    assert!(e.is_closed(), "a closed-connection error, not {e:?}");
    e
}

// ---- Retried: closed before anything was sent -------------------------------------------

#[test]
fn a_connection_the_proxy_closed_for_idleness_is_retried_on_a_fresh_one() {
    let recorder = common::TestRecorder::default();
    common::run_recorded(&recorder, async {
        let emu = emulator("rt_idle", 2, |c| {
            c.idle_client_timeout(Duration::from_millis(300))
        })
        .await;
        let pool = pool_on(&emu);
        let c = pool.get().await.unwrap();
        let closed = eventually(5, || async { emu.counters().idle_client_closes == 1 }).await;
        assert!(closed, "{:?}", emu.counters());
        until_closed(&c).await;
        let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
        assert_eq!(one, 1);
        assert_eq!(pool.status().retries, 1);
        assert_eq!(emu.counters().clients_total, 2, "one fresh connection");
        drop(c);
        let s = pool.status();
        assert_eq!((s.size, s.idle, s.opened), (1, 1, 2), "{s:?}");
        assert_eq!(s.closed.get(CloseReason::Broken), 1, "{s:?}");
        assert_quiet(&pool);
    });
    assert_eq!(recorder.counter("pinpool_retries{}"), 1);
}

#[tokio::test]
async fn a_restarted_proxy_is_retried_on_a_fresh_connection() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS rt_restart_t; CREATE TABLE rt_restart_t (id int)")
        .await
        .unwrap();
    let emu = emulator("rt_restart", 2, |c| c).await;
    let pool = pool_on(&emu);
    let c = pool.get().await.unwrap();
    let emu = restarted(emu, "rt_restart", &c).await;
    let n = c
        .execute("INSERT INTO rt_restart_t VALUES (1)", &[])
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(pool.status().retries, 1);
    drop(c);
    assert_quiet(&pool);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM rt_restart_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "run once");
    assert_eq!(emu.counters().clients_total, 1);
    admin
        .batch_execute("DROP TABLE rt_restart_t")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_transaction_begun_on_a_closed_connection_begins_on_a_fresh_one() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS rt_txn_t; CREATE TABLE rt_txn_t (id int)")
        .await
        .unwrap();
    let emu = emulator("rt_txn", 2, |c| c).await;
    let pool = pool_on(&emu);
    let mut c = pool.get().await.unwrap();
    let _emu = restarted(emu, "rt_txn", &c).await;
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::Serializable)
        .start()
        .await
        .unwrap();
    let level: String = tx
        .query_one_scalar("SHOW transaction_isolation", &[])
        .await
        .unwrap();
    assert_eq!(
        level, "serializable",
        "the builder's settings survive the retry"
    );
    tx.execute("INSERT INTO rt_txn_t VALUES (1)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(pool.status().retries, 1);
    drop(c);
    assert_quiet(&pool);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM rt_txn_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    admin.batch_execute("DROP TABLE rt_txn_t").await.unwrap();
}

#[tokio::test]
async fn two_calls_at_once_on_a_closed_connection_share_one_fresh_connection() {
    let emu = emulator("rt_join", 2, |c| c).await;
    let pool = pool_on(&emu);
    let c = pool.get().await.unwrap();
    let emu = restarted(emu, "rt_join", &c).await;
    let (a, b) = tokio::join!(
        c.query_one_scalar::<i32, _>("SELECT 1", &[]),
        c.query_one_scalar::<i32, _>("SELECT 2", &[]),
    );
    assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
    assert_eq!(pool.status().retries, 2, "each call retried once");
    assert_eq!(
        emu.counters().clients_total,
        1,
        "one fresh connection for both"
    );
    drop(c);
    assert_quiet(&pool);
    assert_eq!(pool.status().size, 1);
}

#[tokio::test]
async fn streams_and_copies_started_on_a_closed_connection_run_on_a_fresh_one() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS rt_copy_t; CREATE TABLE rt_copy_t (id int)")
        .await
        .unwrap();
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_streams").max_size(1).build().unwrap();

    // query_raw takes its parameters from an iterator, which the first attempt would use up:
    // it is moved to a fresh connection before it starts, when the close is already known.
    let c = pool.get().await.unwrap();
    cuts.kill_all();
    until_closed(&c).await;
    let rows: Vec<i32> = c
        .query_raw("SELECT generate_series(1, $1)", [3i32])
        .await
        .unwrap()
        .map(|r| r.unwrap().get::<_, i32>(0))
        .collect()
        .await;
    assert_eq!(rows, [1, 2, 3]);
    drop(c);

    let c = pool.get().await.unwrap();
    cuts.kill_all();
    until_closed(&c).await;
    let sink = c
        .copy_in::<_, bytes::Bytes>("COPY rt_copy_t FROM STDIN")
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes::Bytes::from_static(b"7\n")).await.unwrap();
    assert_eq!(sink.as_mut().finish().await.unwrap(), 1);
    drop(c);

    assert_eq!(pool.status().retries, 2);
    assert_quiet(&pool);
    let id: i32 = admin
        .query_one("SELECT id FROM rt_copy_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 7);
    admin.batch_execute("DROP TABLE rt_copy_t").await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_takes_the_closed_ones_place_in_the_pool() {
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_idle_pick")
        .max_size(2)
        .min_idle(2)
        .build()
        .unwrap();
    assert_eq!(pool.warm_up().await.unwrap(), 2);
    let c = pool.get().await.unwrap();
    // Only the checked-out connection is cut: the most recently opened, which get() hands out
    // first; its kill handle is the last.
    let last = cuts.kills.lock().unwrap().pop().unwrap();
    last.notify_one();
    until_closed(&c).await;
    let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
    assert_eq!(one, 1);
    let s = pool.status();
    assert_eq!(s.retries, 1);
    assert_eq!((s.size, s.idle, s.in_use, s.opened), (1, 0, 1, 2), "{s:?}");
    drop(c);
    let s = pool.status();
    assert_eq!((s.size, s.idle, s.in_use), (1, 1, 0), "{s:?}");
    assert_eq!(s.closed.get(CloseReason::Broken), 1, "{s:?}");
    assert_eq!(
        cuts.accepted.load(SeqCst),
        2,
        "no connection opened for the retry"
    );
}

#[test]
fn a_retried_client_returned_in_its_invocation_is_not_reported_as_held_past_it() {
    let recorder = common::TestRecorder::default();
    common::run_recorded(&recorder, async {
        let (port, cuts) = cutting_relay().await;
        let pool = relayed(port, "rt_lent").max_size(1).build().unwrap();
        let deadline = SystemTime::now() + Duration::from_secs(10);
        pool.invocation(deadline, async {
            let c = pool.get().await.unwrap();
            cuts.kill_all();
            until_closed(&c).await;
            assert_eq!(
                c.query_one_scalar::<i32, _>("SELECT 1", &[]).await.unwrap(),
                1
            );
            drop(c);
            let mut c = pool.get().await.unwrap();
            cuts.kill_all();
            until_closed(&c).await;
            c.transaction().await.unwrap().commit().await.unwrap();
        })
        .await;
        assert_eq!(pool.status().retries, 2);
        assert_quiet(&pool);
    });
    assert_eq!(
        recorder.counter("pinpool_held_too_long{when=invocation_end}"),
        0,
        "both clients were returned in their invocation"
    );
}

/// Polls a future once (its request is queued, not yet written), then drops it.
async fn poll_once_and_drop<F: Future>(fut: F) {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        let _ = fut.as_mut().poll(cx);
        Poll::Ready(())
    })
    .await;
}

#[tokio::test]
async fn the_retry_takes_no_idle_connection_a_raw_request_may_still_be_queued_on() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS rt_rawq_t; CREATE TABLE rt_rawq_t (id int)")
        .await
        .unwrap();
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_rawq").max_size(2).build().unwrap();
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    // A raw BEGIN dropped after it was queued: `get()` gives such a connection a round trip
    // before anyone's statements; a retry must not take it without one.
    poll_once_and_drop(PooledClient::raw(&b).batch_execute("BEGIN")).await;
    drop(b);
    let first = cuts.kills.lock().unwrap().remove(0);
    first.notify_one();
    until_closed(&a).await;
    let n = a
        .execute("INSERT INTO rt_rawq_t VALUES (1)", &[])
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(pool.status().retries, 1);
    drop(a);
    drop(pool);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM rt_rawq_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, 1,
        "the acknowledged INSERT ran inside the queued BEGIN and was lost"
    );
    admin.batch_execute("DROP TABLE rt_rawq_t").await.unwrap();
}

// ---- Bounded ------------------------------------------------------------------------------

#[tokio::test]
async fn the_retry_stops_at_the_deadline() {
    let emu = emulator("rt_deadline", 2, |c| c).await;
    let pool = Pool::builder(emu.url("postgres", "postgres"))
        .max_size(1)
        .connect_timeout(Duration::from_secs(30))
        .query_timeout(Some(Duration::from_secs(30)))
        .build()
        .unwrap();
    let deadline = SystemTime::now() + Duration::from_secs(3);
    let t = Instant::now();
    let c = pool.get_by(deadline).await.unwrap();
    // The proxy is back but answers nothing: the fresh connection's login never completes.
    let emu = restarted(emu, "rt_deadline", &c).await;
    emu.set_silent(true);
    let err = c
        .query_one_scalar::<i32, _>("SELECT 1", &[])
        .await
        .unwrap_err();
    // The phase that was waiting when the deadline came: the fresh connection's login (its
    // connect shares the statement's cutoff).
    assert!(
        matches!(
            err,
            Error::Timeout {
                phase: Phase::Connect | Phase::Query,
                cause: TimeoutCause::Deadline,
                ..
            }
        ),
        "{err:?}"
    );
    let cutoff = Duration::from_secs(3) - pool.deadline_margin();
    // Generous for a loaded machine; a retry that ignored the deadline would hang until the
    // 30 s connect_timeout.
    assert!(
        t.elapsed() < cutoff + Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    drop(c);
    assert_quiet(&pool);
    assert_eq!(
        pool.status().size,
        0,
        "the abandoned connect left nothing counted"
    );
    assert_eq!(pool.status().retries, 0, "nothing ran again");
}

// ---- Not retried: something may have reached the server ---------------------------------

#[tokio::test]
async fn a_statement_after_another_on_the_same_checkout_is_not_retried() {
    let emu = emulator("rt_second", 2, |c| c).await;
    let pool = pool_on(&emu);
    let c = pool.get().await.unwrap();
    let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
    assert_eq!(one, 1);
    let _emu = restarted(emu, "rt_second", &c).await;
    closed_error(c.query_one_scalar::<i32, _>("SELECT 1", &[]).await);
    assert_eq!(pool.status().retries, 0);
    drop(c);
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_statement_whose_answer_was_lost_is_not_run_twice() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS rt_lost_t; CREATE TABLE rt_lost_t (id int)")
        .await
        .unwrap();
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_lost").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    // The INSERT reaches the server and commits; its answer never comes back.
    cuts.drop_next_answer.store(true, SeqCst);
    closed_error(c.batch_execute("INSERT INTO rt_lost_t VALUES (1)").await);
    assert_eq!(pool.status().retries, 0);
    drop(c);
    assert_quiet(&pool);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM rt_lost_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the INSERT ran once");
    admin.batch_execute("DROP TABLE rt_lost_t").await.unwrap();
}

#[tokio::test]
async fn a_backend_terminated_mid_statement_is_not_retried() {
    let admin = admin().await;
    let pool = common::builder("rt_mid").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let t = Instant::now();
    let kill = async {
        let running = eventually(5, || async {
            admin
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'rt_mid' \
                     AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
                    &[],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await;
        assert!(running, "the statement never ran");
        assert_eq!(common::kill_backends(&admin, "rt_mid").await, 1);
    };
    let (r, ()) = tokio::join!(c.simple_query("SELECT pg_sleep(10)"), kill);
    assert!(r.is_err(), "the terminated statement fails");
    // Not the 10 s of the statement's end (or of its run again).
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    assert_eq!(pool.status().retries, 0);
    assert!(c.is_closed());
    drop(c);
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_second_close_during_the_retry_is_not_retried_again() {
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_twice").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    // Every later connection is closed as soon as it is logged in.
    cuts.close_after_startup_from.store(1, SeqCst);
    cuts.kill_all();
    until_closed(&c).await;
    let err = c
        .query_one_scalar::<i32, _>("SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert_eq!(pool.status().retries, 1);
    assert_eq!(
        cuts.accepted.load(SeqCst),
        2,
        "one fresh connection, not more"
    );
    drop(c);
    assert_quiet(&pool);
    assert_eq!(pool.status().size, 0);
}

#[tokio::test]
async fn a_statement_inside_a_transaction_is_not_retried() {
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_in_txn").max_size(1).build().unwrap();
    let mut c = pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    cuts.kill_all();
    // Let the client see the close (the BEGIN was sent either way).
    tokio::time::sleep(Duration::from_millis(100)).await;
    closed_error(tx.query_one_scalar::<i32, _>("SELECT 1", &[]).await);
    drop(tx);
    assert_eq!(pool.status().retries, 0);
    drop(c);
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_statement_prepared_in_an_earlier_checkout_is_not_retried() {
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_prepared").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let stmt = c.prepare("SELECT 41 + 1").await.unwrap();
    drop(c);
    let c = pool.get().await.unwrap(); // the same connection, nothing sent yet
    cuts.kill_all();
    until_closed(&c).await;
    // It names a statement of the closed connection: a fresh one does not have it.
    closed_error(c.query_one_scalar::<i32, _>(&stmt, &[]).await);
    assert_eq!(pool.status().retries, 0);
    drop(c);
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_connection_with_session_state_is_not_swapped_for_one_without() {
    let emu = emulator("rt_session", 2, |c| c).await;
    // `Keep` puts a possibly pinned connection back with its session state.
    let pool = Pool::builder(emu.url("postgres", "postgres"))
        .max_size(1)
        .pin_policy(PinPolicy::Keep)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute("SET work_mem = '7MB'").await.unwrap();
    drop(c);
    let c = pool.get().await.unwrap(); // that session, nothing sent yet
    let _emu = restarted(emu, "rt_session", &c).await;
    // On a fresh connection this would answer the default, as if the SET had never run.
    closed_error(c.query_one_scalar::<String, _>("SHOW work_mem", &[]).await);
    assert_eq!(pool.status().retries, 0);
    drop(c);
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_connection_handed_out_raw_is_not_swapped() {
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_raw").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let raw = PooledClient::raw(&c);
    cuts.kill_all();
    until_closed(&c).await;
    // The caller holds the closed connection's client: a swap would split what it sees.
    closed_error(c.query_one_scalar::<i32, _>("SELECT 1", &[]).await);
    assert!(raw.is_closed());
    assert_eq!(pool.status().retries, 0);
    drop(c);
    assert_quiet(&pool);
}

// ---- Cancellation ---------------------------------------------------------------------------

/// Polls the inner future `polls_left` times, then drops it (tokio-postgres's sweep).
struct Cancellable<F> {
    fut: Pin<Box<F>>,
    polls_left: usize,
}

impl<F: Future> Future for Cancellable<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polls_left == 0 {
            return Poll::Ready(None);
        }
        self.polls_left -= 1;
        self.fut.as_mut().poll(cx).map(Some)
    }
}

#[tokio::test]
async fn a_retry_dropped_at_any_poll_leaks_nothing() {
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_sweep").max_size(1).build().unwrap();
    let mut completed = false;
    for polls in 0..200 {
        let c = pool.get().await.unwrap();
        cuts.kill_all();
        until_closed(&c).await;
        let fut = Cancellable {
            fut: Box::pin(c.query_one_scalar::<i32, _>("SELECT 1", &[])),
            polls_left: polls,
        };
        let done = fut.await;
        drop(c);
        assert_quiet(&pool);
        let s = pool.status();
        assert!(s.size <= 1, "{s:?}");
        assert_eq!(s.opened - s.closed.total(), s.size as u64, "{s:?}");
        if let Some(r) = done {
            assert_eq!(r.unwrap(), 1);
            completed = true;
            break;
        }
        // Whatever was dropped, the pool still serves.
        let c = pool.get().await.unwrap();
        assert_eq!(
            c.query_one_scalar::<i32, _>("SELECT 1", &[]).await.unwrap(),
            1
        );
    }
    assert!(completed, "the retry never completed within 200 polls");
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_transaction_start_dropped_at_any_poll_of_its_retry_leaks_nothing() {
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "rt_sweep_txn").max_size(1).build().unwrap();
    let mut completed = false;
    for polls in 0..200 {
        let mut c = pool.get().await.unwrap();
        cuts.kill_all();
        until_closed(&c).await;
        let done = Cancellable {
            fut: Box::pin(async {
                let tx = c.transaction().await?;
                tx.query_one_scalar::<i32, _>("SELECT 1", &[]).await
            }),
            polls_left: polls,
        }
        .await;
        drop(c);
        assert_quiet(&pool);
        let s = pool.status();
        assert_eq!(s.opened - s.closed.total(), s.size as u64, "{s:?}");
        if let Some(r) = done {
            assert_eq!(r.unwrap(), 1);
            completed = true;
            break;
        }
        let c = pool.get().await.unwrap();
        assert!(
            !common::in_transaction_block(&c).await,
            "no transaction left open"
        );
    }
    assert!(completed, "the retry never completed within 200 polls");
    assert_quiet(&pool);
}

/// The replacement lives behind `&self` (a `OnceCell`): the client stays `Send + Sync`, and
/// its calls' futures `Send`, as a multi-threaded runtime and `GenericClient` need.
#[allow(dead_code)]
fn the_client_and_its_futures_stay_send_and_sync(pool: &Pool, c: &mut PooledClient) {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    send_sync(&*c);
    send(&pool.get());
    send(&c.query("SELECT 1", &[]));
    send(&c.query_raw("SELECT 1", std::iter::empty::<i32>()));
    send(&c.transaction());
}
