//! No secret in Debug, Display, errors, tracing output or metrics: a run with known passwords
//! (right and wrong, for the database and for the emulator) captures all of them and searches.
#![cfg(feature = "emulator")]

mod common;

use pinpool::emulator::{Emulator, EmulatorConfig};
use pinpool::{Pool, PooledClient};

const DB_SECRET: &str = common::PASSWORD_ROLE_SECRET;
const WRONG: &str = "wrong-secret-4711";
const PROXY_SECRET: &str = "proxy-secret-0815";

#[test]
fn no_secret_reaches_debug_display_errors_logs_or_metrics() {
    let (logs, guard) = common::capture(tracing::Level::TRACE);
    let recorder = common::TestRecorder::default();
    let mut seen = String::new();
    common::run_recorded(&recorder, async {
        // The database, through the emulator that checks its own password.
        let emu = Emulator::start(
            EmulatorConfig::new(common::database_url())
                .max_connections(2)
                .application_name("secrets")
                .password(PROXY_SECRET),
        )
        .await
        .unwrap();
        let url =
            |password: &str| format!("postgres://postgres:{password}@{}/postgres", emu.addr());
        let wrong = Pool::builder(url(WRONG).as_str()).build().unwrap();
        let err = wrong.get().await.unwrap_err();
        seen += &format!(
            "{err}\n{err:?}\n{wrong:?}\n{:?}\n",
            std::error::Error::source(&err)
        );

        let pool = Pool::builder(url(PROXY_SECRET).as_str())
            .password_provider(|| async { Ok::<_, std::io::Error>(PROXY_SECRET.to_string()) })
            .build()
            .unwrap();
        let c = pool.get().await.unwrap();
        c.batch_execute("SET work_mem = '4MB'").await.unwrap();
        let err = c.query("SELECT 1/0", &[]).await.unwrap_err();
        seen += &format!(
            "{err}\n{err:?}\n{pool:?}\n{c:?}\n{:?}\n{:?}\n",
            PooledClient::pin_state(&c),
            pool.status()
        );
        drop(c);

        // And the database's own password check (the role from scripts/test-db-setup.sh).
        let mut cfg: tokio_postgres::Config = common::database_url().parse().unwrap();
        cfg.user("pinpool_pw").password(WRONG);
        let db_wrong = Pool::builder(cfg.clone()).build().unwrap();
        if let Err(err) = db_wrong.get().await {
            seen += &format!("{err}\n{err:?}\n");
        }
        cfg.password(DB_SECRET);
        let db_pool = Pool::builder(cfg).build().unwrap();
        if let Ok(c) = db_pool.get().await {
            seen += &format!("{db_pool:?}\n{c:?}\n");
        }
        seen += &format!("{:?}\n", emu.counters());
    });
    drop(guard);
    let logs = logs.text();
    let metrics = recorder.names().join("\n");
    assert!(
        logs.contains("pinpool"),
        "tracing output was captured: {logs}"
    );
    assert!(
        logs.contains("password authentication failed"),
        "the emulator logged the refusal: {logs}"
    );
    for secret in [DB_SECRET, WRONG, PROXY_SECRET] {
        for (what, text) in [
            ("Debug/Display/errors", &seen),
            ("tracing", &logs),
            ("metrics", &metrics),
        ] {
            assert!(
                !text.contains(secret),
                "{secret} appears in {what}:\n{text}"
            );
        }
    }
}

/// The texts of a `build()` error a caller may print: the message, Display and Debug.
fn error_texts(url: &str) -> Option<Vec<String>> {
    let err = Pool::builder(url).build().err()?;
    let mut texts = vec![err.to_string(), format!("{err:?}")];
    if let pinpool::Error::Config { message, .. } = &err {
        texts.push(message.clone());
    }
    Some(texts)
}

/// The pieces of `secret` (3 characters or longer) that do not occur in `elsewhere`.
fn pieces_only_in<'a>(secret: &'a str, elsewhere: &str) -> Vec<&'a str> {
    let bounds: Vec<usize> = secret
        .char_indices()
        .map(|(i, _)| i)
        .chain([secret.len()])
        .collect();
    let mut pieces = Vec::new();
    for (a, &start) in bounds.iter().enumerate() {
        for &end in &bounds[(a + 3).min(bounds.len())..] {
            let piece = &secret[start..end];
            if !elsewhere.contains(piece) {
                pieces.push(piece);
            }
        }
    }
    pieces
}

fn assert_no_user_info_in_errors(user_info: &str, url: &str) {
    let rest = url.replacen(user_info, "", 1);
    let Some(texts) = error_texts(url) else {
        return;
    };
    for text in &texts {
        for piece in pieces_only_in(user_info, &rest) {
            assert!(
                !text.contains(piece),
                "the error for {url:?} quotes {piece:?} of the user-info: {text}"
            );
        }
    }
}

