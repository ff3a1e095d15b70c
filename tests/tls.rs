//! TLS from the pool to the database (feature `tls`): through the emulator terminating TLS
//! with a CA the test makes (the shared server's TLS settings stay as they are).
#![cfg(all(feature = "emulator", feature = "tls"))]

mod common;

use pinpool::emulator::{Emulator, EmulatorConfig};
use pinpool::{Error, Pool};

async fn emulator(cert: &str, key: &str) -> Emulator {
    Emulator::start(
        EmulatorConfig::new(common::database_url())
            .max_connections(2)
            .application_name("tls_pool")
            .tls_pem(cert.as_bytes(), key.as_bytes(), true)
            .unwrap(),
    )
    .await
    .unwrap()
}

async fn select_one(url: String, ca: &str) -> Result<i32, Error> {
    let pool = Pool::builder(url)
        .root_certificates_pem(ca.as_bytes())
        .build()?;
    let c = pool.get().await?;
    c.query_one_scalar("SELECT 1", &[]).await
}

#[tokio::test]
async fn verify_full_connects_with_the_right_ca_and_name_only() {
    let (ca, cert, key) = common::test_pki(&["localhost"]);
    let (other_ca, _, _) = common::test_pki(&["localhost"]);
    let emu = emulator(&cert, &key).await;
    let port = emu.addr().port();
    let url = |host: &str, mode: &str| {
        format!("postgres://postgres@{host}:{port}/postgres?sslmode={mode}")
    };

    assert_eq!(
        select_one(url("localhost", "verify-full"), &ca)
            .await
            .unwrap(),
        1
    );

    let err = select_one(url("localhost", "verify-full"), &other_ca)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connect(_)),
        "a wrong CA is refused: {err:?}"
    );

    // 127.0.0.1 is not a name in the certificate.
    let err = select_one(url("127.0.0.1", "verify-full"), &ca)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Connect(_)),
        "a wrong host name is refused: {err:?}"
    );
    // verify-ca checks the chain only.
    assert_eq!(
        select_one(url("127.0.0.1", "verify-ca"), &ca)
            .await
            .unwrap(),
        1
    );
    assert!(
        select_one(url("127.0.0.1", "verify-ca"), &other_ca)
            .await
            .is_err()
    );

    // The CA can come from the connection string, as RDS documents it.
    let dir = std::env::temp_dir().join(format!("pinpool-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ca.pem");
    std::fs::write(&file, &ca).unwrap();
    let with_file = format!(
        "{}&sslrootcert={}",
        url("localhost", "verify-full"),
        file.display()
    );
    let pool = Pool::builder(with_file).build().unwrap();
    let one: i32 = pool
        .get()
        .await
        .unwrap()
        .query_one_scalar("SELECT 1", &[])
        .await
        .unwrap();
    assert_eq!(one, 1);
}

/// Over TLS the observer sits on the TLS stream: the server's transaction status and what is
/// sent are seen as on a plaintext connection.
#[tokio::test]
async fn tls_connections_are_observed() {
    let (ca, cert, key) = common::test_pki(&["localhost"]);
    let emu = emulator(&cert, &key).await;
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full",
        emu.addr().port()
    );
    let pool = Pool::builder(url)
        .root_certificates_pem(ca.as_bytes())
        .max_size(1)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    drop(c);
    assert_eq!(
        pool.status().closed.get(pinpool::CloseReason::UnknownState),
        1
    );
    let c = pool.get().await.unwrap();
    c.batch_execute("SET statement_timeout = '9s'")
        .await
        .unwrap();
    assert!(pinpool::PooledClient::pin_state(&c).is_pinned());
}

/// `sslmode=prefer` with a TLS connector against a server that declines TLS: tokio-postgres
/// would go on over the bare socket, which the observer cannot see; pinpool reconnects in
/// plaintext, observed.
#[tokio::test]
async fn a_server_declining_tls_under_prefer_is_still_observed() {
    let (ca, _, _) = common::test_pki(&["localhost"]);
    let emu = Emulator::start(
        EmulatorConfig::new(common::database_url())
            .max_connections(1)
            .application_name("tls_prefer"),
    )
    .await
    .unwrap();
    let config = common::trusting(&ca);
    let pool = Pool::builder(format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=prefer",
        emu.addr().port()
    ))
    .tls(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    .max_size(1)
    .build()
    .unwrap();
    // An unobserved connection never shows a ReadyForQuery: it could not be kept.
    let c = pool.get().await.unwrap();
    let one: i32 = c.query_one_scalar("SELECT 1", &[]).await.unwrap();
    assert_eq!(one, 1);
    drop(c);
    assert_eq!(pool.status().closed.total(), 0, "{:?}", pool.status());
    let c = pool.get().await.unwrap();
    c.batch_execute("SET statement_timeout = '9s'")
        .await
        .unwrap();
    assert!(pinpool::PooledClient::pin_state(&c).is_pinned());
}
