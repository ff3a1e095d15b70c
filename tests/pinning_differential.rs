//! The pinning classifier against PostgreSQL itself: generated statements put each construct
//! that leaves session state (the functions RDS Proxy pins on, temporary objects, cursors,
//! `LISTEN`, SQL `PREPARE`, settings, sequence state) into many syntactic positions, with
//! quoting, comments, Unicode escapes, dollar quotes and odd case. Each runs in a clean session;
//! the session state it left is read back from the server's catalogs, and every statement that
//! left state must be one `classify_with` says pins. A list of known statements could be tuned
//! to the classifier; the server's answer cannot. Half the statements run on sessions with
//! `standard_conforming_strings` off, where a backslash escapes a quote in `'...'`; among the
//! positions are definitions that PostgreSQL runs at once (a default filling existing rows, a
//! `DO` block's declarations).
//!
//! `PINPOOL_DIFF_STATEMENTS` (default 3000) and `PINPOOL_DIFF_SEED` set the run; the same seed
//! generates the same statements on every machine. Longer runs: RELIABILITY.md.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use pinpool::pinning::{PinRules, Protocol, StandardStrings, classify, classify_with};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Where a construct's expression goes. `{}` is the expression; `{t}` a table of this run.
const POSITIONS: &[&str] = &[
    "SELECT {}",
    "select {} as v",
    "SELECT 1 WHERE {} IS NOT NULL",
    "SELECT 1 FROM (SELECT 1) a JOIN (SELECT 2) b ON {} IS NOT NULL",
    "SELECT 1 FROM (SELECT 1) a LEFT JOIN LATERAL (SELECT {} AS x) b ON true",
    "SELECT 1 FROM (SELECT 1 AS k) a JOIN (SELECT 1 AS k) b ON a.k = b.k AND {} IS NOT NULL",
    "SELECT CASE WHEN true THEN {} END",
    "SELECT CASE {} WHEN NULL THEN 1 ELSE 2 END",
    "SELECT * FROM (SELECT 1) a, LATERAL (SELECT {}) b",
    "WITH c AS (SELECT {} AS v) SELECT * FROM c",
    "WITH c AS MATERIALIZED (SELECT 1) SELECT {} FROM c",
    "SELECT (SELECT {})",
    "SELECT 1 WHERE EXISTS (SELECT {})",
    "SELECT coalesce(({})::text, 'x')",
    "SELECT length(({})::text)",
    "SELECT ({})::text",
    "SELECT CAST({} AS text)",
    "SELECT ARRAY[{}]",
    "SELECT * FROM (VALUES ({})) v(x)",
    "VALUES ({})",
    "SELECT 1 FROM generate_series(1, 1) g GROUP BY g HAVING count({}) > 0",
    "SELECT 1 ORDER BY {}",
    "SELECT x FROM generate_series(1, 2) x WHERE x = 3 OR {} IS NOT NULL",
    "SELECT 'a;b' AS s, {}",
    "SELECT $q$ ; $q$ AS s, {}",
    "SELECT $$x$$, {}",
    "SELECT E'\\';' AS s, {}",
    "SELECT \"v\" FROM (SELECT {} AS \"v\") s",
    "SELECT 1 /* c */ + 0 WHERE {} IS NOT NULL -- tail",
    "SELECT 1 /* nested /* c */ */, {}",
    "SELECT 1; SELECT {}",
    "INSERT INTO {t} (v) SELECT ({})::text",
    "INSERT INTO {t} (v) VALUES (({})::text) RETURNING v",
    "UPDATE {t} SET v = ({})::text",
    "DELETE FROM {t} WHERE v = ({})::text",
    "EXPLAIN ANALYZE SELECT {}",
    "SELECT * FROM ROWS FROM (generate_series(1, 1)) r, LATERAL (SELECT {}) s",
    "SELECT row_number() OVER (ORDER BY {})",
    "SELECT greatest(1, 2) WHERE ({}) IS NOT NULL",
    "SELECT 1 WHERE 1 IN (SELECT 1 WHERE {} IS NOT NULL)",
    "COPY (SELECT {}) TO STDOUT",
    // Definitions that PostgreSQL runs at once: on a table that has rows (`{r}`), as it is
    // created (`{c}` a fresh name), or in a DO block's declarations.
    "ALTER TABLE {r} ADD COLUMN d text DEFAULT {}::text",
    "ALTER TABLE {r} ADD d text DEFAULT {}::text",
    "ALTER TABLE {r} ADD COLUMN IF NOT EXISTS d text DEFAULT {}::text, ALTER COLUMN v SET DEFAULT 'x'",
    "ALTER TABLE {r} ALTER COLUMN v SET DEFAULT 'x', ADD COLUMN d text DEFAULT {}::text",
    "ALTER TABLE {r} ALTER COLUMN v TYPE text USING {}::text",
    "ALTER TABLE {r} ALTER v SET DATA TYPE varchar(200) USING v || {}::text",
    "ALTER TABLE {r} ADD CONSTRAINT c CHECK ({}::text IS NOT NULL)",
    "ALTER TABLE {r} ADD CHECK (v IS NULL OR {}::text IS NOT NULL)",
    "ALTER TABLE {r} ADD COLUMN d text GENERATED ALWAYS AS ({}::text) STORED",
    "CREATE INDEX ON {r} (({}::text))",
    "CREATE INDEX ON {r} (v) WHERE {}::text IS NOT NULL",
    "CREATE TABLE {c} AS SELECT {}::text AS v",
    "SELECT {}::text AS v INTO {c}",
    "CREATE MATERIALIZED VIEW {c} AS SELECT {}::text AS v",
    "CREATE TABLE {c} PARTITION OF {t}_parted FOR VALUES IN ({}::text || '{c}')",
    "SELECT 1 FROM {t} TABLESAMPLE bernoulli (10) REPEATABLE (length({}::text))",
    "CREATE TABLE {c} (v text DEFAULT {}::text)",
    "ALTER TABLE {r} ALTER COLUMN v SET DEFAULT {}::text",
    "DO $$DECLARE a int; b text DEFAULT {}::text; BEGIN END$$",
    "DO $$DECLARE b text := {}::text; BEGIN END$$",
    "DO $$<<l>> DECLARE b text DEFAULT {}::text; BEGIN END$$",
    "DO $$BEGIN DECLARE b text DEFAULT {}::text; BEGIN END; END$$",
    "DO $$BEGIN <<inner>> DECLARE b text = {}::text; BEGIN END; END$$",
    "DO $$BEGIN DECLARE a int; create text DEFAULT {}::text; BEGIN END; END$$",
    // Literals with backslashes: the server reads them by its standard_conforming_strings.
    r"SELECT 'a\'' , {}, 'b'",
    r"SELECT 'it\'s' AS s, {}",
    r"SELECT length('\'), {} --')",
    r"SELECT N'a\'' , {}, 'b'",
    r"SELECT 'x\\' AS s, {}",
    r"SELECT E'x\\', 'y\' AS s, {} -- '",
    r#"SELECT 1 AS "a\", {}"#,
    r"SELECT $x$\$x$, {}",
    r"SELECT 1 /* \' */, {}",
    r"DO $$BEGIN PERFORM 'a\'' , {}, 'b'; END$$",
    r"DO $$BEGIN PERFORM length('\'), {} --'); END$$",
    r"SELECT E'\\\'' AS s, {}",
    r"SELECT U&'!0061' UESCAPE '!' AS s, {}",
    r"SELECT 'a\\' /* ' */ , {}",
    r"SELECT 'a''\' , {} --'",
    r"SELECT $$\$$ AS s, {}, $a$'$a$",
    r"SELECT 1 /* /* \' */ ' */ , {}",
];

