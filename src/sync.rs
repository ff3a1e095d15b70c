//! Locks that outlive a panic. Each of pinpool's locks guards a small record (the idle set,
//! the slot waiters, a connection's statement cache, an invocation's lent clients) that every
//! critical section leaves consistent, and none calls user code while holding one; so a panic
//! elsewhere on a thread that held a lock (a test's failed assertion, a user's panic unwinding
//! through a guard's drop) must not make every later use of the pool panic too.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering it if a panic poisoned it.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
