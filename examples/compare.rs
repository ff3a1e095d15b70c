//! A quick, honest verdict: pinpool against deadpool-postgres, bb8-postgres and a raw
//! tokio-postgres client, side by side in one process, in alternating rounds so machine drift
//! cancels. Prints a table, then one JSON object as the last line of stdout (ratios are pinpool
//! time / peer time, medians of per-round ratios: lower is better).
//!
//! ```sh
//! cargo run --release --all-features --example compare
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, error::ErrorKind};
use pinpool::emulator::{Emulator, EmulatorConfig};
use serde_json::{Map, Value, json};

/// A quick, honest verdict: pinpool against deadpool-postgres, bb8-postgres and a raw
/// tokio-postgres client, side by side in alternating rounds. Prints a table, then one JSON
/// object as the last line (ratios are pinpool time / peer time, lower is better).
///
/// The database is DATABASE_URL, else postgres://postgres@127.0.0.1:5432/postgres.
#[derive(Parser)]
#[command(
    name = "compare",
    after_help = "--only runs one pool and shape alone, for a profiler (valgrind --tool=callgrind \
counts instructions repeatably on a noisy machine):
  --only <pinpool|deadpool|deadpool_bounded|bb8> <c1|c16|c64|c16_held|c64_held>
      1,000 checkouts per task of that shape (16,000 for c1)
  --only <pinpool|raw> <prepared|stream>
      2,000 prepared SELECTs, or 20 streams of 10,000 rows
  --only emulator select1
      2,000 prepared SELECT 1 through the RDS Proxy emulator (no modelled latency)"
)]
struct Args {
    /// Run one pool and shape alone (see below) [default: the whole comparison]
    #[arg(long, num_args = 2, value_names = ["POOL", "SHAPE"], action = clap::ArgAction::Set)]
    only: Option<Vec<String>>,
}

const ROUNDS: usize = 30;
/// Checkouts per task and round: enough for every task to run out of tokio's cooperative budget
/// (128 units) several times, so fairness measures the pool's turns, not the first ones.
const PER_TASK: usize = 1_000;
const QUERIES: usize = 300;
/// 10,000-row streams read per pool and round.
const STREAMS: usize = 4;

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    tasks: usize,
    size: usize,
    held: bool,
}

impl Shape {
    /// Checkouts per round: `PER_TASK` for each task, and 16,000 for a single task.
    fn checkouts(self) -> usize {
        (self.tasks * PER_TASK).max(16_000)
    }
}

const SHAPES: [Shape; 5] = [
    Shape {
        name: "c1",
        tasks: 1,
        size: 1,
        held: false,
    },
    Shape {
        name: "c16",
        tasks: 16,
        size: 4,
        held: false,
    },
    Shape {
        name: "c64",
        tasks: 64,
        size: 16,
        held: false,
    },
    Shape {
        name: "c16_held",
        tasks: 16,
        size: 4,
        held: true,
    },
    Shape {
        name: "c64_held",
        tasks: 64,
        size: 16,
        held: true,
    },
];

/// The three pools behind one interface: check out, optionally hold across a yield, return.
#[derive(Clone)]
enum AnyPool {
    Pinpool(pinpool::Pool),
    Deadpool(deadpool_postgres::Pool),
    Bb8(bb8::Pool<bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>>),
}

impl AnyPool {
    async fn build(kind: &str, size: usize) -> AnyPool {
        let pg: tokio_postgres::Config = database_url().parse().unwrap();
        let pool = match kind {
            "pinpool" => {
                AnyPool::Pinpool(pinpool::Pool::builder(pg).max_size(size).build().unwrap())
            }
            "deadpool" | "deadpool_bounded" => {
                let manager = deadpool_postgres::Manager::from_config(
                    pg,
                    tokio_postgres::NoTls,
                    deadpool_postgres::ManagerConfig {
                        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
                    },
                );
                let builder = deadpool_postgres::Pool::builder(manager).max_size(size);
                let builder = if kind == "deadpool_bounded" {
                    builder
                        .wait_timeout(Some(Duration::from_secs(5)))
                        .runtime(deadpool_postgres::Runtime::Tokio1)
                } else {
                    builder
                };
                AnyPool::Deadpool(builder.build().unwrap())
            }
            _ => {
                let manager =
                    bb8_postgres::PostgresConnectionManager::new(pg, tokio_postgres::NoTls);
                AnyPool::Bb8(
                    bb8::Pool::builder()
                        .max_size(size as u32)
                        .test_on_check_out(false)
                        .build(manager)
                        .await
                        .unwrap(),
                )
            }
        };
        // Warm: open every connection once.
        pool.warm(size).await;
        pool
    }

