//! Flags and environment variables become one validated [`Config`] before
//! anything starts: a bad value is refused with one line naming the flag,
//! and the server never runs half-configured. Every default lives here.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How a connection proves which user it belongs to (SPEC section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Jwt,
    Header,
    Query,
}

/// Where the HS256 key comes from; the file form is re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKey {
    None,
    Inline(Vec<u8>),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub path: String,
    pub admin_listen: Option<SocketAddr>,
    pub redis_url: Option<String>,
    pub channel: String,
    pub auth: AuthMode,
    pub jwt_key: JwtKey,
    pub user_header: String,
    /// `None` means any origin (`*`).
    pub allowed_origins: Option<Vec<String>>,
    pub max_connections: usize,
    pub max_message_bytes: usize,
    pub max_queue_bytes: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// How often the subscriber proves its subscription with a canary.
    pub canary_interval: Duration,
    pub resync_notice: Option<String>,
    pub workers: usize,
    pub log_level: log::LevelFilter,
    pub dev: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".parse().expect("constant address"),
            path: "/ws".into(),
            admin_listen: Some("127.0.0.1:9090".parse().expect("constant address")),
            redis_url: None,
            channel: "websocket:sendMsgTopic".into(),
            auth: AuthMode::Jwt,
            jwt_key: JwtKey::None,
            user_header: "X-User-Id".into(),
            allowed_origins: None,
            max_connections: 100_000,
            max_message_bytes: 65_536,
            max_queue_bytes: 1_048_576,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            canary_interval: Duration::from_secs(2),
            resync_notice: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            log_level: log::LevelFilter::Info,
            dev: false,
        }
    }
}

/// What the command line asked for, when it is not "run the server".
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Help,
    Version,
}

/// A refused configuration: one line for the operator, exit status 2.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

pub const HELP: &str = "\
pushwire: a small WebSocket push server fed by Redis pub/sub

USAGE: pushwire [OPTIONS]

Every option can also be set through the environment variable shown;
a flag wins over the environment. Durations are seconds (fractions allowed).

  --listen ADDR             PUSHWIRE_LISTEN             WebSocket listener [0.0.0.0:8080]
  --path PATH               PUSHWIRE_PATH               WebSocket endpoint [/ws]
  --admin-listen ADDR|off   PUSHWIRE_ADMIN_LISTEN       health, metrics, publish [127.0.0.1:9090]
  --redis URL               PUSHWIRE_REDIS_URL          redis://[user:pass@]host:port[/db] [none: standalone]
  --channel NAME            PUSHWIRE_CHANNEL            channel notices arrive on [websocket:sendMsgTopic]
  --auth jwt|header|query   PUSHWIRE_AUTH               how a connection proves its user [jwt]
  --jwt-secret S            PUSHWIRE_JWT_SECRET         HS256 key [none]
  --jwt-secret-file F       PUSHWIRE_JWT_SECRET_FILE    HS256 key file, re-read on SIGHUP [none]
  --user-header NAME        PUSHWIRE_USER_HEADER        user header for --auth header [X-User-Id]
  --allowed-origins LIST    PUSHWIRE_ALLOWED_ORIGINS    comma list of exact origins [*]
  --max-connections N       PUSHWIRE_MAX_CONNECTIONS    beyond it, 503 [100000]
  --max-message-bytes N     PUSHWIRE_MAX_MESSAGE_BYTES  largest client frame/message [65536]
  --max-queue-bytes N       PUSHWIRE_MAX_QUEUE_BYTES    outbound queue before a slow consumer is cut [1048576]
  --ping-interval SECS      PUSHWIRE_PING_INTERVAL      server ping to idle connections [25]
  --idle-timeout SECS       PUSHWIRE_IDLE_TIMEOUT       silence before a client is dropped [60]
  --handshake-timeout SECS  PUSHWIRE_HANDSHAKE_TIMEOUT  time to complete the upgrade [10]
  --shutdown-timeout SECS   PUSHWIRE_SHUTDOWN_TIMEOUT   graceful drain limit [10]
  --canary-interval SECS    PUSHWIRE_CANARY_INTERVAL    end-to-end subscription probe [2]
  --resync-notice TEXT      PUSHWIRE_RESYNC_NOTICE      sent to every connection after a Redis loss [off]
  --workers N               PUSHWIRE_WORKERS            event-loop threads [number of CPUs]
  --log-level LEVEL         PUSHWIRE_LOG                error, warn, info, debug, trace [info]
  --dev                                                 local trial: 127.0.0.1 only, --auth query,
                                                        demo page at /
  -h, --help                                            this text
  -V, --version                                         the version
