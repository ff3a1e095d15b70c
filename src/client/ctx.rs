//! [`Ctx`]: a client and its guard for one call, with the call's bound; the statement
//! methods every public one forwards to, and the cached statement (readied, or prepared
//! again when the server calls it stale).

use std::future::Future;
use std::sync::Arc;

use bytes::Buf;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{BorrowToSql, FromSqlOwned, ToSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage};

use crate::conn::{ConnState, InFlight};
use crate::deadline::Bound;
use crate::error::Error;
use crate::pinning::{Classification, Protocol, Reasons, TxnControl, classify};
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
/// connection's own, from its cache), or the SQL text itself when the cache is off.
pub(super) enum Target {
    Prepared(tokio_postgres::Statement),
    /// Owned: a `str` cannot stand behind a `dyn`. Copied only when the cache is off, where
    /// each call prepares its statement with a round trip anyway.
    Text(String),
}

impl Target {
    /// As tokio-postgres takes it.
    pub(super) fn pg(&self) -> &dyn PgStatement {
        match self {
            Target::Prepared(s) => s,
            Target::Text(sql) => sql,
        }
    }
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

    /// Checks a statement argument for what it may pin and readies it; SQL text is prepared
    /// and cached on a cache miss. With the target comes the SQL text when the target is
    /// from the cache.
    pub(super) async fn ready<T: ?Sized + ToStatement>(
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
    pub(super) async fn with_statement<T: ?Sized + ToStatement, R, F>(
        self,
        statement: &T,
        call: impl Fn(Target) -> F,
    ) -> Result<R, Error>
    where
        F: Future<Output = Result<R, Error>>,
    {
        let (target, cached) = self.ready(statement).await?;
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
        call: impl AsyncFnOnce(Target) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let target = self.ready(statement).await?.0;
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

    pub(super) async fn prepare_typed(
        self,
        query: &str,
        types: &[Type],
    ) -> Result<Statement, Error> {
        let stmt = self.prepare_in(query, types, self.bound).await?;
        self.g.state.lend_statement();
        Ok(stmt)
    }

    pub(super) async fn prepare_cached(self, query: &str) -> Result<Statement, Error> {
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
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query(s.pg(), params)).await
        })
        .await
    }

    pub(super) async fn query_one<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_one(s.pg(), params)).await
        })
        .await
    }

    pub(super) async fn query_opt<T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_opt(s.pg(), params)).await
        })
        .await
    }

    pub(super) async fn query_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<R>, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_scalar(s.pg(), params)).await
        })
        .await
    }

    pub(super) async fn query_one_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<R, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_one_scalar(s.pg(), params)).await
        })
        .await
    }

    pub(super) async fn query_opt_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<R>, Error> {
        self.with_statement(statement, move |s| async move {
            self.run(self.client.query_opt_scalar(s.pg(), params)).await
        })
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
            .with_statement_once(statement, async |s| {
                self.open(self.client.query_raw(s.pg(), params)).await
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
        self.with_statement(statement, move |s| async move {
            self.run(self.client.execute(s.pg(), params)).await
        })
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
        self.with_statement_once(statement, async |s| {
            self.run(self.client.execute_raw(s.pg(), params)).await
        })
        .await
    }

    pub(super) async fn copy_in<T, U>(self, statement: &T) -> Result<CopyInSink<'a, U>, Error>
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

    pub(super) async fn copy_out<T: ?Sized + ToStatement>(
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
