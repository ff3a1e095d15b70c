//! The network between the client and the emulator, and between the emulator and the
//! database: a socket used as it is (no latency: today's path, no task and no timer), or
//! behind a modelled hop with a one-way latency.
//!
//! A hop is a delay line in each direction: each chunk read from one side is written to the
//! other `latency` after it was read, in order; chunks read while earlier ones are still in
//! flight are not held up by them (a chunk read at `t` is written at `t + latency`), as on a
//! real link. The connecting side's first bytes wait one more round trip, the TCP handshake
//! the loopback connect skipped. Delays are kept by one thread of the emulator's own
//! ([`Delay`]): tokio's timer rounds up to whole milliseconds, which would turn an in-VPC
//! hop of a fraction of a millisecond into one of a millisecond or more.

use std::collections::BinaryHeap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The most bytes one read of a hop takes.
const READ: usize = 16 * 1024;

/// The most chunks in flight in one direction of a hop: with [`READ`], at most 512 KiB per
/// direction (the reader waits when the line is full, so a fast sender is slowed down).
const IN_FLIGHT: usize = 32;

/// A socket, used as it is or behind a modelled hop.
pub(crate) enum Socket {
    /// No latency: the socket itself.
    Direct(TcpStream),
    /// The emulator's end of a hop whose task holds the socket.
    Delayed(DuplexStream),
}

/// Which side opened the TCP connection: its first bytes also wait for the handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opened {
    /// By the peer (a client the emulator accepted).
    ByPeer,
    /// By the emulator (a database connection).
    ByEmulator,
}

impl Socket {
    /// `tcp` behind a hop with this one-way latency; with none, `tcp` itself.
    pub(crate) fn new(tcp: TcpStream, latency: Duration, opened: Opened) -> Socket {
        if latency.is_zero() {
            return Socket::Direct(tcp);
        }
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(hop(tcp, far, latency, opened));
        Socket::Delayed(near)
    }

    /// True when the peer closed this idle socket or sent something nobody asked for (a
    /// FATAL before a close), without waiting. Behind a hop, what arrived is put in `rbuf`.
    pub(crate) fn closed_or_spoke(&mut self, rbuf: &mut bytes::BytesMut) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self {
            Socket::Direct(tcp) => {
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                tcp.poll_peek(&mut cx, &mut buf).is_ready()
            }
            Socket::Delayed(d) => {
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                match Pin::new(d).poll_read(&mut cx, &mut buf) {
                    Poll::Pending => false,
                    Poll::Ready(_) => {
                        rbuf.extend_from_slice(buf.filled());
                        true
                    }
                }
            }
        }
    }
}

/// The hop's task: a delay line each way. The emulator closing its end ends the hop once what
/// it wrote is delivered; the peer closing its end is passed on, and the hop then waits for
/// the emulator to close.
async fn hop(tcp: TcpStream, far: DuplexStream, latency: Duration, opened: Opened) {
    let start = Instant::now();
    // The connecting side's first bytes: its SYN, the SYN-ACK, then the bytes themselves.
    let handshake = start + latency * 3;
    let (inbound_floor, outbound_floor) = match opened {
        Opened::ByPeer => (handshake, start),
        Opened::ByEmulator => (start, handshake),
    };
    let (tcp_read, tcp_write) = tcp.into_split();
    let (far_read, far_write) = tokio::io::split(far);
    let inbound = delay_line(tcp_read, far_write, latency, inbound_floor);
    let outbound = delay_line(far_read, tcp_write, latency, outbound_floor);
    let mut inbound = std::pin::pin!(inbound);
    let mut outbound = std::pin::pin!(outbound);
    tokio::select! {
        () = &mut outbound => {}
        () = &mut inbound => outbound.await,
    }
}

/// Copies `src` to `dst`, each chunk written `latency` after it was read (not before
/// `floor`), then shuts `dst` down.
async fn delay_line(
    mut src: impl AsyncRead + Unpin,
    mut dst: impl AsyncWrite + Unpin,
    latency: Duration,
    floor: Instant,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(IN_FLIGHT);
    let reader = async move {
        let mut buf = vec![0u8; READ];
        while let Ok(n @ 1..) = src.read(&mut buf).await {
            let due = (Instant::now() + latency).max(floor);
            if tx
                .send((due, Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
            {
                break;
            }
        }
        // Dropping `tx` ends the writer once the line is empty.
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            Delay::until(due).await;
            if dst.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = dst.shutdown().await;
    };
    tokio::join!(reader, writer);
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Direct(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Delayed(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Direct(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Delayed(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Direct(s) => Pin::new(s).poll_flush(cx),
            Socket::Delayed(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Direct(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Delayed(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A wait until an instant, kept to a fraction of a millisecond by the delay thread (a
/// condition variable's timed wait: the kernel's timer slack, 50 µs by default on Linux).
pub(crate) struct Delay {
    due: Instant,
    slot: Option<Arc<Slot>>,
}

#[derive(Default)]
struct Slot {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

struct Entry {
    due: Instant,
    seq: u64,
    slot: Arc<Slot>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// The earliest first out of the (max-)heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// The delay thread's queue.
struct Timer {
    heap: Mutex<BinaryHeap<Entry>>,
    changed: Condvar,
    seq: AtomicU64,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::new(Timer {
            heap: Mutex::new(BinaryHeap::new()),
            changed: Condvar::new(),
            seq: AtomicU64::new(0),
        }));
        std::thread::Builder::new()
            .name("pinpool-emulator-delays".into())
            .spawn(move || t.run())
            .expect("the emulator's delay thread");
        t
    })
}

impl Timer {
    fn run(&self) {
        let mut heap = crate::sync::lock(&self.heap);
        loop {
            let now = Instant::now();
            let wait = match heap.peek() {
                Some(e) if e.due <= now => {
                    let e = heap.pop().expect("peeked");
                    e.slot.fired.store(true, Ordering::SeqCst);
                    if let Some(w) = crate::sync::lock(&e.slot.waker).take() {
                        w.wake();
                    }
                    continue;
                }
                Some(e) => Some(e.due - now),
                None => None,
            };
            heap = match wait {
                Some(d) => {
                    self.changed
                        .wait_timeout(heap, d)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(heap)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            };
        }
    }

    fn add(&self, due: Instant, slot: Arc<Slot>) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut heap = crate::sync::lock(&self.heap);
        let earliest = heap.peek().is_none_or(|e| due < e.due);
        heap.push(Entry { due, seq, slot });
        drop(heap);
        if earliest {
            self.changed.notify_one();
        }
    }
}

impl Delay {
    pub(crate) fn until(due: Instant) -> Delay {
        Delay { due, slot: None }
    }
}

impl std::future::Future for Delay {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.due {
            return Poll::Ready(());
        }
        let slot = match &this.slot {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Slot::default());
                *crate::sync::lock(&s.waker) = Some(cx.waker().clone());
                timer().add(this.due, s.clone());
                this.slot = Some(s);
                return Poll::Pending;
            }
        };
        // The waker first, then the flag: a firing in between is seen by one or the other.
        *crate::sync::lock(&slot.waker) = Some(cx.waker().clone());
        if slot.fired.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
