//! Helpers shared by the integration tests: the database URL, tagged pools, an admin client
//! and a small in-memory metrics recorder.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// The database URL with `application_name` set, so a test can find its own backends.
pub fn url_for(app: &str) -> String {
    let url = database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
}

pub fn builder(app: &str) -> pinpool::Builder {
    pinpool::Pool::builder(url_for(app))
}

/// A direct tokio-postgres client, outside any pool.
pub async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to DATABASE_URL");
    tokio::spawn(conn);
    client
}

/// Backend pids of the connections tagged `app`.
pub async fn backends(admin: &tokio_postgres::Client, app: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The server's own word on the sessions tagged `app`: each one's `pg_stat_activity.state`.
pub async fn backend_states(admin: &tokio_postgres::Client, app: &str) -> Vec<String> {
    admin
        .query(
            "SELECT state FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect()
}

/// Terminates the backends tagged `app` (only this test's own connections).
pub async fn kill_backends(admin: &tokio_postgres::Client, app: &str) -> u64 {
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .len() as u64
}

/// The role `scripts/test-db-setup.sh` creates, which must log in with a password.
pub const PASSWORD_ROLE: &str = "pinpool_pw";
/// Its password.
pub const PASSWORD_ROLE_SECRET: &str = "pinpool-test-secret";

/// True when the server rejects a wrong password for [`PASSWORD_ROLE`] (SQLSTATE 28P01) and
/// accepts the right one. Anything else (no such role, a server that lets it in without a
/// password) means the setup script has not run: the caller skips, except in CI
/// (`PINPOOL_REQUIRE_PASSWORD_AUTH`), where that fails.
pub async fn password_auth_enforced() -> bool {
    let login = |password: &str| {
        let mut probe: tokio_postgres::Config = url_for("auth_probe").parse().unwrap();
        probe.user(PASSWORD_ROLE).password(password);
        async move { probe.connect(tokio_postgres::NoTls).await.map(drop) }
    };
    let wrong_refused = login("a-wrong-password")
        .await
        .is_err_and(|e| e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD));
    let enforced = wrong_refused && login(PASSWORD_ROLE_SECRET).await.is_ok();
    if !enforced {
        assert!(
            std::env::var("PINPOOL_REQUIRE_PASSWORD_AUTH").is_err(),
            "the server does not ask {PASSWORD_ROLE} for a password: run scripts/test-db-setup.sh"
        );
        eprintln!(
            "skipped: the server does not ask {PASSWORD_ROLE} for a password (run scripts/test-db-setup.sh)"
        );
    }
    enforced
}

/// Polls `cond` every 20 ms for up to `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// The path of an example binary: tests run from target/<profile>/deps, and
/// `cargo test --all-features` builds the examples beside them.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --all-features`",
        path.display()
    );
    path
}

/// Checks the pool's invariants once nothing is checked out.
pub fn assert_quiet(pool: &pinpool::Pool) {
    let s = pool.status();
    assert!(s.size <= s.max_size, "{s:?}");
    assert_eq!(s.in_use, 0, "{s:?}");
    assert_eq!(s.waiters, 0, "{s:?}");
    assert_eq!(s.size, s.idle, "{s:?}");
}

/// Runs `fut` to completion on a current-thread runtime with `recorder` as this thread's
/// metrics recorder.
pub fn run_recorded<F: std::future::Future>(recorder: &TestRecorder, fut: F) -> F::Output {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(fut)
    })
}

/// A recorder that keeps counter, gauge and histogram values by name and sorted labels.
#[derive(Default, Clone)]
pub struct TestRecorder {
    values: Arc<Mutex<BTreeMap<String, Arc<Cell>>>>,
}

#[derive(Default)]
pub struct Cell {
    pub count: AtomicU64,
    pub bits: AtomicU64,
    pub samples: Mutex<Vec<f64>>,
}

impl metrics::CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.count.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.count.store(value, Ordering::Relaxed);
    }
}

