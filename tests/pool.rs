//! The pool's behaviour against PostgreSQL: bounds, deadlines, errors, replacement, fairness
//! and cancellation safety.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use common::{admin, assert_quiet, backends, builder, eventually, kill_backends};
use futures_util::StreamExt;
use pinpool::{CloseReason, Error, Phase, Pool, TimeoutCause};

fn timeout_of(e: &Error) -> (Phase, TimeoutCause) {
    match e {
        Error::Timeout { phase, cause, .. } => (*phase, *cause),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn exhaustion_fails_with_an_acquire_timeout_within_the_bound() {
    let pool = builder("pl_exhaust")
        .max_size(1)
        .acquire_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let held = pool.get().await.unwrap();
    let t = Instant::now();
    let err = pool.get().await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(timeout_of(&err), (Phase::Acquire, TimeoutCause::Configured));
    assert!(err.to_string().contains("acquire_timeout"), "{err}");
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(pool.status().waiters, 0);
    drop(held);
    assert_quiet(&pool);
}

#[tokio::test]
async fn get_by_stops_at_the_deadline_minus_the_margin() {
    // A margin of 2 s: stopping at the deadline itself, not before it, is 2 s late.
    let pool = builder("pl_deadline")
        .max_size(1)
        .acquire_timeout(Duration::from_secs(30))
        .deadline_margin(Duration::from_secs(2))
        .build()
        .unwrap();
    let held = pool.get().await.unwrap();
    let deadline = SystemTime::now() + Duration::from_secs(3);
    let err = pool.get_by(deadline).await.unwrap_err();
    assert_eq!(timeout_of(&err), (Phase::Acquire, TimeoutCause::Deadline));
    assert!(err.is_deadline());
    assert!(
        SystemTime::now() < deadline,
        "failed before the deadline itself"
    );
    drop(held);

    // A statement of a client checked out with a deadline stops there too.
    let deadline = SystemTime::now() + Duration::from_secs(4);
    let c = pool.get_by(deadline).await.unwrap();
    let err = c.query("SELECT pg_sleep(10)", &[]).await.unwrap_err();
    assert_eq!(timeout_of(&err), (Phase::Query, TimeoutCause::Deadline));
    assert!(SystemTime::now() < deadline);
    assert!(c.is_closed(), "a timed-out statement closes the connection");
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::TimedOut), 1);

    // A deadline already inside the margin fails at once, not at the deadline 1.5 s away.
    let t = Instant::now();
    let err = pool
        .get_by(SystemTime::now() + Duration::from_millis(1500))
        .await
        .unwrap_err();
    assert!(err.is_deadline());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_query_timeout_closes_the_socket_and_the_server_notices() {
    let admin = admin().await;
    admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE pinpool_cci LOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$; \
             ALTER ROLE pinpool_cci SET client_connection_check_interval = '100ms'",
        )
        .await
        .unwrap();
    let mut cfg: tokio_postgres::Config = common::url_for("pl_qtimeout").parse().unwrap();
    cfg.user("pinpool_cci");
    let pool = Pool::builder(cfg)
        .query_timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let t = Instant::now();
    let err = c.query("SELECT pg_sleep(60)", &[]).await.unwrap_err();
    assert_eq!(timeout_of(&err), (Phase::Query, TimeoutCause::Configured));
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(c.is_closed());
    drop(c);
    // Checked every 100 ms; left running, it would sleep its 60 s.
    let gone = eventually(10, || async {
        backends(&admin, "pl_qtimeout").await.is_empty()
    })
    .await;
    assert!(
        gone,
        "the backend outlived the closed socket by more than 10 s"
    );
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_killed_backend_is_replaced() {
    let admin = admin().await;
    let pool = builder("pl_killed").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let pid: i32 = c
        .query_one_scalar("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    drop(c);
    assert_eq!(kill_backends(&admin, "pl_killed").await, 1);
    assert!(
        eventually(5, || async {
            backends(&admin, "pl_killed").await.is_empty()
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = pool.get().await.unwrap();
    let new_pid: i32 = c
        .query_one_scalar("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_ne!(pid, new_pid);
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::Broken), 1);
    assert_eq!(pool.status().opened, 2);
}

#[tokio::test]
async fn a_backend_killed_mid_query_fails_that_query_and_the_pool_recovers() {
    let admin = admin().await;
    let pool = builder("pl_killmid").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let q = tokio::spawn(async move {
        let r = c.query("SELECT pg_sleep(30)", &[]).await;
        (r.map(|_| ()), c)
    });
    assert!(
        eventually(5, || async {
            backends(&admin, "pl_killmid").await.len() == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = Instant::now();
    kill_backends(&admin, "pl_killmid").await;
    let (r, c) = q.await.unwrap();
    let err = r.unwrap_err();
    assert!(matches!(err, Error::Query(_)), "{err:?}");
    // The FATAL ends the session: no ReadyForQuery follows it to wait for (the pg_sleep's
    // end, 30 s).
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "failed only after {:?}",
        killed.elapsed()
    );
    drop(c);
    assert_eq!(
        pool.status().closed.get(CloseReason::Broken),
        1,
        "{:?}",
        pool.status()
    );
    let c = pool.get().await.unwrap();
    let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
    assert_eq!(one, 1);
}

/// The first `get()` of a new pool for `url`, with a long acquire timeout so only the
/// connect timeout can bound it: the pool, the error and how long it took.
async fn first_get_fails(url: &str, connect_timeout: Duration) -> (Pool, Error, Duration) {
    let pool = Pool::builder(url)
        .acquire_timeout(Duration::from_secs(30))
        .connect_timeout(connect_timeout)
        .build()
        .unwrap();
    let t = Instant::now();
    let err = pool.get().await.unwrap_err();
    (pool, err, t.elapsed())
}

#[tokio::test]
async fn unreachable_databases_fail_within_the_connect_timeout() {
    // Refused: fails at once, not after the acquire timeout.
    let (pool, err, took) = first_get_fails(
        "postgres://postgres@127.0.0.1:1/postgres",
        Duration::from_secs(2),
    )
    .await;
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
    assert!(err.to_string().contains("could not connect"), "{err}");
    assert!(took < Duration::from_secs(3));
    assert_quiet(&pool);
    assert_eq!(pool.status().size, 0);

    // Silent: a listener that never answers the startup message.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let (pool, err, took) = first_get_fails(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        Duration::from_millis(400),
    )
    .await;
    assert_eq!(timeout_of(&err), (Phase::Connect, TimeoutCause::Configured));
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(pool.status().size, 0);

    // Unresolvable host name.
    let (_, err, took) = first_get_fails(
        "postgres://postgres@pinpool-no-such-host.invalid/postgres",
        Duration::from_secs(2),
    )
    .await;
    assert!(
        matches!(
            err,
            Error::Connect(_)
                | Error::Timeout {
                    phase: Phase::Connect,
                    ..
                }
        ),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(4));
    drop(silent);
}

#[test]
fn invalid_options_fail_at_build_naming_the_option() {
    let url = common::database_url();
    let cases: Vec<(pinpool::Builder, &str)> = vec![
        (Pool::builder("postgres://u@h:notaport/db"), "url"),
        (Pool::builder("postgres://u@h/db?bogus=1"), "url"),
        (Pool::builder("host=h dbname=d"), "user"),
        (Pool::builder("postgres://u@/db"), "host"),
        (Pool::builder(url.as_str()).max_size(0), "max_size"),
        (
            Pool::builder(url.as_str()).max_size(2).min_idle(3),
            "min_idle",
        ),
        (
            Pool::builder(url.as_str()).acquire_timeout(Duration::ZERO),
            "acquire_timeout",
        ),
        (
            Pool::builder(url.as_str()).connect_timeout(Duration::ZERO),
            "connect_timeout",
        ),
        (
            Pool::builder(url.as_str()).query_timeout(Some(Duration::ZERO)),
            "query_timeout",
        ),
        (
            Pool::builder(url.as_str()).idle_timeout(Some(Duration::ZERO)),
            "idle_timeout",
        ),
        (
            Pool::builder(url.as_str()).max_lifetime(Some(Duration::from_secs(25 * 3600))),
            "max_lifetime",
        ),
    ];
    // Without the tls feature, TLS modes need a connector; with it, rustls is set up (and a
    // root certificate file that cannot be read is named).
    #[cfg(not(feature = "tls"))]
    let cases = {
        let mut cases = cases;
        cases.push((
            Pool::builder("postgres://u@h/db?sslmode=verify-full"),
            "sslmode",
        ));
        cases.push((
            Pool::builder("postgres://u@h/db?sslmode=require"),
            "sslmode",
        ));
        cases
    };
    #[cfg(feature = "tls")]
    let cases = {
        let mut cases = cases;
        cases.push((
            Pool::builder("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
            "sslrootcert",
        ));
        cases.push((
            Pool::builder("postgres://u@h/db?sslmode=verify-full").root_certificates_pem("not pem"),
            "root_certificates_pem",
        ));
        cases
    };
    for (b, option) in cases {
        match b.build() {
            Err(Error::Config {
                option: got,
                message,
            }) => {
                assert_eq!(got, option, "{message}");
                let text = Error::Config {
                    option: got,
                    message,
                }
                .to_string();
                assert!(text.contains(option), "{text}");
            }
            other => panic!("{option}: expected a config error, got {other:?}"),
        }
    }
    let err = Pool::builder("postgres://u@h/db?bogus=1")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    let err = Pool::builder("postgres://u@h:notaport/db")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("port"), "{err}");
    // Secrets never show in errors or Debug.
    let pool = Pool::builder("postgres://u:hunter2@h/db").build().unwrap();
    assert!(!format!("{pool:?}").contains("hunter2"));
}

#[tokio::test]
async fn waiters_are_served_in_order() {
    let pool = builder("pl_fifo").max_size(1).build().unwrap();
    let held = pool.get().await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (pool2, order) = (pool.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let c = pool2.get().await.unwrap();
            order.lock().unwrap().push(i);
            tokio::task::yield_now().await;
            drop(c);
        }));
        let p = pool.clone();
        assert!(
            eventually(5, move || {
                let p = p.clone();
                async move { p.status().waiters == i + 1 }
            })
            .await
        );
    }
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4, 5]);
    assert_quiet(&pool);
}

