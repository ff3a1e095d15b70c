//! A bounded, per-connection cache of prepared statements, least recently used first out.
//! Evicted statements are closed with the protocol Close message (when their last copy
//! drops), never with SQL `DEALLOCATE`, which pins an RDS Proxy session. And the pool's
//! learned statement shapes ([`Learned`]), for a statement new to a connection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio_postgres::types::Type;

use crate::statement::Statement;
use crate::sync::lock;

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

/// What a prepare on any of the pool's connections told about a SQL text: the types of its
/// parameters and how many columns it returns. With them a statement new to a connection is
/// sent unnamed (Parse, Bind, Execute, Sync) in one round trip instead of a prepare's round
/// trip and then the execute's.
#[derive(Clone)]
pub(crate) struct Shape {
    pub(crate) params: Arc<[Type]>,
    pub(crate) columns: usize,
}

/// The pool's learned [`Shape`]s, bounded in entries and bytes of SQL; the oldest learned
/// leaves first.
#[derive(Default)]
pub(crate) struct Learned {
    inner: Mutex<LearnedInner>,
}

#[derive(Default)]
struct LearnedInner {
    shapes: HashMap<Arc<str>, Shape>,
    /// Texts in the order they were learned; may hold texts forgotten since.
    order: VecDeque<Arc<str>>,
    bytes: usize,
}

/// At most this many learned texts...
const LEARNED_ENTRIES: usize = 1024;
/// ...and this many bytes of them.
const LEARNED_BYTES: usize = 1 << 20;

impl Learned {
    pub(crate) fn get(&self, sql: &str) -> Option<Shape> {
        lock(&self.inner).shapes.get(sql).cloned()
    }

    pub(crate) fn learn(&self, sql: &str, params: &[Type], columns: usize) {
        if sql.len() > LEARNED_BYTES {
            return;
        }
        let mut g = lock(&self.inner);
        let shape = Shape {
            params: params.into(),
            columns,
        };
        if let Some(s) = g.shapes.get_mut(sql) {
            *s = shape;
            return;
        }
        while g.shapes.len() >= LEARNED_ENTRIES || g.bytes + sql.len() > LEARNED_BYTES {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            if g.learned_as(&old) {
                g.shapes.remove(&old);
                g.bytes -= old.len();
            }
        }
        let key: Arc<str> = Arc::from(sql);
        g.bytes += key.len();
        g.order.push_back(key.clone());
        g.shapes.insert(key, shape);
        if g.order.len() > 2 * LEARNED_ENTRIES {
            // Forgotten texts pile up in the order: keep those still learned, each once.
            let LearnedInner { shapes, order, .. } = &mut *g;
            order.retain(|k| {
                shapes
                    .get_key_value(k)
                    .is_some_and(|(learned, _)| Arc::ptr_eq(learned, k))
            });
        }
    }

    /// The server refused a statement sent with `sql`'s learned shape: DDL may have changed
    /// it; the next call learns it again.
    pub(crate) fn forget(&self, sql: &str) {
        let mut g = lock(&self.inner);
        if let Some((k, _)) = g.shapes.remove_entry(sql) {
            g.bytes -= k.len();
        }
    }
}

impl LearnedInner {
    /// True when `key` in the order is the text as learned now, not an earlier copy of a
    /// text forgotten and learned again since: that copy says nothing of its age.
    fn learned_as(&self, key: &Arc<str>) -> bool {
        self.shapes
            .get_key_value(key)
            .is_some_and(|(learned, _)| Arc::ptr_eq(learned, key))
    }
}

#[cfg(test)]
mod learned_tests {
    use super::*;

    #[test]
    fn learned_shapes_stay_bounded_and_forget() {
        let l = Learned::default();
        for i in 0..3 * LEARNED_ENTRIES {
            let sql = format!("SELECT {i}");
            l.learn(&sql, &[Type::INT4], 1);
            if i % 2 == 0 {
                l.forget(&sql);
            }
        }
        let g = lock(&l.inner);
        assert!(g.shapes.len() <= LEARNED_ENTRIES);
        assert!(g.order.len() <= 2 * LEARNED_ENTRIES + 1);
        assert_eq!(g.bytes, g.shapes.keys().map(|k| k.len()).sum::<usize>());
        drop(g);
        let last = format!("SELECT {}", 3 * LEARNED_ENTRIES - 1);
        assert_eq!(l.get(&last).unwrap().params[..], [Type::INT4]);
    }

    /// A text the server keeps refusing (a unique violation each call: any server error
    /// forgets the shape) is forgotten and learned again each call: each learning left one
    /// more copy of the text in the order, kept by the trim since the text is learned, so the
    /// order grew without bound.
    #[test]
    fn a_text_forgotten_and_learned_again_stays_once_in_the_order() {
        let l = Learned::default();
        let sql = format!("INSERT INTO t VALUES ($1) -- {}", "x".repeat(1000));
        for _ in 0..10 * LEARNED_ENTRIES {
            l.learn(&sql, &[Type::INT4], 0);
            l.forget(&sql);
        }
        l.learn(&sql, &[Type::INT4], 0);
        let g = lock(&l.inner);
        assert!(
            g.order.len() <= 2 * LEARNED_ENTRIES + 1,
            "{}",
            g.order.len()
        );
        drop(g);
        // An older copy leaving the order first does not take the text learned since with it.
        let l = Learned::default();
        l.learn("SELECT $1", &[Type::INT4], 1);
        l.forget("SELECT $1");
        for i in 0..LEARNED_ENTRIES - 2 {
            l.learn(&format!("SELECT {i}"), &[], 1);
        }
        l.learn("SELECT $1", &[Type::INT4], 1);
        l.learn("SELECT 'b'", &[], 1);
        l.learn("SELECT 'c'", &[], 1);
        assert!(l.get("SELECT $1").is_some(), "learned late, evicted first");
        assert!(
            l.get("SELECT 0").is_none(),
            "the oldest learned leaves first"
        );
    }
}
