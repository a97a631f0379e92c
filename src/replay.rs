//! Recovery reads off the event loops (SPEC section 8): one blocking thread
//! with its own Redis connection reads history for reconnecting clients, in
//! batches, so that a reconnect storm costs a few pipelined round trips
//! instead of one per client, and never stalls a loop.
//!
//! The loops ask with [`Replayer::try_request`] on a bounded channel; a full
//! channel is answered at once by the caller (`{"recovered":false}`). Every
//! accepted request gets exactly one [`Reply`] through the sink, which the
//! caller makes (typically: send it to the connection's loop and wake it).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use redis::{Connection, RedisError, RedisResult};

use crate::redis_target::RedisTarget;

use crate::history::{self, ClientId, History, Limit};

/// Requests read in one pipelined round trip.
pub const BATCH: usize = 64;
/// Requests waiting for the thread; beyond this, `try_request` refuses.
pub const QUEUE: usize = 4096;
/// How long a batch may take before the link is taken for dead.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Tries of one batch before its requests are answered with the error.
const ATTEMPTS: usize = 3;
/// How often an idle thread looks at the stop flag.
const TICK: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A request [`Replayer::try_request`] did not queue, handed back.
#[derive(Debug)]
pub enum Refused {
    Full(Request),
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The caller's own key (its connection id), handed back in the reply.
    pub token: u64,
    pub user: Box<str>,
    pub since: ClientId,
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub token: u64,
    /// `Err`: Redis is unreachable or failed; the caller treats it as
    /// missed (`{"recovered":false}`).
    pub result: RedisResult<History>,
}