impl metrics::GaugeFn for Cell {
    fn increment(&self, value: f64) {
        self.set(f64::from_bits(self.bits.load(Ordering::Relaxed)) + value);
    }
    fn decrement(&self, value: f64) {
        self.set(f64::from_bits(self.bits.load(Ordering::Relaxed)) - value);
    }
    fn set(&self, value: f64) {
        self.bits.store(value.to_bits(), Ordering::Relaxed);
    }
}

impl metrics::HistogramFn for Cell {
    fn record(&self, value: f64) {
        self.samples.lock().unwrap().push(value);
    }
}

impl TestRecorder {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.values.lock().unwrap().entry(name).or_default().clone()
    }

    /// The counter `name{labels}`; labels as `k=v`, sorted, comma-separated.
    pub fn counter(&self, name: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.count.load(Ordering::Relaxed))
    }

    pub fn gauge(&self, name: &str) -> Option<f64> {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map(|c| f64::from_bits(c.bits.load(Ordering::Relaxed)))
    }

    pub fn samples(&self, name: &str) -> Vec<f64> {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map_or_else(Vec::new, |c| c.samples.lock().unwrap().clone())
    }

    pub fn names(&self) -> Vec<String> {
        self.values.lock().unwrap().keys().cloned().collect()
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key))
    }
}

/// The RDS Proxy emulator in front of the test database, with `max` database connections,
/// logging in upstream as `app` (so a test sees and kills only its own backends); `f` sets
/// anything else.
#[cfg(feature = "emulator")]
pub async fn emulator(
    app: &str,
    max: usize,
    f: impl FnOnce(pinpool::emulator::EmulatorConfig) -> pinpool::emulator::EmulatorConfig,
) -> pinpool::emulator::Emulator {
    let config = pinpool::emulator::EmulatorConfig::new(database_url())
        .max_connections(max)
        .application_name(app);
    pinpool::emulator::Emulator::start(f(config))
        .await
        .expect("emulator starts")
}

/// A CA and a server certificate for `names`, as PEM: (ca, cert, key).
#[cfg(feature = "tls")]
pub fn test_pki(names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// A rustls client configuration that trusts only the CA in `ca_pem` (ring provider).
#[cfg(feature = "tls")]
pub fn trusting(ca_pem: &str) -> rustls::ClientConfig {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// True when `c`'s session is inside a transaction block: `SAVEPOINT` is refused outside one
/// (SQLSTATE 25P01). Asks the server, whatever pinpool believes.
pub async fn in_transaction_block(c: &pinpool::PooledClient) -> bool {
    match c.batch_execute("SAVEPOINT pinpool_probe").await {
        Ok(()) => true,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::NO_ACTIVE_SQL_TRANSACTION) => {
            false
        }
        Err(e) => panic!("the probe failed: {e}"),
    }
}

/// The database's host and port, from `DATABASE_URL`.
pub fn database_addr() -> (String, u16) {
    let config: tokio_postgres::Config = database_url().parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    (host, config.get_ports().first().copied().unwrap_or(5432))
}

/// A TCP relay to the database: what the client sends goes straight on; what the server sends
/// goes through `down` (from the server's read half to the client's write half), which shapes
/// the network the test needs. Returns the relay's port.
pub async fn relay<F, Fut>(down: F) -> u16
where
    F: Fn(tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let down = down.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(database_addr()).await else {
                    return;
                };
                let (mut cr, cw) = client.into_split();
                let (sr, mut sw) = server.into_split();
                let up = async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                };
                tokio::join!(up, down(sr, cw));
            });
        }
    });
    relay_port
}

/// A relay ([`relay`]) that holds every chunk the server sends for `delay` before passing it
/// on (a database `delay` away, one way).
pub async fn slow_relay(delay: std::time::Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    relay(move |mut sr, mut cw| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            tokio::time::sleep(delay).await;
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    })
    .await
}

/// A pool builder for the database through a relay on `port`, its backends tagged `app`.
pub fn relayed(port: u16, app: &str) -> pinpool::Builder {
    // The database's user, password and name; the relay's address (a parsed config's
    // `host()` and `port()` would add a second address, not replace the first).
    let db: tokio_postgres::Config = database_url().parse().unwrap();
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).application_name(app);
    if let Some(user) = db.get_user() {
        config.user(user);
    }
    if let Some(password) = db.get_password() {
        config.password(password);
    }
    if let Some(dbname) = db.get_dbname() {
        config.dbname(dbname);
    }
    pinpool::Pool::builder(config)
}

