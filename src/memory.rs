//! The pool's core without PostgreSQL (tests only): a [`Connect`] whose connections end at a
//! small in-memory server, enough of the protocol for the pool's own traffic (startup, Sync,
//! simple queries), with faults on demand. Checkout, return, waiters, cancellation and the
//! pool's invariants are tested here fast, the timing ones on tokio's paused clock; what needs
//! a real server stays in `tests/` against PostgreSQL.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_postgres::NoTls;

use crate::connect::{Connect, Opened};
use crate::pinning::PinRules;
use crate::pool::Pool;
use crate::wire::{Observed, Wire};

/// Opens in-memory connections. Faults: `refuse` fails a connect at once, `hang` leaves a
/// startup unanswered (the connect waits for its bound), `silent` leaves every request of the
/// connections opened from then on unanswered.
#[derive(Default)]
pub(crate) struct Memory {
    pub(crate) refuse: AtomicBool,
    pub(crate) hang: AtomicBool,
    pub(crate) silent: AtomicBool,
    /// Connections the server has served, closed or not.
    pub(crate) accepted: AtomicUsize,
}

#[async_trait::async_trait]
impl Connect for Memory {
    async fn connect(
        &self,
        config: &tokio_postgres::Config,
        rules: PinRules,
    ) -> Result<Opened, tokio_postgres::Error> {
        if self.refuse.load(SeqCst) {
            let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
            return Err(crate::plain::io_error(refused).await);
        }
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        self.accepted.fetch_add(1, SeqCst);
        tokio::spawn(serve(
            server_end,
            self.hang.load(SeqCst),
            self.silent.load(SeqCst),
        ));
        let wire = Wire::new(rules);
        let (client, connection) = config
            .connect_raw(Observed::new(client_end, wire.clone()), NoTls)
            .await?;
        Ok(Opened {
            client,
            connection: Box::pin(connection),
            wire,
        })
    }

    fn tls(&self) -> bool {
        false
    }
}

