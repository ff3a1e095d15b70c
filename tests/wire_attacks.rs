//! Attacks on the protocol observer: each test is a way a connection could go back to the idle
//! set in a state it must not (or be closed, or wait, when it must not), and each failed
//! against the observer's first version. A test is named, and its comment written, for the
//! way it broke that version; its assertions state the behaviour that holds now.

mod common;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;

use common::{admin, builder};
use pinpool::PooledClient;

/// The server's own word on the transaction state of `c`'s session ('I', 'T' or 'E' as
/// pg_stat_activity reports it), read from another session so the probe cannot fail.
/// The states of `app`'s backends, once none is inside a transaction or 3 s have passed: a
/// connection the pool closed leaves its backend "idle in transaction" until the server reads
/// the end of its socket, while one kept in the pool stays so.
async fn backend_state(app: &str) -> Vec<String> {
    let admin = admin().await;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let states = common::backend_states(&admin, app).await;
        if std::time::Instant::now() > end
            || !states.iter().any(|s| s.starts_with("idle in transaction"))
        {
            return states;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Polls `fut` exactly once (so tokio-postgres queues its request) and drops it.
async fn poll_once_and_drop<F: Future>(fut: F) {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        let _ = fut.as_mut().poll(cx);
        Poll::Ready(())
    })
    .await;
}

async fn fresh_table(name: &str) {
    admin()
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (v int)"
        ))
        .await
        .unwrap();
}

