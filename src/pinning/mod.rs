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
//! A call in a definition counts where PostgreSQL runs it at once: a `DEFAULT` that fills the
//! rows of `ALTER TABLE ... ADD COLUMN` (or starts a `DO` block's variable), a `USING` or
//! `CHECK` checked against existing rows, `CREATE TABLE ... AS`. It does not after `SET
//! DEFAULT` or in a `CREATE` statement's defaults (kept for later rows). A `serial` or
//! identity column added by `ALTER TABLE` calls `nextval` for each row.
//!
//! How `'...'` reads depends on the server's `standard_conforming_strings` (with it `off`, a
//! backslash escapes a quote): [`classify_with`] takes the setting, [`classify`] and [`lint`]
//! take the reasons of both readings where they differ.
//!
//! The scan is a pass over the bytes (a second where the setting matters): linear time, no
//! allocation, no panic on any input.

use std::fmt;

use crate::config::Proxy;

mod fast;
mod lexer;

use lexer::Tok;
mod statements;

use fast::plainly_safe;
use statements::scan;

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
    /// A protocol-level named statement (`prepare`, a `COPY` prepared before it runs), which a
    /// transaction pooler cannot carry from one transaction to the next: the next one may run
    /// on another server connection, and the name stays behind on this one.
    NamedStatement,
}

/// How many reasons there are.
pub(crate) const REASON_COUNT: usize = 17;

