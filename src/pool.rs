//! The pool: `max_size` slots, a stack of idle connections and a FIFO queue of waiters, all
//! under one lock (`slots.rs`).
//!
//! Invariants:
//! - every checked-out connection and every connection being opened holds one slot; idle
//!   connections hold none;
//! - `size` counts connections open or being opened, so `size <= max_size`;
//! - a connection returns to the idle set only with a known, clean protocol state, as its
//!   protocol stream shows it (`Health::verdict`): at rest and idle, or with nothing ahead of
//!   the next caller but a dropped transaction's ROLLBACK.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::Location;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;

use crate::client::PooledClient;
use crate::config::{Builder, ConnectionConfig, Settings};
use crate::conn::{Conn, ConnState, Fate, truncate};
use crate::connect::{Connect, SharedPasswordProvider};
use crate::deadline::{Bound, cutoff, earlier, until, within};
use crate::error::{Error, Phase};
use crate::invocation::{Invocation, InvocationFuture, Running};
use crate::metrics;
use crate::pinning::Reasons;
use crate::slots::{Acquired, Locked, Permit, Slots};
use crate::status::{CloseReason, Counters, Gauges, Status};

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
    /// The slots, the idle set and the waiters, under one lock; also the in-use count.
    slots: Arc<Slots>,
    size: AtomicUsize,
    closed: AtomicBool,
    next_id: AtomicU64,
    pub(crate) counters: Counters,
    /// The cutoffs of this pool's invocations running now (see [`Running`]).
    pub(crate) running: Arc<Running>,
    /// The shapes of statements prepared on any of its connections.
    pub(crate) learned: crate::cache::Learned,
}

