//! Attacks on the safe retry (round 3). Each test fails on the code it was written against,
//! for the reason its name and its assertion message give.
#![cfg(feature = "emulator")]

mod common;

use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{admin, cutting_relay, relayed, until_closed};

// ---- 1. A Statement handed out without a byte written ------------------------------------
//
// The README: "not one byte was written on that connection since this checkout handed it out.
// Then ... nothing of the checkout (a prepared `Statement`, ...) can refer to the old
// connection, so the swap is invisible." `prepare_cached` answers from the connection's
// statement cache without writing anything: the checkout then holds a `Statement` of the old
// connection, and the swap a later text statement triggers makes it name a statement the
// fresh connection never had. Without the swap it would fail as a closed connection (a
// transient error the caller handles); with it, it fails with the server's "prepared statement
// does not exist" (26000), which no caller treats as transient, on a healthy connection.

#[tokio::test]
async fn atk3_a_cached_statement_handed_out_before_the_swap_names_nothing_after_it() {
    let (port, cuts) = cutting_relay().await;
    let pool = relayed(port, "atk3_cached").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let v: i32 = c.query_one_scalar("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(v, 42);
    drop(c);

    let c = pool.get().await.unwrap(); // the same connection, nothing sent yet
    let stmt = c.prepare_cached("SELECT 41 + 1").await.unwrap(); // a cache hit: nothing sent
    assert_eq!(pool.status().cache_hits, 1, "{:?}", pool.status());
    cuts.kill_all();
    until_closed(&c).await;
    // The caller holds a Statement of this connection: a swap would not be invisible, so the
    // closed connection is reported as it is, not retried.
    let two = c.query_one_scalar::<i32, _>("SELECT 2", &[]).await;
    match &two {
        Ok(v) => assert_eq!(*v, 2),
        Err(e) => assert!(e.is_closed(), "{e:?}"),
    }
    assert_eq!(
        pool.status().retries,
        u64::from(two.is_ok()),
        "{:?}",
        pool.status()
    );

    let r = c.query_one_scalar::<i32, _>(&stmt, &[]).await;
    match &r {
        Ok(v) => assert_eq!(*v, 42),
        Err(e) => assert!(
            e.is_closed(),
            "the swap was visible: the checkout's Statement names a statement of the old \
             connection, and on the fresh one it fails with {:?}: {}",
            e.code(),
            e.as_db_error()
                .map_or(String::new(), |d| d.message().to_owned())
        ),
    }
    drop(c);
    common::assert_quiet(&pool);
}

// ---- 2. Bytes that left below a TLS layer that then reported an error ----------------------
//
// `written` counts the bytes the stream below the observer accepted; with TLS that is the TLS
// stream, and tokio-rustls's `poll_write` (0.26, src/common/mod.rs) returns `Err` when a later
// `write_io` in the same call fails, even after an earlier `write_io` already put records on
// the socket. The observer then counts nothing for the call, though whole statements may have
// reached the server and run. Here the socket under the real rustls stream accepts one write
// and then reports ECONNRESET (an RST arriving between two writes, as when a proxy resets the
// connection); two statements pipelined by `tokio::join!` go out together, the INSERT whole in
// the first TLS record. It commits, the connection ends with nothing counted as written, and
// both calls are "retried": the INSERT runs twice.

#[cfg(feature = "tls")]
mod tls_flaky {
    use std::io;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::Socket;
    use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
    use tokio_postgres_rustls::MakeRustlsConnect;

    /// 0: passes writes through; 1: the next write passes, then 2: every write fails.
    pub struct Flaky {
        inner: Socket,
        state: Arc<AtomicU8>,
    }

    impl AsyncRead for Flaky {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Flaky {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.state.load(SeqCst) {
                0 => Pin::new(&mut self.inner).poll_write(cx, buf),
                1 => {
                    let r = Pin::new(&mut self.inner).poll_write(cx, buf);
                    if let Poll::Ready(Ok(_)) = r {
                        self.state.store(2, SeqCst);
                    }
                    r
                }
                _ => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    type InnerConnect = <MakeRustlsConnect as MakeTlsConnect<Flaky>>::TlsConnect;
    type InnerStream = <MakeRustlsConnect as MakeTlsConnect<Flaky>>::Stream;

    /// The real rustls connector, over a socket whose faults the test chooses.
    #[derive(Clone)]
    pub struct FlakyTls {
        pub inner: MakeRustlsConnect,
        pub sockets: Arc<Mutex<Vec<Arc<AtomicU8>>>>,
    }

    pub struct FlakyConnect {
        inner: InnerConnect,
        sockets: Arc<Mutex<Vec<Arc<AtomicU8>>>>,
    }

    impl MakeTlsConnect<Socket> for FlakyTls {
        type Stream = InnerStream;
        type TlsConnect = FlakyConnect;
        type Error = io::Error;
        fn make_tls_connect(&mut self, domain: &str) -> Result<FlakyConnect, io::Error> {
            let inner = match MakeTlsConnect::<Flaky>::make_tls_connect(&mut self.inner, domain) {
                Ok(i) => i,
                Err(never) => match never {},
            };
            Ok(FlakyConnect {
                inner,
                sockets: self.sockets.clone(),
            })
        }
    }

    impl TlsConnect<Socket> for FlakyConnect {
        type Stream = InnerStream;
        type Error = <InnerConnect as TlsConnect<Flaky>>::Error;
        type Future = <InnerConnect as TlsConnect<Flaky>>::Future;
        fn connect(self, stream: Socket) -> Self::Future {
            let state = Arc::new(AtomicU8::new(0));
            self.sockets.lock().unwrap().push(state.clone());
            self.inner.connect(Flaky {
                inner: stream,
                state,
            })
        }
    }
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn atk3_a_statement_sent_under_tls_that_then_failed_is_run_twice() {
    use pinpool::emulator::{Emulator, EmulatorConfig};

    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS atk3_tls_t; CREATE TABLE atk3_tls_t (id int)")
        .await
        .unwrap();
    let (ca, cert, key) = common::test_pki(&["localhost"]);
    let emu = Emulator::start(
        EmulatorConfig::new(common::database_url())
            .max_connections(2)
            .application_name("atk3_tls")
            .tls_pem(cert.as_bytes(), key.as_bytes(), true)
            .unwrap(),
    )
    .await
    .unwrap();
    let config = common::trusting(&ca);
    let sockets: Arc<Mutex<Vec<Arc<AtomicU8>>>> = Arc::default();
    let tls = tls_flaky::FlakyTls {
        inner: tokio_postgres_rustls::MakeRustlsConnect::new(config),
        sockets: sockets.clone(),
    };
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=require",
        emu.addr().port()
    );
    let pool = pinpool::Pool::builder(url)
        .tls(tls)
        .max_size(1)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    assert_eq!(sockets.lock().unwrap().len(), 1);
    // The next write on this connection's socket goes out; the one after it meets a reset.
    sockets.lock().unwrap()[0].store(1, SeqCst);
    // Larger than one TLS record (16 KiB): the INSERT, first in the buffer, fills the first
    // record with the start of this one.
    let big = format!("SELECT length('{}')", "x".repeat(40_000));
    let (a, b) = tokio::join!(
        c.batch_execute("INSERT INTO atk3_tls_t VALUES (1)"),
        c.batch_execute(&big),
    );
    let retries = pool.status().retries;
    drop(c);
    // Let the emulator and the server finish with the first connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM atk3_tls_t", &[])
        .await
        .unwrap()
        .get(0);
    admin.batch_execute("DROP TABLE atk3_tls_t").await.unwrap();
    eprintln!(
        "insert: {a:?}; big: {:?}; retries: {retries}",
        b.map(|_| ())
    );
    assert!(
        rows <= 1,
        "the INSERT ran {rows} times: it reached the server under TLS, the TLS stream reported \
         an error for the write that carried it, nothing was counted as written, and it was \
         retried ({retries} retries)"
    );
}
