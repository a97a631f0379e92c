//! Where pushwire's Redis is, and the one way every Redis user in pushwire
//! (the subscriber and its canary, `POST /publish`, the history reader)
//! opens a connection to it, so that they all follow the same master.
//!
//! The URL is parsed once, at start (SPEC section 10):
//!
//! - `redis://` and `rediss://` (TLS, verified against the system roots or
//!   `--redis-ca-file`; `?insecure=true` skips verification) name one
//!   server;
//! - `redis+sentinel://[user:pass@]h1:26379,h2:26379/<master>[/db]` (and
//!   `rediss+sentinel://`) name Sentinels: every new subscriber link asks
//!   them (any that answers) for the current master instead of redialing
//!   the old address. The credentials are the master's; Sentinels that need
//!   their own take `?sentinel_user=U&sentinel_password=P`.
//!
//! Whatever the URL, a server must say `ROLE` master before a connection is
//! handed out: a replica (a node pointed at one by mistake, an old master
//! restarted and demoted) is refused with the reason.
//!
//! The subscriber proves a master with its canary and records it here
//! ([`RedisTarget::proven`]); the other users connect to that very master,
//! and drop their connections when the subscriber reports the link lost
//! ([`RedisTarget::lost`], [`RedisTarget::epoch`]). The redis crate's
//! `sentinel` module is not used: its sync path opens Sentinel and ROLE
//! connections without a timeout and caches them without a read timeout,
//! so one paused Sentinel could block the subscriber thread for good; the
//! two commands it needs are sent here, every one under a timeout.
//!
//! Long (about 850 lines of code): URL parsing for three forms, TLS
//! setup, the Sentinel conversation with timeouts on every step (the
//! crate's own sync Sentinel client has none), ROLE checks and the shared
//! record of the proven master all describe one thing, the way to Redis.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::{
    Client, Connection, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo,
    RedisResult, Value,
};

pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// The files of `--redis-ca-file`, `--redis-cert-file`, `--redis-key-file`.
#[derive(Debug, Default, Clone)]
pub struct TlsFiles<'a> {
    pub ca: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
}

impl TlsFiles<'_> {
    fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// The Redis every Redis user in pushwire connects to. Cheap to clone: the
/// clones share the master the subscriber proved.
#[derive(Clone)]
pub struct RedisTarget {
    spec: Arc<Spec>,
    shared: Arc<Shared>,
}

/// What the URL and the TLS flags say; fixed after start.
#[derive(Clone)]
struct Spec {
    /// The URL without its passwords, for logs.
    shown: String,
    kind: Kind,
    tls: Tls,
}

#[derive(Clone)]
enum Kind {
    Direct(ConnectionInfo),
    Sentinel(Sentinels),
}

#[derive(Clone)]
struct Sentinels {
    nodes: Vec<(String, u16)>,
    master_name: String,
    /// Credentials for the Sentinels themselves.
    auth: RedisConnectionInfo,
    /// Credentials and db for the master they name.
    master: RedisConnectionInfo,
}

#[derive(Clone)]
struct Tls {
    on: bool,
    insecure: bool,
    #[cfg(feature = "tls")]
    certs: Option<redis::TlsCertificates>,
}

impl Tls {
    fn new(on: bool, insecure: bool) -> Tls {
        Tls {
            on,
            insecure,
            #[cfg(feature = "tls")]
            certs: None,
        }
    }
}

/// What the Redis users share at run time.
#[derive(Default)]
struct Shared {
    /// The master the subscriber's canary proved, while its link lives.
    proven: Mutex<Option<Master>>,
    /// Bumped on every lost link: connections opened before are stale.
    epoch: AtomicU64,
    /// A Sentinel announced `+switch-master` for our master, to this one.
    switch_announced: Mutex<Option<Master>>,
    /// The Sentinel that answered last, asked first next time.
    preferred: AtomicUsize,
}