";

/// Every option: flag name, environment variable, takes a value.
const OPTIONS: &[(&str, &str)] = &[
    ("listen", "PUSHWIRE_LISTEN"),
    ("path", "PUSHWIRE_PATH"),
    ("admin-listen", "PUSHWIRE_ADMIN_LISTEN"),
    ("redis", "PUSHWIRE_REDIS_URL"),
    ("channel", "PUSHWIRE_CHANNEL"),
    ("auth", "PUSHWIRE_AUTH"),
    ("jwt-secret", "PUSHWIRE_JWT_SECRET"),
    ("jwt-secret-file", "PUSHWIRE_JWT_SECRET_FILE"),
    ("user-header", "PUSHWIRE_USER_HEADER"),
    ("allowed-origins", "PUSHWIRE_ALLOWED_ORIGINS"),
    ("max-connections", "PUSHWIRE_MAX_CONNECTIONS"),
    ("max-message-bytes", "PUSHWIRE_MAX_MESSAGE_BYTES"),
    ("max-queue-bytes", "PUSHWIRE_MAX_QUEUE_BYTES"),
    ("ping-interval", "PUSHWIRE_PING_INTERVAL"),
    ("idle-timeout", "PUSHWIRE_IDLE_TIMEOUT"),
    ("handshake-timeout", "PUSHWIRE_HANDSHAKE_TIMEOUT"),
    ("shutdown-timeout", "PUSHWIRE_SHUTDOWN_TIMEOUT"),
    ("canary-interval", "PUSHWIRE_CANARY_INTERVAL"),
    ("resync-notice", "PUSHWIRE_RESYNC_NOTICE"),
    ("workers", "PUSHWIRE_WORKERS"),
    ("log-level", "PUSHWIRE_LOG"),
];

fn err(flag: &str, what: &str, value: &str) -> ConfigError {
    ConfigError(format!(
        "invalid value {value:?} for --{flag}: expected {what}"
    ))
}

/// Parses the command line (without the program name) and an environment
/// lookup into a validated command. The lookup is a parameter so tests need
/// not touch the process environment.
pub fn parse<I, E>(args: I, env: E) -> Result<Command, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
    E: Fn(&str) -> Option<String>,
{
    use lexopt::prelude::*;
    let mut values: Vec<(&'static str, String)> = Vec::new();
    let mut dev = false;
    let mut parser = lexopt::Parser::from_args(args);
    let lex_err = |e: lexopt::Error| ConfigError(format!("{e} (see --help)"));
    while let Some(arg) = parser.next().map_err(lex_err)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("dev") => dev = true,
            Long(name) => {
                let Some(&(flag, _)) = OPTIONS.iter().find(|(f, _)| *f == name) else {
                    return Err(ConfigError(format!("unknown option --{name} (see --help)")));
                };
                let value = parser.value().map_err(lex_err)?;
                let value = value
                    .into_string()
                    .map_err(|_| ConfigError(format!("--{flag}: the value is not valid UTF-8")))?;
                values.push((flag, value));
            }
            other => return Err(lex_err(other.unexpected())),
        }
    }
    // The flag wins over the environment: look at flags first.
    let get = |flag: &str| -> Option<String> {
        if let Some((_, v)) = values.iter().rev().find(|(f, _)| *f == flag) {
            return Some(v.clone());
        }
        let (_, var) = OPTIONS.iter().find(|(f, _)| *f == flag)?;
        env(var).filter(|v| !v.is_empty())
    };
    build(get, dev).map(|c| Command::Run(Box::new(c)))
}

