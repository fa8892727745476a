//! The session connection's own TCP stream, opened here rather than by the driver, so that
//! its two ends are known: a backend whose client and server addresses are exactly those two
//! ends serves this very stream, with no pooler between (see the `pooler` module).
//!
//! Only for the simple case, one TCP host (a name or an address, with at most one
//! `hostaddr` and one port) and no `target_session_attrs`; anything else, and any failure to
//! open the stream, is left to the driver's own connect, which also reports the error (so an
//! address that never answers is waited for twice, each time within `connect_timeout`). The
//! stream is set up as the driver sets up its own: no Nagle delay, the TCP user timeout and
//! keepalives from the config, and each address tried in turn within `connect_timeout`.

use std::net::{IpAddr, SocketAddr};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::Config;

/// The two ends of a TCP stream, as this process sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Endpoints {
    /// This process's end.
    pub(crate) local: SocketAddr,
    /// The server's end.
    pub(crate) peer: SocketAddr,
}

impl Endpoints {
    /// Whether a backend that reports `client` as its client's address and `server` as its
    /// own serves a stream with these ends. IPv4 addresses written as IPv6 (`::ffff:a.b.c.d`)
    /// count as the IPv4 address.
    pub(crate) fn are(&self, client: (IpAddr, u16), server: (IpAddr, u16)) -> bool {
        let same = |a: SocketAddr, (ip, port): (IpAddr, u16)| {
            a.ip().to_canonical() == ip.to_canonical() && a.port() == port
        };
        same(self.local, client) && same(self.peer, server)
    }
}

/// The host name (for TLS), the address to connect to when `hostaddr` gives one, and the
/// port, when `cfg` names exactly one TCP server and nothing that only the driver handles.
pub(crate) fn single_target(cfg: &Config) -> Option<(String, Option<IpAddr>, u16)> {
    let (hosts, addrs, ports) = (cfg.get_hosts(), cfg.get_hostaddrs(), cfg.get_ports());
    if hosts.len() != 1
        || addrs.len() > 1
        || ports.len() > 1
        || cfg.get_target_session_attrs() != TargetSessionAttrs::Any
    {
        return None;
    }
    match &hosts[0] {
        Host::Tcp(host) => Some((
            host.clone(),
            addrs.first().copied(),
            ports.first().copied().unwrap_or(5432),
        )),
        #[cfg(unix)]
        Host::Unix(_) => None,
    }
}

/// Open a TCP stream to the target [`single_target`] found, set up as the driver would.
pub(crate) async fn open(
    cfg: &Config,
    host: &str,
    hostaddr: Option<IpAddr>,
    port: u16,
) -> std::io::Result<(TcpStream, Endpoints)> {
    let addrs: Vec<SocketAddr> = match hostaddr {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => tokio::net::lookup_host((host, port)).await?.collect(),
    };
    let mut last = None;
    for addr in addrs {
        match open_one(cfg, addr).await {
            Ok(opened) => return Ok(opened),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host")
    }))
}

async fn open_one(cfg: &Config, addr: SocketAddr) -> std::io::Result<(TcpStream, Endpoints)> {
    let connecting = TcpStream::connect(addr);
    let stream = match cfg.get_connect_timeout() {
        Some(limit) => tokio::time::timeout(*limit, connecting)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??,
        None => connecting.await?,
    };
    stream.set_nodelay(true)?;
    let sock = SockRef::from(&stream);
    #[cfg(target_os = "linux")]
    if let Some(timeout) = cfg.get_tcp_user_timeout() {
        sock.set_tcp_user_timeout(Some(*timeout))?;
    }
    if cfg.get_keepalives() {
        sock.set_tcp_keepalive(&keepalive(cfg))?;
    }
    let ends = Endpoints {
        local: stream.local_addr()?,
        peer: stream.peer_addr()?,
    };
    Ok((stream, ends))
}

/// The keepalive settings of `cfg`, as the driver applies them.
fn keepalive(cfg: &Config) -> TcpKeepalive {
    let mut k = TcpKeepalive::new().with_time(cfg.get_keepalives_idle());
    if let Some(interval) = cfg.get_keepalives_interval() {
        k = k.with_interval(interval);
    }
    #[cfg(not(windows))]
    if let Some(retries) = cfg.get_keepalives_retries() {
        k = k.with_retries(retries);
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(local: &str, peer: &str) -> Endpoints {
        Endpoints {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
        }
    }

    #[test]
    fn ends_match_only_both_addresses_and_ports() {
        let e = ends("10.0.0.2:40000", "10.0.0.1:5432");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(e.are((ip("10.0.0.2"), 40000), (ip("10.0.0.1"), 5432)));
        assert!(e.are(
            (ip("::ffff:10.0.0.2"), 40000),
            (ip("::ffff:10.0.0.1"), 5432)
        ));
        // a pooler's server connection: another client port, or another server end
        assert!(!e.are((ip("10.0.0.2"), 40001), (ip("10.0.0.1"), 5432)));
        assert!(!e.are((ip("10.0.0.2"), 40000), (ip("10.0.0.1"), 6432)));
        assert!(!e.are((ip("10.0.0.3"), 40000), (ip("10.0.0.1"), 5432)));
        // a DNAT (a Kubernetes Service): the server sees another address of its own
        assert!(!e.are((ip("10.0.0.2"), 40000), (ip("10.0.0.9"), 5432)));
    }

    #[test]
    fn only_one_plain_tcp_host_is_handled_here() {
        let cfg = |s: &str| s.parse::<Config>().unwrap();
        assert_eq!(
            single_target(&cfg("postgres://u@db:6000/x")),
            Some(("db".into(), None, 6000))
        );
        assert_eq!(
            single_target(&cfg("host=db hostaddr=10.0.0.1 user=u")),
            Some(("db".into(), Some("10.0.0.1".parse().unwrap()), 5432))
        );
        assert_eq!(single_target(&cfg("postgres://u@a,b/x")), None);
        assert_eq!(single_target(&cfg("host=/var/run/postgresql user=u")), None);
        assert_eq!(
            single_target(&cfg("postgres://u@db/x?target_session_attrs=read-write")),
            None
        );
        assert_eq!(single_target(&cfg("hostaddr=10.0.0.1 user=u")), None);
    }
}
