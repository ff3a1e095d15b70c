//! RDS IAM authentication tokens, for `examples/lambda_handler.rs` behind an RDS Proxy that
//! requires IAM authentication (`deploy/template.yaml`), and for `tests/rds_iam_token.rs`.
//!
//! A token is the URL `https://{host}:{port}/?Action=connect&DBUser={user}` presigned with
//! SigV4 (service `rds-db`, the proxy's region, valid 900 s), without its scheme: the proxy
//! takes it as the password (in cleartext, so only over TLS) and checks it against the
//! caller's `rds-db:connect` permission. The signing is `aws-sigv4`'s, as in `aws-sdk-rds`'s
//! `auth_token` module; this file only builds the URL and lays out the signed query.
//!
//! The credentials are the function's role's, which Lambda puts in the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), with the region
//! (`AWS_REGION`). Under SnapStart (which `provided.al2023` does not offer) Lambda gives the
//! credentials through the container credentials endpoint instead, which this file does not
//! read.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;

/// How long a token is valid: 15 minutes, the most RDS accepts. It is checked at login only:
/// a connection outlives its token.
pub const EXPIRES_IN: Duration = Duration::from_secs(900);

/// The SigV4 service name of RDS IAM authentication.
const SERVICE: &str = "rds-db";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// AWS credentials: an access key, and the session token of temporary ones (a role's).
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl AwsCredentials {
    /// The credentials in the environment, as Lambda sets them for the function's role.
    pub fn from_env() -> Result<Self, BoxError> {
        Ok(AwsCredentials {
            access_key_id: env("AWS_ACCESS_KEY_ID")?,
            secret_access_key: env("AWS_SECRET_ACCESS_KEY")?,
            session_token: env("AWS_SESSION_TOKEN").ok(),
        })
    }
}

/// The region Lambda runs the function in (`AWS_REGION`): the proxy's, since a function
/// reaches the proxy through its VPC.
pub fn region_from_env() -> Result<String, BoxError> {
    env("AWS_REGION")
}

/// A non-empty environment variable.
fn env(name: &str) -> Result<String, BoxError> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(format!("RDS IAM authentication: {name} is not set").into()),
    }
}

/// What a token is for: the database endpoint (the proxy's), its region, and the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub region: String,
}

impl TokenTarget {
    /// Host, port and user from a `postgres://user@host:port/...` connection string (one host;
    /// port 5432 if none), and the region.
    pub fn from_url(url: &str, region: &str) -> Result<Self, BoxError> {
        use pinpool::tokio_postgres::config::{Config, Host};
        // The parameters (sslmode=verify-full, which pinpool reads but tokio-postgres does
        // not, and the like) do not matter here; a password would be ignored.
        let base = url.split_once('?').map_or(url, |(base, _)| base);
        let config: Config = base.parse().map_err(
            |_| "RDS IAM authentication: the connection string is not a postgres:// URL",
        )?;
        let host = match config.get_hosts() {
            [Host::Tcp(host)] => host.clone(),
            _ => return Err("RDS IAM authentication: the URL must name one TCP host".into()),
        };
        let port = match config.get_ports() {
            [] => 5432,
            [port] => *port,
            _ => return Err("RDS IAM authentication: the URL must name one port".into()),
        };
        let user = config
            .get_user()
            .ok_or("RDS IAM authentication: the URL must name the database user")?
            .to_string();
        Ok(TokenTarget {
            host,
            port,
            user,
            region: region.to_string(),
        })
    }

    /// A token signed with `credentials` at `time`, valid for [`EXPIRES_IN`] from then.
    pub fn token(
        &self,
        credentials: &AwsCredentials,
        time: SystemTime,
    ) -> Result<String, BoxError> {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("Action", "connect")
            .append_pair("DBUser", &self.user);
        let query = query.finish();
        let url = format!("https://{}:{}/?{query}", self.host, self.port);

        let identity = Credentials::new(
            &credentials.access_key_id,
            &credentials.secret_access_key,
            credentials.session_token.clone(),
            None,
            "environment",
        )
        .into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(EXPIRES_IN);
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(SERVICE)
            .time(time)
            .settings(settings)
            .build()?
            .into();
        let request = SignableRequest::new("GET", &url, std::iter::empty(), SignableBody::empty())?;
        let (instructions, _signature) = sign(request, &params)?.into_parts();

        // The signature's parameters after the URL's own, in the order aws-sigv4 gives them
        // (the signature last), form-encoded as aws-sdk-rds's `url::Url::query_pairs_mut` does.
        let (_headers, signed) = instructions.into_parts();
        let mut query = form_urlencoded::Serializer::for_suffix(query, 0);
        for (name, value) in &signed {
            query.append_pair(name, value);
        }
        Ok(format!("{}:{}/?{}", self.host, self.port, query.finish()))
    }
}

/// A pinpool password provider: a fresh token for every new connection, signed with the
/// credentials `credentials` returns then (`AwsCredentials::from_env` in Lambda) at the current
/// time. Signing is a few HMACs, without I/O.
pub fn password_provider<C>(target: TokenTarget, credentials: C) -> impl pinpool::PasswordProvider
where
    C: Fn() -> Result<AwsCredentials, BoxError> + Send + Sync + 'static,
{
    move || {
        let token = credentials().and_then(|c| target.token(&c, SystemTime::now()));
        std::future::ready(token)
    }
}
