//! Reproduces the incident: many Lambda execution environments behind the RDS Proxy emulator,
//! with and without pinpool. Starts the emulator in front of `DATABASE_URL` itself.
//!
//! ```sh
//! cargo run --release --features emulator --example soak
//! ```
//!
//! Time is scaled down (a 2 s Lambda timeout, a 10 s proxy borrow timeout, a 3 s NAT idle
//! timeout) so a run takes about a minute and a half. The network is modelled: 250 µs one way
//! between each environment and the proxy and between the proxy and the database (a same-AZ
//! hop; `--client-latency`, `--upstream-latency`), and the emulator counts each invocation's
//! round trips (`warm_rt`: the median of the warm invocations that succeeded). `billed` is
//! the invocation's time until its work ended (the answer, then the end-of-invocation work
//! after it; the Lambda timeout for one that timed out), over every invocation that ran.
//! `baseline` and `plain-pool` send each statement as the incident's code did (knex on
//! node-postgres: one unnamed Parse/Bind/Execute/Sync, `query_typed`), one round trip each.
//! The `pgbouncer` scenario runs the variants against a real PgBouncer in session mode
//! instead of the emulator (skipped when PgBouncer is not installed; no modelled network
//! there, no round-trip count). `--help` lists the flags with their defaults. The last line
//! of stdout is one JSON object.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, ValueEnum};
use pinpool::emulator::{Emulator, EmulatorConfig, RoundTrips};
use pinpool::pinning::PinRules;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::types::Type;

#[path = "support/pgbouncer.rs"]
mod pgbouncer;
use pgbouncer::PgBouncer;

