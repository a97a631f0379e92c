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
            let client = redis::Client::open(p.url.as_str()).map_err(|e| format!("redis: {e}"))?;
            let mut con = client
                .get_connection_with_timeout(Duration::from_secs(5))
                .map_err(|e| format!("redis: {e}"))?;
            let start = mono_ns();
            let mut sent = 0u64;
            let mut min_receivers = i64::MAX;
            let mut buf = Vec::with_capacity(256);
            while sent < count {
                if p.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                    break;
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
                let what = if p.function.is_some() {
                    "FCALL"
                } else {
                    "PUBLISH"
                };
                let r: Vec<redis::Value> =
                    pipe.query(&mut con).map_err(|e| format!("{what}: {e}"))?;
                for x in r {
                    match x {
                        redis::Value::Int(x) => min_receivers = min_receivers.min(x),
                        redis::Value::ServerError(e) => {
                            return Err(format!("{what}: {:?}", e.details()))
                        }
                        _ => min_receivers = -1,
                    }
                }
                sent += n;
                if let Some(pr) = &p.progress {
                    pr.store(sent, Ordering::Relaxed);
                }
            }
            Ok(PubReport {
                sent,
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
