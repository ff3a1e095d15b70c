//! One pooled connection: the tokio-postgres client, the task that drives its socket, and the
//! state that decides whether it may go back to the pool.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use tokio::task::AbortHandle;
use tokio_postgres::Client;

use crate::cache::StatementCache;
use crate::config::{PinPolicy, Settings};
use crate::connect::ConnectionFuture;
use crate::pinning::{Reasons, TxnControl};
use crate::status::CloseReason;

/// The connection task's future, held where [`ConnState::kill`] can drop it synchronously:
/// dropping a `Client` with a request pending does not close the socket, dropping this does.
struct TaskSlot {
    fut: Mutex<Option<ConnectionFuture>>,
    abort: OnceLock<AbortHandle>,
}

/// Spawns the task that drives a connection's socket. The task ends when the server closes
/// the connection or when [`ConnState::kill`] drops the future.
fn spawn_connection(connection: ConnectionFuture, id: u64) -> Arc<TaskSlot> {
    let slot = Arc::new(TaskSlot {
        fut: Mutex::new(Some(connection)),
        abort: OnceLock::new(),
    });
    let polled = slot.clone();
    let handle = tokio::spawn(poll_fn(move |cx| {
        let mut fut = polled.fut.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = fut.as_mut() else {
            return Poll::Ready(());
        };
        match f.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!(connection = id, error = %e, "pinpool: connection ended with an error");
                }
                *fut = None;
                Poll::Ready(())
            }
        }
    }));
    let _ = slot.abort.set(handle.abort_handle());
    slot
}

const TXN_TEXT: u8 = 1; // a BEGIN sent as text, not yet ended
const UNKNOWN: u8 = 2; // a transaction-control statement failed: state unknown
const TXN_OBJECT: u8 = 4; // a pinpool Transaction is alive (cleared by its drop)
const UNTRACKED: u8 = 8; // raw access was handed out
const KILLED: u8 = 16; // the socket was closed by pinpool after a timeout
const BROKEN: u8 = 32; // the socket was closed by pinpool after a fatal error
const ROLLBACK_QUEUED: u8 = 64; // a dropped transaction queued a ROLLBACK not yet known sent
/// Inside a transaction, or unsure whether it is.
const IN_TXN: u8 = TXN_TEXT | UNKNOWN | TXN_OBJECT;

/// The state statements update through `&self`; atomics so clients and their futures are
/// `Sync`/`Send`. Only the one holder of the connection touches it, so `Relaxed` suffices.
pub(crate) struct ConnState {
    pub(crate) id: u64,
    /// Statements, streams and copies started and not finished. A future dropped mid-way
    /// leaves its count here, so the connection is closed on return.
    in_flight: AtomicU32,
    flags: AtomicU8,
    pinned: AtomicU16,
    first_pin: Mutex<Option<Box<str>>>,
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

    fn close_socket(&self, flag: u8) {
        self.flags.fetch_or(flag, Relaxed);
        let fut = self
            .task
            .fut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(fut);
        if let Some(abort) = self.task.abort.get() {
            abort.abort();
        }
    }

    /// The statement cache, locked (a poisoned lock still holds a consistent cache).
    pub(crate) fn cache(&self) -> std::sync::MutexGuard<'_, StatementCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self)
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
    pub(crate) fn set_rollback_queued(&self, on: bool) {
        self.set(ROLLBACK_QUEUED, on);
    }

    pub(crate) fn rollback_queued(&self) -> bool {
        self.flags.load(Relaxed) & ROLLBACK_QUEUED != 0
    }

    pub(crate) fn set_untracked(&self) {
        self.set(UNTRACKED, true);
    }

    /// Follows BEGIN/COMMIT/ROLLBACK sent as text. A failed transaction-control statement
    /// leaves the state unknown.
    pub(crate) fn text_txn(&self, txn: TxnControl, ok: bool) {
        match (txn, ok) {
            (TxnControl::None, _) => {}
            (_, false) => self.set(UNKNOWN, true),
            (TxnControl::Begin, true) => self.set(TXN_TEXT, true),
            (TxnControl::End, true) => self.set(TXN_TEXT, false),
        }
    }

    /// Records that the connection may be pinned. Returns the reasons that are new.
    pub(crate) fn pin(&self, reasons: Reasons, sql: &str) -> Reasons {
        let before = Reasons::from_bits(self.pinned.fetch_or(reasons.bits(), Relaxed));
        if before.is_empty() {
            let mut first = self.first_pin.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| truncate(sql, 120).into());
        }
        Reasons::from_bits(reasons.bits() & !before.bits())
    }

    /// True inside a transaction (or when unsure): a failed statement has aborted it, so
    /// retrying is pointless.
    pub(crate) fn in_transaction(&self) -> bool {
        self.flags.load(Relaxed) & IN_TXN != 0
    }

    pub(crate) fn pinned(&self) -> Reasons {
        Reasons::from_bits(self.pinned.load(Relaxed))
    }

    pub(crate) fn first_pin(&self) -> Option<String> {
        self.first_pin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .map(str::to_owned)
    }

    pub(crate) fn health(&self, closed: bool) -> Health {
        let flags = self.flags.load(Relaxed);
        Health {
            killed: flags & KILLED != 0,
            closed: closed || flags & BROKEN != 0,
            in_flight: self.in_flight.load(Relaxed),
            in_txn: flags & IN_TXN != 0,
            untracked: flags & UNTRACKED != 0,
            pinned: self.pinned(),
        }
    }
}

/// Counts one statement in flight until [`InFlight::done`]; dropping it without `done` leaves
/// the count, which marks the connection's protocol state unknown.
pub(crate) struct InFlight<'a>(&'a ConnState);

impl InFlight<'_> {
    pub(crate) fn done(self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
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
    pub(crate) fn new(client: Client, connection: ConnectionFuture, id: u64) -> Conn {
        let now = SystemTime::now();
        Conn(Box::new(ConnData {
            client,
            state: ConnState {
                id,
                in_flight: AtomicU32::new(0),
                flags: AtomicU8::new(0),
                pinned: AtomicU16::new(0),
                first_pin: Mutex::new(None),
                task: spawn_connection(connection, id),
                cache: Mutex::new(StatementCache::default()),
            },
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

    /// Why this returned connection must be closed instead of kept, if it must.
    pub(crate) fn on_return(&self, s: &Settings, now: SystemTime) -> Option<CloseReason> {
        self.state
            .health(self.client.is_closed())
            .verdict(s.pin_policy)
            .or_else(|| {
                exceeded(s.max_lifetime, self.created, now).then_some(CloseReason::MaxLifetime)
            })
    }
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
    pub(crate) in_txn: bool,
    pub(crate) untracked: bool,
    pub(crate) pinned: Reasons,
}

impl Health {
    pub(crate) fn verdict(&self, policy: PinPolicy) -> Option<CloseReason> {
        if self.killed {
            Some(CloseReason::TimedOut)
        } else if self.closed {
            Some(CloseReason::Broken)
        } else if self.in_flight > 0 || self.in_txn {
            Some(CloseReason::UnknownState)
        } else if self.untracked {
            Some(CloseReason::Untracked)
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
            in_txn: false,
            untracked: false,
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
                    in_txn: true,
                    ..healthy()
                },
                CloseReason::UnknownState,
            ),
            (
                Health {
                    untracked: true,
                    ..healthy()
                },
                CloseReason::Untracked,
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
