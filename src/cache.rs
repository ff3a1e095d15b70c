//! A bounded, per-connection cache of prepared statements, least recently used first out.
//! Evicted statements are closed with the protocol Close message (when their last copy
//! drops), never with SQL `DEALLOCATE`, which pins an RDS Proxy session.

use std::collections::HashMap;
use std::sync::Arc;

use crate::statement::Statement;

struct Entry {
    stmt: Statement,
    used: u64,
}

#[derive(Default)]
pub(crate) struct StatementCache {
    entries: HashMap<Arc<str>, Entry>,
    tick: u64,
    bytes: usize,
}

impl StatementCache {
    pub(crate) fn get(&mut self, sql: &str) -> Option<Statement> {
        self.tick += 1;
        let e = self.entries.get_mut(sql)?;
        e.used = self.tick;
        Some(e.stmt.clone())
    }

    /// Adds a statement, evicting the least recently used ones until at most `capacity`
    /// statements and `max_bytes` of SQL remain. Returns the evicted statements (dropping them
    /// closes them on the server once nothing else holds them).
    pub(crate) fn insert(
        &mut self,
        stmt: Statement,
        capacity: usize,
        max_bytes: usize,
    ) -> Vec<Statement> {
        let len = stmt.sql.len();
        if capacity == 0 || len > max_bytes {
            return Vec::new();
        }
        let mut evicted = Vec::new();
        if let Some(old) = self.remove(&stmt.sql) {
            evicted.push(old);
        }
        while self.entries.len() >= capacity || self.bytes + len > max_bytes {
            let Some(lru) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            evicted.extend(self.remove(&lru));
        }
        self.tick += 1;
        self.bytes += len;
        self.entries.insert(
            stmt.sql.clone(),
            Entry {
                stmt,
                used: self.tick,
            },
        );
        evicted
    }

    pub(crate) fn remove(&mut self, sql: &str) -> Option<Statement> {
        let e = self.entries.remove(sql)?;
        self.bytes -= e.stmt.sql.len();
        Some(e.stmt)
    }
}
