//! The checked-out client and its transactions. Every statement passes through [`Ctx`]: it
//! is checked against the pinning rules, bounded by the query timeout and the deadline, and
//! counted in flight until it finishes.

use std::future::Future;
use std::panic::Location;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use tokio::time::Instant;

use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::types::{BorrowToSql, FromSqlOwned, ToSql, Type};
use tokio_postgres::{Client, IsolationLevel, Portal, Row, SimpleQueryMessage};

use crate::conn::{Conn, ConnData, ConnState, Fate, InFlight};
use crate::deadline::{Bound, earlier, within};
use crate::error::{Error, Phase};
use crate::invocation::Invocation;
use crate::pinning::{Classification, Protocol, Reasons, TxnControl, classify};
use crate::pool::PoolInner;
use crate::statement::{Statement, StatementRef, ToStatement};
use crate::stream::{CopyInSink, CopyOutStream, RowStream, SimpleQueryStream};

/// What runs a statement needs besides the client: the connection's state, the pool's
/// settings and the caller's cutoff.
#[derive(Clone, Copy)]
struct Guarded<'a> {
    state: &'a ConnState,
    pool: &'a PoolInner,
    /// As of the checkout: the earlier of `get_by`'s and the invocation's then current.
    /// Replaced for each call by [`Guarded::now`].
    cutoff: Option<Instant>,
    /// The cutoff `get_by` was given, if any.
    explicit: Option<Instant>,
}

/// The bound of one statement call, made once: its prepare, execute, a stale-statement retry
/// and a retry on a fresh connection share it. Fails at once when it has already passed.
fn call_bound(pool: &PoolInner, cutoff: Option<Instant>) -> Result<Option<Bound>, Error> {
    match Bound::new(pool.settings.query_timeout, cutoff) {
        Some(b) if b.passed() => Err(b.timed_out(Phase::Query)),
        b => Ok(b),
    }
}