#[tokio::test]
async fn idle_and_old_connections_are_replaced() {
    let pool = builder("pl_idle")
        .idle_timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    drop(pool.get().await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(pool.get().await.unwrap());
    let s = pool.status();
    assert_eq!(
        (s.opened, s.closed.get(CloseReason::IdleTimeout)),
        (2, 1),
        "{s:?}"
    );

    let pool = builder("pl_lifetime")
        .max_lifetime(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(c);
    let s = pool.status();
    assert_eq!(
        (s.idle, s.closed.get(CloseReason::MaxLifetime)),
        (0, 1),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_lifetime_shorter_than_a_clock_tick_is_never_overrun() {
    // A connection that outlived max_lifetime is closed on return and never handed out again,
    // however short the lifetime: a coarse clock (a tick, 1 to 10 ms, behind) would miss it.
    let pool = builder("pl_tick_lifetime")
        .max_size(1)
        .max_lifetime(Some(Duration::from_millis(1)))
        .build()
        .unwrap();
    let mut kept = 0;
    for _ in 0..40 {
        let c = pool.get().await.unwrap();
        let got = SystemTime::now();
        while SystemTime::now() < got + Duration::from_micros(1500) {
            std::hint::spin_loop();
        }
        drop(c);
        kept += pool.status().idle;
    }
    assert_eq!(kept, 0, "connections past max_lifetime went back idle");
    assert_eq!(pool.status().closed.get(CloseReason::MaxLifetime), 40);

    // And at checkout: one returned young, then idle past its lifetime, is not handed out.
    let pool = builder("pl_tick_lifetime")
        .max_size(1)
        .max_lifetime(Some(Duration::from_secs(2)))
        .build()
        .unwrap();
    drop(pool.get().await.unwrap());
    assert_eq!(pool.status().idle, 1, "returned within its lifetime");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    drop(pool.get().await.unwrap());
    let s = pool.status();
    assert_eq!(
        (s.opened, s.closed.get(CloseReason::MaxLifetime)),
        (2, 1),
        "{s:?}"
    );
}

#[tokio::test]
async fn warm_up_opens_min_idle_and_close_refuses_new_gets() {
    let pool = builder("pl_warm").max_size(3).min_idle(2).build().unwrap();
    assert_eq!(pool.status().size, 0, "build() opens nothing");
    assert_eq!(pool.warm_up().await.unwrap(), 2);
    assert_eq!(pool.warm_up().await.unwrap(), 0);
    assert_eq!(pool.status().idle, 2);
    let c = pool.get().await.unwrap();
    pool.close();
    assert!(pool.is_closed());
    assert!(matches!(pool.get().await, Err(Error::Closed)));
    assert_eq!(pool.status().idle, 0);
    drop(c);
    let s = pool.status();
    assert_eq!(
        (s.size, s.closed.get(CloseReason::PoolClosed)),
        (0, 2),
        "{s:?}"
    );
}

/// Resolves to `None` after `polls_left` pending polls, dropping the inner future there.
struct Cancellable<F> {
    fut: Pin<Box<F>>,
    polls_left: usize,
}

impl<F: Future> Future for Cancellable<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.fut.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending if self.polls_left == 0 => Poll::Ready(None),
            Poll::Pending => {
                self.polls_left -= 1;
                Poll::Pending
            }
        }
    }
}

async fn work(pool: &Pool, n: i32) -> Result<(), Error> {
    let mut c = pool.get().await?;
    let tx = c.transaction().await?;
    tx.execute("INSERT INTO pl_sweep_t VALUES ($1)", &[&n])
        .await?;
    tx.commit().await?;
    let mut rows = Box::pin(
        c.query_raw("SELECT id FROM pl_sweep_t WHERE id = $1", [n])
            .await?,
    );
    while let Some(row) = rows.next().await {
        row?;
    }
    c.batch_execute("SELECT 1").await?;
    Ok(())
}

#[tokio::test]
async fn futures_dropped_at_every_poll_leak_nothing() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS pl_sweep_t; CREATE TABLE pl_sweep_t (id int)")
        .await
        .unwrap();
    let pool = builder("pl_sweep").max_size(2).build().unwrap();
    let mut completed = false;
    for polls in 0..500 {
        let fut = Cancellable {
            fut: Box::pin(work(&pool, polls as i32)),
            polls_left: polls,
        };
        if let Some(r) = fut.await {
            r.unwrap();
            completed = true;
            break;
        }
        assert_quiet(&pool);
        // Whatever was dropped, the pool still serves.
        let c = pool.get().await.unwrap();
        let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
        assert_eq!(one, 1);
    }
    assert!(completed, "the work never completed within 500 polls");
    assert_quiet(&pool);
    // Cancelled transactions never committed half-way: each id is there at most once.
    let dup: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT id FROM pl_sweep_t GROUP BY id HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dup, 0);
    admin.batch_execute("DROP TABLE pl_sweep_t").await.unwrap();
}

