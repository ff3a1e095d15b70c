//! The fast path: texts that certainly neither pin nor control a transaction, recognised
//! without lexing.

use super::OVERSIZED_BYTES;
use super::lexer::{CLASS, LOOK, SPACE, Tok, eq, is_ident_cont, is_ident_start};
use super::statements::pinning_function;

/// Keywords that decide a statement's verdict when they lead it.
const LEADING: [&str; 18] = [
    "do",
    "set",
    "reset",
    "prepare",
    "execute",
    "deallocate",
    "discard",
    "declare",
    "listen",
    "load",
    "create",
    // ALTER TABLE ... ADD COLUMN id serial: a sequence fills the rows, no call in sight.
    "alter",
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
];

/// True when `s` certainly neither pins nor controls a transaction, judged without lexing:
/// one statement (no `;`), led by a word that is no statement-level rule's, with no comment,
/// no `temp` anywhere, and no pinning function's name before a `(`. Looking at every byte,
/// literals included, it can only send more texts to the full scan, never fewer.
#[inline]
pub(super) fn plainly_safe(s: &[u8]) -> bool {
    if s.len() > OVERSIZED_BYTES {
        return false;
    }
    let lead = match s.iter().position(|&b| CLASS[b as usize] & SPACE == 0) {
        Some(p) => p,
        None => return true,
    };
    if !is_ident_start(s[lead]) {
        return false;
    }
    let word_end = s[lead..]
        .iter()
        .position(|&b| !is_ident_cont(b))
        .map_or(s.len(), |p| lead + p);
    if LEADING.iter().any(|k| eq(&s[lead..word_end], k)) {
        return false;
    }
    for i in 0..s.len() {
        let b = s[i];
        if CLASS[b as usize] & LOOK == 0 {
            continue;
        }
        match b {
            b';' | b'"' => return false,
            b'-' | b'/' if matches!(s.get(i + 1), Some(b'-' | b'*')) => return false,
            b't' | b'T' if s.len() >= i + 4 && eq(&s[i..i + 4], "temp") => return false,
            b'_' if i >= 2 && s.len() >= i + 9 && eq(&s[i - 2..i + 9], "pg_settings") => {
                return false;
            }
            b'(' => {
                let before = s[..i]
                    .iter()
                    .rposition(|&c| CLASS[c as usize] & SPACE == 0)
                    .map_or(0, |p| p + 1);
                let mut name_start = s[..before]
                    .iter()
                    .rposition(|&c| !is_ident_cont(c))
                    .map_or(0, |p| p + 1);
                // A name starts at a letter: in `$nextval(` the lexer sees `$`, then `nextval`.
                while name_start < before && !is_ident_start(s[name_start]) {
                    name_start += 1;
                }
                if pinning_function(Tok::Word(&s[name_start..before])).is_some() {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pinning::{StandardStrings, TxnControl, classify_full};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The fast path never calls a text safe that the full scan finds pinning, under either
        /// setting of `standard_conforming_strings`.
        #[test]
        fn the_fast_path_agrees_with_the_full_scan(
            s in r#"([ \n]|SELECT|select|set|SET|create|temp|TeMp|\$|\$\$|'|"|E'|\\|--|/\*|\*/|;|\(|\)|,|\.|nextval|setval|set_config|pg_advisory_lock|x|1|begin|alter|ALTER|add|serial|as|identity|default){0,24}"#
        ) {
            if plainly_safe(s.as_bytes()) {
                let full = classify_full(&s, StandardStrings::Unknown);
                prop_assert!(full.reasons.is_empty() && full.txn == TxnControl::None, "{:?}: {:?}", s, full);
            }
        }
    }

    #[test]
    fn the_fast_path_takes_plain_queries() {
        assert!(plainly_safe(b"SELECT * FROM users WHERE id = $1"));
        assert!(plainly_safe(b"  insert into t (a) values (lower($1))"));
        assert!(!plainly_safe(b"SELECT nextval ('s')"));
        assert!(!plainly_safe(b"SELECT 1 FROM attempts"));
        assert!(!plainly_safe(b"SET a = 1"));
        assert!(!plainly_safe(b"SELECT 1; SELECT 2"));
        assert!(!plainly_safe(b"SELECT$\n$nextval("));
        assert!(!plainly_safe(b"SELECT 1nextval(2)"));
    }
}