/// The names a function can be spelled with. `{}` is the function's name.
const SPELLINGS: &[&str] = &[
    "{}",
    "pg_catalog.{}",
    "\"{}\"",
    "pg_catalog.\"{}\"",
    "PG_CATALOG.{}",
    "{} /* c */ ",
    "{}\n",
    "pg_catalog /* c */ . {}",
];

/// Functions that leave session state: (name, arguments). `{seq}` is this run's sequence,
/// `{k}` a fresh advisory lock key.
const FUNCTIONS: &[(&str, &str)] = &[
    ("set_config", "('application_name', 'pinpool_diff', false)"),
    ("set_config", "('pinpool.diff', 'x', false)"),
    ("nextval", "('{seq}')"),
    ("setval", "('{seq}', 5)"),
    ("pg_advisory_lock", "({k})"),
    ("pg_try_advisory_lock", "({k})"),
    ("pg_advisory_lock_shared", "({k})"),
    ("pg_try_advisory_lock_shared", "(71, 7)"),
];

/// Statements that leave state by themselves, with `{n}` a fresh name.
const STATEMENTS: &[&str] = &[
    "CREATE TEMP TABLE d{n} (a int)",
    "CREATE TEMPORARY TABLE d{n} (a int)",
    "create local temp table d{n} (a int)",
    "CREATE GLOBAL TEMPORARY TABLE d{n} (a int)",
    "CREATE TEMP TABLE d{n} AS SELECT 1 AS a",
    "CREATE TEMP TABLE IF NOT EXISTS d{n} (a int)",
    "CREATE TABLE pg_temp.d{n} (a int)",
    "CREATE TABLE IF NOT EXISTS pg_temp.d{n} (a int)",
    "CREATE TABLE \"pg_temp\".d{n} (a int)",
    "CREATE TABLE PG_TEMP.d{n} (a int)",
    "CREATE TABLE pg_temp . d{n} (a int)",
    "CREATE UNLOGGED TABLE pg_temp.d{n} (a int)",
    "CREATE TEMP VIEW d{n} AS SELECT 1",
    "CREATE OR REPLACE TEMP VIEW d{n} AS SELECT 1",
    "CREATE VIEW pg_temp.d{n} AS SELECT 1",
    "CREATE TEMP SEQUENCE d{n}",
    "CREATE SEQUENCE pg_temp.d{n}",
    "CREATE FUNCTION pg_temp.d{n}() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE TYPE pg_temp.d{n} AS (a int)",
    "CREATE DOMAIN pg_temp.d{n} AS int",
    "SELECT 1 AS a INTO TEMP d{n}",
    "SELECT 1 AS a INTO TEMPORARY d{n}",
    "SELECT 1 AS a INTO TEMP TABLE d{n}",
    "SELECT 1 AS a INTO LOCAL TEMP d{n}",
    "SELECT 1 AS a INTO GLOBAL TEMPORARY d{n}",
    "SELECT 1 AS a INTO pg_temp.d{n}",
    "SELECT 1 AS a INTO \"pg_temp\".d{n}",
    "SELECT 1 AS a INTO pg_temp.d{n} FROM generate_series(1, 2)",
    "EXPLAIN ANALYZE CREATE TEMP TABLE d{n} AS SELECT 1",
    "EXPLAIN (ANALYZE) CREATE TABLE pg_temp.d{n} AS SELECT 1",
    "CREATE TABLE pg_temp.d{n} AS SELECT 1",
    "WITH x AS (SELECT 1 AS a) SELECT * INTO TEMP d{n} FROM x",
    "DECLARE d{n} CURSOR WITH HOLD FOR SELECT 1",
    "declare d{n} no scroll cursor with hold for select 1",
    "DECLARE d{n} BINARY CURSOR WITH HOLD FOR SELECT 1",
    "LISTEN d{n}",
    "listen \"D{n}\"",
    "PREPARE d{n} AS SELECT 1",
    "prepare d{n}(int) as select $1",
    "SET application_name = 'pinpool_diff'",
    "SET SESSION statement_timeout = '42s'",
    "set search_path to public",
    "SET TIME ZONE 'Asia/Tokyo'",
    "SET pinpool.diff = 'x'",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "UPDATE pg_settings SET setting = 'x' WHERE name = 'application_name'",
    "update pg_catalog.pg_settings set setting = '42s' where name = 'statement_timeout'",
    "WITH s AS (UPDATE pg_settings SET setting = 'x' WHERE name = 'application_name' RETURNING 1) SELECT * FROM s",
    "UPDATE \"pg_settings\" SET setting = '4321ms' WHERE name = 'statement_timeout'",
    "UPDATE \"pg_catalog\".\"pg_settings\" SET setting = 'x' WHERE name = 'application_name'",
    "DO $$ BEGIN PERFORM set_config('pinpool.diff', 'x', false); END $$",
    "DO $d$ BEGIN CREATE TEMP TABLE d{n} (a int); END $d$",
    "DO LANGUAGE plpgsql $$ BEGIN PERFORM pg_try_advisory_lock(42424242); END $$",
    "DO $$ BEGIN EXECUTE 'SELECT 1'; PERFORM set_config('application_name', 'pinpool_diff', false); END $$",
    // Columns that fill the rows of a table that has some from a sequence.
    "ALTER TABLE {r} ADD COLUMN id serial",
    "ALTER TABLE {r} ADD id bigserial",
    "ALTER TABLE {r} ADD COLUMN id int GENERATED ALWAYS AS IDENTITY",
    "ALTER TABLE {r} ADD COLUMN id int GENERATED BY DEFAULT AS IDENTITY (START WITH 7)",
];

