//! [`Ctx`]: a client and its guard for one call, with the call's bound; the statement
//! methods every public one forwards to, and the cached statement (readied, or prepared
//! again when the server calls it stale).

use std::future::Future;
use std::sync::Arc;

use bytes::Buf;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{BorrowToSql, FromSqlOwned, ToSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage};

use crate::cache::Shape;
use crate::conn::{ConnState, InFlight};
use crate::deadline::{Bound, within};
use crate::error::{Error, Phase};
use crate::pinning::{Classification, Protocol, Reason, Reasons, TxnControl, classify};
use crate::statement::{Statement, StatementRef, ToStatement};
use crate::stream::{CopyInSink, CopyOutStream, RowStream, SimpleQueryStream};

use super::guarded::Guarded;

/// A client and its guard: the single place statements pass through, with the bound of the
/// one call it serves.
#[derive(Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub(super) client: &'a Client,
    pub(super) g: Guarded<'a>,
    pub(super) bound: Option<Bound>,
}

/// What tokio-postgres is given for a statement argument: its `ToStatement`, and `Debug`,
/// which its scalar methods ask for.
pub(super) trait PgStatement: tokio_postgres::ToStatement + std::fmt::Debug + Sync {}

impl<T: ?Sized + tokio_postgres::ToStatement + std::fmt::Debug + Sync> PgStatement for T {}

/// A statement argument, checked and ready to run: a prepared statement (for SQL text the
/// connection's own, from its cache), the SQL text itself when the cache is off, or SQL text
/// new to the connection whose shape the pool learned.
pub(super) enum Target {
    Prepared(tokio_postgres::Statement),
    /// Owned: a `str` cannot stand behind a `dyn`. Copied only when the cache is off, where
    /// each call prepares its statement with a round trip anyway.
    Text(String),
    /// Sent unnamed with its learned parameter types, in one round trip ([`Ctx::typed`]).
    /// A method that cannot send it so runs it as `Text`.
    Typed(String, Shape),
}

impl Target {
    /// As tokio-postgres takes it.
    pub(super) fn pg(&self) -> &dyn PgStatement {
        match self {
            Target::Prepared(s) => s,
            Target::Text(sql) | Target::Typed(sql, _) => sql,
        }
    }
}

/// What a statement method can send unnamed: `params` parameters (`None`: not counted
/// before the call, as for an iterator), and whether it reads one column (the scalar methods,
/// which then need the learned shape to say so).
#[derive(Clone, Copy)]
pub(super) struct Unnamed {
    params: Option<usize>,
    scalar: bool,
}

impl Unnamed {
    fn rows(params: usize) -> Option<Unnamed> {
        Some(Unnamed {
            params: Some(params),
            scalar: false,
        })
    }

    fn scalar(params: usize) -> Option<Unnamed> {
        Some(Unnamed {
            params: Some(params),
            scalar: true,
        })
    }

    /// Parameters from an iterator: each is sent with the learned type at its place.
    fn raw() -> Option<Unnamed> {
        Some(Unnamed {
            params: None,
            scalar: false,
        })
    }
}

/// `params` with the learned `types`, as the typed methods take them. A count that differs
/// is the caller's mistake: a missing type is `unknown` (the parameter then fails to encode),
/// a missing value the server's error.
fn with_types<'p>(
    params: &[&'p (dyn ToSql + Sync)],
    types: &[Type],
) -> Vec<(&'p (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, types.get(i).cloned().unwrap_or(Type::UNKNOWN)))
        .collect()
}

