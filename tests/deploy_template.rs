//! The SAM template (`deploy/template.yaml`) against the code: every pinpool metric its
//! dashboard and alarms name is one pinpool records, in the namespace and with the dimensions
//! and unit it reaches CloudWatch with; the deployment matches what the example handler reads
//! and what pinpool's defaults assume. Nothing here talks to AWS or to a database.
//!
//! What pinpool records is taken from the code, not restated:
//! - names: the `pinpool::metrics` constants, and every constant a `counter!`, `gauge!` or
//!   `histogram!` in `src/` records;
//! - label keys and kinds: those recording macros' arguments in `src/`;
//! - namespace and default dimensions: `examples/lambda_handler.rs`'s
//!   `metrics_cloudwatch_embedded::Builder`;
//! - units and dimension sets: an EMF document flushed by `metrics_cloudwatch_embedded` (the
//!   recorder the example installs) after `pinpool::metrics::describe()`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{Map, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Every constant of `pinpool::metrics`, by its identifier in `src/`.
const METRIC_CONSTANTS: &[(&str, &str)] = &[
    ("ACQUIRE_WAIT", pinpool::metrics::ACQUIRE_WAIT),
    ("TIMEOUTS", pinpool::metrics::TIMEOUTS),
    ("CONNECTIONS_OPENED", pinpool::metrics::CONNECTIONS_OPENED),
    ("CONNECT_ERRORS", pinpool::metrics::CONNECT_ERRORS),
    ("CONNECTIONS_CLOSED", pinpool::metrics::CONNECTIONS_CLOSED),
    ("CONNECTIONS_IN_USE", pinpool::metrics::CONNECTIONS_IN_USE),
    ("CONNECTIONS_IDLE", pinpool::metrics::CONNECTIONS_IDLE),
    ("PINNED", pinpool::metrics::PINNED),
    ("STATEMENTS_REFUSED", pinpool::metrics::STATEMENTS_REFUSED),
    ("STATEMENT_CACHE", pinpool::metrics::STATEMENT_CACHE),
    ("HELD_TOO_LONG", pinpool::metrics::HELD_TOO_LONG),
    ("RETRIES", pinpool::metrics::RETRIES),
];

/// The RDS Proxy metrics (namespace AWS/RDS, dimension ProxyName) in AWS's documentation.
const RDS_PROXY_METRICS: &[&str] = &[
    "AvailabilityPercentage",
    "ClientConnections",
    "ClientConnectionsClosed",
    "ClientConnectionsNoTLS",
    "ClientConnectionsReceived",
    "ClientConnectionsSetupFailedAuth",
    "ClientConnectionsSetupSucceeded",
    "ClientConnectionsTLS",
    "DatabaseConnectionRequests",
    "DatabaseConnectionRequestsWithTLS",
    "DatabaseConnections",
    "DatabaseConnectionsBorrowLatency",
    "DatabaseConnectionsCurrentlyBorrowed",
    "DatabaseConnectionsCurrentlyInTransaction",
    "DatabaseConnectionsCurrentlySessionPinned",
    "DatabaseConnectionsSetupFailed",
    "DatabaseConnectionsSetupSucceeded",
    "DatabaseConnectionsWithTLS",
    "MaxDatabaseConnectionsAllowed",
    "QueryDatabaseResponseLatency",
    "QueryRequests",
    "QueryRequestsTLS",
    "QueryResponseLatency",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// YAML to JSON, with CloudFormation's short-form tags in their long form (`!Sub x` becomes
// `{"Fn::Sub": x}`, `!Ref x` `{"Ref": x}`, `!GetAtt A.B` `{"Fn::GetAtt": ["A", "B"]}`).
// ---------------------------------------------------------------------------------------------

enum Frame {
    Seq(Vec<Value>, Option<Tag>),
    Map(Map<String, Value>, Option<Tag>, Option<String>),
}

#[derive(Default)]
struct ToJson {
    stack: Vec<Frame>,
    docs: Vec<Value>,
    error: Option<String>,
}

fn tagged(tag: Option<Tag>, value: Value) -> Value {
    let Some(tag) = tag else { return value };
    if tag.handle != "!" {
        return value; // a core-schema tag (!!str...): the value as it is
    }
    let key = match tag.suffix.as_str() {
        "Ref" | "Condition" => tag.suffix.clone(),
        other => format!("Fn::{other}"),
    };
    let value = match (tag.suffix.as_str(), value) {
        ("GetAtt", Value::String(s)) => match s.split_once('.') {
            Some((resource, attribute)) => Value::from(vec![resource, attribute]),
            None => Value::String(s),
        },
        (_, v) => v,
    };
    Value::Object(Map::from_iter([(key, value)]))
}

fn plain_scalar(v: &str) -> Value {
    match yaml_rust2::Yaml::from_str(v) {
        yaml_rust2::Yaml::Integer(i) => Value::from(i),
        yaml_rust2::Yaml::Real(r) => r.parse::<f64>().map(Value::from).unwrap_or(Value::from(r)),
        yaml_rust2::Yaml::Boolean(b) => Value::from(b),
        yaml_rust2::Yaml::Null => Value::Null,
        _ => Value::from(v),
    }
}

impl ToJson {
    fn insert(&mut self, value: Value) {
        match self.stack.last_mut() {
            None => self.docs.push(value),
            Some(Frame::Seq(items, _)) => items.push(value),
            Some(Frame::Map(map, _, key)) => match key.take() {
                Some(k) => {
                    map.insert(k, value);
                }
                None => self.error = Some(format!("a mapping key that is not a scalar: {value}")),
            },
        }
    }
}

impl MarkedEventReceiver for ToJson {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::SequenceStart(_, tag) => self.stack.push(Frame::Seq(Vec::new(), tag)),
            Event::MappingStart(_, tag) => self.stack.push(Frame::Map(Map::new(), tag, None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let value = match self.stack.pop() {
                    Some(Frame::Seq(items, tag)) => tagged(tag, Value::Array(items)),
                    Some(Frame::Map(map, tag, _)) => tagged(tag, Value::Object(map)),
                    None => return,
                };
                self.insert(value);
            }
            Event::Scalar(v, style, _, tag) => {
                if let Some(Frame::Map(_, _, key @ None)) = self.stack.last_mut() {
                    *key = Some(v);
                    return;
                }
                // Only an untagged plain scalar is resolved (number, boolean, null); quoted and
                // block scalars, and tagged ones, are strings.
                let value = match (&tag, style) {
                    (None, TScalarStyle::Plain) => plain_scalar(&v),
                    _ => Value::from(v),
                };
                self.insert(tagged(tag, value));
            }
            Event::Alias(_) => {
                self.error = Some(format!("line {}: aliases are not used here", mark.line()));
            }
            _ => {}
        }
    }
}