/// The incident soak: Lambda environments behind the RDS Proxy emulator, with and without
/// pinpool.
#[derive(Parser, Clone, Debug)]
#[command(max_term_width = 100, args_override_self = true)]
struct Options {
    /// How long each variant runs
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Virtual users (a closed model, like k6): they start together, wait for each answer, then think
    #[arg(long, default_value_t = 60)]
    vus: usize,
    /// Each virtual user's pause after an answer
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    think: Duration,
    /// Draws each think time evenly from within this share of --think either side (0.5: from
    /// half to one and a half times it), so users that start together drift apart; at 0 they
    /// stay in step, as k6's fixed sleep keeps them
    #[arg(long, default_value_t = 0.0, value_parser = jitter)]
    think_jitter: f64,
    /// An open model instead of virtual users: invocations per second, at a steady rate
    #[arg(long)]
    rate: Option<f64>,
    /// Which idle environment Lambda gives an invocation
    #[arg(long, value_enum, default_value_t = Routing::Random)]
    routing: Routing,
    /// The most execution environments at once; more concurrent invocations are throttled
    #[arg(long, default_value_t = 1000)]
    environments: usize,
    /// An environment idle this long is reclaimed (its sockets close)
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    env_idle_lifetime: Duration,
    /// The share of invocations that run a pinning `SET` first (proxies `today` and `nat`)
    #[arg(long, default_value_t = 0.2)]
    pin_share: f64,
    /// The proxies to run against (`pgbouncer` is skipped, with a message, when PgBouncer is
    /// not installed)
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "2023,today,nat,pgbouncer"
    )]
    scenarios: Vec<Scenario>,
    /// The one-way latency between a Lambda environment and the proxy (the emulator's
    /// `client_latency`). AWS publishes no latency for this hop nor for RDS Proxy itself; it
    /// describes Availability Zones as "close enough to use synchronous replication with
    /// single-digit millisecond latency" (AWS Fault Isolation Boundaries whitepaper) and
    /// public pings between instances in one AZ measure about 0.45 ms round trip (1.3 to
    /// 2.1 ms between AZs). 250 µs one way is a same-AZ hop: conservative, since a longer hop
    /// only makes each round trip dearer. Not applied to the `pgbouncer` scenario.
    #[arg(long, default_value = "250us", value_parser = humantime::parse_duration)]
    client_latency: Duration,
    /// The one-way latency between the proxy and the database (the emulator's
    /// `upstream_latency`): a same-AZ hop too (see --client-latency). A statement then waits
    /// at least 2 × (250 + 250) µs = 1 ms for its answer.
    #[arg(long, default_value = "250us", value_parser = humantime::parse_duration)]
    upstream_latency: Duration,
    /// The proxy's database connections
    #[arg(long, default_value_t = 40)]
    upstream_connections: usize,
    /// The Lambda function's timeout
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lambda_timeout: Duration,
    /// The proxy's ConnectionBorrowTimeout (120 s in AWS)
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    borrow_timeout: Duration,
    /// The proxy's IdleClientTimeout (1,800 s in AWS)
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_client_timeout: Duration,
    /// The `nat` scenario's NAT idle timeout (AWS NAT gateways: 350 s)
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    nat_idle_timeout: Duration,
    /// The clients to run
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "baseline,plain-pool,pinpool"
    )]
    variants: Vec<Variant>,
    /// The seed of arrivals, routing and pinning choices: a seed gives the same choices
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the chart (SVG) here
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The rules pinpool is given: match (the proxy's), today or legacy
    #[arg(long, value_enum, default_value_t = Rules::Match)]
    pinpool_rules: Rules,
    /// pinpool's `validate_idle_after`, scaled down like the NAT timeout (its 5 s default sits
    /// far below AWS NAT's 350 s)
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pinpool_validate_idle_after: Duration,
    /// The PostgreSQL behind the emulator [default: $DATABASE_URL, else
    /// postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Routing {
    /// Any idle environment
    Random,
    /// The most recently used idle environment
    Mru,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Before November 2023: any extended-protocol Parse pins
    #[value(name = "2023")]
    Legacy,
    /// Today's rules: the documented statements pin
    Today,
    /// Today's rules, behind a NAT that silently forgets idle flows
    Nat,
    /// A real PgBouncer in session mode instead of the emulator: the proxy's database
    /// connections as its pool size, the borrow timeout as its `query_wait_timeout`. A client
    /// holds a server connection for its whole session: every environment's connection is
    /// pinned
    #[value(name = "pgbouncer")]
    PgBouncer,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// One connection per environment, no pool: the incident's code
    Baseline,
    /// deadpool-postgres, max 7: a conventional pool
    PlainPool,
    /// pinpool in the invocation scope
    Pinpool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Rules {
    /// The proxy's own rules
    Match,
    /// Today's rules
    Today,
    /// The 2023 rules (any Parse pins)
    Legacy,
}

/// The name clap knows a value by, for the table and the JSON.
fn name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .expect("no skipped values")
        .get_name()
        .to_string()
}

impl Scenario {
    fn legacy(self) -> bool {
        self == Scenario::Legacy
    }
}

/// What an execution environment keeps between invocations.
enum Conn {
    /// The incident's code: one connection per environment, no pool.
    Baseline(Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>),
    /// A conventional pool (deadpool-postgres, max 7), unaware of pinning and deadlines.
    Plain(deadpool_postgres::Pool),
    /// pinpool as the README's quickstart sets it up, inside the invocation scope.
    Pin(pinpool::Pool),
}

struct Env {
    /// The `application_name` of every connection this environment opens: the emulator
    /// names the pinned sessions by it, so pins of frozen environments can be told apart.
    name: String,
    /// The emulator's round trips of this environment's sessions (none behind PgBouncer).
    trips: Option<RoundTrips>,
    pg: tokio_postgres::Config,
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

/// One invocation's answer time, and whether it was the environment's first (a cold start).
struct Latency {
    ms: f64,
    /// Billed: until the invocation's work ended (the handler, then the end-of-invocation
    /// work after the answer), or the Lambda timeout.
    billed_ms: f64,
    /// The round trips the environment's sessions made during the invocation (its
    /// end-of-invocation work included), when the emulator counts them.
    round_trips: Option<u64>,
    cold: bool,
    ok: bool,
}

/// What the variants connect to: the emulator, or a real PgBouncer.
enum Proxy {
    Emulator(Emulator),
    PgBouncer {
        bouncer: PgBouncer,
        /// Its admin console, for SHOW POOLS and SHOW CLIENTS.
        console: tokio_postgres::Client,
        peak_server: AtomicU64,
    },
}

/// What the proxy holds now: connections pinned (behind PgBouncer in session mode, every
/// server connection a client holds) and the `application_name` of each pinned client.
struct Held {
    pinned: u64,
    names: Vec<String>,
}

impl Proxy {
    fn url(&self) -> String {
        match self {
            Proxy::Emulator(e) => e.url("postgres", "postgres"),
            Proxy::PgBouncer { bouncer, .. } => bouncer.url(),
        }
    }

