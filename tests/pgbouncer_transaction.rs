//! Through a real PgBouncer 1.18 in transaction mode, with `Proxy::PgBouncerTransaction`: each
//! transaction may run on another server connection, so named statements do not carry over
//! and session state would leak into the next client's server connection. The profile sends
//! statements unnamed, refuses what would leak before sending it, and refuses named statements
//! where they cannot work.

mod common;

use common::{PgBouncer, PoolMode};
use futures_util::{SinkExt, TryStreamExt};
use pinpool::pinning::Reason;
use pinpool::{Error, Pool, Proxy};

fn pool(bouncer: &PgBouncer, app: &str, max: usize, proxy: Option<Proxy>) -> Pool {
    let mut b = Pool::builder(bouncer.url(app)).max_size(max);
    if let Some(p) = proxy {
        b = b.proxy(p);
    }
    b.build().unwrap()
}

/// 12 pools of 2 through 4 server connections, 40 rounds each of two parameterised queries:
/// how many rounds failed.
async fn rounds_failed(bouncer: &PgBouncer, app: &str, proxy: Option<Proxy>) -> (usize, String) {
    let pools: Vec<Pool> = (0..12)
        .map(|i| pool(bouncer, &format!("{app}_{i}"), 2, proxy))
        .collect();
    let rounds = pools.iter().flat_map(|p| (0..40).map(move |i| (p, i)));
    let results = futures_util::future::join_all(rounds.map(|(p, i)| async move {
        let c = p.get().await?;
        let a: i32 = c.query_one_scalar("SELECT $1::int + 1", &[&i]).await?;
        let rows = c
            .query("SELECT $1::text || 'x', $2::int8", &[&i.to_string(), &7i64])
            .await?;
        Ok::<_, Error>(a == i + 1 && rows[0].get::<_, String>(0) == format!("{i}x"))
    }))
    .await;
    let failed: Vec<_> = results.iter().filter(|r| !matches!(r, Ok(true))).collect();
    let sample = failed.first().map(|f| format!("{f:?}")).unwrap_or_default();
    (failed.len(), sample)
}

#[tokio::test]
async fn parameterised_queries_work_through_a_transaction_pooler_with_its_profile() {
    let Some(bouncer) = PgBouncer::start("pgbt_rounds", PoolMode::Transaction, 4, "") else {
        return;
    };
    let (failed, sample) =
        rounds_failed(&bouncer, "pgbt_rounds_p", Some(Proxy::PgBouncerTransaction)).await;
    assert_eq!(failed, 0, "rounds failed with the profile, e.g. {sample}");
    // Without it (named, cached statements), for the record: `--nocapture` shows it.
    let (failed, sample) = rounds_failed(&bouncer, "pgbt_rounds_d", None).await;
    eprintln!("without the profile: {failed} of 480 rounds failed, e.g. {sample}");
}

