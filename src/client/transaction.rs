//! [`Transaction`] and [`TransactionBuilder`]: a transaction on a checked-out client, its
//! begin (retried like any first statement), commit, rollback and savepoints.

use std::future::Future;
use std::panic::Location;

use bytes::Buf;
use tokio::time::Instant;

use tokio_postgres::types::{BorrowToSql, FromSqlOwned, ToSql, Type};
use tokio_postgres::{Client, IsolationLevel, Portal, Row, SimpleQueryMessage};

use crate::conn::{ConnData, ConnState};
use crate::deadline::{Bound, within};
use crate::error::{Error, Phase};
use crate::pinning::Protocol;
use crate::pool::PoolInner;
use crate::statement::{Statement, ToStatement};
use crate::stream::{CopyInSink, CopyOutStream, RowStream, SimpleQueryStream};

use super::ctx::Ctx;
use super::guarded::{Guarded, call_bound, cutoff_now};
use super::pooled::PooledClient;
use super::retry::{is_closed_error, retry_allowed};

/// Marks a connection as inside a pinpool transaction while the outermost one lives. If the
/// transaction is leaked (`mem::forget`), the mark stays and the connection is closed.
/// A mark dropped before `commit` or `rollback` ran means tokio-postgres queued a ROLLBACK.
pub(super) struct TxnMark<'a> {
    pub(super) state: &'a ConnState,
    pub(super) finished: bool,
}

impl<'a> TxnMark<'a> {
    pub(super) fn new(state: &'a ConnState) -> Self {
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
    pub(super) inner: tokio_postgres::Transaction<'a>,
    pub(super) g: Guarded<'a>,
    pub(super) _mark: Option<TxnMark<'a>>,
}

impl<'a> Transaction<'a> {
    pub(super) fn ctx_at(&self, at: &'static Location<'static>) -> Result<Ctx<'_>, Error> {
        self.g.now().at(at).ctx(self.inner.client())
    }

