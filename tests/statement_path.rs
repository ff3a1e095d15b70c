//! The statement path's round trips, counted on the wire by a relay: a statement new to a
//! connection whose shape the pool learned on another one is sent unnamed in one round trip
//! (its prepare pipelined in the same one, for the cache), as is one without parameters;
//! repeats take one; a shape the server refuses is learned again.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use pinpool::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Round trips seen by a relay: how many times the client wrote after it had been answered
/// (a pipelined batch of requests is one; the startup counts its own).
#[derive(Default)]
struct Turns {
    count: AtomicU64,
    answered: AtomicBool,
}

impl Turns {
    fn now(&self) -> u64 {
        self.count.load(SeqCst)
    }
}

/// A relay to the database counting round trips in `turns`. Returns its port.
async fn counting_relay(turns: Arc<Turns>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let turns = turns.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(common::database_addr()).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let t = turns.clone();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        if t.answered.swap(false, SeqCst) {
                            t.count.fetch_add(1, SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = sr.read(&mut buf).await {
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        turns.answered.store(true, SeqCst);
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    port
}

/// Round trips `f` took on the relay.
async fn counted<T>(turns: &Turns, f: impl std::future::Future<Output = T>) -> (T, u64) {
    // The client's first write after an answer counts: mark the last answer as seen.
    turns.answered.store(true, SeqCst);
    let before = turns.now();
    let out = f.await;
    (out, turns.now() - before)
}

async fn pool_through_relay(app: &str, turns: Arc<Turns>) -> Pool {
    let port = counting_relay(turns).await;
    common::relayed(port, app).max_size(1).build().unwrap()
}

/// A connection closed on return (a `SET` leaves it dirty), so the next `get()` opens another.
async fn replace_connection(pool: &Pool) {
    let c = pool.get().await.unwrap();
    c.batch_execute("SET work_mem = '8MB'").await.unwrap();
    drop(c);
    assert_eq!(pool.status().size, 0, "the dirty connection was closed");
}

#[tokio::test]
async fn a_statement_new_to_a_connection_takes_one_round_trip_once_its_shape_is_learned() {
    let turns = Arc::new(Turns::default());
    let pool = pool_through_relay("sp_one_trip", turns.clone()).await;
    let sql = "SELECT $1::int4 + 1, $2::text";

    // The process's first use: a prepare (which teaches the shape), then the execute.
    let c = pool.get().await.unwrap();
    let (row, trips) = counted(&turns, c.query_one(sql, &[&1i32, &"a"])).await;
    assert_eq!(row.unwrap().get::<_, i32>(0), 2);
    assert_eq!(trips, 2, "first use in the process: prepare, then execute");
    drop(c);

    replace_connection(&pool).await;
    let c = pool.get().await.unwrap();
    let (row, trips) = counted(&turns, c.query_one(sql, &[&41i32, &"b"])).await;
    let row = row.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, &str>(1)), (42, "b"));
    assert_eq!(
        trips, 1,
        "new to this connection, learned on another: one round trip"
    );
    let hits = pool.status().cache_hits;
    let (n, trips) = counted(&turns, c.query_one_scalar::<i32, _>(sql, &[&1i32, &"c"])).await;
    // query_one_scalar reads one column: this text has two, so tokio-postgres's error.
    assert!(n.is_err());
    assert_eq!(
        trips, 1,
        "its prepare went in the same round trip: the repeat is cached"
    );
    assert_eq!(pool.status().cache_hits, hits + 1);
}

#[tokio::test]
async fn every_statement_method_sends_a_learned_statement_in_one_round_trip() {
    let turns = Arc::new(Turns::default());
    let pool = pool_through_relay("sp_methods", turns.clone()).await;
    let table = "sp_methods_t";
    let c = pool.get().await.unwrap();
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (n int4, s text)"
    ))
    .await
    .unwrap();
    let insert = format!("INSERT INTO {table} VALUES ($1, $2)");
    let select = format!("SELECT n FROM {table} WHERE n >= $1 ORDER BY n");
    // Learn both shapes.
    c.execute(insert.as_str(), &[&1i32, &"x"]).await.unwrap();
    c.query(select.as_str(), &[&0i32]).await.unwrap();
    drop(c);

    type Call = for<'a> fn(
        &'a pinpool::PooledClient,
        &'a str,
        &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<u64, pinpool::Error>>;
    let calls: [(&str, Call); 8] = [
        ("execute", |c, ins, _| {
            Box::pin(async move { c.execute(ins, &[&2i32, &"y"]).await })
        }),
        ("query", |c, _, sel| {
            Box::pin(async move { Ok(c.query(sel, &[&0i32]).await?.len() as u64) })
        }),
        ("query_one", |c, _, sel| {
            Box::pin(async move {
                let sel = format!("{sel} LIMIT 1");
                // A text of its own: learned by its first use, on this connection.
                let _ = c.query_one(sel.as_str(), &[&0i32]).await?;
                Ok(1)
            })
        }),
        ("query_opt", |c, _, sel| {
            Box::pin(async move { Ok(c.query_opt(sel, &[&1000i32]).await?.is_none() as u64) })
        }),
        ("query_scalar", |c, _, sel| {
            Box::pin(async move { Ok(c.query_scalar::<i32, _>(sel, &[&0i32]).await?.len() as u64) })
        }),
        ("query_opt_scalar", |c, _, sel| {
            Box::pin(async move {
                Ok(c.query_opt_scalar::<i32, _>(sel, &[&1000i32])
                    .await?
                    .is_none() as u64)
            })
        }),
        ("execute_raw", |c, ins, _| {
            Box::pin(async move {
                let params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> =
                    vec![Box::new(3i32), Box::new("z")];
                c.execute_raw(
                    ins,
                    params
                        .iter()
                        .map(|p| &**p as &(dyn tokio_postgres::types::ToSql + Sync)),
                )
                .await
            })
        }),
        ("query_raw", |c, _, sel| {
            Box::pin(async move {
                use futures_util::TryStreamExt;
                let rows: Vec<_> = c.query_raw(sel, [0i32]).await?.try_collect().await?;
                Ok(rows.len() as u64)
            })
        }),
    ];
    for (name, call) in calls {
        replace_connection(&pool).await;
        let c = pool.get().await.unwrap();
        let learned_here = name == "query_one";
        let (r, trips) = counted(&turns, call(&c, &insert, &select)).await;
        assert!(r.is_ok(), "{name}: {r:?}");
        let expected = if learned_here { 2 } else { 1 };
        assert_eq!(trips, expected, "{name}: round trips on a fresh connection");
    }
    let c = pool.get().await.unwrap();
    c.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_statement_without_parameters_takes_one_round_trip_on_first_use() {
    let turns = Arc::new(Turns::default());
    let pool = pool_through_relay("sp_no_params", turns.clone()).await;
    let c = pool.get().await.unwrap();
    let (row, trips) = counted(&turns, c.query_one("SELECT 'sp_no_params'::text", &[])).await;
    assert_eq!(row.unwrap().get::<_, &str>(0), "sp_no_params");
    assert_eq!(trips, 1);
    let (_, trips) = counted(&turns, c.query_one("SELECT 'sp_no_params'::text", &[])).await;
    assert_eq!(trips, 1);
    assert_eq!(
        pool.status().cache_hits,
        1,
        "the pipelined prepare filled the cache"
    );
}

