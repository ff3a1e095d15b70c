//! Through a real proxy nobody here wrote: PgBouncer 1.18 (Debian's package) in session mode,
//! started by each test on a free port. Session mode holds one server connection per client
//! connection, as RDS Proxy pinned every session before November 2023: parameterised queries,
//! the statement cache, transactions, streams and COPY work through it, its own errors are
//! typed and end the session, and its faults (an admin `KILL`) are survived by the safe retry.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{PgBouncer, PoolMode};
use futures_util::{SinkExt, TryStreamExt};
use pinpool::{Error, Pool, TimeoutCause};

fn pool(bouncer: &PgBouncer, app: &str, max: usize) -> Pool {
    Pool::builder(bouncer.url(app))
        .max_size(max)
        .build()
        .unwrap()
}

#[tokio::test]
async fn parameterised_queries_transactions_streams_and_copy_work_in_session_mode() {
    let Some(bouncer) = PgBouncer::start("pgb_session", PoolMode::Session, 4, "") else {
        return;
    };
    // Two pools of two: four client connections, four server connections.
    let pools = [
        pool(&bouncer, "pgb_session_a", 2),
        pool(&bouncer, "pgb_session_b", 2),
    ];
    let rounds = pools.iter().flat_map(|p| (0..40).map(move |i| (p, i)));
    let results = futures_util::future::join_all(rounds.map(|(p, i)| async move {
        let c = p.get().await?;
        let a: i32 = c.query_one_scalar("SELECT $1::int + 1", &[&i]).await?;
        let b: String = c
            .query_one_scalar("SELECT $1::text || 'x'", &[&i.to_string()])
            .await?;
        Ok::<_, Error>((a == i + 1) && (b == format!("{i}x")))
    }))
    .await;
    let failed: Vec<_> = results.iter().filter(|r| !matches!(r, Ok(true))).collect();
    assert!(
        failed.is_empty(),
        "{} of 80 rounds failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    for p in &pools {
        assert!(
            p.status().cache_hits > 0,
            "the statement cache served repeats"
        );
    }

    let p = &pools[0];
    let mut c = p.get().await.unwrap();
    c.batch_execute("DROP TABLE IF EXISTS pgb_rows; CREATE TABLE pgb_rows (n int)")
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO pgb_rows VALUES ($1)", &[&1i32])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let sink = c.copy_in("COPY pgb_rows FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"2\n3\n"))
        .await
        .unwrap();
    assert_eq!(sink.as_mut().finish().await.unwrap(), 2);
    let rows: Vec<tokio_postgres::Row> = c
        .query_raw("SELECT n FROM pgb_rows ORDER BY n", Vec::<i32>::new())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let ns: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        ns,
        [2, 3],
        "the rolled-back row is not there, the copied ones are"
    );
    c.batch_execute("DROP TABLE pgb_rows").await.unwrap();
}