fn build(get: impl Fn(&str) -> Option<String>, dev: bool) -> Result<Config, ConfigError> {
    let mut c = Config {
        dev,
        ..Config::default()
    };
    if dev {
        c.listen = "127.0.0.1:8080".parse().expect("constant address");
        c.auth = AuthMode::Query;
    }
    if let Some(v) = get("listen") {
        c.listen = parse_addr("listen", &v)?;
        if dev && !c.listen.ip().is_loopback() {
            return Err(ConfigError(format!(
                "--listen {v}: --dev listens on a loopback address only (127.0.0.1 or ::1)"
            )));
        }
    }
    if let Some(v) = get("path") {
        if !v.starts_with('/') || v.contains(['?', '#', ' ']) {
            return Err(err("path", "a URL path starting with '/'", &v));
        }
        c.path = v;
    }
    if let Some(v) = get("admin-listen") {
        c.admin_listen = if v == "off" {
            None
        } else {
            Some(parse_addr("admin-listen", &v).map_err(|_| {
                err(
                    "admin-listen",
                    "an address such as 127.0.0.1:9090, or off",
                    &v,
                )
            })?)
        };
    }
    if let Some(v) = get("redis") {
        if let Err(e) = redis::Client::open(v.as_str()) {
            return Err(ConfigError(format!(
                "invalid value for --redis: expected redis://[user:pass@]host:port[/db] ({e})"
            )));
        }
        c.redis_url = Some(v);
    }
    if let Some(v) = get("channel") {
        if v.is_empty() {
            return Err(err("channel", "a non-empty channel name", &v));
        }
        c.channel = v;
    }
    if let Some(v) = get("auth") {
        c.auth = match v.as_str() {
            "jwt" => AuthMode::Jwt,
            "header" => AuthMode::Header,
            "query" => AuthMode::Query,
            _ => return Err(err("auth", "one of jwt, header, query", &v)),
        };
    }
    match (get("jwt-secret"), get("jwt-secret-file")) {
        (Some(_), Some(_)) => {
            return Err(ConfigError(
                "--jwt-secret and --jwt-secret-file exclude each other: give one".into(),
            ))
        }
        (Some(s), None) if s.is_empty() => {
            return Err(err("jwt-secret", "a non-empty HS256 key", &s));
        }
        (Some(s), None) => c.jwt_key = JwtKey::Inline(s.into_bytes()),
        (None, Some(f)) => {
            let path = PathBuf::from(&f);
            crate::auth::read_key_file(&path)
                .map_err(|e| ConfigError(format!("--jwt-secret-file {f}: {e}")))?;
            c.jwt_key = JwtKey::File(path);
        }
        (None, None) => {}
    }
    if c.auth == AuthMode::Jwt && c.jwt_key == JwtKey::None {
        return Err(ConfigError(
            "--auth jwt needs an HS256 key: give --jwt-secret-file FILE (or PUSHWIRE_JWT_SECRET_FILE), or try pushwire --dev for a local trial".into(),
        ));
    }
    if let Some(v) = get("user-header") {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err("user-header", "an HTTP header name", &v));
        }
        c.user_header = v;
    }
    if let Some(v) = get("allowed-origins") {
        let list: Vec<String> = v
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if list.is_empty() {
            return Err(err("allowed-origins", "* or a comma list of origins", &v));
        }
        c.allowed_origins = if list.iter().any(|o| o == "*") {
            None
        } else {
            Some(list)
        };
    }
    if let Some(v) = get("max-connections") {
        c.max_connections = parse_num("max-connections", &v, 1, 10_000_000)?;
    }
    if let Some(v) = get("max-message-bytes") {
        c.max_message_bytes = parse_num("max-message-bytes", &v, 125, 64 << 20)?;
    }
    if let Some(v) = get("max-queue-bytes") {
        c.max_queue_bytes = parse_num("max-queue-bytes", &v, 1024, 1 << 30)?;
    }
    if let Some(v) = get("ping-interval") {
        c.ping_interval = parse_secs("ping-interval", &v)?;
    }
    if let Some(v) = get("idle-timeout") {
        c.idle_timeout = parse_secs("idle-timeout", &v)?;
    }
    if let Some(v) = get("handshake-timeout") {
        c.handshake_timeout = parse_secs("handshake-timeout", &v)?;
    }
    if let Some(v) = get("shutdown-timeout") {
        c.shutdown_timeout = parse_secs("shutdown-timeout", &v)?;
    }
    if let Some(v) = get("canary-interval") {
        c.canary_interval = parse_secs("canary-interval", &v)?;
    }
    if c.idle_timeout <= c.ping_interval {
        return Err(ConfigError(format!(
            "--idle-timeout ({}s) must be longer than --ping-interval ({}s), or idle clients are dropped before they are pinged",
            c.idle_timeout.as_secs_f64(),
            c.ping_interval.as_secs_f64()
        )));
    }
    c.resync_notice = get("resync-notice");
    if let Some(v) = get("workers") {
        c.workers = parse_num("workers", &v, 1, 256)?;
    }
    if let Some(v) = get("log-level") {
        c.log_level = match v.to_ascii_lowercase().as_str() {
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "info" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            _ => {
                return Err(err(
                    "log-level",
                    "one of error, warn, info, debug, trace",
                    &v,
                ))
            }
        };
    }
    Ok(c)
}

