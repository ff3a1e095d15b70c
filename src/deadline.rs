//! Deadlines: every phase ends at the earlier of its configured timeout and the caller's
//! deadline minus `deadline_margin`.

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::error::{Error, Phase, TimeoutCause};

/// The instant at which pinpool stops working for a caller whose deadline is `deadline`
/// (wall clock, as Lambda gives it): the deadline minus `margin`, never before now.
pub(crate) fn cutoff(deadline: SystemTime, margin: Duration) -> Instant {
    let left = deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    after(left.saturating_sub(margin))
}

/// The earlier of two cutoffs, either of which may be absent.
pub(crate) fn earlier(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `d` from now; a `d` too long for the clock (`Duration::MAX`) gives a century from now,
/// as good as never.
pub(crate) fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// When a phase must end and which bound that is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound {
    pub(crate) at: Instant,
    pub(crate) cause: TimeoutCause,
    pub(crate) allowed: Duration,
}

impl Bound {
    /// The earlier of `now + configured` and `cutoff`; `None` when neither is set.
    pub(crate) fn new(configured: Option<Duration>, cutoff: Option<Instant>) -> Option<Bound> {
        Bound::starting(Instant::now(), configured, cutoff)
    }

    /// As [`Bound::new`], for a phase that started at `now` (a clock read the caller already
    /// made).
    pub(crate) fn starting(
        now: Instant,
        configured: Option<Duration>,
        cutoff: Option<Instant>,
    ) -> Option<Bound> {
        // A timeout too long for the clock (`Duration::MAX`) bounds nothing.
        let configured = configured.and_then(|d| {
            Some(Bound {
                at: now.checked_add(d)?,
                cause: TimeoutCause::Configured,
                allowed: d,
            })
        });
        let deadline = cutoff.map(|at| Bound {
            at,
            cause: TimeoutCause::Deadline,
            allowed: at.saturating_duration_since(now),
        });
        match (configured, deadline) {
            (Some(c), Some(d)) => Some(if d.at < c.at { d } else { c }),
            (c, d) => c.or(d),
        }
    }

    /// The timeout error of this bound for `phase`. Reported here, where a timeout is
    /// decided, and only here: counted in `pinpool_timeouts` and logged. Call it only for a
    /// timeout that happened; [`within`] calls it when its bound comes first.
    pub(crate) fn timed_out(&self, phase: Phase) -> Error {
        crate::metrics::timeout(phase, self.cause);
        tracing::warn!(
            phase = phase.as_str(),
            cause = self.cause.as_str(),
            allowed_ms = self.allowed.as_millis() as u64,
            "pinpool: timed out"
        );
        Error::Timeout {
            phase,
            cause: self.cause,
            after: self.allowed,
        }
    }

    /// True when the bound had already passed when it was made: nothing was allowed. Read
    /// from the bound itself, not from the clock again.
    pub(crate) fn passed(&self) -> bool {
        self.allowed.is_zero()
    }
}

/// A bound in a form cheap enough to check at every poll of a stream, however fast its items
/// come: on Linux against `CLOCK_MONOTONIC_COARSE` (the clock as of the last timer tick: about
/// 9 ns a read on this project's machine, against about 50 for `Instant::now`, which would add
/// a tenth to a fast stream's cost), so the check fires at most one tick (1 to 10 ms) late.
/// Elsewhere against `Instant::now`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollBound {
    #[cfg(target_os = "linux")]
    at_ns: u64,
    #[cfg(not(target_os = "linux"))]
    at: Instant,
}

#[cfg(target_os = "linux")]
#[inline]
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists on every
    // Linux since 2.6.32 and the call cannot fail with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl PollBound {
    pub(crate) fn new(bound: &Bound) -> PollBound {
        #[cfg(target_os = "linux")]
        {
            // The coarse clock runs with the monotonic one, behind it by less than a tick.
            let left = bound.at.saturating_duration_since(Instant::now());
            PollBound {
                at_ns: coarse_now_ns().saturating_add(left.as_nanos() as u64),
            }
        }
        #[cfg(not(target_os = "linux"))]
        PollBound { at: bound.at }
    }

    /// True once the bound has passed.
    #[inline]
    pub(crate) fn passed(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            coarse_now_ns() >= self.at_ns
        }
        #[cfg(not(target_os = "linux"))]
        {
            Instant::now() >= self.at
        }
    }
}

/// Runs `fut` until `bound`: its output, or `phase`'s timeout error ([`Bound::timed_out`])
/// when the bound came first (the future is then dropped). Without a bound it waits as long as
/// `fut` takes.
pub(crate) async fn within<F: Future>(
    bound: Option<Bound>,
    phase: Phase,
    fut: F,
) -> Result<F::Output, Error> {
    match bound {
        None => Ok(fut.await),
        Some(b) => tokio::time::timeout_at(b.at, fut)
            .await
            .map_err(|_| b.timed_out(phase)),
    }
}

/// Runs `fut` until `bound`, for a wait whose end is no error of the caller's (a check that
/// fails closes its connection; a wait for a ReadyForQuery leaves the connection to be
/// judged on return): `None` when the bound came first. Reports nothing.
pub(crate) async fn until<F: Future>(bound: Option<Bound>, fut: F) -> Option<F::Output> {
    match bound {
        None => Some(fut.await),
        Some(b) => tokio::time::timeout_at(b.at, fut).await.ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a paused clock: no time passes between the bounds made here, however loaded the
    /// machine (a 10 ms bound made on a running clock may pass before it is checked).
    #[tokio::test(start_paused = true)]
    async fn the_earlier_bound_wins() {
        let soon = Instant::now() + Duration::from_millis(100);
        let b = Bound::new(Some(Duration::from_secs(5)), Some(soon)).unwrap();
        assert_eq!(b.cause, TimeoutCause::Deadline);
        let b = Bound::new(Some(Duration::from_millis(10)), Some(soon)).unwrap();
        assert_eq!(b.cause, TimeoutCause::Configured);
        assert!(Bound::new(None, None).is_none());
        let gone = Bound::new(Some(Duration::from_secs(5)), Some(Instant::now())).unwrap();
        assert!(gone.passed());
        assert!(!b.passed());
    }

    #[tokio::test]
    async fn a_poll_bound_passes_with_its_bound_within_a_tick() {
        // A second before the bound to check it has not passed (a loaded machine may pause
        // this thread for hundreds of milliseconds); passed 20 ms (more than a tick) after it.
        let b = Bound::new(Some(Duration::from_secs(1)), None).unwrap();
        let p = PollBound::new(&b);
        assert!(!p.passed());
        std::thread::sleep(Duration::from_millis(1020));
        assert!(p.passed());
        let gone = Bound::new(Some(Duration::ZERO), None).unwrap();
        assert!(
            PollBound::new(&gone).passed() || {
                std::thread::sleep(Duration::from_millis(20));
                PollBound::new(&gone).passed()
            }
        );
    }

    #[tokio::test]
    async fn cutoff_subtracts_the_margin_and_never_goes_before_now() {
        let now = Instant::now();
        // 90 s left: 10 s from the deadline without the margin or with it taken twice, and
        // 5 s of slack either side for a thread paused between the clock reads.
        let c = cutoff(
            SystemTime::now() + Duration::from_secs(100),
            Duration::from_secs(10),
        );
        let left = c - now;
        assert!(
            left > Duration::from_secs(85) && left < Duration::from_secs(95),
            "{left:?}"
        );
        let past = cutoff(
            SystemTime::now() - Duration::from_secs(10),
            Duration::from_secs(1),
        );
        assert!(past >= now);
    }
}
