//! Arbitrary client bytes against the RDS Proxy emulator, over a real socket, with a real
//! PostgreSQL behind it (`DATABASE_URL`, default the local server; use a scratch database:
//! the fuzzer's bytes reach it as SQL). The first input byte chooses whether a valid startup
//! message goes first. After each input the emulator must be quiet again: no client session
//! left, no database connection lent or pinned, no more than its maximum open. A panic in any
//! emulator task aborts the process, which libFuzzer reports as a crash.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pinpool::emulator::{Emulator, EmulatorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX: u64 = 3;

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
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        runtime()
            .block_on(Emulator::start(
                EmulatorConfig::new(url)
                    .max_connections(MAX as usize)
                    .borrow_timeout(Duration::from_millis(500))
                    .application_name("pinpool_fuzz"),
            ))
            .expect("the emulator starts (is PostgreSQL running?)")
    })
}

fn startup() -> Vec<u8> {
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut m = ((params.len() + 8) as i32).to_be_bytes().to_vec();
    m.extend_from_slice(&196_608i32.to_be_bytes());
    m.extend_from_slice(params);
    m
}

/// True when a framed message in `b` is a FunctionCall, which could call any function.
fn calls_a_function(b: &[u8]) -> bool {
    let mut at = 0;
    while at + 5 <= b.len() {
        if b[at] == b'F' {
            return true;
        }
        let len = i32::from_be_bytes([b[at + 1], b[at + 2], b[at + 3], b[at + 4]]);
        if len < 4 {
            return false;
        }
        at += 1 + len as usize;
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        if calls_a_function(rest) {
            return;
        }
        [startup(), rest.to_vec()].concat()
    } else {
        if rest.contains(&b'F') {
            return;
        }
        rest.to_vec()
    };
    let emu = emulator();
    runtime().block_on(async {
        let mut s = tokio::net::TcpStream::connect(emu.addr()).await.unwrap();
        let (mut r, mut w) = s.split();
        let read = async {
            let mut sink = [0u8; 8192];
            while let Ok(n) = r.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let write = async {
            // Then end the stream, so the emulator sees the end of what was sent.
            if w.write_all(&bytes).await.is_ok() {
                let _ = w.shutdown().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            tokio::join!(read, write)
        })
        .await;
        drop(s);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let c = emu.counters();
            assert!(c.upstream_open <= MAX, "{c:?}");
            if c.clients == 0 && c.upstream_in_use == 0 && c.pinned_now == 0 {
                break;
            }
            assert!(
                Instant::now() < end,
                "the session did not end cleanly: {c:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
});
