//! The connection's state comes from its protocol stream, not from the SQL text: each test is a
//! way the text-based bookkeeping was broken, checked against what PostgreSQL itself says.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{admin, assert_quiet, backends, builder, in_transaction_block};
use futures_util::StreamExt;
use pinpool::{CloseReason, Error, PinPolicy, PooledClient};

/// A `BEGIN ATOMIC` body holds `;` and `END`: a lexer reads the `END` as a commit. The server
/// says the transaction is still open, so the connection must not be reused.
#[tokio::test]
async fn a_begin_atomic_body_does_not_end_the_transaction() {
    let pool = builder("wire_atomic").max_size(1).build().unwrap();
    for (i, sql) in [
        "BEGIN",
        "BEGIN; CREATE FUNCTION pg_temp.wire_atomic_b() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;",
    ]
    .into_iter()
    .enumerate()
    {
        let c = pool.get().await.unwrap();
        c.batch_execute(sql).await.unwrap();
        if i == 0 {
            c.batch_execute(
                "CREATE FUNCTION pg_temp.wire_atomic_a() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
            )
            .await
            .unwrap();
        }
        assert!(in_transaction_block(&c).await);
        drop(c);
        let c = pool.get().await.unwrap();
        assert!(
            !in_transaction_block(&c).await,
            "the next checkout runs in the previous caller's transaction"
        );
    }
    assert_eq!(pool.status().closed.get(CloseReason::UnknownState), 2);
    assert_quiet(&pool);
}

/// `COPY ... FROM STDIN` through `execute`: tokio-postgres fails with "unexpected message"
/// while the server waits for COPY data. The wire saw the CopyInResponse.
#[tokio::test]
async fn copy_from_stdin_through_execute_never_goes_back_waiting_for_data() {
    let pool = builder("wire_copy").max_size(1).build().unwrap();
    for via_batch in [false, true] {
        let c = pool.get().await.unwrap();
        let r = if via_batch {
            c.batch_execute("COPY pg_catalog.pg_am FROM STDIN")
                .await
                .map(|_| 0)
        } else {
            c.execute("COPY pg_catalog.pg_am FROM STDIN", &[]).await
        };
        assert!(r.is_err(), "tokio-postgres does not speak COPY here");
        drop(c);
        let c = pool.get().await.unwrap();
        let n: i32 = c.query_one_scalar("SELECT 41 + 1", &[]).await.unwrap();
        assert_eq!(n, 42, "the next statement is answered, not swallowed");
    }
    assert_eq!(pool.status().closed.get(CloseReason::UnknownState), 2);

    // A COPY TO STDOUT the server finished by itself leaves the connection at rest: kept.
    let c = pool.get().await.unwrap();
    assert!(
        c.batch_execute("COPY (SELECT 1) TO STDOUT; SELECT 1")
            .await
            .is_err()
    );
    drop(c);
    let c = pool.get().await.unwrap();
    let n: i32 = c.query_one_scalar("SELECT 6 * 7", &[]).await.unwrap();
    assert_eq!(n, 42);
    drop(c);
    assert_eq!(pool.status().closed.total(), 2);
    assert_quiet(&pool);
}

/// `savepoint(name)` pastes the name into SQL: a `SET` hidden in it is sent, so it is seen on
/// the wire and the connection never reaches the next caller.
#[tokio::test]
async fn a_set_hidden_in_a_savepoint_name_pins() {
    let pool = builder("wire_savepoint").max_size(1).build().unwrap();
    let mut c = pool.get().await.unwrap();
    let mut tx = c.transaction().await.unwrap();
    let sp = tx
        .savepoint("sp; SET SESSION statement_timeout = '42ms'; SELECT 1")
        .await
        .unwrap();
    sp.commit().await.unwrap();
    tx.commit().await.unwrap();
    assert!(PooledClient::pin_state(&c).is_pinned());
    drop(c);
    let c = pool.get().await.unwrap();
    let t: String = c
        .query_one_scalar("SELECT current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    assert_ne!(t, "42ms", "the next checkout sees the hidden SET");
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::Pinned), 1);

    // The strict policy refuses it before anything is sent.
    let strict = builder("wire_savepoint_strict")
        .pin_policy(PinPolicy::Refuse)
        .build()
        .unwrap();
    let mut c = strict.get().await.unwrap();
    let mut tx = c.transaction().await.unwrap();
    let r = tx
        .savepoint("sp; SET SESSION statement_timeout = '42ms'")
        .await;
    assert!(matches!(r, Err(Error::PinRefused { .. })), "{:?}", r.err());
}

/// A stream read more slowly than the server sends it always has a row ready (the connection
/// task, on another worker, keeps filling it): its bound must still hold at every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowly_read_stream_stops_at_its_bound() {
    let pool = builder("wire_slow_stream")
        .query_timeout(Some(Duration::from_millis(300)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let start = Instant::now();
    let mut rows = Box::pin(
        c.query_raw("SELECT g FROM generate_series(1, 200000) g", [] as [i32; 0])
            .await
            .unwrap(),
    );
    let mut read = 0u64;
    let err = loop {
        match rows.next().await {
            Some(Ok(_)) => {
                read += 1;
                // A little work per row: 200,000 rows take about 4 s.
                std::thread::sleep(Duration::from_micros(20));
            }
            Some(Err(e)) => break e,
            None => panic!(
                "read all {read} rows in {:?} past a 300 ms bound",
                start.elapsed()
            ),
        }
    };
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    drop(rows);
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::TimedOut), 1);
}

