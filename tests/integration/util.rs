//! Shared test helpers: a private redis-server, the pushwire binary, a
//! blocking WebSocket client, raw HTTP, and the watchdog.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub const SECRET: &str = "test-secret";

/// Fails the test process if the guard is not dropped in time.
pub struct Watchdog(Arc<AtomicBool>);

pub fn watchdog(secs: u64) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let name = std::thread::current().name().unwrap_or("test").to_string();
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("WATCHDOG: {name} did not finish within {secs}s");
        std::process::exit(101);
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A redis-server of the test's own, on a free port.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self.ping()),
            "redis-server did not start on port {}",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn ping(&self) -> bool {
        self.cmd(&["PING"]).is_ok_and(|r| r.contains("PONG"))
    }

    /// Runs a command through redis-cli; returns its output.
    pub fn cmd(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success()
            && !text.starts_with("Could not connect")
            && !text.starts_with("ERR")
        {
            Ok(text)
        } else {
            Err(text + &String::from_utf8_lossy(&out.stderr))
        }
    }

    /// PUBLISH through the redis crate (exact bytes); returns the receiver count.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        publish_url(&self.url(), channel, payload)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pushwire binary, started on free ports.
pub struct Node {
    pub child: Child,
    pub ws: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_pushwire");

impl Node {
    /// Starts with `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0` and `args`.
    pub fn start(args: &[&str]) -> Node {
        Self::start_cmd(
            Command::new(BIN)
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
                .args(args),
        )
    }

    /// A node with JWT auth (secret [`SECRET`]) on the given Redis.
    pub fn with_redis(redis: &Redis, args: &[&str]) -> Node {
        let url = redis.url();
        let mut all = vec![
            "--redis",
            url.as_str(),
            "--jwt-secret",
            SECRET,
            "--canary-interval",
            "0.5",
        ];
        all.extend_from_slice(args);
        let n = Self::start(&all);
        assert!(
            n.wait_ready(Duration::from_secs(10)),
            "node did not become ready"
        );
        n
    }

    pub fn start_cmd(cmd: &mut Command) -> Node {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pushwire");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[pushwire] {line}");
                if let Some(i) = line.find("listening ws=") {
                    if let Some(t) = tx.take() {
                        let _ = t.send(line[i..].to_string());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "pushwire did not report its listeners: {:?}",
                    log.lock().unwrap()
                );
            }
        };
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
        };
        Node {
            ws: field("ws=").expect("ws address"),
            admin: field("admin="),
            child,
            log,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.ws, path_and_query)
    }

    /// A JWT-authenticated client of `user` at /ws.
    pub fn connect(&self, user: &str) -> Client {
        let token = token(user, None);
        Client::connect(&self.url(&format!("/ws?token={token}"))).expect("upgrade")
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http(
            self.admin.unwrap(),
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    }

    pub fn publish(&self, body: &str) -> (u16, String) {
        http(
            self.admin.unwrap(),
            &format!(
                "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    }

    /// One sample of the Prometheus text: `name` or `name{labels}`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics");
        text.lines()
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == name).then(|| v.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("metric {name} not found"))
    }

    pub fn wait_ready(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.admin_get("/readyz").0 == 200)
    }

    pub fn wait_metric(&self, name: &str, timeout: Duration, f: impl Fn(f64) -> bool) -> bool {
        wait_until(timeout, || f(self.metric(name)))
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HS256 token for `user` signed with [`SECRET`].
pub fn token(user: &str, exp: Option<u64>) -> String {
    let mut claims = serde_json::json!({ "sub": user });
    if let Some(e) = exp {
        claims["exp"] = e.into();
    }
    pushwire::auth::sign_hs256(&claims, SECRET.as_bytes())
}

pub fn unix_now() -> u64 {
    pushwire::auth::unix_now()
}

/// A blocking WebSocket client over a plain TCP stream.
pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

/// What a refused upgrade answered.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
}

impl Client {
    pub fn connect(url: &str) -> Result<Client, Refused> {
        Self::connect_with(url, &[])
    }

    pub fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Client, Refused> {
        use tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let host = req.uri().host().unwrap().to_string();
        let port = req.uri().port_u16().unwrap();
        let stream = TcpStream::connect((host.as_str(), port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        match tungstenite::client::client(req, MaybeTlsStream::Plain(stream)) {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                Err(Refused {
                    status: resp.status().as_u16(),
                })
            }
            Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
        }
    }

    fn set_timeout(&mut self, t: Duration) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(t)).unwrap();
        }
    }

    /// The next text frame within `timeout`, skipping pings/pongs.
    pub fn recv_text(&mut self, timeout: Duration) -> Option<String> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.set_timeout(left);
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(t.to_string()),
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => return None,
            }
        }
    }

    /// Reads until a close frame arrives; returns its code.
    pub fn recv_close(&mut self, timeout: Duration) -> Option<u16> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.set_timeout(left);
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return Some(u16::from(f.code)),
                Ok(Message::Close(None)) => return Some(u16::from(CloseCode::Status)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Asserts nothing but control frames arrives within `d`.
    pub fn expect_nothing(&mut self, d: Duration) {
        if let Some(t) = self.recv_text(d) {
            panic!("unexpected notice: {t}");
        }
    }
}

/// Sends a raw HTTP request and returns the status and body.
pub fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    parse_response(http_raw(addr, request).as_bytes())
}

pub fn parse_response(buf: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "pushwire-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends a raw HTTP request and returns the whole response as text.
pub fn http_raw(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before the whole request is written.
    let _ = s.write_all(request.as_ref());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}

/// The value of a response header (case-insensitive name), from [`http_raw`] text.
pub fn header_value(response: &str, name: &str) -> Option<String> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// PUBLISH through the redis crate on any URL (with credentials, a db).
pub fn publish_url(url: &str, channel: &str, payload: &[u8]) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query(&mut c)
        .unwrap()
}

/// A TCP forwarder in front of a port that can turn the connections it
/// already carries into black holes (a half-open link: nothing comes
/// through, nothing is closed) while new connections pass.
pub struct Proxy {
    pub port: u16,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    frozen_up_to: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::AtomicU64;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let frozen_up_to = Arc::new(AtomicU64::new(0));
        let (a, f) = (accepted.clone(), frozen_up_to.clone());
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                let id = a.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (from, to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || pump(id, from, to, &f));
                }
            }
        });
        Proxy {
            port,
            accepted,
            frozen_up_to,
        }
    }

    /// From now on, every connection accepted so far forwards nothing.
    pub fn freeze_existing(&self) {
        self.frozen_up_to
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

fn pump(
    id: u64,
    mut from: TcpStream,
    mut to: TcpStream,
    frozen_up_to: &std::sync::atomic::AtomicU64,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                if id <= frozen_up_to.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
