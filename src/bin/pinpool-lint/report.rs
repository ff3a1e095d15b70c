//! The verdict on each statement under the chosen proxy, and its output as text, JSON or SARIF.

use pinpool::pinning::{PinRules, Protocol, Reason, Reasons};

use crate::rust::{Send, Unreadable};
use crate::sarif;

/// A rule a statement may break: a pinning reason, or a named protocol-level statement on a
/// transaction pooler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// A reason of `pinpool::pinning`.
    Pin(Reason),
    /// A protocol-level named statement, which PgBouncer before 1.21 cannot carry across
    /// transactions in transaction mode.
    NamedStatement,
}

impl Rule {
    /// The rule's id, in the JSON's `reasons` and SARIF's `ruleId`.
    pub fn id(self) -> &'static str {
        match self {
            Rule::Pin(r) => r.as_str(),
            Rule::NamedStatement => "named_statement",
        }
    }

    /// True when the rule is only possibly broken ([`Reason::is_possible`]).
    pub fn is_possible(self) -> bool {
        matches!(self, Rule::Pin(r) if r.is_possible())
    }

    /// What to do instead.
    pub fn advice(self) -> &'static str {
        match self {
            Rule::Pin(r) => r.advice(),
            Rule::NamedStatement => {
                "a named statement stays on the server connection it was prepared on, which a transaction pooler hands to other clients: PgBouncer before 1.21 fails it (\"prepared statement ... does not exist\"); use PgBouncer 1.21+ with max_prepared_statements, or query_typed (unnamed), or sqlx's .persistent(false)"
            }
        }
    }

    /// Every rule the lint can report, for SARIF's rule list.
    pub fn all() -> Vec<Rule> {
        Reason::all()
            .iter()
            // Observed on the wire only; and the lint's own rule for named statements.
            .filter(|r| !matches!(r, Reason::SessionChanged | Reason::NamedStatement))
            .map(|r| Rule::Pin(*r))
            .chain([Rule::NamedStatement])
            .collect()
    }
}

/// How a statement reached the lint.
#[derive(Debug, Clone, Copy)]
pub enum Sent {
    /// A statement of an SQL file: the simple protocol, or a Parse under the legacy rules.
    SqlFile,
    /// The SQL of a query call in a Rust source, sent as the call sends it.
    Rust(Send),
}

/// The proxy whose rules apply.
#[derive(Debug, Clone, Copy)]
pub enum Profile {
    /// RDS Proxy, today's or the legacy rules.
    RdsProxy(PinRules),
    /// A transaction pooler: session state, and named statements.
    PgbouncerTransaction,
}

/// A statement's rules: all found, and those that fire under the profile.
pub struct Verdict {
    pub found: Vec<Rule>,
    pub pins: Vec<Rule>,
}

/// The marker of a comment that allows a statement what it breaks: `pinpool-lint: allow`
/// (every rule) or `pinpool-lint: allow(set, listen)` (those rules).
const ALLOW: &str = "pinpool-lint: allow";

/// The rule ids a `pinpool-lint: allow` comment on 1-based `line` of a file's `lines`, or on
/// the line above when that line is a comment alone (not the end of another call's line),
/// allows: `Some` of an empty list for every rule.
pub fn allow_comment(lines: &[&str], line: usize) -> Option<Vec<String>> {
    let here = line.checked_sub(1).and_then(|i| lines.get(i));
    let above = line.checked_sub(2).and_then(|i| lines.get(i)).filter(|l| {
        ["//", "--", "/*"]
            .iter()
            .any(|c| l.trim_start().starts_with(c))
    });
    [here, above].into_iter().flatten().find_map(|l| {
        let rest = &l[l.find(ALLOW)? + ALLOW.len()..];
        let Some(list) = rest.strip_prefix('(') else {
            return Some(Vec::new());
        };
        let list = &list[..list.find(')').unwrap_or(list.len())];
        Some(
            list.split(',')
                .map(|id| id.trim().to_owned())
                .filter(|id| !id.is_empty())
                .collect(),
        )
    })
}

impl Verdict {
    /// Moves the rules that `allow` (from [`allow_comment`]) names from the pins to the
    /// allowed: (pins, allowed).
    pub fn allow(self, allow: Option<&[String]>) -> (Vec<Rule>, Vec<Rule>) {
        match allow {
            None => (self.pins, Vec::new()),
            Some(ids) => self
                .pins
                .into_iter()
                .partition(|r| !(ids.is_empty() || ids.iter().any(|id| id == r.id()))),
        }
    }
}

