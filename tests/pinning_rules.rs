//! The pinning rules: a labelled table of statements, rule adjustments, the lint helper and
//! property tests. Database-free.

use pinpool::pinning::{
    Classification, OVERSIZED_BYTES, PinRules, Protocol, Reason, Reasons, TxnControl, classify,
    lint,
};
use proptest::prelude::*;

use Reason::*;

/// (statement, every reason it may pin for). An empty list: it does not pin.
const TABLE: &[(&str, &[Reason])] = &[
    // SET and RESET
    ("SET search_path = app", &[Set]),
    ("set search_path to app", &[Set]),
    ("SET SESSION search_path = app", &[Set]),
    ("SET TIME ZONE 'UTC'", &[Set]),
    ("SET NAMES 'UTF8'", &[Set]),
    ("SET ROLE app", &[Set]),
    ("SET SESSION AUTHORIZATION app", &[Set]),
    ("RESET search_path", &[Set]),
    ("RESET ALL", &[Set]),
    ("SET statement_timeout TO DEFAULT", &[Set]),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        &[Set],
    ),
    ("  \n\t SET x.y = 1", &[Set]),
    ("-- leading comment\nSET a = 1", &[Set]),
    ("/* c */ SET a = 1", &[Set]),
    ("/* nested /* c */ still */ SET a = 1", &[Set]),
    ("SELECT 1; SET a = 1", &[Set]),
    ("sEt a = 1", &[Set]),
    ("SET\ta\t=\t1", &[Set]),
    // Transaction-scoped: possibly pinning
    ("SET LOCAL search_path = app", &[SetLocal]),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", &[SetLocal]),
    ("SET CONSTRAINTS ALL DEFERRED", &[SetLocal]),
    (
        "BEGIN; SET LOCAL statement_timeout = '1s'; COMMIT",
        &[SetLocal],
    ),
    ("set local work_mem = '64MB'", &[SetLocal]),
    // set_config
    (
        "SELECT set_config('search_path', 'app', false)",
        &[SetConfig],
    ),
    (
        "SELECT set_config('search_path', 'app', true)",
        &[SetConfigLocal],
    ),
    ("SELECT set_config('a.b', $1, $2)", &[SetConfig]),
    (
        "SELECT pg_catalog.set_config('a.b', 'c', false)",
        &[SetConfig],
    ),
    ("SELECT SET_CONFIG('a.b', 'c', TRUE)", &[SetConfigLocal]),
    ("SELECT set_config('a.b', 'c', 't')", &[SetConfigLocal]),
    ("SELECT set_config('a.b', 'c', 'false')", &[SetConfig]),
    (
        "SELECT set_config('a.b', lower('C'), true)",
        &[SetConfigLocal],
    ),
    ("SELECT \"set_config\"('a.b', 'c', false)", &[SetConfig]),
    ("SELECT set_config ('a.b', 'c', false)", &[SetConfig]),
    ("SELECT set_config('a.b', 'c', true OR false)", &[SetConfig]),
    ("SELECT set_config('a.b', 'c')", &[SetConfig]),
    // SQL prepared statements
    ("PREPARE q(int) AS SELECT $1", &[PreparedStatement]),
    ("EXECUTE q(1)", &[PreparedStatement]),
    ("DEALLOCATE q", &[PreparedStatement]),
    ("DEALLOCATE ALL", &[PreparedStatement]),
    ("prepare q as select 1", &[PreparedStatement]),
    ("DEALLOCATE PREPARE q", &[PreparedStatement]),
    // DISCARD
    ("DISCARD ALL", &[Discard]),
    ("DISCARD PLANS", &[Discard]),
    ("DISCARD TEMP", &[Discard]),
    ("DISCARD SEQUENCES", &[Discard]),
    // Temporary objects
    ("CREATE TEMP TABLE t (id int)", &[TempObject]),
    ("CREATE TEMPORARY TABLE t (id int)", &[TempObject]),
    ("CREATE GLOBAL TEMPORARY TABLE t (id int)", &[TempObject]),
    ("CREATE LOCAL TEMP TABLE t (id int)", &[TempObject]),
    ("CREATE TEMP SEQUENCE s", &[TempObject]),
    ("CREATE TEMP VIEW v AS SELECT 1", &[TempObject]),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", &[TempObject]),
    ("CREATE TEMP RECURSIVE VIEW v(n) AS SELECT 1", &[TempObject]),
    ("CREATE TEMP TABLE t AS SELECT 1", &[TempObject]),
    (
        "CREATE TEMP TABLE IF NOT EXISTS t (id int) ON COMMIT DROP",
        &[TempObject],
    ),
    ("SELECT 1 AS a INTO TEMP t", &[TempObject]),
    ("SELECT * INTO TEMPORARY TABLE t FROM x", &[TempObject]),
    ("CREATE TABLE pg_temp.t (id int)", &[TempObject]),
    ("create temp table t(id int)", &[TempObject]),
    // Cursors, LISTEN, LOAD
    ("DECLARE c CURSOR FOR SELECT 1", &[Cursor]),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", &[Cursor]),
    ("declare c scroll cursor for select 1", &[Cursor]),
    ("LISTEN chan", &[Listen]),
    ("listen \"Chan\"", &[Listen]),
    ("LOAD 'auto_explain'", &[Load]),
    // Sequence functions anywhere
    ("SELECT nextval('s')", &[SequenceFunction]),
    ("SELECT setval('s', 10)", &[SequenceFunction]),
    ("SELECT NEXTVAL('s')", &[SequenceFunction]),
    ("SELECT pg_catalog.nextval('s')", &[SequenceFunction]),
    ("SELECT \"nextval\"('s')", &[SequenceFunction]),
    (
        "INSERT INTO t (id) VALUES (nextval('s'))",
        &[SequenceFunction],
    ),
    ("UPDATE t SET id = nextval('s')", &[SequenceFunction]),
    (
        "WITH x AS (SELECT nextval('s') AS n) SELECT n FROM x",
        &[SequenceFunction],
    ),
    (
        "SELECT * FROM t WHERE id IN (SELECT nextval('s'))",
        &[SequenceFunction],
    ),
    ("SELECT nextval ( 's' )", &[SequenceFunction]),
    ("SELECT * FROM nextval('s')", &[SequenceFunction]),
    (
        "SELECT a, setval('s', max(id)) FROM t GROUP BY a",
        &[SequenceFunction],
    ),
    (
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET n = nextval('s')",
        &[SequenceFunction],
    ),
    ("EXPLAIN ANALYZE SELECT nextval('s')", &[SequenceFunction]),
    ("VALUES (nextval('s'))", &[SequenceFunction]),
    ("((SELECT nextval('s')))", &[SequenceFunction]),
    ("SELECT nextval/* c */('s')", &[SequenceFunction]),
    ("SELECT 1;;; SELECT nextval('s');", &[SequenceFunction]),
    ("SELECT e'\\\\', nextval('s')", &[SequenceFunction]),
    ("SELECT 'a\\', nextval('s')", &[SequenceFunction]),
    ("SELECT public.setval('s', 1, false)", &[SequenceFunction]),
    // Session-level advisory locks
    ("SELECT pg_advisory_lock(1)", &[AdvisoryLock]),
    ("SELECT pg_advisory_lock_shared(1)", &[AdvisoryLock]),
    ("SELECT pg_try_advisory_lock(1)", &[AdvisoryLock]),
    ("SELECT pg_try_advisory_lock_shared(1)", &[AdvisoryLock]),
    ("SELECT pg_advisory_lock(1, 2)", &[AdvisoryLock]),
    ("SELECT PG_ADVISORY_LOCK(1)", &[AdvisoryLock]),
    (
        "SELECT * FROM t WHERE pg_try_advisory_lock(id)",
        &[AdvisoryLock],
    ),
    // Several reasons
    ("SET a = 1; SELECT nextval('s')", &[Set, SequenceFunction]),
    (
        "DECLARE c CURSOR FOR SELECT nextval('s')",
        &[Cursor, SequenceFunction],
    ),
    (
        "PREPARE p AS SELECT set_config('a.b', 'c', false)",
        &[SetConfig, PreparedStatement],
    ),
    (
        "CREATE TEMP TABLE t AS SELECT pg_advisory_lock(1)",
        &[TempObject, AdvisoryLock],
    ),
    ("LISTEN a; LOAD 'x'; DISCARD ALL", &[Discard, Listen, Load]),
    // Not pinning: ordinary statements
    ("SELECT 1", &[]),
    ("SELECT * FROM users WHERE id = $1", &[]),
    ("INSERT INTO t (id, v) VALUES ($1, $2)", &[]),
    ("UPDATE t SET v = $1 WHERE id = $2", &[]),
    ("DELETE FROM t WHERE id = $1", &[]),
    (
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        &[],
    ),
    ("INSERT INTO t (v) VALUES ('x') RETURNING id", &[]),
    (
        "MERGE INTO t USING x ON t.id = x.id WHEN MATCHED THEN UPDATE SET v = 'y'",
        &[],
    ),
    ("SELECT 1 AS a INTO t2 FROM x", &[]),
    ("ALTER ROLE app SET statement_timeout = '5s'", &[]),
    ("ALTER DATABASE app SET search_path = app", &[]),
    ("ALTER TABLE t SET (fillfactor = 70)", &[]),
    ("ALTER SYSTEM SET work_mem = '4MB'", &[]),
    ("ALTER TABLE t ALTER COLUMN v SET DEFAULT 'x'", &[]),
    ("ALTER TABLE t ALTER COLUMN v SET NOT NULL", &[]),
    // Not pinning: transaction-level advisory locks and unlocking
    ("SELECT pg_advisory_xact_lock(1)", &[]),
    ("SELECT pg_advisory_xact_lock_shared(1)", &[]),
    ("SELECT pg_try_advisory_xact_lock(1)", &[]),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", &[]),
    ("SELECT pg_advisory_unlock(1)", &[]),
    (
        "SELECT lower('x') FROM t WHERE pg_advisory_xact_lock(1) IS NOT NULL",
        &[],
    ),
    // Not pinning: inside literals, quoted identifiers and comments
    ("SELECT 'SET a = 1'", &[]),
    ("SELECT 'nextval(''s'')'", &[]),
    ("SELECT E'it\\'s nextval(1)'", &[]),
    ("SELECT $$ SET a = 1; nextval('s') $$", &[]),
    ("SELECT $fn$ nextval('s') $fn$", &[]),
    ("SELECT $a$ $b$ nextval('s') $b$ $a$", &[]),
    ("SELECT 1 -- nextval('s')", &[]),
    ("SELECT 1 /* SET a = 1 */", &[]),
    ("SELECT 1 /* outer /* nextval('s') */ still comment */", &[]),
    ("SELECT 1 FROM t WHERE v = 'it''s; SET a = 1'", &[]),
    ("NOTIFY chan, 'SET a = 1'", &[]),
    ("COMMENT ON TABLE t IS 'SET x = 1'", &[]),
    ("SELECT U&'d\\0061t\\+000061'", &[]),
    ("SELECT B'1010', X'1F'", &[]),
    ("SELECT N'nextval(1)'", &[]),
    ("SELECT 'a' || 'SET'", &[]),
    ("SELECT $tag$ unterminated nextval('s')", &[]),
    ("SELECT 'unterminated nextval('s')", &[]),
    ("SELECT 1 AS \"SET\"", &[]),
    ("SELECT \"a\"\"b\" FROM \"SET\"", &[]),
    ("SELECT \"nextval(\" FROM t", &[]),
    // Not pinning: names that look like pinning functions
    ("SELECT \"nextval\" FROM t", &[]),
    ("SELECT nextval FROM t", &[]),
    ("SELECT t.nextval FROM t", &[]),
    ("CREATE TABLE nextval (id int)", &[]),
    ("INSERT INTO nextval (id) VALUES (1)", &[]),
    ("CREATE TABLE t (id bigint DEFAULT nextval('s'))", &[]),
    (
        "CREATE FUNCTION nextval(x int) RETURNS int LANGUAGE sql AS 'SELECT 1'",
        &[],
    ),
    ("DROP FUNCTION setval(regclass, bigint)", &[]),
    ("SELECT \"NEXTVAL\"('s')", &[]),
    ("SELECT my_nextval('s')", &[]),
    ("SELECT nextval_count FROM stats", &[]),
    ("WITH nextval (n) AS (SELECT 1) SELECT n FROM nextval", &[]),
    ("SELECT * FROM t AS setval (a, b)", &[]),
    // `ON` starts a join condition as well as naming a table: a call after it pins.
    ("CREATE INDEX ON nextval (id)", &[SequenceFunction]),
    (
        "SELECT 1 FROM a JOIN b ON pg_try_advisory_lock(1)",
        &[AdvisoryLock],
    ),
    (
        "SELECT 1 FROM a JOIN b ON set_config('a.b', 'c', false) IS NOT NULL",
        &[SetConfig],
    ),
    (
        "SELECT 1 FROM a JOIN b ON nextval('s') > 0",
        &[SequenceFunction],
    ),
    // Temporary objects in every spelling
    ("SELECT 1 AS a INTO LOCAL TEMP t", &[TempObject]),
    ("SELECT 1 AS a INTO GLOBAL TEMPORARY t", &[TempObject]),
    (
        "CREATE TABLE IF NOT EXISTS pg_temp.t (a int)",
        &[TempObject],
    ),
    ("CREATE TABLE \"pg_temp\".t (a int)", &[TempObject]),
    ("SELECT 1 AS a INTO pg_temp.t", &[TempObject]),
    (
        "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        &[TempObject],
    ),
    ("CREATE TYPE pg_temp.ty AS (a int)", &[TempObject]),
    ("SELECT * FROM pg_temp_3.t", &[TempObject]),
    (
        "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
        &[TempObject],
    ),
    ("INSERT INTO temp (a) VALUES (1)", &[]),
    ("SELECT temp FROM weather", &[]),
    // Unicode-escaped names, with the default escape and with UESCAPE
    (
        "SELECT U&\"\\0073et_config\"('a.b', 'c', false)",
        &[SetConfig],
    ),
    (
        "SELECT U&\"!0073et_config\" UESCAPE '!'('a.b', 'c', false)",
        &[SetConfig],
    ),
    ("SELECT U&\"n\\0065xtval\"('s')", &[SequenceFunction]),
    ("CREATE TABLE U&\"pg_t\\0065mp\".t (a int)", &[TempObject]),
    ("SELECT U&\"\\0073et_config_x\"('a')", &[]),
    // Updating pg_settings calls set_config
    (
        "UPDATE pg_settings SET setting = 'x' WHERE name = 'application_name'",
        &[SetConfig],
    ),
    (
        "update pg_catalog.pg_settings set setting = '1s' where name = 'statement_timeout'",
        &[SetConfig],
    ),
    (
        "SELECT setting FROM pg_settings WHERE name = 'work_mem'",
        &[],
    ),
    (
        "ALTER TABLE t ADD CONSTRAINT c FOREIGN KEY (a) REFERENCES setval (id)",
        &[],
    ),
    ("SELECT a$b FROM t", &[]),
    // A definition PostgreSQL runs at once: a default filling the rows a table has, a check
    // or a type change's USING run on them, a DO block's declarations.
    (
        "ALTER TABLE t ADD COLUMN d text DEFAULT pg_advisory_lock(4242)::text",
        &[AdvisoryLock],
    ),
    (
        "ALTER TABLE t ADD d text DEFAULT set_config('search_path', 'x', false)",
        &[SetConfig],
    ),
    (
        "ALTER TABLE t ADD COLUMN n bigint DEFAULT nextval('s')",
        &[SequenceFunction],
    ),
    (
        "ALTER TABLE t ADD COLUMN n bigint DEFAULT \"setval\"('s', 5)",
        &[SequenceFunction],
    ),
    (
        "ALTER TABLE t ALTER COLUMN v SET DEFAULT 'x', ADD COLUMN n bigint DEFAULT nextval('s')",
        &[SequenceFunction],
    ),
    (
        "ALTER TABLE t ADD COLUMN IF NOT EXISTS n bigint DEFAULT nextval('s'), ALTER COLUMN v SET DEFAULT 'x'",
        &[SequenceFunction],
    ),
    (
        "ALTER TABLE t ALTER COLUMN v TYPE text USING pg_advisory_lock(1)::text",
        &[AdvisoryLock],
    ),
    (
        "ALTER TABLE t ADD CONSTRAINT c CHECK (pg_try_advisory_lock(1))",
        &[AdvisoryLock],
    ),
    (
        "CREATE TABLE t2 AS SELECT nextval('s')",
        &[SequenceFunction],
    ),
    (
        "CREATE MATERIALIZED VIEW m AS SELECT nextval('s')",
        &[SequenceFunction],
    ),
    (
        "DO $$<<l>> DECLARE b text DEFAULT pg_advisory_lock(1)::text; BEGIN END$$",
        &[AdvisoryLock],
    ),
    (
        "DO $$BEGIN DECLARE b bigint DEFAULT nextval('s'); BEGIN END; END$$",
        &[SequenceFunction],
    ),
    // A PL/pgSQL variable may be named `create`: a declaration is no CREATE statement.
    (
        "DO $$BEGIN DECLARE a int; create text DEFAULT pg_advisory_lock(1)::text; BEGIN END; END$$",
        &[AdvisoryLock],
    ),
    (
        "DO $$<<b>> DECLARE a int; create bigint DEFAULT nextval('s'); BEGIN END$$",
        &[SequenceFunction],
    ),
    ("ALTER TABLE t ADD COLUMN id serial", &[SequenceFunction]),
    ("ALTER TABLE t ADD id bigserial", &[SequenceFunction]),
    // Only a leading ALTER adds a column: these words elsewhere are names.
    ("SELECT serial(alter) FROM t", &[]),
    (
        "DO $$ BEGIN ALTER TABLE t ADD id serial; END $$",
        &[SequenceFunction],
    ),
    (
        "ALTER TABLE t ADD COLUMN id int GENERATED ALWAYS AS IDENTITY",
        &[SequenceFunction],
    ),
    // Kept for later rows: not run now.
    ("ALTER TABLE t ALTER COLUMN n SET DEFAULT nextval('s')", &[]),
    (
        "CREATE TABLE t (id serial, n bigint DEFAULT nextval('s'))",
        &[],
    ),
    (
        "CREATE FUNCTION f(a bigint DEFAULT nextval('s')) RETURNS bigint LANGUAGE sql AS 'SELECT a'",
        &[],
    ),
    ("CREATE DOMAIN d AS bigint DEFAULT nextval('s')", &[]),
    ("ALTER TABLE t REPLICA IDENTITY FULL", &[]),
    ("CREATE TABLE t (id int GENERATED ALWAYS AS IDENTITY)", &[]),
    // A DO block's code is read: the proxy cannot see inside it, but the session state it
    // leaves stays on the connection for its next caller.
    (
        "DO $$ BEGIN PERFORM set_config('a.b', 'c', false); END $$",
        &[SetConfig],
    ),
    (
        "do language plpgsql $b$ begin create temp table t (a int); end $b$",
        &[TempObject],
    ),
    (
        "DO 'BEGIN PERFORM pg_advisory_lock(1); END'",
        &[AdvisoryLock],
    ),
    ("DO $$ BEGIN RAISE NOTICE 'x'; END $$", &[]),
    // PL/pgSQL's DECLARE is its declaration section, not a cursor; its EXECUTE runs a string
    // (not read: untracked), not a prepared statement.
    ("DO $$ DECLARE t text; BEGIN PERFORM 1; END $$", &[]),
    (
        "DO $$ DECLARE t TEXT; BEGIN PERFORM 1; EXECUTE format('SELECT %s', 1); END $$",
        &[Untracked],
    ),
    ("SELECT $$ nextval('s') $$", &[]),
    // Updating pg_settings in every spelling
    (
        "UPDATE \"pg_settings\" SET setting = '1s' WHERE name = 'statement_timeout'",
        &[SetConfig],
    ),
    (
        "UPDATE \"pg_catalog\".\"pg_settings\" SET setting = '1s' WHERE name = 'x'",
        &[SetConfig],
    ),
    (
        "UPDATE U&\"pg_setting\\0073\" SET setting = '1s' WHERE name = 'x'",
        &[SetConfig],
    ),
    // Not pinning: sequences read without nextval, functions (invisible)
    ("SELECT currval('s')", &[]),
    ("SELECT lastval()", &[]),
    ("CALL my_proc()", &[]),
    ("SELECT my_func()", &[]),
    // Not pinning: transaction control, DDL, maintenance
    ("BEGIN", &[]),
    ("COMMIT", &[]),
    ("ROLLBACK", &[]),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", &[]),
    ("SAVEPOINT a", &[]),
    ("RELEASE SAVEPOINT a", &[]),
    ("ROLLBACK TO SAVEPOINT a", &[]),
    ("SHOW search_path", &[]),
    ("SELECT current_setting('search_path')", &[]),
    ("CREATE TABLE t (id int)", &[]),
    ("CREATE UNLOGGED TABLE t (id int)", &[]),
    ("CREATE VIEW v AS SELECT 1", &[]),
    ("CREATE SEQUENCE s", &[]),
    ("INSERT INTO temp VALUES (1)", &[]),
    ("SELECT * FROM temp", &[]),
    ("INSERT INTO temp SELECT 1", &[]),
    ("UNLISTEN *", &[]),
    ("COPY t FROM STDIN", &[]),
    ("TRUNCATE t", &[]),
    ("VACUUM t", &[]),
    ("ANALYZE t", &[]),
    ("EXPLAIN SELECT 1", &[]),
    ("GRANT SELECT ON t TO app", &[]),
    ("SELECT $1::text", &[]),
    ("", &[]),
    (";", &[]),
    ("-- only a comment", &[]),
];

