//! The invocation scope: deadlines without passing them around, concurrent invocations,
//! end-of-invocation work and the checks after a freeze.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{admin, builder, eventually};
use pinpool::{CloseReason, Error, Invocation, TimeoutCause};

fn in_ms(ms: u64) -> SystemTime {
    SystemTime::now() + Duration::from_millis(ms)
}

/// One invocation with a generous deadline that runs `SELECT 1`.
async fn select_one(pool: &pinpool::Pool) -> Result<(), Error> {
    pool.invocation(in_ms(5000), async {
        let c = pool.get().await?;
        c.query_one("SELECT 1", &[]).await.map(|_| ())
    })
    .await
}

#[tokio::test]
async fn the_deadline_reaches_gets_statements_and_spawned_tasks() {
    // A margin of 2 s: the work stops 2 s before the deadline (the pg_sleeps would run 1 s
    // past it).
    let pool = builder("inv_deadline")
        .deadline_margin(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = in_ms(4000);
    let (own, spawned) = pool
        .invocation(deadline, async {
            let c = pool.get().await.unwrap();
            let own = c.query("SELECT pg_sleep(5)", &[]).await.unwrap_err();
            let inv = Invocation::current().expect("inside an invocation");
            let p = pool.clone();
            let spawned = tokio::spawn(inv.scope(async move {
                let c = p.get().await?;
                c.query("SELECT pg_sleep(5)", &[]).await.map(|_| ())
            }))
            .await
            .unwrap()
            .unwrap_err();
            (own, spawned)
        })
        .await;
    for err in [own, spawned] {
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
    }
    assert!(
        SystemTime::now() < deadline,
        "everything stopped before the deadline"
    );
    assert!(Invocation::current().is_none());
}

#[tokio::test]
async fn concurrent_invocations_keep_their_own_deadlines() {
    let pool = builder("inv_concurrent").max_size(2).build().unwrap();
    let short = pool.invocation(in_ms(700), async {
        let c = pool.get().await?;
        c.query("SELECT pg_sleep(3)", &[]).await.map(|_| ())
    });
    let long = pool.invocation(in_ms(10_000), async {
        let c = pool.get().await?;
        c.query("SELECT pg_sleep(1)", &[]).await.map(|_| ())
    });
    let t = Instant::now();
    let (short, long) = tokio::join!(short, long);
    assert!(short.unwrap_err().is_deadline());
    long.unwrap();
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_dropped_transaction_has_rolled_back_on_the_server_when_the_invocation_ends() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS inv_rb_t; CREATE TABLE inv_rb_t (id int)")
        .await
        .unwrap();
    let pool = builder("inv_rollback").max_size(1).build().unwrap();
    pool.invocation(in_ms(10_000), async {
        let mut c = pool.get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        tx.execute("INSERT INTO inv_rb_t VALUES (1)", &[])
            .await
            .unwrap();
        // Dropped without commit: tokio-postgres only queues the ROLLBACK.
    })
    .await;
    // Nothing polls the connection from here on (as in a frozen environment), yet the server
    // has already seen the rollback.
    let states: Vec<String> = admin
        .query(
            "SELECT state FROM pg_stat_activity WHERE application_name = 'inv_rollback'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, ["idle"]);
    assert_eq!(pool.status().idle, 1);
    let n: i64 = admin
        .query_one("SELECT count(*) FROM inv_rb_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    admin.batch_execute("DROP TABLE inv_rb_t").await.unwrap();
}

#[tokio::test]
async fn the_pool_closes_connections_found_stale_after_a_freeze() {
    let admin = admin().await;
    let pool = builder("inv_stale")
        .validate_idle_after(Some(Duration::from_millis(100)))
        .build()
        .unwrap();
    select_one(&pool).await.unwrap();
    // The connection dies while nothing runs.
    assert_eq!(common::kill_backends(&admin, "inv_stale").await, 1);
    assert!(
        eventually(5, || async {
            common::backends(&admin, "inv_stale").await.is_empty()
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    select_one(&pool)
        .await
        .expect("a connection killed during the freeze does not fail the invocation");
    let s = pool.status();
    assert_eq!(
        s.closed.get(CloseReason::Broken) + s.closed.get(CloseReason::Stale),
        1,
        "{s:?}"
    );
}

/// A pinned connection kept for its invocation (`KeepForInvocation`) whose backend ended
/// meanwhile: the invocation's next `get()` closes it and gets a working connection, not the
/// dead one (whose statements a retry may not rescue: it is pinned).
#[tokio::test]
async fn a_kept_connection_that_died_is_replaced_at_the_next_get() {
    let admin = admin().await;
    let pool = builder("inv_kept_dead")
        .pin_policy(pinpool::PinPolicy::KeepForInvocation)
        .build()
        .unwrap();
    pool.invocation(in_ms(10_000), async {
        let c = pool.get().await.unwrap();
        c.batch_execute("SET work_mem = '12MB'").await.unwrap();
        drop(c);
        assert_eq!(common::kill_backends(&admin, "inv_kept_dead").await, 1);
        assert!(
            eventually(5, || async {
                common::backends(&admin, "inv_kept_dead").await.is_empty()
            })
            .await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = pool.get().await.unwrap();
        let one: i32 = c
            .query_one_scalar("SELECT 1", &[])
            .await
            .expect("a working connection, not the kept one that died");
        assert_eq!(one, 1);
    })
    .await;
    let s = pool.status();
    assert_eq!(s.closed.get(CloseReason::Broken), 1, "{s:?}");
    assert_eq!(s.opened, 2, "{s:?}");
    common::assert_quiet(&pool);
}

#[cfg(feature = "emulator")]
mod through_the_emulator {
    use super::*;
    use common::emulator;
    use pinpool::{PinPolicy, PooledClient};

    #[tokio::test]
    async fn pinned_connections_are_kept_for_the_invocation_and_closed_at_its_end() {
        let emu = emulator("inv_keep", 4, |c| c).await;
        let pool = pinpool::Pool::builder(emu.url("postgres", "postgres"))
            .pin_policy(PinPolicy::KeepForInvocation)
            .build()
            .unwrap();
        pool.invocation(in_ms(10_000), async {
            let c = pool.get().await.unwrap();
            c.batch_execute("SET work_mem = '12MB'").await.unwrap();
            let pid: i32 = c
                .query_one_scalar("SELECT pg_backend_pid()", &[])
                .await
                .unwrap();
            drop(c);
            assert_eq!(emu.counters().pinned_now, 1);
            let c = pool.get().await.unwrap();
            let again: i32 = c
                .query_one_scalar("SELECT pg_backend_pid()", &[])
                .await
                .unwrap();
            assert_eq!(
                pid, again,
                "the pinned connection came back within its invocation"
            );
            assert!(PooledClient::pin_state(&c).is_pinned());
        })
        .await;
        assert!(
            eventually(5, || async { emu.counters().pinned_now == 0 }).await,
            "{:?}",
            emu.counters()
        );
        assert_eq!(pool.status().closed.get(CloseReason::Pinned), 1);
        common::assert_quiet(&pool);

        // A dropped invocation future closes what it kept, too.
        let fut = pool.invocation(in_ms(10_000), async {
            let c = pool.get().await.unwrap();
            c.batch_execute("SET work_mem = '12MB'").await.unwrap();
            drop(c);
            std::future::pending::<()>().await;
        });
        // Time enough for the get and the SET on a loaded machine; then it waits for ever.
        let _ = tokio::time::timeout(Duration::from_secs(3), fut).await;
        assert!(eventually(5, || async { emu.counters().pinned_now == 0 }).await);
        assert_eq!(pool.status().closed.get(CloseReason::Pinned), 2);
        common::assert_quiet(&pool);
    }

    #[tokio::test]
    async fn a_connection_the_proxy_closed_for_idleness_is_replaced() {
        let emu = emulator("inv_idle", 4, |c| {
            c.idle_client_timeout(Duration::from_millis(300))
        })
        .await;
        let pool = pinpool::Pool::builder(emu.url("postgres", "postgres"))
            .build()
            .unwrap();
        for _ in 0..2 {
            select_one(&pool).await.unwrap();
            // Closed by the proxy at 300 ms; 900 ms of slack for its timer.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        assert_eq!(emu.counters().idle_client_closes, 2);
        assert_eq!(pool.status().opened, 2);
    }

    #[tokio::test]
    async fn a_silent_half_open_connection_fails_before_the_deadline() {
        let emu = emulator("inv_silent", 4, |c| c).await;
        // The cutoff 1 s before the deadline; hung until the 5 s connect_timeout, it would
        // answer 2 s after it.
        let pool = pinpool::Pool::builder(emu.url("postgres", "postgres"))
            .validate_idle_after(Some(Duration::from_millis(50)))
            .deadline_margin(Duration::from_secs(1))
            .build()
            .unwrap();
        select_one(&pool).await.unwrap();
        emu.set_silent(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let deadline = in_ms(4000);
        let r = pool
            .invocation(deadline, async {
                let c = pool.get().await?;
                c.query_one("SELECT 1", &[]).await.map(|_| ())
            })
            .await;
        let err = r.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        let late = SystemTime::now()
            .duration_since(deadline)
            .unwrap_or_default();
        assert!(late.is_zero(), "answered {late:?} after the deadline");
        emu.set_silent(false);
    }

    #[tokio::test]
    async fn a_flow_a_nat_forgot_during_the_freeze_costs_a_check_not_the_invocation() {
        // The incident's second suspect: frozen longer than the NAT's idle timeout, the
        // socket is open and dead. The check must leave time to connect afresh, even with a
        // validate_timeout longer than the invocation.
        let emu = emulator("inv_nat", 4, |c| {
            c.nat_idle_timeout(Some(Duration::from_millis(300)))
        })
        .await;
        let pool = pinpool::Pool::builder(emu.url("postgres", "postgres"))
            .validate_idle_after(Some(Duration::from_millis(100)))
            .validate_timeout(Duration::from_secs(10))
            .deadline_margin(Duration::from_millis(100))
            .build()
            .unwrap();
        select_one(&pool).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Still shorter than validate_timeout: a check bounded by it alone would use it all.
        let deadline = in_ms(4000);
        let v = pool
            .invocation(deadline, async {
                let c = pool.get().await?;
                c.query_one_scalar::<i32, _>("SELECT 1", &[]).await
            })
            .await;
        assert_eq!(v.unwrap(), 1);
        assert_eq!(emu.counters().nat_drops, 1);
        assert_eq!(pool.status().opened, 2, "the dead connection was replaced");
    }

    #[tokio::test]
    async fn a_forgotten_flow_costs_the_patience_and_a_connect_not_the_checks_bound() {
        let emu = emulator("inv_nat_race", 4, |c| {
            c.nat_idle_timeout(Some(Duration::from_millis(300)))
        })
        .await;
        let pool = pinpool::Pool::builder(emu.url("postgres", "postgres"))
            .validate_idle_after(Some(Duration::from_millis(100)))
            .validate_timeout(Duration::from_secs(8))
            .build()
            .unwrap();
        select_one(&pool).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Half of the time left is 10 s: the check alone would wait its whole 8 s.
        let deadline = in_ms(20_000);
        let started = std::time::Instant::now();
        let v = pool
            .invocation(deadline, async {
                let c = pool.get().await?;
                c.query_one_scalar::<i32, _>("SELECT 1", &[]).await
            })
            .await;
        assert_eq!(v.unwrap(), 1);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(4), "took {took:?}");
        assert_eq!(emu.counters().nat_drops, 1);
        assert_eq!(pool.status().closed.get(CloseReason::Stale), 1);
        assert_eq!(pool.status().opened, 2);
    }

    #[tokio::test]
    async fn one_dead_idle_connection_does_not_cost_the_healthy_ones_their_check() {
        // Connection A idles past the NAT's timeout, B does not: the checks at the start of
        // the invocation run side by side, so A's silence costs B nothing.
        // Every margin a second or more: a loaded machine may pause the test for hundreds of
        // milliseconds.
        let emu = emulator("inv_one_dead", 4, |c| {
            c.nat_idle_timeout(Some(Duration::from_secs(3)))
        })
        .await;
        let pool = pinpool::Pool::builder(emu.url("postgres", "postgres"))
            .max_size(2)
            .validate_idle_after(Some(Duration::from_millis(50)))
            // Shorter than the NAT's timeout: a check one after the other would find B
            // forgotten too once A's check had timed out (B idle 2 s + 2 s).
            .validate_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        {
            let (a, b) = tokio::join!(pool.get(), pool.get());
            let (a, b) = (a.unwrap(), b.unwrap());
            a.batch_execute("SELECT 1").await.unwrap();
            b.batch_execute("SELECT 1").await.unwrap();
            drop(a);
            drop(b); // returned last: handed out first
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // B again, outside an invocation (whose freeze check would touch A too).
        pool.get()
            .await
            .unwrap()
            .batch_execute("SELECT 1")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // A has been idle 4 s (forgotten), B 2 s (alive, with 1 s to spare).
        let v = pool
            .invocation(in_ms(10_000), async {
                pool.get()
                    .await?
                    .query_one_scalar::<i32, _>("SELECT 1", &[])
                    .await
            })
            .await;
        assert_eq!(v.unwrap(), 1);
        let s = pool.status();
        assert_eq!(
            s.closed.get(pinpool::CloseReason::Stale),
            1,
            "{s:?} {:?}",
            emu.counters()
        );
        assert_eq!(s.opened, 2, "the healthy connection was kept: {s:?}");
    }

    #[tokio::test]
    async fn an_invocation_dropped_during_the_freeze_check_closes_what_it_was_checking() {
        let emu = emulator("inv_drop_check", 4, |c| c).await;
        let pool = pinpool::Pool::builder(emu.url("postgres", "postgres"))
            .validate_idle_after(Some(Duration::from_millis(50)))
            .validate_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let (a, b) = tokio::join!(pool.get(), pool.get());
        drop((a.unwrap(), b.unwrap()));
        assert_eq!(pool.status().idle, 2);
        emu.set_silent(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The check's round trip hangs on the silent proxy; the invocation is dropped then.
        let dropped = tokio::time::timeout(
            Duration::from_millis(300),
            pool.invocation(in_ms(20_000), async { pool.get().await.map(drop) }),
        )
        .await;
        assert!(dropped.is_err(), "the freeze check was still running");
        let s = pool.status();
        assert_eq!(
            (s.size, s.idle, s.in_use, s.waiters),
            (0, 0, 0, 0),
            "both connections closed and counted: {s:?}"
        );
        emu.set_silent(false);
        select_one(&pool).await.unwrap();
        common::assert_quiet(&pool);
    }
}

/// A connection closed in an invocation (pinned) is replaced after it, up to `min_idle`: the
/// next invocation finds one ready instead of connecting on its critical path.
#[tokio::test]
async fn a_pinned_connection_is_replaced_after_its_invocation_not_in_the_next() {
    for refill in [Some(Duration::from_secs(2)), None] {
        let pool = builder("inv_refill")
            .max_size(2)
            .min_idle(1)
            .refill_after_invocation(refill)
            .build()
            .unwrap();
        assert_eq!(pool.warm_up().await.unwrap(), 1);
        pool.invocation(in_ms(5000), async {
            let c = pool.get().await.unwrap();
            c.batch_execute("SET statement_timeout = '7s'")
                .await
                .unwrap();
        })
        .await;
        let s = pool.status();
        assert_eq!(s.closed.get(CloseReason::Pinned), 1, "{s:?}");
        if refill.is_some() {
            assert_eq!(
                (s.idle, s.opened),
                (1, 2),
                "replaced before the next event: {s:?}"
            );
        } else {
            assert_eq!((s.idle, s.opened), (0, 1), "{s:?}");
        }
        common::assert_quiet(&pool);
    }
}

/// The replacement never delays the next event past `refill_after_invocation`: against a
/// database 2.5 s away it gives up at its bound and leaves nothing half-open behind.
#[tokio::test]
async fn the_replacement_after_an_invocation_stops_at_its_bound() {
    let port = common::slow_relay(Duration::from_millis(2500)).await;
    let pool = common::relayed(port, "inv_refill_bound")
        .connect_timeout(Duration::from_secs(30))
        .max_size(2)
        .min_idle(1)
        .refill_after_invocation(Some(Duration::from_millis(200)))
        .build()
        .unwrap();
    assert_eq!(pool.warm_up().await.unwrap(), 1);
    let mut handler_done = Instant::now();
    pool.invocation(in_ms(30_000), async {
        let c = pool.get().await.unwrap();
        c.batch_execute("SET statement_timeout = '7s'")
            .await
            .unwrap();
        drop(c);
        handler_done = Instant::now();
    })
    .await;
    // Its 200 ms bound, with 1.3 s of slack; a connect that ran on would take 2.5 s or more.
    let end_work = handler_done.elapsed();
    assert!(end_work < Duration::from_millis(1500), "{end_work:?}");
    let s = pool.status();
    assert_eq!(
        (s.size, s.idle),
        (0, 0),
        "the unfinished connect left nothing: {s:?}"
    );
    common::assert_quiet(&pool);
}

/// A client held longer than `held_too_long` is reported when it comes back, and one still
/// checked out when its invocation ends (held through the freeze) always is; both name where
/// it was checked out.
#[test]
fn clients_held_too_long_or_past_their_invocation_are_reported() {
    let rec = common::TestRecorder::default();
    let kept = std::sync::Arc::new(std::sync::Mutex::new(None));
    common::run_recorded(&rec, async {
        // A second: the clients returned "at once" are not reported however loaded the machine.
        let pool = builder("inv_held")
            .held_too_long(Some(Duration::from_secs(1)))
            .build()
            .unwrap();
        // Returned at once: not reported.
        drop(pool.get().await.unwrap());
        let c = pool.get().await.unwrap();
        let debug = format!("{c:?}");
        assert!(
            debug.contains("tests/invocation.rs"),
            "the caller's location: {debug}"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        drop(c);
        let keep = kept.clone();
        pool.invocation(in_ms(5000), async {
            // A handler that stores its client somewhere and returns.
            *keep.lock().unwrap() = Some(pool.get().await.unwrap());
            let c = pool.get().await.unwrap();
            drop(c);
        })
        .await;
        drop(kept.lock().unwrap().take());
    });
    assert_eq!(
        rec.counter("pinpool_held_too_long{when=returned}"),
        1,
        "{:?}",
        rec.names()
    );
    assert_eq!(
        rec.counter("pinpool_held_too_long{when=invocation_end}"),
        1,
        "{:?}",
        rec.names()
    );
}
