//! Opening connections: the TLS connector (type-erased, so TLS never changes the pool's type)
//! and the password provider (called for every new connection).

use std::future::Future;

use async_trait::async_trait;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Socket};

use crate::error::BoxError;
use crate::pinning::PinRules;
use crate::wire::{Observed, Wire};

/// A boxed, sendable future.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The connection half of a tokio-postgres connection, type-erased.
pub(crate) type ConnectionFuture = BoxFuture<'static, Result<(), tokio_postgres::Error>>;

/// Opens an observed connection with some TLS setting; implemented for every tokio-postgres
/// `MakeTlsConnect`. Every connection it opens carries a [`Wire`] that reads its traffic.
#[async_trait]
pub(crate) trait Connect: Send + Sync + 'static {
    async fn connect(
        &self,
        config: &tokio_postgres::Config,
        rules: PinRules,
    ) -> Result<Opened, tokio_postgres::Error>;

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

#[async_trait]
impl<T> Connect for Connector<T>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
{
    async fn connect(
        &self,
        config: &tokio_postgres::Config,
        rules: PinRules,
    ) -> Result<Opened, tokio_postgres::Error> {
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
            let wire = crate::sync::lock(&last).take();
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
    }

    fn tls(&self) -> bool {
        self.speaks_tls
    }
}

/// Wraps a TLS connector so that the stream it makes is observed. `last` receives the wire of
/// the latest attempt's handshake (tokio-postgres may try several hosts; the last attempt is
/// the session's). tokio-postgres asks the connector whether it can connect through a private
/// API that a wrapper cannot forward: a wrapped connector is always asked for a handshake.
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
        // A new attempt (another host): a wire from an attempt passed over is not this one's.
        // If this attempt's server declines TLS, none is set and the caller reconnects.
        *crate::sync::lock(&self.last) = None;
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
            *crate::sync::lock(&last) = Some(wire.clone());
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
///
/// A type of your own implements it with the `async-trait` crate's attribute, which the
/// trait is declared with (so it can be used as `dyn PasswordProvider`):
/// `#[async_trait::async_trait] impl PasswordProvider for Vault { async fn password(&self) -> ... }`.
#[async_trait]
pub trait PasswordProvider: Send + Sync + 'static {
    /// The password for the connection about to be opened.
    async fn password(&self) -> Result<String, BoxError>;
}

#[async_trait]
impl<F, Fut, E> PasswordProvider for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: Into<BoxError>,
{
    async fn password(&self) -> Result<String, BoxError> {
        self().await.map_err(Into::into)
    }
}

pub(crate) type SharedPasswordProvider = Arc<dyn PasswordProvider>;

/// A password provider that reuses another's value for a while: RDS IAM authentication
/// tokens are valid for 15 minutes and AWS recommends IAM authentication only below about 200
/// new connections per second, so a token can serve every connection opened in its lifetime.
///
/// A cached value younger than `lifetime - refresh_ahead` is returned at once. An older one is
/// refreshed on the next call (nothing runs in the background, which a frozen Lambda
/// environment could not run anyway); if that refresh fails, the old value keeps being served
/// until `lifetime` is over, and the error is logged. Ages are read from the wall clock, so a
/// freeze counts. Concurrent connects share one refresh. A slow provider is still bounded by
/// the pool's `connect_timeout`, which covers the password.
///
/// ```
/// # fn demo() -> Result<(), pinpool::Error> {
/// use std::time::Duration;
/// let token = || async { Ok::<_, std::io::Error>("iam-token".to_string()) };
/// let pool = pinpool::Pool::builder("postgres://app@my-proxy.example/app")
///     .password_provider(
///         pinpool::CachedPassword::new(token, Duration::from_secs(15 * 60))
///             .refresh_ahead(Duration::from_secs(5 * 60)),
///     )
///     .build()?;
/// # Ok(()) }
/// ```
pub struct CachedPassword<P> {
    inner: P,
    lifetime: std::time::Duration,
    refresh_ahead: std::time::Duration,
    cached: tokio::sync::Mutex<Option<(String, std::time::SystemTime)>>,
}

