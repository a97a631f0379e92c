//! Durable notices under faults (SPEC section 8, with the losses of
//! section 6): the seam between a replay and the live stream under a
//! steady publish rate over many reconnects, user, `userIds` and broadcast
//! notices merged by id in a replay, the cases history cannot prove
//! (`{"recovered":false}`), Redis paused or its pub/sub clients killed
//! while notices keep coming, a node killed under its client, and a huge
//! gap that must not turn into a huge replay.
//!
//! Every notice a test publishes carries a number `"n"`; the checks work on
//! the ids and numbers a client saw over all its connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

const USER: &str = "42";
const HISTORY_KEY: &str = "pushwire:history:42";

/// One text frame a `since` client got, parsed.
#[derive(Debug, Clone, PartialEq)]
enum Frame {
    /// `{"id":..,"notice":..}`: the id and the notice's number (`None`
    /// when it has none).
    Durable { id: String, n: Option<u64> },
    /// `{"recovered":..}` (with `replayed` when true).
    Status {
        recovered: bool,
        replayed: Option<u64>,
    },
    /// Anything else (a wrapped plain PUBLISH, a resync text).
    Other(String),
}

fn parse(text: &str) -> Frame {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Frame::Other(text.to_string());
    };
    if let (Some(r), None) = (v.get("recovered").and_then(Value::as_bool), v.get("notice")) {
        return Frame::Status {
            recovered: r,
            replayed: v.get("replayed").and_then(Value::as_u64),
        };
    }
    if let (Some(id), Some(notice)) = (v.get("id").and_then(Value::as_str), v.get("notice")) {
        return Frame::Durable {
            id: id.to_string(),
            n: notice.get("n").and_then(Value::as_u64),
        };
    }
    Frame::Other(text.to_string())
}

/// An id's order: `<epoch>:<ms>-<seq>`.
fn id_key(id: &str) -> (String, u64, u64) {
    let (epoch, rest) = id
        .split_once(':')
        .unwrap_or_else(|| panic!("id {id:?}: no epoch"));
    let (ms, seq) = rest
        .split_once('-')
        .unwrap_or_else(|| panic!("id {id:?}: no seq"));
    (
        epoch.to_string(),
        ms.parse().unwrap_or_else(|_| panic!("id {id:?}: ms")),
        seq.parse().unwrap_or_else(|_| panic!("id {id:?}: seq")),
    )
}

fn id_less(a: &str, b: &str) -> bool {
    let (ea, ma, sa) = id_key(a);
    let (eb, mb, sb) = id_key(b);
    ea == eb && (ma, sa) < (mb, sb)
}

fn connect_since(node: &Node, since: &str) -> Client {
    let url = node.url(&format!("/ws?token={}&since={since}", token(USER, None)));
    Client::connect(&url).unwrap_or_else(|r| panic!("upgrade with since={since:?}: {r:?}"))
}

