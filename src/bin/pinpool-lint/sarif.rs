//! The SARIF 2.1.0 log: one result per rule a statement breaks, for code scanning.

use std::path::{Component, Path};

use pinpool::pinning::Reason;
use serde_json::{Value, json};

use crate::report::{Record, Rule};

/// What the tool says besides results: a file not read or parsed, a query call not checked.
pub struct Notification {
    pub file: String,
    pub at: Option<(usize, usize)>,
    pub message: String,
}

/// Where the lint is documented.
const INFORMATION_URI: &str = "https://docs.rs/pinpool/latest/pinpool/pinning/";

/// The rule in a few words.
fn describe(rule: Rule) -> &'static str {
    match rule {
        Rule::NamedStatement => "A protocol-level named statement on a transaction pooler",
        Rule::Pin(r) => match r {
            Reason::Set => "SET or RESET of a session setting",
            Reason::SetLocal => "SET LOCAL, SET TRANSACTION or SET CONSTRAINTS",
            Reason::SetConfig => "set_config(name, value, false)",
            Reason::SetConfigLocal => "set_config(name, value, true)",
            Reason::PreparedStatement => "SQL PREPARE, EXECUTE or DEALLOCATE",
            Reason::Discard => "DISCARD",
            Reason::TempObject => "A temporary table, sequence or view",
            Reason::Cursor => "DECLARE (a cursor)",
            Reason::Listen => "LISTEN",
            Reason::Load => "LOAD",
            Reason::SequenceFunction => "nextval() or setval()",
            Reason::AdvisoryLock => "A session-level advisory lock",
            Reason::Oversized => "Statement text over 16,384 bytes",
            Reason::Parse => "An extended-protocol Parse (RDS Proxy before November 2023)",
            Reason::Untracked => {
                "SQL whose effect cannot be known (EXECUTE of a string in a DO block)"
            }
            _ => "Session state",
        },
    }
}

/// The SARIF level of a rule: possible ones are warnings.
fn level(rule: Rule) -> &'static str {
    if rule.is_possible() {
        "warning"
    } else {
        "error"
    }
}

/// A path as a SARIF artifact URI: relative to the working directory where it can be, with
/// forward slashes, its other characters percent-encoded where a URI needs it.
pub fn uri(file: &str) -> String {
    let path = Path::new(file);
    let (scheme, relative) = if path.is_absolute() {
        match std::env::current_dir()
            .ok()
            .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        {
            Some(p) => ("", p),
            None => ("file://", path.to_path_buf()),
        }
    } else {
        ("", path.to_path_buf())
    };
    let parts: Vec<String> = relative
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| match c {
            Component::RootDir => String::new(),
            c => encode(&c.as_os_str().to_string_lossy()),
        })
        .collect();
    format!("{scheme}{}", parts.join("/"))
}

/// Percent-encodes what a URI's path segment cannot hold as it is.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn location(file: &str, at: Option<(usize, usize)>) -> Value {
    let mut physical = json!({ "artifactLocation": { "uri": uri(file) } });
    if let Some((line, column)) = at {
        physical["region"] = json!({ "startLine": line, "startColumn": column });
    }
    json!({ "physicalLocation": physical })
}

/// The log: the rules, a result per rule a statement breaks, and the notifications (files not
/// read: errors; calls not checked: notes).
pub fn log(
    records: &[Record],
    unchecked: &[Notification],
    errors: &[Notification],
    verb: &dyn Fn(bool) -> &'static str,
) -> Value {
    let rules = Rule::all();
    let rule_list: Vec<Value> = rules
        .iter()
        .map(|r| {
            json!({
                "id": r.id(),
                "shortDescription": { "text": describe(*r) },
                "help": { "text": r.advice() },
                "defaultConfiguration": { "level": level(*r) },
            })
        })
        .collect();
    let mut results = Vec::new();
    for rec in records {
        let possibly = rec.pins.iter().all(|r| r.is_possible());
        let allowed = rec.allowed.iter().map(|r| (r, true));
        for (rule, suppressed) in rec.pins.iter().map(|r| (r, false)).chain(allowed) {
            let index = rules.iter().position(|r| r == rule).unwrap_or(0);
            let head: String = rec.text.split_whitespace().collect::<Vec<_>>().join(" ");
            let head: String = head.chars().take(80).collect();
            let call = rec
                .call
                .as_deref()
                .map(|c| format!("{c}: "))
                .unwrap_or_default();
            let mut result = json!({
                "ruleId": rule.id(),
                "ruleIndex": index,
                "level": level(*rule),
                "message": {
                    "text": format!(
                        "{call}statement {} {} ({}): {head}. {}",
                        rec.statement,
                        verb(possibly),
                        rule.id(),
                        rule.advice()
                    )
                },
                "locations": [location(&rec.file, Some((rec.line, rec.column)))],
            });
            if suppressed {
                result["suppressions"] = json!([{
                    "kind": "inSource",
                    "justification": "a pinpool-lint: allow comment",
                }]);
            }
            results.push(result);
        }
    }
    let notifications: Vec<Value> = errors
        .iter()
        .map(|n| (n, "error"))
        .chain(unchecked.iter().map(|n| (n, "note")))
        .map(|(n, level)| {
            json!({
                "level": level,
                "message": { "text": n.message },
                "locations": [location(&n.file, n.at)],
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {
                "driver": {
                    "name": "pinpool-lint",
                    "version": env!("CARGO_PKG_VERSION"),
                    "informationUri": INFORMATION_URI,
                    "rules": rule_list,
                }
            },
            "columnKind": "unicodeCodePoints",
            "invocations": [{
                "executionSuccessful": errors.is_empty(),
                "toolExecutionNotifications": notifications,
            }],
            "results": results,
            "properties": { "uncheckedQueryCalls": unchecked.len() },
        }]
    })
}
