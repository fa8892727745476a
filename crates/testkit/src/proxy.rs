//! A TCP proxy for fault injection: a listener on a free loopback port that forwards every
//! connection to an upstream address (a PostgreSQL server), and lets the test break them.
//!
//! - [`Proxy::reset`] / [`Proxy::reset_all`]: close both sides at once with a TCP RST
//!   (`SO_LINGER` 0), as a crashed peer or a middlebox would.
//! - [`Proxy::blackhole`] / [`Proxy::resume`]: stop forwarding in both directions without
//!   closing anything, as a network partition would; connections opened meanwhile are
//!   accepted but reach nothing until it ends. [`Proxy::blackhole_for`] ends it after a
//!   duration with a resume or a reset.
//!
//! One proxy per client process is the simplest way to aim at one client: give each worker
//! its own proxy's address. Within a proxy, [`Proxy::connections`] lists the open
//! connections with the `application_name` of their PostgreSQL startup message, so that one
//! of them (a session or a work connection) can be aimed at by id.
//!
//! What a blackhole cannot imitate: the proxy's own sockets stay open, so the client's kernel
//! still gets its TCP acknowledgements and keepalive answers. It tests application-level
//! deadlines; TCP's own (`tcp_user_timeout`, keepalives) need lost packets, which a proxy in
//! user space cannot produce.
//!
//! ```no_run
//! # async fn f(server: &shardlease_testkit::PrivateServer) -> std::io::Result<()> {
//! use shardlease_testkit::{AfterBlackhole, Proxy};
//! use std::time::Duration;
//! let proxy = Proxy::start(([127, 0, 0, 1], server.port()).into()).await?;
//! let url = shardlease_testkit::with_host_port(&server.url(), "127.0.0.1", proxy.port());
//! // ... start a client on `url` ...
//! proxy.blackhole_for(Duration::from_secs(3), AfterBlackhole::Resume).await;
//! proxy.reset_all();
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a connection does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctl {
    Forward,
    Blackhole,
    Reset,
}

/// How a blackhole ends ([`Proxy::blackhole_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterBlackhole {
    /// Forward again: whatever waited is delivered, as after a healed partition.
    Resume,
    /// Reset every connection (RST to both sides).
    Reset,
}

/// An open connection through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Its id, in order of acceptance (from 0).
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// When it was accepted.
    pub opened: Instant,
    /// `application_name` from the PostgreSQL startup message, once seen (`None` before,
    /// without one, or when the client negotiated TLS).
    pub application_name: Option<String>,
    /// Whether it is blackholed now.
    pub blackholed: bool,
}

/// A fault-injecting TCP proxy (see the module docs). Dropping it closes its listener and
/// resets every connection through it.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Proxy-wide blackhole: new connections start blackholed.
    blackholed: bool,
    accepted: u64,
    conns: BTreeMap<u64, Conn>,
}

#[derive(Debug)]
struct Conn {
    ctl: watch::Sender<Ctl>,
    info: ConnInfo,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (every update is one
        // assignment): keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, peer: SocketAddr) -> (u64, watch::Receiver<Ctl>) {
        let mut st = self.state();
        let id = st.accepted;
        st.accepted += 1;
        let initial = if st.blackholed {
            Ctl::Blackhole
        } else {
            Ctl::Forward
        };
        let (ctl, rx) = watch::channel(initial);
        let info = ConnInfo {
            id,
            peer,
            opened: Instant::now(),
            application_name: None,
            blackholed: st.blackholed,
        };
        st.conns.insert(id, Conn { ctl, info });
        (id, rx)
    }

    fn unregister(&self, id: u64) {
        self.state().conns.remove(&id);
    }

    fn set_application_name(&self, id: u64, name: Option<String>) {
        if let Some(c) = self.state().conns.get_mut(&id) {
            c.info.application_name = name;
        }
    }

