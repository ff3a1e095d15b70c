//! A local RDS Proxy emulator (feature `emulator`): a PostgreSQL wire-protocol proxy that
//! multiplexes client sessions over few database connections one transaction at a time, pins
//! sessions on the same conditions as RDS Proxy ([`crate::pinning`]) and on any protocol-level
//! FunctionCall ([`Reason::Untracked`]: what the function does is unknown), queues
//! transactions when every database connection is busy and fails them after the borrow
//! timeout with SQLSTATE 08000, and closes idle clients.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use pinpool::emulator::{Emulator, EmulatorConfig};
//! let proxy = Emulator::start(
//!     EmulatorConfig::new("postgres://postgres@127.0.0.1:5432/postgres").max_connections(4),
//! )
//! .await?;
//! let url = proxy.url("postgres", "postgres"); // connect clients here
//! println!("{url}: {:?}", proxy.counters());
//! # Ok(()) }
//! ```
//!
//! # Network
//!
//! By default the emulator adds no latency: clients and database are reached over loopback.
//! [`EmulatorConfig::client_latency`] and [`EmulatorConfig::upstream_latency`] model the two
//! hops of a real deployment (a Lambda function to RDS Proxy, RDS Proxy to the database) as
//! delay lines: each chunk of bytes reaches the other side that long after the emulator read
//! it, in order, without waiting for earlier chunks still in flight, so pipelined requests
//! share one wait. [`EmulatorCounters::round_trips`] counts the times clients waited for an
//! answer, and [`Emulator::track_round_trips`] those of one `application_name`.
//!
//! Named protocol-level statements keep working when a client's next transaction lands on
//! another database connection (the emulator prepares them again there, under names of its
//! own), as RDS Proxy does since November 2023; [`PinRules::legacy`] brings back the older
//! behaviour where any Parse pins. Clients log in against the emulator itself (trust, or an
//! md5 password), so a login succeeds even when no database connection is free.
//!
//! # Memory
//!
//! The emulator keeps little of what a client sends, whatever the client does:
//!
//! - **Message limits are PostgreSQL's.** A Query, Parse, Bind, FunctionCall or copy message
//!   may be up to [`EmulatorConfig::max_message_bytes`] long (default 1 GiB - 2, PostgreSQL's
//!   `PQ_LARGE_MESSAGE_LIMIT`), any other message 10,000 bytes (`PQ_SMALL_MESSAGE_LIMIT`), a
//!   password message 65,535 (`PG_MAX_AUTH_TOKEN_LENGTH`), a startup packet 10,000. A longer
//!   message is answered with a FATAL error, SQLSTATE 08P01 "invalid message length", and the
//!   session closes (a startup packet that long closes the connection without an answer, as
//!   PostgreSQL does).
//! - **A long message is never held whole.** The emulator takes the first 64 KiB of a message's
//!   body (enough for the statement names it renames, and past the 16 KiB after which RDS
//!   Proxy pins a text anyway), handles that head as it would the whole message, and passes the
//!   rest on as it arrives, in either direction: a 500 MiB parameter or row costs the emulator
//!   a few buffers. A Query or Parse longer than that pins its session
//!   ([`Reason::Oversized`]); such a Parse is not kept to be prepared again elsewhere.
//! - **Backpressure, per session.** A session reads from its client only while what it holds
//!   (the client's bytes not yet written to the database, replies not yet written to the
//!   client) is under [`EmulatorConfig::session_buffer_bytes`], and from its database
//!   connection only while replies waiting for the client are under it. A client that sends
//!   faster than the database reads, or does not read its replies, is slowed down, never
//!   disconnected, as PostgreSQL itself stops reading such a client. Both sockets are read
//!   and written at once, so a database that stops reading a pipeline while its answers are
//!   not read cannot deadlock the session.
//! - **A bound for the process.** Every session's bytes count towards
//!   [`EmulatorCounters::buffered_bytes`]; sessions without a database connection (queued for
//!   one, or between transactions) read from their clients only while it is under
//!   [`EmulatorConfig::max_buffered_bytes`], so any number of clients hold at most about that
//!   much, plus twice `session_buffer_bytes` for each of the at most `max_connections`
//!   sessions holding a database connection (never held up by the others: the queued ones
//!   wait for them). The price: while hostile clients fill the bound, other clients without a
//!   database connection are not read (they wait, and go on when the bound has room again),
//!   so the bound trades memory for a denial of service that lasts as long as the hostile
//!   clients stay (or until their borrows time out).
//! - **Statement texts kept.** Named statements are kept (to prepare them again on another
//!   database connection) up to [`EmulatorConfig::max_statement_bytes`] per session and
//!   `max_buffered_bytes` in all; past that a Parse pins its session and goes to the database
//!   under the client's own name.