    async fn warm(&self, size: usize) {
        match self {
            AnyPool::Pinpool(p) => {
                let held: Vec<_> = futures_util::future::join_all((0..size).map(|_| p.get())).await;
                drop(held);
            }
            AnyPool::Deadpool(p) => {
                let held: Vec<_> = futures_util::future::join_all((0..size).map(|_| p.get())).await;
                drop(held);
            }
            AnyPool::Bb8(p) => {
                let held: Vec<_> = futures_util::future::join_all((0..size).map(|_| p.get())).await;
                drop(held);
            }
        }
    }

    async fn checkout(&self, held: bool) {
        match self {
            AnyPool::Pinpool(p) => {
                let c = p.get().await.unwrap();
                if held {
                    tokio::task::yield_now().await;
                }
                drop(black_box(c));
            }
            AnyPool::Deadpool(p) => {
                let c = p.get().await.unwrap();
                if held {
                    tokio::task::yield_now().await;
                }
                drop(black_box(c));
            }
            AnyPool::Bb8(p) => {
                let c = p.get().await.unwrap();
                if held {
                    tokio::task::yield_now().await;
                }
                drop(black_box(c));
            }
        }
    }
}

/// One task's progress, on a cache line of its own (neighbours on two workers would slow each
/// other down).
#[repr(align(128))]
#[derive(Default)]
struct Progress(AtomicUsize);

/// Runs one shape; returns the elapsed time and the fairness: Jain's index of the checkouts
/// each task had done when the first task finished (1.0: every task had the same share; 1/n:
/// one task had them all).
async fn checkout_run(pool: &AnyPool, shape: Shape) -> (Duration, f64) {
    let progress: Arc<[Progress]> = (0..shape.tasks).map(|_| Progress::default()).collect();
    let at_first_finish = Arc::new(OnceLock::new());
    // Every task starts at the gate: spawned one by one, the first would otherwise run alone
    // while the others are still being spawned, and the measure would be of spawning.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let tasks: Vec<_> = (0..shape.tasks)
        .map(|me| {
            let (pool, gate) = (pool.clone(), gate.clone());
            let (progress, at_first_finish) = (progress.clone(), at_first_finish.clone());
            tokio::spawn(async move {
                gate.acquire().await.unwrap().forget();
                for done in 1..=shape.checkouts() / shape.tasks {
                    pool.checkout(shape.held).await;
                    progress[me].0.store(done, Relaxed);
                }
                at_first_finish.get_or_init(|| {
                    progress
                        .iter()
                        .map(|p| p.0.load(Relaxed) as f64)
                        .collect::<Vec<_>>()
                });
            })
        })
        .collect();
    let start = Instant::now();
    gate.add_permits(shape.tasks);
    for t in tasks {
        t.await.unwrap();
    }
    let total = start.elapsed();
    (total, jain(at_first_finish.get().expect("a task finished")))
}

