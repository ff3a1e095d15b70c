//! Lambda integration (feature `lambda`): a `lambda_runtime` layer that runs each invocation
//! in the pool's invocation scope, and a SnapStart hook.
//!
//! ```no_run
//! # async fn demo(pool: pinpool::Pool) -> Result<(), lambda_runtime::Error> {
//! use lambda_runtime::{LambdaEvent, Runtime, service_fn};
//!
//! async fn handler(event: LambdaEvent<serde_json::Value>) -> Result<serde_json::Value, lambda_runtime::Error> {
//!     Ok(event.payload)
//! }
//!
//! Runtime::new(service_fn(handler))
//!     // Innermost: each invocation's deadline bounds the pool; its pinned connections
//!     // close after the response is posted, before the next event is requested.
//!     .layer(pinpool::lambda::PoolLayer::new(pool.clone()))
//!     // Outer layers (an EMF metrics flush) run after the pool's end-of-invocation work.
//!     .register_snapstart_resource(std::sync::Arc::new(pinpool::lambda::SnapStart::new(pool)))
//!     .run()
//!     .await
//! # }
//! ```
//!
//! A `Runtime::layer` wraps the whole invocation, response posting included: the layer's
//! future ends after the response is posted and before `/next` is polled again. That is where
//! the end-of-invocation work belongs, so it never delays the caller's answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use lambda_runtime::tower::{Layer, Service};
use lambda_runtime::{BoxFuture, LambdaInvocation, SnapStartResource};

pin_project! {
    /// The future of one invocation: the freeze checks, the inner service's future inside the
    /// invocation scope, then the end-of-invocation work. `Send` when the inner future is, so
    /// `Runtime::run_concurrent` (Lambda Managed Instances) works too.
    pub struct PoolFuture<F: Future> {
        pool: Pool,
        check: Option<crate::BoxFuture<'static, ()>>,
        #[pin]
        run: TaskLocalFuture<Invocation, F>,
        end: Option<EndOnDrop>,
        settle: Option<crate::BoxFuture<'static, ()>>,
        out: Option<F::Output>,
    }
}

impl<F: Future> Future for PoolFuture<F> {
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
            *this.settle = Some(this.pool.settle_owned());
        }
        if let Some(settle) = this.settle.as_mut() {
            ready!(settle.as_mut().poll(cx));
            *this.settle = None;
        }
        Poll::Ready(this.out.take().expect("PoolFuture polled after completion"))
    }
}

use crate::Pool;
use crate::invocation::{EndOnDrop, Invocation};

/// The `lambda_runtime` layer: runs every invocation in [`Pool::invocation`] with the
/// invocation's deadline.
#[derive(Clone, Debug)]
pub struct PoolLayer {
    pool: Pool,
}

impl PoolLayer {
    /// A layer for `pool`.
    pub fn new(pool: Pool) -> Self {
        PoolLayer { pool }
    }
}

impl<S> Layer<S> for PoolLayer {
    type Service = PoolService<S>;

    fn layer(&self, inner: S) -> PoolService<S> {
        PoolService {
            pool: self.pool.clone(),
            inner,
        }
    }
}

/// The service [`PoolLayer`] makes.
#[derive(Clone, Debug)]
pub struct PoolService<S> {
    pool: Pool,
    inner: S,
}

impl<S> Service<LambdaInvocation> for PoolService<S>
where
    S: Service<LambdaInvocation, Response = (), Error = lambda_runtime::Error>,
{
    type Response = ();
    type Error = lambda_runtime::Error;
    type Future = PoolFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: LambdaInvocation) -> Self::Future {
        let deadline = req.context.deadline();
        let inv = self.pool.new_invocation(deadline);
        // Handler code may run inside `call`: it runs in the invocation too.
        let fut = inv.sync_scope(|| self.inner.call(req));
        PoolFuture {
            check: Some(self.pool.freeze_check_owned(deadline)),
            pool: self.pool.clone(),
            end: Some(EndOnDrop(inv.clone())),
            run: inv.into_scope(fut),
            settle: None,
            out: None,
        }
    }
}

/// A SnapStart hook: closes every idle connection before the snapshot and again after a
/// restore (nothing from before a snapshot is trusted).
#[derive(Clone, Debug)]
pub struct SnapStart {
    pool: Pool,
}

impl SnapStart {
    /// A hook for `pool`.
    pub fn new(pool: Pool) -> Self {
        SnapStart { pool }
    }
}

impl SnapStartResource for SnapStart {
    fn before_snapshot(&self) -> BoxFuture<'_, Result<(), lambda_runtime::Error>> {
        self.pool.close_idle();
        Box::pin(async { Ok(()) })
    }

    fn after_restore(&self) -> BoxFuture<'_, Result<(), lambda_runtime::Error>> {
        self.pool.close_idle();
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>() {}

    #[test]
    fn the_invocation_future_is_send_when_the_inner_one_is() {
        // What Runtime::run_concurrent requires of a layer's future.
        is_send::<PoolFuture<std::future::Ready<Result<(), lambda_runtime::Error>>>>();
    }
}
