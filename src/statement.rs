//! Statement arguments: SQL text or a prepared [`Statement`] that remembers its SQL, so every
//! statement can be checked for pinning and bounded in one place.

use std::fmt;
use std::sync::Arc;

use tokio_postgres::Column;
use tokio_postgres::types::Type;

use crate::pinning::Classification;

/// A statement prepared on one pooled connection. Unlike `tokio_postgres::Statement`, it keeps
/// its SQL, so pinpool knows what executing it does. Use it only on the connection (or a
/// transaction of the connection) that prepared it.
#[derive(Clone)]
pub struct Statement {
    pub(crate) inner: tokio_postgres::Statement,
    pub(crate) sql: Arc<str>,
    pub(crate) class: Classification,
}

impl Statement {
    /// The SQL it was prepared from.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The parameter types.
    pub fn params(&self) -> &[Type] {
        self.inner.params()
    }

    /// The result columns.
    pub fn columns(&self) -> &[Column] {
        self.inner.columns()
    }

    /// The tokio-postgres statement.
    pub fn as_inner(&self) -> &tokio_postgres::Statement {
        &self.inner
    }
}

impl fmt::Debug for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Statement").field("sql", &self.sql).finish()
    }
}

pub(crate) use private::StatementRef;

mod private {
    pub trait Sealed {}

    /// A statement argument, seen from inside pinpool.
    pub enum StatementRef<'a> {
        Text(&'a str),
        Prepared(&'a super::Statement),
    }
}

/// What the statement methods accept: `str`, `String` or a pinpool [`Statement`].
pub trait ToStatement: private::Sealed + Sync {
    #[doc(hidden)]
    fn __statement(&self) -> StatementRef<'_>;
}

impl private::Sealed for str {}
impl ToStatement for str {
    fn __statement(&self) -> StatementRef<'_> {
        StatementRef::Text(self)
    }
}

impl private::Sealed for String {}
impl ToStatement for String {
    fn __statement(&self) -> StatementRef<'_> {
        StatementRef::Text(self)
    }
}

impl private::Sealed for Statement {}
impl ToStatement for Statement {
    fn __statement(&self) -> StatementRef<'_> {
        StatementRef::Prepared(self)
    }
}
