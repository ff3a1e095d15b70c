//! [`PooledClient`]: a connection checked out of the pool, its statement methods, raw
//! access and its return.

use std::future::Future;
use std::panic::Location;
use std::sync::Arc;

use bytes::Buf;
use tokio::time::Instant;

use tokio_postgres::types::{BorrowToSql, FromSqlOwned, ToSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage};

use crate::conn::{Conn, Fate};
use crate::deadline::Bound;
use crate::error::Error;
use crate::invocation::Invocation;
use crate::pinning::Reasons;
use crate::pool::PoolInner;
use crate::statement::{Statement, ToStatement};
use crate::stream::{CopyInSink, CopyOutStream, RowStream, SimpleQueryStream};

use super::ctx::Ctx;
use super::guarded::{Guarded, cutoff_now, set_wire_cutoff};
use super::retry::rerunnable;
use super::transaction::{Transaction, TransactionBuilder};

/// A connection checked out of the pool. It goes back when dropped, synchronously: to the idle
/// set if its state is known and clean, otherwise it is closed.
///
/// It offers tokio-postgres's statement methods with the same names and argument shapes, and
/// derefs to the driver's `tokio_postgres::Client` for code written for it (observed and
/// bounded on the socket, see [`PooledClient::raw`]). Pool-specific calls are associated
/// functions ([`PooledClient::pin_state`], [`PooledClient::raw`]) so they never shadow a
/// driver method.
pub struct PooledClient {
    /// The connection the checkout handed out. If it was closed before anything was sent on
    /// it ([`retry_allowed`]), its `replacement` is where every call runs and the one that
    /// goes back to the pool; at most one per checkout.
    pub(super) conn: Option<Conn>,
    pub(super) pool: Arc<PoolInner>,
    /// As of the checkout: the earlier of `get_by`'s and the invocation's then current. Each
    /// call stops at the cutoff of the invocation it runs in ([`cutoff_now`]).
    pub(super) cutoff: Option<Instant>,
    /// The cutoff `get_by` was given, if any.
    pub(super) explicit: Option<Instant>,
    pub(super) invocation: Option<Invocation>,
    /// Where `get()` was called, and when (only with `held_too_long`).
    pub(super) from: &'static Location<'static>,
    pub(super) since: Option<Instant>,
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
    pub(super) fn checked_out(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a PooledClient holds its connection until dropped")
    }

    /// The connection calls run on: the one that replaced the checked-out one, if any (one
    /// atomic load).
    pub(super) fn conn(&self) -> &Conn {
        let conn = self.checked_out();
        match conn.replacement.get().and_then(|cell| cell.get()) {
            Some(fresh) => fresh,
            None => conn,
        }
    }

    /// A guard for calls made now on `conn`.
    pub(super) fn guarded<'s>(&'s self, conn: &'s Conn) -> Guarded<'s> {
        Guarded {
            state: &conn.state,
            pool: &self.pool,
            cutoff: self.cutoff,
            explicit: self.explicit,
            at: self.from,
            alone: false,
        }
        .now()
    }

    /// The cutoff of a call made now ([`cutoff_now`]).
    pub(super) fn cutoff_now(&self) -> Option<Instant> {
        cutoff_now(&self.pool, self.cutoff, self.explicit)
    }