mod budget;
mod net;
mod session;
mod stream;
mod upstream;
mod wire;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::pinning::{PinRules, Reason};
use upstream::{UpstreamConfig, UpstreamPool};

/// How the emulator behaves. Defaults are RDS Proxy's.
#[derive(Clone)]
pub struct EmulatorConfig {
    listen: SocketAddr,
    upstream: String,
    max_connections: usize,
    borrow_timeout: Duration,
    idle_client_timeout: Duration,
    rules: PinRules,
    password: Option<String>,
    close_on_borrow_timeout: bool,
    application_name: String,
    nat_idle_timeout: Option<Duration>,
    max_message_bytes: usize,
    session_buffer_bytes: usize,
    max_buffered_bytes: usize,
    max_statement_bytes: usize,
    client_latency: Duration,
    upstream_latency: Duration,
    #[cfg(feature = "tls")]
    tls: Option<Arc<TlsSetting>>,
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("EmulatorConfig");
        d.field("listen", &self.listen)
            .field("upstream", &Redacted(&self.upstream))
            .field("max_connections", &self.max_connections)
            .field("borrow_timeout", &self.borrow_timeout)
            .field("idle_client_timeout", &self.idle_client_timeout)
            .field("rules", &self.rules)
            .field("password", &self.password.as_ref().map(|_| "_"))
            .field("close_on_borrow_timeout", &self.close_on_borrow_timeout)
            .field("application_name", &self.application_name)
            .field("nat_idle_timeout", &self.nat_idle_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("session_buffer_bytes", &self.session_buffer_bytes)
            .field("max_buffered_bytes", &self.max_buffered_bytes)
            .field("max_statement_bytes", &self.max_statement_bytes)
            .field("client_latency", &self.client_latency)
            .field("upstream_latency", &self.upstream_latency);
        #[cfg(feature = "tls")]
        d.field("tls", &self.tls);
        d.finish()
    }
}

/// An upstream connection string without its password, for Debug.
struct Redacted<'a>(&'a str);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        let Some(body) = ["postgres://", "postgresql://"]
            .into_iter()
            .find_map(|p| s.starts_with(p).then_some(p.len()))
        else {
            // Key-value form: tokio-postgres's Config redacts the password in its Debug.
            return match s.parse::<tokio_postgres::Config>() {
                Ok(config) => config.fmt(f),
                Err(_) => f.write_str("(a connection string that does not parse)"),
            };
        };
        // A URL: the user-info ends at the last `@` (an unencoded password may hold `@`, `/`,
        // `?`, `#` and `:`); keep the user name before its first `:` or `@`.
        let Some(at) = s[body..].rfind('@').map(|i| body + i) else {
            return write!(f, "{s:?}");
        };
        let user_info = &s[body..at];
        let user = user_info.split([':', '@']).next().unwrap_or("");
        let shown = if user.len() == user_info.len() {
            s.to_string()
        } else {
            format!("{}{user}:_{}", &s[..body], &s[at..])
        };
        write!(f, "{shown:?}")
    }
}

/// TLS to clients: the server certificate and whether plain connections are refused.
#[cfg(feature = "tls")]
pub(crate) struct TlsSetting {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    pub(crate) required: bool,
}

