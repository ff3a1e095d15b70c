//! The pool's configuration as data (feature `serde`): what a service reads from a file or
//! the environment with the `config` crate or serde_json, as deadpool-postgres's
//! `Config` is read. [`Config::builder`] turns it into a [`Builder`]; `build()` validates it
//! with the same errors as the builder's setters, naming the option, never quoting a secret.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::config::{Builder, ConnectionConfig, FreezeCheck, PinPolicy, Proxy};
use crate::error::Error;
use crate::pinning::PinRules;
use crate::pool::Pool;

/// Where to connect and how the pool behaves, deserializable.
///
/// Every field is optional. Connection fields override the parts of `url` (or, without `url`,
/// make the whole connection), like libpq's keywords; the pool's options sit under `pool`, as
/// in deadpool-postgres. Durations are seconds (`5`, `0.25`) or text with a unit (`"250ms"`,
/// `"5s"`, `"1h"`); an optional duration also takes `"off"` or `null`.
///
/// ```
/// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let config: pinpool::Config = serde_json::from_str(r#"{
///     "host": "127.0.0.1", "user": "app", "dbname": "app",
///     "pool": { "max_size": 8, "acquire_timeout": "2s", "query_timeout": "off" }
/// }"#)?;
/// let pool = config.builder().build()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// A connection string, URL (`postgres://...`) or key-value.
    pub url: Option<String>,
    /// The host (or Unix socket directory); replaces the URL's hosts.
    pub host: Option<String>,
    /// Several hosts, tried in order; replaces the URL's hosts.
    pub hosts: Option<Vec<String>>,
    /// The port, for every host.
    pub port: Option<u16>,
    /// The user.
    pub user: Option<String>,
    /// The password (never printed: `Debug` shows it redacted).
    pub password: Option<String>,
    /// The database.
    pub dbname: Option<String>,
    /// The `application_name` the server shows for each connection.
    pub application_name: Option<String>,
    /// The pool's options.
    pub pool: PoolConfig,
}

/// The pool's options, each as [`Builder`]'s setter of the same name; absent ones keep the
/// builder's default (the README's table).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolConfig {
    /// [`Builder::max_size`].
    pub max_size: Option<usize>,
    /// [`Builder::min_idle`].
    pub min_idle: Option<usize>,
    /// [`Builder::acquire_timeout`].
    #[serde(deserialize_with = "named::acquire_timeout")]
    pub acquire_timeout: Option<Duration>,
    /// [`Builder::connect_timeout`].
    #[serde(deserialize_with = "named::connect_timeout")]
    pub connect_timeout: Option<Duration>,
    /// [`Builder::query_timeout`] (`"off"`: none).
    #[serde(deserialize_with = "named::query_timeout")]
    pub query_timeout: Option<Option<Duration>>,
    /// [`Builder::deadline_margin`].
    #[serde(deserialize_with = "named::deadline_margin")]
    pub deadline_margin: Option<Duration>,
    /// [`Builder::max_lifetime`] (`"off"`: none).
    #[serde(deserialize_with = "named::max_lifetime")]
    pub max_lifetime: Option<Option<Duration>>,
    /// [`Builder::idle_timeout`] (`"off"`: none).
    #[serde(deserialize_with = "named::idle_timeout")]
    pub idle_timeout: Option<Option<Duration>>,
    /// [`Builder::proxy`]: `rds_proxy` (the default), `rds_proxy_2023`, `pgbouncer_session`,
    /// `pgbouncer_transaction` or `direct`.
    pub proxy: Option<Proxy>,
    /// [`Builder::pin_policy`]: `close_on_return`, `keep`, `keep_for_invocation` or `refuse`.
    pub pin_policy: Option<PinPolicy>,
    /// [`Builder::pin_rules`]: `today` (the default) or `legacy` (any Parse pins, as RDS
    /// Proxy did before November 2023).
    pub pin_rules: Option<Rules>,
    /// [`Builder::freeze_check`]: `validate` or `replace`.
    pub freeze_check: Option<FreezeCheck>,
    /// [`Builder::validate_idle_after`] (`"off"`: never).
    #[serde(deserialize_with = "named::validate_idle_after")]
    pub validate_idle_after: Option<Option<Duration>>,
    /// [`Builder::validate_timeout`].
    #[serde(deserialize_with = "named::validate_timeout")]
    pub validate_timeout: Option<Duration>,
    /// [`Builder::validate_patience`] (`"off"`: wait for the checks alone).
    #[serde(deserialize_with = "named::validate_patience")]
    pub validate_patience: Option<Option<Duration>>,
    /// [`Builder::refill_after_invocation`] (`"off"`: no refill).
    #[serde(deserialize_with = "named::refill_after_invocation")]
    pub refill_after_invocation: Option<Option<Duration>>,
    /// [`Builder::held_too_long`] (`"off"`: no warning).
    #[serde(deserialize_with = "named::held_too_long")]
    pub held_too_long: Option<Option<Duration>>,
    /// [`Builder::trim_at_invocation_end`].
    pub trim_at_invocation_end: Option<bool>,
    /// [`Builder::statement_cache_capacity`].
    pub statement_cache_capacity: Option<usize>,
    /// [`Builder::statement_cache_bytes`].
    pub statement_cache_bytes: Option<usize>,
}

