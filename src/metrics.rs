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
//! | `pinpool_held_too_long` | counter | count | `when` (returned: held past `held_too_long`; invocation_end: still checked out when its invocation ended) |
//! | `pinpool_retries` | counter | count | |

use std::cell::RefCell;
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
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
/// Clients held too long, by `when`: `returned` (held longer than `held_too_long`) or
/// `invocation_end` (still checked out when their invocation ended, so held into the freeze).
pub const HELD_TOO_LONG: &str = "pinpool_held_too_long";
/// Statements run again on a fresh connection because theirs was closed before anything of
/// them was sent (RDS Proxy closed it for idleness, or restarted).
pub const RETRIES: &str = "pinpool_retries";

/// Describes every metric (units and help text) to the installed recorder. Call it once after
/// installing a recorder; CloudWatch EMF recorders take the unit from here.
pub fn describe() {
    describe_histogram!(
        ACQUIRE_WAIT,
        Unit::Milliseconds,
        "time get() waited for a connection"
    );
    describe_counter!(TIMEOUTS, Unit::Count, "timeouts by phase and cause");
    describe_counter!(
        HELD_TOO_LONG,
        Unit::Count,
        "clients held past held_too_long, or past the end of their invocation"
    );
    describe_counter!(
        RETRIES,
        Unit::Count,
        "statements run again on a fresh connection: theirs was closed before they were sent"
    );
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
    describe_counter!(
        STATEMENT_CACHE,
        Unit::Count,
        "statement cache hits, misses and evictions"
    );
}

/// The handles of the metrics recorded on every checkout and cached statement, registered
/// once per thread and recorder instead of on every call (a `metrics` macro builds and hashes
/// its key each time, and a recorder such as the CloudWatch EMF one takes a lock to look it
/// up).
struct Hot {
    /// The recorder these handles came from.
    recorder: *const (),
    in_use: Gauge,
    idle: Gauge,
    acquire_wait: Histogram,
    cache_hit: Counter,
    cache_miss: Counter,
}

thread_local! {
    static HOT: RefCell<Option<Hot>> = const { RefCell::new(None) };
}

impl Hot {
    fn register(recorder: *const ()) -> Hot {
        Hot {
            recorder,
            in_use: gauge!(CONNECTIONS_IN_USE),
            idle: gauge!(CONNECTIONS_IDLE),
            acquire_wait: histogram!(ACQUIRE_WAIT),
            cache_hit: counter!(STATEMENT_CACHE, "result" => "hit"),
            cache_miss: counter!(STATEMENT_CACHE, "result" => "miss"),
        }
    }
}

/// Runs `f` with the handles of the recorder in effect now (a local recorder, the global one
/// or none), registering them again when that recorder is not the one they came from.
fn hot(f: impl FnOnce(&Hot)) {
    let recorder = metrics::with_recorder(|r| std::ptr::from_ref(r).cast::<()>());
    let mut f = Some(f);
    let _ = HOT.try_with(|cell| {
        if let Ok(mut cell) = cell.try_borrow_mut() {
            let hot = match &mut *cell {
                Some(h) if h.recorder == recorder => h,
                slot => slot.insert(Hot::register(recorder)),
            };
            if let Some(f) = f.take() {
                f(hot);
            }
        }
    });
    // The cache is gone (a connection returned while its thread's locals are destroyed) or in
    // use further up this thread's stack: register for this call only.
    if let Some(f) = f {
        f(&Hot::register(recorder));
    }
}

/// A checkout: the time it waited, and the gauges after it.
pub(crate) fn checked_out(waited: Duration, in_use: usize, idle: usize) {
    hot(|h| {
        h.acquire_wait.record(waited.as_secs_f64() * 1000.0);
        h.in_use.set(in_use as f64);
        h.idle.set(idle as f64);
    });
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
    hot(|h| {
        h.in_use.set(in_use as f64);
        h.idle.set(idle as f64);
    });
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

pub(crate) fn cache_hit() {
    hot(|h| h.cache_hit.increment(1));
}

pub(crate) fn cache_miss() {
    hot(|h| h.cache_miss.increment(1));
}

pub(crate) fn held_too_long(when: &'static str) {
    counter!(HELD_TOO_LONG, "when" => when).increment(1);
}

pub(crate) fn retried() {
    counter!(RETRIES).increment(1);
}

pub(crate) fn cache_evictions(n: u64) {
    counter!(STATEMENT_CACHE, "result" => "eviction").increment(n);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use metrics::{Key, KeyName, Metadata, Recorder, SharedString, Unit};

    /// Records the names of the metrics described to it.
    #[derive(Default)]
    struct Described(Arc<Mutex<Vec<String>>>);

    impl Recorder for Described {
        fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
            self.0.lock().unwrap().push(key.as_str().to_owned());
        }
        fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
            self.0.lock().unwrap().push(key.as_str().to_owned());
        }
        fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
            self.0.lock().unwrap().push(key.as_str().to_owned());
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> metrics::Counter {
            metrics::Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[test]
    fn describe_covers_every_metric_named_in_this_file() {
        // The names of the `pub const` metric names above, read from the source itself, so a
        // new metric cannot be added without its description.
        let source = include_str!("metrics.rs");
        let mut named: Vec<String> = source
            .lines()
            // Spelled in two pieces, so this line is not itself counted as a constant.
            .filter(|l| l.starts_with(concat!("pub ", "const ")) && l.contains(": &str = \""))
            .filter_map(|l| l.split('"').nth(1).map(str::to_owned))
            .collect();
        named.sort();
        let names = Arc::new(Mutex::new(Vec::new()));
        let recorder = Described(names.clone());
        metrics::with_local_recorder(&recorder, super::describe);
        let mut described = names.lock().unwrap().clone();
        described.sort();
        assert!(named.len() >= 12, "{named:?}");
        assert_eq!(described, named);
    }
}