impl Profile {
    /// The rules a statement with these reasons, sent this way, breaks.
    pub fn rules(&self, reasons: Reasons, sent: Sent) -> Verdict {
        match self {
            Profile::RdsProxy(rules) => {
                let protocol = match sent {
                    Sent::SqlFile if rules.is_legacy_parse() => Protocol::Parse,
                    Sent::SqlFile | Sent::Rust(Send::Simple) => Protocol::Simple,
                    Sent::Rust(Send::Named | Send::Unnamed) => Protocol::Parse,
                };
                let c = pinpool::pinning::Classification {
                    reasons,
                    txn: pinpool::pinning::TxnControl::None,
                };
                let pins = rules.pinning_reasons(&c, protocol);
                Verdict {
                    found: reasons.union(pins).iter().map(Rule::Pin).collect(),
                    pins: pins.iter().map(Rule::Pin).collect(),
                }
            }
            Profile::PgbouncerTransaction => {
                // The pool's own rules for the profile (`PinRules::for_proxy`): what is scoped
                // to a transaction is safe, a nextval leaks nothing, and the pooler's limit is
                // not RDS Proxy's 16 KiB.
                let c = pinpool::pinning::Classification {
                    reasons,
                    txn: pinpool::pinning::TxnControl::None,
                };
                let pins = PinRules::for_proxy(pinpool::Proxy::PgBouncerTransaction)
                    .pinning_reasons(&c, Protocol::Simple);
                let mut found: Vec<Rule> = reasons.iter().map(Rule::Pin).collect();
                let mut pins: Vec<Rule> = pins.iter().map(Rule::Pin).collect();
                if matches!(sent, Sent::Rust(Send::Named)) {
                    found.push(Rule::NamedStatement);
                    pins.push(Rule::NamedStatement);
                }
                Verdict { found, pins }
            }
        }
    }

    /// What breaking a rule does under this profile, for the text output.
    fn verb(&self, possibly: bool) -> &'static str {
        match (self, possibly) {
            (Profile::RdsProxy(_), false) => "pins",
            (Profile::RdsProxy(_), true) => "possibly pins",
            (Profile::PgbouncerTransaction, false) => "breaks on a transaction pooler",
            (Profile::PgbouncerTransaction, true) => "possibly breaks on a transaction pooler",
        }
    }
}

/// One statement checked.
pub struct Record {
    pub file: String,
    pub statement: usize,
    pub line: usize,
    pub column: usize,
    /// The query call, for SQL read from a Rust source.
    pub call: Option<String>,
    pub text: String,
    pub found: Vec<Rule>,
    pub pins: Vec<Rule>,
    /// The rules it breaks that a `pinpool-lint: allow` comment allows.
    pub allowed: Vec<Rule>,
}

impl Record {
    fn possibly(&self) -> bool {
        !self.found.is_empty() && self.found.iter().all(|r| r.is_possible())
    }
}

/// A query call whose SQL was not read.
pub struct Unchecked {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub call: String,
    pub what: Unreadable,
}

impl Unchecked {
    fn describe(&self) -> &'static str {
        match self.what {
            Unreadable::RunTime => "its SQL is not a literal (built at run time or named)",
            Unreadable::File => "its SQL is in a file: check that file",
        }
    }
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Text,
    Json,
    Sarif,
}

/// Writes the records as they come (text, JSON) or at the end (SARIF).
pub struct Output {
    style: Style,
    pub profile: Profile,
    pub list_unchecked: bool,
    any_pins: bool,
    /// Statements with rules allowed by a comment.
    allowed: usize,
    records: Vec<Record>,
    unchecked: Vec<Unchecked>,
    errors: Vec<sarif::Notification>,
}

/// A string as a JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The first 80 characters of a statement, its blanks folded.
fn head(text: &str) -> String {
    let folded: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    folded.chars().take(80).collect()
}