    fn track(&self, app: &str) -> Option<RoundTrips> {
        match self {
            Proxy::Emulator(e) => Some(e.track_round_trips(app)),
            Proxy::PgBouncer { .. } => None,
        }
    }

    async fn held(&self) -> Held {
        match self {
            Proxy::Emulator(e) => Held {
                pinned: e.counters().pinned_now,
                names: e.pinned_sessions(),
            },
            Proxy::PgBouncer {
                console,
                peak_server,
                ..
            } => {
                // A client with a server connection linked to it holds it (session mode).
                let rows = console
                    .simple_query("SHOW CLIENTS")
                    .await
                    .unwrap_or_default();
                let mut names = Vec::new();
                for m in rows {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        let linked = r
                            .try_get("link")
                            .ok()
                            .flatten()
                            .is_some_and(|l| !l.is_empty());
                        if linked {
                            let app = r.try_get("application_name").ok().flatten().unwrap_or("");
                            names.push(app.to_string());
                        }
                    }
                }
                let pinned = names.len() as u64;
                peak_server.fetch_max(pinned, Relaxed);
                Held { pinned, names }
            }
        }
    }
}

struct Run {
    scenario: Scenario,
    variant: Variant,
    url: String,
    proxy: Arc<Proxy>,
    opts: Options,
    idle: Mutex<Vec<Env>>,
    live_envs: AtomicUsize,
    next_env: AtomicU64,
    in_flight: AtomicUsize,
    invocations: AtomicU64,
    ok: AtomicU64,
    timeouts: AtomicU64,
    fast_failures: AtomicU64,
    latencies: Mutex<Vec<Latency>>,
    /// The fast failures' errors, by message.
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
    rng: Mutex<StdRng>,
}

const READ: &str = "SELECT count(*) FROM pinpool_soak WHERE k = $1";
const WRITE: &str = "INSERT INTO pinpool_soak (k) VALUES ($1)";
const PIN: &str = "SET application_name = 'soak-pinned'";

/// A pin counts as frozen once its environment has been idle this long: the emulator sees a
/// client's close within it.
const FREEZE_GRACE: Duration = Duration::from_millis(100);

impl Run {
    fn new_env(&self) -> Env {
        let name = format!("soak-env-{}", self.next_env.fetch_add(1, Relaxed));
        let mut pg: tokio_postgres::Config = self.url.parse().expect("emulator URL");
        pg.application_name(&name);
        let conn = match self.variant {
            Variant::Baseline => Conn::Baseline(None),
            Variant::PlainPool => {
                let manager = deadpool_postgres::Manager::new(pg.clone(), tokio_postgres::NoTls);
                Conn::Plain(
                    deadpool_postgres::Pool::builder(manager)
                        .max_size(7)
                        .build()
                        .expect("deadpool"),
                )
            }
            Variant::Pinpool => {
                let legacy = match self.opts.pinpool_rules {
                    Rules::Match => self.scenario.legacy(),
                    Rules::Legacy => true,
                    Rules::Today => false,
                };
                let rules = if legacy {
                    PinRules::legacy()
                } else {
                    PinRules::new()
                };
                let builder = pinpool::Pool::builder(pg.clone())
                    .pin_rules(rules)
                    .validate_idle_after(Some(self.opts.pinpool_validate_idle_after));
                let builder = if self.scenario == Scenario::PgBouncer {
                    // In session mode every connection holds a server connection until it
                    // closes: the profile closes them all at the end of each invocation, and
                    // opens none after it.
                    builder.proxy(pinpool::Proxy::PgBouncerSession)
                } else {
                    builder.min_idle(1)
                };
                Conn::Pin(builder.build().expect("pinpool"))
            }
        };
        Env {
            trips: self.proxy.track(&name),
            name,
            pg,
            conn,
            last_used: Instant::now(),
        }
    }