#[cfg(feature = "tls")]
impl std::fmt::Debug for TlsSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetting")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl EmulatorConfig {
    /// An emulator in front of the PostgreSQL at `upstream` (a tokio-postgres URL or key-value
    /// string), listening on an ephemeral loopback port.
    pub fn new(upstream: impl Into<String>) -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream: upstream.into(),
            max_connections: 40,
            borrow_timeout: Duration::from_secs(120),
            idle_client_timeout: Duration::from_secs(1800),
            rules: PinRules::new(),
            password: None,
            close_on_borrow_timeout: false,
            application_name: "pinpool-emulator".to_string(),
            nat_idle_timeout: None,
            max_message_bytes: wire::LARGE_MESSAGE,
            session_buffer_bytes: 1 << 20,
            max_buffered_bytes: 64 << 20,
            max_statement_bytes: 4 << 20,
            client_latency: Duration::ZERO,
            upstream_latency: Duration::ZERO,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Offers TLS to clients with this certificate chain and private key (PEM), as RDS Proxy
    /// does; with `required`, plain connections are refused. Without TLS configured the
    /// emulator answers `N` to SSLRequest.
    ///
    /// # Errors
    /// PEM that does not parse, or a key that does not match.
    #[cfg(feature = "tls")]
    pub fn tls_pem(mut self, cert_chain: &[u8], key: &[u8], required: bool) -> io::Result<Self> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}"))
        };
        let certs = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid("private key", &e))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let server = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS", &e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| invalid("certificate and key", &e))?;
        self.tls = Some(Arc::new(TlsSetting {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            required,
        }));
        Ok(self)
    }

    /// The address to listen on. Default `127.0.0.1:0` (an ephemeral port).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The most database connections. Default 40 (a micro instance).
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a transaction waits for a database connection (RDS Proxy's
    /// `ConnectionBorrowTimeout`). Default 120 s.
    #[must_use]
    pub fn borrow_timeout(mut self, d: Duration) -> Self {
        self.borrow_timeout = d;
        self
    }

    /// Idle client connections are closed after this long (RDS Proxy's `IdleClientTimeout`).
    /// Default 1,800 s.
    #[must_use]
    pub fn idle_client_timeout(mut self, d: Duration) -> Self {
        self.idle_client_timeout = d;
        self
    }

    /// The pinning rules of this proxy, independent of the pool's.
    #[must_use]
    pub fn rules(mut self, rules: PinRules) -> Self {
        self.rules = rules;
        self
    }

    /// Require clients to log in with this password (md5). Default: trust.
    #[must_use]
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Close the client connection after a borrow timeout (RDS Proxy's behaviour here is not
    /// documented). Default false.
    #[must_use]
    pub fn close_on_borrow_timeout(mut self, close: bool) -> Self {
        self.close_on_borrow_timeout = close;
        self
    }

    /// The `application_name` of the database connections, so tests can find and kill only
    /// their own. Default `pinpool-emulator`.
    #[must_use]
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// A NAT gateway (or load balancer) between the clients and the proxy that forgets a
    /// flow idle longer than this (AWS NAT gateways: 350 s), as happens to the socket of a
    /// Lambda environment frozen that long. The client's socket stays open, but nothing it
    /// sends arrives and nothing comes back: its next query waits forever. The proxy side
    /// never hears of it: a pinned session keeps its database connection until the idle
    /// client timeout. Default `None` (no NAT).
    #[must_use]
    pub fn nat_idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.nat_idle_timeout = d;
        self
    }

    /// The longest Query, Parse, Bind, FunctionCall or copy message a client may send (its
    /// length word, which counts itself). A longer one is answered with a FATAL error
    /// (SQLSTATE 08P01, "invalid message length") and the session closes, as PostgreSQL does.
    /// Other messages may be at most 10,000 bytes (PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`), a
    /// password message 65,535. A long message is never held whole: the emulator keeps its
    /// first 64 KiB and passes the rest through as it arrives. Default 1 GiB - 2
    /// (PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT`); at least 64 KiB.
    #[must_use]
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n.clamp(wire::HEAD, wire::LARGE_MESSAGE);
        self
    }

    /// How many bytes one client session may hold in each direction before the emulator stops
    /// reading more (backpressure): from the client while what it sent, and replies not yet
    /// taken, wait for the database or the client; from the database connection while replies
    /// wait for a client that does not read them. The client is slowed down, never
    /// disconnected, as with PostgreSQL itself, which stops reading a client whose replies
    /// pile up. Default 1 MiB; at least 256 KiB (room for a message's head and a read).
    #[must_use]
    pub fn session_buffer_bytes(mut self, n: usize) -> Self {
        self.session_buffer_bytes = n.max(MIN_SESSION_BUFFER);
        self
    }

    /// The bytes all client sessions together may hold before sessions without a database
    /// connection (queued for one, or between transactions) stop reading from their clients.
    /// Sessions holding a database connection keep reading within their own
    /// [`session_buffer_bytes`](Self::session_buffer_bytes): they are at most
    /// [`max_connections`](Self::max_connections), and the queued ones wait for them to
    /// finish, so holding them up too could stall everyone. The whole process then holds at
    /// most about this plus twice `max_connections` times `session_buffer_bytes`. Default
    /// 64 MiB.
    #[must_use]
    pub fn max_buffered_bytes(mut self, n: usize) -> Self {
        self.max_buffered_bytes = n;
        self
    }

    /// How many bytes of named prepared statements (name and text) the emulator keeps for
    /// one client session, to prepare them again on whichever database connection its next
    /// transaction lands on; all sessions together keep at most
    /// [`max_buffered_bytes`](Self::max_buffered_bytes) more. A statement past either bound
    /// (or one longer than 64 KiB) is not kept: it pins its session ([`Reason::Oversized`])
    /// and goes to the pinned database connection under the client's own name. Default
    /// 4 MiB.
    #[must_use]
    pub fn max_statement_bytes(mut self, n: usize) -> Self {
        self.max_statement_bytes = n;
        self
    }

    /// The one-way latency of the network between each client and the proxy (a Lambda
    /// function in a VPC and its RDS Proxy endpoint). Each chunk of bytes one side sends
    /// reaches the other this long after the emulator read it, in order, in each direction:
    /// a query waits at least twice this for its answer, and pipelined requests share one
    /// wait (a chunk is never held up by an earlier one still in flight, as on a real link).
    /// A client's first bytes also wait one round trip more, the TCP handshake. The delays
    /// are kept to a fraction of a millisecond (by a thread of the emulator's own: tokio's
    /// timer counts whole milliseconds). Each direction of a connection holds at most
    /// 512 KiB in flight. Default zero: no delay, no timer, no task per connection.
    #[must_use]
    pub fn client_latency(mut self, d: Duration) -> Self {
        self.client_latency = d;
        self
    }

    /// The one-way latency of the network between the proxy and the database, applied as
    /// [`client_latency`](Self::client_latency) is, to every database connection (its login
    /// too, after one round trip for the TCP handshake). A query through the emulator then
    /// waits at least `2 × (client_latency + upstream_latency)` for its answer. Default zero.
    #[must_use]
    pub fn upstream_latency(mut self, d: Duration) -> Self {
        self.upstream_latency = d;
        self
    }
}