#[tokio::test]
async fn many_waiters_with_random_timeouts_leak_no_capacity() {
    let pool = builder("pl_waiters").max_size(2).build().unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let pool = pool.clone();
        let (wait, hold, query) = (rand(40) + 1, rand(10), rand(2) == 0);
        tasks.push(tokio::spawn(async move {
            let got = tokio::time::timeout(Duration::from_millis(wait), pool.get()).await;
            if let Ok(Ok(c)) = got {
                if query {
                    let _ = tokio::time::timeout(
                        Duration::from_millis(hold),
                        c.query("SELECT pg_sleep(0.005)", &[]),
                    )
                    .await;
                } else {
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_quiet(&pool);
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    assert_eq!(pool.status().in_use, 2);
    drop((a, b));
    assert_quiet(&pool);
}

#[test]
fn metrics_are_recorded_under_the_documented_names() {
    let rec = common::TestRecorder::default();
    common::run_recorded(&rec, async {
        let pool = builder("pl_metrics")
            .max_size(1)
            .acquire_timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        let c = pool.get().await.unwrap();
        assert!(pool.get().await.is_err());
        for _ in 0..2 {
            c.query_one("SELECT 1", &[]).await.unwrap();
        }
        c.batch_execute("SET application_name = 'pl_metrics'")
            .await
            .unwrap();
        drop(c);
    });
    assert_eq!(
        rec.counter("pinpool_connections_opened{}"),
        1,
        "{:?}",
        rec.names()
    );
    assert_eq!(
        rec.counter("pinpool_timeouts{cause=timeout,phase=acquire}"),
        1
    );
    assert_eq!(rec.counter("pinpool_pinned{reason=set}"), 1);
    assert_eq!(rec.counter("pinpool_connections_closed{reason=pinned}"), 1);
    assert_eq!(rec.gauge("pinpool_connections_in_use{}"), Some(0.0));
    assert_eq!(rec.samples("pinpool_acquire_wait{}").len(), 1);
    assert_eq!(rec.counter("pinpool_statement_cache{result=miss}"), 1);
    assert_eq!(rec.counter("pinpool_statement_cache{result=hit}"), 1);

    // Another recorder on the same thread gets the next values: handles cached for the first
    // one are not reused for it.
    let other = common::TestRecorder::default();
    common::run_recorded(&other, async {
        let pool = builder("pl_metrics").max_size(1).build().unwrap();
        let c = pool.get().await.unwrap();
        c.query_one("SELECT 1", &[]).await.unwrap();
    });
    assert_eq!(other.samples("pinpool_acquire_wait{}").len(), 1);
    assert_eq!(other.counter("pinpool_statement_cache{result=miss}"), 1);
    assert_eq!(rec.samples("pinpool_acquire_wait{}").len(), 1, "unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_one_consistent_picture_under_load() {
    // Connections checked out, returned, closed on return (pinned) and opened again, while
    // another task reads status() as fast as it can.
    let pool = builder("p_status_load").max_size(3).build().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = pool.status();
                assert!(
                    s.idle + s.in_use <= s.size && s.size <= s.max_size,
                    "after {reads} reads: {s:?}"
                );
                reads += 1;
                if reads.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            reads
        })
    };
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for i in 0..150 {
                    let c = pool.get().await.unwrap();
                    if (i + w) % 5 == 0 {
                        c.batch_execute("SET work_mem = '5MB'").await.unwrap();
                    } else {
                        c.query_one("SELECT 1", &[]).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.await.unwrap();
    assert!(reads > 100, "the reader ran: {reads}");
    assert!(pool.status().closed.get(CloseReason::Pinned) > 100);
    assert_quiet(&pool);
}

#[tokio::test(flavor = "current_thread")]
async fn a_task_looping_over_free_checkouts_lets_the_others_run() {
    // Free connections are handed out without waiting; get() still takes part in tokio's
    // cooperative budget, so one task's loop cannot run to its end before another starts.
    let pool = builder("pl_coop").max_size(2).min_idle(2).build().unwrap();
    pool.warm_up().await.unwrap();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let (pool, done) = (pool.clone(), done.clone());
            tokio::spawn(async move {
                for _ in 0..2_000 {
                    drop(pool.get().await.unwrap());
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // What both loops had done when this one ended.
                done.load(std::sync::atomic::Ordering::Relaxed)
            })
        })
        .collect();
    let mut at_end = Vec::new();
    for l in loops {
        at_end.push(l.await.unwrap());
    }
    assert!(
        at_end[0] > 2_000 + 500,
        "the first loop ended with the other at {} of 2,000: it never yielded",
        at_end[0] - 2_000
    );
    assert_quiet(&pool);
}

/// A pool kept beyond the runtime it was used on (a `static` that one `#[tokio::test]` after
/// another uses, or a runtime rebuilt): its connections' tasks ended with that runtime. The
/// next runtime's checkout replaces the idle ones instead of handing one out to hang until its
/// `query_timeout`; a client checked out before and used after is retried on a fresh
/// connection; the pool's bounded waits still end at their bound.
#[test]
fn a_connection_whose_runtime_ended_is_replaced_at_checkout() {
    static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
    let pool = || {
        POOL.get_or_init(|| {
            builder("pl_runtimes")
                .max_size(3)
                .acquire_timeout(Duration::from_millis(300))
                .query_timeout(Some(Duration::from_secs(20)))
                .build()
                .unwrap()
        })
    };
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let held = first.block_on(async {
        let (a, b) = (pool().get().await.unwrap(), pool().get().await.unwrap());
        let held = pool().get().await.unwrap();
        // A waiter queued with its bound (the slots' watchdog runs on this runtime).
        let err = pool().get().await.unwrap_err();
        assert_eq!(timeout_of(&err).0, Phase::Acquire);
        for c in [&a, &b] {
            let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
            assert_eq!(one, 1);
        }
        held
    });
    assert_eq!(pool().status().idle, 2);
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let started = Instant::now();
        let served = tokio::time::timeout(Duration::from_secs(5), async {
            let c = pool().get().await.unwrap();
            let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
            (c, one)
        })
        .await;
        let (c, one) = served.expect("served within 5 s, not at the 20 s query_timeout");
        assert_eq!(one, 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        let s = pool().status();
        assert_eq!(
            s.closed.get(CloseReason::Broken),
            2,
            "both idle ones replaced"
        );
        assert_eq!(s.opened, 4);
        // Nothing of its checkout was sent: retried on a fresh connection.
        let one = tokio::time::timeout(
            Duration::from_secs(5),
            held.query_one_scalar::<i32, _>("SELECT 1", &[]),
        )
        .await
        .expect("answered within 5 s")
        .unwrap();
        assert_eq!(one, 1);
        let s = pool().status();
        assert_eq!((s.retries, s.closed.get(CloseReason::Broken)), (1, 3));
        // The pool's bounded waits work in this runtime too.
        let d = pool().get().await.unwrap();
        let started = Instant::now();
        let err = pool().get().await.unwrap_err();
        assert_eq!(timeout_of(&err).0, Phase::Acquire);
        assert!(started.elapsed() < Duration::from_secs(2));
        drop((c, d, held));
        assert_quiet(pool());
    });
}

/// A runtime shut down while a `get()` on it waits for a connect (here, for a password
/// refresh that hangs): the connect's count and slot are given back, the refresh is not left
/// marked running, and the next runtime connects at once.
#[test]
fn a_runtime_shut_down_mid_connect_leaves_nothing_behind() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let first_hangs = move || {
        let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::io::Error>(String::new())
        }
    };
    let pool = builder("pl_runtime_connect")
        .max_size(1)
        .connect_timeout(Duration::from_secs(20))
        .password_provider(pinpool::CachedPassword::new(
            first_hangs,
            Duration::from_secs(60),
        ))
        .build()
        .unwrap();
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    first.block_on(async {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get().await.map(drop) });
        let asked = eventually(10, || async {
            calls.load(std::sync::atomic::Ordering::SeqCst) == 1
        })
        .await;
        assert!(asked, "the connect waits for the password");
    });
    assert_eq!(pool.status().size, 1, "connecting");
    drop(first);
    assert_eq!(pool.status().size, 0);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        // Held up, it would wait for the hung refresh's bound (11 s).
        let c = tokio::time::timeout(Duration::from_secs(5), pool.get())
            .await
            .expect("not held up by the first runtime's connect")
            .unwrap();
        let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
        assert_eq!(one, 1);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        drop(c);
        assert_quiet(&pool);
    });
}
