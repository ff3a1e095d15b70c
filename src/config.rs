//! Configuration: a `#[must_use]` builder whose `build()` validates every option.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::{Host, LoadBalanceHosts, SslMode};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{NoTls, Socket};

use crate::connect::{Connect, Connector, PasswordProvider, SharedPasswordProvider};
use crate::error::Error;
use crate::pinning::{Classification, PinRules, Protocol, Reasons, classify};
use crate::pool::Pool;

/// RDS Proxy closes client connections after 24 hours; `max_lifetime` must stay below.
pub const PROXY_MAX_CLIENT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What sits between the pool and PostgreSQL: a profile that decides what may pin or leak
/// ([`PinRules::for_proxy`]), what the pool does about it, and how statements are sent. Set
/// with [`Builder::proxy`]; an option set explicitly on the builder overrides the profile's
/// choice, whatever the order of the calls.
///
/// | profile | what pins or leaks | what the pool does | statements |
/// |---|---|---|---|
/// | `RdsProxy` (default) | today's documented rules | closes a possibly pinned connection on return | cached named statements; a statement new to a connection in one round trip |
/// | `RdsProxy2023` | any extended-protocol Parse too | as `RdsProxy` | as `RdsProxy` |
/// | `PgBouncerSession` | every connection holds a server connection for its session; state changes dirty it | as `RdsProxy`, and closes every idle connection when an invocation ends (`min_idle` 0, `trim_at_invocation_end`) | as `RdsProxy` |
/// | `PgBouncerTransaction` | state that outlives a transaction leaks into the next client's server connection (`SET LOCAL` does not) | refuses such a statement before sending it ([`Error::PinRefused`](crate::Error::PinRefused)), as `PinPolicy::Refuse` | unnamed statements only, in one round trip; no statement cache; `prepare` and `COPY` outside a transaction refused (`named_statement`) |
/// | `Direct` | state changes dirty the connection for the next caller | closes a dirty connection on return | as `RdsProxy` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum Proxy {
    /// Amazon RDS Proxy, today's rules (multiplexing of the extended protocol, November 2023).
    #[default]
    RdsProxy,
    /// Amazon RDS Proxy before November 2023: every extended-protocol Parse pins.
    #[cfg_attr(feature = "serde", serde(rename = "rds_proxy_2023"))]
    RdsProxy2023,
    /// PgBouncer (or a pooler built like it) in session mode: a client holds one server
    /// connection for its whole session, and `query_wait_timeout` plays the part of RDS Proxy's
    /// borrow timeout.
    #[cfg_attr(feature = "serde", serde(rename = "pgbouncer_session"))]
    PgBouncerSession,
    /// PgBouncer (or a pooler built like it, before PgBouncer 1.21's
    /// `max_prepared_statements`) in transaction mode: each transaction may run on another
    /// server connection, so named statements do not carry over and session state leaks.
    #[cfg_attr(feature = "serde", serde(rename = "pgbouncer_transaction"))]
    PgBouncerTransaction,
    /// PostgreSQL itself, no proxy.
    Direct,
}

/// What the pool does with a connection that may be pinned to a database connection by RDS
/// Proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum PinPolicy {
    /// Close it when it is returned to the pool, so it never sits pinned while the Lambda
    /// environment is frozen (the default).
    #[default]
    CloseOnReturn,
    /// Keep it (observe and report only).
    Keep,
    /// Keep it for the rest of its invocation ([`Pool::invocation`]): later `get()`s of the
    /// same invocation get it back, and it is closed when the invocation ends. Outside an
    /// invocation, as `CloseOnReturn`.
    KeepForInvocation,
    /// Refuse a statement that may pin with [`Error::PinRefused`] before sending it (strict
    /// mode, for tests and development).
    Refuse,
}

/// What the pool does, when an invocation begins, with an idle connection that sat unused
/// longer than `validate_idle_after` (a frozen Lambda environment may have lost it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum FreezeCheck {
    /// Check it with a round trip (a protocol Sync) bounded by `validate_timeout` and the
    /// deadline; close it if the check fails (the default).
    #[default]
    Validate,
    /// Close it without checking; the invocation opens a fresh one.
    Replace,
}

/// Where to connect: a connection string (URL or key-value) or a `tokio_postgres::Config`.
pub struct ConnectionConfig {
    parsed: Result<tokio_postgres::Config, Error>,
    verify: Option<&'static str>,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    root_cert: Option<RootCertFile>,
}

/// The `sslrootcert` file a connection string names.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
struct RootCertFile {
    path: String,
    /// False when the path lies in what may be the URL's user-info: errors do not quote it.
    quotable: bool,
}

#[cfg_attr(not(feature = "serde"), allow(dead_code))]
impl ConnectionConfig {
    /// A connection that `build()` refuses with `error`.
    pub(crate) fn failed(error: Error) -> ConnectionConfig {
        ConnectionConfig {
            parsed: Err(error),
            verify: None,
            root_cert: None,
        }
    }

    /// Changes the parsed configuration, if it parsed.
    pub(crate) fn map(mut self, f: impl FnOnce(&mut tokio_postgres::Config)) -> Self {
        if let Ok(pg) = &mut self.parsed {
            f(pg);
        }
        self
    }
}

impl From<tokio_postgres::Config> for ConnectionConfig {
    fn from(config: tokio_postgres::Config) -> Self {
        ConnectionConfig {
            parsed: Ok(config),
            verify: None,
            root_cert: None,
        }
    }
}

