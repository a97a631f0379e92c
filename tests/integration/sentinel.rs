//! Redis behind Sentinel (SPEC section 10): a master, a replica and three
//! Sentinels of the test's own on loopback, two nodes on a
//! `redis+sentinel://` URL, and the failovers operators meet: a forced
//! `SENTINEL FAILOVER` and a master killed with SIGKILL. Clients stay
//! connected, `/readyz` goes 503 then 200, the next notice on the new master
//! reaches every client, `POST /publish` never answers 202 for a notice
//! that is then lost, and the old master back as a replica does not pull a
//! node back. And a node pointed at a replica by a plain URL is not ready
//! and says why.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::*;

const MASTER_NAME: &str = "pwmaster";

/// A redis-server (or Sentinel) process of the test's own, killed on drop.
struct Server {
    port: u16,
    args: Vec<String>,
    pass: Option<String>,
    child: Option<Child>,
}

impl Server {
    fn start(port: u16, args: Vec<String>, pass: Option<&str>) -> Server {
        let mut s = Server {
            port,
            args,
            pass: pass.map(str::to_string),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self
                .cli(&["PING"])
                .is_ok_and(|r| r.contains("PONG"))),
            "redis-server did not start on port {}",
            self.port
        );
    }

    /// A command through redis-cli; its output, or the error text.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let mut c = Command::new("redis-cli");
        c.args(["-p", &self.port.to_string()]);
        if let Some(p) = &self.pass {
            c.args(["--no-auth-warning", "-a", p]);
        }
        let out = c
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let failed = text.starts_with("Could not connect")
            || text.starts_with("ERR")
            || text.starts_with("NOAUTH")
            || text.starts_with("NOGOODSLAVE")
            || text.starts_with("INPROG")
            || text.starts_with("WRONGPASS");
        if out.status.success() && !failed {
            Ok(text)
        } else {
            Err(text + &String::from_utf8_lossy(&out.stderr))
        }
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn role(&self) -> String {
        self.cli(&["ROLE"])
            .ok()
            .and_then(|r| r.lines().next().map(str::to_string))
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Credentials of a cluster.
#[derive(Clone, Copy)]
enum Auth {
    /// No passwords; the node logs in as an ACL user of the data nodes.
    AclUser,
    /// The data nodes and the Sentinels each need a password.
    Passwords,
}

const ACL_USER: &str = "pushwire";
const ACL_PASS: &str = "acl-pass";
const MASTER_PASS: &str = "master-pass";
const SENTINEL_PASS: &str = "sentinel-pass";

struct Cluster {
    auth: Auth,
    /// The two data nodes; which one is the master changes.
    data: Vec<Server>,
    sentinels: Vec<Server>,
    _dir: TempDir,
}

impl Cluster {
    fn start(auth: Auth) -> Cluster {
        let dir = TempDir::new("sentinel");
        let ports = [free_port(), free_port()];
        let data_args = |port: u16, replica_of: Option<u16>| {
            let mut a: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.path().display().to_string(),
                "--dbfilename",
                &format!("dump-{port}.rdb"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            match auth {
                Auth::AclUser => a.extend(
                    [
                        "--user",
                        ACL_USER,
                        "on",
                        &format!(">{ACL_PASS}"),
                        "~*",
                        "&*",
                        "+@all",
                    ]
                    .map(String::from),
                ),
                Auth::Passwords => a.extend(
                    ["--requirepass", MASTER_PASS, "--masterauth", MASTER_PASS].map(String::from),
                ),
            }
            if let Some(m) = replica_of {
                a.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
            }
            a
        };
        let pass = match auth {
            Auth::AclUser => None,
            Auth::Passwords => Some(MASTER_PASS),
        };
        let master = Server::start(ports[0], data_args(ports[0], None), pass);
        let replica = Server::start(ports[1], data_args(ports[1], Some(ports[0])), pass);
        assert!(
            wait_until(Duration::from_secs(10), || replica
                .cli(&["INFO", "replication"])
                .is_ok_and(|i| i.contains("master_link_status:up"))),
            "the replica did not sync"
        );
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(&format!("sentinel-{i}.conf"));
            let mut text = format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 10000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir.path().display(),
                ports[0]
            );
            if let Auth::Passwords = auth {
                text.push_str(&format!(
                    "requirepass {SENTINEL_PASS}\nsentinel sentinel-pass {SENTINEL_PASS}\n\
                     sentinel auth-pass {MASTER_NAME} {MASTER_PASS}\n"
                ));
            }
            std::fs::write(&conf, text).unwrap();
            let spass = match auth {
                Auth::AclUser => None,
                Auth::Passwords => Some(SENTINEL_PASS),
            };
            sentinels.push(Server::start(
                port,
                vec![conf.display().to_string(), "--sentinel".into()],
                spass,
            ));
        }
        let c = Cluster {
            auth,
            data: vec![master, replica],
            sentinels,
            _dir: dir,
        };
        // Every Sentinel knows the replica and the other two: a failover
        // can be agreed on.
        assert!(
            wait_until(Duration::from_secs(20), || c.sentinels.iter().all(|s| s
                .cli(&["SENTINEL", "CKQUORUM", MASTER_NAME])
                .is_ok_and(|r| r.contains("3 usable"))
                && s.cli(&["SENTINEL", "REPLICAS", MASTER_NAME])
                    .is_ok_and(|r| r.contains(&c.data[1].port.to_string())))),
            "the Sentinels did not settle"
        );
        c
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let hosts = hosts.join(",");
        match self.auth {
            Auth::AclUser => {
                format!("redis+sentinel://{ACL_USER}:{ACL_PASS}@{hosts}/{MASTER_NAME}")
            }
            Auth::Passwords => format!(
                "redis+sentinel://:{MASTER_PASS}@{hosts}/{MASTER_NAME}?sentinel_password={SENTINEL_PASS}"
            ),
        }
    }

    /// The master's port as the first Sentinel that answers says.
    fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let r = s
                .cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
                .ok()?;
            r.lines().nth(1)?.trim().parse().ok()
        })
    }

    fn data_on(&mut self, port: u16) -> &mut Server {
        self.data.iter_mut().find(|s| s.port == port).unwrap()
    }

    /// A data-node URL with the node's credentials.
    fn data_url(&self, port: u16) -> String {
        match self.auth {
            Auth::AclUser => format!("redis://{ACL_USER}:{ACL_PASS}@127.0.0.1:{port}"),
            Auth::Passwords => format!("redis://:{MASTER_PASS}@127.0.0.1:{port}"),
        }
    }

    /// PUBLISH on a data node; `None` when it cannot be reached.
    fn publish_on(&self, port: u16, payload: &str) -> Option<i64> {
        let client = redis::Client::open(self.data_url(port)).ok()?;
        let mut c = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(payload)
            .query(&mut c)
            .ok()
    }
}

