//! The checked-out client and its transactions. Every statement passes through
//! [`ctx::Ctx`]: it is checked against the pinning rules, bounded by the query timeout and
//! the deadline of the invocation it runs in, and counted in flight until it finishes.
//!
//! - `guarded.rs`: the bound of a call and the path every statement takes;
//! - `ctx.rs`: the statement methods on that path, and the statement cache's use;
//! - `retry.rs`: the safe retry on a fresh connection;
//! - `pooled.rs`: `PooledClient`;
//! - `transaction.rs`: `Transaction` and `TransactionBuilder`;
//! - `generic.rs`: `GenericClient`.

mod ctx;
mod generic;
mod guarded;
mod pooled;
mod retry;
mod transaction;

pub use generic::GenericClient;
pub(crate) use guarded::{answered_by_server, ends_session};
pub use pooled::{PinState, PooledClient};
pub use transaction::{Transaction, TransactionBuilder};
