//! Presence (SPEC section 9): this node's per-user connection counts in
//! Redis, the fleet-wide answers, and the online/offline events.
//!
//! The loops only say "this user's count changed" on a bounded channel
//! ([`Presence::changed`], never blocking); one thread reads the current
//! counts from [`Sessions`] (the truth) and writes them, coalesced and
//! pipelined, through `<prefix>_presence_update` in `src/durable.lua`.
//! It writes *absolute* counts, so a connect and a disconnect of one user
//! between two batches send nothing, and a batch that may or may not have
//! run can be sent again without counting anything twice. When the
//! channel is full, or the link to Redis was lost, or Redis says this node
//! was not alive (reaped, or its data lost), the thread rewrites the
//! node's whole state once. Each call is also the node's heartbeat and
//! does a share of the fleet's housekeeping (reaping dead nodes, due
//! offline events), so nothing but the surviving nodes is needed.
//!
//! About 570 lines of code: the loops' handle, the writer thread with its
//! reconnect and rewrite rules, and the answers for the admin listener;
//! the rest is tests against a real Redis.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use redis::{ConnectionLike, RedisError, RedisResult, Value};

use crate::config::Config;
use crate::history;
use crate::metrics::Metrics;
use crate::redis_target::RedisTarget;
use crate::sessions::Sessions;

/// Changes queued from the loops before they fall back to a full
/// rewrite (the one place that says what a full queue means: nothing is
/// lost, the thread rewrites everything from [`Sessions`]).
pub const QUEUE: usize = 65_536;
/// Users per FCALL: a call stays short inside Redis; a batch is several
/// calls in one pipeline.
const CHUNK: usize = 1000;
/// Changes taken from the queue per batch.
const MAX_BATCH: usize = 100_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// How often the thread looks up from an idle wait (the stop flag).
const WAKE: Duration = Duration::from_millis(100);

/// The loops' end: cheap, never waits.
pub struct Presence {
    tx: Sender<Box<str>>,
    /// Set when a change could not be queued: rewrite everything.
    overflow: AtomicBool,
}

impl Presence {
    /// A handle and the receiving end for [`spawn`].
    pub fn new() -> (Arc<Presence>, Receiver<Box<str>>) {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let p = Presence {
            tx,
            overflow: AtomicBool::new(false),
        };
        (Arc::new(p), rx)
    }

    /// `user`'s connection count on this node changed (call it after the
    /// change in [`Sessions`]).
    pub fn changed(&self, user: &str) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(user.into()) {
            self.overflow.store(true, Ordering::Relaxed);
        }
    }
}

/// What the presence thread reads.
pub struct Ctx {
    pub config: Arc<Config>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    /// Set once the loops have finished: write the last state, leave.
    pub stop: Arc<AtomicBool>,
}

/// The per-user answer for this node alone (standalone, and `/presence/me`).
pub fn local_user(sessions: &Sessions, user: &str) -> String {
    let n = sessions.count(user);
    user_json(user, n, usize::from(n > 0))
}

/// The fleet answer for this node alone (standalone).
pub fn local_totals(sessions: &Sessions, metrics: &Metrics) -> String {
    format!(
        "{{\"users\":{},\"connections\":{},\"nodes\":1}}",
        sessions.users(),
        metrics.connections.load(Ordering::Relaxed)
    )
}

/// `{"userId":..,"connections":..,"nodes":..}`, in the library's order and
/// escaping.
pub fn user_json(user: &str, connections: usize, nodes: usize) -> String {
    let id = serde_json::to_string(user).unwrap_or_else(|_| "\"\"".into());
    format!("{{\"userId\":{id},\"connections\":{connections},\"nodes\":{nodes}}}")
}

#[derive(Debug)]
pub enum ReadError {
    /// The function library is not loaded: load it ([`ensure_loaded`]) and ask again.
    NoLibrary,
    Redis(RedisError),
}

/// `FCALL_RO <prefix>_presence 0 [user]`: the JSON answer, as the admin
/// listener gives it.
pub fn read<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    user: Option<&str>,
) -> Result<String, ReadError> {
    let mut c = redis::cmd("FCALL_RO");
    c.arg(format!("{prefix}_presence")).arg(0);
    if let Some(u) = user {
        c.arg(u);
    }
    match c.query::<String>(conn) {
        Ok(s) => Ok(s),
        Err(e) if history::is_missing_function(&e) => Err(ReadError::NoLibrary),
        Err(e) => Err(ReadError::Redis(e)),
    }
}