#[test]
fn build_errors_quote_no_part_of_a_password_that_confuses_the_url_parser() {
    for (user_info, url) in [
        // A `/` in the password: the text after `:` was taken for the port.
        (
            "app:Secret/tail",
            "postgres://app:Secret/tail@db:54321x/app",
        ),
        // A `?` in the password: the rest of it was taken for a parameter.
        ("app:Pa?Secret=1", "postgres://app:Pa?Secret=1@db:x/app"),
        // An `@` in the password: tokio-postgres ends the user-info at the first one, and the
        // rest of the password became the host name.
        ("app:Pa@Secret", "postgres://app:Pa@Secret@db/app"),
        ("app:Pa@Secret", "postgres://app:Pa@Secret@db/app?bogus=1"),
        (
            "app:Pa@Secret",
            "postgres://app:Pa@Secret@db/app?sslrootcert=/nonexistent/x.pem&sslmode=verify-full",
        ),
        // `#` and `:` (the fragment, a second colon).
        ("app:Se#c:ret", "postgres://app:Se#c:ret@db:nope/app"),
        // Spaces, and a password that looks like the rest of a URL.
        (
            "app:PA SS@DB:1/X?Y",
            "postgres://app:PA SS@DB:1/X?Y@db/app?connect_timeout=never",
        ),
    ] {
        assert!(error_texts(url).is_some(), "{url} is refused");
        assert_no_user_info_in_errors(user_info, url);
    }
    // Errors still name what is wrong where no password is involved.
    let err = Pool::builder("postgres://app:pw@db:54321x/app")
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("port") && err.contains("54321x"), "{err}");
    let err = Pool::builder("postgres://app:pw@db/app?bogus=1")
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn a_quoted_key_value_password_is_neither_split_nor_quoted() {
    // The words inside the quotes are the password, not an sslrootcert parameter.
    let kv = "host=db user=app password='PW sslrootcert=/S3CRET-9 X' sslmode=require";
    if let Some(texts) = error_texts(kv) {
        for text in texts {
            assert!(!text.contains("S3CRET"), "{text}");
        }
    }
}

mod url_property {
    use proptest::prelude::*;

    /// Characters a password may hold, URL delimiters among them. No lower-case letters, space,
    /// `"` or backslash, so a piece of the password cannot be mistaken for words of a message
    /// or for Debug's escaping (a space is in the cases above).
    fn secret_text(len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
        let chars: Vec<char> = "/?#@:%&=,[]!*+;~$'"
            .chars()
            .chain('A'..='Z')
            .chain('0'..='9')
            .chain(['é', 'ß'])
            .collect();
        prop::collection::vec(prop::sample::select(chars), len)
            .prop_map(|v| v.into_iter().collect())
    }

    fn one_of(options: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
        prop::sample::select(options)
    }

    /// `PROPTEST_CASES` runs more cases.
    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(512)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]
        #[test]
        fn no_build_error_quotes_the_user_info(
            scheme in one_of(&["postgres://", "postgresql://"]),
            user in secret_text(1..8),
            password in secret_text(0..24),
            host in one_of(&["db", "DB.example", "[::1]", "[::1", "h1,h2", ""]),
            port in one_of(&["", ":5432", ":54321x", ":99999", ":", ":-1", ":5432,x:7", ":%FF"]),
            path in one_of(&["", "/app", "/", "/a%FFb"]),
            params in one_of(&[
                "",
                "?sslmode=verify-full",
                "?sslmode=bogus",
                "?foo=bar",
                "?connect_timeout=x",
                "?application_name=x&",
                "?&&",
                "?port=abc",
                "?noequals",
                "?host=%FF",
                "?sslrootcert=/nonexistent/pinpool.pem&sslmode=verify-ca",
                "?keepalives=2&application_name=a@b",
            ]),
        ) {
            let user_info = format!("{user}:{password}");
            let url = format!("{scheme}{user_info}@{host}{port}{path}{params}");
            super::assert_no_user_info_in_errors(&user_info, &url);
        }
    }
}

#[test]
fn the_emulator_config_debug_shows_neither_password() {
    for upstream in [
        "postgres://app:Upstream-Secret-1@db:5432/app",
        "postgresql://app:Upstream-Secret-1@db/app?application_name=x",
        // Unencoded `@`, `:` and `/` in the password.
        "postgres://app:Up@stream/Secret:1@db/app",
        "host=db user=app password=Upstream-Secret-1 dbname=app",
        "host=db user=app password='Upstream Secret-1' dbname=app",
    ] {
        let config = EmulatorConfig::new(upstream).password(PROXY_SECRET);
        for text in [format!("{config:?}"), format!("{config:#?}")] {
            for secret in [PROXY_SECRET, "Secret-1", "Up@stream", "stream/Secret"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains("app") && text.contains("db"), "{text}");
        }
    }
}
