//! Whether a server answers at an address: the test of "nothing runs there" that decides to
//! start a throwaway cluster.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use tokio_postgres::config::{Config, Host};

/// How long [`answers_at`] waits for each address.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// True when something answers at one of the config's hosts and ports (see [`answers`]),
/// waiting at most [`PROBE_TIMEOUT`] for each. Blocking.
pub fn answers_at(config: &Config) -> bool {
    targets(config)
        .iter()
        .any(|(host, port)| answers(host, *port, PROBE_TIMEOUT))
}

/// `host:port` of the config's first host (for a Unix socket directory, the socket file),
/// for messages.
pub fn address(config: &Config) -> String {
    match targets(config).first() {
        Some((host, port)) if host.starts_with('/') => format!("{host}/.s.PGSQL.{port}"),
        Some((host, port)) => format!("{host}:{port}"),
        None => "no host".to_owned(),
    }
}

/// Each host with its port: one port for all hosts, or one per host; 5432 by default.
fn targets(config: &Config) -> Vec<(String, u16)> {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let host = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(dir) => dir.display().to_string(),
            };
            (host, port)
        })
        .collect()
}

/// True when something accepts connections at `host` and `port`: a TCP connection within
/// `timeout` to one of the host's addresses, or for a host that is a directory (a Unix
/// socket directory, as libpq spells it), the socket file `.s.PGSQL.<port>` there.
/// Nothing more is checked: whatever answers is the caller's to talk to.
pub fn answers(host: &str, port: u16, timeout: Duration) -> bool {
    if host.starts_with('/') {
        return Path::new(host).join(format!(".s.PGSQL.{port}")).exists();
    }
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|addr| TcpStream::connect_timeout(&addr, timeout).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_answers_and_a_closed_port_does_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(answers("127.0.0.1", port, Duration::from_secs(1)));
        assert!(answers("localhost", port, Duration::from_secs(1)));
        drop(listener);
        assert!(!answers("127.0.0.1", port, Duration::from_secs(1)));
        assert!(!answers("/nonexistent", 5432, Duration::from_secs(1)));
        assert!(!answers(
            "no-such-host.invalid",
            5432,
            Duration::from_secs(1)
        ));
    }

    #[test]
    fn configs_are_probed_at_every_host_and_named_by_the_first() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let both: Config = format!("host=127.0.0.1,localhost port=1,{port}")
            .parse()
            .unwrap();
        assert!(answers_at(&both), "the second host answers");
        assert_eq!(address(&both), "127.0.0.1:1");
        let closed: Config = "host=127.0.0.1 port=1".parse().unwrap();
        assert!(!answers_at(&closed));
        let socket: Config = "host=/run/nowhere".parse().unwrap();
        assert_eq!(address(&socket), "/run/nowhere/.s.PGSQL.5432");
        assert!(!answers_at(&socket));
    }
}
