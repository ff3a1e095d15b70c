//! The RDS IAM authentication tokens of `examples/lambda_handler.rs`
//! (`examples/support/rds_iam.rs`), checked against the AWS SDKs' published test vectors and
//! for the shape RDS Proxy expects, with fixed credentials and time. Nothing here talks to AWS.

// The environment readers (`AwsCredentials::from_env`, `region_from_env`) are the example's
// only: they read what Lambda sets, and changing the environment of a threaded test is unsafe.
#[allow(dead_code)]
#[path = "../examples/support/rds_iam.rs"]
mod rds_iam;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pinpool::PasswordProvider;
use rds_iam::{AwsCredentials, TokenTarget};

fn credentials(id: &str, secret: &str, session: Option<&str>) -> AwsCredentials {
    AwsCredentials {
        access_key_id: id.into(),
        secret_access_key: secret.into(),
        session_token: session.map(str::to_string),
    }
}

fn target(host: &str, port: u16, user: &str, region: &str) -> TokenTarget {
    TokenTarget {
        host: host.into(),
        port,
        user: user.into(),
        region: region.into(),
    }
}

/// The token's `host:port/` and its query parameters, in order, decoded.
fn parts(token: &str) -> (&str, Vec<(String, String)>) {
    let (endpoint, query) = token.split_once("/?").expect("host:port/?query");
    let params = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    (endpoint, params)
}

fn signature(params: &[(String, String)]) -> &str {
    let mut found = params.iter().filter(|(k, _)| k == "X-Amz-Signature");
    let (_, v) = found.next().expect("an X-Amz-Signature");
    assert!(found.next().is_none(), "one X-Amz-Signature");
    v
}

