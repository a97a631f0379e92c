//! The command line (SPEC section 2): a bad value is refused with exit
//! status 2 and one line on stderr naming the flag; `--help` and
//! `--version` work as usual; a listener that cannot be bound stops the
//! start instead of running half-configured.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` and only the given environment; fails the
/// test if it is still running after 6 s (it started when it should not).
fn run(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pushwire");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + Duration::from_secs(6);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pushwire {args:?} kept running: it should have exited");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Listeners that cannot clash with anything, placed before the case's own
/// flags (a later flag wins).
const QUIET: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "off"];

fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = QUIET.to_vec();
    all.extend_from_slice(args);
    let o = run(&all, env);
    assert_eq!(
        o.code,
        Some(2),
        "{args:?} {env:?} should exit 2; stderr: {:?}",
        o.stderr
    );
    assert!(o.stdout.is_empty(), "{args:?}: stdout {:?}", o.stdout);
    assert!(
        o.stderr.ends_with('\n') && o.stderr.lines().count() == 1,
        "{args:?} {env:?}: exactly one line on stderr, got {:?}",
        o.stderr
    );
    let line = o.stderr.trim_end().to_string();
    assert!(line.len() > 10, "{args:?}: {line:?}");
    line
}

#[test]
fn bad_values_exit_2_with_one_line_naming_the_flag() {
    let _w = watchdog(25);
    let k = ["--jwt-secret", "k"];
    let cases: &[(&[&str], &str)] = &[
        (&["--workers", "0"], "--workers"),
        (&["--workers", "many"], "--workers"),
        (&["--workers", "100000"], "--workers"),
        (&["--listen", "nope"], "--listen"),
        (&["--listen", "127.0.0.1"], "--listen"),
        (&["--listen", "127.0.0.1:99999"], "--listen"),
        (&["--admin-listen", "nope"], "--admin-listen"),
        (&["--auth", "magic"], "--auth"),
        (&["--path", "ws"], "--path"),
        (&["--redis", "http://127.0.0.1:6379"], "--redis"),
        (&["--redis", "nope"], "--redis"),
        (&["--channel", ""], "--channel"),
        (&["--user-header", "X User"], "--user-header"),
        (&["--allowed-origins", ","], "--allowed-origins"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--max-connections", "-5"], "--max-connections"),
        (&["--max-message-bytes", "10"], "--max-message-bytes"),
        (&["--max-queue-bytes", "lots"], "--max-queue-bytes"),
        (&["--ping-interval", "-1"], "--ping-interval"),
        (&["--ping-interval", "NaN"], "--ping-interval"),
        (&["--idle-timeout", "inf"], "--idle-timeout"),
        (&["--handshake-timeout", "0"], "--handshake-timeout"),
        (&["--shutdown-timeout", "soon"], "--shutdown-timeout"),
        (&["--canary-interval", "0"], "--canary-interval"),
        (&["--log-level", "loud"], "--log-level"),
        (
            &["--ping-interval", "30", "--idle-timeout", "20"],
            "--idle-timeout",
        ),
        (
            &["--jwt-secret-file", "/nonexistent/pushwire.key"],
            "--jwt-secret-file",
        ),
        (&["--history-size", "many"], "--history-size"),
        (&["--history-ttl", "0"], "--history-ttl"),
        (&["--key-prefix", "push:wire"], "--key-prefix"),
        (&["--node-id", "has space"], "--node-id"),
        (&["--offline-grace", "-1"], "--offline-grace"),
        (
            &["--max-connections-per-user", "-1"],
            "--max-connections-per-user",
        ),
        (&["--allowed-origins", "example.com"], "--allowed-origins"),
        (
            &["--admin-token-file", "/nonexistent/admin.token"],
            "--admin-token-file",
        ),
        (&["--bogus", "1"], "--bogus"),
        (&["--workers"], "--workers"),
    ];
    for (args, flag) in cases {
        let mut all = k.to_vec();
        all.extend_from_slice(args);
        let line = refused(&all, &[]);
        assert!(line.contains(flag), "{args:?}: {line:?} should name {flag}");
    }
    // The value and what is accepted are named too.
    let line = refused(&["--dev", "--workers", "0"], &[]);
    assert!(line.contains('0') && line.contains("256"), "{line}");
    let line = refused(&["--dev", "--auth", "magic"], &[]);
    for w in ["magic", "jwt", "header", "query"] {
        assert!(line.contains(w), "{line:?} should mention {w}");
    }
    let line = refused(&["--dev", "--listen", "nope"], &[]);
    assert!(line.contains("nope"), "{line}");
}

#[test]
fn bad_values_from_the_environment_are_refused_too() {
    let _w = watchdog(20);
    let line = refused(&["--dev"], &[("PUSHWIRE_WORKERS", "0")]);
    assert!(line.contains("--workers"), "{line}");
    let line = refused(&["--dev"], &[("PUSHWIRE_AUTH", "magic")]);
    assert!(line.contains("--auth"), "{line}");
    let line = refused(&["--dev"], &[("PUSHWIRE_LOG", "loud")]);
    assert!(line.contains("--log-level"), "{line}");
    // The flag wins over the environment: a good flag hides a bad env value.
    let node = Node::start_cmd(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--dev", "--workers", "1"])
            .env("PUSHWIRE_WORKERS", "0"),
    );
    assert!(wait_until(T, || node.log_contains("workers=1")));
    assert_eq!(node.admin_get("/readyz").0, 200);
}

#[test]
fn jwt_without_a_secret_points_at_the_secret_file_and_dev() {
    let _w = watchdog(20);
    for args in [&[][..], &["--auth", "jwt"][..]] {
        let line = refused(args, &[]);
        assert!(
            line.contains("--jwt-secret-file") && line.contains("--dev"),
            "{line}"
        );
    }
    // An empty environment variable is no secret either.
    let line = refused(&[], &[("PUSHWIRE_JWT_SECRET", "")]);
    assert!(line.contains("--jwt-secret-file"), "{line}");
    // The other modes need none: the node starts.
    for mode in ["header", "query"] {
        let node = Node::start(&["--auth", mode]);
        assert_eq!(node.admin_get("/readyz").0, 200, "--auth {mode}");
    }
}

#[test]
fn an_empty_jwt_secret_is_refused() {
    let _w = watchdog(20);
    // An empty HS256 key makes every token fail (the verifier refuses an
    // empty key): the node would run but accept nobody. A bad value.
    let line = refused(&["--jwt-secret", ""], &[]);
    assert!(line.contains("--jwt-secret"), "{line}");
}

#[test]
fn an_empty_key_file_or_two_secrets_are_refused() {
    let _w = watchdog(20);
    let dir = TempDir::new("cli");
    let empty = dir.join("empty.key");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.to_str().unwrap().to_string();
    let line = refused(&["--jwt-secret-file", &empty], &[]);
    assert!(line.contains("--jwt-secret-file"), "{line}");
    let line = refused(&["--jwt-secret", "a", "--jwt-secret-file", &empty], &[]);
    assert!(
        line.contains("--jwt-secret") && line.contains("--jwt-secret-file"),
        "{line}"
    );
}

#[test]
fn dev_refuses_a_non_loopback_listener() {
    let _w = watchdog(20);
    let line = refused(&["--dev", "--listen", "0.0.0.0:8080"], &[]);
    assert!(
        line.contains("--listen") && line.contains("--dev"),
        "{line}"
    );
}

const EVERY_FLAG: &[(&str, &str)] = &[
    ("--listen", "PUSHWIRE_LISTEN"),
    ("--path", "PUSHWIRE_PATH"),
    ("--admin-listen", "PUSHWIRE_ADMIN_LISTEN"),
    ("--redis", "PUSHWIRE_REDIS_URL"),
    ("--channel", "PUSHWIRE_CHANNEL"),
    ("--auth", "PUSHWIRE_AUTH"),
    ("--jwt-secret", "PUSHWIRE_JWT_SECRET"),
    ("--jwt-secret-file", "PUSHWIRE_JWT_SECRET_FILE"),
    ("--user-header", "PUSHWIRE_USER_HEADER"),
    ("--allowed-origins", "PUSHWIRE_ALLOWED_ORIGINS"),
    ("--max-connections", "PUSHWIRE_MAX_CONNECTIONS"),
    ("--max-message-bytes", "PUSHWIRE_MAX_MESSAGE_BYTES"),
    ("--max-queue-bytes", "PUSHWIRE_MAX_QUEUE_BYTES"),
    ("--ping-interval", "PUSHWIRE_PING_INTERVAL"),
    ("--idle-timeout", "PUSHWIRE_IDLE_TIMEOUT"),
    ("--handshake-timeout", "PUSHWIRE_HANDSHAKE_TIMEOUT"),
    ("--shutdown-timeout", "PUSHWIRE_SHUTDOWN_TIMEOUT"),
    ("--canary-interval", "PUSHWIRE_CANARY_INTERVAL"),
    ("--resync-notice", "PUSHWIRE_RESYNC_NOTICE"),
    ("--workers", "PUSHWIRE_WORKERS"),
    ("--log-level", "PUSHWIRE_LOG"),
    ("--admin-token-file", "PUSHWIRE_ADMIN_TOKEN_FILE"),
    ("--admin-insecure", "PUSHWIRE_ADMIN_INSECURE"),
    ("--admin-protect-metrics", "PUSHWIRE_ADMIN_PROTECT_METRICS"),
    ("--history-size", "PUSHWIRE_HISTORY_SIZE"),
    ("--history-ttl", "PUSHWIRE_HISTORY_TTL"),
    ("--key-prefix", "PUSHWIRE_KEY_PREFIX"),
    ("--node-id", "PUSHWIRE_NODE_ID"),
    ("--events-channel", "PUSHWIRE_EVENTS_CHANNEL"),
    ("--offline-grace", "PUSHWIRE_OFFLINE_GRACE"),
    (
        "--max-connections-per-user",
        "PUSHWIRE_MAX_CONNECTIONS_PER_USER",
    ),
];

#[test]
fn help_lists_every_flag_and_exits_0() {
    let _w = watchdog(20);
    for flag in ["--help", "-h"] {
        let o = run(&[flag], &[]);
        assert_eq!(o.code, Some(0), "{flag}: {}", o.stderr);
        assert!(o.stderr.is_empty(), "{flag}: stderr {:?}", o.stderr);
        let words: Vec<&str> = o
            .stdout
            .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
            .collect();
        for (f, env) in EVERY_FLAG {
            assert!(words.contains(f), "{flag} does not list {f}");
            assert!(words.contains(env), "{flag} does not list {env}");
        }
        for f in ["--dev", "--help", "--version"] {
            assert!(words.contains(&f), "{flag} does not list {f}");
        }
    }
    // Help wins even when a secret is missing: nothing is validated.
    assert_eq!(run(&["--workers", "4", "--help"], &[]).code, Some(0));
}

#[test]
fn help_fits_80_columns_and_states_the_token_claims_in_one_line() {
    let _w = watchdog(20);
    let o = run(&["--help"], &[]);
    assert_eq!(o.code, Some(0));
    for line in o.stdout.lines() {
        assert!(
            line.chars().count() <= 80,
            "wider than 80 columns: {line:?}"
        );
    }
    let claims: Vec<&str> = o
        .stdout
        .lines()
        .filter(|l| l.contains(" sub ") && l.contains("exp") && l.contains("nbf"))
        .collect();
    assert_eq!(
        claims.len(),
        1,
        "one line names sub, exp and nbf: {claims:?}"
    );
    assert!(claims[0].contains("integer"), "{claims:?}");
}

#[test]
fn the_first_bad_value_is_reported_before_the_missing_key() {
    let _w = watchdog(20);
    // No JWT key either: the bad number is what the operator must fix first.
    let line = refused(&["--max-connections", "abc"], &[]);
    assert!(
        line.contains("--max-connections") && line.contains("abc") && !line.contains("HS256"),
        "{line}"
    );
    // The first bad flag on the command line.
    let line = refused(&["--workers", "0", "--max-connections", "abc"], &[]);
    assert!(line.contains("--workers"), "{line}");
    // Once the values are good, the missing key.
    let line = refused(&["--max-connections", "5"], &[]);
    assert!(line.contains("--jwt-secret-file"), "{line}");
}

#[test]
fn a_bad_value_from_the_environment_names_the_variable() {
    let _w = watchdog(20);
    let line = refused(&[], &[("PUSHWIRE_MAX_CONNECTIONS", "abc")]);
    assert!(
        line.starts_with("pushwire: PUSHWIRE_MAX_CONNECTIONS=abc: expected "),
        "{line}"
    );
    let line = refused(&["--dev"], &[("PUSHWIRE_ALLOWED_ORIGINS", "example.com")]);
    assert!(
        line.contains("PUSHWIRE_ALLOWED_ORIGINS=example.com")
            && line.contains("https://example.com"),
        "{line}"
    );
    // A URL that may hold a password is never repeated.
    let line = refused(&["--dev"], &[("PUSHWIRE_REDIS_URL", "http://u:hunter2@x")]);
    assert!(
        line.contains("PUSHWIRE_REDIS_URL") && !line.contains("hunter2"),
        "{line}"
    );
}

#[test]
fn an_origin_without_a_scheme_is_refused_with_the_form_expected() {
    let _w = watchdog(20);
    for list in [
        "example.com",
        "https://a.example,b.example",
        "https://a.example/app",
    ] {
        let line = refused(&["--dev", "--allowed-origins", list], &[]);
        assert!(
            line.contains("--allowed-origins") && line.contains("https://example.com"),
            "{list}: {line}"
        );
    }
    let node = Node::start(&[
        "--dev",
        "--allowed-origins",
        "https://a.example,http://localhost:3000",
    ]);
    assert_eq!(node.admin_get("/readyz").0, 200);
}

#[test]
fn the_options_of_features_still_to_come_are_accepted() {
    let _w = watchdog(20);
    let node = Node::start(&[
        "--dev",
        "--history-size",
        "0",
        "--history-ttl",
        "60",
        "--key-prefix",
        "pw_test",
        "--node-id",
        "node-a:1",
        "--events-channel",
        "events",
        "--offline-grace",
        "2.5",
        "--max-connections-per-user",
        "3",
    ]);
    assert_eq!(node.admin_get("/readyz").0, 200);
}

#[test]
fn version_prints_the_version() {
    let _w = watchdog(20);
    for flag in ["--version", "-V"] {
        let o = run(&[flag], &[]);
        assert_eq!(o.code, Some(0), "{flag}: {}", o.stderr);
        assert_eq!(
            o.stdout,
            format!("pushwire {}\n", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
        assert!(o.stderr.is_empty(), "{flag}: stderr {:?}", o.stderr);
    }
}

#[test]
fn a_listener_that_cannot_be_bound_stops_the_start() {
    let _w = watchdog(20);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (flag, args) in [
        (
            "--listen",
            ["--listen", addr.as_str(), "--admin-listen", "127.0.0.1:0"],
        ),
        (
            "--admin-listen",
            ["--listen", "127.0.0.1:0", "--admin-listen", addr.as_str()],
        ),
    ] {
        let mut all = args.to_vec();
        all.extend(["--jwt-secret", "k"]);
        let o = run(&all, &[]);
        assert_eq!(o.code, Some(1), "{flag} in use: {:?}", o.stderr);
        assert!(
            o.stderr.contains(flag) && o.stderr.contains(&addr),
            "{flag} in use: the error names the flag and address: {:?}",
            o.stderr
        );
    }
    drop(taken);
}
