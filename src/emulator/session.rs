//! One client connection to the emulator: login against the emulator itself, then each
//! transaction on a borrowed database connection, with statement names mapped so they work
//! on whichever connection the next transaction lands on, and pinning as RDS Proxy pins.
//!
//! The loop of a session: take what the client sent off `cbuf` (the rest of a long message
//! passes on as it comes; each message, or the head of a long one, is handled), give the
//! database connection back if the transaction ended, then `wait`: write and read both
//! sockets at once, each read within the room the session's and the process's bounds leave
//! (see the module docs of `emulator`, "Memory").

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Shared;
use super::budget::{CHUNK, Charge, RETRY, poll_read_charged, poll_read_into};
use super::net::{Opened, Socket};
use super::stream::ClientStream;
use super::upstream::{BorrowError, Upstream, cancel};
use super::wire::{self, Frame, cstr, take_frame};
use crate::pinning::{Classification, PinRules, Protocol, Reason, Reasons, classify};

/// A statement the client prepared under its own name, known to the emulator by another.
struct Stmt {
    global: String,
    /// The Parse body after the name: query text and parameter types (only its head when
    /// `partial`).
    rest: Bytes,
    class: Classification,
    /// The Parse was too long to keep whole: the statement is never prepared again elsewhere
    /// (its session was pinned when it was parsed).
    partial: bool,
}

/// The rest of a long message, passed on (or dropped) as it arrives.
#[derive(Default, Clone, Copy)]
struct Pass {
    /// Bytes of the message still to come.
    left: usize,
    /// Passed on (to the database connection, or to the client), not dropped.
    forward: bool,
}

/// The messages between two Syncs, and what of their answers the client must not see.
#[derive(Default)]
struct Cycle {
    swallow_parse: u32,
    swallow_close: u32,
    /// The whole cycle was injected by the emulator: the client sees none of it.
    injected: bool,
    errored: bool,
    /// Statement names prepared on the upstream in this cycle (undone if it errored).
    prepared: Vec<String>,
    /// Ended by a simple Query (or FunctionCall), not by a Sync.
    simple: bool,
}

impl Cycle {
    fn absorb(&mut self, other: Cycle) {
        self.swallow_parse += other.swallow_parse;
        self.swallow_close += other.swallow_close;
        self.errored |= other.errored;
        self.prepared.extend(other.prepared);
    }
}

/// A borrowed database connection and the state of the conversation on it.
struct Held {
    up: Upstream,
    out: BytesMut,
    /// Cycles sent (ended by Sync or Query) whose ReadyForQuery has not come back.
    cycles: VecDeque<Cycle>,
    /// Messages sent since the last Sync.
    open: Cycle,
    open_dirty: bool,
    status: u8,
    copy_in: bool,
    /// A COPY FROM STDIN began in an extended-protocol cycle: the server ignored the Sync
    /// sent after its Execute, so the next Sync ends that same cycle.
    absorb_next_sync: bool,
    /// The rest of a long message from the database, on its way to the client.
    pass: Pass,
}

impl Held {
    fn new(up: Upstream) -> Held {
        Held {
            up,
            out: BytesMut::new(),
            cycles: VecDeque::new(),
            open: Cycle::default(),
            open_dirty: false,
            status: b'I',
            copy_in: false,
            absorb_next_sync: false,
            pass: Pass::default(),
        }
    }

    fn end_cycle(&mut self) {
        let c = std::mem::take(&mut self.open);
        self.cycles.push_back(c);
        self.open_dirty = false;
    }

    /// A Sync from the client: the end of a cycle, unless the server ignored the previous
    /// Sync because a COPY FROM STDIN started (then this one ends that cycle).
    fn sync(&mut self) {
        if self.absorb_next_sync {
            self.absorb_next_sync = false;
            let open = std::mem::take(&mut self.open);
            self.open_dirty = false;
            match self.cycles.back_mut() {
                Some(last) => last.absorb(open),
                None => self.cycles.push_back(open),
            }
        } else {
            self.end_cycle();
        }
    }

    /// The server began COPY FROM STDIN for the answering cycle.
    fn copy_in_started(&mut self) {
        self.copy_in = true;
        let simple = self.cycles.front().is_some_and(|c| c.simple);
        if simple || self.cycles.is_empty() {
            return;
        }
        // Extended protocol: the Sync after the Execute was ignored by the server.
        if self.cycles.len() >= 2 {
            let next = self.cycles.remove(1).expect("two cycles");
            self.cycles.front_mut().expect("a cycle").absorb(next);
        } else {
            self.absorb_next_sync = true;
        }
    }

    /// The cycle the next answer belongs to.
    fn answering(&mut self) -> &mut Cycle {
        match self.cycles.front_mut() {
            Some(c) => c,
            None => &mut self.open,
        }
    }

    fn quiet(&self) -> bool {
        self.cycles.is_empty() && !self.open_dirty && !self.copy_in
    }
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    id: u64,
    client: ClientStream,
    cbuf: BytesMut,
    to_client: BytesMut,
    held: Option<Held>,
    pinned: Reasons,
    stmts: HashMap<String, Stmt>,
    unnamed: Option<Stmt>,
    unnamed_seq: u64,
    next_stmt: u64,
    discard_until_sync: bool,
    epoch: tokio::sync::watch::Receiver<u64>,
    /// The `application_name` the client gave at login.
    app: String,
    /// The rest of a long message from the client, on its way to the database connection.
    pass: Pass,
    /// What the buffers hold, counted against the process-wide bound.
    charge: Charge,
    /// Bytes of statement names and texts kept in `stmts` (`stmt_size` each).
    kept: usize,
    /// When something last happened (the idle timeouts count from it; waiting for room under
    /// the process-wide bound is not activity).
    active: tokio::time::Instant,
    /// What the client sent since the emulator last wrote to it.
    turn: Turn,
    /// This session's round trips ([`Turn`]).
    round_trips: u64,
    /// The counter of the session's `application_name`, when someone tracks it.
    tracker: Option<Arc<AtomicU64>>,
}

