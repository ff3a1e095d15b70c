//! Memory under churn: a long run of invocations through one pool against PostgreSQL, with
//! pins (a `SET` closes its connection on return, the next checkout connects afresh),
//! replacements (a `max_lifetime` of 100 ms), retries (idle backends terminated between
//! invocations, so a first statement finds its connection closed), timeouts (statements past
//! a tight deadline: the socket is closed) and raw calls through the driver's client. Prints
//! the process's resident memory at the start (after a warm-up) and every tenth of the run,
//! then one JSON line.
//!
//! ```sh
//! cargo run --release --example churn -- 100000
//! ```

use std::time::{Duration, Instant, SystemTime};

use pinpool::{CloseReason, Pool, PooledClient};

/// The process's resident set size in KiB, from `/proc/self/status`.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    pinned: u64,
    timed_out: u64,
    raw: u64,
    errors: u64,
}

/// One invocation, its kind picked by its number.
async fn invocation(pool: &Pool, n: u64, tally: &mut Tally) {
    let tight = n.is_multiple_of(997);
    // A tight invocation has 100 ms past the margin: its statement times out on the socket.
    let left = if tight {
        pool.deadline_margin() + Duration::from_millis(100)
    } else {
        Duration::from_secs(5)
    };
    let deadline = SystemTime::now() + left;
    let r = pool
        .invocation(deadline, async {
            let c = pool.get().await?;
            if tight {
                c.query("SELECT pg_sleep(1)", &[]).await?;
            } else if n.is_multiple_of(50) {
                // Pins: closed on return, the next checkout connects afresh.
                c.batch_execute("SET application_name = 'churn_pinned'")
                    .await?;
                return Ok::<_, pinpool::Error>(1);
            } else if n.is_multiple_of(20) {
                let raw: &tokio_postgres::Client = PooledClient::raw(&c);
                raw.query_one("SELECT $1::int + 1", &[&(n as i32)])
                    .await
                    .map_err(pinpool::Error::Query)?;
                return Ok(2);
            }
            let row = c.query_one("SELECT $1::bigint * 2", &[&(n as i64)]).await?;
            let v: i64 = row.get(0);
            assert_eq!(v, n as i64 * 2, "a wrong answer");
            Ok(0)
        })
        .await;
    match r {
        Ok(0) => tally.ok += 1,
        Ok(1) => tally.pinned += 1,
        Ok(_) => tally.raw += 1,
        Err(e) if e.is_timeout() => tally.timed_out += 1,
        Err(e) => {
            tally.errors += 1;
            if tally.errors <= 5 {
                eprintln!("invocation {n}: {e}");
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let total: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("the number of invocations"))
        .unwrap_or(100_000);
    let url = format!("{}?application_name=churn", database_url());
    let pool = Pool::builder(&url)
        .max_size(4)
        .max_lifetime(Some(Duration::from_millis(100)))
        .build()
        .expect("a valid configuration");
    let (admin, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to DATABASE_URL");
    tokio::spawn(conn);

    let mut tally = Tally::default();
    for n in 1..=1_000 {
        invocation(&pool, n, &mut tally).await;
    }
    let start_kib = rss_kib();
    println!("after a warm-up of 1,000 invocations: {start_kib} KiB resident");
    let started = Instant::now();
    let mut samples = vec![start_kib];
    for n in 1..=total {
        if n.is_multiple_of(1_000) {
            // The backends die (a proxy restart): the checked-out client's first statement
            // runs again on a fresh connection (the safe retry), the idle ones are replaced
            // at their next checkout.
            let c = pool.get().await.expect("a checkout");
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'churn' AND state = 'idle'",
                    &[],
                )
                .await
                .expect("terminate idle backends");
            while !c.is_closed() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            c.query_one("SELECT 1", &[]).await.expect("retried");
        }
        invocation(&pool, 1_000 + n, &mut tally).await;
        if n.is_multiple_of((total / 10).max(1)) {
            let kib = rss_kib();
            samples.push(kib);
            println!("{n:>7} invocations: {kib} KiB resident, {tally:?}");
        }
    }
    let end_kib = rss_kib();
    let s = pool.status();
    println!(
        "{{\"invocations\":{total},\"seconds\":{:.1},\"rss_start_kib\":{start_kib},\"rss_end_kib\":{end_kib},\"rss_max_kib\":{},\"ok\":{},\"pinned\":{},\"raw\":{},\"timed_out\":{},\"errors\":{},\"opened\":{},\"retries\":{},\"closed_broken\":{},\"closed_pinned\":{},\"closed_max_lifetime\":{},\"closed_timed_out\":{}}}",
        started.elapsed().as_secs_f64(),
        samples.iter().max().copied().unwrap_or(0),
        tally.ok,
        tally.pinned,
        tally.raw,
        tally.timed_out,
        tally.errors,
        s.opened,
        s.retries,
        s.closed.get(CloseReason::Broken),
        s.closed.get(CloseReason::Pinned),
        s.closed.get(CloseReason::MaxLifetime),
        s.closed.get(CloseReason::TimedOut),
    );
}
