//! What the client sessions hold in memory: each session's charge against the process-wide
//! count of buffered bytes, and reads that take no more than the room left.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use super::Counters;

/// The most bytes one read takes.
pub(crate) const CHUNK: usize = 64 * 1024;

/// How long a session starved by the process-wide bound waits before it looks again.
pub(crate) const RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// One session's share of [`Counters::buffered`].
///
/// Invariant: `Counters::buffered` is the sum of `held` over the live charges; a charge gives
/// its share back when dropped, however its session ends.
pub(crate) struct Charge {
    counters: Arc<Counters>,
    held: u64,
}

impl Charge {
    pub(crate) fn new(counters: Arc<Counters>) -> Charge {
        Charge { counters, held: 0 }
    }

    /// The session holds `now` bytes.
    pub(crate) fn set(&mut self, now: usize) {
        let now = now as u64;
        if now > self.held {
            self.grow(now - self.held);
        } else {
            self.counters.buffered.fetch_sub(self.held - now, Relaxed);
            self.held = now;
        }
    }

    fn grow(&mut self, n: u64) {
        let total = self.counters.buffered.fetch_add(n, Relaxed) + n;
        self.counters.peak_buffered.fetch_max(total, Relaxed);
        self.held += n;
    }

    /// Claims up to `want` more bytes: all of them without a `cap`, else only what fits under
    /// the cap on the process's total (nothing once it is reached).
    fn claim(&mut self, want: usize, cap: Option<u64>) -> u64 {
        let want = want as u64;
        let Some(cap) = cap else {
            self.grow(want);
            return want;
        };
        let Ok(before) = self
            .counters
            .buffered
            .fetch_update(Relaxed, Relaxed, |total| {
                (total < cap).then(|| total + want.min(cap - total))
            })
        else {
            return 0;
        };
        let got = want.min(cap - before);
        self.counters.peak_buffered.fetch_max(before + got, Relaxed);
        self.held += got;
        got
    }

    fn release(&mut self, n: u64) {
        self.counters.buffered.fetch_sub(n, Relaxed);
        self.held -= n;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Reads at most `max` bytes onto the end of `buf`.
pub(crate) fn poll_read_into<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Poll<io::Result<usize>> {
    let start = buf.len();
    buf.resize(start + max.min(CHUNK), 0);
    let mut rb = ReadBuf::new(&mut buf[start..]);
    let polled = Pin::new(r).poll_read(cx, &mut rb);
    let n = rb.filled().len();
    buf.truncate(start + if polled.is_ready() { n } else { 0 });
    polled.map_ok(|()| n)
}

/// Reads at most `room` bytes (one [`CHUNK`] at most) onto the end of `buf`, charged to
/// `charge` before the read, so that with a `cap` the process's total never passes it.
/// `Ready(Ok(None))` when the cap left no room and `retry` has passed: look again.
pub(crate) fn poll_read_charged<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
    charge: &mut Charge,
    room: usize,
    cap: Option<u64>,
    retry: Pin<&mut tokio::time::Sleep>,
) -> Poll<io::Result<Option<usize>>> {
    let granted = charge.claim(room.min(CHUNK), cap);
    if granted == 0 {
        // Nobody wakes a starved session when the others free room: it looks again soon.
        return retry.poll(cx).map(|()| Ok(None));
    }
    let polled = poll_read_into(cx, r, buf, granted as usize);
    let got = match &polled {
        Poll::Ready(Ok(n)) => *n as u64,
        _ => 0,
    };
    charge.release(granted - got);
    polled.map_ok(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_claim_takes_only_what_fits_and_a_charge_gives_back_its_share() {
        let counters = Arc::new(Counters::default());
        let mut a = Charge::new(counters.clone());
        let mut b = Charge::new(counters.clone());
        assert_eq!(a.claim(700, Some(1000)), 700);
        assert_eq!(b.claim(700, Some(1000)), 300);
        assert_eq!(b.claim(1, Some(1000)), 0);
        assert_eq!(
            b.claim(50, None),
            50,
            "without a cap a claim always succeeds"
        );
        a.set(100);
        assert_eq!(counters.buffered.load(Relaxed), 450);
        assert_eq!(counters.peak_buffered.load(Relaxed), 1050);
        drop(a);
        b.release(10);
        assert_eq!(counters.buffered.load(Relaxed), 340);
        drop(b);
        assert_eq!(counters.buffered.load(Relaxed), 0);
    }
}
