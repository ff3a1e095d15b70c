//! Arbitrary and truncated client bytes against the emulator, over real sockets, with the real
//! PostgreSQL behind it: no session task panics, every client session ends, and no database
//! connection is left lent, pinned or orphaned (the server's own count of the emulator's
//! backends matches the emulator's). `PROPTEST_CASES` runs more cases.
#![cfg(feature = "emulator")]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use common::{admin, backends, database_url, eventually};
use pinpool::emulator::{Emulator, EmulatorConfig};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP: &str = "em_fuzz";
const MAX: usize = 3;

/// Panics anywhere in the process after the hook is installed (the emulator's session tasks
/// run in this process; their panics would otherwise only be printed).
static PANICS: AtomicU64 = AtomicU64::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn emulator() -> &'static Emulator {
    static EMU: OnceLock<Emulator> = OnceLock::new();
    EMU.get_or_init(|| {
        runtime().block_on(async {
            Emulator::start(
                EmulatorConfig::new(database_url())
                    .max_connections(MAX)
                    .borrow_timeout(Duration::from_millis(500))
                    .application_name(APP),
            )
            .await
            .expect("emulator starts")
        })
    })
}

/// Statements the fuzzer may send. Random bytes only ever reach the server as bodies that
/// fail to parse; `FunctionCall` is never sent (a random function OID could call anything).
const SQL: &[&str] = &[
    "SELECT 1",
    "SELECT $1::int",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SET work_mem = '5MB'",
    "SET LOCAL work_mem = '5MB'",
    "PREPARE fz_p AS SELECT 1",
    "SELECT pg_sleep(0.02)",
    "COPY (SELECT 1) TO STDOUT",
    "CREATE TEMP TABLE fz_t (a int)",
    "COPY fz_t FROM STDIN",
    "LISTEN fz",
    "SELECT set_config('fz.x', '1', false)",
    "SELECT 1; SELECT 2",
    "",
];

#[derive(Debug, Clone)]
enum Piece {
    /// A well-framed message, its body structured or random.
    Frame(u8, Vec<u8>),
    /// A header claiming `claimed` bytes, followed by fewer.
    Truncated(u8, i32, Vec<u8>),
    /// Bytes with no framing at all.
    Raw(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Start {
    Valid,
    ValidTls,
    Raw(Vec<u8>),
    BadLength(i32),
}

#[derive(Debug, Clone, Copy)]
enum End {
    /// Drop the socket at once.
    Drop,
    /// Read what the emulator answers for a while, then drop.
    Linger,
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn sql() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(SQL).prop_map(str::to_string),
        1 => "[a-z ;'$()0-9]{0,24}",
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(&["", "s1", "s2"][..]).prop_map(str::to_string)
}

fn tail() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..8)
}

fn body_for(tag: u8) -> BoxedStrategy<Vec<u8>> {
    let random = prop::collection::vec(any::<u8>(), 0..48).boxed();
    let structured = match tag {
        b'Q' => sql().prop_map(|s| cstr(&s)).boxed(),
        b'P' => (name(), sql(), tail())
            .prop_map(|(n, s, t)| [cstr(&n), cstr(&s), t].concat())
            .boxed(),
        b'B' => (name(), name(), tail())
            .prop_map(|(p, n, t)| [cstr(&p), cstr(&n), t].concat())
            .boxed(),
        b'D' | b'C' => (prop::sample::select(&[b'S', b'P', b'x'][..]), name())
            .prop_map(|(k, n)| [vec![k], cstr(&n)].concat())
            .boxed(),
        b'E' => (name(), any::<i32>())
            .prop_map(|(p, n)| [cstr(&p), n.to_be_bytes().to_vec()].concat())
            .boxed(),
        b'd' => random.clone(),
        _ => Just(Vec::new()).boxed(),
    };
    prop_oneof![3 => structured, 1 => random].boxed()
}

fn tag() -> impl Strategy<Value = u8> {
    prop_oneof![
        6 => prop::sample::select(
            &[b'Q', b'P', b'B', b'D', b'C', b'E', b'S', b'H', b'd', b'c', b'f', b'X', b'p'][..]
        ),
        1 => any::<u8>().prop_map(|t| if t == b'F' { b'?' } else { t }),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        8 => tag().prop_flat_map(|t| body_for(t).prop_map(move |b| Piece::Frame(t, b))),
        1 => (tag(), any::<i32>(), prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(t, n, b)| Piece::Truncated(t, n, b)),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(Piece::Raw),
    ]
}

