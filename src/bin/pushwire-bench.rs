//! pushwire-bench: load generator and measurement harness for pushwire.
//!
//! One process, a few client threads each running its own mio loop over a
//! share of the connections, plus (when a scenario publishes) one blocking
//! publisher thread that PUBLISHes pipelined batches to Redis at a fixed
//! rate. The WebSocket client side is hand-written: the upgrade request is
//! fixed text, the 101 answer is checked by its status line and accept
//! key, and server frames are parsed in place (unmasked text, ping answered
//! with a masked pong, close answered and dropped). Per connection the
//! bench keeps a socket, a user id, a start time and two Vecs that are
//! empty unless a frame or a write was cut short.
//!
//! Every notice carries its publish time as nanoseconds of CLOCK_MONOTONIC,
//! which is system-wide on Linux, so latency is measured across threads and
//! across bench processes alike.
//!
//! It only sends load to loopback addresses: a non-loopback URL is refused.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{json, Value};
use socket2::{Domain, Protocol, Socket, Type};

const HELP: &str = "\
pushwire-bench: load and latency benchmarks for pushwire (loopback only)

USAGE: pushwire-bench SCENARIO [OPTIONS]

SCENARIOS
  idle       open N connections (paced), report connect rate, server RSS
             before/after and bytes per connection, CPU while idle S seconds
  connect    a storm of N clients at once: handshakes/s, failures, p50/p99
  targeted   N users, one connection each; notices to one random user at
             --rate R for S seconds via Redis PUBLISH: delivered, lost,
             duplicated, latency p50/p90/p99/p99.9/max. --max steps the
             rate up to the highest with p99 < --p99-ms and no loss
  broadcast  N connections, M broadcast notices: deliveries/s, time until
             the last connection has each notice (p50/p99)
  two-nodes  targeted over two --url (users spread over both nodes)
  limit      the broadcast of M frames to N connections written by a bare
             mio writer of pre-framed bytes (a child process of this bench),
             no WebSocket library and no Redis: what the kernel allows

OPTIONS
  --url URL            ws://127.0.0.1:8080/ws; repeat for several nodes
  --auth MODE          jwt|query|header [jwt]
  --secret S           HS256 key for --auth jwt [bench]
  --user-header NAME   header for --auth header [X-User-Id]
  --redis URL          redis://127.0.0.1:PORT (required to publish; never defaults
                       to 6379)
  --channel NAME       [websocket:sendMsgTopic]
  --admin URL          http://127.0.0.1:9090 (RSS from /metrics); repeatable
  --server-pid PID     read VmRSS and CPU ticks from /proc/PID; repeatable
  --connections N      [1000]
  --users N            distinct users [= connections]; connection i is user
                       (offset + i % users)
  --user-offset N      first user id [0] (several bench processes: disjoint ranges)
  --rate R             notices/s (targeted [1000], broadcast [0 = burst], limit [0])
  --connect-rate R     new connections/s [5000; connect: 0 = all at once]
  --seconds S          idle time / publish time [10; --max steps: 5]
  --messages M         broadcast/limit notices [100]
  --threads T          client event-loop threads [1]
  --max                targeted: step the rate up (x1.5) until it fails
  --p99-ms MS          --max pass criterion [10]
  --pad BYTES          extra bytes of text in each notice [0]
  --batch B            limit: frames per write per connection [1]
  --timeout S          connect/handshake timeout per connection [30]
  --drain S            wait for late deliveries after publishing [3]
  --no-publish         broadcast: only listen (another process publishes)
  --barrier DIR        after connecting, create DIR/ready.PID and wait for DIR/go
  --label TEXT         copied into the JSON line
  --json               human table to stderr, only the JSON line to stdout
  -h, --help
";

// ---------------------------------------------------------------- time, OS

/// CLOCK_MONOTONIC in nanoseconds: one clock for every thread and process.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time (user + system) of this process, in nanoseconds.
fn self_cpu_ns() -> u64 {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
fn raise_nofile() -> u64 {
    // SAFETY: plain get/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        r.rlim_cur
    }
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// VmRSS of a process, in bytes.
fn proc_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime per thread name (summed over threads of the same name).
fn proc_thread_ticks(pid: u32, into: &mut BTreeMap<String, u64>) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        *into.entry(name).or_default() += ticks;
    }
}

/// (busy, total) jiffies of the whole machine, from /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

fn ncpu() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// Write-class system calls (write, writev) of a process, from /proc/PID/io.
fn proc_syscw(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let line = s.lines().find(|l| l.starts_with("syscw:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Kernel TCP memory in use (all sockets of the machine), in bytes.
fn sockstat_mem() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return Some(it.next()?.parse::<u64>().ok()? * 4096);
        }
    }
    None
}

/// Kernel slab memory of the machine (socket structs live there), in bytes.
fn meminfo_slab() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("Slab:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

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

// ---------------------------------------------------------------- histogram

/// Log-linear histogram: 64 sub-buckets per power of two (about 1.5 %).
#[derive(Clone, Default)]
struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
    min: u64,
    sum: u128,
}

const SUB_BITS: u32 = 6;

fn bucket(v: u64) -> usize {
    if v < (1 << SUB_BITS) {
        v as usize
    } else {
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        (((shift + 1) as usize) << SUB_BITS) + ((v >> shift) as usize - (1 << SUB_BITS))
    }
}

fn bucket_value(i: usize) -> u64 {
    if i < (1 << SUB_BITS) {
        i as u64
    } else {
        let shift = (i >> SUB_BITS) as u32 - 1;
        let sub = (i & ((1 << SUB_BITS) - 1)) as u64 + (1 << SUB_BITS);
        // The middle of the bucket.
        (sub << shift) + ((1u64 << shift) >> 1)
    }
}

impl Hist {
    fn record(&mut self, v: u64) {
        let i = bucket(v);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        if self.n == 0 || v < self.min {
            self.min = v;
        }
        self.n += 1;
        self.max = self.max.max(v);
        self.sum += v as u128;
    }

    fn merge(&mut self, o: &Hist) {
        if o.n == 0 {
            return;
        }
        if o.counts.len() > self.counts.len() {
            self.counts.resize(o.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        if self.n == 0 || o.min < self.min {
            self.min = o.min;
        }
        self.n += o.n;
        self.max = self.max.max(o.max);
        self.sum += o.sum;
    }

    /// The q-quantile (0..=1), clamped to the exact min and max.
    fn q(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_value(i).clamp(self.min, self.max);
            }
        }
        self.max
    }

    fn mean(&self) -> u64 {
        if self.n == 0 {
            0
        } else {
            (self.sum / self.n as u128) as u64
        }
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}

fn hist_json(h: &Hist) -> Value {
    json!({
        "n": h.n,
        "p50_ms": ms(h.q(0.5)),
        "p90_ms": ms(h.q(0.9)),
        "p99_ms": ms(h.q(0.99)),
        "p999_ms": ms(h.q(0.999)),
        "max_ms": ms(h.max),
        "mean_ms": ms(h.mean()),
    })
}

fn hist_line(h: &Hist) -> String {
    if h.n == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
        ms(h.q(0.5)),
        ms(h.q(0.9)),
        ms(h.q(0.99)),
        ms(h.q(0.999)),
        ms(h.max),
        h.n
    )
}

// ---------------------------------------------------------------- options

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Auth {
    Jwt,
    Query,
    Header,
}

#[derive(Clone, Debug)]
struct Opts {
    scenario: String,
    urls: Vec<String>,
    auth: Auth,
    secret: String,
    user_header: String,
    redis: Option<String>,
    channel: String,
    admins: Vec<String>,
    pids: Vec<u32>,
    connections: usize,
    users: Option<usize>,
    user_offset: usize,
    rate: Option<f64>,
    connect_rate: Option<f64>,
    seconds: Option<f64>,
    messages: usize,
    threads: usize,
    max: bool,
    p99_ms: f64,
    pad: usize,
    batch: usize,
    timeout: f64,
    drain: f64,
    publish: bool,
    barrier: Option<String>,
    label: Option<String>,
    json: bool,
}