impl From<&str> for ConnectionConfig {
    fn from(s: &str) -> Self {
        let Rewritten {
            text,
            verify,
            root_cert,
        } = accept_verify_modes(s);
        let parsed = text.parse::<tokio_postgres::Config>().map_err(|_| {
            Error::config(
                "url",
                format!("cannot parse the connection string: {}", explain(s)),
            )
        });
        ConnectionConfig {
            parsed,
            verify,
            root_cert,
        }
    }
}

impl From<String> for ConnectionConfig {
    fn from(s: String) -> Self {
        ConnectionConfig::from(s.as_str())
    }
}

impl From<&String> for ConnectionConfig {
    fn from(s: &String) -> Self {
        ConnectionConfig::from(s.as_str())
    }
}

/// Where the parts of a URL connection string begin, as tokio-postgres reads it: the user-info
/// ends at the first `@`, the hosts at the next `/` or `?`, the path at the next `?`.
struct UrlParts {
    /// Offset of the user-info (after `://`).
    user_info: usize,
    /// Offset of the hosts (after the user-info's `@`).
    hosts: usize,
    /// Offset of the `/` or `?` (or the end) after the hosts.
    hosts_end: usize,
    /// Offset after the `?` that starts the parameters.
    params: Option<usize>,
    /// Errors quote no text before this offset. A password written without percent-encoding
    /// may hold `@`, `/`, `?`, `#` and `:`, which move tokio-postgres's splits into it; so the
    /// user-info is taken to end at the *last* `@` of the string, whatever follows it.
    quotable: usize,
}

fn url_parts(s: &str) -> Option<UrlParts> {
    let user_info = ["postgres://", "postgresql://"]
        .into_iter()
        .find_map(|p| s.starts_with(p).then_some(p.len()))?;
    let hosts = s[user_info..]
        .find('@')
        .map_or(user_info, |i| user_info + i + 1);
    let hosts_end = s[hosts..].find(['/', '?']).map_or(s.len(), |i| hosts + i);
    let params = s[hosts_end..].find('?').map(|i| hosts_end + i + 1);
    let quotable = s[user_info..]
        .rfind('@')
        .map_or(user_info, |i| user_info + i + 1);
    Some(UrlParts {
        user_info,
        hosts,
        hosts_end,
        params,
        quotable,
    })
}

/// What `explain` says when the fault lies where the password may be.
const HIDDEN_FAULT: &str = "the fault lies before the last `@`, not shown as it may hold the \
    password; percent-encode any `@`, `:`, `/`, `?` or `#` in the user name or password";

/// `s` percent-decoded as tokio-postgres decodes the parts of a URL; `None` when that is not
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let digit = |i: usize| b.get(i).and_then(|&c| char::from(c).to_digit(16));
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], digit(i + 1), digit(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// tokio-postgres answers only "invalid connection string" for a bad URL; find the part at
/// fault, so the message names it. Nothing from the user-info is quoted (see [`UrlParts`]):
/// a fault found there gets a message of its own that shows none of it.
fn explain(s: &str) -> String {
    let Some(url) = url_parts(s) else {
        // Key-value form: tokio-postgres does not say which pair, and the pair may hold the
        // password.
        return "invalid key-value connection string (`key=value` pairs, values with spaces \
                in single quotes)"
            .to_string();
    };
    // In the order tokio-postgres parses: user-info, hosts, database, parameters.
    if url.hosts > url.user_info {
        let user_info = &s[url.user_info..url.hosts - 1];
        let user = user_info.split_once(':').map_or(user_info, |(u, _)| u);
        if percent_decode(user).is_none() {
            return "the user name is not valid utf-8 once percent-decoded".to_string();
        }
    }
    if let Some(fault) = host_fault(s, &url) {
        return fault;
    }
    let path_end = url.params.map_or(s.len(), |p| p - 1);
    if url.hosts_end < path_end && percent_decode(&s[url.hosts_end..path_end]).is_none() {
        return url.fault(
            url.hosts_end,
            "the database name is not valid utf-8 once percent-decoded".to_string(),
        );
    }
    param_fault(s, &url).unwrap_or_else(|| "invalid connection string".to_string())
}

impl UrlParts {
    /// `message` for a fault found at offset `at`, or a message that quotes nothing when `at`
    /// may lie in the user-info.
    fn fault(&self, at: usize, message: String) -> String {
        if at >= self.quotable {
            message
        } else {
            HIDDEN_FAULT.to_string()
        }
    }
}

/// The first host or port of the URL that does not parse.
fn host_fault(s: &str, url: &UrlParts) -> Option<String> {
    let mut at = url.hosts;
    for chunk in s[url.hosts..url.hosts_end].split(',') {
        let (host, port) = match chunk.strip_prefix('[') {
            Some(inner) => match inner.split_once(']') {
                None => {
                    return Some(url.fault(
                        at,
                        format!("`host`: {chunk:?} lacks the closing `]` of its address"),
                    ));
                }
                Some((host, "")) => (host, None),
                Some((host, after)) => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => {
                        return Some(
                            url.fault(at, format!("`host`: {chunk:?} has text after its `]`")),
                        );
                    }
                },
            },
            None => match chunk.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (chunk, None),
            },
        };
        if percent_decode(host).is_none() {
            return Some(url.fault(
                at,
                format!("`host`: {host:?} is not valid utf-8 once percent-decoded"),
            ));
        }
        if let Some(port) = port
            && !port.is_empty()
            && port.parse::<u16>().is_err()
        {
            return Some(url.fault(at, format!("`port`: {port:?} is not a port number")));
        }
        at += chunk.len() + 1;
    }
    None
}

