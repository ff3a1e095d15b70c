//! Which SQL may pin an RDS Proxy session: the rules, as a pure function of the statement text.
//!
//! RDS Proxy multiplexes client sessions over few database connections, one transaction at a
//! time, unless a statement changes session state that the proxy does not track. Then it *pins*
//! the client connection to its database connection until the client disconnects. The rules
//! here follow AWS's list of PostgreSQL pinning conditions:
//!
//! | reason | statements |
//! |---|---|
//! | [`Reason::Set`] | `SET`, `SET SESSION`, `SET ROLE`, `SET SESSION AUTHORIZATION`, `RESET` |
//! | [`Reason::SetLocal`] (possibly) | `SET LOCAL`, `SET TRANSACTION`, `SET CONSTRAINTS` |
//! | [`Reason::SetConfig`] | `set_config(name, value, false)` anywhere in a statement |
//! | [`Reason::SetConfigLocal`] (possibly) | `set_config(name, value, true)` |
//! | [`Reason::PreparedStatement`] | SQL `PREPARE`, `EXECUTE`, `DEALLOCATE` |
//! | [`Reason::Discard`] | `DISCARD` |
//! | [`Reason::TempObject`] | `CREATE TEMP TABLE/SEQUENCE/VIEW`, `SELECT ... INTO TEMP`, `pg_temp.` objects |
//! | [`Reason::Cursor`] | `DECLARE` |
//! | [`Reason::Listen`] | `LISTEN` |
//! | [`Reason::Load`] | `LOAD` |
//! | [`Reason::SequenceFunction`] | `nextval(...)`, `setval(...)` anywhere in a statement |
//! | [`Reason::AdvisoryLock`] | `pg_advisory_lock`, `pg_try_advisory_lock` and their `_shared` forms (not the `_xact_` ones) |
//! | [`Reason::Oversized`] | statement text over 16,384 bytes |
//! | [`Reason::Parse`] (legacy rules only) | any extended-protocol Parse |
//!
//! AWS is silent on the transaction-scoped forms for PostgreSQL: they are *possibly* pinning and
//! count as pinning unless [`PinRules::set_local_safe`] says otherwise.
//!
//! Nothing inside string literals (`'...'`, `E'...'`, `$tag$...$tag$`), quoted identifiers or
//! comments triggers a rule. Functions, procedures and `DO` blocks can change session state
//! inside their bodies without the proxy noticing (AWS: calling them never pins); that leaks
//! state to other clients and is not detected here. The same holds for a column default that
//! calls `nextval` (a `serial` column): the proxy sees only the `INSERT`.
//!
//! The scan is a single pass over the bytes: linear time, no allocation, no panic on any input.

use std::fmt;

/// Statements longer than this many bytes pin an RDS Proxy session.
pub const OVERSIZED_BYTES: usize = 16_384;

/// Why a statement may pin an RDS Proxy session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// `SET`, `RESET`, `SET ROLE`, `SET SESSION AUTHORIZATION`...
    Set,
    /// `SET LOCAL`, `SET TRANSACTION`, `SET CONSTRAINTS`: possibly pinning.
    SetLocal,
    /// `set_config(name, value, false)` or with a non-literal third argument.
    SetConfig,
    /// `set_config(name, value, true)`: possibly pinning.
    SetConfigLocal,
    /// SQL-level `PREPARE`, `EXECUTE`, `DEALLOCATE`.
    PreparedStatement,
    /// `DISCARD`.
    Discard,
    /// Creating a temporary table, sequence or view.
    TempObject,
    /// `DECLARE` (a cursor).
    Cursor,
    /// `LISTEN`.
    Listen,
    /// `LOAD 'library'`.
    Load,
    /// `nextval(...)` or `setval(...)`.
    SequenceFunction,
    /// A session-level advisory lock function.
    AdvisoryLock,
    /// Statement text over [`OVERSIZED_BYTES`].
    Oversized,
    /// An extended-protocol Parse, under the legacy rules of proxies before November 2023.
    Parse,
    /// SQL whose effect pinpool cannot know: a protocol-level FunctionCall (a function called
    /// by its OID), or a `DO` block's `EXECUTE` of a string.
    Untracked,
    /// The server reported changed session state: a reported setting differs from the
    /// connection's start outside a transaction block (a `SET` hidden in a function, say).
    SessionChanged,
}