/// [`QUEUE`]; debug builds take another size from
/// `PUSHWIRE_TEST_REPLAY_QUEUE`, so that the suite can fill the queue with
/// a few connections. Release builds have no such hook.
fn queue_size() -> usize {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var("PUSHWIRE_TEST_REPLAY_QUEUE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    QUEUE
}

pub struct Replayer {
    tx: Sender<Request>,
    batches: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Replayer {
    /// Starts the thread. It stops when `stop` is set or the `Replayer` is
    /// dropped, answering what is still queued with an error.
    pub fn spawn(
        target: RedisTarget,
        prefix: String,
        limit: Limit,
        stop: Arc<AtomicBool>,
        sink: impl Fn(Reply) + Send + 'static,
    ) -> io::Result<Replayer> {
        let (tx, rx) = crossbeam_channel::bounded(queue_size());
        let batches = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            batches: batches.clone(),
            target,
            prefix,
            limit,
            stop,
            rx,
            conn: None,
            backoff: BACKOFF_MIN,
            next_attempt: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("replayer".into())
            .spawn(move || worker.run(sink))?;
        Ok(Replayer {
            tx,
            batches,
            thread: Some(thread),
        })
    }

    /// Queues a request, or hands it back: when the queue is full (keep it
    /// and ask again once replies have come back), or when the thread has
    /// stopped (then answer `{"recovered":false}`).
    pub fn try_request(&self, r: Request) -> Result<(), Refused> {
        self.tx.try_send(r).map_err(|e| match e {
            TrySendError::Full(r) => Refused::Full(r),
            TrySendError::Disconnected(_) => Refused::Stopped,
        })
    }

    /// Requests waiting (for metrics).
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Round trips made so far, one per batch (for metrics).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Waits for the thread to end (set the stop flag first).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    batches: Arc<AtomicU64>,
    /// Connections go to the master the subscriber proved.
    target: RedisTarget,
    prefix: String,
    limit: Limit,
    stop: Arc<AtomicBool>,
    rx: Receiver<Request>,
    /// With the target's epoch it was opened in: one from before the
    /// subscriber's last lost link goes to a master it left, and is closed.
    conn: Option<(Connection, u64)>,
    backoff: Duration,
    /// No connect before this: while Redis is down, requests are answered
    /// with an error at once instead of each waiting for a connect.
    next_attempt: Instant,
}

impl Worker {
    fn run(mut self, sink: impl Fn(Reply)) {
        let mut batch: Vec<Request> = Vec::with_capacity(BATCH);
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            match self.rx.recv_timeout(TICK) {
                Ok(r) => batch.push(r),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            batch.extend(self.rx.try_iter().take(BATCH - 1));
            match self.read(&batch) {
                Ok(results) => {
                    for (r, result) in batch.drain(..).zip(results) {
                        sink(Reply {
                            token: r.token,
                            result,
                        });
                    }
                }
                Err(e) => {
                    for r in batch.drain(..) {
                        sink(Reply {
                            token: r.token,
                            result: Err(e.clone()),
                        });
                    }
                }
            }
        }
        // Stopping: nobody is left waiting.
        let stopped = RedisError::from((redis::ErrorKind::Io, "replayer stopped"));
        for r in self.rx.try_iter() {
            sink(Reply {
                token: r.token,
                result: Err(stopped.clone()),
            });
        }
        log::debug!("replayer stopped");
    }

    /// Reads a batch, trying again on a fresh connection when a link
    /// change broke it: history reads are idempotent, and a recovery that
    /// fails only because the replayer's connection went stale (a failover,
    /// a Redis restart) would tell clients `recovered:false` for nothing.
    /// Gives up after [`ATTEMPTS`] tries (waiting out the backoff between
    /// them), so a Redis that is really gone still gets an answer out.
    fn read(&mut self, batch: &[Request]) -> RedisResult<Vec<RedisResult<History>>> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            while Instant::now() < self.next_attempt && !self.stop.load(Ordering::Acquire) {
                std::thread::sleep(TICK.min(self.next_attempt - Instant::now()));
            }
            match self.read_once(batch) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| RedisError::from((redis::ErrorKind::Io, "no attempt"))))
    }

    fn read_once(&mut self, batch: &[Request]) -> RedisResult<Vec<RedisResult<History>>> {
        self.connect()?;
        let Some((conn, _)) = self.conn.as_mut() else {
            return Err(RedisError::from((redis::ErrorKind::Io, "no connection")));
        };
        let requests: Vec<(&str, &ClientId)> = batch.iter().map(|r| (&*r.user, &r.since)).collect();
        self.batches.fetch_add(1, Ordering::Relaxed);
        match history::read_histories(conn, &self.prefix, &requests, self.limit) {
            Ok(v) => {
                self.backoff = BACKOFF_MIN;
                Ok(v)
            }
            Err(e) => {
                // The reply stream may be out of step now: start afresh.
                log::warn!("replayer: history read failed, reconnecting: {e}");
                self.conn = None;
                self.failed();
                Err(e)
            }
        }
    }

    fn connect(&mut self) -> RedisResult<()> {
        if self
            .conn
            .as_ref()
            .is_some_and(|(_, epoch)| !self.target.is_current(*epoch))
        {
            log::debug!("replayer: the subscriber lost its link: reconnecting");
            self.conn = None;
        }
        if self.conn.is_none() {
            if Instant::now() < self.next_attempt {
                return Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "redis unavailable (waiting to reconnect)",
                )));
            }
            let c = self
                .target
                .connect(CONNECT_TIMEOUT)
                .map_err(RedisError::from)
                .and_then(|c| {
                    c.conn.set_read_timeout(Some(READ_TIMEOUT))?;
                    c.conn.set_write_timeout(Some(READ_TIMEOUT))?;
                    Ok(c)
                });
            match c {
                Ok(c) => {
                    log::debug!("replayer: connected to redis at {}", c.master);
                    self.conn = Some((c.conn, c.epoch));
                }
                Err(e) => {
                    log::warn!("replayer: cannot connect to redis: {e}");
                    self.failed();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Backoff with jitter, capped.
    fn failed(&mut self) {
        let nanos = Instant::now().elapsed().as_nanos() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64);
        let jitter = self.backoff.mul_f64(0.5 * (nanos % 1000) as f64 / 1000.0);
        self.next_attempt = Instant::now() + self.backoff / 2 + jitter;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::test_redis::TestRedis;
    use crate::history::{ensure_library, publish};
    use std::collections::HashMap;
    use std::sync::Mutex;

    fn collector() -> (Arc<Mutex<Vec<Reply>>>, impl Fn(Reply) + Send + 'static) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        (got, move |r| g.lock().unwrap().push(r))
    }

    fn wait_for(got: &Mutex<Vec<Reply>>, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} replies",
                got.lock().unwrap().len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn replay_history_serves_a_thousand_requests_in_batches() {
        let r = TestRedis::start();
        let mut c = r.conn();
        ensure_library(&mut c, "pushwire", 100, 300).unwrap();
        let mut ids = Vec::new();
        for u in 0..10 {
            for n in 0..3 {
                let p = publish(
                    &mut c,
                    "pushwire",
                    format!(r#"{{"userId":"u{u}","n":{n}}}"#).as_bytes(),
                )
                .unwrap();
                ids.push(ClientId::parse(&p.id).unwrap());
            }
        }
        let first = ids[0].clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (got, sink) = collector();
        let limit = Limit {
            entries: 200,
            bytes: 0,
        };
        let target = RedisTarget::parse(&r.url()).unwrap();
        let rp = Replayer::spawn(target, "pushwire".into(), limit, stop.clone(), sink).unwrap();
        let mut refused = 0;
        let mut sent = Vec::new();
        for token in 0..1000u64 {
            let req = Request {
                token,
                user: format!("u{}", token % 10).into(),
                since: first.clone(),
            };
            match rp.try_request(req) {
                Ok(()) => sent.push(token),
                Err(_) => refused += 1,
            }
        }
        assert_eq!(refused, 0, "the queue holds {QUEUE}");
        wait_for(&got, sent.len());
        std::thread::sleep(Duration::from_millis(200));
        let got = std::mem::take(&mut *got.lock().unwrap());
        assert_eq!(got.len(), 1000, "every token answered once");
        let batches = rp.batches();
        assert!(
            (1000 / BATCH as u64..=250).contains(&batches),
            "{batches} round trips"
        );
        let mut seen = HashMap::new();
        for reply in got {
            assert!(
                seen.insert(reply.token, ()).is_none(),
                "token {} twice",
                reply.token
            );
            let History::Recovered(rec) = reply.result.unwrap() else {
                panic!("missed")
            };
            let u = reply.token % 10;
            let want = if u == 0 { 2 } else { 3 };
            assert_eq!(rec.entries.len(), want, "token {}", reply.token);
            assert_eq!(rec.last, ids.last().unwrap().id);
        }
        stop.store(true, Ordering::Release);
        rp.join();
    }

    #[test]
    fn replay_history_answers_errors_when_redis_is_down_and_recovers() {
        let r = TestRedis::start();
        let port = r.port;
        let client = RedisTarget::parse(&r.url()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (got, sink) = collector();
        let limit = Limit {
            entries: 200,
            bytes: 0,
        };
        let rp = Replayer::spawn(client, "pushwire".into(), limit, stop.clone(), sink).unwrap();
        let since = ClientId::parse("abc:1-0").unwrap();
        let req = |token| Request {
            token,
            user: "42".into(),
            since: since.clone(),
        };
        // No library loaded: an error for that request, not a hang.
        rp.try_request(req(1)).unwrap();
        wait_for(&got, 1);
        assert!(got.lock().unwrap()[0].result.is_err());
        ensure_library(&mut r.conn(), "pushwire", 100, 300).unwrap();
        rp.try_request(req(2)).unwrap();
        wait_for(&got, 2);
        assert_eq!(
            got.lock().unwrap()[1].result.as_ref().unwrap(),
            &History::Missed
        );
        drop(r); // Redis goes away.
        for t in 3..13 {
            rp.try_request(req(t)).unwrap();
        }
        wait_for(&got, 12);
        assert!(got.lock().unwrap()[2..].iter().all(|r| r.result.is_err()));
        // Back on the same port (without the library: loaded again, as the
        // subscriber does on reconnect): served again after the backoff.
        let r2 = TestRedis::start_on(port);
        ensure_library(&mut r2.conn(), "pushwire", 100, 300).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut token = 100;
        loop {
            let n = got.lock().unwrap().len();
            rp.try_request(req(token)).unwrap();
            token += 1;
            wait_for(&got, n + 1);
            let ok = matches!(
                got.lock().unwrap().last().unwrap().result,
                Ok(History::Missed)
            );
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "never reconnected");
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Release);
        rp.join();
    }
}
