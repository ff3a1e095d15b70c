//! One pooled connection: the tokio-postgres client, the task that drives its socket, and the
//! state that decides whether it may go back to the pool.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst, fence,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::task::AbortHandle;
use tokio::time::Sleep;
use tokio_postgres::Client;

use crate::cache::StatementCache;
use crate::config::{PinPolicy, Settings};
use crate::connect::{ConnectionFuture, Opened};
use crate::deadline::{Bound, until};
use crate::error::Phase;
use crate::pinning::Reasons;
use crate::status::CloseReason;
use crate::wire::{Facts, TxnStatus, Wire};

/// The connection task's future, held where [`ConnState::kill`] can drop it synchronously:
/// dropping a `Client` with a request pending does not close the socket, dropping this does.
struct TaskSlot {
    fut: Mutex<Option<ConnectionFuture>>,
    abort: OnceLock<AbortHandle>,
    wire: Arc<Wire>,
}

/// Spawns the task that drives a connection's socket. The task ends when the server closes
/// the connection, when [`ConnState::kill`] drops the future, or when a request written on it
/// outlives its bound ([`Wire::due`]: whatever API wrote it, the driver's own client
/// included); either way `wire` learns it, so nobody waits for a ReadyForQuery that cannot
/// come. The task's own future may also be
/// dropped without ever finishing: its runtime shut down (a pool kept in a `static` and used
/// from one runtime after another), or it panicked. Then [`TaskGone`] drops the connection
/// future with it, which closes the client: nobody is handed a connection that no task
/// drives, whose statements would hang to their bound.
fn spawn_connection(connection: ConnectionFuture, id: u64, wire: Arc<Wire>) -> Arc<TaskSlot> {
    let slot = Arc::new(TaskSlot {
        fut: Mutex::new(Some(connection)),
        abort: OnceLock::new(),
        wire,
    });
    let polled = TaskGone(slot.clone());
    // Armed at the earliest bound of a request in flight; left armed when that request is
    // answered (a timer reset per request would cost more than a spurious wake-up later).
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let handle = tokio::spawn(poll_fn(move |cx| {
        let polled = &polled.0;
        let mut fut = crate::sync::lock(&polled.fut);
        let Some(f) = fut.as_mut() else {
            return Poll::Ready(());
        };
        match f.as_mut().poll(cx) {
            Poll::Pending => {
                if !bound_passed(&polled.wire, &mut timer, cx) {
                    return Poll::Pending;
                }
                *fut = None;
                let cause = polled.wire.expire();
                crate::metrics::timeout(Phase::Query, cause);
                tracing::warn!(
                    connection = id,
                    cause = cause.as_str(),
                    "pinpool: a request outlived its bound; the socket was closed"
                );
            }
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!(connection = id, error = %e, "pinpool: connection ended with an error");
                }
                *fut = None;
            }
        }
        polled.wire.end();
        Poll::Ready(())
    }));
    let _ = slot.abort.set(handle.abort_handle());
    slot
}

/// True once the earliest bound of the requests in flight on `wire` has passed; otherwise
/// arms `timer` to wake the connection task by then.
fn bound_passed(wire: &Wire, timer: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    let Some(due) = wire.due() else {
        return false;
    };
    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
    if sleep.deadline() > due {
        sleep.as_mut().reset(due);
    }
    loop {
        if sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        if sleep.deadline() >= due {
            return true;
        }
        // An earlier request's bound, answered since.
        sleep.as_mut().reset(due);
    }
}

/// Owned by the connection task's future: when that future is dropped, however (finished,
/// aborted, its runtime shut down, a panic), the connection future goes too, which closes
/// the socket and the client's channel (`Client::is_closed`), and the wire learns it.
struct TaskGone(Arc<TaskSlot>);

impl Drop for TaskGone {
    fn drop(&mut self) {
        // Taken under the lock, dropped outside it; `None` when the task finished or
        // `close_socket` took it first.
        let fut = crate::sync::lock(&self.0.fut).take();
        drop(fut);
        self.0.wire.end();
    }
}

