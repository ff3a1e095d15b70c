//! [`GenericClient`]: what a pooled client and a transaction have in common.

use std::future::Future;

use tokio_postgres::types::{BorrowToSql, ToSql, Type};
use tokio_postgres::{Row, SimpleQueryMessage};

use crate::error::Error;
use crate::statement::{Statement, ToStatement};
use crate::stream::RowStream;

use super::pooled::PooledClient;
use super::transaction::Transaction;

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
    /// See [`PooledClient::prepare_cached`].
    fn prepare_cached(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> + Send;
    /// See [`PooledClient::prepare_typed_cached`].
    fn prepare_typed_cached(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send;
    /// See [`PooledClient::query_raw`].
    fn query_raw<T, P, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<RowStream<'_>, Error>> + Send
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P> + Send,
        I::IntoIter: ExactSizeIterator;
    /// See [`PooledClient::execute_raw`].
    fn execute_raw<T, P, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<u64, Error>> + Send
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P> + Send,
        I::IntoIter: ExactSizeIterator;
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
    #[track_caller]
    fn prepare(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> + Send {
        PooledClient::prepare(self, query)
    }
    #[track_caller]
    fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send {
        PooledClient::prepare_typed(self, query, parameter_types)
    }
    #[track_caller]
    fn prepare_cached(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> + Send {
        PooledClient::prepare_cached(self, query)
    }
    #[track_caller]
    fn prepare_typed_cached(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send {
        PooledClient::prepare_typed_cached(self, query, parameter_types)
    }
    #[track_caller]
    fn query_raw<T, P, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<RowStream<'_>, Error>> + Send
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P> + Send,
        I::IntoIter: ExactSizeIterator,
    {
        PooledClient::query_raw(self, statement, params)
    }
    #[track_caller]
    fn execute_raw<T, P, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<u64, Error>> + Send
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P> + Send,
        I::IntoIter: ExactSizeIterator,
    {
        PooledClient::execute_raw(self, statement, params)
    }
    #[track_caller]
    fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        PooledClient::query(self, statement, params)
    }
    #[track_caller]
    fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        PooledClient::query_one(self, statement, params)
    }
    #[track_caller]
    fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        PooledClient::query_opt(self, statement, params)
    }
    #[track_caller]
    fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        PooledClient::query_typed(self, query, params)
    }
    #[track_caller]
    fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        PooledClient::execute(self, statement, params)
    }
    #[track_caller]
    fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        PooledClient::execute_typed(self, query, params)
    }
    #[track_caller]
    fn simple_query(
        &self,
        query: &str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryMessage>, Error>> + Send {
        PooledClient::simple_query(self, query)
    }
    #[track_caller]
    fn batch_execute(&self, query: &str) -> impl Future<Output = Result<(), Error>> + Send {
        PooledClient::batch_execute(self, query)
    }
    #[track_caller]
    fn transaction(&mut self) -> impl Future<Output = Result<Transaction<'_>, Error>> + Send {
        PooledClient::transaction(self)
    }
}

impl GenericClient for Transaction<'_> {
    #[track_caller]
    fn prepare(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> + Send {
        Transaction::prepare(self, query)
    }
    #[track_caller]
    fn prepare_typed(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send {
        Transaction::prepare_typed(self, query, parameter_types)
    }
    #[track_caller]
    fn prepare_cached(&self, query: &str) -> impl Future<Output = Result<Statement, Error>> + Send {
        Transaction::prepare_cached(self, query)
    }
    #[track_caller]
    fn prepare_typed_cached(
        &self,
        query: &str,
        parameter_types: &[Type],
    ) -> impl Future<Output = Result<Statement, Error>> + Send {
        Transaction::prepare_typed_cached(self, query, parameter_types)
    }
    #[track_caller]
    fn query_raw<T, P, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<RowStream<'_>, Error>> + Send
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P> + Send,
        I::IntoIter: ExactSizeIterator,
    {
        Transaction::query_raw(self, statement, params)
    }
    #[track_caller]
    fn execute_raw<T, P, I>(
        &self,
        statement: &T,
        params: I,
    ) -> impl Future<Output = Result<u64, Error>> + Send
    where
        T: ?Sized + ToStatement,
        P: BorrowToSql,
        I: IntoIterator<Item = P> + Send,
        I::IntoIter: ExactSizeIterator,
    {
        Transaction::execute_raw(self, statement, params)
    }
    #[track_caller]
    fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        Transaction::query(self, statement, params)
    }
    #[track_caller]
    fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        Transaction::query_one(self, statement, params)
    }
    #[track_caller]
    fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        Transaction::query_opt(self, statement, params)
    }
    #[track_caller]
    fn query_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        Transaction::query_typed(self, query, params)
    }
    #[track_caller]
    fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        Transaction::execute(self, statement, params)
    }
    #[track_caller]
    fn execute_typed(
        &self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        Transaction::execute_typed(self, query, params)
    }
    #[track_caller]
    fn simple_query(
        &self,
        query: &str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryMessage>, Error>> + Send {
        Transaction::simple_query(self, query)
    }
    #[track_caller]
    fn batch_execute(&self, query: &str) -> impl Future<Output = Result<(), Error>> + Send {
        Transaction::batch_execute(self, query)
    }
    #[track_caller]
    fn transaction(&mut self) -> impl Future<Output = Result<Transaction<'_>, Error>> + Send {
        Transaction::transaction(self)
    }
}
