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
    let tags = common::until_ready(&mut s).await;
    assert!(tags.contains(&b'R'), "logged in: {tags:?}");
    s
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
    common::until_ready(&mut holder).await;

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
    common::until_ready(&mut holder).await;
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

/// One message from the emulator; of a DataRow only the first 64 bytes are kept.
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

impl Msg {
    /// An ErrorResponse's field (`b'S'` severity, `b'C'` SQLSTATE, `b'M'` message).
    fn field(&self, code: u8) -> Option<String> {
        let mut fields = self.body.split(|&b| b == 0);
        fields.find_map(|f| {
            (f.first() == Some(&code)).then(|| String::from_utf8_lossy(&f[1..]).into_owned())
        })
    }

    /// A DataRow's first column, as text (when kept whole), and its length.
    fn first_column(&self) -> (String, usize) {
        let len = i32::from_be_bytes(self.body[2..6].try_into().unwrap()) as usize;
        let text = String::from_utf8_lossy(&self.body[6..self.body.len().min(6 + len)]);
        (text.into_owned(), len)
    }
}

/// The next message, without holding a long DataRow; `None` once the emulator closed.
async fn next_msg(s: &mut TcpStream) -> Option<Msg> {
    let read = async {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.ok()?;
        let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize - 4;
        let keep = if head[0] == b'D' { len.min(64) } else { len };
        let mut body = vec![0; keep];
        s.read_exact(&mut body).await.ok()?;
        let mut rest = len - keep;
        let mut sink = vec![0; 64 * 1024];
        while rest > 0 {
            let n = s.read(&mut sink[..rest.min(64 * 1024)]).await.ok()?;
            if n == 0 {
                return None;
            }
            rest -= n;
        }
        Some(Msg { tag: head[0], body })
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the emulator answers or closes")
}

/// The messages up to a ReadyForQuery (included), or up to the end of the stream.
async fn replies(s: &mut TcpStream) -> Vec<Msg> {
    let mut out = Vec::new();
    while let Some(m) = next_msg(s).await {
        let done = m.tag == b'Z';
        out.push(m);
        if done {
            break;
        }
    }
    out
}

/// Asserts that `got` is a FATAL protocol violation, "invalid message length", and then the
/// end of the session.
fn assert_refused(got: &[Msg], what: &str) {
    let [e] = got else {
        panic!(
            "{what}: one ErrorResponse then the end, got tags {:?}",
            got.iter().map(|m| m.tag as char).collect::<String>()
        );
    };
    assert_eq!(e.tag, b'E', "{what}");
    assert_eq!(
        (
            e.field(b'S').as_deref(),
            e.field(b'C').as_deref(),
            e.field(b'M').as_deref()
        ),
        (Some("FATAL"), Some("08P01"), Some("invalid message length")),
        "{what}"
    );
}

/// An honest client through the emulator: `SELECT 41 + 1` answers 42.
async fn honest_query(emu: &pinpool::emulator::Emulator) {
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
    .expect("an honest client is served")
    .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}

#[tokio::test]
async fn messages_over_postgres_limits_are_refused_with_a_fatal_protocol_violation() {
    const APP: &str = "em_memory_refused";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 2, |c| c.max_message_bytes(MIB)).await;
    let addr = emu.addr();
    // A Query longer than the configured limit (its start sent, the rest never).
    let mut s = login(addr, "em_memory_refused_q").await;
    s.write_all(&query_header(MIB + 1)).await.unwrap();
    s.write_all(b"SELECT 1").await.unwrap();
    assert_refused(&replies(&mut s).await, "a Query over max_message_bytes");
    // A length no message can have, and a Sync over PostgreSQL's 10,000 bytes for small
    // messages.
    let mut s = login(addr, "em_memory_refused_huge").await;
    s.write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await.unwrap();
    assert_refused(&replies(&mut s).await, "a Query of 2 GiB");
    let mut s = login(addr, "em_memory_refused_sync").await;
    s.write_all(&[b'S', 0, 0, 0x27, 0x11]).await.unwrap();
    assert_refused(&replies(&mut s).await, "a Sync of 10,001 bytes");
    // Inside a transaction, with the database connection held: the same.
    let mut s = login(addr, "em_memory_refused_txn").await;
    s.write_all(&query("BEGIN")).await.unwrap();
    common::until_ready(&mut s).await;
    s.write_all(&query_header(MIB + 1)).await.unwrap();
    assert_refused(
        &replies(&mut s).await,
        "a Query over the limit in a transaction",
    );
    assert_eq!(emu.counters().refused_messages, 4);
    // Before login: a password message over PostgreSQL's 65,535 bytes.
    let pw = common::emulator(APP, 1, |c| c.password("secret")).await;
    let mut s = TcpStream::connect(pw.addr()).await.unwrap();
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message([("user", "postgres")], &mut out)
        .unwrap();
    s.write_all(&out).await.unwrap();
    let ask = next_msg(&mut s).await.expect("a password request");
    assert_eq!(ask.tag, b'R');
    s.write_all(&[b'p', 0, 1, 0, 4]).await.unwrap();
    s.write_all(&[b'x'; 4096]).await.unwrap();
    assert_refused(&replies(&mut s).await, "a password message of 65,540 bytes");
    // Legal messages still go through.
    honest_query(&emu).await;
    assert!(
        common::eventually(10, || async { emu.counters().upstream_in_use == 0 }).await,
        "the refused sessions gave their connections back: {:?}",
        emu.counters()
    );
}