async fn count(name: &str) -> i64 {
    admin()
        .await
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// ROLLBACK_QUEUED is cleared only by `check_all` (invocation end / freeze check). Outside an
/// invocation it is never cleared, so once any transaction on a connection was dropped, every
/// later return accepts a connection whose server says "in transaction" (status T or E).
/// Here a later caller leaves a `BEGIN` open; the connection goes back to the idle set in that
/// transaction, and the next caller's "autocommitted" INSERT is silently rolled back.
#[tokio::test]
async fn a_dropped_transaction_once_lets_every_later_open_transaction_go_back() {
    let app = "attack_sticky_rb";
    let table = "attack_sticky_rb_t";
    fresh_table(table).await;
    let pool = builder(app).max_size(1).build().unwrap();
    {
        let mut c = pool.get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        drop(tx); // tokio-postgres queues ROLLBACK: fine so far
    }
    {
        let c = pool.get().await.unwrap();
        c.execute("SELECT 1", &[]).await.unwrap(); // the ROLLBACK ran before this
        // A caller leaves a transaction open (an early `?` between BEGIN and COMMIT).
        c.batch_execute("BEGIN").await.unwrap();
        // returned here with the server in a transaction block
    }
    let states = backend_state(app).await;
    let c = pool.get().await.unwrap();
    c.execute(&*format!("INSERT INTO {table} VALUES (1)"), &[])
        .await
        .unwrap();
    drop(c);
    drop(pool);
    assert!(
        !states.iter().any(|s| s.starts_with("idle in transaction")),
        "a connection idle in the pool is inside a transaction: {states:?}"
    );
    assert_eq!(count(table).await, 1, "an acknowledged INSERT was lost");
}

/// `raw()` marks the connection "unsettled", but only the invocation end and the freeze check
/// look at that mark: `pop_usable` hands such a connection straight to the next `get()`.
/// A raw `BEGIN` whose future was dropped after it was queued (not yet written) is written
/// ahead of the next caller's statements: the next caller runs inside it, and its INSERT is
/// rolled back when the pool finally closes the connection.
#[tokio::test]
async fn a_queued_raw_request_runs_ahead_of_the_next_callers_statements() {
    let app = "attack_raw_queue";
    let table = "attack_raw_queue_t";
    fresh_table(table).await;
    let pool = builder(app).max_size(1).build().unwrap();
    {
        let c = pool.get().await.unwrap();
        poll_once_and_drop(PooledClient::raw(&c).batch_execute("BEGIN")).await;
    }
    let c = pool.get().await.unwrap();
    c.execute(&*format!("INSERT INTO {table} VALUES (1)"), &[])
        .await
        .unwrap();
    drop(c);
    drop(pool);
    assert_eq!(
        count(table).await,
        1,
        "the next caller's acknowledged INSERT ran inside the queued BEGIN and was lost"
    );
}

/// With a TLS connector and `sslmode=prefer` (tokio-postgres's default), the wire kept is the
/// one of the *last TLS handshake*. With several hosts, a host that completed the handshake
/// and was then passed over (here by `target_session_attrs=read-write`: it says it is read
/// only) leaves its wire in `last`; the next host declines TLS, and tokio-postgres's session
/// runs in plaintext there, unobserved. pinpool reads the dead wire (status 'I', nothing
/// outstanding, no pins) for the connection's whole life: an open transaction and a SET both
/// go back to the idle set. The control (the second host alone) is handled right.
#[cfg(feature = "tls")]
#[tokio::test]
async fn a_passed_over_tls_host_leaves_its_wire_on_the_plaintext_session() {
    use pinpool::CloseReason;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    let (ca, cert, key) = common::test_pki(&["localhost"]);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());

    // Host 1: speaks TLS, logs anyone in, and answers SHOW transaction_read_only with "on".
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let read_only = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let read_only_port = read_only.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = read_only.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut ssl_request = [0u8; 8];
                sock.read_exact(&mut ssl_request).await?;
                sock.write_all(b"S").await?;
                let mut tls = acceptor.accept(sock).await?;
                let len = tls.read_u32().await? as usize;
                let mut startup = vec![0; len - 4];
                tls.read_exact(&mut startup).await?;
                let msg = |tag: u8, body: &[u8]| {
                    let mut m = vec![tag];
                    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                    m.extend_from_slice(body);
                    m
                };
                let mut out = msg(b'R', &[0, 0, 0, 0]);
                out.extend(msg(b'Z', b"I"));
                tls.write_all(&out).await?;
                tls.flush().await?;
                let _tag = tls.read_u8().await?;
                let len = tls.read_u32().await? as usize;
                let mut query = vec![0; len - 4];
                tls.read_exact(&mut query).await?;
                let mut field = b"transaction_read_only\0".to_vec();
                field.extend_from_slice(&[
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 25, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
                ]);
                let mut row_desc = vec![0, 1];
                row_desc.extend(field);
                let mut out = msg(b'T', &row_desc);
                out.extend(msg(b'D', &[0, 1, 0, 0, 0, 2, b'o', b'n']));
                out.extend(msg(b'C', b"SHOW\0"));
                out.extend(msg(b'Z', b"I"));
                tls.write_all(&out).await?;
                tls.flush().await?;
                let mut rest = Vec::new();
                let _ = tls.read_to_end(&mut rest).await;
                Ok::<_, std::io::Error>(())
            });
        }
    });

    // Host 2: the real database behind a relay that declines TLS (answers N).
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = relay.accept().await.unwrap();
            tokio::spawn(async move {
                let mut ssl_request = [0u8; 8];
                sock.read_exact(&mut ssl_request).await?;
                let mut db = TcpStream::connect("127.0.0.1:5432").await?;
                if ssl_request[4..] == 80877103u32.to_be_bytes() {
                    sock.write_all(b"N").await?;
                } else {
                    db.write_all(&ssl_request).await?; // a startup message: pass it on
                }
                tokio::io::copy_bidirectional(&mut sock, &mut db).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });

    let tls = common::trusting(&ca);
    let app = "attack_multihost";
    for hosts in [
        format!("localhost:{relay_port}"),
        format!("localhost:{read_only_port},localhost:{relay_port}"),
    ] {
        let url = format!(
            "postgres://postgres@{hosts}/postgres?sslmode=prefer&target_session_attrs=read-write&application_name={app}"
        );
        let pool = pinpool::Pool::builder(url)
            .tls(tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone()))
            .max_size(1)
            .build()
            .unwrap();
        let c = pool.get().await.unwrap();
        c.batch_execute("SET work_mem = '7MB'").await.unwrap();
        c.batch_execute("BEGIN").await.unwrap();
        drop(c);
        let states = backend_state(app).await;
        let s = pool.status();
        drop(pool);
        assert!(
            !states.iter().any(|s| s.starts_with("idle in transaction")),
            "hosts {hosts}: an idle pooled connection is inside a transaction: {states:?}; {s:?}"
        );
        assert_eq!(
            s.closed.get(CloseReason::UnknownState),
            1,
            "hosts {hosts}: {s:?}"
        );
    }
}

