//! The invocation scope: everything a Lambda invocation does with the pool is bounded by its
//! deadline, and what it leaves behind is settled when it ends, before the environment
//! freezes.

use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use crate::BoxFuture;
use crate::conn::Conn;
use crate::pool::PoolInner;
use crate::status::CloseReason;

tokio::task_local! {
    static CURRENT: Invocation;
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
    pool: Arc<PoolInner>,
    /// Pinned connections kept for this invocation; each still holds its pool slot.
    stash: Mutex<Vec<Conn>>,
    /// Clients checked out in this invocation and not returned: connection id, where.
    lent: Mutex<Vec<(u64, &'static Location<'static>)>>,
    ended: AtomicBool,
}

impl Invocation {
    pub(crate) fn new(pool: Arc<PoolInner>, deadline: SystemTime) -> Invocation {
        Invocation(Arc::new(InvocationInner {
            deadline,
            pool,
            stash: Mutex::new(Vec::new()),
            lent: Mutex::new(Vec::new()),
            ended: AtomicBool::new(false),
        }))
    }

    /// The invocation the current task runs in, if any.
    pub fn current() -> Option<Invocation> {
        CURRENT.try_with(Invocation::clone).ok()
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
            for (id, from) in self.0.lent().iter() {
                crate::metrics::held_too_long("invocation_end");
                tracing::warn!(
                    connection = id,
                    checked_out_at = %from,
                    "pinpool: a client is still checked out when its invocation ends: it is held through the freeze"
                );
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
        check: Option<BoxFuture<'static, ()>>,
        #[pin]
        run: TaskLocalFuture<Invocation, F>,
        end: Option<EndOnDrop>,
        // The end-of-invocation work; an async block, so it does nothing until polled.
        settle: Option<BoxFuture<'static, ()>>,
        out: Option<F::Output>,
    }
}

impl<F: Future> InvocationFuture<F> {
    pub(crate) fn new(
        check: BoxFuture<'static, ()>,
        inv: Invocation,
        fut: F,
        settle: BoxFuture<'static, ()>,
    ) -> Self {
        InvocationFuture {
            check: Some(check),
            end: Some(EndOnDrop(inv.clone())),
            run: CURRENT.scope(inv, fut),
            settle: Some(settle),
            out: None,
        }
    }
}

impl<F: Future> Future for InvocationFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Some(check) = this.check.as_mut() {
            ready!(check.as_mut().poll(cx));
            *this.check = None;
        }
        if this.out.is_none() {
            let out = ready!(this.run.poll(cx));
            *this.out = Some(out);
            // Ends the invocation: the pinned connections it kept close now.
            drop(this.end.take());
        }
        if let Some(settle) = this.settle.as_mut() {
            ready!(settle.as_mut().poll(cx));
            *this.settle = None;
        }
        Poll::Ready(
            this.out
                .take()
                .expect("InvocationFuture polled after completion"),
        )
    }
}