    /// Lambda's routing: an idle warm environment, else a new one (up to the limit). True
    /// with a new one: a cold start.
    fn route(&self) -> Option<(Env, bool)> {
        let mut idle = self.idle.lock().unwrap();
        let now = Instant::now();
        let before = idle.len();
        idle.retain(|e| now.duration_since(e.last_used) < self.opts.env_idle_lifetime);
        self.live_envs.fetch_sub(before - idle.len(), Relaxed);
        if !idle.is_empty() {
            let i = match self.opts.routing {
                Routing::Mru => idle.len() - 1,
                Routing::Random => self.rng.lock().unwrap().random_range(0..idle.len()),
            };
            return Some((idle.swap_remove(i), false));
        }
        drop(idle);
        if self.live_envs.load(Relaxed) >= self.opts.environments {
            return None;
        }
        self.live_envs.fetch_add(1, Relaxed);
        Some((self.new_env(), true))
    }

    async fn invoke(self: &Arc<Self>, k: i64, pin: bool) {
        self.invocations.fetch_add(1, Relaxed);
        let Some((mut env, cold)) = self.route() else {
            self.fast_failures.fetch_add(1, Relaxed); // throttled
            return;
        };
        self.in_flight.fetch_add(1, Relaxed);
        let start = Instant::now();
        let trips_before = env.trips.as_ref().map(RoundTrips::get);
        let deadline = SystemTime::now() + self.opts.lambda_timeout;
        let mut answered = None;
        let outcome = tokio::time::timeout(
            self.opts.lambda_timeout,
            workload(&mut env, deadline, k, pin, &mut answered),
        )
        .await;
        // The answer's time: work after it (pinpool's end of invocation) is billed, but the
        // caller does not wait for it.
        let ms = |at: Option<Instant>| {
            at.unwrap_or_else(Instant::now)
                .duration_since(start)
                .as_secs_f64()
                * 1000.0
        };
        let billed_ms = ms(None);
        let ok = matches!(outcome, Ok(Ok(())));
        let round_trips = env
            .trips
            .as_ref()
            .zip(trips_before)
            .map(|(t, before)| t.get() - before);
        self.latencies.lock().unwrap().push(Latency {
            ms: ms(answered),
            billed_ms,
            round_trips,
            cold,
            ok,
        });
        self.in_flight.fetch_sub(1, Relaxed);
        match outcome {
            Ok(result) => {
                if let Err(e) = &result {
                    *self.errors.lock().unwrap().entry(chain(&**e)).or_default() += 1;
                }
                if result.is_ok() {
                    self.ok.fetch_add(1, Relaxed);
                } else {
                    self.fast_failures.fetch_add(1, Relaxed);
                }
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

    /// Pinned sessions whose environment is not running an invocation: frozen pins.
    /// Behind PgBouncer, server connections held by such environments' clients.
    fn frozen_pins(&self, pinned: &[String]) -> u64 {
        let frozen: HashSet<String> = self
            .idle
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.last_used.elapsed() >= FREEZE_GRACE)
            .map(|e| e.name.clone())
            .collect();
        pinned.iter().filter(|n| frozen.contains(*n)).count() as u64
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and its sources, as one line ("db error" alone names no cause).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

/// The statements as the incident's code sent them (knex on node-postgres): each
/// parameterised statement one unnamed Parse/Bind/Execute/Sync, one round trip.
async fn knex_like(c: &tokio_postgres::Client, k: i64, pin: bool) -> Result<(), BoxError> {
    if pin {
        c.batch_execute(PIN).await?;
    }
    c.query_typed(READ, &[(&k, Type::INT8)]).await?;
    c.execute_typed(WRITE, &[(&k, Type::INT8)]).await?;
    Ok(())
}

async fn workload(
    env: &mut Env,
    deadline: SystemTime,
    k: i64,
    pin: bool,
    answered: &mut Option<Instant>,
) -> Result<(), BoxError> {
    match &mut env.conn {
        Conn::Baseline(slot) => {
            if slot.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                let (client, connection) = env.pg.connect(tokio_postgres::NoTls).await?;
                let task = tokio::spawn(async move {
                    let _ = connection.await;
                });
                *slot = Some((client, task));
            }
            let (c, _) = slot.as_ref().expect("connected");
            knex_like(c, k, pin).await?;
        }
        Conn::Plain(pool) => {
            let c = pool.get().await?;
            knex_like(&c, k, pin).await?;
        }
        Conn::Pin(pool) => {
            pool.invocation(deadline, async {
                let c = pool.get().await?;
                if pin {
                    c.batch_execute(PIN).await?;
                }
                c.query(READ, &[&k]).await?;
                c.execute(WRITE, &[&k]).await?;
                drop(c);
                *answered = Some(Instant::now());
                Ok::<(), pinpool::Error>(())
            })
            .await?;
        }
    }
    answered.get_or_insert_with(Instant::now);
    Ok(())
}

#[derive(Debug)]
struct Sample {
    t: f64,
    pinned: u64,
    frozen: u64,
    in_flight: usize,
    timeouts: u64,
}

struct Outcome {
    scenario: Scenario,
    variant: Variant,
    invocations: u64,
    ok: u64,
    timeouts: u64,
    fast_failures: u64,
    p50: f64,
    p99: f64,
    max: f64,
    warm_p50: f64,
    warm_p99: f64,
    cold_p99: f64,
    cold_starts: u64,
    peak_pinned: u64,
    frozen_pins_peak: u64,
    borrow_timeouts: u64,
    nat_drops: u64,
    /// The median round trips of a warm invocation that succeeded (none behind PgBouncer).
    warm_round_trips: Option<f64>,
    /// Their mean: the median hides a minority of invocations with more.
    warm_round_trips_mean: Option<f64>,
    /// Billed time of every invocation that ran (not throttled).
    billed_p50: f64,
    billed_mean: f64,
    samples: Vec<Sample>,
}

impl Outcome {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "scenario": name(self.scenario),
            "name": name(self.variant),
            "invocations": self.invocations,
            "ok": self.ok,
            "lambda_timeouts": self.timeouts,
            "fast_failures": self.fast_failures,
            "p50_ms": round1(self.p50),
            "p99_ms": round1(self.p99),
            "max_ms": round1(self.max),
            "warm_p50_ms": round1(self.warm_p50),
            "warm_p99_ms": round1(self.warm_p99),
            "cold_p99_ms": round1(self.cold_p99),
            "cold_starts": self.cold_starts,
            "peak_pinned": self.peak_pinned,
            "frozen_pins_peak": self.frozen_pins_peak,
            "borrow_timeouts": self.borrow_timeouts,
            "nat_drops": self.nat_drops,
            "warm_round_trips": self.warm_round_trips,
            "warm_round_trips_mean": self.warm_round_trips_mean.map(|m| (m * 100.0).round() / 100.0),
            "billed_p50_ms": round1(self.billed_p50),
            "billed_mean_ms": round1(self.billed_mean),
        })
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Sorted answer times of the invocations `keep` selects.
fn times(lat: &[Latency], keep: impl Fn(&Latency) -> bool) -> Vec<f64> {
    let mut v: Vec<f64> = lat.iter().filter(|l| keep(l)).map(|l| l.ms).collect();
    v.sort_by(f64::total_cmp);
    v
}

async fn run_one(
    opts: &Options,
    scenario: Scenario,
    variant: Variant,
) -> Result<Outcome, BoxError> {
    let rules = if scenario.legacy() {
        PinRules::legacy()
    } else {
        PinRules::new()
    };
    let nat = (scenario == Scenario::Nat).then_some(opts.nat_idle_timeout);
    let proxy = if scenario == Scenario::PgBouncer {
        let bin = PgBouncer::installed().ok_or("pgbouncer is not installed")?;
        let bouncer = PgBouncer::start_session_mode(
            &bin,
            &database_url(opts),
            opts.upstream_connections,
            opts.borrow_timeout,
        )?;
        let (console, conn) =
            tokio_postgres::connect(&bouncer.console_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Proxy::PgBouncer {
            bouncer,
            console,
            peak_server: AtomicU64::new(0),
        }
    } else {
        Proxy::Emulator(
            Emulator::start(
                EmulatorConfig::new(database_url(opts))
                    .max_connections(opts.upstream_connections)
                    .borrow_timeout(opts.borrow_timeout)
                    .idle_client_timeout(opts.idle_client_timeout)
                    .nat_idle_timeout(nat)
                    .rules(rules)
                    .application_name("pinpool-soak")
                    .client_latency(opts.client_latency)
                    .upstream_latency(opts.upstream_latency),
            )
            .await?,
        )
    };
    let proxy = Arc::new(proxy);
    let run = Arc::new(Run {
        scenario,
        variant,
        url: proxy.url(),
        proxy: proxy.clone(),
        opts: opts.clone(),
        idle: Mutex::new(Vec::new()),
        live_envs: AtomicUsize::new(0),
        next_env: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        invocations: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        fast_failures: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
        errors: Mutex::default(),
        rng: Mutex::new(StdRng::seed_from_u64(opts.seed)),
    });
    let started = Instant::now();
    let load = start_load(&run, scenario);
    let mut samples = Vec::new();
    let mut last_print = Instant::now();
    while load.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let held = proxy.held().await;
        let sample = Sample {
            t: started.elapsed().as_secs_f64(),
            pinned: held.pinned,
            frozen: run.frozen_pins(&held.names),
            in_flight: run.in_flight.load(Relaxed),
            timeouts: run.timeouts.load(Relaxed),
        };
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "  {:>5} {:<10} t={:>4.1}s invocations={} ok={} lambda_timeouts={} pinned={} frozen_pins={} in_flight={}",
                name(scenario),
                name(variant),
                sample.t,
                run.invocations.load(Relaxed),
                run.ok.load(Relaxed),
                sample.timeouts,
                sample.pinned,
                sample.frozen,
                sample.in_flight
            );
        }
        samples.push(sample);
    }
    let (peak_pinned, borrow_timeouts, nat_drops) = match &*proxy {
        Proxy::Emulator(e) => {
            let c = e.counters();
            (c.peak_pinned, c.borrow_timeouts, c.nat_drops)
        }
        Proxy::PgBouncer { peak_server, .. } => {
            // PgBouncer's answer to a query that waited past query_wait_timeout.
            let waited: u64 = run
                .errors
                .lock()
                .unwrap()
                .iter()
                .filter(|(e, _)| e.contains("query_wait_timeout"))
                .map(|(_, n)| *n)
                .sum();
            (peak_server.load(Relaxed), waited, 0)
        }
    };
    for (error, n) in run.errors.lock().unwrap().iter() {
        eprintln!(
            "  {:>5} {:<10} {n} failed with: {error}",
            name(scenario),
            name(variant)
        );
    }
    // Every environment ends with the run.
    run.idle.lock().unwrap().clear();
    let lat = std::mem::take(&mut *run.latencies.lock().unwrap());
    let all = times(&lat, |_| true);
    let warm = times(&lat, |l| l.ok && !l.cold);
    let cold = times(&lat, |l| l.ok && l.cold);
    let mut warm_trips: Vec<f64> = lat
        .iter()
        .filter(|l| l.ok && !l.cold)
        .filter_map(|l| l.round_trips)
        .map(|n| n as f64)
        .collect();
    warm_trips.sort_by(f64::total_cmp);
    let mut billed: Vec<f64> = lat.iter().map(|l| l.billed_ms).collect();
    billed.sort_by(f64::total_cmp);
    Ok(Outcome {
        scenario,
        variant,
        invocations: run.invocations.load(Relaxed),
        ok: run.ok.load(Relaxed),
        timeouts: run.timeouts.load(Relaxed),
        fast_failures: run.fast_failures.load(Relaxed),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        max: all.last().copied().unwrap_or(0.0),
        warm_p50: percentile(&warm, 0.5),
        warm_p99: percentile(&warm, 0.99),
        cold_p99: percentile(&cold, 0.99),
        cold_starts: lat.iter().filter(|l| l.cold).count() as u64,
        peak_pinned,
        frozen_pins_peak: samples.iter().map(|s| s.frozen).max().unwrap_or(0),
        borrow_timeouts,
        nat_drops,
        warm_round_trips: (!warm_trips.is_empty()).then(|| percentile(&warm_trips, 0.5)),
        warm_round_trips_mean: (!warm_trips.is_empty())
            .then(|| warm_trips.iter().sum::<f64>() / warm_trips.len() as f64),
        billed_p50: percentile(&billed, 0.5),
        billed_mean: billed.iter().sum::<f64>() / billed.len().max(1) as f64,
        samples,
    })
}