/// Prefixes that must not change the verdict.
const PREFIXES: &[&str] = &["", "  ", "\n", "/* c */ ", "-- c\n", "/* a /* b */ */\n"];

/// One probe: what the session holds, as counts. Read before and after each statement.
const STATE: &str = "SELECT \
    (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) \
    + (SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()) \
    + (SELECT count(*) FROM pg_type WHERE typnamespace = pg_my_temp_schema()), \
    (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
    (SELECT count(*) FROM pg_cursors), \
    (SELECT count(*) FROM pg_prepared_statements WHERE from_sql), \
    (SELECT count(*) FROM pg_listening_channels()), \
    (SELECT count(*) FROM pg_settings WHERE source = 'session')";

fn mangle_case(rng: &mut StdRng, s: &str) -> String {
    // Only outside quotes: quoted text and names are case-sensitive.
    let mut out = String::with_capacity(s.len());
    let mut quote = None;
    for c in s.chars() {
        match (quote, c) {
            (None, '\'' | '"' | '$') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
        out.push(if quote.is_none() && rng.random_bool(0.3) {
            if c.is_ascii_lowercase() {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        } else {
            c
        });
    }
    out
}

/// A function name as a Unicode-escaped identifier, with the default or a chosen escape.
fn unicode_escaped(rng: &mut StdRng, name: &str) -> String {
    let esc = if rng.random_bool(0.5) { '\\' } else { '!' };
    let mut body = String::new();
    for (i, c) in name.chars().enumerate() {
        if i % 2 == 0 {
            body.push_str(&format!("{esc}{:04x}", c as u32));
        } else {
            body.push(c);
        }
    }
    if esc == '\\' {
        format!("U&\"{body}\"")
    } else {
        format!("U&\"{body}\" UESCAPE '{esc}'")
    }
}

struct Run {
    schema: String,
    keys: AtomicU64,
    names: AtomicU64,
}

/// A generated statement, and the table with rows it needs first (for `{r}`), if any.
struct Generated {
    sql: String,
    table: Option<String>,
}

fn generate(rng: &mut StdRng, run: &Run) -> Generated {
    let n = run.names.fetch_add(1, Relaxed);
    let names = |template: &str, table: Option<&str>| {
        template
            .replace("{n}", &n.to_string())
            .replace("{r}", table.unwrap_or(""))
            .replace("{c}", &format!("{}.c{n}", run.schema))
    };
    let table;
    let sql = if rng.random_bool(0.6) {
        let (name, args) = FUNCTIONS[rng.random_range(0..FUNCTIONS.len())];
        let spelled = if rng.random_bool(0.12) {
            unicode_escaped(rng, name)
        } else {
            let s = SPELLINGS[rng.random_range(0..SPELLINGS.len())];
            let mut spelled = s.replace("{}", name);
            if !s.contains('"') {
                spelled = mangle_case(rng, &spelled);
            }
            spelled
        };
        let key = run.keys.fetch_add(1, Relaxed);
        let args = args
            .replace("{seq}", &format!("{}.seq", run.schema))
            .replace("{k}", &key.to_string());
        let call = format!("{spelled}{args}");
        let p = POSITIONS[rng.random_range(0..POSITIONS.len())];
        table = p.contains("{r}").then(|| format!("{}.r{n}", run.schema));
        names(p, table.as_deref())
            .replace("{t}", &format!("{}.t", run.schema))
            .replace("{}", &call)
    } else {
        let s = STATEMENTS[rng.random_range(0..STATEMENTS.len())];
        table = s.contains("{r}").then(|| format!("{}.r{n}", run.schema));
        let s = names(s, table.as_deref());
        if s.contains('"') {
            s
        } else {
            mangle_case(rng, &s)
        }
    };
    Generated {
        sql: format!("{}{sql}", PREFIXES[rng.random_range(0..PREFIXES.len())]),
        table,
    }
}

async fn state(c: &Client) -> (Vec<i64>, bool) {
    let rows = c.simple_query(STATE).await.expect("state probe");
    let counts = rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..6)
                    .map(|i| r.get(i).unwrap().parse::<i64>().unwrap())
                    .collect(),
            ),
            _ => None,
        })
        .unwrap();
    // A sequence function leaves the session's lastval.
    let lastval = c.simple_query("SELECT lastval()").await.is_ok();
    (counts, lastval)
}

