//! `pinpool-lint`: reports the statements of SQL files, and the SQL of query calls in Rust
//! sources, that may pin an RDS Proxy session or leak session state on a transaction pooler.
//!
//! ```text
//! pinpool-lint [--format text|json|sarif] [--proxy rds-proxy|rds-proxy-2023|pgbouncer-transaction]
//!              [--set-local-safe] [--list-unchecked] PATH...
//! ```
//! Exit status: 0 when no statement breaks the rules in force, 1 when one does, 2 when an
//! argument is wrong or a file cannot be read or parsed.

mod report;
mod rust;
mod sarif;
mod walk;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use pinpool::pinning::{PinRules, lint};

use report::{Profile, Record, Unchecked};

/// Reports the statements that may pin an RDS Proxy session (or leak session state on a
/// transaction pooler): in SQL files, and in the string literals that Rust sources pass as the
/// SQL of query calls (tokio-postgres, pinpool, sqlx functions and macros, diesel's
/// sql_query).
///
/// A directory is walked for `.rs` and `.sql` files (hidden directories and `target/`
/// skipped); a file named on the command line is read as Rust when it ends in `.rs`, as SQL
/// otherwise. Query calls whose SQL is not a literal are counted in a summary on standard
/// error (--list-unchecked lists them). A comment `pinpool-lint: allow(set, listen)` (or
/// `pinpool-lint: allow`, every rule) on a statement's line, or alone on the line above,
/// allows what it names there; allowed statements are counted too.
///
/// Exit status: 0 when no statement breaks the rules in force, 1 when one does (pins, or
/// breaks on the transaction pooler), 2 when an argument is wrong or a file cannot be read or
/// parsed (what could be read is still reported).
#[derive(Parser)]
#[command(name = "pinpool-lint")]
struct Args {
    /// Output: text (pinning statements, with advice), json (one object per statement) or
    /// sarif (SARIF 2.1.0, for code scanning)
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// The proxy whose rules apply
    #[arg(long, value_enum, default_value_t = Proxy::Rds)]
    proxy: Proxy,
    /// Count SET LOCAL, SET TRANSACTION, SET CONSTRAINTS and set_config(..., true) as not pinning
    #[arg(long)]
    set_local_safe: bool,
    /// The same as --proxy rds-proxy-2023
    #[arg(long, conflicts_with = "proxy")]
    legacy_parse: bool,
    /// Also list each query call whose SQL is not a literal (text: a line each; json: an
    /// object each, with an "unchecked" key)
    #[arg(long)]
    list_unchecked: bool,
    /// The SQL files, Rust files and directories to check
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
    Sarif,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proxy {
    /// Today's RDS Proxy
    #[value(name = "rds-proxy")]
    Rds,
    /// RDS Proxy before November 2023: any extended-protocol Parse pins
    #[value(name = "rds-proxy-2023")]
    Rds2023,
    /// A transaction pooler (PgBouncer's pool_mode = transaction): session state, and
    /// protocol-level named statements (PgBouncer before 1.21 cannot carry them)
    #[value(name = "pgbouncer-transaction")]
    PgbouncerTransaction,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let proxy = if args.legacy_parse {
        Proxy::Rds2023
    } else {
        args.proxy
    };
    let profile = match proxy {
        Proxy::Rds => Profile::RdsProxy(PinRules::new().set_local_safe(args.set_local_safe)),
        Proxy::Rds2023 => Profile::RdsProxy(PinRules::legacy().set_local_safe(args.set_local_safe)),
        Proxy::PgbouncerTransaction => Profile::PgbouncerTransaction,
    };
    let mut out = report::Output::new(match args.format {
        Format::Text => report::Style::Text,
        Format::Json => report::Style::Json,
        Format::Sarif => report::Style::Sarif,
    });
    out.list_unchecked = args.list_unchecked;
    out.profile = profile;

    let mut failed = false;
    for arg in &args.paths {
        let path = Path::new(arg);
        let files = match walk::files(path) {
            Ok(files) => files,
            Err(e) => {
                out.error(arg, None, &format!("cannot read {arg}: {e}"));
                failed = true;
                continue;
            }
        };
        for (file, walk_error) in files {
            let name = file.to_string_lossy().into_owned();
            if let Some(e) = walk_error {
                out.error(&name, None, &format!("cannot read {name}: {e}"));
                failed = true;
                continue;
            }
            let text = match std::fs::read_to_string(&file) {
                Ok(s) => s,
                Err(e) => {
                    out.error(&name, None, &format!("cannot read {name}: {e}"));
                    failed = true;
                    continue;
                }
            };
            if file.extension().is_some_and(|e| e == "rs") {
                failed |= !check_rust(&mut out, &name, &text);
            } else {
                check_sql(&mut out, &name, &text);
            }
        }
    }
    let any_pins = out.finish();
    if failed {
        ExitCode::from(2)
    } else if any_pins {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The 1-based column of byte `offset` in `text`, in characters.
fn column_of(text: &str, offset: usize) -> usize {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    text[line_start..offset].chars().count() + 1
}

/// Checks an SQL file: every statement, sent as the simple protocol (the legacy rules: as a
/// Parse, as applications send them).
fn check_sql(out: &mut report::Output, file: &str, sql: &str) {
    let lines: Vec<&str> = sql.lines().collect();
    for f in lint(sql, &PinRules::new()) {
        let offset = f.text.as_ptr() as usize - sql.as_ptr() as usize;
        let verdict = out
            .profile
            .rules(f.classification.reasons, report::Sent::SqlFile);
        let found = verdict.found.clone();
        let (pins, allowed) = verdict.allow(report::allow_comment(&lines, f.line).as_deref());
        out.record(Record {
            file: file.to_owned(),
            statement: f.statement,
            line: f.line,
            column: column_of(sql, offset),
            call: None,
            text: f.text.to_owned(),
            found,
            pins,
            allowed,
        });
    }
}

/// Checks a Rust file: the SQL of its query calls. False when it does not parse.
fn check_rust(out: &mut report::Output, file: &str, source: &str) -> bool {
    let sources = match rust::scan(source) {
        Ok(s) => s,
        Err(e) => {
            let (line, column) = {
                let start = e.span().start();
                (start.line, start.column + 1)
            };
            out.error(
                file,
                Some((line, column)),
                &format!("cannot parse {file}:{line}:{column}: {e}"),
            );
            return false;
        }
    };
    let lines: Vec<&str> = source.lines().collect();
    for site in &sources.sites {
        let allow = report::allow_comment(&lines, site.line);
        for f in lint(&site.sql, &PinRules::new()) {
            let verdict = out
                .profile
                .rules(f.classification.reasons, report::Sent::Rust(site.send));
            let found = verdict.found.clone();
            let (pins, allowed) = verdict.allow(allow.as_deref());
            out.record(Record {
                file: file.to_owned(),
                statement: f.statement,
                line: site.line,
                column: site.column,
                call: Some(site.call.clone()),
                text: f.text.to_owned(),
                found,
                pins,
                allowed,
            });
        }
    }
    for u in sources.unread {
        out.unchecked(Unchecked {
            file: file.to_owned(),
            line: u.line,
            column: u.column,
            call: u.call,
            what: u.what,
        });
    }
    true
}
