//! Bounded waits for a slot, without a timer per wait.
//!
//! Every `get()` that has to wait is bounded (by `acquire_timeout` and the deadline). A tokio
//! timer per wait costs a timer-wheel insertion and removal, about as much as the rest of a
//! queued checkout. Instead, a waiter that has to wait registers its bound and waker here, and
//! one watchdog task per pool sleeps until the earliest bound and wakes the waiters whose bound
//! has passed; they see it and give up. A slot that arrives first wakes the waiter through the
//! semaphore as usual, and it leaves the registry. The watchdog starts with the first waiter
//! and ends when it wakes to find nobody waiting; it does nothing else (a frozen Lambda
//! environment leaves it asleep).

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio::sync::{AcquireError, Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// The bounded waiters of one pool.
#[derive(Default)]
pub(crate) struct Waits {
    state: Mutex<State>,
    /// Wakes the watchdog when a waiter's bound comes before the one it sleeps for.
    rearm: Notify,
}

#[derive(Default)]
struct State {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// Registered waiters.
    len: usize,
    /// A watchdog task is running.
    watching: bool,
    /// The bound the watchdog sleeps until.
    armed_for: Option<Instant>,
}

struct Entry {
    at: Instant,
    waker: Waker,
    /// Woken for its bound: the watchdog leaves it alone until it leaves.
    expired: bool,
}

impl Waits {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds consistent data.
        crate::sync::lock(&self.state)
    }

    /// Registers a waiter, or updates its waker; returns its index.
    fn register(self: &Arc<Self>, index: Option<usize>, at: Instant, waker: &Waker) -> usize {
        let mut st = self.state();
        if let Some(i) = index {
            if let Some(e) = st.entries[i].as_mut()
                && !e.waker.will_wake(waker)
            {
                e.waker = waker.clone();
            }
            return i;
        }
        let entry = Some(Entry {
            at,
            waker: waker.clone(),
            expired: false,
        });
        st.len += 1;
        let i = match st.free.pop() {
            Some(i) => {
                st.entries[i] = entry;
                i
            }
            None => {
                st.entries.push(entry);
                st.entries.len() - 1
            }
        };
        if !st.watching {
            st.watching = true;
            st.armed_for = Some(at);
            drop(st);
            tokio::spawn(watchdog(self.clone()));
        } else if st.armed_for.is_none_or(|armed| at < armed) {
            st.armed_for = Some(at);
            drop(st);
            self.rearm.notify_one();
        }
        i
    }

    fn leave(&self, index: usize) {
        let mut st = self.state();
        st.entries[index] = None;
        st.free.push(index);
        // The watchdog is not told: it ends at the bound it sleeps for if nobody waits then,
        // and until then serves the next waiters without a new task each time.
        st.len -= 1;
    }

    /// Callers waiting for a slot now (the ones a slot did not reach at once).
    pub(crate) fn len(&self) -> usize {
        self.state().len
    }
}

/// Wakes waiters whose bound has passed; ends when it wakes and no waiter is left to watch.
async fn watchdog(waits: Arc<Waits>) {
    // If the runtime shuts down under it (a pool used from several runtimes, as tests do),
    // the next waiter must start a new one.
    let mut on_drop = Watching {
        waits: &waits,
        armed: true,
    };
    loop {
        let next = {
            let mut st = waits.state();
            let now = Instant::now();
            let mut earliest: Option<Instant> = None;
            for e in st.entries.iter_mut().flatten().filter(|e| !e.expired) {
                if e.at <= now {
                    e.expired = true;
                    e.waker.wake_by_ref();
                } else if earliest.is_none_or(|t| e.at < t) {
                    earliest = Some(e.at);
                }
            }
            st.armed_for = earliest;
            match earliest {
                Some(t) => t,
                None => {
                    st.watching = false;
                    on_drop.armed = false;
                    return;
                }
            }
        };
        let rearmed = waits.rearm.notified();
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = rearmed => {}
        }
    }
}

/// Marks the watchdog gone when its task is dropped before it ended by itself.
struct Watching<'a> {
    waits: &'a Waits,
    armed: bool,
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.waits.state().watching = false;
        }
    }
}

/// Leaves the registry when the wait ends, whichever way (a slot, the bound, or a drop).
struct Registration<'a> {
    waits: &'a Arc<Waits>,
    index: Option<usize>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            self.waits.leave(i);
        }
    }
}

