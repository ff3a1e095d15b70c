//! Statement analysis: a text split into statements, and each one's reasons and transaction
//! effect (its leading words, pinning function calls, temporary objects, `DO` bodies).

use super::lexer::{Lexer, Tok, eq};
use super::{Reason, Reasons, TxnControl};

/// What [`scan`] reports for each statement.
pub(super) struct StmtInfo {
    /// Where its first token starts and its last ends.
    pub(super) start: usize,
    pub(super) end: usize,
    /// The text sent for it when a text is split at its `;`s: from after the previous `;`
    /// (or the start) to its own `;` (or the end), comments and blanks around it included.
    pub(super) from: usize,
    pub(super) to: usize,
    pub(super) reasons: Reasons,
    pub(super) txn: TxnControl,
}

const WORDS: usize = 6;

/// A `set_config(` call whose arguments are being read.
struct SetConfigCall {
    depth: usize,
    commas: u32,
    /// Tokens in the third argument, and whether the first of them is a literal true.
    third_tokens: u32,
    third_true: bool,
}

#[derive(Default)]
struct Stmt<'a> {
    start: Option<usize>,
    words: [&'a [u8]; WORDS],
    nwords: usize,
    /// The token that ended the leading run of words.
    after_words: Option<Tok<'a>>,
    collecting: bool,
    depth: usize,
    reasons: Reasons,
    set_config: Option<SetConfigCall>,
    /// `UPDATE` and `pg_settings` both seen: updating the view calls `set_config`.
    update: bool,
    pg_settings: bool,
    /// The last `DEFAULT` followed `SET` (`ALTER COLUMN c SET DEFAULT f()`: kept for later
    /// rows, not run).
    set_default: bool,
    /// `ALTER` and a column type that a sequence fills (`serial`, `AS IDENTITY`) both seen:
    /// a column added to a table with rows calls `nextval` for each row.
    alter: bool,
    sequence_column: bool,
}

impl<'a> Stmt<'a> {
    fn new() -> Stmt<'a> {
        Stmt {
            collecting: true,
            ..Default::default()
        }
    }

    fn word(&self, i: usize) -> &'a [u8] {
        if i < self.nwords { self.words[i] } else { b"" }
    }

    /// Does a call right after `DEFAULT` run now? A default is only kept for later rows in a
    /// `CREATE` statement (a new table has no rows; a function's or domain's default waits
    /// for a call) and after `SET DEFAULT`. Anywhere else it may run at once: `ALTER TABLE
    /// ... ADD COLUMN ... DEFAULT f()` fills every existing row, a PL/pgSQL declaration's
    /// default runs when its block starts. When unsure, it runs. Inside a `DO` block every
    /// default runs: a PL/pgSQL declaration may name a variable `create`.
    fn default_runs(&self) -> bool {
        !(self.set_default || eq(self.word(0), "create"))
    }

    fn finish_set_config(&mut self) {
        if let Some(call) = self.set_config.take() {
            let local = call.commas == 2 && call.third_tokens == 1 && call.third_true;
            self.reasons.insert(if local {
                Reason::SetConfigLocal
            } else {
                Reason::SetConfig
            });
        }
    }

    /// Statement-level rules, decided from the leading words. `nested`: inside a `DO` body,
    /// where PL/pgSQL reads `DECLARE` as its declaration section (no cursor) and `EXECUTE`
    /// as a string run as SQL (not read: untracked), never SQL's own statements.
    fn leading(&self, nested: bool) -> (Reasons, TxnControl) {
        let w = |i| self.word(i);
        let mut r = Reasons::EMPTY;
        let mut txn = TxnControl::None;
        let w0 = w(0);
        if eq(w0, "set") {
            let w1 = w(1);
            r.insert(
                if eq(w1, "local") || eq(w1, "transaction") || eq(w1, "constraints") {
                    Reason::SetLocal
                } else {
                    Reason::Set
                },
            );
        } else if eq(w0, "reset") {
            r.insert(Reason::Set);
        } else if eq(w0, "prepare") {
            r.insert(Reason::PreparedStatement);
            if eq(w(1), "transaction") {
                txn = TxnControl::End;
            }
        } else if nested && eq(w0, "execute") {
            r.insert(Reason::Untracked);
        } else if eq(w0, "execute") || eq(w0, "deallocate") {
            r.insert(Reason::PreparedStatement);
        } else if eq(w0, "discard") {
            r.insert(Reason::Discard);
        } else if eq(w0, "declare") && !nested {
            r.insert(Reason::Cursor);
        } else if eq(w0, "listen") {
            r.insert(Reason::Listen);
        } else if eq(w0, "load") {
            r.insert(Reason::Load);
        } else if eq(w0, "create") {
            let mut i = 1;
            if eq(w(i), "or") && eq(w(i + 1), "replace") {
                i += 2;
            }
            if eq(w(i), "global") || eq(w(i), "local") {
                i += 1;
            }
            let temp = eq(w(i), "temp") || eq(w(i), "temporary");
            let in_pg_temp = (eq(w(i), "table") || eq(w(i), "sequence") || eq(w(i), "view"))
                && eq(w(i + 1), "pg_temp")
                && self.nwords == i + 2
                && self.after_words == Some(Tok::Dot);
            if temp || in_pg_temp {
                r.insert(Reason::TempObject);
            }
        } else if eq(w0, "begin") || (eq(w0, "start") && eq(w(1), "transaction")) {
            txn = TxnControl::Begin;
        } else if eq(w0, "commit") || eq(w0, "end") || eq(w0, "rollback") || eq(w0, "abort") {
            let mut i = 1;
            if eq(w(i), "work") || eq(w(i), "transaction") {
                i += 1;
            }
            txn = if eq(w(1), "prepared") || eq(w(i), "to") {
                TxnControl::None
            } else if eq(w(i), "and") && eq(w(i + 1), "chain") {
                TxnControl::Begin
            } else {
                TxnControl::End
            };
        }
        (r, txn)
    }
}