/// The pinning rules by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Rules {
    /// Today's AWS rules ([`PinRules::new`]).
    Today,
    /// Before November 2023: any extended-protocol Parse pins ([`PinRules::legacy`]).
    Legacy,
}

impl Config {
    /// A builder with this configuration; [`Builder::build`] validates it. Call more setters
    /// on it for what data cannot say (a password provider, a TLS connector).
    pub fn builder(&self) -> Builder {
        let mut builder = Pool::builder(self.connection());
        if let Some(password) = &self.password {
            builder = builder.password(password.clone());
        }
        self.pool.apply(builder)
    }

    /// The connection: the URL's, with the fields given here in place of its parts; or,
    /// without a URL, the fields alone.
    fn connection(&self) -> ConnectionConfig {
        let Some(url) = &self.url else {
            if let Some(hosts) = &self.hosts {
                let fault = if self.host.is_some() {
                    Some("give one host in `host` or several in `hosts`, not both")
                } else if hosts.is_empty() {
                    Some("no host given")
                } else if hosts.iter().any(String::is_empty) {
                    Some("empty host name")
                } else {
                    None
                };
                if let Some(fault) = fault {
                    return ConnectionConfig::failed(Error::config("hosts", fault));
                }
            }
            let mut pg = tokio_postgres::Config::new();
            for host in self.hosts.iter().flatten().chain(&self.host) {
                pg.host(host);
            }
            if let Some(port) = self.port {
                pg.port(port);
            }
            self.override_names(&mut pg);
            return pg.into();
        };
        let conn = ConnectionConfig::from(url.as_str());
        for (option, given) in [
            ("host", self.host.is_some()),
            ("hosts", self.hosts.is_some()),
            ("port", self.port.is_some()),
        ] {
            if given {
                return ConnectionConfig::failed(Error::config(
                    option,
                    "give the hosts and ports in `url` or in `host`/`hosts`/`port`, not both",
                ));
            }
        }
        conn.map(|pg| self.override_names(pg))
    }

    fn override_names(&self, pg: &mut tokio_postgres::Config) {
        if let Some(user) = &self.user {
            pg.user(user);
        }
        if let Some(dbname) = &self.dbname {
            pg.dbname(dbname);
        }
        if let Some(app) = &self.application_name {
            pg.application_name(app);
        }
    }
}