    /// Like [`PooledClient::prepare`], inside the transaction.
    #[track_caller]
    pub fn prepare(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.prepare_typed(query, &[]).await }
    }

    /// Like [`PooledClient::prepare_cached`], inside the transaction.
    #[track_caller]
    pub fn prepare_cached(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.prepare_cached(query).await }
    }

    /// Like [`PooledClient::prepare_typed_cached`], inside the transaction.
    #[track_caller]
    pub fn prepare_typed_cached(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> {
        let at = Location::caller();
        async move {
            self.ctx_at(at)?
                .prepare_typed_cached(query, parameter_types)
                .await
        }
    }

    /// Like [`PooledClient::prepare_typed`], inside the transaction.
    #[track_caller]
    pub fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.prepare_typed(query, parameter_types).await }
    }

    /// Like [`PooledClient::query`], inside the transaction.
    #[track_caller]
    pub fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query(statement, params).await }
    }

    /// Like [`PooledClient::query_one`], inside the transaction.
    #[track_caller]
    pub fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query_one(statement, params).await }
    }

    /// Like [`PooledClient::query_opt`], inside the transaction.
    #[track_caller]
    pub fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query_opt(statement, params).await }
    }

    /// Like [`PooledClient::query_scalar`], inside the transaction.
    #[track_caller]
    pub fn query_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<R>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query_scalar(statement, params).await }
    }

    /// Like [`PooledClient::query_one_scalar`], inside the transaction.
    #[track_caller]
    pub fn query_one_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<R, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query_one_scalar(statement, params).await }
    }

    /// Like [`PooledClient::query_opt_scalar`], inside the transaction.
    #[track_caller]
    pub fn query_opt_scalar<R: FromSqlOwned, T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<R>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query_opt_scalar(statement, params).await }
    }

    /// Like [`PooledClient::query_raw`], inside the transaction.
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
        async move { self.ctx_at(at)?.query_raw(statement, params).await }
    }

    /// Like [`PooledClient::query_typed`], inside the transaction.
    #[track_caller]
    pub fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query_typed(query, params).await }
    }

    /// Like [`PooledClient::query_typed_one`], inside the transaction.
    #[track_caller]
    pub fn query_typed_one(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Row, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query_typed_one(query, params).await }
    }

    /// Like [`PooledClient::query_typed_opt`], inside the transaction.
    #[track_caller]
    pub fn query_typed_opt(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.query_typed_opt(query, params).await }
    }

    /// Like [`PooledClient::query_typed_raw`], inside the transaction.
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
        async move { self.ctx_at(at)?.query_typed_raw(query, params).await }
    }

    /// Like [`PooledClient::execute`], inside the transaction.
    #[track_caller]
    pub fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.execute(statement, params).await }
    }

    /// Like [`PooledClient::execute_typed`], inside the transaction.
    #[track_caller]
    pub fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.execute_typed(query, params).await }
    }

    /// Like [`PooledClient::execute_raw`], inside the transaction.
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
        async move { self.ctx_at(at)?.execute_raw(statement, params).await }
    }

    /// Like [`PooledClient::copy_in`], inside the transaction.
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
        async move { self.ctx_at(at)?.copy_in(statement).await }
    }

    /// Like [`PooledClient::copy_out`], inside the transaction.
    #[track_caller]
    pub fn copy_out<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
    ) -> impl Future<Output = Result<CopyOutStream<'_>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.copy_out(statement).await }
    }

    /// Like [`PooledClient::simple_query`], inside the transaction.
    #[track_caller]
    pub fn simple_query(
        &self,
        query: &str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryMessage>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.simple_query(query).await }
    }

    /// Like [`PooledClient::simple_query_raw`], inside the transaction.
    #[track_caller]
    pub fn simple_query_raw(
        &self,
        query: &str,
    ) -> impl Future<Output = Result<SimpleQueryStream<'_>, Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.simple_query_raw(query).await }
    }

    /// Like [`PooledClient::batch_execute`], inside the transaction.
    #[track_caller]
    pub fn batch_execute(&self, query: &str) -> impl Future<Output = Result<(), Error>> {
        let at = Location::caller();
        async move { self.ctx_at(at)?.batch_execute(query).await }
    }

    /// Commits the transaction (or releases the savepoint).
    ///
    /// # Errors
    /// The server's error or a timeout.
    #[track_caller]
    pub fn commit(self) -> impl Future<Output = Result<(), Error>> {
        let at = Location::caller();
        async move {
            let Transaction {
                inner,
                g,
                mut _mark,
            } = self;
            let g = g.now().at(at);
            let r = g.run(g.bound()?, inner.commit()).await;
            if let Some(m) = _mark.as_mut() {
                // A commit that failed before it was sent (its bound had passed) dropped the
                // transaction unfinished: tokio-postgres queued a ROLLBACK, which the end of the
                // invocation makes sure reaches the server.
                m.finished = r.is_ok();
            }
            r
        }
    }

    /// Rolls the transaction back (or back to the savepoint).
    ///
    /// # Errors
    /// The server's error or a timeout.
    #[track_caller]
    pub fn rollback(self) -> impl Future<Output = Result<(), Error>> {
        let at = Location::caller();
        async move {
            let Transaction {
                inner,
                g,
                mut _mark,
            } = self;
            let g = g.now().at(at);
            let r = g.run(g.bound()?, inner.rollback()).await;
            if let Some(m) = _mark.as_mut() {
                m.finished = r.is_ok();
            }
            r
        }
    }

    /// A nested transaction (a savepoint).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn transaction(&mut self) -> impl Future<Output = Result<Transaction<'_>, Error>> {
        let at = Location::caller();
        async move {
            let g = self.g.now().at(at);
            let inner = g.run(g.bound()?, self.inner.transaction()).await?;
            Ok(Transaction {
                inner,
                g,
                _mark: None,
            })
        }
    }

    /// A nested transaction with a savepoint name.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn savepoint<I: Into<String>>(
        &mut self,
        name: I,
    ) -> impl Future<Output = Result<Transaction<'_>, Error>> {
        let at = Location::caller();
        async move {
            let g = self.g.now().at(at);
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
    }

    /// Binds a statement's parameters to a portal, read with [`query_portal`](Self::query_portal):
    /// the pin-free way to read a large result in pieces (instead of `DECLARE CURSOR`).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn bind<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Portal, Error>> {
        let at = Location::caller();
        async move {
            let ctx = self.ctx_at(at)?;
            ctx.with_statement(statement, None, move |s| async move {
                ctx.run(self.inner.bind(s.pg(), params)).await
            })
            .await
        }
    }

    /// [`bind`](Self::bind) with parameters from an iterator.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn bind_raw<P, T, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<Portal, Error>>
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let at = Location::caller();
        async move {
            let ctx = self.ctx_at(at)?;
            ctx.with_statement_once(statement, None, async |s| {
                ctx.run(self.inner.bind_raw(s.pg(), params)).await
            })
            .await
        }
    }

    /// Reads up to `max_rows` rows from a portal (0: all).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn query_portal(
        &self,
        portal: &Portal,
        max_rows: i32,
    ) -> impl Future<Output = Result<Vec<Row>, Error>> {
        let at = Location::caller();
        async move {
            let g = self.g.now().at(at);
            g.run(g.bound()?, self.inner.query_portal(portal, max_rows))
                .await
        }
    }

    /// [`query_portal`](Self::query_portal), streaming the rows.
    ///
    /// # Errors
    /// As [`query`](Self::query).
    #[track_caller]
    pub fn query_portal_raw(
        &self,
        portal: &Portal,
        max_rows: i32,
    ) -> impl Future<Output = Result<RowStream<'_>, Error>> {
        let at = Location::caller();
        async move {
            let g = self.g.now().at(at);
            let (s, bound, f) = g
                .open(g.bound()?, self.inner.query_portal_raw(portal, max_rows))
                .await?;
            Ok(RowStream::new(s, bound, self.g.state, f))
        }
    }
}

