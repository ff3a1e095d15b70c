//! `pinpool-lint`: reports the statements of SQL files that may pin an RDS Proxy session.
//!
//! ```text
//! pinpool-lint [--format text|json] [--set-local-safe] [--legacy-parse] FILE...
//! ```
//! Exit status: 1 when any statement pins under the rules in force, 0 when none does, 2 when
//! an argument or a file cannot be read.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use pinpool::pinning::{PinRules, lint};

/// Reports the statements of SQL files that may pin an RDS Proxy session.
///
/// Exit status: 1 when any statement pins under the rules in force, 0 when none does, 2 when
/// an argument or a file cannot be read.
#[derive(Parser)]
#[command(name = "pinpool-lint")]
struct Args {
    /// Output: text (pinning statements, with advice) or json (one object per statement)
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Count SET LOCAL, SET TRANSACTION, SET CONSTRAINTS and set_config(..., true) as not pinning
    #[arg(long)]
    set_local_safe: bool,
    /// The rules of proxies from before November 2023, which pinned on every Parse message
    #[arg(long)]
    legacy_parse: bool,
    /// The SQL files to check
    #[arg(required = true, value_name = "FILE")]
    files: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// A string as a JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rules = PinRules::new()
        .set_local_safe(args.set_local_safe)
        .legacy_parse(args.legacy_parse);
    let mut any_pins = false;
    let mut unreadable = false;
    for file in &args.files {
        let sql = match std::fs::read_to_string(file) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("pinpool-lint: cannot read {file}: {e}");
                unreadable = true;
                continue;
            }
        };
        for f in lint(&sql, &rules) {
            let found = f.classification.reasons.union(f.pins);
            let pins = !f.pins.is_empty();
            any_pins |= pins;
            match args.format {
                Format::Json => {
                    // The keys in this order, which a serde_json::Map would sort: the line is
                    // written here, its strings escaped by serde_json.
                    let reasons: Vec<&str> = found.iter().map(|r| r.as_str()).collect();
                    println!(
                        "{{\"file\":{},\"statement\":{},\"line\":{},\"pins\":{},\"possibly\":{},\"reasons\":{}}}",
                        json_string(file),
                        f.statement,
                        f.line,
                        pins,
                        found.only_possible(),
                        serde_json::to_string(&reasons).expect("strings serialize"),
                    );
                }
                Format::Text if !found.is_empty() => {
                    let head: String = f.text.split_whitespace().collect::<Vec<_>>().join(" ");
                    let head: String = head.chars().take(80).collect();
                    let verdict = match (pins, found.only_possible()) {
                        (true, false) => "pins",
                        (true, true) => "possibly pins",
                        (false, _) => "allowed by the rules in force",
                    };
                    println!(
                        "{file}:{}: statement {} {verdict} ({found}): {head}",
                        f.line, f.statement
                    );
                    for r in found.iter() {
                        println!("    {}: {}", r.as_str(), r.advice());
                    }
                }
                Format::Text => {}
            }
        }
    }
    if unreadable {
        ExitCode::from(2)
    } else if any_pins {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