fn parse_addr(flag: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| err(flag, "an IP address and port such as 0.0.0.0:8080", v))
}

fn parse_num(flag: &str, v: &str, min: usize, max: usize) -> Result<usize, ConfigError> {
    match v.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(err(flag, &format!("a whole number from {min} to {max}"), v)),
    }
}

fn parse_secs(flag: &str, v: &str) -> Result<Duration, ConfigError> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.05..=86_400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(err(flag, "a number of seconds from 0.05 to 86400", v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match parse(args.iter().copied(), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })? {
            Command::Run(c) => Ok(*c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn dev_needs_no_secret_and_listens_on_loopback() {
        let c = run(&["--dev"], &[]).unwrap();
        assert_eq!(c.auth, AuthMode::Query);
        assert!(c.listen.ip().is_loopback());
        assert!(c.redis_url.is_none());
    }

    #[test]
    fn jwt_without_secret_points_at_the_file_flag_and_dev() {
        let e = run(&[], &[]).unwrap_err();
        assert!(
            e.0.contains("--jwt-secret-file") && e.0.contains("--dev"),
            "{e}"
        );
    }

    #[test]
    fn flag_wins_over_env() {
        let c = run(
            &["--dev", "--workers", "3"],
            &[("PUSHWIRE_WORKERS", "5"), ("PUSHWIRE_CHANNEL", "x")],
        )
        .unwrap();
        assert_eq!(c.workers, 3);
        assert_eq!(c.channel, "x");
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["--dev", "--workers", "0"][..], "--workers"),
            (&["--dev", "--listen", "nope"][..], "--listen"),
            (&["--dev", "--auth", "magic"][..], "--auth"),
            (&["--dev", "--ping-interval", "-1"][..], "--ping-interval"),
            (&["--dev", "--redis", "http://x"][..], "--redis"),
            (&["--dev", "--log-level", "loud"][..], "--log-level"),
        ] {
            let e = run(args, &[]).unwrap_err();
            assert!(e.0.contains(flag), "{e}");
            assert!(!e.0.contains('\n'), "{e}");
        }
    }

    #[test]
    fn origins_and_admin_off() {
        let c = run(
            &[
                "--dev",
                "--allowed-origins",
                "https://a.example, https://b.example/",
                "--admin-listen",
                "off",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.allowed_origins,
            Some(vec!["https://a.example".into(), "https://b.example".into()])
        );
        assert!(c.admin_listen.is_none());
    }
}
