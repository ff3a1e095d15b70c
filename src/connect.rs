//! Opening connections: the TLS connector (type-erased, so TLS never changes the pool's type)
//! and the password provider (called for every new connection).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

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
/// A cached value younger than `lifetime - refresh_ahead` is returned at once. An older one
/// that has not expired is returned at once too, and starts a refresh (unless one is running)
/// that the connect does not wait for: a slow or hung provider (a throttled STS call) costs
/// no connect anything while the cached value is valid. At most one refresh runs at a time,
/// each bounded by [`refresh_timeout`](Self::refresh_timeout); if it fails or times out, the
/// old value keeps being served until `lifetime` is over (the error is logged), and the next
/// call starts another. With no valid value cached, callers wait for the one refresh, each
/// within its own bound (the pool's `connect_timeout`, which covers the password); a caller
/// that gives up leaves the refresh running for the others. Ages are read from the wall
/// clock, so a freeze counts; a value dated in the future (the clock went back) is refreshed.
///
/// The refresh runs as a tokio task, on the runtime of the call that starts it; nothing
/// refreshes while no connect asks (a frozen Lambda environment runs nothing anyway). A
/// refresh whose runtime shut down counts as failed, and one that runtime no longer drives is
/// given up a second after its `refresh_timeout`: the next call starts another on its own
/// runtime.
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
    inner: Arc<P>,
    lifetime: Duration,
    refresh_ahead: Duration,
    refresh_timeout: Duration,
    shared: Arc<Refreshes>,
}

/// What a [`CachedPassword`] shares with its refresh tasks.
#[derive(Default)]
struct Refreshes {
    state: Mutex<CacheState>,
    /// Woken whenever a refresh ends (with a value or not).
    ended: tokio::sync::Notify,
}

#[derive(Default)]
struct CacheState {
    /// The latest value, with the wall-clock time its refresh started (its age counts from
    /// there) and that refresh's number.
    value: Option<(String, SystemTime, u64)>,
    /// The refresh running: its number and when it is given up (a task no runtime drives
    /// any more never ends by itself).
    running: Option<(u64, Instant)>,
    /// The number of the latest refresh that ended without a value, and why.
    failed: Option<(u64, SharedError)>,
    /// Refreshes started so far; the next one's number.
    started: u64,
}

/// How long after its `refresh_timeout` a refresh is given up by the callers. Its task ends
/// itself at `refresh_timeout`; they give it up only when no runtime runs that task any more,
/// not while its timer has fired and it waits its turn (its call would still be running
/// beside the next refresh's).
const GIVE_UP_GRACE: Duration = Duration::from_secs(1);

/// Where a cached value stands at some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Age {
    /// Served, nothing more.
    Fresh,
    /// Served, and refreshed.
    Due,
    /// Not served.
    Expired,
}

impl<P: PasswordProvider> CachedPassword<P> {
    /// Caches `inner`'s values for `lifetime` (for RDS IAM tokens, 15 minutes), refreshing
    /// them once a fifth of it is left (see [`refresh_ahead`](Self::refresh_ahead)).
    pub fn new(inner: P, lifetime: Duration) -> Self {
        CachedPassword {
            inner: Arc::new(inner),
            lifetime,
            refresh_ahead: lifetime / 5,
            refresh_timeout: Duration::from_secs(10),
            shared: Arc::default(),
        }
    }

    /// How long before the end of its lifetime a value is refreshed. Default: a fifth of the
    /// lifetime. At most the lifetime (every call then starts a refresh, unless one is
    /// running, and is served the cached value while it is valid).
    #[must_use]
    pub fn refresh_ahead(mut self, d: Duration) -> Self {
        self.refresh_ahead = d.min(self.lifetime);
        self
    }

    /// How long one call of the inner provider may take before it is given up (and fails).
    /// Default: 10 s, twice the pool's default `connect_timeout`: a slow provider that answers
    /// is not cut off under a waiting connect, and a hung one is given up long before a
    /// refreshed-ahead value expires.
    #[must_use]
    pub fn refresh_timeout(mut self, d: Duration) -> Self {
        self.refresh_timeout = d;
        self
    }

