//! The per-connection statement cache: hits, misses, eviction with a protocol Close, DDL
//! invalidation, and named statements through the RDS Proxy emulator.

mod common;

use common::{admin, builder};
use pinpool::PooledClient;

/// Protocol-level prepared statements of this session, as the server lists them (asked with
/// the simple protocol, which prepares nothing).
async fn server_statements(c: &PooledClient) -> usize {
    let rows = c
        .simple_query("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql")
        .await
        .unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn repeated_queries_hit_the_cache_and_the_server_keeps_one_statement() {
    let pool = builder("sc_hit").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    for i in 0..5i32 {
        let v: i32 = c
            .query_one_scalar("SELECT $1::int + 1", &[&i])
            .await
            .unwrap();
        assert_eq!(v, i + 1);
    }
    let s = pool.status();
    assert_eq!((s.cache_misses, s.cache_hits), (1, 4), "{s:?}");
    assert_eq!(server_statements(&c).await, 1);
    // The explicit form shares the cache.
    let stmt = c.prepare_cached("SELECT $1::int + 1").await.unwrap();
    assert_eq!(c.query_one_scalar::<i32, _>(&stmt, &[&1]).await.unwrap(), 2);
    assert_eq!(pool.status().cache_hits, 5);
    assert_eq!(server_statements(&c).await, 1);
    assert!(
        !PooledClient::pin_state(&c).is_pinned(),
        "caching pins nothing"
    );
}

#[tokio::test]
async fn an_evicted_statement_is_closed_on_the_server() {
    let pool = builder("sc_evict")
        .max_size(1)
        .statement_cache_capacity(2)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    for q in ["SELECT 1", "SELECT 2", "SELECT 3", "SELECT 1"] {
        c.query(q, &[]).await.unwrap();
    }
    let s = pool.status();
    assert_eq!((s.cache_misses, s.cache_evictions), (4, 2), "{s:?}");
    assert_eq!(
        server_statements(&c).await,
        2,
        "evicted statements were closed"
    );
}

#[tokio::test]
async fn a_statement_made_stale_by_ddl_is_prepared_again() {
    let admin = admin().await;
    admin
        .batch_execute("DROP TABLE IF EXISTS sc_ddl_t; CREATE TABLE sc_ddl_t (a int); INSERT INTO sc_ddl_t VALUES (1)")
        .await
        .unwrap();
    let pool = builder("sc_ddl").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    assert_eq!(
        c.query_one("SELECT * FROM sc_ddl_t", &[])
            .await
            .unwrap()
            .len(),
        1
    );
    admin
        .batch_execute("ALTER TABLE sc_ddl_t ADD COLUMN b int")
        .await
        .unwrap();
    let row = c
        .query_one("SELECT * FROM sc_ddl_t", &[])
        .await
        .expect("retried after the DDL");
    assert_eq!(row.len(), 2);
    assert_eq!(pool.status().cache_misses, 2);
    admin.batch_execute("DROP TABLE sc_ddl_t").await.unwrap();
}

#[tokio::test]
async fn the_cache_can_be_turned_off() {
    let pool = builder("sc_off")
        .max_size(1)
        .statement_cache_capacity(0)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    for _ in 0..3 {
        c.query("SELECT 1", &[]).await.unwrap();
    }
    let s = pool.status();
    assert_eq!((s.cache_hits, s.cache_misses), (0, 0));
}

#[cfg(feature = "emulator")]
#[tokio::test]
async fn cached_statements_work_on_whichever_database_connection_a_transaction_lands() {
    use pinpool::emulator::{Emulator, EmulatorConfig};
    let emu = Emulator::start(
        EmulatorConfig::new(common::database_url())
            .max_connections(2)
            .application_name("sc_emulator"),
    )
    .await
    .unwrap();
    let pool = pinpool::Pool::builder(emu.url("postgres", "postgres"))
        .max_size(4)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..4i32 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let c = pool.get().await.unwrap();
            for i in 0..50i32 {
                let v: i32 = c
                    .query_one_scalar("SELECT $1::int * 10 + $2::int", &[&t, &i])
                    .await
                    .unwrap();
                assert_eq!(v, t * 10 + i);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = pool.status();
    assert_eq!(s.cache_misses, 4, "one Parse per client connection: {s:?}");
    assert_eq!(s.cache_hits, 196);
    let counters = emu.counters();
    assert_eq!(counters.peak_pinned, 0, "{counters:?}");
    assert!(
        counters.borrow_waits > 0,
        "4 clients over 2 database connections: {counters:?}"
    );
}