/// A server that said it is the master.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Master {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Master {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A connection to the master, and which master it is.
pub struct Connected {
    pub conn: Connection,
    pub master: Master,
    /// The epoch it was opened in (see [`RedisTarget::is_current`]).
    pub epoch: u64,
}

/// Why no master connection could be had: one line for logs and
/// `/readyz`.
#[derive(Debug, Clone)]
pub struct ConnectError(pub String);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ConnectError> for redis::RedisError {
    fn from(e: ConnectError) -> Self {
        redis::RedisError::from((redis::ErrorKind::Io, "redis unavailable", e.0))
    }
}

impl RedisTarget {
    /// Parses a URL without TLS files; see [`RedisTarget::with_tls_files`].
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let (spec_url, query) = split_query(url);
        let mut pairs: Vec<(String, String)> = query
            .map(|q| {
                q.split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        (k.to_string(), decode(v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let insecure = match take(&mut pairs, "insecure") {
            None => false,
            Some(v) => match v.as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => return Err("insecure=true or insecure=false".into()),
            },
        };
        let (scheme, _) = spec_url
            .split_once("://")
            .ok_or("a URL such as redis://host:6379")?;
        let tls_on = match scheme {
            "redis" | "redis+sentinel" => false,
            "rediss" | "rediss+sentinel" => true,
            _ => {
                return Err(format!(
                    "a redis://, rediss:// or redis+sentinel:// URL (not {scheme}://)"
                ))
            }
        };
        if tls_on && !cfg!(feature = "tls") {
            return Err("rediss:// needs TLS, and this pushwire was built without it (cargo feature \"tls\")".into());
        }
        #[cfg(feature = "tls")]
        if tls_on {
            // The process-wide rustls provider: ring, the only one built
            // in. Set explicitly so that another provider appearing in the
            // dependency tree cannot make rustls refuse to choose.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        if insecure && !tls_on {
            return Err("insecure=true is for rediss:// only".into());
        }
        let tls = Tls::new(tls_on, insecure || spec_url.ends_with("#insecure"));
        let (kind, shown) = if scheme.ends_with("+sentinel") {
            let s = parse_sentinel(spec_url, &mut pairs)?;
            let shown = shown_sentinel(scheme, &s, insecure);
            (Kind::Sentinel(s), shown)
        } else {
            // The redis crate reads `db` and `protocol` from the query;
            // what is left of ours goes back to it.
            let rest: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let url = if rest.is_empty() {
                spec_url.to_string()
            } else {
                format!("{spec_url}?{}", rest.join("&"))
            };
            let mut info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| e.to_string())?;
            if insecure {
                if let ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone() {
                    info = info.set_addr(ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: true,
                        tls_params: None,
                    });
                }
            }
            let mut shown = redact(spec_url);
            if insecure {
                shown.push_str("?insecure=true");
            }
            pairs.clear();
            (Kind::Direct(info), shown)
        };
        if let Some((k, _)) = pairs.first() {
            return Err(format!("a known URL parameter (not {k:?})"));
        }
        Ok(RedisTarget {
            spec: Arc::new(Spec { shown, kind, tls }),
            shared: Arc::new(Shared::default()),
        })
    }