const TXN_OBJECT: u8 = 1; // a pinpool Transaction is alive (cleared by its drop)
const KILLED: u8 = 2; // the socket was closed by pinpool after a timeout
const BROKEN: u8 = 4; // the socket was closed by pinpool after a fatal error
const ROLLBACK_QUEUED: u8 = 8; // a dropped transaction queued a ROLLBACK not yet known sent
const RAW_USED: u8 = 16; // raw access was handed out: a request may wait unseen in the queue
const STATEMENT_LENT: u8 = 32; // a Statement of this connection was handed out in this checkout
/// Requests may wait in the client's queue, not yet written: a round trip settles them.
const UNSETTLED: u8 = ROLLBACK_QUEUED | RAW_USED;

/// What a connection's holder updates through `&self`, beside the facts its [`Wire`] reads
/// off the protocol; atomics so clients and their futures are `Sync`/`Send`. Only the one
/// holder of the connection touches it, so `Relaxed` suffices.
pub(crate) struct ConnState {
    pub(crate) id: u64,
    /// Statements, streams and copies started and not finished. A future dropped mid-way
    /// leaves its count here, so the connection is closed on return.
    in_flight: AtomicU32,
    /// A shape is being learned in a transaction of its own ([`ConnState::begin_learning`]):
    /// no other call may start, or it would run inside that transaction.
    learning: AtomicBool,
    /// Wakes the calls that wait for a learning to end.
    learned: tokio::sync::Notify,
    /// Wakes the learner that waits for the calls in flight to be done.
    calls_done: tokio::sync::Notify,
    flags: AtomicU8,
    /// The pin reasons already reported (metrics, logs), of those the wire saw.
    reported: AtomicU32,
    /// The wire's count of requests written when a dropped transaction queued its ROLLBACK:
    /// while nothing more was written, the ROLLBACK still waits ahead of everything else.
    rollback_mark: AtomicU32,
    /// The wire's count of bytes written when the connection was last handed out: while it
    /// still stands, nothing of that checkout was sent (the retry rule, in `client/retry.rs`).
    checkout_mark: AtomicU64,
    /// What the protocol stream says: transaction status, requests waiting, COPY, pins.
    pub(crate) wire: Arc<Wire>,
    task: Arc<TaskSlot>,
    /// Prepared statements of this connection, by SQL; dies with it.
    cache: Mutex<StatementCache>,
}

impl ConnState {
    /// Closes the socket now (synchronously) after a timeout.
    pub(crate) fn kill(&self) {
        self.close_socket(KILLED);
    }

    /// Closes the socket now after an error that ends the session (FATAL, connection lost).
    pub(crate) fn kill_broken(&self) {
        self.close_socket(BROKEN);
    }

    /// Closes the socket now: dropping the connection task's future drops the socket, so the
    /// peer sees the close before this returns, even if the runtime never runs again (a
    /// Lambda freeze right after).
    pub(crate) fn close(&self) {
        self.close_socket(0);
    }

    fn close_socket(&self, flag: u8) {
        self.flags.fetch_or(flag, Relaxed);
        let fut = crate::sync::lock(&self.task.fut).take();
        drop(fut);
        self.wire.end();
        if let Some(abort) = self.task.abort.get() {
            abort.abort();
        }
    }

    /// True once the connection task has ended or its future was dropped: nothing more will be
    /// written on this connection, so its wire's byte count is final. Takes the task's lock,
    /// which the task holds while it polls: a poll that is ending has ended when this returns.
    /// Never called from inside the connection task.
    pub(crate) fn ended(&self) -> bool {
        crate::sync::lock(&self.task.fut).is_none()
    }

    /// The connection is handed out: what was written so far, and the statements handed out
    /// so far, are not this checkout's.
    pub(crate) fn mark_checkout(&self) {
        self.checkout_mark.store(self.wire.written(), Relaxed);
        self.flags.fetch_and(!STATEMENT_LENT, Relaxed);
    }

    /// True while no byte was written since [`mark_checkout`](Self::mark_checkout).
    pub(crate) fn unwritten_since_checkout(&self) -> bool {
        self.wire.written() == self.checkout_mark.load(Relaxed)
    }

    /// A [`Statement`](crate::Statement) of this connection is handed to the caller, who may
    /// keep it for later calls of this checkout: a cache hit writes nothing, so the byte count
    /// alone would not show it.
    pub(crate) fn lend_statement(&self) {
        self.flags.fetch_or(STATEMENT_LENT, Relaxed);
    }

