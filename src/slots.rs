//! The pool's capacity under one lock: the free slots, the idle connections, and the callers
//! waiting for a slot, each with its bound.
//!
//! A slot is the right to hold a connection outside the idle set; `max_size` exist. Every
//! checked-out connection, every connection being opened or checked, and every pinned
//! connection kept for an invocation holds one. A returned connection goes straight to the
//! first waiter with its slot (a direct handoff: it stays counted in use, and the waiter takes
//! it from its grant without looking in the idle set); only when nobody waits does it join the
//! idle set and its slot become free. A slot freed without a connection (one was closed) goes
//! to the first waiter the same way. Nobody overtakes a waiter: a slot is free only while
//! nobody waits.
//!
//! Every wait is bounded (by `acquire_timeout` and the deadline), without a timer per wait: a
//! tokio timer costs a timer-wheel insertion and removal, about as much as the rest of a queued
//! checkout. A waiter's bound is kept in its queue entry, and one watchdog task per pool sleeps
//! until the earliest bound and wakes the waiters whose bound has passed; they see it and give
//! up. The watchdog starts with the first waiter and ends when it wakes to find nobody waiting;
//! it does nothing else (a frozen Lambda environment leaves it asleep), and it holds the pool
//! only while it looks at the queue. It runs on the runtime of the waiter that started it; if
//! that runtime ends, the waiters still bounded are woken and the next to poll starts another.
//! A pool shared between runtimes where the watchdog's runtime lives on undriven (a sync
//! wrapper's current-thread runtime between two `block_on` calls) leaves the other runtimes'
//! waits unbounded until that runtime runs again or ends: use a pool from one runtime, as a
//! Lambda handler does.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::conn::Conn;
use crate::deadline::Bound;

/// The slots, idle connections and waiters of one pool.
pub(crate) struct Slots {
    core: Mutex<Core>,
    /// The idle set's length, readable without the lock (for gauges).
    idle_count: AtomicUsize,
    /// Connections checked out (or being opened for a checkout, once opened), counted under
    /// the lock wherever a connection moves between idle and in use.
    pub(crate) in_use: AtomicUsize,
    /// `Core::free` as of the last change, readable without the lock: a checkout that will
    /// likely wait reads the clock for its bound before it takes the lock, not under it.
    free_hint: AtomicUsize,
    /// Wakes the watchdog when a waiter's bound comes before the one it sleeps for.
    rearm: Arc<Notify>,
}

/// What the lock guards.
pub(crate) struct Core {
    idle: VecDeque<Conn>,
    /// Slots nobody holds. Nonzero only while nobody waits (but waiters whose bound was seen
    /// to pass, about to leave).
    free: usize,
    closed: bool,
    /// Callers waiting for a slot, oldest first (tickets ascending).
    queue: VecDeque<Waiter>,
    /// What was handed to waiters that have not taken it yet, by ticket.
    granted: Vec<(u64, Grant)>,
    next_ticket: u64,
    /// A watchdog task is running.
    watching: bool,
    /// The bound the watchdog sleeps until.
    armed_for: Option<Instant>,
}

struct Waiter {
    ticket: u64,
    at: Option<Instant>,
    waker: Waker,
    /// Woken for its bound: nothing is handed to it, and the watchdog leaves it alone.
    expired: bool,
}

/// What a waiter is handed: a slot with a connection just returned (still counted in use), or
/// a slot alone (to take an idle connection or open one in).
enum Grant {
    Conn(Conn),
    Slot,
}