impl<P: PasswordProvider> CachedPassword<P> {
    /// Caches `inner`'s values for `lifetime` (for RDS IAM tokens, 15 minutes), refreshing
    /// them once a fifth of it is left (see [`refresh_ahead`](Self::refresh_ahead)).
    pub fn new(inner: P, lifetime: std::time::Duration) -> Self {
        CachedPassword {
            inner,
            lifetime,
            refresh_ahead: lifetime / 5,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// How long before the end of its lifetime a value is refreshed. Default: a fifth of the
    /// lifetime. At most the lifetime (a value then is refreshed at every call).
    #[must_use]
    pub fn refresh_ahead(mut self, d: std::time::Duration) -> Self {
        self.refresh_ahead = d.min(self.lifetime);
        self
    }
}

#[async_trait]
impl<P: PasswordProvider> PasswordProvider for CachedPassword<P> {
    async fn password(&self) -> Result<String, BoxError> {
        // Held across the refresh: concurrent connects wait for it instead of each asking.
        let mut cached = self.cached.lock().await;
        let now = std::time::SystemTime::now();
        let age = |at: std::time::SystemTime| now.duration_since(at).unwrap_or_default();
        if let Some((value, at)) = cached.as_ref()
            && age(*at) < self.lifetime.saturating_sub(self.refresh_ahead)
        {
            return Ok(value.clone());
        }
        match self.inner.password().await {
            Ok(value) => {
                *cached = Some((value.clone(), now));
                Ok(value)
            }
            Err(e) => match cached.as_ref() {
                Some((value, at)) if age(*at) < self.lifetime => {
                    tracing::warn!(error = %e, "pinpool: the password provider failed; the cached value serves until it expires");
                    Ok(value.clone())
                }
                _ => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    /// A provider that counts its calls and fails while `failing` is set.
    fn counting(
        calls: Arc<AtomicUsize>,
        failing: Arc<std::sync::atomic::AtomicBool>,
    ) -> impl PasswordProvider {
        move || {
            let n = calls.fetch_add(1, SeqCst) + 1;
            let fail = failing.load(SeqCst);
            async move {
                if fail {
                    Err(std::io::Error::other("provider down"))
                } else {
                    Ok(format!("token-{n}"))
                }
            }
        }
    }

    #[tokio::test]
    async fn values_are_reused_refreshed_ahead_and_kept_through_a_failed_refresh() {
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = CachedPassword::new(
            counting(calls.clone(), failing.clone()),
            Duration::from_millis(600),
        )
        .refresh_ahead(Duration::from_millis(300));
        for _ in 0..5 {
            assert_eq!(p.password().await.unwrap(), "token-1");
        }
        assert_eq!(calls.load(SeqCst), 1, "reused within its lifetime");
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(
            p.password().await.unwrap(),
            "token-2",
            "refreshed ahead of expiry"
        );
        assert_eq!(p.password().await.unwrap(), "token-2");
        assert_eq!(calls.load(SeqCst), 2);

        failing.store(true, SeqCst);
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(
            p.password().await.unwrap(),
            "token-2",
            "a failed refresh serves the old value until it expires"
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            p.password().await.is_err(),
            "an expired value is not served"
        );
        failing.store(false, SeqCst);
        assert!(p.password().await.unwrap().starts_with("token-"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_connects_share_one_refresh() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let slow = move || {
            counted.fetch_add(1, SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, std::io::Error>("slow-token".to_string())
            }
        };
        let p = Arc::new(CachedPassword::new(slow, Duration::from_secs(60)));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.password().await.unwrap() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), "slow-token");
        }
        assert_eq!(calls.load(SeqCst), 1);
    }
}
