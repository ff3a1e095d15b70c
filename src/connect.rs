//! Opening connections: the TLS connector (type-erased, so TLS never changes the pool's type)
//! and the password provider (called for every new connection).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Socket};

use crate::error::BoxError;
use crate::pinning::PinRules;
use crate::wire::{Observed, Wire};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The connection half of a tokio-postgres connection, type-erased.
pub(crate) type ConnectionFuture = BoxFuture<'static, Result<(), tokio_postgres::Error>>;

/// Opens an observed connection with some TLS setting; implemented for every tokio-postgres
/// `MakeTlsConnect`. Every connection it opens carries a [`Wire`] that reads its traffic.
pub(crate) trait Connect: Send + Sync + 'static {
    fn connect<'a>(
        &'a self,
        config: &'a tokio_postgres::Config,
        rules: PinRules,
    ) -> BoxFuture<'a, Result<Opened, tokio_postgres::Error>>;

    /// True when this connector can speak TLS.
    fn tls(&self) -> bool;
}

/// A connection just opened: the client, the task that drives its socket, and its observer.
pub(crate) struct Opened {
    pub(crate) client: Client,
    pub(crate) connection: ConnectionFuture,
    pub(crate) wire: Arc<Wire>,
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
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
{
    fn connect<'a>(
        &'a self,
        config: &'a tokio_postgres::Config,
        rules: PinRules,
    ) -> BoxFuture<'a, Result<Opened, tokio_postgres::Error>> {
        Box::pin(async move {
            if self.speaks_tls && config.get_ssl_mode() != SslMode::Disable {
                // tokio-postgres connects (hosts, ports, timeouts, keepalives,
                // target_session_attrs); the observer sits on the TLS stream it makes.
                let last = Arc::new(Mutex::new(None));
                let tls = ObserveTls {
                    inner: self.tls.clone(),
                    rules,
                    last: last.clone(),
                };
                let (client, connection) = config.connect(tls).await?;
                let wire = last.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(wire) = wire {
                    return Ok(Opened {
                        client,
                        connection: Box::pin(connection),
                        wire,
                    });
                }
                // sslmode=prefer and the server declined TLS: the session runs on the bare
                // socket, which the observer does not see. Open it again in plaintext, observed.
                drop((client, connection));
                tracing::debug!(
                    "pinpool: the server declined TLS (sslmode=prefer); reconnecting in plaintext"
                );
            }
            crate::plain::connect(config, rules).await
        })
    }

    fn tls(&self) -> bool {
        self.speaks_tls
    }
}

/// Wraps a TLS connector so that the stream it makes is observed. `last` receives the wire of
/// the latest handshake (tokio-postgres may try several hosts; the last one is the session's).
#[derive(Clone)]
struct ObserveTls<T> {
    inner: T,
    rules: PinRules,
    last: Arc<Mutex<Option<Arc<Wire>>>>,
}

impl<T> MakeTlsConnect<Socket> for ObserveTls<T>
where
    T: MakeTlsConnect<Socket>,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
    T::Stream: Send + 'static,
{
    type Stream = Observed<T::Stream>;
    type TlsConnect = ObserveTls<T::TlsConnect>;
    type Error = T::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, T::Error> {
        Ok(ObserveTls {
            inner: self.inner.make_tls_connect(domain)?,
            rules: self.rules,
            last: self.last.clone(),
        })
    }
}

impl<C> TlsConnect<Socket> for ObserveTls<C>
where
    C: TlsConnect<Socket>,
    C::Future: Send + 'static,
    C::Stream: Send + 'static,
{
    type Stream = Observed<C::Stream>;
    type Error = C::Error;
    type Future = BoxFuture<'static, Result<Observed<C::Stream>, C::Error>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let handshake = self.inner.connect(stream);
        let (rules, last) = (self.rules, self.last);
        Box::pin(async move {
            let stream = handshake.await?;
            let wire = Wire::new(rules);
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(wire.clone());
            Ok(Observed::new(stream, wire))
        })
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