fn is_signature(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// aws-sdk-rust's (`aws-sdk-rds`, `auth_token::test::signing_works`), character for character.
#[test]
fn aws_sdk_rust_vector() {
    let token = target(
        "prod-instance.us-east-1.rds.amazonaws.com",
        3306,
        "peccy",
        "us-east-1",
    )
    .token(
        &credentials("akid", "secret", None),
        UNIX_EPOCH + Duration::from_secs(1_724_709_600),
    )
    .unwrap();
    assert_eq!(
        token,
        "prod-instance.us-east-1.rds.amazonaws.com:3306/?Action=connect&DBUser=peccy\
         &X-Amz-Algorithm=AWS4-HMAC-SHA256\
         &X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request\
         &X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
         &X-Amz-Signature=dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89"
    );
}

/// botocore's (`TestGenerateDBAuthToken.test_generate_db_auth_token`), which compares the
/// parameters as a set: botocore orders them differently.
#[test]
fn botocore_vector() {
    let token = target(
        "prod-instance.us-east-1.rds.amazonaws.com",
        3306,
        "someusername",
        "us-east-1",
    )
    .token(
        &credentials("akid", "skid", None),
        UNIX_EPOCH + Duration::from_secs(1_478_540_373), // 2016-11-07T17:39:33Z
    )
    .unwrap();
    let (endpoint, params) = parts(&token);
    assert_eq!(endpoint, "prod-instance.us-east-1.rds.amazonaws.com:3306");
    let got: BTreeMap<String, String> = params.into_iter().collect();
    let want: BTreeMap<String, String> = [
        ("Action", "connect"),
        ("DBUser", "someusername"),
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
        ("X-Amz-Date", "20161107T173933Z"),
        ("X-Amz-SignedHeaders", "host"),
        ("X-Amz-Expires", "900"),
        (
            "X-Amz-Credential",
            "akid/20161107/us-east-1/rds-db/aws4_request",
        ),
        (
            "X-Amz-Signature",
            "d1138cdbc0ca63eec012ec0fc6c2267e03642168f5884a7795320d4c18374c61",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(got, want);
}

/// A PostgreSQL proxy endpoint and a role's temporary credentials, as in Lambda: the session
/// token (with the `+`, `/` and `=` of base64) is a signed query parameter.
#[test]
fn shape_with_a_session_token() {
    let session = "IQoJb3JpZ2luX2VjEHoaCWV1LXdlc3QtMSJH/MEUCIQD+abc=";
    let time = UNIX_EPOCH + Duration::from_secs(1_767_225_599); // 2025-12-31T23:59:59Z
    let proxy = target(
        "my-proxy.proxy-abcdefghijkl.eu-west-1.rds.amazonaws.com",
        5432,
        "app",
        "eu-west-1",
    );
    let token = proxy
        .token(
            &credentials(
                "ASIAEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                Some(session),
            ),
            time,
        )
        .unwrap();

    assert!(
        token.starts_with(
            "my-proxy.proxy-abcdefghijkl.eu-west-1.rds.amazonaws.com:5432/?Action=connect&DBUser=app&"
        ),
        "{token}"
    );
    assert!(!token.contains("://"), "no scheme: {token}");
    let (_, params) = parts(&token);
    let names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "Action",
            "DBUser",
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-Expires",
            "X-Amz-SignedHeaders",
            "X-Amz-Signature",
            "X-Amz-Security-Token",
        ],
        "every parameter once, in aws-sigv4's order (aws-sdk-rds's too)"
    );
    let p: BTreeMap<&str, &str> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(p["X-Amz-Algorithm"], "AWS4-HMAC-SHA256");
    assert_eq!(
        p["X-Amz-Credential"],
        "ASIAEXAMPLE/20251231/eu-west-1/rds-db/aws4_request"
    );
    assert_eq!(p["X-Amz-Date"], "20251231T235959Z");
    assert_eq!(p["X-Amz-Expires"], "900");
    assert_eq!(rds_iam::EXPIRES_IN, Duration::from_secs(900));
    assert_eq!(p["X-Amz-Security-Token"], session);
    assert!(
        token.ends_with(
            "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEHoaCWV1LXdlc3QtMSJH%2FMEUCIQD%2Babc%3D"
        ),
        "the session token percent-encoded: {token}"
    );
    assert_eq!(p["X-Amz-SignedHeaders"], "host");
    assert!(is_signature(p["X-Amz-Signature"]), "{token}");
    assert!(
        !token.contains("wJalrXUtnFEMI"),
        "the secret key is not in the token"
    );

    // The session token is signed: the same request without it has another signature.
    let without = proxy
        .token(
            &credentials(
                "ASIAEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                None,
            ),
            time,
        )
        .unwrap();
    let (_, without) = parts(&without);
    assert!(without.iter().all(|(k, _)| k != "X-Amz-Security-Token"));
    assert_ne!(signature(&without), signature(&params));
    // And so are the user, the endpoint and the region.
    for other in [
        target(&proxy.host, proxy.port, "other", &proxy.region),
        target(&proxy.host, 5433, &proxy.user, &proxy.region),
        target("other.example.com", proxy.port, &proxy.user, &proxy.region),
        target(&proxy.host, proxy.port, &proxy.user, "eu-west-2"),
    ] {
        let t = other
            .token(
                &credentials(
                    "ASIAEXAMPLE",
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                    Some(session),
                ),
                time,
            )
            .unwrap();
        assert_ne!(signature(&parts(&t).1), signature(&params), "{other:?}");
    }
}

/// A user name that needs percent-encoding stays one `DBUser` parameter.
#[test]
fn user_name_is_encoded() {
    let token = target("db.example.com", 5432, "app+ops@team&x=1", "us-east-1")
        .token(&credentials("akid", "secret", None), SystemTime::now())
        .unwrap();
    assert!(
        token.starts_with("db.example.com:5432/?Action=connect&DBUser=app%2Bops%40team%26x%3D1&")
    );
    let (_, params) = parts(&token);
    assert_eq!(params[1], ("DBUser".into(), "app+ops@team&x=1".into()));
}

#[test]
fn target_from_the_connection_string() {
    // The template's DATABASE_URL.
    assert_eq!(
        TokenTarget::from_url(
            "postgres://app@my-proxy.proxy-abc.eu-west-1.rds.amazonaws.com:5432/appdb?sslmode=verify-full",
            "eu-west-1"
        )
        .unwrap(),
        target(
            "my-proxy.proxy-abc.eu-west-1.rds.amazonaws.com",
            5432,
            "app",
            "eu-west-1"
        )
    );
    // No port: 5432. A password is ignored; a percent-encoded user is decoded.
    assert_eq!(
        TokenTarget::from_url("postgresql://my%2Buser:pw@db.example.com/x", "us-east-1").unwrap(),
        target("db.example.com", 5432, "my+user", "us-east-1")
    );
    for bad in [
        "postgres://db.example.com:5432/x",             // no user
        "postgres://app@a.example.com,b.example.com/x", // two hosts
        "postgres://app@%2Ftmp%2Fsocket/x",             // a Unix socket
        "mysql://app@db.example.com/x",
    ] {
        let result = TokenTarget::from_url(bad, "us-east-1");
        assert!(result.is_err(), "{bad}: {result:?}");
    }
}

/// The provider signs a fresh token at each call, at the current time, with the credentials
/// it is given then; a credentials error is the provider's error (pinpool's connect error).
#[tokio::test]
async fn password_provider_signs_per_connection() {
    let proxy = target("db.example.com", 5432, "app", "us-east-1");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let provider = rds_iam::password_provider(proxy.clone(), move || {
        let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(credentials(&format!("AKID{n}"), "secret", Some("token")))
    });

    let before = now_secs();
    let first = provider.password().await.unwrap();
    let second = provider.password().await.unwrap();
    let after = now_secs();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_ne!(first, second);
    for (n, token) in [first, second].iter().enumerate() {
        // The token of the credentials of that call, at one of the seconds it was made in.
        let creds = credentials(&format!("AKID{n}"), "secret", Some("token"));
        assert!(
            (before..=after).any(|s| {
                proxy
                    .token(&creds, UNIX_EPOCH + Duration::from_secs(s))
                    .unwrap()
                    == *token
            }),
            "{token}"
        );
    }

    let failing = rds_iam::password_provider(proxy, || Err("AWS_ACCESS_KEY_ID is not set".into()));
    let err = failing.password().await.unwrap_err();
    assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