    /// A context for one call, made at `at`, on the current connection, with the call's
    /// bound.
    pub(super) fn ctx_at(&self, at: &'static Location<'static>) -> Result<Ctx<'_>, Error> {
        let conn = self.conn();
        self.guarded(conn).at(at).ctx(&conn.client)
    }

    /// Prepares a statement (a protocol-level Parse; it does not pin on today's RDS Proxy).
    ///
    /// # Errors
    /// The server's error, a timeout, or [`Error::PinRefused`](crate::Error::PinRefused).
    #[track_caller]
    pub fn prepare(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.prepare_typed(query, &[]))
                .await
        }
    }

    /// The connection's cached prepared statement for `query`, prepared and cached on a
    /// miss (as the `&str` methods do); a plain [`prepare`](Self::prepare) when the cache
    /// is off.
    ///
    /// # Errors
    /// As [`prepare`](Self::prepare).
    #[track_caller]
    pub fn prepare_cached(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.prepare_cached(query))
                .await
        }
    }

    /// [`prepare_cached`](Self::prepare_cached) with parameter types: the cached statement
    /// when its parameter types are these (or `parameter_types` is empty), else a statement
    /// prepared with them (not cached: the cache holds one statement per SQL text).
    ///
    /// # Errors
    /// As [`prepare`](Self::prepare).
    #[track_caller]
    pub fn prepare_typed_cached(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| {
                ctx.prepare_typed_cached(query, parameter_types)
            })
            .await
        }
    }

    /// Prepares a statement with the given parameter types.
    ///
    /// # Errors
    /// As [`prepare`](Self::prepare).
    #[track_caller]
    pub fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| {
                ctx.prepare_typed(query, parameter_types)
            })
            .await
        }
    }

    /// Runs a statement and returns its rows.
    ///
    /// # Errors
    /// The server's error, a timeout (the connection is then closed), or
    /// [`Error::PinRefused`](crate::Error::PinRefused).
    #[track_caller]
    pub fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| {
                ctx.query(statement, params)
            })
            .await
        }
    }

    /// Runs a statement that returns exactly one row.
    ///
    /// # Errors
    /// As [`query`](Self::query), and when the row count is not one.
    #[track_caller]
    pub fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| {
                ctx.query_one(statement, params)
            })
            .await
        }
    }

    /// Runs a statement that returns at most one row.
    ///
    /// # Errors
    /// As [`query`](Self::query), and when more than one row comes back.
    #[track_caller]
    pub fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| {
                ctx.query_opt(statement, params)
            })
            .await
        }
    }

    /// Runs a statement returning one column and collects its values.
    ///
    /// # Errors
    /// As [`query`](Self::query), and when a row has more than one column.
    #[track_caller]
    pub fn query_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<R>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| {
                ctx.query_scalar(statement, params)
            })
            .await
        }
    }

    /// Runs a statement returning exactly one row of one column.
    ///
    /// # Errors
    /// As [`query_one`](Self::query_one).
    #[track_caller]
    pub fn query_one_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<R, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| {
                ctx.query_one_scalar(statement, params)
            })
            .await
        }
    }

    /// Runs a statement returning at most one row of one column.
    ///
    /// # Errors
    /// As [`query_opt`](Self::query_opt).
    #[track_caller]
    pub fn query_opt_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<R>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| {
                ctx.query_opt_scalar(statement, params)
            })
            .await
        }
    }

    /// Runs a statement and streams its rows. Read the stream to its end: one dropped
    /// early makes the pool close the connection.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn query_raw<T, P, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<RowStream<'_>, Error>>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let at = Location::caller();
        async move {
            self.call_once(at, rerunnable(statement), move |ctx| {
                ctx.query_raw(statement, params)
            })
            .await
        }
    }

    /// Runs a statement with explicitly typed parameters in one round trip (unnamed
    /// statement).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.query_typed(query, params))
                .await
        }
    }

    /// [`query_typed`](Self::query_typed) for exactly one row.
    ///
    /// # Errors
    /// As [`query_one`](Self::query_one).
    #[track_caller]
    pub fn query_typed_one(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.query_typed_one(query, params))
                .await
        }
    }

    /// [`query_typed`](Self::query_typed) for at most one row.
    ///
    /// # Errors
    /// As [`query_opt`](Self::query_opt).
    #[track_caller]
    pub fn query_typed_opt(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.query_typed_opt(query, params))
                .await
        }
    }

    /// [`query_typed`](Self::query_typed), streaming the rows.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn query_typed_raw<P, I>(
        &self,
        query: &str,
        params: I,
    ) -> impl Future<Output = Result<RowStream<'_>, Error>>
    where
        P: BorrowToSql,
        I: IntoIterator<Item = (P, Type)>,
    {
        let at = Location::caller();
        async move {
            self.call_once(at, true, move |ctx| ctx.query_typed_raw(query, params))
                .await
        }
    }

    /// Runs a statement and returns the number of rows it affected.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| {
                ctx.execute(statement, params)
            })
            .await
        }
    }

    /// [`execute`](Self::execute) with explicitly typed parameters, in one round trip.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.execute_typed(query, params))
                .await
        }
    }

    /// [`execute`](Self::execute) with parameters from an iterator.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn execute_raw<T, P, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<u64, Error>>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let at = Location::caller();
        async move {
            self.call_once(at, rerunnable(statement), move |ctx| {
                ctx.execute_raw(statement, params)
            })
            .await
        }
    }

    /// Starts a `COPY ... FROM STDIN`. Call [`CopyInSink::finish`] at the end.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn copy_in<T, U>(
        &self,
        statement: &T,
    ) -> impl Future<Output = Result<CopyInSink<'_, U>, Error>>
    where
        T: ?Sized + ToStatement,
        U: Buf + 'static + Send,
    {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| ctx.copy_in(statement))
                .await
        }
    }

    /// Starts a `COPY ... TO STDOUT`. Read the stream to its end.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn copy_out<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
    ) -> impl Future<Output = Result<CopyOutStream<'_>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, rerunnable(statement), move |ctx| {
                ctx.copy_out(statement)
            })
            .await
        }
    }

    /// Sends a text of one or more statements with the simple protocol; returns their
    /// rows as text.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn simple_query(
        &self,
        query: &str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryMessage>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.simple_query(query))
                .await
        }
    }

    /// [`simple_query`](Self::simple_query), streaming the messages.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn simple_query_raw(
        &self,
        query: &str,
    ) -> impl Future<Output = Result<SimpleQueryStream<'_>, Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.simple_query_raw(query))
                .await
        }
    }

    /// Sends a text of one or more statements with the simple protocol, ignoring rows.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn batch_execute(&self, query: &str) -> impl Future<Output = Result<(), Error>> {
        let at = Location::caller();
        async move {
            self.call(at, true, move |ctx| ctx.batch_execute(query))
                .await
        }
    }

    /// Checks the connection with a round trip (a protocol Sync), bounded like a statement.
    /// Never retried: it answers for this connection.
    ///
    /// # Errors
    /// When the connection is broken or the bound passes.
    #[track_caller]
    pub fn check_connection(&self) -> impl Future<Output = Result<(), Error>> {
        let at = Location::caller();
        async move {
            let ctx = self.ctx_at(at)?;
            ctx.g.run(ctx.bound, ctx.client.check_connection()).await
        }
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
        self.pool.report_pins(&conn.state, Some(self.from));
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
    #[track_caller]
    pub fn transaction(&mut self) -> impl Future<Output = Result<Transaction<'_>, Error>> {
        self.build_transaction().start()
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
        self.pool
            .put_back(conn, self.invocation.as_ref(), self.from);
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