fn numbered(n: u64) -> String {
    format!(r#"{{"userId":"42","n":{n}}}"#)
}

fn fcall(conn: &mut redis::Connection, notice: &str) -> redis::RedisResult<String> {
    redis::cmd("FCALL")
        .arg("pushwire_publish")
        .arg(0)
        .arg(notice)
        .query(conn)
}

/// A durable publish that must work; returns the id.
#[track_caller]
fn publish_ok(redis: &Redis, notice: &str) -> String {
    fcall(&mut redis.conn(), notice).unwrap_or_else(|e| panic!("FCALL {notice}: {e}"))
}

/// `{"id":"<id>","notice":<notice>}`, as the client must get it.
fn envelope(id: &str, notice: &str) -> String {
    format!(r#"{{"id":"{id}","notice":{notice}}}"#)
}

/// Reads frames until the status frame; returns the durable frames before
/// it and the status. Fails on anything else or a timeout.
#[track_caller]
fn read_until_status(c: &mut Client, timeout: Duration) -> (Vec<(String, Option<u64>)>, Frame) {
    let until = Instant::now() + timeout;
    let mut replay = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let Some(t) = c.recv_text(left) else {
            panic!(
                "no status frame within {timeout:?}; {} durable frames before the timeout",
                replay.len()
            );
        };
        match parse(&t) {
            Frame::Durable { id, n } => replay.push((id, n)),
            s @ Frame::Status { .. } => return (replay, s),
            Frame::Other(o) => panic!("unexpected frame before the status frame: {o}"),
        }
    }
}

/// What the publisher thread did with one number.
#[derive(Debug, Clone)]
struct Published {
    n: u64,
    /// The id Redis answered; `None`: the FCALL failed (it may still have
    /// run, later: a paused Redis executes what it buffered).
    id: Option<String>,
    at: Duration,
}

const KILL_BURST: u64 = 20;

/// A thread publishing numbered durable notices for user 42 at a steady
/// rate. After a failed FCALL it publishes nothing until a PING on a new
/// connection answers, so at most one notice per outage is in doubt.
struct Publisher {
    stop: Arc<AtomicBool>,
    /// Set: the next tick sends `CLIENT KILL TYPE pubsub` and then
    /// [`KILL_BURST`] FCALLs in one pipeline, so that Redis runs them
    /// before any node can subscribe again.
    kill: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Published>>,
    log: Arc<Mutex<Vec<Published>>>,
}

impl Publisher {
    fn start(redis: &Redis, every: Duration, t0: Instant) -> Publisher {
        let url = redis.url();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let kill = Arc::new(AtomicBool::new(false));
        let (flag, sink, kill_now) = (stop.clone(), log.clone(), kill.clone());
        let handle = std::thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let io = Duration::from_millis(300);
            let open = || -> Option<redis::Connection> {
                let c = client.get_connection_with_timeout(io).ok()?;
                c.set_read_timeout(Some(io)).ok()?;
                c.set_write_timeout(Some(io)).ok()?;
                Some(c)
            };
            let mut conn = open();
            let mut probing = false;
            let mut n = 0u64;
            let start = Instant::now();
            let mut tick = 0u32;
            while !flag.load(Ordering::Relaxed) {
                tick += 1;
                if conn.is_none() {
                    conn = open();
                }
                if probing {
                    let ok = conn
                        .as_mut()
                        .is_some_and(|c| redis::cmd("PING").query::<String>(c).is_ok());
                    if ok {
                        probing = false;
                        eprintln!("[{:?}] publisher: Redis answers again", t0.elapsed());
                    } else {
                        conn = None;
                    }
                } else if let Some(c) = conn
                    .as_mut()
                    .filter(|_| kill_now.swap(false, Ordering::Relaxed))
                {
                    let mut pipe = redis::pipe();
                    pipe.cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub");
                    for k in 0..KILL_BURST {
                        pipe.cmd("FCALL")
                            .arg("pushwire_publish")
                            .arg(0)
                            .arg(numbered(n + k));
                    }
                    let mut r = pipe
                        .query::<Vec<redis::Value>>(c)
                        .expect("kill and burst")
                        .into_iter();
                    let killed: i64 = redis::from_redis_value(r.next().unwrap()).unwrap();
                    eprintln!(
                        "[{:?}] publisher: CLIENT KILL TYPE pubsub killed {killed}, then {KILL_BURST} FCALLs",
                        t0.elapsed()
                    );
                    let mut sink = sink.lock().unwrap();
                    for v in r {
                        sink.push(Published {
                            n,
                            id: Some(redis::from_redis_value(v).unwrap()),
                            at: t0.elapsed(),
                        });
                        n += 1;
                    }
                } else if let Some(c) = conn.as_mut() {
                    let notice = numbered(n);
                    let r = fcall(c, &notice);
                    let p = Published {
                        n,
                        id: r.as_ref().ok().cloned(),
                        at: t0.elapsed(),
                    };
                    if let Err(e) = r {
                        eprintln!("[{:?}] publisher: n={n} failed: {e}", t0.elapsed());
                        conn = None;
                        probing = true;
                    }
                    sink.lock().unwrap().push(p);
                    n += 1;
                }
                let next = start + every * tick;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            sink.lock().unwrap().clone()
        });
        Publisher {
            stop,
            kill,
            handle,
            log,
        }
    }

    fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn finish(self) -> Vec<Published> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("publisher thread")
    }
}

