//! The invocation scope: everything a Lambda invocation does with the pool is bounded by its
//! deadline, and what it leaves behind is settled when it ends, before the environment
//! freezes.

use std::future::Future;
use std::mem::replace;
use std::panic::Location;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;

use crate::BoxFuture;
use crate::config::FreezeCheck;
use crate::conn::Conn;
use crate::deadline::Bound;
use crate::pool::PoolInner;
use crate::status::CloseReason;

tokio::task_local! {
    static CURRENT: Invocation;
}

/// The cutoffs of one pool's invocations running now, for requests written with no caller's
/// cutoff: a driver client borrowed before an invocation (`&*client` kept in a repository
/// built at start-up) and used inside it writes with none, and the connection's task then
/// bounds the request by the latest cutoff of the invocations running (one, in a Lambda
/// environment; the latest, so no invocation's request stops at another's). Nothing is locked
/// while no invocation runs.
#[derive(Default)]
pub(crate) struct Running {
    count: AtomicUsize,
    cutoffs: Mutex<Vec<(usize, Instant)>>,
}

impl Running {
    fn enter(&self, key: usize, cutoff: Instant) {
        crate::sync::lock(&self.cutoffs).push((key, cutoff));
        self.count.fetch_add(1, SeqCst);
    }

    fn leave(&self, key: usize) {
        let mut cutoffs = crate::sync::lock(&self.cutoffs);
        if let Some(i) = cutoffs.iter().position(|(k, _)| *k == key) {
            cutoffs.swap_remove(i);
            self.count.fetch_sub(1, SeqCst);
        }
    }

    /// The latest cutoff of the invocations running now, if any runs.
    pub(crate) fn latest(&self) -> Option<Instant> {
        if self.count.load(SeqCst) == 0 {
            return None;
        }
        crate::sync::lock(&self.cutoffs)
            .iter()
            .map(|(_, c)| *c)
            .max()
    }
}

/// One invocation (one Lambda event) in progress: its deadline, and the pinned connections it
/// keeps under [`PinPolicy::KeepForInvocation`](crate::PinPolicy::KeepForInvocation).
///
/// [`Pool::invocation`](crate::Pool::invocation) makes one current for the future it runs.
/// Task-locals do not cross `tokio::spawn`: carry it into a spawned task with
/// [`Invocation::scope`]. Several invocations may run at once in one process (Lambda Managed
/// Instances); nothing here is global.
#[derive(Clone)]
pub struct Invocation(pub(crate) Arc<InvocationInner>);

pub(crate) struct InvocationInner {
    deadline: SystemTime,
    /// The deadline minus its pool's `deadline_margin`, as of the start.
    cutoff: Instant,
    pool: Arc<PoolInner>,
    /// Pinned connections kept for this invocation; each still holds its pool slot.
    stash: Mutex<Vec<Conn>>,
    /// Clients checked out in this invocation and not returned: connection id, where.
    lent: Mutex<Vec<(u64, &'static Location<'static>)>>,
    /// Connections whose wire cutoff a call of this invocation set, and to what: cleared at
    /// its end ([`Invocation::touch`]).
    touched: Mutex<Vec<(std::sync::Weak<crate::wire::Wire>, Instant)>>,
    ended: AtomicBool,
}

impl Invocation {
    pub(crate) fn new(pool: Arc<PoolInner>, deadline: SystemTime) -> Invocation {
        let cutoff = crate::deadline::cutoff(deadline, pool.settings.deadline_margin);
        Invocation(Arc::new(InvocationInner {
            deadline,
            cutoff,
            pool,
            stash: Mutex::new(Vec::new()),
            lent: Mutex::new(Vec::new()),
            touched: Mutex::new(Vec::new()),
            ended: AtomicBool::new(false),
        }))
    }

    /// The invocation the current task runs in, if any.
    pub fn current() -> Option<Invocation> {
        CURRENT.try_with(Invocation::clone).ok()
    }

