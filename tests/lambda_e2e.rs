//! End to end with the real `lambda_runtime` client: the example handler runs as a child
//! process against a local Lambda Runtime API, through the emulator, frozen between
//! invocations with SIGSTOP/SIGCONT.
#![cfg(all(feature = "lambda", feature = "emulator"))]

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pinpool::emulator::{Emulator, EmulatorConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

/// What the handler posted for one invocation.
#[derive(Debug)]
struct Posted {
    request_id: String,
    kind: String,
    body: String,
    at: SystemTime,
}

struct RuntimeApi {
    port: u16,
    events: mpsc::Sender<(String, u64, String)>,
    posted: mpsc::Receiver<Posted>,
}

async fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, String, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let (mut len, mut chunked) = (0usize, false);
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().ok()?,
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        r.read_exact(&mut body).await.ok()?;
    }
    Some((method, path, body))
}

/// A Lambda Runtime API on loopback: `/next` hands out the test's events one at a time.
async fn runtime_api() -> RuntimeApi {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (events_tx, events_rx) = mpsc::channel::<(String, u64, String)>(16);
    let (posted_tx, posted_rx) = mpsc::channel::<Posted>(16);
    let events = Arc::new(Mutex::new(events_rx));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (events, posted) = (events.clone(), posted_tx.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(stream);
                while let Some((method, path, body)) = read_request(&mut r).await {
                    if path.ends_with("/extension/register") {
                        // The example's no-op extension (it makes Lambda send SIGTERM).
                        let body = r#"{"functionName":"pinpool-e2e","functionVersion":"1","handler":"bootstrap"}"#;
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nLambda-Extension-Identifier: ext-1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if r.get_mut().write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if path.ends_with("/extension/event/next") {
                        // No event ever comes for it, as in Lambda until shutdown.
                        std::future::pending::<()>().await;
                    }
                    let reply = if method == "GET" && path.ends_with("/runtime/invocation/next") {
                        let Some((id, deadline, event)) = events.lock().await.recv().await else {
                            return;
                        };
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nLambda-Runtime-Aws-Request-Id: {id}\r\nLambda-Runtime-Deadline-Ms: {deadline}\r\nLambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:eu-west-1:123456789012:function:pinpool-e2e\r\nContent-Length: {}\r\n\r\n{event}",
                            event.len()
                        )
                    } else {
                        let segments: Vec<&str> = path.split('/').collect();
                        let kind = segments.last().copied().unwrap_or_default().to_string();
                        let request_id = segments
                            .get(segments.len().saturating_sub(2))
                            .copied()
                            .unwrap_or_default()
                            .to_string();
                        let body = String::from_utf8_lossy(&body).to_string();
                        let _ = posted
                            .send(Posted {
                                request_id,
                                kind,
                                body,
                                at: SystemTime::now(),
                            })
                            .await;
                        "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n".to_string()
                    };
                    if r.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    RuntimeApi {
        port,
        events: events_tx,
        posted: posted_rx,
    }
}

/// Starts the example handler against `api`'s Runtime API and `database_url`; returns the
/// child and a task collecting its stdout (the EMF documents) until it ends.
fn spawn_example(
    api: &RuntimeApi,
    function: &str,
    database_url: &str,
) -> (tokio::process::Child, Lines) {
    spawn_example_binary(api, "lambda_handler", function, database_url, &[])
}

/// As [`spawn_example`], for the example `example`, with more environment.
fn spawn_example_binary(
    api: &RuntimeApi,
    example: &str,
    function: &str,
    database_url: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, Lines) {
    let mut child = tokio::process::Command::new(common::example_binary(example))
        .envs(env.iter().copied())
        .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{}", api.port))
        .env("AWS_LAMBDA_FUNCTION_NAME", function)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("DATABASE_URL", database_url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = Lines::default();
    let out = lines.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            out.0.lock().unwrap().push(line);
        }
    });
    (child, lines)
}

/// A child's stdout, line by line as it comes.
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<String>>>);