/// Checks what a client saw against what was published: ids strictly
/// increasing, numbers strictly increasing, no number twice, each number
/// with the id its FCALL answered, every successfully published number
/// from the first seen on present, and numbers not acknowledged only
/// where an FCALL failed. `contiguous`: also no number skipped at all.
fn check_sequence(seen: &[(String, Option<u64>)], published: &[Published], contiguous: bool) {
    let by_n: HashMap<u64, &Published> = published.iter().map(|p| (p.n, p)).collect();
    let mut problems = Vec::new();
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for (i, (id, n)) in seen.iter().enumerate() {
        let Some(n) = *n else {
            problems.push(format!("#{i} {id}: a notice without a number"));
            continue;
        };
        *counts.entry(n).or_default() += 1;
        match by_n.get(&n) {
            None => problems.push(format!("#{i} n={n} {id}: never published")),
            Some(Published { id: Some(pid), .. }) if pid != id => {
                problems.push(format!("#{i} n={n}: id {id}, but FCALL answered {pid}"))
            }
            _ => {}
        }
        if i > 0 {
            let (pid, pn) = &seen[i - 1];
            if !id_less(pid, id) {
                problems.push(format!("#{i} n={n} {id}: id not after #{} {pid}", i - 1));
            }
            if let Some(pn) = pn {
                if n <= *pn {
                    problems.push(format!("#{i} n={n}: number not after n={pn}"));
                } else if contiguous && n != pn + 1 {
                    problems.push(format!("#{i}: gap from n={pn} to n={n}"));
                }
            }
        }
    }
    for (n, k) in &counts {
        if *k > 1 {
            problems.push(format!("n={n} seen {k} times"));
        }
    }
    let first = seen.iter().find_map(|(_, n)| *n).unwrap_or(0);
    let missing: Vec<u64> = published
        .iter()
        .filter(|p| p.id.is_some() && p.n >= first && !counts.contains_key(&p.n))
        .map(|p| p.n)
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "{} successfully published notices never arrived: {:?}",
            missing.len(),
            &missing[..missing.len().min(40)]
        ));
    }
    problems.sort();
    assert!(
        problems.is_empty(),
        "{} problems in the sequence of {} notices seen (published {}):\n{}",
        problems.len(),
        seen.len(),
        published.len(),
        problems[..problems.len().min(40)].join("\n")
    );
}