/// True when a call sent with a learned shape failed in a way that says the shape may be
/// stale, so it is forgotten and the next call learns it again: the server refused the text
/// or its types (DDL may have changed them: SQLSTATE class 42, an undefined column or
/// operator, a type mismatch, ...; a Bind whose parameter count no longer fits, 08P01; a
/// plan that may not change its result type, 0A000; a statement gone, 26000), or a value did
/// not encode as the learned type of its parameter (DDL changed a column from `int4` to
/// `int8`, and the caller now passes an `i64`: a prepare of the text today would accept it)
/// or decode as its column's type. An error from running the statement with its values (a
/// unique violation, a division by zero, a serialization failure, a timeout) says nothing of
/// the shape: forgetting it would only make the next call learn it again, under a
/// transaction pooler's profile with a round trip of its own.
fn refuses_shape(e: &Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        return code.code().starts_with("42")
            || [
                SqlState::PROTOCOL_VIOLATION,
                SqlState::FEATURE_NOT_SUPPORTED,
                SqlState::INVALID_SQL_STATEMENT_NAME,
            ]
            .contains(code);
    }
    matches!(e, Error::Query(pg) if std::error::Error::source(pg)
        .is_some_and(|s| s.is::<tokio_postgres::types::WrongType>()))
}

/// Column 0 of a row read by a scalar method sent unnamed. A row of more columns is an error,
/// as tokio-postgres's scalar methods say for a prepared statement, never its first column
/// read silently: a learned shape may be stale (DDL added a column to a `SELECT *`), and
/// where named statements cannot be used a misfit shape is sent as it is. (tokio-postgres
/// makes its column-count error privately: this is its nearest public one.)
fn scalar<R: FromSqlOwned>(row: &Row) -> Result<R, tokio_postgres::Error> {
    if row.len() != 1 {
        return row.try_get("(a scalar method reads rows of exactly one column)");
    }
    row.try_get(0)
}

/// True for the server's word that a prepared statement no longer fits (DDL changed its
/// result type) or no longer exists, and that it said so while binding it, before anything
/// ran. Decided from structure, never from the error's text: the error answered the Bind of
/// the call's request, number `request` (no BindComplete came before it,
/// `Wire::failed_before_bind_complete`), and it was raised by the server routine that
/// revalidates a cached plan or looks a statement up. The same
/// SQLSTATE raised by a function (`RAISE`), relayed from another server (postgres_fdw,
/// dblink) or by an SQL-level `EXECUTE` inside a statement that ran fails one of the two.
pub(super) fn is_stale(e: &Error, state: &ConnState, request: u32) -> bool {
    let Some(db) = e.as_db_error() else {
        return false;
    };
    let routine = db.routine().unwrap_or("");
    let revalidating =
        *db.code() == SqlState::FEATURE_NOT_SUPPORTED && routine == "RevalidateCachedQuery";
    let looking_up = *db.code() == SqlState::INVALID_SQL_STATEMENT_NAME
        && matches!(routine, "FetchPreparedStatement" | "exec_bind_message");
    (revalidating || looking_up) && state.wire.failed_before_bind_complete(request)
}

/// Parameters from an iterator with the learned types, as [`with_types`] pairs them; turned
/// into an iterator only where tokio-postgres encodes them, so a future holding it is `Send`
/// when the caller's iterable is.
struct WithTypes<I>(I, Arc<[Type]>);

impl<I: IntoIterator> IntoIterator for WithTypes<I> {
    type Item = (I::Item, Type);
    type IntoIter = Typed<I::IntoIter>;

    fn into_iter(self) -> Self::IntoIter {
        Typed {
            params: self.0.into_iter(),
            types: self.1,
            at: 0,
        }
    }
}

struct Typed<It> {
    params: It,
    types: Arc<[Type]>,
    at: usize,
}

impl<It: Iterator> Iterator for Typed<It> {
    type Item = (It::Item, Type);

    fn next(&mut self) -> Option<Self::Item> {
        let p = self.params.next()?;
        let ty = self.types.get(self.at).cloned().unwrap_or(Type::UNKNOWN);
        self.at += 1;
        Some((p, ty))
    }
}

