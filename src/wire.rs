//! The protocol observer: every byte between tokio-postgres and the socket (above TLS) passes
//! through [`Observed`], which reads the message frames as they go by and keeps the facts the
//! pool's return decision needs:
//!
//! - from the server: the transaction status of the last ReadyForQuery (`I`, `T`, `E`), whether
//!   a COPY is open, FATAL/PANIC errors, notifications, and reported settings that changed;
//! - from the client: how many requests (startup, Query, Sync, FunctionCall) wait for their
//!   ReadyForQuery, and what each Query, Parse, Bind and FunctionCall would pin, classified
//!   with the pool's [`PinRules`] whatever API sent it;
//! - how many bytes the stream below accepted from tokio-postgres: while that count stands
//!   still, nothing of a request can have reached the server (the retry rule in `client/retry.rs`).
//!
//! The connection task is the only writer: it runs the stream's `poll_read` and `poll_write`.
//! The pool reads the facts through [`Wire`] from other tasks. A client future completes only
//! after the connection task has routed the response, so the facts of everything a completed
//! call sent and received are visible to it (the channel between them orders the accesses).
//!
//! The cost is a look at each message header; bodies are copied only for the few messages that
//! carry a fact (a Query's or Parse's SQL, up to [`SQL_CAPTURE`] bytes; a Bind's names; an
//! error's fields).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst,
};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_postgres::tls::{ChannelBinding, TlsStream};

use crate::conn::truncate;
use crate::error::TimeoutCause;
use crate::pinning::{
    Classification, PinRules, Protocol, Reason, Reasons, StandardStrings, classify_with,
};

/// SQL beyond this many bytes of one message is not classified: such a text is over RDS Proxy's
/// 16 KB limit and pins anyway ([`Reason::Oversized`]).
pub(crate) const SQL_CAPTURE: usize = 64 * 1024;

/// The last ReadyForQuery's transaction status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxnStatus {
    /// No ReadyForQuery yet (the startup has not finished).
    Unknown,
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

/// The facts read off one connection's protocol stream, shared with the pool.
pub(crate) struct Wire {
    rules: PinRules,
    /// Every fact in one word ([`Facts`]), so the pool reads them with one load. Only the
    /// connection task writes it.
    facts: AtomicU64,
    /// Requests written so far (Query, counted Sync, FunctionCall).
    sent: AtomicU32,
    /// Bytes the stream below the observer accepted (the socket, or a TLS layer that may
    /// still hold them: either way they may have been sent). Only the connection task writes.
    written: AtomicU64,
    /// Requests that will get a ReadyForQuery, the startup included (`sent`, less the Syncs
    /// the server ignores in copy-in mode, plus one), and ReadyForQuery messages received:
    /// the `n`-th request is answered once `ready` reaches `n`.
    expected: AtomicU32,
    ready: AtomicU32,
    first_pin: Mutex<Option<Box<str>>>,
    /// Each message that brought a pin reason the connection did not have yet (its start) and
    /// the reasons it brought, until the pool reports them ([`Wire::take_new_pins`]): at most
    /// one per reason.
    new_pins: Mutex<Vec<(Reasons, Box<str>)>>,
    /// Tasks waiting for a ReadyForQuery ([`Wire::ready_for`]); `waiting` says whether there
    /// are any.
    waiters: Mutex<Vec<Waker>>,
    waiting: AtomicBool,
    /// The connection task ended (or its future was dropped): no ReadyForQuery will come.
    ended: AtomicBool,
    /// The bound of every request, whatever API wrote it: `query_timeout` from the moment it
    /// is written, and the caller's cutoff as of then ([`Wire::set_cutoff`]). The connection
    /// task closes the socket once the earliest bound of a request still unanswered passes
    /// (`conn.rs`), so a call through the driver's own client stops too.
    query_timeout: AtomicU64,
    /// The caller's cutoff for requests written from now on ([`Ticks`]; 0: none).
    cutoff: AtomicU64,
    /// The pool's running invocations ([`Wire::set_running`]).
    running: std::sync::OnceLock<Arc<crate::invocation::Running>>,
    /// Requests written (`sent`) when `cutoff` was last set.
    cutoff_mark: AtomicU32,
    /// The earliest bound of a request written and not answered ([`Ticks`]; 0: none). Only the
    /// connection task writes it.
    due: AtomicU64,
    /// The socket was closed because a request outlived its bound: 0 no, 1 its
    /// `query_timeout`, 2 the caller's cutoff.
    expired: AtomicU8,
    /// The number of the last request whose answer was an error before any BindComplete: for
    /// a Bind, Execute and Sync, it failed at the Bind, so nothing of it ran.
    failed_before_bind_complete: AtomicU32,
    /// The base of the bounds above.
    ticks: Ticks,
}

/// Instants as nanoseconds since a base taken when the connection's wire was made, plus one
/// (0 stands for none), so a bound fits in an atomic word. Per connection, from the clock of
/// the runtime that opened it (the one its task's timer runs on): a base shared by the
/// process would be taken from whichever runtime came first, and a paused, advanced clock
/// (tokio's test-util) there would put every other runtime's bounds that far late.
struct Ticks(Instant);

impl Ticks {
    fn now() -> Ticks {
        Ticks(Instant::now())
    }

    fn from(&self, at: Option<Instant>) -> u64 {
        match at {
            None => 0,
            // An instant before the base reads as the base itself: every bound made is at or
            // after the connection was opened, or has passed anyway.
            Some(at) => {
                let n = at.saturating_duration_since(self.0).as_nanos();
                u64::try_from(n).unwrap_or(u64::MAX - 1).max(1)
            }
        }
    }

    fn to(&self, ticks: u64) -> Option<Instant> {
        (ticks != 0).then(|| self.0 + Duration::from_nanos(ticks))
    }
}

impl Wire {
    pub(crate) fn new(rules: PinRules) -> Arc<Wire> {
        Arc::new(Wire {
            rules,
            // The startup message waits for its ReadyForQuery like any request.
            facts: AtomicU64::new(1),
            sent: AtomicU32::new(0),
            written: AtomicU64::new(0),
            expected: AtomicU32::new(1),
            ready: AtomicU32::new(0),
            first_pin: Mutex::new(None),
            new_pins: Mutex::new(Vec::new()),
            waiters: Mutex::new(Vec::new()),
            waiting: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            query_timeout: AtomicU64::new(0),
            cutoff: AtomicU64::new(0),
            running: std::sync::OnceLock::new(),
            cutoff_mark: AtomicU32::new(0),
            due: AtomicU64::new(0),
            expired: AtomicU8::new(0),
            failed_before_bind_complete: AtomicU32::new(0),
            ticks: Ticks::now(),
        })
    }