/// A relay to PostgreSQL that can cut its connections: every one on `kill_all`, the next
/// answer of the server after `drop_next_answer` (forwarding the request that asked for it),
/// or, from connection number `close_after_startup_from` on, right after the startup's
/// ReadyForQuery.
#[derive(Default)]
pub struct Cuts {
    pub accepted: std::sync::atomic::AtomicUsize,
    pub kills: std::sync::Mutex<Vec<std::sync::Arc<tokio::sync::Notify>>>,
    pub drop_next_answer: std::sync::atomic::AtomicBool,
    pub close_after_startup_from: std::sync::atomic::AtomicUsize,
}

impl Cuts {
    pub fn kill_all(&self) {
        for k in self.kills.lock().unwrap().drain(..) {
            k.notify_one();
        }
    }
}

pub async fn cutting_relay() -> (u16, std::sync::Arc<Cuts>) {
    let cuts = std::sync::Arc::new(Cuts {
        close_after_startup_from: std::sync::atomic::AtomicUsize::new(usize::MAX),
        ..Cuts::default()
    });
    let c = cuts.clone();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = relay(move |mut sr, mut cw| {
        let cuts = c.clone();
        async move {
            let n = cuts
                .accepted
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let kill = std::sync::Arc::new(tokio::sync::Notify::new());
            cuts.kills.lock().unwrap().push(kill.clone());
            let mut buf = vec![0u8; 64 * 1024];
            if n >= cuts
                .close_after_startup_from
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                // Forwards whole messages up to and including the first ReadyForQuery, then
                // closes: the client is logged in and its connection is gone.
                let mut pending = Vec::new();
                loop {
                    let Ok(got) = sr.read(&mut buf).await else {
                        return;
                    };
                    if got == 0 {
                        return;
                    }
                    pending.extend_from_slice(&buf[..got]);
                    let mut at = 0;
                    while pending.len() >= at + 5 {
                        let len = u32::from_be_bytes(pending[at + 1..at + 5].try_into().unwrap());
                        let end = at + 1 + len as usize;
                        if pending.len() < end {
                            break;
                        }
                        if pending[at] == b'Z' {
                            let _ = cw.write_all(&pending[..end]).await;
                            let _ = cw.shutdown().await;
                            return;
                        }
                        at = end;
                    }
                }
            }
            loop {
                tokio::select! {
                    r = sr.read(&mut buf) => {
                        let got = match r {
                            Ok(0) | Err(_) => break,
                            Ok(got) => got,
                        };
                        if cuts.drop_next_answer.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        if cw.write_all(&buf[..got]).await.is_err() {
                            break;
                        }
                    }
                    () = kill.notified() => break,
                }
            }
            let _ = cw.shutdown().await;
        }
    })
    .await;
    (port, cuts)
}

/// Waits until the client's side has seen its connection close: the close happened "a moment
/// before" the statement, as after a freeze or at a proxy restart.
pub async fn until_closed(c: &pinpool::PooledClient) {
    assert!(
        eventually(5, || async { c.is_closed() }).await,
        "the connection did not close"
    );
}

/// Reads raw protocol messages until a ReadyForQuery; returns the tags of the messages before
/// it. Fails if nothing comes for 20 s or the peer closes.
pub async fn until_ready(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use bytes::Buf;
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::new();
    let mut tags = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let tag = buf[0];
            buf.advance(1 + len);
            if tag == b'Z' {
                return tags;
            }
            tags.push(tag);
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), s.read_buf(&mut buf))
            .await
            .expect("the emulator answers")
            .unwrap();
        assert!(
            n > 0,
            "the emulator closed the connection; tags so far {tags:?}"
        );
    }
}

/// A PgBouncer of the test's own, on a free port in front of `DATABASE_URL`'s server
/// (Debian's `pgbouncer` package; `.ci/run` installs it). Stopped when dropped.
pub struct PgBouncer {
    child: std::process::Child,
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    conf: std::path::PathBuf,
}