    fn age(&self, at: SystemTime, now: SystemTime) -> Age {
        match now.duration_since(at) {
            Ok(age) if age >= self.lifetime => Age::Expired,
            Ok(age) if age < self.lifetime - self.refresh_ahead => Age::Fresh,
            // In the refresh-ahead window, or dated in the future: the clock went back, and
            // how old it is nobody knows.
            _ => Age::Due,
        }
    }

    /// Gives up the refresh running if it passed its bound (`refresh_timeout` and
    /// [`GIVE_UP_GRACE`]): its task, on a runtime nothing drives any more, may never end by
    /// itself. It failed, for whoever waited for it.
    fn give_up_overdue(&self, st: &mut CacheState, now: Instant) {
        if let Some((id, until)) = st.running
            && now >= until
        {
            st.running = None;
            let e = format!(
                "the password provider did not answer within {:?}",
                self.refresh_timeout
            );
            st.fail(id, e.into());
        }
    }

    /// Starts a refresh unless one is running; returns the number of the one running and its
    /// bound. The task is spawned by the caller, after the state's lock is released: see
    /// [`Refresh`].
    fn start(&self, st: &mut CacheState) -> (u64, Instant, Option<Refresh<P>>) {
        if let Some((id, until)) = st.running {
            return (id, until, None);
        }
        st.started += 1;
        let id = st.started;
        // A timeout too long for the clock ends never.
        let until = crate::deadline::after(self.refresh_timeout.saturating_add(GIVE_UP_GRACE));
        st.running = Some((id, until));
        let refresh = Refresh {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            id,
            started: SystemTime::now(),
            timeout: self.refresh_timeout,
            lifetime: self.lifetime,
        };
        (id, until, Some(refresh))
    }
}

impl CacheState {
    /// The cached value (only read once one is known to be there).
    fn cached(&self) -> String {
        self.value
            .as_ref()
            .map(|(v, _, _)| v.clone())
            .unwrap_or_default()
    }

    fn fail(&mut self, id: u64, e: SharedError) {
        if self.failed.as_ref().is_none_or(|(f, _)| *f < id) {
            self.failed = Some((id, e));
        }
    }
}

/// One refresh, to be spawned. Outside the state's lock: a spawn onto a runtime that is
/// shutting down drops the task at once, and its [`Ending`] takes the lock.
struct Refresh<P> {
    inner: Arc<P>,
    shared: Arc<Refreshes>,
    id: u64,
    started: SystemTime,
    timeout: Duration,
    lifetime: Duration,
}

impl<P: PasswordProvider> Refresh<P> {
    fn spawn(self) {
        let Refresh {
            inner,
            shared,
            id,
            started,
            timeout,
            lifetime,
        } = self;
        // Every way the task ends, dropped unpolled included, records an outcome.
        let mut ending = Ending {
            shared,
            id,
            started,
            lifetime,
            done: false,
        };
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout(timeout, inner.password()).await {
                Ok(answer) => answer,
                Err(_) => {
                    Err(format!("the password provider did not answer within {timeout:?}").into())
                }
            };
            ending.end(outcome);
        });
    }
}

/// Owned by a refresh task: records how the refresh ended and wakes the callers waiting for
/// it, also when the task's future is dropped unfinished (the provider panicked, the runtime
/// shut down).
struct Ending {
    shared: Arc<Refreshes>,
    id: u64,
    started: SystemTime,
    lifetime: Duration,
    done: bool,
}

impl Drop for Ending {
    fn drop(&mut self) {
        if !self.done {
            self.end(Err(if std::thread::panicking() {
                "the password provider panicked".into()
            } else {
                "the password refresh was dropped unfinished (its runtime shut down)".into()
            }));
        }
    }
}