/// The first parameter of the URL that tokio-postgres refuses.
fn param_fault(s: &str, url: &UrlParts) -> Option<String> {
    let mut at = url.params.unwrap_or(s.len());
    while at < s.len() {
        // As tokio-postgres splits them: the key ends at the next `=`, the value at the next `&`.
        let rest = &s[at..];
        let Some((key, rest)) = rest.split_once('=') else {
            return Some(url.fault(at, format!("parameter {rest:?} has no `=value`")));
        };
        let (value, next) = match rest.split_once('&') {
            Some((value, _)) => (value, at + key.len() + value.len() + 2),
            None => (rest, s.len()),
        };
        if !rewritten(key, value) {
            let (Some(key), Some(value)) = (percent_decode(key), percent_decode(value)) else {
                return Some(url.fault(
                    at,
                    "a parameter is not valid utf-8 once percent-decoded".into(),
                ));
            };
            let checked = format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            )
            .parse::<tokio_postgres::Config>();
            if let Err(e) = checked {
                let cause = std::error::Error::source(&e).map_or(e.to_string(), |c| c.to_string());
                return Some(url.fault(at, format!("parameter `{key}`: {cause}")));
            }
        }
        at = next;
    }
    None
}

/// The parameters [`accept_verify_modes`] takes out of a connection string.
fn rewritten(key: &str, value: &str) -> bool {
    matches!(
        (key, value),
        ("sslmode", "verify-full" | "verify-ca") | ("sslrootcert", _)
    )
}

/// A connection string as tokio-postgres can parse it, and what was taken out.
struct Rewritten {
    text: String,
    verify: Option<&'static str>,
    root_cert: Option<RootCertFile>,
}

/// tokio-postgres rejects `sslmode=verify-full` and `verify-ca`, which RDS documents. Turn them
/// into `require` (the TLS connector does the verifying) and drop `sslrootcert`, which
/// tokio-postgres does not know (the TLS connector is given the roots instead).
fn accept_verify_modes(s: &str) -> Rewritten {
    let mut verify = None;
    let mut root_cert = None;
    let mut keep = |key: &str, value: &str, quotable: bool| -> Option<String> {
        match (key, value) {
            ("sslmode", "verify-full") => verify = Some("verify-full"),
            ("sslmode", "verify-ca") => verify = Some("verify-ca"),
            ("sslrootcert", _) => {
                root_cert = Some(RootCertFile {
                    path: value.to_string(),
                    quotable,
                });
                return None;
            }
            _ => return Some(format!("{key}={value}")),
        }
        Some("sslmode=require".to_string())
    };
    let text = if let Some(url) = url_parts(s) {
        match url.params {
            Some(start) => {
                let mut at = start;
                let mut params = Vec::new();
                for p in s[start..].split('&') {
                    let quotable = at >= url.quotable;
                    at += p.len() + 1;
                    params.extend(match p.split_once('=') {
                        Some((k, v)) => keep(k, v, quotable),
                        None => Some(p.to_string()),
                    });
                }
                let base = &s[..start - 1];
                if params.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", params.join("&"))
                }
            }
            None => s.to_string(),
        }
    } else {
        // Key-value form: the pairs of these keys are replaced where they stand; the rest of
        // the text (quoted values with their spaces) is kept as written.
        match key_value_pairs(s) {
            Some(pairs) => {
                let mut text = String::with_capacity(s.len());
                let mut copied = 0;
                for pair in pairs {
                    if matches!(pair.key, "sslmode" | "sslrootcert") {
                        text.push_str(&s[copied..pair.start]);
                        text.extend(keep(pair.key, &pair.value, true));
                        copied = pair.end;
                    }
                }
                text.push_str(&s[copied..]);
                text
            }
            // tokio-postgres refuses it; `explain` says so without quoting it.
            None => s.to_string(),
        }
    };
    Rewritten {
        text,
        verify,
        root_cert,
    }
}

/// One `key=value` pair of a key-value connection string: where it stands, its key and its
/// value unquoted and unescaped.
struct Pair<'a> {
    start: usize,
    end: usize,
    key: &'a str,
    value: String,
}

/// The pairs of a key-value connection string, read as tokio-postgres reads them (a value is
/// `'quoted'` or ends at whitespace; a backslash escapes the next character); `None` when it
/// does not parse.
fn key_value_pairs(s: &str) -> Option<Vec<Pair<'_>>> {
    let mut pairs = Vec::new();
    let mut it = s.char_indices().peekable();
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else {
            return Some(pairs);
        };
        while it
            .next_if(|(_, c)| !c.is_whitespace() && *c != '=')
            .is_some()
        {}
        let key_end = it.peek().map_or(s.len(), |(i, _)| *i);
        if key_end == start {
            return Some(pairs); // tokio-postgres stops reading here too
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        it.next_if(|(_, c)| *c == '=')?;
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = it.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let end = loop {
            match it.next() {
                Some((i, '\'')) if quoted => break i + 1,
                Some((_, '\\')) => value.extend(it.next().map(|(_, c)| c)),
                Some((i, c)) if !quoted && c.is_whitespace() => break i,
                Some((_, c)) => value.push(c),
                None if quoted => return None,
                None => break s.len(),
            }
        };
        if !quoted && value.is_empty() {
            return None;
        }
        pairs.push(Pair {
            start,
            end,
            key: &s[start..key_end],
            value,
        });
    }
}

