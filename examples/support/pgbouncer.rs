//! A PgBouncer of the soak's own, on a free port in front of the soak's database (Debian's
//! `pgbouncer` package), stopped when dropped. The logic of `tests/common`'s `PgBouncer`
//! harness, trimmed to what the soak needs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running PgBouncer.
pub struct PgBouncer {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    /// The binary, if installed.
    pub fn installed() -> Option<PathBuf> {
        ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }

    /// Starts `bin` in session mode in front of the PostgreSQL at `database_url`, with
    /// `pool_size` server connections and `query_wait_timeout` (how long a client's query may
    /// wait for one, RDS Proxy's `ConnectionBorrowTimeout`).
    pub fn start_session_mode(
        bin: &Path,
        database_url: &str,
        pool_size: usize,
        query_wait_timeout: Duration,
    ) -> std::io::Result<PgBouncer> {
        let config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e| std::io::Error::other(format!("database URL: {e}")))?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_string(),
        };
        let db_port = config.get_ports().first().copied().unwrap_or(5432);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("pinpool-soak-pgbouncer-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ini = format!(
            "[databases]\n\
             postgres = host={host} port={db_port} dbname=postgres user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             admin_users = postgres\n\
             pool_mode = session\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 5000\n\
             query_wait_timeout = {wait}\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {log}\n\
             pidfile = {pid}\n",
            // Whole seconds: PgBouncer 1.18 reads a plain number as seconds.
            wait = query_wait_timeout.as_secs().max(1),
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        );
        let conf = dir.join("pgbouncer.ini");
        std::fs::write(&conf, ini)?;
        let mut cmd = Command::new(bin);
        if running_as_root() {
            // PgBouncer refuses to run as root: it switches to the postgres user, which must
            // own what it writes.
            let (uid, gid) = postgres_ids()?;
            for p in [&dir, &conf] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
            }
            cmd.arg("-u").arg("postgres");
        }
        let child = cmd
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut bouncer = PgBouncer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline || bouncer.child.try_wait()?.is_some() {
                return Err(std::io::Error::other(format!(
                    "pgbouncer did not listen within 20 s: {}",
                    bouncer.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(bouncer)
    }

    /// A URL for the database `postgres` through it.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A URL for its admin console (`SHOW POOLS`, `SHOW CLIENTS`).
    pub fn console_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/pgbouncer", self.port)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The postgres user's uid and gid, from /etc/passwd.
fn postgres_ids() -> std::io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .ok_or_else(|| std::io::Error::other("no postgres user to run pgbouncer as"))?;
    let f: Vec<&str> = line.split(':').collect();
    let id = |s: &str| {
        s.parse::<u32>()
            .map_err(|e| std::io::Error::other(format!("/etc/passwd: {e}")))
    };
    Ok((id(f[2])?, id(f[3])?))
}