fn yaml_to_json(text: &str) -> Value {
    let mut receiver = ToJson::default();
    Parser::new_from_str(text)
        .load(&mut receiver, false)
        .unwrap_or_else(|e| panic!("the template is not valid YAML: {e}"));
    if let Some(e) = receiver.error {
        panic!("{e}");
    }
    assert_eq!(receiver.docs.len(), 1, "one YAML document");
    receiver.docs.pop().unwrap()
}

#[test]
fn yaml_reader_keeps_cloudformation_tags() {
    let v = yaml_to_json(
        "a: !Ref X\nb: !GetAtt Y.Arn\nc: !Sub |\n  {\"k\": \"${X}\"}\nd: [!If [C, 1, 2], 5xx, 0, true, '7']\n",
    );
    assert_eq!(
        v,
        serde_json::json!({
            "a": {"Ref": "X"},
            "b": {"Fn::GetAtt": ["Y", "Arn"]},
            "c": {"Fn::Sub": "{\"k\": \"${X}\"}\n"},
            "d": [{"Fn::If": ["C", 1, 2]}, "5xx", 0, true, "7"],
        })
    );
}

// ---------------------------------------------------------------------------------------------
// What pinpool records.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric as CloudWatch gets it from the example handler.
#[derive(Debug)]
struct Recorded {
    kind: Kind,
    /// The label keys, in the order the macro gives them.
    labels: Vec<String>,
    namespace: String,
    /// The EMF dimension set: the example's default dimensions and the labels.
    dimensions: BTreeSet<String>,
    /// The EMF unit; `None` when pinpool describes no unit (CloudWatch stores "None").
    unit: Option<String>,
}