    /// The cutoff of the invocation the current task runs in, for a call on `pool`: its
    /// deadline minus `pool`'s margin. `None` outside any invocation.
    pub(crate) fn current_cutoff(pool: &PoolInner) -> Option<Instant> {
        CURRENT
            .try_with(|i| {
                if std::ptr::eq(Arc::as_ptr(&i.0.pool), pool) {
                    i.0.cutoff
                } else {
                    crate::deadline::cutoff(i.0.deadline, pool.settings.deadline_margin)
                }
            })
            .ok()
    }

    /// Its cutoff: the deadline minus its pool's `deadline_margin`.
    pub(crate) fn cutoff(&self) -> Instant {
        self.0.cutoff
    }

    /// Its deadline (wall clock, as Lambda gives it).
    pub fn deadline(&self) -> SystemTime {
        self.0.deadline
    }

    /// The time left until the deadline (zero when it has passed).
    pub fn remaining(&self) -> Duration {
        self.0
            .deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// True once the invocation has ended.
    pub fn has_ended(&self) -> bool {
        self.0.ended.load(Relaxed)
    }

    /// Runs `fut` inside this invocation: for a task spawned by the handler,
    /// `tokio::spawn(Invocation::current().unwrap().scope(work))`.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }

    /// Runs a synchronous function inside this invocation (a service's `call`, which may run
    /// handler code before returning its future).
    #[cfg_attr(not(feature = "lambda"), allow(dead_code))]
    pub(crate) fn sync_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self.clone(), f)
    }

    pub(crate) fn belongs_to(&self, pool: &Arc<PoolInner>) -> bool {
        Arc::ptr_eq(&self.0.pool, pool)
    }

    /// Keeps a pinned connection for this invocation; hands it back if the invocation ended.
    pub(crate) fn stash(&self, conn: Conn) -> Option<Conn> {
        let mut stash = self.0.kept();
        if self.has_ended() {
            return Some(conn);
        }
        stash.push(conn);
        None
    }

    /// A connection this invocation kept, if any (it still holds its slot).
    pub(crate) fn take_stashed(&self) -> Option<Conn> {
        self.0.kept().pop()
    }

    /// A call of the current invocation set `wire`'s cutoff to `cutoff`: at the invocation's
    /// end it is cleared, so a client kept into a later invocation does not bound what it
    /// writes unasked (a dropped statement's Close, a dropped transaction's ROLLBACK) by this
    /// invocation's cutoff, long past by then. Outside any invocation, nothing.
    pub(crate) fn touch(wire: &Arc<crate::wire::Wire>, cutoff: Instant) {
        let _ = CURRENT.try_with(|i| {
            let mut touched = crate::sync::lock(&i.0.touched);
            let known = touched
                .iter()
                .any(|(w, c)| *c == cutoff && std::ptr::eq(w.as_ptr(), Arc::as_ptr(wire)));
            if !known {
                touched.push((Arc::downgrade(wire), cutoff));
            }
        });
    }

    /// A client of this invocation was checked out at `from`.
    pub(crate) fn lend(&self, id: u64, from: &'static Location<'static>) {
        self.0.lent().push((id, from));
    }

    /// A client of this invocation came back.
    pub(crate) fn give_back(&self, id: u64) {
        let mut lent = self.0.lent();
        if let Some(i) = lent.iter().position(|(c, _)| *c == id) {
            lent.swap_remove(i);
        }
    }

    /// Ends the invocation: closes the connections it kept, and reports clients still checked
    /// out (held into the freeze that follows). Synchronous, so it also runs when the
    /// invocation's future is dropped.
    pub(crate) fn end(&self) {
        if !self.has_ended() {
            self.0.pool.running.leave(Arc::as_ptr(&self.0) as usize);
            for (id, from) in self.0.lent().iter() {
                crate::metrics::held_too_long("invocation_end");
                tracing::warn!(
                    connection = id,
                    checked_out_at = %from,
                    "pinpool: a client is still checked out when its invocation ends: it is held through the freeze"
                );
            }
        }
        let touched = std::mem::take(&mut *crate::sync::lock(&self.0.touched));
        for (wire, cutoff) in touched {
            if let Some(wire) = wire.upgrade() {
                wire.clear_cutoff_if(Some(cutoff));
            }
        }
        let kept: Vec<Conn> = {
            let mut stash = self.0.kept();
            self.0.ended.store(true, Relaxed);
            stash.drain(..).collect()
        };
        self.0.close(kept);
    }
}

