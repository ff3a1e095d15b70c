//! A long randomized fault run: workers run mixed work through the emulator and directly
//! against PostgreSQL while a seeded schedule injects every fault of `RELIABILITY.md`. The
//! pool's invariants are checked continuously; at quiet points (the emulated freezes, and the
//! end) the full invariants are checked against the pool and the server; every answer is
//! checked; and every call must end no later than its deadline plus a second (a loaded
//! machine may pause any of thousands of calls for hundreds of milliseconds; a call that
//! ignored its deadline runs on to the 2 s acquire_timeout, or hangs).
//!
//! `PINPOOL_CHAOS_SEED` replays a schedule (the fault schedule and each worker's sequence of
//! operations follow from it; the timing does not); `PINPOOL_CHAOS_SECS` sets the length
//! (default 60).
#![cfg(feature = "emulator")]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{admin, database_url, eventually, url_for};
use pinpool::emulator::{Emulator, EmulatorConfig};
use pinpool::{Error, Pool};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::RwLock;

const DIRECT_APP: &str = "chaos_direct";
const PROXY_APP: &str = "chaos_proxy";
const TABLE: &str = "chaos_rows";
const SLACK: Duration = Duration::from_secs(1);
const PROXY_MAX: usize = 3;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `pg_terminate_backend` on every backend of both pools (idle and mid-query).
    KillBackends,
    /// The proxy drops every database connection at once.
    DropUpstream,
    /// The proxy stops answering (half-open connections) for a while.
    Silent(u64),
    /// The proxy dies; connections are refused for a while; it comes back on the same port.
    Restart(u64),
    /// Other clients pin every database connection of the proxy for a while.
    PinAll(u64),
    /// The environment freezes: nothing runs; backends die meanwhile; then a full check.
    Freeze(u64),
    /// A burst of waiters with random timeouts on the direct pool.
    Burst(usize),
}

fn schedule(seed: u64, total: Duration) -> Vec<(Duration, Fault)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at = Duration::from_millis(500);
    let mut out = Vec::new();
    while at < total {
        let fault = match rng.random_range(0..7) {
            0 => Fault::KillBackends,
            1 => Fault::DropUpstream,
            2 => Fault::Silent(rng.random_range(200..1200)),
            3 => Fault::Restart(rng.random_range(100..800)),
            4 => Fault::PinAll(rng.random_range(300..1500)),
            5 => Fault::Freeze(rng.random_range(100..600)),
            _ => Fault::Burst(rng.random_range(10..40)),
        };
        out.push((at, fault));
        at += Duration::from_millis(rng.random_range(300..2000));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Select,
    Insert,
    Pin,
    Sleep,
    Cancel,
    Panic,
    Hold,
}

/// What the run saw.
#[derive(Default)]
struct Log {
    ok: BTreeMap<Op, u64>,
    failed: BTreeMap<Op, u64>,
    errors: BTreeMap<String, u64>,
    committed: Vec<i64>,
    violations: Vec<String>,
    latest: Duration,
}

impl Log {
    fn violation(&mut self, v: String) {
        if self.violations.len() < 50 {
            self.violations.push(v);
        }
    }
}

fn kind(e: &Error) -> String {
    match e {
        Error::Timeout { phase, cause, .. } => format!("timeout/{phase:?}/{cause:?}"),
        Error::Connect(_) => "connect".into(),
        Error::Query(e) if e.is_closed() => "query/closed".into(),
        Error::Query(e) => format!("query/{}", e.code().map_or("io", |c| c.code())),
        Error::Password(_) => "password".into(),
        Error::Closed => "closed".into(),
        other => format!("{other:?}").chars().take(30).collect(),
    }
}

struct World {
    proxy: Pool,
    direct: Pool,
    bad_host: Pool,
    bad_password: Pool,
    log: Mutex<Log>,
    /// Workers hold it shared for each operation; a freeze takes it exclusively.
    running: RwLock<()>,
    stop: AtomicBool,
    seq: std::sync::atomic::AtomicI64,
}