    /// True when a [`Statement`](crate::Statement) was handed out since the checkout.
    pub(crate) fn statement_lent(&self) -> bool {
        self.flags.load(Relaxed) & STATEMENT_LENT != 0
    }

    /// The statement cache, locked (a poisoned lock still holds a consistent cache).
    pub(crate) fn cache(&self) -> std::sync::MutexGuard<'_, StatementCache> {
        crate::sync::lock(&self.cache)
    }

    /// Counts a call in flight, and takes the number of the request it is about to queue.
    pub(crate) fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight {
            state: self,
            request: self.wire.next_request(),
        }
    }

    /// [`ConnState::begin`] for a call where a shape may be learned on this connection in a
    /// transaction of its own (a transaction pooler's profile): waits while one is. The call
    /// is counted before the flag is read and the learner sets the flag before it reads the
    /// count (both with a fence), so one of the two sees the other.
    pub(crate) async fn begin_turn(&self) -> InFlight<'_> {
        loop {
            let ended = self.learned.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            let call = self.begin();
            fence(SeqCst);
            if !self.learning.load(Relaxed) {
                return call;
            }
            call.done();
            ended.await;
        }
    }

    /// Takes this connection for a learning: no call starts until the returned guard drops,
    /// and this waits until the calls already started are done (a call dropped mid-way stays
    /// counted: the caller's bound ends the wait).
    pub(crate) async fn begin_learning(&self) -> Learning<'_> {
        loop {
            let ended = self.learned.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            if !self.learning.swap(true, Relaxed) {
                break;
            }
            ended.await;
        }
        let learning = Learning(self);
        fence(SeqCst);
        loop {
            let done = self.calls_done.notified();
            let mut done = std::pin::pin!(done);
            done.as_mut().enable();
            if self.in_flight.load(Relaxed) == 0 {
                return learning;
            }
            done.await;
        }
    }

    fn set(&self, flag: u8, on: bool) {
        if on {
            self.flags.fetch_or(flag, Relaxed);
        } else {
            self.flags.fetch_and(!flag, Relaxed);
        }
    }

    pub(crate) fn set_txn_object(&self, on: bool) {
        self.set(TXN_OBJECT, on);
    }

    /// A transaction was dropped unfinished: tokio-postgres queued its ROLLBACK.
    pub(crate) fn set_rollback_queued(&self) {
        self.rollback_mark.store(self.wire.sent(), Relaxed);
        self.set(ROLLBACK_QUEUED, true);
    }

    /// True while a dropped transaction's ROLLBACK is queued, or written and still unanswered,
    /// with nothing else written since it was queued: tokio-postgres writes it ahead of any
    /// later request, so the first request written after the mark is the ROLLBACK. Once more
    /// was written, or it was answered, the wire's status is the truth again.
    fn rollback_pending(&self, flags: u8, wire: Facts) -> bool {
        if flags & ROLLBACK_QUEUED == 0 {
            return false;
        }
        match self
            .wire
            .sent()
            .wrapping_sub(self.rollback_mark.load(Relaxed))
        {
            0 => true,
            1 => wire.outstanding() == 1 && !wire.copy_open(),
            _ => false,
        }
    }

    /// After a call whose answer came (a result or the server's error): tokio-postgres hands it
    /// over at its CommandComplete, which a socket read may deliver apart from the
    /// ReadyForQuery behind it. Waits within `bound` for the ReadyForQuery of the call's
    /// request ([`Wire::ready_for`]), unless it arrived already (the common case: nothing to
    /// wait for, no timer made) or the socket was closed, so the connection is found at rest
    /// on return.
    pub(crate) async fn await_ready(&self, request: u32, bound: Option<Bound>) {
        if self.wire.reached(request) || self.flags.load(Relaxed) & KILLED != 0 {
            return;
        }
        let _ = until(bound, self.wire.ready_for(request)).await;
    }

    /// True when raw access was handed out since the last round trip settled it.
    pub(crate) fn raw_used(&self) -> bool {
        self.flags.load(Relaxed) & RAW_USED != 0
    }

    /// Raw access was handed out: what it sends is observed, but a request dropped before
    /// it was written may still wait in the client's queue.
    pub(crate) fn set_raw_used(&self) {
        self.set(RAW_USED, true);
    }

    /// True when requests may wait unwritten in the client's queue (see [`UNSETTLED`]).
    pub(crate) fn unsettled(&self) -> bool {
        self.flags.load(Relaxed) & UNSETTLED != 0
    }

    /// After a round trip: everything queued before it has been written and answered.
    pub(crate) fn settle(&self) {
        self.set(UNSETTLED, false);
    }

    /// True unless the server's last word is that no transaction block is open: a failed
    /// statement there has aborted the transaction, so retrying it is pointless. False too
    /// while a dropped transaction's ROLLBACK waits to run ahead of the next request
    /// ([`ConnState::rollback_pending`]): that request runs outside any transaction, where
    /// the transaction pooler's profile refuses a named statement and learns a shape in a
    /// transaction of its own.
    pub(crate) fn in_transaction(&self) -> bool {
        let wire = self.wire.facts();
        wire.status() != TxnStatus::Idle && !self.rollback_pending(self.flags.load(Relaxed), wire)
    }

    pub(crate) fn pinned(&self) -> Reasons {
        self.wire.pinned()
    }

    pub(crate) fn first_pin(&self) -> Option<String> {
        self.wire.first_pin()
    }

    /// The messages that brought new pin reasons since the last call ([`Wire::take_new_pins`]).
    pub(crate) fn take_new_pins(&self) -> Vec<(Reasons, Box<str>)> {
        self.wire.take_new_pins()
    }

    /// The pin reasons the wire saw that were not reported yet, marked reported now, and
    /// whether any reason had been reported before.
    pub(crate) fn unreported_pins(&self) -> (Reasons, bool) {
        let seen = self.wire.pinned().bits();
        if seen & !self.reported.load(Relaxed) == 0 {
            return (Reasons::EMPTY, true);
        }
        let before = self.reported.fetch_or(seen, Relaxed);
        (Reasons::from_bits(seen & !before), before != 0)
    }

    pub(crate) fn health(&self, closed: bool) -> Health {
        let flags = self.flags.load(Relaxed);
        let wire = self.wire.facts();
        Health {
            killed: flags & KILLED != 0,
            closed: closed || flags & BROKEN != 0 || wire.broken(),
            in_flight: self.in_flight.load(Relaxed),
            txn_object: flags & TXN_OBJECT != 0,
            busy: wire.outstanding() > 0 || wire.copy_open(),
            status: wire.status(),
            rollback_queued: self.rollback_pending(flags, wire),
            pinned: wire.pinned(),
        }
    }
}