/// Decodes a `U&"..."` identifier's body with escape character `esc`: `\XXXX`, `\+XXXXXX`
/// and a doubled escape. `None` when it does not decode.
fn decode_unicode(body: &[u8], esc: u8) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b != esc {
            out.push(b);
            i += 1;
            continue;
        }
        if body.get(i + 1) == Some(&esc) {
            out.push(esc);
            i += 2;
            continue;
        }
        let (start, digits) = if body.get(i + 1) == Some(&b'+') {
            (i + 2, 6)
        } else {
            (i + 1, 4)
        };
        let hex = body.get(start..start + digits)?;
        let code = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        let mut buf = [0u8; 4];
        out.extend_from_slice(char::from_u32(code)?.encode_utf8(&mut buf).as_bytes());
        i = start + digits;
    }
    Some(out)
}

/// Calls `f` with the name a token spells and whether it was quoted: an unquoted word (the
/// caller folds its case), a quoted name, or a `U&` name, decoded.
fn any_spelling(name: Tok<'_>, mut f: impl FnMut(&[u8], bool) -> bool) -> bool {
    match name {
        Tok::Word(w) => f(w, false),
        Tok::Quoted(w) => f(w, true),
        Tok::UQuoted(w, esc) => decode_unicode(w, esc).is_some_and(|d| f(&d, true)),
        _ => false,
    }
}

/// Is a name followed by `(` a call of a pinning function? Returns the reason, if it is one.
pub(super) fn pinning_function(name: Tok<'_>) -> Option<Reason> {
    let mut found = None;
    any_spelling(name, |word, quoted| {
        found = pinning_function_named(word, quoted);
        found.is_some()
    });
    found
}

/// True when a name token names `name` (lower case), as the server would read it.
fn is_name(tok: Tok<'_>, name: &str) -> bool {
    any_spelling(tok, |word, quoted| {
        if quoted {
            word == name.as_bytes()
        } else {
            eq(word, name)
        }
    })
}

/// True for `pg_temp` (or a backend's own `pg_temp_N`), the schema of temporary objects.
fn is_temp_schema(name: Tok<'_>) -> bool {
    any_spelling(name, |word, quoted| {
        let lower = |w: &[u8]| {
            if quoted {
                w.to_vec()
            } else {
                w.to_ascii_lowercase()
            }
        };
        let w = lower(word);
        w == b"pg_temp"
            || w.strip_prefix(b"pg_temp_")
                .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
    })
}