/// The cutoff of a call made now: the invocation the call runs in bounds it, whenever its
/// client was checked out (with `get_by`'s cutoff, if earlier); outside any invocation, the
/// checkout's.
fn cutoff_now(
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
fn set_wire_cutoff(wire: &Arc<crate::wire::Wire>, cutoff: Option<Instant>) {
    if wire.set_cutoff(cutoff)
        && let Some(c) = cutoff
    {
        Invocation::touch(wire, c);
    }
}

impl<'a> Guarded<'a> {
    /// This guard with the cutoff of a call made now ([`cutoff_now`]).
    fn now(self) -> Guarded<'a> {
        Guarded {
            cutoff: cutoff_now(self.pool, self.cutoff, self.explicit),
            ..self
        }
    }

    /// The bound of one statement call (see [`call_bound`]).
    fn bound(&self) -> Result<Option<Bound>, Error> {
        call_bound(self.pool, self.cutoff)
    }

    /// A context for one call made now on `client`, with the call's bound.
    fn ctx(self, client: &'a Client) -> Result<Ctx<'a>, Error> {
        let g = self.now();
        Ok(Ctx {
            client,
            g,
            bound: g.bound()?,
        })
    }

    /// Under [`PinPolicy::Refuse`](crate::PinPolicy::Refuse), refuses `sql` before anything
    /// is sent if it may pin. Otherwise nothing is predicted here: what is sent is classified
    /// on the wire.
    fn check(
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
    async fn run<T>(
        self,
        bound: Option<Bound>,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Error> {
        let in_flight = self.state.begin();
        let request = in_flight.request;
        set_wire_cutoff(&self.state.wire, self.cutoff);
        match within(bound, Phase::Query, fut).await {
            Ok(res) => {
                in_flight.done();
                if res.as_ref().map_or_else(answered_by_server, |_| true) {
                    self.state.await_ready(request, bound).await;
                }
                if res.is_err() {
                    let at_bind = self.state.wire.failed_before_bind_complete(request);
                    self.state.set_failed_at_bind(at_bind);
                }
                self.pool.report_pins(self.state);
                res.map_err(|e| self.failed(e, bound))
            }
            Err(timeout) => Err(self.expire(timeout)),
        }
    }

    /// Starts a stream or copy under `bound`; it stays in flight until the wrapper finishes.
    async fn open<S>(
        self,
        bound: Option<Bound>,
        fut: impl Future<Output = Result<S, tokio_postgres::Error>>,
    ) -> Result<(S, Option<Bound>, InFlight<'a>), Error> {
        let in_flight = self.state.begin();
        set_wire_cutoff(&self.state.wire, self.cutoff);
        match within(bound, Phase::Query, fut).await {
            Ok(Ok(s)) => {
                self.pool.report_pins(self.state);
                Ok((s, bound, in_flight))
            }
            Ok(Err(e)) => {
                let request = in_flight.request;
                in_flight.done();
                if answered_by_server(&e) {
                    self.state.await_ready(request, bound).await;
                }
                self.pool.report_pins(self.state);
                Err(self.failed(e, bound))
            }
            Err(timeout) => Err(self.expire(timeout)),
        }
    }

    /// Wraps a statement's error; one that ends the session closes the connection now, so it
    /// is never handed out again. A connection closed because a request outlived its bound
    /// (the connection task's check, `conn.rs`, which reported it) gives the timeout.
    fn failed(&self, e: tokio_postgres::Error, bound: Option<Bound>) -> Error {
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
    fn expire(&self, timeout: Error) -> Error {
        self.state.kill();
        timeout
    }
}

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
fn retry_allowed(state: &ConnState) -> bool {
    state.ended()
        && state.unwritten_since_checkout()
        && !state.statement_lent()
        && state.pinned().is_empty()
        && !state.raw_used()
}

/// True for an error that says the connection is closed (not the server's error, not a
/// timeout).
fn is_closed_error(e: &Error) -> bool {
    matches!(e, Error::Query(e) if e.is_closed())
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

/// A client and its guard: the single place statements pass through, with the bound of the
/// one call it serves.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    client: &'a Client,
    g: Guarded<'a>,
    bound: Option<Bound>,
}

/// What tokio-postgres is given for a statement argument: its `ToStatement`, and `Debug`,
/// which its scalar methods ask for.
trait PgStatement: tokio_postgres::ToStatement + std::fmt::Debug + Sync {}

impl<T: ?Sized + tokio_postgres::ToStatement + std::fmt::Debug + Sync> PgStatement for T {}

/// A statement argument, checked and ready to run: a prepared statement (for SQL text the
/// connection's own, from its cache), or the SQL text itself when the cache is off.
enum Target {
    Prepared(tokio_postgres::Statement),
    /// Owned: a `str` cannot stand behind a `dyn`. Copied only when the cache is off, where
    /// each call prepares its statement with a round trip anyway.
    Text(String),
}

impl Target {
    /// As tokio-postgres takes it.
    fn pg(&self) -> &dyn PgStatement {
        match self {
            Target::Prepared(s) => s,
            Target::Text(sql) => sql,
        }
    }
}

/// True for the server's word that a prepared statement no longer fits (DDL changed its
/// result type) or no longer exists, and that it said so while binding it, before anything
/// ran. Decided from structure, never from the error's text: the error answered the call's
/// Bind (no BindComplete came before it, [`ConnState::failed_at_bind`]), and it was raised
/// by the server routine that revalidates a cached plan or looks a statement up. The same
/// SQLSTATE raised by a function (`RAISE`), relayed from another server (postgres_fdw,
/// dblink) or by an SQL-level `EXECUTE` inside a statement that ran fails one of the two.
fn is_stale(e: &Error, state: &ConnState) -> bool {
    let Some(db) = e.as_db_error() else {
        return false;
    };
    let routine = db.routine().unwrap_or("");
    let revalidating =
        *db.code() == SqlState::FEATURE_NOT_SUPPORTED && routine == "RevalidateCachedQuery";
    let looking_up = *db.code() == SqlState::INVALID_SQL_STATEMENT_NAME
        && matches!(routine, "FetchPreparedStatement" | "exec_bind_message");
    (revalidating || looking_up) && state.failed_at_bind()
}

impl<'a> Ctx<'a> {
    /// Runs a statement under this call's bound. On timeout the socket closes at once.
    /// (Not an `async fn`: another layer of future would copy the statement's future once
    /// more, about 1,300 instructions a call.)
    fn run<T>(
        self,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> impl Future<Output = Result<T, Error>> {
        self.g.run(self.bound, fut)
    }

    /// Starts a stream or copy under this call's bound.
    fn open<S>(
        self,
        fut: impl Future<Output = Result<S, tokio_postgres::Error>>,
    ) -> impl Future<Output = Result<(S, Option<Bound>, InFlight<'a>), Error>> {
        self.g.open(self.bound, fut)
    }

    /// Checks a statement argument for what it may pin and readies it; SQL text is prepared
    /// and cached on a cache miss. With the target comes the SQL text when the target is
    /// from the cache.
    async fn ready<T: ?Sized + ToStatement>(
        self,
        statement: &T,
    ) -> Result<(Target, Option<&str>), Error> {
        match statement.__statement() {
            StatementRef::Text(sql) => match self.cached(sql, self.bound).await? {
                Some(stmt) => {
                    self.g
                        .check(&stmt.sql, Some(stmt.class), Protocol::Execute)?;
                    Ok((Target::Prepared(stmt.inner), Some(sql)))
                }
                None => {
                    self.g.check(sql, None, Protocol::Parse)?;
                    Ok((Target::Text(sql.to_owned()), None))
                }
            },
            StatementRef::Prepared(p) => {
                self.g.check(&p.sql, Some(p.class), Protocol::Execute)?;
                Ok((Target::Prepared(p.inner.clone()), None))
            }
        }
    }

    /// Runs `call` on `statement`, checked and readied ([`Ctx::ready`]). A cached statement
    /// the server calls stale (DDL changed its result type) is dropped from the cache and,
    /// outside a transaction, prepared and run once more.
    async fn with_statement<T: ?Sized + ToStatement, R, F>(
        self,
        statement: &T,
        call: impl Fn(Target) -> F,
    ) -> Result<R, Error>
    where
        F: Future<Output = Result<R, Error>>,
    {
        let (target, cached) = self.ready(statement).await?;
        match (call(target).await, cached) {
            (Err(e), Some(sql)) if self.drop_stale(sql, &e) => {
                let stmt = self.cached(sql, self.bound).await?.ok_or(e)?;
                call(Target::Prepared(stmt.inner)).await
            }
            (r, _) => r,
        }
    }

    /// [`Ctx::with_statement`] without running it again, for calls whose parameters can be
    /// used only once.
    async fn with_statement_once<T: ?Sized + ToStatement, R>(
        self,
        statement: &T,
        call: impl AsyncFnOnce(Target) -> Result<R, Error>,
    ) -> Result<R, Error> {
        call(self.ready(statement).await?.0).await
    }

    /// The connection's prepared statement for `sql`, preparing and caching it on a miss;
    /// `None` when the cache is off.
    async fn cached(self, sql: &str, bound: Option<Bound>) -> Result<Option<Statement>, Error> {
        let settings = &self.g.pool.settings;
        if settings.statement_cache_capacity == 0 {
            return Ok(None);
        }
        let counters = &self.g.pool.counters;
        let hit = self.g.state.cache().get(sql);
        if let Some(stmt) = hit {
            counters.cache_hit();
            return Ok(Some(stmt));
        }
        if !settings.refusal(sql, None, Protocol::Execute).is_empty() {
            // Refused without sending anything, not even the Parse: the caller's check says so.
            return Ok(None);
        }
        counters.cache_miss();
        // Boxed: a miss is rare and costs a round trip, and its state inline would make every
        // statement's future larger, copied at each layer on every call.
        let stmt = Box::pin(self.prepare_in(sql, &[], bound)).await?;
        let evicted = self.g.state.cache().insert(
            stmt.clone(),
            settings.statement_cache_capacity,
            settings.statement_cache_bytes,
        );
        if !evicted.is_empty() {
            counters.cache_evictions(evicted.len() as u64);
        }
        // Dropping the evicted statements sends their protocol Close.
        drop(evicted);
        Ok(Some(stmt))
    }

    /// Drops a stale statement from the cache; true when running it again makes sense.
    fn drop_stale(self, sql: &str, e: &Error) -> bool {
        if !is_stale(e, self.g.state) {
            return false;
        }
        drop(self.g.state.cache().remove(sql));
        tracing::debug!(
            connection = self.g.state.id,
            "pinpool: a cached statement went stale; prepared again"
        );
        !self.g.state.in_transaction()
    }

    async fn prepare_typed(self, query: &str, types: &[Type]) -> Result<Statement, Error> {
        let stmt = self.prepare_in(query, types, self.bound).await?;
        self.g.state.lend_statement();
        Ok(stmt)
    }

    async fn prepare_cached(self, query: &str) -> Result<Statement, Error> {
        let stmt = match self.cached(query, self.bound).await? {
            Some(stmt) => stmt,
            None => self.prepare_in(query, &[], self.bound).await?,
        };
        self.g.state.lend_statement();
        Ok(stmt)
    }

    /// Prepares within a bound the caller already made.
    async fn prepare_in(
        self,
        query: &str,
        types: &[Type],
        bound: Option<Bound>,
    ) -> Result<Statement, Error> {
        // Preparing sends a Parse, which pins only under the legacy rules; what the SQL itself
        // does is checked each time the statement is executed.
        let parse_only = Classification {
            reasons: Reasons::EMPTY,
            txn: TxnControl::None,
        };
        self.g.check(query, Some(parse_only), Protocol::Parse)?;
        let inner = self
            .g
            .run(bound, self.client.prepare_typed(query, types))
            .await?;
        Ok(Statement {
            inner,
            sql: Arc::from(query),
            class: classify(query),
        })
    }

    async fn query<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query(s.pg(), params)).await
        })
        .await
    }

    async fn query_one<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_one(s.pg(), params)).await
        })
        .await
    }

    async fn query_opt<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_opt(s.pg(), params)).await
        })
        .await
    }

    async fn query_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<R>, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_scalar(s.pg(), params)).await
        })
        .await
    }

    async fn query_one_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<R, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_one_scalar(s.pg(), params)).await
        })
        .await
    }

    async fn query_opt_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<R>, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_opt_scalar(s.pg(), params)).await
        })
        .await
    }

    async fn query_raw<T, P, I>(self, statement: &T, params: I) -> Result<RowStream<'a>, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let (s, bound, f) = self
            .with_statement_once(statement, async |s| {
                self.open(self.client.query_raw(s.pg(), params)).await
            })
            .await?;
        Ok(RowStream::new(s, bound, self.g.state, f))
    }

    async fn query_typed(
        self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        self.g.check(query, None, Protocol::Parse)?;
        self.run(self.client.query_typed(query, params)).await
    }

    async fn query_typed_one(
        self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, Error> {
        self.g.check(query, None, Protocol::Parse)?;
        self.run(self.client.query_typed_one(query, params)).await
    }

    async fn query_typed_opt(
        self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>, Error> {
        self.g.check(query, None, Protocol::Parse)?;
        self.run(self.client.query_typed_opt(query, params)).await
    }

    async fn query_typed_raw<P, I>(self, query: &str, params: I) -> Result<RowStream<'a>, Error>
    where
        P: BorrowToSql,
        I: IntoIterator<Item = (P, Type)>,
    {
        self.g.check(query, None, Protocol::Parse)?;
        let (s, bound, f) = self
            .open(self.client.query_typed_raw(query, params))
            .await?;
        Ok(RowStream::new(s, bound, self.g.state, f))
    }

    async fn execute<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.execute(s.pg(), params)).await
        })
        .await
    }

    async fn execute_typed(
        self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        self.g.check(query, None, Protocol::Parse)?;
        self.run(self.client.execute_typed(query, params)).await
    }

    async fn execute_raw<T, P, I>(self, statement: &T, params: I) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        self.with_statement_once(statement, async |s| {
            self.run(self.client.execute_raw(s.pg(), params)).await
        })
        .await
    }

    async fn copy_in<T, U>(self, statement: &T) -> Result<CopyInSink<'a, U>, Error>
    where
        T: ?Sized + ToStatement,
        U: Buf + 'static + Send,
    {
        let (s, bound, f) = self
            .with_statement_once(statement, async |s| {
                self.open(self.client.copy_in(s.pg())).await
            })
            .await?;
        Ok(CopyInSink::new(s, bound, self.g.state, f))
    }

    async fn copy_out<T: ?Sized + ToStatement>(
        self,
        statement: &T,
    ) -> Result<CopyOutStream<'a>, Error> {
        let (s, bound, f) = self
            .with_statement_once(statement, async |s| {
                self.open(self.client.copy_out(s.pg())).await
            })
            .await?;
        Ok(CopyOutStream::new(s, bound, self.g.state, f))
    }

    async fn simple_query(self, query: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        self.g.check(query, None, Protocol::Simple)?;
        self.run(self.client.simple_query(query)).await
    }

    async fn simple_query_raw(self, query: &str) -> Result<SimpleQueryStream<'a>, Error> {
        self.g.check(query, None, Protocol::Simple)?;
        let (s, bound, f) = self.open(self.client.simple_query_raw(query)).await?;
        Ok(SimpleQueryStream::new(s, bound, self.g.state, f))
    }

    async fn batch_execute(self, query: &str) -> Result<(), Error> {
        self.g.check(query, None, Protocol::Simple)?;
        self.run(self.client.batch_execute(query)).await
    }
}