/// The classifier's `UPDATE pg_settings` rule matches only the bare name: quoting it (or its
/// schema) makes the statement pin-free, yet the view's rule calls set_config and the session
/// keeps the setting. statement_timeout is not a reported setting, so no ParameterStatus
/// catches it either: the next caller inherits a 4321 ms statement_timeout.
#[tokio::test]
async fn a_quoted_pg_settings_update_leaves_a_setting_and_goes_back() {
    let pool = builder("attack_pg_settings").max_size(1).build().unwrap();
    for sql in [
        r#"UPDATE "pg_settings" SET setting = '4321' WHERE name = 'statement_timeout'"#,
        r#"UPDATE "pg_catalog"."pg_settings" SET setting = '4321' WHERE name = 'statement_timeout'"#,
        r#"UPDATE U&"pg_settings" SET setting = '4321' WHERE name = 'statement_timeout'"#,
    ] {
        let c = pool.get().await.unwrap();
        c.batch_execute("RESET statement_timeout").await.ok();
        drop(c); // pinned by the RESET: a fresh connection next
        let c = pool.get().await.unwrap();
        c.batch_execute(sql).await.unwrap();
        let pinned = PooledClient::pin_state(&c).is_pinned();
        drop(c);
        let c = pool.get().await.unwrap();
        let timeout: String = c
            .query_one_scalar("SELECT current_setting('statement_timeout')", &[])
            .await
            .unwrap();
        drop(c);
        assert!(
            timeout != "4321ms",
            "{sql}: pinned={pinned}; the next caller inherits statement_timeout={timeout}"
        );
    }
}

/// A `DO` block is one opaque statement to the classifier: whatever it does inside (a
/// session set_config, a temporary table, a session advisory lock) is not seen, no reported
/// setting changes, and the connection goes back with that state to the next caller.
#[tokio::test]
async fn state_left_by_a_do_block_reaches_the_next_caller() {
    let pool = builder("attack_do_block").max_size(1).build().unwrap();
    let cases = [
        (
            "DO $$ BEGIN PERFORM set_config('statement_timeout', '4321', false); END $$",
            "SELECT current_setting('statement_timeout') = '4321ms'",
        ),
        (
            "DO $$ BEGIN CREATE TEMP TABLE attack_do_tmp (a int); END $$",
            "SELECT to_regclass('pg_temp.attack_do_tmp') IS NOT NULL",
        ),
        (
            "DO $$ BEGIN PERFORM pg_advisory_lock(774411); END $$",
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND objid = 774411 AND pid = pg_backend_pid()",
        ),
    ];
    let mut leaked = Vec::new();
    for (sql, probe) in cases {
        let c = pool.get().await.unwrap();
        c.batch_execute(sql).await.unwrap();
        drop(c);
        let c = pool.get().await.unwrap();
        let left: bool = c.query_one_scalar(probe, &[]).await.unwrap();
        // Whatever the probe found, close this connection before the next case.
        c.batch_execute("SET application_name = 'attack_do_block'")
            .await
            .unwrap();
        drop(c);
        if left {
            leaked.push(sql);
        }
    }
    assert!(
        leaked.is_empty(),
        "the next caller inherited the state of: {leaked:#?}"
    );
}