    /// Move the connections `which` selects from `from` to `to`; returns how many moved.
    fn switch(&self, which: impl Fn(u64) -> bool, from: &[Ctl], to: Ctl) -> usize {
        let mut st = self.state();
        let mut n = 0;
        for (id, c) in st.conns.iter_mut() {
            if !which(*id) {
                continue;
            }
            let moved = c.ctl.send_if_modified(|v| {
                if from.contains(v) {
                    *v = to;
                    true
                } else {
                    false
                }
            });
            if moved {
                c.info.blackholed = to == Ctl::Blackhole;
                n += 1;
            }
        }
        n
    }
}

impl Proxy {
    /// Listen on a free port of 127.0.0.1 and forward every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State::default()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// How many connections the proxy has accepted so far (a reconnect count).
    pub fn accepted(&self) -> u64 {
        self.shared.state().accepted
    }

    /// The open connections (reset ones excluded), oldest first.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.shared
            .state()
            .conns
            .values()
            .filter(|c| *c.ctl.borrow() != Ctl::Reset)
            .map(|c| c.info.clone())
            .collect()
    }

    /// Reset connection `id` (RST to both sides); false when it is not open.
    pub fn reset(&self, id: u64) -> bool {
        self.shared
            .switch(|i| i == id, &[Ctl::Forward, Ctl::Blackhole], Ctl::Reset)
            == 1
    }

    /// Reset every open connection; returns how many.
    pub fn reset_all(&self) -> usize {
        self.shared
            .switch(|_| true, &[Ctl::Forward, Ctl::Blackhole], Ctl::Reset)
    }

    /// Stop forwarding on every connection, and on connections opened from now on, until
    /// [`Proxy::resume`] (or a reset). Nothing is closed: the peers just stop hearing from
    /// each other. Returns how many open connections it stalled.
    pub fn blackhole(&self) -> usize {
        self.shared.state().blackholed = true;
        self.shared
            .switch(|_| true, &[Ctl::Forward], Ctl::Blackhole)
    }

    /// Stop forwarding on connection `id` only; false when it is not open and forwarding.
    pub fn blackhole_conn(&self, id: u64) -> bool {
        self.shared
            .switch(|i| i == id, &[Ctl::Forward], Ctl::Blackhole)
            == 1
    }

    /// End every blackhole (proxy-wide and per connection): what waited is delivered.
    /// Returns how many connections resumed.
    pub fn resume(&self) -> usize {
        self.shared.state().blackholed = false;
        self.shared
            .switch(|_| true, &[Ctl::Blackhole], Ctl::Forward)
    }

    /// Blackhole everything for `duration`, then resume or reset.
    pub async fn blackhole_for(&self, duration: Duration, then: AfterBlackhole) {
        self.blackhole();
        tokio::time::sleep(duration).await;
        match then {
            AfterBlackhole::Resume => {
                self.resume();
            }
            AfterBlackhole::Reset => {
                // Reset first, so that no stalled byte is delivered on the way out; new
                // connections may come in again after that.
                self.reset_all();
                self.resume();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                let (id, ctl) = shared.register(peer);
                tokio::spawn(serve(shared.clone(), id, sock, ctl));
            }
            Err(e) => {
                // EMFILE and the like: say so, and keep accepting.
                eprintln!("shardlease-testkit proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Close `sock` with a RST instead of a FIN.
fn abort(sock: &TcpStream) {
    let _ = sock.set_zero_linger();
}

async fn serve(shared: Arc<Shared>, id: u64, client: TcpStream, mut ctl: watch::Receiver<Ctl>) {
    let _ = client.set_nodelay(true);
    // A connection opened during a blackhole goes nowhere until it ends.
    if forwarding(&mut ctl).await.is_err() {
        abort(&client);
        shared.unregister(id);
        return;
    }
    let upstream = tokio::select! {
        r = TcpStream::connect(shared.upstream) => r,
        _ = ctl.wait_for(|c| *c == Ctl::Reset) => Err(io::Error::other("reset while connecting")),
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err(_) => {
            // The server is down (or restarting): the client sees its connection refused
            // as a reset.
            abort(&client);
            shared.unregister(id);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let reset = {
        let sniff = |name| shared.set_application_name(id, name);
        let up = pump(&mut cr, &mut uw, ctl.clone(), Some(&sniff));
        let down = pump(&mut ur, &mut cw, ctl.clone(), None);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(_) => break true,
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(_) => break true,
                },
                _ = ctl.wait_for(|c| *c == Ctl::Reset) => break true,
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if reset {
        // Dropping a write half would send a FIN first: put the halves back together, so
        // that the close is the RST alone.
        for (r, w) in [(cr, cw), (ur, uw)] {
            if let Ok(sock) = r.reunite(w) {
                abort(&sock);
            }
        }
    }
    shared.unregister(id);
}

/// Copy `from` to `to` until EOF (then half-close `to`), holding everything while the
/// connection is blackholed. An error, or a reset, ends it with `Err`.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mut ctl: watch::Receiver<Ctl>,
    sniff: Option<&(dyn Fn(Option<String>) + Sync)>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    // The first bytes from the client, until the startup message is complete.
    let mut head: Option<Vec<u8>> = sniff.map(|_| Vec::new());
    loop {
        forwarding(&mut ctl).await?;
        let n = tokio::select! {
            r = from.read(&mut buf) => r?,
            // A blackhole began while we waited to read: go back and wait it out.
            _ = ctl.wait_for(|c| *c != Ctl::Forward) => continue,
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        if let (Some(h), Some(report)) = (head.as_mut(), sniff) {
            h.extend_from_slice(&buf[..n]);
            if let Some(name) = startup_application_name(h) {
                report(name);
                head = None;
            }
        }
        // A blackhole that began after the read holds these bytes until it ends.
        forwarding(&mut ctl).await?;
        to.write_all(&buf[..n]).await?;
    }
}

/// Wait while blackholed; `Err` once reset (or when the proxy is gone).
async fn forwarding(ctl: &mut watch::Receiver<Ctl>) -> io::Result<()> {
    match ctl.wait_for(|c| *c != Ctl::Blackhole).await.map(|c| *c) {
        Ok(Ctl::Forward) => Ok(()),
        _ => Err(io::Error::other("reset by the test")),
    }
}

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
/// A startup message larger than this is not one (PostgreSQL refuses them above 10,000).
const MAX_STARTUP: usize = 10_000;

/// The `application_name` of the PostgreSQL startup message at the start of `bytes`:
/// `None` while more bytes are needed, `Some(None)` when there is none to find (no such
/// parameter, a cancel request, TLS, or not PostgreSQL). An SSL or GSS encryption request
/// before the startup message is skipped.
pub(crate) fn startup_application_name(bytes: &[u8]) -> Option<Option<String>> {
    let mut rest = bytes;
    loop {
        if rest.len() < 8 {
            return if bytes.len() > MAX_STARTUP {
                Some(None)
            } else {
                None
            };
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let code = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 8 && (code == SSL_REQUEST || code == GSSENC_REQUEST) {
            rest = &rest[8..];
            continue;
        }
        if !(8..=MAX_STARTUP).contains(&len) || code >> 16 != 3 {
            // Not a protocol-3 startup message: a cancel request, TLS, or something else.
            return Some(None);
        }
        if rest.len() < len {
            return None;
        }
        let mut fields = rest[8..len].split(|&b| b == 0);
        while let (Some(key), Some(value)) = (fields.next(), fields.next()) {
            if key.is_empty() {
                break;
            }
            if key == b"application_name" {
                return Some(Some(String::from_utf8_lossy(value).into_owned()));
            }
        }
        return Some(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes every byte, and reports each connection's end: `Ok(())` on a
    /// FIN, `Err` on a reset.
    async fn echo_server() -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<io::Result<()>>,
    ) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let end = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break Ok(()),
                            Ok(n) => {
                                if let Err(e) = s.write_all(&buf[..n]).await {
                                    break Err(e);
                                }
                            }
                            Err(e) => break Err(e),
                        }
                    };
                    let _ = tx.send(end);
                });
            }
        });
        (addr, rx)
    }

    async fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("the echo within 5 s")
            .expect("read the echo");
        got
    }

    async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out after 5 s waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn forwards_both_ways_and_passes_a_close_on() {
        let (up, mut ends) = echo_server().await;
        let proxy = Proxy::start(up).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut c, b"hello").await, b"hello");
        assert_eq!(proxy.connections().len(), 1);
        assert_eq!(proxy.upstream(), up);
        // A FIN from the client reaches the server as a FIN, and the server's close comes back.
        c.shutdown().await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), ends.recv())
            .await
            .expect("the upstream connection ends within 5 s")
            .unwrap();
        assert!(end.is_ok(), "a clean close upstream, got {end:?}");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("EOF within 5 s")
            .expect("a clean EOF, not a reset");
        assert_eq!(n, 0);
        until("the connection to be forgotten", || {
            proxy.connections().is_empty().then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn reset_sends_rst_to_both_sides() {
        let (up, mut ends) = echo_server().await;
        let proxy = Proxy::start(up).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        echo(&mut c, b"x").await;
        let id = proxy.connections()[0].id;
        assert!(proxy.reset(id));
        assert!(!proxy.reset(id), "a reset connection is no longer open");
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the client hears of the reset within 5 s");
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the client must see a RST, not a FIN"
        );
        let end = tokio::time::timeout(Duration::from_secs(5), ends.recv())
            .await
            .expect("the upstream hears of the reset within 5 s")
            .unwrap();
        assert_eq!(
            end.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the server must see a RST"
        );
        // The listener still works.
        let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut c2, b"again").await, b"again");
        assert_eq!(proxy.accepted(), 2);
    }

    #[tokio::test]
    async fn blackhole_holds_bytes_both_ways_and_resume_delivers_them() {
        let (up, _ends) = echo_server().await;
        let proxy = Proxy::start(up).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        echo(&mut c, b"before").await;
        assert_eq!(proxy.blackhole(), 1);
        assert!(proxy.connections()[0].blackholed);
        c.write_all(b"during").await.unwrap();
        let mut buf = [0u8; 6];
        let early = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut buf)).await;
        assert!(early.is_err(), "nothing may come back through a blackhole");
        // A connection opened during the blackhole is accepted but reaches nothing.
        let mut late = TcpStream::connect(proxy.addr()).await.unwrap();
        late.write_all(b"late").await.unwrap();
        let mut lbuf = [0u8; 4];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), late.read_exact(&mut lbuf))
                .await
                .is_err(),
            "a connection opened during a blackhole must not be forwarded"
        );
        assert_eq!(proxy.resume(), 2);
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .expect("the held bytes arrive within 5 s of the resume")
            .unwrap();
        assert_eq!(&buf, b"during");
        tokio::time::timeout(Duration::from_secs(5), late.read_exact(&mut lbuf))
            .await
            .expect("the late connection is forwarded after the resume")
            .unwrap();
        assert_eq!(&lbuf, b"late");
    }

    #[tokio::test]
    async fn blackhole_for_then_reset_resets_and_accepts_again() {
        let (up, _ends) = echo_server().await;
        let proxy = Proxy::start(up).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        echo(&mut c, b"a").await;
        let started = Instant::now();
        proxy
            .blackhole_for(Duration::from_millis(200), AfterBlackhole::Reset)
            .await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the client hears of the reset within 5 s");
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
        let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut c2, b"b").await, b"b");
    }

    #[tokio::test]
    async fn one_connection_can_be_blackholed_alone() {
        let (up, _ends) = echo_server().await;
        let proxy = Proxy::start(up).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        echo(&mut a, b"a").await;
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        echo(&mut b, b"b").await;
        let ids: Vec<u64> = proxy.connections().iter().map(|c| c.id).collect();
        assert_eq!(ids, [0, 1]);
        assert!(proxy.blackhole_conn(0));
        a.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), a.read_exact(&mut buf))
                .await
                .is_err(),
            "the blackholed connection must not answer"
        );
        assert_eq!(echo(&mut b, b"y").await, b"y", "the other one still does");
        assert_eq!(proxy.resume(), 1);
        tokio::time::timeout(Duration::from_secs(5), a.read_exact(&mut buf))
            .await
            .expect("delivered after the resume")
            .unwrap();
        assert_eq!(&buf, b"x");
    }

    #[tokio::test]
    async fn a_dead_upstream_is_a_reset_for_the_client() {
        // A port nobody listens on: bind, note it, close.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = Proxy::start(dead).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the client hears of the refused upstream within 5 s");
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
    }

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196608u32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend(body);
        msg
    }

    #[test]
    fn application_name_from_the_startup_message() {
        let msg = startup(&[
            ("user", "postgres"),
            ("application_name", "shardlease-worker w1 work"),
            ("database", "postgres"),
        ]);
        assert_eq!(
            startup_application_name(&msg),
            Some(Some("shardlease-worker w1 work".into()))
        );
        // Byte by byte: more is needed until the message is complete.
        for cut in 0..msg.len() {
            assert_eq!(startup_application_name(&msg[..cut]), None, "cut at {cut}");
        }
        // After an SSL request (the server said no), the startup message follows.
        let mut with_ssl = 8u32.to_be_bytes().to_vec();
        with_ssl.extend(SSL_REQUEST.to_be_bytes());
        with_ssl.extend(&msg);
        assert_eq!(
            startup_application_name(&with_ssl),
            Some(Some("shardlease-worker w1 work".into()))
        );
        assert_eq!(
            startup_application_name(&startup(&[("user", "u")])),
            Some(None)
        );
        // A TLS ClientHello after the SSL request: nothing to find.
        let mut tls = 8u32.to_be_bytes().to_vec();
        tls.extend(SSL_REQUEST.to_be_bytes());
        tls.extend([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
        assert_eq!(startup_application_name(&tls), Some(None));
        // A cancel request.
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend(80877102u32.to_be_bytes());
        cancel.extend([0; 8]);
        assert_eq!(startup_application_name(&cancel), Some(None));
    }

    /// Through a real PostgreSQL (the shared test server): queries pass, the startup
    /// message's application_name is seen, a reset breaks the client's connection, and a
    /// blackhole stalls a query until the resume.
    #[tokio::test]
    async fn a_postgres_client_through_the_proxy() {
        let url = crate::base_url();
        let pg = shardlease::parse_database_url(&url).expect("DATABASE_URL parses");
        let host = match pg.get_hosts().first() {
            Some(shardlease::tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            other => panic!("this test needs a TCP DATABASE_URL, got host {other:?}"),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let upstream = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .expect("the server's address");
        let proxy = Proxy::start(upstream).await.unwrap();
        let via =
            shardlease::parse_database_url(&crate::with_host_port(&url, "127.0.0.1", proxy.port()))
                .unwrap();
        let client = shardlease::connect_client(&via, "proxy-test")
            .await
            .expect("connect through the proxy");
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        let conns = proxy.connections();
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].application_name.as_deref(), Some("proxy-test"));

        proxy.blackhole();
        let started = Instant::now();
        let pending = tokio::spawn(async move {
            let r = client
                .query_one("SELECT 2", &[])
                .await
                .map(|r| r.get::<_, i32>(0));
            (r, client)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pending.is_finished(), "a query must stall in a blackhole");
        proxy.resume();
        let (r, client) = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("the query completes within 5 s of the resume")
            .unwrap();
        assert_eq!(r.unwrap(), 2);
        assert!(started.elapsed() >= Duration::from_millis(300));

        assert_eq!(proxy.reset_all(), 1);
        let err = tokio::time::timeout(Duration::from_secs(5), client.query_one("SELECT 3", &[]))
            .await
            .expect("the query fails within 5 s of the reset")
            .expect_err("a reset connection cannot answer");
        assert!(
            client.is_closed(),
            "the client knows its connection is gone: {err}"
        );
    }
}