impl Lines {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Its EMF documents (the lines that are JSON objects).
    fn docs(&self) -> Vec<serde_json::Value> {
        self.all()
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("invalid JSON {l}: {e}")))
            .collect()
    }

    /// Waits (up to 10 s) until the EMF documents written so far satisfy `done`: an
    /// invocation's are flushed around its answer, not necessarily before it is posted.
    /// The caller asserts what it needs afterwards.
    async fn wait_for_docs(&self, done: impl Fn(&[serde_json::Value]) -> bool) {
        common::eventually(10, || async { done(&self.docs()) }).await;
    }
}

/// The names of the metrics in EMF documents.
fn metric_names(docs: &[serde_json::Value]) -> Vec<String> {
    let mut names = Vec::new();
    for doc in docs {
        if let Some(metrics) = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"].as_array() {
            names.extend(
                metrics
                    .iter()
                    .filter_map(|m| m["Name"].as_str().map(String::from)),
            );
        }
    }
    names
}

/// An API Gateway HTTP API (payload 2.0) event.
fn event(path: &str, query: &str, id: &str) -> String {
    serde_json::json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {"host": "api.example.com", "user-agent": "e2e"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "api",
            "domainName": "api.example.com",
            "domainPrefix": "api",
            "http": {"method": "GET", "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "e2e"},
            "requestId": id,
            "routeKey": "$default",
            "stage": "$default",
            "time": "26/Nov/2026:12:00:00 +0000",
            "timeEpoch": 1_795_000_000_000u64
        },
        "isBase64Encoded": false
    })
    .to_string()
}

#[tokio::test]
async fn the_example_handler_answers_every_invocation_before_its_deadline_across_freezes() {
    let emu = Emulator::start(
        EmulatorConfig::new(common::database_url())
            .max_connections(4)
            .idle_client_timeout(Duration::from_millis(400))
            .application_name("e2e_lambda"),
    )
    .await
    .unwrap();
    let mut api = runtime_api().await;
    let (mut child, lines) = spawn_example(&api, "pinpool-e2e", &emu.url("postgres", "postgres"));
    let pid = child.id().unwrap().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };

    let cases = [("/a", "", false), ("/b", "", true), ("/c", "pin=1", false)];
    for (n, (path, query, after_freeze)) in cases.iter().enumerate() {
        if *after_freeze {
            // Frozen longer than the proxy's idle client timeout: the pool's idle connection
            // is closed by the proxy meanwhile.
            signal("-STOP");
            tokio::time::sleep(Duration::from_millis(1200)).await;
            // Kept frozen until the proxy's timer (in this process) has closed it.
            let closed =
                common::eventually(10, || async { emu.counters().idle_client_closes >= 1 }).await;
            signal("-CONT");
            assert!(closed, "the freeze outlasted the idle timeout");
        }
        let id = format!("req-{n}");
        let deadline = SystemTime::now() + Duration::from_secs(5);
        let deadline_ms = deadline.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        api.events
            .send((id.clone(), deadline_ms, event(path, query, &id)))
            .await
            .unwrap();
        let posted = tokio::time::timeout(Duration::from_secs(15), api.posted.recv())
            .await
            .expect("the handler answered")
            .unwrap();
        assert_eq!(
            (posted.request_id.as_str(), posted.kind.as_str()),
            (id.as_str(), "response"),
            "{posted:?}"
        );
        assert!(posted.at < deadline, "answered after the deadline");
        let response: serde_json::Value = serde_json::from_str(&posted.body).unwrap();
        assert_eq!(response["statusCode"], 200, "{response}");
        let body: serde_json::Value =
            serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["ok"], true, "{body}");
        if query.contains("pin=1") {
            // The pinned connection is closed when its invocation ends.
            let unpinned = common::eventually(5, || async { emu.counters().pinned_now == 0 }).await;
            assert!(
                unpinned && emu.counters().peak_pinned >= 1,
                "{:?}",
                emu.counters()
            );
        }
    }

    // Let the last flush reach stdout, then stop the child.
    const EXPECTED: [&str; 3] = [
        "pinpool_acquire_wait",
        "pinpool_connections_closed",
        "pinpool_pinned",
    ];
    lines
        .wait_for_docs(|docs| {
            let names = metric_names(docs);
            docs.len() >= cases.len() && EXPECTED.iter().all(|e| names.iter().any(|n| n == e))
        })
        .await;
    child.kill().await.unwrap();
    let docs = lines.docs();
    assert!(
        docs.len() >= 3,
        "one EMF document per invocation: {:?}",
        lines.all()
    );
    let mut names = Vec::new();
    for doc in &docs {
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert!(doc["_aws"]["Timestamp"].is_u64(), "{doc}");
        assert_eq!(directive["Namespace"], "pinpool", "{doc}");
        for m in directive["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(!doc[name].is_null(), "{name} has no value in {doc}");
            names.push(name.to_string());
        }
    }
    for expected in EXPECTED {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

/// A database address that accepts connections and never answers until `forward` is set, then
/// relays to the real database.
async fn black_hole(forward: Arc<std::sync::atomic::AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let db = common::database_addr();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut client, _)) = listener.accept().await {
            if !forward.load(std::sync::atomic::Ordering::SeqCst) {
                held.push(client);
                continue;
            }
            let db = db.clone();
            tokio::spawn(async move {
                if let Ok(mut db) = TcpStream::connect(db).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut db).await;
                }
            });
        }
    });
    port
}