#[tokio::test]
async fn a_deadline_shorter_than_query_wait_timeout_gives_a_typed_error_in_time() {
    let Some(bouncer) =
        PgBouncer::start("pgb_wait", PoolMode::Session, 1, "query_wait_timeout = 30")
    else {
        return;
    };
    // Another client holds the only server connection (a frozen environment's session).
    let holder = bouncer.hold_a_server_connection("pgb_wait_holder").await;

    let p = Pool::builder(bouncer.url("pgb_wait"))
        .deadline_margin(Duration::from_millis(200))
        .build()
        .unwrap();
    let t = Instant::now();
    let err = p
        .invocation(SystemTime::now() + Duration::from_millis(1500), async {
            let c = p.get().await?;
            c.query_one("SELECT 1", &[]).await.map(drop)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                cause: TimeoutCause::Deadline,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // Once the holder leaves, the pool serves.
    drop(holder);
    let ok = common::eventually(10, || async {
        match p.get().await {
            Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(ok, "the pool serves once the server connection is free");
}

#[tokio::test]
async fn pgbouncers_query_wait_timeout_is_the_servers_word_and_ends_the_session() {
    let Some(bouncer) = PgBouncer::start("pgb_qwt", PoolMode::Session, 1, "query_wait_timeout = 1")
    else {
        return;
    };
    let holder = bouncer.hold_a_server_connection("pgb_qwt_holder").await;

    let p = Pool::builder(bouncer.url("pgb_qwt")).build().unwrap();
    let t = Instant::now();
    let err = match p.get().await {
        Ok(c) => c.query_one("SELECT 1", &[]).await.map(drop).unwrap_err(),
        Err(e) => e,
    };
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let said = err.to_string();
    assert!(said.contains("query_wait_timeout"), "{said}");
    assert_eq!(err.code().map(|c| c.code()), Some("08P01"), "{err:?}");
    // The session it ended is not handed out again.
    assert_eq!(p.status().idle, 0, "{:?}", p.status());
    drop(holder);
}

#[tokio::test]
async fn an_admin_kill_between_checkout_and_first_statement_is_survived() {
    let Some(bouncer) = PgBouncer::start("pgb_kill", PoolMode::Session, 4, "") else {
        return;
    };
    let p = pool(&bouncer, "pgb_kill", 2);
    {
        let c = p.get().await.unwrap();
        c.query_one("SELECT 1", &[]).await.unwrap();
    }
    let c = p.get().await.unwrap();
    bouncer.admin("KILL postgres").await;
    common::until_closed(&c).await;
    // `KILL` leaves the database paused until `RESUME`.
    bouncer.admin("RESUME postgres").await;
    let two: i32 = c
        .query_one_scalar("SELECT 1 + 1", &[])
        .await
        .expect("nothing of it had been sent: run again on a fresh connection");
    assert_eq!(two, 2);
    assert_eq!(p.status().retries, 1);
}

/// `PAUSE`: queries wait for the proxy, as in a borrow queue. The invocation's cutoff stops
/// the wait with a typed error; after `RESUME` the pool serves. (In transaction mode with one
/// server connection, so the `PAUSE` completes while pinpool keeps its client connection
/// idle: in session mode it would wait for every client to leave.)
#[tokio::test]
async fn a_paused_pgbouncer_costs_an_invocation_its_cutoff_not_a_hang() {
    let Some(bouncer) = PgBouncer::start("pgb_pause", PoolMode::Transaction, 1, "") else {
        return;
    };
    let p = Pool::builder(bouncer.url("pgb_pause"))
        .deadline_margin(Duration::from_millis(200))
        .build()
        .unwrap();
    p.get()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), bouncer.admin("PAUSE postgres"))
        .await
        .expect("PAUSE completes: no transaction is open");
    let t = Instant::now();
    let err = p
        .invocation(SystemTime::now() + Duration::from_millis(1500), async {
            let c = p.get().await?;
            c.query_one("SELECT 1", &[]).await.map(drop)
        })
        .await
        .unwrap_err();
    assert!(err.is_deadline(), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    bouncer.admin("RESUME postgres").await;
    let one: i32 = p
        .invocation(SystemTime::now() + Duration::from_secs(20), async {
            p.get().await?.query_one_scalar("SELECT 1", &[]).await
        })
        .await
        .expect("served after RESUME");
    assert_eq!(one, 1);
}

/// `RECONNECT` (server connections replaced as they are released) changes nothing a client
/// sees; `SHUTDOWN` closes every client connection, and while PgBouncer is down checkouts fail
/// at once with a connect error; restarted on the same port, the next invocation is served.
#[tokio::test]
async fn reconnect_shutdown_and_a_restart_on_the_same_port_are_survived() {
    let Some(mut bouncer) = PgBouncer::start("pgb_restart", PoolMode::Session, 4, "") else {
        return;
    };
    let p = pool(&bouncer, "pgb_restart", 2);
    let select = |p: &Pool| {
        let p = p.clone();
        async move {
            p.invocation(SystemTime::now() + Duration::from_secs(20), async {
                p.get()
                    .await?
                    .query_one_scalar::<i32, _>("SELECT 7", &[])
                    .await
            })
            .await
        }
    };
    assert_eq!(select(&p).await.unwrap(), 7);
    bouncer.admin("RECONNECT postgres").await;
    assert_eq!(select(&p).await.unwrap(), 7);

    bouncer.shutdown().await;
    let down = common::eventually(10, || async {
        matches!(select(&p).await, Err(e) if e.phase() == Some(pinpool::Phase::Connect))
    })
    .await;
    assert!(
        down,
        "while PgBouncer is down a checkout fails with a connect error"
    );

    bouncer.restart();
    assert_eq!(select(&p).await.expect("served again after the restart"), 7);
    let s = p.status();
    assert!(s.idle + s.in_use <= s.size && s.size <= 2, "{s:?}");
}

/// pgbench through PgBouncer in transaction mode, beside the emulator's pgbench check
/// (`tests/emulator.rs`): 16 clients over 4 server connections. With unnamed statements
/// (`-M extended`) no transaction fails. With named ones (`-M prepared`) PgBouncer 1.18 fails
/// them ("prepared statement "P_0" does not exist", "... already exists": clients abort, the
/// server connections they leave in a failed state keep others waiting to
/// `query_wait_timeout`, 5 s here), where the emulator, modelling today's RDS Proxy, prepares them again on whichever
/// database connection a transaction lands on: the two proxies disagree there, and this test
/// says so.
#[tokio::test]
async fn pgbench_through_pgbouncer_in_transaction_mode() {
    let Some(bouncer) = PgBouncer::start(
        "pgb_bench",
        PoolMode::Transaction,
        4,
        "query_wait_timeout = 5",
    ) else {
        return;
    };
    let admin = common::admin().await;
    let db = format!("pinpool_pgb_bench_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let (host, db_port) = common::database_addr();
    let pgbench = |args: Vec<String>| async move {
        tokio::process::Command::new("pgbench")
            .args(&args)
            .output()
            .await
            .expect("pgbench is installed")
    };
    let init = pgbench(
        [
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            &host,
            "-p",
            &db_port.to_string(),
            "-U",
            "postgres",
            &db,
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let port = bouncer.port.to_string();
    let run = |mode: &str| {
        [
            "-M",
            mode,
            "-c",
            "16",
            "-j",
            "2",
            "-T",
            "3",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            &db,
        ]
        .map(String::from)
        .to_vec()
    };
    let extended = pgbench(run("extended")).await;
    let out = String::from_utf8_lossy(&extended.stdout).into_owned();
    assert!(
        extended.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&extended.stderr)
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");

    let prepared = pgbench(run("prepared")).await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&prepared.stdout),
        String::from_utf8_lossy(&prepared.stderr)
    );
    assert!(
        !prepared.status.success() || !said.contains("number of failed transactions: 0"),
        "named statements crossed transactions through PgBouncer 1.18: {said}"
    );
    drop(bouncer);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
