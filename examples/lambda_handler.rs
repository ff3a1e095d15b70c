//! An API Gateway HTTP API (payload 2.0) handler doing the incident's workload, a read then a
//! write, through pinpool's Lambda layer, with the pool's metrics flushed to CloudWatch as EMF
//! at the end of every invocation.
//!
//! Reads `DATABASE_URL`; with `DATABASE_IAM_AUTH=true` (as `deploy/template.yaml` sets it, for
//! an RDS Proxy that requires IAM authentication) logs in with a fresh RDS IAM token per new
//! connection instead of the URL's password (`support/rds_iam.rs`: for the URL's host, port and
//! user, signed with the function's role's credentials, in its region, from Lambda's
//! environment). Creates its table if missing, in the first invocation that reaches the
//! database (INIT survives a database outage). Answers 200 `{"ok": true, ...}`; on a pinpool
//! timeout, deadline or connect error, 503 with a JSON error body before the deadline (instead
//! of timing out into API Gateway's opaque 502). `?pin=1` runs a pinning statement
//! first (a `SET`), to watch pinpool close that connection when the invocation ends.
//!
//! Build for Lambda (`provided.al2023`): `cargo lambda build --release --manifest-path
//! deploy/handler/Cargo.toml` (`deploy/handler` builds this file as a binary), or see the
//! README.

use lambda_http::{Body, Error, Request, Response, service_fn};
use metrics_cloudwatch_embedded::lambda::MetricsLayer;
use pinpool::Pool;
use pinpool::lambda::{PoolLayer, SnapStart};

#[path = "support/rds_iam.rs"]
mod rds_iam;

const TABLE: &str = "CREATE TABLE IF NOT EXISTS pinpool_visits (id bigserial PRIMARY KEY, path text NOT NULL, at timestamptz NOT NULL DEFAULT now())";

fn json(status: u16, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("a valid response")
}

/// Set once the table exists: the first invocation that reaches the database creates it,
/// within its deadline (in INIT a database outage would fail the environment).
static TABLE_READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

async fn work(pool: &Pool, path: &str, pin: bool) -> Result<i64, pinpool::Error> {
    let client = pool.get().await?; // bounded by the invocation's deadline
    TABLE_READY
        .get_or_try_init(|| client.batch_execute(TABLE))
        .await?;
    if pin {
        client
            .batch_execute("SET application_name = 'pinned-by-handler'")
            .await?;
    }
    let before: i64 = client
        .query_one_scalar(
            "SELECT count(*) FROM pinpool_visits WHERE path = $1",
            &[&path],
        )
        .await?;
    client
        .execute("INSERT INTO pinpool_visits (path) VALUES ($1)", &[&path])
        .await?;
    Ok(before + 1)
}

async fn handle(pool: Pool, req: Request) -> Result<Response<Body>, Error> {
    let path = req.uri().path().to_string();
    let pin = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "pin=1"));
    Ok(match work(&pool, &path, pin).await {
        Ok(visits) => json(
            200,
            serde_json::json!({"ok": true, "path": path, "visits": visits}),
        ),
        Err(e)
            if e.is_timeout()
                || e.is_proxy_borrow_timeout()
                || matches!(e, pinpool::Error::Connect(_)) =>
        {
            json(
                503,
                serde_json::json!({"ok": false, "error": e.to_string()}),
            )
        }
        Err(e) => json(
            500,
            serde_json::json!({"ok": false, "error": e.to_string()}),
        ),
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Logs go to stderr: stdout carries the EMF documents.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "local".into());
    let metrics = metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace("pinpool")
        .with_dimension("function", function)
        .init()?;
    pinpool::metrics::describe();

    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let iam_auth = match std::env::var("DATABASE_IAM_AUTH").as_deref() {
        Ok("true") => true,
        Ok("false" | "") | Err(_) => false,
        Ok(other) => {
            return Err(format!("DATABASE_IAM_AUTH is true or false, not {other:?}").into());
        }
    };
    let mut builder = Pool::builder(url.as_str()).max_size(2).min_idle(1);
    if iam_auth {
        // Checked here, at INIT: a DATABASE_URL without a user or host fails the function's
        // start, not every connect. The credentials are read at each connect.
        let target = rds_iam::TokenTarget::from_url(&url, &rds_iam::region_from_env()?)?;
        builder = builder.password_provider(rds_iam::password_provider(
            target,
            rds_iam::AwsCredentials::from_env,
        ));
    }
    let pool = builder.build()?;
    // INIT: open a connection while it costs nothing, best-effort and within 2 s. A database
    // that is down must not fail INIT: every request this environment would serve would
    // become an opaque Lambda error. The invocations answer 503 until it is back.
    pool.warm_up_within(std::time::Duration::from_secs(2)).await;

    // On SIGTERM (Lambda sends it when it shuts the environment down, to a process with an
    // extension registered: this registers a no-op one), close the pool's sockets: the proxy
    // then frees their database connections at once. Lambda allows 500 ms.
    let closing = pool.clone();
    lambda_runtime::spawn_graceful_shutdown_handler(move || async move { closing.close() }).await;

    let handler_pool = pool.clone();
    lambda_http::runtime(service_fn(move |req| handle(handler_pool.clone(), req)))
        .layer(PoolLayer::new(pool.clone()))
        .layer(MetricsLayer::new(metrics))
        .register_snapstart_resource(std::sync::Arc::new(SnapStart::new(pool)))
        .run()
        .await
}
