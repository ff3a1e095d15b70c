// The README is the crate page, whatever the features: its examples that need a feature are
// compiled (as doctests) only with it.
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod cache;
mod client;
mod config;
mod conn;
mod connect;
mod deadline;
#[cfg(feature = "emulator")]
pub mod emulator;
mod error;
mod invocation;
#[cfg(feature = "lambda")]
pub mod lambda;
#[cfg(test)]
mod memory;
pub mod metrics;
pub mod pinning;
mod plain;
mod pool;
#[cfg(feature = "serde")]
mod serde_config;
mod slots;
mod statement;
mod status;
mod stream;
mod sync;
#[cfg(feature = "tls")]
mod tls;
mod wire;

pub use client::{GenericClient, PinState, PooledClient, Transaction, TransactionBuilder};
pub use config::{
    Builder, ConnectionConfig, FreezeCheck, PROXY_MAX_CLIENT_LIFETIME, PinPolicy, Proxy,
};
pub(crate) use connect::BoxFuture;
pub use connect::{CachedPassword, PasswordProvider};
pub use error::{BoxError, Error, Phase, TimeoutCause};
pub use invocation::{Invocation, InvocationFuture};
pub use pool::Pool;
#[cfg(feature = "serde")]
pub use serde_config::{Config, PoolConfig, Rules};
pub use statement::{Statement, ToStatement};
pub use status::{CloseReason, ClosedCounts, Status};
pub use stream::{CopyInSink, CopyOutStream, RowStream, SimpleQueryStream, Tracked};
pub use tokio_postgres;