/// A learning's own transaction ([`Ctx::learn`]) while it may be open. Dropped armed (the
/// caller dropped the call's future after the BEGIN was sent, before the ROLLBACK was), it
/// queues what the learning would have sent: without it the connection stays in the
/// learning's transaction, and the caller's next statements on it run there, answered as
/// done, then roll back when the connection closes. First a `DEALLOCATE ALL`, inside that
/// transaction, so on the pooler's server connection it ran on: the prepare may have been
/// sent and its statement never made, so never closed (the pool keeps no named statement
/// there under this profile, and a connection whose call was dropped closes on return);
/// then the `ROLLBACK`. Both ahead of any later
/// request; their answers are dropped.
struct Unfinished<'c> {
    client: &'c Client,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            for sql in ["DEALLOCATE ALL", "ROLLBACK"] {
                // The first poll writes the query to the client's queue.
                let queued = std::pin::pin!(self.client.batch_execute(sql));
                let _ = queued.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            }
        }
    }
}

impl<'a> Ctx<'a> {
    /// Runs a statement under this call's bound. On timeout the socket closes at once.
    /// (Not an `async fn`: another layer of future would copy the statement's future once
    /// more, about 1,300 instructions a call.)
    pub(super) fn run<T>(
        self,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> impl Future<Output = Result<T, Error>> {
        self.g.run(self.bound, fut)
    }

    /// Starts a stream or copy under this call's bound.
    pub(super) fn open<S>(
        self,
        fut: impl Future<Output = Result<S, tokio_postgres::Error>>,
    ) -> impl Future<Output = Result<(S, Option<Bound>, InFlight<'a>), Error>> {
        self.g.open(self.bound, fut)
    }

    /// Checks a statement argument for what it may pin and readies it. SQL text is the
    /// connection's cached statement; on a miss, for a method that can send it unnamed
    /// (`unnamed`), the text with its learned shape; else it is prepared and cached. With the
    /// target comes the SQL text when the target is from the cache.
    pub(super) async fn ready<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        unnamed: Option<Unnamed>,
    ) -> Result<(Target, Option<&str>), Error> {
        match statement.__statement() {
            StatementRef::Text(sql) => {
                if let Some(stmt) = self.cache_hit(sql) {
                    self.g
                        .check(&stmt.sql, Some(stmt.class), Protocol::Execute)?;
                    return Ok((Target::Prepared(stmt.inner), Some(sql)));
                }
                if let Some(u) = unnamed {
                    self.g.check(sql, None, Protocol::Parse)?;
                    if let Some(shape) = self.shape(sql, u).await? {
                        return Ok((Target::Typed(sql.to_owned(), shape), None));
                    }
                }
                self.named_allowed(sql)?;
                match self.cached(sql, self.bound).await? {
                    Some(stmt) => {
                        self.g
                            .check(&stmt.sql, Some(stmt.class), Protocol::Execute)?;
                        Ok((Target::Prepared(stmt.inner), Some(sql)))
                    }
                    // The cache is off: prepared for this call alone, through the pool, so its
                    // shape is learned and the next call on any connection takes one round
                    // trip.
                    None if unnamed.is_some()
                        && self.g.pool.settings.statement_cache_capacity == 0 =>
                    {
                        let stmt = Box::pin(self.prepare_in(sql, &[], self.bound)).await?;
                        self.g
                            .check(&stmt.sql, Some(stmt.class), Protocol::Execute)?;
                        Ok((Target::Prepared(stmt.inner), None))
                    }
                    None => {
                        self.g.check(sql, None, Protocol::Parse)?;
                        Ok((Target::Text(sql.to_owned()), None))
                    }
                }
            }
            StatementRef::Prepared(p) => {
                self.g.check(&p.sql, Some(p.class), Protocol::Execute)?;
                Ok((Target::Prepared(p.inner.clone()), None))
            }
        }
    }