fn pinning_function_named(word: &[u8], quoted: bool) -> Option<Reason> {
    let is = |f: &str| {
        if quoted {
            word == f.as_bytes()
        } else {
            eq(word, f)
        }
    };
    match word.len() {
        6 | 7 if is("nextval") || is("setval") => Some(Reason::SequenceFunction),
        10 if is("set_config") => Some(Reason::SetConfig),
        16 | 20 | 23 | 27
            if is("pg_advisory_lock")
                || is("pg_advisory_lock_shared")
                || is("pg_try_advisory_lock")
                || is("pg_try_advisory_lock_shared") =>
        {
            Some(Reason::AdvisoryLock)
        }
        _ => None,
    }
}

/// Keywords after which `name (` names or defines something instead of calling it. Not
/// `DEFAULT`: PostgreSQL runs a default at once where it fills existing rows (see
/// [`Stmt::default_runs`]).
fn defines_name(before: Tok<'_>) -> bool {
    match before {
        Tok::Word(w) => [
            "table",
            "into",
            "view",
            "references",
            "function",
            "procedure",
            "routine",
            "aggregate",
            "exists",
            "with",
            "as",
            "type",
            "trigger",
        ]
        .iter()
        .any(|k| eq(w, k)),
        _ => false,
    }
}

/// Words that decide whether a definition runs at once.
#[derive(Clone, Copy)]
enum Definition {
    Default,
    Alter,
    /// `serial` and its sizes: a column that a sequence fills.
    Serial,
    Identity,
}

fn definition_word(w: &[u8]) -> Option<Definition> {
    let is = |k: &str| eq(w, k);
    // Most words are none of these: the length and the first letter turn them away.
    match (w.len(), w.first()?.to_ascii_lowercase()) {
        (5, b'a') if is("alter") => Some(Definition::Alter),
        (6, b's') if is("serial") => Some(Definition::Serial),
        (7, b'd') if is("default") => Some(Definition::Default),
        (7, b's') if eq(&w[..6], "serial") && matches!(w[6], b'2' | b'4' | b'8') => {
            Some(Definition::Serial)
        }
        (8, b'i') if is("identity") => Some(Definition::Identity),
        (9, b'b') if is("bigserial") => Some(Definition::Serial),
        (11, b's') if is("smallserial") => Some(Definition::Serial),
        _ => None,
    }
}

/// Runs the lexer over `text` and calls `report` once per non-empty statement; with
/// `backslash_strings`, `'...'` literals are read as the server reads them with
/// `standard_conforming_strings = off`. Returns whether the other setting could read the
/// text differently (a `'...'` literal held a backslash).
pub(super) fn scan(text: &str, backslash_strings: bool, report: impl FnMut(StmtInfo)) -> bool {
    scan_at(text, backslash_strings, false, report)
}

/// The reasons the code of a `DO` block pins for: its body is SQL and PL/pgSQL, scanned as
/// SQL (one level: a `DO` inside it is not looked into again, which keeps the scan linear).
/// RDS Proxy cannot see inside a block, but the session state it leaves is still there for
/// the next caller of the connection.
fn do_body_reasons(body: &[u8], quoted: bool) -> Reasons {
    // PL/pgSQL reads the body, and each statement in it when it runs, with the setting of
    // that moment, which the block may change: the reasons of both readings when they differ.
    let scan_body = |b: &[u8]| {
        let mut reasons = Reasons::EMPTY;
        if let Ok(text) = std::str::from_utf8(b)
            && scan_at(text, false, true, |s| reasons = reasons.union(s.reasons))
        {
            scan_at(text, true, true, |s| reasons = reasons.union(s.reasons));
        }
        reasons
    };
    if !quoted {
        return scan_body(body);
    }
    // A body in quotes holds its own quotes doubled; in an E'' string also backslash-escaped.
    // Which one it was is not kept, so both readings are scanned (each linear).
    let mut plain = Vec::with_capacity(body.len());
    let mut escaped = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        match (body[i], body.get(i + 1)) {
            (b'\'', Some(b'\'')) => {
                plain.push(b'\'');
                i += 2;
                continue;
            }
            _ => plain.push(body[i]),
        }
        i += 1;
    }
    let mut i = 0;
    while i < plain.len() {
        if plain[i] == b'\\' && i + 1 < plain.len() {
            escaped.push(plain[i + 1]);
            i += 2;
        } else {
            escaped.push(plain[i]);
            i += 1;
        }
    }
    scan_body(&plain).union(scan_body(&escaped))
}