/// Writes `total` bytes of `chunk` again and again.
async fn write_repeated(s: &mut TcpStream, chunk: &[u8], total: usize) {
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
}

/// Long legal messages (a 64 MiB Query, a Bind with a 32 MiB parameter, a 200 KiB Parse) go
/// through with right answers, and the emulator holds only their heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_legal_messages_pass_through_without_being_held_whole() {
    const APP: &str = "em_memory_long";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 2, |c| c).await;
    let chunk = vec![b'x'; MIB];
    let before = rss_mib();
    let mut s = login(emu.addr(), "em_memory_long_q").await;
    // SELECT length('xxx...'): 64 MiB of text.
    const TEXT: usize = 64 * MIB;
    let head = b"SELECT length('";
    let tail = b"')\0";
    s.write_all(&query_header(head.len() + TEXT + tail.len()))
        .await
        .unwrap();
    s.write_all(head).await.unwrap();
    write_repeated(&mut s, &chunk, TEXT).await;
    s.write_all(tail).await.unwrap();
    let got = replies(&mut s).await;
    let row = got.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(row.first_column().0, TEXT.to_string());
    let during = rss_mib();
    assert_eq!(
        emu.counters().pins_for(pinpool::pinning::Reason::Oversized),
        1,
        "a text that long pins"
    );

    // Parse (unnamed) SELECT length($1::text), then a Bind whose parameter is 32 MiB.
    let mut s = login(emu.addr(), "em_memory_long_bind").await;
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::parse("", "SELECT length($1::text)", [25], &mut out)
        .unwrap();
    s.write_all(&out).await.unwrap();
    const PARAM: usize = 32 * MIB;
    let mut bind = vec![b'B'];
    let body = 1 + 1 + 2 + 2 + 4 + PARAM + 2;
    bind.extend(((body + 4) as i32).to_be_bytes());
    bind.extend([0, 0]); // portal "", statement ""
    bind.extend(0i16.to_be_bytes()); // parameters in text
    bind.extend(1i16.to_be_bytes());
    bind.extend((PARAM as i32).to_be_bytes());
    s.write_all(&bind).await.unwrap();
    write_repeated(&mut s, &chunk, PARAM).await;
    s.write_all(&0i16.to_be_bytes()).await.unwrap(); // results in text
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::execute("", 0, &mut out).unwrap();
    postgres_protocol::message::frontend::sync(&mut out);
    s.write_all(&out).await.unwrap();
    let got = replies(&mut s).await;
    let row = got.iter().find(|m| m.tag == b'D').unwrap_or_else(|| {
        panic!(
            "a row; got {:?}",
            got.iter()
                .map(|m| (m.tag as char, m.field(b'M')))
                .collect::<Vec<_>>()
        )
    });
    assert_eq!(row.first_column().0, PARAM.to_string());

    // A named statement of 200 KiB: kept only in part, so its session is pinned, and it runs.
    let mut s = login(emu.addr(), "em_memory_long_parse").await;
    let sql = format!("SELECT length('{}')", "z".repeat(200 * 1024));
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::parse("big", &sql, [], &mut out).unwrap();
    postgres_protocol::message::frontend::sync(&mut out);
    postgres_protocol::message::frontend::bind(
        "",
        "big",
        [],
        [],
        |_: (), _| Ok(postgres_protocol::IsNull::No),
        [],
        &mut out,
    )
    .map_err(|_| ())
    .unwrap();
    postgres_protocol::message::frontend::execute("", 0, &mut out).unwrap();
    postgres_protocol::message::frontend::sync(&mut out);
    s.write_all(&out).await.unwrap();
    let first = replies(&mut s).await;
    assert_eq!(first.iter().map(|m| m.tag).collect::<Vec<_>>(), b"1Z");
    let got = replies(&mut s).await;
    let row = got.iter().find(|m| m.tag == b'D').expect("a row");
    assert_eq!(row.first_column().0, (200 * 1024).to_string());

    let c = emu.counters();
    eprintln!("RSS before {before:.1} MiB, after the 64 MiB Query {during:.1} MiB; {c:?}");
    assert!(
        during - before < 20.0,
        "the emulator grew by {:.1} MiB for a 64 MiB Query",
        during - before
    );
    assert!(c.peak_buffered_bytes < 4 * MIB as u64, "{c:?}");
}