/// The server side of one connection: a trusting login, then ReadyForQuery for every Sync
/// and an empty result for every simple query, until Terminate or the client's end closes.
async fn serve(mut s: DuplexStream, hang: bool, silent: bool) -> io::Result<()> {
    let mut buf = BytesMut::new();
    // Startup: a length, then the body.
    while buf.len() < 4 || buf.len() < (&buf[..4]).get_u32() as usize {
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
    let len = (&buf[..4]).get_u32() as usize;
    buf.advance(len);
    if hang {
        // Never answers; holds the socket open until the client gives up.
        while s.read_buf(&mut buf).await? > 0 {}
        return Ok(());
    }
    let mut out = BytesMut::new();
    message(&mut out, b'R', &0u32.to_be_bytes()); // AuthenticationOk
    message(&mut out, b'K', &[0, 0, 0, 1, 0, 0, 0, 2]); // BackendKeyData
    message(&mut out, b'Z', b"I");
    s.write_all(&out).await?;
    loop {
        while buf.len() >= 5 && buf.len() > (&buf[1..5]).get_u32() as usize {
            let tag = buf[0];
            let len = (&buf[1..5]).get_u32() as usize;
            buf.advance(1 + len);
            let mut out = BytesMut::new();
            match tag {
                b'X' => return Ok(()),
                _ if silent => {}
                b'S' => message(&mut out, b'Z', b"I"),
                b'Q' => {
                    message(&mut out, b'I', b""); // EmptyQueryResponse
                    message(&mut out, b'Z', b"I");
                }
                // Not part of the pool's own traffic: the test asked for too much.
                _ => {
                    return Err(io::Error::other(
                        "the in-memory server speaks Sync and Query",
                    ));
                }
            }
            s.write_all(&out).await?;
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

fn message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32(4 + body.len() as u32);
    out.put_slice(body);
}

/// A pool of `builder`'s settings whose connections are in memory.
pub(crate) fn pool(builder: crate::Builder) -> (Pool, Arc<Memory>) {
    let memory = Arc::new(Memory::default());
    let pool = builder.build().expect("valid settings");
    (pool.with_connector(memory.clone()), memory)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use tokio::time::Instant;

    use super::pool;
    use crate::{Error, Phase, Pool, PooledClient, TimeoutCause};

    fn builder() -> crate::Builder {
        Pool::builder("postgres://memory@localhost/memory")
    }

    /// The pool's invariants, at any moment: what is idle and what is in use are each counted
    /// in `size`, which never passes `max_size`.
    fn assert_invariants(pool: &Pool) {
        let s = pool.status();
        assert!(s.idle + s.in_use <= s.size, "{s:?}");
        assert!(s.size <= s.max_size, "{s:?}");
    }

    /// Everything is back: nothing in use, nobody waiting, every open connection idle.
    fn assert_at_rest(pool: &Pool) {
        let s = pool.status();
        assert_eq!((s.in_use, s.waiters), (0, 0), "{s:?}");
        assert_eq!(s.idle, s.size, "{s:?}");
    }

    #[tokio::test]
    async fn a_returned_connection_is_handed_out_again() {
        let (pool, memory) = pool(builder());
        for _ in 0..100 {
            let c = pool.get().await.unwrap();
            assert_invariants(&pool);
            drop(c);
        }
        assert_eq!(pool.status().opened, 1);
        assert_eq!(memory.accepted.load(SeqCst), 1);
        assert_at_rest(&pool);
    }

    #[tokio::test]
    async fn waiters_are_served_in_the_order_they_came() {
        let (pool, _) = pool(builder().max_size(1));
        let held = pool.get().await.unwrap();
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..4 {
            let (p, order) = (pool.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let c = p.get().await.unwrap();
                order.lock().unwrap().push(i);
                tokio::task::yield_now().await;
                drop(c);
            }));
            // Each waiter queues before the next is spawned.
            while pool.status().waiters < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
        assert_at_rest(&pool);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_at_acquire_timeout_exactly() {
        let (pool, _) = pool(
            builder()
                .max_size(1)
                .acquire_timeout(Duration::from_secs(2)),
        );
        let _held = pool.get().await.unwrap();
        let start = Instant::now();
        let err = pool.get().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Timeout {
                    phase: Phase::Acquire,
                    cause: TimeoutCause::Configured,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(pool.status().waiters, 0);
        assert_invariants(&pool);
    }

    #[tokio::test]
    async fn a_get_dropped_while_waiting_leaves_nothing_behind() {
        let (pool, _) = pool(builder().max_size(1));
        let held = pool.get().await.unwrap();
        {
            let mut waiting = std::pin::pin!(pool.get());
            let polled = std::future::poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
            assert_eq!(pool.status().waiters, 1);
        }
        assert_eq!(pool.status().waiters, 0);
        drop(held);
        // The slot went to nobody: the next caller has it at once.
        let c = tokio::time::timeout(Duration::from_millis(100), pool.get())
            .await
            .expect("not given to the dropped waiter")
            .unwrap();
        drop(c);
        assert_at_rest(&pool);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_that_hangs_fails_at_connect_timeout_and_gives_back_its_place() {
        let (pool, memory) = pool(builder().connect_timeout(Duration::from_secs(1)));
        memory.hang.store(true, SeqCst);
        let start = Instant::now();
        let err = pool.get().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Timeout {
                    phase: Phase::Connect,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(pool.status().size, 0);
        // Dropped mid-connect instead: its place is given back too.
        let dropped = tokio::time::timeout(Duration::from_millis(300), pool.get()).await;
        assert!(dropped.is_err());
        assert_eq!(pool.status().size, 0);
        memory.hang.store(false, SeqCst);
        drop(pool.get().await.unwrap());
        assert_eq!(pool.status().size, 1);
        assert_at_rest(&pool);
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_of_the_connect_phase() {
        let (pool, memory) = pool(builder());
        memory.refuse.store(true, SeqCst);
        let err = pool.get().await.unwrap_err();
        assert_eq!(err.phase(), Some(Phase::Connect), "{err:?}");
        assert_eq!(pool.status().size, 0);
        memory.refuse.store(false, SeqCst);
        drop(pool.get().await.unwrap());
        assert_at_rest(&pool);
    }

    #[tokio::test(start_paused = true)]
    async fn a_freeze_check_closes_a_silent_idle_connection_and_the_invocation_connects_afresh() {
        // Idleness is measured by the wall clock, which the paused clock does not move: every
        // idle connection counts as idle long enough here. Without a patience the check's whole
        // bound passes; with one, a fresh connection is opened once it has passed, and the
        // silent connection is closed as soon as that one is ready (here at once).
        for (patience, took) in [
            (None, Duration::from_secs(1)),
            (Some(Duration::from_millis(25)), Duration::from_millis(25)),
        ] {
            let (pool, memory) = pool(
                builder()
                    .validate_idle_after(Some(Duration::ZERO))
                    .validate_timeout(Duration::from_secs(1))
                    .validate_patience(patience),
            );
            memory.silent.store(true, SeqCst);
            drop(pool.get().await.unwrap()); // opened silent: it answers nothing from now on
            memory.silent.store(false, SeqCst);
            let start = Instant::now();
            let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
            let checked = pool
                .invocation(deadline, async {
                    let c = pool.get().await?;
                    c.check_connection().await
                })
                .await;
            checked.unwrap();
            assert_eq!(start.elapsed(), took, "patience {patience:?}");
            let s = pool.status();
            assert_eq!(s.closed.get(crate::CloseReason::Stale), 1, "{s:?}");
            assert_eq!(s.opened, 2, "{s:?}");
            assert_at_rest(&pool);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_beside_a_healthy_one_costs_the_patience_in_a_full_pool() {
        // max_size connections idle, one silent: no slot is free for a spare, but the healthy
        // one answered and is ready to serve. The silent one's whole bound must not pass.
        let (pool, memory) = pool(
            builder()
                .max_size(2)
                .validate_idle_after(Some(Duration::ZERO))
                .validate_timeout(Duration::from_secs(1)),
        );
        memory.silent.store(true, SeqCst);
        let silent = pool.get().await.unwrap();
        memory.silent.store(false, SeqCst);
        let healthy = pool.get().await.unwrap();
        drop((silent, healthy));
        let start = Instant::now();
        let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
        pool.invocation(deadline, async {
            let c = pool.get().await?;
            c.check_connection().await
        })
        .await
        .unwrap();
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
        let s = pool.status();
        assert_eq!(s.closed.get(crate::CloseReason::Stale), 1, "{s:?}");
        assert_invariants(&pool);
        assert_at_rest(&pool);
    }

    #[tokio::test(start_paused = true)]
    async fn an_invocation_dropped_anywhere_in_the_spare_race_leaves_the_pool_whole() {
        // A silent and a healthy idle connection, a free slot: the spare is opened after the
        // patience. Dropped after any number of steps (before the spare, during its connect,
        // after it), the invocation leaves every slot and count right.
        // With two slots no spare can open: the race ends when the healthy one is idle.
        for (max, steps) in [2, 3]
            .into_iter()
            .flat_map(|m| (0..40).map(move |s| (m, s)))
        {
            let (pool, memory) = pool(
                builder()
                    .max_size(max)
                    .validate_idle_after(Some(Duration::ZERO))
                    .validate_timeout(Duration::from_secs(1)),
            );
            memory.silent.store(true, SeqCst);
            let silent = pool.get().await.unwrap();
            memory.silent.store(false, SeqCst);
            let healthy = pool.get().await.unwrap();
            drop((silent, healthy));
            let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
            let mut inv = Box::pin(pool.invocation(deadline, async {
                let c = pool.get().await?;
                c.check_connection().await
            }));
            for _ in 0..steps {
                if poll_once(inv.as_mut()).await.is_ready() {
                    break;
                }
                assert_invariants(&pool);
                tokio::time::advance(Duration::from_millis(2)).await;
            }
            drop(inv);
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            assert_invariants(&pool);
            let s = pool.status();
            assert_eq!(s.idle, s.size, "steps {steps}: {s:?}");
            assert!(s.size <= max, "steps {steps}: {s:?}");
            // Every connection is accounted for: opened = open + closed.
            let closed: u64 = s.closed.total();
            assert_eq!(s.opened, s.size as u64 + closed, "steps {steps}: {s:?}");
        }
    }

    #[tokio::test]
    async fn random_operations_keep_the_invariants() {
        let seed = seed(7);
        let mut rng = StdRng::seed_from_u64(seed);
        let (pool, memory) = pool(
            builder()
                .max_size(3)
                .acquire_timeout(Duration::from_millis(20)),
        );
        let mut held: Vec<PooledClient> = Vec::new();
        for step in 0..2_000 {
            match rng.random_range(0..6) {
                0 | 1 => {
                    // A get that times out, or is dropped mid-way, leaves nothing behind.
                    let got = tokio::time::timeout(Duration::from_millis(5), pool.get()).await;
                    if let Ok(Ok(c)) = got {
                        held.push(c);
                    }
                }
                2 | 3 if !held.is_empty() => {
                    let i = rng.random_range(0..held.len());
                    drop(held.swap_remove(i));
                }
                4 => memory.refuse.store(rng.random_bool(0.3), SeqCst),
                _ if !held.is_empty() => {
                    let i = rng.random_range(0..held.len());
                    held[i].batch_execute("SELECT 1").await.unwrap();
                }
                _ => {}
            }
            let s = pool.status();
            assert!(
                s.idle + s.in_use <= s.size && s.size <= 3,
                "seed {seed}, step {step}: {s:?}"
            );
            assert_eq!(s.in_use, held.len(), "seed {seed}, step {step}: {s:?}");
        }
        held.clear();
        assert_at_rest(&pool);
    }

    #[tokio::test]
    async fn a_returned_connection_goes_to_the_waiter_not_to_a_later_caller() {
        let (pool, _) = pool(builder().max_size(1));
        let held = pool.get().await.unwrap();
        let mut waiter = std::pin::pin!(pool.get());
        assert!(poll_once(waiter.as_mut()).await.is_pending());
        drop(held);
        // Handed over at the return, still in use: a caller coming now waits behind it.
        assert_eq!(pool.status().in_use, 1);
        let mut later = std::pin::pin!(pool.get());
        assert!(poll_once(later.as_mut()).await.is_pending());
        let Poll::Ready(got) = poll_once(waiter.as_mut()).await else {
            panic!("the waiter was handed the connection");
        };
        drop(got.unwrap());
        let Poll::Ready(got) = poll_once(later.as_mut()).await else {
            panic!("then the later caller");
        };
        drop(got.unwrap());
        assert_eq!(pool.status().opened, 1);
        assert_at_rest(&pool);
    }

    #[tokio::test]
    async fn a_waiter_dropped_after_it_was_handed_a_connection_passes_it_on() {
        let (pool, _) = pool(builder().max_size(1));
        let held = pool.get().await.unwrap();
        let mut first = Box::pin(pool.get());
        let mut second = std::pin::pin!(pool.get());
        assert!(poll_once(first.as_mut()).await.is_pending());
        assert!(poll_once(second.as_mut()).await.is_pending());
        drop(held);
        drop(first);
        let Poll::Ready(got) = poll_once(second.as_mut()).await else {
            panic!("the second waiter has it");
        };
        drop(got.unwrap());
        assert_at_rest(&pool);
        // Handed over and dropped with nobody behind: it is idle.
        let held = pool.get().await.unwrap();
        let mut only = Box::pin(pool.get());
        assert!(poll_once(only.as_mut()).await.is_pending());
        drop(held);
        drop(only);
        assert_at_rest(&pool);
        assert_eq!((pool.status().idle, pool.status().opened), (1, 1));
    }

    #[tokio::test]
    async fn close_ends_the_waits() {
        let (pool, _) = pool(builder().max_size(1));
        let held = pool.get().await.unwrap();
        let mut waiter = std::pin::pin!(pool.get());
        assert!(poll_once(waiter.as_mut()).await.is_pending());
        pool.close();
        let Poll::Ready(got) = poll_once(waiter.as_mut()).await else {
            panic!("close ended the wait");
        };
        assert!(matches!(got, Err(Error::Closed)), "{got:?}");
        drop(held);
        let s = pool.status();
        assert_eq!((s.size, s.idle, s.in_use, s.waiters), (0, 0, 0, 0), "{s:?}");
    }

    #[tokio::test]
    async fn connections_handed_over_and_not_taken_are_closed_with_the_pool() {
        let (pool, _) = pool(builder().max_size(2));
        let held = (pool.get().await.unwrap(), pool.get().await.unwrap());
        let mut polled = Box::pin(pool.get());
        let mut dropped = Box::pin(pool.get());
        assert!(poll_once(polled.as_mut()).await.is_pending());
        assert!(poll_once(dropped.as_mut()).await.is_pending());
        drop(held);
        pool.close();
        let Poll::Ready(got) = poll_once(polled.as_mut()).await else {
            panic!("close ended the wait");
        };
        assert!(matches!(got, Err(Error::Closed)), "{got:?}");
        drop(dropped);
        let s = pool.status();
        assert_eq!((s.size, s.idle, s.in_use, s.waiters), (0, 0, 0, 0), "{s:?}");
        assert_eq!(s.closed.get(crate::CloseReason::PoolClosed), 2, "{s:?}");
    }

    #[tokio::test]
    async fn a_waiter_handed_a_slot_before_close_opens_nothing_after_it() {
        let (pool, memory) = pool(
            builder()
                .max_size(1)
                .max_lifetime(Some(Duration::from_nanos(1))),
        );
        let held = pool.get().await.unwrap();
        let mut waiter = Box::pin(pool.get());
        assert!(poll_once(waiter.as_mut()).await.is_pending());
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Past its lifetime: closed, its slot handed to the waiter.
        drop(held);
        pool.close();
        let got = waiter.await;
        assert!(matches!(got, Err(Error::Closed)), "{got:?}");
        assert_eq!(
            memory.accepted.load(SeqCst),
            1,
            "nothing opened after close"
        );
    }

    #[tokio::test]
    async fn warm_up_never_opens_past_max_size() {
        let (pool, _) = pool(builder().max_size(2).min_idle(2));
        let a = pool.get().await.unwrap();
        drop(pool.get().await.unwrap());
        // One idle, one in use: the idle one may go out with the one free slot.
        assert_eq!(pool.warm_up().await.unwrap(), 0);
        assert_invariants(&pool);
        drop(a);
        assert_at_rest(&pool);
    }

    #[tokio::test]
    async fn a_warm_up_across_close_leaves_nothing_idle() {
        let (pool, _) = pool(builder().max_size(1).min_idle(1));
        let (warmed, ()) = tokio::join!(pool.warm_up(), async { pool.close() });
        assert!(matches!(warmed, Ok(0)), "{warmed:?}");
        let s = pool.status();
        assert_eq!((s.size, s.idle), (0, 0), "{s:?}");
    }

    #[tokio::test]
    async fn timeouts_too_long_for_the_clock_bound_nothing_and_panic_nowhere() {
        let (pool, _) = pool(
            builder()
                .max_size(1)
                .min_idle(1)
                .acquire_timeout(Duration::MAX)
                .connect_timeout(Duration::MAX),
        );
        assert_eq!(pool.warm_up_within(Duration::MAX).await, 1);
        let far = std::time::SystemTime::now() + Duration::from_secs(1_000 * 365 * 24 * 3600);
        let held = pool.get_by(far).await.unwrap();
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get().await.map(drop) }
        });
        while pool.status().waiters == 0 && !waiter.is_finished() {
            tokio::task::yield_now().await;
        }
        drop(held);
        waiter.await.expect("the wait did not panic").unwrap();
        assert_at_rest(&pool);
    }

    #[tokio::test]
    async fn a_stale_idle_connection_found_at_once_is_replaced_and_its_slot_kept() {
        let (pool, memory) = pool(
            builder()
                .max_size(1)
                .max_lifetime(Some(Duration::from_millis(1))),
        );
        drop(pool.get().await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The idle one is past its lifetime: closed, and a connect in its slot hangs.
        memory.hang.store(true, SeqCst);
        let mut stale = Box::pin(pool.get());
        assert!(poll_once(stale.as_mut()).await.is_pending());
        let mut waiter = Box::pin(pool.get());
        assert!(poll_once(waiter.as_mut()).await.is_pending());
        let s = pool.status();
        assert_eq!((s.waiters, s.in_use, s.idle, s.size), (1, 0, 0, 1), "{s:?}");
        // Dropped mid-connect: the slot goes to the waiter, which connects.
        memory.hang.store(false, SeqCst);
        drop(stale);
        drop(waiter.await.unwrap());
        let s = pool.status();
        assert_eq!(s.closed.get(crate::CloseReason::MaxLifetime), 1, "{s:?}");
        assert_eq!(s.opened, 2, "{s:?}");
        assert_at_rest(&pool);
    }

    /// Waiters polled by hand, dropped and served in random order: the counts stay right, and
    /// nobody is left waiting while a slot is free (no handoff is lost).
    #[tokio::test]
    async fn random_waiters_and_returns_lose_no_slot() {
        let seed = seed(11);
        let mut rng = StdRng::seed_from_u64(seed);
        let max = 3;
        let (pool, _) = pool(builder().max_size(max));
        type Get<'a> =
            std::pin::Pin<Box<dyn std::future::Future<Output = Result<PooledClient, Error>> + 'a>>;
        let mut waiting: Vec<Get<'_>> = Vec::new();
        let mut held: Vec<PooledClient> = Vec::new();
        for step in 0..3_000 {
            // Several at a time, so a waiter can be handed a connection and dropped before it
            // polls again.
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..5) {
                    0 | 1 => waiting.push(Box::pin(pool.get())),
                    2 if !held.is_empty() => {
                        drop(held.swap_remove(rng.random_range(0..held.len())));
                    }
                    3 if !waiting.is_empty() => {
                        drop(waiting.swap_remove(rng.random_range(0..waiting.len())));
                    }
                    _ => {}
                }
            }
            // Everyone polls, in order, until each one still pending waits for a slot (a
            // connect takes the in-memory server a few turns).
            for _ in 0..100 {
                let mut still = Vec::new();
                for mut w in waiting.drain(..) {
                    match poll_once(w.as_mut()).await {
                        Poll::Ready(got) => held.push(got.unwrap()),
                        Poll::Pending => still.push(w),
                    }
                }
                waiting = still;
                if pool.status().waiters == waiting.len() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let s = pool.status();
            let at = format!("seed {seed}, step {step}: {s:?}");
            assert!(s.idle + s.in_use <= s.size && s.size <= max, "{at}");
            assert_eq!(s.in_use, held.len(), "{at}");
            assert_eq!(s.waiters, waiting.len(), "{at}");
            if !waiting.is_empty() {
                assert_eq!(held.len(), max, "a waiter waits while a slot is free: {at}");
            }
        }
        waiting.clear();
        held.clear();
        assert_at_rest(&pool);
    }

    /// The random tests' seed: `PINPOOL_MEMORY_SEED`, else `default`.
    fn seed(default: u64) -> u64 {
        std::env::var("PINPOOL_MEMORY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    }

    /// Polls once.
    async fn poll_once<F: std::future::Future + ?Sized>(
        mut f: std::pin::Pin<&mut F>,
    ) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
    }

    use std::task::Poll;
}
