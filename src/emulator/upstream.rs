//! The emulator's database connections: opening and authenticating them, and lending them to
//! client sessions one transaction at a time through a FIFO queue with a borrow timeout.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::Counters;
use super::net::{Opened, Socket};

/// Where and how the emulator logs in upstream.
#[derive(Clone)]
pub(crate) struct UpstreamConfig {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) database: String,
    pub(crate) password: Option<Vec<u8>>,
    pub(crate) application_name: String,
    /// The one-way latency between the emulator and the database.
    pub(crate) latency: Duration,
}

/// One database connection.
pub(crate) struct Upstream {
    pub(crate) id: u64,
    pub(crate) stream: Socket,
    pub(crate) rbuf: BytesMut,
    pub(crate) pid: i32,
    pub(crate) key: i32,
    /// The emulator's statement names prepared here.
    pub(crate) prepared: HashSet<String>,
    /// Which client's unnamed statement (client id, its Parse sequence) is current here.
    pub(crate) unnamed: Option<(u64, u64)>,
    pub(crate) epoch: u64,
    /// Weak: the pool holds its idle connections, so a strong reference back would keep
    /// both alive (and the database connections open) after the emulator stopped.
    pool: Weak<PoolShared>,
}

impl Upstream {
    /// True when the database has closed this idle connection (a failover, a terminated
    /// backend, a server-side timeout) or sent something nobody asked for, as it does with a
    /// FATAL before it closes: a peek that does not wait sees the end of the stream or bytes.
    fn died_while_idle(&mut self) -> bool {
        !self.rbuf.is_empty() || self.stream.closed_or_spoke(&mut self.rbuf)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Every way an upstream connection ends passes here: the count can never leak. Once
        // the pool itself is gone, there is nothing left to count.
        if let Some(pool) = self.pool.upgrade() {
            pool.open.fetch_sub(1, Relaxed);
            pool.counters.upstream_open.fetch_sub(1, Relaxed);
            pool.registry.lock().unwrap().forget(&self.prepared);
        }
    }
}

/// Which upstream connections hold each emulator statement name, and which names no client
/// uses any more (closed lazily, the next time a holder is borrowed).
#[derive(Default)]
pub(crate) struct Registry {
    holders: HashMap<String, u32>,
    dead: HashSet<String>,
}

impl Registry {
    pub(crate) fn prepared(&mut self, name: &str) {
        *self.holders.entry(name.to_string()).or_default() += 1;
    }

    pub(crate) fn closed(&mut self, name: &str) {
        if let Some(n) = self.holders.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                self.holders.remove(name);
                self.dead.remove(name);
            }
        }
    }

    fn forget(&mut self, names: &HashSet<String>) {
        for name in names {
            self.closed(name);
        }
    }

    /// The client no longer uses `name`: close it wherever it is prepared.
    pub(crate) fn retire(&mut self, name: String) {
        if self.holders.contains_key(&name) {
            self.dead.insert(name);
        }
    }

    pub(crate) fn is_dead(&self, name: &str) -> bool {
        self.dead.contains(name)
    }
}

/// Room for one connection in `PoolShared::open` (and one in the `upstream_open` counter),
/// claimed for a connection being opened.
///
/// Invariant: `open` equals the number of live `Upstream`s plus the number of live `Claim`s, so
/// it never counts a connection that no longer exists or will never exist. A claim is either
/// turned into an `Upstream` (whose `Drop` gives the room back when it closes) or, dropped
/// anywhere else (the connect failed, or the borrow future was dropped at its `.await` because
/// the client left), gives the room back itself.
struct Claim(Option<Arc<PoolShared>>);

impl Claim {
    /// The room now belongs to the `Upstream` built with the returned pool.
    fn into_pool(mut self) -> Arc<PoolShared> {
        self.0.take().expect("a claim is used once")
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            pool.open.fetch_sub(1, Relaxed);
            pool.counters.upstream_open.fetch_sub(1, Relaxed);
        }
    }
}

/// Why a borrow failed.
pub(crate) enum BorrowError {
    Timeout,
    Connect(io::Error),
}

pub(crate) struct PoolShared {
    pub(crate) config: UpstreamConfig,
    pub(crate) max: usize,
    open: AtomicUsize,
    next_id: AtomicU64,
    pub(crate) epoch: AtomicU64,
    state: Mutex<PoolState>,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) counters: Arc<Counters>,
    /// ParameterStatus values of the first upstream connection, replayed to clients.
    pub(crate) parameters: Mutex<Vec<(String, String)>>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Upstream>,
    waiters: VecDeque<oneshot::Sender<Upstream>>,
}

/// The emulator's pool of database connections.
#[derive(Clone)]
pub(crate) struct UpstreamPool(pub(crate) Arc<PoolShared>);