/// One statement gets one `query_timeout`, across its prepare and its execute.
#[tokio::test]
async fn prepare_and_execute_share_one_query_timeout() {
    let port = common::slow_relay(Duration::from_secs(2)).await;
    let pool = common::relayed(port, "wire_one_timeout")
        .connect_timeout(Duration::from_secs(30))
        .query_timeout(Some(Duration::from_secs(3)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let start = Instant::now();
    // A cache miss: a Parse round trip, then the Bind/Execute round trip, 2 s each. One
    // timeout for both ends it at 3 s; one each would let it answer at 4 s.
    let r = c.query_one_scalar::<i32, _>("SELECT 7", &[]).await;
    let took = start.elapsed();
    assert!(
        matches!(&r, Err(e) if e.is_timeout()),
        "{r:?} after {took:?}"
    );
    assert!(took < Duration::from_millis(3900), "{took:?}");
}

/// A `commit()` called after the cutoff never reaches the server; the transaction's queued
/// `ROLLBACK` must have reached it before the invocation ends: the environment may freeze
/// right after, and then no task runs to send it.
#[test]
fn a_late_commit_leaves_no_transaction_open_after_the_invocation() {
    let app = "wire_late_commit";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = rt.block_on(async {
        let pool = builder(app)
            .deadline_margin(Duration::from_millis(100))
            .build()
            .unwrap();
        let deadline = SystemTime::now() + Duration::from_millis(600);
        pool.invocation(deadline, async {
            let mut c = pool.get().await.unwrap();
            let tx = c.transaction().await.unwrap();
            tx.execute("SELECT 1", &[]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            let r = tx.commit().await;
            assert!(matches!(&r, Err(e) if e.is_deadline()), "{r:?}");
        })
        .await;
        pool
    });
    // Frozen from here: only what already reached the server counts.
    let state = server_states(app);
    assert!(
        !state.iter().any(|s| s.starts_with("idle in transaction")),
        "{state:?}"
    );
    assert_quiet(&pool);
}

/// The states of the backends tagged `app`, asked with psql from this thread (a runtime that
/// is not running, as in a frozen Lambda environment, cannot ask).
fn server_states(app: &str) -> Vec<String> {
    let out = std::process::Command::new("psql")
        .args([
            &common::database_url(),
            "-Atc",
            &format!("SELECT state FROM pg_stat_activity WHERE application_name = '{app}'"),
        ])
        .output()
        .expect("psql");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A connection the pool closes has its socket closed before the call that closed it returns:
/// nothing may be left for a task to do, because a Lambda environment may freeze at once.
#[test]
fn a_discarded_connection_is_disconnected_before_the_return() {
    let app = "wire_sync_close";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = rt.block_on(async {
        let pool = builder(app).build().unwrap();
        let c = pool.get().await.unwrap();
        c.batch_execute("SET statement_timeout = '5s'")
            .await
            .unwrap();
        assert_eq!(backends(&admin().await, app).await.len(), 1);
        drop(c);
        pool
    });
    // The runtime does not run again from here ("frozen"): only the server can tell.
    let gone = (0..100).any(|_| {
        if server_states(app).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(30));
        false
    });
    assert!(gone, "the backend still runs: the socket was left open");
    assert_eq!(pool.status().closed.get(CloseReason::Pinned), 1);
}

/// Plaintext connections are opened by pinpool in host order: random load balancing, which it
/// would silently ignore, is refused by `build()`, naming the option.
#[test]
fn random_host_order_is_refused_for_plaintext() {
    let err = pinpool::Pool::builder(
        "postgres://postgres@127.0.0.1,127.0.0.2/postgres?load_balance_hosts=random",
    )
    .build()
    .unwrap_err();
    assert!(
        matches!(&err, Error::Config { option, .. } if *option == "load_balance_hosts"),
        "{err}"
    );
}

/// The plaintext connect tries every host in order, as tokio-postgres does: a refused first
/// host does not fail the connect, and the observer is on the one that answered.
#[tokio::test]
async fn hosts_are_tried_in_order_and_the_answering_one_is_observed() {
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = refused.local_addr().unwrap().port();
    drop(refused);
    let config: tokio_postgres::Config = common::database_url().parse().unwrap();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let pool = pinpool::Pool::builder(format!(
        "host=127.0.0.1,127.0.0.1 port={dead_port},{port} user=postgres dbname=postgres application_name=wire_hosts"
    ))
    .build()
    .unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute("SET statement_timeout = '9s'")
        .await
        .unwrap();
    assert!(PooledClient::pin_state(&c).is_pinned());
}