/// Counts one statement in flight until [`InFlight::done`]; dropping it without `done` leaves
/// the count, which marks the connection's protocol state unknown.
pub(crate) struct InFlight<'a> {
    state: &'a ConnState,
    /// The number of the call's (first) request on the wire: see [`Wire::ready_for`].
    pub(crate) request: u32,
}

impl InFlight<'_> {
    pub(crate) fn done(self) {
        self.state.in_flight.fetch_sub(1, Relaxed);
        // Paired with the learner's fence: it sees the count go down, or this sees it wait.
        fence(SeqCst);
        if self.state.learning.load(Relaxed) {
            self.state.calls_done.notify_waiters();
        }
    }
}

/// A learning holds the connection ([`ConnState::begin_learning`]) until this drops, however
/// the learning ends.
pub(crate) struct Learning<'a>(&'a ConnState);

impl Drop for Learning<'_> {
    fn drop(&mut self) {
        self.0.learning.store(false, Relaxed);
        self.0.learned.notify_waiters();
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A connection owned by the pool. Boxed: checkouts and returns move it in and out of the idle
/// queue, the client and the invocation's stash, and a pointer moves for free.
pub(crate) struct Conn(Box<ConnData>);

/// What a [`Conn`] holds.
pub(crate) struct ConnData {
    pub(crate) client: Client,
    pub(crate) state: ConnState,
    /// The connection that replaced this one in its checkout, if this one was closed before
    /// anything of the checkout was sent on it (the retry rule in `client/retry.rs`): set once and
    /// never changed, so calls in flight keep their borrow of the connection they started on.
    /// Such a connection never goes back to the pool. The async cell, which lets concurrent
    /// calls wait for one replacement, is allocated at the first retry; a field of its own, so
    /// a transaction can begin on the replacement while its failed first attempt still borrows
    /// the client.
    pub(crate) replacement: OnceLock<Box<tokio::sync::OnceCell<Conn>>>,
    pub(crate) created: SystemTime,
    pub(crate) last_used: SystemTime,
}

impl std::ops::Deref for Conn {
    type Target = ConnData;
    fn deref(&self) -> &ConnData {
        &self.0
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut ConnData {
        &mut self.0
    }
}

impl Conn {
    pub(crate) fn new(
        opened: Opened,
        id: u64,
        query_timeout: Option<Duration>,
        running: &Arc<crate::invocation::Running>,
    ) -> Conn {
        let now = SystemTime::now();
        let Opened {
            client,
            connection,
            wire,
        } = opened;
        wire.set_query_timeout(query_timeout);
        wire.set_running(running.clone());
        let task = spawn_connection(connection, id, wire.clone());
        Conn(Box::new(ConnData {
            client,
            state: ConnState {
                id,
                in_flight: AtomicU32::new(0),
                learning: AtomicBool::new(false),
                learned: tokio::sync::Notify::new(),
                calls_done: tokio::sync::Notify::new(),
                flags: AtomicU8::new(0),
                reported: AtomicU32::new(0),
                rollback_mark: AtomicU32::new(0),
                checkout_mark: AtomicU64::new(0),
                wire,
                task,
                cache: Mutex::new(StatementCache::default()),
            },
            replacement: OnceLock::new(),
            created: now,
            last_used: now,
        }))
    }
}

impl ConnData {
    /// Why this idle connection must not be handed out, if it must not.
    /// `now` is `None` when its age need not be checked.
    pub(crate) fn stale(&self, s: &Settings, now: Option<SystemTime>) -> Option<CloseReason> {
        let health = self.state.health(self.client.is_closed());
        if health.closed || health.killed {
            return Some(CloseReason::Broken);
        }
        let now = now?;
        if exceeded(s.max_lifetime, self.created, now) {
            return Some(CloseReason::MaxLifetime);
        }
        if exceeded(s.idle_timeout, self.last_used, now) {
            return Some(CloseReason::IdleTimeout);
        }
        None
    }

    /// How long it has been idle, by the wall clock (zero if the clock went back).
    pub(crate) fn idle_for(&self, now: SystemTime) -> Duration {
        now.duration_since(self.last_used).unwrap_or_default()
    }

    /// What becomes of this connection, given back at `now`: the one place that decides,
    /// from its [`Health`], the pin policy and its lifetime. `in_invocation` when the checkout
    /// belongs to an invocation (only then can `KeepForInvocation` keep it).
    pub(crate) fn fate(&self, s: &Settings, now: SystemTime, in_invocation: bool) -> Fate {
        match self
            .state
            .health(self.client.is_closed())
            .verdict(s.pin_policy)
        {
            Some(CloseReason::Pinned)
                if in_invocation && s.pin_policy == PinPolicy::KeepForInvocation =>
            {
                Fate::KeepForInvocation
            }
            Some(reason) => Fate::Close(reason),
            None if exceeded(s.max_lifetime, self.created, now) => {
                Fate::Close(CloseReason::MaxLifetime)
            }
            None => Fate::Idle,
        }
    }
}

/// What becomes of a connection given back ([`Conn::fate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Back to the idle set.
    Idle,
    /// Possibly pinned, and kept with its slot for the rest of its invocation
    /// ([`PinPolicy::KeepForInvocation`]), which closes it when it ends.
    KeepForInvocation,
    /// Closed, for this reason.
    Close(CloseReason),
}

fn exceeded(limit: Option<Duration>, since: SystemTime, now: SystemTime) -> bool {
    // A comparison, cheaper than a subtraction on every checkout; a clock that went backwards
    // counts as no time passed, as the subtraction would.
    limit.is_some_and(|l| since.checked_add(l).is_some_and(|end| now > end))
}

/// What decides whether a returned connection may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Health {
    pub(crate) killed: bool,
    pub(crate) closed: bool,
    pub(crate) in_flight: u32,
    pub(crate) txn_object: bool,
    /// The wire: a request waits for its ReadyForQuery, or a COPY is open.
    pub(crate) busy: bool,
    /// The wire: the last ReadyForQuery's transaction status.
    pub(crate) status: TxnStatus,
    pub(crate) rollback_queued: bool,
    pub(crate) pinned: Reasons,
}

