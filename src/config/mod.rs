//! Flags and environment variables become one validated [`Config`] before
//! anything starts: a bad value is refused with one line naming the flag
//! (or the variable it came from), and the server never runs
//! half-configured.
//!
//! Every option is written once, in [`OPTIONS`]: its flag, its variable, its
//! default and the code that checks and stores it. `--help`, the
//! environment lookup and [`Config::default`] are derived from that table.
//! Files named by options (the JWT key, the admin token) are read here, at
//! start, and again on SIGHUP through [`reload`].

use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::auth::AuthMode;
use crate::auth::{AuthConfig, Keys, Secret};

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// Where the admin token comes from; `None`: the admin listener is open.
    pub admin_token_file: Option<PathBuf>,
    /// The token `POST /publish` needs, read from `admin_token_file`.
    pub admin_token: Option<Secret>,
    /// A non-loopback admin listener without a token was asked for.
    pub admin_insecure: bool,
    /// `GET /metrics` needs the admin token too.
    pub admin_protect_metrics: bool,
    pub redis: Option<RedisTarget>,
    /// TLS files for `rediss://` (already read into `redis` when set).
    pub redis_ca_file: Option<PathBuf>,
    pub redis_cert_file: Option<PathBuf>,
    pub redis_key_file: Option<PathBuf>,
    pub channel: String,
    pub auth: AuthConfig,
    /// The HS256 key (empty when none is needed).
    pub jwt_key: Secret,
    /// Where `jwt_key` came from, when it is re-read on SIGHUP.
    pub jwt_key_file: Option<PathBuf>,
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
    /// Durable notices kept per user; 0: no history.
    pub history_size: usize,
    pub history_ttl: Duration,
    /// `POST /publish` of a durable notice waits (`WAIT`) until this many
    /// replicas have it; 0: it does not wait.
    pub history_replicas: u32,
    pub history_replicas_timeout: Duration,
    /// Prefix of every Redis key and function pushwire owns.
    pub key_prefix: String,
    pub node_id: String,
    pub events_channel: Option<String>,
    pub offline_grace: Duration,
    /// 0: no per-user limit.
    pub max_connections_per_user: usize,
}

impl Default for Config {
    /// The defaults of [`OPTIONS`], as a run with no flags and no
    /// environment would have them (before the cross checks).
    fn default() -> Self {
        let mut c = Config::blank();
        for opt in OPTIONS {
            if let Some(v) = opt.default_for(false) {
                // The defaults are constants, checked by a unit test.
                let _ = (opt.set)(&mut c, v);
            }
        }
        c.node_id = default_node_id(c.listen);
        c
    }
}

impl Config {
    /// Placeholders, every one overwritten by the defaults of [`OPTIONS`]
    /// (or left as the "not set" of an option without one).
    fn blank() -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin_listen: None,
            admin_token_file: None,
            admin_token: None,
            admin_insecure: false,
            admin_protect_metrics: false,
            redis: None,
            redis_ca_file: None,
            redis_cert_file: None,
            redis_key_file: None,
            channel: String::new(),
            auth: AuthConfig {
                path: String::new(),
                mode: AuthMode::Jwt,
                user_header: String::new(),
                allowed_origins: None,
            },
            jwt_key: Secret::default(),
            jwt_key_file: None,
            max_connections: 0,
            max_message_bytes: 0,
            max_queue_bytes: 0,
            ping_interval: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            handshake_timeout: Duration::ZERO,
            shutdown_timeout: Duration::ZERO,
            canary_interval: Duration::ZERO,
            resync_notice: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            log_level: log::LevelFilter::Info,
            dev: false,
            history_size: 0,
            history_ttl: Duration::ZERO,
            history_replicas: 0,
            history_replicas_timeout: Duration::ZERO,
            key_prefix: String::new(),
            node_id: String::new(),
            events_channel: None,
            offline_grace: Duration::ZERO,
            max_connections_per_user: 0,
        }
    }

    /// Lines for the log once logging runs: settings that start but that
    /// an operator should see.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(r) = self.redis.as_ref().filter(|r| r.is_insecure()) {
            w.push(format!(
                "--redis {r}: insecure: the Redis server's TLS certificate is NOT verified; give --redis-ca-file instead"
            ));
        }
        if let Some(addr) = self.admin_listen {
            if self.admin_token.is_none() && !addr.ip().is_loopback() {
                w.push(format!(
                    "--admin-insecure: the admin listener on {addr} has no token; anyone who reaches it can POST /publish"
                ));
            }
        }
        w
    }
}