/// True when `statement` may run on a connection other than the one the call started on: SQL
/// text may; a prepared [`Statement`] names an object of the connection that prepared it.
fn rerunnable<T: ?Sized + ToStatement>(statement: &T) -> bool {
    matches!(statement.__statement(), StatementRef::Text(_))
}

/// A connection checked out of the pool. It goes back when dropped, synchronously: to the idle
/// set if its state is known and clean, otherwise it is closed.
///
/// It offers tokio-postgres's statement methods with the same names and argument shapes.
/// Pool-specific calls are associated functions ([`PooledClient::pin_state`],
/// [`PooledClient::raw`]) so they never shadow a driver method.
pub struct PooledClient {
    /// The connection the checkout handed out. If it was closed before anything was sent on
    /// it ([`retry_allowed`]), its `replacement` is where every call runs and the one that
    /// goes back to the pool; at most one per checkout.
    conn: Option<Conn>,
    pool: Arc<PoolInner>,
    /// As of the checkout: the earlier of `get_by`'s and the invocation's then current. Each
    /// call stops at the cutoff of the invocation it runs in ([`cutoff_now`]).
    cutoff: Option<Instant>,
    /// The cutoff `get_by` was given, if any.
    explicit: Option<Instant>,
    invocation: Option<Invocation>,
    /// Where `get()` was called, and when (only with `held_too_long`).
    from: &'static Location<'static>,
    since: Option<Instant>,
}

/// Whether a connection may be pinned, and by what.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PinState {
    /// Every reason seen on this connection; empty when not pinned.
    pub reasons: Reasons,
    /// The start of the first statement that pinned it.
    pub first_statement: Option<String>,
}