fn reasons(list: &[Reason]) -> Reasons {
    let mut r = Reasons::EMPTY;
    for x in list {
        r.insert(*x);
    }
    r
}

#[test]
fn the_labelled_table_classifies_as_labelled() {
    assert!(TABLE.len() >= 150, "{} statements", TABLE.len());
    let mut wrong = Vec::new();
    for (sql, want) in TABLE {
        let got = classify(sql).reasons;
        if got != reasons(want) {
            wrong.push(format!("{sql:?}: want {:?}, got {got:?}", reasons(want)));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn every_reason_is_covered_by_the_table() {
    for r in Reason::all() {
        if matches!(
            r,
            Parse | Untracked | Oversized | SessionChanged | NamedStatement
        ) {
            continue; // not a property of the text alone
        }
        assert!(
            TABLE.iter().any(|(_, want)| want.contains(r)),
            "{r:?} untested"
        );
    }
}

#[test]
fn oversized_statements_pin_above_16_kib() {
    let pad = |n: usize| format!("SELECT '{}'", "x".repeat(n - "SELECT ''".len()));
    let at = pad(OVERSIZED_BYTES);
    assert_eq!(at.len(), OVERSIZED_BYTES);
    assert!(classify(&at).reasons.is_empty());
    let over = pad(OVERSIZED_BYTES + 1);
    assert_eq!(classify(&over).reasons, Reasons::of(Oversized));
}

#[test]
fn transaction_scoped_forms_are_possible_and_can_be_declared_safe() {
    for sql in [
        "SET LOCAL a = 1",
        "SET TRANSACTION READ ONLY",
        "SELECT set_config('a.b', 'c', true)",
    ] {
        let c = classify(sql);
        assert!(c.possibly(), "{sql}");
        assert!(
            !PinRules::new()
                .pinning_reasons(&c, Protocol::Simple)
                .is_empty()
        );
        assert!(
            PinRules::new()
                .set_local_safe(true)
                .pinning_reasons(&c, Protocol::Simple)
                .is_empty()
        );
    }
    let both = classify("SET LOCAL a = 1; SET b = 2");
    assert!(!both.possibly());
    assert_eq!(
        PinRules::new()
            .set_local_safe(true)
            .pinning_reasons(&both, Protocol::Simple),
        Reasons::of(Set)
    );
}

#[test]
fn legacy_rules_pin_on_every_parse() {
    let legacy = PinRules::legacy();
    assert_eq!(
        legacy.check("SELECT $1", Protocol::Parse),
        Reasons::of(Parse)
    );
    assert!(legacy.check("SELECT 1", Protocol::Simple).is_empty());
    assert!(legacy.check("SELECT 1", Protocol::Execute).is_empty());
    assert!(
        PinRules::new()
            .check("SELECT $1", Protocol::Parse)
            .is_empty()
    );
}

#[test]
fn transaction_control_is_recognised() {
    let cases = [
        ("BEGIN", TxnControl::Begin),
        ("begin isolation level serializable", TxnControl::Begin),
        ("START TRANSACTION", TxnControl::Begin),
        ("COMMIT", TxnControl::End),
        ("END", TxnControl::End),
        ("ROLLBACK WORK", TxnControl::End),
        ("ABORT", TxnControl::End),
        ("COMMIT AND NO CHAIN", TxnControl::End),
        ("COMMIT AND CHAIN", TxnControl::Begin),
        ("PREPARE TRANSACTION 'x'", TxnControl::End),
        ("ROLLBACK TO a", TxnControl::None),
        ("ROLLBACK TRANSACTION TO SAVEPOINT a", TxnControl::None),
        ("COMMIT PREPARED 'x'", TxnControl::None),
        ("SELECT 'BEGIN'", TxnControl::None),
        ("BEGIN; INSERT INTO t VALUES (1); COMMIT", TxnControl::End),
    ];
    for (sql, want) in cases {
        assert_eq!(classify(sql).txn, want, "{sql}");
    }
}

/// With `standard_conforming_strings` off (a role or database setting, the connection's
/// options, `SET LOCAL`), `\'` escapes a quote in `'...'`; not knowing the setting, the
/// classification takes the reasons of both readings.
#[test]
fn backslashes_in_strings_are_read_both_ways() {
    let cases: &[(&str, &[Reason])] = &[
        (r"SELECT 'a\'' , pg_advisory_lock(1), 'b'", &[AdvisoryLock]),
        (r"SELECT N'a\'' , nextval('s'), 'b'", &[SequenceFunction]),
        (
            r"SELECT 'it\'s' AS s, set_config('a.b', 'c', false)",
            &[SetConfig],
        ),
        // Read with `on`, the call is outside the string; with `off`, inside.
        (
            r"SELECT length('\'), nextval('s') --')",
            &[SequenceFunction],
        ),
        (
            r"DO $$BEGIN PERFORM 'a\'' , pg_advisory_lock(1), 'b'; END$$",
            &[AdvisoryLock],
        ),
        (r"SELECT 'a\'' ; SET search_path = x; SELECT 'b'", &[Set]),
        // The same under both settings.
        (r"SELECT 'C:\' AS path", &[]),
        (r"SELECT E'a\'' , nextval('s'), 'b'", &[SequenceFunction]),
        (r"SELECT E'\'', 'x'", &[]),
        (r#"SELECT 1 AS "a\", nextval('s')"#, &[SequenceFunction]),
        (r"SELECT $x$\$x$, nextval('s')", &[SequenceFunction]),
        (r"SELECT B'1\', nextval('s')", &[SequenceFunction]),
        (r"SELECT 1 /* \' */, nextval('s')", &[SequenceFunction]),
        (r"SELECT U&'\005c' AS s, 1", &[]),
    ];
    let mut wrong = Vec::new();
    for (sql, want) in cases {
        let got = classify(sql).reasons;
        if got != reasons(want) {
            wrong.push(format!("{sql}: want {:?}, got {got:?}", reasons(want)));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn lint_reads_backslashes_in_strings_both_ways() {
    let f = lint(
        r"SELECT 'a\'' , pg_advisory_lock(1), 'b'; SELECT 1",
        &PinRules::new(),
    );
    assert!(f[0].pins.contains(AdvisoryLock), "{f:?}");
    // Read with `off`, a statement stands where `on` reads a comment after the last one.
    let f = lint(r"SELECT 'a\'; /* ' ; SET x = 1; ' */", &PinRules::new());
    assert!(f.iter().any(|f| f.pins.contains(Set)), "{f:?}");
    let f = lint(r"SELECT 1; SELECT 'C:\' AS p; SELECT 2", &PinRules::new());
    assert_eq!(f.len(), 3);
    assert!(f.iter().all(|f| f.pins.is_empty()), "{f:?}");
}

/// RDS Proxy counts the whole text sent: a statement padded past 16 KB by comments is
/// oversized, wherever the comment stands before its `;`.
#[test]
fn lint_measures_a_statement_with_its_comments() {
    let pad = "x".repeat(OVERSIZED_BYTES);
    let trailing = format!("SELECT 1 /* {pad} */; SELECT 2");
    let f = lint(&trailing, &PinRules::new());
    assert_eq!(f[0].pins, Reasons::of(Oversized));
    assert!(f[1].pins.is_empty());
    let line = format!("SELECT 1 -- {pad}\n");
    assert_eq!(
        lint(&line, &PinRules::new())[0].pins,
        Reasons::of(Oversized)
    );
    let leading = format!("SELECT 1;\n-- {pad}\nSELECT 2");
    let f = lint(&leading, &PinRules::new());
    assert!(f[0].pins.is_empty());
    assert_eq!(f[1].pins, Reasons::of(Oversized));
    let short = lint("SELECT 1 /* c */ ; SELECT 2", &PinRules::new());
    assert!(short.iter().all(|f| f.pins.is_empty()));
}

#[test]
fn lint_reports_statements_with_lines() {
    let sql = "SELECT 1;\n-- a comment; with a semicolon\nSET search_path = app;\n\nSELECT 'a;b',\n  nextval('s');\nSET LOCAL a = 1";
    let findings = lint(sql, &PinRules::new());
    let summary: Vec<_> = findings
        .iter()
        .map(|f| {
            (
                f.statement,
                f.line,
                f.pins.iter().map(Reason::as_str).collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, 1, vec![]),
            (2, 3, vec!["set"]),
            (3, 5, vec!["sequence_function"]),
            (4, 7, vec!["set_local"]),
        ]
    );
    assert!(findings[3].classification.possibly());
    let safe = lint(sql, &PinRules::new().set_local_safe(true));
    assert!(safe[3].pins.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_on_arbitrary_text(s in "\\PC*") {
        let c: Classification = classify(&s);
        let _ = lint(&s, &PinRules::new());
        prop_assert_eq!(c.reasons.contains(Oversized), s.len() > OVERSIZED_BYTES);
    }

    /// The statements `lint` finds account for what `classify` finds in the whole text (as
    /// the fuzz target checks), backslashes and both readings of `'...'` included.
    #[test]
    fn lint_and_classify_agree(s in "([ \n]|SET x|set_config\\(|nextval\\(|\\$\\$|'|\"|E'|N'|\\\\|--|/\\*|\\*/|;|\\(|\\)|,|DO |x|1){0,48}") {
        let mut union = Reasons::EMPTY;
        for f in lint(&s, &PinRules::new()) {
            union = union.union(f.classification.reasons);
        }
        prop_assert_eq!(union.without(Oversized), classify(&s).reasons.without(Oversized), "{:?}", s);
    }

    #[test]
    fn never_panics_on_sql_like_text(s in "([ \n]|SET|set|\\$|\\$\\$|\\$a\\$|'|\"|E'|\\\\|--|/\\*|\\*/|;|\\(|\\)|,|\\.|nextval|set_config|true|INTO|TEMP|x|1){0,64}") {
        let _ = classify(&s);
        let _ = lint(&s, &PinRules::legacy());
    }

    #[test]
    fn whitespace_case_and_comments_do_not_change_the_verdict(
        idx in 0..TABLE.len(),
        seps in proptest::collection::vec(prop_oneof![
            Just(" "), Just("  "), Just("\t"), Just("\n"), Just(" /* c */ "), Just("/**/")
        ], 64),
        lead in prop_oneof![Just(""), Just("  "), Just("-- x\n"), Just("/* a /* b */ */\n")],
        upper in any::<bool>(),
    ) {
        let (sql, want) = TABLE[idx];
        // Line comments would swallow what a newline used to end; keep those statements as they are.
        prop_assume!(!sql.contains("--") && !sql.is_empty());
        let mut out = String::from(lead);
        let mut in_quote: Option<char> = None;
        let mut k = 0;
        for ch in sql.chars() {
            match in_quote {
                Some(q) if ch == q => in_quote = None,
                Some(_) => {}
                None if ch == '\'' || ch == '"' || ch == '$' => in_quote = Some(ch),
                None => {}
            }
            if ch == ' ' && in_quote.is_none() {
                out.push_str(seps[k % seps.len()]);
                k += 1;
            } else if in_quote.is_none() && upper {
                out.push(ch.to_ascii_uppercase());
            } else {
                out.push(ch);
            }
        }
        // Upper-casing changes quoted names; only compare when the text had none.
        prop_assume!(!(upper && sql.contains('"')));
        prop_assert_eq!(classify(&out).reasons, reasons(want), "{}", out);
    }
}

/// This thread's CPU time in nanoseconds: the work done, not the wall-clock time, which on a
/// loaded machine counts the other processes' turns too (a 30 ms scan is preempted many
/// times where a 0.5 ms one often is not, and the ratio of the two grows with the load).
#[cfg(target_os = "linux")]
fn cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID exists on every
    // Linux the project supports and the call cannot fail with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Elsewhere, the wall clock from a fixed start.
#[cfg(not(target_os = "linux"))]
fn cpu_ns() -> u128 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos()
}

/// The fastest of a few runs of `classify` and `lint` on `sql`, in nanoseconds of this
/// thread's CPU time.
fn fastest_scan(sql: &str) -> u128 {
    (0..7)
        .map(|_| {
            let t = cpu_ns();
            std::hint::black_box(classify(std::hint::black_box(sql)));
            std::hint::black_box(lint(sql, &PinRules::new()));
            cpu_ns() - t
        })
        .min()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Linear time on adversarial repetitions (unterminated quotes and comments, nested
    /// comment openers, dollar tags, parentheses, statement separators...): sixteen times the
    /// text takes well under 64 times as long (a quadratic scan would take 256 times).
    #[test]
    fn time_grows_linearly_with_the_text(
        unit in "([ \n]|SET|\\$|\\$\\$|\\$a\\$|'|\"|E'|\\\\|--|/\\*|\\*/|;|\\(|\\)|nextval|set_config|TEMP|x|1|U&\"a\" |UESCAPE|DO |''){1,12}",
    ) {
        let small = unit.repeat(4096 / unit.len() + 1);
        let large = unit.repeat(16 * (4096 / unit.len() + 1));
        let (ts, tl) = (fastest_scan(&small).max(1), fastest_scan(&large));
        prop_assert!(tl < 64 * ts, "{:?}: {} ns for {} bytes, {} ns for {} bytes", unit, ts, small.len(), tl, large.len());
    }
}