/// After an invocation, the connections whose dropped transaction queued a ROLLBACK get a
/// round trip bounded by `validate_timeout` (1 s) alone, not by the invocation's deadline:
/// with a slow database the invocation's future finishes after the Lambda deadline (the
/// environment is then timed out and reset). Closing the socket would end the transaction on
/// the server at once.
#[tokio::test]
async fn the_end_of_invocation_round_trip_runs_past_the_deadline() {
    use std::time::{Duration, SystemTime};
    let port = common::slow_relay(Duration::from_millis(700)).await;
    let pool = common::relayed(port, "attack_late_settle")
        .connect_timeout(Duration::from_secs(20))
        .max_size(1)
        .min_idle(1)
        .build()
        .unwrap();
    pool.warm_up().await.unwrap();
    let deadline = SystemTime::now() + Duration::from_millis(2500);
    pool.invocation(deadline, async {
        let mut c = pool.get().await.unwrap();
        let tx = c.transaction().await.unwrap(); // one slow round trip
        drop(tx); // ROLLBACK queued
        drop(c);
        // The handler answers 300 ms before the deadline.
        let left = deadline.duration_since(SystemTime::now()).unwrap();
        tokio::time::sleep(left - Duration::from_millis(300)).await;
    })
    .await;
    let late = SystemTime::now().duration_since(deadline);
    assert!(
        late.is_err(),
        "the invocation's future finished {:?} after its deadline",
        late.unwrap()
    );
}

/// A COPY FROM STDIN whose data the server rejects ends cleanly on the wire (the error, then
/// the ReadyForQuery of the CopyDone's Sync), but `CopyInSink::finish` returns the error
/// through `?` before it marks the copy done: the in-flight count stays and the pool closes
/// a connection at rest. Every bad CSV row costs a reconnect through RDS Proxy.
#[tokio::test]
async fn a_rejected_copy_row_closes_a_connection_at_rest() {
    use futures_util::SinkExt;
    let table = "attack_copy_bad_t";
    fresh_table(table).await;
    let pool = builder("attack_copy_bad").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let mut sink = Box::pin(
        c.copy_in::<_, bytes::Bytes>(&*format!("COPY {table} FROM STDIN"))
            .await
            .unwrap(),
    );
    sink.send(bytes::Bytes::from_static(b"not a number\n"))
        .await
        .unwrap();
    let err = sink.as_mut().finish().await.unwrap_err();
    assert!(err.as_db_error().is_some(), "{err:?}");
    let n: i32 = c.query_one_scalar("SELECT 42", &[]).await.unwrap();
    assert_eq!(n, 42, "the connection is at rest and usable");
    drop(sink);
    drop(c);
    let s = pool.status();
    assert_eq!(s.closed.total(), 0, "a usable connection was closed: {s:?}");
}

/// `settle()` waits until *every* request on the connection has its ReadyForQuery, not the
/// caller's own: a fast statement pipelined ahead of a slow one on the same client (what
/// tokio-postgres's pipelining is for: `join!` on `&PooledClient`) returns only when the slow
/// one is done. Its answer was there after a millisecond.
#[tokio::test]
async fn a_fast_statement_waits_for_a_slow_one_pipelined_behind_it() {
    use std::time::{Duration, Instant};
    let pool = builder("attack_pipeline_wait").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    // Both statements prepared and cached: each call below is one Bind/Execute/Sync.
    c.query("SELECT 1", &[]).await.unwrap();
    c.query("SELECT pg_sleep($1)", &[&0.0f64]).await.unwrap();
    let start = Instant::now();
    let fast = async {
        c.query("SELECT 1", &[]).await.unwrap();
        start.elapsed()
    };
    let slow = async {
        c.query("SELECT pg_sleep($1)", &[&4.0f64]).await.unwrap();
    };
    let (fast_took, ()) = tokio::join!(fast, slow);
    // Waiting for the slow one takes 4 s: 1.5 s of slack either side.
    assert!(
        fast_took < Duration::from_millis(2500),
        "SELECT 1 took {fast_took:?}: it waited for the pg_sleep pipelined behind it"
    );
}