#[tokio::test]
async fn a_shape_the_server_refuses_is_learned_again() {
    let pool = common::builder("sp_relearn").max_size(1).build().unwrap();
    let table = "sp_relearn_t";
    let c = pool.get().await.unwrap();
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int4); INSERT INTO {table} VALUES (7)"
    ))
    .await
    .unwrap();
    let sql = format!("SELECT count(*) FROM {table} WHERE v = $1");
    let n: i64 = c.query_one_scalar(sql.as_str(), &[&7i32]).await.unwrap();
    assert_eq!(n, 1);
    c.batch_execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN v TYPE text USING v::text"
    ))
    .await
    .unwrap();
    drop(c);
    replace_connection(&pool).await;
    let c = pool.get().await.unwrap();
    // Sent with the learned int4: the server refuses `text = int4`.
    let e = c.query_one_scalar::<i64, _>(sql.as_str(), &[&7i32]).await;
    assert!(e.unwrap_err().as_db_error().is_some());
    // The shape was forgotten: prepared again, the server now says text.
    let n: i64 = c.query_one_scalar(sql.as_str(), &[&"7"]).await.unwrap();
    assert_eq!(n, 1);
    c.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn with_the_cache_off_a_statement_is_learned_and_then_takes_one_round_trip() {
    let turns = Arc::new(Turns::default());
    let port = counting_relay(turns.clone()).await;
    let pool = common::relayed(port, "sp_cache_off")
        .max_size(1)
        .statement_cache_capacity(0)
        .build()
        .unwrap();
    let sql = "SELECT $1::int4 * 3";
    let c = pool.get().await.unwrap();
    let (n, trips) = counted(&turns, c.query_one_scalar::<i32, _>(sql, &[&2i32])).await;
    assert_eq!(n.unwrap(), 6);
    assert_eq!(trips, 2, "first use: prepare (learned), execute");
    for i in 0..3 {
        let (n, trips) = counted(&turns, c.query_one_scalar::<i32, _>(sql, &[&i])).await;
        assert_eq!(n.unwrap(), i * 3);
        assert_eq!(trips, 1, "learned: unnamed, one round trip");
    }
}