    /// Sets the timeout of each request from the moment it is written (`None`: none).
    pub(crate) fn set_query_timeout(&self, d: Option<Duration>) {
        let nanos = d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.query_timeout.store(nanos, Relaxed);
    }

    /// The cutoff of the caller now using the connection: requests written from now on stop
    /// at it (`None`: no cutoff). Set by every call before it queues a request, and by raw
    /// access in the caller's task. An earlier cutoff than the one set before does not take
    /// its place while nothing was written since that one was set: a request queued under it
    /// may still wait to be written (two invocations at once sharing one client), and it must
    /// not stop at the other invocation's cutoff. The earlier caller's own calls are still
    /// bounded by their own cutoff (`Guarded`), and its raw requests then by the later one.
    /// True when the cutoff changed.
    pub(crate) fn set_cutoff(&self, cutoff: Option<Instant>) -> bool {
        let ticks = self.ticks.from(cutoff);
        let current = self.cutoff.load(Relaxed);
        if current == ticks {
            return false;
        }
        let sent = self.sent();
        if current != 0 && ticks != 0 && ticks < current && self.cutoff_mark.load(Relaxed) == sent {
            return false;
        }
        self.cutoff_mark.store(sent, Relaxed);
        self.cutoff.swap(ticks, Relaxed) != ticks
    }

    /// Clears the cutoff if it is still `cutoff` (its invocation ended: what is written from
    /// now on without a caller saying its cutoff, a dropped statement's Close, is bounded by
    /// `query_timeout` alone, not by a cutoff long past).
    pub(crate) fn clear_cutoff_if(&self, cutoff: Option<Instant>) {
        let _ = self
            .cutoff
            .compare_exchange(self.ticks.from(cutoff), 0, Relaxed, Relaxed);
    }

    /// The cutoff of a request written now, in [`Ticks`] (0: none): the caller's, or, when no
    /// caller said one (a driver client borrowed before the invocation it is used in), the
    /// latest of the pool's invocations running now.
    fn cutoff_now(&self) -> u64 {
        match self.cutoff.load(Relaxed) {
            0 => self
                .running
                .get()
                .and_then(|r| r.latest())
                .map_or(0, |c| self.ticks.from(Some(c))),
            c => c,
        }
    }

    /// The bound of a request written now: the earlier of `query_timeout` from now and the
    /// caller's cutoff, in [`Ticks`] (`u64::MAX`: unbounded).
    fn bound_of_new_request(&self) -> u64 {
        let cutoff = match self.cutoff_now() {
            0 => u64::MAX,
            c => c,
        };
        match self.query_timeout.load(Relaxed) {
            0 => cutoff,
            t => {
                let at = self.ticks.from(Some(Instant::now())).saturating_add(t);
                at.min(cutoff)
            }
        }
    }

    /// The pool's running invocations, whose cutoffs bound a request written with none set.
    pub(crate) fn set_running(&self, running: Arc<crate::invocation::Running>) {
        let _ = self.running.set(running);
    }