const ALL: [Reason; REASON_COUNT] = [
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
    Reason::NamedStatement,
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
            Reason::NamedStatement => "named_statement",
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
            Reason::NamedStatement => {
                "use the &str statement methods (sent as unnamed statements) or query_typed; run COPY inside a transaction"
            }
        }
    }

    const fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Reason`]s (a bit set: copying it allocates nothing).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Reasons(u32);

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

    /// This set without the reasons in `other`.
    #[must_use]
    pub fn minus(self, other: Reasons) -> Reasons {
        Reasons(self.0 & !other.0)
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

    pub(crate) fn bits(self) -> u32 {
        self.0
    }

    pub(crate) fn from_bits(bits: u32) -> Reasons {
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
    /// Reasons that neither pin nor leak behind the proxy these rules are for.
    ignored: Reasons,
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

    /// The rules for what sits between the pool and the database ([`Proxy`]):
    /// - RDS Proxy: today's rules ([`PinRules::new`]); before November 2023,
    ///   [`PinRules::legacy`].
    /// - A PgBouncer-style pooler in session mode, or no proxy: what changes the session
    ///   leaves it dirty for the next caller of the pool. A `nextval` (the sequence's session
    ///   cache is harmless) and a long text change nothing.
    /// - In transaction mode: what outlives the transaction leaks into the server connection
    ///   the next client gets; transaction-scoped forms (`SET LOCAL`, `set_config(..., true)`)
    ///   end with it.
    pub fn for_proxy(proxy: Proxy) -> PinRules {
        let mut rules = PinRules::new();
        match proxy {
            Proxy::RdsProxy => {}
            Proxy::RdsProxy2023 => rules = PinRules::legacy(),
            Proxy::PgBouncerSession | Proxy::Direct => {
                rules.ignored =
                    Reasons::of(Reason::SequenceFunction).union(Reasons::of(Reason::Oversized));
            }
            Proxy::PgBouncerTransaction => {
                rules.ignored =
                    Reasons::of(Reason::SequenceFunction).union(Reasons::of(Reason::Oversized));
                rules.set_local_safe = true;
            }
        }
        rules
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
        let mut r = c.reasons.minus(self.ignored);
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

/// How the server reads a backslash in a `'...'` literal: its setting
/// `standard_conforming_strings`, which a role, a database, the connection's `options` or a
/// `SET` (`SET LOCAL` too) may change. The server reports it (ParameterStatus), and
/// pinpool's observer classifies what it sends by the value it last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum StandardStrings {
    /// Not known: a text that reads differently under the two settings gets the reasons of
    /// both readings.
    #[default]
    Unknown,
    /// `on` (PostgreSQL's default since 9.1): a backslash is an ordinary character.
    On,
    /// `off`: a backslash escapes the next character, as in `E'...'`.
    Off,
}

/// A statement's digest, as RDS Proxy's log prints one (`set names $1`): keywords and names
/// in lower case, every literal (string, dollar-quoted, number) and a `SET`'s value (a name
/// too: `SET app.key = s3cr3t`) replaced by `?`, comments and white space collapsed,
/// parameters (`$1`) and quoted names kept. It holds no value the
/// statement carried, so it can be logged, whatever `standard_conforming_strings` says: it
/// ends at a `'...'` literal holding a backslash, after which the two settings read the text
/// differently. At most 200 bytes.
///
/// ```
/// assert_eq!(
///     pinpool::pinning::digest("SET  search_path = 'app' -- tenant 7\n"),
///     "set search_path = ?"
/// );
/// assert_eq!(
///     pinpool::pinning::digest("SELECT set_config('role', $1, false), 1.5"),
///     "select set_config(?, $1, false), ?"
/// );
/// ```
pub fn digest(sql: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::new();
    let mut lx = lexer::Lexer::new(sql, false);
    // Where the last number ended, and a dot right after it: `1.5` is one literal.
    let mut number_end = None;
    let mut dot_after_number = false;
    let mut glue = true;
    let mut after_word = false;
    // A `SET`'s value may be a name, bare or quoted (`SET app.key = s3cr3t`): a value all the
    // same, written as `?` like a literal. Whether the statement is a `SET`, and its value
    // has begun (after `=` or `TO`).
    let mut statement_start = true;
    let mut set = false;
    let mut set_value = false;
    while let Some((start, tok)) = lx.next() {
        if out.len() >= MAX {
            break;
        }
        let text = &sql[start..lx.i];
        let is_number = matches!(tok, Tok::Other) && text.as_bytes()[0].is_ascii_digit();
        if is_number && dot_after_number && number_end == Some(start - 1) {
            // The fraction of a number already written.
            dot_after_number = false;
            number_end = Some(lx.i);
            continue;
        }
        if dot_after_number {
            // The dot was a name's, not a number's: write it now.
            out.push('.');
            glue = true;
            dot_after_number = false;
        }
        if matches!(tok, Tok::Dot) && number_end == Some(start) {
            dot_after_number = true;
            continue;
        }
        if statement_start {
            set = matches!(tok, Tok::Word(w) if w.eq_ignore_ascii_case(b"set"));
        }
        let value_name =
            set_value && matches!(tok, Tok::Word(_) | Tok::Quoted(_) | Tok::UQuoted(..));
        let piece: std::borrow::Cow<'_, str> = match tok {
            _ if value_name => "?".into(),
            Tok::Word(_) => text.to_ascii_lowercase().into(),
            Tok::Str(_) | Tok::Dollar(_) => "?".into(),
            Tok::Other if is_number => "?".into(),
            _ => text.into(),
        };
        number_end = is_number.then_some(lx.i);
        set_value |=
            set && (text == "=" || matches!(tok, Tok::Word(w) if w.eq_ignore_ascii_case(b"to")));
        statement_start = matches!(tok, Tok::Semi);
        if statement_start {
            (set, set_value) = (false, false);
        }
        // A `'...'` literal that held a backslash ends elsewhere when
        // `standard_conforming_strings` is `off` (`'O\'Brien ...'`), which the text alone
        // does not say: what follows may be the rest of a value under the other reading, so
        // the digest stops at it.
        let ambiguous = matches!(tok, Tok::Str(_)) && lx.depends_on_setting;
        // A call's parenthesis stays on its name: `set_config(?, ...)`.
        let tight_before = matches!(tok, Tok::Comma | Tok::RParen | Tok::Dot | Tok::Semi)
            || (matches!(tok, Tok::LParen) && after_word);
        if !out.is_empty() && !glue && !tight_before {
            out.push(' ');
        }
        out.push_str(&piece);
        if ambiguous {
            break;
        }
        glue = matches!(tok, Tok::LParen | Tok::Dot);
        after_word = matches!(tok, Tok::Word(_) | Tok::Quoted(_));
    }
    if out.len() > MAX {
        let mut end = MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// Classifies a text that may hold several statements (as `batch_execute` sends), when the
/// setting of `standard_conforming_strings` is not known ([`StandardStrings::Unknown`]).
pub fn classify(sql: &str) -> Classification {
    classify_with(sql, StandardStrings::Unknown)
}

/// Classifies a text read as a server with this `standard_conforming_strings` reads it.
/// Under [`StandardStrings::Unknown`], the effect on the transaction is the `on` reading's.
pub fn classify_with(sql: &str, strings: StandardStrings) -> Classification {
    // The fast path looks at every byte, literals included: it holds under either setting.
    if plainly_safe(sql.as_bytes()) {
        return Classification {
            reasons: Reasons::EMPTY,
            txn: TxnControl::None,
        };
    }
    classify_full(sql, strings)
}

/// The full scan behind [`classify_with`].
fn classify_full(sql: &str, strings: StandardStrings) -> Classification {
    let read = |backslash_strings: bool| {
        let mut reasons = Reasons::EMPTY;
        let mut txn = TxnControl::None;
        let depends = scan(sql, backslash_strings, |s| {
            reasons = reasons.union(s.reasons);
            if s.txn != TxnControl::None {
                txn = s.txn;
            }
        });
        (Classification { reasons, txn }, depends)
    };
    let (mut c, depends) = read(strings == StandardStrings::Off);
    if depends && strings == StandardStrings::Unknown {
        c.reasons = c.reasons.union(read(true).0.reasons);
    }
    if sql.len() > OVERSIZED_BYTES {
        c.reasons.insert(Reason::Oversized);
    }
    c
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
    /// The statement's classification; its length as sent decides [`Reason::Oversized`]:
    /// from after the previous `;` to its own, the comments around it included.
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
    let mut sent = Vec::new();
    let mut line = 1;
    let mut counted = 0;
    let depends = scan(sql, false, |s| {
        line += bytes[counted..s.start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        counted = s.start;
        let mut classification = Classification {
            reasons: s.reasons,
            txn: s.txn,
        };
        // RDS Proxy counts the whole text sent, comments included.
        if s.to - s.from > OVERSIZED_BYTES {
            classification.reasons.insert(Reason::Oversized);
        }
        sent.push(s.from..s.to);
        out.push(Finding {
            statement: out.len() + 1,
            line,
            text: &sql[s.start..s.end],
            pins: Reasons::EMPTY,
            classification,
        });
    });
    if depends {
        // A server with standard_conforming_strings off splits the text elsewhere: each
        // statement also takes the reasons of that reading's statements it overlaps. Both
        // lists are in text order, so one sweep finds the overlaps.
        let mut other = Vec::new();
        scan(sql, true, |s| other.push((s.from..s.to, s.reasons)));
        // Each statement also owns the blanks, comments and empty statements after it, so
        // that what `off` reads there is someone's: the ranges tile the text.
        let starts: Vec<usize> = sent.iter().map(|r| r.start).collect();
        for (i, r) in sent.iter_mut().enumerate() {
            r.start = if i == 0 { 0 } else { starts[i] };
            r.end = starts.get(i + 1).copied().unwrap_or(sql.len());
        }
        let mut first = 0;
        for (f, range) in out.iter_mut().zip(&sent) {
            while first < other.len() && other[first].0.end <= range.start {
                first += 1;
            }
            for (r, reasons) in other[first..]
                .iter()
                .take_while(|(r, _)| r.start < range.end)
            {
                if r.end > range.start {
                    f.classification.reasons = f.classification.reasons.union(*reasons);
                }
            }
        }
    }
    for f in &mut out {
        f.pins = rules.pinning_reasons(&f.classification, protocol);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn strings_are_read_as_the_setting_says() {
        let sql = r"SELECT 'a\'' , pg_advisory_lock(1), 'b'";
        let with = |s| classify_with(sql, s).reasons;
        assert!(with(StandardStrings::On).is_empty());
        assert_eq!(
            with(StandardStrings::Off),
            Reasons::of(Reason::AdvisoryLock)
        );
        assert_eq!(
            with(StandardStrings::Unknown),
            Reasons::of(Reason::AdvisoryLock)
        );
        // The other way round: a call outside the string only when `on`.
        let sql = r"SELECT length('\'), nextval('s') --')";
        assert_eq!(
            classify_with(sql, StandardStrings::On).reasons,
            Reasons::of(Reason::SequenceFunction)
        );
        assert!(classify_with(sql, StandardStrings::Off).reasons.is_empty());
        // E'' strings escape under both; a DO body is read both ways whatever the setting
        // (the block may change it before its statements run).
        let e = r"SELECT E'a\'' , nextval('s'), 'b'";
        for s in [StandardStrings::On, StandardStrings::Off] {
            assert!(classify_with(e, s).may_pin());
            let body = r"DO $$BEGIN PERFORM 'a\'' , pg_advisory_lock(1), 'b'; END$$";
            assert!(classify_with(body, s).may_pin());
        }
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
