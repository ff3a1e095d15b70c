//! Attacks on what this session merged: the wire's copy bookkeeping against a COPY the server
//! ends, the configuration as data, and the driver's client reached through `Deref`.

mod common;

use std::time::{Duration, Instant};

use common::{admin, backends, builder};

/// tokio-postgres cannot feed a `COPY ... FROM STDIN` sent as a simple Query: its
/// `simple_query` fails at the CopyInResponse. The server stays in copy mode until the next
/// message that is not copy data, which fails the copy; everything after is answered as usual.
/// The connection is idle and clean afterwards, so it goes back to the pool, and its socket
/// bound must still stop a raw call that outlives `query_timeout`.
#[tokio::test]
async fn a_simple_query_copy_does_not_leave_later_raw_calls_unbounded() {
    let app = "att5_copy_stuck";
    let admin = admin().await;
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS att5_copy_target (x int)")
        .await
        .unwrap();
    let pool = builder(app)
        .max_size(1)
        .query_timeout(Some(Duration::from_secs(1)))
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    assert!(
        c.simple_query("COPY att5_copy_target FROM STDIN")
            .await
            .is_err()
    );
    // The next call's Parse ends the copy on the server (with an error for the copy).
    let _ = c.query_one("SELECT 1", &[]).await;
    let pid = backends(&admin, app).await;
    drop(c);
    let c = pool.get().await.unwrap();
    if backends(&admin, app).await != pid {
        // The connection was closed on return: nothing stuck can follow.
        return;
    }
    // The driver's client through deref: each request is bounded at the socket by
    // query_timeout (1 s).
    let start = Instant::now();
    let raw: &tokio_postgres::Client = &c;
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        raw.query("SELECT pg_sleep(20)", &[]),
    )
    .await
    .expect("the socket's bound stops the call, or the sleep ends");
    assert!(
        r.is_err(),
        "a 20 s raw call ran to its end past query_timeout (1 s), took {:?}",
        start.elapsed()
    );
}

#[cfg(feature = "serde")]
mod config_data {
    use pinpool::{Config, Error};

    fn config(json: serde_json::Value) -> Config {
        serde_json::from_value(json).unwrap()
    }

    fn option_of(c: Config) -> &'static str {
        match c.builder().build() {
            Err(Error::Config { option, .. }) => option,
            Err(other) => panic!("not a configuration error: {other:?}"),
            Ok(_) => panic!("built"),
        }
    }

    /// `host` and `hosts` both given: which one the data means is unclear (the URL's hosts
    /// beside either are refused); they are silently joined.
    #[test]
    fn host_and_hosts_together_are_refused() {
        let c = config(serde_json::json!({
            "host": "db-a.example", "hosts": ["db-b.example"], "user": "app"
        }));
        let option = option_of(c);
        assert!(option == "host" || option == "hosts", "{option}");
    }

    /// Port 0 cannot be connected to: refused at `build()`, naming `port`, as a bad port in a
    /// URL is.
    #[test]
    fn port_zero_is_refused_naming_port() {
        let c = config(serde_json::json!({ "host": "127.0.0.1", "port": 0, "user": "app" }));
        assert_eq!(option_of(c), "port");
        let c = config(serde_json::json!({ "url": "postgres://app@127.0.0.1:0/app" }));
        assert_eq!(option_of(c), "port");
    }

    /// The error names the option as the data spells it: `hosts`, not `host`.
    #[test]
    fn a_bad_hosts_list_is_named_hosts() {
        let c = config(serde_json::json!({ "hosts": [], "user": "app" }));
        assert_eq!(option_of(c), "hosts");
        let c = config(serde_json::json!({ "hosts": ["db.example", ""], "user": "app" }));
        assert_eq!(option_of(c), "hosts");
    }

    /// A duration's error says which option it is about: a file with ten durations and the
    /// message "this duration cannot be off at line 1 column 40" leaves the reader counting
    /// columns (an environment variable read by envy has no line or column at all).
    #[test]
    fn a_bad_duration_names_its_option() {
        let e = serde_json::from_value::<Config>(serde_json::json!({
            "pool": { "acquire_timeout": "off" }
        }))
        .unwrap_err();
        assert!(e.to_string().contains("acquire_timeout"), "{e}");
        let e = serde_json::from_value::<Config>(serde_json::json!({
            "pool": { "query_timeout": true }
        }))
        .unwrap_err();
        assert!(e.to_string().contains("query_timeout"), "{e}");
    }

    /// A Unix socket directory and an application_name with spaces are ordinary data.
    #[test]
    fn a_unix_socket_and_a_spaced_application_name_build() {
        let c = config(serde_json::json!({
            "host": "/var/run/postgresql", "user": "app",
            "application_name": "my service (eu-west-1)"
        }));
        c.builder().build().unwrap();
    }

    /// Secrets given in odd places stay out of `Debug`: a key-value `url` with a password and
    /// a password field beside it.
    #[test]
    fn a_key_value_url_with_a_password_is_not_printed() {
        let c = config(serde_json::json!({
            "url": "host=db.example user=app password=kv-secret-7",
            "password": "field-secret-8"
        }));
        let shown = format!("{c:?} {:?}", c.builder().build().map(|p| format!("{p:?}")));
        assert!(!shown.contains("kv-secret-7"), "{shown}");
        assert!(!shown.contains("field-secret-8"), "{shown}");
    }

    /// Absurd durations that parse are refused or held, never a panic at build or first use.
    #[tokio::test]
    async fn huge_durations_do_not_panic() {
        let c = config(serde_json::json!({
            "url": crate::common::url_for("att5_huge"),
            "pool": {
                "max_size": usize::MAX, "acquire_timeout": 1e15, "connect_timeout": "1e15",
                "query_timeout": 1e15, "idle_timeout": 1e15, "max_lifetime": 86000,
                "validate_timeout": 1e15, "held_too_long": 1e15, "refill_after_invocation": 1e15
            }
        }));
        let pool = match c.builder().build() {
            Ok(p) => p,
            Err(e) => {
                assert!(matches!(e, Error::Config { .. }), "{e:?}");
                return;
            }
        };
        let client = pool.get().await.unwrap();
        client.query_one("SELECT 1", &[]).await.unwrap();
        drop(client);
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(30);
        pool.invocation(deadline, async {
            let c = pool.get().await.unwrap();
            c.query_one("SELECT 1", &[]).await.unwrap();
        })
        .await;
    }
}
