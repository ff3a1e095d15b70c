//! The emulator's added latency: a prepared `SELECT 1` round trip directly to PostgreSQL and
//! through the emulator. Goal: at most 200 us added (loopback).
//!
//! `cargo bench --features emulator --bench emulator`

use criterion::{Criterion, criterion_group, criterion_main};
use pinpool::emulator::{Emulator, EmulatorConfig};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (direct, proxied, _emulator) = rt.block_on(async {
        let emulator = Emulator::start(
            EmulatorConfig::new(database_url())
                .max_connections(2)
                .application_name("bench_emulator"),
        )
        .await
        .expect("emulator");
        let direct = connect(&database_url()).await;
        let proxied = connect(&emulator.url("postgres", "postgres")).await;
        (direct, proxied, emulator)
    });
    let mut group = c.benchmark_group("select1_round_trip");
    for (name, client) in [("direct", &direct), ("through_emulator", &proxied)] {
        let stmt = rt.block_on(client.prepare("SELECT 1")).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| rt.block_on(client.query_one(&stmt, &[])).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