fn parse_opts(args: Vec<OsString>) -> Result<Opts, String> {
    use lexopt::prelude::*;
    let mut o = Opts {
        scenario: String::new(),
        urls: Vec::new(),
        auth: Auth::Jwt,
        secret: "bench".into(),
        user_header: "X-User-Id".into(),
        redis: None,
        channel: "websocket:sendMsgTopic".into(),
        admins: Vec::new(),
        pids: Vec::new(),
        connections: 1000,
        users: None,
        user_offset: 0,
        rate: None,
        connect_rate: None,
        seconds: None,
        messages: 100,
        threads: 1,
        max: false,
        p99_ms: 10.0,
        pad: 0,
        batch: 1,
        timeout: 30.0,
        drain: 3.0,
        publish: true,
        barrier: None,
        label: None,
        json: false,
    };
    let mut p = lexopt::Parser::from_args(args);
    let e = |e: lexopt::Error| e.to_string();
    fn num<T: std::str::FromStr>(flag: &str, v: OsString) -> Result<T, String> {
        v.to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("--{flag}: bad number {v:?}"))
    }
    fn text(v: OsString) -> Result<String, String> {
        v.into_string().map_err(|_| "not UTF-8".to_string())
    }
    while let Some(arg) = p.next().map_err(e)? {
        match arg {
            Short('h') | Long("help") => {
                print!("{HELP}");
                std::process::exit(0);
            }
            Value(v) if o.scenario.is_empty() => o.scenario = text(v)?,
            Long("url") => o.urls.push(text(p.value().map_err(e)?)?),
            Long("auth") => {
                o.auth = match text(p.value().map_err(e)?)?.as_str() {
                    "jwt" => Auth::Jwt,
                    "query" => Auth::Query,
                    "header" => Auth::Header,
                    other => return Err(format!("--auth: jwt, query or header, not {other}")),
                }
            }
            Long("secret") => o.secret = text(p.value().map_err(e)?)?,
            Long("user-header") => o.user_header = text(p.value().map_err(e)?)?,
            Long("redis") => o.redis = Some(text(p.value().map_err(e)?)?),
            Long("channel") => o.channel = text(p.value().map_err(e)?)?,
            Long("admin") => o.admins.push(text(p.value().map_err(e)?)?),
            Long("server-pid") => o.pids.push(num("server-pid", p.value().map_err(e)?)?),
            Long("connections") => o.connections = num("connections", p.value().map_err(e)?)?,
            Long("users") => o.users = Some(num("users", p.value().map_err(e)?)?),
            Long("user-offset") => o.user_offset = num("user-offset", p.value().map_err(e)?)?,
            Long("rate") => o.rate = Some(num("rate", p.value().map_err(e)?)?),
            Long("connect-rate") => {
                o.connect_rate = Some(num("connect-rate", p.value().map_err(e)?)?)
            }
            Long("seconds") => o.seconds = Some(num("seconds", p.value().map_err(e)?)?),
            Long("messages") => o.messages = num("messages", p.value().map_err(e)?)?,
            Long("threads") => o.threads = num("threads", p.value().map_err(e)?)?,
            Long("max") => o.max = true,
            Long("p99-ms") => o.p99_ms = num("p99-ms", p.value().map_err(e)?)?,
            Long("pad") => o.pad = num("pad", p.value().map_err(e)?)?,
            Long("batch") => o.batch = num("batch", p.value().map_err(e)?)?,
            Long("timeout") => o.timeout = num("timeout", p.value().map_err(e)?)?,
            Long("drain") => o.drain = num("drain", p.value().map_err(e)?)?,
            Long("no-publish") => o.publish = false,
            Long("barrier") => o.barrier = Some(text(p.value().map_err(e)?)?),
            Long("label") => o.label = Some(text(p.value().map_err(e)?)?),
            Long("json") => o.json = true,
            other => return Err(other.unexpected().to_string()),
        }
    }
    if o.scenario.is_empty() {
        return Err(
            "give a scenario: idle, connect, targeted, broadcast, two-nodes, limit (see --help)"
                .into(),
        );
    }
    if o.urls.is_empty() {
        o.urls.push("ws://127.0.0.1:8080/ws".into());
    }
    o.threads = o.threads.clamp(1, 64);
    o.batch = o.batch.max(1);
    if o.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------- targets

/// Where connections go and how their upgrade request looks.
#[derive(Clone, Debug)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_ws_url(u: &str) -> Result<Target, String> {
    let rest = u
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{u}: only ws:// URLs"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{u}: {e}"))?
        .next()
        .ok_or_else(|| format!("{u}: no address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{u}: this bench sends load to loopback addresses only"
        ));
    }
    Ok(Target {
        addr,
        host: hostport.to_string(),
        path: path.to_string(),
    })
}

fn check_loopback_url(u: &str, scheme: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix(scheme)
        .ok_or_else(|| format!("{u}: expected {scheme}..."))?;
    let hostport = rest.split('/').next().unwrap_or("");
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    let ok = hostport
        .to_socket_addrs()
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!("{u}: loopback addresses only"))
    }
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

struct ClientCfg {
    targets: Vec<Target>,
    auth: Auth,
    secret: Vec<u8>,
    user_header: String,
    /// No WebSocket handshake: open once TCP connects (the `limit` scenario).
    raw: bool,
    timeout_ns: u64,
}

impl ClientCfg {
    fn request(&self, t: &Target, user: u32) -> Vec<u8> {
        let mut path = t.path.clone();
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut extra = String::new();
        match self.auth {
            Auth::Jwt => {
                let exp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    + 86_400;
                let tok = pushwire::auth::sign_hs256(
                    &json!({"sub": user.to_string(), "exp": exp}),
                    &self.secret,
                );
                path.push_str(&format!("{sep}token={tok}"));
            }
            Auth::Query => path.push_str(&format!("{sep}user={user}")),
            Auth::Header => extra = format!("{}: {user}\r\n", self.user_header),
        }
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
            t.host
        )
        .into_bytes()
    }
}