    /// Runs `call` on `statement`, checked and readied ([`Ctx::ready`]). A cached statement
    /// the server calls stale (DDL changed its result type) is dropped from the cache and,
    /// outside a transaction, prepared and run once more.
    pub(super) async fn with_statement<T: ?Sized + ToStatement, R, F>(
        self,
        statement: &T,
        unnamed: Option<Unnamed>,
        call: impl Fn(Target) -> F,
    ) -> Result<R, Error>
    where
        F: Future<Output = Result<R, Error>>,
    {
        let (target, cached) = self.ready(statement, unnamed).await?;
        // The number the call's request will have, taken as `Guarded::run` takes it: the
        // stale rule trusts a failure at Bind only for exactly this request.
        let request = self.g.state.wire.next_request();
        match (call(target).await, cached) {
            // Outside a transaction a statement from the cache runs again, prepared anew.
            (Err(e), Some(sql))
                if self.forget_stale(statement, &e, request) && !self.g.state.in_transaction() =>
            {
                let stmt = self.cached(sql, self.bound).await?.ok_or(e)?;
                call(Target::Prepared(stmt.inner)).await
            }
            (Err(e), None) => {
                let _ = self.forget_stale(statement, &e, request);
                Err(e)
            }
            (r, _) => r,
        }
    }

    /// [`Ctx::with_statement`] without running it again, for calls whose parameters can be
    /// used only once.
    pub(super) async fn with_statement_once<T: ?Sized + ToStatement, R>(
        self,
        statement: &T,
        unnamed: Option<Unnamed>,
        call: impl AsyncFnOnce(Target) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let target = self.ready(statement, unnamed).await?.0;
        let request = self.g.state.wire.next_request();
        let r = call(target).await;
        if let Err(e) = &r {
            let _ = self.forget_stale(statement, e, request);
        }
        r
    }

    /// A call failed: a statement the server calls stale ([`is_stale`]) leaves the cache if
    /// the cache holds it (the `&str` methods' own, a caller's from `prepare_cached`, a
    /// stream's), so the next call on its SQL prepares it anew instead of failing the same way
    /// for the connection's lifetime. True when the statement was stale.
    fn forget_stale<T: ?Sized + ToStatement>(self, statement: &T, e: &Error, request: u32) -> bool {
        if !is_stale(e, self.g.state, request) {
            return false;
        }
        tracing::debug!(
            connection = self.g.state.id,
            "pinpool: a cached statement went stale; it leaves the cache"
        );
        let mut cache = self.g.state.cache();
        let sql = match statement.__statement() {
            StatementRef::Text(sql) => sql,
            StatementRef::Prepared(p) => {
                let cached = cache.get(&p.sql);
                // The same entry: a cached statement and its copies share their text.
                if !cached.is_some_and(|c| Arc::ptr_eq(&c.sql, &p.sql)) {
                    return true;
                }
                &p.sql
            }
        };
        drop(cache.remove(sql));
        true
    }

