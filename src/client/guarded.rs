//! The bound of one statement call and the single path every statement takes through it:
//! [`Guarded`] (the refusal check, the bound, the in-flight count, the wait for the call's
//! ReadyForQuery, the session-ending errors).

use std::future::Future;
use std::panic::Location;
use std::time::Duration;

use tokio::time::Instant;

use tokio_postgres::Client;
use tokio_postgres::error::Severity;

use crate::conn::{ConnState, InFlight};
use crate::deadline::{Bound, earlier, within};
use crate::error::{Error, Phase};
use crate::invocation::Invocation;
use crate::pinning::{Classification, Protocol};
use crate::pool::PoolInner;

use super::ctx::Ctx;

/// What runs a statement needs besides the client: the connection's state, the pool's
/// settings and the caller's cutoff.
#[derive(Clone, Copy)]
pub(super) struct Guarded<'a> {
    pub(super) state: &'a ConnState,
    pub(super) pool: &'a PoolInner,
    /// As of the checkout: the earlier of `get_by`'s and the invocation's then current.
    /// Replaced for each call by [`Guarded::now`].
    pub(super) cutoff: Option<Instant>,
    /// The cutoff `get_by` was given, if any.
    pub(super) explicit: Option<Instant>,
    /// Where the call was made (a statement method is `#[track_caller]`); where the client
    /// was checked out until a call says.
    pub(super) at: &'static Location<'static>,
    /// The call holds the connection alone (a learning, [`ConnState::begin_learning`]): it
    /// does not wait for its turn.
    pub(super) alone: bool,
}

/// The bound of one statement call, made once: its prepare, execute, a stale-statement retry
/// and a retry on a fresh connection share it. Fails at once when it has already passed.
pub(super) fn call_bound(
    pool: &PoolInner,
    cutoff: Option<Instant>,
) -> Result<Option<Bound>, Error> {
    match Bound::new(pool.settings.query_timeout, cutoff) {
        Some(b) if b.passed() => Err(b.timed_out(Phase::Query)),
        b => Ok(b),
    }
}

/// The cutoff of a call made now: the invocation the call runs in bounds it, whenever its
/// client was checked out (with `get_by`'s cutoff, if earlier); outside any invocation, the
/// checkout's.
pub(super) fn cutoff_now(
    pool: &PoolInner,
    at_checkout: Option<Instant>,
    explicit: Option<Instant>,
) -> Option<Instant> {
    match Invocation::current_cutoff(pool) {
        Some(c) => earlier(explicit, Some(c)),
        None => at_checkout,
    }
}

/// Sets the cutoff of what is written on `wire` from now on; one set within an invocation is
/// cleared at its end ([`Invocation::touch`]).
pub(super) fn set_wire_cutoff(wire: &std::sync::Arc<crate::wire::Wire>, cutoff: Option<Instant>) {
    if wire.set_cutoff(cutoff)
        && let Some(c) = cutoff
    {
        Invocation::touch(wire, c);
    }
}