/// What a checkout got.
pub(crate) enum Acquired<'a> {
    /// At once: a free slot and the most recently used idle connection, counted in use (with
    /// the new count); the slot is the caller's once it accepts the connection's age.
    Idle(Conn, usize, Permit<'a>),
    /// At once: a free slot, and no idle connection.
    Empty(Permit<'a>),
    /// After a wait of this long: a connection just returned, clean, counted in use; the slot
    /// is the caller's once it accepts the connection (its socket may have closed since).
    HandedOver(Conn, Permit<'a>, Duration),
    /// After a wait of this long: a slot, to take an idle connection or open one in.
    Slot(Permit<'a>, Duration),
    /// The bound passed first.
    TimedOut(Bound),
    /// The pool was closed.
    Closed,
}

/// A slot held outside a checkout (for a connect, or a check of idle connections); freed on
/// drop unless [`forget`](Permit::forget)ten. Never dropped while the lock is held: freeing
/// takes it.
pub(crate) struct Permit<'a> {
    slots: &'a Slots,
    armed: bool,
}

impl Permit<'_> {
    /// The slot passes to a checkout, whose return frees it.
    pub(crate) fn forget(mut self) {
        self.armed = false;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.slots.release();
        }
    }
}

/// The locked core. Every change to the idle set goes through it, so `idle_count` is always
/// its length once the lock is released.
pub(crate) struct Locked<'a> {
    core: MutexGuard<'a, Core>,
    slots: &'a Slots,
}

impl std::ops::Deref for Locked<'_> {
    type Target = VecDeque<Conn>;
    fn deref(&self) -> &VecDeque<Conn> {
        &self.core.idle
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut VecDeque<Conn> {
        &mut self.core.idle
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.slots.idle_count.store(self.core.idle.len(), Relaxed);
    }
}

impl<'a> Locked<'a> {
    /// Takes a free slot, if one is free (then nobody waits); none once closed.
    pub(crate) fn take_free(&mut self) -> Option<Permit<'a>> {
        let core = &mut *self.core;
        if core.closed || core.free == 0 {
            return None;
        }
        core.free -= 1;
        self.slots.free_hint.store(core.free, Relaxed);
        Some(Permit {
            slots: self.slots,
            armed: true,
        })
    }

    /// A free slot to open a connection for the idle set in: only while more slots are free
    /// than connections are idle (each idle one may go out with a free slot), so the open
    /// connections stay within `max_size`.
    pub(crate) fn take_free_to_open(&mut self) -> Option<Permit<'a>> {
        if self.core.free <= self.core.idle.len() {
            return None;
        }
        self.take_free()
    }

    /// Puts a connection in the idle set; `Err` gives it back once the pool is closed.
    pub(crate) fn push_idle(&mut self, conn: Conn) -> Result<(), Conn> {
        if self.core.closed {
            return Err(conn);
        }
        self.core.idle.push_back(conn);
        Ok(())
    }

    /// Callers waiting for a slot now.
    pub(crate) fn waiters(&self) -> usize {
        self.core.queue.len()
    }
}

impl Core {
    /// Hands `grant` to the first waiter whose bound has not been seen to pass, and returns
    /// its waker (to wake once the lock is released). With nobody waiting, the slot is free
    /// again and a connection joins the idle set (leaving the in-use count).
    fn hand_over(&mut self, grant: Grant, slots: &Slots) -> Option<Waker> {
        if let Some(i) = self.queue.iter().position(|w| !w.expired)
            && let Some(w) = self.queue.remove(i)
        {
            self.granted.push((w.ticket, grant));
            return Some(w.waker);
        }
        if let Grant::Conn(conn) = grant {
            slots.in_use.fetch_sub(1, Release);
            self.idle.push_back(conn);
        }
        self.free += 1;
        slots.free_hint.store(self.free, Relaxed);
        None
    }

    fn take_grant(&mut self, ticket: u64) -> Option<Grant> {
        let i = self.granted.iter().position(|(t, _)| *t == ticket)?;
        Some(self.granted.swap_remove(i).1)
    }

    fn queued(&self, ticket: u64) -> Option<usize> {
        self.queue.binary_search_by_key(&ticket, |w| w.ticket).ok()
    }
}

