//! Notices into Redis: the publisher thread and what it publishes.
//!
//! One blocking thread PUBLISHes pipelined batches at a fixed rate, each
//! notice stamped with its seq and CLOCK_MONOTONIC time. Which user a
//! targeted notice goes to is a function of its seq, so the checker
//! recomputes it instead of storing it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::os::mono_ns;

pub struct PubReport {
    pub sent: u64,
    /// Seq ranges (from seq0, end exclusive) whose publish failed: the
    /// publisher knows they were not (or maybe not) sent. Not lost.
    pub refused: Vec<(u64, u64)>,
    /// Master switches followed (with a Sentinel).
    pub switches: u64,
    pub start: u64,
    pub end: u64,
    pub min_receivers: i64,
}

impl PubReport {
    pub fn rate(&self) -> f64 {
        let secs = self.end.saturating_sub(self.start) as f64 / 1e9;
        if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        }
    }
}

pub type MakeNotice = Box<dyn FnMut(u64, u64, &mut Vec<u8>) + Send>;

/// How a publisher thread publishes.
pub struct Pub {
    pub url: String,
    pub channel: String,
    /// Some(function): `FCALL function 0 notice` (SPEC 8) instead of PUBLISH.
    pub function: Option<String>,
    pub rate: f64,
    pub count: u64,
    pub seq0: u64,
    /// Set to stop early (the count is then an upper bound).
    pub stop: Option<Arc<AtomicBool>>,
    /// Notices sent so far, for the main thread to read.
    pub progress: Option<Arc<AtomicU64>>,
    /// Follow the master these Sentinels name (`url` is then the first one).
    pub sentinel: Option<Sentinel>,
    /// With a function: `WAIT wait_replicas 500` after each batch; a batch
    /// fewer replicas acknowledged is refused (the publisher knows it may
    /// not survive a failover).
    pub wait_replicas: u32,
}

/// Loopback Sentinels (no auth) and the master name they watch.
#[derive(Clone, Debug)]
pub struct Sentinel {
    pub hosts: Vec<String>,
    pub name: String,
}

impl Sentinel {
    /// `HOST:PORT[,HOST:PORT...]/NAME`, or the same after `redis+sentinel://`.
    pub fn parse(s: &str) -> Result<Sentinel, String> {
        let s = s.strip_prefix("redis+sentinel://").unwrap_or(s);
        let (hosts, name) = s
            .rsplit_once('/')
            .ok_or_else(|| format!("--redis-sentinel {s}: HOST:PORT[,HOST:PORT...]/NAME"))?;
        let hosts: Vec<String> = hosts.split(',').map(str::to_string).collect();
        for h in &hosts {
            crate::wire::check_loopback_url(&format!("redis://{h}"), "redis://")?;
        }
        Ok(Sentinel {
            hosts,
            name: name.to_string(),
        })
    }

    /// The master's address as the first Sentinel that answers says.
    pub fn master(&self) -> Result<String, String> {
        let mut why = String::new();
        for h in &self.hosts {
            let r = redis::Client::open(format!("redis://{h}").as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_millis(500)))?;
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(&self.name)
                        .query::<Option<(String, String)>>(&mut c)
                });
            match r {
                Ok(Some((host, port))) => return Ok(format!("{host}:{port}")),
                Ok(None) => why = format!("{h}: no master named {}", self.name),
                Err(e) => why = format!("{h}: {e}"),
            }
        }
        Err(format!("Sentinel: {why}"))
    }

    pub fn master_url(&self) -> Result<String, String> {
        let url = format!("redis://{}", self.master()?);
        crate::wire::check_loopback_url(&url, "redis://")?;
        Ok(url)
    }
}

fn connect(url: &str) -> Result<redis::Connection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("redis: {e}"))?;
    let con = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .map_err(|e| format!("redis {url}: {e}"))?;
    con.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| format!("redis: {e}"))?;
    Ok(con)
}

impl Pub {
    pub fn new(url: String, channel: String, rate: f64, count: u64, seq0: u64) -> Pub {
        Pub {
            url,
            channel,
            function: None,
            rate,
            count,
            seq0,
            stop: None,
            progress: None,
            sentinel: None,
            wait_replicas: 0,
        }
    }
}

/// PUBLISHes `count` notices at `rate`/s (0: all at once) in pipelined
/// batches, from a thread of its own. `make(seq, t, buf)` writes one notice.
pub fn publisher(
    url: String,
    channel: String,
    rate: f64,
    count: u64,
    seq0: u64,
    make: MakeNotice,
) -> JoinHandle<Result<PubReport, String>> {
    publish(Pub::new(url, channel, rate, count, seq0), make)
}