/// The smallest [`EmulatorConfig::session_buffer_bytes`].
const MIN_SESSION_BUFFER: usize = 256 * 1024;

/// Live counters, updated without locks.
#[derive(Default)]
pub(crate) struct Counters {
    clients: AtomicU64,
    clients_total: AtomicU64,
    upstream_open: AtomicU64,
    upstream_in_use: AtomicU64,
    pinned_now: AtomicU64,
    peak_pinned: AtomicU64,
    pins: [AtomicU64; crate::pinning::REASON_COUNT],
    borrow_waits: AtomicU64,
    borrow_timeouts: AtomicU64,
    idle_client_closes: AtomicU64,
    nat_drops: AtomicU64,
    /// Bytes held in the buffers of every client session now.
    buffered: AtomicU64,
    peak_buffered: AtomicU64,
    refused_messages: AtomicU64,
    /// Bytes of statement names and texts the sessions keep.
    statement_bytes: AtomicU64,
    round_trips: AtomicU64,
}

impl Counters {
    fn pin(&self, r: Reason) {
        let i = Reason::all().iter().position(|x| *x == r).unwrap_or(0);
        self.pins[i].fetch_add(1, Relaxed);
    }
}

/// A snapshot of the emulator's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmulatorCounters {
    /// Client connections open now.
    pub clients: u64,
    /// Client connections accepted since start.
    pub clients_total: u64,
    /// Database connections open now (an idle one the database closed is let go when the
    /// counters are read or a connection is borrowed).
    pub upstream_open: u64,
    /// Database connections lent to a client now (in a transaction or pinned).
    pub upstream_in_use: u64,
    /// Client sessions pinned now.
    pub pinned_now: u64,
    /// The most client sessions pinned at once.
    pub peak_pinned: u64,
    /// Sessions pinned, by reason (a session pinned for two reasons counts under both).
    pub pins: Vec<(Reason, u64)>,
    /// Transactions that had to wait for a database connection.
    pub borrow_waits: u64,
    /// Transactions that waited longer than the borrow timeout.
    pub borrow_timeouts: u64,
    /// Client connections closed for idleness.
    pub idle_client_closes: u64,
    /// Client flows a NAT forgot ([`EmulatorConfig::nat_idle_timeout`]).
    pub nat_drops: u64,
    /// Bytes the client sessions hold in their buffers now: read and not yet passed on, in
    /// either direction ([`EmulatorConfig::max_buffered_bytes`]).
    pub buffered_bytes: u64,
    /// The most bytes the client sessions held at once.
    pub peak_buffered_bytes: u64,
    /// Messages refused as too long ([`EmulatorConfig::max_message_bytes`]), each ending its
    /// session.
    pub refused_messages: u64,
    /// Bytes of named prepared statements the client sessions keep now
    /// ([`EmulatorConfig::max_statement_bytes`]).
    pub statement_bytes: u64,
    /// Round trips of all client sessions since start: the times a client waited for the
    /// emulator's answer. A round trip is a batch of client messages the client waits on
    /// (not one made only of Close and Sync messages, which clients send without waiting),
    /// followed by bytes from the emulator before the client's next batch; pipelined
    /// requests the emulator read before it wrote the first answer count once. During login,
    /// each answer (to an SSLRequest, the startup message, a password) counts one. See
    /// [`Emulator::track_round_trips`] for one client's.
    pub round_trips: u64,
}