/// The seam under a steady rate: a publisher every 5 ms for 4 s, a client
/// that reads a random short while, goes away, comes back with its last
/// id, over and over. Over all its connections it sees every number once,
/// in order, and every reconnect says recovered:true.
#[test]
fn durable_seam_under_a_steady_rate_over_many_reconnects() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &["--history-size", "5000"]);
    let t0 = Instant::now();
    let publisher = Publisher::start(&redis, Duration::from_millis(5), t0);
    let mut seen: Vec<(String, Option<u64>)> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };

    // The first connection: empty since, live only, no status frame.
    let mut c = connect_since(&node, "");
    let t = c.recv_text(T).expect("a first live notice");
    match parse(&t) {
        Frame::Durable { id, n } => seen.push((id, n)),
        other => panic!("first connection (empty since): unexpected {other:?}"),
    }
    let mut cycles = 0;
    let mut replays = Vec::new();
    let mut latencies = Vec::new();
    let read_live = |c: &mut Client, d: Duration, seen: &mut Vec<(String, Option<u64>)>| {
        let until = Instant::now() + d;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match c.recv(left) {
                Recv::Text(t) => match parse(&t) {
                    Frame::Durable { id, n } => seen.push((id, n)),
                    other => panic!("live stream: unexpected {other:?}"),
                },
                Recv::Timeout => return,
                other => panic!("live stream ended: {other:?}"),
            }
        }
    };
    loop {
        read_live(&mut c, Duration::from_millis(10 + rand(240)), &mut seen);
        // Away: a close frame or just the TCP connection dropped.
        if rand(2) == 0 {
            let _ = c.ws.close(None);
            let _ = c.ws.flush();
        }
        drop(c);
        if t0.elapsed() >= Duration::from_secs(4) {
            break;
        }
        std::thread::sleep(Duration::from_millis(rand(60)));
        let last = seen.last().unwrap().0.clone();
        let asked = Instant::now();
        c = connect_since(&node, &last);
        let (replay, status) = read_until_status(&mut c, T);
        latencies.push(asked.elapsed());
        assert_eq!(
            status,
            Frame::Status {
                recovered: true,
                replayed: Some(replay.len() as u64)
            },
            "reconnect {cycles} with since={last} at {:?}",
            t0.elapsed()
        );
        replays.push(replay.len());
        seen.extend(replay);
        cycles += 1;
    }
    // A few more while the client is away, then the publisher stops.
    let more = publisher.count() + 10;
    assert!(wait_until(T, || publisher.count() >= more));
    let published = publisher.finish();
    let last_n = published.last().unwrap().n;
    assert!(published.iter().all(|p| p.id.is_some()), "FCALL failed");
    // One final reconnect after the publisher stopped.
    let last = seen.last().unwrap().0.clone();
    let mut c = connect_since(&node, &last);
    let (replay, status) = read_until_status(&mut c, T);
    assert_eq!(
        status,
        Frame::Status {
            recovered: true,
            replayed: Some(replay.len() as u64)
        },
        "final reconnect since={last}"
    );
    eprintln!(
        "final reconnect: replayed {}; before it the client had n={:?}",
        replay.len(),
        seen.last().unwrap().1
    );
    seen.extend(replay);
    if seen.last().unwrap().1 != Some(last_n) {
        read_live(&mut c, T, &mut seen);
    }
    c.expect_nothing(Duration::from_millis(300));
    eprintln!(
        "seam: {} published over {:?} (every 5 ms), {cycles} reconnects, replayed per reconnect {replays:?}, \
         reconnect to status frame: min {:?} max {:?}; client saw n={:?}..={:?} ({} notices)",
        published.len(),
        published.last().unwrap().at,
        latencies.iter().min(),
        latencies.iter().max(),
        seen.first().unwrap().1,
        seen.last().unwrap().1,
        seen.len()
    );
    assert!(cycles >= 10, "only {cycles} reconnect cycles in 4 s");
    assert_eq!(
        seen.last().unwrap().1,
        Some(last_n),
        "the last published notice"
    );
    check_sequence(&seen, &published, true);
    assert_eq!(
        node.metric(r#"pushwire_recoveries_total{result="recovered"}"#),
        (cycles + 1) as f64
    );
}