    /// The connection's prepared statement for `sql`, preparing and caching it on a miss;
    /// `None` when the cache is off.
    pub(super) async fn cached(
        self,
        sql: &str,
        bound: Option<Bound>,
    ) -> Result<Option<Statement>, Error> {
        let settings = &self.g.pool.settings;
        if settings.statement_cache_capacity == 0 {
            return Ok(None);
        }
        let counters = &self.g.pool.counters;
        if let Some(stmt) = self.cache_hit(sql) {
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
        self.cache_insert(stmt.clone());
        Ok(Some(stmt))
    }

    /// The connection's cached statement for `sql`, counted as a hit; `None` (not counted)
    /// on a miss or with the cache off.
    fn cache_hit(self, sql: &str) -> Option<Statement> {
        if self.g.pool.settings.statement_cache_capacity == 0 {
            return None;
        }
        let hit = self.g.state.cache().get(sql);
        if hit.is_some() {
            self.g.pool.counters.cache_hit();
        }
        hit
    }

    fn cache_insert(self, stmt: Statement) {
        let settings = &self.g.pool.settings;
        let evicted = self.g.state.cache().insert(
            stmt,
            settings.statement_cache_capacity,
            settings.statement_cache_bytes,
        );
        if !evicted.is_empty() {
            self.g.pool.counters.cache_evictions(evicted.len() as u64);
        }
        // Dropping the evicted statements sends their protocol Close.
        drop(evicted);
    }

    /// Refuses a named statement for one call where the proxy cannot carry named statements
    /// ([`Proxy::unnamed_only`](crate::Proxy)), outside a transaction (inside one, the server
    /// connection stays the same until it ends, and the call closes its statement before).
    fn named_allowed(self, sql: &str) -> Result<(), Error> {
        if self.g.state.in_transaction() {
            return Ok(());
        }
        self.named_lent(sql)
    }

    /// Refuses a named statement lent to the caller where the proxy cannot carry named
    /// statements: it may outlive the transaction, and its name stays behind on a server
    /// connection another client gets.
    fn named_lent(self, sql: &str) -> Result<(), Error> {
        if self.g.pool.settings.named_statements {
            return Ok(());
        }
        Err(self.g.pool.refuse(Reasons::of(Reason::NamedStatement), sql))
    }

    /// The shape to send `sql` unnamed with, for a method that sends it as `u` says: the
    /// learned one; with no parameters and rows wanted, none needed; where named statements
    /// cannot be used, learned now. `None`: prepare it instead.
    async fn shape(self, sql: &str, u: Unnamed) -> Result<Option<Shape>, Error> {
        let unnamed_only = !self.g.pool.settings.named_statements;
        let shape = match self.g.pool.learned.get(sql) {
            Some(shape) => shape,
            None if u.params == Some(0) && !u.scalar => Shape {
                params: Arc::from([]),
                columns: 1,
            },
            None if unnamed_only => Box::pin(self.learn(sql)).await?,
            None => return Ok(None),
        };
        let fits =
            u.params.is_none_or(|n| n == shape.params.len()) && (!u.scalar || shape.columns == 1);
        // Where named statements cannot be used a misfit is sent as it is: the server, or the
        // encoding of a parameter, says what is wrong.
        Ok((fits || unnamed_only).then_some(shape))
    }

    /// Learns `sql`'s shape without leaving a named statement behind on a transaction
    /// pooler's server connection: the prepare and its Close inside a transaction, the
    /// caller's or one opened and rolled back around them (pipelined, so the pooler keeps one
    /// server connection for all of it).
    async fn learn(self, sql: &str) -> Result<Shape, Error> {
        let shape = |s: tokio_postgres::Statement| Shape {
            params: Arc::from(s.params()),
            columns: s.columns().len(),
        };
        // Each prepared statement drops in the block: its Close is queued in the transaction.
        let shape = if self.g.state.in_transaction() {
            self.run_all(async { self.client.prepare(sql).await.map(shape) })
                .await?
        } else {
            // Alone on the connection: a call that started meanwhile would run inside the
            // learning's transaction and be rolled back with it.
            let _alone = match within(self.bound, Phase::Query, self.g.state.begin_learning()).await
            {
                Ok(alone) => alone,
                Err(timeout) => return Err(timeout),
            };
            let this = Ctx {
                g: Guarded {
                    alone: true,
                    ..self.g
                },
                ..self
            };
            let mut open = Unfinished {
                client: self.client,
                armed: true,
            };
            let r = this
                .run_all(async {
                    let (begun, prepared) = futures_util::future::join(
                        self.client.batch_execute("BEGIN"),
                        self.client.prepare(sql),
                    )
                    .await;
                    let prepared = prepared.map(shape);
                    let rolled_back = self.client.batch_execute("ROLLBACK").await;
                    begun.and(prepared).and_then(|s| rolled_back.map(|()| s))
                })
                .await;
            open.armed = false;
            r?
        };
        self.g.pool.learned.learn(sql, &shape.params, shape.columns);
        Ok(shape)
    }

    /// [`Guarded::run`] for a call that writes several requests: it also waits for the
    /// ReadyForQuery of the last one written, so the connection returns at rest.
    async fn run_all<T>(
        self,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, Error> {
        let r = self.run(fut).await;
        let settled = match &r {
            Ok(_) => true,
            Err(e) => e.as_db_error().is_some(),
        };
        if settled {
            let last = self.g.state.wire.next_request().wrapping_sub(1);
            self.g.state.await_ready(last, self.bound).await;
        }
        r
    }

    /// Runs `fut`, which sends `sql` unnamed with its learned shape: one round trip. Where
    /// the connection caches named statements, a prepare of the same text is pipelined ahead
    /// of it (the same round trip) and cached for the next call. An error saying the
    /// shape may be stale ([`refuses_shape`]) forgets it: DDL may have changed it.
    pub(super) async fn typed<R>(
        self,
        sql: &str,
        fut: impl Future<Output = Result<R, tokio_postgres::Error>>,
    ) -> Result<R, Error> {
        let settings = &self.g.pool.settings;
        let r = if settings.named_statements && settings.statement_cache_capacity > 0 {
            self.g.pool.counters.cache_miss();
            let prepare = self.client.prepare(sql);
            self.run_all(async move {
                match futures_util::future::join(prepare, fut).await {
                    (prepared, Ok(r)) => Ok((prepared.ok(), r)),
                    // The server's word came first, then it closed the session (a pooler's
                    // `query_wait_timeout`): its word is the error.
                    (Err(said), Err(e)) if e.is_closed() && said.as_db_error().is_some() => {
                        Err(said)
                    }
                    (_, Err(e)) => Err(e),
                }
            })
            .await
            .map(|(prepared, r)| {
                if let Some(inner) = prepared {
                    self.learn_from(sql, &inner);
                    self.cache_insert(Statement {
                        inner,
                        sql: Arc::from(sql),
                        class: classify(sql),
                    });
                }
                r
            })
        } else {
            self.run(fut).await
        };
        if let Err(e) = &r
            && refuses_shape(e)
        {
            self.g.pool.learned.forget(sql);
        }
        r
    }

    /// Remembers the shape of `sql` from a statement prepared without given types.
    fn learn_from(self, sql: &str, stmt: &tokio_postgres::Statement) {
        self.g
            .pool
            .learned
            .learn(sql, stmt.params(), stmt.columns().len());
    }

    pub(super) async fn prepare_typed(
        self,
        query: &str,
        types: &[Type],
    ) -> Result<Statement, Error> {
        self.named_lent(query)?;
        let stmt = self.prepare_in(query, types, self.bound).await?;
        self.g.state.lend_statement();
        Ok(stmt)
    }

    pub(super) async fn prepare_cached(self, query: &str) -> Result<Statement, Error> {
        self.named_lent(query)?;
        let stmt = match self.cached(query, self.bound).await? {
            Some(stmt) => stmt,
            None => self.prepare_in(query, &[], self.bound).await?,
        };
        self.g.state.lend_statement();
        Ok(stmt)
    }

    /// The cached statement for `query` when its parameter types are `types` (no round
    /// trip); otherwise, with no types, as [`Ctx::prepare_cached`]; with other types, a
    /// statement prepared with them, not cached (the cache holds one statement per SQL text,
    /// the one the `&str` methods run).
    pub(super) async fn prepare_typed_cached(
        self,
        query: &str,
        types: &[Type],
    ) -> Result<Statement, Error> {
        if types.is_empty() {
            return self.prepare_cached(query).await;
        }
        self.named_lent(query)?;
        let hit = self.g.state.cache().get(query);
        match hit {
            Some(stmt) if stmt.inner.params() == types => {
                self.g.pool.counters.cache_hit();
                self.g.state.lend_statement();
                Ok(stmt)
            }
            _ => self.prepare_typed(query, types).await,
        }
    }

    /// Prepares within a bound the caller already made.
    pub(super) async fn prepare_in(
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
        if types.is_empty() {
            self.learn_from(query, &inner);
        }
        Ok(Statement {
            inner,
            sql: Arc::from(query),
            class: classify(query),
        })
    }

    pub(super) async fn query<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        self.with_statement(
            statement,
            Unnamed::rows(params.len()),
            move |s| async move {
                match s {
                    Target::Typed(sql, shape) => {
                        let params = with_types(params, &shape.params);
                        Box::pin(self.typed(&sql, self.client.query_typed(&sql, &params))).await
                    }
                    s => self.run(self.client.query(s.pg(), params)).await,
                }
            },
        )
        .await
    }

    pub(super) async fn query_one<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.with_statement(
            statement,
            Unnamed::rows(params.len()),
            move |s| async move {
                match s {
                    Target::Typed(sql, shape) => {
                        let params = with_types(params, &shape.params);
                        Box::pin(self.typed(&sql, self.client.query_typed_one(&sql, &params))).await
                    }
                    s => self.run(self.client.query_one(s.pg(), params)).await,
                }
            },
        )
        .await
    }