const ALL: [Reason; 16] = [
    Reason::Set,
    Reason::SetLocal,
    Reason::SetConfig,
    Reason::SetConfigLocal,
    Reason::PreparedStatement,
    Reason::Discard,
    Reason::TempObject,
    Reason::Cursor,
    Reason::Listen,
    Reason::Load,
    Reason::SequenceFunction,
    Reason::AdvisoryLock,
    Reason::Oversized,
    Reason::Parse,
    Reason::Untracked,
    Reason::SessionChanged,
];

impl Reason {
    /// All reasons, in a fixed order.
    pub fn all() -> &'static [Reason] {
        &ALL
    }

    /// The reason in snake_case, as in metric labels and the lint's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Set => "set",
            Reason::SetLocal => "set_local",
            Reason::SetConfig => "set_config",
            Reason::SetConfigLocal => "set_config_local",
            Reason::PreparedStatement => "prepared_statement",
            Reason::Discard => "discard",
            Reason::TempObject => "temp_object",
            Reason::Cursor => "cursor",
            Reason::Listen => "listen",
            Reason::Load => "load",
            Reason::SequenceFunction => "sequence_function",
            Reason::AdvisoryLock => "advisory_lock",
            Reason::Oversized => "oversized",
            Reason::Parse => "parse",
            Reason::Untracked => "untracked",
            Reason::SessionChanged => "session_changed",
        }
    }

    /// True when AWS does not say whether this pins (PostgreSQL), or pinpool cannot see.
    pub fn is_possible(self) -> bool {
        matches!(
            self,
            Reason::SetLocal | Reason::SetConfigLocal | Reason::Untracked
        )
    }

    /// The pin-free alternative, for logs.
    pub fn advice(self) -> &'static str {
        match self {
            Reason::Set => {
                "move the setting to the proxy's initialization query or a role setting (ALTER ROLE ... SET), or use SET LOCAL inside a transaction"
            }
            Reason::SetLocal => {
                "AWS does not document whether SET LOCAL pins on PostgreSQL; if your proxy does not pin on it, use PinRules::set_local_safe"
            }
            Reason::SetConfig => {
                "call set_config(name, value, true) inside a transaction, or use a role setting"
            }
            Reason::SetConfigLocal => {
                "AWS does not document whether set_config(..., true) pins on PostgreSQL; if your proxy does not pin on it, use PinRules::set_local_safe"
            }
            Reason::PreparedStatement => {
                "use protocol-level prepared statements (prepare()) instead of SQL PREPARE/EXECUTE"
            }
            Reason::Discard => "never send DISCARD or reset queries; close the connection instead",
            Reason::TempObject => {
                "use a regular table, a CTE or unnest() instead of a temporary object"
            }
            Reason::Cursor => {
                "page with LIMIT and a key, or use a portal inside a transaction (Transaction::bind)"
            }
            Reason::Listen => "LISTEN needs a direct connection to the database, not the proxy",
            Reason::Load => {
                "load libraries through shared_preload_libraries or session_preload_libraries"
            }
            Reason::SequenceFunction => {
                "let the column default draw the value and read it with INSERT ... RETURNING"
            }
            Reason::AdvisoryLock => "use pg_advisory_xact_lock inside a transaction",
            Reason::Oversized => {
                "keep statement text under 16,384 bytes: pass large values as parameters"
            }
            Reason::Parse => {
                "proxies before November 2023 pin on every extended-protocol Parse: upgrade the proxy"
            }
            Reason::Untracked => {
                "a protocol FunctionCall or a DO block's EXECUTE may do anything: call the function from SQL, or run the statement itself"
            }
            Reason::SessionChanged => {
                "a function or procedure changed a session setting: make it SET LOCAL, or set_config(..., true), inside a transaction"
            }
        }
    }

    const fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Reason`]s (a bit set: copying it allocates nothing).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Reasons(u16);

impl Reasons {
    /// The empty set.
    pub const EMPTY: Reasons = Reasons(0);

    /// A set of one reason.
    pub fn of(reason: Reason) -> Reasons {
        Reasons(reason.bit())
    }

    /// True when no reason is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True when `reason` is in the set.
    pub fn contains(self, reason: Reason) -> bool {
        self.0 & reason.bit() != 0
    }

    /// Adds a reason.
    pub fn insert(&mut self, reason: Reason) {
        self.0 |= reason.bit();
    }

    /// The union of both sets.
    #[must_use]
    pub fn union(self, other: Reasons) -> Reasons {
        Reasons(self.0 | other.0)
    }

    /// The set without `reason`.
    #[must_use]
    pub fn without(self, reason: Reason) -> Reasons {
        Reasons(self.0 & !reason.bit())
    }

    /// True when the set is not empty and holds only possible reasons
    /// ([`Reason::is_possible`]).
    pub fn only_possible(self) -> bool {
        !self.is_empty() && self.iter().all(Reason::is_possible)
    }

    /// The reasons, in the order of [`Reason::all`].
    pub fn iter(self) -> impl Iterator<Item = Reason> {
        ALL.into_iter().filter(move |r| self.contains(*r))
    }

    pub(crate) fn bits(self) -> u16 {
        self.0
    }

    pub(crate) fn from_bits(bits: u16) -> Reasons {
        Reasons(bits)
    }
}

impl fmt::Debug for Reasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for Reasons {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(r.as_str())?;
        }
        Ok(())
    }
}

/// What a text does to the transaction state, judged from its statements in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TxnControl {
    /// No statement starts or ends a transaction.
    None,
    /// The text leaves a transaction open (`BEGIN`, `START TRANSACTION`, `COMMIT AND CHAIN`).
    Begin,
    /// The text ends a transaction (`COMMIT`, `END`, `ROLLBACK`, `ABORT`, `PREPARE TRANSACTION`).
    End,
}

/// The verdict on a text: the reasons it may pin for, and what it does to the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Classification {
    /// Every reason found (before any [`PinRules`] adjustment).
    pub reasons: Reasons,
    /// The text's effect on the transaction state.
    pub txn: TxnControl,
}

impl Classification {
    /// True when any reason was found.
    pub fn may_pin(&self) -> bool {
        !self.reasons.is_empty()
    }

    /// True when reasons were found and all of them are only possible ones.
    pub fn possibly(&self) -> bool {
        self.reasons.only_possible()
    }
}

/// How a statement reaches the server, which matters for the legacy rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// A simple-protocol Query message (`simple_query`, `batch_execute`).
    Simple,
    /// An extended-protocol Parse (`query(&str)`, `query_typed`, `prepare`).
    Parse,
    /// Bind/Execute of a statement prepared earlier: no Parse is sent.
    Execute,
}

/// The rules in force: today's AWS documentation by default, adjustable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PinRules {
    set_local_safe: bool,
    legacy_parse: bool,
}

impl PinRules {
    /// Today's rules (AWS documentation since November 2023); transaction-scoped forms count
    /// as pinning.
    pub fn new() -> PinRules {
        PinRules::default()
    }

    /// The rules of proxies before November 2023: any extended-protocol Parse pins.
    pub fn legacy() -> PinRules {
        PinRules::new().legacy_parse(true)
    }

    /// Treat `SET LOCAL`, `SET TRANSACTION`, `SET CONSTRAINTS` and `set_config(..., true)` as
    /// not pinning.
    #[must_use]
    pub fn set_local_safe(mut self, safe: bool) -> PinRules {
        self.set_local_safe = safe;
        self
    }

    /// Model proxies from before November 2023, which pinned on every Parse message.
    #[must_use]
    pub fn legacy_parse(mut self, on: bool) -> PinRules {
        self.legacy_parse = on;
        self
    }

    /// True when transaction-scoped forms are treated as safe.
    pub fn is_set_local_safe(&self) -> bool {
        self.set_local_safe
    }

    /// True when any Parse pins.
    pub fn is_legacy_parse(&self) -> bool {
        self.legacy_parse
    }

    /// The reasons that pin under these rules, for a classified text sent with `protocol`.
    pub fn pinning_reasons(&self, c: &Classification, protocol: Protocol) -> Reasons {
        let mut r = c.reasons;
        if self.set_local_safe {
            r = r.without(Reason::SetLocal).without(Reason::SetConfigLocal);
        }
        if self.legacy_parse && protocol == Protocol::Parse {
            r.insert(Reason::Parse);
        }
        r
    }

    /// Classifies `sql` and applies these rules: the reasons it pins for.
    pub fn check(&self, sql: &str, protocol: Protocol) -> Reasons {
        self.pinning_reasons(&classify(sql), protocol)
    }
}

/// Classifies a text that may hold several statements (as `batch_execute` sends).
pub fn classify(sql: &str) -> Classification {
    if plainly_safe(sql.as_bytes()) {
        return Classification {
            reasons: Reasons::EMPTY,
            txn: TxnControl::None,
        };
    }
    classify_full(sql)
}

/// The full scan behind [`classify`].
fn classify_full(sql: &str) -> Classification {
    let mut reasons = Reasons::EMPTY;
    let mut txn = TxnControl::None;
    scan(sql, |s| {
        reasons = reasons.union(s.reasons);
        if s.txn != TxnControl::None {
            txn = s.txn;
        }
    });
    if sql.len() > OVERSIZED_BYTES {
        reasons.insert(Reason::Oversized);
    }
    Classification { reasons, txn }
}

/// One statement of a linted text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding<'a> {
    /// 1-based position of the statement in the text.
    pub statement: usize,
    /// 1-based line on which the statement starts.
    pub line: usize,
    /// The statement's text, without the terminating `;`.
    pub text: &'a str,
    /// The statement's classification (its own length decides [`Reason::Oversized`]).
    pub classification: Classification,
    /// The reasons it pins for under the rules given to [`lint`].
    pub pins: Reasons,
}

/// Splits `sql` into statements (aware of literals, quoted identifiers and comments) and
/// classifies each, as the `pinpool-lint` command does. Under the legacy rules every statement
/// pins ([`Reason::Parse`]): applications send them with the extended protocol.
///
/// ```
/// use pinpool::pinning::{PinRules, lint};
/// let findings = lint("SELECT 1;\nSET search_path = app;", &PinRules::new());
/// assert!(findings[0].pins.is_empty());
/// assert_eq!(findings[1].line, 2);
/// assert!(!findings[1].pins.is_empty());
/// ```
pub fn lint<'a>(sql: &'a str, rules: &PinRules) -> Vec<Finding<'a>> {
    let protocol = if rules.is_legacy_parse() {
        Protocol::Parse
    } else {
        Protocol::Simple
    };
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut line = 1;
    let mut counted = 0;
    scan(sql, |s| {
        line += bytes[counted..s.start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        counted = s.start;
        let text = &sql[s.start..s.end];
        let mut classification = Classification {
            reasons: s.reasons,
            txn: s.txn,
        };
        if text.len() > OVERSIZED_BYTES {
            classification.reasons.insert(Reason::Oversized);
        }
        out.push(Finding {
            statement: out.len() + 1,
            line,
            text,
            pins: rules.pinning_reasons(&classification, protocol),
            classification,
        });
    });
    out
}

