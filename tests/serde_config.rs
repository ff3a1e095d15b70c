//! The configuration as data (feature `serde`): what a service reads from a file or the
//! environment builds the same pool as the builder, and bad data fails clearly.
#![cfg(feature = "serde")]

mod common;

use std::time::Duration;

use pinpool::{Config, Error};

fn config(json: serde_json::Value) -> Result<Config, serde_json::Error> {
    serde_json::from_value(json)
}

fn option_of(e: Error) -> &'static str {
    match e {
        Error::Config { option, .. } => option,
        other => panic!("not a configuration error: {other:?}"),
    }
}

#[tokio::test]
async fn fields_alone_make_a_working_pool() {
    let (host, port) = common::database_addr();
    let c = config(serde_json::json!({
        "host": host, "port": port, "user": "postgres", "dbname": "postgres",
        "application_name": "serde_fields",
        "pool": {
            "max_size": 3, "min_idle": 1, "acquire_timeout": "2s", "connect_timeout": 4,
            "query_timeout": "off", "deadline_margin": "150ms", "max_lifetime": "30m",
            "idle_timeout": null, "pin_policy": "keep_for_invocation", "pin_rules": "legacy",
            "freeze_check": "replace", "validate_idle_after": "off", "validate_timeout": 0.5,
            "refill_after_invocation": "100ms", "held_too_long": "1s",
            "trim_at_invocation_end": true, "statement_cache_capacity": 10,
            "statement_cache_bytes": 4096
        }
    }))
    .unwrap();
    let pool = c.builder().build().unwrap();
    assert_eq!(pool.status().max_size, 3);
    assert_eq!(pool.deadline_margin(), Duration::from_millis(150));
    let client = pool.get().await.unwrap();
    let app: String = client
        .query_one_scalar("SELECT current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_eq!(app, "serde_fields");
}

#[tokio::test]
async fn a_url_with_names_given_beside_it() {
    let c = config(serde_json::json!({
        "url": common::database_url(),
        "application_name": "serde_url",
        "pool": { "max_size": 2 }
    }))
    .unwrap();
    let pool = c.builder().build().unwrap();
    let client = pool.get().await.unwrap();
    let app: String = client
        .query_one_scalar("SELECT current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_eq!(app, "serde_url");
}

#[tokio::test]
async fn a_proxy_profile_from_data() {
    let c = config(serde_json::json!({
        "url": common::database_url(),
        "application_name": "serde_proxy",
        "pool": { "proxy": "pgbouncer_transaction" }
    }))
    .unwrap();
    let pool = c.builder().build().unwrap();
    let client = pool.get().await.unwrap();
    // The transaction pooler's profile refuses what would leak, before sending it.
    let e = client
        .batch_execute("SET work_mem = '8MB'")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PinRefused { .. }), "{e:?}");
    let e = config(serde_json::json!({ "pool": { "proxy": "pgpool" } })).unwrap_err();
    assert!(e.to_string().contains("pgpool"), "{e}");
}

#[test]
fn bad_data_fails_naming_what_is_wrong() {
    let e = config(serde_json::json!({ "pool": { "max_sise": 3 } })).unwrap_err();
    assert!(e.to_string().contains("max_sise"), "{e}");
    let e = config(serde_json::json!({ "pool": { "acquire_timeout": "soon" } })).unwrap_err();
    assert!(e.to_string().contains("soon"), "{e}");
    let e = config(serde_json::json!({ "pool": { "acquire_timeout": "off" } })).unwrap_err();
    assert!(e.to_string().contains("cannot be off"), "{e}");
    let e = config(serde_json::json!({ "pool": { "pin_policy": "sometimes" } })).unwrap_err();
    assert!(e.to_string().contains("sometimes"), "{e}");
    let e = config(serde_json::json!({ "pool": { "validate_timeout": -1 } })).unwrap_err();
    assert!(e.to_string().contains("-1"), "{e}");
}

#[test]
fn build_validates_as_the_builder_does() {
    let base = |pool: serde_json::Value| {
        config(serde_json::json!({ "host": "127.0.0.1", "user": "app", "pool": pool }))
            .unwrap()
            .builder()
            .build()
            .unwrap_err()
    };
    assert_eq!(
        option_of(base(serde_json::json!({ "max_size": 0 }))),
        "max_size"
    );
    assert_eq!(
        option_of(base(serde_json::json!({ "max_size": 2, "min_idle": 3 }))),
        "min_idle"
    );
    assert_eq!(
        option_of(base(serde_json::json!({ "acquire_timeout": 0 }))),
        "acquire_timeout"
    );
    assert_eq!(
        option_of(base(serde_json::json!({ "max_lifetime": "25h" }))),
        "max_lifetime"
    );
    let no_user = config(serde_json::json!({ "host": "127.0.0.1" })).unwrap();
    assert_eq!(option_of(no_user.builder().build().unwrap_err()), "user");
    let both = config(serde_json::json!({
        "url": "postgres://app@db.example/app", "port": 6432
    }))
    .unwrap();
    assert_eq!(option_of(both.builder().build().unwrap_err()), "port");
}

#[test]
fn secrets_are_never_printed() {
    let c = config(serde_json::json!({
        "url": "postgres://app:url-secret-1@db.example/app",
        "password": "field-secret-2"
    }))
    .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("url-secret-1"), "{shown}");
    assert!(!shown.contains("field-secret-2"), "{shown}");
    let bad = config(serde_json::json!({ "url": "postgres://app:url-secret-3@db:notaport/app" }))
        .unwrap();
    let e = bad.builder().build().unwrap_err().to_string();
    assert!(!e.contains("url-secret-3"), "{e}");
}
