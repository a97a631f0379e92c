//! Every option, written once: flag, variable, default, help and the code
//! that checks and stores its value. This file is long because the table
//! is (one declaration per option, about a dozen lines each); splitting it
//! would scatter the one place where an option is defined.

use std::net::SocketAddr;
use std::time::Duration;

use std::path::PathBuf;

use super::{read_secret_file, AuthMode, Config, RedisTarget};
use crate::auth::Secret;

/// Why a value was refused.
pub(super) enum Bad {
    /// "expected" and what the option accepts.
    Expected(String),
    /// Anything else (a file that cannot be read).
    Other(String),
}

pub(super) fn expected(what: impl Into<String>) -> Bad {
    Bad::Expected(what.into())
}

type Setter = fn(&mut Config, &str) -> Result<(), Bad>;

#[derive(Clone, Copy)]
pub(super) enum Preset {
    /// Parsed like a given value.
    Text(&'static str),
    /// Text for a value only a dev run has, and the normal default.
    Dev {
        normal: &'static str,
        dev: &'static str,
    },
    /// Nothing set; the text says what that means.
    Unset(&'static str),
    /// Worked out at start; the text says how.
    Computed(&'static str),
}

/// One option, written once.
pub(super) struct Opt {
    /// The flag without its dashes.
    pub(super) flag: &'static str,
    pub(super) env: Option<&'static str>,
    /// The value's name in `--help`; `None` for a switch (no value).
    pub(super) value: Option<&'static str>,
    pub(super) default: Preset,
    pub(super) help: &'static str,
    /// The value is secret (a key, or a URL that may hold a password):
    /// an error line never repeats it.
    pub(super) secret: bool,
    pub(super) set: Setter,
}

impl Opt {
    pub(super) fn default_for(&self, dev: bool) -> Option<&'static str> {
        match self.default {
            Preset::Text(t) => Some(t),
            Preset::Dev { normal, dev: d } => Some(if dev { d } else { normal }),
            Preset::Unset(_) | Preset::Computed(_) => None,
        }
    }

    pub(super) fn shown_default(&self) -> &'static str {
        match self.default {
            Preset::Text(t) | Preset::Dev { normal: t, .. } => t,
            Preset::Unset(t) | Preset::Computed(t) => t,
        }
    }
}

pub(super) const fn opt(
    flag: &'static str,
    env: &'static str,
    value: &'static str,
    default: Preset,
    help: &'static str,
    set: Setter,
) -> Opt {
    Opt {
        flag,
        env: Some(env),
        value: Some(value),
        default,
        help,
        secret: false,
        set,
    }
}

pub(super) const fn switch(
    flag: &'static str,
    env: Option<&'static str>,
    help: &'static str,
    set: Setter,
) -> Opt {
    Opt {
        flag,
        env,
        value: None,
        default: Preset::Text("false"),
        help,
        secret: false,
        set,
    }
}

pub(super) const fn secret(o: Opt) -> Opt {
    Opt { secret: true, ..o }
}

use Preset::{Computed, Dev, Text, Unset};

/// Every option. The order is the order of `--help`.
pub(super) const OPTIONS: &[Opt] = &[
    opt(
        "listen",
        "PUSHWIRE_LISTEN",
        "ADDR",
        Dev {
            normal: "0.0.0.0:8080",
            dev: "127.0.0.1:8080",
        },
        "WebSocket listener",
        |c, v| {
            c.listen = addr(v)?;
            Ok(())
        },
    ),
    opt(
        "path",
        "PUSHWIRE_PATH",
        "PATH",
        Text("/ws"),
        "WebSocket endpoint; other paths get 404",
        |c, v| {
            if !v.starts_with('/') || v.contains(['?', '#', ' ']) {
                return Err(expected("a URL path starting with '/'"));
            }
            c.auth.path = v.to_string();
            Ok(())
        },
    ),
    opt(
        "admin-listen",
        "PUSHWIRE_ADMIN_LISTEN",
        "ADDR|off",
        Text("127.0.0.1:9090"),
        "admin listener: /healthz, /readyz, /metrics, POST /publish",
        |c, v| {
            c.admin_listen = match v {
                "off" => None,
                _ => Some(
                    v.parse()
                        .map_err(|_| expected("an address such as 127.0.0.1:9090, or off"))?,
                ),
            };
            Ok(())
        },
    ),
    opt(
        "admin-token-file",
        "PUSHWIRE_ADMIN_TOKEN_FILE",
        "F",
        Unset("none"),
        "file holding the token POST /publish needs as Authorization: Bearer; \
         re-read on SIGHUP; needed when --admin-listen is not loopback",
        |c, v| {
            let path = PathBuf::from(v);
            c.admin_token = Some(read_secret_file(&path).map_err(|e| Bad::Other(e.to_string()))?);
            c.admin_token_file = Some(path);
            Ok(())
        },
    ),
    switch(
        "admin-insecure",
        Some("PUSHWIRE_ADMIN_INSECURE"),
        "allow a non-loopback --admin-listen without a token",
        |c, v| {
            c.admin_insecure = boolean(v)?;
            Ok(())
        },
    ),
    switch(
        "admin-protect-metrics",
        Some("PUSHWIRE_ADMIN_PROTECT_METRICS"),
        "GET /metrics needs the admin token too",
        |c, v| {
            c.admin_protect_metrics = boolean(v)?;
            Ok(())
        },
    ),
    secret(opt(
        "redis",
        "PUSHWIRE_REDIS_URL",
        "URL",
        Unset("none: standalone"),
        "redis://[user:pass@]host:port[/db]; rediss://... for TLS (add \
         ?insecure=true to skip certificate verification: INSECURE, for tests only); \
         redis+sentinel://[user:pass@]host1:26379,host2:26379/<master-name>[/db] \
         follows the master Sentinel names (Sentinel auth: \
         ?sentinel_password=P[&sentinel_user=U])",
        |c, v| {
            let target = RedisTarget::parse(v).map_err(|e| {
                expected(format!(
                    "redis://[user:pass@]host:port[/db], rediss://..., or redis+sentinel://[user:pass@]host1:26379,host2:26379/<master-name>[/db] ({e})"
                ))
            })?;
            c.redis = Some(target);
            Ok(())
        },
    )),
    opt(
        "redis-ca-file",
        "PUSHWIRE_REDIS_CA_FILE",
        "F",
        Unset("the system roots"),
        "PEM file of the CA(s) that sign the certificate of a rediss:// Redis",
        |c, v| {
            c.redis_ca_file = Some(PathBuf::from(nonempty(v, "a file name")?));
            Ok(())
        },
    ),
    opt(
        "redis-cert-file",
        "PUSHWIRE_REDIS_CERT_FILE",
        "F",
        Unset("none"),
        "PEM client certificate (chain) for mutual TLS with rediss://; needs --redis-key-file",
        |c, v| {
            c.redis_cert_file = Some(PathBuf::from(nonempty(v, "a file name")?));
            Ok(())
        },
    ),
    opt(
        "redis-key-file",
        "PUSHWIRE_REDIS_KEY_FILE",
        "F",
        Unset("none"),
        "PEM private key of --redis-cert-file",
        |c, v| {
            c.redis_key_file = Some(PathBuf::from(nonempty(v, "a file name")?));
            Ok(())
        },
    ),
    opt(
        "channel",
        "PUSHWIRE_CHANNEL",
        "NAME",
        Text("websocket:sendMsgTopic"),
        "the Redis channel notices arrive on",
        |c, v| {
            c.channel = nonempty(v, "a non-empty channel name")?;
            Ok(())
        },
    ),
    opt(
        "canary-interval",
        "PUSHWIRE_CANARY_INTERVAL",
        "SECS",
        Text("2"),
        "how often the subscription is proven end to end",
        |c, v| {
            c.canary_interval = secs(v, 0.05, 86_400.0)?;
            Ok(())
        },
    ),
    opt(
        "resync-notice",
        "PUSHWIRE_RESYNC_NOTICE",
        "TEXT",
        Unset("off"),
        "sent to every connection after a Redis loss",
        |c, v| {
            c.resync_notice = Some(v.to_string());
            Ok(())
        },
    ),
    opt(
        "auth",
        "PUSHWIRE_AUTH",
        "jwt|header|query",
        Dev {
            normal: "jwt",
            dev: "query",
        },
        "how a connection proves its user",
        |c, v| {
            c.auth.mode = match v {
                "jwt" => AuthMode::Jwt,
                "header" => AuthMode::Header,
                "query" => AuthMode::Query,
                _ => return Err(expected("one of jwt, header, query")),
            };
            Ok(())
        },
    ),
    secret(opt(
        "jwt-secret",
        "PUSHWIRE_JWT_SECRET",
        "S",
        Unset("none"),
        "HS256 key",
        |c, v| {
            c.jwt_key = Secret::new(nonempty(v, "a non-empty HS256 key")?.into_bytes());
            Ok(())
        },
    )),
    opt(
        "jwt-secret-file",
        "PUSHWIRE_JWT_SECRET_FILE",
        "F",
        Unset("none"),
        "HS256 key file, re-read on SIGHUP",
        |c, v| {
            let path = PathBuf::from(v);
            c.jwt_key = read_secret_file(&path).map_err(|e| Bad::Other(e.to_string()))?;
            c.jwt_key_file = Some(path);
            Ok(())
        },
    ),
    opt(
        "user-header",
        "PUSHWIRE_USER_HEADER",
        "NAME",
        Text("X-User-Id"),
        "the header --auth header takes the user id from",
        |c, v| {
            let ok = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(expected("an HTTP header name"));
            }
            c.auth.user_header = v.to_string();
            Ok(())
        },
    ),
    opt(
        "allowed-origins",
        "PUSHWIRE_ALLOWED_ORIGINS",
        "LIST",
        Text("*"),
        "* or a comma list of exact origins (https://app.example); others get 403",
        |c, v| {
            c.auth.allowed_origins = origins(v)?;
            Ok(())
        },
    ),
    opt(
        "max-connections",
        "PUSHWIRE_MAX_CONNECTIONS",
        "N",
        Text("100000"),
        "beyond it, new upgrades get 503",
        |c, v| {
            c.max_connections = num(v, 1, 10_000_000)?;
            Ok(())
        },
    ),
    opt(
        "max-message-bytes",
        "PUSHWIRE_MAX_MESSAGE_BYTES",
        "N",
        Text("65536"),
        "largest frame or message a client may send",
        |c, v| {
            c.max_message_bytes = num(v, 125, 64 << 20)?;
            Ok(())
        },
    ),
    opt(
        "max-queue-bytes",
        "PUSHWIRE_MAX_QUEUE_BYTES",
        "N",
        Text("1048576"),
        "outbound bytes queued per connection before it is cut as a slow consumer",
        |c, v| {
            c.max_queue_bytes = num(v, 1024, 1 << 30)?;
            Ok(())
        },
    ),
    opt(
        "ping-interval",
        "PUSHWIRE_PING_INTERVAL",
        "SECS",
        Text("25"),
        "server ping to idle connections",
        |c, v| {
            c.ping_interval = secs(v, 0.05, 86_400.0)?;
            Ok(())
        },
    ),
    opt(
        "idle-timeout",
        "PUSHWIRE_IDLE_TIMEOUT",
        "SECS",
        Text("60"),
        "silence before a client is dropped",
        |c, v| {
            c.idle_timeout = secs(v, 0.05, 86_400.0)?;
            Ok(())
        },
    ),
    opt(
        "handshake-timeout",
        "PUSHWIRE_HANDSHAKE_TIMEOUT",
        "SECS",
        Text("10"),
        "time to complete the upgrade",
        |c, v| {
            c.handshake_timeout = secs(v, 0.05, 86_400.0)?;
            Ok(())
        },
    ),
    opt(
        "shutdown-timeout",
        "PUSHWIRE_SHUTDOWN_TIMEOUT",
        "SECS",
        Text("10"),
        "graceful drain limit",
        |c, v| {
            c.shutdown_timeout = secs(v, 0.05, 86_400.0)?;
            Ok(())
        },
    ),
    opt(
        "workers",
        "PUSHWIRE_WORKERS",
        "N",
        Computed("number of CPUs"),
        "event-loop threads",
        |c, v| {
            c.workers = num(v, 1, 256)?;
            Ok(())
        },
    ),
    opt(
        "log-level",
        "PUSHWIRE_LOG",
        "LEVEL",
        Text("info"),
        "error, warn, info, debug or trace",
        |c, v| {
            c.log_level = match v.to_ascii_lowercase().as_str() {
                "error" => log::LevelFilter::Error,
                "warn" => log::LevelFilter::Warn,
                "info" => log::LevelFilter::Info,
                "debug" => log::LevelFilter::Debug,
                "trace" => log::LevelFilter::Trace,
                _ => return Err(expected("one of error, warn, info, debug, trace")),
            };
            Ok(())
        },
    ),
    switch(
        "dev",
        None,
        "local trial: 127.0.0.1 only, --auth query, demo page at /",
        |c, v| {
            c.dev = boolean(v)?;
            Ok(())
        },
    ),
    opt(
        "history-size",
        "PUSHWIRE_HISTORY_SIZE",
        "N",
        Text("100"),
        "durable notices kept per user (about); 0: off",
        |c, v| {
            c.history_size = num(v, 0, 100_000)?;
            Ok(())
        },
    ),
    opt(
        "history-ttl",
        "PUSHWIRE_HISTORY_TTL",
        "SECS",
        Text("300"),
        "history lives this long after its last notice",
        |c, v| {
            c.history_ttl = secs(v, 1.0, 30.0 * 86_400.0)?;
            Ok(())
        },
    ),
    opt(
        "history-replicas",
        "PUSHWIRE_HISTORY_REPLICAS",
        "N",
        Text("0"),
        "POST /publish: durable once N replicas have it",
        |c, v| {
            c.history_replicas = num(v, 0, 64)? as u32;
            Ok(())
        },
    ),
    opt(
        "history-replicas-timeout",
        "PUSHWIRE_HISTORY_REPLICAS_TIMEOUT",
        "SECS",
        Text("0.5"),
        "how long POST /publish waits for them (then 503)",
        |c, v| {
            c.history_replicas_timeout = secs(v, 0.001, 10.0)?;
            Ok(())
        },
    ),
    opt(
        "key-prefix",
        "PUSHWIRE_KEY_PREFIX",
        "P",
        Text("pushwire"),
        "prefix of pushwire's Redis keys, [A-Za-z0-9_]+",
        |c, v| {
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(expected("1 to 64 of A-Z a-z 0-9 _"));
            }
            c.key_prefix = v.to_string();
            Ok(())
        },
    ),
    opt(
        "node-id",
        "PUSHWIRE_NODE_ID",
        "ID",
        Computed("hostname:port"),
        "this node's name, unique per node",
        |c, v| {
            let ok = !v.is_empty() && v.len() <= 128 && v.chars().all(|ch| ch.is_ascii_graphic());
            if !ok {
                return Err(expected("1 to 128 printable characters, no spaces"));
            }
            c.node_id = v.to_string();
            Ok(())
        },
    ),
    opt(
        "events-channel",
        "PUSHWIRE_EVENTS_CHANNEL",
        "NAME|off",
        Text("off"),
        "Redis channel for online/offline events",
        |c, v| {
            c.events_channel = match v {
                "off" => None,
                _ => Some(nonempty(v, "a channel name, or off")?),
            };
            Ok(())
        },
    ),
    opt(
        "offline-grace",
        "PUSHWIRE_OFFLINE_GRACE",
        "SECS",
        Text("5"),
        "time without a connection before a user counts as offline",
        |c, v| {
            c.offline_grace = secs(v, 0.0, 3_600.0)?;
            Ok(())
        },
    ),
    opt(
        "max-connections-per-user",
        "PUSHWIRE_MAX_CONNECTIONS_PER_USER",
        "N",
        Text("0"),
        "connections one user may hold on a node; 0: no limit",
        |c, v| {
            c.max_connections_per_user = num(v, 0, 1_000_000)?;
            Ok(())
        },
    ),
];

