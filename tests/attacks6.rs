//! Attacks on the statement path (learned shapes sent unnamed) and the transaction pooler's
//! profile.

mod common;

use pinpool::{Pool, Proxy};

fn pool(app: &str, proxy: Option<Proxy>) -> Pool {
    let mut b = common::builder(app).max_size(2);
    if let Some(p) = proxy {
        b = b.proxy(p);
    }
    b.build().unwrap()
}

/// A scalar method on a statement returning two columns is an error on every path (as
/// tokio-postgres says for a prepared statement), never the first column read silently.
#[tokio::test]
async fn a_scalar_method_never_reads_the_first_of_several_columns() {
    // Under the transaction pooler's profile a misfit shape is sent as it is.
    let p = pool("att6_scalar_tx", Some(Proxy::PgBouncerTransaction));
    let c = p.get().await.unwrap();
    let r = c.query_one_scalar::<i32, _>("SELECT 1, 2", &[]).await;
    assert!(r.is_err(), "two columns read as a scalar: {r:?}");
    let r = c
        .query_scalar::<i32, _>("SELECT $1::int4, 2", &[&1i32])
        .await;
    assert!(r.is_err(), "two columns read as a scalar: {r:?}");
    drop(c);

    // A shape learned before DDL added a column says one column: the connection new to the
    // text trusts it.
    let t = "att6_scalar_t";
    let admin = common::admin().await;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (a int4); INSERT INTO {t} VALUES (7)"
        ))
        .await
        .unwrap();
    let p = pool("att6_scalar_d", None);
    let sql = format!("SELECT * FROM {t} WHERE a = $1");
    let c1 = p.get().await.unwrap();
    let v: i32 = c1.query_one_scalar(sql.as_str(), &[&7i32]).await.unwrap();
    assert_eq!(v, 7);
    admin
        .batch_execute(&format!("ALTER TABLE {t} ADD COLUMN b int4 DEFAULT 8"))
        .await
        .unwrap();
    let c2 = p.get().await.unwrap();
    let r = c2.query_one_scalar::<i32, _>(sql.as_str(), &[&7i32]).await;
    assert!(r.is_err(), "two columns read as a scalar: {r:?}");
    drop((c1, c2));
    admin
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// DDL changed a parameter's type (int4 to int8) after the pool learned it: a call with the
/// new type fails to encode against the learned one. That is the caller-side twin of the
/// server's refusal, and must forget the shape too: a prepare of the text accepts the call,
/// and before, every connection new to the text failed it for the pool's lifetime.
#[tokio::test]
async fn a_parameter_type_changed_by_ddl_is_learned_again() {
    for (app, proxy) in [
        ("att6_ddl_d", None),
        ("att6_ddl_tx", Some(Proxy::PgBouncerTransaction)),
    ] {
        let t = format!("{app}_t");
        let admin = common::admin().await;
        admin
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (x int4); INSERT INTO {t} VALUES (5)"
            ))
            .await
            .unwrap();
        let p = pool(app, proxy);
        let sql = format!("SELECT count(*) FROM {t} WHERE x = $1");
        let c1 = p.get().await.unwrap();
        let n: i64 = c1.query_one_scalar(sql.as_str(), &[&5i32]).await.unwrap();
        assert_eq!(n, 1);
        admin
            .batch_execute(&format!("ALTER TABLE {t} ALTER COLUMN x TYPE int8"))
            .await
            .unwrap();
        // A connection new to the text (the profile has no cache: any connection). The
        // first call may fail, as one the server refuses does; the next ones learn again.
        let c2 = p.get().await.unwrap();
        let _ = c2.query_one_scalar::<i64, _>(sql.as_str(), &[&5i64]).await;
        for i in 1..3 {
            let r = c2.query_one_scalar::<i64, _>(sql.as_str(), &[&5i64]).await;
            assert!(
                matches!(r, Ok(1)),
                "{app}: call {i} with the column's new type: {r:?}"
            );
        }
        drop((c1, c2));
        admin
            .batch_execute(&format!("DROP TABLE {t}"))
            .await
            .unwrap();
    }
}