/// Makes sure Redis has the function library (presence needs it with
/// history off too). With history on it loads it as the subscriber does;
/// with history off only when it is missing, so that such a node never
/// replaces the library of a fleet that keeps history.
pub fn ensure_loaded<C: ConnectionLike>(conn: &mut C, c: &Config) -> RedisResult<()> {
    let ttl = c.history_ttl.as_secs().max(1);
    if c.history_size > 0 {
        return history::ensure_library(conn, &c.key_prefix, c.history_size, ttl).map(|_| ());
    }
    match redis::cmd("FCALL_RO")
        .arg(format!("{}_version", c.key_prefix))
        .arg(0)
        .query::<i64>(conn)
    {
        Ok(v) if v >= history::LIBRARY_VERSION => Ok(()),
        // An older library without presence (a rolling upgrade): replace it
        // with ours, keeping the history settings the fleet loaded it with.
        Ok(_) => {
            let (size, ttl) = loaded_settings(conn, &c.key_prefix).unwrap_or((1, ttl));
            history::ensure_library(conn, &c.key_prefix, size, ttl).map(|_| ())
        }
        Err(e) if history::is_missing_function(&e) => {
            history::ensure_library(conn, &c.key_prefix, 1, ttl).map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// `SIZE` and `TTL_MS` (as seconds) of the library Redis holds.
fn loaded_settings<C: ConnectionLike>(conn: &mut C, prefix: &str) -> Option<(usize, u64)> {
    let v: Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(prefix)
        .arg("WITHCODE")
        .query(conn)
        .ok()?;
    let code = library_code(&v)?;
    let num = |name: &str| -> Option<u64> {
        let rest = &code[code.find(&format!("\nlocal {name} = "))? + name.len() + 10..];
        rest.split('\n').next()?.trim().parse().ok()
    };
    Some((num("SIZE")? as usize, (num("TTL_MS")? / 1000).max(1)))
}

fn library_code(v: &Value) -> Option<String> {
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if let Value::BulkString(b) = item {
                    if b == b"library_code" {
                        if let Some(Value::BulkString(code)) = items.get(i + 1) {
                            return String::from_utf8(code.clone()).ok();
                        }
                    }
                }
                if let Some(code) = library_code(item) {
                    return Some(code);
                }
            }
            None
        }
        _ => None,
    }
}

/// What one call of `<prefix>_presence_update` answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The node was alive (its heartbeat not expired) before the call.
    pub live: bool,
    pub online: u64,
    pub offline: u64,
    /// Housekeeping left over: call again soon.
    pub more: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Counts of changed users.
    Delta,
    /// Every user this node holds or held: its whole state.
    Rewrite,
    /// The node stops: its counts (all zero) and the end of its heartbeat.
    Leave,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Delta => "delta",
            Mode::Rewrite => "rewrite",
            Mode::Leave => "leave",
        }
    }
}

/// The fixed arguments of every update call.
pub struct Node<'a> {
    pub prefix: &'a str,
    pub id: &'a str,
    pub ttl: Duration,
    pub grace: Duration,
    /// "" when events are off.
    pub events: &'a str,
}

/// Writes `pairs` (user, absolute count on this node) in calls of
/// [`CHUNK`] users, all in one pipeline; at least one call (the
/// heartbeat). A server error in any call is returned as an error.
pub fn update<C: ConnectionLike>(
    conn: &mut C,
    node: &Node<'_>,
    mode: Mode,
    pairs: &[(&str, usize)],
) -> RedisResult<Vec<Outcome>> {
    let mut pipe = redis::pipe();
    let mut chunks: Vec<&[(&str, usize)]> = pairs.chunks(CHUNK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for chunk in &chunks {
        let cmd = pipe
            .cmd("FCALL")
            .arg(format!("{}_presence_update", node.prefix))
            .arg(0)
            .arg(node.id)
            .arg(node.ttl.as_millis().max(1) as u64)
            .arg(node.grace.as_millis() as u64)
            .arg(node.events)
            .arg(mode.as_str());
        for (u, n) in chunk.iter() {
            cmd.arg(*u).arg(*n);
        }
    }
    let replies: Vec<Value> = pipe.ignore_errors().query(conn)?;
    replies.into_iter().map(outcome).collect()
}

fn outcome(v: Value) -> RedisResult<Outcome> {
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    match v {
        Value::ServerError(e) => Err(RedisError::from(e)),
        Value::Array(a) if a.len() == 4 => {
            let n: Vec<i64> = a.iter().filter_map(int).collect();
            if n.len() != 4 {
                return Err(unexpected());
            }
            Ok(Outcome {
                live: n[0] == 1,
                online: n[1].max(0) as u64,
                offline: n[2].max(0) as u64,
                more: n[3] == 1,
            })
        }
        _ => Err(unexpected()),
    }
}

fn unexpected() -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply from the presence function",
    ))
}

