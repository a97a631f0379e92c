//! The admin listener: plain HTTP/1.1 on its own port (default
//! 127.0.0.1:9090), away from the loops' hot path. `/healthz`, `/readyz`,
//! `/metrics` and `POST /publish`. One short-lived thread per request, at
//! most [`MAX_CONCURRENT`] at once, each with read and write timeouts, so a
//! slow client cannot hold the health checks hostage.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::Config;
use crate::dispatch::Delivery;
use crate::metrics::Metrics;
use crate::notice::{self, NoticeError, MAX_NOTICE_BYTES};
use crate::sessions::Sessions;
use crate::status::Status;

/// What the admin listener reads and where it delivers.
pub struct Ctx {
    pub config: Arc<Config>,
    pub delivery: Delivery,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<Sessions>,
}

/// The `--dev` demo page, served at `/` on the WebSocket port.
pub const DEMO_PAGE: &str = include_str!("demo.html");

const MAX_CONCURRENT: usize = 16;
const MAX_HEAD_BYTES: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

struct Admin {
    shared: Ctx,
    active: AtomicUsize,
    /// The connection `POST /publish` publishes on, made on first use.
    redis: Mutex<Option<redis::Connection>>,
}

pub fn start(listener: TcpListener, shared: Ctx) -> io::Result<()> {
    let admin = Arc::new(Admin {
        shared,
        active: AtomicUsize::new(0),
        redis: Mutex::new(None),
    });
    // Readiness first, then a non-blocking accept: a blocking accept()
    // would hold a descriptor slot while it waits, and at the descriptor
    // limit take the very slot the loops free to turn clients away.
    listener.set_nonblocking(true)?;
    let mut listener = mio::net::TcpListener::from_std(listener);
    let mut poll = mio::Poll::new()?;
    poll.registry()
        .register(&mut listener, mio::Token(0), mio::Interest::READABLE)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let mut events = mio::Events::with_capacity(4);
            // A spare descriptor of the admin's own, so a health check is
            // still answered when the process is out of descriptors.
            let mut reserve = std::fs::File::open("/dev/null").ok();
            loop {
                if let Err(e) = poll.poll(&mut events, None) {
                    if e.kind() != io::ErrorKind::Interrupted {
                        log::error!("admin listener stopped: {e}");
                        return;
                    }
                }
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            admin.serve(stream);
                            if reserve.is_none() {
                                reserve = std::fs::File::open("/dev/null").ok();
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if reserve.is_some() => {
                            log::debug!("admin accept failed ({e}): using the spare descriptor");
                            reserve = None;
                        }
                        Err(e) => {
                            // Out of descriptors, spare in use: retrying at
                            // once would spin and race the loops for the
                            // descriptors they free.
                            log::debug!("admin accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            }
        })?;
    Ok(())
}

impl Admin {
    /// Answers one request on its own thread (at most [`MAX_CONCURRENT`]).
    fn serve(self: &Arc<Self>, stream: mio::net::TcpStream) {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: the descriptor moves from the mio stream to the std one.
        let mut stream = unsafe { TcpStream::from_raw_fd(stream.into_raw_fd()) };
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        if self.active.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT {
            self.active.fetch_sub(1, Ordering::AcqRel);
            let _ = respond(&mut stream, 503, "text/plain", b"busy\n");
            return;
        }
        let a = self.clone();
        let spawned = std::thread::Builder::new()
            .name("admin-req".into())
            .spawn(move || {
                let _ = a.handle(stream);
                a.active.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn respond(s: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

fn json_error(e: &str) -> Vec<u8> {
    format!("{}\n", serde_json::json!({ "error": e })).into_bytes()
}

impl Admin {
    fn handle(&self, mut s: TcpStream) -> io::Result<()> {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let (method, path, body_len, head_len) = loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let cl = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .map(|h| {
                            std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<usize>().ok())
                        });
                    let cl = match cl {
                        None => 0,
                        Some(Some(n)) => n,
                        Some(None) => {
                            return respond(
                                &mut s,
                                400,
                                "application/json",
                                &json_error("bad Content-Length"),
                            )
                        }
                    };
                    break (
                        req.method.unwrap_or("").to_string(),
                        req.path
                            .unwrap_or("")
                            .split('?')
                            .next()
                            .unwrap_or("")
                            .to_string(),
                        cl,
                        len,
                    );
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => {}
                Ok(httparse::Status::Partial) => {
                    return respond(&mut s, 431, "text/plain", b"header too large\n")
                }
                Err(_) => return respond(&mut s, 400, "text/plain", b"bad request\n"),
            }
        };
        let shared = &self.shared;
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => {
                // The loops beat on every tick; a silent loop is unhealthy.
                let now = shared.status.now_ms();
                let stuck = shared
                    .delivery
                    .loops()
                    .iter()
                    .any(|w| now.saturating_sub(w.heartbeat()) > 10_000);
                if stuck && now > 10_000 {
                    respond(&mut s, 503, "text/plain", b"event loop stuck\n")
                } else {
                    respond(&mut s, 200, "text/plain", b"ok\n")
                }
            }
            ("GET", "/readyz") => {
                if shared.status.is_shutting_down() {
                    respond(&mut s, 503, "text/plain", b"shutting down\n")
                } else if !shared.status.is_ready() {
                    respond(
                        &mut s,
                        503,
                        "text/plain",
                        b"redis subscription not established\n",
                    )
                } else {
                    respond(&mut s, 200, "text/plain", b"ready\n")
                }
            }
            ("GET", "/metrics") => {
                let text = shared.metrics.render(shared.sessions.users());
                respond(&mut s, 200, "text/plain; version=0.0.4", text.as_bytes())
            }
            ("POST", "/publish") => {
                if body_len > MAX_NOTICE_BYTES {
                    shared
                        .metrics
                        .notices_invalid
                        .fetch_add(1, Ordering::Relaxed);
                    let e = NoticeError::TooLarge(body_len).to_string();
                    return respond(&mut s, 413, "application/json", &json_error(&e));
                }
                let mut body = buf.split_off(head_len.min(buf.len()));
                body.truncate(body_len);
                while body.len() < body_len {
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        return Ok(());
                    }
                    let take = n.min(body_len - body.len());
                    body.extend_from_slice(&chunk[..take]);
                }
                let (status, answer) = self.publish(&body);
                respond(&mut s, status, "application/json", &answer)
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/publish") => {
                respond(&mut s, 405, "text/plain", b"method not allowed\n")
            }
            _ => respond(&mut s, 404, "text/plain", b"not found\n"),
        }
    }

    fn publish(&self, body: &[u8]) -> (u16, Vec<u8>) {
        let shared = &self.shared;
        if shared.status.is_shutting_down() {
            return (503, json_error("shutting down"));
        }
        let Some(url) = &shared.config.redis_url else {
            // Standalone: deliver here.
            return match shared.delivery.handle_payload(body) {
                Ok(n) => (202, format!("{{\"receivers\":{n}}}\n").into_bytes()),
                Err(e) => (400, json_error(&e.to_string())),
            };
        };
        // Validate before it reaches every node.
        if let Err(e) = notice::parse(body) {
            shared
                .metrics
                .notices_invalid
                .fetch_add(1, Ordering::Relaxed);
            return (400, json_error(&e.to_string()));
        }
        let mut conn = self.redis.lock().unwrap_or_else(PoisonError::into_inner);
        for _attempt in 0..2 {
            if conn.is_none() {
                let c = redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)));
                match c {
                    Ok(c) => {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                        *conn = Some(c);
                    }
                    Err(e) => return (503, json_error(&format!("redis unavailable: {e}"))),
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&shared.config.channel)
                .arg(body)
                .query(c);
            match r {
                // With Redis, the receivers are the subscribed nodes.
                Ok(n) => return (202, format!("{{\"receivers\":{n}}}\n").into_bytes()),
                Err(e) => {
                    *conn = None;
                    log::debug!("admin publish: {e}; reconnecting once");
                }
            }
        }
        (503, json_error("redis unavailable"))
    }
}
