//! Every statement method of the pooled client and its transactions, against PostgreSQL.

mod common;

use std::pin::pin;

use bytes::Bytes;
use common::{assert_quiet, builder};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use pinpool::{CloseReason, GenericClient};
use tokio_postgres::types::Type;

async fn table(client: &pinpool::PooledClient, name: &str) {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY, v text)"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn query_methods_return_what_tokio_postgres_returns() {
    let pool = builder("st_query").max_size(2).build().unwrap();
    let c = pool.get().await.unwrap();
    table(&c, "st_query_t").await;
    assert_eq!(
        c.execute(
            "INSERT INTO st_query_t VALUES ($1, $2), ($3, $4)",
            &[&1i32, &"a", &2i32, &"b"]
        )
        .await
        .unwrap(),
        2
    );
    let rows = c
        .query("SELECT v FROM st_query_t ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    let one = c
        .query_one("SELECT v FROM st_query_t WHERE id = $1", &[&2i32])
        .await
        .unwrap();
    assert_eq!(one.get::<_, &str>(0), "b");
    assert!(
        c.query_opt("SELECT v FROM st_query_t WHERE id = 9", &[])
            .await
            .unwrap()
            .is_none()
    );
    assert!(c.query_one("SELECT v FROM st_query_t", &[]).await.is_err());
    let ids: Vec<i32> = c
        .query_scalar("SELECT id FROM st_query_t ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(ids, [1, 2]);
    let n: i64 = c
        .query_one_scalar("SELECT count(*) FROM st_query_t", &[])
        .await
        .unwrap();
    assert_eq!(n, 2);
    let none: Option<i32> = c
        .query_opt_scalar("SELECT id FROM st_query_t WHERE id = 7", &[])
        .await
        .unwrap();
    assert_eq!(none, None);

    let typed = c
        .query_typed("SELECT $1::int + 1", &[(&41i32, Type::INT4)])
        .await
        .unwrap();
    assert_eq!(typed[0].get::<_, i32>(0), 42);
    let t1 = c
        .query_typed_one("SELECT $1::text", &[(&"x", Type::TEXT)])
        .await
        .unwrap();
    assert_eq!(t1.get::<_, &str>(0), "x");
    assert!(
        c.query_typed_opt("SELECT 1 WHERE false", &[])
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        c.execute_typed(
            "UPDATE st_query_t SET v = $1 WHERE id = 1",
            &[(&"z", Type::TEXT)]
        )
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        c.execute_raw("DELETE FROM st_query_t WHERE id = $1", [3i32])
            .await
            .unwrap(),
        0
    );

    let stmt = c
        .prepare("SELECT v FROM st_query_t WHERE id = $1")
        .await
        .unwrap();
    assert_eq!(stmt.sql(), "SELECT v FROM st_query_t WHERE id = $1");
    assert_eq!(stmt.params(), &[Type::INT4]);
    assert_eq!(
        c.query_one(&stmt, &[&1i32])
            .await
            .unwrap()
            .get::<_, &str>(0),
        "z"
    );
    let typed_stmt = c.prepare_typed("SELECT $1", &[Type::INT8]).await.unwrap();
    assert_eq!(
        c.query_one(&typed_stmt, &[&7i64])
            .await
            .unwrap()
            .get::<_, i64>(0),
        7
    );

    let stream = c
        .query_raw("SELECT id FROM st_query_t ORDER BY id", [] as [i32; 0])
        .await
        .unwrap();
    let mut stream = pin!(stream);
    let mut ids = vec![];
    while let Some(row) = stream.next().await {
        ids.push(row.unwrap().get::<_, i32>(0));
    }
    assert_eq!(ids, [1, 2]);
    assert_eq!(stream.rows_affected(), Some(2));
    let typed_rows: Vec<_> = c
        .query_typed_raw("SELECT $1::int", [(5i32, Type::INT4)])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(typed_rows[0].get::<_, i32>(0), 5);

    let msgs = c.simple_query("SELECT 1; SELECT 2").await.unwrap();
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["1", "2"]);
    let raw: Vec<_> = c
        .simple_query_raw("SELECT 3")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(!raw.is_empty());
    c.check_connection().await.unwrap();
    c.batch_execute("DROP TABLE st_query_t").await.unwrap();
    drop(c);
    assert_quiet(&pool);
    assert_eq!(
        pool.status().closed.total(),
        0,
        "a clean connection goes back to the pool"
    );
}