/// The client's messages since the emulator last wrote to it, for counting round trips.
///
/// A round trip is a batch of client messages the client waits on, followed by bytes from
/// the emulator before the client's next batch: the emulator's first write to the client
/// after such a batch counts one. Pipelined requests read before the first answer is written
/// are one batch, one round trip. A batch the client does not wait on does not count: one
/// made only of Close and Sync messages (tokio-postgres closes a dropped statement that way,
/// without waiting for the answer). A lone Sync (a connection check) counts. During login,
/// each answer to the client (to an SSLRequest, the startup message, a password) counts one;
/// the TLS handshake's own round trips do not.
#[derive(Default, Clone, Copy)]
struct Turn {
    /// A message other than Close or Sync.
    asked: bool,
    closed: bool,
    synced: bool,
}

impl Turn {
    fn saw(&mut self, tag: u8) {
        match tag {
            b'C' => self.closed = true,
            b'S' => self.synced = true,
            b'X' => {}
            _ => self.asked = true,
        }
    }

    fn awaited(self) -> bool {
        self.asked || (self.synced && !self.closed)
    }
}

enum Flow {
    Continue,
    Close,
}

/// What ended a wait.
enum Event {
    /// Bytes were written: look again.
    Moved,
    /// The process-wide bound left no room to read; it may have some now. Not activity.
    Retry,
    /// Bytes from the client (zero: it left).
    Client(usize),
    /// Bytes from the database connection (zero: it closed).
    Upstream(usize),
    /// The failover fault's epoch changed.
    Epoch,
    /// Quiet past the idle client timeout (or the NAT's).
    Idle,
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, client: TcpStream, id: u64) -> Session {
        let epoch = shared.epoch.subscribe();
        let _ = client.set_nodelay(true);
        let client = Socket::new(client, shared.config.client_latency, Opened::ByPeer);
        Session {
            id,
            client: ClientStream::Plain(client),
            cbuf: BytesMut::with_capacity(8192),
            to_client: BytesMut::with_capacity(8192),
            held: None,
            pinned: Reasons::EMPTY,
            stmts: HashMap::new(),
            unnamed: None,
            unnamed_seq: 0,
            next_stmt: 0,
            discard_until_sync: false,
            epoch,
            app: String::new(),
            pass: Pass::default(),
            charge: Charge::new(shared.counters.clone()),
            kept: 0,
            active: tokio::time::Instant::now(),
            turn: Turn::default(),
            round_trips: 0,
            tracker: None,
            shared,
        }
    }

    /// Serves the client until it leaves, then resets and returns what it held.
    pub(crate) async fn run(mut self) {
        let c = &self.shared.counters;
        c.clients.fetch_add(1, Relaxed);
        c.clients_total.fetch_add(1, Relaxed);
        match self.login().await {
            Ok(true) => {
                if let Err(e) = self.serve().await {
                    tracing::debug!(client = self.id, error = %e, "emulator: client session ended with an error");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(client = self.id, error = %e, "emulator: login failed"),
        }
        self.leave().await;
        self.shared.counters.clients.fetch_sub(1, Relaxed);
    }

    async fn write_client(&mut self) -> io::Result<()> {
        if !self.to_client.is_empty() {
            let out = self.to_client.split();
            self.answered();
            self.client.write_all(&out).await?;
        }
        Ok(())
    }

    /// The emulator writes to the client: a round trip if the client waits on what it sent
    /// since the last write ([`Turn`]).
    fn answered(&mut self) {
        if self.turn.awaited() {
            self.round_trips += 1;
            self.shared.counters.round_trips.fetch_add(1, Relaxed);
            if let Some(t) = &self.tracker {
                t.fetch_add(1, Relaxed);
            }
        }
        self.turn = Turn::default();
    }

    async fn fatal(&mut self, code: &str, text: &str) -> io::Result<bool> {
        wire::error(&mut self.to_client, "FATAL", code, text);
        self.write_client().await?;
        Ok(false)
    }

    /// The startup handshake, answered by the emulator: a login succeeds even when no
    /// database connection is free, as with RDS Proxy.
    async fn login(&mut self) -> io::Result<bool> {
        self.wait_while_silent().await;
        let params = loop {
            let Some(mut body) = wire::read_startup(&mut self.client, &mut self.cbuf).await? else {
                return Ok(false);
            };
            self.turn.asked = true;
            match body.get_i32() {
                80_877_103 if self.tls_offered() => self.start_tls().await?,
                80_877_103 | 80_877_104 => {
                    // SSLRequest without TLS configured, or GSSENCRequest: plain TCP.
                    self.answered();
                    self.client.write_all(b"N").await?;
                }
                80_877_102 => return Ok(false), // CancelRequest: RDS Proxy does not support it
                196_608 => {
                    let mut params = HashMap::new();
                    while body.first().is_some_and(|&b| b != 0) {
                        let k = cstr(&mut body)?;
                        let v = cstr(&mut body)?;
                        params.insert(k, v);
                    }
                    break params;
                }
                _ => return self.fatal("08P01", "unsupported frontend protocol").await,
            }
        };
        if self.tls_required() && matches!(self.client, ClientStream::Plain(_)) {
            return self
                .fatal("28000", "This RDS Proxy requires TLS connections")
                .await;
        }
        if params.contains_key("options") {
            return self
                .fatal("0A000", "The proxy doesn't support the option options. Remove it from the connection string.")
                .await;
        }
        let user = params.get("user").cloned().unwrap_or_default();
        if let Some(password) = self.shared.config.password.clone() {
            let salt = (self.id as u32 ^ std::process::id())
                .wrapping_mul(2_654_435_761)
                .to_be_bytes();
            wire::auth_md5(&mut self.to_client, salt);
            self.write_client().await?;
            let frame = match wire::read_frame(&mut self.client, &mut self.cbuf, wire::AUTH_MESSAGE)
                .await
            {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.shared.counters.refused_messages.fetch_add(1, Relaxed);
                    return self.fatal("08P01", &e.to_string()).await;
                }
                Err(e) => return Err(e),
            };
            self.turn.asked = true;
            let mut body = frame.body.clone();
            let answer = if frame.tag == b'p' {
                cstr(&mut body).unwrap_or_default()
            } else {
                String::new()
            };
            if answer != md5_hash(user.as_bytes(), password.as_bytes(), salt) {
                tracing::info!(
                    client = self.id,
                    user,
                    "emulator: password authentication failed"
                );
                return self
                    .fatal(
                        "28P01",
                        &format!("password authentication failed for user \"{user}\""),
                    )
                    .await;
            }
        }
        wire::auth_ok(&mut self.to_client);
        let parameters = self.shared.pool.0.parameters.lock().unwrap().clone();
        for (k, v) in &parameters {
            if k != "application_name" {
                wire::parameter_status(&mut self.to_client, k, v);
            }
        }
        self.app = params.get("application_name").cloned().unwrap_or_default();
        self.tracker = self.shared.tracker(&self.app);
        if let Some(t) = &self.tracker {
            t.fetch_add(self.round_trips, Relaxed);
        }
        wire::parameter_status(&mut self.to_client, "application_name", &self.app);
        wire::backend_key(&mut self.to_client, self.id as i32, 0x5eed);
        wire::ready(&mut self.to_client, b'I');
        self.write_client().await?;
        Ok(true)
    }

    #[cfg(feature = "tls")]
    fn tls_offered(&self) -> bool {
        self.shared.config.tls.is_some()
    }

    #[cfg(not(feature = "tls"))]
    fn tls_offered(&self) -> bool {
        false
    }

    #[cfg(feature = "tls")]
    fn tls_required(&self) -> bool {
        self.shared.config.tls.as_ref().is_some_and(|t| t.required)
    }

    #[cfg(not(feature = "tls"))]
    fn tls_required(&self) -> bool {
        false
    }

    /// Answers an SSLRequest with `S` and runs the TLS handshake.
    #[cfg(feature = "tls")]
    async fn start_tls(&mut self) -> io::Result<()> {
        let tls = self.shared.config.tls.clone().expect("offered");
        if !self.cbuf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "data after SSLRequest",
            ));
        }
        self.answered();
        self.client.write_all(b"S").await?;
        let ClientStream::Plain(tcp) = std::mem::replace(&mut self.client, ClientStream::Upgrading)
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a second SSLRequest",
            ));
        };
        let stream = tls.acceptor.accept(tcp).await?;
        self.client = ClientStream::Tls(Box::new(stream));
        Ok(())
    }

    #[cfg(not(feature = "tls"))]
    async fn start_tls(&mut self) -> io::Result<()> {
        unreachable!("TLS is never offered without the tls feature")
    }

    async fn wait_while_silent(&self) {
        while self.shared.silent.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn serve(&mut self) -> io::Result<()> {
        self.active = tokio::time::Instant::now();
        loop {
            self.wait_while_silent().await;
            if let Flow::Close = self.take_client_bytes().await? {
                return Ok(());
            }
            self.maybe_release();
            self.recharge();
            if let Flow::Close = self.wait().await? {
                return Ok(());
            }
        }
    }

    /// The bytes the session holds: (from the client on its way to the database, from the
    /// database or the emulator on its way to the client).
    fn held_bytes(&self) -> (usize, usize) {
        let (out, rbuf) = self
            .held
            .as_ref()
            .map_or((0, 0), |h| (h.out.len(), h.up.rbuf.len()));
        (self.cbuf.len() + out, rbuf + self.to_client.len())
    }

    fn recharge(&mut self) {
        let (up, down) = self.held_bytes();
        self.charge.set(up + down);
    }

    /// Takes what the client sent off `cbuf`: the rest of a long message passes on as it
    /// comes, each message (or the head of a long one) is handled.
    async fn take_client_bytes(&mut self) -> io::Result<Flow> {
        loop {
            if self.pass.left > 0 {
                if self.cbuf.is_empty() {
                    return Ok(Flow::Continue);
                }
                let n = self.pass.left.min(self.cbuf.len());
                let bytes = self.cbuf.split_to(n);
                self.pass.left -= n;
                if let Some(h) = self.held.as_mut()
                    && self.pass.forward
                {
                    h.out.extend_from_slice(&bytes);
                }
                continue;
            }
            let large = self.shared.config.max_message_bytes;
            let frame = match take_frame(&mut self.cbuf, |tag| wire::client_limit(tag, large)) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(Flow::Continue),
                Err(e) => return self.refuse(&e).await,
            };
            self.turn.saw(frame.tag);
            if frame.tag == b'P' && frame.more == 0 && self.parse_locally(&frame)? {
                continue;
            }
            if frame.tag == b'S' && self.held.is_none() && !self.discard_until_sync {
                // A lone Sync (a client's connection check) needs no database connection.
                wire::ready(&mut self.to_client, b'I');
                continue;
            }
            if let Flow::Close = self.on_client(frame).await? {
                return Ok(Flow::Close);
            }
        }
    }

    /// A message longer than PostgreSQL accepts: a FATAL error, as PostgreSQL answers, and
    /// the end of the session.
    async fn refuse(&mut self, e: &io::Error) -> io::Result<Flow> {
        self.shared.counters.refused_messages.fetch_add(1, Relaxed);
        tracing::info!(client = self.id, error = %e, "emulator: a client message was refused; the session ends");
        self.fatal("08P01", &e.to_string()).await?;
        Ok(Flow::Close)
    }

    /// Moves bytes and waits for the next thing to happen: bytes written (to the client or
    /// the database connection), bytes read, the end of the session (the client left, the
    /// database connection was lost, the client was idle past the idle client timeout, or a
    /// NAT forgot its flow).
    ///
    /// Both sockets are read and written at once, so a database that stops reading a
    /// pipeline while its answers are not read can never deadlock with the emulator. Each
    /// read takes only the room left in the session's
    /// [`session_buffer_bytes`](super::EmulatorConfig::session_buffer_bytes): from the
    /// client while what the session holds in both directions is under it (a client that does
    /// not read its replies is not read either, as PostgreSQL does), from the database while
    /// what waits for the client is under it. A session without a database connection reads
    /// from its client only under the process-wide
    /// [`max_buffered_bytes`](super::EmulatorConfig::max_buffered_bytes) too.
    async fn wait(&mut self) -> io::Result<Flow> {
        let config = &self.shared.config;
        let idle_client = config.idle_client_timeout;
        // A NAT that forgets idle flows acts before the proxy's own idle timeout.
        let nat = config.nat_idle_timeout.filter(|nat| *nat < idle_client);
        let idle = nat.unwrap_or(idle_client);
        let limit = config.session_buffer_bytes;
        let cap = self
            .held
            .is_none()
            .then_some(config.max_buffered_bytes as u64);
        let (up, down) = self.held_bytes();
        let client_room = limit.saturating_sub(up + down);
        let upstream_room = limit.saturating_sub(down);
        let self_active = self.active;
        let Session {
            client,
            cbuf,
            to_client,
            held,
            epoch,
            charge,
            ..
        } = self;
        let quiet =
            to_client.is_empty() && held.as_ref().is_none_or(|h| h.quiet() && h.out.is_empty());
        let mut wrote_client = false;
        let event = {
            let mut idle_past = pin!(tokio::time::sleep_until(self_active + idle));
            let mut retry = pin!(tokio::time::sleep(RETRY));
            let mut changed = pin!(epoch.changed());
            poll_fn(|cx| {
                // Writes first: they make room.
                if !to_client.is_empty()
                    && let Poll::Ready(n) = Pin::new(&mut *client).poll_write(cx, to_client)
                {
                    to_client.advance(written(n)?);
                    wrote_client = true;
                    return Poll::Ready(Ok(Event::Moved));
                }
                if let Some(h) = held.as_mut() {
                    if !h.out.is_empty()
                        && let Poll::Ready(n) = Pin::new(&mut h.up.stream).poll_write(cx, &h.out)
                    {
                        h.out.advance(written(n)?);
                        return Poll::Ready(Ok(Event::Moved));
                    }
                    if upstream_room > 0
                        && let Poll::Ready(n) =
                            poll_read_into(cx, &mut h.up.stream, &mut h.up.rbuf, upstream_room)
                    {
                        return Poll::Ready(n.map(Event::Upstream));
                    }
                    if changed.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Ok(Event::Epoch));
                    }
                }
                if client_room > 0
                    && let Poll::Ready(n) = poll_read_charged(
                        cx,
                        client,
                        cbuf,
                        charge,
                        client_room,
                        cap,
                        retry.as_mut(),
                    )
                {
                    return Poll::Ready(n.map(|n| n.map_or(Event::Retry, Event::Client)));
                }
                if quiet && idle_past.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Event::Idle));
                }
                Poll::Pending
            })
            .await?
        };
        if wrote_client {
            self.answered();
        }
        if !matches!(event, Event::Retry) {
            self.active = tokio::time::Instant::now();
        }
        match event {
            Event::Moved | Event::Retry | Event::Client(1..) => Ok(Flow::Continue),
            Event::Client(0) => Ok(Flow::Close),
            Event::Upstream(0) => {
                self.upstream_lost().await?;
                Ok(Flow::Close)
            }
            Event::Upstream(_) => {
                self.on_upstream()?;
                Ok(Flow::Continue)
            }
            Event::Epoch => {
                if self
                    .held
                    .as_ref()
                    .is_some_and(|h| h.up.epoch != *self.epoch.borrow())
                {
                    self.upstream_lost().await?;
                    return Ok(Flow::Close);
                }
                Ok(Flow::Continue)
            }
            Event::Idle => {
                if nat.is_some() {
                    self.nat_forgot(idle).await?;
                } else {
                    self.shared
                        .counters
                        .idle_client_closes
                        .fetch_add(1, Relaxed);
                }
                Ok(Flow::Close)
            }
        }
    }

    /// A NAT between client and proxy forgot this flow after `idle` without a packet. The
    /// client's socket stays open and what it sends is lost; nothing reaches it. The proxy
    /// never hears of it: it keeps the session (and a pinned database connection) until its
    /// own idle client timeout, counted from the last packet, and only then lets go, even if
    /// the client closed its socket meanwhile (its FIN is lost too). The proxy's close is lost
    /// the same way: the client's socket stays open until the client closes it.
    async fn nat_forgot(&mut self, idle: Duration) -> io::Result<()> {
        self.shared.counters.nat_drops.fetch_add(1, Relaxed);
        tracing::debug!(client = self.id, "emulator: a NAT forgot the client's flow");
        let proxy_gives_up = tokio::time::Instant::now()
            + self.shared.config.idle_client_timeout.saturating_sub(idle);
        let mut open = true;
        let mut released = false;
        while open {
            tokio::select! {
                n = self.client.read_buf(&mut self.cbuf) => {
                    // Lost in the NAT, like everything from now on.
                    self.cbuf.clear();
                    open = n.is_ok_and(|n| n > 0);
                }
                () = tokio::time::sleep_until(proxy_gives_up), if !released => {
                    released = true;
                    self.shared.counters.idle_client_closes.fetch_add(1, Relaxed);
                    self.leave().await;
                }
            }
        }
        if !released {
            tokio::time::sleep_until(proxy_gives_up).await;
            self.shared
                .counters
                .idle_client_closes
                .fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// The database connection went away under the client: tell it and close.
    async fn upstream_lost(&mut self) -> io::Result<()> {
        if let Some(h) = self.held.take() {
            self.shared.pool.discard(h.up);
            self.unpin();
        }
        wire::error(
            &mut self.to_client,
            "FATAL",
            "08006",
            "The database connection was closed.",
        );
        self.write_client().await
    }

    fn unpin(&mut self) {
        if !self.pinned.is_empty() {
            self.pinned = Reasons::EMPTY;
            self.shared.counters.pinned_now.fetch_sub(1, Relaxed);
            self.pinned_sessions().remove(&self.id);
        }
    }

    fn pinned_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        crate::sync::lock(&self.shared.pinned)
    }

    /// Gives the database connection back after a transaction, unless the session is pinned.
    fn maybe_release(&mut self) {
        let release = self
            .held
            .as_ref()
            .is_some_and(|h| h.quiet() && h.status == b'I' && h.out.is_empty())
            && self.pinned.is_empty()
            && self.pass.left == 0;
        if release {
            let h = self.held.take().expect("held");
            self.shared.pool.give_back(h.up);
        }
    }

    fn pin(&mut self, reasons: Reasons, sql: &str) {
        let new = Reasons::from_bits(reasons.bits() & !self.pinned.bits());
        if new.is_empty() {
            return;
        }
        let c = &self.shared.counters;
        if self.pinned.is_empty() {
            let now = c.pinned_now.fetch_add(1, Relaxed) + 1;
            c.peak_pinned.fetch_max(now, Relaxed);
            self.pinned_sessions().insert(self.id, self.app.clone());
            let conn = self.held.as_ref().map_or(0, |h| h.up.id);
            let digest: String = sql.chars().take(80).collect();
            tracing::info!(
                client = self.id,
                "The client session was pinned to the database connection [dbConnection={conn}] for the remainder of the session. The proxy can't reuse this connection until the session ends. Reason: {}. Digest: \"{digest}\"",
                describe(new)
            );
        }
        for r in new.iter() {
            c.pin(r);
        }
        self.pinned = self.pinned.union(new);
    }

    /// Makes sure the client's statement exists on the held connection, injecting a Parse
    /// (after a Close, in case an earlier one half-failed) where it does not.
    fn ensure(&mut self, name: &str) {
        let id = self.id;
        let h = self.held.as_mut().expect("held");
        if name.is_empty() {
            let Some(s) = self.unnamed.as_ref() else {
                return;
            };
            if h.up.unnamed != Some((id, self.unnamed_seq)) && !s.partial {
                wire::named(b'P', b"", "", &s.rest).write_to(&mut h.out);
                h.open.swallow_parse += 1;
                h.up.unnamed = Some((id, self.unnamed_seq));
            }
            return;
        }
        let Some(s) = self.stmts.get(name) else {
            return;
        };
        if h.up.prepared.contains(&s.global) || s.partial {
            return;
        }
        wire::named(b'C', b"S", &s.global, b"").write_to(&mut h.out);
        wire::named(b'P', b"", &s.global, &s.rest).write_to(&mut h.out);
        h.open.swallow_close += 1;
        h.open.swallow_parse += 1;
        h.up.prepared.insert(s.global.clone());
        h.open.prepared.push(s.global.clone());
        self.shared.pool.registry().prepared(&s.global);
    }

    /// Records a client's Parse: the unnamed statement, or a named one under a new name of
    /// the emulator's own (returned). A name the client reuses retires its old statement.
    fn remember(
        &mut self,
        name: String,
        rest: Bytes,
        class: Classification,
        partial: bool,
    ) -> Option<String> {
        // A copy of its own: a slice of the read buffer would keep all of that buffer alive.
        let rest = Bytes::copy_from_slice(&rest);
        if name.is_empty() {
            self.unnamed_seq += 1;
            self.unnamed = Some(Stmt {
                global: String::new(),
                rest,
                class,
                partial,
            });
            return None;
        }
        self.keep(stmt_size(&name, &rest));
        self.next_stmt += 1;
        let global = format!("pe{}_{}", self.id, self.next_stmt);
        let stmt = Stmt {
            global: global.clone(),
            rest,
            class,
            partial,
        };
        let old_size = |old: &Stmt| stmt_size(&name, &old.rest);
        let old = self.stmts.get(&name).map(old_size);
        if let Some(old) = self.stmts.insert(name, stmt) {
            self.shared.pool.registry().retire(old.global);
        }
        if let Some(size) = old {
            self.unkeep(size);
        }
        Some(global)
    }

    /// Whether the texts of this session's statements, and of all sessions', leave room for
    /// `size` more bytes ([`EmulatorConfig::max_statement_bytes`](super::EmulatorConfig::max_statement_bytes)).
    fn fits(&self, size: usize) -> bool {
        let config = &self.shared.config;
        self.kept + size <= config.max_statement_bytes
            && self.shared.counters.statement_bytes.load(Relaxed) + size as u64
                <= config.max_buffered_bytes as u64
    }

    fn keep(&mut self, size: usize) {
        self.kept += size;
        self.shared
            .counters
            .statement_bytes
            .fetch_add(size as u64, Relaxed);
    }

    fn unkeep(&mut self, size: usize) {
        self.kept -= size;
        self.shared
            .counters
            .statement_bytes
            .fetch_sub(size as u64, Relaxed);
    }

    /// Answers a batch of only Parse messages and a Sync (libpq's `PQprepare`) without a
    /// database connection: the statements are prepared where they are first used. A client
    /// that prepares while another of the same thread holds a connection in a transaction
    /// (pgbench -M prepared) would otherwise wait for a connection that cannot come.
    fn parse_locally(&mut self, first: &Frame) -> io::Result<bool> {
        if self.held.is_some()
            || self.discard_until_sync
            || self.shared.config.rules.is_legacy_parse()
        {
            return Ok(false);
        }
        // The rest of the batch must already be here: more Parse messages, then a Sync.
        let mut at = 0;
        let mut parses = 0;
        let mut batch = 0;
        loop {
            if self.cbuf.len() < at + 5 {
                return Ok(false);
            }
            let tag = self.cbuf[at];
            let len = i32::from_be_bytes([
                self.cbuf[at + 1],
                self.cbuf[at + 2],
                self.cbuf[at + 3],
                self.cbuf[at + 4],
            ]);
            if len < 4 || len as usize - 4 > wire::HEAD || self.cbuf.len() < at + 1 + len as usize {
                return Ok(false);
            }
            match tag {
                b'P' => {
                    parses += 1;
                    // The name and text, and a little for the entry: a bound above them all.
                    batch += len as usize + 64;
                }
                b'S' => break,
                _ => return Ok(false),
            }
            at += 1 + len as usize;
        }
        // Statements the emulator cannot keep go to a database connection, which they pin.
        if !self.fits(batch + first.body.len() + 64) {
            return Ok(false);
        }
        let mut frames = vec![first.clone()];
        let large = self.shared.config.max_message_bytes;
        for _ in 0..=parses {
            frames.extend(take_frame(&mut self.cbuf, |tag| {
                wire::client_limit(tag, large)
            })?);
        }
        for frame in frames {
            if frame.tag != b'P' {
                continue;
            }
            let (name, rest) = wire::split_name(&frame.body)?;
            let class = classify(&wire::parse_query(&rest)?);
            self.remember(name, rest, class, false);
            self.to_client.put_slice(&[b'1', 0, 0, 0, 4]);
        }
        wire::ready(&mut self.to_client, b'I');
        Ok(true)
    }

    /// Borrows a database connection for the client's next transaction; closes statement
    /// names no client uses any more on it first.
    async fn borrow(&mut self) -> io::Result<Result<(), BorrowError>> {
        let timeout = self.shared.config.borrow_timeout;
        let pool = self.shared.pool.clone();
        let mut borrow = pin!(pool.borrow(timeout));
        // While waiting, notice a client that leaves, reading within the session's and the
        // process's bounds.
        let up = loop {
            let (up, down) = self.held_bytes();
            let room = self
                .shared
                .config
                .session_buffer_bytes
                .saturating_sub(up + down);
            let cap = Some(self.shared.config.max_buffered_bytes as u64);
            let Session {
                client,
                cbuf,
                charge,
                ..
            } = self;
            let mut retry = pin!(tokio::time::sleep(RETRY));
            let polled = poll_fn(|cx| {
                if let Poll::Ready(r) = borrow.as_mut().poll(cx) {
                    return Poll::Ready(Ok(Some(r)));
                }
                if room > 0
                    && let Poll::Ready(n) =
                        poll_read_charged(cx, client, cbuf, charge, room, cap, retry.as_mut())
                {
                    return Poll::Ready(match n {
                        Ok(Some(0)) => Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "client left while queued",
                        )),
                        Ok(_) => Ok(None),
                        Err(e) => Err(e),
                    });
                }
                Poll::Pending
            })
            .await?;
            if let Some(r) = polled {
                break r;
            }
            self.recharge();
        };
        self.active = tokio::time::Instant::now();
        let up = match up {
            Ok(up) => up,
            Err(e) => return Ok(Err(e)),
        };
        let mut h = Held::new(up);
        let dead: Vec<String> = {
            let reg = self.shared.pool.registry();
            h.up.prepared
                .iter()
                .filter(|n| reg.is_dead(n))
                .cloned()
                .collect()
        };
        if !dead.is_empty() {
            let mut reg = self.shared.pool.registry();
            for name in &dead {
                wire::named(b'C', b"S", name, b"").write_to(&mut h.out);
                h.up.prepared.remove(name);
                reg.closed(name);
            }
            drop(reg);
            h.out.put_slice(&[b'S', 0, 0, 0, 4]);
            h.cycles.push_back(Cycle {
                swallow_close: dead.len() as u32,
                injected: true,
                ..Cycle::default()
            });
        }
        self.held = Some(h);
        Ok(Ok(()))
    }

    /// Handles one client message.
    async fn on_client(&mut self, frame: Frame) -> io::Result<Flow> {
        if frame.tag == b'X' {
            return Ok(Flow::Close);
        }
        // The rest of a long message is dropped with it, or passed on after its head.
        self.pass = Pass {
            left: frame.more,
            forward: false,
        };
        if self.discard_until_sync {
            if frame.tag == b'S' {
                self.discard_until_sync = false;
                wire::ready(&mut self.to_client, b'I');
            }
            return Ok(Flow::Continue);
        }
        if self.held.is_none()
            && let Err(e) = self.borrow().await?
        {
            return self.borrow_failed(frame.tag, e).await;
        }
        self.pass.forward = true;
        let rules = self.shared.config.rules;
        match frame.tag {
            b'Q' => {
                let (sql, mut r) = if frame.more == 0 {
                    let sql = cstr(&mut frame.body.clone())?;
                    let r = rules.pinning_reasons(&classify(&sql), Protocol::Simple);
                    (sql, r)
                } else {
                    // Only the head is here: what it holds, and a text that long pins.
                    let sql = wire::text_head(&frame.body);
                    (
                        sql.clone(),
                        rules.pinning_reasons(&classify(&sql), Protocol::Simple),
                    )
                };
                if frame.more > 0 {
                    r.insert(Reason::Oversized);
                }
                self.pin(r, &sql);
                let h = self.held.as_mut().expect("held");
                frame.write_to(&mut h.out);
                h.open.simple = true;
                h.end_cycle();
            }
            b'F' => self.on_function_call(&frame),
            b'P' => self.on_parse(&frame, rules)?,
            b'B' => self.on_bind(&frame, rules)?,
            b'D' | b'C' => self.on_describe_or_close(&frame)?,
            b'S' => {
                let h = self.held.as_mut().expect("held");
                frame.write_to(&mut h.out);
                h.sync();
            }
            b'c' | b'f' => {
                let h = self.held.as_mut().expect("held");
                frame.write_to(&mut h.out);
                h.copy_in = false;
            }
            _ => {
                // Execute, Flush, CopyData and anything else: passed through.
                let h = self.held.as_mut().expect("held");
                frame.write_to(&mut h.out);
                if frame.tag != b'd' {
                    h.open_dirty = true;
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// No database connection for the client's message: an error, as RDS Proxy answers.
    async fn borrow_failed(&mut self, tag: u8, e: BorrowError) -> io::Result<Flow> {
        let text = match e {
            BorrowError::Timeout => {
                tracing::info!(
                    client = self.id,
                    "emulator: timed out waiting to acquire a database connection"
                );
                "Timed-out waiting to acquire database connection.".to_string()
            }
            BorrowError::Connect(e) => {
                format!("The proxy could not connect to the database: {e}")
            }
        };
        wire::error(&mut self.to_client, "ERROR", "08000", &text);
        match tag {
            b'Q' | b'S' | b'F' => wire::ready(&mut self.to_client, b'I'),
            _ => self.discard_until_sync = true,
        }
        if self.shared.config.close_on_borrow_timeout {
            self.write_client().await?;
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }

    /// A FunctionCall: pins (see the comment inside) and goes through.
    fn on_function_call(&mut self, frame: &Frame) {
        // A FunctionCall runs a function by OID: set_config, an advisory lock, nextval,
        // or one that changes session state in its body. Neither the emulator nor RDS
        // Proxy (which documents nothing here) can see what it does: pin, so the
        // connection it may have changed never serves another client.
        let oid = frame
            .body
            .get(..4)
            .map_or(0, |b| u32::from_be_bytes(b.try_into().expect("four bytes")));
        self.pin(
            Reasons::of(Reason::Untracked),
            &format!("FunctionCall of function OID {oid}"),
        );
        let h = self.held.as_mut().expect("held");
        frame.write_to(&mut h.out);
        h.open.simple = true;
        h.end_cycle();
    }

    /// A Parse: pins under the legacy rules (or for a transaction statement's class), and is
    /// renamed to the emulator's own name for a named statement.
    fn on_parse(&mut self, frame: &Frame, rules: PinRules) -> io::Result<()> {
        let (name, rest) = wire::split_name(&frame.body)?;
        let partial = frame.more > 0;
        let sql = if partial {
            wire::text_head(&rest)
        } else {
            wire::parse_query(&rest)?
        };
        let mut class = classify(&sql);
        let mut r = rules.pinning_reasons(
            &Classification {
                reasons: Reasons::EMPTY,
                txn: class.txn,
            },
            Protocol::Parse,
        );
        let kept = name.is_empty() || (!partial && self.fits(stmt_size(&name, &rest)));
        if partial || !kept {
            // Too long to keep whole, or past what the emulator keeps of this session's
            // statements: it could not be prepared again on another database connection, so
            // the session stays on this one. A text that long pins when run anyway.
            class.reasons.insert(Reason::Oversized);
            r.insert(Reason::Oversized);
        }
        self.pin(r, &sql);
        if !kept {
            // Not kept at all: it goes to the pinned connection under the client's own name,
            // and an earlier statement of that name is forgotten.
            if let Some(old) = self.stmts.remove(&name) {
                self.unkeep(stmt_size(&name, &old.rest));
                self.shared.pool.registry().retire(old.global);
            }
            let h = self.held.as_mut().expect("held");
            frame.write_to(&mut h.out);
            h.open_dirty = true;
            return Ok(());
        }
        let global = self.remember(name, rest.clone(), class, partial);
        let id = (self.id, self.unnamed_seq);
        let h = self.held.as_mut().expect("held");
        match global {
            None => {
                h.up.unnamed = Some(id);
                frame.write_to(&mut h.out);
            }
            Some(global) => {
                wire::named(b'P', b"", &global, &rest)
                    .with_more(frame.more)
                    .write_to(&mut h.out);
                h.up.prepared.insert(global.clone());
                self.shared.pool.registry().prepared(&global);
                h.open.prepared.push(global);
            }
        }
        self.held.as_mut().expect("held").open_dirty = true;
        Ok(())
    }

    /// A Bind: pins on what its statement does, and makes sure the statement exists on the
    /// held database connection.
    fn on_bind(&mut self, frame: &Frame, rules: PinRules) -> io::Result<()> {
        let mut body = frame.body.clone();
        let portal = cstr(&mut body)?;
        let name = cstr(&mut body)?;
        let stmt = if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.stmts.get(&name)
        };
        let (global, class) = match stmt {
            Some(s) => (
                if name.is_empty() {
                    String::new()
                } else {
                    s.global.clone()
                },
                Some(s.class),
            ),
            None => (name.clone(), None),
        };
        if let Some(class) = class {
            let r = rules.pinning_reasons(&class, Protocol::Execute);
            let sql = stmt
                .map(|s| wire::parse_query(&s.rest).unwrap_or_default())
                .unwrap_or_default();
            self.pin(r, &sql);
            self.ensure(&name);
        }
        let h = self.held.as_mut().expect("held");
        wire::named(b'B', &[portal.as_bytes(), &[0]].concat(), &global, &body)
            .with_more(frame.more)
            .write_to(&mut h.out);
        h.open_dirty = true;
        Ok(())
    }

    /// A Describe or Close of a statement or portal, named the emulator's way.
    fn on_describe_or_close(&mut self, frame: &Frame) -> io::Result<()> {
        let mut body = frame.body.clone();
        if body.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "Describe or Close without a kind",
            ));
        }
        let kind = body.get_u8();
        let name = cstr(&mut body)?;
        if kind == b'S' && !name.is_empty() {
            if frame.tag == b'D' {
                self.ensure(&name);
            }
            let global = self
                .stmts
                .get(&name)
                .map_or(name.clone(), |s| s.global.clone());
            let h = self.held.as_mut().expect("held");
            wire::named(frame.tag, &[kind], &global, b"").write_to(&mut h.out);
            if frame.tag == b'C'
                && let Some(old) = self.stmts.remove(&name)
            {
                let mut reg = self.shared.pool.registry();
                if h.up.prepared.remove(&global) {
                    reg.closed(&global);
                }
                reg.retire(global);
                drop(reg);
                self.unkeep(stmt_size(&name, &old.rest));
            }
        } else {
            if frame.tag == b'D' && kind == b'S' {
                self.ensure("");
            }
            frame.write_to(&mut self.held.as_mut().expect("held").out);
        }
        self.held.as_mut().expect("held").open_dirty = true;
        Ok(())
    }

    /// Relays what the database connection sent, hiding the answers to injected messages.
    fn on_upstream(&mut self) -> io::Result<()> {
        let Some(h) = self.held.as_mut() else {
            return Ok(());
        };
        loop {
            if h.pass.left > 0 {
                if h.up.rbuf.is_empty() {
                    break;
                }
                let n = h.pass.left.min(h.up.rbuf.len());
                let bytes = h.up.rbuf.split_to(n);
                h.pass.left -= n;
                if h.pass.forward {
                    self.to_client.extend_from_slice(&bytes);
                }
                continue;
            }
            let Some(frame) = take_frame(&mut h.up.rbuf, upstream_limit)? else {
                break;
            };
            let c = h.answering();
            let swallow = c.injected
                || match frame.tag {
                    b'1' if c.swallow_parse > 0 => {
                        c.swallow_parse -= 1;
                        true
                    }
                    b'3' if c.swallow_close > 0 => {
                        c.swallow_close -= 1;
                        true
                    }
                    _ => false,
                };
            let mut copy_started = false;
            match frame.tag {
                b'E' => c.errored = true,
                b'G' => copy_started = true,
                b'Z' => {
                    h.status = frame.body.first().copied().unwrap_or(b'I');
                    if let Some(done) = h.cycles.pop_front()
                        && done.errored
                    {
                        // What this cycle prepared may not exist: prepare it again next time.
                        let mut reg = self.shared.pool.registry();
                        for name in done.prepared {
                            if h.up.prepared.remove(&name) {
                                reg.closed(&name);
                            }
                        }
                        h.up.unnamed = None;
                    }
                    h.copy_in = false;
                }
                _ => {}
            }
            if copy_started {
                h.copy_in_started();
            }
            if !swallow {
                frame.write_to(&mut self.to_client);
            }
            h.pass = Pass {
                left: frame.more,
                forward: !swallow,
            };
        }
        Ok(())
    }

    /// The client is gone: return its database connection in a clean state, as RDS Proxy
    /// resets a session before reusing its connection.
    async fn leave(&mut self) {
        {
            let mut reg = self.shared.pool.registry();
            for (_, s) in self.stmts.drain() {
                reg.retire(s.global);
            }
        }
        let kept = self.kept;
        self.unkeep(kept);
        let Some(mut h) = self.held.take() else {
            self.unpin();
            return;
        };
        if self.pass.left > 0 && self.pass.forward {
            // The database connection is in the middle of the client's message: what
            // follows would be read as its body. It cannot be reset, only closed.
            self.shared.pool.discard(h.up);
            self.unpin();
            return;
        }
        let pinned = !self.pinned.is_empty();
        let clean = h.quiet() && h.status == b'I' && !pinned;
        let config = self.shared.pool.0.config.clone();
        let reset = async {
            if clean {
                return Ok::<(), io::Error>(());
            }
            if h.copy_in {
                postgres_protocol::message::frontend::copy_fail("client disconnected", &mut h.out)?;
            }
            if h.open_dirty || h.copy_in || h.absorb_next_sync {
                h.out.put_slice(&[b'S', 0, 0, 0, 4]);
                h.sync();
            }
            let (pid, key) = (h.up.pid, h.up.key);
            if tokio::time::timeout(Duration::from_secs(1), drain(&mut h))
                .await
                .is_err()
            {
                // A query still runs: cancel it, then wait for its end.
                let _ = cancel(&config, pid, key).await;
                tokio::time::timeout(Duration::from_secs(5), drain(&mut h))
                    .await
                    .map_err(|_| io::Error::other("upstream did not finish"))??;
            }
            if h.status != b'I' {
                simple(&mut h, "ROLLBACK").await?;
            }
            if pinned {
                simple(&mut h, "DISCARD ALL").await?;
                let mut reg = self.shared.pool.registry();
                for name in h.up.prepared.drain() {
                    reg.closed(&name);
                }
                h.up.unnamed = None;
                tracing::info!(
                    client = self.id,
                    "The database connection [dbConnection={}] was released to the connection pool upon session reset.",
                    h.up.id
                );
            }
            Ok(())
        };
        let ok = tokio::time::timeout(Duration::from_secs(8), reset)
            .await
            .is_ok_and(|r| r.is_ok());
        if ok {
            self.shared.pool.give_back(h.up);
        } else {
            self.shared.pool.discard(h.up);
        }
        self.unpin();
    }
}