/// What `SHOW statement_timeout` says on `n` fresh clients of the pooler.
async fn seen_by_others(bouncer: &PgBouncer, app: &str, n: usize) -> usize {
    let mut seen = 0;
    for i in 0..n {
        let (c, conn) =
            tokio_postgres::connect(&bouncer.url(&format!("{app}_{i}")), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        let rows = c.simple_query("SHOW statement_timeout").await.unwrap();
        let value = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        if value.as_deref() == Some("4321ms") {
            seen += 1;
        }
    }
    seen
}

#[tokio::test]
async fn session_state_is_refused_before_it_is_sent_and_never_leaks() {
    let Some(bouncer) = PgBouncer::start("pgbt_leak", PoolMode::Transaction, 2, "") else {
        return;
    };
    let p = pool(
        &bouncer,
        "pgbt_leak_p",
        2,
        Some(Proxy::PgBouncerTransaction),
    );
    let mut c = p.get().await.unwrap();
    for sql in [
        "SET statement_timeout = '4321ms'",
        "SELECT set_config('statement_timeout', '4321ms', false)",
    ] {
        match c.batch_execute(sql).await {
            Err(Error::PinRefused { reasons, .. }) => {
                assert!(reasons.contains(Reason::Set) || reasons.contains(Reason::SetConfig))
            }
            other => panic!("{sql}: {other:?}"),
        }
        match c.query(sql, &[]).await {
            Err(Error::PinRefused { .. }) => {}
            other => panic!("{sql} (extended protocol): {other:?}"),
        }
    }
    // Transaction-scoped state ends with the transaction: allowed.
    let tx = c.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL statement_timeout = '4321ms'")
        .await
        .unwrap();
    let seen: String = tx
        .query_one_scalar("SELECT current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    assert_eq!(seen, "4321ms");
    tx.commit().await.unwrap();
    // A nextval changes nothing another client could see: sent.
    c.batch_execute("CREATE SEQUENCE IF NOT EXISTS pgbt_leak_seq")
        .await
        .unwrap();
    let n: i64 = c
        .query_one_scalar("SELECT nextval('pgbt_leak_seq')", &[])
        .await
        .unwrap();
    assert!(n >= 1);
    c.batch_execute("DROP SEQUENCE pgbt_leak_seq")
        .await
        .unwrap();
    drop(c);
    assert_eq!(seen_by_others(&bouncer, "pgbt_leak_o", 20).await, 0);

    // Without the profile the SET goes through and leaks, for the record.
    let d = pool(&bouncer, "pgbt_leak_d", 1, None);
    let c = d.get().await.unwrap();
    c.batch_execute("SET statement_timeout = '4321ms'")
        .await
        .unwrap();
    drop(c);
    let leaked = seen_by_others(&bouncer, "pgbt_leak_x", 20).await;
    eprintln!("without the profile: {leaked} of 20 other clients saw the SET");
}

#[tokio::test]
async fn named_statements_are_refused_and_everything_else_works_unnamed() {
    let Some(bouncer) = PgBouncer::start("pgbt_named", PoolMode::Transaction, 2, "") else {
        return;
    };
    let p = pool(
        &bouncer,
        "pgbt_named_p",
        2,
        Some(Proxy::PgBouncerTransaction),
    );
    let mut c = p.get().await.unwrap();
    let t = "pgbt_named_t";
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (n int4, s text)"
    ))
    .await
    .unwrap();
    for r in [
        c.prepare("SELECT 1").await.map(drop),
        c.prepare_cached("SELECT 1").await.map(drop),
    ] {
        match r {
            Err(Error::PinRefused { reasons, .. }) => {
                assert!(reasons.contains(Reason::NamedStatement))
            }
            other => panic!("{other:?}"),
        }
    }
    // COPY prepares its statement: outside a transaction refused, inside one it works.
    let copy = format!("COPY {t} (n, s) FROM STDIN");
    match c.copy_in::<_, bytes::Bytes>(copy.as_str()).await {
        Err(Error::PinRefused { reasons, .. }) => assert!(reasons.contains(Reason::NamedStatement)),
        other => panic!("{:?}", other.map(drop)),
    }
    let tx = c.transaction().await.unwrap();
    let sink = tx.copy_in(copy.as_str()).await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\ta\n2\tb\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    tx.commit().await.unwrap();

    let insert = format!("INSERT INTO {t} VALUES ($1, $2)");
    assert_eq!(c.execute(insert.as_str(), &[&3i32, &"c"]).await.unwrap(), 1);
    let params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> =
        vec![Box::new(4i32), Box::new("d")];
    let n = c
        .execute_raw(
            insert.as_str(),
            params
                .iter()
                .map(|p| &**p as &(dyn tokio_postgres::types::ToSql + Sync)),
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let select = format!("SELECT n FROM {t} WHERE n >= $1 ORDER BY n");
    let rows: Vec<_> = c
        .query_raw(select.as_str(), [2i32])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    let all: Vec<i32> = c.query_scalar(select.as_str(), &[&0i32]).await.unwrap();
    assert_eq!(all, [1, 2, 3, 4]);
    let tx = c.transaction().await.unwrap();
    tx.execute(insert.as_str(), &[&5i32, &"e"]).await.unwrap();
    tx.rollback().await.unwrap();
    let max: Option<i32> = c
        .query_one_scalar(&*format!("SELECT max(n) FROM {t}"), &[])
        .await
        .unwrap();
    assert_eq!(max, Some(4), "the rolled back insert is gone");
    assert_eq!(
        p.status().cache_hits,
        0,
        "no statement cache under the profile"
    );
    c.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

#[tokio::test]
async fn an_explicit_statement_cache_overrides_the_profile() {
    // PgBouncer 1.21's max_prepared_statements carries named statements: a user who runs one
    // turns the cache back on explicitly. 1.18 does not: the named statements fail there,
    // which shows the override took effect.
    let Some(bouncer) = PgBouncer::start("pgbt_override", PoolMode::Transaction, 1, "") else {
        return;
    };
    let p = Pool::builder(bouncer.url("pgbt_override"))
        .statement_cache_capacity(10)
        .proxy(Proxy::PgBouncerTransaction)
        .build()
        .unwrap();
    let c = p.get().await.unwrap();
    let stmt = c.prepare("SELECT $1::int4").await;
    assert!(stmt.is_ok(), "named statements allowed: {:?}", stmt.err());
}