/// Runs the example handler against `database_url` and sends it `n` events, one at a time,
/// each with `deadline`; returns what it posted and its EMF documents.
async fn run_example(
    database_url: String,
    deadlines: &[Duration],
    between: impl Fn(usize),
    written: impl Fn(&[serde_json::Value]) -> bool,
) -> (Vec<(Posted, SystemTime)>, Vec<serde_json::Value>) {
    let mut api = runtime_api().await;
    let (mut child, lines) = spawn_example(&api, "pinpool-e2e-outage", &database_url);
    let mut posted_all = Vec::new();
    for (n, d) in deadlines.iter().enumerate() {
        between(n);
        let id = format!("outage-{n}");
        let deadline = SystemTime::now() + *d;
        let deadline_ms = deadline.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        api.events
            .send((id.clone(), deadline_ms, event("/outage", "", &id)))
            .await
            .unwrap();
        let posted = tokio::time::timeout(Duration::from_secs(20), api.posted.recv())
            .await
            .expect("the handler answered: INIT did not kill the environment")
            .unwrap();
        assert_eq!(posted.request_id, id, "{posted:?}");
        posted_all.push((posted, deadline));
    }
    lines.wait_for_docs(written).await;
    child.kill().await.unwrap();
    (posted_all, lines.docs())
}

fn status_of(posted: &Posted) -> (u64, serde_json::Value) {
    let response: serde_json::Value = serde_json::from_str(&posted.body).unwrap();
    let body = serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
    (response["statusCode"].as_u64().unwrap(), body)
}

/// A database that accepts connections and never answers: INIT does not fail, each
/// invocation answers 503 before its deadline with its metrics written, and once the database
/// answers the next invocation succeeds.
#[tokio::test]
async fn a_black_hole_database_during_init_costs_typed_errors_not_the_environment() {
    let forward = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = black_hole(forward.clone()).await;
    let url =
        format!("postgres://postgres@127.0.0.1:{port}/postgres?application_name=e2e_black_hole");
    let flip = forward.clone();
    let (posted, docs) = run_example(
        url,
        &[
            Duration::from_secs(8),
            Duration::from_secs(3),
            Duration::from_secs(5),
        ],
        move |n| {
            if n == 2 {
                flip.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        },
        |docs| docs.len() >= 3 && docs.iter().any(|d| !d["pinpool_timeouts"].is_null()),
    )
    .await;
    for (i, (p, deadline)) in posted.iter().enumerate() {
        assert_eq!(p.kind, "response", "{p:?}");
        assert!(
            p.at < *deadline,
            "invocation {i} answered after its deadline"
        );
        let (status, body) = status_of(p);
        let want = if i < 2 { 503 } else { 200 };
        assert_eq!(status, want, "invocation {i}: {body}");
    }
    assert!(docs.len() >= 3, "an EMF document per invocation: {docs:?}");
    let timeouts: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| !d["pinpool_timeouts"].is_null())
        .collect();
    assert!(!timeouts.is_empty(), "the timeouts are counted: {docs:?}");
}