/// Inside a `DO` block, where statements need not lead (`BEGIN SET ...; END`, `IF ... THEN
/// LISTEN ...`): the keywords that pin wherever they stand. `EXECUTE` runs a string as SQL,
/// which is not read: possibly pinning. A false alarm (the `SET` of an `UPDATE`) costs a
/// reconnect; a miss would leave the state for the next caller.
fn block_keyword(w: &[u8]) -> Option<Reason> {
    let is = |k: &str| eq(w, k);
    match w.len() {
        3 if is("set") => Some(Reason::Set),
        4 if is("load") => Some(Reason::Load),
        5 if is("reset") => Some(Reason::Set),
        6 if is("listen") => Some(Reason::Listen),
        7 if is("prepare") || is("discard") || is("execute") => Some(match w[0] {
            b'p' | b'P' => Reason::PreparedStatement,
            b'd' | b'D' => Reason::Discard,
            _ => Reason::Untracked,
        }),
        10 if is("deallocate") => Some(Reason::PreparedStatement),
        _ => None,
    }
}

fn scan_at(
    text: &str,
    backslash_strings: bool,
    nested: bool,
    mut report: impl FnMut(StmtInfo),
) -> bool {
    let mut lx = Lexer::new(text, backslash_strings);
    let mut st = Stmt::new();
    let mut prev = Tok::None;
    let mut prev2 = Tok::None;
    let mut end = 0;
    let mut from = 0;
    while let Some((at, tok)) = lx.next() {
        if tok == Tok::Semi {
            st.emit(end, from..at, nested, &mut report);
            from = at + 1;
            prev = Tok::None;
            prev2 = Tok::None;
            continue;
        }
        if st.start.is_none() {
            st.start = Some(at);
        }
        end = lx.i;
        st.collect_word(tok);
        st.set_config_argument(tok);
        st.token(tok, prev, prev2, nested);
        prev2 = prev;
        prev = tok;
    }
    st.emit(end, from..text.len(), nested, &mut report);
    lx.depends_on_setting
}

impl<'a> Stmt<'a> {
    /// Reports the statement read so far (ending at `end`, sent as `sent`), if any, and
    /// starts the next.
    fn emit(
        &mut self,
        end: usize,
        sent: std::ops::Range<usize>,
        nested: bool,
        report: &mut impl FnMut(StmtInfo),
    ) {
        self.finish_set_config();
        if let Some(start) = self.start {
            let (lead, txn) = self.leading(nested);
            let mut reasons = self.reasons.union(lead);
            if self.update && self.pg_settings {
                reasons.insert(Reason::SetConfig);
            }
            if self.alter && self.sequence_column {
                reasons.insert(Reason::SequenceFunction);
            }
            report(StmtInfo {
                start,
                end,
                from: sent.start,
                to: sent.end,
                reasons,
                txn,
            });
        }
        *self = Stmt::new();
    }

    /// The leading words, while they are being collected.
    #[inline(always)]
    fn collect_word(&mut self, tok: Tok<'a>) {
        if !self.collecting {
            return;
        }
        match tok {
            Tok::LParen if self.nwords == 0 => {}
            Tok::Word(w) if self.nwords < WORDS => {
                self.words[self.nwords] = w;
                self.nwords += 1;
            }
            _ => {
                self.collecting = false;
                self.after_words = Some(tok);
            }
        }
    }