/// As [`publisher`], with every knob of [`Pub`]. With a function, the
/// replies are ids and `min_receivers` is -1 (FCALL does not count them).
pub fn publish(p: Pub, mut make: MakeNotice) -> JoinHandle<Result<PubReport, String>> {
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let (rate, count, seq0) = (p.rate, p.count, p.seq0);
            let mut master = match &p.sentinel {
                Some(s) => s.master()?,
                None => String::new(),
            };
            let url = |m: &str| {
                if p.sentinel.is_some() {
                    format!("redis://{m}")
                } else {
                    p.url.clone()
                }
            };
            let mut con = Some(connect(&url(&master))?);
            let mut refused: Vec<(u64, u64)> = Vec::new();
            let mut switches = 0u64;
            let mut asked = Instant::now();
            let start = mono_ns();
            let mut sent = 0u64;
            let mut min_receivers = i64::MAX;
            let mut buf = Vec::with_capacity(256);
            while sent < count {
                if p.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                    break;
                }
                if let Some(s) = &p.sentinel {
                    // Whichever node is master: ask every 200 ms, and at
                    // once when the connection is gone.
                    if con.is_none() || asked.elapsed() >= Duration::from_millis(200) {
                        asked = Instant::now();
                        if let Ok(m) = s.master() {
                            if m != master {
                                master = m;
                                switches += 1;
                                con = None;
                            }
                        }
                        if con.is_none() {
                            con = connect(&url(&master)).ok();
                        }
                    }
                    if con.is_none() {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                }
                let now = mono_ns();
                let due = if rate <= 0.0 {
                    count
                } else {
                    ((now - start) as f64 * rate / 1e9) as u64 + 1
                }
                .min(count);
                if due <= sent {
                    let next = start + (sent as f64 / rate * 1e9) as u64;
                    let wait = next.saturating_sub(now).clamp(20_000, 1_000_000);
                    std::thread::sleep(Duration::from_nanos(wait));
                    continue;
                }
                let n = (due - sent).min(1000);
                let mut pipe = redis::pipe();
                let t = mono_ns();
                for k in 0..n {
                    buf.clear();
                    make(seq0 + sent + k, t, &mut buf);
                    match &p.function {
                        None => pipe.cmd("PUBLISH").arg(&p.channel).arg(&buf[..]),
                        Some(f) => pipe.cmd("FCALL").arg(f).arg(0).arg(&buf[..]),
                    };
                }
                let waits = p.function.is_some() && p.wait_replicas > 0;
                if waits {
                    pipe.cmd("WAIT").arg(p.wait_replicas).arg(500);
                }
                let what = if p.function.is_some() {
                    "FCALL"
                } else {
                    "PUBLISH"
                };
                let c = con.as_mut().expect("a connection");
                let mut r: Vec<redis::Value> = match pipe.query(c) {
                    Ok(r) => r,
                    Err(_) if p.sentinel.is_some() => {
                        // The whole batch is refused (a part of it may have
                        // run: those then count as delivered, not lost).
                        refuse(&mut refused, sent, sent + n);
                        sent += n;
                        con = None;
                        continue;
                    }
                    Err(e) => return Err(format!("{what}: {e}")),
                };
                if waits {
                    let acked = match r.pop() {
                        Some(redis::Value::Int(x)) => x,
                        _ => 0,
                    };
                    if acked < i64::from(p.wait_replicas) {
                        // Not (yet) on a replica: the whole batch is
                        // refused, as a backend told so would publish it
                        // again.
                        refuse(&mut refused, sent, sent + n);
                        sent += n;
                        continue;
                    }
                }
                let mut failed: Option<u64> = None;
                for (k, x) in r.into_iter().enumerate() {
                    match x {
                        redis::Value::Int(x) => min_receivers = min_receivers.min(x),
                        redis::Value::ServerError(e) => {
                            if p.sentinel.is_none() {
                                return Err(format!("{what}: {:?}", e.details()));
                            }
                            // READONLY, LOADING...: this one was refused.
                            let s0 = sent + k as u64;
                            refuse(&mut refused, s0, s0 + 1);
                            failed = Some(s0);
                        }
                        _ => min_receivers = -1,
                    }
                }
                if failed.is_some() {
                    con = None;
                }
                sent += n;
                if let Some(pr) = &p.progress {
                    pr.store(sent, Ordering::Relaxed);
                }
            }
            Ok(PubReport {
                sent,
                refused,
                switches,
                start,
                end: mono_ns(),
                min_receivers: if min_receivers == i64::MAX {
                    0
                } else {
                    min_receivers
                },
            })
        })
        .expect("spawn the publisher thread")
}

/// Adds seqs `a..b` to the refused ranges, joining a range it continues.
fn refuse(refused: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    match refused.last_mut() {
        Some(last) if last.1 == a => last.1 = b,
        _ => refused.push((a, b)),
    }
}

/// Waits until `want` subscribers listen on the channel (the nodes).
pub fn wait_subscribers(url: &str, channel: &str, want: i64) -> Result<i64, String> {
    let client = redis::Client::open(url).map_err(|e| format!("redis: {e}"))?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(|e| format!("redis {url}: {e}"))?;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let r: Vec<redis::Value> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut con)
            .map_err(|e| format!("PUBSUB NUMSUB: {e}"))?;
        let n = r
            .iter()
            .find_map(|v| match v {
                redis::Value::Int(n) => Some(*n),
                _ => None,
            })
            .unwrap_or(0);
        if n >= want {
            return Ok(n);
        }
        if Instant::now() >= until {
            return Err(format!(
                "only {n} of {want} subscribers on {channel} after 20 s: are the nodes running with --redis {url}?"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The user targeted notice `seq` goes to: a function of seq, so the
/// checker recomputes it instead of storing it.
pub fn user_for(users: &[u32], seq: u64) -> u32 {
    users[(splitmix(seq ^ 0x5eed) % users.len() as u64) as usize]
}

pub fn pad_text(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(",\"pad\":\"{}\"", "x".repeat(n))
    }
}