/// Builds a transaction, from [`PooledClient::build_transaction`].
#[must_use = "a transaction builder does nothing until start() is called"]
pub struct TransactionBuilder<'a> {
    pub(super) client: &'a mut PooledClient,
    pub(super) isolation_level: Option<IsolationLevel>,
    pub(super) read_only: Option<bool>,
    pub(super) deferrable: Option<bool>,
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
    #[track_caller]
    pub fn start(self) -> impl Future<Output = Result<Transaction<'a>, Error>> {
        let at = Location::caller();
        async move {
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
                return begin(
                    client,
                    state,
                    pool,
                    (cutoff, explicit),
                    options,
                    (bound, at),
                )
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
            let e = match begin(
                client,
                state,
                pool,
                (cutoff, explicit),
                options,
                (bound, at),
            )
            .await
            {
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
            begin(
                client,
                state,
                pool,
                (cutoff, explicit),
                options,
                (bound, at),
            )
            .await
            .map_err(|(e, _)| e)
        }
    }
}

/// Begins a transaction on a connection's client. On failure, also says whether [`retry_allowed`] holds for
/// it (decided here, where the connection is still at hand; nothing can hand out raw access
/// while the builder holds the client).
pub(super) async fn begin<'c>(
    client: &'c mut Client,
    state: &'c ConnState,
    pool: &'c PoolInner,
    (cutoff, explicit): (Option<Instant>, Option<Instant>),
    (isolation_level, read_only, deferrable): (Option<IsolationLevel>, Option<bool>, Option<bool>),
    (bound, at): (Option<Bound>, &'static Location<'static>),
) -> Result<Transaction<'c>, (Error, bool)> {
    let g = Guarded {
        state,
        pool,
        cutoff,
        explicit,
        at,
        alone: false,
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