impl Ending {
    fn end(&mut self, outcome: Result<String, BoxError>) {
        self.done = true;
        {
            let mut st = crate::sync::lock(&self.shared.state);
            if st.running.is_some_and(|(id, _)| id == self.id) {
                st.running = None;
            }
            match outcome {
                Ok(value) => {
                    // A later refresh's value stays (one given up may still end).
                    if st.value.as_ref().is_none_or(|(_, _, id)| *id < self.id) {
                        st.value = Some((value, self.started, self.id));
                    }
                }
                Err(e) => {
                    let valid = st.value.as_ref().is_some_and(|(_, at, _)| {
                        SystemTime::now()
                            .duration_since(*at)
                            .is_ok_and(|age| age < self.lifetime)
                    });
                    if valid {
                        tracing::warn!(error = %e, "pinpool: the password provider failed; the cached value serves until it expires");
                    }
                    st.fail(self.id, SharedError(Arc::new(e)));
                }
            }
        }
        self.shared.ended.notify_waiters();
    }
}

/// A refresh's error, for every caller that waited for it.
#[derive(Clone)]
struct SharedError(Arc<BoxError>);

impl From<String> for SharedError {
    fn from(s: String) -> Self {
        SharedError(Arc::new(s.into()))
    }
}

impl std::fmt::Debug for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self.0, f)
    }
}

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&**self.0, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[async_trait]
impl<P: PasswordProvider> PasswordProvider for CachedPassword<P> {
    /// The cached value, or a fresh one (see the type's documentation).
    ///
    /// # Panics
    /// Outside a tokio runtime when a refresh is due (it is spawned), as `tokio::spawn`.
    async fn password(&self) -> Result<String, BoxError> {
        // The refresh this call waits for; its outcome is this call's.
        let mut waited: Option<u64> = None;
        loop {
            // Made before the state is read: a refresh that ends after the read wakes it
            // (`notify_waiters` reaches every `Notified` made before it, polled or not).
            let ended = self.shared.ended.notified();
            let (until, refresh) = {
                let mut st = crate::sync::lock(&self.shared.state);
                let now = SystemTime::now();
                let age = st
                    .value
                    .as_ref()
                    .map_or(Age::Expired, |(_, at, _)| self.age(*at, now));
                if age == Age::Fresh {
                    return Ok(st.cached());
                }
                self.give_up_overdue(&mut st, Instant::now());
                if let Some(w) = waited {
                    // The one waited for ended: its value (however old), or its error.
                    if let Some((v, _, _)) = st.value.as_ref().filter(|(_, _, id)| *id >= w) {
                        return Ok(v.clone());
                    }
                    if let Some((_, e)) = st.failed.as_ref().filter(|(id, _)| *id >= w) {
                        return match age {
                            Age::Due => Ok(st.cached()),
                            _ => Err(Box::new(e.clone())),
                        };
                    }
                }
                let (id, until, refresh) = self.start(&mut st);
                if age == Age::Due {
                    let value = st.cached();
                    drop(st);
                    if let Some(r) = refresh {
                        r.spawn();
                    }
                    return Ok(value);
                }
                waited = Some(id);
                (until, refresh)
            };
            if let Some(r) = refresh {
                r.spawn();
            }
            // Until it ends, or its bound passes (then this caller gives it up, and fails).
            let _ = tokio::time::timeout_at(until, ended).await;
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

    /// Waits (on this current-thread runtime: the refresh task has ended once its call is
    /// counted) until the provider was called `n` times; false after 5 s.
    async fn called(calls: &AtomicUsize, n: usize) -> bool {
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while calls.load(SeqCst) < n {
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    /// Ages by the wall clock, so on real time: each phase is a second or more away from the
    /// edge of the window it is in (fresh for 1 s, due from 1 s to 3 s, expired after).
    #[tokio::test]
    async fn values_are_reused_refreshed_ahead_and_kept_through_a_failed_refresh() {
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = CachedPassword::new(
            counting(calls.clone(), failing.clone()),
            Duration::from_secs(3),
        )
        .refresh_ahead(Duration::from_secs(2));
        for _ in 0..5 {
            assert_eq!(p.password().await.unwrap(), "token-1");
        }
        assert_eq!(calls.load(SeqCst), 1, "reused within its lifetime");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            p.password().await.unwrap(),
            "token-1",
            "in the refresh-ahead window the valid value is served while it is refreshed"
        );
        assert!(called(&calls, 2).await, "refreshed in the background");
        assert_eq!(p.password().await.unwrap(), "token-2", "refreshed ahead");
        assert_eq!(p.password().await.unwrap(), "token-2");
        assert_eq!(calls.load(SeqCst), 2);

        failing.store(true, SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        for n in 3..=5 {
            assert_eq!(
                p.password().await.unwrap(),
                "token-2",
                "a failed refresh serves the old value until it expires"
            );
            assert!(called(&calls, n).await, "a failed refresh is tried again");
        }
        assert_eq!(calls.load(SeqCst), 5, "a failed refresh is tried again");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let err = p.password().await.unwrap_err();
        assert!(err.to_string().contains("provider down"), "{err}");
        failing.store(false, SeqCst);
        assert!(p.password().await.unwrap().starts_with("token-"));
    }

    /// A provider whose calls after the first never answer (a throttled STS or IMDS call).
    fn hanging_after_the_first(calls: Arc<AtomicUsize>) -> impl PasswordProvider {
        move || {
            let n = calls.fetch_add(1, SeqCst) + 1;
            async move {
                if n > 1 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::io::Error>(format!("token-{n}"))
            }
        }
    }

    /// In the refresh-ahead window the provider hangs: every caller is served the value still
    /// valid at once, and the provider is asked once (not once per timed-out connect).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_refresh_does_not_hold_up_a_valid_value() {
        let calls = Arc::new(AtomicUsize::new(0));
        // Refreshed ahead at every call: each call after the first is in the window.
        let p = Arc::new(
            CachedPassword::new(
                hanging_after_the_first(calls.clone()),
                Duration::from_secs(60),
            )
            .refresh_ahead(Duration::from_secs(60)),
        );
        assert_eq!(p.password().await.unwrap(), "token-1");
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let p = p.clone();
                // Held up, it would wait for ever: 5 s is "at once" on any machine.
                tokio::spawn(async move {
                    tokio::time::timeout(Duration::from_secs(5), p.password()).await
                })
            })
            .collect();
        for t in tasks {
            let served = t
                .await
                .unwrap()
                .expect("served at once, not after the refresh");
            assert_eq!(served.unwrap(), "token-1");
        }
        assert_eq!(calls.load(SeqCst), 2, "one refresh, however many callers");
    }

    /// With no value cached, a caller that gives up (its connect bound passed) does not cancel
    /// the refresh: the next caller gets its value, and the provider was asked once.
    /// On a paused clock (only tokio's timers are involved): the refresh ends 2 s after it
    /// started, 1 s after the first caller gave up; one started again would end 2 s later.
    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_does_not_cancel_the_refresh_for_the_others() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let slow = move || {
            counted.fetch_add(1, SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, std::io::Error>("slow-token".to_string())
            }
        };
        let p = CachedPassword::new(slow, Duration::from_secs(60));
        let gave_up = tokio::time::timeout(Duration::from_secs(1), p.password()).await;
        assert!(gave_up.is_err());
        let started = tokio::time::Instant::now();
        assert_eq!(p.password().await.unwrap(), "slow-token");
        assert!(
            started.elapsed() <= Duration::from_millis(1500),
            "the refresh went on without its first caller: {:?}",
            started.elapsed()
        );
        assert_eq!(calls.load(SeqCst), 1);
    }

