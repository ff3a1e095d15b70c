//! Opening connections: the TLS connector (type-erased, so TLS never changes the pool's type)
//! and the password provider (called for every new connection).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Socket};

use crate::error::BoxError;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The connection half of a tokio-postgres connection, type-erased.
pub(crate) type ConnectionFuture = BoxFuture<'static, Result<(), tokio_postgres::Error>>;

/// Opens a connection with some TLS setting; implemented for every tokio-postgres
/// `MakeTlsConnect`.
pub(crate) trait Connect: Send + Sync + 'static {
    fn connect<'a>(
        &'a self,
        config: &'a tokio_postgres::Config,
    ) -> BoxFuture<'a, Result<(Client, ConnectionFuture), tokio_postgres::Error>>;

    /// True when this connector can speak TLS.
    fn tls(&self) -> bool;
}

pub(crate) struct Connector<T> {
    tls: T,
    speaks_tls: bool,
}

impl<T> Connector<T> {
    pub(crate) fn new(tls: T, speaks_tls: bool) -> Self {
        Connector { tls, speaks_tls }
    }
}

impl<T> Connect for Connector<T>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect<'a>(
        &'a self,
        config: &'a tokio_postgres::Config,
    ) -> BoxFuture<'a, Result<(Client, ConnectionFuture), tokio_postgres::Error>> {
        Box::pin(async move {
            let (client, connection) = config.connect(self.tls.clone()).await?;
            Ok((client, Box::pin(connection) as ConnectionFuture))
        })
    }

    fn tls(&self) -> bool {
        self.speaks_tls
    }
}

/// Supplies the password for each new connection: an RDS IAM authentication token, a secret
/// that rotates, or a fixed value.
///
/// Any `Fn() -> impl Future<Output = Result<String, E>>` closure is a provider:
///
/// ```
/// # fn demo() -> Result<(), pinpool::Error> {
/// let pool = pinpool::Pool::builder("postgres://app@127.0.0.1/app")
///     .password_provider(|| async { Ok::<_, std::io::Error>("fresh-token".to_string()) })
///     .build()?;
/// # Ok(()) }
/// ```
pub trait PasswordProvider: Send + Sync + 'static {
    /// The password for the connection about to be opened.
    fn password(&self) -> BoxFuture<'_, Result<String, BoxError>>;
}

impl<F, Fut, E> PasswordProvider for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn password(&self) -> BoxFuture<'_, Result<String, BoxError>> {
        let fut = self();
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

pub(crate) type SharedPasswordProvider = Arc<dyn PasswordProvider>;