impl Slots {
    pub(crate) fn new(max_size: usize) -> Arc<Slots> {
        Arc::new(Slots {
            core: Mutex::new(Core {
                idle: VecDeque::new(),
                free: max_size,
                closed: false,
                queue: VecDeque::new(),
                granted: Vec::new(),
                next_ticket: 0,
                watching: false,
                armed_for: None,
            }),
            idle_count: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
            free_hint: AtomicUsize::new(max_size),
            rearm: Arc::default(),
        })
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        // Nothing panics while holding it; a poisoned lock still holds consistent data.
        crate::sync::lock(&self.core)
    }

    /// The idle set and the slots, locked.
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked {
            core: self.core(),
            slots: self,
        }
    }

    /// The idle set's length as of the last release of the lock.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle_count.load(Relaxed)
    }

    /// A checked-out connection comes back clean: to the first waiter, or to the idle set
    /// (then it leaves the in-use count and its slot is free). Returns the in-use count and
    /// the idle set's length; `Err` gives it back when the pool was closed meanwhile (the
    /// caller closes it and frees its slot).
    pub(crate) fn give_back(&self, conn: Conn) -> Result<(usize, usize), Conn> {
        let mut core = self.core();
        if core.closed {
            return Err(conn);
        }
        let waker = core.hand_over(Grant::Conn(conn), self);
        let counts = (self.in_use.load(Relaxed), core.idle.len());
        self.idle_count.store(counts.1, Relaxed);
        drop(core);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(counts)
    }

    /// Frees a slot whose connection is gone (closed, or never opened): to the first waiter,
    /// or free.
    pub(crate) fn release(&self) {
        let waker = self.core().hand_over(Grant::Slot, self);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Refuses every later slot and ends every wait (each ends `Closed`, also one handed
    /// something it has not taken yet); returns the idle connections and the ones handed over
    /// and not taken (out of the in-use count), for the caller to close.
    pub(crate) fn close(&self) -> Vec<Conn> {
        let (wakers, conns): (Vec<Waker>, Vec<Conn>) = {
            let mut locked = self.lock();
            locked.core.closed = true;
            let wakers = locked.core.queue.drain(..).map(|w| w.waker).collect();
            let mut conns: Vec<Conn> = locked.drain(..).collect();
            // Their waiters were woken when they were handed these; they find them gone.
            let granted = std::mem::take(&mut locked.core.granted);
            for (_, grant) in granted {
                if let Grant::Conn(conn) = grant {
                    self.in_use.fetch_sub(1, Release);
                    conns.push(conn);
                }
                // Its slot is free (for the count; a closed pool lends none).
                locked.core.free += 1;
            }
            self.free_hint.store(locked.core.free, Relaxed);
            (wakers, conns)
        };
        for w in wakers {
            w.wake();
        }
        conns
    }

    /// A slot: at once if one is free (with the most recently used idle connection, if any;
    /// one lock, no clock read), else after a wait bounded by `timeout` and `cut` (forever
    /// when both are `None`), served in order, each waiter after the ones that came before
    /// it. Cancel safe: dropped, it leaves the queue, and what was handed to it and not taken
    /// goes to the next waiter.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        timeout: Option<Duration>,
        cut: Option<Instant>,
    ) -> Acquire<'_> {
        Acquire {
            slots: self,
            timeout,
            cut,
            since: None,
            bound: None,
            state: WaitState::New,
        }
    }

    /// The permit of a slot just taken for the caller.
    fn held(&self) -> Permit<'_> {
        Permit {
            slots: self,
            armed: true,
        }
    }

    /// Starts or rearms the watchdog for a waiter's bound `at`. The guard exists before the
    /// task does: a task dropped before its first poll (its runtime ended first), or a spawn
    /// that panics (no runtime), still marks the watchdog gone.
    fn arm(self: &Arc<Self>, mut core: MutexGuard<'_, Core>, at: Instant) {
        if !core.watching {
            core.watching = true;
            core.armed_for = Some(at);
            drop(core);
            let on_drop = Watching {
                slots: Arc::downgrade(self),
                armed: true,
            };
            tokio::spawn(watchdog(on_drop, self.rearm.clone()));
        } else if core.armed_for.is_none_or(|armed| at < armed) {
            core.armed_for = Some(at);
            drop(core);
            self.rearm.notify_one();
        }
    }
}

