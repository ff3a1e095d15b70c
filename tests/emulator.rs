//! The RDS Proxy emulator against the real PostgreSQL, with real clients (tokio-postgres,
//! pgbench).
#![cfg(feature = "emulator")]

mod common;

use std::time::Duration;

use common::{admin, backends, database_url, emulator as start, eventually, kill_backends};
use pinpool::emulator::{Emulator, EmulatorConfig};
use pinpool::pinning::{PinRules, Reason};
use tokio_postgres::error::SqlState;

async fn client(emu: &Emulator) -> tokio_postgres::Client {
    let (c, conn) =
        tokio_postgres::connect(&emu.url("postgres", "postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect through the emulator");
    tokio::spawn(conn);
    c
}

async fn settle(emu: &Emulator) {
    let ok = eventually(5, || async {
        emu.counters().upstream_in_use == 0 && emu.counters().pinned_now == 0
    })
    .await;
    assert!(ok, "{:?}", emu.counters());
}

#[tokio::test]
async fn many_clients_share_fewer_database_connections_without_pinning() {
    let emu = start("em_share", 2, |c| c).await;
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS em_share_t; CREATE TABLE em_share_t (c int, i int)")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for c in 0..8i32 {
        let mut cl = client(&emu).await;
        tasks.push(tokio::spawn(async move {
            // A statement prepared once and executed in later transactions, which land on
            // whichever database connection is free.
            let stmt = cl.prepare("SELECT $1::int * 2").await.unwrap();
            for i in 0..20i32 {
                let v: i32 = cl
                    .query_one("SELECT $1::int + 1", &[&i])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(v, i + 1);
                let d: i32 = cl.query_one(&stmt, &[&i]).await.unwrap().get(0);
                assert_eq!(d, i * 2);
                let tx = cl.transaction().await.unwrap();
                tx.execute("INSERT INTO em_share_t VALUES ($1, $2)", &[&c, &i])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                let rows = cl.simple_query("SELECT 1; SELECT 2").await.unwrap();
                assert!(rows.len() >= 4);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n: i64 = admin
        .query_one("SELECT count(*) FROM em_share_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 160);
    let c = emu.counters();
    assert!(c.upstream_open <= 2, "{c:?}");
    assert_eq!((c.peak_pinned, c.clients_total), (0, 8), "{c:?}");
    assert!(
        c.borrow_waits > 0,
        "8 clients over 2 connections must have queued: {c:?}"
    );
    admin.batch_execute("DROP TABLE em_share_t").await.unwrap();
}

#[tokio::test]
async fn each_pinning_condition_pins_and_ordinary_statements_do_not() {
    let admin = admin().await;
    admin
        .batch_execute("DROP SEQUENCE IF EXISTS em_pin_seq; CREATE SEQUENCE em_pin_seq")
        .await
        .unwrap();
    let emu = start("em_pins", 4, |c| c).await;
    let big = format!("SELECT '{}'", "x".repeat(17_000));
    let cases: Vec<(&str, Reason)> = vec![
        ("SET work_mem = '5MB'", Reason::Set),
        ("RESET work_mem", Reason::Set),
        (
            "SELECT set_config('work_mem', '5MB', false)",
            Reason::SetConfig,
        ),
        ("PREPARE em_q AS SELECT 1", Reason::PreparedStatement),
        ("DISCARD PLANS", Reason::Discard),
        ("CREATE TEMP TABLE em_tt (id int)", Reason::TempObject),
        ("DECLARE em_c CURSOR WITH HOLD FOR SELECT 1", Reason::Cursor),
        ("LISTEN em_chan", Reason::Listen),
        ("LOAD 'auto_explain'", Reason::Load),
        ("SELECT nextval('em_pin_seq')", Reason::SequenceFunction),
        ("SELECT pg_advisory_lock(4711)", Reason::AdvisoryLock),
        (big.as_str(), Reason::Oversized),
    ];
    for (sql, reason) in cases {
        let c = client(&emu).await;
        let _ = c.batch_execute(sql).await; // LOAD may fail where the library is missing: it pinned anyway
        let counters = emu.counters();
        assert_eq!(counters.pinned_now, 1, "{sql}: {counters:?}");
        assert!(counters.pins_for(reason) >= 1, "{sql}: {counters:?}");
        drop(c);
        settle(&emu).await;
    }
    // The extended protocol: a parameterised query and a transaction-level lock do not pin.
    let c = client(&emu).await;
    c.query("SELECT $1::text", &[&"x"]).await.unwrap();
    let mut c2 = client(&emu).await;
    let tx = c2.transaction().await.unwrap();
    tx.query("SELECT pg_advisory_xact_lock(4712)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(emu.counters().pinned_now, 0, "{:?}", emu.counters());
    // A pinning statement sent with the extended protocol pins when executed.
    c.query("SELECT nextval('em_pin_seq')", &[]).await.unwrap();
    assert_eq!(emu.counters().pinned_now, 1);
    drop((c, c2));
    settle(&emu).await;
    admin
        .batch_execute("DROP SEQUENCE em_pin_seq")
        .await
        .unwrap();
}

#[tokio::test]
async fn the_legacy_switch_pins_on_any_parse() {
    let emu = start("em_legacy", 2, |c| c.rules(PinRules::legacy())).await;
    let c = client(&emu).await;
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(emu.counters().pinned_now, 0);
    c.query("SELECT $1::int", &[&1i32]).await.unwrap();
    let counters = emu.counters();
    assert_eq!(
        (counters.pinned_now, counters.pins_for(Reason::Parse)),
        (1, 1),
        "{counters:?}"
    );
    drop(c);
    settle(&emu).await;
}

#[tokio::test]
async fn a_pinned_connection_is_freed_only_by_disconnect_and_reset_before_reuse() {
    let emu = start("em_reset", 1, |c| {
        c.borrow_timeout(Duration::from_millis(500))
    })
    .await;
    let probe = client(&emu).await;
    let default: String = probe.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    let a = client(&emu).await;
    a.batch_execute("SET work_mem = '13MB'").await.unwrap();
    // The only database connection is pinned to `a`: another client's transaction times out.
    let err = probe.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_EXCEPTION), "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert_eq!(message, "Timed-out waiting to acquire database connection.");
    assert_eq!(emu.counters().borrow_timeouts, 1);
    // Still pinned after a finished transaction of its own.
    a.query("SELECT 1", &[]).await.unwrap();
    assert_eq!(emu.counters().pinned_now, 1);
    drop(a);
    settle(&emu).await;
    let now: String = probe.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(
        now, default,
        "the session was reset before its connection was reused"
    );
    let session: i64 = probe
        .query_one(
            "SELECT count(*) FROM pg_settings WHERE source = 'session'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(session, 0);
}

#[tokio::test]
async fn an_open_transaction_holds_its_connection_until_it_ends() {
    let emu = start("em_txn", 1, |c| {
        c.borrow_timeout(Duration::from_millis(300))
    })
    .await;
    let a = client(&emu).await;
    let b = client(&emu).await;
    a.batch_execute("BEGIN").await.unwrap();
    a.query("SELECT 1", &[]).await.unwrap();
    let err = b.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_EXCEPTION));
    a.batch_execute("COMMIT").await.unwrap();
    b.query("SELECT 1", &[]).await.unwrap();
    assert_eq!(emu.counters().peak_pinned, 0);
}

#[tokio::test]
async fn logins_succeed_without_a_free_connection_and_options_are_refused() {
    let emu = start("em_login", 1, |c| {
        c.borrow_timeout(Duration::from_millis(200))
    })
    .await;
    let a = client(&emu).await;
    a.batch_execute("SET work_mem = '6MB'").await.unwrap(); // pins the only connection
    let b = client(&emu).await; // still logs in
    assert!(b.query("SELECT 1", &[]).await.is_err());
    let url = format!(
        "{}?options=-c%20work_mem%3D1MB",
        emu.url("postgres", "postgres")
    );
    let err = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("doesn't support the option"), "{err:?}");
    drop(a);
}

#[tokio::test]
async fn passwords_are_checked_by_the_emulator() {
    let emu = start("em_password", 1, |c| c.password("proxy-secret")).await;
    let base = emu.url("postgres", "postgres");
    let wrong = format!("{}?password=nope", base);
    let err = tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
    let right = format!("{}?password=proxy-secret", base);
    let (c, conn) = tokio_postgres::connect(&right, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.query("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn idle_clients_are_closed() {
    let emu = start("em_idle", 1, |c| {
        c.idle_client_timeout(Duration::from_millis(300))
    })
    .await;
    let c = client(&emu).await;
    c.query("SELECT 1", &[]).await.unwrap();
    assert!(eventually(5, || async { c.is_closed() }).await);
    assert_eq!(emu.counters().idle_client_closes, 1);
}

#[tokio::test]
async fn dropping_every_database_connection_fails_pinned_clients_and_serves_new_ones() {
    let emu = start("em_dropall", 2, |c| c).await;
    let pinned = client(&emu).await;
    pinned.batch_execute("SET work_mem = '7MB'").await.unwrap();
    emu.drop_upstream_connections();
    assert!(eventually(5, || async { pinned.is_closed() }).await);
    let fresh = client(&emu).await;
    fresh.query("SELECT 1", &[]).await.unwrap();
    settle(&emu).await;
}

#[tokio::test]
async fn pgbench_prepared_with_16_clients_over_4_connections_has_no_failed_transaction() {
    let admin = admin().await;
    // A database of this test run's own: pgbench -i drops and creates its tables.
    let db = format!("pinpool_pgbench_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url: tokio_postgres::Config = database_url().parse().unwrap();
    let host = "127.0.0.1";
    let user = url.get_user().unwrap_or("postgres").to_string();
    let init = tokio::process::Command::new("pgbench")
        .args([
            "-i", "-q", "-s", "1", "-h", host, "-p", "5432", "-U", &user, &db,
        ])
        .output()
        .await
        .expect("pgbench is installed");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let upstream = format!("postgres://{user}@{host}:5432/{db}");
    let emu = Emulator::start(
        EmulatorConfig::new(upstream)
            .max_connections(4)
            .application_name("em_pgbench"),
    )
    .await
    .unwrap();
    let port = emu.addr().port().to_string();
    let run = tokio::process::Command::new("pgbench")
        .args([
            "-M", "prepared", "-c", "16", "-j", "2", "-T", "3", "-h", host, "-p", &port, "-U",
            &user, &db,
        ])
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let c = emu.counters();
    drop(emu);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    assert!(c.upstream_open <= 4 && c.peak_pinned == 0, "{c:?}");
}

#[tokio::test]
async fn a_hundred_clients_pinning_and_leaving_abruptly_leak_nothing() {
    let emu = start("em_stress", 4, |c| c.borrow_timeout(Duration::from_secs(2))).await;
    let end = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for n in 0..100u64 {
        let url = emu.url("postgres", "postgres");
        tasks.push(tokio::spawn(async move {
            let mut seed = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut rand = move |m: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % m
            };
            let mut wrong = 0;
            while tokio::time::Instant::now() < end {
                let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    continue;
                };
                let task = tokio::spawn(conn);
                for _ in 0..rand(5) + 1 {
                    let v = rand(1000) as i32;
                    let step = match rand(6) {
                        0 => c.batch_execute("SET work_mem = '8MB'").await.map(|_| v),
                        1 => c.batch_execute("BEGIN").await.map(|_| v),
                        2 => {
                            // Leave mid-query: end the connection while the statement runs.
                            let q = c.query("SELECT pg_sleep(0.05)", &[]);
                            let _ = tokio::time::timeout(Duration::from_millis(10), q).await;
                            break;
                        }
                        _ => c
                            .query_one("SELECT $1::int", &[&v])
                            .await
                            .map(|r| r.get::<_, i32>(0)),
                    };
                    match step {
                        Ok(got) if got != v => wrong += 1,
                        _ => {}
                    }
                }
                drop(c);
                task.abort(); // abrupt: no Terminate message
            }
            wrong
        }));
    }
    let mut wrong = 0;
    for t in tasks {
        wrong += tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("no deadlock")
            .unwrap();
    }
    assert_eq!(wrong, 0, "a client got another's answer");
    let ok = eventually(15, || async {
        let c = emu.counters();
        c.upstream_in_use == 0 && c.pinned_now == 0 && c.clients == 0
    })
    .await;
    let c = emu.counters();
    assert!(ok, "{c:?}");
    assert!(c.upstream_open <= 4 && c.peak_pinned >= 1, "{c:?}");
    // The connections still work.
    let probe = client(&emu).await;
    probe.query("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn copy_works_in_both_directions_through_the_emulator() {
    use bytes::Bytes;
    use futures_util::{SinkExt, TryStreamExt};
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS em_copy_t; CREATE TABLE em_copy_t (id int, v text)")
        .await
        .unwrap();
    let emu = start("em_copy", 1, |c| c).await;
    let c = client(&emu).await;
    let sink = c.copy_in("COPY em_copy_t FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    for i in 0..50 {
        sink.send(Bytes::from(format!("{i}\tv{i}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.as_mut().finish().await.unwrap(), 50);
    let out: Vec<Bytes> = c
        .copy_out("COPY (SELECT id FROM em_copy_t ORDER BY id LIMIT 2) TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out.concat(), b"0\n1\n");
    assert_eq!(emu.counters().peak_pinned, 0);
    settle(&emu).await;
    admin.batch_execute("DROP TABLE em_copy_t").await.unwrap();
}

#[tokio::test]
async fn the_emulator_logs_in_upstream_with_scram() {
    // The role from scripts/test-db-setup.sh must log in with a password (SCRAM-SHA-256).
    if !common::password_auth_enforced().await {
        return;
    }
    let upstream = format!(
        "postgres://{}:{}@127.0.0.1:5432/postgres",
        common::PASSWORD_ROLE,
        common::PASSWORD_ROLE_SECRET
    );
    let emu = Emulator::start(
        EmulatorConfig::new(upstream)
            .max_connections(1)
            .application_name("em_scram"),
    )
    .await
    .expect("SCRAM login upstream");
    let c = client(&emu).await;
    let user: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "pinpool_pw");
    let wrong = "postgres://pinpool_pw:nope@127.0.0.1:5432/postgres";
    assert!(Emulator::start(EmulatorConfig::new(wrong)).await.is_err());
}

/// A relay to the test database that waits `delay` after accepting each connection before it
/// connects on: a database that far away. Returns the key-value connection string through it.
async fn slow_database(delay: Duration) -> String {
    let db: tokio_postgres::Config = database_url().parse().unwrap();
    let host = match db.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = db.get_ports().first().copied().unwrap_or(5432);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let host = host.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect((host.as_str(), port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut url = format!(
        "host=127.0.0.1 port={} user={} dbname={}",
        relay.port(),
        quote(db.get_user().unwrap_or("postgres")),
        quote(db.get_dbname().unwrap_or("postgres")),
    );
    if let Some(password) = db.get_password() {
        url += &format!(" password={}", quote(&String::from_utf8_lossy(password)));
    }
    url
}

/// A client over a raw socket, logged in to the emulator (so it can vanish at any moment).
async fn raw_client(emu: &Emulator) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(emu.addr()).await.unwrap();
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "postgres"), ("database", "postgres")],
        &mut out,
    )
    .unwrap();
    s.write_all(&out).await.unwrap();
    common::until_ready(&mut s).await;
    s
}

#[tokio::test]
async fn clients_leaving_while_their_database_connection_opens_leak_no_room() {
    const APP: &str = "em_leave_mid_open";
    let upstream = slow_database(Duration::from_millis(150)).await;
    let emu = Emulator::start(
        EmulatorConfig::new(upstream)
            .max_connections(2)
            .borrow_timeout(Duration::from_secs(3))
            .application_name(APP),
    )
    .await
    .expect("emulator starts");
    // No idle database connection: each client's statement has to open one.
    emu.drop_upstream_connections();
    assert!(eventually(5, || async { emu.counters().upstream_open == 0 }).await);
    for _ in 0..2 {
        use tokio::io::AsyncWriteExt;
        let before = emu.counters().upstream_open;
        let mut s = raw_client(&emu).await;
        let mut out = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query("SELECT 1", &mut out).unwrap();
        s.write_all(&out).await.unwrap();
        // The emulator is opening a database connection for it (150 ms away): vanish.
        assert!(
            eventually(5, || async { emu.counters().upstream_open == before + 1 }).await,
            "{:?}",
            emu.counters()
        );
        drop(s);
        assert!(
            eventually(5, || async { emu.counters().clients == 0 }).await,
            "{:?}",
            emu.counters()
        );
    }
    // A client that stays is served.
    let c = client(&emu).await;
    let v: i32 = tokio::time::timeout(Duration::from_secs(10), c.query_one("SELECT 7", &[]))
        .await
        .expect("answered")
        .expect("served: the clients that left freed their room")
        .get(0);
    assert_eq!(v, 7);
    drop(c);
    settle(&emu).await;
    // The emulator counts exactly the database connections that exist.
    let admin = admin().await;
    let matched = eventually(5, || async {
        common::backends(&admin, APP).await.len() as u64 == emu.counters().upstream_open
    })
    .await;
    assert!(
        matched,
        "backends {:?}, emulator {:?}",
        common::backends(&admin, APP).await,
        emu.counters()
    );
    assert!(emu.counters().upstream_open <= 2, "{:?}", emu.counters());
}

#[tokio::test]
async fn a_function_call_message_pins_its_session() {
    use tokio::io::AsyncWriteExt;
    let emu = start("em_fcall", 1, |c| {
        c.borrow_timeout(Duration::from_millis(500))
    })
    .await;
    let other = client(&emu).await;
    let default: String = other.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    let oid: u32 = other
        .query_one("SELECT 'set_config'::regproc::oid", &[])
        .await
        .unwrap()
        .get(0);
    // FunctionCall (the protocol's, as libpq's PQfn sends it): set_config('work_mem', '7MB',
    // false), arguments and result in text format.
    let mut body = oid.to_be_bytes().to_vec();
    body.extend(0i16.to_be_bytes());
    body.extend(3i16.to_be_bytes());
    for arg in ["work_mem", "7MB", "false"] {
        body.extend((arg.len() as i32).to_be_bytes());
        body.extend(arg.as_bytes());
    }
    body.extend(0i16.to_be_bytes());
    let mut message = vec![b'F'];
    message.extend(((body.len() + 4) as i32).to_be_bytes());
    message.extend(body);
    let mut raw = raw_client(&emu).await;
    raw.write_all(&message).await.unwrap();
    let tags = common::until_ready(&mut raw).await;
    assert!(!tags.contains(&b'E'), "the call failed: {tags:?}");
    let c = emu.counters();
    assert_eq!(
        (c.pinned_now, c.pins_for(Reason::Untracked)),
        (1, 1),
        "a FunctionCall pins: {c:?}"
    );
    // Its database connection (the only one) is not handed to another client.
    let err = other.query_one("SHOW work_mem", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_EXCEPTION), "{err:?}");
    // Once the pinned client leaves, the connection is reset before it serves another.
    drop(raw);
    settle(&emu).await;
    let now: String = other.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(now, default);
}

async fn client_named(emu: &Emulator, app: &str) -> tokio_postgres::Client {
    let url = format!("{}?application_name={app}", emu.url("postgres", "postgres"));
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect through the emulator");
    tokio::spawn(conn);
    c
}

#[tokio::test]
async fn the_emulator_names_who_holds_the_pins() {
    let emu = start("em_who", 4, |c| c).await;
    let pinned = client_named(&emu, "em_who_pinned").await;
    let plain = client_named(&emu, "em_who_plain").await;
    pinned
        .batch_execute("SET search_path = public")
        .await
        .unwrap();
    plain.batch_execute("SELECT 1").await.unwrap();
    // The name given at login, though the pinning statement could have changed it.
    let other = client_named(&emu, "em_who_renamed").await;
    other
        .batch_execute("SET application_name = 'something_else'")
        .await
        .unwrap();
    let mut names = emu.pinned_sessions();
    names.sort();
    assert_eq!(names, ["em_who_pinned", "em_who_renamed"]);
    drop(pinned);
    drop(other);
    let ok = eventually(5, || async { emu.pinned_sessions().is_empty() }).await;
    assert!(ok, "{:?}", emu.pinned_sessions());
    drop(plain);
}

#[tokio::test]
async fn a_nat_that_forgets_idle_flows_leaves_the_client_waiting_for_ever() {
    let emu = start("em_nat", 2, |c| {
        c.nat_idle_timeout(Some(Duration::from_secs(1)))
            .idle_client_timeout(Duration::from_secs(5))
    })
    .await;
    let c = client_named(&emu, "em_nat_client").await;
    c.batch_execute("SET search_path = public").await.unwrap(); // pins
    let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    // Quick enough: the flow is remembered.
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.batch_execute("SELECT 1").await.unwrap();
    assert_eq!(emu.counters().nat_drops, 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Forgotten: the socket is open, the query goes out, nothing comes back.
    assert!(!c.is_closed());
    let answer = tokio::time::timeout(Duration::from_secs(1), c.batch_execute("SELECT 1")).await;
    assert!(answer.is_err(), "a forgotten flow answered: {answer:?}");
    assert_eq!(emu.counters().nat_drops, 1);
    // The proxy still holds the pinned session until its idle client timeout, then lets go.
    assert_eq!(emu.pinned_sessions(), ["em_nat_client"]);
    let ok = eventually(8, || async { emu.counters().pinned_now == 0 }).await;
    assert!(ok, "{:?}", emu.counters());
    assert!(emu.counters().idle_client_closes >= 1);
    assert!(
        !c.is_closed(),
        "the client heard of the close through the NAT"
    );
}

#[tokio::test]
async fn stopping_the_emulator_closes_the_database_connections_of_forgotten_flows() {
    let admin = admin().await;
    let emu = start("em_nat_stop", 2, |c| {
        c.nat_idle_timeout(Some(Duration::from_millis(200)))
            .idle_client_timeout(Duration::from_secs(60))
    })
    .await;
    let c = client_named(&emu, "em_nat_stop_client").await;
    c.batch_execute("SET search_path = public").await.unwrap(); // pins
    let forgotten = eventually(5, || async { emu.counters().nat_drops == 1 }).await;
    assert!(forgotten, "{:?}", emu.counters());
    assert!(!common::backends(&admin, "em_nat_stop").await.is_empty());
    // The client gives up too (a Lambda environment killed at its timeout): its close is lost
    // in the NAT as well, and the proxy keeps the session.
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(emu);
    let gone = eventually(5, || async {
        common::backends(&admin, "em_nat_stop").await.is_empty()
    })
    .await;
    assert!(gone, "the emulator's database connections outlived it");
}

#[tokio::test]
async fn stopping_the_emulator_closes_its_idle_database_connections() {
    let admin = admin().await;
    let emu = start("em_stop_idle", 4, |c| c).await;
    let clients = [
        client_named(&emu, "em_stop_idle_a").await,
        client_named(&emu, "em_stop_idle_b").await,
    ];
    // Two transactions at once: two database connections, back in the emulator's pool after.
    let (a, b) = tokio::join!(
        clients[0].batch_execute("BEGIN; SELECT pg_sleep(1); COMMIT"),
        clients[1].batch_execute("BEGIN; SELECT pg_sleep(1); COMMIT")
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(common::backends(&admin, "em_stop_idle").await.len(), 2);
    drop(emu);
    let gone = eventually(5, || async {
        common::backends(&admin, "em_stop_idle").await.is_empty()
    })
    .await;
    assert!(gone, "idle database connections outlived the emulator");
}

#[tokio::test]
async fn a_database_connection_that_dies_while_idle_is_neither_counted_nor_lent() {
    // The database ends a connection idle in the emulator's pool (a failover, an idle timeout
    // on the server): the emulator must notice before it lends it or counts it as open.
    const APP: &str = "em_idle_dies";
    let emu = start(APP, 2, |c| c).await;
    let c = client(&emu).await;
    let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    settle(&emu).await;
    assert_eq!(emu.counters().upstream_open, 1, "{:?}", emu.counters());
    let admin = admin().await;
    assert_eq!(kill_backends(&admin, APP).await, 1);
    let gone = eventually(5, || async { backends(&admin, APP).await.is_empty() }).await;
    assert!(gone, "the backend was terminated");
    let counted = eventually(5, || async { emu.counters().upstream_open == 0 }).await;
    assert!(
        counted,
        "a dead idle connection is still counted: {:?}",
        emu.counters()
    );
    // The same client's next transaction gets a live connection.
    let v: i32 = c.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(v, 2);
}