// ---------------------------------------------------------------------------------------------
// The lexer.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    /// An unquoted identifier or keyword.
    Word(&'a [u8]),
    /// A quoted identifier's raw content.
    Quoted(&'a [u8]),
    /// A Unicode-escaped quoted identifier's raw content (`U&"..."`), escapes undecoded, and
    /// its escape character (`\\`, or the one a `UESCAPE` clause names).
    UQuoted(&'a [u8], u8),
    /// A string literal's raw content.
    Str(&'a [u8]),
    LParen,
    RParen,
    Comma,
    Dot,
    Semi,
    /// A dollar-quoted string's body.
    Dollar(&'a [u8]),
    /// Numbers, operators, parameters.
    Other,
    /// Nothing yet.
    None,
}

struct Lexer<'a> {
    s: &'a [u8],
    /// The same text as `s`, for searches that need a `str` (slicing it at ASCII bytes
    /// costs nothing, unlike validating UTF-8 again).
    text: &'a str,
    i: usize,
}

const START: u8 = 1; // may start an identifier
const CONT: u8 = 2; // may continue an identifier
const SPACE: u8 = 4; // white space
const LOOK: u8 = 8; // worth a look in the fast path: ( ; - / " t T

/// Byte classes, looked up once per byte: the lexer's inner loops are table lookups.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            t[b] = START | CONT;
        } else if c.is_ascii_digit() || c == b'$' {
            t[b] = CONT;
        } else if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            t[b] = SPACE;
        }
        if matches!(c, b'(' | b';' | b'-' | b'/' | b'"' | b't' | b'T' | b'_') {
            t[b] |= LOOK;
        }
        b += 1;
    }
    t
};

