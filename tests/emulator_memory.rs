//! What a hostile client can make the emulator hold in memory (issue 22, finding 7). The tests
//! measure the process's resident memory (`VmRSS`), so they live alone in this file's process
//! and run one at a time.
#![cfg(all(feature = "emulator", target_os = "linux"))]

mod common;

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One memory test at a time: each reads the resident memory of the whole process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: usize = 1 << 20;

/// The process's resident memory, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// A raw client logged in to the emulator as `app`.
async fn login(addr: std::net::SocketAddr, app: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [
            ("user", "postgres"),
            ("database", "postgres"),
            ("application_name", app),
        ],
        &mut out,
    )
    .unwrap();
    s.write_all(&out).await.unwrap();
    let tags = until_ready(&mut s).await;
    assert!(tags.contains(&b'R'), "logged in: {tags:?}");
    s
}

/// Reads until a ReadyForQuery; returns the tags of the messages before it.
async fn until_ready(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let mut tags = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let tag = buf[0];
            buf.advance(1 + len);
            if tag == b'Z' {
                return tags;
            }
            tags.push(tag);
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read_buf(&mut buf))
            .await
            .expect("the emulator answers")
            .unwrap();
        assert!(
            n > 0,
            "the emulator closed the connection; tags so far {tags:?}"
        );
    }
}

/// A simple Query message for `sql`.
fn query(sql: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out).unwrap();
    out.to_vec()
}

/// Writes `bytes` repeatedly, up to `total` bytes, and stops early once a write has waited
/// `stall` (the emulator stopped reading). Returns the bytes written.
async fn send_until_stalled(
    s: &mut TcpStream,
    bytes: &[u8],
    total: usize,
    stall: Duration,
) -> usize {
    let mut sent = 0;
    while sent < total {
        let at = sent % bytes.len();
        let end = bytes.len().min(at + (total - sent));
        match tokio::time::timeout(stall, s.write(&bytes[at..end])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => sent += n,
        }
    }
    sent
}

/// The header of a Query message whose body declares `len` bytes.
fn query_header(len: usize) -> Vec<u8> {
    let mut h = vec![b'Q'];
    h.extend(((len + 4) as i32).to_be_bytes());
    h
}

/// Six logged-in clients each send the start of a huge message, and a client queued for a
/// database connection pipelines 1 MiB queries; the emulator must not keep what they send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_make_the_emulator_hold_what_they_send() {
    const APP: &str = "em_memory_hostile";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 1, |c| c.borrow_timeout(Duration::from_secs(60))).await;
    let addr = emu.addr();

    // The only database connection is held by a transaction: everyone else queues.
    let mut holder = login(addr, "em_memory_holder").await;
    holder.write_all(&query("BEGIN")).await.unwrap();
    until_ready(&mut holder).await;

    const PARTIAL: usize = 48 * MIB;
    const PARTIAL_CLIENTS: usize = 6;
    const PIPELINED: usize = 96;
    // What the clients send is one 1 MiB buffer, written again and again, allocated before
    // the first measure.
    let chunk = std::sync::Arc::new(vec![b'x'; MIB]);
    let one = query(&format!("SELECT '{}'", "y".repeat(MIB - 16)));
    let before = rss_mib();
    let mut partial = Vec::new();
    for i in 0..PARTIAL_CLIENTS {
        let mut s = login(addr, &format!("em_memory_partial{i}")).await;
        let chunk = chunk.clone();
        partial.push(tokio::spawn(async move {
            // A Query declaring about 1 GiB, of which PARTIAL bytes are sent.
            s.write_all(&query_header((1 << 30) - 64)).await.unwrap();
            s.write_all(b"SELECT '").await.unwrap();
            let sent =
                send_until_stalled(&mut s, &chunk, PARTIAL, Duration::from_millis(700)).await;
            (s, sent)
        }));
    }
    // 1 MiB queries, complete, pipelined by a client that waits in the borrow queue.
    let pipeline = PIPELINED * one.len();
    let mut pipeliner = login(addr, "em_memory_pipeliner").await;
    let piped =
        send_until_stalled(&mut pipeliner, &one, pipeline, Duration::from_millis(700)).await;
    let mut partial_sent = Vec::new();
    let mut partial_clients = Vec::new();
    for t in partial {
        let (s, sent) = t.await.unwrap();
        partial_sent.push(sent);
        partial_clients.push(s);
    }
    // Let the emulator read whatever it is going to read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss_mib();
    let sent_mib = (partial_sent.iter().sum::<usize>() + piped) as f64 / MIB as f64;
    eprintln!(
        "RSS before {before:.1} MiB, during the attack {during:.1} MiB (+{:.1}); sent {sent_mib:.1} MiB (partial: {:?} MiB each; pipelined {:.1} MiB of {PIPELINED} MiB); {:?}",
        during - before,
        partial_sent.iter().map(|n| n / MIB).collect::<Vec<_>>(),
        piped as f64 / MIB as f64,
        emu.counters(),
    );
    assert!(
        during - before < 40.0,
        "the emulator grew by {:.1} MiB while hostile clients sent {sent_mib:.1} MiB",
        during - before
    );
    // Throttled: none of them got all of it in.
    for sent in &partial_sent {
        assert!(
            *sent < PARTIAL,
            "a partial message was read whole: {sent} bytes"
        );
    }
    assert!(
        piped < pipeline,
        "every pipelined query was read while queued"
    );

    // The attackers leave; the holder commits; an honest client is served.
    drop(partial_clients);
    drop(pipeliner);
    holder.write_all(&query("COMMIT")).await.unwrap();
    until_ready(&mut holder).await;
    drop(holder);
    let (client, conn) =
        tokio_postgres::connect(&emu.url("postgres", "postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let row = tokio::time::timeout(
        Duration::from_secs(20),
        client.query_one("SELECT 41 + 1", &[]),
    )
    .await
    .expect("an honest client is served after the attack")
    .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(
        common::eventually(10, || async { emu.counters().clients == 1 }).await,
        "the attackers' sessions ended: {:?}",
        emu.counters()
    );
}