impl InvocationInner {
    fn lent(&self) -> std::sync::MutexGuard<'_, Vec<(u64, &'static Location<'static>)>> {
        crate::sync::lock(&self.lent)
    }

    /// The kept connections, locked (a poisoned lock still holds a consistent list).
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        crate::sync::lock(&self.stash)
    }

    /// Closes kept connections and releases their slots.
    fn close(&self, kept: Vec<Conn>) {
        for conn in kept {
            self.pool.release_slot_of(conn, CloseReason::Pinned);
        }
    }
}

impl Drop for InvocationInner {
    fn drop(&mut self) {
        let kept = std::mem::take(
            self.stash
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.close(kept);
    }
}

/// The invocation's lifecycle around the handler, on the pool's primitives: what a freeze may
/// have broken is checked before it starts, what it left queued is settled when it ends.
impl Invocation {
    /// Before the handler runs: idle connections are checked for what a freeze may have
    /// broken (closed sockets, lifetimes, and connections idle longer than
    /// `validate_idle_after`, per [`FreezeCheck`]).
    async fn freeze_check(self, cut: Instant) {
        let pool = &*self.0.pool;
        // Let connection tasks take in what arrived while the environment was frozen
        // (end-of-stream from a closed socket marks the client closed).
        for _ in 0..2 {
            tokio::task::yield_now().await;
        }
        let now = SystemTime::now();
        let settings = &pool.settings;
        let suspect = |c: &Conn| {
            c.stale(settings, Some(now)).is_some()
                || c.state.unsettled()
                || settings
                    .validate_idle_after
                    .is_some_and(|after| c.idle_for(now) > after)
        };
        let taken = pool.take_idle(suspect);
        if taken.is_empty() {
            return;
        }
        let mut check = Vec::new();
        for (conn, permit) in taken {
            if let Some(reason) = conn.stale(settings, Some(now)) {
                pool.discard(conn, reason);
            } else if settings.freeze_check == FreezeCheck::Replace && !conn.state.unsettled() {
                pool.discard(conn, CloseReason::Stale);
            } else {
                check.push((conn, permit));
            }
        }
        // A failed check (a half-open socket answers nothing) must leave the invocation time
        // to connect afresh: at most half of what is left before the cutoff.
        let half_left = cut.saturating_duration_since(Instant::now()) / 2;
        let bound = Bound::new(Some(settings.validate_timeout.min(half_left)), Some(cut));
        let checks = pool.check_all(check, bound, CloseReason::Stale);
        let Some(patience) = settings.validate_patience else {
            return checks.await;
        };
        // A check that has not answered within `validate_patience` (a healthy one answers in a
        // round trip) races a fresh connection: whichever is ready first serves the
        // invocation, and a connection still unanswered then is closed. A flow a NAT forgot
        // costs the patience and a connect, not the check's whole bound. In a full pool no
        // spare can open: there a connection already idle (one whose check answered) serves
        // instead, as a healthy one must not wait for a silent one's bound. Looked at again
        // each `patience` while no slot is free.
        let spare = async {
            loop {
                tokio::time::sleep(patience).await;
                match pool.open_idle(Some(cut)).await {
                    Ok(true) => return,
                    Ok(false) if pool.idle_len() > 0 => return,
                    Ok(false) => {}
                    // The connect failed: the checks decide.
                    Err(_) => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            biased;
            () = checks => {}
            () = spare => {}
        }
    }

    /// After the handler, once the invocation has ended (its kept pinned connections closed):
    /// make sure queued requests (a dropped transaction's ROLLBACK, what raw access left)
    /// reached the server and left the connection clean, trim, and refill up to `min_idle`
    /// (`refill_after_invocation`). Stops at the invocation's cutoff like everything else:
    /// Lambda counts this time, and a connection whose round trip does not come back by then
    /// is closed (which ends its transaction on the server).
    async fn settle(self, cut: Instant) {
        let pool = &*self.0.pool;
        let settings = &pool.settings;
        let queued = pool.take_idle(|c| c.state.unsettled());
        if !queued.is_empty() {
            let bound = Bound::new(Some(settings.validate_timeout), Some(cut));
            pool.check_all(queued, bound, CloseReason::Broken).await;
        }
        if settings.trim_at_invocation_end {
            pool.trim_idle();
        }
        // Connections closed in this invocation (pinned ones above all) are replaced now,
        // after the response, not on the next invocation's critical path.
        if let Some(limit) = settings.refill_after_invocation
            && pool.idle_len() < settings.min_idle
        {
            let until = cut.min(crate::deadline::after(limit));
            if let Err(e) = pool.fill_to_min_idle(Some(until)).await {
                tracing::debug!(error = %e, "pinpool: no replacement connection after the invocation");
            }
        }
    }
}

/// Ends the invocation when dropped: the `invocation()` future may be dropped at any await.
pub(crate) struct EndOnDrop(pub(crate) Invocation);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl std::fmt::Debug for Invocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invocation")
            .field("deadline", &self.0.deadline)
            .field("ended", &self.has_ended())
            .finish()
    }
}

pin_project! {
    /// The future of one invocation, from [`Pool::invocation`](crate::Pool::invocation) and
    /// the Lambda layer: the freeze checks, the handler's future inside the invocation scope,
    /// then the end-of-invocation work. `Send` when the handler's future is (so
    /// `Runtime::run_concurrent` works). Dropped at any point, it still ends the invocation.
    pub struct InvocationFuture<F: Future> {
        #[pin]
        run: TaskLocalFuture<Invocation, F>,
        stage: Stage<F::Output>,
        cut: Instant,
    }
}

/// Where an invocation is. Until the handler's future finishes, the stage holds the
/// [`EndOnDrop`] that ends the invocation if it is dropped.
enum Stage<T> {
    /// The freeze check runs; the handler has not started.
    Check(BoxFuture<'static, ()>, EndOnDrop),
    /// The handler runs.
    Run(EndOnDrop),
    /// The invocation has ended; the end-of-invocation work runs, the handler's output waits.
    Settle(BoxFuture<'static, ()>, T),
    /// The output was returned.
    Done,
}

impl<F: Future> InvocationFuture<F> {
    pub(crate) fn new(inv: Invocation, fut: F, cut: Instant) -> Self {
        // Left in `end`, which the `EndOnDrop` below makes sure runs.
        inv.0.pool.running.enter(Arc::as_ptr(&inv.0) as usize, cut);
        InvocationFuture {
            stage: Stage::Check(
                Box::pin(inv.clone().freeze_check(cut)),
                EndOnDrop(inv.clone()),
            ),
            run: CURRENT.scope(inv, fut),
            cut,
        }
    }
}

impl<F: Future> Future for InvocationFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        loop {
            match this.stage {
                Stage::Check(check, _) => {
                    ready!(check.as_mut().poll(cx));
                    if let Stage::Check(_, end) = replace(this.stage, Stage::Done) {
                        *this.stage = Stage::Run(end);
                    }
                }
                Stage::Run(_) => {
                    let out = ready!(this.run.as_mut().poll(cx));
                    if let Stage::Run(end) = replace(this.stage, Stage::Done) {
                        let inv = end.0.clone();
                        // Ends the invocation: the pinned connections it kept close now.
                        drop(end);
                        *this.stage = Stage::Settle(Box::pin(inv.settle(*this.cut)), out);
                    }
                }
                Stage::Settle(settle, _) => {
                    ready!(settle.as_mut().poll(cx));
                    if let Stage::Settle(_, out) = replace(this.stage, Stage::Done) {
                        return Poll::Ready(out);
                    }
                }
                Stage::Done => panic!("InvocationFuture polled after completion"),
            }
        }
    }
}