/// A non-blocking socket, bound to 127.0.0.`src` (port chosen at connect
/// time, so each source address has its own ephemeral port range), with
/// the connect started.
fn open_socket(addr: SocketAddr, src: u8) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    if let IpAddr::V4(ip) = addr.ip() {
        if ip.is_loopback() {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a c_int option on a socket we own.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let local = SocketAddr::new(Ipv4Addr::new(127, 0, 0, src).into(), 0);
            s.bind(&local.into())?;
        }
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

/// Source address for connection `i`: 127.0.0.2 ..= 127.0.0.250.
fn src_for(i: usize) -> u8 {
    (2 + i % 249) as u8
}

// ---------------------------------------------------------------- client loops

#[derive(Clone, Copy)]
struct Spec {
    user: u32,
    target: u16,
    src: u8,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    Connecting,
    Handshake,
    Open,
}

struct Conn {
    sock: TcpStream,
    user: u32,
    st: St,
    started: u64,
    /// A partial frame (or partial 101 answer) carried to the next read.
    inbuf: Vec<u8>,
    /// Bytes a write could not take yet.
    out: Vec<u8>,
    target: u16,
}

/// Counters the main thread watches while it waits.
#[derive(Default)]
struct Ctl {
    done: AtomicU64,
    open: AtomicU64,
    frames: AtomicU64,
}

#[derive(Clone, Default)]
struct Stats {
    attempted: u64,
    opened: u64,
    fails: BTreeMap<String, u64>,
    connect: Hist,
    first_attempt: u64,
    last_open: u64,
    closed_by_server: u64,
    close_codes: BTreeMap<u16, u64>,
    dropped_open: u64,
    pings: u64,
    // Message part, reset between --max steps.
    frames: u64,
    bytes: u64,
    other_frames: u64,
    unparsed: u64,
    stale: u64,
    misrouted: u64,
    lat: Hist,
    seq_base: u64,
    seq_count: Vec<u32>,
    seq_max: Vec<u64>,
    min_t: u64,
    first_rx: u64,
    last_rx: u64,
}

impl Stats {
    fn fail(&mut self, why: String) {
        *self.fails.entry(why).or_default() += 1;
    }

    fn failed(&self) -> u64 {
        self.fails.values().sum()
    }

    fn reset_msgs(&mut self, base: u64) {
        self.frames = 0;
        self.bytes = 0;
        self.other_frames = 0;
        self.unparsed = 0;
        self.stale = 0;
        self.misrouted = 0;
        self.lat = Hist::default();
        self.seq_base = base;
        self.seq_count = Vec::new();
        self.seq_max = Vec::new();
        self.min_t = 0;
        self.first_rx = 0;
        self.last_rx = 0;
    }

    fn merge(&mut self, o: &Stats) {
        fn lo(a: u64, b: u64) -> u64 {
            match (a, b) {
                (0, b) => b,
                (a, 0) => a,
                (a, b) => a.min(b),
            }
        }
        self.attempted += o.attempted;
        self.opened += o.opened;
        for (k, v) in &o.fails {
            *self.fails.entry(k.clone()).or_default() += v;
        }
        self.connect.merge(&o.connect);
        self.first_attempt = lo(self.first_attempt, o.first_attempt);
        self.last_open = self.last_open.max(o.last_open);
        self.closed_by_server += o.closed_by_server;
        for (k, v) in &o.close_codes {
            *self.close_codes.entry(*k).or_default() += v;
        }
        self.dropped_open += o.dropped_open;
        self.pings += o.pings;
        self.frames += o.frames;
        self.bytes += o.bytes;
        self.other_frames += o.other_frames;
        self.unparsed += o.unparsed;
        self.stale += o.stale;
        self.misrouted += o.misrouted;
        self.lat.merge(&o.lat);
        self.seq_base = o.seq_base;
        if o.seq_count.len() > self.seq_count.len() {
            self.seq_count.resize(o.seq_count.len(), 0);
            self.seq_max.resize(o.seq_count.len(), 0);
        }
        for (i, (c, m)) in o.seq_count.iter().zip(&o.seq_max).enumerate() {
            self.seq_count[i] += c;
            self.seq_max[i] = self.seq_max[i].max(*m);
        }
        self.min_t = lo(self.min_t, o.min_t);
        self.first_rx = lo(self.first_rx, o.first_rx);
        self.last_rx = self.last_rx.max(o.last_rx);
    }
}

enum Cmd {
    Connect(Vec<Spec>, f64),
    /// Reply with the stats; with Some(base), reset the message part.
    Collect(Option<u64>, Sender<Stats>),
    OpenUsers(Sender<Vec<u32>>),
    CloseAll,
    Stop,
}

const WAKE: Token = Token(usize::MAX - 1);
/// Most seq numbers one run tracks (memory guard).
const MAX_SEQ: u64 = 50_000_000;

struct ClientLoop {
    poll: Poll,
    cfg: Arc<ClientCfg>,
    ctl: Arc<Ctl>,
    rx: Receiver<Cmd>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    queue: VecDeque<Spec>,
    rate: f64,
    pace_start: u64,
    paced: u64,
    stats: Stats,
    scratch: Vec<u8>,
    frames_reported: u64,
    last_scan: u64,
}

impl ClientLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.queue.is_empty() {
                Duration::from_millis(50)
            } else if self.rate <= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_millis(1)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("client loop: poll: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    continue;
                }
                let slot = ev.token().0;
                self.on_event(
                    slot,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                );
            }
            while let Ok(cmd) = self.rx.try_recv() {
                match cmd {
                    Cmd::Connect(specs, rate) => {
                        self.queue.extend(specs);
                        self.rate = rate;
                        self.pace_start = mono_ns();
                        self.paced = 0;
                    }
                    Cmd::Collect(reset, tx) => {
                        let _ = tx.send(self.stats.clone());
                        if let Some(base) = reset {
                            self.stats.reset_msgs(base);
                        }
                    }
                    Cmd::OpenUsers(tx) => {
                        let users = self
                            .conns
                            .iter()
                            .flatten()
                            .filter(|c| c.st == St::Open)
                            .map(|c| c.user)
                            .collect();
                        let _ = tx.send(users);
                    }
                    Cmd::CloseAll => self.close_all(),
                    Cmd::Stop => return,
                }
            }
            self.pace_connects();
            let now = mono_ns();
            if now.saturating_sub(self.last_scan) > 100_000_000 {
                self.last_scan = now;
                self.scan_timeouts(now);
            }
            let delta = self.stats.frames.wrapping_sub(self.frames_reported);
            if delta != 0 {
                self.ctl.frames.fetch_add(delta, Ordering::Relaxed);
                self.frames_reported = self.stats.frames;
            }
        }
    }

    fn pace_connects(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let now = mono_ns();
        let allowed = if self.rate <= 0.0 {
            u64::MAX
        } else {
            (now.saturating_sub(self.pace_start) as f64 * self.rate / 1e9) as u64 + 1
        };
        let mut n = 0;
        while self.paced < allowed && n < 256 {
            let Some(spec) = self.queue.pop_front() else {
                break;
            };
            self.start_connect(spec);
            self.paced += 1;
            n += 1;
        }
    }

    fn start_connect(&mut self, spec: Spec) {
        let now = mono_ns();
        self.stats.attempted += 1;
        if self.stats.first_attempt == 0 {
            self.stats.first_attempt = now;
        }
        let addr = self.cfg.targets[spec.target as usize].addr;
        let mut sock = match open_socket(addr, spec.src) {
            Ok(s) => s,
            Err(e) => {
                self.stats.fail(format!("local: {}", short_err(&e)));
                self.ctl.done.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            self.stats.fail(format!("register: {}", short_err(&e)));
            self.ctl.done.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.conns[slot] = Some(Conn {
            sock,
            user: spec.user,
            st: St::Connecting,
            started: now,
            inbuf: Vec::new(),
            out: Vec::new(),
            target: spec.target,
        });
    }

    fn conn_mut(&mut self, slot: usize) -> Option<&mut Conn> {
        self.conns.get_mut(slot).and_then(Option::as_mut)
    }

    /// Drops a connection: a failed attempt, or an open one the server cut.
    fn fail(&mut self, slot: usize, why: String) {
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::take) {
            self.free.push(slot);
            if c.st == St::Open {
                self.stats.dropped_open += 1;
                self.ctl.open.fetch_sub(1, Ordering::Relaxed);
            } else {
                self.stats.fail(why);
                self.ctl.done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn opened(&mut self, slot: usize, now: u64) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        c.st = St::Open;
        self.stats.opened += 1;
        self.stats.connect.record(now.saturating_sub(c.started));
        self.stats.last_open = self.stats.last_open.max(now);
        self.ctl.open.fetch_add(1, Ordering::Relaxed);
        self.ctl.done.fetch_add(1, Ordering::Relaxed);
    }

    fn on_event(&mut self, slot: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if conn.st == St::Connecting {
            match conn.sock.take_error() {
                Ok(Some(e)) | Err(e) => {
                    return self.fail(slot, format!("connect: {}", short_err(&e)));
                }
                Ok(None) => {}
            }
            match conn.sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(slot, format!("connect: {}", short_err(&e))),
            }
            if self.cfg.raw {
                self.opened(slot, mono_ns());
            } else {
                let req = self
                    .cfg
                    .request(&self.cfg.targets[conn.target as usize], conn.user);
                conn.st = St::Handshake;
                if !self.write(slot, &req) {
                    return;
                }
            }
        }
        if writable && !self.flush_out(slot) {
            return;
        }
        if readable {
            self.read_ready(slot);
        }
    }

    /// Writes or queues bytes; false when the connection is gone.
    fn write(&mut self, slot: usize, bytes: &[u8]) -> bool {
        let Some(conn) = self.conn_mut(slot) else {
            return false;
        };
        if !conn.out.is_empty() {
            conn.out.extend_from_slice(bytes);
            return true;
        }
        let mut off = 0;
        while off < bytes.len() {
            match conn.sock.write(&bytes[off..]) {
                Ok(0) => {
                    self.fail(slot, "write: zero".into());
                    return false;
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.out.extend_from_slice(&bytes[off..]);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(slot, format!("write: {}", short_err(&e)));
                    return false;
                }
            }
        }
        true
    }

    fn flush_out(&mut self, slot: usize) -> bool {
        let Some(conn) = self.conn_mut(slot) else {
            return false;
        };
        let mut off = 0;
        while off < conn.out.len() {
            match conn.sock.write(&conn.out[off..]) {
                Ok(0) => break,
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(slot, format!("write: {}", short_err(&e)));
                    return false;
                }
            }
        }
        conn.out.drain(..off);
        if conn.out.is_empty() && conn.out.capacity() > 4096 {
            conn.out = Vec::new();
        }
        true
    }

    fn read_ready(&mut self, slot: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(conn) = self.conn_mut(slot) {
            match conn.sock.read(&mut scratch) {
                Ok(0) => {
                    let why = if conn.st == St::Connecting {
                        "eof before connect"
                    } else {
                        "eof before 101"
                    };
                    self.fail(slot, why.into());
                    break;
                }
                Ok(n) => {
                    if !self.on_data(slot, &scratch[..n]) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(slot, format!("read: {}", short_err(&e)));
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Handles bytes read; false when the connection is gone.
    fn on_data(&mut self, slot: usize, data: &[u8]) -> bool {
        let now = mono_ns();
        let Some(conn) = self.conn_mut(slot) else {
            return false;
        };
        let mut buf = std::mem::take(&mut conn.inbuf);
        let alive = if buf.is_empty() {
            let (used, alive) = self.process(slot, data, now);
            if alive && used < data.len() {
                buf.extend_from_slice(&data[used..]);
            }
            alive
        } else {
            buf.extend_from_slice(data);
            let (used, alive) = self.process(slot, &buf, now);
            if alive {
                buf.drain(..used);
            }
            alive
        };
        if alive {
            if let Some(conn) = self.conn_mut(slot) {
                if buf.is_empty() && buf.capacity() > 4096 {
                    buf = Vec::new();
                }
                conn.inbuf = buf;
            }
        }
        alive
    }

    /// Consumes the 101 answer and complete frames from `input`; returns the
    /// bytes used and whether the connection is still there.
    fn process(&mut self, slot: usize, input: &[u8], now: u64) -> (usize, bool) {
        let Some(conn) = self.conn_mut(slot) else {
            return (0, false);
        };
        let user = conn.user;
        let mut pos = 0;
        match conn.st {
            St::Connecting => return (input.len(), true),
            St::Handshake => {
                let Some(end) = find(input, b"\r\n\r\n") else {
                    if input.len() > 16 * 1024 {
                        self.fail(slot, "101 answer too long".into());
                        return (0, false);
                    }
                    return (0, true);
                };
                let head = &input[..end];
                let status = std::str::from_utf8(head)
                    .ok()
                    .and_then(|h| h.split_whitespace().nth(1))
                    .and_then(|s| s.parse::<u16>().ok());
                if status != Some(101) {
                    let s = status.map_or("???".into(), |s| s.to_string());
                    self.fail(slot, format!("http {s}"));
                    return (0, false);
                }
                if find(head, WS_ACCEPT).is_none() {
                    self.fail(slot, "bad Sec-WebSocket-Accept".into());
                    return (0, false);
                }
                self.opened(slot, now);
                pos = end + 4;
            }
            St::Open => {}
        }
        loop {
            let rest = &input[pos..];
            if rest.len() < 2 {
                break;
            }
            let (b0, b1) = (rest[0], rest[1]);
            let mut len = (b1 & 0x7f) as u64;
            let mut hl = 2;
            if len == 126 {
                if rest.len() < 4 {
                    break;
                }
                len = u16::from_be_bytes([rest[2], rest[3]]) as u64;
                hl = 4;
            } else if len == 127 {
                if rest.len() < 10 {
                    break;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[2..10]);
                len = u64::from_be_bytes(b);
                hl = 10;
            }
            if b1 & 0x80 != 0 {
                hl += 4;
            }
            if len > 64 << 20 {
                self.fail(slot, "frame too large".into());
                return (pos, false);
            }
            let total = hl + len as usize;
            if rest.len() < total {
                break;
            }
            let payload = &rest[hl..total];
            pos += total;
            match b0 & 0x0f {
                0x1 => self.stats.on_text(user, payload, now),
                0x9 => {
                    self.stats.pings += 1;
                    let pong = masked_frame(0x8a, payload);
                    if !self.write(slot, &pong) {
                        return (pos, false);
                    }
                }
                0x8 => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    self.stats.closed_by_server += 1;
                    *self.stats.close_codes.entry(code).or_default() += 1;
                    let reply = masked_frame(0x88, &payload[..payload.len().min(2)]);
                    if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
                        let _ = c.sock.write(&reply);
                        self.free.push(slot);
                        self.ctl.open.fetch_sub(1, Ordering::Relaxed);
                    }
                    return (pos, false);
                }
                _ => self.stats.other_frames += 1,
            }
        }
        (pos, true)
    }

    fn close_all(&mut self) {
        let close = masked_frame(0x88, &1000u16.to_be_bytes());
        for slot in 0..self.conns.len() {
            if let Some(mut c) = self.conns[slot].take() {
                if c.st == St::Open {
                    let _ = c.sock.write(&close);
                    self.ctl.open.fetch_sub(1, Ordering::Relaxed);
                } else {
                    self.stats.fail("closed by the bench before open".into());
                    self.ctl.done.fetch_add(1, Ordering::Relaxed);
                }
                self.free.push(slot);
            }
        }
        self.queue.clear();
    }

    fn scan_timeouts(&mut self, now: u64) {
        let limit = self.cfg.timeout_ns;
        let late: Vec<usize> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.as_ref()
                    .filter(|c| c.st != St::Open && now.saturating_sub(c.started) > limit)
                    .map(|_| i)
            })
            .collect();
        for slot in late {
            self.fail(slot, "timeout".into());
        }
    }
}