/// The settings of a pool: the builder's draft, validated by [`Builder::build`]. Each option
/// is a field here, a default in [`Settings::default`] and a setter on [`Builder`], once each.
/// Debug shows `pg` with its password redacted (tokio-postgres's Config does that).
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Set by `build()` from the connection string; empty in the draft.
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) max_size: usize,
    pub(crate) min_idle: usize,
    pub(crate) acquire_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) query_timeout: Option<Duration>,
    pub(crate) deadline_margin: Duration,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) pin_rules: PinRules,
    pub(crate) pin_policy: PinPolicy,
    pub(crate) freeze_check: FreezeCheck,
    pub(crate) validate_idle_after: Option<Duration>,
    pub(crate) validate_timeout: Duration,
    pub(crate) validate_patience: Option<Duration>,
    pub(crate) trim_at_invocation_end: bool,
    pub(crate) refill_after_invocation: Option<Duration>,
    pub(crate) held_too_long: Option<Duration>,
    pub(crate) statement_cache_capacity: usize,
    pub(crate) statement_cache_bytes: usize,
    pub(crate) proxy: Proxy,
    /// Named statements are sent: false under a transaction pooler's profile unless the
    /// statement cache was set explicitly (a pooler that carries them, PgBouncer 1.21's
    /// `max_prepared_statements`).
    pub(crate) named_statements: bool,
}

/// The options a profile sets unless the builder set them explicitly.
#[derive(Clone, Copy, Default)]
struct Explicit {
    pin_rules: bool,
    pin_policy: bool,
    min_idle: bool,
    trim: bool,
    cache: bool,
}

/// Builds a [`Pool`]. Every setter takes a value; [`Builder::build`] checks them all and
/// opens nothing.
///
/// | option | default | why |
/// |---|---|---|
/// | `max_size` | 4 | a Lambda environment serves one invocation at a time; a few connections cover concurrent statements in it |
/// | `min_idle` | 0 | opened only by [`Pool::warm_up`], never in the background |
/// | `acquire_timeout` | 5 s | bounded further by the deadline |
/// | `connect_timeout` | 5 s | bounds DNS, TCP, TLS, startup and authentication together |
/// | `query_timeout` | 30 s | client side, per statement; bounded further by the deadline |
/// | `deadline_margin` | 200 ms | time left to the handler to answer after a pool error |
/// | `max_lifetime` | 1 h | well below RDS Proxy's 24 h client connection limit |
/// | `idle_timeout` | 10 min | below RDS Proxy's 30 min `IdleClientTimeout`; wall clock, so a frozen environment counts |
/// | `pin_policy` | `CloseOnReturn` | a pinned connection never sits idle while the environment is frozen |
/// | `pin_rules` | today's AWS rules | see [`crate::pinning`] |
/// | `freeze_check` | `Validate` | an invocation checks connections idle longer than `validate_idle_after` (5 s) with a round trip bounded by `validate_timeout` (1 s) and half the time left |
/// | `validate_patience` | 25 ms | a check unanswered this long races a fresh connection: a forgotten flow costs this and a connect, not the whole `validate_timeout` |
/// | `statement_cache_capacity` | 100 | one round trip per repeated query, without pinning |
/// | `statement_cache_bytes` | 256 KiB | bounds the cache's memory |
/// | `trim_at_invocation_end` | false | idle unpinned connections hold no database connection behind RDS Proxy |
/// | `held_too_long` | off | a warning naming where a client was checked out when it is returned after this long; a client still out when its invocation ends is reported whatever this says |
/// | `refill_after_invocation` | 250 ms | connections closed in an invocation (pinned ones) are replaced up to `min_idle` after its response, not on the next invocation's critical path; at most this long (billed) |
/// | `proxy` | `RdsProxy` | the profile of what sits in front of PostgreSQL ([`Proxy`]); sets the defaults of `pin_rules`, `pin_policy`, `min_idle`, `trim_at_invocation_end` and the statement cache |
#[must_use = "a builder does nothing until build() is called"]
pub struct Builder {
    conn: ConnectionConfig,
    settings: Settings,
    explicit: Explicit,
    connector: Option<Arc<dyn Connect>>,
    password: Option<SharedPasswordProvider>,
    #[cfg(feature = "tls")]
    root_certs_pem: Option<Vec<u8>>,
}

impl Settings {
    /// The profile's choices for the options the builder did not set.
    fn apply_profile(&mut self, explicit: Explicit) {
        let proxy = self.proxy;
        if !explicit.pin_rules {
            self.pin_rules = PinRules::for_proxy(proxy);
        }
        match proxy {
            Proxy::PgBouncerSession => {
                // A connection idle through a freeze holds its server connection: none stays.
                if !explicit.min_idle {
                    self.min_idle = 0;
                }
                if !explicit.trim {
                    self.trim_at_invocation_end = true;
                }
            }
            Proxy::PgBouncerTransaction => {
                // Closing a connection does not undo state that leaked into the server
                // connection: refuse it before it is sent.
                if !explicit.pin_policy {
                    self.pin_policy = PinPolicy::Refuse;
                }
                if !explicit.cache {
                    self.statement_cache_capacity = 0;
                    self.named_statements = false;
                }
            }
            Proxy::RdsProxy | Proxy::RdsProxy2023 | Proxy::Direct => {}
        }
    }

