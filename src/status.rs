//! What the pool reports about itself: why connections closed, and a snapshot of its state.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::pinning::Reasons;

/// Why the pool closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The server or the network closed it.
    Broken,
    /// Older than `max_lifetime`.
    MaxLifetime,
    /// Idle (wall clock) longer than `idle_timeout`.
    IdleTimeout,
    /// It may be pinned by RDS Proxy and the pin policy closes such connections.
    Pinned,
    /// Returned with a statement, stream or copy in flight, inside a transaction block, or with
    /// a request the server had not answered (as its protocol stream shows).
    UnknownState,
    /// A statement ran past its timeout or deadline.
    TimedOut,
    /// The pool was closed.
    PoolClosed,
    /// It failed (or, with `FreezeCheck::Replace`, skipped) the check at an invocation's start.
    Stale,
    /// Idle beyond `min_idle` when an invocation ended (`trim_at_invocation_end`).
    Trimmed,
}

const REASONS: [CloseReason; 9] = [
    CloseReason::Broken,
    CloseReason::MaxLifetime,
    CloseReason::IdleTimeout,
    CloseReason::Pinned,
    CloseReason::UnknownState,
    CloseReason::TimedOut,
    CloseReason::PoolClosed,
    CloseReason::Stale,
    CloseReason::Trimmed,
];

impl CloseReason {
    /// All reasons, in a fixed order.
    pub fn all() -> &'static [CloseReason] {
        &REASONS
    }

    /// The reason in snake_case, as in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Broken => "broken",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Pinned => "pinned",
            CloseReason::UnknownState => "unknown_state",
            CloseReason::TimedOut => "timed_out",
            CloseReason::PoolClosed => "pool_closed",
            CloseReason::Stale => "stale",
            CloseReason::Trimmed => "trimmed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Connections closed, counted by reason.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct ClosedCounts([u64; REASONS.len()]);

/// Each reason with its count, the ones never seen left out: `{"pinned": 3, "broken": 1}`.
impl std::fmt::Debug for ClosedCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                REASONS
                    .iter()
                    .map(|r| (r.as_str(), self.get(*r)))
                    .filter(|(_, n)| *n > 0),
            )
            .finish()
    }
}

impl ClosedCounts {
    /// How many were closed for `reason`.
    pub fn get(&self, reason: CloseReason) -> u64 {
        self.0[reason.index()]
    }

    /// How many were closed in all.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// A snapshot of the pool, from [`Pool::status`](crate::Pool::status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// `max_size`.
    pub max_size: usize,
    /// Connections open or being opened.
    pub size: usize,
    /// Connections idle in the pool.
    pub idle: usize,
    /// Connections checked out.
    pub in_use: usize,
    /// Callers waiting in `get()`.
    pub waiters: usize,
    /// Connections opened since the pool was built.
    pub opened: u64,
    /// Connections closed since the pool was built, by reason.
    pub closed: ClosedCounts,
    /// Statements refused by [`PinPolicy::Refuse`](crate::PinPolicy::Refuse).
    pub refused: u64,
    /// Connections that became possibly pinned.
    pub pinned: u64,
    /// `&str` statements served from a connection's statement cache.
    pub cache_hits: u64,
    /// `&str` statements prepared because their connection's cache did not hold them.
    pub cache_misses: u64,
    /// Statements evicted from a cache (and closed on the server).
    pub cache_evictions: u64,
    /// Statements run on a fresh connection because theirs turned out to be closed before
    /// anything of them was sent (the retry rule: see the README).
    pub retries: u64,
}

/// The pool's counters, updated without a lock. Each event is counted here and recorded as
/// its metric ([`crate::metrics`]) in the same call, so `status()` and the metrics never
/// disagree.
#[derive(Default)]
pub(crate) struct Counters {
    opened: AtomicU64,
    closed: [AtomicU64; REASONS.len()],
    refused: AtomicU64,
    pinned: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_evictions: AtomicU64,
    retries: AtomicU64,
}

impl Counters {
    pub(crate) fn opened(&self) {
        self.opened.fetch_add(1, Relaxed);
        crate::metrics::opened();
    }

    pub(crate) fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Relaxed);
        crate::metrics::closed(reason);
    }

    /// A statement refused for `pins`.
    pub(crate) fn refused(&self, pins: Reasons) {
        self.refused.fetch_add(1, Relaxed);
        crate::metrics::refused(pins);
    }

    /// New pin reasons on a connection; `first` when it was not pinned before (the counter
    /// counts connections, the metric reasons).
    pub(crate) fn pinned(&self, new: Reasons, first: bool) {
        if first {
            self.pinned.fetch_add(1, Relaxed);
        }
        crate::metrics::pinned(new);
    }

    pub(crate) fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Relaxed);
        crate::metrics::cache_hit();
    }

    pub(crate) fn cache_miss(&self) {
        self.cache_misses.fetch_add(1, Relaxed);
        crate::metrics::cache_miss();
    }

    pub(crate) fn cache_evictions(&self, n: u64) {
        self.cache_evictions.fetch_add(n, Relaxed);
        crate::metrics::cache_evictions(n);
    }

    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Relaxed);
        crate::metrics::retried();
    }

    /// A [`Status`]: these counts, with the gauges the pool read.
    pub(crate) fn status(&self, gauges: Gauges) -> Status {
        Status {
            max_size: gauges.max_size,
            size: gauges.size,
            idle: gauges.idle,
            in_use: gauges.in_use,
            waiters: gauges.waiters,
            opened: self.opened.load(Relaxed),
            closed: ClosedCounts(std::array::from_fn(|i| self.closed[i].load(Relaxed))),
            refused: self.refused.load(Relaxed),
            pinned: self.pinned.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
            cache_evictions: self.cache_evictions.load(Relaxed),
            retries: self.retries.load(Relaxed),
        }
    }
}

/// What the pool reads itself for a [`Status`].
pub(crate) struct Gauges {
    pub(crate) max_size: usize,
    pub(crate) size: usize,
    pub(crate) idle: usize,
    pub(crate) in_use: usize,
    pub(crate) waiters: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_counts_show_each_reason_by_name() {
        let mut c = ClosedCounts::default();
        c.0[CloseReason::Pinned.index()] = 3;
        c.0[CloseReason::Broken.index()] = 1;
        assert_eq!(format!("{c:?}"), r#"{"broken": 1, "pinned": 3}"#);
        assert_eq!(format!("{:?}", ClosedCounts::default()), "{}");
    }
}