/// Records every `/readyz` status of a node until stopped: was a 503
/// seen, and a 200 after it.
struct ReadyWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<u16>>>,
    thread: Option<JoinHandle<()>>,
}

impl ReadyWatch {
    fn start(node: &Node) -> ReadyWatch {
        let admin = node.admin.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (st, _) = http(
                    admin,
                    "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                );
                let mut v = v.lock().unwrap();
                if v.last() != Some(&st) {
                    v.push(st);
                }
            }
        });
        ReadyWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// The distinct statuses in order, e.g. [200, 503, 200].
    fn finish(mut self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().unwrap().clone()
    }
}

/// Reads a client on its own thread until stopped; hands back the client
/// and every text it got.
fn collect(mut c: Client, stop: Arc<AtomicBool>) -> JoinHandle<(Client, Vec<String>)> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match c.recv(Duration::from_millis(100)) {
                Recv::Text(t) => got.push(t),
                Recv::Timeout => {}
                other => panic!("a client's connection ended during the failover: {other:?}"),
            }
        }
        (c, got)
    })
}

/// POSTs numbered notices for user `p` to `node` until stopped: the
/// numbers answered 202, and how many were refused.
fn publisher(admin: std::net::SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<(Vec<u64>, u64)> {
    std::thread::spawn(move || {
        let (mut ok, mut refused) = (Vec::new(), 0);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let body = format!(r#"{{"userId":"p","text":"n{n}"}}"#);
            let req = format!(
                "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            match parse_response(http_raw(admin, req).as_bytes()) {
                (202, _) => ok.push(n),
                (503, _) => refused += 1,
                (st, b) => panic!("POST /publish answered {st}: {b}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok, refused)
    })
}

fn since_client(node: &Node, user: &str) -> Client {
    let token = token(user, None);
    Client::connect(&node.url(&format!("/ws?token={token}&since="))).expect("upgrade")
}

#[derive(Clone, Copy, PartialEq)]
enum Failure {
    /// `SENTINEL FAILOVER`: the master is demoted, alive.
    Forced,
    /// SIGKILL of the master; later restarted, to come back a replica.
    Killed,
}

fn nodes_follow_a_failover(failure: Failure, auth: Auth) {
    let _w = watchdog(150);
    let mut cl = Cluster::start(auth);
    let url = cl.url();
    let old = cl.master_port().expect("a master");
    let nodes = [Node::on_redis_url(&url, &[]), Node::on_redis_url(&url, &[])];
    for n in &nodes {
        assert!(n.wait_ready(Duration::from_secs(15)), "node not ready");
    }
    let mut plain: Vec<Client> = nodes.iter().map(|n| n.connect("42")).collect();
    let mut probes: Vec<Client> = nodes.iter().map(|n| n.connect("probe")).collect();
    let stop_readers = Arc::new(AtomicBool::new(false));
    let durable: Vec<_> = nodes
        .iter()
        .map(|n| collect(since_client(n, "p"), stop_readers.clone()))
        .collect();
    for n in &nodes {
        assert!(n.wait_metric("pushwire_connections", T, |v| v == 3.0));
    }
    let accepted: Vec<f64> = nodes
        .iter()
        .map(|n| n.metric("pushwire_connections_accepted_total"))
        .collect();
    let reconnects: Vec<f64> = nodes
        .iter()
        .map(|n| n.metric("pushwire_redis_reconnects_total"))
        .collect();
    let before = r#"{"userId":"42","text":"before"}"#;
    assert_eq!(cl.publish_on(old, before), Some(2));
    for c in &mut plain {
        assert_eq!(c.recv_text(T).as_deref(), Some(before));
    }

    let watches: Vec<ReadyWatch> = nodes.iter().map(ReadyWatch::start).collect();
    let stop_pub = Arc::new(AtomicBool::new(false));
    let posting = publisher(nodes[0].admin.unwrap(), stop_pub.clone());
    std::thread::sleep(Duration::from_millis(300));

    // From the moment the kill is sent, or the command accepted.
    let t0 = match failure {
        Failure::Forced => {
            assert!(
                wait_until(Duration::from_secs(10), || cl.sentinels[0]
                    .cli(&["SENTINEL", "FAILOVER", MASTER_NAME])
                    .is_ok()),
                "SENTINEL FAILOVER refused"
            );
            Instant::now()
        }
        Failure::Killed => {
            let t0 = Instant::now();
            cl.data_on(old).kill();
            t0
        }
    };

    // Probes on whatever Sentinel names the master, until one arrives on
    // both nodes: the time from the failure to the first delivery.
    let mut first: [Option<Duration>; 2] = [None, None];
    let mut k = 0;
    while first.iter().any(Option::is_none) {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "no delivery after the failover: {first:?}"
        );
        if let Some(port) = cl.master_port().filter(|p| *p != old) {
            k += 1;
            let _ = cl.publish_on(port, &format!(r#"{{"userId":"probe","text":"{k}"}}"#));
        }
        for (i, c) in probes.iter_mut().enumerate() {
            if first[i].is_none() {
                if let Recv::Text(_) = c.recv(Duration::from_millis(20)) {
                    first[i] = Some(t0.elapsed());
                }
            }
        }
    }
    let label = match failure {
        Failure::Forced => "SENTINEL FAILOVER",
        Failure::Killed => "SIGKILL of the master",
    };
    eprintln!(
        "failover ({label}): failure to first delivery: node A {:?}, node B {:?}",
        first[0].unwrap(),
        first[1].unwrap()
    );

    for n in &nodes {
        assert!(n.wait_ready(Duration::from_secs(20)), "ready again");
    }
    let new = cl.master_port().expect("a master");
    assert_ne!(new, old, "Sentinel names a new master");
    std::thread::sleep(Duration::from_millis(500));
    stop_pub.store(true, Ordering::Relaxed);
    let (posted, refused) = posting.join().unwrap();
    for (i, w) in watches.into_iter().enumerate() {
        let seen = w.finish();
        assert!(
            seen.windows(2).any(|p| p == [503, 200]),
            "node {i}: /readyz went 503 then 200 (saw {seen:?})"
        );
        assert_eq!(seen.last(), Some(&200), "node {i}: {seen:?}");
    }

    // The next notice published on the new master reaches every client,
    // on the very connections made before the failover.
    let after = r#"{"userId":"42","text":"after"}"#;
    assert_eq!(cl.publish_on(new, after), Some(2), "both nodes subscribed");
    for c in &mut plain {
        assert_eq!(c.recv_text(T).as_deref(), Some(after));
    }
    for (i, n) in nodes.iter().enumerate() {
        for l in n.log.lock().unwrap().iter() {
            if l.contains("subscription lost") || l.contains("+switch-master") {
                eprintln!("failover ({label}): node {i}: {l}");
            }
        }
        assert_eq!(
            n.metric("pushwire_connections_accepted_total"),
            accepted[i],
            "no client reconnected"
        );
        assert_eq!(n.metric("pushwire_connections"), 3.0);
        assert_eq!(
            n.metric("pushwire_redis_reconnects_total"),
            reconnects[i] + 1.0,
            "one loss, one restore"
        );
    }

    // Every notice POST /publish answered 202 reached the durable clients
    // of both nodes (live, or recovered from history after the loss).
    std::thread::sleep(Duration::from_secs(2));
    stop_readers.store(true, Ordering::Relaxed);
    for (i, h) in durable.into_iter().enumerate() {
        let (_c, got) = h.join().unwrap();
        let text = got.join("\n");
        // A forced failover leaves the old master writable until Sentinel
        // demotes it: what it took then is delivered live but gone from
        // history, and a recovery says so honestly.
        assert!(
            failure == Failure::Forced || !text.contains("\"recovered\":false"),
            "node {i}: history could not recover: {text}"
        );
        for n in &posted {
            assert!(
                text.contains(&format!("\"text\":\"n{n}\"")),
                "node {i}: notice n{n} was answered 202 but never arrived (refused: {refused}, got: {text})"
            );
        }
    }
    eprintln!(
        "failover ({label}): POST /publish during it: {} answered 202 (all delivered), {refused} answered 503",
        posted.len()
    );

    if failure == Failure::Killed {
        // The old master comes back (as it was started: a master) and is
        // turned into a replica by Sentinel: nobody follows it.
        let srv = cl.data_on(old);
        srv.spawn();
        assert!(
            wait_until(Duration::from_secs(20), || cl.data_on(old).role()
                == "slave"),
            "Sentinel made the old master a replica"
        );
        std::thread::sleep(Duration::from_secs(2));
        let late = r#"{"userId":"42","text":"late"}"#;
        assert_eq!(
            cl.publish_on(new, late),
            Some(2),
            "both nodes still on the new master"
        );
        for c in &mut plain {
            assert_eq!(c.recv_text(T).as_deref(), Some(late));
        }
        for (i, n) in nodes.iter().enumerate() {
            assert_eq!(
                n.metric("pushwire_redis_reconnects_total"),
                reconnects[i] + 1.0,
                "the old master back did not pull node {i} away"
            );
            assert!(n.wait_ready(T));
        }
    }
}

#[test]
fn forced_failover_is_followed_without_client_reconnects() {
    nodes_follow_a_failover(Failure::Forced, Auth::AclUser);
}

#[test]
fn killed_master_is_followed_and_its_return_as_replica_pulls_nobody_back() {
    nodes_follow_a_failover(Failure::Killed, Auth::Passwords);
}

#[test]
fn a_node_pointed_at_a_replica_is_not_ready_and_says_why() {
    let _w = watchdog(30);
    let master = Redis::start();
    let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    let node = Node::on_redis_url(&replica.url(), &[]);
    assert!(
        wait_until(T, || node.log_contains("replica")),
        "the log says the server is a replica"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (st, why) = node.admin_get("/readyz");
    assert_eq!(st, 503, "{why}");
    assert!(why.contains("replica"), "/readyz says why: {why}");
    assert_eq!(node.metric("pushwire_redis_connected"), 0.0);
    assert!(node.metric("pushwire_redis_connect_failures_total") >= 1.0);
    let (st, body) = node.publish(r#"{"userId":"42","text":"x"}"#);
    assert_eq!(st, 503, "POST /publish while not ready: {body}");
}

#[test]
fn an_unknown_master_name_is_not_ready_and_says_why() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let dir = TempDir::new("sentinel-name");
    let port = free_port();
    let conf = dir.join("s.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor other 127.0.0.1 {} 1\n",
            dir.path().display(),
            redis.port
        ),
    )
    .unwrap();
    let _s = Server::start(
        port,
        vec![conf.display().to_string(), "--sentinel".into()],
        None,
    );
    let url = format!("redis+sentinel://127.0.0.1:{port}/{MASTER_NAME}");
    let node = Node::on_redis_url(&url, &[]);
    assert!(wait_until(T, || node
        .admin_get("/readyz")
        .1
        .contains("does not know a master")));
    assert_eq!(node.admin_get("/readyz").0, 503);
}