impl EmulatorCounters {
    /// Sessions pinned for `reason`.
    pub fn pins_for(&self, reason: Reason) -> u64 {
        self.pins
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

pub(crate) struct Shared {
    config: EmulatorConfig,
    pool: UpstreamPool,
    counters: Arc<Counters>,
    silent: AtomicBool,
    epoch: tokio::sync::watch::Sender<u64>,
    /// The `application_name` each pinned session gave at login, by session id.
    pinned: std::sync::Mutex<std::collections::HashMap<u64, String>>,
    /// The round-trip counters of tracked application names.
    tracked: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<AtomicU64>>>,
}

impl Shared {
    /// The counter of a tracked `application_name`.
    pub(crate) fn tracker(&self, app: &str) -> Option<Arc<AtomicU64>> {
        crate::sync::lock(&self.tracked)
            .get(app)
            .and_then(std::sync::Weak::upgrade)
    }
}

/// The round trips of the client sessions that log in with one `application_name`
/// ([`Emulator::track_round_trips`]). Counting stops when it is dropped.
#[derive(Debug, Clone)]
pub struct RoundTrips(Arc<AtomicU64>);

impl RoundTrips {
    /// The round trips counted so far.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A running emulator. Dropping it stops it: every client and database connection closes.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Emulator {
    /// Starts listening. Opens one database connection first, to check the upstream and learn
    /// the parameters the server reports to clients.
    ///
    /// # Errors
    /// An upstream URL that does not parse, an address that cannot be bound, or a database
    /// that cannot be reached.
    pub async fn start(config: EmulatorConfig) -> io::Result<Emulator> {
        let pg: tokio_postgres::Config = config.upstream.parse().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("upstream URL: {e}"))
        })?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "upstream URL: a TCP host is needed",
                ));
            }
        };
        let upstream = UpstreamConfig {
            host,
            port: pg.get_ports().first().copied().unwrap_or(5432),
            user: pg.get_user().unwrap_or("postgres").to_string(),
            database: pg
                .get_dbname()
                .or(pg.get_user())
                .unwrap_or("postgres")
                .to_string(),
            password: pg.get_password().map(<[u8]>::to_vec),
            application_name: config.application_name.clone(),
            latency: config.upstream_latency,
        };
        let counters = Arc::new(Counters::default());
        let pool = UpstreamPool::new(upstream, config.max_connections, counters.clone());
        match pool.borrow(Duration::from_secs(10)).await {
            Ok(u) => pool.give_back(u),
            Err(upstream::BorrowError::Connect(e)) => return Err(e),
            Err(upstream::BorrowError::Timeout) => {
                return Err(io::Error::other("upstream connect timed out"));
            }
        }
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            pool,
            counters,
            silent: AtomicBool::new(false),
            epoch: tokio::sync::watch::channel(0).0,
            pinned: std::sync::Mutex::default(),
            tracked: std::sync::Mutex::default(),
        });
        let accepting = shared.clone();
        let accept = tokio::spawn(async move {
            // Sessions live in this set: aborting the accept task ends them all.
            let mut sessions = tokio::task::JoinSet::new();
            let mut next_id = 1u64;
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let s = session::Session::new(accepting.clone(), stream, next_id);
                        next_id += 1;
                        sessions.spawn(s.run());
                    }
                    Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                        if let Err(e) = ended
                            && e.is_panic()
                        {
                            tracing::error!("emulator: a client session panicked; its counts are off from now on");
                        }
                    }
                }
            }
        });
        Ok(Emulator {
            shared,
            addr,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connection URL for clients: `postgres://user@addr/database`.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@{}/{database}", self.addr)
    }

    /// The counters now. Idle database connections the database closed are let go first, so
    /// `upstream_open` counts live ones.
    pub fn counters(&self) -> EmulatorCounters {
        self.shared.pool.prune_idle();
        let c = &self.shared.counters;
        EmulatorCounters {
            clients: c.clients.load(Relaxed),
            clients_total: c.clients_total.load(Relaxed),
            upstream_open: c.upstream_open.load(Relaxed),
            upstream_in_use: c.upstream_in_use.load(Relaxed),
            pinned_now: c.pinned_now.load(Relaxed),
            peak_pinned: c.peak_pinned.load(Relaxed),
            pins: Reason::all()
                .iter()
                .enumerate()
                .map(|(i, r)| (*r, c.pins[i].load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            borrow_waits: c.borrow_waits.load(Relaxed),
            borrow_timeouts: c.borrow_timeouts.load(Relaxed),
            idle_client_closes: c.idle_client_closes.load(Relaxed),
            nat_drops: c.nat_drops.load(Relaxed),
            buffered_bytes: c.buffered.load(Relaxed),
            peak_buffered_bytes: c.peak_buffered.load(Relaxed),
            refused_messages: c.refused_messages.load(Relaxed),
            statement_bytes: c.statement_bytes.load(Relaxed),
            round_trips: c.round_trips.load(Relaxed),
        }
    }

    /// Counts the round trips (as [`EmulatorCounters::round_trips`] defines them) of every
    /// client session that logs in with this `application_name` from now on, for as long as
    /// the returned counter (or a clone) lives. A name tracked twice shares one counter.
    /// Sessions open before the call are not counted.
    pub fn track_round_trips(&self, application_name: &str) -> RoundTrips {
        let mut tracked = crate::sync::lock(&self.shared.tracked);
        if let Some(c) = tracked
            .get(application_name)
            .and_then(std::sync::Weak::upgrade)
        {
            return RoundTrips(c);
        }
        // Names nobody tracks any more are let go, so the map stays as large as what is
        // tracked.
        tracked.retain(|_, c| c.strong_count() > 0);
        let c = Arc::new(AtomicU64::new(0));
        tracked.insert(application_name.to_string(), Arc::downgrade(&c));
        RoundTrips(c)
    }

    /// The `application_name` each client session pinned now gave at login (empty when it
    /// gave none), in no particular order: who holds the pins.
    pub fn pinned_sessions(&self) -> Vec<String> {
        let pinned = crate::sync::lock(&self.shared.pinned);
        pinned.values().cloned().collect()
    }

    /// The fault of a half-open connection: while on, client connections stay open but
    /// nothing is answered.
    pub fn set_silent(&self, silent: bool) {
        self.shared.silent.store(silent, Relaxed);
    }

    /// The fault of a database failover: closes every database connection at once; clients
    /// inside a transaction or pinned get a FATAL error and are disconnected.
    pub fn drop_upstream_connections(&self) {
        self.shared.pool.drop_all();
        self.shared.epoch.send_modify(|e| *e += 1);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