    pub(super) async fn query_opt<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.with_statement(
            statement,
            Unnamed::rows(params.len()),
            move |s| async move {
                match s {
                    Target::Typed(sql, shape) => {
                        let params = with_types(params, &shape.params);
                        Box::pin(self.typed(&sql, self.client.query_typed_opt(&sql, &params))).await
                    }
                    s => self.run(self.client.query_opt(s.pg(), params)).await,
                }
            },
        )
        .await
    }

    pub(super) async fn query_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<R>, Error> {
        self.with_statement(
            statement,
            Unnamed::scalar(params.len()),
            move |s| async move {
                match s {
                    Target::Typed(sql, shape) => {
                        let params = with_types(params, &shape.params);
                        Box::pin(self.typed(&sql, async {
                            let rows = self.client.query_typed(&sql, &params).await?;
                            rows.iter().map(scalar).collect()
                        }))
                        .await
                    }
                    s => self.run(self.client.query_scalar(s.pg(), params)).await,
                }
            },
        )
        .await
    }

    pub(super) async fn query_one_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<R, Error> {
        self.with_statement(
            statement,
            Unnamed::scalar(params.len()),
            move |s| async move {
                match s {
                    Target::Typed(sql, shape) => {
                        let params = with_types(params, &shape.params);
                        Box::pin(self.typed(&sql, async {
                            scalar(&self.client.query_typed_one(&sql, &params).await?)
                        }))
                        .await
                    }
                    s => self.run(self.client.query_one_scalar(s.pg(), params)).await,
                }
            },
        )
        .await
    }

    pub(super) async fn query_opt_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<R>, Error> {
        self.with_statement(
            statement,
            Unnamed::scalar(params.len()),
            move |s| async move {
                match s {
                    Target::Typed(sql, shape) => {
                        let params = with_types(params, &shape.params);
                        Box::pin(self.typed(&sql, async {
                            let row = self.client.query_typed_opt(&sql, &params).await?;
                            row.as_ref().map(scalar).transpose()
                        }))
                        .await
                    }
                    s => self.run(self.client.query_opt_scalar(s.pg(), params)).await,
                }
            },
        )
        .await
    }

    pub(super) async fn query_raw<T, P, I>(
        self,
        statement: &T,
        params: I,
    ) -> Result<RowStream<'a>, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let (s, bound, f) = self
            .with_statement_once(statement, Unnamed::raw(), async |s| match s {
                Target::Typed(sql, shape) => {
                    let params = WithTypes(params, shape.params);
                    let r = self.open(self.client.query_typed_raw(&sql, params)).await;
                    if r.as_ref().is_err_and(refuses_shape) {
                        self.g.pool.learned.forget(&sql);
                    }
                    r
                }
                s => self.open(self.client.query_raw(s.pg(), params)).await,
            })
            .await?;
        Ok(RowStream::new(s, bound, self.g.state, f))
    }

    pub(super) async fn query_typed(
        self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, Error> {
        self.g.check(query, None, Protocol::Parse)?;
        self.run(self.client.query_typed(query, params)).await
    }

    pub(super) async fn query_typed_one(
        self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Row, Error> {
        self.g.check(query, None, Protocol::Parse)?;
        self.run(self.client.query_typed_one(query, params)).await
    }

    pub(super) async fn query_typed_opt(
        self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>, Error> {
        self.g.check(query, None, Protocol::Parse)?;
        self.run(self.client.query_typed_opt(query, params)).await
    }

    pub(super) async fn query_typed_raw<P, I>(
        self,
        query: &str,
        params: I,
    ) -> Result<RowStream<'a>, Error>
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

    pub(super) async fn execute<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        self.with_statement(
            statement,
            Unnamed::rows(params.len()),
            move |s| async move {
                match s {
                    Target::Typed(sql, shape) => {
                        let params = with_types(params, &shape.params);
                        Box::pin(self.typed(&sql, self.client.execute_typed(&sql, &params))).await
                    }
                    s => self.run(self.client.execute(s.pg(), params)).await,
                }
            },
        )
        .await
    }

    pub(super) async fn execute_typed(
        self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<u64, Error> {
        self.g.check(query, None, Protocol::Parse)?;
        self.run(self.client.execute_typed(query, params)).await
    }

    pub(super) async fn execute_raw<T, P, I>(self, statement: &T, params: I) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        self.with_statement_once(statement, Unnamed::raw(), async |s| match s {
            Target::Typed(sql, shape) => {
                let params = WithTypes(params, shape.params);
                let run = async {
                    let rows = self.client.query_typed_raw(&sql, params).await?;
                    let mut rows = std::pin::pin!(rows);
                    while futures_util::TryStreamExt::try_next(&mut rows)
                        .await?
                        .is_some()
                    {}
                    Ok(rows.rows_affected().unwrap_or(0))
                };
                Box::pin(self.typed(&sql, run)).await
            }
            s => self.run(self.client.execute_raw(s.pg(), params)).await,
        })
        .await
    }

    pub(super) async fn copy_in<T, U>(self, statement: &T) -> Result<CopyInSink<'a, U>, Error>
    where
        T: ?Sized + ToStatement,
        U: Buf + 'static + Send,
    {
        let (s, bound, f) = self
            .with_statement_once(statement, None, async |s| {
                self.open(self.client.copy_in(s.pg())).await
            })
            .await?;
        Ok(CopyInSink::new(s, bound, self.g.state, f))
    }

    pub(super) async fn copy_out<T: ?Sized + ToStatement>(
        self,
        statement: &T,
    ) -> Result<CopyOutStream<'a>, Error> {
        let (s, bound, f) = self
            .with_statement_once(statement, None, async |s| {
                self.open(self.client.copy_out(s.pg())).await
            })
            .await?;
        Ok(CopyOutStream::new(s, bound, self.g.state, f))
    }

    pub(super) async fn simple_query(self, query: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        self.g.check(query, None, Protocol::Simple)?;
        self.run(self.client.simple_query(query)).await
    }

    pub(super) async fn simple_query_raw(
        self,
        query: &str,
    ) -> Result<SimpleQueryStream<'a>, Error> {
        self.g.check(query, None, Protocol::Simple)?;
        let (s, bound, f) = self.open(self.client.simple_query_raw(query)).await?;
        Ok(SimpleQueryStream::new(s, bound, self.g.state, f))
    }

    pub(super) async fn batch_execute(self, query: &str) -> Result<(), Error> {
        self.g.check(query, None, Protocol::Simple)?;
        self.run(self.client.batch_execute(query)).await
    }
}