impl<'a> Guarded<'a> {
    /// This guard with the cutoff of a call made now ([`cutoff_now`]).
    pub(super) fn now(self) -> Guarded<'a> {
        Guarded {
            cutoff: cutoff_now(self.pool, self.cutoff, self.explicit),
            ..self
        }
    }

    /// This guard for a call made at `at`.
    pub(super) fn at(self, at: &'static Location<'static>) -> Guarded<'a> {
        Guarded { at, ..self }
    }

    /// The bound of one statement call (see [`call_bound`]).
    pub(super) fn bound(&self) -> Result<Option<Bound>, Error> {
        call_bound(self.pool, self.cutoff)
    }

    /// A context for one call on `client`, with the call's bound; `self` has the cutoff of
    /// a call made now ([`Guarded::now`]).
    pub(super) fn ctx(self, client: &'a Client) -> Result<Ctx<'a>, Error> {
        Ok(Ctx {
            client,
            g: self,
            bound: self.bound()?,
        })
    }

    /// Under [`PinPolicy::Refuse`](crate::PinPolicy::Refuse), refuses `sql` before anything
    /// is sent if it may pin. Otherwise nothing is predicted here: what is sent is classified
    /// on the wire.
    pub(super) fn check(
        &self,
        sql: &str,
        class: Option<Classification>,
        protocol: Protocol,
    ) -> Result<(), Error> {
        let pins = self.pool.settings.refusal(sql, class, protocol);
        if pins.is_empty() {
            return Ok(());
        }
        Err(self.pool.refuse(pins, sql))
    }

    /// Runs a statement to completion under `bound`. On timeout the socket closes at once.
    pub(super) async fn run<T>(
        self,
        bound: Option<Bound>,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Error> {
        let in_flight = self.begin().await;
        let request = in_flight.request;
        set_wire_cutoff(&self.state.wire, self.cutoff);
        match within(bound, Phase::Query, fut).await {
            Ok(res) => {
                in_flight.done();
                if res.as_ref().map_or_else(answered_by_server, |_| true) {
                    self.state.await_ready(request, bound).await;
                }
                self.pool.report_pins(self.state, Some(self.at));
                res.map_err(|e| self.failed(e, bound))
            }
            Err(timeout) => Err(self.expire(timeout)),
        }
    }

    /// Counts the call in flight; where a shape may be learned on the connection in a
    /// transaction of its own (no named statements), after any such learning (boxed: only
    /// that profile pays for the wait's state).
    async fn begin(&self) -> InFlight<'a> {
        if self.pool.settings.named_statements || self.alone {
            return self.state.begin();
        }
        Box::pin(self.state.begin_turn()).await
    }

    /// Starts a stream or copy under `bound`; it stays in flight until the wrapper finishes.
    pub(super) async fn open<S>(
        self,
        bound: Option<Bound>,
        fut: impl Future<Output = Result<S, tokio_postgres::Error>>,
    ) -> Result<(S, Option<Bound>, InFlight<'a>), Error> {
        let in_flight = self.begin().await;
        set_wire_cutoff(&self.state.wire, self.cutoff);
        match within(bound, Phase::Query, fut).await {
            Ok(Ok(s)) => {
                self.pool.report_pins(self.state, Some(self.at));
                Ok((s, bound, in_flight))
            }
            Ok(Err(e)) => {
                let request = in_flight.request;
                in_flight.done();
                if answered_by_server(&e) {
                    self.state.await_ready(request, bound).await;
                }
                self.pool.report_pins(self.state, Some(self.at));
                Err(self.failed(e, bound))
            }
            Err(timeout) => Err(self.expire(timeout)),
        }
    }

    /// Wraps a statement's error; one that ends the session closes the connection now, so it
    /// is never handed out again. A connection closed because a request outlived its bound
    /// (the connection task's check, `conn.rs`, which reported it) gives the timeout.
    pub(super) fn failed(&self, e: tokio_postgres::Error, bound: Option<Bound>) -> Error {
        if e.is_closed()
            && let Some(cause) = self.state.wire.expired()
        {
            self.state.kill();
            return Error::Timeout {
                phase: Phase::Query,
                cause,
                after: bound.map_or(Duration::ZERO, |b| b.allowed),
            };
        }
        if ends_session(&e) {
            self.state.kill_broken();
        }
        Error::Query(e)
    }

    /// A statement ran past its bound: its socket closes at once.
    pub(super) fn expire(&self, timeout: Error) -> Error {
        self.state.kill();
        timeout
    }
}

/// True for the server's own error: its ReadyForQuery follows at once, so a call that ended
/// with it (or with a result) waits for it ([`ConnState::await_ready`]). Not a client-side
/// error (an unexpected message, a wrong row count), after which the server may still be
/// sending rows or, in COPY-in mode, wait for data: the connection is then closed on return
/// unless it is at rest by then.
pub(crate) fn answered_by_server(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some()
}

/// True for errors after which the session cannot be trusted: the connection closed, a FATAL
/// or PANIC from the server, or a connection exception (SQLSTATE class 08, which is also how
/// RDS Proxy reports a borrow timeout).
pub(crate) fn ends_session(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error().is_some_and(|d| {
            matches!(d.parsed_severity(), Some(Severity::Fatal | Severity::Panic))
                || d.code().code().starts_with("08")
        })
}
