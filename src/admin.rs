//! The admin listener: plain HTTP/1.1 on its own port (default
//! 127.0.0.1:9090), away from the loops' hot path. `/healthz`, `/readyz`,
//! `/metrics`, `POST /publish` and `GET /presence`. One short-lived thread per request, at
//! most [`MAX_CONCURRENT`] at once, each with a deadline for the whole
//! request, so a slow client cannot hold the health checks or a publish
//! slot hostage.
//!
//! With `--admin-token-file`, `POST /publish` (and every endpoint that
//! reveals users) needs `Authorization: Bearer <token>`; health and
//! readiness stay open for load balancers, `/metrics` too unless
//! `--admin-protect-metrics`.
//!
//! Longer than most files (about 600 lines): one small HTTP server, its
//! request reader with its limits, the token check and six endpoints,
//! which read better together than split over files of a few dozen lines.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::auth;
use crate::config::{Config, RedisTarget};
use crate::dispatch::Delivery;
use crate::history;
use crate::http::reason_phrase;
use crate::metrics::Metrics;
use crate::notice::{self, NoticeError, MAX_NOTICE_BYTES};
use crate::presence;
use crate::sessions::Sessions;
use crate::status::Status;

/// What the admin listener reads and where it delivers.
pub struct Ctx {
    pub config: Arc<Config>,
    pub delivery: Delivery,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<Sessions>,
    pub admin_token: Arc<auth::Keys>,
    /// The recovery-read thread, for its counters.
    pub replayer: Option<Arc<crate::replay::Replayer>>,
}

const MAX_CONCURRENT: usize = 16;
const MAX_HEAD_BYTES: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect, read and write timeout of the admin's Redis connections.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// The whole request, head and body, must arrive within this: a client
/// that trickles a byte at a time cannot keep a slot past it.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Publish connections kept for the next request; more are closed.
const MAX_IDLE_REDIS: usize = 4;
/// At most one log line per this about refused admin tokens.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

struct Admin {
    shared: Ctx,
    active: AtomicUsize,
    /// Where `POST /publish` publishes, with Redis: the master the
    /// subscriber proved.
    redis: Option<RedisTarget>,
    /// Idle publish connections, with the target's epoch they were opened
    /// in (older ones go to a master the subscriber lost). The lock is held
    /// only to take or give one back, never across a round trip to Redis.
    idle: Mutex<Vec<(redis::Connection, u64)>>,
    /// When the last refused-token line was logged, and how many
    /// refusals went unlogged since.
    refusal_log: Mutex<(Option<Instant>, u64)>,
}

/// The paths that need the admin token when there is one.
fn needs_token(path: &str, protect_metrics: bool) -> bool {
    match path {
        "/publish" | "/presence" => true,
        "/metrics" => protect_metrics,
        _ => false,
    }
}

