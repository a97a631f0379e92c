//! The admin token (issue 14): `POST /publish` needs
//! `Authorization: Bearer <token>` when `--admin-token-file` is given,
//! health and readiness never do; a non-loopback admin listener without a
//! token refuses to start unless `--admin-insecure`; SIGHUP re-reads the
//! token file; a slow client cannot hold a request slot past the deadline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

const T: Duration = Duration::from_secs(5);

/// Runs the binary expecting it to exit on its own; returns the exit code
/// and stderr.
fn exits(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pushwire");
    let until = Instant::now() + Duration::from_secs(6);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pushwire {args:?} kept running: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (status.code(), err)
}

/// POST /publish with an optional `Authorization` header value.
fn publish(node: &Node, body: &str, authorization: Option<&str>) -> (u16, String) {
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    http(
        node.admin.unwrap(),
        &format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn get(node: &Node, path: &str, authorization: Option<&str>) -> (u16, String) {
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    http(
        node.admin.unwrap(),
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
    )
}

fn token_file(dir: &TempDir, name: &str, token: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

const NOTICE: &str = r#"{"userId":"42","text":"hi"}"#;

/// The token rules on a running node whose token is `token`.
fn assert_token_is_required(node: &Node, token: &str) {
    let mut c = Client::connect(&node.url("/ws?user=42")).expect("upgrade");
    let before = node.metric("pushwire_admin_rejected_total");
    let (st, body) = publish(node, NOTICE, None);
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("missing admin token"), "{body}");
    let (st, body) = publish(node, NOTICE, Some("Bearer not-the-token"));
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("wrong admin token"), "{body}");
    // A prefix of the token, or the token under another scheme, is no token.
    let prefix = format!("Bearer {}", &token[..token.len() - 1]);
    assert_eq!(publish(node, NOTICE, Some(&prefix)).0, 401);
    assert_eq!(
        publish(node, NOTICE, Some(&format!("Basic {token}"))).0,
        401
    );
    assert_eq!(
        node.metric("pushwire_admin_rejected_total"),
        before + 4.0,
        "every refusal is counted"
    );
    c.expect_nothing(Duration::from_millis(200));
    let (st, body) = publish(node, NOTICE, Some(&format!("Bearer {token}")));
    assert_eq!(st, 202, "{body}");
    assert_eq!(c.recv_text(T).as_deref(), Some(NOTICE));
    // Load balancers and Prometheus need no token.
    assert_eq!(get(node, "/healthz", None).0, 200);
    assert_eq!(get(node, "/readyz", None).0, 200);
    assert_eq!(get(node, "/metrics", None).0, 200);
}

#[test]
fn a_network_admin_listener_without_a_token_refuses_to_start() {
    let _w = watchdog(20);
    let (code, err) = exits(
        &[
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains("--admin-listen") && err.contains("--admin-token-file"),
        "names both flags: {err}"
    );
    // The same through the environment.
    let (code, err) = exits(
        &["--dev", "--listen", "127.0.0.1:0"],
        &[("PUSHWIRE_ADMIN_LISTEN", "0.0.0.0:0")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--admin-token-file"), "{err}");
    // Protecting /metrics needs a token to protect it with.
    let (code, err) = exits(
        &[
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-protect-metrics",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--admin-token-file"), "{err}");
}

#[test]
fn admin_insecure_starts_open_and_warns() {
    let _w = watchdog(20);
    for (args, env) in [
        (&["--admin-insecure"][..], &[][..]),
        (&[][..], &[("PUSHWIRE_ADMIN_INSECURE", "true")][..]),
    ] {
        let node = Node::start_cmd(
            Command::new(BIN)
                .args([
                    "--dev",
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-listen",
                    "0.0.0.0:0",
                ])
                .args(args)
                .envs(env.iter().copied()),
        );
        assert!(
            wait_until(T, || node.log_contains("WARN")
                && node.log_contains("--admin-insecure")),
            "a warning at start"
        );
        let mut c = Client::connect(&node.url("/ws?user=42")).expect("upgrade");
        assert_eq!(publish(&node, NOTICE, None).0, 202);
        assert_eq!(c.recv_text(T).as_deref(), Some(NOTICE));
    }
}

#[test]
fn on_loopback_no_token_is_needed() {
    let _w = watchdog(20);
    let node = Node::start(&["--dev"]);
    let mut c = Client::connect(&node.url("/ws?user=42")).expect("upgrade");
    assert_eq!(publish(&node, NOTICE, None).0, 202);
    assert_eq!(c.recv_text(T).as_deref(), Some(NOTICE));
    assert_eq!(node.metric("pushwire_admin_rejected_total"), 0.0);
}

#[test]
fn with_a_token_publish_needs_it_and_health_does_not() {
    let _w = watchdog(30);
    let dir = TempDir::new("admin-token");
    let file = token_file(&dir, "admin.token", "s3cret-admin-token");
    // On loopback and on a network address (where it is required).
    for admin in ["127.0.0.1:0", "0.0.0.0:0"] {
        let node = Node::start(&[
            "--dev",
            "--admin-listen",
            admin,
            "--admin-token-file",
            &file,
        ]);
        assert_token_is_required(&node, "s3cret-admin-token");
    }
}

#[test]
fn the_token_file_through_the_environment() {
    let _w = watchdog(30);
    let dir = TempDir::new("admin-token-env");
    let file = token_file(&dir, "admin.token", "env-admin-token");
    let node = Node::start_cmd(
        Command::new(BIN)
            .args([
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "0.0.0.0:0",
            ])
            .env("PUSHWIRE_ADMIN_TOKEN_FILE", &file),
    );
    assert_token_is_required(&node, "env-admin-token");
    // A bad file named by the variable: refused at start, naming it.
    let (code, err) = exits(
        &["--dev", "--listen", "127.0.0.1:0"],
        &[("PUSHWIRE_ADMIN_TOKEN_FILE", "/nonexistent/admin.token")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("PUSHWIRE_ADMIN_TOKEN_FILE=/nonexistent/admin.token"),
        "{err}"
    );
    let empty = token_file(&dir, "empty.token", "");
    let (code, err) = exits(&["--dev", "--admin-token-file", &empty], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--admin-token-file") && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn metrics_can_be_protected_too() {
    let _w = watchdog(20);
    let dir = TempDir::new("admin-metrics");
    let file = token_file(&dir, "admin.token", "metrics-token");
    let node = Node::start(&[
        "--dev",
        "--admin-token-file",
        &file,
        "--admin-protect-metrics",
    ]);
    assert_eq!(get(&node, "/metrics", None).0, 401);
    let (st, text) = get(&node, "/metrics", Some("Bearer metrics-token"));
    assert_eq!(st, 200);
    assert!(text.contains("pushwire_admin_rejected_total 1"), "{text}");
    assert_eq!(get(&node, "/healthz", None).0, 200);
    assert_eq!(get(&node, "/readyz", None).0, 200);
}

#[test]
fn sighup_picks_up_a_new_token_and_a_bad_file_keeps_the_old_one() {
    let _w = watchdog(30);
    let dir = TempDir::new("admin-rotate");
    let file = token_file(&dir, "admin.token", "token-a");
    let node = Node::start(&["--dev", "--admin-token-file", &file]);
    assert_eq!(publish(&node, NOTICE, Some("Bearer token-a")).0, 202);

    token_file(&dir, "admin.token", "token-b");
    node.signal(libc::SIGHUP);
    assert!(wait_until(T, || node.log_contains("re-read the admin token file")));
    assert_eq!(publish(&node, NOTICE, Some("Bearer token-b")).0, 202);
    assert_eq!(publish(&node, NOTICE, Some("Bearer token-a")).0, 401);

    // An empty file, then a missing one: the old token stays.
    for broken in ["empty", "missing"] {
        if broken == "empty" {
            std::fs::write(&file, "\n").unwrap();
        } else {
            std::fs::remove_file(&file).unwrap();
        }
        let errors = || {
            node.log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("ERROR") && l.contains("admin token"))
                .count()
        };
        let before = errors();
        node.signal(libc::SIGHUP);
        assert!(
            wait_until(T, || errors() > before),
            "{broken}: an error line"
        );
        assert_eq!(
            publish(&node, NOTICE, Some("Bearer token-b")).0,
            202,
            "{broken} file: the old token stays"
        );
    }
}

#[test]
fn refusals_are_logged_at_a_low_rate_with_the_peer() {
    let _w = watchdog(20);
    let dir = TempDir::new("admin-log");
    let file = token_file(&dir, "admin.token", "quiet-token");
    let node = Node::start(&["--dev", "--admin-token-file", &file]);
    for _ in 0..20 {
        assert_eq!(publish(&node, NOTICE, Some("Bearer nope")).0, 401);
    }
    assert_eq!(node.metric("pushwire_admin_rejected_total"), 20.0);
    assert!(wait_until(T, || node.log_contains("admin: refused")));
    std::thread::sleep(Duration::from_millis(200));
    let lines: Vec<String> = node
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("admin: refused"))
        .cloned()
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("peer=127.0.0.1:"), "{lines:?}");
}

#[test]
fn a_slow_client_cannot_hold_a_request_slot_past_the_deadline() {
    let _w = watchdog(30);
    let node = Node::start(&["--dev"]);
    let admin = node.admin.unwrap();
    // A byte every 300 ms keeps every per-read timeout happy; the deadline
    // for the whole request still ends it.
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let started = Instant::now();
    let request = b"POST /publish HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut answer = Vec::new();
    'trickle: for b in request.iter().cycle() {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => break 'trickle,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                break 'trickle;
            }
            Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "the slow request still holds its slot"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(4), "cut too early: {took:?}");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // The slot is free again, and the node is healthy.
    assert_eq!(get(&node, "/healthz", None).0, 200);
}
