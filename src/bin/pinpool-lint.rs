//! `pinpool-lint`: reports the statements of SQL files that may pin an RDS Proxy session.
//!
//! ```text
//! pinpool-lint [--format text|json] [--set-local-safe] [--legacy-parse] FILE...
//! ```
//! Exit status: 1 when any statement pins under the rules in force, 0 when none does, 2 when
//! an argument or a file cannot be read.

use std::fmt::Write as _;
use std::process::ExitCode;

use pinpool::pinning::{PinRules, lint};

const USAGE: &str =
    "usage: pinpool-lint [--format text|json] [--set-local-safe] [--legacy-parse] FILE...";

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn main() -> ExitCode {
    let mut json = false;
    let mut rules = PinRules::new();
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--format" => match args.next().as_deref() {
                Some("json") => json = true,
                Some("text") => json = false,
                _ => {
                    eprintln!("pinpool-lint: --format takes text or json\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--format=json" => json = true,
            "--format=text" => json = false,
            "--set-local-safe" => rules = rules.set_local_safe(true),
            "--legacy-parse" => rules = rules.legacy_parse(true),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            s if s.starts_with("--") => {
                eprintln!("pinpool-lint: unknown option {s}\n{USAGE}");
                return ExitCode::from(2);
            }
            _ => files.push(arg),
        }
    }
    if files.is_empty() {
        eprintln!("pinpool-lint: no file given\n{USAGE}");
        return ExitCode::from(2);
    }
    let mut any_pins = false;
    let mut unreadable = false;
    for file in &files {
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
            if json {
                let reasons: Vec<String> = found.iter().map(|r| json_string(r.as_str())).collect();
                println!(
                    "{{\"file\":{},\"statement\":{},\"line\":{},\"pins\":{},\"possibly\":{},\"reasons\":[{}]}}",
                    json_string(file),
                    f.statement,
                    f.line,
                    pins,
                    found.only_possible(),
                    reasons.join(",")
                );
            } else if !found.is_empty() {
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