    /// What `sql` (of classification `class`, computed when `None`), sent with `protocol`,
    /// may pin that [`PinPolicy::Refuse`] refuses before anything is sent: empty under the
    /// other policies, which classify what is sent on the wire instead. The one place that
    /// decides a refusal.
    pub(crate) fn refusal(
        &self,
        sql: &str,
        class: Option<Classification>,
        protocol: Protocol,
    ) -> Reasons {
        if self.pin_policy != PinPolicy::Refuse {
            return Reasons::EMPTY;
        }
        let class = class.unwrap_or_else(|| classify(sql));
        self.pin_rules.pinning_reasons(&class, protocol)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pg: tokio_postgres::Config::new(),
            max_size: 4,
            min_idle: 0,
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            query_timeout: Some(Duration::from_secs(30)),
            deadline_margin: Duration::from_millis(200),
            max_lifetime: Some(Duration::from_secs(3600)),
            idle_timeout: Some(Duration::from_secs(600)),
            pin_rules: PinRules::new(),
            pin_policy: PinPolicy::CloseOnReturn,
            freeze_check: FreezeCheck::Validate,
            validate_idle_after: Some(Duration::from_secs(5)),
            validate_timeout: Duration::from_secs(1),
            validate_patience: Some(Duration::from_millis(25)),
            trim_at_invocation_end: false,
            refill_after_invocation: Some(Duration::from_millis(250)),
            held_too_long: None,
            statement_cache_capacity: 100,
            statement_cache_bytes: 256 * 1024,
            proxy: Proxy::RdsProxy,
            named_statements: true,
        }
    }
}

impl Builder {
    pub(crate) fn new(conn: ConnectionConfig) -> Builder {
        Builder {
            conn,
            settings: Settings::default(),
            explicit: Explicit::default(),
            connector: None,
            password: None,
            #[cfg(feature = "tls")]
            root_certs_pem: None,
        }
    }

    /// The most connections open at once (idle and in use). Default 4.
    pub fn max_size(mut self, n: usize) -> Self {
        self.settings.max_size = n;
        self
    }

    /// Connections [`Pool::warm_up`] opens and end-of-invocation trimming keeps. Default 0.
    pub fn min_idle(mut self, n: usize) -> Self {
        self.explicit.min_idle = true;
        self.settings.min_idle = n;
        self
    }

