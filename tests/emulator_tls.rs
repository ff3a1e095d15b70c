//! TLS between clients and the emulator, with a CA the test generates.
#![cfg(all(feature = "emulator", feature = "tls"))]

mod common;

use std::sync::Arc;

use pinpool::emulator::{Emulator, EmulatorConfig};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki(names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn connector(ca_pem: &str) -> tokio_postgres_rustls::MakeRustlsConnect {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

#[tokio::test]
async fn clients_verifying_the_right_ca_connect_and_others_are_refused() {
    let good = pki(&["localhost"]);
    let other = pki(&["localhost"]);
    let emu = Emulator::start(
        EmulatorConfig::new(common::database_url())
            .max_connections(1)
            .application_name("em_tls")
            .tls_pem(good.cert_pem.as_bytes(), good.key_pem.as_bytes(), true)
            .unwrap(),
    )
    .await
    .unwrap();
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=require",
        emu.addr().port()
    );
    let (client, conn) = tokio_postgres::connect(&url, connector(&good.ca_pem))
        .await
        .expect("TLS with the right CA");
    tokio::spawn(conn);
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    let refused = tokio_postgres::connect(&url, connector(&other.ca_pem)).await;
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