impl UpstreamPool {
    /// The registry of statement names prepared on database connections, locked.
    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.0.registry.lock().unwrap()
    }

    pub(crate) fn new(config: UpstreamConfig, max: usize, counters: Arc<Counters>) -> Self {
        UpstreamPool(Arc::new(PoolShared {
            config,
            max,
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            state: Mutex::new(PoolState::default()),
            registry: Mutex::new(Registry::default()),
            counters,
            parameters: Mutex::new(Vec::new()),
        }))
    }

    /// Claims room for one more connection, if there is room.
    fn claim(&self) -> Option<Claim> {
        self.0
            .open
            .fetch_update(Relaxed, Relaxed, |n| (n < self.0.max).then_some(n + 1))
            .ok()?;
        self.0.counters.upstream_open.fetch_add(1, Relaxed);
        Some(Claim(Some(self.0.clone())))
    }

    /// Lends a connection: an idle one, a new one while under `max`, or the first one
    /// returned, waiting in FIFO order for at most `timeout`.
    pub(crate) async fn borrow(&self, timeout: Duration) -> Result<Upstream, BorrowError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let claimed = {
            let mut st = self.0.state.lock().unwrap();
            let epoch = self.0.epoch.load(Relaxed);
            // A connection the database closed while it was idle is let go, not lent.
            while let Some(mut u) = st.idle.pop() {
                if u.epoch == epoch && !u.died_while_idle() {
                    return Ok(self.lent(u));
                }
            }
            self.claim().ok_or_else(|| {
                let (tx, rx) = oneshot::channel();
                st.waiters.push_back(tx);
                rx
            })
        };
        let mut rx = match claimed {
            Ok(claim) => return self.open_new(claim).await,
            Err(rx) => Some(rx),
        };
        self.0.counters.borrow_waits.fetch_add(1, Relaxed);
        // Wait for a returned connection; every 50 ms look whether a closed one left room.
        loop {
            let wait = tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)),
            );
            tokio::select! {
                got = rx.as_mut().expect("waiting") => {
                    if let Ok(u) = got {
                        return Ok(self.lent(u));
                    }
                    // The pool dropped our place (it cannot): treat as a timeout.
                    return Err(BorrowError::Timeout);
                }
                () = wait => {
                    if tokio::time::Instant::now() >= deadline {
                        // A connection may have been sent just now: give it back.
                        let mut rx = rx.take().expect("waiting");
                        rx.close();
                        if let Ok(u) = rx.try_recv() {
                            let u = self.lent(u);
                            self.give_back(u);
                        }
                        self.0.counters.borrow_timeouts.fetch_add(1, Relaxed);
                        return Err(BorrowError::Timeout);
                    }
                    if let Some(claim) = self.claim() {
                        drop(rx.take());
                        return self.open_new(claim).await;
                    }
                }
            }
        }
    }

    fn lent(&self, u: Upstream) -> Upstream {
        self.0.counters.upstream_in_use.fetch_add(1, Relaxed);
        u
    }

    /// Opens a connection in the room `claim` holds. Dropped at its `.await` (the client left
    /// while it waited), the claim gives the room back.
    async fn open_new(&self, claim: Claim) -> Result<Upstream, BorrowError> {
        let id = self.0.next_id.fetch_add(1, Relaxed);
        let (stream, rbuf, pid, key, params) = connect(&self.0.config)
            .await
            .map_err(BorrowError::Connect)?;
        let mut p = self.0.parameters.lock().unwrap();
        if p.is_empty() {
            *p = params;
        }
        drop(p);
        Ok(self.lent(Upstream {
            id,
            stream,
            rbuf,
            pid,
            key,
            prepared: HashSet::new(),
            unnamed: None,
            epoch: self.0.epoch.load(Relaxed),
            pool: Arc::downgrade(&claim.into_pool()),
        }))
    }

    /// Returns a connection in a clean state (idle, not pinned) to the next waiter or the idle
    /// set.
    pub(crate) fn give_back(&self, mut u: Upstream) {
        self.0.counters.upstream_in_use.fetch_sub(1, Relaxed);
        if u.epoch != self.0.epoch.load(Relaxed) {
            return; // dropped: the fault closed every connection of its epoch
        }
        let mut st = self.0.state.lock().unwrap();
        while let Some(tx) = st.waiters.pop_front() {
            // The waiter counts it in use when it receives it.
            match tx.send(u) {
                Ok(()) => return,
                Err(back) => u = back,
            }
        }
        st.idle.push(u);
    }

    /// A lent connection that cannot be reused: close it.
    pub(crate) fn discard(&self, u: Upstream) {
        self.0.counters.upstream_in_use.fetch_sub(1, Relaxed);
        drop(u);
    }

    /// Lets go of the idle connections the database closed, so they are not counted as open.
    pub(crate) fn prune_idle(&self) {
        let dead: Vec<Upstream> = {
            let mut st = self.0.state.lock().unwrap();
            let mut dead = Vec::new();
            for mut u in std::mem::take(&mut st.idle) {
                if u.died_while_idle() {
                    dead.push(u);
                } else {
                    st.idle.push(u);
                }
            }
            dead
        };
        // Dropped outside the state's lock: each one's drop takes the registry's.
        drop(dead);
    }

    /// The fault: close every database connection at once.
    pub(crate) fn drop_all(&self) {
        self.0.epoch.fetch_add(1, Relaxed);
        let idle = std::mem::take(&mut self.0.state.lock().unwrap().idle);
        drop(idle);
    }
}