/// A user's notices, a `userIds` naming it, and a broadcast, all published
/// while its client is away, come back merged in id order, byte for byte.
#[test]
fn durable_replay_merges_user_user_ids_and_broadcast_by_id() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let mut c = connect_since(&node, "");
    let first = numbered(0);
    let id0 = publish_ok(&redis, &first);
    assert_eq!(
        c.recv_text(T).as_deref(),
        Some(envelope(&id0, &first).as_str())
    );
    drop(c);

    let away = [
        r#"{"userId":"42","n":1}"#.to_string(),
        r#"{"userIds":[42,"7"],"n":2}"#.to_string(),
        r#"{"broadcast":true,"n":3}"#.to_string(),
        r#"{"userId":42,"n":4}"#.to_string(),
    ];
    let mut ids = Vec::new();
    for (i, n) in away.iter().enumerate() {
        // One through POST /publish, the rest through FCALL.
        let id = if i == 2 {
            let (st, body) = node.publish(n);
            assert_eq!(st, 202, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()["id"]
                .as_str()
                .unwrap_or_else(|| panic!("no id in {body}"))
                .to_string()
        } else {
            publish_ok(&redis, n)
        };
        ids.push(id);
        // Another user's notice between them: not replayed to 42.
        publish_ok(&redis, r#"{"userId":"7","n":99}"#);
    }
    let mut c = connect_since(&node, &id0);
    for (id, n) in ids.iter().zip(&away) {
        assert_eq!(
            c.recv_text(T).as_deref(),
            Some(envelope(id, n).as_str()),
            "replayed in id order, byte for byte"
        );
    }
    assert_eq!(
        c.recv_text(T).as_deref(),
        Some(r#"{"recovered":true,"replayed":4}"#)
    );
    c.expect_nothing(Duration::from_millis(300));
    // Live ones follow on the same connection.
    let live = numbered(5);
    let id5 = publish_ok(&redis, &live);
    assert_eq!(
        c.recv_text(T).as_deref(),
        Some(envelope(&id5, &live).as_str())
    );
}

/// A client of 42 on `node` that saw one durable notice; returns its id.
fn one_seen(redis: &Redis, node: &Node) -> String {
    let mut c = connect_since(node, "");
    let n = numbered(0);
    let id = publish_ok(redis, &n);
    assert_eq!(c.recv_text(T).as_deref(), Some(envelope(&id, &n).as_str()));
    id
}

/// Reconnects with `since`: the first frame is `{"recovered":false}` (no
/// replayed entry before it), then the connection is live.
#[track_caller]
fn assert_missed(redis: &Redis, node: &Node, since: &str, case: &str) {
    let asked = Instant::now();
    let mut c = connect_since(node, since);
    let first = c.recv_text(T);
    eprintln!("{case}: first frame after {:?}: {first:?}", asked.elapsed());
    assert_eq!(
        first.as_deref(),
        Some(r#"{"recovered":false}"#),
        "{case}: since={since}"
    );
    let live = numbered(1000);
    let id = fcall_when_ready(redis, &live);
    assert_eq!(
        c.recv_text(T).as_deref(),
        Some(envelope(&id, &live).as_str()),
        "{case}: live after the status frame"
    );
    c.expect_nothing(Duration::from_millis(200));
}

/// FCALL, retried while the node (re)loads the library after a restart.
fn fcall_when_ready(redis: &Redis, notice: &str) -> String {
    let mut id = None;
    assert!(
        wait_until(T, || {
            id = fcall(&mut redis.conn(), notice).ok();
            id.is_some()
        }),
        "FCALL never worked"
    );
    id.unwrap()
}

/// FCALLs `count` numbered notices for 42 over one pipelined connection.
fn publish_many(redis: &Redis, from: u64, count: u64) {
    let mut con = redis.conn();
    let mut pipe = redis::pipe();
    for n in from..from + count {
        pipe.cmd("FCALL")
            .arg("pushwire_publish")
            .arg(0)
            .arg(numbered(n))
            .ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
}

#[test]
fn durable_missed_when_trimmed_past_since() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &["--history-size", "5"]);
    let id0 = one_seen(&redis, &node);
    publish_many(&redis, 1, 300);
    node.wait_received(301, T);
    let len = redis.cmd(&["XLEN", HISTORY_KEY]).unwrap();
    eprintln!("history-size 5, 300 published: XLEN {}", len.trim());
    assert_missed(&redis, &node, &id0, "trimmed");
    assert_eq!(node.metric("pushwire_replayed_notices_total"), 0.0);
}

#[test]
fn durable_missed_when_history_expired() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &["--history-ttl", "1"]);
    let id0 = one_seen(&redis, &node);
    let t = Instant::now();
    publish_ok(&redis, &numbered(1));
    assert!(
        wait_until(Duration::from_secs(10), || redis
            .cmd(&["EXISTS", HISTORY_KEY])
            .is_ok_and(|r| r.trim() == "0")),
        "the history stream did not expire"
    );
    eprintln!(
        "history-ttl 1: stream gone {:?} after the last publish",
        t.elapsed()
    );
    assert_missed(&redis, &node, &id0, "expired");
}

#[test]
fn durable_missed_after_flushall() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let id0 = one_seen(&redis, &node);
    redis.cmd(&["FLUSHALL"]).unwrap();
    // Nothing published since the FLUSHALL: still not "nothing missed".
    assert_missed(&redis, &node, &id0, "flushall, nothing after");
    // Published after it (a new epoch), and the old id again, once the
    // node has it (see the restart test).
    let received = node.metric("pushwire_notices_received_total");
    let id_new = publish_ok(&redis, &numbered(2));
    assert!(node.wait_metric("pushwire_notices_received_total", T, |v| v > received));
    eprintln!("before FLUSHALL {id0}, after {id_new}");
    assert_ne!(id_key(&id0).0, id_key(&id_new).0, "a new epoch");
    assert_missed(&redis, &node, &id0, "flushall, published after");
}