/// A transaction dropped unfinished queues its ROLLBACK, which runs ahead of the next call:
/// that call runs outside a transaction, where the transaction pooler's profile refuses a
/// named statement (a COPY prepares one), though the last status the server sent says a
/// transaction is open.
#[tokio::test]
async fn a_dropped_transaction_does_not_open_the_door_to_named_statements() {
    let t = "att6_dropped_t";
    let admin = common::admin().await;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (n int4)"
        ))
        .await
        .unwrap();
    let p = pool("att6_dropped", Some(Proxy::PgBouncerTransaction));
    let mut c = p.get().await.unwrap();
    let copy = format!("COPY {t} (n) FROM STDIN");
    {
        let tx = c.transaction().await.unwrap();
        tx.execute("SELECT 1", &[]).await.unwrap();
    }
    let r = c.copy_in::<_, bytes::Bytes>(copy.as_str()).await.map(drop);
    match r {
        Err(pinpool::Error::PinRefused { reasons, .. }) => {
            assert!(reasons.contains(pinpool::pinning::Reason::NamedStatement))
        }
        other => panic!("COPY outside a transaction after a dropped one: {other:?}"),
    }
    assert!(!common::in_transaction_block(&c).await);
    drop(c);
    admin
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// Under the transaction pooler's profile a shape is learned in a rolled-back transaction of
/// its own, a round trip: an error from running a statement (a unique violation) says
/// nothing of its shape and must not make every next call learn it again. Counted by the
/// learning's ROLLBACK on the wire.
#[tokio::test]
async fn an_error_from_running_a_statement_keeps_its_learned_shape() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rollbacks = Arc::new(AtomicU64::new(0));
    let seen = rollbacks.clone();
    let port = common::relay(move |mut sr, mut cw| {
        let seen = seen.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = sr.read(&mut buf).await {
                // CommandComplete "ROLLBACK": a chunk holds whole small messages here.
                let tag = b"ROLLBACK\0";
                let hits = buf[..n].windows(tag.len()).filter(|w| w == tag).count();
                seen.fetch_add(hits as u64, SeqCst);
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = cw.shutdown().await;
        }
    })
    .await;
    let t = "att6_unique_t";
    let admin = common::admin().await;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id int4 PRIMARY KEY)"
        ))
        .await
        .unwrap();
    let p = common::relayed(port, "att6_unique")
        .max_size(1)
        .proxy(Proxy::PgBouncerTransaction)
        .build()
        .unwrap();
    let c = p.get().await.unwrap();
    let insert = format!("INSERT INTO {t} VALUES ($1)");
    c.execute(insert.as_str(), &[&1i32]).await.unwrap();
    assert_eq!(rollbacks.load(SeqCst), 1, "learned once");
    for _ in 0..5 {
        let r = c.execute(insert.as_str(), &[&1i32]).await;
        assert_eq!(
            r.as_ref().err().and_then(|e| e.code()),
            Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
            "{r:?}"
        );
    }
    assert_eq!(
        rollbacks.load(SeqCst),
        1,
        "a unique violation made the next calls learn the shape again"
    );
    drop(c);
    admin
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// Under the transaction pooler's profile a shape is learned inside a BEGIN ... ROLLBACK of
/// the pool's own. A caller dropping the call's future (a `tokio::time::timeout` of its own)
/// after the BEGIN was sent, before the ROLLBACK was, left the connection in that
/// transaction: the caller's next INSERT on it was answered `Ok(1)`, then rolled back when
/// the connection closed. And the prepare, sent with no statement made, was never closed.
#[tokio::test]
async fn a_learning_cancelled_midway_leaves_no_transaction_open() {
    let t = "att6_cancel_t";
    let admin = common::admin().await;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (n int4)"
        ))
        .await
        .unwrap();
    let port = common::slow_relay(std::time::Duration::from_millis(100)).await;
    let p = common::relayed(port, "att6_cancel")
        .max_size(1)
        .proxy(Proxy::PgBouncerTransaction)
        .build()
        .unwrap();
    let c = p.get().await.unwrap();
    // Dropped while the BEGIN and the prepare are on their way.
    let r = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        c.query("SELECT $1::int4", &[&1i32]),
    )
    .await;
    assert!(r.is_err(), "not cancelled: {r:?}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ins = c
        .execute(&*format!("INSERT INTO {t} VALUES (1)"), &[])
        .await;
    assert!(matches!(ins, Ok(1)), "{ins:?}");
    assert!(
        !common::in_transaction_block(&c).await,
        "the learning's transaction is still open"
    );
    assert_eq!(named_on_server(&c).await, Vec::<String>::new());
    drop(c);
    let n: i64 = admin
        .query_one(&*format!("SELECT count(*) FROM {t}"), &[])
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
    assert_eq!(n, 1, "the insert was answered Ok(1) and rolled back");
}

/// The protocol-level named statements on the server connection behind `c`.
async fn named_on_server(c: &pinpool::PooledClient) -> Vec<String> {
    c.simple_query("SELECT name FROM pg_prepared_statements")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_call_made_while_a_shape_is_learned_never_runs_inside_its_transaction() {
    // The learning opens a transaction of its own and rolls it back: a write pipelined on
    // the same client meanwhile must wait for its turn, not run inside it and vanish.
    let t = "att6_conc_t";
    let admin = common::admin().await;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (n int4)"
        ))
        .await
        .unwrap();
    let p = pool("att6_conc", Some(Proxy::PgBouncerTransaction));
    let c = p.get().await.unwrap();
    let insert = format!("INSERT INTO {t} VALUES (1)");
    for i in 0..5 {
        // A text new to the pool each round: each one is learned.
        let learned = format!("SELECT $1::int4 + {i}");
        let (a, b) = futures_util::future::join(
            c.query(learned.as_str(), &[&1i32]),
            c.execute(insert.as_str(), &[]),
        )
        .await;
        assert_eq!(a.unwrap().len(), 1);
        assert_eq!(b.unwrap(), 1);
    }
    drop(c);
    let n: i64 = admin
        .query_one(&*format!("SELECT count(*) FROM {t}"), &[])
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
    assert_eq!(n, 5, "every insert answered Ok is there");
}
