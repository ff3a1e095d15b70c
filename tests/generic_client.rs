//! `GenericClient` covers what deadpool-postgres's does: code written against it runs on a
//! pooled client and on a transaction alike.

mod common;

use pinpool::GenericClient;
use tokio_postgres::types::Type;

/// Every method a deadpool-postgres `GenericClient` user reaches for, through the trait.
async fn exercise<C: GenericClient>(c: &C, n: i32) -> i64 {
    let cached = c.prepare_cached("SELECT $1::int + 1").await.unwrap();
    let again = c.prepare_cached("SELECT $1::int + 1").await.unwrap();
    assert_eq!(cached.sql(), again.sql());
    let typed = c
        .prepare_typed_cached("SELECT $1::int + 1", &[Type::INT4])
        .await
        .unwrap();
    let row = c.query_one(&typed, &[&n]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), n + 1);
    // Other parameter types than the cached statement's: prepared with them.
    let as_text = c
        .prepare_typed_cached("SELECT $1::int + 1", &[Type::TEXT])
        .await
        .unwrap();
    let row = c.query_one(&as_text, &[&n.to_string()]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), n + 1);
    let stream = c
        .query_raw("SELECT generate_series(1, $1)", [n])
        .await
        .unwrap();
    use futures_util::TryStreamExt;
    let rows: Vec<tokio_postgres::Row> = stream.try_collect().await.unwrap();
    assert_eq!(rows.len(), n as usize);
    c.execute_raw("SELECT $1::int", [n]).await.unwrap() as i64
}

#[tokio::test]
async fn generic_code_runs_on_a_client_and_on_a_transaction() {
    let pool = common::builder("generic_parity").build().unwrap();
    let mut c = pool.get().await.unwrap();
    assert_eq!(exercise(&c, 3).await, 1);
    let tx = c.transaction().await.unwrap();
    assert_eq!(exercise(&tx, 4).await, 1);
    tx.commit().await.unwrap();
}
