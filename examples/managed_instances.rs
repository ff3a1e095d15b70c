//! A handler for Lambda Managed Instances: several invocations at once in one process, each with
//! its own deadline, and nothing stops a handler at its deadline there (an invocation that runs
//! out is only marked failed). `Runtime::run_concurrent` runs `AWS_LAMBDA_MAX_CONCURRENCY`
//! invocations at a time (one at a time when it is unset, as on classic Lambda); pinpool's
//! layer bounds each invocation's waits, connects and statements by that invocation's own
//! deadline.
//!
//! The event: `{"sleep_ms": 250}` runs `SELECT pg_sleep(0.25)`. Answers `{"statusCode": 200}`, or
//! 503 with the error when pinpool stopped the work at the deadline. Reads `DATABASE_URL`.

use lambda_runtime::{Error, LambdaEvent, Runtime, service_fn};
use pinpool::Pool;
use pinpool::lambda::PoolLayer;
use serde_json::{Value, json};

async fn handler(pool: Pool, event: LambdaEvent<Value>) -> Result<Value, Error> {
    let sleep_ms = event.payload["sleep_ms"].as_u64().unwrap_or(0);
    let work = async {
        let client = pool.get().await?; // bounded by this invocation's deadline
        client
            .execute("SELECT pg_sleep($1::float8 / 1000)", &[&(sleep_ms as f64)])
            .await
    };
    Ok(match work.await {
        Ok(_) => json!({"statusCode": 200, "slept_ms": sleep_ms}),
        Err(e) if e.is_timeout() || e.phase() == Some(pinpool::Phase::Connect) => {
            json!({"statusCode": 503, "error": e.to_string()})
        }
        Err(e) => json!({"statusCode": 500, "error": e.to_string()}),
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set")?;
    let pool = Pool::builder(url.as_str()).max_size(4).build()?;
    let p = pool.clone();
    Runtime::new(service_fn(move |event| handler(p.clone(), event)))
        .layer(PoolLayer::new(pool))
        .run_concurrent()
        .await
}