enum WaitState {
    New,
    Queued(u64),
    Done,
}

/// A checkout's wait for a slot ([`Slots::acquire`]).
pub(crate) struct Acquire<'a> {
    slots: &'a Arc<Slots>,
    timeout: Option<Duration>,
    cut: Option<Instant>,
    /// When it started to wait, and until when, from one clock read as it queued (the
    /// checkouts that find a free slot read no clock here).
    since: Option<Instant>,
    bound: Option<Bound>,
    state: WaitState,
}

impl<'a> Future for Acquire<'a> {
    type Output = Acquired<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Acquired<'a>> {
        let this = self.get_mut();
        // Before the lock: a panic under it would poison it.
        let queued = match this.state {
            WaitState::Done => panic!("a slot wait polled after it ended"),
            WaitState::New => None,
            WaitState::Queued(ticket) => Some(ticket),
        };
        // Likely to wait: the clock is read before the lock is taken.
        let early = queued.is_none()
            && this.slots.free_hint.load(Relaxed) == 0
            && (this.timeout.is_some() || this.cut.is_some());
        let early = early.then(Instant::now);
        let core = this.slots.core();
        let polled = match queued {
            None => this.first(core, early, cx),
            Some(ticket) => this.again(core, ticket, cx),
        };
        if polled.is_ready() {
            this.state = WaitState::Done;
        }
        polled
    }
}

impl<'a> Acquire<'a> {
    /// The first poll: a free slot at once, or a place in the queue. `early`: the clock, if
    /// it was read before the lock.
    fn first(
        &mut self,
        mut core: MutexGuard<'a, Core>,
        early: Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<Acquired<'a>> {
        let slots = self.slots;
        if core.closed {
            return Poll::Ready(Acquired::Closed);
        }
        // Free only while nobody waits: nobody is overtaken.
        if core.free > 0 {
            core.free -= 1;
            slots.free_hint.store(core.free, Relaxed);
            let permit = slots.held();
            let idle = core.idle.pop_back();
            slots.idle_count.store(core.idle.len(), Relaxed);
            return Poll::Ready(match idle {
                Some(conn) => {
                    let in_use = slots.in_use.fetch_add(1, Release) + 1;
                    Acquired::Idle(conn, in_use, permit)
                }
                None => Acquired::Empty(permit),
            });
        }
        let now = early.unwrap_or_else(Instant::now);
        self.since = Some(now);
        self.bound = Bound::starting(now, self.timeout, self.cut);
        // A cutoff that passed since the caller looked: no wait at all.
        if let Some(b) = self.bound.filter(Bound::passed) {
            return Poll::Ready(Acquired::TimedOut(b));
        }
        let ticket = core.next_ticket;
        core.next_ticket += 1;
        let at = self.bound.map(|b| b.at);
        core.queue.push_back(Waiter {
            ticket,
            at,
            waker: cx.waker().clone(),
            expired: false,
        });
        // Queued before anything can panic: dropped (or unwound), it leaves the queue.
        self.state = WaitState::Queued(ticket);
        if let Some(at) = at {
            slots.arm(core, at);
        }
        Poll::Pending
    }

