//! The pool: a fair (FIFO) semaphore of `max_size` slots and a stack of idle connections.
//!
//! Invariants:
//! - every checked-out connection and every connection being opened holds one semaphore
//!   permit; idle connections hold none;
//! - `size` counts connections open or being opened, so `size <= max_size`;
//! - a connection returns to the idle set only with a known, clean protocol state.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, SemaphorePermit, TryAcquireError};
use tokio::time::Instant;

use crate::client::PooledClient;
use crate::config::{Builder, ConnectionConfig, PinPolicy, Settings};
use crate::conn::{Conn, ConnState, truncate};
use crate::connect::{Connect, SharedPasswordProvider};
use crate::deadline::{Bound, cutoff, within};
use crate::error::{Error, Phase};
use crate::metrics;
use crate::pinning::Reasons;
use crate::status::{CloseReason, Counters, Status};

/// An async pool of PostgreSQL connections for Lambda handlers behind RDS Proxy. Cloning it
/// is cheap and shares the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

pub(crate) struct PoolInner {
    pub(crate) settings: Settings,
    connector: Arc<dyn Connect>,
    password: Option<SharedPasswordProvider>,
    slots: Semaphore,
    idle: Mutex<VecDeque<Conn>>,
    size: AtomicUsize,
    in_use: AtomicUsize,
    waiting: AtomicUsize,
    closed: AtomicBool,
    next_id: AtomicU64,
    counters: Counters,
}

/// Undoes a count on drop unless disarmed: keeps `size` and `waiting` right when a `get()`
/// future is dropped at any `.await`.
struct CountGuard<'a> {
    count: &'a AtomicUsize,
    armed: bool,
}

impl<'a> CountGuard<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Relaxed);
        CountGuard { count, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.count.fetch_sub(1, Relaxed);
        }
    }
}

impl Pool {
    /// Starts configuring a pool for a connection string (URL or key-value) or a
    /// `tokio_postgres::Config`.
    pub fn builder(config: impl Into<ConnectionConfig>) -> Builder {
        Builder::new(config.into())
    }

    pub(crate) fn from_parts(
        settings: Settings,
        connector: Arc<dyn Connect>,
        password: Option<SharedPasswordProvider>,
    ) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                slots: Semaphore::new(settings.max_size),
                settings,
                connector,
                password,
                idle: Mutex::new(VecDeque::new()),
                size: AtomicUsize::new(0),
                in_use: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
            }),
        }
    }

    /// Checks out a connection, waiting at most `acquire_timeout` for a free one and at most
    /// `connect_timeout` to open a new one. Waiters are served in order.
    ///
    /// # Errors
    /// [`Error::Timeout`] (phase acquire or connect), [`Error::Connect`],
    /// [`Error::Password`], [`Error::Closed`].
    pub async fn get(&self) -> Result<PooledClient, Error> {
        self.checkout(None).await
    }

    /// Like [`get`](Self::get), but nothing (waiting, connecting, and every statement of the
    /// returned client) runs past `deadline - deadline_margin`. Give it the Lambda
    /// invocation's deadline.
    ///
    /// # Errors
    /// As [`get`](Self::get); a deadline already within the margin fails at once.
    pub async fn get_by(&self, deadline: SystemTime) -> Result<PooledClient, Error> {
        let cut = cutoff(deadline, self.inner.settings.deadline_margin);
        self.checkout(Some(cut)).await
    }

    async fn checkout(&self, cut: Option<Instant>) -> Result<PooledClient, Error> {
        let inner = &*self.inner;
        if inner.closed.load(Relaxed) {
            return Err(Error::Closed);
        }
        let start = Instant::now();
        let bound = Bound::new(Some(inner.settings.acquire_timeout), cut);
        if let Some(b) = bound.filter(Bound::passed) {
            return Err(b.error(Phase::Acquire));
        }
        let permit = match inner.slots.try_acquire() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(Error::Closed),
            Err(TryAcquireError::NoPermits) => {
                let _waiting = CountGuard::new(&inner.waiting);
                match within(bound, inner.slots.acquire()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(Error::Closed),
                    Err(()) => return Err(bound.map_or(Error::Closed, |b| b.error(Phase::Acquire))),
                }
            }
        };
        let conn = match inner.pop_usable() {
            Some(conn) => conn,
            None => inner.connect(cut).await?,
        };
        Ok(self.hand_out(conn, permit, cut, start))
    }

    fn hand_out(
        &self,
        conn: Conn,
        permit: SemaphorePermit<'_>,
        cut: Option<Instant>,
        start: Instant,
    ) -> PooledClient {
        // From here the PooledClient owns the slot; its drop adds the permit back.
        permit.forget();
        let in_use = self.inner.in_use.fetch_add(1, Relaxed) + 1;
        metrics::acquire_wait(start.elapsed());
        metrics::gauges(in_use, self.inner.idle().len());
        PooledClient::new(conn, self.inner.clone(), cut)
    }

    /// Opens connections until `min_idle` are idle (never more than `max_size` in all).
    /// Nothing opens connections in the background: call this where waiting is free, such as
    /// Lambda's INIT phase. Returns how many it opened.
    ///
    /// # Errors
    /// The first connect error; connections opened before it stay.
    pub async fn warm_up(&self) -> Result<usize, Error> {
        let inner = &*self.inner;
        let mut opened = 0;
        while inner.idle().len() < inner.settings.min_idle {
            let Ok(permit) = inner.slots.try_acquire() else {
                break;
            };
            let conn = inner.connect(None).await?;
            inner.idle().push_back(conn);
            drop(permit);
            opened += 1;
        }
        Ok(opened)
    }

    /// A snapshot of the pool's state and counters.
    pub fn status(&self) -> Status {
        let inner = &*self.inner;
        Status {
            max_size: inner.settings.max_size,
            size: inner.size.load(Relaxed),
            idle: inner.idle().len(),
            in_use: inner.in_use.load(Relaxed),
            waiters: inner.waiting.load(Relaxed),
            opened: inner.counters.opened.load(Relaxed),
            closed: inner.counters.closed_counts(),
            refused: inner.counters.refused.load(Relaxed),
            pinned: inner.counters.pinned.load(Relaxed),
        }
    }

    /// Closes every idle connection and refuses new `get()`s; checked-out connections are
    /// closed when they are returned.
    pub fn close(&self) {
        let inner = &*self.inner;
        inner.closed.store(true, Relaxed);
        inner.slots.close();
        let drained: Vec<Conn> = inner.idle().drain(..).collect();
        for conn in drained {
            inner.discard(conn, CloseReason::PoolClosed);
        }
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Relaxed)
    }

    /// `deadline_margin`, as configured.
    pub fn deadline_margin(&self) -> Duration {
        self.inner.settings.deadline_margin
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.inner.settings)
            .field("status", &self.status())
            .finish()
    }
}

