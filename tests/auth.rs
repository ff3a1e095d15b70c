//! Passwords: fixed, from a provider that rotates, from a provider that fails; and no secret
//! in any message. Needs the role made by `scripts/test-db-setup.sh`; where the server does
//! not ask that role for a password, the tests say so and stop, unless
//! `PINPOOL_REQUIRE_PASSWORD_AUTH=1` (set by CI) makes that a failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pinpool::{Error, Pool};

const ROLE: &str = common::PASSWORD_ROLE;
const SECRET: &str = common::PASSWORD_ROLE_SECRET;
const WRONG: &str = "wrong-secret-4711";

fn url(app: &str) -> tokio_postgres::Config {
    let mut cfg: tokio_postgres::Config = common::url_for(app).parse().unwrap();
    cfg.user(ROLE);
    cfg
}

#[tokio::test]
async fn a_wrong_password_gives_a_clear_connect_error_without_the_password() {
    if !common::password_auth_enforced().await {
        return;
    }
    let pool = Pool::builder(url("auth_wrong"))
        .password(WRONG)
        .build()
        .unwrap();
    let err = pool.get().await.unwrap_err();
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
    let text = format!("{err} / {err:?} / {pool:?}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains(WRONG), "the password leaked: {text}");
    assert_eq!(pool.status().size, 0);

    let pool = Pool::builder(url("auth_right"))
        .password(SECRET)
        .build()
        .unwrap();
    let c = pool.get().await.unwrap();
    let user: String = c
        .query_one_scalar("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(user, ROLE);
    assert!(!format!("{pool:?}").contains(SECRET));
}

#[tokio::test]
async fn the_provider_is_asked_for_every_new_connection() {
    if !common::password_auth_enforced().await {
        return;
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    // Rotates: the first answer is stale, later ones are current.
    let pool = Pool::builder(url("auth_rotate"))
        .max_size(2)
        .password_provider(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, std::io::Error>(if n == 0 { WRONG } else { SECRET }.to_string()) }
        })
        .build()
        .unwrap();
    assert!(matches!(pool.get().await, Err(Error::Connect(_))));
    let a = pool.get().await.unwrap();
    let b = pool.get().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    drop((a, b));
    let _c = pool.get().await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "idle connections are reused without asking"
    );
}

#[tokio::test]
async fn a_failing_provider_gives_a_password_error() {
    let pool = Pool::builder(url("auth_failing"))
        .password_provider(|| async {
            Err::<String, _>(std::io::Error::other("token service down"))
        })
        .build()
        .unwrap();
    let err = pool.get().await.unwrap_err();
    assert!(matches!(err, Error::Password(_)), "{err:?}");
    assert!(err.to_string().contains("token service down"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(pool.status().size, 0);
}

/// A cached provider (RDS IAM tokens live 15 minutes): many new connections, one token.
#[tokio::test]
async fn a_cached_provider_serves_every_connection_of_its_lifetime_with_one_value() {
    if !common::password_auth_enforced().await {
        return;
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let provider = move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, std::io::Error>(SECRET.to_string()) }
    };
    let pool = Pool::builder(url("auth_cached"))
        .max_size(4)
        .password_provider(pinpool::CachedPassword::new(
            provider,
            std::time::Duration::from_secs(15 * 60),
        ))
        .build()
        .unwrap();
    let clients = futures_util::future::join_all((0..4).map(|_| pool.get())).await;
    for c in &clients {
        let user: String = c
            .as_ref()
            .unwrap()
            .query_one_scalar("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(user, ROLE);
    }
    assert_eq!(pool.status().opened, 4);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one token for four connections"
    );
}

/// The token service hangs (a throttled STS call) while the cached token is in its
/// refresh-ahead window: new connections still open at once with the token that is still
/// valid, and the provider is asked once, not once per connect that timed out.
#[tokio::test]
async fn a_hanging_token_service_does_not_hold_up_connects_while_the_token_is_valid() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let provider = move || {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if n > 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::io::Error>(SECRET.to_string())
        }
    };
    let lifetime = std::time::Duration::from_secs(60);
    let pool = Pool::builder(url("auth_hanging"))
        .max_size(4)
        .connect_timeout(std::time::Duration::from_secs(10))
        .password_provider(
            // Every connect after the first is in the refresh-ahead window.
            pinpool::CachedPassword::new(provider, lifetime).refresh_ahead(lifetime),
        )
        .build()
        .unwrap();
    let mut clients = vec![pool.get().await.unwrap()];
    for _ in 0..3 {
        let started = std::time::Instant::now();
        clients.push(pool.get().await.expect("connected with the cached token"));
        // Held up by the refresh, it would wait for the 10 s connect_timeout.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "not held up by the refresh: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(pool.status().opened, 4);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one refresh at a time");
}