/// The load: virtual users (closed model) or a steady arrival rate (open model).
fn start_load(run: &Arc<Run>, scenario: Scenario) -> Vec<tokio::task::JoinHandle<()>> {
    let opts = &run.opts;
    let end = tokio::time::Instant::now() + opts.duration;
    let pin_share = if scenario.legacy() {
        0.0
    } else {
        opts.pin_share
    };
    let mut load = Vec::new();
    if let Some(rate) = opts.rate {
        let run = run.clone();
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            let mut n = 0i64;
            let mut tasks = Vec::new();
            while tokio::time::Instant::now() < end {
                tick.tick().await;
                n += 1;
                let pin = run.rng.lock().unwrap().random_bool(pin_share);
                let r = run.clone();
                tasks.push(tokio::spawn(async move { r.invoke(n % 1000, pin).await }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }));
    } else {
        // Virtual users that start together, wait for their answer, then think.
        for vu in 0..opts.vus {
            let run = run.clone();
            let (think, jitter) = (opts.think, opts.think_jitter);
            load.push(tokio::spawn(async move {
                let mut n = 0i64;
                while tokio::time::Instant::now() < end {
                    let pin = run.rng.lock().unwrap().random_bool(pin_share);
                    run.invoke((vu as i64) * 1000 + n % 1000, pin).await;
                    n += 1;
                    let factor = if jitter > 0.0 {
                        run.rng
                            .lock()
                            .unwrap()
                            .random_range(1.0 - jitter..1.0 + jitter)
                    } else {
                        1.0
                    };
                    tokio::time::sleep(think.mul_f64(factor)).await;
                }
            }));
        }
    }
    load
}

