//! Runs the local RDS Proxy emulator in the foreground until Ctrl-C, logging pins and borrow
//! timeouts and a counters line every 10 seconds.
//!
//! ```sh
//! cargo run --release --all-features --example rds_proxy_emulator -- \
//!   --listen 127.0.0.1:6432 --upstream postgres://postgres@127.0.0.1:5432/postgres \
//!   --max-connections 40 --borrow-timeout 120s --idle-client-timeout 30m
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pinpool::emulator::{Emulator, EmulatorConfig};
use pinpool::pinning::PinRules;

/// Runs the local RDS Proxy emulator in the foreground until Ctrl-C, logging pins and borrow
/// timeouts and a counters line every 10 seconds.
///
/// Durations: 500ms, 10s, 30m, 2h, 1m 30s.
#[derive(Parser)]
#[command(name = "rds_proxy_emulator")]
struct Args {
    /// The address clients connect to
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6432")]
    listen: SocketAddr,
    /// The PostgreSQL server behind the proxy
    #[arg(
        long,
        value_name = "URL",
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    upstream: String,
    /// The most database connections the proxy opens
    #[arg(long, value_name = "N", default_value_t = 40)]
    max_connections: usize,
    /// How long a transaction waits for a database connection (ConnectionBorrowTimeout)
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = humantime::parse_duration)]
    borrow_timeout: Duration,
    /// Idle client connections are closed after this long (IdleClientTimeout)
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration)]
    idle_client_timeout: Duration,
    /// Pin on every Parse message, as proxies from before November 2023 did
    #[arg(long)]
    legacy_parse_pinning: bool,
    /// Count SET LOCAL, SET TRANSACTION, SET CONSTRAINTS and set_config(..., true) as not pinning
    #[arg(long)]
    set_local_safe: bool,
    /// Require clients to log in with this password (md5); without it, trust
    #[arg(long, value_name = "P")]
    password: Option<String>,
    /// Close the client connection after a borrow timeout, not only fail its transaction
    #[arg(long)]
    close_on_borrow_timeout: bool,
    /// Offer TLS to clients with this PEM certificate chain (with --tls-key); without it, no TLS
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS (with --tls-cert)
    #[arg(long, requires = "tls_cert")]
    tls_required: bool,
}

fn config(args: Args) -> Result<EmulatorConfig, String> {
    let mut config = EmulatorConfig::new(args.upstream)
        .listen(args.listen)
        .max_connections(args.max_connections)
        .borrow_timeout(args.borrow_timeout)
        .idle_client_timeout(args.idle_client_timeout)
        .close_on_borrow_timeout(args.close_on_borrow_timeout)
        .rules(
            PinRules::new()
                .legacy_parse(args.legacy_parse_pinning)
                .set_local_safe(args.set_local_safe),
        );
    if let Some(password) = args.password {
        config = config.password(password);
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        let read = |f: &PathBuf| std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()));
        config = config
            .tls_pem(&read(&cert)?, &read(&key)?, args.tls_required)
            .map_err(|e| e.to_string())?;
    }
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt().with_target(false).init();
    let config = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rds_proxy_emulator: {e}");
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