/// A client that asks for a 64 MiB row and does not read it: the emulator stops reading the
/// database connection instead of holding the row; once the client reads, all of it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_a_huge_row_costs_the_emulator_little() {
    const APP: &str = "em_memory_slow_reader";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 1, |c| c).await;
    let mut s = login(emu.addr(), "em_memory_slow_reader").await;
    let before = rss_mib();
    const ROW: usize = 64 * MIB;
    s.write_all(&query(&format!("SELECT repeat('r', {ROW})")))
        .await
        .unwrap();
    // The database builds the row and sends it; nobody reads it for a while.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = rss_mib();
    let c = emu.counters();
    eprintln!("RSS before {before:.1} MiB, with a 64 MiB row unread {during:.1} MiB; {c:?}");
    let got = replies(&mut s).await;
    let row = got.iter().find(|m| m.tag == b'D').expect("the row");
    assert_eq!(row.first_column().1, ROW, "all of the row arrived");
    assert!(
        during - before < 20.0,
        "the emulator grew by {:.1} MiB holding a row nobody read",
        during - before
    );
    assert!(c.buffered_bytes < 4 * MIB as u64, "{c:?}");
    s.write_all(&query("SELECT 1")).await.unwrap();
    assert!(
        replies(&mut s).await.iter().any(|m| m.tag == b'D'),
        "the session goes on"
    );
}