/// Removes `//` comments (outside string literals) from Rust source.
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|line| {
            let mut in_str = false;
            let bytes = line.as_bytes();
            for i in 0..bytes.len() {
                match bytes[i] {
                    b'"' if i == 0 || bytes[i - 1] != b'\\' => in_str = !in_str,
                    b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
                    _ => {}
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits a macro's argument text at its top-level commas.
fn split_args(args: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut in_str) = (Vec::new(), String::new(), 0i32, false);
    for c in args.chars() {
        match c {
            '"' => in_str = !in_str,
            '(' | '[' | '{' if !in_str => depth += 1,
            ')' | ']' | '}' if !in_str => depth -= 1,
            ',' if !in_str && depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Every `counter!(NAME, "key" => value, ...)`, `gauge!(...)` and `histogram!(...)` in the
/// Rust files under `dir`: (constant identifier, kind, label keys, file).
fn recording_macros(dir: &Path, out: &mut Vec<(String, Kind, Vec<String>, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            recording_macros(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let src = strip_comments(&read(&path));
        for (word, kind) in [
            ("counter!(", Kind::Counter),
            ("gauge!(", Kind::Gauge),
            ("histogram!(", Kind::Histogram),
        ] {
            for (at, _) in src.match_indices(word) {
                let before = src[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue; // describe_counter!( and the like
                }
                let rest = &src[at + word.len()..];
                let (mut depth, mut end) = (1, 0);
                for (i, c) in rest.char_indices() {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                let args = split_args(&rest[..end]);
                let labels = args[1..]
                    .iter()
                    .map(|a| {
                        let key = a.split("=>").next().unwrap().trim();
                        assert!(
                            key.starts_with('"') && key.ends_with('"') && a.contains("=>"),
                            "{}: a label that is not `\"key\" => value`: {a}",
                            path.display()
                        );
                        key.trim_matches('"').to_string()
                    })
                    .collect();
                out.push((args[0].clone(), kind, labels, path.display().to_string()));
            }
        }
    }
}

/// The string literal after each `needle` in `src`.
fn literals_after(src: &str, needle: &str) -> Vec<String> {
    src.match_indices(needle)
        .map(|(at, _)| {
            let rest = src[at + needle.len()..].trim_start();
            let rest = rest.strip_prefix('"').expect("a string literal");
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect()
}

/// The environment variables a Rust source reads by literal name: `env::var("NAME")`, and
/// `env("NAME")`, the helper of `examples/support/rds_iam.rs`.
fn env_reads(src: &str) -> Vec<String> {
    ["env::var(\"", "env(\""]
        .into_iter()
        .flat_map(|needle| {
            src.match_indices(needle).map(move |(at, _)| {
                let rest = &src[at + needle.len()..];
                rest[..rest.find('"').unwrap()].to_string()
            })
        })
        .collect()
}

/// The variables Lambda sets in every function's environment (reserved: a template may not
/// set them) that the example reads: the function's name, region and role credentials.
const LAMBDA_ENV: &[&str] = &[
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// The example's EMF namespace and default dimensions, the environment variables it and the
/// modules it includes (`#[path = "..."]`) read, and its source.
struct Example {
    namespace: String,
    dimensions: Vec<String>,
    env_vars: Vec<String>,
    src: String,
}

fn example() -> Example {
    let src = strip_comments(&read(&root().join("examples/lambda_handler.rs")));
    let mut env_vars = env_reads(&src);
    for module in literals_after(&src, "#[path =") {
        env_vars.extend(env_reads(&strip_comments(&read(
            &root().join("examples").join(module),
        ))));
    }
    let namespaces = literals_after(&src, ".cloudwatch_namespace(");
    assert_eq!(namespaces.len(), 1, "the example sets one EMF namespace");
    assert!(
        src.contains("pinpool::metrics::describe()"),
        "the example calls pinpool::metrics::describe(): without it EMF carries no units"
    );
    Example {
        namespace: namespaces[0].clone(),
        dimensions: literals_after(&src, ".with_dimension("),
        env_vars,
        src,
    }
}

/// Flushes one EMF document per metric through the recorder the example installs, as the
/// example configures it, after `pinpool::metrics::describe()` (once: the recorder is global).
fn recorded() -> &'static BTreeMap<String, Recorded> {
    static RECORDED: OnceLock<BTreeMap<String, Recorded>> = OnceLock::new();
    RECORDED.get_or_init(flush_recorded)
}

fn flush_recorded() -> BTreeMap<String, Recorded> {
    let ex = example();
    let mut macros = Vec::new();
    recording_macros(&root().join("src"), &mut macros);
    let names: BTreeMap<&str, &str> = METRIC_CONSTANTS.iter().copied().collect();

    let mut by_name: BTreeMap<String, (Kind, Vec<String>)> = BTreeMap::new();
    for (ident, kind, labels, file) in &macros {
        let name = names.get(ident.as_str()).unwrap_or_else(|| {
            panic!("{file} records `{ident}`, which is not a pinpool::metrics constant this test knows: add it to METRIC_CONSTANTS")
        });
        let prev = by_name.insert(name.to_string(), (*kind, labels.clone()));
        if let Some((k, l)) = prev {
            assert_eq!(
                (k, &l),
                (*kind, labels),
                "{name} is recorded with different kinds or label keys"
            );
        }
    }
    let src_metrics = read(&root().join("src/metrics.rs"));
    let consts = src_metrics.matches("pub const ").count();
    assert_eq!(
        consts,
        METRIC_CONSTANTS.len(),
        "src/metrics.rs has {consts} constants, this test knows {}",
        METRIC_CONSTANTS.len()
    );
    for (ident, name) in METRIC_CONSTANTS {
        assert!(
            by_name.contains_key(*name),
            "nothing in src/ records {ident}"
        );
    }

    let mut builder =
        metrics_cloudwatch_embedded::Builder::new().cloudwatch_namespace(ex.namespace);
    for d in &ex.dimensions {
        builder = builder.with_dimension(d.clone(), "f");
    }
    let collector = builder.init().expect("the EMF recorder installs");
    pinpool::metrics::describe();
    for (name, (kind, labels)) in &by_name {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|k| metrics::Label::new(k.clone(), "x"))
            .collect();
        match kind {
            Kind::Counter => metrics::counter!(name.clone(), labels).increment(1),
            Kind::Gauge => metrics::gauge!(name.clone(), labels).set(1.0),
            Kind::Histogram => metrics::histogram!(name.clone(), labels).record(1.0),
        }
    }
    let mut out = Vec::new();
    collector.flush(&mut out).unwrap();

    let mut result = BTreeMap::new();
    for line in String::from_utf8(out).unwrap().lines() {
        let doc: Value = serde_json::from_str(line).unwrap();
        for directive in doc["_aws"]["CloudWatchMetrics"].as_array().unwrap() {
            let dims: Vec<BTreeSet<String>> = directive["Dimensions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|set| {
                    set.as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_str().unwrap().to_string())
                        .collect()
                })
                .collect();
            assert_eq!(dims.len(), 1, "one dimension set per document");
            for m in directive["Metrics"].as_array().unwrap() {
                let name = m["Name"].as_str().unwrap().to_string();
                let (kind, labels) = by_name[&name].clone();
                result.insert(
                    name,
                    Recorded {
                        kind,
                        labels,
                        namespace: directive["Namespace"].as_str().unwrap().to_string(),
                        dimensions: dims[0].clone(),
                        unit: m["Unit"].as_str().map(str::to_string),
                    },
                );
            }
        }
    }
    assert_eq!(result.len(), by_name.len(), "every metric was flushed");
    result
}

/// The values a label takes, from pinpool's public types.
fn label_values(metric: &str, label: &str) -> Option<Vec<String>> {
    use pinpool::metrics as m;
    let words = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    match (metric, label) {
        (m::TIMEOUTS, "phase") => words(&[
            pinpool::Phase::Acquire.as_str(),
            pinpool::Phase::Connect.as_str(),
            pinpool::Phase::Query.as_str(),
        ]),
        (m::TIMEOUTS, "cause") => words(&[
            pinpool::TimeoutCause::Configured.as_str(),
            pinpool::TimeoutCause::Deadline.as_str(),
        ]),
        (m::CONNECTIONS_CLOSED, "reason") => Some(
            pinpool::CloseReason::all()
                .iter()
                .map(|r| r.as_str().to_string())
                .collect(),
        ),
        (m::PINNED | m::STATEMENTS_REFUSED, "reason") => Some(
            pinpool::pinning::Reason::all()
                .iter()
                .map(|r| r.as_str().to_string())
                .collect(),
        ),
        (m::STATEMENT_CACHE, "result") => words(&["hit", "miss", "eviction"]),
        (m::HELD_TOO_LONG, "when") => words(&["returned", "invocation_end"]),
        _ => None,
    }
}

#[test]
fn recorded_metrics_are_read_from_the_code() {
    let r = recorded();
    let wait = &r[pinpool::metrics::ACQUIRE_WAIT];
    assert_eq!(wait.kind, Kind::Histogram);
    assert_eq!(wait.unit.as_deref(), Some("Milliseconds"));
    let timeouts = &r[pinpool::metrics::TIMEOUTS];
    assert_eq!(timeouts.labels, ["phase", "cause"]);
    assert_eq!(
        timeouts.dimensions,
        BTreeSet::from(["function".into(), "phase".into(), "cause".into()])
    );
    assert_eq!(timeouts.namespace, "pinpool");
    for (name, rec) in r {
        for label in &rec.labels {
            assert!(
                label_values(name, label).is_some(),
                "{name} has a label `{label}` whose values this test does not know"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The template.
// ---------------------------------------------------------------------------------------------

struct Template {
    doc: Value,
}

impl Template {
    fn load() -> Template {
        Template {
            doc: yaml_to_json(&read(&root().join("deploy/template.yaml"))),
        }
    }

    fn resources(&self) -> &Map<String, Value> {
        self.doc["Resources"].as_object().expect("Resources")
    }

    /// The logical ids of the resources of `kind`.
    fn of_type(&self, kind: &str) -> Vec<String> {
        self.resources()
            .iter()
            .filter(|(_, r)| r["Type"] == kind)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The one resource of `kind`: (logical id, properties).
    fn one(&self, kind: &str) -> (String, &Value) {
        let ids = self.of_type(kind);
        assert_eq!(ids.len(), 1, "one {kind} in the template");
        (ids[0].clone(), &self.resources()[&ids[0]]["Properties"])
    }
}

/// A metric named by the dashboard or an alarm.
#[derive(Debug, Clone)]
struct MetricRef {
    place: String,
    namespace: String,
    name: String,
    /// Dimension name and value: `${LogicalId}` for a reference to a resource, a literal, or
    /// `None` where a SEARCH matches any value.
    dimensions: Vec<(String, Option<String>)>,
    unit: Option<String>,
    stat: Option<String>,
    /// The dashboard widget's title.
    title: Option<String>,
}

/// A dimension value as text: `!Ref X` and `${X}` both become `${X}`.
fn dim_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) if o.contains_key("Ref") => format!("${{{}}}", o["Ref"].as_str().unwrap()),
        other => panic!("a dimension value that is neither text nor a Ref: {other}"),
    }
}

/// The identifiers an expression uses (lower-case words outside quotes; functions are upper
/// case in CloudWatch metric math).
fn expression_ids(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) => unquoted.push(c),
            _ => {}
        }
    }
    unquoted
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with(|c: char| c.is_ascii_lowercase()))
        .map(str::to_string)
        .collect()
}

/// The metrics a `SEARCH('{ns,dim,...} MetricName="x" dim="v"', 'Stat', period)` names.
fn search_refs(
    expr: &str,
    place: &str,
    title: Option<&str>,
    problems: &mut Vec<String>,
) -> Vec<MetricRef> {
    let mut refs = Vec::new();
    for (at, _) in expr.match_indices("SEARCH('") {
        let rest = &expr[at + "SEARCH('".len()..];
        let end = rest.find('\'').expect("a closed search string");
        let search = &rest[..end];
        let stat = rest[end + 1..].split('\'').nth(1).map(str::to_string);
        let (Some(open), Some(close)) = (search.find('{'), search.find('}')) else {
            problems.push(format!(
                "{place}: a SEARCH without a {{namespace,dimensions}} schema: {search}"
            ));
            continue;
        };
        let schema: Vec<String> = search[open + 1..close]
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .collect();
        let terms = &search[close + 1..];
        if terms.contains(" OR ") || terms.contains("NOT ") {
            problems.push(format!(
                "{place}: this test reads SEARCH terms joined by AND only: {search}"
            ));
        }
        let mut filters = BTreeMap::new();
        for part in terms.split('"').collect::<Vec<_>>().chunks(2) {
            if let [key, value] = part {
                let key = key
                    .trim()
                    .trim_start_matches("AND")
                    .trim()
                    .trim_end_matches('=')
                    .trim();
                filters.insert(key.to_string(), value.to_string());
            }
        }
        let Some(name) = filters.remove("MetricName") else {
            problems.push(format!(
                "{place}: a SEARCH without MetricName=\"...\": {search}"
            ));
            continue;
        };
        let dimensions = schema[1..]
            .iter()
            .map(|d| (d.clone(), filters.remove(d)))
            .collect();
        if !filters.is_empty() {
            problems.push(format!(
                "{place}: SEARCH filters on dimensions outside its schema: {filters:?}"
            ));
        }
        refs.push(MetricRef {
            place: place.to_string(),
            namespace: schema[0].clone(),
            name,
            dimensions,
            unit: None,
            stat,
            title: title.map(str::to_string),
        });
    }
    refs
}

/// The dashboard's body, parsed; every metric its widgets name.
fn dashboard(t: &Template, problems: &mut Vec<String>) -> (Value, Vec<MetricRef>) {
    let (id, props) = t.one("AWS::CloudWatch::Dashboard");
    let body = &props["DashboardBody"]["Fn::Sub"];
    let body = body
        .as_str()
        .or_else(|| body[0].as_str())
        .expect("DashboardBody: !Sub of a JSON string");
    let body: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{id}'s body is not JSON: {e}"));
    let mut refs = Vec::new();
    for (i, w) in body["widgets"]
        .as_array()
        .expect("widgets")
        .iter()
        .enumerate()
    {
        if w["type"] != "metric" {
            continue;
        }
        let p = &w["properties"];
        let title = p["title"].as_str();
        let place = format!("dashboard widget {i} ({})", title.unwrap_or("untitled"));
        let rows = p["metrics"].as_array().expect("metrics");
        let ids: BTreeSet<String> = rows
            .iter()
            .filter_map(|r| {
                r.as_array()?
                    .last()?
                    .get("id")?
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        for row in rows {
            let row = row.as_array().expect("a metrics row is an array");
            if let Some(expr) = row[0].get("expression").and_then(Value::as_str) {
                if expr.contains("SEARCH(") {
                    refs.extend(search_refs(expr, &place, title, problems));
                } else {
                    for used in expression_ids(expr).difference(&ids) {
                        problems.push(format!(
                            "{place}: `{expr}` uses `{used}`, no metric of the widget has that id"
                        ));
                    }
                }
                continue;
            }
            let (opts, strings) = match row.last() {
                Some(Value::Object(o)) => (Some(o), &row[..row.len() - 1]),
                _ => (None, &row[..]),
            };
            let strings: Vec<&str> = strings
                .iter()
                .map(|v| v.as_str().expect("a string"))
                .collect();
            if strings.iter().any(|s| *s == "." || *s == "..") || !strings.len().is_multiple_of(2) {
                problems.push(format!("{place}: write every metric out in full: {row:?}"));
                continue;
            }
            refs.push(MetricRef {
                place: place.clone(),
                namespace: strings[0].to_string(),
                name: strings[1].to_string(),
                dimensions: strings[2..]
                    .chunks(2)
                    .map(|kv| (kv[0].to_string(), Some(kv[1].to_string())))
                    .collect(),
                unit: None,
                stat: opts
                    .and_then(|o| o.get("stat"))
                    .or(p.get("stat"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                title: title.map(str::to_string),
            });
        }
    }
    (body, refs)
}

fn metric_ref(
    metric: &Value,
    unit: Option<&Value>,
    stat: Option<&Value>,
    place: String,
) -> MetricRef {
    MetricRef {
        place,
        namespace: metric["Namespace"].as_str().expect("Namespace").to_string(),
        name: metric["MetricName"]
            .as_str()
            .expect("MetricName")
            .to_string(),
        dimensions: metric["Dimensions"]
            .as_array()
            .map(|ds| {
                ds.iter()
                    .map(|d| {
                        (
                            d["Name"].as_str().unwrap().to_string(),
                            Some(dim_value(&d["Value"])),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        unit: unit.and_then(Value::as_str).map(str::to_string),
        stat: stat.and_then(Value::as_str).map(str::to_string),
        title: None,
    }
}

/// Every alarm's metrics: (alarm id, its properties, the metrics it names).
fn alarms(t: &Template, problems: &mut Vec<String>) -> Vec<(String, Value, Vec<MetricRef>)> {
    let mut out = Vec::new();
    for id in t.of_type("AWS::CloudWatch::Alarm") {
        let p = t.resources()[&id]["Properties"].clone();
        let place = format!("alarm {id}");
        let mut refs = Vec::new();
        if p.get("MetricName").is_some() {
            refs.push(metric_ref(
                &p,
                p.get("Unit"),
                p.get("Statistic"),
                place.clone(),
            ));
        }
        if let Some(metrics) = p.get("Metrics").and_then(Value::as_array) {
            let ids: BTreeSet<String> = metrics
                .iter()
                .map(|m| m["Id"].as_str().unwrap().to_string())
                .collect();
            for m in metrics {
                if let Some(stat) = m.get("MetricStat") {
                    refs.push(metric_ref(
                        &stat["Metric"],
                        stat.get("Unit"),
                        stat.get("Stat"),
                        place.clone(),
                    ));
                }
                if let Some(expr) = m.get("Expression").and_then(Value::as_str) {
                    for used in expression_ids(expr).difference(&ids) {
                        problems.push(format!(
                            "{place}: `{expr}` uses `{used}`, not an Id of the alarm"
                        ));
                    }
                    let stats: BTreeSet<String> = metrics
                        .iter()
                        .filter(|m| m.get("MetricStat").is_some())
                        .map(|m| m["Id"].as_str().unwrap().to_string())
                        .collect();
                    for unused in stats.difference(&expression_ids(expr)) {
                        problems.push(format!(
                            "{place}: metric `{unused}` is not in the expression"
                        ));
                    }
                }
            }
        }
        if refs.is_empty() {
            problems.push(format!("{place}: no metric"));
        }
        out.push((id, p, refs));
    }
    out
}

/// Checks a pinpool metric against what pinpool records.
fn check_pinpool_ref(
    r: &MetricRef,
    recorded: &BTreeMap<String, Recorded>,
    function: &str,
    problems: &mut Vec<String>,
) {
    let place = &r.place;
    let Some(rec) = recorded.get(&r.name) else {
        problems.push(format!(
            "{place}: `{}` is not a metric pinpool records (it records {:?})",
            r.name,
            recorded.keys().collect::<Vec<_>>()
        ));
        return;
    };
    if r.namespace != rec.namespace {
        problems.push(format!(
            "{place}: {} is in namespace `{}`, not `{}`",
            r.name, rec.namespace, r.namespace
        ));
    }
    let dims: BTreeSet<String> = r.dimensions.iter().map(|(k, _)| k.clone()).collect();
    if dims != rec.dimensions {
        problems.push(format!(
            "{place}: {} reaches CloudWatch with the dimensions {:?}, not {:?}: CloudWatch would find nothing",
            r.name, rec.dimensions, dims
        ));
    }
    for (k, v) in &r.dimensions {
        match (rec.labels.contains(k), v) {
            (_, None) => {}
            (false, Some(v)) if v != function => {
                problems.push(format!(
                    "{place}: {}'s `{k}` is `{v}`, not the function `{function}`",
                    r.name
                ));
            }
            (true, Some(v)) => {
                let values = label_values(&r.name, k).unwrap_or_default();
                if !values.contains(v) {
                    problems.push(format!(
                        "{place}: {} never has {k}=`{v}` (it takes {values:?})",
                        r.name
                    ));
                }
            }
            _ => {}
        }
    }
    if let Some(unit) = &r.unit {
        let want = rec.unit.as_deref().unwrap_or("None");
        if unit != want {
            problems.push(format!(
                "{place}: {} is recorded in `{want}`, not `{unit}`: the alarm would see no data",
                r.name
            ));
        }
    }
    if let Some(stat) = &r.stat {
        let percentile = stat.starts_with('p') && stat[1..].parse::<f64>().is_ok();
        if percentile && rec.kind != Kind::Histogram {
            problems.push(format!(
                "{place}: {stat} of {}, a {:?}: percentiles need a histogram",
                r.name, rec.kind
            ));
        }
        if rec.kind == Kind::Counter && stat != "Sum" && stat != "SampleCount" {
            problems.push(format!(
                "{place}: {} is a counter: use Sum (each EMF document carries a delta)",
                r.name
            ));
        }
    }
    if rec.unit.as_deref() == Some("Milliseconds")
        && r.title.as_ref().is_some_and(|t| !t.contains("(ms)"))
    {
        problems.push(format!(
            "{place}: {} is in milliseconds: say (ms) in the title",
            r.name
        ));
    }
}

/// The integer at `pointer` in `v`.
fn int(v: &Value, pointer: &str) -> i64 {
    v.pointer(pointer)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("an integer at {pointer}"))
}

/// pinpool's default idle_timeout, in seconds, from a pool built with the defaults.
fn default_idle_timeout_secs() -> f64 {
    let pool = pinpool::Pool::builder("postgres://app@localhost/app")
        .build()
        .unwrap();
    let debug = format!("{pool:?}");
    let at = debug
        .find("idle_timeout: Some(")
        .expect("the pool's Debug shows idle_timeout")
        + "idle_timeout: Some(".len();
    let d = &debug[at..at + debug[at..].find(')').unwrap()];
    match (d.strip_suffix("ms"), d.strip_suffix('s')) {
        (Some(ms), _) => ms.parse::<f64>().unwrap() / 1000.0,
        (None, Some(s)) => s.parse().unwrap(),
        _ => panic!("a Duration's Debug: {d}"),
    }
}

#[test]
fn template_matches_the_code() {
    let recorded = recorded();
    let ex = example();
    let t = Template::load();
    let mut problems = Vec::new();

    // The function, built from the example by cargo-lambda.
    let (fn_id, f) = t.one("AWS::Serverless::Function");
    let function = format!("${{{fn_id}}}");
    let res = &t.resources()[&fn_id];
    assert_eq!(res["Metadata"]["BuildMethod"], "rust-cargolambda");
    let binary = res["Metadata"]["BuildProperties"]["Binary"]
        .as_str()
        .expect("BuildProperties.Binary");
    assert_eq!(f["Runtime"], "provided.al2023");
    assert_eq!(f["Architectures"], serde_json::json!(["arm64"]));
    assert_eq!(f["Handler"], "bootstrap");
    let code_uri = f["CodeUri"].as_str().expect("CodeUri");
    let manifest = read(&root().join("deploy").join(code_uri).join("Cargo.toml"));
    for want in [
        format!("name = \"{binary}\""),
        "path = \"../../examples/lambda_handler.rs\"".to_string(),
        "\"lambda\", \"tls\"".to_string(),
    ] {
        assert!(manifest.contains(&want), "{code_uri}Cargo.toml has {want}");
    }
    let env = &f["Environment"]["Variables"];
    for var in &ex.env_vars {
        let reserved = LAMBDA_ENV.contains(&var.as_str());
        if reserved && env.get(var).is_some() {
            problems.push(format!(
                "the function's environment sets {var}, which Lambda reserves and sets itself"
            ));
        } else if !reserved && env.get(var).is_none() {
            problems.push(format!(
                "the example reads {var}; the function's environment does not set it"
            ));
        }
    }
    assert!(
        f.get("VpcConfig").is_some(),
        "the function runs in the proxy's VPC"
    );
    let policies = serde_json::to_string(&f["Policies"]).unwrap();
    assert!(
        policies.contains("\"rds-db:connect\""),
        "the function may connect with IAM tokens"
    );
    let timeout = int(f, "/Timeout");

    // The proxy and its target group.
    let (proxy_id, proxy) = t.one("AWS::RDS::DBProxy");
    assert_eq!(proxy["EngineFamily"], "POSTGRESQL");
    assert_eq!(proxy["RequireTLS"], true, "the proxy requires TLS");
    for auth in proxy["Auth"].as_array().expect("Auth") {
        assert_eq!(
            auth["IAMAuth"], "REQUIRED",
            "the proxy requires IAM authentication"
        );
    }
    // IAM authentication: the example signs a token per connection for the user and the proxy
    // endpoint of DATABASE_URL, which therefore holds no password and verifies TLS (the token
    // is sent in cleartext); the function may connect as that user.
    for want in [
        "\"DATABASE_IAM_AUTH\"",
        "Ok(\"true\")",
        ".password_provider(",
    ] {
        assert!(
            ex.src.contains(want),
            "examples/lambda_handler.rs has {want}"
        );
    }
    if env["DATABASE_IAM_AUTH"] != "true" {
        problems.push(format!(
            "the proxy requires IAM authentication: DATABASE_IAM_AUTH must be \"true\", is {}",
            env["DATABASE_IAM_AUTH"]
        ));
    }
    let url = env["DATABASE_URL"]["Fn::Sub"]
        .as_str()
        .expect("DATABASE_URL: !Sub \"postgres://...\"");
    let endpoint = format!("${{{proxy_id}.Endpoint}}");
    let want_prefix = format!("postgres://${{DatabaseUser}}@{endpoint}:");
    if !url.starts_with(&want_prefix) {
        problems.push(format!(
            "DATABASE_URL must be {want_prefix}... (the user the token is for, no password, the proxy): {url}"
        ));
    }
    let params = url.split_once('?').map_or("", |(_, p)| p);
    if !params.split('&').any(|p| p == "sslmode=verify-full") {
        problems.push(format!(
            "DATABASE_URL must verify TLS (sslmode=verify-full): {url}"
        ));
    }
    if !policies.contains("dbuser:${ProxyResourceId}/${DatabaseUser}") {
        problems.push(
            "the function's rds-db:connect must name the proxy and the URL's user".to_string(),
        );
    }

    let idle_client = proxy
        .get("IdleClientTimeout")
        .and_then(Value::as_i64)
        .unwrap_or(1800);
    let idle = default_idle_timeout_secs();
    assert!(
        (idle_client as f64) > idle,
        "IdleClientTimeout ({idle_client} s) must stay above pinpool's idle_timeout ({idle} s)"
    );
    let (_, target_group) = t.one("AWS::RDS::DBProxyTargetGroup");
    let borrow = int(
        target_group,
        "/ConnectionPoolConfigurationInfo/ConnectionBorrowTimeout",
    );
    let margin = pinpool::Pool::builder("postgres://app@localhost/app")
        .build()
        .unwrap()
        .deadline_margin();
    assert!(
        (borrow as f64) < timeout as f64 - margin.as_secs_f64(),
        "ConnectionBorrowTimeout ({borrow} s) must end before the function's timeout ({timeout} s) minus deadline_margin"
    );

    // The access log.
    let (api_id, api) = t.one("AWS::Serverless::HttpApi");
    let format = api["AccessLogSettings"]["Format"]
        .as_str()
        .expect("an access log format");
    let format: Map<String, Value> =
        serde_json::from_str(format).expect("the access log format is one JSON object");
    let variables: BTreeSet<&str> = format
        .values()
        .map(|v| v.as_str().expect("quoted values"))
        .collect();
    for want in [
        "$context.requestId",
        "$context.status",
        "$context.integrationStatus",
        "$context.integrationLatency",
        "$context.integration.error",
        "$context.integrationErrorMessage",
    ] {
        if !variables.contains(want) {
            problems.push(format!("the access log does not record {want}"));
        }
    }
    let access_log = api["AccessLogSettings"]["DestinationArn"]["Fn::GetAtt"][0]
        .as_str()
        .expect("!GetAtt LogGroup.Arn");
    assert_eq!(t.resources()[access_log]["Type"], "AWS::Logs::LogGroup");

    // The dashboard and the alarms.
    let (body, mut refs) = dashboard(&t, &mut problems);
    let alarms = alarms(&t, &mut problems);
    let resource_ref = |id: &str| format!("${{{id}}}");
    let mut alarm_pairs = BTreeSet::new();
    for (id, p, metrics) in &alarms {
        let emf = metrics.iter().any(|m| m.namespace == ex.namespace);
        if emf {
            let n = int(p, "/EvaluationPeriods");
            let m = p
                .get("DatapointsToAlarm")
                .and_then(Value::as_i64)
                .unwrap_or(n);
            if m >= n {
                problems.push(format!("alarm {id}: EMF documents can be late: alarm on M out of N datapoints with M < N (it has {m} of {n})"));
            }
            if p["TreatMissingData"] != "notBreaching" {
                problems.push(format!("alarm {id}: pinpool records nothing in a quiet minute: TreatMissingData notBreaching"));
            }
        }
        for m in metrics {
            if m.name == pinpool::metrics::TIMEOUTS {
                let dim = |k: &str| {
                    m.dimensions
                        .iter()
                        .find(|(d, _)| d == k)
                        .and_then(|(_, v)| v.clone())
                };
                alarm_pairs.insert((dim("phase"), dim("cause")));
            }
        }
    }
    refs.extend(alarms.iter().flat_map(|(_, _, m)| m).cloned());
    for r in &refs {
        let one_dim = |name: &str, value: &str, problems: &mut Vec<String>| {
            if r.dimensions != [(name.to_string(), Some(value.to_string()))] {
                problems.push(format!(
                    "{}: {} {} wants the one dimension {name}={value}, has {:?}",
                    r.place, r.namespace, r.name, r.dimensions
                ));
            }
        };
        match r.namespace.as_str() {
            ns if ns == ex.namespace => check_pinpool_ref(r, recorded, &function, &mut problems),
            _ if r.name.starts_with("pinpool_") => problems.push(format!(
                "{}: {} is in namespace `{}`, pinpool's is `{}`",
                r.place, r.name, r.namespace, ex.namespace
            )),
            "AWS/RDS" => {
                if !RDS_PROXY_METRICS.contains(&r.name.as_str()) {
                    problems.push(format!(
                        "{}: `{}` is not an RDS Proxy metric",
                        r.place, r.name
                    ));
                }
                one_dim("ProxyName", &resource_ref(&proxy_id), &mut problems);
            }
            "AWS/Lambda" => one_dim("FunctionName", &function, &mut problems),
            "AWS/ApiGateway" => one_dim("ApiId", &resource_ref(&api_id), &mut problems),
            other => problems.push(format!(
                "{}: a namespace this test does not check: {other}",
                r.place
            )),
        }
    }

    // What the issue asks to see side by side, and to be woken up for.
    let shown: BTreeSet<(&str, &str)> = refs
        .iter()
        .filter(|r| r.place.starts_with("dashboard"))
        .map(|r| (r.namespace.as_str(), r.name.as_str()))
        .collect();
    for (ns, name) in [
        ("AWS/RDS", "DatabaseConnectionsCurrentlySessionPinned"),
        ("AWS/RDS", "DatabaseConnections"),
        ("AWS/RDS", "MaxDatabaseConnectionsAllowed"),
        ("AWS/RDS", "DatabaseConnectionsBorrowLatency"),
        ("AWS/RDS", "ClientConnections"),
        ("AWS/Lambda", "Errors"),
        ("AWS/Lambda", "Duration"),
        ("AWS/Lambda", "Throttles"),
        ("AWS/ApiGateway", "5xx"),
        (ex.namespace.as_str(), pinpool::metrics::TIMEOUTS),
        (ex.namespace.as_str(), pinpool::metrics::ACQUIRE_WAIT),
        (ex.namespace.as_str(), pinpool::metrics::PINNED),
        (ex.namespace.as_str(), pinpool::metrics::CONNECTIONS_CLOSED),
    ] {
        if !shown.contains(&(ns, name)) {
            problems.push(format!("the dashboard does not show {ns} {name}"));
        }
    }
    let every_pair: BTreeSet<_> = label_values(pinpool::metrics::TIMEOUTS, "phase")
        .unwrap()
        .into_iter()
        .flat_map(|p| {
            label_values(pinpool::metrics::TIMEOUTS, "cause")
                .unwrap()
                .into_iter()
                .map(move |c| (Some(p.clone()), Some(c)))
        })
        .collect();
    if alarm_pairs != every_pair {
        problems.push(format!(
            "the pinpool_timeouts alarm must sum every phase and cause: it has {alarm_pairs:?}"
        ));
    }
    let alarmed = |ns: &str, name: &str| {
        alarms
            .iter()
            .any(|(_, _, ms)| ms.iter().any(|m| m.namespace == ns && m.name == name))
    };
    for (ns, name) in [
        ("AWS/RDS", "DatabaseConnectionsCurrentlySessionPinned"),
        ("AWS/ApiGateway", "5xx"),
    ] {
        if !alarmed(ns, name) {
            problems.push(format!("no alarm on {ns} {name}"));
        }
    }

    // The widgets that are not metrics: the alarms and the access log.
    let widgets = body["widgets"].as_array().unwrap();
    let listed: BTreeSet<String> = widgets
        .iter()
        .filter(|w| w["type"] == "alarm")
        .flat_map(|w| w["properties"]["alarms"].as_array().unwrap().clone())
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let every_alarm: BTreeSet<String> = alarms
        .iter()
        .map(|(id, _, _)| format!("${{{id}.Arn}}"))
        .collect();
    if listed != every_alarm {
        problems.push(format!(
            "the dashboard's alarm widget lists {listed:?}, the template has {every_alarm:?}"
        ));
    }
    let mut queries: Vec<String> = widgets
        .iter()
        .filter(|w| w["type"] == "log")
        .map(|w| w["properties"]["query"].as_str().unwrap().to_string())
        .collect();
    assert!(
        queries
            .iter()
            .all(|q| q.starts_with(&format!("SOURCE '{}' |", resource_ref(access_log)))),
        "the log widget reads the access log"
    );
    let readme = read(&root().join("README.md"));
    let section = readme
        .split("\n## Deploy and watch\n")
        .nth(1)
        .expect("the README has a section \"Deploy and watch\"");
    let section = section.split("\n## ").next().unwrap();
    let readme_queries: Vec<String> = section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|block| {
            block
                .trim_start_matches(|c: char| c.is_alphanumeric())
                .trim_start()
        })
        .filter(|block| block.starts_with("fields "))
        .map(str::to_string)
        .collect();
    assert!(
        !readme_queries.is_empty(),
        "the README shows the access-log query"
    );
    queries.extend(readme_queries);
    for q in &queries {
        for stage in q.split('|') {
            let stage = stage.trim();
            if let Some(fields) = stage.strip_prefix("fields ") {
                for field in fields
                    .split(',')
                    .map(str::trim)
                    .filter(|f| !f.starts_with('@'))
                {
                    if !format.contains_key(field) {
                        problems.push(format!(
                            "the query `{}` reads `{field}`, which the access log does not write",
                            q.trim()
                        ));
                    }
                }
            }
        }
    }

    // The Lambda duration widget marks the function's timeout.
    let marked = widgets.iter().any(|w| {
        w["properties"]["annotations"]["horizontal"]
            .as_array()
            .is_some_and(|a| a.iter().any(|h| h["value"] == timeout * 1000))
    });
    if !marked {
        problems.push(format!(
            "no widget marks the function's timeout ({timeout} s) at {} ms",
            timeout * 1000
        ));
    }

    // The outputs.
    let outputs = t.doc["Outputs"].as_object().expect("Outputs");
    assert!(outputs.contains_key("ApiUrl"), "an ApiUrl output");
    let (dashboard_id, _) = t.one("AWS::CloudWatch::Dashboard");
    assert_eq!(
        outputs["DashboardName"]["Value"],
        serde_json::json!({ "Ref": dashboard_id })
    );

    assert!(
        problems.is_empty(),
        "deploy/template.yaml:\n  {}",
        problems.join("\n  ")
    );
}