/// Starts the presence thread on its own Redis connection.
pub fn spawn(
    target: RedisTarget,
    handle: Arc<Presence>,
    rx: Receiver<Box<str>>,
    ctx: Ctx,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("presence".into())
        .spawn(move || Writer::new(target, handle, rx, ctx).run())
}

struct Writer {
    target: RedisTarget,
    handle: Arc<Presence>,
    rx: Receiver<Box<str>>,
    ctx: Ctx,
    conn: Option<redis::Connection>,
    /// What Redis holds for this node, as far as this thread knows.
    sent: HashMap<Box<str>, usize>,
    pending: HashSet<Box<str>>,
    /// Rewrite the whole state on the next call.
    full: bool,
    more: bool,
    last_call: Option<Instant>,
    next_connect: Instant,
    backoff: Duration,
    /// A link worked since the last loss was logged.
    was_up: bool,
}

impl Writer {
    fn new(target: RedisTarget, handle: Arc<Presence>, rx: Receiver<Box<str>>, ctx: Ctx) -> Self {
        Writer {
            target,
            handle,
            rx,
            ctx,
            conn: None,
            sent: HashMap::new(),
            pending: HashSet::new(),
            full: true,
            more: false,
            last_call: None,
            next_connect: Instant::now(),
            backoff: BACKOFF_MIN,
            was_up: false,
        }
    }

    fn heartbeat(&self) -> Duration {
        self.ctx.config.canary_interval
    }

    fn run(mut self) {
        loop {
            let stopping = self.ctx.stop.load(Ordering::Acquire);
            if !stopping {
                self.wait();
            }
            self.take_queued();
            if self.conn.is_none() && !self.connect(stopping) {
                if stopping {
                    break;
                }
                continue;
            }
            let due = self
                .last_call
                .is_none_or(|t| t.elapsed() >= self.heartbeat());
            if stopping || due || self.full || self.more || !self.pending.is_empty() {
                let mode = if stopping {
                    Mode::Leave
                } else if self.full {
                    Mode::Rewrite
                } else {
                    Mode::Delta
                };
                let ok = self.call(mode);
                if stopping && (ok || self.conn.is_none()) {
                    break;
                }
            }
        }
        log::debug!("presence: stopped");
    }

    /// Blocks until a change comes, the heartbeat or a reconnect is due.
    fn wait(&mut self) {
        if self.more || (self.full && self.conn.is_some()) {
            return;
        }
        let now = Instant::now();
        let until = match (&self.conn, self.last_call) {
            (None, _) => self.next_connect,
            (Some(_), Some(t)) => t + self.heartbeat(),
            (Some(_), None) => now,
        };
        let left = until.saturating_duration_since(now).min(WAKE);
        if left.is_zero() {
            return;
        }
        match self.rx.recv_timeout(left) {
            Ok(u) => {
                self.pending.insert(u);
            }
            Err(RecvTimeoutError::Timeout) => {}
            // Every loop is gone: only the stop flag is left to wait for.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(left),
        }
    }

    fn take_queued(&mut self) {
        for u in self.rx.try_iter().take(MAX_BATCH) {
            self.pending.insert(u);
        }
        if self.handle.overflow.swap(false, Ordering::Relaxed) {
            self.full = true;
        }
    }

    fn connect(&mut self, stopping: bool) -> bool {
        if !stopping && Instant::now() < self.next_connect {
            return false;
        }
        // The master the subscriber proved (Sentinel: found again).
        let r = self
            .target
            .connect(CONNECT_TIMEOUT)
            .map(|c| c.conn)
            .map_err(redis::RedisError::from)
            .and_then(|c| {
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(c)
            })
            .and_then(|mut c| ensure_loaded(&mut c, &self.ctx.config).map(|_| c));
        match r {
            Ok(c) => {
                self.conn = Some(c);
                self.full = true;
                self.backoff = BACKOFF_MIN;
                true
            }
            Err(e) => {
                self.failed(&format!("connect: {e}"));
                false
            }
        }
    }