impl PinState {
    /// True when the connection may be pinned.
    pub fn is_pinned(&self) -> bool {
        !self.reasons.is_empty()
    }
}

impl PooledClient {
    pub(crate) fn new(
        conn: Conn,
        pool: Arc<PoolInner>,
        (cutoff, explicit): (Option<Instant>, Option<Instant>),
        invocation: Option<Invocation>,
    ) -> Self {
        conn.state.mark_checkout();
        PooledClient {
            conn: Some(conn),
            pool,
            cutoff,
            explicit,
            invocation,
            from: Location::caller(),
            since: None,
        }
    }

    /// Records where the client was checked out (and when, if `held_too_long` is set), and
    /// lends it to its invocation, which reports it if it is still out at its end.
    pub(crate) fn lent_from(&mut self, from: &'static Location<'static>) {
        self.from = from;
        if self.pool.settings.held_too_long.is_some() {
            self.since = Some(Instant::now());
        }
        if let (Some(inv), Some(conn)) = (&self.invocation, &self.conn) {
            inv.lend(conn.state.id, from);
        }
    }

    /// The connection the checkout handed out.
    fn checked_out(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a PooledClient holds its connection until dropped")
    }

    /// The connection calls run on: the one that replaced the checked-out one, if any (one
    /// atomic load).
    fn conn(&self) -> &Conn {
        let conn = self.checked_out();
        match conn.replacement.get().and_then(|cell| cell.get()) {
            Some(fresh) => fresh,
            None => conn,
        }
    }

    /// A guard for calls made now on `conn`.
    fn guarded<'s>(&'s self, conn: &'s Conn) -> Guarded<'s> {
        Guarded {
            state: &conn.state,
            pool: &self.pool,
            cutoff: self.cutoff,
            explicit: self.explicit,
        }
        .now()
    }

    /// The cutoff of a call made now ([`cutoff_now`]).
    fn cutoff_now(&self) -> Option<Instant> {
        cutoff_now(&self.pool, self.cutoff, self.explicit)
    }