fn start() -> impl Strategy<Value = Start> {
    prop_oneof![
        8 => Just(Start::Valid),
        1 => Just(Start::ValidTls),
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(Start::Raw),
        1 => any::<i32>().prop_map(Start::BadLength),
    ]
}

fn startup_message() -> Vec<u8> {
    let params = [
        cstr("user"),
        cstr("postgres"),
        cstr("database"),
        cstr("postgres"),
        cstr("application_name"),
        cstr("em_fuzz_client"),
        vec![0],
    ]
    .concat();
    let mut m = ((params.len() + 8) as i32).to_be_bytes().to_vec();
    m.extend_from_slice(&196_608i32.to_be_bytes());
    m.extend(params);
    m
}

fn encode(start: &Start, pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    match start {
        Start::Valid => out.extend(startup_message()),
        Start::ValidTls => {
            // SSLRequest (answered 'N' here), then the startup message.
            out.extend(8i32.to_be_bytes());
            out.extend(80_877_103i32.to_be_bytes());
            out.extend(startup_message());
        }
        Start::Raw(b) => out.extend(b),
        Start::BadLength(n) => out.extend(n.to_be_bytes()),
    }
    for p in pieces {
        match p {
            Piece::Frame(t, b) => {
                out.push(*t);
                out.extend(((b.len() + 4) as i32).to_be_bytes());
                out.extend(b);
            }
            Piece::Truncated(t, n, b) => {
                out.push(*t);
                out.extend(n.to_be_bytes());
                out.extend(b);
            }
            Piece::Raw(b) => out.extend(b),
        }
    }
    out
}

async fn send(addr: std::net::SocketAddr, bytes: Vec<u8>, end: End) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("the emulator accepts");
    let (mut r, mut w) = s.split();
    let reader = async {
        let mut sink = vec![0u8; 8192];
        while let Ok(n) = r.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let writer = async {
        // The emulator may close first; a failed write is part of the game.
        let _ = w.write_all(&bytes).await;
    };
    let linger = match end {
        End::Drop => Duration::from_millis(20),
        End::Linger => Duration::from_millis(150),
    };
    let _ = tokio::time::timeout(linger, async { tokio::join!(reader, writer) }).await;
}

async fn quiet(emu: &Emulator) -> bool {
    eventually(10, || async {
        let c = emu.counters();
        c.clients == 0 && c.upstream_in_use == 0 && c.pinned_now == 0
    })
    .await
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn arbitrary_client_bytes_never_panic_the_emulator_or_leak_a_database_connection(
        start in start(),
        pieces in prop::collection::vec(piece(), 0..12),
        end in prop_oneof![Just(End::Drop), Just(End::Linger)],
    ) {
        count_panics();
        let emu = emulator();
        let bytes = encode(&start, &pieces);
        runtime().block_on(async {
            send(emu.addr(), bytes, end).await;
            let settled = quiet(emu).await;
            prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a session task panicked");
            prop_assert!(settled, "a session did not end cleanly: {:?}", emu.counters());
            prop_assert!(emu.counters().upstream_open <= MAX as u64, "{:?}", emu.counters());
            Ok(())
        })?;
    }
}

#[test]
fn after_the_garbage_the_emulator_still_serves_and_owns_exactly_its_backends() {
    count_panics();
    let emu = emulator();
    runtime().block_on(async {
        // Some garbage first, so this test stands on its own when run alone.
        for junk in [
            vec![0, 0, 0, 4],
            [startup_message(), vec![b'D', 0, 0, 0, 4]].concat(),
            [startup_message(), vec![b'Q', 0x7f, 0xff, 0xff, 0xff]].concat(),
        ] {
            send(emu.addr(), junk, End::Linger).await;
        }
        assert!(quiet(emu).await, "{:?}", emu.counters());
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a session task panicked");
        let (client, conn) =
            tokio_postgres::connect(&emu.url("postgres", "postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        let task = tokio::spawn(conn);
        let v: i32 = client.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
        assert_eq!(v, 42);
        drop(client);
        task.await.unwrap().unwrap();
        assert!(quiet(emu).await);
        let admin = admin().await;
        let matched = eventually(10, || async {
            backends(&admin, APP).await.len() as u64 == emu.counters().upstream_open
        })
        .await;
        assert!(
            matched,
            "backends {:?} vs emulator {:?}",
            backends(&admin, APP).await,
            emu.counters()
        );
    });
}
