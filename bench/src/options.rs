//! Command-line flags -> one `Opts`, before anything runs.
//!
//! Every flag and its default live here, next to the help text that
//! documents them, so the two cannot drift apart.

use std::ffi::OsString;

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
  storm      reconnect storm of durable clients (SPEC 8): --connections N
             clients on node A (first --url) with since, each gets one
             durable notice, then A is SIGKILLed (--kill-pid), --missed K
             durable notices per user are published, and all N reconnect
             at once to node B (second --url) with their last id; checks
             exactly once, in order, the status frame; reports the time to
             the last recovered, Redis CPU and peak memory, node B CPU, and
             the delivery p99 of --live-users other users on B that get
             durable notices at --live-rate meanwhile
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
  --redis-sentinel S   HOST:PORT[,HOST:PORT...]/NAME (loopback Sentinels, no
                       auth): publish to whichever Redis they name master;
                       on a publish error or a new master (asked every
                       200 ms) reconnect there. Notices of a batch whose
                       publish failed count as refused, not lost
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
  --durable            targeted/two-nodes: publish with FCALL <prefix>_publish 0
                       (SPEC 8) instead of PUBLISH, clients connect with since=
                       and unwrap {\"id\",\"notice\"}; order checked per connection
  --key-prefix P       the node's --key-prefix, for the function name [pushwire]
  --wait-replicas N    --durable: WAIT N 500 after each batch; a batch fewer
                       replicas acknowledged counts as refused, not lost [0]
  --redis-pid PID      read Redis's CPU ticks and RSS from /proc/PID
  --kill-pid PID       storm: the node A process to SIGKILL
  --missed K           storm: durable notices each user misses [5]
  --live-users N       storm: other users on node B [1000]
  --live-rate R        storm: durable notices/s to them during it [1000]
  --batch B            limit: frames per write per connection [1]
  --timeout S          connect/handshake timeout per connection [30]
  --drain S            wait for late deliveries after publishing [3]
  --no-publish         broadcast: only listen (another process publishes)
  --barrier DIR        after connecting, create DIR/ready.PID and wait for DIR/go
  --label TEXT         copied into the JSON line
  --json               human table to stderr, only the JSON line to stdout
  -h, --help
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Auth {
    Jwt,
    Query,
    Header,
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub scenario: String,
    pub urls: Vec<String>,
    pub auth: Auth,
    pub secret: String,
    pub user_header: String,
    pub redis: Option<String>,
    pub redis_sentinel: Option<String>,
    pub channel: String,
    pub admins: Vec<String>,
    pub pids: Vec<u32>,
    pub connections: usize,
    pub users: Option<usize>,
    pub user_offset: usize,
    pub rate: Option<f64>,
    pub connect_rate: Option<f64>,
    pub seconds: Option<f64>,
    pub messages: usize,
    pub threads: usize,
    pub max: bool,
    pub p99_ms: f64,
    pub pad: usize,
    pub batch: usize,
    pub durable: bool,
    pub wait_replicas: u32,
    pub key_prefix: String,
    pub redis_pid: Option<u32>,
    pub kill_pid: Option<u32>,
    pub missed: usize,
    pub live_users: usize,
    pub live_rate: f64,
    pub timeout: f64,
    pub drain: f64,
    pub publish: bool,
    pub barrier: Option<String>,
    pub label: Option<String>,
    pub json: bool,
}

pub fn parse_opts(args: Vec<OsString>) -> Result<Opts, String> {
    use lexopt::prelude::*;
    let mut o = Opts {
        scenario: String::new(),
        urls: Vec::new(),
        auth: Auth::Jwt,
        secret: "bench".into(),
        user_header: "X-User-Id".into(),
        redis: None,
        redis_sentinel: None,
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
        durable: false,
        wait_replicas: 0,
        key_prefix: "pushwire".into(),
        redis_pid: None,
        kill_pid: None,
        missed: 5,
        live_users: 1000,
        live_rate: 1000.0,
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
            Long("redis-sentinel") => o.redis_sentinel = Some(text(p.value().map_err(e)?)?),
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
            Long("durable") => o.durable = true,
            Long("wait-replicas") => o.wait_replicas = num("wait-replicas", p.value().map_err(e)?)?,
            Long("key-prefix") => o.key_prefix = text(p.value().map_err(e)?)?,
            Long("redis-pid") => o.redis_pid = Some(num("redis-pid", p.value().map_err(e)?)?),
            Long("kill-pid") => o.kill_pid = Some(num("kill-pid", p.value().map_err(e)?)?),
            Long("missed") => o.missed = num("missed", p.value().map_err(e)?)?,
            Long("live-users") => o.live_users = num("live-users", p.value().map_err(e)?)?,
            Long("live-rate") => o.live_rate = num("live-rate", p.value().map_err(e)?)?,
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
            "give a scenario: idle, connect, targeted, broadcast, two-nodes, storm, limit (see --help)"
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
