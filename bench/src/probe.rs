//! The server's memory and CPU, read from outside.
//!
//! From /proc/PID when `--server-pid` is given, else from the admin
//! listener's /metrics; a `Window` brackets a measurement and turns tick
//! counts into percent of one core, per process and per server thread.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::ToSocketAddrs;
use std::time::Duration;

use crate::options::Opts;
use crate::os::{
    clk_tck, machine_ticks, mono_ns, ncpu, proc_cpu_ticks, proc_rss, proc_syscw, proc_thread_ticks,
    self_cpu_ns,
};

/// A plain blocking HTTP GET on a loopback admin listener; returns the body.
fn http_get(base: &str, path: &str) -> Option<String> {
    let rest = base.strip_prefix("http://")?;
    let hostport = rest.split('/').next()?;
    let addr = hostport.to_socket_addrs().ok()?.next()?;
    if !addr.ip().is_loopback() {
        return None;
    }
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    Some(body.to_string())
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Where the server's memory and CPU are read from.
pub struct Probe {
    pub pids: Vec<u32>,
    pub admins: Vec<String>,
    pub redis_pid: Option<u32>,
}

impl Probe {
    pub fn new(o: &Opts) -> Probe {
        Probe {
            pids: o.pids.clone(),
            admins: o.admins.clone(),
            redis_pid: o.redis_pid,
        }
    }

    pub fn rss(&self) -> Option<u64> {
        if !self.pids.is_empty() {
            self.pids.iter().map(|p| proc_rss(*p)).sum()
        } else if !self.admins.is_empty() {
            self.admins
                .iter()
                .map(|a| {
                    http_get(a, "/metrics")
                        .and_then(|b| metric(&b, "process_resident_memory_bytes"))
                        .map(|v| v as u64)
                })
                .sum()
        } else {
            None
        }
    }

    pub fn ticks(&self) -> Option<u64> {
        if self.pids.is_empty() {
            None
        } else {
            self.pids.iter().map(|p| proc_cpu_ticks(*p)).sum()
        }
    }

    pub fn syscw(&self) -> Option<u64> {
        if self.pids.is_empty() {
            None
        } else {
            self.pids.iter().map(|p| proc_syscw(*p)).sum()
        }
    }

    pub fn gauge(&self, name: &str) -> Option<f64> {
        if self.admins.is_empty() {
            return None;
        }
        self.admins
            .iter()
            .map(|a| http_get(a, "/metrics").and_then(|b| metric(&b, name)))
            .sum()
    }
}

pub struct Window {
    wall: u64,
    pub me: u64,
    srv: Option<u64>,
    pub threads: BTreeMap<String, u64>,
    pub machine: Option<(u64, u64)>,
    pub syscw: Option<u64>,
    redis: Option<u64>,
}

/// A measurement window: seconds, bench CPU %, server CPU % and the
/// server's per-thread CPU % (percent of one core).
#[derive(Clone)]
pub struct Cpu {
    pub secs: f64,
    pub bench: f64,
    pub server: Option<f64>,
    pub threads: BTreeMap<String, f64>,
    /// The whole machine (every process), in % of one core.
    pub machine: Option<f64>,
    /// Write system calls the server made in the window.
    pub writes: Option<u64>,
    /// Redis (`--redis-pid`), in % of one core.
    pub redis: Option<f64>,
}

impl Cpu {
    /// Server CPU time in nanoseconds over the window.
    pub fn server_ns(&self) -> Option<f64> {
        self.server.map(|p| p / 100.0 * self.secs * 1e9)
    }

    /// Redis CPU time in nanoseconds over the window.
    pub fn redis_ns(&self) -> Option<f64> {
        self.redis.map(|p| p / 100.0 * self.secs * 1e9)
    }
}

impl Window {
    pub fn start(p: &Probe) -> Window {
        let mut threads = BTreeMap::new();
        for pid in &p.pids {
            proc_thread_ticks(*pid, &mut threads);
        }
        Window {
            wall: mono_ns(),
            me: self_cpu_ns(),
            srv: p.ticks(),
            threads,
            machine: machine_ticks(),
            syscw: p.syscw(),
            redis: p.redis_pid.and_then(proc_cpu_ticks),
        }
    }

    pub fn end(&self, p: &Probe) -> Cpu {
        let wall = mono_ns().saturating_sub(self.wall).max(1) as f64;
        let pct = |ticks: u64| ticks as f64 * 1e9 / clk_tck() as f64 / wall * 100.0;
        let me = self_cpu_ns().saturating_sub(self.me) as f64 / wall * 100.0;
        let srv = match (self.srv, p.ticks()) {
            (Some(a), Some(b)) => Some(pct(b.saturating_sub(a))),
            _ => None,
        };
        let mut now = BTreeMap::new();
        for pid in &p.pids {
            proc_thread_ticks(*pid, &mut now);
        }
        let threads = now
            .into_iter()
            .map(|(k, v)| {
                let before = self.threads.get(&k).copied().unwrap_or(0);
                (k, (pct(v.saturating_sub(before)) * 10.0).round() / 10.0)
            })
            .filter(|(_, v)| *v > 0.0)
            .collect();
        let machine = match (self.machine, machine_ticks()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64 * ncpu() as f64 * 100.0)
            }
            _ => None,
        };
        let writes = match (self.syscw, p.syscw()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let redis = match (self.redis, p.redis_pid.and_then(proc_cpu_ticks)) {
            (Some(a), Some(b)) => Some(pct(b.saturating_sub(a))),
            _ => None,
        };
        Cpu {
            redis,
            secs: wall / 1e9,
            bench: me,
            server: srv,
            threads,
            machine,
            writes,
        }
    }
}
