//! Named faults through the emulator: each ends in a typed error within its bound, the pool's
//! invariants hold afterwards, and the pool serves again once the fault is gone.
#![cfg(feature = "emulator")]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{admin, assert_quiet, emulator};
use pinpool::{Error, Phase, Pool};

async fn select_one(pool: &Pool) -> Result<i32, Error> {
    pool.get().await?.query_one_scalar("SELECT 1", &[]).await
}

#[tokio::test]
async fn fault_emulator_killed_and_restarted() {
    let emu = emulator("f_restart", 2, |c| c).await;
    let addr = emu.addr();
    let pool = Pool::builder(emu.url("postgres", "postgres"))
        .build()
        .unwrap();
    assert_eq!(select_one(&pool).await.unwrap(), 1);
    drop(emu); // every client socket closes
    let down = select_one(&pool).await;
    assert!(down.is_err(), "nothing listens");
    let emu = emulator("f_restart", 2, |c| c.listen(addr)).await;
    let back = pool
        .invocation(
            SystemTime::now() + Duration::from_secs(5),
            select_one(&pool),
        )
        .await;
    assert_eq!(
        back.unwrap(),
        1,
        "the pool serves again once the proxy is back"
    );
    assert_quiet(&pool);
    drop(emu);
}

#[tokio::test]
async fn fault_silent_proxy_at_connect() {
    let emu = emulator("f_silent_connect", 2, |c| c).await;
    emu.set_silent(true);
    let pool = Pool::builder(emu.url("postgres", "postgres"))
        .connect_timeout(Duration::from_millis(400))
        .acquire_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let t = Instant::now();
    let err = select_one(&pool).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                phase: Phase::Connect,
                ..
            }
        ),
        "{err:?}"
    );
    // Unbounded, it would hang until the 30 s acquire_timeout.
    assert!(
        t.elapsed() < Duration::from_millis(400 + 2600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(pool.status().size, 0);
    emu.set_silent(false);
    assert_eq!(select_one(&pool).await.unwrap(), 1);
}

#[tokio::test]
async fn fault_silent_proxy_mid_statement() {
    let emu = emulator("f_silent_query", 2, |c| c).await;
    let pool = Pool::builder(emu.url("postgres", "postgres"))
        .query_timeout(Some(Duration::from_millis(400)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    emu.set_silent(true);
    let t = Instant::now();
    let err = c.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                phase: Phase::Query,
                ..
            }
        ),
        "{err:?}"
    );
    // Unbounded, it would hang for ever.
    assert!(
        t.elapsed() < Duration::from_millis(400 + 2600),
        "{:?}",
        t.elapsed()
    );
    assert!(c.is_closed());
    drop(c);
    emu.set_silent(false);
    assert_eq!(select_one(&pool).await.unwrap(), 1);
    assert_quiet(&pool);
}

#[tokio::test]
async fn fault_proxy_borrow_timeout_is_a_typed_error() {
    let emu = emulator("f_borrow", 2, |c| {
        c.max_connections(1)
            .borrow_timeout(Duration::from_millis(300))
    })
    .await;
    let (pinned, conn) =
        tokio_postgres::connect(&emu.url("postgres", "postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let task = tokio::spawn(conn);
    pinned.batch_execute("SET work_mem = '6MB'").await.unwrap(); // the only connection, pinned
    let pool = Pool::builder(emu.url("postgres", "postgres"))
        .build()
        .unwrap();
    let t = Instant::now();
    let err = select_one(&pool).await.unwrap_err();
    assert!(err.is_proxy_borrow_timeout(), "{err:?}");
    // Not the pool's 5 s connect_timeout.
    assert!(
        t.elapsed() < Duration::from_millis(300 + 2700),
        "{:?}",
        t.elapsed()
    );
    drop(pinned);
    task.abort();
    let ok = common::eventually(5, || async { select_one(&pool).await.is_ok() }).await;
    assert!(ok, "served again once the pinned client left");
    assert_quiet(&pool);
}

#[tokio::test]
async fn fault_handler_panics_while_holding_a_connection() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS f_panic_t; CREATE TABLE f_panic_t (id int)")
        .await
        .unwrap();
    let pool = common::builder("f_panic").max_size(1).build().unwrap();
    let p = pool.clone();
    let handler = tokio::spawn(async move {
        let mut c = p.get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        tx.execute("INSERT INTO f_panic_t VALUES (1)", &[])
            .await
            .unwrap();
        panic!("the handler fails while holding a transaction");
    });
    assert!(handler.await.unwrap_err().is_panic());
    assert_quiet(&pool);
    let c = pool.get().await.unwrap();
    let n: i64 = c
        .query_one_scalar("SELECT count(*) FROM f_panic_t", &[])
        .await
        .unwrap();
    assert_eq!(n, 0, "the transaction was rolled back");
    drop(c);
    admin.batch_execute("DROP TABLE f_panic_t").await.unwrap();
}

#[tokio::test]
async fn fault_proxy_drops_every_database_connection_under_load() {
    let emu = emulator("f_dropall", 2, |c| c).await;
    let pool = Pool::builder(emu.url("postgres", "postgres"))
        .max_size(4)
        .query_timeout(Some(Duration::from_secs(2)))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            let end = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < end {
                let r = async {
                    let mut c = pool.get().await?;
                    let tx = c.transaction().await?;
                    tx.query_one("SELECT pg_sleep(0.01)", &[]).await?;
                    tx.commit().await
                }
                .await;
                if r.is_ok() { ok += 1 } else { failed += 1 }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    emu.drop_upstream_connections();
    let mut total_ok = 0;
    for t in tasks {
        let (ok, _) = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("no hang")
            .unwrap();
        total_ok += ok;
    }
    assert!(total_ok > 0);
    assert_quiet(&pool);
    assert_eq!(
        select_one(&pool).await.unwrap(),
        1,
        "served again after the failover"
    );
}