/// Many queued clients each pipeline up to their own bound: together they stay under the
/// process-wide bound. An honest client that comes while the bound is reached waits (nothing
/// of it is read) and is served once the attackers leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_queued_clients_under_their_own_bound_stay_under_the_process_bound() {
    const APP: &str = "em_memory_many";
    const CAP: usize = 4 * MIB;
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 1, |c| {
        c.max_buffered_bytes(CAP)
            .session_buffer_bytes(MIB)
            .borrow_timeout(Duration::from_secs(60))
    })
    .await;
    let addr = emu.addr();
    let mut holder = login(addr, "em_memory_many_holder").await;
    holder.write_all(&query("BEGIN")).await.unwrap();
    common::until_ready(&mut holder).await;
    let one = query(&format!("SELECT '{}'", "q".repeat(100 * 1024)));
    let before = rss_mib();
    const CLIENTS: usize = 32;
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let mut s = login(addr, &format!("em_memory_many{i}")).await;
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            // Just under the session's bound, in 100 KiB queries.
            let sent =
                send_until_stalled(&mut s, &one, MIB - 4096, Duration::from_millis(700)).await;
            (s, sent)
        }));
    }
    let mut attackers = Vec::new();
    for t in tasks {
        attackers.push(t.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = rss_mib();
    let c = emu.counters();
    let sent: usize = attackers.iter().map(|(_, n)| n).sum();
    eprintln!(
        "RSS before {before:.1} MiB, with {CLIENTS} queued clients {during:.1} MiB; sent {:.1} MiB; {c:?}",
        sent as f64 / MIB as f64
    );
    assert!(
        c.peak_buffered_bytes <= (CAP + 64 * 1024) as u64,
        "the process-wide bound held: {c:?}"
    );
    assert!(
        during - before < 25.0,
        "the emulator grew by {:.1} MiB",
        during - before
    );
    // An honest client now: its query is not even read while the bound is reached...
    let waits = emu.counters().borrow_waits;
    let honest = tokio::spawn({
        let url = emu.url("postgres", "postgres");
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .query_one("SELECT 41 + 1", &[])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !honest.is_finished(),
        "the honest client was served while the connection was held"
    );
    assert_eq!(
        emu.counters().borrow_waits,
        waits,
        "the honest query was read (and queued) past the process-wide bound"
    );
    // ...and is served once the attackers left and the holder committed.
    drop(attackers);
    holder.write_all(&query("COMMIT")).await.unwrap();
    common::until_ready(&mut holder).await;
    let answer = tokio::time::timeout(Duration::from_secs(20), honest)
        .await
        .expect("the honest client is served after the attack")
        .unwrap();
    assert_eq!(answer, 42);
    assert!(
        common::eventually(10, || async { emu.counters().buffered_bytes == 0 }).await,
        "sessions gave their share back: {:?}",
        emu.counters()
    );
}

/// A client pipelines long queries with long answers and reads the answers as they come,
/// with small session buffers: the emulator writes to the database while it reads from it,
/// so a database that stops reading while its answers pile up cannot deadlock it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_long_queries_with_long_answers_does_not_deadlock() {
    const APP: &str = "em_memory_pipeline";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 1, |c| c.session_buffer_bytes(256 * 1024)).await;
    let s = login(emu.addr(), "em_memory_pipeline").await;
    let (mut r, mut w) = s.into_split();
    const QUERIES: usize = 64;
    let one = query(&format!(
        "SELECT repeat('a', {MIB}), length('{}')",
        "b".repeat(200 * 1024)
    ));
    let writer = tokio::spawn(async move {
        for _ in 0..QUERIES {
            w.write_all(&one).await.unwrap();
        }
        w
    });
    let read = async {
        let mut rows = 0;
        let mut buf = BytesMut::new();
        let mut ready = 0;
        while ready < QUERIES {
            while buf.len() >= 5 {
                let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 1 + len {
                    break;
                }
                match buf[0] {
                    b'D' => rows += 1,
                    b'Z' => ready += 1,
                    b'E' => panic!("an error: {:?}", String::from_utf8_lossy(&buf[5..1 + len])),
                    _ => {}
                }
                buf.advance(1 + len);
            }
            if ready == QUERIES {
                break;
            }
            buf.reserve(64 * 1024);
            assert!(
                r.read_buf(&mut buf).await.unwrap() > 0,
                "the emulator closed"
            );
        }
        rows
    };
    let rows = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("every answer arrives: no deadlock");
    assert_eq!(rows, QUERIES);
    drop(writer.await.unwrap());
}