/// Undoes a count on drop unless disarmed: keeps `size` right when a `get()`
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
                slots: Slots::new(settings.max_size),
                settings,
                connector,
                password,
                size: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
                running: Arc::default(),
                learned: Default::default(),
            }),
        }
    }

    /// The same settings, with connections from `connector` (the in-memory tests' seam).
    #[cfg(test)]
    pub(crate) fn with_connector(self, connector: Arc<dyn Connect>) -> Pool {
        Pool::from_parts(self.inner.settings.clone(), connector, None)
    }

    /// Checks out a connection, waiting at most `acquire_timeout` for a free one and at most
    /// `connect_timeout` to open a new one. Waiters are served in order.
    ///
    /// # Errors
    /// [`Error::Timeout`] (phase acquire or connect), [`Error::Connect`],
    /// [`Error::Password`], [`Error::Closed`].
    #[track_caller]
    pub fn get(&self) -> impl Future<Output = Result<PooledClient, Error>> + Send + '_ {
        // Where the client is checked out, for the held-too-long warnings (a `#[track_caller]`
        // async fn would not see its caller).
        let from = Location::caller();
        async move { self.checkout(None, from).await }
    }

    /// Runs `fut` as one invocation with `deadline` (a Lambda invocation's): every `get()`,
    /// connect and statement inside it, and inside tasks it carries the [`Invocation`] into,
    /// stops at `deadline - deadline_margin`.
    ///
    /// Before `fut` starts, idle connections are checked for what a freeze may have broken:
    /// closed sockets, lifetimes, and connections idle longer than `validate_idle_after` per
    /// [`FreezeCheck`](crate::FreezeCheck). When it ends (finished, failed or dropped), the pinned connections it
    /// kept are closed; then connections whose dropped transaction queued a `ROLLBACK` are
    /// checked with a round trip, so the rollback has reached the server before the
    /// environment freezes; and with `trim_at_invocation_end`, idle connections beyond
    /// `min_idle` are closed. Nothing runs between invocations.
    pub fn invocation<F: std::future::Future>(
        &self,
        deadline: SystemTime,
        fut: F,
    ) -> InvocationFuture<F> {
        let inv = Invocation::new(self.inner.clone(), deadline);
        self.invocation_future(inv, fut)
    }

    /// A new invocation of this pool, for integrations that must enter it before they have
    /// the future to run (the Lambda layer).
    #[cfg_attr(not(feature = "lambda"), allow(dead_code))]
    pub(crate) fn new_invocation(&self, deadline: SystemTime) -> Invocation {
        Invocation::new(self.inner.clone(), deadline)
    }

    /// Runs `fut` as the invocation `inv`: the freeze checks, `fut` in the scope, then the
    /// end-of-invocation work.
    pub(crate) fn invocation_future<F: std::future::Future>(
        &self,
        inv: Invocation,
        fut: F,
    ) -> InvocationFuture<F> {
        let cut = inv.cutoff();
        InvocationFuture::new(inv, fut, cut)
    }

    /// Like [`get`](Self::get), but nothing (waiting, connecting, and every statement of the
    /// returned client) runs past `deadline - deadline_margin`. Give it the Lambda
    /// invocation's deadline.
    ///
    /// # Errors
    /// As [`get`](Self::get); a deadline already within the margin fails at once.
    #[track_caller]
    pub fn get_by(
        &self,
        deadline: SystemTime,
    ) -> impl Future<Output = Result<PooledClient, Error>> + Send + '_ {
        let from = Location::caller();
        async move {
            let cut = cutoff(deadline, self.inner.settings.deadline_margin);
            self.checkout(Some(cut), from).await
        }
    }

    async fn checkout(
        &self,
        cut: Option<Instant>,
        from: &'static Location<'static>,
    ) -> Result<PooledClient, Error> {
        loop {
            let mut client = self.checkout_once(cut).await?;
            client.lent_from(from);
            // Raw access may have left a request queued and unwritten (a raw call dropped
            // early): a round trip writes and answers it before anyone's statements run, then
            // the wire decides. One that fails is closed on return and the next is tried.
            if !client.raw_used() || client.settle_raw().await {
                return Ok(client);
            }
        }
    }

    async fn checkout_once(&self, cut: Option<Instant>) -> Result<PooledClient, Error> {
        let inner = &*self.inner;
        if inner.closed.load(Relaxed) {
            return Err(Error::Closed);
        }
        // A checkout that finds a free connection never waits, so without this a task looping
        // over get() would never yield to tokio's scheduler and starve the others (tokio's
        // own Semaphore::acquire takes part in the budget the same way). Nothing is held yet:
        // dropped here, nothing leaks.
        tokio::task::consume_budget().await;
        let explicit = cut;
        let current = Invocation::current();
        let cut = earlier(cut, Invocation::current_cutoff(inner));
        let inv = current.filter(|i| i.belongs_to(&self.inner));
        if let Some(b) = cut
            .and_then(|_| Bound::new(None, cut))
            .filter(Bound::passed)
        {
            return Err(b.timed_out(Phase::Acquire));
        }
        // A pinned connection this invocation kept already holds its slot. One closed since
        // (its backend ended, or its task with its runtime) is closed with its slot freed,
        // and the next kept one, or the pool, serves instead.
        while let Some(conn) = inv.as_ref().and_then(Invocation::take_stashed) {
            if let Some(reason) = conn.stale(&inner.settings, None) {
                inner.release_slot_of(conn, reason);
                continue;
            }
            let in_use = inner.slots.in_use.fetch_add(1, Release) + 1;
            metrics::gauges(in_use, inner.slots.idle_count());
            return Ok(PooledClient::new(
                conn,
                self.inner.clone(),
                (cut, explicit),
                inv,
            ));
        }
        // One lock finds a free slot and an idle connection, or queues the caller with its
        // bound (the only clock read of a checkout that finds a connection idle is its age).
        let acquire = inner
            .slots
            .acquire(Some(inner.settings.acquire_timeout), cut);
        let (conn, in_use, waited) = match acquire.await {
            Acquired::Idle(conn, in_use, permit) => {
                let now = Some(SystemTime::now());
                let (conn, in_use) = inner.accept(conn, in_use, permit, now, cut).await?;
                (conn, in_use, Duration::ZERO)
            }
            Acquired::Empty(permit) => {
                let (conn, in_use) = inner.fill(permit, cut, false).await?;
                (conn, in_use, Duration::ZERO)
            }
            // Still counted in use; its lifetime was checked as it came back, and its socket
            // may have closed since.
            Acquired::HandedOver(conn, permit, waited) => {
                let in_use = inner.slots.in_use.load(Relaxed);
                let (conn, in_use) = inner.accept(conn, in_use, permit, None, cut).await?;
                (conn, in_use, waited)
            }
            Acquired::Slot(permit, waited) => {
                let (conn, in_use) = inner.fill(permit, cut, true).await?;
                (conn, in_use, waited)
            }
            Acquired::TimedOut(b) => return Err(b.timed_out(Phase::Acquire)),
            Acquired::Closed => return Err(Error::Closed),
        };
        // From here the PooledClient owns the slot; its return frees it.
        metrics::checked_out(waited, in_use, inner.slots.idle_count());
        Ok(PooledClient::new(
            conn,
            self.inner.clone(),
            (cut, explicit),
            inv,
        ))
    }

    /// Opens connections until `min_idle` are idle (never more than `max_size` in all).
    /// Nothing opens connections in the background: call this where waiting is free, such as
    /// Lambda's INIT phase. Returns how many it opened.
    ///
    /// # Errors
    /// The first connect error; connections opened before it stay.
    pub async fn warm_up(&self) -> Result<usize, Error> {
        self.warm_up_until(None).await
    }

    /// [`warm_up`](Self::warm_up) for Lambda's INIT phase: best-effort, and done within
    /// `limit` in all (each connect also within `connect_timeout`). A failure is logged
    /// (`tracing` warning) and counted (`pinpool_connect_errors`, `pinpool_timeouts`), never
    /// returned: INIT must not fail because the database is down, or every request that
    /// environment would serve becomes an opaque Lambda error. The invocations then open
    /// connections themselves, within their deadlines, and answer with a typed error while the
    /// database stays down. Returns how many connections it opened.
    ///
    /// Lambda gives INIT 10 s in all; 2 s (`Duration::from_secs(2)`) leaves most of it to the
    /// rest of the handler's initialisation and is far longer than a connect through RDS Proxy
    /// takes.
    pub async fn warm_up_within(&self, limit: Duration) -> usize {
        let before = self.inner.idle().len();
        match self
            .warm_up_until(Some(crate::deadline::after(limit)))
            .await
        {
            Ok(n) => n,
            Err(e) => {
                let opened = self.inner.idle().len().saturating_sub(before);
                tracing::warn!(error = %e, opened, "pinpool: warm-up failed; invocations will connect themselves");
                opened
            }
        }
    }

    async fn warm_up_until(&self, cut: Option<Instant>) -> Result<usize, Error> {
        self.inner.fill_to_min_idle(cut).await
    }

    /// A snapshot of the pool's state and counters.
    pub fn status(&self) -> Status {
        let inner = &*self.inner;
        // One consistent picture: connections move between idle and in use under the idle
        // set's lock; `size` grows before a new connection counts as in use and shrinks after
        // a closed one stopped counting. So `idle + in_use <= size` always holds here.
        let (idle, in_use, size, waiters) = {
            let idle = inner.idle();
            let in_use = inner.slots.in_use.load(Acquire);
            (idle.len(), in_use, inner.size.load(Acquire), idle.waiters())
        };
        inner.counters.status(Gauges {
            max_size: inner.settings.max_size,
            size,
            idle,
            in_use,
            waiters,
        })
    }

    /// Closes every idle connection and refuses new `get()`s; checked-out connections are
    /// closed when they are returned.
    pub fn close(&self) {
        let inner = &*self.inner;
        inner.closed.store(true, Relaxed);
        let drained = inner.slots.close();
        inner.discard_all(drained, CloseReason::PoolClosed);
    }

    /// Closes every idle connection now (checked-out ones are unaffected). For a SnapStart
    /// snapshot, or before a long pause.
    pub fn close_idle(&self) {
        let drained: Vec<Conn> = self.inner.idle().drain(..).collect();
        self.inner.discard_all(drained, CloseReason::Stale);
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
    /// The idle set and the slots, locked.
    fn idle(&self) -> Locked<'_> {
        self.slots.lock()
    }

    /// The connection a checkout got with its slot (counted in use), if it is still usable
    /// (its age checked at `now`, if given); else it is closed and another one takes its place
    /// in the slot.
    async fn accept(
        &self,
        conn: Conn,
        in_use: usize,
        permit: Permit<'_>,
        now: Option<SystemTime>,
        cut: Option<Instant>,
    ) -> Result<(Conn, usize), Error> {
        let Some(reason) = conn.stale(&self.settings, now) else {
            // The checkout holds the slot from here.
            permit.forget();
            return Ok((conn, in_use));
        };
        // Out of the in-use count under the lock, before it is closed (see `status`).
        {
            let _idle = self.idle();
            self.slots.in_use.fetch_sub(1, Release);
        }
        self.discard(conn, reason);
        self.fill(permit, cut, true).await
    }

    /// A connection for a checkout that holds `permit`: an idle one (if `look` says one may
    /// be there), else a new one. Dropped or failed, the slot is freed.
    async fn fill(
        &self,
        permit: Permit<'_>,
        cut: Option<Instant>,
        look: bool,
    ) -> Result<(Conn, usize), Error> {
        let filled = match look.then(|| self.pop_usable()).flatten() {
            Some(popped) => popped,
            None => {
                // Boxed: opening is rare, and its state would make every `get()` future large.
                let conn = Box::pin(self.connect(cut)).await?;
                (conn, self.slots.in_use.fetch_add(1, Release) + 1)
            }
        };
        permit.forget();
        Ok(filled)
    }

    /// The most recently used idle connection that is still usable; stale ones are closed.
    /// Counts it in use under the idle set's lock (see [`Pool::status`]); returns it with
    /// the new in-use count.
    fn pop_usable(&self) -> Option<(Conn, usize)> {
        self.take_usable(
            Some(SystemTime::now()),
            |_| true,
            |_| self.slots.in_use.fetch_add(1, Release) + 1,
        )
    }

    /// The most recently used idle connection that `pick` accepts and that is still usable
    /// (its age checked at `now`, if given); stale ones found on the way are closed. `taken`
    /// runs under the idle set's lock, with the connection out of it, to move its count (see
    /// [`Pool::status`]); its answer comes back with the connection.
    fn take_usable<R>(
        &self,
        now: Option<SystemTime>,
        pick: impl Fn(&Conn) -> bool,
        taken: impl FnOnce(&VecDeque<Conn>) -> R,
    ) -> Option<(Conn, R)> {
        loop {
            let mut idle = self.idle();
            let at = idle.iter().rposition(&pick)?;
            let conn = idle.remove(at)?;
            match conn.stale(&self.settings, now) {
                None => {
                    let r = taken(&idle);
                    return Some((conn, r));
                }
                Some(reason) => {
                    drop(idle);
                    self.discard(conn, reason);
                }
            }
        }
    }

    /// Opens a connection within `connect_timeout` and the cutoff, counted in `size` from the
    /// start.
    async fn connect(&self, cut: Option<Instant>) -> Result<Conn, Error> {
        let size = CountGuard::new(&self.size);
        let conn = self.open(cut).await?;
        size.disarm();
        Ok(conn)
    }

    /// Opens a connection within `connect_timeout` and the cutoff; the caller counts it in
    /// `size`.
    async fn open(&self, cut: Option<Instant>) -> Result<Conn, Error> {
        let bound = Bound::new(Some(self.settings.connect_timeout), cut);
        if let Some(b) = bound.filter(Bound::passed) {
            return Err(b.timed_out(Phase::Connect));
        }
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
            self.connector
                .connect(config, self.settings.pin_rules)
                .await
                .map_err(Error::Connect)
        };
        let opened = match within(bound, Phase::Connect, open).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                metrics::connect_error();
                tracing::warn!(error = %e, "pinpool: connect failed");
                return Err(e);
            }
            Err(timeout) => {
                metrics::connect_error();
                return Err(timeout);
            }
        };
        let id = self.next_id.fetch_add(1, Relaxed);
        self.counters.opened();
        tracing::debug!(connection = id, "pinpool: connection opened");
        Ok(Conn::new(
            opened,
            id,
            self.settings.query_timeout,
            &self.running,
        ))
    }

    /// A connection to take the place of connection `old` in a checkout: `old` was closed (its
    /// task ended) before anything of the checkout was sent on it (the retry rule in
    /// `client/retry.rs`). The replacement takes over `old`'s slot and its place in `size`, so
    /// capacity is neither leaked nor counted twice. It is an idle connection `get()` would
    /// hand out as it is (that one brings its own place, so `old`'s is given up under the idle
    /// set's lock, and `status()` never sees both), or else a new one opened within
    /// `connect_timeout` and `cut` (it takes `old`'s place, which `old` holds until then).
    /// Nothing changes until the replacement is in hand, and then synchronously: dropped at
    /// any await, this leaves `old` the checkout's connection, to be discarded as broken on
    /// return. On success `old` is counted closed here.
    pub(crate) async fn replacement(&self, old: u64, cut: Option<Instant>) -> Result<Conn, Error> {
        // Connection tasks first take in what arrived with this close: a proxy restart closes
        // every socket, the idle ones' too, and their ends are read before one is picked.
        tokio::task::yield_now().await;
        if self.closed.load(Relaxed) {
            return Err(Error::Closed);
        }
        // The most recently used one that `get()` would hand out without a round trip: one
        // with raw access unsettled may still have a request queued (a raw BEGIN, say) that
        // would run ahead of the retried statement. It stays for a `get()` to settle.
        let idle = self.take_usable(
            Some(SystemTime::now()),
            |c| !c.state.raw_used(),
            |idle| {
                // `old` gives up its place: the idle connection had one of its own.
                self.size.fetch_sub(1, Relaxed);
                idle.len()
            },
        );
        let conn = match idle {
            Some((conn, idle)) => {
                metrics::gauges(self.slots.in_use.load(Relaxed), idle);
                conn
            }
            None => self.open(cut).await?,
        };
        self.counters.closed(CloseReason::Broken);
        tracing::debug!(
            connection = old,
            replacement = conn.state.id,
            "pinpool: connection closed before anything was sent on it; replaced in its checkout"
        );
        Ok(conn)
    }

    /// A call runs again on connection `fresh`, which replaced `old` in its checkout.
    pub(crate) fn retried(&self, old: u64, fresh: u64) {
        self.counters.retried();
        tracing::debug!(
            connection = old,
            replacement = fresh,
            "pinpool: a statement found its connection closed before it was sent; run again on a fresh one"
        );
    }

    /// Closes a connection now (its socket is closed when this returns) and counts why.
    pub(crate) fn discard(&self, conn: Conn, reason: CloseReason) {
        let id = conn.state.id;
        conn.state.close();
        drop(conn);
        self.size.fetch_sub(1, Relaxed);
        self.counters.closed(reason);
        tracing::debug!(
            connection = id,
            reason = reason.as_str(),
            "pinpool: connection closed"
        );
    }

    /// Closes `conns` (taken out of the idle set, outside its lock) and counts why.
    fn discard_all(&self, conns: impl IntoIterator<Item = Conn>, reason: CloseReason) {
        for conn in conns {
            self.discard(conn, reason);
        }
    }

    /// Takes a connection back from a dropped [`PooledClient`]. Synchronous: it never spawns.
    /// `from`: where the client was checked out, for a pin raw access left unreported.
    pub(crate) fn put_back(
        &self,
        mut conn: Conn,
        inv: Option<&Invocation>,
        from: &'static Location<'static>,
    ) {
        // The caller's cutoff is not the next one's: what is still written (a dropped
        // transaction's ROLLBACK) is bounded by `query_timeout` alone.
        let _ = conn.state.wire.set_cutoff(None);
        if let Some(inv) = inv {
            inv.give_back(conn.state.id);
        }
        self.report_pins(&conn.state, Some(from));
        let now = SystemTime::now();
        let fate = if self.closed.load(Relaxed) {
            Fate::Close(CloseReason::PoolClosed)
        } else {
            conn.fate(&self.settings, now, inv.is_some())
        };
        let verdict = match (fate, inv) {
            (Fate::KeepForInvocation, Some(inv)) => match inv.stash(conn) {
                None => {
                    // Kept for the invocation, with its slot.
                    let in_use = self.slots.in_use.fetch_sub(1, Release) - 1;
                    // Not under the lock: a recorder may look at the pool.
                    metrics::gauges(in_use, self.slots.idle_count());
                    return;
                }
                // The invocation has ended: nothing keeps it.
                Some(back) => {
                    conn = back;
                    Some(CloseReason::Pinned)
                }
            },
            (Fate::KeepForInvocation, None) => Some(CloseReason::Pinned),
            (Fate::Close(reason), _) => Some(reason),
            (Fate::Idle, _) => None,
        };
        // A clean one goes to the first waiter, or joins the idle set, in one step.
        let returned = match verdict {
            None => {
                conn.last_used = now;
                self.slots
                    .give_back(conn)
                    .map_err(|conn| (conn, CloseReason::PoolClosed))
            }
            Some(reason) => Err((conn, reason)),
        };
        let (in_use, idle) = returned.unwrap_or_else(|(conn, reason)| {
            // It leaves the in-use count under the idle set's lock, before it is closed, so
            // `status()` never counts it twice; its slot is freed once it is closed and
            // uncounted, so a waiter that opens a connection in it stays within `max_size`.
            let in_use = {
                let _idle = self.idle();
                self.slots.in_use.fetch_sub(1, Release) - 1
            };
            self.discard(conn, reason);
            self.slots.release();
            (in_use, self.slots.idle_count())
        });
        metrics::gauges(in_use, idle);
    }

    /// Closes a connection that held a slot outside the idle set (kept for an invocation).
    pub(crate) fn release_slot_of(&self, conn: Conn, reason: CloseReason) {
        self.discard(conn, reason);
        self.slots.release();
    }

    /// Takes the idle connections `pick` selects out of the idle set, each with a slot, so
    /// they can be checked without other callers opening more connections meanwhile.
    pub(crate) fn take_idle(&self, pick: impl Fn(&Conn) -> bool) -> Vec<(Conn, Permit<'_>)> {
        let mut taken = Vec::new();
        let mut idle = self.idle();
        let mut left = VecDeque::with_capacity(idle.len());
        // In order; once no slot is free, the rest stay.
        while let Some(conn) = idle.pop_front() {
            if pick(&conn)
                && let Some(permit) = idle.take_free()
            {
                taken.push((conn, permit));
            } else {
                left.push_back(conn);
            }
        }
        *idle = left;
        taken
    }

    /// Checks connections with a round trip, all within one bound; the ones that answer go
    /// back to the idle set, the others are closed as `reason`.
    pub(crate) async fn check_all(
        &self,
        conns: Vec<(Conn, Permit<'_>)>,
        bound: Option<Bound>,
        reason: CloseReason,
    ) {
        // Dropped mid-way (the invocation ended, or a spare connection came first), each
        // connection not yet answered is closed and counted: its round trip's state is unknown.
        struct Checking<'a> {
            pool: &'a PoolInner,
            conn: Option<(Conn, Permit<'a>)>,
            reason: CloseReason,
        }
        impl Drop for Checking<'_> {
            fn drop(&mut self) {
                // The slot is released after its connection is closed and uncounted.
                if let Some((conn, _permit)) = self.conn.take() {
                    self.pool.discard(conn, self.reason);
                }
            }
        }
        // Side by side, each handled as it answers: a connection that answers nothing (a flow a
        // NAT forgot) must not use up the bound of the healthy ones, nor keep them from the
        // idle set.
        let mut answers: FuturesUnordered<_> = conns
            .into_iter()
            .map(|c| async move {
                let mut checking = Checking {
                    pool: self,
                    conn: Some(c),
                    reason,
                };
                let answer = match &checking.conn {
                    Some((conn, _)) => until(bound, conn.client.check_connection()).await,
                    None => None,
                };
                (checking.conn.take(), answer)
            })
            .collect();
        while let Some((checked, answer)) = answers.next().await {
            let Some((mut conn, permit)) = checked else {
                continue;
            };
            let ok = matches!(answer, Some(Ok(())));
            if ok {
                // The round trip came after whatever was queued: the wire now tells all.
                conn.state.settle();
                self.report_pins(&conn.state, None);
                let now = SystemTime::now();
                // Outside any checkout: nothing keeps a pinned connection here.
                match conn.fate(&self.settings, now, false) {
                    Fate::Idle => {
                        conn.last_used = now;
                        let pushed = self.idle().push_idle(conn);
                        if let Err(conn) = pushed {
                            self.discard(conn, CloseReason::PoolClosed);
                        }
                    }
                    Fate::Close(reason) => self.discard(conn, reason),
                    Fate::KeepForInvocation => self.discard(conn, CloseReason::Pinned),
                }
            } else {
                self.discard(conn, reason);
            }
            drop(permit);
        }
    }

    /// The idle connections beyond the `min_idle` most recently used, out of the idle set
    /// and closed as trimmed.
    pub(crate) fn trim_idle(&self) {
        let extra: Vec<Conn> = {
            let mut idle = self.idle();
            let extra = idle.len() - self.settings.min_idle.min(idle.len());
            // The most recently used stay (they are popped first).
            idle.drain(..extra).collect()
        };
        self.discard_all(extra, CloseReason::Trimmed);
    }

    /// How many connections are idle now.
    pub(crate) fn idle_len(&self) -> usize {
        self.idle().len()
    }

    /// Opens connections until `min_idle` are idle (never more than `max_size` in all, and
    /// only with a free slot: a waiting caller comes first), each within `connect_timeout`
    /// and `cut`. Returns how many it opened. Cancel safe: a connect dropped mid-way undoes
    /// its count and frees its slot.
    pub(crate) async fn fill_to_min_idle(&self, cut: Option<Instant>) -> Result<usize, Error> {
        let mut opened = 0;
        while self.idle_len() < self.settings.min_idle && self.open_idle(cut).await? {
            opened += 1;
        }
        Ok(opened)
    }

    /// Opens one connection into the idle set if a slot is free (a waiting caller comes
    /// first), within `connect_timeout` and `cut`. False when no slot was free or the pool
    /// closed meanwhile. Cancel safe, as [`PoolInner::fill_to_min_idle`].
    pub(crate) async fn open_idle(&self, cut: Option<Instant>) -> Result<bool, Error> {
        let Some(permit) = self.idle().take_free_to_open() else {
            return Ok(false);
        };
        let conn = self.connect(cut).await?;
        let pushed = self.idle().push_idle(conn);
        if let Err(conn) = pushed {
            // Closed meanwhile.
            self.discard(conn, CloseReason::PoolClosed);
            return Ok(false);
        }
        drop(permit);
        Ok(true)
    }

    /// A client held from `since` (checked out at `from`) is being returned: warn and count
    /// when that was longer than `held_too_long`.
    pub(crate) fn note_held(&self, since: Option<Instant>, from: &'static Location<'static>) {
        let (Some(since), Some(limit)) = (since, self.settings.held_too_long) else {
            return;
        };
        let held = since.elapsed();
        if held > limit {
            metrics::held_too_long("returned");
            tracing::warn!(
                held_ms = held.as_millis() as u64,
                checked_out_at = %from,
                "pinpool: a client was held longer than held_too_long"
            );
        }
    }

    /// Refuses a statement that may pin, under the strict policy: counts and logs it, by its
    /// digest as a pin is ([`pinning::digest`](crate::pinning::digest): no value it carried).
    pub(crate) fn refuse(&self, pins: Reasons, sql: &str) -> Error {
        let statement = truncate(sql, 120);
        self.counters.refused(pins);
        let digest = crate::pinning::digest(statement);
        tracing::warn!(reasons = %pins, digest, "pinpool: refused a statement that may pin the RDS Proxy session");
        Error::PinRefused {
            reasons: pins,
            statement: statement.to_owned(),
        }
    }

    /// Counts the pin reasons the wire saw on `state`'s connection since the last report,
    /// and logs each statement that brought new ones the first time this process sees its
    /// digest ([`pinning::digest`](crate::pinning::digest): no value it carried), with where
    /// the call that sent it was made (`at`, else where the client was checked out).
    pub(crate) fn report_pins(&self, state: &ConnState, at: Option<&'static Location<'static>>) {
        let (new, was_pinned) = state.unreported_pins();
        if new.is_empty() {
            return;
        }
        self.counters.pinned(new, !was_pinned);
        let at = at.map_or_else(|| "unknown".to_owned(), ToString::to_string);
        // Each statement that brought new reasons is logged as itself: a pinned connection
        // may be pinned for another reason by a later statement, with its own digest and line.
        // Every reason is listed with its message before the wire sets it: none is missed.
        for (reasons, statement) in state.take_new_pins() {
            let digest = crate::pinning::digest(&statement);
            if !first_pin_of(&digest, reasons) {
                tracing::debug!(connection = state.id, reasons = %reasons, digest, at, "pinpool: this connection may be pinned");
                continue;
            }
            let advice: Vec<&str> = reasons.iter().map(|r| r.advice()).collect();
            tracing::warn!(
                connection = state.id,
                reasons = %reasons,
                digest,
                at,
                advice = advice.join("; "),
                "pinpool: a statement pinned the connection (logged once per statement and process; pinpool_pinned counts each)"
            );
        }
    }
}

/// True the first time this process sees a pinning statement's digest with these reasons: its
/// log line is written once. The reasons are part of the key: the digest of a text cut at 120
/// characters may be the same for statements that pin differently after the cut. Bounded: past
/// 4,096 digests, none is new any more.
fn first_pin_of(digest: &str, reasons: Reasons) -> bool {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    static SEEN: std::sync::Mutex<Option<HashSet<u64>>> = std::sync::Mutex::new(None);
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one((digest, reasons.bits()));
    let mut seen = crate::sync::lock(&SEEN);
    let seen = seen.get_or_insert_with(HashSet::new);
    seen.len() < 4096 && seen.insert(hash)
}