/// Jain's fairness index of `shares`: (sum x)^2 / (n * sum x^2).
fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    sum * sum / (shares.len() as f64 * squares)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A raw tokio-postgres client and a pinpool client of a pool of one, to the same database.
async fn raw_and_pooled() -> (tokio_postgres::Client, pinpool::Pool, pinpool::PooledClient) {
    let (raw, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let pool = pinpool::Pool::builder(database_url().as_str())
        .max_size(1)
        .build()
        .unwrap();
    let pooled = pool.get().await.unwrap();
    (raw, pool, pooled)
}

/// Reads a row stream to its end and counts the rows.
async fn count_rows<S, T, E>(rows: S) -> usize
where
    S: futures_util::Stream<Item = Result<T, E>>,
    E: std::fmt::Debug,
{
    use futures_util::StreamExt;
    let mut rows = std::pin::pin!(rows);
    let mut n = 0;
    while let Some(row) = rows.next().await {
        row.unwrap();
        n += 1;
    }
    n
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Some(only) = args.only {
        let [kind, shape] = &only[..] else {
            unreachable!("--only takes two values")
        };
        match (kind.as_str(), shape.as_str()) {
            ("pinpool" | "raw", "prepared" | "stream") => statements_alone(kind, shape).await,
            ("emulator", "select1") => emulator_alone().await,
            ("pinpool" | "deadpool" | "deadpool_bounded" | "bb8", _)
                if SHAPES.iter().any(|s| s.name == shape) =>
            {
                checkouts_alone(kind, shape).await
            }
            _ => Args::command()
                .error(
                    ErrorKind::InvalidValue,
                    format!(
                        "--only {kind} {shape}: use <pinpool|deadpool|deadpool_bounded|bb8> \
                         <c1|c16|c64|c16_held|c64_held>, <pinpool|raw> <prepared|stream> or \
                         emulator select1"
                    ),
                )
                .exit(),
        }
        return;
    }
    everything().await;
}

/// 2,000 prepared `SELECT 1` through the emulator (no modelled latency), for counting what
/// the emulator's sessions cost per round trip (`--toggle-collect='*emulator*session*'`).
async fn emulator_alone() {
    let emulator = Emulator::start(
        EmulatorConfig::new(database_url())
            .max_connections(2)
            .application_name("compare"),
    )
    .await
    .unwrap();
    let (client, conn) =
        tokio_postgres::connect(&emulator.url("postgres", "postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let stmt = client.prepare("SELECT 1").await.unwrap();
    let start = Instant::now();
    for _ in 0..2_000 {
        client.query_one(&stmt, &[]).await.unwrap();
    }
    eprintln!(
        "compare: emulator select1 {:.1} us per round trip",
        start.elapsed().as_secs_f64() / 2_000.0 * 1e6
    );
}

/// Statements through pinpool or a raw client (`raw`), for counting what pinpool adds: 2,000
/// prepared SELECTs or 20 10,000-row streams.
async fn statements_alone(kind: &str, shape: &str) {
    let (raw, _pool, pooled) = raw_and_pooled().await;
    let start = Instant::now();
    let n = if shape == "prepared" { 2_000 } else { 20 };
    for i in 0..n {
        match (kind, shape) {
            ("raw", "prepared") => drop(raw.query("SELECT $1::int + 1", &[&i]).await.unwrap()),
            (_, "prepared") => drop(pooled.query("SELECT $1::int + 1", &[&i]).await.unwrap()),
            ("raw", _) => drop(
                count_rows(
                    raw.query_raw("SELECT g FROM generate_series(1, 10000) g", [] as [i32; 0])
                        .await
                        .unwrap(),
                )
                .await,
            ),
            _ => drop(
                count_rows(
                    pooled
                        .query_raw("SELECT g FROM generate_series(1, 10000) g", [] as [i32; 0])
                        .await
                        .unwrap(),
                )
                .await,
            ),
        }
    }
    println!(
        "{kind} {shape}: {:.1} us each",
        start.elapsed().as_secs_f64() / n as f64 * 1e6
    );
}

/// One pool and checkout shape alone.
async fn checkouts_alone(kind: &str, shape: &str) {
    let shape = *SHAPES.iter().find(|s| s.name == shape).expect("a shape");
    let pool = AnyPool::build(kind, shape.size).await;
    let (d, f) = checkout_run(&pool, shape).await;
    println!(
        "{kind} {}: {:.0} ns per checkout, fairness {f:.2}",
        shape.name,
        d.as_secs_f64() / shape.checkouts() as f64 * 1e9
    );
}

/// `x` to `places` decimals, as the table shows it.
fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

/// The whole comparison: the table, then the JSON line.
async fn everything() {
    let started = Instant::now();

    // 1. Checkout and return: pinpool, then its peers. deadpool runs twice: as it comes (its
    // waits unbounded) and with a 5 s wait timeout, the guarantee pinpool (`acquire_timeout`,
    // 5 s) and bb8 (`connection_timeout`, 30 s) always give.
    const POOLS: [&str; 4] = ["pinpool", "deadpool", "deadpool_bounded", "bb8"];
    let mut vs = [Map::new(), Map::new(), Map::new()];
    // Per pool, per shape: Jain's index of the tasks' shares at the first finish (1 is fair).
    let mut fairness = [Map::new(), Map::new(), Map::new(), Map::new()];
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "checkout",
        "pinpool",
        "deadpool",
        "dead_5s",
        "bb8",
        "vs_dead",
        "vs_5s",
        "vs_bb8",
        "fair_pin",
        "fair_dead",
        "fair_bb8"
    );
    for shape in SHAPES {
        let mut pools = Vec::new();
        for kind in POOLS {
            pools.push(AnyPool::build(kind, shape.size).await);
        }
        let (mut ratios, mut fair, mut times) = (
            [vec![], vec![], vec![]],
            [vec![], vec![], vec![], vec![]],
            [0.0f64; 4],
        );
        for round in 0..ROUNDS {
            // Alternate the order so drift does not favour one pool.
            let order: [usize; 4] = if round % 2 == 0 {
                [0, 1, 2, 3]
            } else {
                [3, 2, 1, 0]
            };
            let mut t = [0.0f64; 4];
            for i in order {
                let (d, f) = checkout_run(&pools[i], shape).await;
                t[i] = d.as_secs_f64();
                fair[i].push(f);
            }
            for (peer, r) in ratios.iter_mut().enumerate() {
                r.push(t[0] / t[peer + 1]);
            }
            for i in 0..4 {
                times[i] += t[i] / ROUNDS as f64;
            }
        }
        let per = |s: f64| s / shape.checkouts() as f64 * 1e9;
        let r = ratios.map(median);
        let f = fair.map(median);
        println!(
            "{:<10} {:>7.0} ns {:>7.0} ns {:>7.0} ns {:>7.0} ns {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            shape.name,
            per(times[0]),
            per(times[1]),
            per(times[2]),
            per(times[3]),
            r[0],
            r[1],
            r[2],
            f[0],
            f[1],
            f[3]
        );
        for (map, r) in vs.iter_mut().zip(r) {
            map.insert(shape.name.into(), json!(round(r, 3)));
        }
        for (map, f) in fairness.iter_mut().zip(f) {
            map.insert(shape.name.into(), json!(round(f, 3)));
        }
    }
    let [vs_deadpool, vs_deadpool_bounded, vs_bb8] = vs;

    // 2. Statements: pinpool against a raw tokio-postgres client.
    let (raw, _pool, pooled) = raw_and_pooled().await;
    let sql = "SELECT $1::int + 1";
    let raw_stmt = raw.prepare(sql).await.unwrap();
    let pooled_stmt = pooled.prepare(sql).await.unwrap();
    let (mut q, mut p) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // [raw &str, pinpool &str, raw prepared, pinpool prepared], in alternating order.
        let mut t = [0.0f64; 4];
        let order: [usize; 4] = if round % 2 == 0 {
            [0, 1, 2, 3]
        } else {
            [3, 2, 1, 0]
        };
        for which in order {
            let start = Instant::now();
            for i in 0..QUERIES as i32 {
                match which {
                    0 => drop(raw.query(sql, &[&i]).await.unwrap()),
                    1 => drop(pooled.query(sql, &[&i]).await.unwrap()),
                    2 => drop(raw.query(&raw_stmt, &[&i]).await.unwrap()),
                    _ => drop(pooled.query(&pooled_stmt, &[&i]).await.unwrap()),
                }
            }
            t[which] = start.elapsed().as_secs_f64();
        }
        q.push(t[1] / t[0]);
        p.push(t[3] / t[2]);
    }
    let (q, p) = (median(q), median(p));
    // A 10,000-row stream, read to its end: every row passes the protocol observer.
    let stream_sql = "SELECT g FROM generate_series(1, 10000) g";
    let mut st = Vec::new();
    for round in 0..ROUNDS {
        let mut t = [0.0f64; 2];
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let start = Instant::now();
            for _ in 0..STREAMS {
                let rows = if which == 0 {
                    count_rows(raw.query_raw(stream_sql, [] as [i32; 0]).await.unwrap()).await
                } else {
                    count_rows(pooled.query_raw(stream_sql, [] as [i32; 0]).await.unwrap()).await
                };
                assert_eq!(rows, 10_000);
            }
            t[which] = start.elapsed().as_secs_f64();
        }
        st.push(t[1] / t[0]);
    }
    let st = median(st);
    println!(
        "\nquery(&str) pinpool/raw {q:.2}   prepared pinpool/raw {p:.2}   10k-row stream pinpool/raw {st:.2}"
    );
    drop(pooled);

    // 3. classify.
    let typical = "SELECT u.id, u.name, u.email, o.total FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1 AND o.created_at > $2 AND o.status = 'pai' ORDER BY o.created_at DESC, u.name ASC LIMIT 20 OFFSET 0";
    let mut big = String::from("INSERT INTO t (id, v) VALUES ");
    while big.len() < 16_000 {
        big.push_str("(1, 'value -- not a comment'), ");
    }
    big.push_str("(0, 'end')");
    let n = 200_000;
    let t = Instant::now();
    for _ in 0..n {
        black_box(pinpool::pinning::classify(black_box(typical)));
    }
    let ns_200b = t.elapsed().as_secs_f64() / n as f64 * 1e9;
    let m = 2_000;
    let t = Instant::now();
    for _ in 0..m {
        black_box(pinpool::pinning::classify(black_box(&big)));
    }
    let mb_s = (big.len() * m) as f64 / t.elapsed().as_secs_f64() / 1e6;
    println!(
        "classify: {ns_200b:.0} ns for {} bytes, {mb_s:.0} MB/s on 16 KB",
        typical.len()
    );

    // 4. The emulator's added latency per round trip (p50).
    let emulator = Emulator::start(
        EmulatorConfig::new(database_url())
            .max_connections(2)
            .application_name("compare"),
    )
    .await
    .unwrap();
    let (proxied, conn) =
        tokio_postgres::connect(&emulator.url("postgres", "postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let p50 = |client: tokio_postgres::Client| async move {
        let stmt = client.prepare("SELECT 1").await.unwrap();
        let mut samples = Vec::new();
        for _ in 0..2_000 {
            let t = Instant::now();
            client.query_one(&stmt, &[]).await.unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        median(samples)
    };
    let direct = p50(raw).await;
    let through = p50(proxied).await;
    let added = through - direct;
    println!(
        "emulator: SELECT 1 p50 {direct:.0} us direct, {through:.0} us through it: {added:.0} us added"
    );
    eprintln!("compare: {:.0} s", started.elapsed().as_secs_f64());
    let json: Value = json!({
        "checkout_vs_deadpool": vs_deadpool,
        "checkout_vs_deadpool_bounded": vs_deadpool_bounded,
        "checkout_vs_bb8": vs_bb8,
        "fairness": {
            "pinpool": fairness[0],
            "deadpool": fairness[1],
            "deadpool_bounded": fairness[2],
            "bb8": fairness[3],
        },
        "query_str_vs_raw": round(q, 3),
        "prepared_vs_raw": round(p, 3),
        "stream_10k_vs_raw": round(st, 3),
        "classify_200b_ns": round(ns_200b, 1),
        "classify_16kb_mb_s": round(mb_s, 1),
        "emulator_added_us": round(added, 1),
    });
    println!("{json}");
}