/// A client prepares ever more named statements of 60 KiB (answered by the emulator itself,
/// which keeps their texts to prepare them again on other database connections): past its
/// bound the emulator keeps no more of them, pins the session instead, and every statement
/// still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_make_the_emulator_keep_unbounded_statement_texts() {
    const APP: &str = "em_memory_statements";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 2, |c| c).await;
    let mut s = login(emu.addr(), "em_memory_statements").await;
    const STATEMENTS: usize = 400;
    let before = rss_mib();
    let (mut r, mut w) = s.split();
    let write = async {
        for i in 0..STATEMENTS {
            let sql = format!("SELECT {i}, length('{}')", "s".repeat(60 * 1024));
            let mut out = BytesMut::new();
            postgres_protocol::message::frontend::parse(&format!("s{i}"), &sql, [], &mut out)
                .unwrap();
            postgres_protocol::message::frontend::sync(&mut out);
            w.write_all(&out).await.unwrap();
        }
    };
    let read = async {
        let mut buf = BytesMut::new();
        let mut ready = 0;
        loop {
            while buf.len() >= 5 {
                let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 1 + len {
                    break;
                }
                assert_ne!(
                    buf[0],
                    b'E',
                    "{:?}",
                    String::from_utf8_lossy(&buf[..1 + len])
                );
                ready += usize::from(buf[0] == b'Z');
                buf.advance(1 + len);
            }
            if ready == STATEMENTS {
                return;
            }
            buf.reserve(4096);
            assert!(r.read_buf(&mut buf).await.unwrap() > 0, "closed");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(write, read) })
        .await
        .expect("every Parse answered");
    let during = rss_mib();
    let c = emu.counters();
    eprintln!(
        "RSS before {before:.1} MiB, after {STATEMENTS} statements of 60 KiB {during:.1} MiB; {c:?}"
    );
    // The first and the last statement both run.
    for i in [0, STATEMENTS - 1] {
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::bind(
            "",
            &format!("s{i}"),
            [],
            [],
            |_: (), _| Ok(postgres_protocol::IsNull::No),
            [],
            &mut out,
        )
        .map_err(|_| ())
        .unwrap();
        postgres_protocol::message::frontend::execute("", 0, &mut out).unwrap();
        postgres_protocol::message::frontend::sync(&mut out);
        s.write_all(&out).await.unwrap();
        let got = replies(&mut s).await;
        let row = got.iter().find(|m| m.tag == b'D').unwrap_or_else(|| {
            panic!(
                "statement s{i} runs: {:?}",
                got.iter()
                    .map(|m| (m.tag as char, m.field(b'M')))
                    .collect::<Vec<_>>()
            )
        });
        assert_eq!(row.first_column().0, i.to_string());
    }
    assert!(
        during - before < 12.0,
        "the emulator grew by {:.1} MiB keeping statement texts",
        during - before
    );
    assert!(c.statement_bytes <= 4 * MIB as u64, "{c:?}");
    assert_eq!(
        (
            c.pinned_now,
            c.pins_for(pinpool::pinning::Reason::Oversized)
        ),
        (1, 1),
        "past the bound the session is pinned: {c:?}"
    );
    drop(s);
    assert!(
        common::eventually(10, || async { emu.counters().statement_bytes == 0 }).await,
        "the session gave back what it kept: {:?}",
        emu.counters()
    );
}

/// A long message whose borrow times out is dropped as it arrives (not held, the session goes
/// on); a client that leaves in the middle of a long message being passed to a database
/// connection gets that connection closed, not lent to the next client mid-message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_message_dropped_or_cut_short_leaves_nothing_behind() {
    const APP: &str = "em_memory_cut";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 1, |c| c.borrow_timeout(Duration::from_millis(300))).await;
    let addr = emu.addr();
    let chunk = vec![b'x'; MIB];
    let mut holder = login(addr, "em_memory_cut_holder").await;
    holder.write_all(&query("BEGIN")).await.unwrap();
    common::until_ready(&mut holder).await;
    let before = rss_mib();
    // 48 MiB of a Query while the only connection is held: the borrow times out.
    let mut s = login(addr, "em_memory_cut_dropped").await;
    const TEXT: usize = 48 * MIB;
    s.write_all(&query_header(8 + TEXT + 2)).await.unwrap();
    s.write_all(b"SELECT '").await.unwrap();
    write_repeated(&mut s, &chunk, TEXT).await;
    s.write_all(b"'\0").await.unwrap();
    let got = replies(&mut s).await;
    assert_eq!(
        got.first().and_then(|e| e.field(b'C')).as_deref(),
        Some("08000"),
        "a borrow timeout"
    );
    let during = rss_mib();
    assert!(
        during - before < 20.0,
        "the emulator grew by {:.1} MiB",
        during - before
    );
    holder.write_all(&query("COMMIT")).await.unwrap();
    common::until_ready(&mut holder).await;
    drop(holder);
    s.write_all(&query("SELECT 1")).await.unwrap();
    assert!(
        replies(&mut s).await.iter().any(|m| m.tag == b'D'),
        "the session goes on"
    );
    drop(s);
    // Half of a long Query reaches the database connection, then the client leaves.
    let admin = common::admin().await;
    let mut s = login(addr, "em_memory_cut_leaver").await;
    s.write_all(&query_header(8 + TEXT + 2)).await.unwrap();
    s.write_all(b"SELECT '").await.unwrap();
    write_repeated(&mut s, &chunk, TEXT / 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    assert!(
        common::eventually(10, || async {
            let c = emu.counters();
            c.upstream_in_use == 0 && c.clients == 0
        })
        .await,
        "{:?}",
        emu.counters()
    );
    honest_query(&emu).await;
    assert_eq!(
        common::backends(&admin, APP).await.len() as u64,
        emu.counters().upstream_open,
        "the emulator owns exactly the backends the server shows"
    );
}

