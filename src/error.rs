//! The pool's error type: which phase failed, whether a bound was hit, and the source chain.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use tokio_postgres::error::{DbError, SqlState};

use crate::pinning::Reasons;

/// A boxed error from a user hook (the password provider).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The phase of a checkout or a statement in which an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// Waiting for a free slot in the pool (`get()`).
    Acquire,
    /// Opening a new connection: DNS, TCP, TLS, startup, authentication.
    Connect,
    /// Running a statement, reading a stream or a copy.
    Query,
}

impl Phase {
    /// The phase as a lower-case word, as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Acquire => "acquire",
            Phase::Connect => "connect",
            Phase::Query => "query",
        }
    }
}

/// Which bound was hit by a [`Error::Timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimeoutCause {
    /// The configured timeout of the phase (`acquire_timeout`, `connect_timeout`,
    /// `query_timeout`).
    Configured,
    /// The caller's deadline minus `deadline_margin` (for example the Lambda invocation's).
    Deadline,
}

impl TimeoutCause {
    /// The cause as a lower-case word, as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutCause::Configured => "timeout",
            TimeoutCause::Deadline => "deadline",
        }
    }
}

/// Everything that can go wrong in pinpool.
///
/// Match on the variant, or use the predicates ([`Error::is_timeout`], [`Error::is_deadline`],
/// [`Error::is_proxy_borrow_timeout`], [`Error::as_db_error`], ...). Messages never contain a
/// password.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `build()` rejected an option; `option` names it.
    Config {
        /// The option's name, as the builder method or connection-string key spells it.
        option: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A bound was hit before the phase finished.
    Timeout {
        /// What was being done.
        phase: Phase,
        /// Which bound was hit.
        cause: TimeoutCause,
        /// How long the phase was allowed to take.
        after: Duration,
    },
    /// Opening a connection failed (refused, unresolvable host, wrong password, TLS...).
    Connect(tokio_postgres::Error),
    /// The password provider returned an error.
    Password(BoxError),
    /// A statement failed: the server answered with an error, or the connection broke.
    Query(tokio_postgres::Error),
    /// The strict pin policy refused a statement that may pin an RDS Proxy session. It was
    /// not sent.
    PinRefused {
        /// Why the statement may pin.
        reasons: Reasons,
        /// The start of the statement's text (displayed by its
        /// [digest](crate::pinning::digest), which holds none of its values).
        statement: String,
    },
    /// The pool was closed with [`Pool::close`](crate::Pool::close).
    Closed,
}

impl Error {
    pub(crate) fn config(option: &'static str, message: impl Into<String>) -> Error {
        Error::Config {
            option,
            message: message.into(),
        }
    }

    /// The phase the error happened in, where there is one.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Error::Timeout { phase, .. } => Some(*phase),
            Error::Connect(_) | Error::Password(_) => Some(Phase::Connect),
            Error::Query(_) | Error::PinRefused { .. } => Some(Phase::Query),
            Error::Closed => Some(Phase::Acquire),
            Error::Config { .. } => None,
        }
    }

    /// True when a configured timeout or the deadline was hit.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True when the caller's deadline (minus `deadline_margin`) was hit.
    pub fn is_deadline(&self) -> bool {
        matches!(
            self,
            Error::Timeout {
                cause: TimeoutCause::Deadline,
                ..
            }
        )
    }

    /// True when RDS Proxy answered that it could not borrow a database connection in time
    /// (SQLSTATE 08000, "Timed-out waiting to acquire database connection").
    pub fn is_proxy_borrow_timeout(&self) -> bool {
        self.code() == Some(&SqlState::CONNECTION_EXCEPTION)
    }

    /// True when the connection was closed (by the server, the network or pinpool).
    pub fn is_closed(&self) -> bool {
        match self {
            Error::Query(e) | Error::Connect(e) => e.is_closed(),
            Error::Closed => true,
            _ => false,
        }
    }

    /// The server's error, when the server answered with one.
    pub fn as_db_error(&self) -> Option<&DbError> {
        match self {
            Error::Query(e) | Error::Connect(e) => e.as_db_error(),
            _ => None,
        }
    }

    /// The SQLSTATE of the server's error, when there is one.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Error::Query(e) | Error::Connect(e) => e.code(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { option, message } => {
                write!(f, "pinpool: invalid option `{option}`: {message}")
            }
            Error::Timeout {
                phase,
                cause: TimeoutCause::Configured,
                after,
            } => {
                let (option, hint) = match phase {
                    Phase::Acquire => (
                        "acquire_timeout",
                        "every connection stayed in use; raise max_size or hold connections shorter",
                    ),
                    Phase::Connect => (
                        "connect_timeout",
                        "the database or proxy did not complete the login",
                    ),
                    Phase::Query => (
                        "query_timeout",
                        "the connection was closed; set statement_timeout on the role so the server stops too",
                    ),
                };
                write!(
                    f,
                    "pinpool: {} timed out after {after:?} ({option}): {hint}",
                    phase.as_str()
                )
            }
            Error::Timeout {
                phase,
                cause: TimeoutCause::Deadline,
                after,
            } => write!(
                f,
                "pinpool: {} stopped at the deadline minus deadline_margin (allowed {after:?}); \
                 answer the caller now instead of timing out",
                phase.as_str()
            ),
            Error::Connect(e) => {
                write!(f, "pinpool: could not connect to the database: {}", Said(e))
            }
            Error::Password(e) => write!(f, "pinpool: the password provider failed: {e}"),
            Error::Query(e) => write!(f, "pinpool: statement failed: {}", Said(e)),
            // By its digest: an error is logged, and the statement's values must not be.
            Error::PinRefused { reasons, statement } => write!(
                f,
                "pinpool: refused a statement that may pin an RDS Proxy session ({reasons}): {:?}",
                crate::pinning::digest(statement)
            ),
            Error::Closed => write!(f, "pinpool: the pool is closed"),
        }
    }
}

/// What the server or the socket said, for a person on call: the server's severity, SQLSTATE
/// and message (not its detail, which may quote a row's values, nor anything of the
/// statement's parameters), or the driver's word and, for a socket error, the system's.
struct Said<'a>(&'a tokio_postgres::Error);

impl fmt::Display for Said<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            write!(f, "{} {}: ", db.severity(), db.code().code())?;
            // A data exception (class 22) quotes the value it could not take, which is often
            // a parameter (`invalid input syntax for type integer: "..."`): what is quoted is
            // left out, the rest (the type, the SQLSTATE) stays.
            if !db.code().code().starts_with("22") {
                return f.write_str(db.message());
            }
            // From the first quote to the last: a value may itself hold quotes.
            let m = db.message();
            return match (m.find('"'), m.rfind('"')) {
                (Some(a), Some(b)) if a < b => {
                    write!(f, "{}\"...\"{}", &m[..a], &m[b + 1..])
                }
                (Some(a), _) => write!(f, "{}\"...", &m[..a]),
                _ => f.write_str(m),
            };
        }
        write!(f, "{}", self.0)?;
        match self
            .0
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
        {
            Some(io) => write!(f, ": {io}"),
            None => Ok(()),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Connect(e) | Error::Query(e) => Some(e),
            Error::Password(e) => Some(&**e),
            _ => None,
        }
    }
}