pub fn start(listener: TcpListener, shared: Ctx) -> io::Result<()> {
    let admin = Arc::new(Admin {
        redis: shared.config.redis.clone(),
        shared,
        active: AtomicUsize::new(0),
        idle: Mutex::new(Vec::new()),
        refusal_log: Mutex::new((None, 0)),
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
                        Ok((stream, peer)) => {
                            admin.serve(stream, peer);
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
    fn serve(self: &Arc<Self>, stream: mio::net::TcpStream, peer: SocketAddr) {
        let mut stream = TcpStream::from(stream);
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
                let _ = a.handle(stream, peer);
                a.active.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn respond(s: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
    respond_with(s, status, content_type, "", body)
}

/// `extra` is more header lines, each ending in CRLF.
fn respond_with(
    s: &mut TcpStream,
    status: u16,
    content_type: &str,
    extra: &str,
    body: &[u8],
) -> io::Result<()> {
    let reason = reason_phrase(status);
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// One read that gives up at `deadline` (`TimedOut`), however slowly the
/// bytes come.
fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    s.set_read_timeout(Some(left.min(IO_TIMEOUT)))?;
    s.read(buf)
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn json_error(e: &str) -> Vec<u8> {
    format!("{}\n", serde_json::json!({ "error": e })).into_bytes()
}

impl Admin {
    fn handle(&self, mut s: TcpStream, peer: SocketAddr) -> io::Result<()> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let (method, path, query, body_len, head_len, bearer) = loop {
            let n = match read_by(&mut s, &mut chunk, deadline) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if timed_out(&e) => {
                    return respond(&mut s, 408, "text/plain", b"request timeout\n")
                }
                Err(e) => return Err(e),
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let header = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| std::str::from_utf8(h.value).ok())
                    };
                    let cl = match header("content-length") {
                        None => 0,
                        Some(v) => match v.and_then(|v| v.trim().parse::<usize>().ok()) {
                            Some(n) => n,
                            None => {
                                return respond(
                                    &mut s,
                                    400,
                                    "application/json",
                                    &json_error("bad Content-Length"),
                                )
                            }
                        },
                    };
                    // Absent, not Bearer, or not text: no token at all.
                    let bearer = header("authorization")
                        .flatten()
                        .and_then(auth::bearer)
                        .map(str::to_string);
                    let (path, query) = req
                        .path
                        .unwrap_or("")
                        .split_once('?')
                        .unwrap_or((req.path.unwrap_or(""), ""));
                    break (
                        req.method.unwrap_or("").to_string(),
                        path.to_string(),
                        query.to_string(),
                        cl,
                        len,
                        bearer,
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
        // Before the body is read: a client without the token costs no more
        // than its head.
        if shared.config.admin_token.is_some()
            && needs_token(&path, shared.config.admin_protect_metrics)
        {
            if let Err(why) = self.authorize(bearer.as_deref()) {
                self.refused(peer, &method, &path, why);
                return respond_with(
                    &mut s,
                    401,
                    "application/json",
                    "WWW-Authenticate: Bearer\r\n",
                    &json_error(why),
                );
            }
        }
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
                    let why = format!("{}\n", shared.status.redis_why());
                    respond(&mut s, 503, "text/plain", why.as_bytes())
                } else {
                    respond(&mut s, 200, "text/plain", b"ready\n")
                }
            }
            ("GET", "/metrics") => {
                let mut text = shared.metrics.render(shared.sessions.users());
                if let Some(r) = &shared.replayer {
                    text.push_str(&format!(
                        "# HELP pushwire_replay_batches_total Pipelined history reads (one round trip each).\n# TYPE pushwire_replay_batches_total counter\npushwire_replay_batches_total {}\n# HELP pushwire_replay_queued Recovery reads waiting for the replayer.\n# TYPE pushwire_replay_queued gauge\npushwire_replay_queued {}\n",
                        r.batches(),
                        r.queued()
                    ));
                }
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
                    let n = match read_by(&mut s, &mut chunk, deadline) {
                        Ok(0) => return Ok(()),
                        Ok(n) => n,
                        Err(e) if timed_out(&e) => {
                            return respond(
                                &mut s,
                                408,
                                "application/json",
                                &json_error("request timeout"),
                            )
                        }
                        Err(e) => return Err(e),
                    };
                    let take = n.min(body_len - body.len());
                    body.extend_from_slice(&chunk[..take]);
                }
                let (status, answer) = self.publish(&body);
                respond(&mut s, status, "application/json", &answer)
            }
            ("GET", "/presence") => {
                let (status, answer) = self.presence(&query);
                respond(&mut s, status, "application/json", &answer)
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/publish" | "/presence") => {
                respond(&mut s, 405, "text/plain", b"method not allowed\n")
            }
            _ => respond(&mut s, 404, "text/plain", b"not found\n"),
        }
    }

    /// Checks a presented bearer token against the current admin token
    /// (SIGHUP may have replaced it), in constant time.
    fn authorize(&self, presented: Option<&str>) -> Result<(), &'static str> {
        let Some(presented) = presented else {
            return Err("missing admin token: send Authorization: Bearer <token>");
        };
        if auth::same_secret(&self.shared.admin_token.current(), presented.as_bytes()) {
            Ok(())
        } else {
            Err("wrong admin token")
        }
    }

    /// Counts a refused token and logs it, one line per
    /// [`REFUSAL_LOG_EVERY`] at most (a scan must not flood the journal).
    fn refused(&self, peer: SocketAddr, method: &str, path: &str, why: &str) {
        self.shared
            .metrics
            .admin_rejected
            .fetch_add(1, Ordering::Relaxed);
        let mut log = self
            .refusal_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (last, unlogged) = &mut *log;
        if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            *unlogged += 1;
            return;
        }
        let more = match *unlogged {
            0 => String::new(),
            n => format!(" ({n} more refused since the last line)"),
        };
        log::warn!("admin: refused {method} {path} from peer={peer}: {why}{more}");
        *last = Some(Instant::now());
        *unlogged = 0;
    }

    fn publish(&self, body: &[u8]) -> (u16, Vec<u8>) {
        let shared = &self.shared;
        if shared.status.is_shutting_down() {
            return (503, json_error("shutting down"));
        }
        let Some(target) = &self.redis else {
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
        // Until a link is proven by the canary (at start, and from the
        // moment one is found dead), a notice published now may reach no
        // node: say so instead of a 202 for a notice nobody gets.
        if !shared.status.is_ready() {
            return (
                503,
                json_error(&format!(
                    "not ready, the notice was not sent: {}",
                    shared.status.redis_why()
                )),
            );
        }
        for attempt in 0..2 {
            let (mut conn, epoch, pooled) = match self.take_conn(target) {
                Ok(c) => c,
                Err(e) => return (503, json_error(&format!("redis unavailable: {e}"))),
            };
            let outcome = if shared.config.history_size > 0 {
                self.publish_durable(&mut conn, body)
            } else {
                let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(&shared.config.channel)
                    .arg(body)
                    .query(&mut conn);
                // With Redis, the receivers are the subscribed nodes.
                r.map(|n| (202, format!("{{\"receivers\":{n}}}\n").into_bytes()))
            };
            match outcome {
                Ok(answer) => {
                    self.put_back(conn, epoch);
                    return answer;
                }
                // A pooled connection that a Redis restart closed fails on
                // the write, before anything ran: a new one may retry. Any
                // other failure may have published: never twice.
                Err(e) if pooled && attempt == 0 && e.is_connection_dropped() => {
                    self.idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                    log::debug!("admin publish: {e}; trying a new connection");
                }
                Err(e) => {
                    log::debug!("admin publish: {e}");
                    return (
                        503,
                        json_error(&format!(
                            "redis failed, the notice may not have been sent: {e}"
                        )),
                    );
                }
            }
        }
        (503, json_error("redis unavailable"))
    }

    /// `GET /presence[?user=ID]` (SPEC section 9): the fleet's answer from
    /// Redis, or this node's standalone. Bad input is a 400 with the
    /// reason; Redis unreachable a 503; never a 500.
    fn presence(&self, query: &str) -> (u16, Vec<u8>) {
        let shared = &self.shared;
        let given = query
            .split('&')
            .any(|p| p.split_once('=').map_or(p, |(k, _)| k) == "user");
        let user = match auth::query_param(query, "user") {
            None if given => return (400, json_error("user is not valid percent-encoded UTF-8")),
            None => None,
            Some(u) if u.is_empty() || u.len() > auth::MAX_USER_ID_LEN => {
                let e = format!("a user id is 1 to {} bytes", auth::MAX_USER_ID_LEN);
                return (400, json_error(&e));
            }
            Some(u) => Some(u),
        };
        let Some(client) = &self.redis else {
            let answer = match &user {
                Some(u) => presence::local_user(&shared.sessions, u),
                None => presence::local_totals(&shared.sessions, &shared.metrics),
            };
            return (200, (answer + "\n").into_bytes());
        };
        for attempt in 0..2 {
            let (mut conn, epoch, pooled) = match self.take_conn(client) {
                Ok(c) => c,
                Err(e) => return (503, json_error(&format!("redis unavailable: {e}"))),
            };
            let prefix = &shared.config.key_prefix;
            let mut r = presence::read(&mut conn, prefix, user.as_deref());
            if let Err(presence::ReadError::NoLibrary) = r {
                r = match presence::ensure_loaded(&mut conn, &shared.config) {
                    Ok(()) => presence::read(&mut conn, prefix, user.as_deref()),
                    Err(e) => Err(presence::ReadError::Redis(e)),
                };
            }
            match r {
                Ok(answer) => {
                    self.put_back(conn, epoch);
                    return (200, (answer + "\n").into_bytes());
                }
                // A read: safe to try once more on a new connection.
                Err(presence::ReadError::Redis(e)) if pooled && attempt == 0 => {
                    log::debug!("admin presence: {e}; trying a new connection");
                }
                Err(presence::ReadError::Redis(e)) => {
                    return (503, json_error(&format!("redis failed: {e}")))
                }
                Err(presence::ReadError::NoLibrary) => {
                    return (503, json_error("the function library cannot be loaded"))
                }
            }
        }
        (503, json_error("redis unavailable"))
    }

    /// An idle connection from the pool (the lock is released at once), or
    /// a new one to the master the subscriber proved; the round trip then
    /// runs without the lock. Connections from before the subscriber's last
    /// lost link are closed.
    fn take_conn(
        &self,
        target: &RedisTarget,
    ) -> redis::RedisResult<(redis::Connection, u64, bool)> {
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|(_, epoch)| target.is_current(*epoch));
            idle.pop()
        };
        if let Some((c, epoch)) = idle {
            return Ok((c, epoch, true));
        }
        let c = target.connect(REDIS_TIMEOUT)?;
        let wait = self.shared.config.history_replicas_timeout;
        if self.shared.config.history_replicas > 0 {
            // A publish's reply comes after WAIT's own timeout at the
            // latest: the socket must outlast it.
            c.conn.set_read_timeout(Some(wait + REDIS_TIMEOUT))?;
        }
        Ok((c.conn, c.epoch, false))
    }

    fn put_back(&self, conn: redis::Connection, epoch: u64) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_REDIS {
            idle.push((conn, epoch));
        }
    }

    /// The durable path (SPEC section 8): recorded in history, then sent to
    /// every node, by the function library; answers the notice's id.
    fn publish_durable(
        &self,
        conn: &mut redis::Connection,
        body: &[u8],
    ) -> redis::RedisResult<(u16, Vec<u8>)> {
        let c = &self.shared.config;
        let wait = (c.history_replicas > 0).then_some(history::Wait {
            replicas: c.history_replicas,
            timeout: c.history_replicas_timeout,
        });
        for _ in 0..2 {
            match history::publish_waiting(conn, &c.key_prefix, body, wait) {
                Ok(p) => {
                    self.shared
                        .metrics
                        .durable_published
                        .fetch_add(1, Ordering::Relaxed);
                    let mut answer = serde_json::json!({"id": p.id, "receivers": p.receivers});
                    let mut status = 202;
                    if let Some(got) = p.replicas {
                        answer["replicas"] = got.into();
                        let want = c.history_replicas;
                        if got < i64::from(want) {
                            // Stored and sent on the master, but a failover
                            // now could take it away: the publisher is
                            // told, and may publish again (with a new id).
                            self.shared
                                .metrics
                                .durable_unreplicated
                                .fetch_add(1, Ordering::Relaxed);
                            answer["error"] = format!(
                                "published, but only {got} of {want} replicas acknowledged it within {} ms: a failover could lose it; publish again to be sure (a client may then get it twice, under two ids)",
                                c.history_replicas_timeout.as_millis()
                            )
                            .into();
                            status = 503;
                        }
                    }
                    return Ok((status, format!("{answer}\n").into_bytes()));
                }
                Err(history::PublishError::Refused(why)) => {
                    self.shared
                        .metrics
                        .notices_invalid
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok((400, json_error(&why)));
                }
                // Nothing ran: load the library and publish again.
                Err(history::PublishError::NoLibrary) => {
                    history::ensure_library(
                        conn,
                        &c.key_prefix,
                        c.history_size,
                        c.history_ttl.as_secs().max(1),
                    )?;
                }
                Err(history::PublishError::Redis(e)) => return Err(e),
            }
        }
        Ok((
            503,
            json_error("the durable function library cannot be loaded"),
        ))
    }
}