fn is_ident_start(b: u8) -> bool {
    CLASS[b as usize] & START != 0
}

fn is_ident_cont(b: u8) -> bool {
    CLASS[b as usize] & CONT != 0
}

impl<'a> Lexer<'a> {
    fn peek(&self, at: usize) -> u8 {
        self.s.get(at).copied().unwrap_or(0)
    }

    /// Skips a quoted run starting after the opening `q` (at `self.i`); `q` doubled is an
    /// escaped `q`; with `backslash`, a backslash escapes the next byte. Returns the content.
    fn quoted(&mut self, q: u8, backslash: bool) -> &'a [u8] {
        let start = self.i;
        let s = self.s;
        let mut i = start;
        while i < s.len() {
            let b = s[i];
            if backslash && b == b'\\' {
                i += 2;
                continue;
            }
            if b == q {
                if s.get(i + 1) == Some(&q) {
                    i += 2;
                    continue;
                }
                self.i = i + 1;
                return &s[start..i];
            }
            i += 1;
        }
        self.i = s.len();
        &s[start.min(s.len())..]
    }

    /// Skips whitespace and comments.
    fn skip_blank(&mut self) {
        let s = self.s;
        while let Some(&b) = s.get(self.i) {
            if CLASS[b as usize] & SPACE != 0 {
                self.i += 1;
            } else if b == b'-' && self.peek(self.i + 1) == b'-' {
                match s[self.i..].iter().position(|&c| c == b'\n') {
                    Some(p) => self.i += p + 1,
                    None => self.i = s.len(),
                }
            } else if b == b'/' && self.peek(self.i + 1) == b'*' {
                let mut depth = 1usize;
                self.i += 2;
                while self.i < s.len() && depth > 0 {
                    if s[self.i] == b'/' && self.peek(self.i + 1) == b'*' {
                        depth += 1;
                        self.i += 2;
                    } else if s[self.i] == b'*' && self.peek(self.i + 1) == b'/' {
                        depth -= 1;
                        self.i += 2;
                    } else {
                        self.i += 1;
                    }
                }
            } else {
                return;
            }
        }
    }

    /// After a `U&"..."` name: the escape character of a `UESCAPE 'c'` clause, consumed, if
    /// one follows. Reads bytes only, no tokens, so a run of such names stays linear.
    fn uescape(&mut self) -> Option<u8> {
        let at = self.i;
        self.skip_blank();
        let s = self.s;
        let word_end = self.i + 7;
        let is_clause = s.get(self.i..word_end).is_some_and(|w| eq(w, "uescape"))
            && !s.get(word_end).is_some_and(|&b| is_ident_cont(b));
        if is_clause {
            self.i = word_end;
            self.skip_blank();
            if let (Some(b'\''), Some(&c), Some(b'\'')) =
                (s.get(self.i), s.get(self.i + 1), s.get(self.i + 2))
            {
                self.i += 3;
                return Some(c);
            }
        }
        self.i = at;
        None
    }

    /// The next token and the offset where it starts, skipping whitespace and comments.
    fn next(&mut self) -> Option<(usize, Tok<'a>)> {
        let s = self.s;
        self.skip_blank();
        let b = *s.get(self.i)?;
        if CLASS[b as usize] & START != 0 {
            // The most common token first: an identifier or keyword.
            return Some((self.i, self.word()));
        }
        let start = self.i;
        let b = s[start];
        self.i += 1;
        let tok = match b {
            b'(' => Tok::LParen,
            b')' => Tok::RParen,
            b',' => Tok::Comma,
            b'.' => Tok::Dot,
            b';' => Tok::Semi,
            b'\'' => Tok::Str(self.quoted(b'\'', false)),
            b'"' => Tok::Quoted(self.quoted(b'"', false)),
            b'$' => self.dollar(start),
            b'0'..=b'9' => {
                while self.i < s.len() && (s[self.i].is_ascii_alphanumeric() || s[self.i] == b'_') {
                    self.i += 1;
                }
                Tok::Other
            }
            _ => Tok::Other,
        };
        Some((start, tok))
    }

    /// An identifier or keyword at `self.i`, or a string literal with a prefix (`E'...'`,
    /// `B'...'`, `X'...'`, `N'...'`, `U&'...'`, `U&"..."`).
    fn word(&mut self) -> Tok<'a> {
        let s = self.s;
        let start = self.i;
        let i = match s[start + 1..].iter().position(|&c| !is_ident_cont(c)) {
            Some(p) => start + 1 + p,
            None => s.len(),
        };
        self.i = i;
        let word = &s[start..i];
        if word.len() > 1 {
            return Tok::Word(word);
        }
        match (word[0], self.peek(i)) {
            (b'e' | b'E', b'\'') => {
                self.i += 1;
                Tok::Str(self.quoted(b'\'', true))
            }
            (b'b' | b'B' | b'x' | b'X' | b'n' | b'N', b'\'') => {
                self.i += 1;
                Tok::Str(self.quoted(b'\'', false))
            }
            (b'u' | b'U', b'&') if matches!(self.peek(i + 1), b'\'' | b'"') => {
                let q = self.peek(i + 1);
                self.i += 2;
                let body = self.quoted(q, false);
                if q == b'"' {
                    // An optional `UESCAPE 'c'` names the escape character.
                    let esc = self.uescape().unwrap_or(b'\\');
                    Tok::UQuoted(body, esc)
                } else {
                    Tok::Str(body)
                }
            }
            _ => Tok::Word(word),
        }
    }

    /// After a `$` at `start`: a parameter (`$1`), a dollar-quoted string, or an operator.
    fn dollar(&mut self, start: usize) -> Tok<'a> {
        let s = self.s;
        let mut i = self.i;
        if i < s.len() && s[i].is_ascii_digit() {
            while i < s.len() && s[i].is_ascii_digit() {
                i += 1;
            }
            self.i = i;
            return Tok::Other;
        }
        if i < s.len() && is_ident_start(s[i]) {
            i += 1;
            while i < s.len() && is_ident_cont(s[i]) && s[i] != b'$' {
                i += 1;
            }
        }
        if s.get(i) != Some(&b'$') {
            return Tok::Other;
        }
        // Both cuts are at a `$`, so they are char boundaries of the text.
        let delim = &self.text[start..=i];
        let body = i + 1;
        // A two-way search: linear in the length of the text whatever the tag.
        match self.text[body..].find(delim) {
            Some(p) => {
                self.i = body + p + delim.len();
                Tok::Dollar(&s[body..body + p])
            }
            None => {
                self.i = s.len();
                Tok::Dollar(&s[body..])
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fast path.

/// Keywords that decide a statement's verdict when they lead it.
const LEADING: [&str; 17] = [
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
fn plainly_safe(s: &[u8]) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Statements.

/// What [`scan`] reports for each statement.
struct StmtInfo {
    start: usize,
    end: usize,
    reasons: Reasons,
    txn: TxnControl,
}

fn eq(word: &[u8], kw: &str) -> bool {
    word.eq_ignore_ascii_case(kw.as_bytes())
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

    /// Statement-level rules, decided from the leading words.
    fn leading(&self) -> (Reasons, TxnControl) {
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
        } else if eq(w0, "execute") || eq(w0, "deallocate") {
            r.insert(Reason::PreparedStatement);
        } else if eq(w0, "discard") {
            r.insert(Reason::Discard);
        } else if eq(w0, "declare") {
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
fn pinning_function(name: Tok<'_>) -> Option<Reason> {
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

/// Keywords after which `name (` names or defines something instead of calling it.
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
            "default",
            "trigger",
        ]
        .iter()
        .any(|k| eq(w, k)),
        _ => false,
    }
}

/// Runs the lexer over `s` and calls `report` once per non-empty statement.
fn scan(text: &str, report: impl FnMut(StmtInfo)) {
    scan_at(text, false, report)
}

/// The reasons the code of a `DO` block pins for: its body is SQL and PL/pgSQL, scanned as
/// SQL (one level: a `DO` inside it is not looked into again, which keeps the scan linear).
/// RDS Proxy cannot see inside a block, but the session state it leaves is still there for
/// the next caller of the connection.
fn do_body_reasons(body: &[u8], quoted: bool) -> Reasons {
    let scan_body = |b: &[u8]| {
        let mut reasons = Reasons::EMPTY;
        if let Ok(text) = std::str::from_utf8(b) {
            scan_at(text, true, |s| reasons = reasons.union(s.reasons));
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

fn scan_at<'a>(text: &'a str, nested: bool, mut report: impl FnMut(StmtInfo)) {
    let mut lx = Lexer {
        s: text.as_bytes(),
        text,
        i: 0,
    };
    let mut st = Stmt::new();
    let mut prev = Tok::None;
    let mut prev2 = Tok::None;
    let mut end = 0;
    let emit = |st: &mut Stmt<'a>, end: usize, report: &mut dyn FnMut(StmtInfo)| {
        st.finish_set_config();
        if let Some(start) = st.start {
            let (lead, txn) = st.leading();
            let mut reasons = st.reasons.union(lead);
            if st.update && st.pg_settings {
                reasons.insert(Reason::SetConfig);
            }
            report(StmtInfo {
                start,
                end,
                reasons,
                txn,
            });
        }
        *st = Stmt::new();
    };
    while let Some((at, tok)) = lx.next() {
        if tok == Tok::Semi {
            emit(&mut st, end, &mut report);
            prev = Tok::None;
            prev2 = Tok::None;
            continue;
        }
        if st.start.is_none() {
            st.start = Some(at);
        }
        end = lx.i;
        if st.collecting {
            match tok {
                Tok::LParen if st.nwords == 0 => {}
                Tok::Word(w) if st.nwords < WORDS => {
                    st.words[st.nwords] = w;
                    st.nwords += 1;
                }
                _ => {
                    st.collecting = false;
                    st.after_words = Some(tok);
                }
            }
        }
        // Arguments of a set_config( call being read.
        if let Some(call) = st.set_config.as_mut() {
            if st.depth == call.depth && tok == Tok::Comma {
                call.commas += 1;
            } else if st.depth == call.depth && tok == Tok::RParen {
                st.finish_set_config();
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
        match tok {
            Tok::LParen => {
                if let Some(reason) = pinning_function(prev).filter(|_| !defines_name(prev2)) {
                    if reason == Reason::SetConfig {
                        st.finish_set_config();
                        st.set_config = Some(SetConfigCall {
                            depth: st.depth + 1,
                            commas: 0,
                            third_tokens: 0,
                            third_true: false,
                        });
                    } else {
                        st.reasons.insert(reason);
                    }
                }
                st.depth += 1;
            }
            Tok::RParen => st.depth = st.depth.saturating_sub(1),
            Tok::Word(w) if matches!(w.len(), 4 | 9) && (eq(w, "temp") || eq(w, "temporary")) => {
                let after = |p: Tok<'_>, words: &[&str]| matches!(p, Tok::Word(p) if words.iter().any(|k| eq(p, k)));
                // CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP, INTO [GLOBAL|LOCAL] TEMP, anywhere
                // (EXPLAIN ANALYZE CREATE TEMP TABLE ...). Not INSERT/MERGE INTO a table "temp".
                let into = after(prev, &["into"]) && !after(prev2, &["insert", "merge"]);
                if into || after(prev, &["create", "replace", "global", "local"]) {
                    st.reasons.insert(Reason::TempObject);
                }
            }
            Tok::Dot if is_temp_schema(prev) => st.reasons.insert(Reason::TempObject),
            Tok::Word(w) if w.len() == 6 && eq(w, "update") => st.update = true,
            Tok::Word(_) | Tok::Quoted(_) | Tok::UQuoted(..) if is_name(tok, "pg_settings") => {
                st.pg_settings = true;
            }
            Tok::Dollar(body) if !nested && eq(st.word(0), "do") => {
                st.reasons = st.reasons.union(do_body_reasons(body, false));
            }
            Tok::Str(body) if !nested && eq(st.word(0), "do") => {
                st.reasons = st.reasons.union(do_body_reasons(body, true));
            }
            Tok::Word(w) if nested && block_keyword(w).is_some() => {
                if let Some(r) = block_keyword(w) {
                    st.reasons.insert(r);
                }
            }
            _ => {}
        }
        prev2 = prev;
        prev = tok;
    }
    emit(&mut st, end, &mut report);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The fast path never calls a text safe that the full scan finds pinning.
        #[test]
        fn the_fast_path_agrees_with_the_full_scan(
            s in r#"([ \n]|SELECT|select|set|SET|create|temp|TeMp|\$|\$\$|'|"|E'|--|/\*|\*/|;|\(|\)|,|\.|nextval|setval|set_config|pg_advisory_lock|x|1|begin){0,24}"#
        ) {
            if plainly_safe(s.as_bytes()) {
                let full = classify_full(&s);
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

    fn reasons(sql: &str) -> Vec<Reason> {
        classify(sql).reasons.iter().collect()
    }

    #[test]
    fn empty_and_garbage_do_not_pin() {
        assert!(reasons("").is_empty());
        assert!(reasons(";;; -- x\n/* y */").is_empty());
        assert!(reasons("$").is_empty());
        assert!(reasons("'unterminated").is_empty());
    }

    #[test]
    fn lint_counts_lines_and_statements() {
        let f = lint(
            "SELECT 1;\n\nSET x = 1;\n-- c\nSELECT nextval('s')",
            &PinRules::new(),
        );
        assert_eq!(f.len(), 3);
        assert_eq!((f[1].statement, f[1].line, f[1].text), (2, 3, "SET x = 1"));
        assert_eq!(f[2].line, 5);
        assert!(f[0].pins.is_empty());
        assert!(f[2].pins.contains(Reason::SequenceFunction));
    }

    #[test]
    fn txn_control_takes_the_last_statement() {
        assert_eq!(classify("BEGIN; SELECT 1").txn, TxnControl::Begin);
        assert_eq!(classify("BEGIN; COMMIT").txn, TxnControl::End);
        assert_eq!(classify("ROLLBACK TO SAVEPOINT a").txn, TxnControl::None);
        assert_eq!(classify("COMMIT AND CHAIN").txn, TxnControl::Begin);
        assert_eq!(classify("COMMIT PREPARED 'x'").txn, TxnControl::None);
        assert_eq!(classify("select 1").txn, TxnControl::None);
    }

    #[test]
    fn rules_adjust_possible_reasons_and_parse() {
        let c = classify("SET LOCAL x = 1");
        assert!(c.possibly());
        assert!(
            PinRules::new()
                .pinning_reasons(&c, Protocol::Simple)
                .contains(Reason::SetLocal)
        );
        assert!(
            PinRules::new()
                .set_local_safe(true)
                .pinning_reasons(&c, Protocol::Simple)
                .is_empty()
        );
        let plain = classify("SELECT $1");
        assert!(
            PinRules::new()
                .pinning_reasons(&plain, Protocol::Parse)
                .is_empty()
        );
        assert_eq!(
            PinRules::legacy().pinning_reasons(&plain, Protocol::Parse),
            Reasons::of(Reason::Parse)
        );
        assert!(
            PinRules::legacy()
                .pinning_reasons(&plain, Protocol::Execute)
                .is_empty()
        );
    }
}