impl PoolInner {
    fn idle(&self) -> MutexGuard<'_, VecDeque<Conn>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still usable; stale ones are closed.
    fn pop_usable(&self) -> Option<Conn> {
        let now = SystemTime::now();
        loop {
            let conn = self.idle().pop_back()?;
            match conn.stale(&self.settings, now) {
                None => return Some(conn),
                Some(reason) => self.discard(conn, reason),
            }
        }
    }

    /// Opens a connection within `connect_timeout` and the cutoff.
    async fn connect(&self, cut: Option<Instant>) -> Result<Conn, Error> {
        let bound = Bound::new(Some(self.settings.connect_timeout), cut);
        if let Some(b) = bound.filter(Bound::passed) {
            return Err(b.error(Phase::Connect));
        }
        let size = CountGuard::new(&self.size);
        let open = async {
            let with_password;
            let config = match &self.password {
                None => &self.settings.pg,
                Some(provider) => {
                    let password = provider.password().await.map_err(Error::Password)?;
                    let mut c = self.settings.pg.clone();
                    c.password(password);
                    with_password = c;
                    &with_password
                }
            };
            self.connector.connect(config).await.map_err(Error::Connect)
        };
        let (client, connection) = match within(bound, open).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                metrics::connect_error();
                tracing::warn!(error = %e, "pinpool: connect failed");
                return Err(e);
            }
            Err(()) => {
                metrics::connect_error();
                return Err(bound.map_or(Error::Closed, |b| b.error(Phase::Connect)));
            }
        };
        size.disarm();
        let id = self.next_id.fetch_add(1, Relaxed);
        self.counters.opened.fetch_add(1, Relaxed);
        metrics::opened();
        tracing::debug!(connection = id, "pinpool: connection opened");
        Ok(Conn::new(client, connection, id))
    }

    /// Closes a connection now and counts why.
    pub(crate) fn discard(&self, conn: Conn, reason: CloseReason) {
        let id = conn.state.id;
        drop(conn);
        self.size.fetch_sub(1, Relaxed);
        self.counters.closed(reason);
        metrics::closed(reason);
        tracing::debug!(
            connection = id,
            reason = reason.as_str(),
            "pinpool: connection closed"
        );
    }

    /// Takes a connection back from a dropped [`PooledClient`]. Synchronous: it never spawns.
    pub(crate) fn put_back(&self, mut conn: Conn) {
        let now = SystemTime::now();
        let verdict = if self.closed.load(Relaxed) {
            Some(CloseReason::PoolClosed)
        } else {
            conn.on_return(&self.settings, now)
        };
        let idle = match verdict {
            Some(reason) => {
                self.discard(conn, reason);
                self.idle().len()
            }
            None => {
                conn.last_used = now;
                let mut idle = self.idle();
                idle.push_back(conn);
                idle.len()
            }
        };
        let in_use = self.in_use.fetch_sub(1, Relaxed) - 1;
        // Only after the connection is idle, so the next waiter finds it.
        self.slots.add_permits(1);
        metrics::gauges(in_use, idle);
    }

    /// A statement may pin `state`'s connection: refuse it under the strict policy, otherwise
    /// record it and report what is new.
    pub(crate) fn on_pin(&self, state: &ConnState, pins: Reasons, sql: &str) -> Result<(), Error> {
        let statement = truncate(sql, 120);
        if self.settings.pin_policy == PinPolicy::Refuse
            && pins.iter().any(|r| r != crate::pinning::Reason::Untracked)
        {
            self.counters.refused.fetch_add(1, Relaxed);
            metrics::refused(pins);
            tracing::warn!(reasons = %pins, statement, "pinpool: refused a statement that may pin the RDS Proxy session");
            return Err(Error::PinRefused {
                reasons: pins,
                statement: statement.to_owned(),
            });
        }
        let was_pinned = !state.pinned().is_empty();
        let new = state.pin(pins, sql);
        if new.is_empty() {
            return Ok(());
        }
        if !was_pinned {
            self.counters.pinned.fetch_add(1, Relaxed);
        }
        metrics::pinned(new);
        for reason in new.iter() {
            tracing::warn!(
                connection = state.id,
                reason = reason.as_str(),
                statement,
                advice = reason.advice(),
                "pinpool: this statement may pin the RDS Proxy session"
            );
        }
        Ok(())
    }
}
