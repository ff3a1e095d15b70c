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

use std::task::{Context, Poll};

use lambda_runtime::tower::{Layer, Service};
use lambda_runtime::{BoxFuture, LambdaInvocation, SnapStartResource};

use crate::{InvocationFuture, Pool};

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
    type Future = InvocationFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: LambdaInvocation) -> Self::Future {
        let deadline = req.context.deadline();
        let inv = self.pool.new_invocation(deadline);
        // Handler code may run inside `call`: it runs in the invocation too.
        let fut = inv.sync_scope(|| self.inner.call(req));
        self.pool.invocation_future(inv, fut)
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
        is_send::<InvocationFuture<std::future::Ready<Result<(), lambda_runtime::Error>>>>();
    }
}