impl PoolConfig {
    fn apply(&self, mut b: Builder) -> Builder {
        let p = self;
        if let Some(n) = p.max_size {
            b = b.max_size(n);
        }
        if let Some(n) = p.min_idle {
            b = b.min_idle(n);
        }
        if let Some(d) = p.acquire_timeout {
            b = b.acquire_timeout(d);
        }
        if let Some(d) = p.connect_timeout {
            b = b.connect_timeout(d);
        }
        if let Some(d) = p.query_timeout {
            b = b.query_timeout(d);
        }
        if let Some(d) = p.deadline_margin {
            b = b.deadline_margin(d);
        }
        if let Some(d) = p.max_lifetime {
            b = b.max_lifetime(d);
        }
        if let Some(d) = p.idle_timeout {
            b = b.idle_timeout(d);
        }
        if let Some(proxy) = p.proxy {
            b = b.proxy(proxy);
        }
        if let Some(policy) = p.pin_policy {
            b = b.pin_policy(policy);
        }
        if let Some(rules) = p.pin_rules {
            b = b.pin_rules(match rules {
                Rules::Today => PinRules::new(),
                Rules::Legacy => PinRules::legacy(),
            });
        }
        if let Some(check) = p.freeze_check {
            b = b.freeze_check(check);
        }
        if let Some(d) = p.validate_idle_after {
            b = b.validate_idle_after(d);
        }
        if let Some(d) = p.validate_timeout {
            b = b.validate_timeout(d);
        }
        if let Some(d) = p.validate_patience {
            b = b.validate_patience(d);
        }
        if let Some(d) = p.refill_after_invocation {
            b = b.refill_after_invocation(d);
        }
        if let Some(d) = p.held_too_long {
            b = b.held_too_long(d);
        }
        if let Some(on) = p.trim_at_invocation_end {
            b = b.trim_at_invocation_end(on);
        }
        if let Some(n) = p.statement_cache_capacity {
            b = b.statement_cache_capacity(n);
        }
        if let Some(n) = p.statement_cache_bytes {
            b = b.statement_cache_bytes(n);
        }
        b
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: only whether there is one is shown.
        f.debug_struct("Config")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("host", &self.host)
            .field("hosts", &self.hosts)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("pool", &self.pool)
            .finish()
    }
}

/// A duration as seconds (a number) or as text with a unit (`"250ms"`, `"5s"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Written {
    Seconds(f64),
    Text(String),
}

fn parse(w: Written) -> Result<Option<Duration>, String> {
    match w {
        Written::Seconds(s) => Duration::try_from_secs_f64(s)
            .map(Some)
            .map_err(|_| format!("{s} is not a number of seconds")),
        Written::Text(t) => match t.trim() {
            "off" | "none" => Ok(None),
            text => match text.parse::<f64>() {
                Ok(s) => parse(Written::Seconds(s)),
                Err(_) => humantime::parse_duration(text).map(Some).map_err(|e| {
                    format!("{text:?} is not a duration ({e}); write \"5s\", \"250ms\" or seconds")
                }),
            },
        },
    }
}

/// What a value that is neither a number nor text says.
const NOT_A_DURATION: &str = "is not a duration: write \"5s\", \"250ms\" or seconds";

fn duration<'de, D: Deserializer<'de>>(d: D, option: &str) -> Result<Option<Duration>, D::Error> {
    let w = Written::deserialize(d)
        .map_err(|_| de::Error::custom(format!("{option} {NOT_A_DURATION}")))?;
    match parse(w).map_err(|e| de::Error::custom(format!("{option}: {e}")))? {
        Some(v) => Ok(Some(v)),
        None => Err(de::Error::custom(format!("{option} cannot be off"))),
    }
}

fn optional_duration<'de, D: Deserializer<'de>>(
    d: D,
    option: &str,
) -> Result<Option<Option<Duration>>, D::Error> {
    match Option::<Written>::deserialize(d)
        .map_err(|_| de::Error::custom(format!("{option} {NOT_A_DURATION}, \"off\" or null")))?
    {
        None => Ok(Some(None)),
        Some(w) => parse(w)
            .map(Some)
            .map_err(|e| de::Error::custom(format!("{option}: {e}"))),
    }
}

/// Each duration's reader, with its option's name for its errors (serde does not tell a
/// `deserialize_with` function which field it reads).
mod named {
    use super::{Deserializer, Duration};

    macro_rules! named {
        ($kind:ident: $($name:ident),*) => {$(
            pub(super) fn $name<'de, D: Deserializer<'de>>(
                d: D,
            ) -> Result<named!(@out $kind), D::Error> {
                super::$kind(d, stringify!($name))
            }
        )*};
        (@out duration) => { Option<Duration> };
        (@out optional_duration) => { Option<Option<Duration>> };
    }

    named!(duration: acquire_timeout, connect_timeout, deadline_margin, validate_timeout);
    named!(optional_duration: query_timeout, max_lifetime, idle_timeout, validate_idle_after, validate_patience,
        refill_after_invocation, held_too_long);
}