fn addr(v: &str) -> Result<SocketAddr, Bad> {
    v.parse()
        .map_err(|_| expected("an IP address and port such as 0.0.0.0:8080"))
}

fn num(v: &str, min: usize, max: usize) -> Result<usize, Bad> {
    match v.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(expected(format!("a whole number from {min} to {max}"))),
    }
}

fn secs(v: &str, min: f64, max: f64) -> Result<Duration, Bad> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && (min..=max).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(expected(format!("a number of seconds from {min} to {max}"))),
    }
}

fn boolean(v: &str) -> Result<bool, Bad> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(expected("true or false")),
    }
}

fn nonempty(v: &str, what: &str) -> Result<String, Bad> {
    if v.is_empty() {
        return Err(expected(what));
    }
    Ok(v.to_string())
}

/// `*` or a comma list of origins as browsers send them: a scheme, `://`
/// and a host (with an optional port), nothing after it.
fn origins(v: &str) -> Result<Option<Vec<String>>, Bad> {
    let what = "* or a comma list of origins with their scheme, such as https://example.com";
    let list: Vec<String> = v
        .split(',')
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() {
        return Err(expected(what));
    }
    if list.iter().any(|o| o == "*") {
        return Ok(None);
    }
    for o in &list {
        let ok = o.split_once("://").is_some_and(|(scheme, host)| {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                && !host.is_empty()
                && !host.contains(['/', '?', '#', ' '])
        });
        if !ok {
            return Err(Bad::Expected(format!("{what} (not {o:?})")));
        }
    }
    Ok(Some(list))
}