type Connected = (Socket, BytesMut, i32, i32, Vec<(String, String)>);

/// Opens and authenticates one database connection (trust, cleartext, md5, SCRAM-SHA-256).
async fn connect(c: &UpstreamConfig) -> io::Result<Connected> {
    let tcp = TcpStream::connect((c.host.as_str(), c.port)).await?;
    tcp.set_nodelay(true)?;
    let mut stream = Socket::new(tcp, c.latency, Opened::ByEmulator);
    let mut out = BytesMut::new();
    frontend::startup_message(
        [
            ("user", c.user.as_str()),
            ("database", c.database.as_str()),
            ("application_name", c.application_name.as_str()),
        ],
        &mut out,
    )?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    let mut params = Vec::new();
    let (mut pid, mut key) = (0, 0);
    loop {
        let msg = loop {
            if let Some(m) = backend::Message::parse(&mut buf)? {
                break m;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed during login",
                ));
            }
        };
        out.clear();
        match msg {
            backend::Message::ReadyForQuery(_) => return Ok((stream, buf, pid, key, params)),
            backend::Message::ParameterStatus(body) => {
                params.push((body.name()?.to_string(), body.value()?.to_string()));
            }
            backend::Message::BackendKeyData(body) => {
                pid = body.process_id();
                key = body.secret_key();
            }
            backend::Message::NoticeResponse(_) => {}
            backend::Message::ErrorResponse(body) => return Err(login_refused(&body)),
            msg => {
                authenticate(c, msg, &mut scram, &mut out)?;
                stream.write_all(&out).await?;
            }
        }
    }
}

/// Answers one authentication request into `out` (nothing to send after `AuthenticationOk`
/// or the SASL final message).
fn authenticate(
    c: &UpstreamConfig,
    msg: backend::Message,
    scram: &mut Option<ScramSha256>,
    out: &mut BytesMut,
) -> io::Result<()> {
    let password = || {
        c.password.clone().ok_or_else(|| {
            io::Error::other("the upstream asks for a password and none is configured")
        })
    };
    match msg {
        backend::Message::AuthenticationOk => {}
        backend::Message::AuthenticationCleartextPassword => {
            frontend::password_message(&password()?, out)?;
        }
        backend::Message::AuthenticationMd5Password(body) => {
            let hash = md5_hash(c.user.as_bytes(), &password()?, body.salt());
            frontend::password_message(hash.as_bytes(), out)?;
        }
        backend::Message::AuthenticationSasl(body) => {
            let mut mechanisms = body.mechanisms();
            let mut ok = false;
            while let Some(m) = mechanisms.next()? {
                ok |= m == SCRAM_SHA_256;
            }
            if !ok {
                return Err(io::Error::other(
                    "the upstream offers no SASL mechanism the emulator knows",
                ));
            }
            let s = ScramSha256::new(&password()?, ChannelBinding::unsupported());
            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), out)?;
            *scram = Some(s);
        }
        backend::Message::AuthenticationSaslContinue(body) => {
            let s = scram
                .as_mut()
                .ok_or_else(|| io::Error::other("unexpected SASL message"))?;
            s.update(body.data())?;
            frontend::sasl_response(s.message(), out)?;
        }
        backend::Message::AuthenticationSaslFinal(body) => {
            let s = scram
                .as_mut()
                .ok_or_else(|| io::Error::other("unexpected SASL message"))?;
            s.finish(body.data())?;
        }
        _ => return Err(io::Error::other("unexpected message during upstream login")),
    }
    Ok(())
}

/// The server's refusal of the login, with its message.
fn login_refused(body: &backend::ErrorResponseBody) -> io::Error {
    let mut fields = body.fields();
    let mut text = String::from("upstream refused the login");
    while let Ok(Some(f)) = fields.next() {
        if f.type_() == b'M' {
            text = format!(
                "upstream refused the login: {}",
                String::from_utf8_lossy(f.value_bytes())
            );
        }
    }
    io::Error::new(io::ErrorKind::PermissionDenied, text)
}

/// Asks the upstream to cancel the query running on `u` (a CancelRequest on a new socket).
pub(crate) async fn cancel(config: &UpstreamConfig, pid: i32, key: i32) -> io::Result<()> {
    let mut s = TcpStream::connect((config.host.as_str(), config.port)).await?;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, key, &mut out);
    s.write_all(&out).await?;
    let mut sink = [0u8; 16];
    let _ = s.read(&mut sink).await;
    Ok(())
}