    /// A context for one call on the current connection, with the call's bound.
    fn ctx(&self) -> Result<Ctx<'_>, Error> {
        let conn = self.conn();
        self.guarded(conn).ctx(&conn.client)
    }

    /// Runs one call with `f` on the current connection; if it failed because that connection
    /// turned out closed before anything of this checkout was sent ([`retry_allowed`]), once
    /// more on a fresh connection, all within the call's one bound. `rerun`: the call's
    /// statement may run on another connection ([`rerunnable`]).
    async fn call<'s, R, F, Fut>(&'s self, rerun: bool, f: F) -> Result<R, Error>
    where
        F: Fn(Ctx<'s>) -> Fut,
        Fut: Future<Output = Result<R, Error>>,
    {
        let ctx = self.ctx()?;
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
    async fn call_once<'s, R, F, Fut>(&'s self, rerun: bool, f: F) -> Result<R, Error>
    where
        F: FnOnce(Ctx<'s>) -> Fut,
        Fut: Future<Output = Result<R, Error>>,
    {
        let mut ctx = self.ctx()?;
        if rerun && self.may_swap(&ctx, None) {
            ctx = self.swap(ctx).await?;
        }
        f(ctx).await
    }

    /// True when the call that ran on `ctx` (and failed with `error`, if it ran) may run again
    /// on a fresh connection, invisibly to the caller: it ran on the checked-out connection,
    /// not on a replacement (once, never twice), and [`retry_allowed`] holds for it.
    fn may_swap(&self, ctx: &Ctx<'_>, error: Option<&Error>) -> bool {
        let conn = self.checked_out();
        std::ptr::eq(ctx.g.state, &conn.state)
            && error.is_none_or(is_closed_error)
            && conn.client.is_closed()
            && retry_allowed(&conn.state)
    }

    /// The checked-out connection's replacement, made by whichever call gets here first (the
    /// others wait for it), within `ctx`'s bound: a context on it for the call.
    async fn swap<'s>(&'s self, ctx: Ctx<'s>) -> Result<Ctx<'s>, Error> {
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
            g: self.guarded(fresh),
            bound: ctx.bound,
        })
    }

    /// Prepares a statement (a protocol-level Parse; it does not pin on today's RDS Proxy).
    ///
    /// # Errors
    /// The server's error, a timeout, or [`Error::PinRefused`](crate::Error::PinRefused).
    pub async fn prepare(&self, query: &str) -> Result<Statement, Error> {
        self.call(true, move |ctx| ctx.prepare_typed(query, &[]))
            .await
    }

    /// The connection's cached prepared statement for `query`, prepared and cached on a
    /// miss (as the `&str` methods do); a plain [`prepare`](Self::prepare) when the cache
    /// is off.
    ///
    /// # Errors
    /// As [`prepare`](Self::prepare).
    pub async fn prepare_cached(&self, query: &str) -> Result<Statement, Error> {
        self.call(true, move |ctx| ctx.prepare_cached(query)).await
    }

    /// Prepares a statement with the given parameter types.
    ///
    /// # Errors
    /// As [`prepare`](Self::prepare).
    pub async fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> Result<Statement, Error> {
        self.call(true, move |ctx| ctx.prepare_typed(query, parameter_types))
            .await
    }

    /// Runs a statement and returns its rows.
    ///
    /// # Errors
    /// The server's error, a timeout (the connection is then closed), or
    /// [`Error::PinRefused`](crate::Error::PinRefused).
    pub async fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        self.call(rerunnable(statement), move |ctx| {
            ctx.query(statement, params)
        })
        .await
    }

    /// Runs a statement that returns exactly one row.
    ///
    /// # Errors
    /// As [`query`](Self::query), and when the row count is not one.
    pub async fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.call(rerunnable(statement), move |ctx| {
            ctx.query_one(statement, params)
        })
        .await
    }

    /// Runs a statement that returns at most one row.
    ///
    /// # Errors
    /// As [`query`](Self::query), and when more than one row comes back.
    pub async fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.call(rerunnable(statement), move |ctx| {
            ctx.query_opt(statement, params)
        })
        .await
    }

    /// Runs a statement returning one column and collects its values.
    ///
    /// # Errors
    /// As [`query`](Self::query), and when a row has more than one column.
    pub async fn query_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<R>, Error> {
        self.call(rerunnable(statement), move |ctx| {
            ctx.query_scalar(statement, params)
        })
        .await
    }

    /// Runs a statement returning exactly one row of one column.
    ///
    /// # Errors
    /// As [`query_one`](Self::query_one).
    pub async fn query_one_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<R, Error> {
        self.call(rerunnable(statement), move |ctx| {
            ctx.query_one_scalar(statement, params)
        })
        .await
    }

    /// Runs a statement returning at most one row of one column.
    ///
    /// # Errors
    /// As [`query_opt`](Self::query_opt).
    pub async fn query_opt_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<R>, Error> {
        self.call(rerunnable(statement), move |ctx| {
            ctx.query_opt_scalar(statement, params)
        })
        .await
    }

    /// Runs a statement and streams its rows. Read the stream to its end: one dropped
    /// early makes the pool close the connection.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn query_raw<T, P, I>(&self, statement: &T, params: I) -> Result<RowStream<'_>, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        self.call_once(rerunnable(statement), move |ctx| {
            ctx.query_raw(statement, params)
        })
        .await
    }

    /// Runs a statement with explicitly typed parameters in one round trip (unnamed
    /// statement).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        self.call(true, move |ctx| ctx.query_typed(query, params))
            .await
    }

    /// [`query_typed`](Self::query_typed) for exactly one row.
    ///
    /// # Errors
    /// As [`query_one`](Self::query_one).
    pub async fn query_typed_one(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, Error> {
        self.call(true, move |ctx| ctx.query_typed_one(query, params))
            .await
    }

    /// [`query_typed`](Self::query_typed) for at most one row.
    ///
    /// # Errors
    /// As [`query_opt`](Self::query_opt).
    pub async fn query_typed_opt(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>, Error> {
        self.call(true, move |ctx| ctx.query_typed_opt(query, params))
            .await
    }

    /// [`query_typed`](Self::query_typed), streaming the rows.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn query_typed_raw<P, I>(
        &self,
        query: &str,
        params: I,
    ) -> Result<RowStream<'_>, Error>
    where
        P: BorrowToSql,
        I: IntoIterator<Item = (P, Type)>,
    {
        self.call_once(true, move |ctx| ctx.query_typed_raw(query, params))
            .await
    }

    /// Runs a statement and returns the number of rows it affected.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        self.call(rerunnable(statement), move |ctx| {
            ctx.execute(statement, params)
        })
        .await
    }

    /// [`execute`](Self::execute) with explicitly typed parameters, in one round trip.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        self.call(true, move |ctx| ctx.execute_typed(query, params))
            .await
    }

    /// [`execute`](Self::execute) with parameters from an iterator.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn execute_raw<T, P, I>(&self, statement: &T, params: I) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        self.call_once(rerunnable(statement), move |ctx| {
            ctx.execute_raw(statement, params)
        })
        .await
    }

    /// Starts a `COPY ... FROM STDIN`. Call [`CopyInSink::finish`] at the end.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn copy_in<T, U>(&self, statement: &T) -> Result<CopyInSink<'_, U>, Error>
    where
        T: ?Sized + ToStatement,
        U: Buf + 'static + Send,
    {
        self.call(rerunnable(statement), move |ctx| ctx.copy_in(statement))
            .await
    }

    /// Starts a `COPY ... TO STDOUT`. Read the stream to its end.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn copy_out<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
    ) -> Result<CopyOutStream<'_>, Error> {
        self.call(rerunnable(statement), move |ctx| ctx.copy_out(statement))
            .await
    }

    /// Sends a text of one or more statements with the simple protocol; returns their
    /// rows as text.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn simple_query(&self, query: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        self.call(true, move |ctx| ctx.simple_query(query)).await
    }

    /// [`simple_query`](Self::simple_query), streaming the messages.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn simple_query_raw(&self, query: &str) -> Result<SimpleQueryStream<'_>, Error> {
        self.call(true, move |ctx| ctx.simple_query_raw(query))
            .await
    }

    /// Sends a text of one or more statements with the simple protocol, ignoring rows.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn batch_execute(&self, query: &str) -> Result<(), Error> {
        self.call(true, move |ctx| ctx.batch_execute(query)).await
    }

    /// Checks the connection with a round trip (a protocol Sync), bounded like a statement.
    /// Never retried: it answers for this connection.
    ///
    /// # Errors
    /// When the connection is broken or the bound passes.
    pub async fn check_connection(&self) -> Result<(), Error> {
        let ctx = self.ctx()?;
        ctx.g.run(ctx.bound, ctx.client.check_connection()).await
    }

    /// True when raw access was handed out since the connection was last settled (asked at
    /// the checkout, before anything could replace the connection).
    pub(crate) fn raw_used(&self) -> bool {
        self.checked_out().state.raw_used()
    }

    /// A round trip after raw access: whatever it left queued is written and answered first.
    /// True when the connection is then clean enough to hand out; the retry rule's mark is
    /// taken after it, as the checkout hands the connection out only then.
    pub(crate) async fn settle_raw(&self) -> bool {
        // Part of the checkout: bounded like a wait for a slot (and like the freeze check).
        let s = &self.pool.settings;
        let bound = Bound::new(
            Some(s.acquire_timeout.min(s.validate_timeout)),
            self.cutoff_now(),
        );
        let conn = self.conn();
        if self
            .guarded(conn)
            .run(bound, conn.client.check_connection())
            .await
            .is_err()
        {
            return false;
        }
        conn.state.settle();
        self.pool.report_pins(&conn.state);
        conn.state.mark_checkout();
        conn.fate(&self.pool.settings, std::time::SystemTime::now(), false) == Fate::Idle
    }

    /// True when the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.conn().client.is_closed() || self.conn().state.health(false).killed
    }

    /// Begins a transaction. Dropping it without `commit` rolls it back.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.build_transaction().start().await
    }

    /// A builder for a transaction with an isolation level, read-only or deferrable.
    pub fn build_transaction(&mut self) -> TransactionBuilder<'_> {
        TransactionBuilder {
            client: self,
            isolation_level: None,
            read_only: None,
            deferrable: None,
        }
    }

    /// Whether this connection may be pinned, and by which statement first.
    pub fn pin_state(this: &Self) -> PinState {
        let state = &this.conn().state;
        PinState {
            reasons: state.pinned(),
            first_statement: state.first_pin(),
        }
    }

    /// The tokio-postgres client, for what pinpool does not wrap. What it sends is observed
    /// on the wire like everything else (pins, transaction status, COPY), and each request is
    /// bounded on the socket: when `query_timeout` from its writing, or the cutoff of the
    /// invocation this is called in, passes before its answer, the socket closes and the call
    /// fails (with the driver's closed-connection error). A call dropped before its request
    /// was written may leave that request queued: such a connection gets a round trip before an
    /// invocation ends (or at the next invocation's start) before it is trusted again. Once
    /// it was handed out, the connection is never swapped for a fresh one (the caller holds
    /// this one's client): no statement of this checkout is retried.
    pub fn raw(this: &Self) -> &Client {
        let conn = this.conn();
        conn.state.set_raw_used();
        set_wire_cutoff(&conn.state.wire, this.cutoff_now());
        &conn.client
    }

    /// The deadline-derived cutoff a statement of this client made now stops at, if any: the
    /// invocation's it runs in (whenever the client was checked out), or `get_by`'s if earlier.
    pub fn cutoff(this: &Self) -> Option<Instant> {
        this.cutoff_now()
    }
}