/// A client of its own; with `backslashes`, the session reads `'...'` as PostgreSQL did
/// before 9.1 (`standard_conforming_strings = off`, as a role or URL setting can ask).
async fn connect(app: &str, backslashes: bool) -> Client {
    let mut url = common::url_for(app);
    if backslashes {
        url.push_str("&options=-c%20standard_conforming_strings%3Doff");
    }
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

#[derive(Default)]
struct Tally {
    statements: u64,
    failed: u64,
    left_state: u64,
    classified_pinning: u64,
    disagreements: Vec<(String, String)>,
}

impl Tally {
    fn add(&mut self, t: Tally) {
        self.statements += t.statements;
        self.failed += t.failed;
        self.left_state += t.left_state;
        self.classified_pinning += t.classified_pinning;
        self.disagreements.extend(t.disagreements);
    }
}

/// `count` generated statements on four clients whose sessions read strings as
/// `backslashes` says; each classified as the observer classifies what it sends on such a
/// session.
async fn pass(run: &Arc<Run>, seed: u64, count: u64, backslashes: bool) -> Tally {
    let rules = PinRules::new();
    let workers = 4;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w));
            let c = connect("pinpool_diff", backslashes).await;
            let strings = if backslashes {
                StandardStrings::Off
            } else {
                StandardStrings::On
            };
            let mut tally = Tally::default();
            for _ in 0..count / workers {
                let g = generate(&mut rng, &run);
                let sql = g.sql;
                if let Some(t) = &g.table {
                    c.batch_execute(&format!(
                        "CREATE TABLE {t} (a int, v text); INSERT INTO {t} VALUES (1, 'x'), (2, 'y')"
                    ))
                    .await
                    .unwrap();
                }
                let before = state(&c).await;
                let ok = c.simple_query(&sql).await.is_ok();
                let after = state(&c).await;
                tally.statements += 1;
                if !ok {
                    tally.failed += 1;
                }
                // As the observer reads it on this session; not knowing the setting only adds.
                let class = classify_with(&sql, strings);
                let unknown = classify(&sql).reasons;
                assert_eq!(unknown.union(class.reasons), unknown, "{sql}");
                let pins = !rules.pinning_reasons(&class, Protocol::Simple).is_empty();
                if pins {
                    tally.classified_pinning += 1;
                }
                if after != before {
                    tally.left_state += 1;
                    if !pins {
                        tally
                            .disagreements
                            .push((sql.clone(), format!("{before:?} -> {after:?}")));
                    }
                }
                // A clean session for the next one (this client is not behind a proxy).
                c.batch_execute("DISCARD ALL").await.unwrap();
                if let Some(t) = &g.table {
                    c.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for t in tasks {
        total.add(t.await.unwrap());
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_that_leaves_session_state_is_classified_as_pinning() {
    let count: u64 = std::env::var("PINPOOL_DIFF_STATEMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let seed: u64 = std::env::var("PINPOOL_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_d1ff);
    let schema = format!("pinpool_diff_{}", std::process::id());
    let admin = common::admin().await;
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; \
             CREATE SEQUENCE {schema}.seq; CREATE TABLE {schema}.t (v text); \
             CREATE TABLE {schema}.t_parted (v text) PARTITION BY LIST (v)"
        ))
        .await
        .unwrap();
    let run = Arc::new(Run {
        schema: schema.clone(),
        keys: AtomicU64::new(0x7069_6e00_0000 + u64::from(std::process::id()) * 1_000_000),
        names: AtomicU64::new(0),
    });
    // Half the statements on sessions with standard strings, half with backslash escapes.
    let mut total = Tally::default();
    for backslashes in [false, true] {
        let t = pass(&run, seed, count / 2, backslashes).await;
        eprintln!(
            "differential (standard_conforming_strings = {}): {} statements (seed {seed:#x}), {} failed on the server, {} left session state, {} classified pinning, {} disagreements",
            if backslashes { "off" } else { "on" },
            t.statements,
            t.failed,
            t.left_state,
            t.classified_pinning,
            t.disagreements.len()
        );
        // The generator must really exercise the server: most statements run and leave state.
        assert!(
            t.left_state * 2 > t.statements,
            "too few statements left state"
        );
        assert!(t.failed * 5 < t.statements, "too many statements failed");
        total.add(t);
    }
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
    let shown: Vec<String> = total
        .disagreements
        .iter()
        .take(40)
        .map(|(sql, st)| format!("  {sql:?}  {st}"))
        .collect();
    assert!(
        total.disagreements.is_empty(),
        "{} statements left session state but were classified pin-free:\n{}",
        total.disagreements.len(),
        shown.join("\n")
    );
}