    /// The same target with the CA file and the client certificate of
    /// mutual TLS, read now. They need a `rediss://` URL.
    pub fn with_tls_files(self, files: &TlsFiles) -> Result<RedisTarget, String> {
        if !files.any() {
            return Ok(self);
        }
        if !self.spec.tls.on {
            return Err(
                "--redis-ca-file, --redis-cert-file and --redis-key-file need a rediss:// URL"
                    .into(),
            );
        }
        if files.cert.is_some() != files.key.is_some() {
            return Err("--redis-cert-file and --redis-key-file go together".into());
        }
        if self.spec.tls.insecure && files.ca.is_some() {
            return Err("--redis-ca-file and insecure=true exclude each other: a CA file is the safe way to trust a self-signed certificate".into());
        }
        #[cfg(feature = "tls")]
        {
            let read = |p: &Path| {
                std::fs::read(p).map_err(|e| format!("--redis TLS file {}: {e}", p.display()))
            };
            let root_cert = files.ca.map(read).transpose()?;
            let client_tls = match (files.cert, files.key) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read(c)?,
                    client_key: read(k)?,
                }),
                _ => None,
            };
            let certs = redis::TlsCertificates {
                client_tls,
                root_cert,
            };
            // Checked now, so that a broken file is refused at start.
            let probe = ConnectionAddr::TcpTls {
                host: "localhost".into(),
                port: 6379,
                insecure: false,
                tls_params: None,
            };
            probe
                .into_connection_info()
                .and_then(|info| Client::build_with_tls(info, certs.clone()))
                .map_err(|e| format!("--redis-ca-file/--redis-cert-file/--redis-key-file: {e}"))?;
            let mut spec = (*self.spec).clone();
            spec.tls.certs = Some(certs);
            Ok(RedisTarget {
                spec: Arc::new(spec),
                shared: self.shared,
            })
        }
        #[cfg(not(feature = "tls"))]
        Err("this pushwire was built without TLS (cargo feature \"tls\")".into())
    }

    /// True for `rediss://…?insecure=true`: the start warns about it.
    pub fn is_insecure(&self) -> bool {
        self.spec.tls.insecure
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self.spec.kind, Kind::Sentinel(_))
    }

    /// A connection to the master the subscriber proved, or while there is
    /// none (at start, after a loss), to the master found now. The users
    /// other than the subscriber connect through this.
    pub fn connect(&self, timeout: Duration) -> Result<Connected, ConnectError> {
        let epoch = self.epoch();
        let proven = self
            .shared
            .proven
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match proven {
            Some(m) => {
                let conn = self.connect_to(&m, timeout)?;
                Ok(Connected {
                    conn,
                    master: m,
                    epoch,
                })
            }
            None => self.find_master(timeout),
        }
    }

    /// Finds the master now (for Sentinel: asks them; any that answers),
    /// connects and checks its `ROLE`. The subscriber builds each new link
    /// with this.
    pub fn find_master(&self, timeout: Duration) -> Result<Connected, ConnectError> {
        let epoch = self.epoch();
        match &self.spec.kind {
            Kind::Direct(info) => {
                let m = match info.addr() {
                    ConnectionAddr::Tcp(h, p)
                    | ConnectionAddr::TcpTls {
                        host: h, port: p, ..
                    } => Master {
                        host: h.clone(),
                        port: *p,
                    },
                    other => Master {
                        host: other.to_string(),
                        port: 0,
                    },
                };
                let conn = self.checked(info.clone(), &m, timeout)?;
                Ok(Connected {
                    conn,
                    master: m,
                    epoch,
                })
            }
            Kind::Sentinel(s) => self.ask_sentinels(s, timeout, epoch),
        }
    }

    fn ask_sentinels(
        &self,
        s: &Sentinels,
        timeout: Duration,
        epoch: u64,
    ) -> Result<Connected, ConnectError> {
        let n = s.nodes.len();
        let first = self.shared.preferred.load(Ordering::Relaxed) % n.max(1);
        let mut why = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            let (host, port) = &s.nodes[i];
            let at = Master {
                host: host.clone(),
                port: *port,
            };
            let master = match self.master_addr_from(s, &at, timeout) {
                Ok(m) => m,
                Err(e) => {
                    why.push(format!("sentinel {at}: {e}"));
                    continue;
                }
            };
            let info = self
                .node_info(&master, s.master.clone())
                .map_err(|e| ConnectError(e.to_string()))?;
            match self.checked(info, &master, timeout) {
                Ok(conn) => {
                    self.shared.preferred.store(i, Ordering::Relaxed);
                    return Ok(Connected {
                        conn,
                        master,
                        epoch,
                    });
                }
                Err(e) => why.push(format!("sentinel {at} names {master}: {e}")),
            }
        }
        Err(ConnectError(format!(
            "no Sentinel gave a usable master for {:?}: {}",
            s.master_name,
            why.join("; ")
        )))
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` on one Sentinel.
    fn master_addr_from(
        &self,
        s: &Sentinels,
        at: &Master,
        timeout: Duration,
    ) -> Result<Master, String> {
        let mut conn = self
            .node_info(at, s.auth.clone())
            .and_then(|i| self.client_for(i))
            .and_then(|c| c.get_connection_with_timeout(timeout))
            .and_then(|c| {
                c.set_read_timeout(Some(timeout))?;
                c.set_write_timeout(Some(timeout))?;
                Ok(c)
            })
            .map_err(|e| describe(&e, self.spec.tls.on))?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&s.master_name)
            .query(&mut conn)
            .map_err(|e| describe(&e, self.spec.tls.on))?;
        match addr {
            Some((host, port)) => Ok(Master { host, port }),
            None => Err(format!("does not know a master named {:?}", s.master_name)),
        }
    }

    /// A connection to a master found before (no Sentinel asked), `ROLE`
    /// checked.
    pub fn connect_to(&self, m: &Master, timeout: Duration) -> Result<Connection, ConnectError> {
        let info = match &self.spec.kind {
            Kind::Direct(info) => info.clone(),
            Kind::Sentinel(s) => self
                .node_info(m, s.master.clone())
                .map_err(|e| ConnectError(e.to_string()))?,
        };
        self.checked(info, m, timeout)
    }

    /// Connects (timeouts on every step) and refuses a server whose `ROLE`
    /// is not master.
    fn checked(
        &self,
        info: ConnectionInfo,
        m: &Master,
        timeout: Duration,
    ) -> Result<Connection, ConnectError> {
        let tls = self.spec.tls.on;
        let mut conn = self
            .client_for(info)
            .and_then(|c| c.get_connection_with_timeout(timeout))
            .and_then(|c| {
                c.set_read_timeout(Some(timeout))?;
                c.set_write_timeout(Some(timeout))?;
                Ok(c)
            })
            .map_err(|e| ConnectError(format!("{m}: {}", describe(&e, tls))))?;
        match role(&mut conn) {
            Ok(Role::Master) | Ok(Role::Unknown) => Ok(conn),
            Ok(Role::Replica) => Err(ConnectError(format!(
                "{m} is a replica (ROLE slave), not the master: nothing published there reaches the fleet"
            ))),
            Ok(Role::Other(r)) => Err(ConnectError(format!(
                "{m} is not a Redis master (ROLE {r})"
            ))),
            Err(e) => Err(ConnectError(format!("{m}: ROLE: {}", describe(&e, tls)))),
        }
    }

    /// The connection info of a node a Sentinel named, with `auth`.
    fn node_info(&self, m: &Master, auth: RedisConnectionInfo) -> RedisResult<ConnectionInfo> {
        let addr = if self.spec.tls.on {
            ConnectionAddr::TcpTls {
                host: m.host.clone(),
                port: m.port,
                insecure: self.spec.tls.insecure,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(m.host.clone(), m.port)
        };
        Ok(addr.into_connection_info()?.set_redis_settings(auth))
    }

    /// A client for the master `m` (with Sentinel, as named by them), for a
    /// connection that checks nothing itself: the subscription, opened
    /// beside a connection whose `ROLE` was just checked.
    pub fn client_for_master(&self, m: &Master) -> Result<Client, ConnectError> {
        let info = match &self.spec.kind {
            Kind::Direct(info) => info.clone(),
            Kind::Sentinel(s) => self
                .node_info(m, s.master.clone())
                .map_err(|e| ConnectError(e.to_string()))?,
        };
        self.client_for(info)
            .map_err(|e| ConnectError(format!("{m}: {e}")))
    }

    fn client_for(&self, info: ConnectionInfo) -> RedisResult<Client> {
        #[cfg(feature = "tls")]
        if let Some(certs) = &self.spec.tls.certs {
            return Client::build_with_tls(info, certs.clone());
        }
        Client::open(info)
    }

    /// The subscriber proved `m` with its canary: the other users follow.
    pub fn proven(&self, m: &Master) {
        *self
            .shared
            .proven
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(m.clone());
    }

    /// The subscriber's link is lost: connections opened before are stale,
    /// and the next ones find the master again.
    pub fn lost(&self) {
        *self
            .shared
            .proven
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// A connection opened in `epoch` still goes to the current master.
    pub fn is_current(&self, epoch: u64) -> bool {
        self.epoch() == epoch
    }

    /// The new master, once, after a Sentinel announced `+switch-master`
    /// for ours (see [`RedisTarget::watch_switches`]).
    pub fn take_switch_announced(&self) -> Option<Master> {
        self.shared
            .switch_announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Subscribes to `+switch-master` on any Sentinel that answers, until
    /// `stop()`; an announcement for our master is a hint to the
    /// subscriber to rebuild at once. Only a hint: the canary stays the
    /// proof, and a missed announcement costs only time.
    pub fn watch_switches(&self, stop: impl Fn() -> bool) {
        let Kind::Sentinel(s) = &self.spec.kind else {
            return;
        };
        let mut i = 0;
        while !stop() {
            let at = {
                let (h, p) = &s.nodes[i % s.nodes.len()];
                Master {
                    host: h.clone(),
                    port: *p,
                }
            };
            i += 1;
            if let Err(e) = self.watch_one(s, &at, &stop) {
                log::debug!("redis: +switch-master watch on sentinel {at}: {e}");
            }
            // One try per Sentinel per second at most.
            for _ in 0..10 {
                if stop() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn watch_one(&self, s: &Sentinels, at: &Master, stop: &impl Fn() -> bool) -> RedisResult<()> {
        let mut conn = self
            .client_for(self.node_info(at, s.auth.clone())?)?
            .get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        conn.set_read_timeout(Some(Duration::from_millis(250)))?;
        let mut ps = conn.as_pubsub();
        ps.subscribe("+switch-master")?;
        log::debug!("redis: watching +switch-master on sentinel {at}");
        while !stop() {
            let msg = match ps.get_message() {
                Ok(m) => m,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(e),
            };
            let text = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
            // "<name> <old-ip> <old-port> <new-ip> <new-port>"
            let words: Vec<&str> = text.split(' ').collect();
            if let [name, _, _, host, port] = words[..] {
                if name == s.master_name {
                    log::info!("redis: sentinel {at} announced +switch-master {text}");
                    if let Ok(port) = port.parse() {
                        *self
                            .shared
                            .switch_announced
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(Master {
                            host: host.to_string(),
                            port,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec.shown)
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisTarget({})", self.spec.shown)
    }
}

/// Whether the server of `conn` still says it is the master: a master
/// demoted under an open connection shows here.
pub fn check_master(conn: &mut Connection) -> Result<(), RoleError> {
    match role(conn) {
        Ok(Role::Master) | Ok(Role::Unknown) => Ok(()),
        Ok(Role::Replica) => Err(RoleError::NotMaster(
            "the server became a replica (ROLE slave)".into(),
        )),
        Ok(Role::Other(r)) => Err(RoleError::NotMaster(format!(
            "the server is not a master (ROLE {r})"
        ))),
        Err(e) => Err(RoleError::Unanswered(format!("ROLE: {e}"))),
    }
}

/// Why [`check_master`] failed.
pub enum RoleError {
    /// The server answered: it is not the master.
    NotMaster(String),
    /// No answer (a timeout, a closed link): the server may only be paused.
    Unanswered(String),
}

enum Role {
    Master,
    Replica,
    Other(String),
    /// ROLE is not allowed to this user (ACL): the server is trusted, and
    /// a replica still shows on the first write (READONLY).
    Unknown,
}

fn role(conn: &mut Connection) -> RedisResult<Role> {
    match redis::cmd("ROLE").query::<Value>(conn) {
        Ok(Value::Array(items)) => Ok(match items.first() {
            Some(Value::BulkString(b)) => match b.as_slice() {
                b"master" => Role::Master,
                b"slave" | b"replica" => Role::Replica,
                other => Role::Other(String::from_utf8_lossy(other).into_owned()),
            },
            Some(Value::SimpleString(s)) if s == "master" => Role::Master,
            Some(Value::SimpleString(s)) if s == "slave" => Role::Replica,
            _ => Role::Unknown,
        }),
        Ok(_) => Ok(Role::Unknown),
        Err(e) if e.code() == Some("NOPERM") => Ok(Role::Unknown),
        Err(e) => Err(e),
    }
}

/// A connect error in words an operator can act on: TLS failures say
/// so, and a plain client on a TLS port is told to use `rediss://`.
pub fn describe(e: &redis::RedisError, tls: bool) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if tls && (lower.contains("certificate") || lower.contains("invalidcertificate")) {
        return format!("TLS certificate not accepted: {text} (check --redis-ca-file)");
    }
    if tls
        && (lower.contains("tls")
            || lower.contains("handshake")
            || lower.contains("corrupt message"))
    {
        return format!("TLS handshake failed: {text}");
    }
    if !tls && e.is_connection_dropped() && !e.is_connection_refusal() && !e.is_timeout() {
        return format!(
            "{text} (the server closed the connection at once: a TLS port needs rediss://)"
        );
    }
    text
}

