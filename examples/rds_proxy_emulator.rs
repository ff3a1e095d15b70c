//! Runs the local RDS Proxy emulator in the foreground until Ctrl-C, logging pins and borrow
//! timeouts and a counters line every 10 seconds.
//!
//! ```sh
//! cargo run --release --all-features --example rds_proxy_emulator -- \
//!   --listen 127.0.0.1:6432 --upstream postgres://postgres@127.0.0.1:5432/postgres \
//!   --max-connections 40 --borrow-timeout 120s --idle-client-timeout 30m
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use pinpool::emulator::{Emulator, EmulatorConfig};
use pinpool::pinning::PinRules;

const USAGE: &str =
    "usage: rds_proxy_emulator [--listen ADDR] [--upstream URL] [--max-connections N] \
[--borrow-timeout DURATION] [--idle-client-timeout DURATION] [--legacy-parse-pinning] \
[--set-local-safe] [--password P] [--close-on-borrow-timeout] [--tls-cert F --tls-key F [--tls-required]]
durations: 500ms, 10s, 30m, 2h";

/// Parses `500ms`, `10s`, `30m`, `2h` (a bare number is seconds).
fn duration(s: &str) -> Option<Duration> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn parse() -> Result<EmulatorConfig, String> {
    let mut args = std::env::args().skip(1);
    let mut upstream = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut listen: SocketAddr = "127.0.0.1:6432".parse().expect("address");
    let mut rest: Vec<(String, Option<String>)> = Vec::new();
    while let Some(a) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| {
            args.next().ok_or(format!("{a} needs a value"))
        };
        match a.as_str() {
            "--upstream" => upstream = value(&mut args)?,
            "--listen" => {
                listen = value(&mut args)?
                    .parse()
                    .map_err(|e| format!("--listen: {e}"))?
            }
            "--legacy-parse-pinning" | "--set-local-safe" | "--close-on-borrow-timeout" => {
                rest.push((a, None))
            }
            "--max-connections" | "--borrow-timeout" | "--idle-client-timeout" | "--password" => {
                let v = value(&mut args)?;
                rest.push((a, Some(v)));
            }
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let mut config = EmulatorConfig::new(upstream).listen(listen);
    let mut rules = PinRules::new();
    let file = |k: &str| {
        rest.iter()
            .find(|(a, _)| a == k)
            .and_then(|(_, v)| v.clone())
    };
    match (file("--tls-cert"), file("--tls-key")) {
        (Some(cert), Some(key)) => {
            let read = |f: &str| std::fs::read(f).map_err(|e| format!("{f}: {e}"));
            let required = rest.iter().any(|(a, _)| a == "--tls-required");
            config = config
                .tls_pem(&read(&cert)?, &read(&key)?, required)
                .map_err(|e| e.to_string())?;
        }
        (None, None) => {}
        _ => return Err("--tls-cert and --tls-key go together".into()),
    }
    for (k, v) in rest {
        let v = v.unwrap_or_default();
        config =
            match k.as_str() {
                "--max-connections" => config
                    .max_connections(v.parse().map_err(|e| format!("--max-connections: {e}"))?),
                "--borrow-timeout" => config
                    .borrow_timeout(duration(&v).ok_or("--borrow-timeout: use 500ms, 10s, 2m")?),
                "--idle-client-timeout" => config.idle_client_timeout(
                    duration(&v).ok_or("--idle-client-timeout: use 500ms, 10s, 30m")?,
                ),
                "--password" => config.password(v),
                "--close-on-borrow-timeout" => config.close_on_borrow_timeout(true),
                "--legacy-parse-pinning" => {
                    rules = rules.legacy_parse(true);
                    config
                }
                "--set-local-safe" => {
                    rules = rules.set_local_safe(true);
                    config
                }
                _ => config,
            };
    }
    Ok(config.rules(rules))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_target(false).init();
    let config = match parse() {
        Ok(c) => c,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("rds_proxy_emulator: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let emulator = match Emulator::start(config).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("rds_proxy_emulator: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "RDS Proxy emulator listening on {} (Ctrl-C to stop)",
        emulator.addr()
    );
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let c = emulator.counters();
                println!(
                    "clients={} upstream_open={} upstream_in_use={} pinned={} peak_pinned={} borrow_waits={} borrow_timeouts={} pins={:?}",
                    c.clients, c.upstream_open, c.upstream_in_use, c.pinned_now, c.peak_pinned,
                    c.borrow_waits, c.borrow_timeouts, c.pins
                );
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    ExitCode::SUCCESS
}