pub use crate::redis_target::RedisTarget;

mod options;
use options::{Bad, Opt, OPTIONS};

/// Reads a secret file (the JWT key, the admin token): its bytes without
/// the trailing newline; an empty file is an error.
pub fn read_secret_file(path: &Path) -> io::Result<Secret> {
    let mut key = std::fs::read(path)?;
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    if key.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok(Secret::new(key))
}

/// Re-reads `file` into `into` (SIGHUP). On error the old secret stays and
/// the error is returned for the log; `Ok(false)` when there is no file.
pub fn reload(file: Option<&Path>, into: &Keys) -> io::Result<bool> {
    let Some(path) = file else {
        return Ok(false);
    };
    into.replace(read_secret_file(path)?);
    Ok(true)
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

/// Where a value came from, for the error line.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Flag,
    Env,
    Default,
}

fn refusal(o: &Opt, source: Source, value: &str, bad: Bad) -> ConfigError {
    let flag = o.flag;
    let shown = if o.secret { "(hidden)" } else { value };
    let line = match (source, bad) {
        (Source::Env, bad) => {
            let var = o.env.unwrap_or("?");
            let what = match bad {
                Bad::Expected(w) => format!("expected {w}"),
                Bad::Other(e) => e,
            };
            // Under systemd the variable is what the operator wrote.
            format!("{var}={shown}: {what} (--{flag})")
        }
        (_, Bad::Expected(w)) if o.secret => format!("invalid value for --{flag}: expected {w}"),
        (_, Bad::Expected(w)) => format!("invalid value {value:?} for --{flag}: expected {w}"),
        (_, Bad::Other(e)) => format!("--{flag} {shown}: {e}"),
    };
    ConfigError(line)
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
    // (option index, value), in command-line order.
    let mut flags: Vec<(usize, String)> = Vec::new();
    let mut parser = lexopt::Parser::from_args(args);
    let lex_err = |e: lexopt::Error| ConfigError(format!("{e} (see --help)"));
    while let Some(arg) = parser.next().map_err(lex_err)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long(name) => {
                let Some(i) = OPTIONS.iter().position(|o| o.flag == name) else {
                    return Err(ConfigError(format!("unknown option --{name} (see --help)")));
                };
                let o = &OPTIONS[i];
                let value = match o.value {
                    None => "true".to_string(),
                    Some(_) => parser
                        .value()
                        .map_err(lex_err)?
                        .into_string()
                        .map_err(|_| {
                            ConfigError(format!("--{}: the value is not valid UTF-8", o.flag))
                        })?,
                };
                flags.push((i, value));
            }
            other => return Err(lex_err(other.unexpected())),
        }
    }
    build(&flags, &env).map(|c| Command::Run(Box::new(c)))
}

