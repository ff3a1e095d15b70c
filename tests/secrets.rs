//! No secret in Debug, Display, errors, tracing output or metrics: a run with known passwords
//! (right and wrong, for the database and for the emulator) captures all of them and searches.
#![cfg(feature = "emulator")]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use pinpool::emulator::{Emulator, EmulatorConfig};
use pinpool::{Pool, PooledClient};

const DB_SECRET: &str = common::PASSWORD_ROLE_SECRET;
const WRONG: &str = "wrong-secret-4711";
const PROXY_SECRET: &str = "proxy-secret-0815";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_secret_reaches_debug_display_errors_logs_or_metrics() {
    let logs = Capture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let recorder = common::TestRecorder::default();
    let mut seen = String::new();
    tracing::subscriber::with_default(subscriber, || {
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
    });
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
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