/// Waits for a slot of `slots` until `at`; `Err(())` when `at` came first. FIFO like the
/// semaphore itself, and cancel safe: dropped, it leaves both the semaphore's queue and the
/// registry.
pub(crate) async fn acquire_until<'a>(
    waits: &Arc<Waits>,
    slots: &'a Semaphore,
    at: Instant,
) -> Result<Result<SemaphorePermit<'a>, AcquireError>, ()> {
    let mut acquire = pin!(slots.acquire());
    let mut reg = Registration { waits, index: None };
    poll_fn(|cx| {
        if let Poll::Ready(r) = acquire.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        // The first poll comes right after the caller computed `at` from the clock: only a
        // later poll (a wakeup) needs to read it again.
        if reg.index.is_some() && Instant::now() >= at {
            return Poll::Ready(Err(()));
        }
        reg.index = Some(waits.register(reg.index, at, cx.waker()));
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_wait_ends_at_its_bound_and_leaves_nothing_behind() {
        let waits = Arc::new(Waits::default());
        let slots = Semaphore::new(0);
        let start = Instant::now();
        let late = acquire_until(&waits, &slots, start + Duration::from_millis(300));
        let early = acquire_until(&waits, &slots, start + Duration::from_millis(50));
        let (late, early) = tokio::join!(late, early);
        assert!(late.is_err() && early.is_err());
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(waits.len(), 0);
        let st = waits.state();
        assert!(st.entries.iter().all(Option::is_none));
        assert_eq!(st.free.len(), st.entries.len());
    }

    #[tokio::test]
    async fn an_earlier_bound_rearms_the_watchdog() {
        let waits = Arc::new(Waits::default());
        let slots = Semaphore::new(0);
        let start = Instant::now();
        // The watchdog sleeps for the 10 s bound when the 50 ms one arrives.
        let long = tokio::spawn({
            let waits = waits.clone();
            async move {
                let slots = Semaphore::new(0);
                acquire_until(&waits, &slots, Instant::now() + Duration::from_secs(10))
                    .await
                    .is_err()
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = acquire_until(&waits, &slots, start + Duration::from_millis(50)).await;
        assert!(r.is_err());
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "rearmed, not 10 s"
        );
        long.abort();
    }

    #[tokio::test]
    async fn a_slot_that_comes_first_wins_and_a_dropped_wait_leaves() {
        let waits = Arc::new(Waits::default());
        let slots = Semaphore::new(0);
        let at = Instant::now() + Duration::from_secs(10);
        {
            let dropped = pin!(acquire_until(&waits, &slots, at));
            assert!(futures_poll_once(dropped).await.is_none());
        }
        let got = tokio::join!(acquire_until(&waits, &slots, at), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            slots.add_permits(1);
        })
        .0;
        assert!(matches!(got, Ok(Ok(_))));
        assert!(waits.state().entries.iter().all(Option::is_none));
    }

    #[tokio::test]
    async fn the_watchdog_ends_once_nobody_waits() {
        let waits = Arc::new(Waits::default());
        let slots = Semaphore::new(0);
        let at = Instant::now() + Duration::from_millis(300);
        let got = tokio::join!(acquire_until(&waits, &slots, at), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            slots.add_permits(1);
        })
        .0;
        assert!(matches!(got, Ok(Ok(_))));
        assert!(waits.state().watching, "it sleeps until the bound");
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while waits.state().watching {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(ended.is_ok(), "the watchdog ended after the bound");
    }

    #[test]
    fn a_runtime_that_shuts_down_takes_its_watchdog_but_not_the_next_ones() {
        let waits = Arc::new(Waits::default());
        let slots = Arc::new(Semaphore::new(0));
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        first.block_on(async {
            // Registered, watchdog started; then the runtime goes away with both.
            let w = tokio::spawn({
                let (waits, slots) = (waits.clone(), slots.clone());
                async move {
                    let at = Instant::now() + Duration::from_secs(60);
                    acquire_until(&waits, &slots, at).await.is_ok()
                }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!w.is_finished());
        });
        drop(first);
        assert!(!waits.state().watching);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let timed_out = second.block_on(async {
            let at = Instant::now() + Duration::from_millis(50);
            tokio::time::timeout(Duration::from_secs(5), acquire_until(&waits, &slots, at)).await
        });
        assert!(
            matches!(timed_out, Ok(Err(()))),
            "the bound held in the second runtime"
        );
    }

    /// Polls once; `None` when pending.
    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        poll_fn(|cx| {
            Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }
}