fn build(
    flags: &[(usize, String)],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    // One source per option: its last flag, else its variable, else its
    // default. A later flag wins over an earlier one.
    let mut chosen: Vec<Option<(Source, String)>> = OPTIONS
        .iter()
        .map(|o| {
            o.env
                .and_then(env)
                .filter(|v| !v.is_empty())
                .map(|v| (Source::Env, v))
        })
        .collect();
    for (i, v) in flags {
        chosen[*i] = Some((Source::Flag, v.clone()));
    }
    let dev_at = OPTIONS.iter().position(|o| o.flag == "dev");
    let dev = dev_at.is_some_and(|i| chosen[i].is_some());
    let given = |flag: &str| {
        OPTIONS
            .iter()
            .position(|o| o.flag == flag)
            .is_some_and(|i| chosen[i].is_some())
    };

    // Values first, so the first bad value is what is reported: flags in
    // command-line order, then variables and defaults in table order.
    let mut order: Vec<usize> = Vec::new();
    for i in flags.iter().map(|(i, _)| *i).chain(0..OPTIONS.len()) {
        if !order.contains(&i) {
            order.push(i);
        }
    }
    let mut c = Config::blank();
    for i in order {
        let o = &OPTIONS[i];
        let (source, value) = match &chosen[i] {
            Some((s, v)) => (*s, v.as_str()),
            None => match o.default_for(dev) {
                Some(d) => (Source::Default, d),
                None => continue,
            },
        };
        (o.set)(&mut c, value).map_err(|bad| refusal(o, source, value, bad))?;
    }

    // Then what needs several options.
    let tls_files = crate::redis_target::TlsFiles {
        ca: c.redis_ca_file.as_deref(),
        cert: c.redis_cert_file.as_deref(),
        key: c.redis_key_file.as_deref(),
    };
    match c.redis.take() {
        Some(t) => {
            c.redis = Some(t.with_tls_files(&tls_files).map_err(ConfigError)?);
        }
        None if given("redis-ca-file") || given("redis-cert-file") || given("redis-key-file") => {
            return Err(ConfigError(
                "--redis-ca-file, --redis-cert-file and --redis-key-file need --redis rediss://..."
                    .into(),
            ));
        }
        None => {}
    }
    if given("jwt-secret") && given("jwt-secret-file") {
        return Err(ConfigError(
            "--jwt-secret and --jwt-secret-file exclude each other: give one".into(),
        ));
    }
    if dev && !c.listen.ip().is_loopback() {
        return Err(ConfigError(format!(
            "--listen {}: --dev listens on a loopback address only (127.0.0.1 or ::1)",
            c.listen
        )));
    }
    if c.idle_timeout <= c.ping_interval {
        return Err(ConfigError(format!(
            "--idle-timeout ({}s) must be longer than --ping-interval ({}s), or idle clients are dropped before they are pinged",
            c.idle_timeout.as_secs_f64(),
            c.ping_interval.as_secs_f64()
        )));
    }
    if c.auth.mode == AuthMode::Jwt && c.jwt_key.is_empty() {
        return Err(ConfigError(
            "--auth jwt needs an HS256 key: give --jwt-secret-file FILE (or PUSHWIRE_JWT_SECRET_FILE), or try pushwire --dev for a local trial".into(),
        ));
    }
    if let Some(addr) = c.admin_listen {
        if !addr.ip().is_loopback() && c.admin_token.is_none() && !c.admin_insecure {
            return Err(ConfigError(format!(
                "--admin-listen {addr} is reachable from the network: give --admin-token-file FILE (or PUSHWIRE_ADMIN_TOKEN_FILE), or --admin-insecure to run it without a token"
            )));
        }
    }
    if c.admin_protect_metrics && c.admin_token.is_none() {
        return Err(ConfigError(
            "--admin-protect-metrics needs --admin-token-file FILE (or PUSHWIRE_ADMIN_TOKEN_FILE)"
                .into(),
        ));
    }
    if !given("node-id") {
        c.node_id = default_node_id(c.listen);
    }
    Ok(c)
}

/// This host's name and the WebSocket port: unique per node as long as
/// hostnames are.
fn default_node_id(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let host = if host.is_empty() { "localhost" } else { host };
    format!("{host}:{}", listen.port())
}

/// Widest line of `--help`.
const HELP_WIDTH: usize = 80;
/// Where the variable's column starts.
const ENV_COLUMN: usize = 32;
/// Indent of an option's description.
const TEXT_INDENT: usize = 6;