impl Output {
    pub fn new(style: Style) -> Output {
        Output {
            style,
            profile: Profile::RdsProxy(PinRules::new()),
            list_unchecked: false,
            any_pins: false,
            allowed: 0,
            records: Vec::new(),
            unchecked: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// A file that cannot be read or parsed: said on standard error at once.
    pub fn error(&mut self, file: &str, at: Option<(usize, usize)>, message: &str) {
        eprintln!("pinpool-lint: {message}");
        self.errors.push(sarif::Notification {
            file: file.to_owned(),
            at,
            message: message.to_owned(),
        });
    }

    /// One statement checked.
    pub fn record(&mut self, r: Record) {
        let pins = !r.pins.is_empty();
        self.any_pins |= pins;
        self.allowed += usize::from(!r.allowed.is_empty());
        let ids = |rules: &[Rule]| rules.iter().map(|r| r.id()).collect::<Vec<_>>();
        match self.style {
            Style::Json => {
                // The keys in this order, which a serde_json::Map would sort: the line is
                // written here, its strings escaped by serde_json.
                let rust = match &r.call {
                    Some(call) => {
                        format!(",\"column\":{},\"call\":{}", r.column, json_string(call))
                    }
                    None => String::new(),
                };
                let allowed = if r.allowed.is_empty() {
                    String::new()
                } else {
                    format!(
                        ",\"allowed\":{}",
                        serde_json::to_string(&ids(&r.allowed)).expect("strings serialize")
                    )
                };
                println!(
                    "{{\"file\":{},\"statement\":{},\"line\":{}{rust},\"pins\":{},\"possibly\":{},\"reasons\":{}{allowed}}}",
                    json_string(&r.file),
                    r.statement,
                    r.line,
                    pins,
                    r.possibly(),
                    serde_json::to_string(&ids(&r.found)).expect("strings serialize"),
                );
            }
            Style::Text if !r.found.is_empty() => {
                let verdict = if pins {
                    self.profile.verb(r.possibly())
                } else if !r.allowed.is_empty() {
                    "allowed by a pinpool-lint: allow comment"
                } else {
                    "allowed by the rules in force"
                };
                let found = ids(&r.found).join(", ");
                let head = head(&r.text);
                match &r.call {
                    Some(call) => println!(
                        "{}:{}:{}: {call}: statement {} {verdict} ({found}): {head}",
                        r.file, r.line, r.column, r.statement
                    ),
                    None => println!(
                        "{}:{}: statement {} {verdict} ({found}): {head}",
                        r.file, r.line, r.statement
                    ),
                }
                for rule in &r.found {
                    println!("    {}: {}", rule.id(), rule.advice());
                }
            }
            Style::Text => {}
            Style::Sarif => self.records.push(r),
        }
    }

    /// A query call not read.
    pub fn unchecked(&mut self, u: Unchecked) {
        if self.list_unchecked {
            match self.style {
                Style::Text => println!(
                    "{}:{}:{}: {}: not checked: {}",
                    u.file,
                    u.line,
                    u.column,
                    u.call,
                    u.describe()
                ),
                Style::Json => println!(
                    "{{\"file\":{},\"line\":{},\"column\":{},\"call\":{},\"unchecked\":{}}}",
                    json_string(&u.file),
                    u.line,
                    u.column,
                    json_string(&u.call),
                    json_string(match u.what {
                        Unreadable::RunTime => "not_literal",
                        Unreadable::File => "sql_file",
                    }),
                ),
                Style::Sarif => {}
            }
        }
        self.unchecked.push(u);
    }

    /// The summary of what was not checked (standard error), the SARIF log (standard output);
    /// true when anything pins.
    pub fn finish(self) -> bool {
        let run_time = self
            .unchecked
            .iter()
            .filter(|u| u.what == Unreadable::RunTime)
            .count();
        let files = self.unchecked.len() - run_time;
        let hint = if self.list_unchecked {
            ""
        } else {
            " (--list-unchecked lists them)"
        };
        if run_time > 0 {
            let calls = if run_time == 1 { "call" } else { "calls" };
            let were = if run_time == 1 { "was" } else { "were" };
            eprintln!(
                "pinpool-lint: {run_time} query {calls} with SQL built at run time {were} not checked{hint}"
            );
        }
        if files > 0 {
            let calls = if files == 1 {
                "call reads"
            } else {
                "calls read"
            };
            eprintln!(
                "pinpool-lint: {files} query {calls} SQL from a file (include_str!, query_file!), not checked here: name those files{hint}"
            );
        }
        if self.allowed > 0 {
            let (statements, were) = if self.allowed == 1 {
                ("statement", "was")
            } else {
                ("statements", "were")
            };
            eprintln!(
                "pinpool-lint: {} {statements} breaking a rule {were} allowed by pinpool-lint: allow comments",
                self.allowed
            );
        }
        if self.style == Style::Sarif {
            let unchecked: Vec<sarif::Notification> = self
                .unchecked
                .iter()
                .map(|u| sarif::Notification {
                    file: u.file.clone(),
                    at: Some((u.line, u.column)),
                    message: format!("{}: not checked: {}", u.call, u.describe()),
                })
                .collect();
            let log = sarif::log(&self.records, &unchecked, &self.errors, &|p: bool| {
                self.profile.verb(p)
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&log).expect("a JSON value serializes")
            );
        }
        self.any_pins
    }
}