    /// A later poll of the waiter `ticket`: what it was handed, or its bound, or the close.
    fn again(
        &mut self,
        mut core: MutexGuard<'a, Core>,
        ticket: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Acquired<'a>> {
        let slots = self.slots;
        if let Some(grant) = core.take_grant(ticket) {
            drop(core);
            let waited = self.since.map(|t| t.elapsed()).unwrap_or_default();
            return Poll::Ready(match grant {
                Grant::Conn(conn) => Acquired::HandedOver(conn, slots.held(), waited),
                Grant::Slot => Acquired::Slot(slots.held(), waited),
            });
        }
        // Neither handed anything nor queued: `close` took it out.
        let Some(i) = core.queued(ticket) else {
            return Poll::Ready(Acquired::Closed);
        };
        // The bound was computed as it queued: only a wakeup reads the clock again.
        let w = &mut core.queue[i];
        if let Some(b) = self.bound
            && (w.expired || Instant::now() >= b.at)
        {
            core.queue.remove(i);
            return Poll::Ready(Acquired::TimedOut(b));
        }
        if !w.waker.will_wake(cx.waker()) {
            w.waker = cx.waker().clone();
        }
        // The watchdog went with its runtime: this waiter's runtime runs the next one.
        if let Some(b) = self.bound
            && !core.watching
        {
            slots.arm(core, b.at);
        }
        Poll::Pending
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        let WaitState::Queued(ticket) = self.state else {
            return;
        };
        let mut core = self.slots.core();
        let waker = match core.take_grant(ticket) {
            // Handed over and never taken: it goes on to the next waiter.
            Some(grant) => core.hand_over(grant, self.slots),
            None => {
                if let Some(i) = core.queued(ticket) {
                    core.queue.remove(i);
                }
                None
            }
        };
        self.slots.idle_count.store(core.idle.len(), Relaxed);
        drop(core);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Wakes waiters whose bound has passed; ends when it wakes and no waiter is left to watch,
/// or when the pool is gone.
async fn watchdog(mut on_drop: Watching, rearm: Arc<Notify>) {
    // If the runtime shuts down under it (a pool used from several runtimes, as tests do),
    // `on_drop` wakes the waiters still bounded, and the next one to poll starts a new one.
    let slots = on_drop.slots.clone();
    loop {
        let Some(held) = slots.upgrade() else {
            on_drop.armed = false;
            return;
        };
        let mut expired = Vec::new();
        let next = {
            let mut core = held.core();
            let now = Instant::now();
            let mut earliest: Option<Instant> = None;
            for w in core.queue.iter_mut().filter(|w| !w.expired) {
                let Some(at) = w.at else { continue };
                if at <= now {
                    w.expired = true;
                    expired.push(w.waker.clone());
                } else if earliest.is_none_or(|t| at < t) {
                    earliest = Some(at);
                }
            }
            core.armed_for = earliest;
            if earliest.is_none() {
                core.watching = false;
                on_drop.armed = false;
            }
            earliest
        };
        drop(held);
        for w in expired {
            w.wake();
        }
        let Some(next) = next else {
            return;
        };
        let rearmed = rearm.notified();
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = rearmed => {}
        }
    }
}

/// Marks the watchdog gone when its task is dropped before it ended by itself.
struct Watching {
    slots: Weak<Slots>,
    armed: bool,
}

impl Drop for Watching {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(slots) = self.slots.upgrade() else {
            return;
        };
        let wakers: Vec<Waker> = {
            let mut core = slots.core();
            core.watching = false;
            core.armed_for = None;
            core.queue
                .iter()
                .filter(|w| w.at.is_some() && !w.expired)
                .map(|w| w.waker.clone())
                .collect()
        };
        for w in wakers {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    fn watching(slots: &Slots) -> bool {
        slots.core().watching
    }

    fn at_rest(slots: &Slots) -> bool {
        let core = slots.core();
        core.queue.is_empty() && core.granted.is_empty()
    }

    /// Polls once; `None` when pending.
    async fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut *f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }

