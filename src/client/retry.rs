//! The safe retry: when a call may run again on a fresh connection ([`retry_allowed`]), and
//! the checkout's swap to that connection.

use std::future::Future;
use std::panic::Location;

use crate::conn::ConnState;
use crate::deadline::within;
use crate::error::{Error, Phase};
use crate::statement::{StatementRef, ToStatement};

use super::ctx::Ctx;
use super::pooled::PooledClient;

/// The retry rule: a call that failed because its connection was closed may run again on a
/// fresh connection only when nothing of the checkout can have reached the server and
/// nothing the caller holds can refer to the old connection. Decided from structure, never
/// from an error's text:
///
/// - the connection is closed: the call's error is a closed-connection error
///   ([`is_closed_error`], the caller's check) and its connection task has ended
///   ([`ConnState::ended`]), so nothing more will be written on it and its byte count is
///   final;
/// - no byte was written on it since the checkout handed it out
///   ([`ConnState::unwritten_since_checkout`]: the observer's count of the bytes the stream
///   below it accepted). Bytes a TLS layer accepted count as written, though they may not have
///   left:
///   a wrong guess costs a retry, never a statement run twice. So nothing of this call left,
///   and no statement, portal, transaction, stream or copy of this checkout can exist on
///   that connection: swapping it is invisible;
/// - it carries no session state the caller may rely on: nothing seen on it may have pinned
///   it (under `PinPolicy::Keep`, and within an invocation under `KeepForInvocation`, a
///   `SET` comes back in the same session; a fresh connection would silently lack it);
/// - no raw client was handed out in this checkout ([`ConnState::raw_used`]), and no prepared
///   [`Statement`] ([`ConnState::statement_lent`]: a `prepare_cached` hit writes nothing):
///   the caller would hold the old connection's.
///
/// A statement that may have reached the server is never run twice: its effects (an INSERT
/// that committed before the answer was lost) may stand.
pub(super) fn retry_allowed(state: &ConnState) -> bool {
    state.ended()
        && state.unwritten_since_checkout()
        && !state.statement_lent()
        && state.pinned().is_empty()
        && !state.raw_used()
}

/// True for an error that says the connection is closed (not the server's error, not a
/// timeout).
pub(super) fn is_closed_error(e: &Error) -> bool {
    matches!(e, Error::Query(e) if e.is_closed())
}

/// True when `statement` may run on a connection other than the one the call started on: SQL
/// text may; a prepared [`Statement`] names an object of the connection that prepared it.
pub(super) fn rerunnable<T: ?Sized + ToStatement>(statement: &T) -> bool {
    matches!(statement.__statement(), StatementRef::Text(_))
}

impl PooledClient {
    /// Runs one call with `f` on the current connection; if it failed because that connection
    /// turned out closed before anything of this checkout was sent ([`retry_allowed`]), once
    /// more on a fresh connection, all within the call's one bound. `rerun`: the call's
    /// statement may run on another connection ([`rerunnable`]).
    pub(super) async fn call<'s, R, F, Fut>(
        &'s self,
        at: &'static Location<'static>,
        rerun: bool,
        f: F,
    ) -> Result<R, Error>
    where
        F: Fn(Ctx<'s>) -> Fut,
        Fut: Future<Output = Result<R, Error>>,
    {
        let ctx = self.ctx_at(at)?;
        match f(ctx).await {
            Err(e) if rerun && self.may_swap(&ctx, Some(&e)) => match self.swap(ctx).await {
                Ok(fresh) => f(fresh).await,
                // The pool was closed meanwhile: the statement's own error tells what happened.
                Err(Error::Closed) => Err(e),
                Err(other) => Err(other),
            },
            r => r,
        }
    }

    /// [`call`](Self::call) for a call whose parameters come from an iterator: a first
    /// attempt would use them up, so it is never run twice. Instead it starts on a fresh
    /// connection when the current one is already known closed, under the same rule.
    pub(super) async fn call_once<'s, R, F, Fut>(
        &'s self,
        at: &'static Location<'static>,
        rerun: bool,
        f: F,
    ) -> Result<R, Error>
    where
        F: FnOnce(Ctx<'s>) -> Fut,
        Fut: Future<Output = Result<R, Error>>,
    {
        let mut ctx = self.ctx_at(at)?;
        if rerun && self.may_swap(&ctx, None) {
            ctx = self.swap(ctx).await?;
        }
        f(ctx).await
    }

    /// True when the call that ran on `ctx` (and failed with `error`, if it ran) may run again
    /// on a fresh connection, invisibly to the caller: it ran on the checked-out connection,
    /// not on a replacement (once, never twice), and [`retry_allowed`] holds for it.
    pub(super) fn may_swap(&self, ctx: &Ctx<'_>, error: Option<&Error>) -> bool {
        let conn = self.checked_out();
        std::ptr::eq(ctx.g.state, &conn.state)
            && error.is_none_or(is_closed_error)
            && conn.client.is_closed()
            && retry_allowed(&conn.state)
    }

    /// The checked-out connection's replacement, made by whichever call gets here first (the
    /// others wait for it), within `ctx`'s bound: a context on it for the call.
    pub(super) async fn swap<'s>(&'s self, ctx: Ctx<'s>) -> Result<Ctx<'s>, Error> {
        let checked_out = self.checked_out();
        let old = checked_out.state.id;
        let cell = checked_out.replacement.get_or_init(Box::default);
        let install = cell.get_or_try_init(|| async {
            let conn = self.pool.replacement(old, ctx.g.cutoff).await?;
            // Synchronous from the replacement's arrival to its installation: dropped before,
            // nothing changed.
            if let Some(inv) = &self.invocation {
                inv.give_back(old);
                inv.lend(conn.state.id, self.from);
            }
            Ok(conn)
        });
        let fresh = within(ctx.bound, Phase::Query, install).await??;
        self.pool.retried(old, fresh.state.id);
        Ok(Ctx {
            client: &fresh.client,
            // The call's line, not the checkout's: a pin of the rerun is reported at it.
            g: self.guarded(fresh).at(ctx.g.at),
            bound: ctx.bound,
        })
    }
}