/// One operation, run inside an invocation ending at `deadline` (the panicking handler runs
/// in an invocation of its own with the same deadline). A wrong answer is a violation.
async fn operation(
    w: &World,
    pool: &Pool,
    op: Op,
    deadline: SystemTime,
    rng: &mut StdRng,
) -> Result<(), Error> {
    match op {
        Op::Select => {
            let n: i32 = rng.random_range(0..1_000_000);
            let c = pool.get().await?;
            let got: i32 = c.query_one_scalar("SELECT $1::int + 1", &[&n]).await?;
            if got != n + 1 {
                w.log
                    .lock()
                    .unwrap()
                    .violation(format!("wrong answer: {n} + 1 = {got}"));
            }
            Ok(())
        }
        Op::Insert => {
            let id = w.seq.fetch_add(1, Ordering::Relaxed);
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            tx.execute(&format!("INSERT INTO {TABLE} VALUES ($1)"), &[&id])
                .await?;
            tx.commit().await?;
            w.log.lock().unwrap().committed.push(id);
            Ok(())
        }
        Op::Pin => {
            let mb = rng.random_range(5..64);
            let c = pool.get().await?;
            c.batch_execute(&format!("SET work_mem = '{mb}MB'")).await?;
            let got: String = c.query_one_scalar("SHOW work_mem", &[]).await?;
            if got != format!("{mb}MB") {
                w.log
                    .lock()
                    .unwrap()
                    .violation(format!("SET work_mem {mb}MB, then SHOW says {got}"));
            }
            Ok(())
        }
        Op::Sleep => {
            let secs = rng.random_range(0.0..1.5f64);
            let c = pool.get().await?;
            c.query_one("SELECT pg_sleep($1)", &[&secs]).await?;
            Ok(())
        }
        Op::Cancel => {
            // Dropped at a random point of a transaction.
            let id = w.seq.fetch_add(1, Ordering::Relaxed);
            let within = Duration::from_micros(rng.random_range(0..40_000));
            let _ = tokio::time::timeout(within, async {
                let mut c = pool.get().await?;
                let tx = c.transaction().await?;
                tx.execute(&format!("INSERT INTO {TABLE} VALUES ($1)"), &[&-id])
                    .await?;
                tokio::task::yield_now().await;
                tx.rollback().await
            })
            .await;
            Ok(())
        }
        Op::Panic => {
            let p = pool.clone();
            let handler = tokio::spawn(p.clone().invocation(deadline, async move {
                let mut c = p.get().await.ok()?;
                let tx = c.transaction().await.ok()?;
                let _ = tx.execute("SELECT 1", &[]).await;
                panic!("chaos: a handler panics holding a transaction");
                #[allow(unreachable_code)]
                Some(())
            }));
            if let Err(e) = handler.await {
                assert!(e.is_panic());
            }
            Ok(())
        }
        Op::Hold => {
            let hold = Duration::from_millis(rng.random_range(0..80));
            let c = pool.get().await?;
            tokio::time::sleep(hold).await;
            c.query_one_scalar::<i32, _>("SELECT 1", &[]).await?;
            Ok(())
        }
    }
}

fn pick(rng: &mut StdRng) -> Op {
    match rng.random_range(0..100) {
        0..35 => Op::Select,
        35..55 => Op::Insert,
        55..65 => Op::Pin,
        65..72 => Op::Sleep,
        72..85 => Op::Cancel,
        85..88 => Op::Panic,
        _ => Op::Hold,
    }
}