/// `--think-jitter`: a share from 0 up to, not including, 1.
fn jitter(s: &str) -> Result<f64, String> {
    let j: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..1.0).contains(&j) {
        Ok(j)
    } else {
        Err(format!("{j} is not from 0 up to 1"))
    }
}

fn database_url(opts: &Options) -> String {
    opts.database_url.clone().unwrap_or_else(|| {
        std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
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
        "<text x=\"8\" y=\"16\">pins held by frozen environments (red), all pins (orange), in-flight invocations (blue), Lambda timeouts so far (black); upstream limit {} dashed</text>",
        opts.upstream_connections
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
            .fold(opts.upstream_connections as f64, f64::max)
            * 1.1;
        let px = |t: f64| x0 + pad + (t / t_max) * (w - 2.0 * pad);
        let py = |v: f64| y0 + h - pad + 10.0 - (v / y_max) * (h - pad - 10.0);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\">{} proxy, {}: {} timeouts / {} invocations</text>",
            x0 + pad,
            y0 + 14.0,
            name(o.scenario),
            name(o.variant),
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
            y = py(opts.upstream_connections as f64)
        );
        for (color, f) in [
            (
                "#ff9f40",
                &(|s: &Sample| s.pinned as f64) as &dyn Fn(&Sample) -> f64,
            ),
            ("#d62728", &|s: &Sample| s.frozen as f64),
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
    let opts = Options::parse();
    if !(0.0..=1.0).contains(&opts.pin_share) {
        eprintln!("soak: --pin-share must be between 0 and 1");
        std::process::exit(2);
    }
    // The workload's table, directly on the database.
    let (admin, conn) =
        tokio_postgres::connect(&database_url(&opts), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS pinpool_soak (id bigserial PRIMARY KEY, k bigint NOT NULL, at timestamptz NOT NULL DEFAULT now()); TRUNCATE pinpool_soak")
        .await?;
    eprintln!(
        "soak: {} virtual users, think {}, Lambda timeout {}, proxy borrow timeout {}, {} upstream connections, NAT idle timeout {} (nat), {} per run",
        opts.vus,
        humantime::format_duration(opts.think),
        humantime::format_duration(opts.lambda_timeout),
        humantime::format_duration(opts.borrow_timeout),
        opts.upstream_connections,
        humantime::format_duration(opts.nat_idle_timeout),
        humantime::format_duration(opts.duration)
    );
    eprintln!(
        "soak: network {} one way to the proxy, {} from the proxy to the database (not behind pgbouncer)",
        humantime::format_duration(opts.client_latency),
        humantime::format_duration(opts.upstream_latency)
    );
    let mut outcomes = Vec::new();
    for &scenario in &opts.scenarios {
        if scenario == Scenario::PgBouncer && PgBouncer::installed().is_none() {
            eprintln!(
                "soak: the pgbouncer scenario is skipped: pgbouncer is not installed (apt-get install pgbouncer)"
            );
            continue;
        }
        for &variant in &opts.variants {
            outcomes.push(run_one(&opts, scenario, variant).await?);
        }
    }
    print_table(&outcomes);
    if let Some(path) = &opts.svg {
        std::fs::write(path, svg(&outcomes, &opts))?;
        eprintln!("soak: chart written to {}", path.display());
    }
    let rows: Vec<serde_json::Value> = outcomes.iter().map(Outcome::json).collect();
    println!("{}", serde_json::json!({ "variants": rows }));
    Ok(())
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<9} {:<11} {:>11} {:>6} {:>15} {:>13} {:>11} {:>12} {:>12} {:>12} {:>11} {:>11} {:>16} {:>8} {:>11} {:>12}",
        "proxy",
        "variant",
        "invocations",
        "ok",
        "lambda_timeouts",
        "fast_failures",
        "cold_starts",
        "warm_p50_ms",
        "warm_p99_ms",
        "cold_p99_ms",
        "peak_pinned",
        "frozen_pins",
        "borrow_timeouts",
        "warm_rt",
        "billed_p50",
        "billed_mean"
    );
    for o in outcomes {
        let rt = o
            .warm_round_trips
            .map_or_else(|| "-".to_string(), |v| format!("{v}"));
        println!(
            "{:<9} {:<11} {:>11} {:>6} {:>15} {:>13} {:>11} {:>12.1} {:>12.1} {:>12.1} {:>11} {:>11} {:>16} {:>8} {:>11.1} {:>12.1}",
            name(o.scenario),
            name(o.variant),
            o.invocations,
            o.ok,
            o.timeouts,
            o.fast_failures,
            o.cold_starts,
            o.warm_p50,
            o.warm_p99,
            o.cold_p99,
            o.peak_pinned,
            o.frozen_pins_peak,
            o.borrow_timeouts,
            rt,
            o.billed_p50,
            o.billed_mean
        );
    }
}