/// What a kept statement costs: its name, its text and a little for the entry.
fn stmt_size(name: &str, rest: &[u8]) -> usize {
    name.len() + rest.len() + 64
}

/// Any message from the database is taken (its head, the rest passed on): it is the server's
/// own, bounded by what it allows.
fn upstream_limit(_: u8) -> usize {
    i32::MAX as usize
}

/// The bytes a write took; a write that took none is an error.
fn written(n: io::Result<usize>) -> io::Result<usize> {
    match n? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

/// Sends what is queued and reads until every sent cycle has its ReadyForQuery.
async fn drain(h: &mut Held) -> io::Result<()> {
    if !h.out.is_empty() {
        let out = h.out.split();
        h.up.stream.write_all(&out).await?;
    }
    while !h.cycles.is_empty() {
        // The rest of a long message nobody reads any more is dropped as it comes.
        let skip = h.pass.left.min(h.up.rbuf.len());
        h.up.rbuf.advance(skip);
        h.pass.left -= skip;
        let frame = if h.pass.left > 0 {
            None
        } else {
            take_frame(&mut h.up.rbuf, upstream_limit)?
        };
        let Some(frame) = frame else {
            h.up.rbuf.reserve(CHUNK);
            if h.up.stream.read_buf(&mut h.up.rbuf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed",
                ));
            }
            continue;
        };
        h.pass.left = frame.more;
        if frame.tag == b'Z' {
            h.status = frame.body.first().copied().unwrap_or(b'I');
            h.cycles.pop_front();
        }
    }
    Ok(())
}

async fn simple(h: &mut Held, sql: &str) -> io::Result<()> {
    postgres_protocol::message::frontend::query(sql, &mut h.out)?;
    h.open.simple = true;
    h.end_cycle();
    drain(h).await
}

/// The proxy's words for a set of pinning reasons.
fn describe(reasons: Reasons) -> String {
    reasons
        .iter()
        .map(|r| match r {
            Reason::Parse => "A parse message was detected.",
            Reason::Untracked => "A function call message was detected.",
            Reason::Oversized => {
                "The connection ran a SQL query which exceeded the 16384 byte limit."
            }
            _ => "SQL changed session settings that the proxy doesn't track.",
        })
        .collect::<Vec<_>>()
        .join(" ")
        + &format!(" ({reasons})")
}