impl Health {
    /// `None` when the connection may go back to the idle set: the server's last
    /// ReadyForQuery answered every request, said no transaction block is open (or one is
    /// whose ROLLBACK tokio-postgres has queued ahead of anything else), no COPY is open,
    /// nothing pinpool started is unfinished, and nothing sent may have pinned it.
    pub(crate) fn verdict(&self, policy: PinPolicy) -> Option<CloseReason> {
        let rolling_back = self.rollback_queued
            && matches!(self.status, TxnStatus::InTransaction | TxnStatus::Failed);
        if self.killed {
            Some(CloseReason::TimedOut)
        } else if self.closed {
            Some(CloseReason::Broken)
        } else if self.in_flight > 0
            || self.txn_object
            || (self.busy && !rolling_back)
            || (self.status != TxnStatus::Idle && !rolling_back)
        {
            Some(CloseReason::UnknownState)
        } else if !self.pinned.is_empty() && policy != PinPolicy::Keep {
            // KeepForInvocation: the pool keeps it for its invocation instead, if there is one.
            Some(CloseReason::Pinned)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pinning::Reason;

    fn healthy() -> Health {
        Health {
            killed: false,
            closed: false,
            in_flight: 0,
            txn_object: false,
            busy: false,
            status: TxnStatus::Idle,
            rollback_queued: false,
            pinned: Reasons::EMPTY,
        }
    }

    #[test]
    fn only_a_clean_connection_goes_back() {
        let p = PinPolicy::CloseOnReturn;
        assert_eq!(healthy().verdict(p), None);
        let cases = [
            (
                Health {
                    killed: true,
                    ..healthy()
                },
                CloseReason::TimedOut,
            ),
            (
                Health {
                    closed: true,
                    ..healthy()
                },
                CloseReason::Broken,
            ),
            (
                Health {
                    in_flight: 1,
                    ..healthy()
                },
                CloseReason::UnknownState,
            ),
            (
                Health {
                    busy: true,
                    ..healthy()
                },
                CloseReason::UnknownState,
            ),
            (
                Health {
                    txn_object: true,
                    ..healthy()
                },
                CloseReason::UnknownState,
            ),
            (
                Health {
                    status: TxnStatus::InTransaction,
                    ..healthy()
                },
                CloseReason::UnknownState,
            ),
            (
                Health {
                    status: TxnStatus::Unknown,
                    rollback_queued: true,
                    ..healthy()
                },
                CloseReason::UnknownState,
            ),
            (
                Health {
                    pinned: Reasons::of(Reason::Set),
                    ..healthy()
                },
                CloseReason::Pinned,
            ),
        ];
        for (h, want) in cases {
            assert_eq!(h.verdict(p), Some(want), "{h:?}");
        }
    }

    #[test]
    fn a_transaction_whose_rollback_is_queued_may_go_back() {
        for status in [TxnStatus::InTransaction, TxnStatus::Failed] {
            let h = Health {
                status,
                rollback_queued: true,
                ..healthy()
            };
            assert_eq!(h.verdict(PinPolicy::CloseOnReturn), None);
        }
    }

    #[test]
    fn keep_policy_keeps_pinned_but_not_unknown_state() {
        let pinned = Health {
            pinned: Reasons::of(Reason::Set),
            ..healthy()
        };
        assert_eq!(pinned.verdict(PinPolicy::Keep), None);
        let both = Health {
            in_flight: 2,
            ..pinned
        };
        assert_eq!(
            both.verdict(PinPolicy::Keep),
            Some(CloseReason::UnknownState)
        );
    }

    #[test]
    fn lifetimes_use_the_wall_clock_and_tolerate_it_going_back() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let limit = Some(Duration::from_secs(10));
        assert!(!exceeded(limit, t0, t0 + Duration::from_secs(10)));
        assert!(exceeded(limit, t0, t0 + Duration::from_secs(11)));
        assert!(!exceeded(limit, t0, t0 - Duration::from_secs(100)));
        assert!(!exceeded(None, t0, t0 + Duration::from_secs(1_000_000)));
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