/// A checked-out client is usable where `&tokio_postgres::Client` is expected (code written
/// for deadpool-postgres, migrations, other crates' helpers), as [`PooledClient::raw`]: what
/// it sends is observed on the wire (pins, transaction status, COPY) and every request is
/// bounded where its bytes are, by `query_timeout` and the cutoff of the invocation it runs
/// in (the socket closes when the bound passes with the request unanswered). pinpool's own
/// methods keep their names, so method calls on the client still resolve to them: only code
/// that asks for the driver's client gets it.
impl std::ops::Deref for PooledClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        PooledClient::raw(self)
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // A replaced connection was closed and counted when it was replaced: only the one
        // that replaced it goes back, with the slot. (Looked at before it is taken: taking
        // moves a new cell in, and almost every connection has none.)
        if conn.replacement.get().is_some()
            && let Some(fresh) = conn.replacement.take().and_then(|cell| cell.into_inner())
        {
            conn = fresh;
        }
        self.pool.note_held(self.since, self.from);
        self.pool.put_back(conn, self.invocation.as_ref());
    }
}

impl std::fmt::Debug for PooledClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = &self.conn().state;
        f.debug_struct("PooledClient")
            .field("connection", &state.id)
            .field("checked_out_at", &format_args!("{}", self.from))
            .field("pinned", &state.pinned())
            .finish()
    }
}

/// Marks a connection as inside a pinpool transaction while the outermost one lives. If the
/// transaction is leaked (`mem::forget`), the mark stays and the connection is closed.
/// A mark dropped before `commit` or `rollback` ran means tokio-postgres queued a ROLLBACK.
struct TxnMark<'a> {
    state: &'a ConnState,
    finished: bool,
}

impl<'a> TxnMark<'a> {
    fn new(state: &'a ConnState) -> Self {
        state.set_txn_object(true);
        TxnMark {
            state,
            finished: false,
        }
    }
}

impl Drop for TxnMark<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.state.set_rollback_queued();
        }
        self.state.set_txn_object(false);
    }
}

/// A transaction (or a savepoint inside one). Dropping it without [`Transaction::commit`]
/// queues a `ROLLBACK` (sent before anything else on the connection).
pub struct Transaction<'a> {
    // Field order matters: the rollback is queued before the mark is cleared.
    inner: tokio_postgres::Transaction<'a>,
    g: Guarded<'a>,
    _mark: Option<TxnMark<'a>>,
}