#[test]
fn durable_missed_after_redis_restart_without_persistence() {
    let _w = watchdog(40);
    let mut redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let id0 = one_seen(&redis, &node);
    let t = Instant::now();
    redis.restart();
    assert!(node.wait_ready(Duration::from_secs(15)), "ready again");
    eprintln!("redis restarted: node ready after {:?}", t.elapsed());
    assert_missed(&redis, &node, &id0, "restart, nothing after");
    let received = node.metric("pushwire_notices_received_total");
    fcall_when_ready(&redis, &numbered(2));
    // The node has it before the client comes (else it may follow the
    // status frame as a live notice, which is allowed but not this test).
    assert!(node.wait_metric("pushwire_notices_received_total", T, |v| v > received));
    assert_missed(&redis, &node, &id0, "restart, published after");
}

enum Fault {
    /// SIGSTOP of redis-server for this long, then SIGCONT.
    Pause(Duration),
    /// `CLIENT KILL TYPE pubsub`, and a burst of notices published in the
    /// same pipeline, before the node can be subscribed again.
    KillPubsub,
}

/// A thread reading a client into a shared list until told to stop.
struct Reader {
    frames: Arc<Mutex<Vec<(Duration, String)>>>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Reader {
    fn start(mut c: Client, t0: Instant) -> Reader {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, flag) = (frames.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match c.recv(Duration::from_millis(100)) {
                    Recv::Text(t) => sink.lock().unwrap().push((t0.elapsed(), t)),
                    Recv::Timeout => {}
                    other => {
                        sink.lock()
                            .unwrap()
                            .push((t0.elapsed(), format!("ENDED {other:?}")));
                        return;
                    }
                }
            }
        });
        Reader {
            frames,
            stop,
            handle,
        }
    }

    fn has(&self, f: impl Fn(&str) -> bool) -> bool {
        self.frames.lock().unwrap().iter().any(|(_, t)| f(t))
    }

    fn finish(self) -> Vec<(Duration, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("reader thread");
        self.frames.lock().unwrap().clone()
    }
}