#[tokio::test]
async fn copy_in_and_out() {
    let pool = builder("st_copy").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    table(&c, "st_copy_t").await;
    let sink = c.copy_in("COPY st_copy_t FROM STDIN").await.unwrap();
    let mut sink = pin!(sink);
    for i in 0..100 {
        sink.send(Bytes::from(format!("{i}\tv{i}\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.as_mut().finish().await.unwrap(), 100);
    let out: Vec<Bytes> = c
        .copy_out("COPY (SELECT id FROM st_copy_t ORDER BY id LIMIT 3) TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out.concat(), b"0\n1\n2\n");
    c.batch_execute("DROP TABLE st_copy_t").await.unwrap();
    drop(c);
    assert_eq!(pool.status().closed.total(), 0);
}

#[tokio::test]
async fn transactions_commit_roll_back_and_nest() {
    let pool = builder("st_txn").max_size(1).build().unwrap();
    let mut c = pool.get().await.unwrap();
    table(&c, "st_txn_t").await;
    {
        let mut tx = c.transaction().await.unwrap();
        tx.execute("INSERT INTO st_txn_t VALUES (1, 'a')", &[])
            .await
            .unwrap();
        {
            let sp = tx.savepoint("sp_inner").await.unwrap();
            sp.execute("INSERT INTO st_txn_t VALUES (2, 'b')", &[])
                .await
                .unwrap();
            sp.rollback().await.unwrap();
        }
        let nested = tx.transaction().await.unwrap();
        nested
            .execute("INSERT INTO st_txn_t VALUES (3, 'c')", &[])
            .await
            .unwrap();
        nested.commit().await.unwrap();
        tx.commit().await.unwrap();
    }
    {
        let tx = c.transaction().await.unwrap();
        tx.execute("INSERT INTO st_txn_t VALUES (4, 'd')", &[])
            .await
            .unwrap();
        // Dropped without commit: rolled back.
    }
    {
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::Serializable)
            .read_only(true)
            .start()
            .await
            .unwrap();
        let level: String = tx
            .query_one_scalar("SHOW transaction_isolation", &[])
            .await
            .unwrap();
        assert_eq!(level, "serializable");
        assert!(
            tx.execute("INSERT INTO st_txn_t VALUES (5, 'e')", &[])
                .await
                .is_err()
        );
        tx.rollback().await.unwrap();
    }
    {
        let tx = c.transaction().await.unwrap();
        let portal = tx
            .bind("SELECT id FROM st_txn_t ORDER BY id", &[])
            .await
            .unwrap();
        let first = tx.query_portal(&portal, 1).await.unwrap();
        let rest: Vec<_> = tx
            .query_portal_raw(&portal, 0)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(first.len() + rest.len(), 2);
        tx.commit().await.unwrap();
    }
    let ids: Vec<i32> = c
        .query_scalar("SELECT id FROM st_txn_t ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(ids, [1, 3]);
    c.batch_execute("DROP TABLE st_txn_t").await.unwrap();
    drop(c);
    assert_quiet(&pool);
    assert_eq!(pool.status().closed.total(), 0, "{:?}", pool.status());
}

async fn count_rows<C: GenericClient>(c: &C, table: &str) -> i64 {
    c.query_one(format!("SELECT count(*) FROM {table}").as_str(), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn generic_client_takes_a_client_or_a_transaction() {
    let pool = builder("st_generic").max_size(1).build().unwrap();
    let mut c = pool.get().await.unwrap();
    table(&c, "st_generic_t").await;
    assert_eq!(count_rows(&c, "st_generic_t").await, 0);
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO st_generic_t VALUES (1, 'a')", &[])
        .await
        .unwrap();
    assert_eq!(count_rows(&tx, "st_generic_t").await, 1);
    tx.rollback().await.unwrap();
    c.batch_execute("DROP TABLE st_generic_t").await.unwrap();
}

#[tokio::test]
async fn a_sql_error_leaves_the_connection_usable_and_pooled() {
    let pool = builder("st_sqlerr").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let pid: i32 = c
        .query_one_scalar("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    let err = c.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    assert!(err.as_db_error().is_some());
    assert!(!err.is_timeout());
    assert!(c.batch_execute("SELEC oops").await.is_err());
    let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
    assert_eq!(one, 1);
    drop(c);
    let c = pool.get().await.unwrap();
    let again: i32 = c
        .query_one_scalar("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    assert_eq!(pid, again, "the same connection came back");
    drop(c);
    assert_eq!(pool.status().closed.total(), 0);
}

#[tokio::test]
async fn text_transactions_are_tracked() {
    let pool = builder("st_texttxn").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    drop(c);
    assert_eq!(
        pool.status().closed.total(),
        0,
        "ended text transactions keep the connection"
    );
    let c = pool.get().await.unwrap();
    c.simple_query("START TRANSACTION").await.unwrap();
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::UnknownState), 1);
    assert_quiet(&pool);
}

#[tokio::test]
async fn unfinished_streams_and_raw_access_close_the_connection() {
    let pool = builder("st_unfinished").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let mut stream = Box::pin(
        c.query_raw("SELECT generate_series(1, 10000)", [] as [i32; 0])
            .await
            .unwrap(),
    );
    stream.next().await.unwrap().unwrap();
    drop(stream);
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::UnknownState), 1);

    assert_quiet(&pool);
}

#[tokio::test]
async fn raw_access_is_observed_like_everything_else() {
    let pool = builder("st_raw").max_size(1).build().unwrap();
    let c = pool.get().await.unwrap();
    let raw = pinpool::PooledClient::raw(&c);
    raw.simple_query("SELECT 1").await.unwrap();
    assert!(!pinpool::PooledClient::pin_state(&c).is_pinned());
    drop(c);
    assert_eq!(
        pool.status().closed.total(),
        0,
        "a clean raw statement keeps it"
    );

    let c = pool.get().await.unwrap();
    let raw = pinpool::PooledClient::raw(&c);
    raw.batch_execute("SET statement_timeout = '42s'")
        .await
        .unwrap();
    let state = pinpool::PooledClient::pin_state(&c);
    assert!(
        state.reasons.contains(pinpool::pinning::Reason::Set),
        "{state:?}"
    );
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::Pinned), 1);

    let c = pool.get().await.unwrap();
    pinpool::PooledClient::raw(&c)
        .batch_execute("BEGIN")
        .await
        .unwrap();
    drop(c);
    assert_eq!(pool.status().closed.get(CloseReason::UnknownState), 1);
    let c = pool.get().await.unwrap();
    assert!(
        !common::in_transaction_block(&c).await,
        "the next checkout runs in the raw BEGIN's transaction"
    );
    drop(c);
    assert_quiet(&pool);
}

#[tokio::test]
async fn a_copy_whose_session_ends_closes_its_connection_as_broken() {
    // A stream and a copy sink read a session-ending error the same way: the connection is
    // broken, not merely in an unknown state.
    let pool = builder("st_copy_fatal").max_size(1).build().unwrap();
    let admin = common::admin().await;
    let c = pool.get().await.unwrap();
    table(&c, "st_copy_fatal_t").await;
    let err = {
        let sink = c.copy_in("COPY st_copy_fatal_t FROM STDIN").await.unwrap();
        let mut sink = pin!(sink);
        sink.send(Bytes::from_static(b"1\tv\n")).await.unwrap();
        assert_eq!(common::kill_backends(&admin, "st_copy_fatal").await, 1);
        // The FATAL reaches the sink at the latest when it finishes.
        let mut failed = None;
        for i in 0..1_000 {
            if let Err(e) = sink.send(Bytes::from(format!("{i}\tv\n"))).await {
                failed = Some(e);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        match failed {
            Some(e) => e,
            None => sink.as_mut().finish().await.unwrap_err(),
        }
    };
    assert!(matches!(err, pinpool::Error::Query(_)), "{err:?}");
    drop(c);
    let closed = pool.status().closed;
    assert_eq!(
        (closed.get(CloseReason::Broken), closed.total()),
        (1, 1),
        "{closed:?}"
    );
    admin
        .batch_execute("DROP TABLE IF EXISTS st_copy_fatal_t")
        .await
        .unwrap();
}