impl<'a> Transaction<'a> {
    fn ctx(&self) -> Result<Ctx<'_>, Error> {
        self.g.ctx(self.inner.client())
    }

    /// Like [`PooledClient::prepare`], inside the transaction.
    pub async fn prepare(&self, query: &str) -> Result<Statement, Error> {
        self.ctx()?.prepare_typed(query, &[]).await
    }

    /// Like [`PooledClient::prepare_cached`], inside the transaction.
    pub async fn prepare_cached(&self, query: &str) -> Result<Statement, Error> {
        self.ctx()?.prepare_cached(query).await
    }

    /// Like [`PooledClient::prepare_typed`], inside the transaction.
    pub async fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> Result<Statement, Error> {
        self.ctx()?.prepare_typed(query, parameter_types).await
    }

    /// Like [`PooledClient::query`], inside the transaction.
    pub async fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        self.ctx()?.query(statement, params).await
    }

    /// Like [`PooledClient::query_one`], inside the transaction.
    pub async fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.ctx()?.query_one(statement, params).await
    }

    /// Like [`PooledClient::query_opt`], inside the transaction.
    pub async fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.ctx()?.query_opt(statement, params).await
    }

    /// Like [`PooledClient::query_scalar`], inside the transaction.
    pub async fn query_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<R>, Error> {
        self.ctx()?.query_scalar(statement, params).await
    }

    /// Like [`PooledClient::query_one_scalar`], inside the transaction.
    pub async fn query_one_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<R, Error> {
        self.ctx()?.query_one_scalar(statement, params).await
    }

    /// Like [`PooledClient::query_opt_scalar`], inside the transaction.
    pub async fn query_opt_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<R>, Error> {
        self.ctx()?.query_opt_scalar(statement, params).await
    }

    /// Like [`PooledClient::query_raw`], inside the transaction.
    pub async fn query_raw<T, P, I>(&self, statement: &T, params: I) -> Result<RowStream<'_>, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        self.ctx()?.query_raw(statement, params).await
    }

    /// Like [`PooledClient::query_typed`], inside the transaction.
    pub async fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        self.ctx()?.query_typed(query, params).await
    }

    /// Like [`PooledClient::query_typed_one`], inside the transaction.
    pub async fn query_typed_one(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, Error> {
        self.ctx()?.query_typed_one(query, params).await
    }

    /// Like [`PooledClient::query_typed_opt`], inside the transaction.
    pub async fn query_typed_opt(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>, Error> {
        self.ctx()?.query_typed_opt(query, params).await
    }

    /// Like [`PooledClient::query_typed_raw`], inside the transaction.
    pub async fn query_typed_raw<P, I>(
        &self,
        query: &str,
        params: I,
    ) -> Result<RowStream<'_>, Error>
    where
        P: BorrowToSql,
        I: IntoIterator<Item = (P, Type)>,
    {
        self.ctx()?.query_typed_raw(query, params).await
    }

    /// Like [`PooledClient::execute`], inside the transaction.
    pub async fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        self.ctx()?.execute(statement, params).await
    }

    /// Like [`PooledClient::execute_typed`], inside the transaction.
    pub async fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        self.ctx()?.execute_typed(query, params).await
    }

    /// Like [`PooledClient::execute_raw`], inside the transaction.
    pub async fn execute_raw<T, P, I>(&self, statement: &T, params: I) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        self.ctx()?.execute_raw(statement, params).await
    }

    /// Like [`PooledClient::copy_in`], inside the transaction.
    pub async fn copy_in<T, U>(&self, statement: &T) -> Result<CopyInSink<'_, U>, Error>
    where
        T: ?Sized + ToStatement,
        U: Buf + 'static + Send,
    {
        self.ctx()?.copy_in(statement).await
    }

    /// Like [`PooledClient::copy_out`], inside the transaction.
    pub async fn copy_out<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
    ) -> Result<CopyOutStream<'_>, Error> {
        self.ctx()?.copy_out(statement).await
    }

    /// Like [`PooledClient::simple_query`], inside the transaction.
    pub async fn simple_query(&self, query: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        self.ctx()?.simple_query(query).await
    }

    /// Like [`PooledClient::simple_query_raw`], inside the transaction.
    pub async fn simple_query_raw(&self, query: &str) -> Result<SimpleQueryStream<'_>, Error> {
        self.ctx()?.simple_query_raw(query).await
    }

    /// Like [`PooledClient::batch_execute`], inside the transaction.
    pub async fn batch_execute(&self, query: &str) -> Result<(), Error> {
        self.ctx()?.batch_execute(query).await
    }

    /// Commits the transaction (or releases the savepoint).
    ///
    /// # Errors
    /// The server's error or a timeout.
    pub async fn commit(self) -> Result<(), Error> {
        let Transaction {
            inner,
            g,
            mut _mark,
        } = self;
        let g = g.now();
        let r = g.run(g.bound()?, inner.commit()).await;
        if let Some(m) = _mark.as_mut() {
            // A commit that failed before it was sent (its bound had passed) dropped the
            // transaction unfinished: tokio-postgres queued a ROLLBACK, which the end of the
            // invocation makes sure reaches the server.
            m.finished = r.is_ok();
        }
        r
    }

    /// Rolls the transaction back (or back to the savepoint).
    ///
    /// # Errors
    /// The server's error or a timeout.
    pub async fn rollback(self) -> Result<(), Error> {
        let Transaction {
            inner,
            g,
            mut _mark,
        } = self;
        let g = g.now();
        let r = g.run(g.bound()?, inner.rollback()).await;
        if let Some(m) = _mark.as_mut() {
            m.finished = r.is_ok();
        }
        r
    }

    /// A nested transaction (a savepoint).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        let g = self.g.now();
        let inner = g.run(g.bound()?, self.inner.transaction()).await?;
        Ok(Transaction {
            inner,
            g,
            _mark: None,
        })
    }

    /// A nested transaction with a savepoint name.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn savepoint<I: Into<String>>(&mut self, name: I) -> Result<Transaction<'_>, Error> {
        let g = self.g.now();
        // tokio-postgres pastes the name into the SQL: the wire classifies what it sends, and
        // the strict policy checks the text first.
        let name = name.into();
        g.check(&format!("SAVEPOINT {name}"), None, Protocol::Simple)?;
        let inner = g.run(g.bound()?, self.inner.savepoint(name)).await?;
        Ok(Transaction {
            inner,
            g,
            _mark: None,
        })
    }

    /// Binds a statement's parameters to a portal, read with [`query_portal`](Self::query_portal):
    /// the pin-free way to read a large result in pieces (instead of `DECLARE CURSOR`).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn bind<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Portal, Error> {
        let ctx = self.ctx()?;
        ctx.with_statement(statement, move |s| async move {
            ctx.run(self.inner.bind(s.pg(), params)).await
        })
        .await
    }

    /// [`bind`](Self::bind) with parameters from an iterator.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn bind_raw<P, T, I>(&self, statement: &T, params: I) -> Result<Portal, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let ctx = self.ctx()?;
        ctx.with_statement_once(statement, async |s| {
            ctx.run(self.inner.bind_raw(s.pg(), params)).await
        })
        .await
    }

    /// Reads up to `max_rows` rows from a portal (0: all).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn query_portal(&self, portal: &Portal, max_rows: i32) -> Result<Vec<Row>, Error> {
        let g = self.g.now();
        g.run(g.bound()?, self.inner.query_portal(portal, max_rows))
            .await
    }

    /// [`query_portal`](Self::query_portal), streaming the rows.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub async fn query_portal_raw(
        &self,
        portal: &Portal,
        max_rows: i32,
    ) -> Result<RowStream<'_>, Error> {
        let g = self.g.now();
        let (s, bound, f) = g
            .open(g.bound()?, self.inner.query_portal_raw(portal, max_rows))
            .await?;
        Ok(RowStream::new(s, bound, self.g.state, f))
    }
}

/// Builds a transaction, from [`PooledClient::build_transaction`].
#[must_use = "a transaction builder does nothing until start() is called"]
pub struct TransactionBuilder<'a> {
    client: &'a mut PooledClient,
    isolation_level: Option<IsolationLevel>,
    read_only: Option<bool>,
    deferrable: Option<bool>,
}

impl<'a> TransactionBuilder<'a> {
    /// The isolation level.
    pub fn isolation_level(mut self, level: IsolationLevel) -> Self {
        self.isolation_level = Some(level);
        self
    }

