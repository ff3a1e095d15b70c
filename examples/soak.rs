//! Reproduces the incident: many Lambda execution environments behind the RDS Proxy emulator,
//! with and without pinpool. Starts the emulator in front of `DATABASE_URL` itself.
//!
//! ```sh
//! cargo run --release --features emulator --example soak
//! ```
//!
//! Time is scaled down (a 2 s Lambda timeout, a 10 s proxy borrow timeout) so a run takes about
//! a minute. `--help` lists the flags. The last line of stdout is one JSON object.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pinpool::emulator::{Emulator, EmulatorConfig};
use pinpool::pinning::PinRules;

const USAGE: &str =
    "usage: soak [--duration 8s] [--vus 60] [--think 1s] [--rate N] [--routing random|mru]
  [--environments 1000] [--env-idle-lifetime 30s] [--pin-share 0.2] [--scenarios 2023,today]
  [--upstream-connections 40] [--lambda-timeout 2s] [--borrow-timeout 10s]
  [--idle-client-timeout 60s] [--variants baseline,plain-pool,pinpool] [--seed 1] [--svg FILE]
  [--pinpool-rules match|today|legacy]   (match: pinpool knows what the proxy pins)";

#[derive(Clone, Debug)]
struct Options {
    duration: Duration,
    vus: usize,
    think: Duration,
    rate: Option<f64>,
    mru: bool,
    environments: usize,
    env_idle_lifetime: Duration,
    pin_share: f64,
    scenarios: Vec<String>,
    upstream: usize,
    lambda_timeout: Duration,
    borrow_timeout: Duration,
    idle_client_timeout: Duration,
    variants: Vec<String>,
    seed: u64,
    svg: Option<String>,
    /// The rules pinpool is given: "match" (the scenario's), "today" or "legacy".
    pinpool_rules: String,
    database_url: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s}"))?;
    Ok(Duration::from_secs_f64(match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("not a duration: {s} (use 500ms, 2s, 1m)")),
    }))
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        duration: Duration::from_secs(8),
        vus: 60,
        think: Duration::from_secs(1),
        rate: None,
        mru: false,
        environments: 1000,
        env_idle_lifetime: Duration::from_secs(30),
        pin_share: 0.2,
        scenarios: vec!["2023".into(), "today".into()],
        upstream: 40,
        lambda_timeout: Duration::from_secs(2),
        borrow_timeout: Duration::from_secs(10),
        idle_client_timeout: Duration::from_secs(60),
        variants: vec!["baseline".into(), "plain-pool".into(), "pinpool".into()],
        seed: 1,
        svg: None,
        pinpool_rules: "match".into(),
        database_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let v = args.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        let list = |v: &str| v.split(',').map(str::to_string).collect::<Vec<_>>();
        match flag.as_str() {
            "--duration" => o.duration = duration(&v)?,
            "--vus" => o.vus = num(&v)? as usize,
            "--think" => o.think = duration(&v)?,
            "--rate" => o.rate = Some(num(&v)?),
            "--routing" => o.mru = v == "mru",
            "--environments" => o.environments = num(&v)? as usize,
            "--env-idle-lifetime" => o.env_idle_lifetime = duration(&v)?,
            "--pin-share" => o.pin_share = num(&v)?,
            "--scenarios" => o.scenarios = list(&v),
            "--upstream-connections" => o.upstream = num(&v)? as usize,
            "--lambda-timeout" => o.lambda_timeout = duration(&v)?,
            "--borrow-timeout" => o.borrow_timeout = duration(&v)?,
            "--idle-client-timeout" => o.idle_client_timeout = duration(&v)?,
            "--variants" => o.variants = list(&v),
            "--seed" => o.seed = num(&v)? as u64,
            "--svg" => o.svg = Some(v),
            "--pinpool-rules" if ["match", "today", "legacy"].contains(&v.as_str()) => {
                o.pinpool_rules = v
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    for s in &o.scenarios {
        if s != "2023" && s != "today" {
            return Err(format!("--scenarios: unknown scenario {s}"));
        }
    }
    for v in &o.variants {
        if !["baseline", "plain-pool", "pinpool"].contains(&v.as_str()) {
            return Err(format!("--variants: unknown variant {v}"));
        }
    }
    Ok(o)
}

/// A small deterministic generator (xorshift), so a seed gives the same arrivals and choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

/// What an execution environment keeps between invocations.
enum Conn {
    /// The incident's code: one connection per environment, no pool.
    Baseline(Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>),
    /// A conventional pool (deadpool-postgres, max 7), unaware of pinning and deadlines.
    Plain(deadpool_postgres::Pool),
    /// pinpool with defaults, inside the invocation scope.
    Pin(pinpool::Pool),
}

struct Env {
    conn: Conn,
    last_used: Instant,
}

impl Drop for Env {
    fn drop(&mut self) {
        // Lambda kills or reclaims the environment: its sockets close at once.
        if let Conn::Baseline(Some((_, task))) = &self.conn {
            task.abort();
        }
    }
}

struct Run {
    scenario: String,
    variant: String,
    url: String,
    opts: Options,
    idle: Mutex<Vec<Env>>,
    live_envs: AtomicUsize,
    in_flight: AtomicUsize,
    invocations: AtomicU64,
    ok: AtomicU64,
    timeouts: AtomicU64,
    fast_failures: AtomicU64,
    latencies: Mutex<Vec<f64>>,
    rng: Mutex<Rng>,
}

const READ: &str = "SELECT count(*) FROM pinpool_soak WHERE k = $1";
const WRITE: &str = "INSERT INTO pinpool_soak (k) VALUES ($1)";
const PIN: &str = "SET application_name = 'soak-pinned'";

impl Run {
    fn new_env(&self) -> Env {
        let pg: tokio_postgres::Config = self.url.parse().expect("emulator URL");
        let conn = match self.variant.as_str() {
            "baseline" => Conn::Baseline(None),
            "plain-pool" => {
                let manager = deadpool_postgres::Manager::new(pg, tokio_postgres::NoTls);
                Conn::Plain(
                    deadpool_postgres::Pool::builder(manager)
                        .max_size(7)
                        .build()
                        .expect("deadpool"),
                )
            }
            _ => {
                let legacy = match self.opts.pinpool_rules.as_str() {
                    "match" => self.scenario == "2023",
                    rules => rules == "legacy",
                };
                let rules = if legacy {
                    PinRules::legacy()
                } else {
                    PinRules::new()
                };
                Conn::Pin(
                    pinpool::Pool::builder(pg)
                        .pin_rules(rules)
                        .build()
                        .expect("pinpool"),
                )
            }
        };
        Env {
            conn,
            last_used: Instant::now(),
        }
    }

    /// Lambda's routing: an idle warm environment, else a new one (up to the limit).
    fn route(&self) -> Option<Env> {
        let mut idle = self.idle.lock().unwrap();
        let now = Instant::now();
        let before = idle.len();
        idle.retain(|e| now.duration_since(e.last_used) < self.opts.env_idle_lifetime);
        self.live_envs.fetch_sub(before - idle.len(), Relaxed);
        if !idle.is_empty() {
            let i = if self.opts.mru {
                idle.len() - 1
            } else {
                self.rng.lock().unwrap().below(idle.len())
            };
            return Some(idle.swap_remove(i));
        }
        drop(idle);
        if self.live_envs.load(Relaxed) >= self.opts.environments {
            return None;
        }
        self.live_envs.fetch_add(1, Relaxed);
        Some(self.new_env())
    }

    async fn invoke(self: &Arc<Self>, k: i64, pin: bool) {
        self.invocations.fetch_add(1, Relaxed);
        let Some(mut env) = self.route() else {
            self.fast_failures.fetch_add(1, Relaxed); // throttled
            return;
        };
        self.in_flight.fetch_add(1, Relaxed);
        let start = Instant::now();
        let deadline = SystemTime::now() + self.opts.lambda_timeout;
        let outcome = tokio::time::timeout(
            self.opts.lambda_timeout,
            workload(&mut env, deadline, k, pin),
        )
        .await;
        let elapsed = start.elapsed().as_secs_f64() * 1000.0;
        self.latencies.lock().unwrap().push(elapsed);
        self.in_flight.fetch_sub(1, Relaxed);
        match outcome {
            Ok(Ok(())) => {
                self.ok.fetch_add(1, Relaxed);
                env.last_used = Instant::now();
                self.idle.lock().unwrap().push(env);
            }
            Ok(Err(_)) => {
                self.fast_failures.fetch_add(1, Relaxed);
                env.last_used = Instant::now();
                self.idle.lock().unwrap().push(env);
            }
            Err(_) => {
                // A Lambda timeout: the caller saw an opaque 5XX, and Lambda resets the
                // environment (the process is killed with its sockets).
                self.timeouts.fetch_add(1, Relaxed);
                self.live_envs.fetch_sub(1, Relaxed);
                drop(env);
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn workload(env: &mut Env, deadline: SystemTime, k: i64, pin: bool) -> Result<(), BoxError> {
    match &mut env.conn {
        Conn::Baseline(slot) => {
            if slot.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                let url = SOAK_URL.lock().unwrap().clone();
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                let task = tokio::spawn(async move {
                    let _ = connection.await;
                });
                *slot = Some((client, task));
            }
            let (c, _) = slot.as_ref().expect("connected");
            if pin {
                c.batch_execute(PIN).await?;
            }
            c.query(READ, &[&k]).await?;
            c.execute(WRITE, &[&k]).await?;
        }
        Conn::Plain(pool) => {
            let c = pool.get().await?;
            if pin {
                c.batch_execute(PIN).await?;
            }
            c.query(READ, &[&k]).await?;
            c.execute(WRITE, &[&k]).await?;
        }
        Conn::Pin(pool) => {
            pool.invocation(deadline, async {
                let c = pool.get().await?;
                if pin {
                    c.batch_execute(PIN).await?;
                }
                c.query(READ, &[&k]).await?;
                c.execute(WRITE, &[&k]).await?;
                Ok::<(), pinpool::Error>(())
            })
            .await?;
        }
    }
    Ok(())
}

static SOAK_URL: Mutex<String> = Mutex::new(String::new());

#[derive(Debug)]
struct Sample {
    t: f64,
    pinned: u64,
    in_flight: usize,
    timeouts: u64,
}

struct Outcome {
    scenario: String,
    variant: String,
    invocations: u64,
    ok: u64,
    timeouts: u64,
    fast_failures: u64,
    p50: f64,
    p99: f64,
    max: f64,
    peak_pinned: u64,
    borrow_timeouts: u64,
    samples: Vec<Sample>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run_one(opts: &Options, scenario: &str, variant: &str) -> Result<Outcome, BoxError> {
    let rules = if scenario == "2023" {
        PinRules::legacy()
    } else {
        PinRules::new()
    };
    let emulator = Emulator::start(
        EmulatorConfig::new(opts.database_url.clone())
            .max_connections(opts.upstream)
            .borrow_timeout(opts.borrow_timeout)
            .idle_client_timeout(opts.idle_client_timeout)
            .rules(rules)
            .application_name("pinpool-soak"),
    )
    .await?;
    let url = emulator.url("postgres", "postgres");
    *SOAK_URL.lock().unwrap() = url.clone();
    let run = Arc::new(Run {
        scenario: scenario.into(),
        variant: variant.into(),
        url,
        opts: opts.clone(),
        idle: Mutex::new(Vec::new()),
        live_envs: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        invocations: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        fast_failures: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
        rng: Mutex::new(Rng(opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)),
    });
    let end = tokio::time::Instant::now() + opts.duration;
    let started = Instant::now();
    let mut load = Vec::new();
    let pin_share = if scenario == "today" {
        opts.pin_share
    } else {
        0.0
    };
    if let Some(rate) = opts.rate {
        // Open model: a steady arrival rate.
        let run = run.clone();
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            let mut n = 0i64;
            let mut tasks = Vec::new();
            while tokio::time::Instant::now() < end {
                tick.tick().await;
                n += 1;
                let pin = run.rng.lock().unwrap().chance(pin_share);
                let r = run.clone();
                tasks.push(tokio::spawn(async move { r.invoke(n % 1000, pin).await }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }));
    } else {
        // Closed model, like k6: virtual users that start together, wait for their answer,
        // then think for a fixed time.
        for vu in 0..opts.vus {
            let run = run.clone();
            let think = opts.think;
            load.push(tokio::spawn(async move {
                let mut n = 0i64;
                while tokio::time::Instant::now() < end {
                    let pin = run.rng.lock().unwrap().chance(pin_share);
                    run.invoke((vu as i64) * 1000 + n % 1000, pin).await;
                    n += 1;
                    tokio::time::sleep(think).await;
                }
            }));
        }
    }
    let mut samples = Vec::new();
    let mut last_print = Instant::now();
    while load.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let c = emulator.counters();
        samples.push(Sample {
            t: started.elapsed().as_secs_f64(),
            pinned: c.pinned_now,
            in_flight: run.in_flight.load(Relaxed),
            timeouts: run.timeouts.load(Relaxed),
        });
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "  {scenario:>5} {variant:<10} t={:>4.1}s invocations={} ok={} lambda_timeouts={} pinned={} in_flight={}",
                started.elapsed().as_secs_f64(),
                run.invocations.load(Relaxed),
                run.ok.load(Relaxed),
                run.timeouts.load(Relaxed),
                c.pinned_now,
                run.in_flight.load(Relaxed)
            );
        }
    }
    let c = emulator.counters();
    // Every environment ends with the run.
    run.idle.lock().unwrap().clear();
    let mut lat = run.latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    Ok(Outcome {
        scenario: scenario.into(),
        variant: variant.into(),
        invocations: run.invocations.load(Relaxed),
        ok: run.ok.load(Relaxed),
        timeouts: run.timeouts.load(Relaxed),
        fast_failures: run.fast_failures.load(Relaxed),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or(0.0),
        peak_pinned: c.peak_pinned,
        borrow_timeouts: c.borrow_timeouts,
        samples,
    })
}

fn svg(outcomes: &[Outcome], opts: &Options) -> String {
    let (w, h, pad) = (520.0, 150.0, 34.0);
    let cols = 2.0;
    let rows = (outcomes.len() as f64 / cols).ceil();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        w * cols,
        h * rows + 24.0
    );
    let _ = writeln!(
        s,
        "<text x=\"8\" y=\"16\">pinned upstream connections (red), in-flight invocations (blue), Lambda timeouts so far (black); upstream limit {} dashed</text>",
        opts.upstream
    );
    for (i, o) in outcomes.iter().enumerate() {
        let (x0, y0) = ((i as f64 % cols) * w, 24.0 + (i as f64 / cols).floor() * h);
        let t_max = o.samples.last().map_or(1.0, |s| s.t).max(1.0);
        let y_max = o
            .samples
            .iter()
            .map(|s| {
                (s.pinned as f64)
                    .max(s.in_flight as f64)
                    .max(s.timeouts as f64)
            })
            .fold(opts.upstream as f64, f64::max)
            * 1.1;
        let px = |t: f64| x0 + pad + (t / t_max) * (w - 2.0 * pad);
        let py = |v: f64| y0 + h - pad + 10.0 - (v / y_max) * (h - pad - 10.0);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\">{} proxy, {}: {} timeouts / {} invocations</text>",
            x0 + pad,
            y0 + 14.0,
            o.scenario,
            o.variant,
            o.timeouts,
            o.invocations
        );
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#ccc\"/>",
            x0 + pad,
            py(y_max),
            w - 2.0 * pad,
            py(0.0) - py(y_max)
        );
        let _ = writeln!(
            s,
            "<line x1=\"{}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>",
            px(0.0),
            px(t_max),
            y = py(opts.upstream as f64)
        );
        for (color, f) in [
            (
                "#d62728",
                &(|s: &Sample| s.pinned as f64) as &dyn Fn(&Sample) -> f64,
            ),
            ("#1f77b4", &|s: &Sample| s.in_flight as f64),
            ("#000000", &|s: &Sample| s.timeouts as f64),
        ] {
            let points: Vec<String> = o
                .samples
                .iter()
                .map(|smp| format!("{:.1},{:.1}", px(smp.t), py(f(smp))))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                points.join(" ")
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\">0</text><text x=\"{}\" y=\"{}\">{:.0}s</text>",
            x0 + pad - 10.0,
            py(0.0),
            px(t_max) - 10.0,
            py(0.0) + 12.0,
            t_max
        );
    }
    s.push_str("</svg>\n");
    s
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("soak: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    // The workload's table, directly on the database.
    let (admin, conn) = tokio_postgres::connect(&opts.database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS pinpool_soak (id bigserial PRIMARY KEY, k bigint NOT NULL, at timestamptz NOT NULL DEFAULT now()); TRUNCATE pinpool_soak")
        .await?;
    eprintln!(
        "soak: {} virtual users, think {:?}, Lambda timeout {:?}, proxy borrow timeout {:?}, {} upstream connections, {:?} per run",
        opts.vus,
        opts.think,
        opts.lambda_timeout,
        opts.borrow_timeout,
        opts.upstream,
        opts.duration
    );
    let mut outcomes = Vec::new();
    for scenario in &opts.scenarios {
        for variant in &opts.variants {
            outcomes.push(run_one(&opts, scenario, variant).await?);
        }
    }
    println!(
        "{:<6} {:<11} {:>11} {:>8} {:>15} {:>13} {:>8} {:>8} {:>8} {:>11} {:>15}",
        "proxy",
        "variant",
        "invocations",
        "ok",
        "lambda_timeouts",
        "fast_failures",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "peak_pinned",
        "borrow_timeouts"
    );
    for o in &outcomes {
        println!(
            "{:<6} {:<11} {:>11} {:>8} {:>15} {:>13} {:>8.1} {:>8.1} {:>8.1} {:>11} {:>15}",
            o.scenario,
            o.variant,
            o.invocations,
            o.ok,
            o.timeouts,
            o.fast_failures,
            o.p50,
            o.p99,
            o.max,
            o.peak_pinned,
            o.borrow_timeouts
        );
    }
    if let Some(path) = &opts.svg {
        std::fs::write(path, svg(&outcomes, &opts))?;
        eprintln!("soak: chart written to {path}");
    }
    let variants: Vec<String> = outcomes
        .iter()
        .map(|o| {
            format!(
                "{{\"scenario\":\"{}\",\"name\":\"{}\",\"invocations\":{},\"ok\":{},\"lambda_timeouts\":{},\"fast_failures\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"max_ms\":{:.1},\"peak_pinned\":{},\"borrow_timeouts\":{}}}",
                o.scenario, o.variant, o.invocations, o.ok, o.timeouts, o.fast_failures, o.p50, o.p99, o.max, o.peak_pinned, o.borrow_timeouts
            )
        })
        .collect();
    println!("{{\"variants\":[{}]}}", variants.join(","));
    Ok(())
}