fn subscription_loss(fault: Fault, name: &str) {
    let redis = Redis::start();
    let node = Node::with_redis(
        &redis,
        &["--history-size", "5000", "--resync-notice", "RESYNC"],
    );
    let since = connect_since(&node, "");
    let plain = node.connect(USER);
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 2.0));
    let t0 = Instant::now();
    let rs = Reader::start(since, t0);
    let rp = Reader::start(plain, t0);
    let publisher = Publisher::start(&redis, Duration::from_millis(10), t0);
    assert!(
        wait_until(T, || publisher.count() >= 50),
        "the publisher is publishing"
    );
    let fault_at = t0.elapsed();
    match fault {
        Fault::Pause(d) => {
            redis.signal(libc::SIGSTOP);
            std::thread::sleep(d);
            redis.signal(libc::SIGCONT);
            eprintln!(
                "[{:?}] {name}: SIGSTOP at {fault_at:?}, SIGCONT now",
                t0.elapsed()
            );
        }
        Fault::KillPubsub => publisher.kill.store(true, Ordering::Relaxed),
    }
    let reconnected = wait_until(Duration::from_secs(15), || {
        node.metric("pushwire_redis_reconnects_total") >= 1.0
    });
    let reconnected_at = t0.elapsed();
    let got_status = wait_until(T, || rs.has(|t| t.contains("recovered")));
    let got_resync = wait_until(T, || rp.has(|t| t == "RESYNC"));
    eprintln!(
        "[{:?}] {name}: reconnected {reconnected} ({reconnected_at:?}), status frame {got_status}, plain RESYNC {got_resync}",
        t0.elapsed()
    );
    // Keep publishing a while after the recovery.
    let after = publisher.count() + 50;
    assert!(wait_until(T, || publisher.count() >= after));
    let published = publisher.finish();
    let last_ok = published
        .iter()
        .rev()
        .find_map(|p| p.id.clone())
        .expect("something published");
    let arrived = wait_until(T, || rs.has(|t| t.contains(&format!("\"{last_ok}\""))));
    let since_frames = rs.finish();
    let plain_frames = rp.finish();
    let failed: Vec<&Published> = published.iter().filter(|p| p.id.is_none()).collect();
    eprintln!(
        "{name}: published {} ({} failed: {:?}), since client got {} frames, plain {} frames",
        published.len(),
        failed.len(),
        failed.iter().map(|p| (p.n, p.at)).collect::<Vec<_>>(),
        since_frames.len(),
        plain_frames.len()
    );
    for (at, t) in since_frames.iter().chain(&plain_frames) {
        if !t.starts_with(r#"{"id""#) && !t.starts_with(r#"{"userId""#) {
            eprintln!("{name}: [{at:?}] {t}");
        }
    }
    assert!(
        reconnected,
        "{name}: the node never counted a reconnect: the loss was not seen"
    );

    // The since client: wrapped notices, one status frame recovered:true,
    // no resync text, nothing missed.
    let mut seen = Vec::new();
    let mut statuses = Vec::new();
    for (at, t) in &since_frames {
        match parse(t) {
            Frame::Durable { id, n } => seen.push((id, n)),
            s @ Frame::Status { .. } => statuses.push((*at, s, seen.len())),
            Frame::Other(o) => panic!("{name}: since client got {o:?} at {at:?}"),
        }
    }
    eprintln!(
        "{name}: since client's status frames (at, frame, after how many notices): {statuses:?}"
    );
    assert!(
        arrived,
        "{name}: the last acknowledged notice {last_ok} never reached the since client"
    );
    assert_eq!(statuses.len(), 1, "{name}: one status frame: {statuses:?}");
    assert!(
        matches!(
            statuses[0].1,
            Frame::Status {
                recovered: true,
                replayed: Some(_)
            }
        ),
        "{name}: {statuses:?}"
    );
    check_sequence(&seen, &published, failed.is_empty());

    // The plain client: plain notices and RESYNC once.
    let resyncs: Vec<_> = plain_frames.iter().filter(|(_, t)| t == "RESYNC").collect();
    assert_eq!(
        resyncs.len(),
        1,
        "{name}: the plain client's RESYNC: {resyncs:?}"
    );
    let odd: Vec<_> = plain_frames
        .iter()
        .filter(|(_, t)| t != "RESYNC" && !t.starts_with(r#"{"userId":"42","n":"#))
        .collect();
    assert!(odd.is_empty(), "{name}: plain client got {odd:?}");
}

/// Redis paused for 2.5 s (canary 0.5 s) under a steady durable rate.
#[test]
fn durable_recovers_after_redis_is_paused() {
    let _w = watchdog(60);
    subscription_loss(Fault::Pause(Duration::from_millis(2500)), "SIGSTOP");
}

/// The node's subscription killed by Redis under a steady durable rate.
#[test]
fn durable_recovers_after_client_kill_pubsub() {
    let _w = watchdog(60);
    subscription_loss(Fault::KillPubsub, "CLIENT KILL");
}

/// A client on node A; A is SIGKILLed; what is published meanwhile comes
/// back on node B from the client's last id, then recovered:true.
#[test]
fn durable_recovers_on_another_node_after_one_dies() {
    let _w = watchdog(40);
    let redis = Redis::start();
    let mut a = Node::with_redis(&redis, &[]);
    let b = Node::with_redis(&redis, &[]);
    let mut c = connect_since(&a, "");
    let first = numbered(0);
    let id0 = publish_ok(&redis, &first);
    assert_eq!(
        c.recv_text(T).as_deref(),
        Some(envelope(&id0, &first).as_str())
    );
    let t = Instant::now();
    a.signal(libc::SIGKILL);
    assert!(a.wait_exit(T).is_some(), "node A died");
    let end = c.recv(T);
    eprintln!(
        "node A SIGKILLed: client saw {end:?} after {:?}",
        t.elapsed()
    );
    assert!(matches!(end, Recv::Failed(_) | Recv::Closed(_)), "{end:?}");
    let away: Vec<String> = (1..=3).map(numbered).collect();
    let ids: Vec<String> = away.iter().map(|n| publish_ok(&redis, n)).collect();
    let mut c = connect_since(&b, &id0);
    for (id, n) in ids.iter().zip(&away) {
        assert_eq!(c.recv_text(T).as_deref(), Some(envelope(id, n).as_str()));
    }
    assert_eq!(
        c.recv_text(T).as_deref(),
        Some(r#"{"recovered":true,"replayed":3}"#)
    );
    eprintln!("on node B: replayed 3, {:?} after the kill", t.elapsed());
    c.expect_nothing(Duration::from_millis(200));
    let live = numbered(4);
    let id4 = publish_ok(&redis, &live);
    assert_eq!(
        c.recv_text(T).as_deref(),
        Some(envelope(&id4, &live).as_str())
    );
}

/// 5,000 missed with --history-size 10: recovered:false, not a replay.
#[test]
fn durable_huge_gap_is_missed_not_replayed() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &["--history-size", "10"]);
    let id0 = one_seen(&redis, &node);
    let t = Instant::now();
    publish_many(&redis, 1, 5000);
    let len = redis.cmd(&["XLEN", HISTORY_KEY]).unwrap();
    eprintln!(
        "5000 FCALLs in {:?}; XLEN {HISTORY_KEY} = {}",
        t.elapsed(),
        len.trim()
    );
    // The node's subscriber reads the 5000 live ones a while longer: a
    // client connecting before that would get the tail of them live.
    let (got, took) = node.wait_received(5001, Duration::from_secs(20));
    eprintln!("node read {got} notices; the last {took:?} after the FCALLs returned");
    let len: u64 = len.trim().parse().unwrap();
    assert!(len < 1000, "history is bounded: XLEN {len}");
    assert_missed(&redis, &node, &id0, "huge gap");
    assert_eq!(node.metric("pushwire_replayed_notices_total"), 0.0);
    assert_eq!(
        node.metric(r#"pushwire_recoveries_total{result="missed"}"#),
        1.0
    );
}

/// After a subscription loss every `since` connection asks for a recovery
/// at once; with more of them than the replayer's queue holds (4 here,
/// 4096 in a release build), the rest wait on their loop and are read in
/// turn: each gets `recovered:true` and what it missed, none
/// `recovered:false` for want of room.
#[test]
fn a_burst_of_recoveries_larger_than_the_replayer_queue_is_read_in_turn() {
    let _w = watchdog(60);
    const N: usize = 40;
    let redis = Redis::start();
    let node = Node::with_redis_env(
        &redis,
        &["--workers", "1"],
        &[("PUSHWIRE_TEST_REPLAY_QUEUE", "4")],
    );
    let user = |i: usize| format!("burst{i}");
    let notice = |i: usize, n: u64| format!(r#"{{"userId":"{}","n":{n}}}"#, user(i));
    let mut clients: Vec<Client> = (0..N)
        .map(|i| {
            let url = node.url(&format!("/ws?token={}&since=", token(&user(i), None)));
            Client::connect(&url).expect("upgrade")
        })
        .collect();
    // Each connection is sent one durable notice: its point to resume from.
    for (i, c) in clients.iter_mut().enumerate() {
        let id = publish_ok(&redis, &notice(i, 1));
        let got = c.recv_text(T).expect("the first notice");
        assert_eq!(got, envelope(&id, &notice(i, 1)));
    }
    let restored = node.metric("pushwire_redis_reconnects_total");
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    // Published while the node is without its subscription, or just after:
    // each reaches its client once, replayed or live.
    let ids: Vec<String> = (0..N).map(|i| publish_ok(&redis, &notice(i, 2))).collect();
    assert!(
        node.wait_metric("pushwire_redis_reconnects_total", T, |v| v > restored),
        "the node reconnected"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let (mut frames, mut status) = (Vec::new(), None);
        let until = Instant::now() + T;
        while status.is_none() || frames.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            let text = c
                .recv_text(left)
                .unwrap_or_else(|| panic!("client {i}: frames {frames:?}, status {status:?}"));
            match parse(&text) {
                Frame::Status { recovered, .. } => {
                    assert!(status.is_none(), "client {i}: one status frame");
                    status = Some(recovered);
                }
                Frame::Durable { id, n } => frames.push((id, n)),
                Frame::Other(t) => panic!("client {i}: {t}"),
            }
        }
        assert_eq!(status, Some(true), "client {i}: recovered, not refused");
        assert_eq!(frames, vec![(ids[i].clone(), Some(2))], "client {i}");
        c.expect_nothing(Duration::from_millis(20));
    }
    assert_eq!(
        node.metric(r#"pushwire_recoveries_total{result="missed"}"#),
        0.0
    );
    assert_eq!(
        node.metric(r#"pushwire_recoveries_total{result="recovered"}"#),
        N as f64
    );
}