    /// A read-only transaction.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = Some(read_only);
        self
    }

    /// A deferrable transaction (with serializable and read-only).
    pub fn deferrable(mut self, deferrable: bool) -> Self {
        self.deferrable = Some(deferrable);
        self
    }

    /// Begins the transaction. Its BEGIN is the first thing it sends, so like any call it
    /// begins on a fresh connection when the checked-out one turned out closed before
    /// anything of the checkout was sent (the retry rule in the README).
    ///
    /// # Errors
    /// The server's error or a timeout.
    pub async fn start(self) -> Result<Transaction<'a>, Error> {
        let TransactionBuilder {
            client,
            isolation_level,
            read_only,
            deferrable,
        } = self;
        let options = (isolation_level, read_only, deferrable);
        let PooledClient {
            conn,
            pool,
            cutoff,
            explicit,
            invocation,
            from,
            ..
        } = client;
        let explicit = *explicit;
        let (pool, cutoff): (&PoolInner, Option<Instant>) = (pool, *cutoff);
        let cutoff = cutoff_now(pool, cutoff, explicit);
        // The bound first: a start refused here sends nothing and queues no ROLLBACK, so it
        // must leave no mark saying one is queued.
        let bound = call_bound(pool, cutoff)?;
        let conn: &mut ConnData = conn
            .as_mut()
            .expect("a PooledClient holds its connection until dropped");
        if conn
            .replacement
            .get()
            .is_some_and(|cell| cell.initialized())
        {
            let fresh = conn
                .replacement
                .get_mut()
                .and_then(|cell| cell.get_mut())
                .expect("a replacement is set once and kept");
            let ConnData { client, state, .. } = &mut **fresh;
            return begin(client, state, pool, (cutoff, explicit), options, bound)
                .await
                .map_err(|(e, _)| e);
        }
        // Field by field: the transaction borrows the client it begins on for 'a, and the
        // retry needs the replacement cell while the first attempt's borrow lasts.
        let ConnData {
            client,
            state,
            replacement,
            ..
        } = conn;
        let old = state.id;
        let e = match begin(client, state, pool, (cutoff, explicit), options, bound).await {
            Ok(tx) => return Ok(tx),
            Err((e, true)) if is_closed_error(&e) => e,
            Err((e, _)) => return Err(e),
        };
        let fresh = match within(bound, Phase::Query, pool.replacement(old, cutoff)).await {
            Ok(Ok(r)) => r,
            Ok(Err(Error::Closed)) => return Err(e),
            Ok(Err(other)) | Err(other) => return Err(other),
        };
        if let Some(inv) = invocation {
            inv.give_back(old);
            inv.lend(fresh.state.id, from);
        }
        pool.retried(old, fresh.state.id);
        if replacement.get_or_init(Box::default).set(fresh).is_err() {
            unreachable!("the client is borrowed mutably: nothing else sets its replacement");
        }
        let fresh = replacement
            .get_mut()
            .and_then(|cell| cell.get_mut())
            .expect("just set");
        let ConnData { client, state, .. } = &mut **fresh;
        begin(client, state, pool, (cutoff, explicit), options, bound)
            .await
            .map_err(|(e, _)| e)
    }
}

/// Begins a transaction on a connection's client. On failure, also says whether [`retry_allowed`] holds for
/// it (decided here, where the connection is still at hand; nothing can hand out raw access
/// while the builder holds the client).
async fn begin<'c>(
    client: &'c mut Client,
    state: &'c ConnState,
    pool: &'c PoolInner,
    (cutoff, explicit): (Option<Instant>, Option<Instant>),
    (isolation_level, read_only, deferrable): (Option<IsolationLevel>, Option<bool>, Option<bool>),
    bound: Option<Bound>,
) -> Result<Transaction<'c>, (Error, bool)> {
    let g = Guarded {
        state,
        pool,
        cutoff,
        explicit,
    };
    let mut builder = client.build_transaction();
    if let Some(level) = isolation_level {
        builder = builder.isolation_level(level);
    }
    if let Some(on) = read_only {
        builder = builder.read_only(on);
    }
    if let Some(on) = deferrable {
        builder = builder.deferrable(on);
    }
    let mark = TxnMark::new(state);
    match g.run(bound, builder.start()).await {
        Ok(inner) => Ok(Transaction {
            inner,
            g,
            _mark: Some(mark),
        }),
        Err(e) => {
            drop(mark);
            // Closed is read from the connection's task, not its client: on success the
            // transaction keeps the client borrowed.
            let retry = retry_allowed(state);
            Err((e, retry))
        }
    }
}

/// What a pooled client and a transaction have in common, for code that takes either.
pub trait GenericClient: private::Sealed + Sync {
    /// See [`PooledClient::prepare`].
    fn prepare(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> + Send;
    /// See [`PooledClient::prepare_typed`].
    fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send;
    /// See [`PooledClient::query`].
    fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;
    /// See [`PooledClient::query_one`].
    fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> + Send;
    /// See [`PooledClient::query_opt`].
    fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send;
    /// See [`PooledClient::query_typed`].
    fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;
    /// See [`PooledClient::execute`].
    fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> + Send;
    /// See [`PooledClient::execute_typed`].
    fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> + Send;
    /// See [`PooledClient::simple_query`].
    fn simple_query(
        &self,
        query: &str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryMessage>, Error>> + Send;
    /// See [`PooledClient::batch_execute`].
    fn batch_execute(&self, query: &str) -> impl Future<Output = Result<(), Error>> + Send;
    /// See [`PooledClient::transaction`].
    fn transaction(&mut self) -> impl Future<Output = Result<Transaction<'_>, Error>> + Send;
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::PooledClient {}
    impl Sealed for super::Transaction<'_> {}
}

impl GenericClient for PooledClient {
    async fn prepare(&self, query: &str) -> Result<Statement, Error> {
        PooledClient::prepare(self, query).await
    }
    async fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> Result<Statement, Error> {
        PooledClient::prepare_typed(self, query, parameter_types).await
    }
    async fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        PooledClient::query(self, statement, params).await
    }
    async fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        PooledClient::query_one(self, statement, params).await
    }
    async fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        PooledClient::query_opt(self, statement, params).await
    }
    async fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        PooledClient::query_typed(self, query, params).await
    }
    async fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        PooledClient::execute(self, statement, params).await
    }
    async fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        PooledClient::execute_typed(self, query, params).await
    }
    async fn simple_query(&self, query: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        PooledClient::simple_query(self, query).await
    }
    async fn batch_execute(&self, query: &str) -> Result<(), Error> {
        PooledClient::batch_execute(self, query).await
    }
    async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        PooledClient::transaction(self).await
    }
}

impl GenericClient for Transaction<'_> {
    async fn prepare(&self, query: &str) -> Result<Statement, Error> {
        Transaction::prepare(self, query).await
    }
    async fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> Result<Statement, Error> {
        Transaction::prepare_typed(self, query, parameter_types).await
    }
    async fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        Transaction::query(self, statement, params).await
    }
    async fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        Transaction::query_one(self, statement, params).await
    }
    async fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        Transaction::query_opt(self, statement, params).await
    }
    async fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        Transaction::query_typed(self, query, params).await
    }
    async fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        Transaction::execute(self, statement, params).await
    }
    async fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        Transaction::execute_typed(self, query, params).await
    }
    async fn simple_query(&self, query: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        Transaction::simple_query(self, query).await
    }
    async fn batch_execute(&self, query: &str) -> Result<(), Error> {
        Transaction::batch_execute(self, query).await
    }
    async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        Transaction::transaction(self).await
    }
}