/// PgBouncer's pool mode.
#[derive(Clone, Copy, Debug)]
pub enum PoolMode {
    Session,
    Transaction,
}

impl PgBouncer {
    /// The binary, if installed.
    pub fn installed() -> Option<std::path::PathBuf> {
        ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
    }

    /// Starts one with `pool_size` server connections for the database `postgres`, in `mode`,
    /// with `extra` lines for its `[pgbouncer]` section (`query_wait_timeout = 1`, say).
    /// Panics when PgBouncer is not installed and `PINPOOL_REQUIRE_PGBOUNCER` is set (CI);
    /// otherwise returns `None` so the test can say it skipped.
    pub fn start(name: &str, mode: PoolMode, pool_size: u32, extra: &str) -> Option<PgBouncer> {
        let Some(bin) = Self::installed() else {
            assert!(
                std::env::var_os("PINPOOL_REQUIRE_PGBOUNCER").is_none(),
                "pgbouncer is not installed (apt-get install pgbouncer)"
            );
            eprintln!("{name}: skipped, pgbouncer is not installed");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("pinpool-pgb-{name}-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (host, db_port) = database_addr();
        let mode = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        let ini = format!(
            "[databases]\n\
             postgres = host={host} port={db_port} dbname=postgres user=postgres\n\
             * = host={host} port={db_port} user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             admin_users = postgres\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {log}\n\
             pidfile = {pid}\n\
             {extra}\n",
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        );
        let conf = dir.join("pgbouncer.ini");
        std::fs::write(&conf, ini).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // PgBouncer refuses to run as root: it switches to the postgres user, which must
            // own what it writes.
            let (uid, gid) = postgres_ids();
            for p in [&dir, &conf] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let child = Self::spawn(&bin, &conf);
        let mut bouncer = PgBouncer {
            child,
            port,
            dir,
            bin,
            conf,
        };
        bouncer.wait_listening();
        Some(bouncer)
    }

    fn spawn(bin: &std::path::Path, conf: &std::path::Path) -> std::process::Child {
        let mut cmd = std::process::Command::new(bin);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.arg("-u").arg("postgres");
        }
        cmd.arg(conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pgbouncer")
    }

    fn wait_listening(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "pgbouncer did not listen within 20 s: {}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// `SHUTDOWN` on the admin console (which closes that connection too), then waits for
    /// the process to end.
    pub async fn shutdown(&mut self) {
        // It closes the console's connection too: no answer comes.
        let _ = self.console("SHUTDOWN").await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "pgbouncer did not shut down"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process to end (after `SHUTDOWN`, say), then starts it again on the same
    /// port with the same configuration.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.bin, &self.conf);
        self.wait_listening();
    }

    /// A URL for the database through this PgBouncer, connections tagged `app`.
    pub fn url(&self, app: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?application_name={app}",
            self.port
        )
    }

    /// Its log so far, for a failing assertion's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// Runs a command on its admin console (`SHOW POOLS`, `KILL postgres`, `PAUSE`...).
    pub async fn admin(&self, command: &str) -> Vec<tokio_postgres::SimpleQueryMessage> {
        self.console(command).await.expect(command)
    }

    /// `command` on the admin console, on a connection of its own.
    async fn console(
        &self,
        command: &str,
    ) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
        let url = format!("postgres://postgres@127.0.0.1:{}/pgbouncer", self.port);
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("the admin console");
        let task = tokio::spawn(conn);
        let rows = client.simple_query(command).await;
        drop(client);
        let _ = task.await;
        rows
    }

    /// A client of its own that takes a server connection and keeps it (in session mode,
    /// until it is dropped): a frozen environment's session. Dropping it also ends its task.
    pub async fn hold_a_server_connection(&self, app: &str) -> tokio_postgres::Client {
        let (holder, conn) = tokio_postgres::connect(&self.url(app), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        holder.simple_query("SELECT 1").await.unwrap();
        holder
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The postgres user's uid and gid, from /etc/passwd.
fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("a postgres user");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

/// What `tracing` wrote, captured for a test ([`capture`]).
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Captures what `tracing` writes at `level` and above on this thread, without colours,
/// until the guard drops.
pub fn capture(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(level)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}