/// A client that fills the process-wide bound with the start of a message and then says
/// nothing is still closed after the idle client timeout (waiting for room does not count as
/// activity), and the clients it starved are served then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_starved_by_the_process_bound_is_still_closed_for_idleness() {
    const APP: &str = "em_memory_starved_idle";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 2, |c| {
        c.max_buffered_bytes(32 * 1024)
            .idle_client_timeout(Duration::from_secs(1))
    })
    .await;
    let mut hog = login(emu.addr(), "em_memory_starved_hog").await;
    // 60 KiB of a Query's head: the session reads the first 32 KiB and has no more room.
    hog.write_all(&query_header(MIB)).await.unwrap();
    hog.write_all(&vec![b'h'; 60 * 1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        emu.counters().buffered_bytes >= 32 * 1024,
        "{:?}",
        emu.counters()
    );
    // Meanwhile an honest client's query is not read...
    let honest = tokio::spawn({
        let url = emu.url("postgres", "postgres");
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .query_one("SELECT 41 + 1", &[])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }
    });
    // ...until the hog is closed for idleness.
    let answer = tokio::time::timeout(Duration::from_secs(10), honest)
        .await
        .expect("the hog was closed for idleness and the honest client served")
        .unwrap();
    assert_eq!(answer, 42);
    assert_eq!(emu.counters().idle_client_closes, 1, "{:?}", emu.counters());
    assert!(
        next_msg(&mut hog).await.is_none(),
        "the hog's connection was closed"
    );
}

/// A client that leaves while a 64 MiB row comes: the emulator drops the rest of the row as it
/// arrives (not held), and the database connection, at rest again, serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_a_huge_row_leaves_nothing_held() {
    const APP: &str = "em_memory_leave_row";
    let _serial = SERIAL.lock().await;
    let emu = common::emulator(APP, 1, |c| c).await;
    let before = rss_mib();
    let mut s = login(emu.addr(), "em_memory_leave_row").await;
    s.write_all(&query(&format!("SELECT repeat('r', {})", 64 * MIB)))
        .await
        .unwrap();
    let mut some = vec![0; 4096];
    s.read_exact(&mut some).await.unwrap();
    drop(s);
    assert!(
        common::eventually(20, || async {
            let c = emu.counters();
            c.clients == 0 && c.upstream_in_use == 0
        })
        .await,
        "{:?}",
        emu.counters()
    );
    let after = rss_mib();
    let c = emu.counters();
    eprintln!("RSS before {before:.1} MiB, after {after:.1} MiB; {c:?}");
    assert!(
        after - before < 20.0,
        "the emulator grew by {:.1} MiB",
        after - before
    );
    assert_eq!(
        c.upstream_open, 1,
        "the connection was kept, not closed: {c:?}"
    );
    honest_query(&emu).await;
}
