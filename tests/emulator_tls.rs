//! TLS between clients and the emulator, with a CA the test generates.
#![cfg(all(feature = "emulator", feature = "tls"))]

mod common;

use pinpool::emulator::{Emulator, EmulatorConfig};

fn connector(ca_pem: &str) -> tokio_postgres_rustls::MakeRustlsConnect {
    tokio_postgres_rustls::MakeRustlsConnect::new(common::trusting(ca_pem))
}

#[tokio::test]
async fn clients_verifying_the_right_ca_connect_and_others_are_refused() {
    let (good_ca, good_cert, good_key) = common::test_pki(&["localhost"]);
    let (other_ca, _, _) = common::test_pki(&["localhost"]);
    let emu = Emulator::start(
        EmulatorConfig::new(common::database_url())
            .max_connections(1)
            .application_name("em_tls")
            .tls_pem(good_cert.as_bytes(), good_key.as_bytes(), true)
            .unwrap(),
    )
    .await
    .unwrap();
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=require",
        emu.addr().port()
    );
    let (client, conn) = tokio_postgres::connect(&url, connector(&good_ca))
        .await
        .expect("TLS with the right CA");
    tokio::spawn(conn);
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    let refused = tokio_postgres::connect(&url, connector(&other_ca)).await;
    assert!(
        refused.is_err(),
        "a client expecting another CA must be refused"
    );

    // TLS is required: a plain connection is refused.
    let plain = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=disable",
        emu.addr().port()
    );
    let err = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
        .await
        .err()
        .expect("plain refused");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("requires TLS"), "{err:?}");
}

#[tokio::test]
async fn tls_works_over_a_modelled_hop_and_its_login_counts_two_round_trips() {
    let (ca, cert, key) = common::test_pki(&["localhost"]);
    let latency = std::time::Duration::from_millis(25);
    let emu = Emulator::start(
        EmulatorConfig::new(common::database_url())
            .max_connections(1)
            .application_name("em_tls_hop")
            .client_latency(latency)
            .tls_pem(cert.as_bytes(), key.as_bytes(), true)
            .unwrap(),
    )
    .await
    .unwrap();
    let trips = emu.track_round_trips("em_tls_hop_client");
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=require&application_name=em_tls_hop_client",
        emu.addr().port()
    );
    let (client, conn) = tokio_postgres::connect(&url, connector(&ca))
        .await
        .expect("TLS over the hop");
    tokio::spawn(conn);
    // The SSLRequest's answer and the startup's; the TLS handshake's own are not counted.
    assert_eq!(trips.get(), 2);
    let t = std::time::Instant::now();
    let one: i32 = client
        .query_typed_one("SELECT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
    assert!(t.elapsed() >= 2 * latency, "{:?}", t.elapsed());
    assert_eq!(trips.get(), 3);
}