    /// The earliest bound of a request written and not answered yet.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.ticks.to(self.due.load(Relaxed))
    }

    /// The connection task closed the socket: a request outlived its bound. Returns which
    /// bound it was.
    pub(crate) fn expire(&self) -> TimeoutCause {
        let cutoff = self.cutoff_now();
        let cause = if cutoff != 0 && cutoff <= self.due.load(Relaxed) {
            TimeoutCause::Deadline
        } else {
            TimeoutCause::Configured
        };
        let code = match cause {
            TimeoutCause::Deadline => 2,
            _ => 1,
        };
        self.expired.store(code, SeqCst);
        cause
    }

    /// Which bound a request outlived, if the socket was closed for it.
    pub(crate) fn expired(&self) -> Option<TimeoutCause> {
        match self.expired.load(SeqCst) {
            0 => None,
            1 => Some(TimeoutCause::Configured),
            _ => Some(TimeoutCause::Deadline),
        }
    }

    /// True when request number `request` was answered by an error before any BindComplete:
    /// for an extended-protocol call, the server failed its Parse or Bind, so nothing of it
    /// ran. `request` is the caller's guess ([`Wire::next_request`] before it queued its
    /// request); calls pipelined on one client (or a raw request queued beside) take the same
    /// guess, so the answer is trusted only when exactly that many requests were written: the
    /// caller's is then the one numbered `request`. Otherwise false (no rerun), never a
    /// neighbour's failure taken for the caller's.
    pub(crate) fn failed_before_bind_complete(&self, request: u32) -> bool {
        self.failed_before_bind_complete.load(SeqCst) == request
            && self.reached(request)
            && self.expected() == request
    }

    /// The facts as of now.
    pub(crate) fn facts(&self) -> Facts {
        Facts(self.facts.load(Relaxed))
    }

    /// Changes the facts (the connection task alone writes them, so load and store suffice).
    fn update(&self, f: impl FnOnce(&mut Facts)) {
        let mut facts = self.facts();
        f(&mut facts);
        self.facts.store(facts.0, Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn status(&self) -> TxnStatus {
        self.facts().status()
    }

    pub(crate) fn pinned(&self) -> Reasons {
        self.facts().pinned()
    }

    /// Requests written so far: a change says something was written since.
    pub(crate) fn sent(&self) -> u32 {
        self.sent.load(Relaxed)
    }

    /// Bytes written so far: while it has not changed, no byte of anything queued since can
    /// have reached the server. Read after the connection task ended (a closed client: its
    /// channel's close is ordered after its last write), it is final.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }

    fn count_written(&self, n: usize) {
        // The connection task alone writes: a load and a store, no read-modify-write.
        self.written
            .store(self.written().wrapping_add(n as u64), Relaxed);
    }

    fn count_sent(&self) {
        self.sent.store(self.sent().wrapping_add(1), Relaxed);
        self.expected
            .store(self.expected().wrapping_add(1), Relaxed);
        self.update(|f| f.set_outstanding(f.outstanding() + 1));
    }

    /// The number the next request written will have: its ReadyForQuery is the one that
    /// brings `ready` to it (or, with requests queued ahead of it, a later one).
    pub(crate) fn next_request(&self) -> u32 {
        self.expected().wrapping_add(1)
    }

    fn expected(&self) -> u32 {
        self.expected.load(Relaxed)
    }

    /// The start of the first message that pinned.
    pub(crate) fn first_pin(&self) -> Option<String> {
        crate::sync::lock(&self.first_pin)
            .as_deref()
            .map(str::to_owned)
    }

    /// The messages that brought new pin reasons since the last call, each with the reasons
    /// it brought, in order.
    pub(crate) fn take_new_pins(&self) -> Vec<(Reasons, Box<str>)> {
        std::mem::take(&mut *crate::sync::lock(&self.new_pins))
    }

    /// Waits until the ReadyForQuery of request number `target` arrived ([`Wire::next_request`]
    /// taken just before a call's request was queued), or the connection ended. tokio-postgres
    /// hands a result over at its CommandComplete, which a socket read may deliver apart from
    /// the ReadyForQuery behind it; waiting for it lets the return find the connection at rest.
    /// Requests queued ahead of the call only make the target early, never late, so nothing
    /// pipelined behind the call is waited for. Cancel safe.
    pub(crate) async fn ready_for(&self, target: u32) {
        std::future::poll_fn(|cx| self.poll_ready_for(target, cx)).await
    }

    pub(crate) fn reached(&self, target: u32) -> bool {
        // Wrapping: `ready` is at or past `target`.
        (self.ready.load(SeqCst).wrapping_sub(target) as i32) >= 0
    }

    /// Ready once request number `target` was answered, or once the connection ended (a FATAL
    /// error, a closed socket: nothing more will be answered, and the connection is closed on
    /// return).
    pub(crate) fn poll_ready_for(&self, target: u32, cx: &mut Context<'_>) -> Poll<()> {
        if self.reached(target) || self.ended.load(SeqCst) {
            return Poll::Ready(());
        }
        {
            let mut waiters = crate::sync::lock(&self.waiters);
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            self.waiting.store(true, SeqCst);
        }
        // Checked again after registering (both sides SeqCst): a ReadyForQuery or the end in
        // between either sees `waiting` or is seen here.
        if self.reached(target) || self.ended.load(SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn count_ready(&self) {
        self.ready
            .store(self.ready.load(Relaxed).wrapping_add(1), SeqCst);
        self.wake_waiters();
    }

    /// The connection task ended, or its future was dropped: whoever waits for a ReadyForQuery
    /// stops waiting.
    pub(crate) fn end(&self) {
        self.ended.store(true, SeqCst);
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        if self.waiting.load(SeqCst) {
            let waiters = {
                let mut w = crate::sync::lock(&self.waiters);
                self.waiting.store(false, SeqCst);
                std::mem::take(&mut *w)
            };
            waiters.into_iter().for_each(Waker::wake);
        }
    }

    fn pin(&self, reasons: Reasons, what: &str) {
        if reasons.is_empty() {
            return;
        }
        let before = self.pinned();
        let added = reasons.minus(before);
        if !added.is_empty() {
            // Kept before the reasons are set: a report that sees them finds their message.
            crate::sync::lock(&self.new_pins).push((added, truncate(what, 120).into()));
        }
        self.update(|f| f.set_pinned(before.union(reasons)));
        if before.is_empty() {
            let mut first = crate::sync::lock(&self.first_pin);
            first.get_or_insert_with(|| truncate(what, 120).into());
        }
    }
}

/// The facts of a [`Wire`] packed in one word: bits 0-31 the requests waiting for their
/// ReadyForQuery, 32-39 the last ReadyForQuery's status byte (0 before the first), 40 a COPY
/// is open, 41 a FATAL or PANIC arrived, 42 the framing broke, 43-63 the pin reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Facts(u64);

const COPY: u64 = 1 << 40;
const FATAL: u64 = 1 << 41;
const GARBLED: u64 = 1 << 42;
/// Where the pin reasons start, and their mask: room for 21.
const PINS: u32 = 43;
const PIN_MASK: u64 = (1 << (64 - PINS)) - 1;
const _: () = assert!(crate::pinning::REASON_COUNT <= 64 - PINS as usize);

impl Facts {
    pub(crate) fn outstanding(self) -> u32 {
        self.0 as u32
    }

    fn set_outstanding(&mut self, n: u32) {
        self.0 = (self.0 & !0xffff_ffff) | u64::from(n);
    }

    pub(crate) fn status(self) -> TxnStatus {
        match (self.0 >> 32) as u8 {
            b'I' => TxnStatus::Idle,
            b'T' => TxnStatus::InTransaction,
            b'E' => TxnStatus::Failed,
            _ => TxnStatus::Unknown,
        }
    }

    fn set_status(&mut self, byte: u8) {
        self.0 = (self.0 & !(0xff << 32)) | (u64::from(byte) << 32);
    }

    pub(crate) fn copy_open(self) -> bool {
        self.0 & COPY != 0
    }

    fn set(&mut self, bit: u64, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }

    /// A FATAL or PANIC arrived, or the framing broke: the session is over or untrustworthy.
    pub(crate) fn broken(self) -> bool {
        self.0 & (FATAL | GARBLED) != 0
    }

    pub(crate) fn pinned(self) -> Reasons {
        Reasons::from_bits((self.0 >> PINS) as u32)
    }

    fn set_pinned(&mut self, r: Reasons) {
        self.0 = (self.0 & !(PIN_MASK << PINS)) | ((u64::from(r.bits()) & PIN_MASK) << PINS);
    }
}

/// Reads message frames from a byte stream in any chunking. `tagless_first`: the client's
/// first message (startup) has a length and no type byte.
struct Framer {
    /// The message types worth a look; the others (rows, above all) are skipped unread.
    interesting: &'static [bool; 256],
    tagless_first: bool,
    head: [u8; 5],
    have: usize,
    in_body: bool,
    tag: u8,
    left: usize,
    keep: usize,
    body: Vec<u8>,
}

impl Framer {
    fn new(tagless_first: bool, interesting: &'static [bool; 256]) -> Framer {
        Framer {
            interesting,
            tagless_first,
            head: [0; 5],
            have: 0,
            in_body: false,
            tag: 0,
            left: 0,
            keep: 0,
            body: Vec::new(),
        }
    }

    /// Feeds bytes; calls `on(tag, captured body)` once per complete message. `capture(tag)`
    /// says how many body bytes of a message to keep. Returns false when the framing broke.
    fn feed(
        &mut self,
        mut data: &[u8],
        capture: impl Fn(u8) -> usize,
        mut on: impl FnMut(u8, &[u8]),
    ) -> bool {
        while !data.is_empty() {
            // The common case first: a whole message at the start of `data`, at a message
            // boundary, read in place without copying its header or its body.
            if !self.in_body && self.have == 0 && !self.tagless_first && data.len() >= 5 {
                let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
                if len < 4 {
                    return false;
                }
                if let Some(body) = data.get(5..1 + len) {
                    let tag = data[0];
                    if self.interesting[tag as usize] {
                        on(tag, &body[..capture(tag).min(body.len())]);
                    }
                    data = &data[1 + len..];
                    continue;
                }
            }
            if !self.in_body {
                let head_len = if self.tagless_first { 4 } else { 5 };
                let take = (head_len - self.have).min(data.len());
                self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have < head_len {
                    return true;
                }
                let (tag, len) = if self.tagless_first {
                    self.tagless_first = false;
                    (0, &self.head[..4])
                } else {
                    (self.head[0], &self.head[1..5])
                };
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                if len < 4 {
                    return false;
                }
                self.have = 0;
                self.tag = tag;
                self.left = len - 4;
                self.keep = capture(tag).min(self.left);
                self.body.clear();
                if self.left == 0 {
                    if self.interesting[tag as usize] {
                        on(tag, &[]);
                    }
                    continue;
                }
                self.in_body = true;
            }
            let take = self.left.min(data.len());
            if self.keep > 0 {
                let k = self.keep.min(take);
                self.body.extend_from_slice(&data[..k]);
                self.keep -= k;
            }
            self.left -= take;
            data = &data[take..];
            if self.left == 0 {
                self.in_body = false;
                if self.interesting[self.tag as usize] {
                    on(self.tag, &self.body);
                }
            }
        }
        true
    }
}

/// A reported setting: its name and value as the server sent them.
type Setting = (Box<[u8]>, Box<[u8]>);

const fn table(tags: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < tags.len() {
        t[tags[i] as usize] = true;
        i += 1;
    }
    t
}

/// The client's messages with a fact: Query, Parse, Bind, Close, Execute, Sync, FunctionCall,
/// CopyDone, CopyFail.
static TO_SERVER: [bool; 256] = table(b"QPBCESFcf");
/// The server's: ReadyForQuery, ErrorResponse, ParameterStatus, NotificationResponse,
/// BindComplete and the three COPY responses.
static FROM_SERVER: [bool; 256] = table(b"ZESAGHW2");

/// What the connection task alone keeps while reading the stream.
struct Reader {
    wire: Arc<Wire>,
    to_server: Framer,
    from_server: Framer,
    /// Prepared statements whose SQL pins when executed, by name (usually empty).
    pinning_statements: HashMap<Box<[u8]>, (Reasons, Box<str>)>,
    /// Reported settings as they were when the startup finished, and as they are now.
    settings_at_start: Vec<Setting>,
    settings: Vec<Setting>,
    started: bool,
    settings_changed: bool,
    /// The server ignores a Sync that reaches it in copy-in mode. Syncs sent since the last
    /// Execute (before any CopyDone or CopyFail) are discounted when a CopyInResponse shows
    /// that Execute started one; `copy_in` is set from then until the copy ends.
    syncs_since_execute: u32,
    copy_in: bool,
    /// Requests written and not answered, oldest first, with their bounds: only those whose
    /// bound is earlier than every later request's (a request answered before a later one
    /// with an earlier or equal bound can never be the earliest bound left), so the bounds
    /// grow from front to back and the front is the earliest. Constant work per request
    /// however deep the pipeline (a scan of every request was quadratic in its depth).
    bounds: VecDeque<(u32, u64)>,
    /// In the answer being read: a BindComplete came; an error came before any.
    bind_complete: bool,
    error_before_bind: bool,
    /// `standard_conforming_strings` as the server last reported it (ParameterStatus, at the
    /// startup and whenever it changes, `SET LOCAL` and its end included).
    standard_strings: StandardStrings,
}

/// A request was written: counts it and keeps its bound, and the earliest bound of all.
fn track_request(wire: &Wire, bounds: &mut VecDeque<(u32, u64)>) {
    wire.count_sent();
    push_bound(bounds, wire.expected(), wire.bound_of_new_request());
    update_due(wire, bounds);
}

/// Adds request `n`'s bound, dropping the requests before it that no longer matter (their
/// bounds are not earlier than `n`'s, and they are answered first).
fn push_bound(bounds: &mut VecDeque<(u32, u64)>, n: u32, bound: u64) {
    while bounds.back().is_some_and(|&(_, b)| b >= bound) {
        bounds.pop_back();
    }
    bounds.push_back((n, bound));
}

/// Publishes the earliest bound of the requests still unanswered: the front's.
fn update_due(wire: &Wire, bounds: &VecDeque<(u32, u64)>) {
    let due = bounds.front().map_or(u64::MAX, |&(_, b)| b);
    wire.due
        .store(if due == u64::MAX { 0 } else { due }, Relaxed);
}

/// How the server will read `'...'` in a text sent now: as it last reported, unless a
/// request sent before is still unanswered and may change it first (unknown then). An
/// Execute counts once its Sync is sent; tokio-postgres sends the two together, never a Parse
/// between them.
fn strings_now(wire: &Wire, reported: StandardStrings) -> StandardStrings {
    if wire.facts().outstanding() > 0 {
        StandardStrings::Unknown
    } else {
        reported
    }
}

fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(p) => (&b[..p], &b[p + 1..]),
        None => (b, &[]),
    }
}

fn text(b: &[u8]) -> &str {
    match std::str::from_utf8(b) {
        Ok(s) => s,
        // Cut at the capture limit inside a character, or not UTF-8 at all.
        Err(e) => std::str::from_utf8(&b[..e.valid_up_to()]).unwrap_or(""),
    }
}

impl Reader {
    fn sent(&mut self, data: &[u8]) {
        let Reader {
            wire,
            to_server,
            pinning_statements,
            syncs_since_execute,
            copy_in,
            bounds,
            standard_strings,
            ..
        } = self;
        let capture = |tag| match tag {
            b'Q' | b'P' => SQL_CAPTURE,
            b'B' | b'C' => 256,
            _ => 0,
        };
        let ok = to_server.feed(data, capture, |tag, body| {
            if *copy_in && matches!(tag, b'Q' | b'P' | b'B' | b'C' | b'E' | b'F') {
                // Any message but copy data, CopyDone, CopyFail, Flush and Sync ends the
                // server's copy-in mode (failing the copy): the Syncs after it are answered.
                // tokio-postgres sends none during its own copy; one comes after a COPY it
                // cannot feed (a simple Query's), whose CopyInResponse its call fails at.
                *copy_in = false;
            }
            match tag {
                b'Q' => {
                    // The server reads a Query's whole text before it runs any of it.
                    let strings = strings_now(wire, *standard_strings);
                    track_request(wire, bounds);
                    *syncs_since_execute = 0;
                    let sql = text(body.strip_suffix(&[0]).unwrap_or(body));
                    let c = classify_with(sql, strings);
                    wire.pin(wire.rules.pinning_reasons(&c, Protocol::Simple), sql);
                }
                b'P' => {
                    let (name, rest) = cstr(body);
                    let (sql, _) = cstr(rest);
                    let sql = text(sql);
                    let c = classify_with(sql, strings_now(wire, *standard_strings));
                    // Today's proxies pin when the statement runs, the legacy ones at the Parse.
                    let parse_only = Classification {
                        reasons: Reasons::EMPTY,
                        ..c
                    };
                    wire.pin(
                        wire.rules.pinning_reasons(&parse_only, Protocol::Parse),
                        sql,
                    );
                    let at_run = wire.rules.pinning_reasons(&c, Protocol::Execute);
                    if at_run.is_empty() {
                        pinning_statements.remove(name);
                    } else {
                        pinning_statements.insert(name.into(), (at_run, truncate(sql, 120).into()));
                    }
                }
                b'B' if !pinning_statements.is_empty() => {
                    let (_portal, rest) = cstr(body);
                    let (name, _) = cstr(rest);
                    if let Some((reasons, sql)) = pinning_statements.get(name) {
                        wire.pin(*reasons, sql);
                    }
                }
                b'C' if body.first() == Some(&b'S') => {
                    pinning_statements.remove(cstr(&body[1..]).0);
                }
                b'E' => *syncs_since_execute = 0,
                b'S' if !*copy_in => {
                    track_request(wire, bounds);
                    *syncs_since_execute += 1;
                }
                b'c' | b'f' => {
                    *copy_in = false;
                    *syncs_since_execute = 0;
                }
                b'F' => {
                    // A function called by OID: nothing says what it does.
                    track_request(wire, bounds);
                    wire.pin(Reasons::of(Reason::Untracked), "(a protocol FunctionCall)");
                }
                _ => {}
            }
        });
        if !ok {
            wire.update(|f| f.set(GARBLED, true));
        }
    }

    fn received(&mut self, data: &[u8]) {
        let Reader {
            wire,
            from_server,
            settings_at_start,
            settings,
            started,
            settings_changed,
            syncs_since_execute,
            copy_in,
            bounds,
            bind_complete,
            error_before_bind,
            standard_strings,
            ..
        } = self;
        let capture = |tag| match tag {
            b'Z' => 1,
            b'E' => 1024,
            b'S' => 512,
            _ => 0,
        };
        let ok = from_server.feed(data, capture, |tag, body| match tag {
            b'Z' => {
                let status = body.first().copied().unwrap_or(0);
                if !*started {
                    *started = true;
                    *settings_at_start = settings.clone();
                } else if *settings_changed && status == b'I' {
                    // Outside a transaction block a reported setting that differs from the
                    // start is session state (SET LOCAL reverts before this point).
                    *settings_changed = false;
                    let changed = settings
                        .iter()
                        .find(|s| !settings_at_start.contains(s))
                        .map(|(name, _)| String::from_utf8_lossy(name).into_owned());
                    if let Some(name) = changed {
                        wire.pin(
                            Reasons::of(Reason::SessionChanged),
                            &format!("(the server reports a changed setting: {name})"),
                        );
                    }
                }
                wire.update(|f| {
                    f.set_status(status);
                    f.set(COPY, false);
                    f.set_outstanding(f.outstanding().saturating_sub(1));
                });
                if std::mem::take(error_before_bind) {
                    wire.failed_before_bind_complete
                        .store(wire.ready.load(Relaxed).wrapping_add(1), SeqCst);
                }
                *bind_complete = false;
                wire.count_ready();
                let ready = wire.ready.load(Relaxed);
                while bounds
                    .front()
                    .is_some_and(|&(n, _)| (ready.wrapping_sub(n) as i32) >= 0)
                {
                    bounds.pop_front();
                }
                update_due(wire, bounds);
            }
            b'2' => *bind_complete = true,
            b'G' => {
                // The Syncs sent after the Execute that started this copy reach the server in
                // copy-in mode, which ignores them: no ReadyForQuery will answer them.
                let ignored = *syncs_since_execute;
                wire.update(|f| {
                    f.set(COPY, true);
                    f.set_outstanding(f.outstanding().saturating_sub(ignored));
                });
                wire.expected
                    .store(wire.expected().wrapping_sub(ignored), Relaxed);
                // The copy itself stays bounded by the request that started it (its data
                // phase has no request of its own; a server or proxy that stops reading would
                // block the writes unbounded): the earliest of the ignored Syncs' bounds goes
                // to the number the copy's closing Sync will have, whose ReadyForQuery ends it.
                // The ignored Syncs are the requests numbered past `expected` now; the earliest
                // of their bounds is among those kept (the last request is always kept, and
                // each dropped one had a bound no earlier than a later one's). A request
                // dropped for one of theirs has a bound no earlier than the copy's.
                let last = wire.expected();
                let mut copy_bound = None::<u64>;
                while let Some(&(n, b)) = bounds.back()
                    && (n.wrapping_sub(last) as i32) > 0
                {
                    bounds.pop_back();
                    copy_bound = Some(copy_bound.map_or(b, |c| c.min(b)));
                }
                if let Some(b) = copy_bound {
                    push_bound(bounds, wire.next_request(), b);
                }
                update_due(wire, bounds);
                *syncs_since_execute = 0;
                *copy_in = true;
            }
            b'H' | b'W' => wire.update(|f| f.set(COPY, true)),
            b'E' if fatal(body) => wire.update(|f| f.set(FATAL, true)),
            b'E' => *error_before_bind |= !*bind_complete,
            b'A' => wire.pin(
                Reasons::of(Reason::Listen),
                "(a notification arrived: the session listens)",
            ),
            b'S' => {
                let (name, rest) = cstr(body);
                let (value, _) = cstr(rest);
                if name == b"standard_conforming_strings" {
                    *standard_strings = match value {
                        b"on" => StandardStrings::On,
                        b"off" => StandardStrings::Off,
                        _ => StandardStrings::Unknown,
                    };
                }
                match settings.iter_mut().find(|(n, _)| &**n == name) {
                    Some((_, v)) => *v = value.into(),
                    None => settings.push((name.into(), value.into())),
                }
                *settings_changed |= *started;
            }
            _ => {}
        });
        if !ok {
            wire.update(|f| f.set(GARBLED, true));
        }
    }
}

/// True for an ErrorResponse whose severity is FATAL or PANIC.
fn fatal(mut fields: &[u8]) -> bool {
    let mut severity: Option<&[u8]> = None;
    while let Some((&code, rest)) = fields.split_first() {
        if code == 0 {
            break;
        }
        let (value, rest) = cstr(rest);
        match code {
            // The non-localized severity (PostgreSQL 9.6+) wins over the localized one.
            b'V' => severity = Some(value),
            b'S' if severity.is_none() => severity = Some(value),
            _ => {}
        }
        fields = rest;
    }
    matches!(severity, Some(b"FATAL" | b"PANIC"))
}

/// A stream whose traffic is read by a [`Wire`].
pub(crate) struct Observed<S> {
    inner: S,
    reader: Reader,
}

impl<S> Observed<S> {
    pub(crate) fn new(inner: S, wire: Arc<Wire>) -> Observed<S> {
        Observed {
            inner,
            reader: Reader {
                wire,
                to_server: Framer::new(true, &TO_SERVER),
                from_server: Framer::new(false, &FROM_SERVER),
                pinning_statements: HashMap::new(),
                settings_at_start: Vec::new(),
                settings: Vec::new(),
                started: false,
                settings_changed: false,
                syncs_since_execute: 0,
                copy_in: false,
                bounds: VecDeque::new(),
                bind_complete: false,
                error_before_bind: false,
                standard_strings: StandardStrings::Unknown,
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Observed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.reader.received(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Observed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) => {
                this.reader.wire.count_written(*n);
                this.reader.sent(&buf[..*n]);
            }
            // A TLS layer below may have put records on the socket before the error it
            // returns (tokio-rustls reports a later write's failure for the whole call): what
            // it was given may have been sent.
            Poll::Ready(Err(_)) => this.reader.wire.count_written(buf.len().max(1)),
            Poll::Pending => {}
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Err(_)) = r {
            // As for a write: a TLS layer's failed flush may follow records it sent.
            this.reader.wire.count_written(1);
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for Observed<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kept_bounds_front_is_the_earliest_bound_of_the_requests_unanswered() {
        // Against a model that keeps every request: random writes (bounds not in order, some
        // unbounded) and answers.
        let mut kept = std::collections::VecDeque::new();
        let mut all = std::collections::VecDeque::new();
        let (mut written, mut answered, mut x) = (0u32, 0u32, 12345u64);
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (x >> 33) % 3 != 0 || written == answered {
                written += 1;
                let b = if (x >> 20) % 10 == 0 {
                    u64::MAX
                } else {
                    (x >> 40) % 1000
                };
                super::push_bound(&mut kept, written, b);
                all.push_back((written, b));
            } else {
                answered += 1;
                while kept.front().is_some_and(|&(n, _)| n <= answered) {
                    kept.pop_front();
                }
                while all.front().is_some_and(|&(n, _)| n <= answered) {
                    all.pop_front();
                }
            }
            let model = all.iter().map(|&(_, b)| b).min();
            assert_eq!(kept.front().map(|&(_, b)| b), model);
        }
    }

    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn startup() -> Vec<u8> {
        let mut m = 8u32.to_be_bytes().to_vec();
        m.extend_from_slice(&196608u32.to_be_bytes());
        m
    }

    fn reader() -> Reader {
        Observed::new((), Wire::new(PinRules::new())).reader
    }

    /// Feeds `bytes` in every chunk size from 1 to 7, as a socket may deliver them.
    fn feed_chunked(r: &mut Reader, bytes: &[u8], sent: bool, chunk: usize) {
        for c in bytes.chunks(chunk) {
            if sent {
                r.sent(c);
            } else {
                r.received(c);
            }
        }
    }

    #[test]
    fn ready_for_query_and_requests_are_counted_in_any_chunking() {
        for chunk in 1..8 {
            let mut r = reader();
            feed_chunked(&mut r, &startup(), true, chunk);
            let mut from = msg(b'R', &[0, 0, 0, 0]);
            from.extend(msg(b'S', b"TimeZone\0UTC\0"));
            from.extend(msg(b'Z', b"I"));
            feed_chunked(&mut r, &from, false, chunk);
            assert_eq!(r.wire.facts().outstanding(), 0);
            assert_eq!(r.wire.status(), TxnStatus::Idle);
            let mut to = msg(b'Q', b"BEGIN\0");
            to.extend(msg(b'P', b"s1\0SELECT 1\0\0\0"));
            to.extend(msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
            to.extend(msg(b'E', b"\0\0\0\0\0"));
            to.extend(msg(b'S', b""));
            feed_chunked(&mut r, &to, true, chunk);
            assert_eq!(r.wire.facts().outstanding(), 2);
            feed_chunked(&mut r, &msg(b'Z', b"T"), false, chunk);
            assert_eq!(r.wire.facts().outstanding(), 1);
            assert_eq!(r.wire.status(), TxnStatus::InTransaction);
            feed_chunked(&mut r, &msg(b'Z', b"T"), false, chunk);
            assert_eq!(r.wire.facts().outstanding(), 0);
            assert!(r.wire.pinned().is_empty());
        }
    }

    #[test]
    fn a_pinning_statement_pins_when_bound_not_when_parsed() {
        let mut r = reader();
        r.sent(&startup());
        r.received(&msg(b'Z', b"I"));
        r.sent(&msg(b'P', b"s7\0SELECT nextval('q')\0\0\0"));
        assert!(r.wire.pinned().is_empty());
        r.sent(&msg(b'B', b"\0s7\0\0\0\0\0\0\0"));
        assert!(r.wire.pinned().contains(Reason::SequenceFunction));
        assert_eq!(r.wire.first_pin().as_deref(), Some("SELECT nextval('q')"));
    }

    #[test]
    fn copy_fatal_notifications_and_changed_settings_are_seen() {
        let mut r = reader();
        r.sent(&startup());
        r.received(&msg(b'S', b"TimeZone\0UTC\0"));
        r.received(&msg(b'Z', b"I"));
        r.sent(&msg(b'Q', b"COPY t FROM STDIN\0"));
        r.received(&msg(b'G', b"\0\0\0"));
        assert!(r.wire.facts().copy_open());
        // A setting changed inside a transaction and reverted by its end is not session state.
        r.received(&msg(b'Z', b"I"));
        r.received(&msg(b'S', b"TimeZone\0Asia/Tokyo\0"));
        r.received(&msg(b'Z', b"T"));
        r.received(&msg(b'S', b"TimeZone\0UTC\0"));
        r.received(&msg(b'Z', b"I"));
        assert!(r.wire.pinned().is_empty());
        r.received(&msg(b'S', b"TimeZone\0Asia/Tokyo\0"));
        r.received(&msg(b'Z', b"I"));
        assert!(r.wire.pinned().contains(Reason::SessionChanged));
        r.received(&msg(b'A', b"\0\0\0\x01ch\0\0"));
        assert!(r.wire.pinned().contains(Reason::Listen));
        assert!(!r.wire.facts().broken());
        r.received(&msg(b'E', b"SFATAL\0VFATAL\0C57P01\0Mterminating\0\0"));
        assert!(r.wire.facts().broken());
    }

    #[test]
    fn syncs_sent_into_copy_in_mode_are_not_counted() {
        let mut r = reader();
        r.sent(&startup());
        r.received(&msg(b'Z', b"I"));
        // As tokio-postgres's copy_in: Bind, Execute, Sync; then data, CopyDone, Sync.
        let mut to = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        to.extend(msg(b'E', b"\0\0\0\0\0"));
        to.extend(msg(b'S', b""));
        r.sent(&to);
        r.received(&msg(b'2', b""));
        r.received(&msg(b'G', b"\0\0\0"));
        assert_eq!(r.wire.facts().outstanding(), 0);
        r.sent(&msg(b'S', b"")); // ignored in copy-in mode, as the server ignores it
        let mut to = msg(b'd', b"1\n");
        to.extend(msg(b'c', b""));
        to.extend(msg(b'S', b""));
        r.sent(&to);
        assert_eq!(r.wire.facts().outstanding(), 1);
        r.received(&msg(b'C', b"COPY 1\0"));
        r.received(&msg(b'Z', b"I"));
        assert_eq!(r.wire.facts().outstanding(), 0);
        assert!(!r.wire.facts().copy_open());
    }

    proptest::proptest! {
        /// However a socket cuts the bytes, the same messages come out.
        #[test]
        fn any_chunking_yields_the_same_messages(
            msgs in proptest::collection::vec(
                (proptest::sample::select(b"QPBDZECSdc".to_vec()),
                 proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)),
                0..20),
            cuts in proptest::collection::vec(1usize..50, 1..40),
        ) {
            let bytes: Vec<u8> = msgs.iter().flat_map(|(t, b)| msg(*t, b)).collect();
            let events = |chunks: &[&[u8]]| {
                static ALL: [bool; 256] = table(b"QPBDZECSdc");
                let mut f = Framer::new(false, &ALL);
                let mut out = Vec::new();
                for c in chunks {
                    assert!(f.feed(c, |_| 8, |t, b| out.push((t, b.to_vec()))));
                }
                out
            };
            let whole = events(&[&bytes]);
            let mut chunks = Vec::new();
            let mut rest = &bytes[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (a, b) = rest.split_at((*c).min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            proptest::prop_assert_eq!(&whole, &events(&chunks));
            let want: Vec<(u8, Vec<u8>)> =
                msgs.iter().map(|(t, b)| (*t, b[..b.len().min(8)].to_vec())).collect();
            proptest::prop_assert_eq!(whole, want);
        }
    }

    #[tokio::test]
    async fn a_wait_for_ready_for_query_ends_with_the_connection() {
        let mut r = reader();
        r.sent(&startup());
        r.received(&msg(b'Z', b"I"));
        r.sent(&msg(b'Q', b"SELECT pg_sleep(5)\0"));
        let target = r.wire.next_request() - 1;
        let wire = r.wire.clone();
        let waiting = tokio::spawn(async move { wire.ready_for(target).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // A FATAL, then the socket closes: no ReadyForQuery follows.
        r.received(&msg(b'E', b"SFATAL\0VFATAL\0C57P01\0Mterminating\0\0"));
        r.wire.end();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("the wait ends with the connection")
            .unwrap();
        assert!(!r.wire.reached(target));
    }

    /// Accepts at most `take` bytes a write, then fails once `left` writes have been made.
    struct Trickle {
        take: usize,
        left: usize,
        got: Vec<u8>,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.left == 0 {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            this.left -= 1;
            let n = buf.len().min(this.take);
            this.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn written_counts_the_bytes_the_stream_below_accepted() {
        use tokio::io::AsyncWriteExt;
        let wire = Wire::new(PinRules::new());
        let inner = Trickle {
            take: 3,
            left: 4,
            got: Vec::new(),
        };
        let mut s = Observed::new(inner, wire.clone());
        assert_eq!(wire.written(), 0);
        let mut bytes = startup();
        bytes.extend(msg(b'Q', b"SELECT 1\0"));
        // Four writes of three bytes are accepted, then the stream fails: what it took is
        // counted, however little of a message that is, and the failed write counts too (a TLS
        // layer may fail a write after sending part of it).
        assert!(s.write_all(&bytes).await.is_err());
        assert!(wire.written() > 12, "{}", wire.written());
        assert_eq!(s.inner.got.len(), 12);
        assert_eq!(wire.sent(), 0, "the Query was not written whole");
    }

    #[test]
    fn a_broken_frame_marks_the_stream_garbled() {
        let mut r = reader();
        r.sent(&startup());
        r.received(&[b'Z', 0, 0, 0, 1]);
        assert!(r.wire.facts().broken());
    }

    /// A reader after a startup whose ParameterStatus says `standard_conforming_strings`.
    fn started(rules: PinRules, standard_strings: &[u8]) -> Reader {
        let mut r = Observed::new((), Wire::new(rules)).reader;
        r.sent(&startup());
        let mut body = b"standard_conforming_strings\0".to_vec();
        body.extend_from_slice(standard_strings);
        body.push(0);
        let mut from = msg(b'R', &[0, 0, 0, 0]);
        from.extend(msg(b'S', &body));
        from.extend(msg(b'Z', b"I"));
        r.received(&from);
        r
    }

    /// With `standard_conforming_strings = off`, `'a\''` is a whole string and the call after
    /// it runs; with `on`, the call is inside a string.
    const ESCAPED_CALL: &[u8] = b"SELECT 'a\\'' , pg_advisory_lock(1), 'b'\0";

    #[test]
    fn a_query_is_read_as_the_reported_setting_reads_backslashes() {
        let mut off = started(PinRules::new(), b"off");
        off.sent(&msg(b'Q', ESCAPED_CALL));
        assert_eq!(off.wire.pinned(), Reasons::of(Reason::AdvisoryLock));
        let mut parse = started(PinRules::new(), b"off");
        let mut body = b"s1\0".to_vec();
        body.extend_from_slice(ESCAPED_CALL);
        body.extend_from_slice(&[0, 0]);
        parse.sent(&msg(b'P', &body));
        parse.sent(&msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
        assert_eq!(parse.wire.pinned(), Reasons::of(Reason::AdvisoryLock));
        let mut on = started(PinRules::new(), b"on");
        on.sent(&msg(b'Q', ESCAPED_CALL));
        assert!(on.wire.pinned().is_empty());
    }

    /// `SET LOCAL` changes the setting inside a transaction; the server reports it at once,
    /// and again when the transaction ends.
    #[test]
    fn set_local_standard_conforming_strings_is_followed() {
        let rules = PinRules::new().set_local_safe(true);
        let set_local = |r: &mut Reader| {
            r.sent(&msg(b'Q', b"BEGIN\0"));
            r.received(&msg(b'Z', b"T"));
            r.sent(&msg(b'Q', b"SET LOCAL standard_conforming_strings = off\0"));
            let mut from = msg(b'S', b"standard_conforming_strings\0off\0");
            from.extend(msg(b'Z', b"T"));
            r.received(&from);
        };
        let mut r = started(rules, b"on");
        set_local(&mut r);
        assert!(r.wire.pinned().is_empty());
        r.sent(&msg(b'Q', ESCAPED_CALL));
        assert_eq!(r.wire.pinned(), Reasons::of(Reason::AdvisoryLock));
        let mut r = started(rules, b"on");
        set_local(&mut r);
        r.sent(&msg(b'Q', b"COMMIT\0"));
        let mut from = msg(b'S', b"standard_conforming_strings\0on\0");
        from.extend(msg(b'Z', b"I"));
        r.received(&from);
        r.sent(&msg(b'Q', ESCAPED_CALL));
        assert!(r.wire.pinned().is_empty());
    }

    /// A text sent behind a request not yet answered is read before the server reports what
    /// that request did to the setting: both readings count.
    #[test]
    fn a_text_sent_behind_an_unanswered_request_is_read_both_ways() {
        let rules = PinRules::new().set_local_safe(true);
        let mut r = started(rules, b"on");
        r.sent(&msg(b'Q', b"BEGIN\0"));
        r.sent(&msg(b'Q', b"SET LOCAL standard_conforming_strings = off\0"));
        r.sent(&msg(b'Q', ESCAPED_CALL));
        assert_eq!(r.wire.pinned(), Reasons::of(Reason::AdvisoryLock));
        let mut unknown = Observed::new((), Wire::new(rules)).reader;
        unknown.sent(&startup());
        unknown.received(&msg(b'Z', b"I"));
        unknown.sent(&msg(b'Q', ESCAPED_CALL));
        assert_eq!(unknown.wire.pinned(), Reasons::of(Reason::AdvisoryLock));
    }

    /// A COPY FROM STDIN started by a simple Query (tokio-postgres's `simple_query` or
    /// `batch_execute` cannot feed it and fails at the CopyInResponse) ends, for the server, at
    /// the next message that is not copy data: a Parse fails the copy with an error, the Query
    /// gets its ReadyForQuery, and the Sync behind the Parse is answered as usual. The observer
    /// must count that Sync and every later one.
    #[test]
    fn a_copy_ended_by_the_servers_error_does_not_stop_the_count_of_syncs() {
        let mut r = started(PinRules::new(), b"on");
        r.sent(&msg(b'Q', b"COPY t FROM STDIN\0"));
        r.received(&msg(b'G', b"\0\0\0"));
        // The next call on the client: prepare (Parse, Describe, Sync).
        let mut to = msg(b'P', b"\0SELECT 1\0\0\0");
        to.extend(msg(b'D', b"S\0"));
        to.extend(msg(b'S', b""));
        r.sent(&to);
        assert_eq!(
            r.wire.facts().outstanding(),
            2,
            "the Query and the Sync wait"
        );
        let mut from = msg(
            b'E',
            b"SERROR\0VERROR\0C08P01\0Munexpected message type 0x50 during COPY\0\0",
        );
        from.extend(msg(b'Z', b"I"));
        from.extend(msg(
            b'E',
            b"SERROR\0VERROR\0C26000\0Munnamed prepared statement does not exist\0\0",
        ));
        from.extend(msg(b'Z', b"I"));
        r.received(&from);
        assert_eq!(r.wire.facts().outstanding(), 0);
        let next = r.wire.next_request();
        assert!(
            !r.wire.reached(next),
            "more ReadyForQuery counted than requests"
        );
        // A later extended-protocol call is a request waiting for its ReadyForQuery, with its
        // bound.
        let mut to = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        to.extend(msg(b'E', b"\0\0\0\0\0"));
        to.extend(msg(b'S', b""));
        r.sent(&to);
        assert_eq!(r.wire.facts().outstanding(), 1);
        assert!(!r.wire.reached(next));
    }
}
