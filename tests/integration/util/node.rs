//! The pushwire binary as a test runs it: started on free ports, its log
//! captured, its admin listener and metrics read, its process figures.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{http, http_raw, parse_response, token, wait_until, Client, Redis, SECRET};

pub const BIN: &str = env!("CARGO_BIN_EXE_pushwire");

/// The environment that turns on the server's test hooks: a client text
/// frame [`PANIC_HOOK`] panics in that connection's handler, and
/// [`STALL_HOOK`] makes its loop sleep 3 s.
pub const TEST_HOOKS: &[(&str, &str)] = &[("PUSHWIRE_TEST_HOOKS", "1")];
pub const PANIC_HOOK: &str = "__pushwire_test_panic__";
pub const STALL_HOOK: &str = "__pushwire_test_stall__";

/// The pushwire binary, killed on drop.
pub struct Node {
    pub child: Child,
    pub ws: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// A command for the binary without the systemd variables of the test
    /// process (were it run under systemd itself).
    pub fn command() -> Command {
        let mut c = Command::new(BIN);
        for v in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
        ] {
            c.env_remove(v);
        }
        c
    }

    /// Starts with `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0` and `args`.
    pub fn start(args: &[&str]) -> Node {
        Self::start_env(args, &[])
    }

    /// [`Node::start`] with environment variables set.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Node {
        Self::start_cmd(
            Self::command()
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
                .args(args)
                .envs(env.iter().copied()),
        )
    }

    /// A node with JWT auth (secret [`SECRET`]) on the given Redis, once ready.
    pub fn with_redis(redis: &Redis, args: &[&str]) -> Node {
        Self::with_redis_env(redis, args, &[])
    }

    /// [`Node::with_redis`] with environment variables set.
    pub fn with_redis_env(redis: &Redis, args: &[&str], env: &[(&str, &str)]) -> Node {
        let n = Self::on_redis_url_env(&redis.url(), args, env);
        assert!(
            n.wait_ready(Duration::from_secs(10)),
            "node did not become ready"
        );
        n
    }

    /// A node on `redis_url` (JWT auth, `--canary-interval 0.5`), not
    /// waiting for readiness: for Redis URLs with credentials, a proxy, or
    /// a Redis that is down.
    pub fn on_redis_url(redis_url: &str, args: &[&str]) -> Node {
        Self::on_redis_url_env(redis_url, args, &[])
    }

    fn on_redis_url_env(redis_url: &str, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut all = vec![
            "--redis",
            redis_url,
            "--jwt-secret",
            SECRET,
            "--canary-interval",
            "0.5",
        ];
        all.extend_from_slice(args);
        Self::start_env(&all, env)
    }

    /// Spawns `cmd` and waits for its `listening ws=... admin=...` line.
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

    /// A client of `user` at /ws by query auth (`--dev`, `--auth query`).
    pub fn connect_dev(&self, user: &str) -> Client {
        Client::connect(&self.url(&format!("/ws?user={user}"))).expect("upgrade")
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http(
            self.admin.unwrap(),
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    }

    /// POST /publish; returns the status and body of the answer.
    pub fn publish(&self, body: &str) -> (u16, String) {
        self.publish_bytes(body.as_bytes())
    }

    /// POST /publish with any bytes as the body (invalid UTF-8 included).
    pub fn publish_bytes(&self, body: &[u8]) -> (u16, String) {
        let mut req = format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        parse_response(http_raw(self.admin.unwrap(), &req).as_bytes())
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

    /// Waits until `pushwire_notices_received_total` reaches `target`, or
    /// stops moving for 3 s, or `timeout` passes; returns the count and the
    /// time.
    pub fn wait_received(&self, target: usize, timeout: Duration) -> (f64, Duration) {
        let t0 = Instant::now();
        let (mut last, mut since) = (-1.0, Instant::now());
        loop {
            let v = self.metric("pushwire_notices_received_total");
            if v >= target as f64
                || t0.elapsed() > timeout
                || since.elapsed() > Duration::from_secs(3)
            {
                return (v, t0.elapsed());
            }
            if v != last {
                (last, since) = (v, Instant::now());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process is running and `/healthz` answers 200.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none() && self.admin_get("/healthz").0 == 200
    }

    /// Resident memory, as the node reports it.
    pub fn rss(&self) -> f64 {
        self.metric("process_resident_memory_bytes")
    }

    /// CPU time (user + system) of the process so far, from /proc/PID/stat.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signals the child we started.
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