    fn failed(&mut self, why: &str) {
        self.ctx
            .metrics
            .presence_errors
            .fetch_add(1, Ordering::Relaxed);
        if std::mem::take(&mut self.was_up) {
            log::warn!(
                "presence: Redis lost ({why}); the node rewrites its presence once it is back"
            );
        } else {
            log::debug!("presence: {why}");
        }
        self.conn = None;
        self.full = true;
        self.next_connect = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// One batch: the pairs for `mode`, one pipeline. True when it worked.
    fn call(&mut self, mode: Mode) -> bool {
        let c = &self.ctx.config;
        let node_key = format!("{}:presence:node:{}", c.key_prefix, c.node_id);
        let users: Vec<Box<str>> = if mode == Mode::Delta {
            self.pending.drain().collect()
        } else {
            self.pending.clear();
            // Whatever Redis holds for this node id (a previous process
            // under the same id included), what we sent, what we hold.
            let Some(conn) = self.conn.as_mut() else {
                return false;
            };
            let held: Vec<String> = match redis::cmd("HKEYS").arg(&node_key).query(conn) {
                Ok(h) => h,
                Err(e) => {
                    self.failed(&format!("HKEYS: {e}"));
                    return false;
                }
            };
            let mut all: HashSet<Box<str>> = held.into_iter().map(String::into_boxed_str).collect();
            all.extend(self.sent.keys().cloned());
            all.extend(self.ctx.sessions.snapshot().into_iter().map(|(u, _)| u));
            all.into_iter().collect()
        };
        let counts = if mode == Mode::Leave {
            vec![0; users.len()]
        } else {
            self.ctx.sessions.counts(users.iter().map(|u| &**u))
        };
        let pairs: Vec<(&str, usize)> = users
            .iter()
            .zip(counts)
            .filter(|(u, n)| {
                mode != Mode::Delta || self.sent.get(&***u).copied().unwrap_or(0) != *n
            })
            .map(|(u, n)| (&**u, n))
            .collect();
        let node = Node {
            prefix: &c.key_prefix,
            id: &c.node_id,
            ttl: self.heartbeat() * 3,
            grace: c.offline_grace,
            events: c.events_channel.as_deref().unwrap_or(""),
        };
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        self.last_call = Some(Instant::now());
        let outcomes = match update(conn, &node, mode, &pairs) {
            Ok(o) => o,
            Err(e) => {
                if history::is_missing_function(&e) {
                    // Lost with Redis's data: load it, then rewrite.
                    if let Err(e) = ensure_loaded(conn, c) {
                        self.failed(&format!("load the function library: {e}"));
                        return false;
                    }
                    self.full = true;
                    self.more = true;
                    return false;
                }
                self.failed(&format!("update: {e}"));
                return false;
            }
        };
        if !self.was_up {
            self.was_up = true;
            log::info!(
                "presence: writing to Redis as node {} (heartbeat {:?}, expiry {:?})",
                c.node_id,
                self.heartbeat(),
                self.heartbeat() * 3
            );
        }
        let m = &self.ctx.metrics;
        m.presence_updates
            .fetch_add(pairs.len() as u64, Ordering::Relaxed);
        for (u, n) in &pairs {
            if *n == 0 {
                self.sent.remove(*u);
            } else {
                self.sent.insert((*u).into(), *n);
            }
        }
        if mode != Mode::Delta {
            self.full = false;
        }
        self.more = false;
        for (i, o) in outcomes.iter().enumerate() {
            m.events_online.fetch_add(o.online, Ordering::Relaxed);
            m.events_offline.fetch_add(o.offline, Ordering::Relaxed);
            self.more |= o.more;
            if i == 0 && !o.live && mode == Mode::Delta {
                // Reaped (cut off too long) or Redis lost its data.
                log::info!("presence: this node had dropped out of presence; rewriting its state");
                self.full = true;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::test_redis::TestRedis;

    fn node<'a>(id: &'a str, events: &'a str) -> Node<'a> {
        Node {
            prefix: "pushwire",
            id,
            ttl: Duration::from_millis(300),
            grace: Duration::from_millis(200),
            events,
        }
    }

    fn conn(r: &TestRedis) -> redis::Connection {
        let mut c = r.conn();
        let cfg = Config::default();
        ensure_loaded(&mut c, &cfg).unwrap();
        c
    }

    fn ask(c: &mut redis::Connection, user: Option<&str>) -> String {
        read(c, "pushwire", user).unwrap()
    }

    #[test]
    fn presence_counts_nodes_and_totals() {
        let r = TestRedis::start();
        let mut c = conn(&r);
        let (a, b) = (node("a", ""), node("b", ""));
        update(&mut c, &a, Mode::Rewrite, &[("42", 2), ("7", 1)]).unwrap();
        update(&mut c, &b, Mode::Rewrite, &[("42", 1)]).unwrap();
        assert_eq!(
            ask(&mut c, Some("42")),
            r#"{"userId":"42","connections":3,"nodes":2}"#
        );
        assert_eq!(
            ask(&mut c, None),
            r#"{"users":2,"connections":4,"nodes":2}"#
        );
        // Absolute counts: sending the same batch again changes nothing.
        update(&mut c, &a, Mode::Delta, &[("42", 2), ("7", 1)]).unwrap();
        assert_eq!(
            ask(&mut c, None),
            r#"{"users":2,"connections":4,"nodes":2}"#
        );
        update(&mut c, &a, Mode::Delta, &[("42", 0), ("7", 0)]).unwrap();
        update(&mut c, &b, Mode::Delta, &[("42", 0)]).unwrap();
        assert_eq!(
            ask(&mut c, Some("42")),
            r#"{"userId":"42","connections":0,"nodes":0}"#
        );
        assert_eq!(
            ask(&mut c, None),
            r#"{"users":0,"connections":0,"nodes":2}"#
        );
        assert_eq!(
            ask(&mut c, Some("no \"such\" user\n")),
            r#"{"userId":"no \"such\" user\n","connections":0,"nodes":0}"#
        );
        assert_eq!(
            user_json("no \"such\" user\n\u{1}", 0, 0),
            ask(&mut c, Some("no \"such\" user\n\u{1}"))
        );
        let huge = "x".repeat(300);
        assert!(matches!(
            read(&mut c, "pushwire", Some(&huge)),
            Err(ReadError::Redis(_))
        ));
    }

    #[test]
    fn presence_dead_node_drops_out_and_is_reaped_with_one_offline() {
        let r = TestRedis::start();
        let mut c = conn(&r);
        let mut sub = r.client().get_connection().unwrap();
        let mut ps = sub.as_pubsub();
        ps.subscribe("ev").unwrap();
        ps.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (a, b) = (node("a", "ev"), node("b", "ev"));
        let o = update(&mut c, &a, Mode::Delta, &[("42", 1)]).unwrap();
        assert_eq!(o[0].online, 1);
        let o = update(&mut c, &b, Mode::Delta, &[("42", 1), ("9", 1)]).unwrap();
        assert_eq!(o[0].online, 1, "9 online; 42 was already");
        // b stops beating; a keeps going.
        let until = Instant::now() + Duration::from_secs(3);
        let mut offline = 0;
        while Instant::now() < until {
            offline += update(&mut c, &a, Mode::Delta, &[]).unwrap()[0].offline;
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(offline, 1);
        assert_eq!(
            ask(&mut c, Some("42")),
            r#"{"userId":"42","connections":1,"nodes":1}"#
        );
        assert_eq!(
            ask(&mut c, None),
            r#"{"users":1,"connections":1,"nodes":1}"#
        );
        let mut events = Vec::new();
        while let Ok(m) = ps.get_message() {
            events.push(m.get_payload::<String>().unwrap());
        }
        assert_eq!(
            events,
            vec![
                r#"{"event":"online","userId":"42"}"#,
                r#"{"event":"online","userId":"9"}"#,
                r#"{"event":"offline","userId":"9"}"#,
            ]
        );
        // b comes back: told it was not alive, it rewrites.
        let o = update(&mut c, &b, Mode::Delta, &[("9", 1)]).unwrap();
        assert!(!o[0].live);
        assert_eq!(o[0].online, 1);
    }

    #[test]
    fn presence_reconnect_inside_the_grace_sends_nothing() {
        let r = TestRedis::start();
        let mut c = conn(&r);
        let (a, b) = (node("a", "ev"), node("b", "ev"));
        update(&mut c, &a, Mode::Rewrite, &[]).unwrap();
        update(&mut c, &b, Mode::Rewrite, &[]).unwrap();
        let o = update(&mut c, &a, Mode::Delta, &[("5", 1)]).unwrap()[0];
        assert_eq!((o.online, o.offline), (1, 0));
        update(&mut c, &a, Mode::Delta, &[("5", 0)]).unwrap();
        let o = update(&mut c, &b, Mode::Delta, &[("5", 1)]).unwrap()[0];
        assert_eq!((o.online, o.offline), (0, 0));
        std::thread::sleep(Duration::from_millis(300));
        let o = update(&mut c, &a, Mode::Delta, &[]).unwrap()[0];
        assert_eq!((o.online, o.offline), (0, 0));
    }

    #[test]
    fn presence_history_off_node_keeps_the_fleets_history_settings() {
        let r = TestRedis::start();
        let mut c = r.conn();
        let old = history::library_source("pushwire", 77, 600).replace(
            &format!("local VERSION = {}\n", history::LIBRARY_VERSION),
            "local VERSION = 1\n",
        );
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(old)
            .query::<String>(&mut c)
            .unwrap();
        assert_eq!(loaded_settings(&mut c, "pushwire"), Some((77, 600)));
        let cfg = Config {
            history_size: 0,
            ..Config::default()
        };
        ensure_loaded(&mut c, &cfg).unwrap();
        assert_eq!(loaded_settings(&mut c, "pushwire"), Some((77, 600)));
        let v: i64 = redis::cmd("FCALL_RO")
            .arg("pushwire_version")
            .arg(0)
            .query(&mut c)
            .unwrap();
        assert_eq!(v, history::LIBRARY_VERSION);
    }

    #[test]
    fn presence_leave_and_big_reap() {
        let r = TestRedis::start();
        let mut c = conn(&r);
        let (a, b) = (node("a", ""), node("b", ""));
        let users: Vec<String> = (0..5000).map(|i| format!("u{i}")).collect();
        let pairs: Vec<(&str, usize)> = users.iter().map(|u| (u.as_str(), 1)).collect();
        assert_eq!(update(&mut c, &b, Mode::Rewrite, &pairs).unwrap().len(), 5);
        assert_eq!(
            ask(&mut c, None),
            r#"{"users":5000,"connections":5000,"nodes":1}"#
        );
        // Leaving without zeros: reaped by the others, in budgeted steps.
        update(&mut c, &b, Mode::Leave, &[]).unwrap();
        let mut calls = 0;
        while {
            calls += 1;
            update(&mut c, &a, Mode::Delta, &[]).unwrap()[0].more
        } {}
        assert!(calls >= 2, "{calls}");
        assert_eq!(
            ask(&mut c, None),
            r#"{"users":0,"connections":0,"nodes":1}"#
        );
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("pushwire:presence:*")
            .query(&mut c)
            .unwrap();
        let mut keys = keys;
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "pushwire:presence:fresh",
                "pushwire:presence:nodes",
                "pushwire:presence:stats"
            ]
        );
    }

    /// The figures of the README: Redis memory per online user, and the
    /// latency of the per-user read with many users.
    /// `cargo test --release --lib presence_figures -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn presence_figures() {
        let r = TestRedis::start();
        let mut c = conn(&r);
        let used = |c: &mut redis::Connection| -> i64 {
            let info: String = redis::cmd("INFO").arg("memory").query(c).unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let before = used(&mut c);
        const USERS: usize = 100_000;
        let ids = ["node-a:8080", "node-b:8080", "node-c:8080"];
        let names: Vec<String> = (0..USERS).map(|i| format!("user-{i}")).collect();
        for (k, id) in ids.iter().enumerate() {
            // Each user on one node; every tenth on a second one too.
            let pairs: Vec<(&str, usize)> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 3 == k || (i % 10 == 0 && (i + 1) % 3 == k))
                .map(|(_, u)| (u.as_str(), 1))
                .collect();
            let n = Node {
                prefix: "pushwire",
                id,
                ttl: Duration::from_secs(60),
                grace: Duration::from_secs(5),
                events: "",
            };
            update(&mut c, &n, Mode::Rewrite, &pairs).unwrap();
        }
        let after = used(&mut c);
        println!(
            "presence memory: {} bytes per online user ({USERS} users, 3 nodes, 10% on two)",
            (after - before) / USERS as i64
        );
        let mut lat = Vec::new();
        for i in 0..20_000 {
            let u = &names[(i * 7919) % USERS];
            let t = Instant::now();
            read(&mut c, "pushwire", Some(u)).unwrap();
            lat.push(t.elapsed());
        }
        lat.sort();
        let t = Instant::now();
        for _ in 0..1000 {
            read(&mut c, "pushwire", None).unwrap();
        }
        println!(
            "FCALL_RO presence (user) over loopback: p50 {:?} p99 {:?} p99.9 {:?}; totals: {:?} each",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            lat[lat.len() * 999 / 1000],
            t.elapsed() / 1000
        );
    }
}