async fn worker(w: Arc<World>, index: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ (index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    while !w.stop.load(Ordering::Relaxed) {
        let (name, pool) = match index % 4 {
            0 | 1 => ("proxy", w.proxy.clone()),
            2 => ("direct", w.direct.clone()),
            _ if rng.random_bool(0.05) => {
                if rng.random_bool(0.5) {
                    ("bad host", w.bad_host.clone())
                } else {
                    ("bad password", w.bad_password.clone())
                }
            }
            _ => ("direct", w.direct.clone()),
        };
        let op = pick(&mut rng);
        let budget = Duration::from_millis(rng.random_range(200..1500));
        let _running = w.running.read().await;
        let start = Instant::now();
        let deadline = SystemTime::now() + budget;
        let outcome = tokio::time::timeout(
            budget + Duration::from_secs(10),
            pool.invocation(deadline, operation(&w, &pool, op, deadline, &mut rng)),
        )
        .await;
        let took = start.elapsed();
        drop(_running);
        if matches!(outcome, Ok(Err(_))) {
            // A handler that failed answers its caller before the next request comes.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut log = w.log.lock().unwrap();
        log.latest = log.latest.max(took.saturating_sub(budget));
        match outcome {
            Err(_) => log.violation(format!("{op:?} hung past its deadline of {budget:?}")),
            Ok(r) => {
                if took > budget + SLACK {
                    log.violation(format!(
                        "{op:?} took {took:?} with a deadline of {budget:?} ({r:?})"
                    ));
                }
                match r {
                    Ok(()) => *log.ok.entry(op).or_default() += 1,
                    Err(e) => {
                        *log.failed.entry(op).or_default() += 1;
                        *log.errors
                            .entry(format!("{name}: {}", kind(&e)))
                            .or_default() += 1;
                    }
                }
            }
        }
    }
}

/// The invariants that hold at every instant.
fn check_bounds(w: &World) {
    for (name, pool) in [("proxy", &w.proxy), ("direct", &w.direct)] {
        let s = pool.status();
        if s.size > s.max_size || s.idle + s.in_use > s.size {
            w.log
                .lock()
                .unwrap()
                .violation(format!("{name} pool out of bounds: {s:?}"));
        }
    }
}

/// The invariants that hold when nothing runs: no slot leaked, no waiter left, every pooled
/// connection idle on the server (none left inside a transaction), nothing lent by the proxy.
async fn check_quiet(w: &World, admin: &tokio_postgres::Client, emu: &Emulator, when: &str) {
    let mut found = Vec::new();
    for (name, pool) in [("proxy", &w.proxy), ("direct", &w.direct)] {
        let s = pool.status();
        if s.in_use != 0 || s.waiters != 0 || s.size != s.idle || s.size > s.max_size {
            found.push(format!("{when}: {name} pool not quiet: {s:?}"));
        }
    }
    let busy = || async {
        admin
            .query(
                "SELECT state || ': ' || query FROM pg_stat_activity \
                 WHERE application_name = $1 AND state <> 'idle'",
                &[&DIRECT_APP],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    // Ended within 100 ms by the server (client_connection_check_interval); 10 s for a loaded
    // machine.
    if !eventually(10, || async { busy().await.is_empty() }).await {
        found.push(format!(
            "{when}: backends of idle pooled connections busy on the server: {:?}",
            busy().await
        ));
    }
    let settled = eventually(10, || async {
        let c = emu.counters();
        c.upstream_in_use == 0 && c.pinned_now == 0
    })
    .await;
    if !settled {
        found.push(format!(
            "{when}: the proxy did not settle: {:?}",
            emu.counters()
        ));
    }
    let mut log = w.log.lock().unwrap();
    for f in found {
        log.violation(f);
    }
}

async fn start_proxy(addr: SocketAddr) -> Emulator {
    let config = EmulatorConfig::new(database_url())
        .listen(addr)
        .max_connections(PROXY_MAX)
        .borrow_timeout(Duration::from_millis(300))
        .application_name(PROXY_APP);
    // The port was just freed: retry briefly if the OS still holds it.
    for _ in 0..50 {
        if let Ok(e) = Emulator::start(config.clone()).await {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the proxy could not restart on {addr}");
}

async fn pin_all(
    emu_addr: SocketAddr,
) -> Vec<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let mut held = Vec::new();
    for _ in 0..PROXY_MAX {
        let url = format!("postgres://postgres@{emu_addr}/postgres");
        let Ok(Ok((c, conn))) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio_postgres::connect(&url, tokio_postgres::NoTls),
        )
        .await
        else {
            continue;
        };
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let pinned = tokio::time::timeout(
            Duration::from_secs(1),
            c.batch_execute("SET work_mem = '7MB'"),
        )
        .await;
        if matches!(pinned, Ok(Ok(()))) {
            held.push((c, task));
        }
    }
    held
}

async fn kill(admin: &tokio_postgres::Client) {
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = ANY($1)",
            &[&vec![DIRECT_APP, PROXY_APP]],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_keep_every_invariant() {
    let seed: u64 = std::env::var("PINPOOL_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let secs: u64 = std::env::var("PINPOOL_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    eprintln!("chaos: seed {seed}, {secs} s (PINPOOL_CHAOS_SEED={seed} replays the schedule)");
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id bigint)"
        ))
        .await
        .unwrap();
    let emu = start_proxy("127.0.0.1:0".parse().unwrap()).await;
    let addr = emu.addr();
    let locked = Emulator::start(
        EmulatorConfig::new(database_url())
            .max_connections(1)
            .password("the-right-one")
            .application_name("chaos_locked"),
    )
    .await
    .unwrap();
    let common = |b: pinpool::Builder| {
        b.max_size(4)
            .connect_timeout(Duration::from_millis(500))
            .acquire_timeout(Duration::from_secs(2))
            .query_timeout(Some(Duration::from_secs(1)))
            .validate_timeout(Duration::from_millis(300))
            .build()
            .unwrap()
    };
    let w = Arc::new(World {
        proxy: common(Pool::builder(format!(
            "postgres://postgres@{addr}/postgres?application_name=chaos_client"
        ))),
        // The server ends a backend whose client left mid-statement within 100 ms, so a
        // backend still busy at a quiet point is a connection the pool lost track of.
        direct: common(Pool::builder(format!(
            "{}&options=-c%20client_connection_check_interval%3D100",
            url_for(DIRECT_APP)
        ))),
        bad_host: common(Pool::builder(
            "postgres://postgres@no-such-host.invalid/postgres",
        )),
        bad_password: common(
            Pool::builder(locked.url("postgres", "postgres")).password("a-wrong-one"),
        ),
        log: Mutex::default(),
        running: RwLock::new(()),
        stop: AtomicBool::new(false),
        seq: 1.into(),
    });
    let plan = schedule(seed, Duration::from_secs(secs));
    let workers: Vec<_> = (0..8)
        .map(|i| tokio::spawn(worker(w.clone(), i, seed)))
        .collect();
    let checker = {
        let w = w.clone();
        tokio::spawn(async move {
            while !w.stop.load(Ordering::Relaxed) {
                check_bounds(&w);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut emu = Some(emu);
    let began = Instant::now();
    let mut injected: BTreeMap<&str, u64> = BTreeMap::new();
    for (at, fault) in &plan {
        tokio::time::sleep_until((began + *at).into()).await;
        let name = match fault {
            Fault::KillBackends => {
                kill(&admin).await;
                "kill backends"
            }
            Fault::DropUpstream => {
                emu.as_ref().unwrap().drop_upstream_connections();
                "proxy drops database connections"
            }
            Fault::Silent(ms) => {
                emu.as_ref().unwrap().set_silent(true);
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                emu.as_ref().unwrap().set_silent(false);
                "silent proxy"
            }
            Fault::Restart(ms) => {
                drop(emu.take());
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                emu = Some(start_proxy(addr).await);
                "proxy restarted"
            }
            Fault::PinAll(ms) => {
                let held = pin_all(addr).await;
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                drop(held);
                "proxy connections all pinned"
            }
            Fault::Freeze(ms) => {
                let frozen = w.running.write().await;
                check_quiet(&w, &admin, emu.as_ref().unwrap(), "before a freeze").await;
                kill(&admin).await;
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                drop(frozen);
                "freeze (backends killed meanwhile)"
            }
            Fault::Burst(n) => {
                let mut rng = StdRng::seed_from_u64(seed ^ at.as_millis() as u64);
                let waiters: Vec<_> = (0..*n)
                    .map(|_| {
                        let pool = w.direct.clone();
                        let within = Duration::from_millis(rng.random_range(1..300));
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(within, async {
                                let c = pool.get().await?;
                                c.query_one_scalar::<i32, _>("SELECT 1", &[]).await
                            })
                            .await;
                        })
                    })
                    .collect();
                for t in waiters {
                    t.await.unwrap();
                }
                "burst of waiters"
            }
        };
        *injected.entry(name).or_default() += 1;
    }
    tokio::time::sleep_until((began + Duration::from_secs(secs)).into()).await;
    w.stop.store(true, Ordering::Relaxed);
    for t in workers {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("a worker hung")
            .unwrap();
    }
    checker.await.unwrap();
    // The last fault may have just happened: killed backends take a moment to exit.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let emu = emu.unwrap();
    check_quiet(&w, &admin, &emu, "at the end").await;

    // Served correctly once the faults are gone.
    for (name, pool) in [("proxy", &w.proxy), ("direct", &w.direct)] {
        for i in 0..20i32 {
            let deadline = SystemTime::now() + Duration::from_secs(5);
            let got: i32 = pool
                .invocation(deadline, async {
                    pool.get()
                        .await?
                        .query_one_scalar("SELECT $1::int * 3", &[&i])
                        .await
                })
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "seed {seed}: the {name} pool failed after the faults: {e:?}, {:?}, last faults {:?}",
                        pool.status(),
                        &plan[plan.len().saturating_sub(3)..]
                    )
                });
            assert_eq!(got, i * 3);
        }
        common::assert_quiet(pool);
    }
    let log = std::mem::take(&mut *w.log.lock().unwrap());
    let rows: Vec<i64> = admin
        .query(&format!("SELECT id FROM {TABLE}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let present: std::collections::HashSet<i64> = rows.iter().copied().collect();
    let lost: Vec<i64> = log
        .committed
        .iter()
        .filter(|id| !present.contains(id))
        .copied()
        .collect();
    let rolled_back_but_present: Vec<i64> = rows.iter().filter(|id| **id < 0).copied().collect();
    eprintln!("chaos: faults {injected:?}");
    eprintln!("chaos: ok {:?}", log.ok);
    eprintln!("chaos: failed {:?}", log.failed);
    eprintln!("chaos: errors {:?}", log.errors);
    eprintln!(
        "chaos: {} commits, all present: {}; latest past a deadline: {:?}",
        log.committed.len(),
        lost.is_empty(),
        log.latest
    );
    assert!(
        lost.is_empty(),
        "seed {seed}: committed rows lost: {lost:?}"
    );
    assert!(
        rolled_back_but_present.is_empty(),
        "seed {seed}: rows of dropped transactions committed: {rolled_back_but_present:?}"
    );
    assert!(
        log.violations.is_empty(),
        "seed {seed}: {:#?}",
        log.violations
    );
    assert!(
        injected.len() >= 5 || secs < 20,
        "seed {seed}: {injected:?}"
    );
    assert!(
        log.ok.values().sum::<u64>() > 100,
        "seed {seed}: {:?}",
        log.ok
    );
    admin
        .batch_execute(&format!("DROP TABLE {TABLE}"))
        .await
        .unwrap();
}