fn split_query(url: &str) -> (&str, Option<&str>) {
    match url.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (url, None),
    }
}

fn take(pairs: &mut Vec<(String, String)>, key: &str) -> Option<String> {
    let i = pairs.iter().position(|(k, _)| k == key)?;
    Some(pairs.remove(i).1)
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `redis+sentinel://[user:pass@]h1[:port],h2[:port]/<master>[/db]`.
fn parse_sentinel(url: &str, pairs: &mut Vec<(String, String)>) -> Result<Sentinels, String> {
    let form = "redis+sentinel://[user:pass@]host1:26379,host2:26379/<master-name>[/db]";
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (authority, path) = rest.split_once('/').ok_or(form)?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut nodes = Vec::new();
    for h in hosts.split(',').filter(|h| !h.is_empty()) {
        let (host, port) = if let Some(v6) = h.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(form)?;
            let port = after.strip_prefix(':');
            (host, port)
        } else {
            match h.split_once(':') {
                Some((a, p)) => (a, Some(p)),
                None => (h, None),
            }
        };
        let port = match port {
            None => DEFAULT_SENTINEL_PORT,
            Some(p) => p
                .parse()
                .map_err(|_| format!("{form} (bad port in {h:?})"))?,
        };
        if host.is_empty() {
            return Err(form.into());
        }
        nodes.push((host.to_string(), port));
    }
    if nodes.is_empty() {
        return Err(format!("{form} (no Sentinel given)"));
    }
    let mut segs = path.trim_end_matches('/').splitn(2, '/');
    let master_name = decode(segs.next().unwrap_or_default());
    if master_name.is_empty() {
        return Err(format!("{form} (no master name)"));
    }
    let db = match segs.next() {
        None | Some("") => 0,
        Some(d) => d
            .parse::<i64>()
            .map_err(|_| format!("{form} (bad db {d:?})"))?,
    };
    let mut master = RedisConnectionInfo::default().set_db(db);
    if let Some(u) = userinfo {
        let (user, pass) = match u.split_once(':') {
            Some((a, b)) => (decode(a), Some(decode(b))),
            None => (decode(u), None),
        };
        match pass {
            Some(p) => {
                if !user.is_empty() {
                    master = master.set_username(user);
                }
                master = master.set_password(p);
            }
            // `redis://secret@host` is a password alone, as the redis
            // crate reads it too.
            None if !user.is_empty() => master = master.set_password(user),
            None => {}
        }
    }
    let mut auth = RedisConnectionInfo::default();
    if let Some(u) = take(pairs, "sentinel_user").filter(|u| !u.is_empty()) {
        auth = auth.set_username(u);
    }
    if let Some(p) = take(pairs, "sentinel_password") {
        auth = auth.set_password(p);
    }
    Ok(Sentinels {
        nodes,
        master_name,
        auth,
        master,
    })
}