    // The tests on a paused clock involve only tokio's timers: their waits end at their
    // bounds exactly, whatever the machine's load.
    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_bound_and_leaves_nothing_behind() {
        let slots = Slots::new(0);
        let start = Instant::now();
        let late = slots.acquire(Some(Duration::from_millis(300)), None);
        let early = slots.acquire(Some(Duration::from_millis(50)), None);
        let (late, early) = tokio::join!(late, early);
        assert!(matches!(late, Acquired::TimedOut(_)) && matches!(early, Acquired::TimedOut(_)));
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(at_rest(&slots));
        assert_eq!(slots.core().free, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_bound_rearms_the_watchdog() {
        let slots = Slots::new(0);
        let start = Instant::now();
        // The watchdog sleeps for the 10 s bound when the 50 ms one arrives.
        let mut long = slots.acquire(Some(Duration::from_secs(10)), None);
        assert!(poll_once(&mut long).await.is_none());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = slots.acquire(Some(Duration::from_millis(50)), None).await;
        assert!(matches!(r, Acquired::TimedOut(_)));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "rearmed, not 10 s"
        );
        drop(long);
        assert!(at_rest(&slots));
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_first_waiter_and_a_dropped_grant_to_the_next() {
        let slots = Slots::new(0);
        let at = Some(Duration::from_secs(10));
        let mut first = slots.acquire(at, None);
        let mut second = slots.acquire(at, None);
        let mut third = slots.acquire(at, None);
        for w in [&mut first, &mut second, &mut third] {
            assert!(poll_once(w).await.is_none());
        }
        slots.release();
        // Handed to the first; a caller arriving now finds nothing free.
        let taken = slots.lock().take_free();
        assert!(taken.is_none());
        assert_eq!(slots.lock().waiters(), 2);
        // The first is dropped before it took it: the second has it, the third still waits.
        drop(first);
        let got = poll_once(&mut second).await;
        assert!(matches!(got, Some(Acquired::Slot(..))));
        assert!(poll_once(&mut third).await.is_none());
        // The second's permit, dropped, passes to the third.
        drop(got);
        assert!(matches!(
            poll_once(&mut third).await,
            Some(Acquired::Slot(..))
        ));
        assert!(at_rest(&slots));
        // The third's permit, dropped with nobody waiting, is free.
        assert_eq!(slots.core().free, 1);
        let taken = slots.lock().take_free();
        assert!(taken.is_some());
        drop(taken);
        assert_eq!(slots.core().free, 1, "a dropped permit frees its slot");
    }

    #[tokio::test]
    async fn close_ends_every_wait() {
        let slots = Slots::new(0);
        let mut unbounded = slots.acquire(None, None);
        let mut bounded = slots.acquire(Some(Duration::from_secs(10)), None);
        assert!(poll_once(&mut unbounded).await.is_none());
        assert!(poll_once(&mut bounded).await.is_none());
        assert!(slots.close().is_empty());
        assert!(matches!(unbounded.await, Acquired::Closed));
        assert!(matches!(bounded.await, Acquired::Closed));
        assert!(matches!(slots.acquire(None, None).await, Acquired::Closed));
        slots.release();
        let taken = slots.lock().take_free();
        assert!(taken.is_none(), "closed: no slot is taken");
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_ends_once_nobody_waits() {
        let slots = Slots::new(0);
        let at = Some(Duration::from_millis(300));
        let got = tokio::join!(slots.acquire(at, None), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            slots.release();
        })
        .0;
        assert!(matches!(got, Acquired::Slot(..)));
        assert!(watching(&slots), "it sleeps until the bound");
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while watching(&slots) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(ended.is_ok(), "the watchdog ended after the bound");
    }

    #[tokio::test]
    async fn the_watchdog_does_not_keep_the_pool() {
        let slots = Slots::new(0);
        let mut w = slots.acquire(Some(Duration::from_secs(60)), None);
        assert!(poll_once(&mut w).await.is_none());
        drop(w);
        let weak = Arc::downgrade(&slots);
        drop(slots);
        assert!(
            weak.upgrade().is_none(),
            "a sleeping watchdog holds only a weak reference"
        );
    }

    #[test]
    fn a_runtime_that_shuts_down_takes_its_watchdog_but_not_the_next_ones() {
        let slots = Slots::new(0);
        let first = runtime();
        first.block_on(async {
            // Queued, watchdog started; then the runtime goes away with both.
            let w = tokio::spawn({
                let slots = slots.clone();
                async move {
                    let at = Some(Duration::from_secs(60));
                    !matches!(slots.acquire(at, None).await, Acquired::TimedOut(_))
                }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!w.is_finished());
        });
        drop(first);
        assert!(!watching(&slots));
        let second = runtime();
        let timed_out = second.block_on(woken_by_its_bound(&slots, Duration::from_millis(50)));
        assert!(timed_out, "the bound held in the second runtime");
    }

    /// A runtime of its own, for the tests of what outlives one.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Waits until `bound`; true if the wait ended with its bound, woken for it. Not inside a
    /// `timeout`: that would poll the wait when it fires, and the wait would read the clock
    /// itself and end, watchdog or not.
    async fn woken_by_its_bound(slots: &Arc<Slots>, bound: Duration) -> bool {
        tokio::select! {
            biased;
            () = tokio::time::sleep(bound * 20) => false,
            w = slots.acquire(Some(bound), None) => matches!(w, Acquired::TimedOut(_)),
        }
    }

    #[test]
    fn a_watchdog_dropped_before_its_first_poll_stops_no_later_bound() {
        let slots = Slots::new(0);
        let first = runtime();
        first.block_on(async {
            // Queues and spawns the watchdog; the block_on ends before the watchdog runs.
            let mut w = slots.acquire(Some(Duration::from_secs(60)), None);
            assert!(poll_once(&mut w).await.is_none());
        });
        drop(first);
        assert!(!watching(&slots));
        let second = runtime();
        let timed_out = second.block_on(woken_by_its_bound(&slots, Duration::from_millis(50)));
        assert!(timed_out, "the 50 ms bound was enforced");
    }

    #[test]
    fn a_waiter_outlives_the_runtime_of_the_watchdog() {
        let slots = Slots::new(0);
        let first = runtime();
        let other = first.block_on(async {
            let mut w = slots.acquire(Some(Duration::from_secs(60)), None);
            assert!(poll_once(&mut w).await.is_none());
            // The watchdog runs here, in this runtime.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let other = std::thread::spawn({
                let slots = slots.clone();
                move || runtime().block_on(woken_by_its_bound(&slots, Duration::from_millis(200)))
            });
            while slots.core().queue.len() < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drop(w);
            other
        });
        // Takes the watchdog with it, while the other runtime's waiter waits.
        drop(first);
        assert!(
            other.join().unwrap(),
            "the other runtime's waiter ended at its bound"
        );
    }

    #[tokio::test]
    async fn a_poll_after_ready_panics_without_poisoning_the_lock() {
        let slots = Slots::new(1);
        let mut w = slots.acquire(None, None);
        let got = poll_once(&mut w).await;
        assert!(matches!(got, Some(Acquired::Empty(_))));
        drop(got);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = Pin::new(&mut w).poll(&mut Context::from_waker(Waker::noop()));
        }));
        assert!(r.is_err(), "polled after Ready: panics by design");
        assert!(
            !slots.core.is_poisoned(),
            "the panic came with the lock held"
        );
    }

    #[test]
    fn a_panic_while_queueing_leaves_nothing_queued() {
        let slots = Slots::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut w = Box::pin(slots.acquire(Some(Duration::from_secs(60)), None));
            // Outside a runtime, spawning the watchdog panics.
            let _ = w.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        }));
        assert!(r.is_err(), "tokio::spawn outside a runtime panics");
        assert!(at_rest(&slots), "nothing is left queued");
        assert!(!watching(&slots), "no watchdog is thought to run");
    }
}
