//! Plaintext connections, observed: pinpool opens the socket itself, because tokio-postgres's
//! own `connect` keeps a plaintext socket out of reach, and hands it to `connect_raw` inside an
//! [`Observed`] stream.
//!
//! What tokio-postgres's `connect` does is done here the same way: every host (or `hostaddr`)
//! in order with its port, every address a name resolves to, `connect_timeout` per attempt,
//! `TCP_NODELAY`, keepalives, `tcp_user_timeout`, Unix sockets, and `target_session_attrs`.
//! Two things differ: `load_balance_hosts=random` is refused by `build()` (hosts are tried in
//! order), and the client's cancel token knows no socket to send a CancelRequest to (RDS Proxy
//! does not support CancelRequest either).

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::{Config, NoTls, SimpleQueryMessage};

use crate::connect::Opened;
use crate::pinning::PinRules;
use crate::wire::{Observed, Wire};

/// A TCP or Unix socket.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type Socket = Box<dyn Io>;

/// Opens an observed plaintext connection as tokio-postgres's `connect` would.
pub(crate) async fn connect(
    config: &Config,
    rules: PinRules,
) -> Result<Opened, tokio_postgres::Error> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let n = hosts.len().max(addrs.len());
    let ports = config.get_ports();
    let mut last = None;
    for i in 0..n {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let target = match (addrs.get(i), hosts.get(i)) {
            (Some(ip), _) => Target::Ip(*ip),
            (None, Some(Host::Tcp(name))) => Target::Name(name),
            #[cfg(unix)]
            (None, Some(Host::Unix(dir))) => Target::Unix(dir.join(format!(".s.PGSQL.{port}"))),
            (None, None) => continue,
        };
        match connect_host(target, port, config, rules).await {
            Ok(opened) => return Ok(opened),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => e,
        None => {
            io_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no host to connect to",
            ))
            .await
        }
    })
}

enum Target<'a> {
    Ip(std::net::IpAddr),
    Name(&'a str),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

async fn connect_host(
    target: Target<'_>,
    port: u16,
    config: &Config,
    rules: PinRules,
) -> Result<Opened, tokio_postgres::Error> {
    let ips = match target {
        Target::Ip(ip) => vec![std::net::SocketAddr::new(ip, port)],
        Target::Name(name) => match tokio::net::lookup_host((name, port)).await {
            Ok(a) => a.collect(),
            Err(e) => return Err(io_error(e).await),
        },
        #[cfg(unix)]
        Target::Unix(path) => {
            let socket = within(
                config.get_connect_timeout(),
                tokio::net::UnixStream::connect(path),
            )
            .await;
            return match socket {
                Ok(s) => session(Box::new(s), config, rules).await,
                Err(e) => Err(io_error(e).await),
            };
        }
    };
    let mut last = io::Error::new(
        io::ErrorKind::InvalidInput,
        "could not resolve any addresses",
    );
    for addr in ips {
        match tcp(addr, config).await {
            Ok(s) => return session(Box::new(s), config, rules).await,
            Err(e) => last = e,
        }
    }
    Err(io_error(last).await)
}

async fn within<T>(
    limit: Option<&Duration>,
    f: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match limit {
        Some(d) => tokio::time::timeout(*d, f).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection timed out",
            ))
        }),
        None => f.await,
    }
}

async fn tcp(addr: std::net::SocketAddr, config: &Config) -> io::Result<TcpStream> {
    let stream = within(config.get_connect_timeout(), TcpStream::connect(addr)).await?;
    stream.set_nodelay(true)?;
    let sock = SockRef::from(&stream);
    #[cfg(target_os = "linux")]
    if let Some(t) = config.get_tcp_user_timeout() {
        sock.set_tcp_user_timeout(Some(*t))?;
    }
    if config.get_keepalives() {
        let mut k = TcpKeepalive::new().with_time(config.get_keepalives_idle());
        #[cfg(not(any(target_os = "openbsd", target_os = "redox", target_os = "solaris")))]
        if let Some(i) = config.get_keepalives_interval() {
            k = k.with_interval(i);
        }
        #[cfg(not(any(
            target_os = "openbsd",
            target_os = "redox",
            target_os = "solaris",
            target_os = "windows"
        )))]
        if let Some(r) = config.get_keepalives_retries() {
            k = k.with_retries(r);
        }
        sock.set_tcp_keepalive(&k)?;
    }
    Ok(stream)
}

/// The startup on an open socket, then `target_session_attrs`.
async fn session(
    socket: Socket,
    config: &Config,
    rules: PinRules,
) -> Result<Opened, tokio_postgres::Error> {
    let wire = Wire::new(rules);
    let (client, connection) = config
        .connect_raw(Observed::new(socket, wire.clone()), NoTls)
        .await?;
    let mut connection = Box::pin(connection);
    let want = config.get_target_session_attrs();
    if want != TargetSessionAttrs::Any {
        let rows = {
            let mut query = pin!(client.simple_query("SHOW transaction_read_only"));
            poll_fn(|cx| {
                if let Poll::Ready(r) = connection.as_mut().poll(cx) {
                    // The connection ended before the answer: report why, as tokio-postgres does.
                    return Poll::Ready(r.map(|()| Vec::new()));
                }
                query.as_mut().poll(cx)
            })
            .await?
        };
        let read_only = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "on"),
            _ => None,
        });
        let refuse = match (want, read_only) {
            (TargetSessionAttrs::ReadWrite, Some(true)) => Some("database does not allow writes"),
            (TargetSessionAttrs::ReadOnly, Some(false)) => Some("database is not read only"),
            (_, None) => Some("the server did not say whether it is read only"),
            _ => None,
        };
        if let Some(why) = refuse {
            return Err(io_error(io::Error::new(io::ErrorKind::PermissionDenied, why)).await);
        }
    }
    Ok(Opened {
        client,
        connection,
        wire,
    })
}

/// A `tokio_postgres::Error` carrying an I/O error, so a failed socket reads as tokio-postgres's
/// own connect failures do (`Error::Connect`, the cause as its source). tokio-postgres makes
/// such errors only itself: it gets one from a stream that fails at once.
pub(crate) async fn io_error(e: io::Error) -> tokio_postgres::Error {
    struct Failing(Option<io::Error>);
    impl Failing {
        fn fail(&mut self) -> io::Error {
            self.0
                .take()
                .unwrap_or_else(|| io::Error::other("connection failed"))
        }
    }
    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.get_mut().fail()))
        }
    }
    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(self.get_mut().fail()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.get_mut().fail()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    let mut c = Config::new();
    c.user("pinpool");
    match c.connect_raw(Failing(Some(e)), NoTls).await {
        Err(e) => e,
        Ok(_) => unreachable!("a stream that fails at once cannot log in"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn io_errors_become_tokio_postgres_errors_with_their_cause() {
        let e = io_error(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "refused here",
        ))
        .await;
        let source = std::error::Error::source(&e).expect("the cause is kept");
        assert!(source.to_string().contains("refused here"), "{e}");
    }
}