/// A refused port: INIT does not fail, every invocation answers 503 at once.
#[tokio::test]
async fn a_refused_database_port_during_init_costs_typed_errors_not_the_environment() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let (posted, docs) = run_example(
        url,
        &[Duration::from_secs(3); 2],
        |_| {},
        |docs| docs.len() >= 2,
    )
    .await;
    for (p, deadline) in &posted {
        assert!(p.at < *deadline);
        assert_eq!(status_of(p).0, 503, "{p:?}");
    }
    assert!(docs.len() >= 2, "an EMF document per invocation: {docs:?}");
}

/// Lambda Managed Instances: three invocations at once in one process (`run_concurrent`), each
/// with its own deadline. The one whose work outlasts its deadline answers 503 before it, while
/// the others, running beside it, answer 200.
#[tokio::test]
async fn concurrent_invocations_each_stop_at_their_own_deadline() {
    let mut api = runtime_api().await;
    let (mut child, _lines) = spawn_example_binary(
        &api,
        "managed_instances",
        "pinpool-e2e-managed",
        &common::url_for("e2e_managed"),
        &[("AWS_LAMBDA_MAX_CONCURRENCY", "3")],
    );
    let now = SystemTime::now();
    let events = [
        ("slow", 5_000u64, Duration::from_millis(1_500)),
        ("fast", 0, Duration::from_secs(8)),
        ("medium", 300, Duration::from_secs(8)),
    ];
    let mut deadlines = std::collections::HashMap::new();
    for (id, sleep_ms, d) in events {
        let deadline = now + d;
        let deadline_ms = deadline.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        deadlines.insert(id.to_string(), deadline);
        api.events
            .send((
                id.to_string(),
                deadline_ms,
                serde_json::json!({ "sleep_ms": sleep_ms }).to_string(),
            ))
            .await
            .unwrap();
    }
    let mut posted = std::collections::HashMap::new();
    for _ in 0..3 {
        let p = tokio::time::timeout(Duration::from_secs(20), api.posted.recv())
            .await
            .expect("every invocation answered")
            .unwrap();
        posted.insert(p.request_id.clone(), p);
    }
    child.kill().await.unwrap();
    for (id, want) in [("slow", 503), ("fast", 200), ("medium", 200)] {
        let p = &posted[id];
        assert_eq!(p.kind, "response", "{p:?}");
        assert!(p.at < deadlines[id], "{id} answered after its deadline");
        let body: serde_json::Value = serde_json::from_str(&p.body).unwrap();
        assert_eq!(body["statusCode"], want, "{id}: {body}");
    }
    // They ran side by side: the fast one did not wait behind the slow one.
    assert!(posted["fast"].at < posted["slow"].at, "{posted:?}");
}

/// SIGTERM (Lambda's shutdown of an environment whose process registered an extension): the
/// example's hook closes the pool, so its backends are gone at once, and the process exits 0
/// within Lambda's 500 ms.
#[tokio::test]
async fn sigterm_closes_the_pools_connections_within_lambdas_500_ms() {
    let app = "e2e_sigterm";
    let mut api = runtime_api().await;
    let (mut child, _lines) = spawn_example(&api, "pinpool-e2e-sigterm", &common::url_for(app));
    let deadline = SystemTime::now() + Duration::from_secs(8);
    let deadline_ms = deadline.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    api.events
        .send(("sig-0".into(), deadline_ms, event("/sig", "", "sig-0")))
        .await
        .unwrap();
    let posted = tokio::time::timeout(Duration::from_secs(15), api.posted.recv())
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(status_of(&posted).0, 200, "{posted:?}");
    let admin = common::admin().await;
    assert!(
        !common::backends(&admin, app).await.is_empty(),
        "a connection is open"
    );
    let pid = child.id().unwrap().to_string();
    let sent = std::time::Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Lambda allows 500 ms; 1.5 s here, for a loaded machine. A hook that hung, or waited on
    // the pool's seconds-long bounds, would take longer.
    let status = tokio::time::timeout(Duration::from_millis(1500), child.wait())
        .await
        .expect("exited within 1.5 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let gone = common::eventually(5, || async {
        common::backends(&admin, app).await.is_empty()
    })
    .await;
    assert!(
        gone,
        "the pool's backends are gone after {:?}",
        sent.elapsed()
    );
}