impl Stats {
    fn on_text(&mut self, user: u32, p: &[u8], now: u64) {
        self.frames += 1;
        self.bytes += p.len() as u64;
        if self.first_rx == 0 {
            self.first_rx = now;
        }
        self.last_rx = now;
        let (Some(seq), Some(t)) = (json_num(p, b"\"seq\":"), json_num(p, b"\"t\":")) else {
            self.unparsed += 1;
            return;
        };
        if seq < self.seq_base {
            self.stale += 1;
            return;
        }
        let i = seq - self.seq_base;
        if i >= MAX_SEQ {
            self.unparsed += 1;
            return;
        }
        let i = i as usize;
        if i >= self.seq_count.len() {
            self.seq_count.resize(i + 1, 0);
            self.seq_max.resize(i + 1, 0);
        }
        let lat = now.saturating_sub(t);
        self.seq_count[i] += 1;
        self.seq_max[i] = self.seq_max[i].max(lat);
        self.lat.record(lat);
        if self.min_t == 0 || t < self.min_t {
            self.min_t = t;
        }
        if let Some(u) = json_num(p, b"\"userId\":") {
            if u != user as u64 {
                self.misrouted += 1;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The unsigned number after `key` (a string of digits in quotes counts).
fn json_num(p: &[u8], key: &[u8]) -> Option<u64> {
    let start = find(p, key)? + key.len();
    let mut v: u64 = 0;
    let mut any = false;
    for &b in &p[start..] {
        if b.is_ascii_digit() {
            v = v.wrapping_mul(10).wrapping_add((b - b'0') as u64);
            any = true;
        } else if b == b'"' && !any {
            continue;
        } else {
            break;
        }
    }
    any.then_some(v)
}

/// A client frame (masked), for control frames of up to 125 bytes.
fn masked_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(125);
    let mut f = Vec::with_capacity(6 + len);
    f.push(b0);
    f.push(0x80 | len as u8);
    f.extend_from_slice(&MASK);
    f.extend(
        payload[..len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ MASK[i % 4]),
    );
    f
}

fn short_err(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The client threads, driven from the main thread.
struct Clients {
    txs: Vec<(Sender<Cmd>, Arc<Waker>)>,
    joins: Vec<JoinHandle<()>>,
    ctl: Arc<Ctl>,
}

impl Clients {
    fn start(cfg: Arc<ClientCfg>, threads: usize) -> io::Result<Clients> {
        let ctl = Arc::new(Ctl::default());
        let mut txs = Vec::new();
        let mut joins = Vec::new();
        for i in 0..threads {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            let (tx, rx) = crossbeam_channel::unbounded();
            let lp = ClientLoop {
                poll,
                cfg: cfg.clone(),
                ctl: ctl.clone(),
                rx,
                conns: Vec::new(),
                free: Vec::new(),
                queue: VecDeque::new(),
                rate: 0.0,
                pace_start: 0,
                paced: 0,
                stats: Stats::default(),
                scratch: vec![0; 64 * 1024],
                frames_reported: 0,
                last_scan: 0,
            };
            joins.push(
                std::thread::Builder::new()
                    .name(format!("client-{i}"))
                    .spawn(move || lp.run())?,
            );
            txs.push((tx, waker));
        }
        Ok(Clients { txs, joins, ctl })
    }

    fn send(&self, i: usize, cmd: Cmd) {
        let _ = self.txs[i].0.send(cmd);
        let _ = self.txs[i].1.wake();
    }

    fn connect(&self, specs: Vec<Spec>, rate: f64) {
        let t = self.txs.len();
        let mut parts: Vec<Vec<Spec>> = vec![Vec::new(); t];
        for (i, s) in specs.into_iter().enumerate() {
            parts[i % t].push(s);
        }
        for (i, p) in parts.into_iter().enumerate() {
            self.send(i, Cmd::Connect(p, rate / t as f64));
        }
    }

    fn collect(&self, reset: Option<u64>) -> Stats {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..self.txs.len() {
            self.send(i, Cmd::Collect(reset, tx.clone()));
        }
        let mut s = Stats::default();
        for _ in 0..self.txs.len() {
            if let Ok(st) = rx.recv_timeout(Duration::from_secs(60)) {
                s.merge(&st);
            }
        }
        if let Some(b) = reset {
            s.seq_base = b;
        }
        s
    }

    fn open_users(&self) -> Vec<u32> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..self.txs.len() {
            self.send(i, Cmd::OpenUsers(tx.clone()));
        }
        let mut all = Vec::new();
        for _ in 0..self.txs.len() {
            if let Ok(v) = rx.recv_timeout(Duration::from_secs(60)) {
                all.extend(v);
            }
        }
        all.sort_unstable();
        all
    }

    fn open(&self) -> u64 {
        self.ctl.open.load(Ordering::Relaxed)
    }

    fn frames(&self) -> u64 {
        self.ctl.frames.load(Ordering::Relaxed)
    }

    fn close_all(&self) {
        for i in 0..self.txs.len() {
            self.send(i, Cmd::CloseAll);
        }
    }

    fn stop(self) {
        for i in 0..self.txs.len() {
            self.send(i, Cmd::Stop);
        }
        for j in self.joins {
            let _ = j.join();
        }
    }
}

// ---------------------------------------------------------------- publisher

struct PubReport {
    sent: u64,
    start: u64,
    end: u64,
    min_receivers: i64,
}

impl PubReport {
    fn rate(&self) -> f64 {
        let secs = self.end.saturating_sub(self.start) as f64 / 1e9;
        if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        }
    }
}

type MakeNotice = Box<dyn FnMut(u64, u64, &mut Vec<u8>) + Send>;

/// PUBLISHes `count` notices at `rate`/s (0: all at once) in pipelined
/// batches, from a thread of its own. `make(seq, t, buf)` writes one notice.
fn publisher(
    url: String,
    channel: String,
    rate: f64,
    count: u64,
    seq0: u64,
    mut make: MakeNotice,
) -> JoinHandle<Result<PubReport, String>> {
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let client = redis::Client::open(url.as_str()).map_err(|e| format!("redis: {e}"))?;
            let mut con = client
                .get_connection_with_timeout(Duration::from_secs(5))
                .map_err(|e| format!("redis: {e}"))?;
            let start = mono_ns();
            let mut sent = 0u64;
            let mut min_receivers = i64::MAX;
            let mut buf = Vec::with_capacity(256);
            while sent < count {
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
                    pipe.cmd("PUBLISH").arg(&channel).arg(&buf[..]);
                }
                let r: Vec<i64> = pipe.query(&mut con).map_err(|e| format!("PUBLISH: {e}"))?;
                for x in r {
                    min_receivers = min_receivers.min(x);
                }
                sent += n;
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
fn wait_subscribers(url: &str, channel: &str, want: i64) -> Result<i64, String> {
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
fn user_for(users: &[u32], seq: u64) -> u32 {
    users[(splitmix(seq ^ 0x5eed) % users.len() as u64) as usize]
}

fn pad_text(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(",\"pad\":\"{}\"", "x".repeat(n))
    }
}

// ---------------------------------------------------------------- reporting

struct Report {
    title: String,
    rows: Vec<(String, String)>,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn new(o: &Opts, scenario: &str) -> Report {
        let mut r = Report {
            title: scenario.to_string(),
            rows: Vec::new(),
            json: serde_json::Map::new(),
        };
        r.set("scenario", scenario);
        if let Some(l) = &o.label {
            r.set("label", l.as_str());
        }
        let cmd: Vec<String> = std::env::args().collect();
        r.set("cmd", cmd.join(" "));
        r.set("connections", o.connections as u64);
        r.set("threads", o.threads as u64);
        r.set("urls", json!(o.urls));
        r.set(
            "auth",
            match o.auth {
                Auth::Jwt => "jwt",
                Auth::Query => "query",
                Auth::Header => "header",
            },
        );
        r
    }

    fn row(&mut self, k: &str, v: impl Into<String>) {
        self.rows.push((k.to_string(), v.into()));
    }

    fn set(&mut self, k: &str, v: impl Into<Value>) {
        self.json.insert(k.to_string(), v.into());
    }

    fn print(&self, json_only: bool) {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut table = format!("== {} ==\n", self.title);
        for (k, v) in &self.rows {
            table.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        let line = Value::Object(self.json.clone()).to_string();
        if json_only {
            eprint!("{table}");
            println!("{line}");
        } else {
            print!("{table}");
            println!("{line}");
        }
        let _ = io::stdout().flush();
    }
}

fn opt_f(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!((x * 10.0).round() / 10.0))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Where the server's memory and CPU are read from.
struct Probe {
    pids: Vec<u32>,
    admins: Vec<String>,
}

impl Probe {
    fn new(o: &Opts) -> Probe {
        Probe {
            pids: o.pids.clone(),
            admins: o.admins.clone(),
        }
    }

    fn rss(&self) -> Option<u64> {
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

    fn ticks(&self) -> Option<u64> {
        if self.pids.is_empty() {
            None
        } else {
            self.pids.iter().map(|p| proc_cpu_ticks(*p)).sum()
        }
    }

    fn syscw(&self) -> Option<u64> {
        if self.pids.is_empty() {
            None
        } else {
            self.pids.iter().map(|p| proc_syscw(*p)).sum()
        }
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        if self.admins.is_empty() {
            return None;
        }
        self.admins
            .iter()
            .map(|a| http_get(a, "/metrics").and_then(|b| metric(&b, name)))
            .sum()
    }
}

struct Window {
    wall: u64,
    me: u64,
    srv: Option<u64>,
    threads: BTreeMap<String, u64>,
    machine: Option<(u64, u64)>,
    syscw: Option<u64>,
}

/// A measurement window: seconds, bench CPU %, server CPU % and the
/// server's per-thread CPU % (percent of one core).
#[derive(Clone)]
struct Cpu {
    secs: f64,
    bench: f64,
    server: Option<f64>,
    threads: BTreeMap<String, f64>,
    /// The whole machine (every process), in % of one core.
    machine: Option<f64>,
    /// Write system calls the server made in the window.
    writes: Option<u64>,
}

impl Cpu {
    /// Server CPU time in nanoseconds over the window.
    fn server_ns(&self) -> Option<f64> {
        self.server.map(|p| p / 100.0 * self.secs * 1e9)
    }
}

impl Window {
    fn start(p: &Probe) -> Window {
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
        }
    }

    fn end(&self, p: &Probe) -> Cpu {
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
        Cpu {
            secs: wall / 1e9,
            bench: me,
            server: srv,
            threads,
            machine,
            writes,
        }
    }
}

fn cpu_rows(r: &mut Report, prefix: &str, c: &Cpu) {
    r.row(
        &format!("{prefix} CPU (% of one core)"),
        format!(
            "server {}  bench {:.1}  whole machine {} ({} cores)  over {:.2} s",
            c.server
                .map_or("n/a (give --server-pid)".into(), |s| format!("{s:.1}")),
            c.bench,
            c.machine.map_or("n/a".into(), |m| format!("{m:.0}")),
            ncpu(),
            c.secs
        ),
    );
    if !c.threads.is_empty() {
        let t: Vec<String> = c
            .threads
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect();
        r.row(&format!("{prefix} server threads %"), t.join(", "));
    }
    r.set(&format!("{prefix}_server_cpu_pct"), opt_f(c.server));
    r.set(&format!("{prefix}_bench_cpu_pct"), opt_f(Some(c.bench)));
    r.set(&format!("{prefix}_server_threads_pct"), json!(c.threads));
    r.set(&format!("{prefix}_machine_busy_pct"), opt_f(c.machine));
    r.set(
        &format!("{prefix}_secs"),
        (c.secs * 1000.0).round() / 1000.0,
    );
}

fn barrier(dir: &Option<String>) -> Result<(), String> {
    let Some(dir) = dir else { return Ok(()) };
    std::fs::create_dir_all(dir).map_err(|e| format!("--barrier {dir}: {e}"))?;
    let me = format!("{dir}/ready.{}", std::process::id());
    std::fs::write(&me, b"ready\n").map_err(|e| format!("{me}: {e}"))?;
    eprintln!("  barrier: waiting for {dir}/go");
    let until = Instant::now() + Duration::from_secs(3600);
    while !std::path::Path::new(&format!("{dir}/go")).exists() {
        if Instant::now() > until {
            return Err("barrier: no go within an hour".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ---------------------------------------------------------------- scenarios

fn client_cfg(o: &Opts, raw_targets: Option<Vec<Target>>) -> Result<ClientCfg, String> {
    let raw = raw_targets.is_some();
    let targets = match raw_targets {
        Some(t) => t,
        None => o
            .urls
            .iter()
            .map(|u| parse_ws_url(u))
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(ClientCfg {
        targets,
        auth: o.auth,
        secret: o.secret.as_bytes().to_vec(),
        user_header: o.user_header.clone(),
        raw,
        timeout_ns: (o.timeout * 1e9) as u64,
    })
}

struct Connected {
    clients: Clients,
    stats: Stats,
}

fn connect_phase(o: &Opts, cfg: ClientCfg, rate: f64) -> Result<Connected, String> {
    let n = o.connections;
    let ntargets = cfg.targets.len();
    let clients =
        Clients::start(Arc::new(cfg), o.threads).map_err(|e| format!("client loops: {e}"))?;
    let users = o.users.unwrap_or(n).max(1);
    let specs: Vec<Spec> = (0..n)
        .map(|i| Spec {
            user: (o.user_offset + i % users) as u32,
            target: (i % ntargets) as u16,
            src: src_for(i + o.user_offset),
        })
        .collect();
    clients.connect(specs, rate);
    let paced = if rate > 0.0 { n as f64 / rate } else { 0.0 };
    let until = Instant::now() + Duration::from_secs_f64(o.timeout + paced + 30.0);
    let mut last = Instant::now();
    while clients.ctl.done.load(Ordering::Relaxed) < n as u64 {
        if Instant::now() > until {
            eprintln!("  connect phase: gave up waiting");
            break;
        }
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            eprintln!(
                "  connecting: {}/{n} done, {} open",
                clients.ctl.done.load(Ordering::Relaxed),
                clients.open()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = clients.collect(None);
    Ok(Connected { clients, stats })
}

fn connect_rows(r: &mut Report, st: &Stats, n: usize) {
    let secs = st.last_open.saturating_sub(st.first_attempt) as f64 / 1e9;
    let rate = if secs > 0.0 {
        st.opened as f64 / secs
    } else {
        0.0
    };
    r.row(
        "connections",
        format!(
            "{} open of {n} attempted, {} failed",
            st.opened,
            st.failed()
        ),
    );
    if !st.fails.is_empty() {
        let f: Vec<String> = st.fails.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        r.row("failures", f.join(", "));
    }
    r.row(
        "connect rate",
        format!("{rate:.0} handshakes/s ({} in {secs:.2} s)", st.opened),
    );
    r.row("connect time", hist_line(&st.connect));
    r.set("open", st.opened);
    r.set("failed", st.failed());
    r.set("failures", json!(st.fails));
    r.set("connect_per_s", opt_f(Some(rate)));
    r.set("connect_secs", (secs * 1000.0).round() / 1000.0);
    r.set("connect_time", hist_json(&st.connect));
}

fn life_rows(r: &mut Report, st: &Stats) {
    r.row(
        "after open",
        format!(
            "{} closed by the server {:?}, {} dropped without close, {} pings answered",
            st.closed_by_server, st.close_codes, st.dropped_open, st.pings
        ),
    );
    r.set("closed_by_server", st.closed_by_server);
    r.set("close_codes", json!(st.close_codes));
    r.set("dropped", st.dropped_open);
    r.set("pings", st.pings);
}

/// `idle` and `connect`.
fn idle(o: &Opts, storm: bool) -> Result<(), String> {
    let probe = Probe::new(o);
    let mut r = Report::new(o, if storm { "connect" } else { "idle" });
    let rate = o.connect_rate.unwrap_or(if storm { 0.0 } else { 5000.0 });
    let rss0 = probe.rss();
    let sock0 = sockstat_mem();
    let slab0 = meminfo_slab();
    let me0 = proc_rss(std::process::id());
    let w = Window::start(&probe);
    let c = connect_phase(o, client_cfg(o, None)?, rate)?;
    let during = w.end(&probe);
    connect_rows(&mut r, &c.stats, o.connections);
    r.set("connect_rate_asked", rate);
    barrier(&o.barrier)?;
    cpu_rows(&mut r, "connect", &during);
    // Let the loops settle (handshake buffers freed) before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let rss1 = probe.rss();
    let sock1 = sockstat_mem();
    let slab1 = meminfo_slab();
    let me1 = proc_rss(std::process::id());
    let open = c.stats.opened.max(1);
    if let (Some(a), Some(b)) = (rss0, rss1) {
        let per = (b as f64 - a as f64) / open as f64;
        r.row(
            "server RSS",
            format!(
                "{} before, {} with {} open: {per:.0} bytes per connection",
                mib(a),
                mib(b),
                c.stats.opened
            ),
        );
        r.set("server_rss_before", a);
        r.set("server_rss_after", b);
        r.set("server_bytes_per_conn", per.round());
    } else {
        r.row("server RSS", "n/a (give --server-pid or --admin)");
    }
    if let (Some(a), Some(b)) = (sock0, sock1) {
        let per = (b as f64 - a as f64) / open as f64;
        r.row(
            "kernel TCP buffers",
            format!("{per:.0} bytes per connection, both ends (/proc/net/sockstat mem)"),
        );
        r.set("kernel_tcp_bytes_per_conn", per.round());
    }
    if let (Some(a), Some(b)) = (slab0, slab1) {
        let per = (b as f64 - a as f64) / open as f64;
        r.row(
            "kernel slab",
            format!("{per:.0} bytes per connection, both ends (/proc/meminfo Slab, machine-wide: noisy)"),
        );
        r.set("kernel_slab_bytes_per_conn", per.round());
    }
    if let (Some(a), Some(b)) = (me0, me1) {
        let per = (b as f64 - a as f64) / open as f64;
        r.row("bench RSS", format!("{per:.0} bytes per connection"));
        r.set("bench_bytes_per_conn", per.round());
    }
    if let Some(g) = probe.gauge("pushwire_connections") {
        r.row("server gauge", format!("pushwire_connections {g}"));
        r.set("server_connections_gauge", g);
    }
    if !storm {
        let secs = o.seconds.unwrap_or(10.0);
        let w = Window::start(&probe);
        std::thread::sleep(Duration::from_secs_f64(secs));
        cpu_rows(&mut r, "idle", &w.end(&probe));
        if let Some(b) = probe.rss() {
            r.row("server RSS after idle", mib(b));
            r.set("server_rss_after_idle", b);
        }
    }
    let st = c.clients.collect(None);
    life_rows(&mut r, &st);
    c.clients.close_all();
    std::thread::sleep(Duration::from_millis(300));
    c.clients.stop();
    r.print(o.json);
    Ok(())
}

fn need_redis(o: &Opts) -> Result<String, String> {
    let url = o
        .redis
        .clone()
        .ok_or("this scenario publishes through Redis: give --redis redis://127.0.0.1:PORT")?;
    check_loopback_url(&url, "redis://")?;
    Ok(url)
}

struct Step {
    rate: f64,
    sent: u64,
    achieved: f64,
    delivered: u64,
    lost: u64,
    dup: u64,
    misrouted: u64,
    dropped: u64,
    lat: Hist,
    cpu: Cpu,
    receivers: i64,
}

impl Step {
    fn passes(&self, p99_ms: f64) -> bool {
        self.lost == 0
            && self.dup == 0
            && self.sent > 0
            && ms(self.lat.q(0.99)) < p99_ms
            && self.achieved >= 0.95 * self.rate
    }

    fn json(&self) -> Value {
        json!({
            "rate": self.rate,
            "sent": self.sent,
            "achieved_rate": (self.achieved * 10.0).round() / 10.0,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicated": self.dup,
            "misrouted": self.misrouted,
            "dropped_connections": self.dropped,
            "latency": hist_json(&self.lat),
            "server_cpu_pct": opt_f(self.cpu.server),
            "bench_cpu_pct": opt_f(Some(self.cpu.bench)),
            "server_threads_pct": json!(self.cpu.threads),
            "machine_busy_pct": opt_f(self.cpu.machine),
            "server_write_calls": self.cpu.writes,
            "server_cpu_us_per_notice": self.cpu.server_ns().map(|ns| ((ns / self.sent.max(1) as f64 / 1e3) * 100.0).round() / 100.0),
            "min_receivers": self.receivers,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn targeted_step(
    o: &Opts,
    redis: &str,
    clients: &Clients,
    probe: &Probe,
    users: &Arc<Vec<u32>>,
    mult: &Arc<std::collections::HashMap<u32, u32>>,
    rate: f64,
    secs: f64,
    seq0: u64,
) -> Result<Step, String> {
    let before = clients.collect(Some(seq0));
    let count = (rate * secs).round().max(1.0) as u64;
    let frames0 = clients.frames();
    let u = users.clone();
    let pad = pad_text(o.pad);
    let make: MakeNotice = Box::new(move |seq, t, buf| {
        let user = user_for(&u, seq);
        let _ = write!(
            buf,
            "{{\"userId\":\"{user}\",\"seq\":{seq},\"t\":{t}{pad}}}"
        );
    });
    let w = Window::start(probe);
    let rep = publisher(redis.into(), o.channel.clone(), rate, count, seq0, make)
        .join()
        .map_err(|_| "publisher panicked")??;
    let cpu = w.end(probe);
    let expected: u64 = (0..rep.sent)
        .map(|k| *mult.get(&user_for(users, seq0 + k)).unwrap_or(&1) as u64)
        .sum();
    let until = Instant::now() + Duration::from_secs_f64(o.drain);
    while clients.frames() - frames0 < expected && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = clients.collect(None);
    let (mut delivered, mut lost, mut dup) = (0, 0, 0);
    for k in 0..rep.sent {
        let want = *mult.get(&user_for(users, seq0 + k)).unwrap_or(&1) as u64;
        let got = st.seq_count.get(k as usize).copied().unwrap_or(0) as u64;
        delivered += got.min(want);
        lost += want.saturating_sub(got);
        dup += got.saturating_sub(want);
    }
    Ok(Step {
        rate,
        sent: rep.sent,
        achieved: rep.rate(),
        delivered,
        lost,
        dup,
        misrouted: st.misrouted,
        dropped: (st.dropped_open + st.closed_by_server)
            .saturating_sub(before.dropped_open + before.closed_by_server),
        lat: st.lat,
        cpu,
        receivers: rep.min_receivers,
    })
}

fn step_row(s: &Step) -> String {
    format!(
        "{:>8.0}/s sent {} ({:.0}/s) delivered {} lost {} dup {} | {} | server CPU {} bench {:.0}% machine {}%",
        s.rate,
        s.sent,
        s.achieved,
        s.delivered,
        s.lost,
        s.dup,
        hist_line(&s.lat),
        s.cpu.server.map_or("n/a".into(), |c| format!("{c:.0}%")),
        s.cpu.bench,
        s.cpu.machine.map_or("n/a".into(), |c| format!("{c:.0}"))
    )
}

/// `targeted` and `two-nodes`.
fn targeted(o: &Opts, name: &str) -> Result<(), String> {
    let redis = need_redis(o)?;
    let probe = Probe::new(o);
    let mut r = Report::new(o, name);
    let rate0 = o.rate.unwrap_or(1000.0);
    let c = connect_phase(o, client_cfg(o, None)?, o.connect_rate.unwrap_or(5000.0))?;
    connect_rows(&mut r, &c.stats, o.connections);
    let all = c.clients.open_users();
    if all.is_empty() {
        c.clients.stop();
        return Err("no connection opened".into());
    }
    let mut mult = std::collections::HashMap::new();
    for u in &all {
        *mult.entry(*u).or_insert(0u32) += 1;
    }
    let mut users = all.clone();
    users.dedup();
    let users = Arc::new(users);
    let mult = Arc::new(mult);
    let nodes = o.urls.len() as i64;
    let subs = wait_subscribers(&redis, &o.channel, nodes)?;
    r.row("nodes subscribed", subs.to_string());
    r.set("users", users.len() as u64);
    barrier(&o.barrier)?;
    if let Some(rss) = probe.rss() {
        r.row("server RSS", mib(rss));
        r.set("server_rss", rss);
    }
    let mut seq0 = 0;
    if !o.max {
        let secs = o.seconds.unwrap_or(10.0);
        let s = targeted_step(o, &redis, &c.clients, &probe, &users, &mult, rate0, secs, 0)?;
        r.row(
            "published",
            format!(
                "{} notices at {:.0}/s asked, {:.0}/s achieved, PUBLISH receivers >= {}",
                s.sent, rate0, s.achieved, s.receivers
            ),
        );
        r.row(
            "delivered",
            format!(
                "{} (lost {}, duplicated {}, misrouted {}, connections dropped {})",
                s.delivered, s.lost, s.dup, s.misrouted, s.dropped
            ),
        );
        r.row("latency PUBLISH->receipt", hist_line(&s.lat));
        cpu_rows(&mut r, "publish", &s.cpu);
        if let Value::Object(m) = s.json() {
            for (k, v) in m {
                if !k.contains("cpu_pct") && !k.contains("threads_pct") && !k.contains("machine") {
                    r.json.insert(k, v);
                }
            }
        }
    } else {
        let secs = o.seconds.unwrap_or(5.0);
        let mut rate = rate0;
        let mut best: Option<Step> = None;
        let mut fail_rate: Option<f64> = None;
        let mut steps = Vec::new();
        let mut bisect = 0;
        loop {
            let s = targeted_step(
                o, &redis, &c.clients, &probe, &users, &mult, rate, secs, seq0,
            )?;
            seq0 += s.sent + 1000;
            let ok = s.passes(o.p99_ms);
            eprintln!("  {} {}", if ok { "pass" } else { "FAIL" }, step_row(&s));
            r.row(
                &format!("step {}", steps.len() + 1),
                format!("{} {}", if ok { "pass" } else { "FAIL" }, step_row(&s)),
            );
            steps.push(s.json());
            if ok {
                best = Some(s);
            } else {
                fail_rate = Some(rate);
            }
            let b = best.as_ref().map(|s| s.rate);
            rate = match (b, fail_rate) {
                (Some(b), None) => b * 1.5,
                (Some(b), Some(f)) if bisect < 3 && f / b > 1.1 => {
                    bisect += 1;
                    ((b + f) / 2.0).round()
                }
                (None, Some(f)) if f > 100.0 && bisect < 4 => {
                    bisect += 1;
                    (f / 2.0).round()
                }
                _ => break,
            };
            if rate > 2_000_000.0 {
                break;
            }
        }
        r.set("steps", Value::Array(steps));
        match &best {
            Some(b) => {
                r.row(
                    "highest passing rate",
                    format!(
                        "{:.0}/s (p99 < {} ms, no loss): {}",
                        b.rate,
                        o.p99_ms,
                        hist_line(&b.lat)
                    ),
                );
                r.set("max_rate", b.rate);
                r.set("max_rate_p99_ms", ms(b.lat.q(0.99)));
            }
            None => {
                r.row("highest passing rate", "none");
                r.set("max_rate", Value::Null);
            }
        }
        r.set("first_failing_rate", opt_f(fail_rate));
    }
    if let Some(rss) = probe.rss() {
        r.row("server RSS after traffic", mib(rss));
        r.set("server_rss_after_traffic", rss);
    }
    let st = c.clients.collect(None);
    life_rows(&mut r, &st);
    c.clients.close_all();
    std::thread::sleep(Duration::from_millis(300));
    c.clients.stop();
    r.print(o.json);
    Ok(())
}

/// Rows for `broadcast` and `limit`: M notices expected on each of `open`.
fn broadcast_rows(r: &mut Report, st: &Stats, m: u64, open: u64, cpu: &Cpu) {
    let expected = m * open;
    let mut comp = Hist::default();
    let mut incomplete = 0;
    for i in 0..m as usize {
        let got = st.seq_count.get(i).copied().unwrap_or(0) as u64;
        if got >= open {
            comp.record(st.seq_max[i]);
        } else {
            incomplete += 1;
        }
    }
    let delivered: u64 = st
        .seq_count
        .iter()
        .take(m as usize)
        .map(|c| *c as u64)
        .sum();
    let window = st.last_rx.saturating_sub(st.min_t) as f64 / 1e9;
    let per_s = if window > 0.0 {
        delivered as f64 / window
    } else {
        0.0
    };
    r.row(
        "delivered",
        format!(
            "{delivered} of {expected} ({} notices x {open} connections), {incomplete} notices not on every connection",
            m
        ),
    );
    r.row(
        "throughput",
        format!("{per_s:.0} deliveries/s ({:.0} bytes/s of payload) over {window:.3} s from first publish to last receipt",
            if window > 0.0 { st.bytes as f64 / window } else { 0.0 }),
    );
    r.row("until the last connection has it", hist_line(&comp));
    r.row("each delivery", hist_line(&st.lat));
    r.set("expected", expected);
    r.set("delivered", delivered);
    r.set("incomplete_notices", incomplete);
    r.set("deliveries_per_s", opt_f(Some(per_s)));
    r.set("window_secs", (window * 1000.0).round() / 1000.0);
    if let Some(ns) = cpu.server_ns() {
        let per = ns / delivered.max(1) as f64 / 1e3;
        r.row(
            "server CPU per delivery",
            format!("{per:.2} us (CPU ticks are 10 ms: rough when the window is short)"),
        );
        r.set("server_cpu_us_per_delivery", (per * 100.0).round() / 100.0);
    }
    if let Some(w) = cpu.writes {
        let per = delivered as f64 / w.max(1) as f64;
        r.row(
            "server write calls",
            format!("{w} ({per:.2} deliveries per call; /proc/PID/io syscw counts write/writev, not send)"),
        );
        r.set("server_write_calls", w);
        r.set("deliveries_per_write", (per * 100.0).round() / 100.0);
    }
    r.set("complete_latency", hist_json(&comp));
    r.set("delivery_latency", hist_json(&st.lat));
}

/// Waits until `want` text frames arrived or nothing arrives for `quiet`.
fn wait_frames(clients: &Clients, want: u64, quiet: Duration, cap: Duration) {
    let start = Instant::now();
    let mut last_n = clients.frames();
    let mut last_change = Instant::now();
    let mut last_print = Instant::now();
    while clients.frames() < want && start.elapsed() < cap {
        let n = clients.frames();
        if n != last_n {
            last_n = n;
            last_change = Instant::now();
        } else if last_change.elapsed() > quiet {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!("  received {n}/{want}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn broadcast(o: &Opts) -> Result<(), String> {
    let probe = Probe::new(o);
    let mut r = Report::new(o, "broadcast");
    let m = o.messages as u64;
    let rate = o.rate.unwrap_or(0.0);
    let redis = if o.publish {
        Some(need_redis(o)?)
    } else {
        None
    };
    let c = connect_phase(o, client_cfg(o, None)?, o.connect_rate.unwrap_or(5000.0))?;
    connect_rows(&mut r, &c.stats, o.connections);
    if let Some(url) = &redis {
        wait_subscribers(url, &o.channel, o.urls.len() as i64)?;
    }
    // Reset before the barrier: another process may publish as soon as it
    // passes it, and frames counted before a later reset would be lost.
    let open = c.clients.open();
    let frames0 = c.clients.frames();
    c.clients.collect(Some(0));
    barrier(&o.barrier)?;
    if let Some(rss) = probe.rss() {
        r.row("server RSS", mib(rss));
        r.set("server_rss", rss);
    }
    let pad = pad_text(o.pad);
    let w = Window::start(&probe);
    if let Some(url) = redis {
        let make: MakeNotice = Box::new(move |seq, t, buf| {
            let _ = write!(buf, "{{\"broadcast\":true,\"seq\":{seq},\"t\":{t}{pad}}}");
        });
        let rep = publisher(url, o.channel.clone(), rate, m, 0, make)
            .join()
            .map_err(|_| "publisher panicked")??;
        r.row(
            "published",
            format!(
                "{} broadcast notices, {} ({:.0}/s achieved), PUBLISH receivers >= {}",
                rep.sent,
                if rate > 0.0 {
                    format!("{rate}/s asked")
                } else {
                    "all at once".into()
                },
                rep.rate(),
                rep.min_receivers
            ),
        );
        r.set("messages", rep.sent);
        r.set("rate", rate);
    } else {
        r.row("published", "by another process (--no-publish)");
    }
    let cap = Duration::from_secs_f64(
        o.seconds.unwrap_or(60.0) + if rate > 0.0 { m as f64 / rate } else { 0.0 },
    );
    wait_frames(
        &c.clients,
        frames0 + m * open,
        Duration::from_secs_f64(o.drain.max(1.0)),
        cap,
    );
    let cpu = w.end(&probe);
    let st = c.clients.collect(None);
    broadcast_rows(&mut r, &st, m, open, &cpu);
    cpu_rows(&mut r, "broadcast", &cpu);
    if let Some(rss) = probe.rss() {
        r.row("server RSS after traffic", mib(rss));
        r.set("server_rss_after_traffic", rss);
    }
    life_rows(&mut r, &st);
    c.clients.close_all();
    std::thread::sleep(Duration::from_millis(300));
    c.clients.stop();
    r.print(o.json);
    Ok(())
}

/// The parent side of `limit`: a child process of this binary writes.
fn limit(o: &Opts) -> Result<(), String> {
    let mut r = Report::new(o, "limit");
    let m = o.messages as u64;
    let rate = o.rate.unwrap_or(0.0);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "limit-serve".to_string(),
            "--messages".into(),
            m.to_string(),
            "--rate".into(),
            rate.to_string(),
            "--batch".into(),
            o.batch.to_string(),
            "--pad".into(),
            o.pad.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn the limit writer: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let port_line = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the limit writer did not start")?;
    let port: u16 = port_line
        .strip_prefix("PORT ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("limit writer said {port_line:?}"))?;
    let target = Target {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        host: format!("127.0.0.1:{port}"),
        path: "/".into(),
    };
    let probe = Probe {
        pids: vec![child.id()],
        admins: Vec::new(),
    };
    let rss0 = probe.rss();
    let c = connect_phase(
        o,
        client_cfg(o, Some(vec![target]))?,
        o.connect_rate.unwrap_or(5000.0),
    )?;
    connect_rows(&mut r, &c.stats, o.connections);
    let open = c.clients.open();
    c.clients.collect(Some(0));
    let frames0 = c.clients.frames();
    let w = Window::start(&probe);
    writeln!(stdin, "GO").map_err(|e| format!("limit writer: {e}"))?;
    let cap = Duration::from_secs_f64(
        o.seconds.unwrap_or(60.0) + if rate > 0.0 { m as f64 / rate } else { 0.0 },
    );
    wait_frames(
        &c.clients,
        frames0 + m * open,
        Duration::from_secs_f64(o.drain.max(1.0)),
        cap,
    );
    let mut cpu = w.end(&probe);
    let rss1 = probe.rss();
    let done = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    // The writer sends with send(2), which /proc/PID/io does not count:
    // take its own count.
    cpu.writes = done
        .split(", ")
        .find_map(|part| part.strip_suffix(" write calls"))
        .and_then(|n| n.parse().ok());
    let st = c.clients.collect(None);
    r.row(
        "writer",
        format!(
            "bare mio writer of pre-framed bytes, {} frame(s) per write, {}",
            o.batch,
            if rate > 0.0 {
                format!("{rate}/s")
            } else {
                "as fast as possible".into()
            }
        ),
    );
    r.row("writer says", done.clone());
    r.set("writer", done);
    r.set("messages", m);
    r.set("rate", rate);
    r.set("batch", o.batch as u64);
    broadcast_rows(&mut r, &st, m, open, &cpu);
    cpu_rows(&mut r, "broadcast", &cpu);
    if let (Some(a), Some(b)) = (rss0, rss1) {
        r.row(
            "writer RSS",
            format!(
                "{} before, {} after: {:.0} bytes per connection",
                mib(a),
                mib(b),
                (b as f64 - a as f64) / open.max(1) as f64
            ),
        );
    }
    life_rows(&mut r, &st);
    c.clients.close_all();
    drop(stdin);
    std::thread::sleep(Duration::from_millis(300));
    c.clients.stop();
    let _ = child.wait();
    r.print(o.json);
    Ok(())
}

struct RawConn {
    sock: TcpStream,
    pending: Vec<u8>,
}

/// Writes what it can; keeps the rest. True when nothing is left.
fn raw_write(c: &mut RawConn, bytes: &[u8], writes: &mut u64) -> bool {
    let mut off = 0;
    while off < bytes.len() {
        *writes += 1;
        match c.sock.write(&bytes[off..]) {
            Ok(0) => return true,
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.pending.extend_from_slice(&bytes[off..]);
                return false;
            }
            Err(_) => return true,
        }
    }
    true
}

/// The child side of `limit`: accept, then on "GO" write M pre-framed text
/// frames to every connection, as fast as the kernel takes them.
fn limit_serve(o: &Opts) -> Result<(), String> {
    raise_nofile();
    let err = |e: io::Error| e.to_string();
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(err)?;
    s.listen(4096).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    let mut listener = TcpListener::from_std(s.into());
    let port = listener.local_addr().map_err(err)?.port();
    println!("PORT {port}");
    let _ = io::stdout().flush();
    let go = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    {
        let (go, quit) = (go.clone(), quit.clone());
        std::thread::spawn(move || {
            for line in io::stdin().lock().lines() {
                match line {
                    Ok(l) if l.trim() == "GO" => go.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            quit.store(true, Ordering::SeqCst);
        });
    }
    const LISTEN: Token = Token(usize::MAX - 1);
    let mut poll = Poll::new().map_err(err)?;
    poll.registry()
        .register(&mut listener, LISTEN, Interest::READABLE)
        .map_err(err)?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<RawConn> = Vec::new();
    let accept = |listener: &TcpListener, conns: &mut Vec<RawConn>, poll: &Poll| loop {
        match listener.accept() {
            Ok((mut sock, _)) => {
                let _ = sock.set_nodelay(true);
                let tok = Token(conns.len());
                if poll
                    .registry()
                    .register(&mut sock, tok, Interest::WRITABLE)
                    .is_ok()
                {
                    conns.push(RawConn {
                        sock,
                        pending: Vec::new(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    };
    while !go.load(Ordering::SeqCst) {
        if quit.load(Ordering::SeqCst) {
            return Ok(());
        }
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .map_err(err)?;
        accept(&listener, &mut conns, &poll);
    }
    accept(&listener, &mut conns, &poll);
    let m = o.messages as u64;
    let rate = o.rate.unwrap_or(0.0);
    let batch = o.batch as u64;
    let pad = pad_text(o.pad);
    let cpu0 = self_cpu_ns();
    let start = mono_ns();
    let mut next = 0u64;
    let mut backlog = 0usize;
    let mut writes = 0u64;
    let mut frames = Vec::new();
    let mut payload = Vec::new();
    while next < m || backlog > 0 {
        let due = if rate <= 0.0 {
            m
        } else {
            ((mono_ns() - start) as f64 * rate / 1e9) as u64 + 1
        }
        .min(m);
        if next < due {
            let k = (due - next).min(batch);
            frames.clear();
            let t = mono_ns();
            for seq in next..next + k {
                payload.clear();
                let _ = write!(
                    payload,
                    "{{\"broadcast\":true,\"seq\":{seq},\"t\":{t}{pad}}}"
                );
                frames.push(0x81);
                if payload.len() < 126 {
                    frames.push(payload.len() as u8);
                } else if payload.len() < 65536 {
                    frames.push(126);
                    frames.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                } else {
                    frames.push(127);
                    frames.extend_from_slice(&(payload.len() as u64).to_be_bytes());
                }
                frames.extend_from_slice(&payload);
            }
            for c in conns.iter_mut() {
                if !c.pending.is_empty() {
                    c.pending.extend_from_slice(&frames);
                } else if !raw_write(c, &frames, &mut writes) {
                    backlog += 1;
                }
            }
            next += k;
        }
        let more_now = next < m && (rate <= 0.0 || next < due);
        let timeout = if more_now {
            Duration::ZERO
        } else {
            Duration::from_millis(1)
        };
        poll.poll(&mut events, Some(timeout)).map_err(err)?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = conns.get_mut(i) else { continue };
            if c.pending.is_empty() {
                continue;
            }
            let data = std::mem::take(&mut c.pending);
            if raw_write(c, &data, &mut writes) {
                backlog -= 1;
            }
        }
        if quit.load(Ordering::SeqCst) {
            return Ok(());
        }
    }
    let elapsed = mono_ns() - start;
    let cpu = self_cpu_ns() - cpu0;
    println!(
        "DONE {} connections, {} frames each, {} write calls, {:.3} s, writer CPU {:.0}% of one core",
        conns.len(),
        m,
        writes,
        elapsed as f64 / 1e9,
        cpu as f64 / elapsed.max(1) as f64 * 100.0
    );
    let _ = io::stdout().flush();
    while !quit.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn main() {
    let o = match parse_opts(std::env::args_os().skip(1).collect()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("pushwire-bench: {e}");
            std::process::exit(2);
        }
    };
    let nofile = raise_nofile();
    if o.scenario != "limit-serve" && nofile < o.connections as u64 + 64 {
        eprintln!(
            "pushwire-bench: warning: RLIMIT_NOFILE is {nofile}, fewer than --connections {} needs",
            o.connections
        );
    }
    let result = match o.scenario.as_str() {
        "idle" => idle(&o, false),
        "connect" => idle(&o, true),
        "targeted" => targeted(&o, "targeted"),
        "two-nodes" => {
            if o.urls.len() < 2 {
                Err("two-nodes needs --url twice (one per node)".into())
            } else {
                targeted(&o, "two-nodes")
            }
        }
        "broadcast" => broadcast(&o),
        "limit" => limit(&o),
        "limit-serve" => limit_serve(&o),
        other => Err(format!("unknown scenario {other} (see --help)")),
    };
    if let Err(e) = result {
        eprintln!("pushwire-bench: {e}");
        std::process::exit(1);
    }
}
