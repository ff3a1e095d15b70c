//! Statements through pinpool against a raw tokio-postgres client on the same server:
//! `query(&str)` (pinpool's statement cache against tokio-postgres's prepare-every-time), a
//! prepared statement, and `query_typed`. Goals: `query(&str)` at most 0.7x raw, a prepared
//! statement at most 1.05x raw.
//!
//! `cargo bench --bench query`

use criterion::{Criterion, criterion_group, criterion_main};
use tokio_postgres::types::Type;

const SQL: &str = "SELECT $1::int + 1";

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (raw, pooled, _pool) = rt.block_on(async {
        let (raw, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let pool = pinpool::Pool::builder(database_url().as_str())
            .max_size(1)
            .build()
            .unwrap();
        let pooled = pool.get().await.unwrap();
        (raw, pooled, pool)
    });
    let mut g = c.benchmark_group("statements");
    g.bench_function("query_str/raw", |b| {
        b.iter(|| rt.block_on(raw.query(SQL, &[&1i32])).unwrap())
    });
    g.bench_function("query_str/pinpool", |b| {
        b.iter(|| rt.block_on(pooled.query(SQL, &[&1i32])).unwrap())
    });
    let raw_stmt = rt.block_on(raw.prepare(SQL)).unwrap();
    let pooled_stmt = rt.block_on(pooled.prepare(SQL)).unwrap();
    g.bench_function("prepared/raw", |b| {
        b.iter(|| rt.block_on(raw.query(&raw_stmt, &[&1i32])).unwrap())
    });
    g.bench_function("prepared/pinpool", |b| {
        b.iter(|| rt.block_on(pooled.query(&pooled_stmt, &[&1i32])).unwrap())
    });
    g.bench_function("query_typed/raw", |b| {
        b.iter(|| {
            rt.block_on(raw.query_typed(SQL, &[(&1i32, Type::INT4)]))
                .unwrap()
        })
    });
    g.bench_function("query_typed/pinpool", |b| {
        b.iter(|| {
            rt.block_on(pooled.query_typed(SQL, &[(&1i32, Type::INT4)]))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
