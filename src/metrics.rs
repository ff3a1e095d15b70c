//! Every metric pinpool records, through the `metrics` crate. pinpool installs no recorder:
//! the application chooses one (for Lambda, a CloudWatch EMF recorder).
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `pinpool_acquire_wait` | histogram | milliseconds | |
//! | `pinpool_timeouts` | counter | count | `phase` (acquire, connect, query), `cause` (timeout, deadline) |
//! | `pinpool_connections_opened` | counter | count | |
//! | `pinpool_connect_errors` | counter | count | |
//! | `pinpool_connections_closed` | counter | count | `reason` ([`crate::CloseReason`]) |
//! | `pinpool_connections_in_use` | gauge | count | |
//! | `pinpool_connections_idle` | gauge | count | |
//! | `pinpool_pinned` | counter | count | `reason` ([`crate::pinning::Reason`]) |
//! | `pinpool_statements_refused` | counter | count | `reason` |
//! | `pinpool_statement_cache` | counter | count | `result` (hit, miss, eviction) |

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::error::{Phase, TimeoutCause};
use crate::pinning::Reasons;
use crate::status::CloseReason;

/// Time `get()` waited for a connection, opening included, in milliseconds.
pub const ACQUIRE_WAIT: &str = "pinpool_acquire_wait";
/// Timeouts, by `phase` and `cause`.
pub const TIMEOUTS: &str = "pinpool_timeouts";
/// Connections opened.
pub const CONNECTIONS_OPENED: &str = "pinpool_connections_opened";
/// Failed connection attempts.
pub const CONNECT_ERRORS: &str = "pinpool_connect_errors";
/// Connections closed, by `reason`.
pub const CONNECTIONS_CLOSED: &str = "pinpool_connections_closed";
/// Connections checked out now.
pub const CONNECTIONS_IN_USE: &str = "pinpool_connections_in_use";
/// Connections idle now.
pub const CONNECTIONS_IDLE: &str = "pinpool_connections_idle";
/// Connections that became possibly pinned, by `reason` (one count per reason).
pub const PINNED: &str = "pinpool_pinned";
/// Statements refused by the strict pin policy, by `reason`.
pub const STATEMENTS_REFUSED: &str = "pinpool_statements_refused";

/// Statement cache lookups and evictions, by `result` (hit, miss, eviction).
pub const STATEMENT_CACHE: &str = "pinpool_statement_cache";

/// Describes every metric (units and help text) to the installed recorder. Call it once after
/// installing a recorder; CloudWatch EMF recorders take the unit from here.
pub fn describe() {
    describe_histogram!(
        ACQUIRE_WAIT,
        Unit::Milliseconds,
        "time get() waited for a connection"
    );
    describe_counter!(TIMEOUTS, Unit::Count, "timeouts by phase and cause");
    describe_counter!(CONNECTIONS_OPENED, Unit::Count, "connections opened");
    describe_counter!(CONNECT_ERRORS, Unit::Count, "failed connection attempts");
    describe_counter!(
        CONNECTIONS_CLOSED,
        Unit::Count,
        "connections closed by reason"
    );
    describe_gauge!(CONNECTIONS_IN_USE, Unit::Count, "connections checked out");
    describe_gauge!(CONNECTIONS_IDLE, Unit::Count, "connections idle");
    describe_counter!(
        PINNED,
        Unit::Count,
        "connections that became possibly pinned, by reason"
    );
    describe_counter!(
        STATEMENTS_REFUSED,
        Unit::Count,
        "statements refused by the strict pin policy"
    );
}

pub(crate) fn acquire_wait(d: Duration) {
    histogram!(ACQUIRE_WAIT).record(d.as_secs_f64() * 1000.0);
}

pub(crate) fn timeout(phase: Phase, cause: TimeoutCause) {
    counter!(TIMEOUTS, "phase" => phase.as_str(), "cause" => cause.as_str()).increment(1);
}

pub(crate) fn opened() {
    counter!(CONNECTIONS_OPENED).increment(1);
}

pub(crate) fn connect_error() {
    counter!(CONNECT_ERRORS).increment(1);
}

pub(crate) fn closed(reason: CloseReason) {
    counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(1);
}

pub(crate) fn gauges(in_use: usize, idle: usize) {
    gauge!(CONNECTIONS_IN_USE).set(in_use as f64);
    gauge!(CONNECTIONS_IDLE).set(idle as f64);
}

pub(crate) fn pinned(reasons: Reasons) {
    for r in reasons.iter() {
        counter!(PINNED, "reason" => r.as_str()).increment(1);
    }
}

pub(crate) fn refused(reasons: Reasons) {
    for r in reasons.iter() {
        counter!(STATEMENTS_REFUSED, "reason" => r.as_str()).increment(1);
    }
}

pub(crate) fn cache(result: &'static str, n: u64) {
    counter!(STATEMENT_CACHE, "result" => result).increment(n);
}