    /// Counts the provider's calls running now, and the most ever at once.
    #[derive(Default)]
    struct Running {
        now: AtomicUsize,
        most: AtomicUsize,
        calls: AtomicUsize,
    }

    impl Running {
        fn enter(self: &Arc<Self>) -> impl Drop + Send + use<> {
            struct Leave(Arc<Running>);
            impl Drop for Leave {
                fn drop(&mut self) {
                    self.0.now.fetch_sub(1, SeqCst);
                }
            }
            self.calls.fetch_add(1, SeqCst);
            let now = self.now.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            Leave(self.clone())
        }
    }

    /// A provider whose first call answers and whose later calls hang, counted by `running`.
    fn counted_hanging(running: Arc<Running>) -> impl PasswordProvider {
        move || {
            let leave = running.enter();
            let first = running.calls.load(SeqCst) == 1;
            async move {
                let _leave = leave;
                if !first {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::io::Error>("token-1".to_string())
            }
        }
    }

    /// A refresh that hangs is given up at `refresh_timeout` (its call dropped), the valid value
    /// is served all along, and a later call starts another refresh; never two at once.
    /// On a paused clock (only tokio's timers are involved; the value ages by the wall clock
    /// but is valid for a minute): how many refreshes fit in the loop, and that each call is
    /// served without waiting for any timer, do not depend on the machine's load.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_refresh_ends_at_its_bound_and_a_later_call_starts_another() {
        let running = Arc::new(Running::default());
        let lifetime = Duration::from_secs(60);
        let p = CachedPassword::new(counted_hanging(running.clone()), lifetime)
            .refresh_ahead(lifetime)
            .refresh_timeout(Duration::from_millis(100));
        assert_eq!(p.password().await.unwrap(), "token-1");
        let started = tokio::time::Instant::now();
        while started.elapsed() < Duration::from_millis(450) {
            let call = tokio::time::Instant::now();
            assert_eq!(p.password().await.unwrap(), "token-1");
            assert_eq!(call.elapsed(), Duration::ZERO, "served at once");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let calls = running.calls.load(SeqCst);
        assert!((3..=6).contains(&calls), "one refresh per 100 ms: {calls}");
        assert_eq!(running.most.load(SeqCst), 1, "never two refreshes at once");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(running.now.load(SeqCst), 0, "the hung call was dropped");
    }

    /// With nothing cached and a provider that hangs, each caller waits within its own bound
    /// and gives up; the one refresh goes on, is given up at `refresh_timeout` with an error
    /// for whoever still waits, and the next caller starts another.
    /// On a paused clock (only tokio's timers are involved): the waiters fail at the
    /// refresh's 300 ms bound, 200 ms after they came, not at the callers' give-up bound 1 s
    /// later; and a 20 ms wait is long enough for the spawned refresh to run.
    #[tokio::test(start_paused = true)]
    async fn callers_without_a_value_wait_for_one_bounded_refresh() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let hangs = move || {
            counted.fetch_add(1, SeqCst);
            std::future::pending::<Result<String, std::io::Error>>()
        };
        let p = Arc::new(
            CachedPassword::new(hangs, Duration::from_secs(60))
                .refresh_timeout(Duration::from_millis(300)),
        );
        for _ in 0..5 {
            let gave_up = tokio::time::timeout(Duration::from_millis(20), p.password()).await;
            assert!(gave_up.is_err());
        }
        assert_eq!(calls.load(SeqCst), 1);
        let started = tokio::time::Instant::now();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.password().await })
            })
            .collect();
        for w in waiters {
            let err = w.await.unwrap().unwrap_err();
            assert!(err.to_string().contains("did not answer within"), "{err}");
        }
        assert!(
            started.elapsed() < Duration::from_millis(450),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(calls.load(SeqCst), 1, "the waiters shared the refresh");
        let _ = tokio::time::timeout(Duration::from_millis(20), p.password()).await;
        assert_eq!(calls.load(SeqCst), 2, "a later caller starts another");
    }

    /// A provider that panics: the callers waiting get an error, nothing stays wedged, and a
    /// cached value is still served while the refresh panics.
    #[tokio::test]
    async fn a_panicking_provider_wedges_nothing() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let panics_on_odd_calls = move || {
            let n = counted.fetch_add(1, SeqCst) + 1;
            async move {
                assert!(
                    n.is_multiple_of(2),
                    "provider panic {n} (expected by the test)"
                );
                Ok::<_, std::io::Error>(format!("token-{n}"))
            }
        };
        let lifetime = Duration::from_secs(60);
        let p = CachedPassword::new(panics_on_odd_calls, lifetime).refresh_ahead(lifetime);
        let err = p.password().await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(p.password().await.unwrap(), "token-2");
        // In the window: served while the third call panics in the background.
        assert_eq!(p.password().await.unwrap(), "token-2");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(calls.load(SeqCst), 3);
        assert_eq!(p.password().await.unwrap(), "token-2");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(p.password().await.unwrap(), "token-4");
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A refresh started on a runtime that then shuts down (a provider kept in a `static`,
    /// used from one test's runtime after another's): it counts as ended, and a caller on the
    /// next runtime starts its own instead of waiting for it.
    #[test]
    fn a_refresh_whose_runtime_shut_down_is_not_waited_for() {
        let running = Arc::new(Running::default());
        let p = CachedPassword::new(counted_hanging(running.clone()), Duration::ZERO)
            .refresh_timeout(Duration::from_secs(3600));
        assert_eq!(runtime().block_on(p.password()).unwrap(), "token-1");
        let first = runtime();
        first.block_on(async {
            // Expired at once (lifetime zero): a refresh starts and hangs.
            let _ = tokio::time::timeout(Duration::from_millis(20), p.password()).await;
        });
        assert_eq!(running.now.load(SeqCst), 1);
        drop(first);
        assert_eq!(running.now.load(SeqCst), 0, "dropped with its runtime");
        runtime().block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(20), p.password()).await;
        });
        assert_eq!(
            running.calls.load(SeqCst),
            3,
            "the next runtime started another"
        );
    }

    /// A refresh left on a runtime that nobody drives any more (a sync wrapper's runtime
    /// between two `block_on` calls) is given up at its bound by a caller elsewhere.
    #[test]
    fn a_refresh_no_runtime_drives_is_given_up_at_its_bound() {
        let running = Arc::new(Running::default());
        let p = Arc::new(
            CachedPassword::new(counted_hanging(running.clone()), Duration::ZERO)
                .refresh_timeout(Duration::from_millis(200)),
        );
        let idle = runtime();
        idle.block_on(async {
            assert_eq!(p.password().await.unwrap(), "token-1");
            let _ = tokio::time::timeout(Duration::from_millis(20), p.password()).await;
        });
        // `idle` lives on, undriven, with the hung refresh in it.
        let started = std::time::Instant::now();
        let err = runtime().block_on(p.password()).unwrap_err();
        assert!(err.to_string().contains("did not answer within"), "{err}");
        // Given up at 1.2 s (its bound and the grace); undriven, it would hang for ever.
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert_eq!(running.calls.load(SeqCst), 2);
        runtime().block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(20), p.password()).await;
        });
        assert_eq!(running.calls.load(SeqCst), 3, "then another is started");
        drop(idle);
    }

    /// Dropped after any number of polls, a call leaves nothing behind: the next gets the
    /// value of the one refresh.
    #[tokio::test]
    async fn a_call_dropped_at_any_poll_leaves_the_refresh_to_the_others() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let slow = move || {
            counted.fetch_add(1, SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, std::io::Error>("slow-token".to_string())
            }
        };
        let p = CachedPassword::new(slow, Duration::from_secs(60));
        for polls in 0..4 {
            let mut call = p.password();
            for _ in 0..polls {
                let polled = futures_util::poll!(call.as_mut());
                assert!(polled.is_pending());
                tokio::task::yield_now().await;
            }
            drop(call);
        }
        assert_eq!(p.password().await.unwrap(), "slow-token");
        assert_eq!(calls.load(SeqCst), 1);
    }

    #[test]
    fn ages_by_the_wall_clock_and_a_value_from_the_future_is_refreshed() {
        let p = CachedPassword::new(
            || async { Ok::<_, std::io::Error>(String::new()) },
            Duration::from_secs(600),
        )
        .refresh_ahead(Duration::from_secs(100));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |s| now - Duration::from_secs(s);
        assert_eq!(p.age(now, now), Age::Fresh);
        assert_eq!(p.age(ago(499), now), Age::Fresh);
        assert_eq!(p.age(ago(500), now), Age::Due);
        assert_eq!(p.age(ago(599), now), Age::Due);
        assert_eq!(p.age(ago(600), now), Age::Expired);
        assert_eq!(p.age(now + Duration::from_secs(3600), now), Age::Due);
        let every_call = CachedPassword::new(
            || async { Ok::<_, std::io::Error>(String::new()) },
            Duration::from_secs(600),
        )
        .refresh_ahead(Duration::from_secs(6000));
        assert_eq!(every_call.age(now, now), Age::Due);
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