    /// The arguments of a `set_config(` call being read.
    #[inline(always)]
    fn set_config_argument(&mut self, tok: Tok<'a>) {
        let Some(call) = self.set_config.as_mut() else {
            return;
        };
        if self.depth == call.depth && tok == Tok::Comma {
            call.commas += 1;
        } else if self.depth == call.depth && tok == Tok::RParen {
            self.finish_set_config();
        } else if call.commas == 2 {
            call.third_tokens += 1;
            if call.third_tokens == 1 {
                call.third_true = match tok {
                    Tok::Word(w) => eq(w, "true"),
                    Tok::Str(v) => ["t", "true", "on", "yes", "1"].iter().any(|k| eq(v, k)),
                    _ => false,
                };
            }
        }
    }

    /// What one token (after `prev2`, `prev`) says: a pinning function called, a temporary
    /// object, `pg_settings` updated, a `DO` body (read one level deep: `nested` inside it).
    #[inline(always)]
    fn token(&mut self, tok: Tok<'a>, prev: Tok<'a>, prev2: Tok<'a>, nested: bool) {
        // None of these words is one of the words below.
        if let Tok::Word(w) = tok
            && matches!(w.len(), 5..=9 | 11)
            && let Some(d) = definition_word(w)
        {
            match d {
                Definition::Default => {
                    self.set_default = matches!(prev, Tok::Word(p) if eq(p, "set"));
                }
                // The statement's leading word (the same slice the words collected hold);
                // anywhere in a `DO` body, where a block's `BEGIN` may come first.
                Definition::Alter => {
                    self.alter |= nested
                        || (self.nwords > 0 && std::ptr::eq(self.words[0].as_ptr(), w.as_ptr()));
                }
                Definition::Serial => self.sequence_column = true,
                // GENERATED ... AS IDENTITY, not REPLICA IDENTITY.
                Definition::Identity => {
                    self.sequence_column |= matches!(prev, Tok::Word(p) if eq(p, "as"));
                }
            }
            return;
        }
        match tok {
            Tok::LParen => {
                // Asked only of a pinning function's name (most `(` follow none).
                let defined = || match prev2 {
                    Tok::Word(w) if eq(w, "default") => !nested && !self.default_runs(),
                    _ => defines_name(prev2),
                };
                if let Some(reason) = pinning_function(prev).filter(|_| !defined()) {
                    if reason == Reason::SetConfig {
                        self.finish_set_config();
                        self.set_config = Some(SetConfigCall {
                            depth: self.depth + 1,
                            commas: 0,
                            third_tokens: 0,
                            third_true: false,
                        });
                    } else {
                        self.reasons.insert(reason);
                    }
                }
                self.depth += 1;
            }
            Tok::RParen => self.depth = self.depth.saturating_sub(1),
            Tok::Word(w) if matches!(w.len(), 4 | 9) && (eq(w, "temp") || eq(w, "temporary")) => {
                let after = |p: Tok<'_>, words: &[&str]| matches!(p, Tok::Word(p) if words.iter().any(|k| eq(p, k)));
                // CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP, INTO [GLOBAL|LOCAL] TEMP, anywhere
                // (EXPLAIN ANALYZE CREATE TEMP TABLE ...). Not INSERT/MERGE INTO a table "temp".
                let into = after(prev, &["into"]) && !after(prev2, &["insert", "merge"]);
                if into || after(prev, &["create", "replace", "global", "local"]) {
                    self.reasons.insert(Reason::TempObject);
                }
            }
            Tok::Dot if is_temp_schema(prev) => self.reasons.insert(Reason::TempObject),
            Tok::Word(w) if w.len() == 6 && eq(w, "update") => self.update = true,
            Tok::Word(_) | Tok::Quoted(_) | Tok::UQuoted(..) if is_name(tok, "pg_settings") => {
                self.pg_settings = true;
            }
            Tok::Dollar(body) if !nested && eq(self.word(0), "do") => {
                self.reasons = self.reasons.union(do_body_reasons(body, false));
            }
            Tok::Str(body) if !nested && eq(self.word(0), "do") => {
                self.reasons = self.reasons.union(do_body_reasons(body, true));
            }
            Tok::Word(w) if nested && block_keyword(w).is_some() => {
                if let Some(r) = block_keyword(w) {
                    self.reasons.insert(r);
                }
            }
            _ => {}
        }
    }
}