    /// The longest `get()` waits for a free connection. Default 5 s.
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.settings.acquire_timeout = d;
        self
    }

    /// The longest opening a connection may take, all steps included. Default 5 s.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = d;
        self
    }

    /// The longest one statement (or a stream, or a copy) may take, measured by the client;
    /// `None` leaves only the deadline. When it fires, the connection is closed at once.
    /// Default 30 s. Not the server's `statement_timeout`: set that on the role too.
    pub fn query_timeout(mut self, d: Option<Duration>) -> Self {
        self.settings.query_timeout = d;
        self
    }

    /// How long before a deadline pinpool gives up, so the handler can still answer.
    /// Default 200 ms.
    pub fn deadline_margin(mut self, d: Duration) -> Self {
        self.settings.deadline_margin = d;
        self
    }

    /// Connections older than this are closed instead of reused; `None` keeps them. Must be
    /// below 24 h (RDS Proxy's limit). Default 1 h.
    pub fn max_lifetime(mut self, d: Option<Duration>) -> Self {
        self.settings.max_lifetime = d;
        self
    }

    /// Idle connections older than this (wall clock) are replaced instead of handed out;
    /// `None` keeps them. Default 10 min.
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.settings.idle_timeout = d;
        self
    }

    /// A fixed password (overrides one in the connection string).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        if let Ok(pg) = self.conn.parsed.as_mut() {
            pg.password(password.into());
        }
        self
    }

    /// Called for every new connection; its answer is the password (an RDS IAM token, a
    /// rotated secret).
    pub fn password_provider(mut self, provider: impl PasswordProvider) -> Self {
        self.password = Some(Arc::new(provider));
        self
    }

    /// A TLS connector (any tokio-postgres `MakeTlsConnect`). The pool's type does not change.
    pub fn tls<T>(mut self, tls: T) -> Self
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.connector = Some(Arc::new(Connector::new(tls, true)));
        self
    }

    /// Root certificates (PEM) to verify the server with, for the built-in rustls TLS (feature
    /// `tls`). Default: the connection string's `sslrootcert` file, else the public web roots
    /// (RDS Proxy's certificates chain to them).
    #[cfg(feature = "tls")]
    pub fn root_certificates_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certs_pem = Some(pem.into());
        self
    }

    /// The pinning rules the pool classifies statements with. Default: today's AWS rules.
    pub fn pin_rules(mut self, rules: PinRules) -> Self {
        self.explicit.pin_rules = true;
        self.settings.pin_rules = rules;
        self
    }

    /// What to do with a possibly pinned connection. Default [`PinPolicy::CloseOnReturn`].
    pub fn pin_policy(mut self, policy: PinPolicy) -> Self {
        self.explicit.pin_policy = true;
        self.settings.pin_policy = policy;
        self
    }

    /// What an invocation's start does with connections idle longer than
    /// `validate_idle_after`. Default [`FreezeCheck::Validate`].
    pub fn freeze_check(mut self, check: FreezeCheck) -> Self {
        self.settings.freeze_check = check;
        self
    }

    /// Idle connections unused longer than this (wall clock) are checked when an invocation
    /// begins; `None` checks none (closed sockets and lifetimes are still checked).
    /// Default 5 s.
    pub fn validate_idle_after(mut self, d: Option<Duration>) -> Self {
        self.settings.validate_idle_after = d;
        self
    }

    /// The longest one check of an idle connection may take. A half-open connection fails
    /// it. At an invocation's start it also takes at most half the time left before the
    /// deadline, so a failed check leaves time to connect afresh. Default 1 s.
    pub fn validate_timeout(mut self, d: Duration) -> Self {
        self.settings.validate_timeout = d;
        self
    }

    /// How long an invocation's start waits for the check of an idle connection before it
    /// also opens a fresh one; whichever is ready first serves the invocation, and a
    /// connection whose check has not answered by then is closed. An idle connection (one
    /// whose check answered) serves as well: in a full pool, where no fresh one can open, a
    /// healthy connection does not wait for a silent one's bound. A healthy check answers in
    /// one round trip (well under a millisecond from a Lambda function to RDS Proxy in its
    /// VPC); a flow a NAT forgot never answers, and then costs this plus a connect instead of
    /// the whole `validate_timeout`. `None`: wait for the checks alone. Default 25 ms.
    pub fn validate_patience(mut self, d: Option<Duration>) -> Self {
        self.settings.validate_patience = d;
        self
    }

    /// How long an invocation's end may spend opening connections to bring the idle set back
    /// to `min_idle` (after connections were closed in it, pinned ones above all), or `None`
    /// for never. It runs after the response is posted and before the next event is asked
    /// for, so the next invocation finds a connection ready instead of paying a connect
    /// (TCP, TLS and authentication through RDS Proxy) on its critical path; Lambda bills that
    /// time, at most this long, nothing when the pool is at `min_idle`. Never past the
    /// invocation's deadline. Default 250 ms (a connect through RDS Proxy in its VPC takes
    /// tens of milliseconds); with `min_idle` 0 it does nothing.
    pub fn refill_after_invocation(mut self, limit: Option<Duration>) -> Self {
        self.settings.refill_after_invocation = limit;
        self
    }

    /// Warn (`tracing`, with where the client was checked out) and count
    /// (`pinpool_held_too_long{when="returned"}`) when a client is returned after being held
    /// longer than this. Default off: a handler may legitimately hold its client for a long
    /// job (Lambda allows 15 minutes). The leak that matters in Lambda, a client still checked
    /// out when its invocation ends (it is then held through the freeze), is reported always
    /// (`when="invocation_end"`).
    pub fn held_too_long(mut self, threshold: Option<Duration>) -> Self {
        self.settings.held_too_long = threshold;
        self
    }

    /// Close idle connections beyond `min_idle` when an invocation ends. Default false: idle,
    /// unpinned connections hold no database connection behind RDS Proxy.
    pub fn trim_at_invocation_end(mut self, trim: bool) -> Self {
        self.explicit.trim = true;
        self.settings.trim_at_invocation_end = trim;
        self
    }

    /// How many prepared statements each connection keeps for the `&str` statement methods
    /// (least recently used first out); 0 turns the cache off. Default 100.
    pub fn statement_cache_capacity(mut self, n: usize) -> Self {
        self.explicit.cache = true;
        self.settings.statement_cache_capacity = n;
        self
    }

    /// The most SQL text, in bytes, each connection's statement cache holds. Default 256 KiB.
    pub fn statement_cache_bytes(mut self, n: usize) -> Self {
        self.settings.statement_cache_bytes = n;
        self
    }

    /// The profile of what sits between the pool and PostgreSQL. Default
    /// [`Proxy::RdsProxy`]. See [`Proxy`] for what each profile sets; options set explicitly
    /// on this builder keep their values.
    pub fn proxy(mut self, proxy: Proxy) -> Self {
        self.settings.proxy = proxy;
        self
    }

    /// Validates every option and creates the pool. Opens no connection.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first invalid option.
    pub fn build(self) -> Result<Pool, Error> {
        let Builder {
            conn,
            settings: mut s,
            explicit,
            connector,
            password,
            #[cfg(feature = "tls")]
            root_certs_pem,
        } = self;
        s.apply_profile(explicit);
        let mut pg = conn.parsed?;
        check_hosts(&pg)?;
        if pg.get_user().is_none_or(str::is_empty) {
            return Err(Error::config("user", "no user given"));
        }
        if s.max_size == 0 {
            return Err(Error::config("max_size", "must be at least 1"));
        }
        if s.min_idle > s.max_size {
            return Err(Error::config(
                "min_idle",
                format!("{} is more than max_size ({})", s.min_idle, s.max_size),
            ));
        }
        for (name, d) in [
            ("acquire_timeout", Some(s.acquire_timeout)),
            ("connect_timeout", Some(s.connect_timeout)),
            ("query_timeout", s.query_timeout),
            ("max_lifetime", s.max_lifetime),
            ("idle_timeout", s.idle_timeout),
            ("validate_timeout", Some(s.validate_timeout)),
            ("validate_patience", s.validate_patience),
            ("refill_after_invocation", s.refill_after_invocation),
            ("held_too_long", s.held_too_long),
        ] {
            if d == Some(Duration::ZERO) {
                return Err(Error::config(name, "must be longer than zero"));
            }
        }
        if s.max_lifetime
            .is_some_and(|d| d >= PROXY_MAX_CLIENT_LIFETIME)
        {
            return Err(Error::config(
                "max_lifetime",
                "must be below 24 h: RDS Proxy closes client connections at 24 h",
            ));
        }
        let connector = choose_connector(
            conn.verify,
            &pg,
            connector,
            #[cfg(feature = "tls")]
            (conn.root_cert.as_ref(), root_certs_pem.as_deref()),
        )?;
        if !connector.tls() {
            // Without a TLS connector, do not send an SSLRequest that can only be refused.
            pg.ssl_mode(SslMode::Disable);
        }
        if pg.get_ssl_mode() == SslMode::Disable
            && pg.get_load_balance_hosts() == LoadBalanceHosts::Random
        {
            // Plaintext connections are opened by pinpool (to observe them), hosts in order.
            return Err(Error::config(
                "load_balance_hosts",
                "random is not supported for plaintext connections: pinpool tries hosts in order",
            ));
        }
        // tokio-postgres's own connect_timeout covers only the TCP connect; the pool bounds the
        // whole connect with its own, and keeps the user's value when shorter.
        if pg
            .get_connect_timeout()
            .is_none_or(|d| *d > s.connect_timeout)
        {
            pg.connect_timeout(s.connect_timeout);
        }
        let settings = Settings { pg, ..s };
        Ok(Pool::from_parts(settings, connector, password))
    }
}