/// The `--help` text, made from [`OPTIONS`].
pub fn help() -> String {
    let mut out = String::from(
        "\
pushwire: a small WebSocket push server fed by Redis pub/sub

USAGE: pushwire [OPTIONS]

Every option can also be set by the environment variable beside it; a flag
wins over the environment. Durations are seconds (fractions allowed).
JWT claims: sub is the user (string or integer); exp, nbf honoured (30 s).

",
    );
    for o in OPTIONS {
        help_entry(&mut out, o);
    }
    out.push_str("\n  -h, --help                    this text\n");
    out.push_str("  -V, --version                 the version\n");
    out
}

fn help_entry(out: &mut String, o: &Opt) {
    let mut head = format!("  --{}", o.flag);
    if let Some(v) = o.value {
        let _ = write!(head, " {v}");
    }
    if let Some(env) = o.env {
        let pad = ENV_COLUMN.saturating_sub(head.len()).max(2);
        let _ = write!(head, "{:pad$}{env}", "");
    }
    out.push_str(&head);
    out.push('\n');
    let text = if o.value.is_some() {
        format!("{} [{}]", o.help, o.shown_default())
    } else {
        o.help.to_string()
    };
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && TEXT_INDENT + line.len() + 1 + word.len() > HELP_WIDTH {
            let _ = writeln!(out, "{:TEXT_INDENT$}{line}", "");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    let _ = writeln!(out, "{:TEXT_INDENT$}{line}", "");
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
    fn every_default_parses() {
        for o in OPTIONS {
            for dev in [false, true] {
                if let Some(d) = o.default_for(dev) {
                    let mut c = Config::blank();
                    assert!((o.set)(&mut c, d).is_ok(), "--{} default {d:?}", o.flag);
                }
            }
        }
        let c = Config::default();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.auth.path, "/ws");
        assert_eq!(c.max_queue_bytes, 1_048_576);
        assert_eq!(c.history_size, 100);
        assert_eq!(c.key_prefix, "pushwire");
        assert!(c.node_id.ends_with(":8080"), "{}", c.node_id);
        assert!(c.events_channel.is_none() && c.auth.allowed_origins.is_none());
    }

    #[test]
    fn every_option_has_a_unique_flag_and_variable() {
        let mut flags: Vec<&str> = OPTIONS.iter().map(|o| o.flag).collect();
        let mut envs: Vec<&str> = OPTIONS.iter().filter_map(|o| o.env).collect();
        let (nf, ne) = (flags.len(), envs.len());
        flags.sort_unstable();
        flags.dedup();
        envs.sort_unstable();
        envs.dedup();
        assert_eq!((flags.len(), envs.len()), (nf, ne));
    }

    #[test]
    fn help_fits_80_columns_and_lists_everything() {
        let h = help();
        for line in h.lines() {
            assert!(line.chars().count() <= HELP_WIDTH, "{line:?}");
        }
        for o in OPTIONS {
            assert!(h.contains(&format!("--{}", o.flag)), "--{}", o.flag);
            if let Some(e) = o.env {
                assert!(h.contains(e), "{e}");
            }
        }
        assert_eq!(h.lines().filter(|l| l.contains("JWT claims")).count(), 1);
    }

    #[test]
    fn dev_needs_no_secret_and_listens_on_loopback() {
        let c = run(&["--dev"], &[]).unwrap();
        assert_eq!(c.auth.mode, AuthMode::Query);
        assert!(c.listen.ip().is_loopback());
        assert!(c.redis.is_none());
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
    fn a_bad_value_is_reported_before_the_missing_key() {
        let e = run(&["--max-connections", "abc"], &[]).unwrap_err();
        assert!(
            e.0.contains("--max-connections") && e.0.contains("abc"),
            "{e}"
        );
        // The first bad flag on the command line is the one named.
        let e = run(&["--workers", "0", "--max-connections", "abc"], &[]).unwrap_err();
        assert!(e.0.contains("--workers"), "{e}");
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable() {
        let e = run(&["--dev"], &[("PUSHWIRE_MAX_CONNECTIONS", "abc")]).unwrap_err();
        assert!(
            e.0.starts_with("PUSHWIRE_MAX_CONNECTIONS=abc: expected a whole number"),
            "{e}"
        );
        assert!(e.0.contains("--max-connections"), "{e}");
        // A secret is never repeated.
        let e = run(&["--dev"], &[("PUSHWIRE_REDIS_URL", "http://u:pw@x")]).unwrap_err();
        assert!(!e.0.contains("pw"), "{e}");
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
        let c = run(&["--dev", "--workers", "0", "--workers", "2"], &[]).unwrap();
        assert_eq!(c.workers, 2);
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
            (&["--dev", "--history-size", "-1"][..], "--history-size"),
            (&["--dev", "--history-ttl", "0"][..], "--history-ttl"),
            (&["--dev", "--key-prefix", "a:b"][..], "--key-prefix"),
            (&["--dev", "--node-id", "a b"][..], "--node-id"),
            (&["--dev", "--events-channel", ""][..], "--events-channel"),
            (&["--dev", "--offline-grace", "x"][..], "--offline-grace"),
            (
                &["--dev", "--max-connections-per-user", "x"][..],
                "--max-connections-per-user",
            ),
        ] {
            let e = run(args, &[]).unwrap_err();
            assert!(e.0.contains(flag), "{e}");
            assert!(!e.0.contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_options_still_to_come_are_stored() {
        let c = run(
            &[
                "--dev",
                "--history-size",
                "0",
                "--history-ttl",
                "60",
                "--key-prefix",
                "pw_2",
                "--node-id",
                "a:1",
                "--events-channel",
                "ev",
                "--offline-grace",
                "0",
                "--max-connections-per-user",
                "3",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.history_size, 0);
        assert_eq!(c.history_ttl, Duration::from_secs(60));
        assert_eq!(c.key_prefix, "pw_2");
        assert_eq!(c.node_id, "a:1");
        assert_eq!(c.events_channel.as_deref(), Some("ev"));
        assert_eq!(c.offline_grace, Duration::ZERO);
        assert_eq!(c.max_connections_per_user, 3);
        let c = run(&["--dev", "--listen", "127.0.0.1:7000"], &[]).unwrap();
        assert!(c.node_id.ends_with(":7000"), "{}", c.node_id);
    }

    #[test]
    fn origins_need_a_scheme() {
        let c = run(
            &[
                "--dev",
                "--allowed-origins",
                "https://a.example, https://b.example/,http://localhost:3000",
                "--admin-listen",
                "off",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.auth.allowed_origins,
            Some(vec![
                "https://a.example".into(),
                "https://b.example".into(),
                "http://localhost:3000".into()
            ])
        );
        assert!(c.admin_listen.is_none());
        for bad in [
            "example.com",
            "https://a.example,b.example",
            "https://",
            "https://a/b",
        ] {
            let e = run(&["--dev", "--allowed-origins", bad], &[]).unwrap_err();
            assert!(e.0.contains("https://example.com"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_network_admin_listener_needs_a_token_or_insecure() {
        let e = run(&["--dev", "--admin-listen", "0.0.0.0:9090"], &[]).unwrap_err();
        assert!(
            e.0.contains("--admin-listen") && e.0.contains("--admin-token-file"),
            "{e}"
        );
        let c = run(
            &[
                "--dev",
                "--admin-listen",
                "0.0.0.0:9090",
                "--admin-insecure",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.warnings().len(), 1);
        let c = run(&["--dev"], &[("PUSHWIRE_ADMIN_INSECURE", "true")]).unwrap();
        assert!(c.admin_insecure && c.warnings().is_empty());
        let e = run(&["--dev", "--admin-protect-metrics"], &[]).unwrap_err();
        assert!(e.0.contains("--admin-token-file"), "{e}");
    }
}