fn shown_sentinel(scheme: &str, s: &Sentinels, insecure: bool) -> String {
    let creds = if s.master.password().is_some() || s.master.username().is_some() {
        "***@"
    } else {
        ""
    };
    let hosts: Vec<String> = s
        .nodes
        .iter()
        .map(|(h, p)| {
            Master {
                host: h.clone(),
                port: *p,
            }
            .to_string()
        })
        .collect();
    let mut out = format!("{scheme}://{creds}{}/{}", hosts.join(","), s.master_name);
    if s.master.db() != 0 {
        out.push_str(&format!("/{}", s.master.db()));
    }
    let mut q = Vec::new();
    if let Some(u) = s.auth.username() {
        q.push(format!("sentinel_user={u}"));
    }
    if s.auth.password().is_some() {
        q.push("sentinel_password=***".to_string());
    }
    if insecure {
        q.push("insecure=true".to_string());
    }
    if !q.is_empty() {
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// A `--redis` value parses or is refused with what is wrong.
/// A Redis URL for the log, without its password.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let t = RedisTarget::parse(
            "redis+sentinel://u:p%40ss@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/3?sentinel_password=sp",
        )
        .unwrap();
        let Kind::Sentinel(s) = &t.spec.kind else {
            panic!("not sentinel")
        };
        assert_eq!(
            s.nodes,
            vec![
                ("10.0.0.1".to_string(), 26379),
                ("10.0.0.2".to_string(), 26379),
                ("::1".to_string(), 26380)
            ]
        );
        assert_eq!(s.master_name, "mymaster");
        assert_eq!(s.master.db(), 3);
        assert_eq!(s.master.username(), Some("u"));
        assert_eq!(s.master.password(), Some("p@ss"));
        assert_eq!(s.auth.password(), Some("sp"));
        let shown = t.to_string();
        assert!(!shown.contains("p%40ss") && !shown.contains("sp&") && !shown.ends_with("=sp"));
        assert_eq!(
            shown,
            "redis+sentinel://***@10.0.0.1:26379,10.0.0.2:26379,[::1]:26380/mymaster/3?sentinel_password=***"
        );
        assert!(t.is_sentinel());
    }

    #[test]
    fn bad_urls_are_refused() {
        for bad in [
            "redis+sentinel://h1,h2",
            "redis+sentinel://h1,h2/",
            "redis+sentinel:///m",
            "redis+sentinel://h1:x/m",
            "redis+sentinel://h1/m/x",
            "redis+sentinel://h1/m?what=1",
            "redis://h?insecure=true",
            "rediss://h?insecure=maybe",
            "http://h",
        ] {
            assert!(RedisTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_urls_keep_their_query() {
        let t = RedisTarget::parse("redis://:pw@127.0.0.1:7000/2?protocol=resp2").unwrap();
        let Kind::Direct(info) = &t.spec.kind else {
            panic!()
        };
        assert_eq!(info.redis_settings().db(), 2);
        assert_eq!(t.to_string(), "redis://***@127.0.0.1:7000/2");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn insecure_is_explicit() {
        let t = RedisTarget::parse("rediss://127.0.0.1:7000?insecure=true").unwrap();
        assert!(t.is_insecure());
        let Kind::Direct(info) = &t.spec.kind else {
            panic!()
        };
        assert!(matches!(
            info.addr(),
            ConnectionAddr::TcpTls { insecure: true, .. }
        ));
        assert!(!RedisTarget::parse("rediss://127.0.0.1:7000")
            .unwrap()
            .is_insecure());
    }
}