/// The hosts tokio-postgres parsed are usable: at least one, none empty, none holding `@`, no
/// port 0.
fn check_hosts(pg: &tokio_postgres::Config) -> Result<(), Error> {
    if pg.get_hosts().is_empty() {
        return Err(Error::config("host", "no host given"));
    }
    if pg
        .get_hosts()
        .iter()
        .any(|h| matches!(h, Host::Tcp(h) if h.is_empty()))
    {
        return Err(Error::config("host", "empty host name"));
    }
    if pg.get_ports().contains(&0) {
        return Err(Error::config("port", "must not be 0"));
    }
    if pg
        .get_hosts()
        .iter()
        .any(|h| matches!(h, Host::Tcp(h) if h.contains('@')))
    {
        // tokio-postgres ends a URL's user-info at its first `@`: the rest of a password
        // holding `@` became the host name (which would be looked up and shown in Debug).
        return Err(Error::config(
            "host",
            "a host name holds `@`: percent-encode an `@` in the user name or password",
        ));
    }
    Ok(())
}

/// The connector for these settings: the user's, else (with the `tls` feature) rustls for
/// `sslmode=require`/`verify-ca`/`verify-full`, verifying, else plaintext; an `sslmode` that
/// needs TLS without a connector that speaks it is refused.
fn choose_connector(
    verify: Option<&'static str>,
    pg: &tokio_postgres::Config,
    connector: Option<Arc<dyn Connect>>,
    #[cfg(feature = "tls")] (root_cert, root_certs_pem): (Option<&RootCertFile>, Option<&[u8]>),
) -> Result<Arc<dyn Connect>, Error> {
    // With the tls feature, sslmode=require/verify-ca/verify-full gets rustls, verifying.
    #[cfg(feature = "tls")]
    let connector =
        if connector.is_none() && (verify.is_some() || pg.get_ssl_mode() == SslMode::Require) {
            let roots = match (root_certs_pem, root_cert) {
                (Some(pem), _) => crate::tls::roots_from_pem("root_certificates_pem", pem)?,
                (None, Some(file)) => {
                    let pem = std::fs::read(&file.path).map_err(|e| {
                        let message = if file.quotable {
                            format!("cannot read {}: {e}", file.path)
                        } else {
                            format!("cannot read the file it names: {e}")
                        };
                        Error::config("sslrootcert", message)
                    })?;
                    crate::tls::roots_from_pem("sslrootcert", &pem)?
                }
                (None, None) => crate::tls::public_roots(),
            };
            let check_name = verify != Some("verify-ca");
            let tls = crate::tls::connector(roots, check_name)?;
            Some(Arc::new(Connector::new(tls, true)) as Arc<dyn Connect>)
        } else {
            connector
        };
    let connector = connector.unwrap_or_else(|| Arc::new(Connector::new(NoTls, false)));
    if !connector.tls() && (verify.is_some() || pg.get_ssl_mode() == SslMode::Require) {
        return Err(Error::config(
            "sslmode",
            format!(
                "sslmode={} needs TLS: enable pinpool's `tls` feature or give the builder a connector with .tls(...)",
                verify.unwrap_or("require")
            ),
        ));
    }
    Ok(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(b: Builder) -> Settings {
        let mut s = b.settings;
        s.apply_profile(b.explicit);
        s
    }

    fn builder() -> Builder {
        Pool::builder("postgres://u@h/db")
    }

    #[test]
    fn a_profile_sets_defaults_and_explicit_options_win_in_any_order() {
        let s = settings(builder().proxy(Proxy::PgBouncerTransaction));
        assert_eq!(s.pin_policy, PinPolicy::Refuse);
        assert_eq!(s.statement_cache_capacity, 0);
        assert!(!s.named_statements);
        assert!(s.pin_rules.is_set_local_safe());
        for b in [
            builder()
                .pin_policy(PinPolicy::Keep)
                .statement_cache_capacity(5)
                .proxy(Proxy::PgBouncerTransaction),
            builder()
                .proxy(Proxy::PgBouncerTransaction)
                .pin_policy(PinPolicy::Keep)
                .statement_cache_capacity(5),
        ] {
            let s = settings(b);
            assert_eq!(s.pin_policy, PinPolicy::Keep);
            assert_eq!(s.statement_cache_capacity, 5);
            assert!(s.named_statements);
        }
        let s = settings(builder().min_idle(2).proxy(Proxy::PgBouncerSession));
        assert_eq!((s.min_idle, s.trim_at_invocation_end), (2, true));
        let s = settings(builder().proxy(Proxy::PgBouncerSession));
        assert_eq!(s.min_idle, 0);
        let s = settings(builder().proxy(Proxy::RdsProxy2023));
        assert!(s.pin_rules.is_legacy_parse());
        let s = settings(
            builder()
                .pin_rules(PinRules::new())
                .proxy(Proxy::RdsProxy2023),
        );
        assert!(!s.pin_rules.is_legacy_parse());
        let s = settings(builder());
        assert_eq!(s.pin_rules, PinRules::new());
        assert_eq!(s.pin_policy, PinPolicy::CloseOnReturn);
        assert!(s.named_statements);
    }

    #[test]
    fn what_pins_or_leaks_depends_on_the_proxy() {
        use crate::pinning::Reason;
        let nextval = "SELECT nextval('s')";
        let set_local = "SET LOCAL work_mem = '8MB'";
        let rds = PinRules::for_proxy(Proxy::RdsProxy);
        assert!(
            rds.check(nextval, Protocol::Parse)
                .contains(Reason::SequenceFunction)
        );
        assert!(!rds.check(set_local, Protocol::Parse).is_empty());
        let tx = PinRules::for_proxy(Proxy::PgBouncerTransaction);
        assert!(tx.check(nextval, Protocol::Parse).is_empty());
        assert!(tx.check(set_local, Protocol::Parse).is_empty());
        assert!(
            tx.check("SET work_mem = '8MB'", Protocol::Parse)
                .contains(Reason::Set)
        );
        let long = format!("SELECT '{}'", "x".repeat(20_000));
        assert!(tx.check(&long, Protocol::Simple).is_empty());
        assert!(
            rds.check(&long, Protocol::Simple)
                .contains(Reason::Oversized)
        );
        let legacy = PinRules::for_proxy(Proxy::RdsProxy2023);
        assert!(
            legacy
                .check("SELECT 1", Protocol::Parse)
                .contains(Reason::Parse)
        );
    }

    #[test]
    fn verify_modes_become_require() {
        let r = accept_verify_modes("postgres://a@h/db?sslmode=verify-full&sslrootcert=/x.pem");
        assert_eq!(r.text, "postgres://a@h/db?sslmode=require");
        assert_eq!(r.verify, Some("verify-full"));
        let root = r.root_cert.expect("sslrootcert");
        assert_eq!((root.path.as_str(), root.quotable), ("/x.pem", true));
        let r = accept_verify_modes("host=h user=a sslmode=verify-ca dbname=d");
        assert_eq!(r.text, "host=h user=a sslmode=require dbname=d");
        assert_eq!(r.verify, Some("verify-ca"));
        let r = accept_verify_modes("postgres://a@h/db?application_name=x");
        assert_eq!(r.text, "postgres://a@h/db?application_name=x");
        assert!(r.verify.is_none() && r.root_cert.is_none());
    }

    #[test]
    fn key_value_values_are_kept_as_written() {
        // Spaces inside a quoted value (a password) are not collapsed.
        let s = "host=h user=u password='a  b\tc' sslmode=verify-full dbname=d";
        let r = accept_verify_modes(s);
        assert_eq!(
            r.text,
            "host=h user=u password='a  b\tc' sslmode=require dbname=d"
        );
        let pg: tokio_postgres::Config = r.text.parse().unwrap();
        assert_eq!(pg.get_password(), Some(&b"a  b\tc"[..]));
        // A quoted value that looks like an sslrootcert pair is part of the password.
        let r = accept_verify_modes("host=h password='x sslrootcert=/S sslmode=verify-ca' user=u");
        assert!(r.root_cert.is_none() && r.verify.is_none(), "{}", r.text);
        // Spaces around `=`, and quoted values of the keys rewritten.
        let r = accept_verify_modes("host=h sslmode = 'verify-ca' sslrootcert='/a b.pem' user=u");
        assert_eq!(r.verify, Some("verify-ca"));
        assert_eq!(r.root_cert.map(|f| f.path).as_deref(), Some("/a b.pem"));
        let pg: tokio_postgres::Config = r.text.parse().unwrap();
        assert_eq!(pg.get_user(), Some("u"));
    }

    proptest::proptest! {
        #[test]
        fn a_quoted_key_value_password_survives_the_rewrite(
            password in "([ \t'\\\\=a-z]|sslmode=verify-ca|sslrootcert=/x){0,12}",
        ) {
            let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
            let s = format!("host=h password='{quoted}' sslmode=verify-full user=u");
            let r = accept_verify_modes(&s);
            let pg: tokio_postgres::Config = r.text.parse().unwrap();
            proptest::prop_assert_eq!(pg.get_password(), Some(password.as_bytes()));
            proptest::prop_assert_eq!(pg.get_user(), Some("u"));
            proptest::prop_assert_eq!(r.verify, Some("verify-full"));
            proptest::prop_assert!(r.root_cert.is_none());
        }
    }

    #[test]
    fn the_parameters_begin_after_the_user_info() {
        // A `?` in the password does not start the parameters.
        let r = accept_verify_modes("postgres://a:p?sslmode=x@h/db?sslmode=verify-ca");
        assert_eq!(r.text, "postgres://a:p?sslmode=x@h/db?sslmode=require");
        assert_eq!(r.verify, Some("verify-ca"));
        // An sslrootcert that may be part of the password (before the last `@`) is not quoted.
        let r = accept_verify_modes("postgres://a:p@h?sslrootcert=/S@h/db");
        assert!(!r.root_cert.expect("sslrootcert").quotable);
    }
}
