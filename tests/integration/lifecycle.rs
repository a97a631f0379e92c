//! Life cycle as a daemon (SPEC section 6): the graceful drain on SIGTERM,
//! a second signal cutting it short, the systemd notify protocol (path and
//! abstract sockets, watchdog), SIGHUP key rotation, socket activation, the
//! shipped unit files, and the `--dev` demo page on the WebSocket port.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

#[test]
fn sigterm_delivers_queued_notices_then_1001_and_exits_0() {
    let _w = watchdog(60);
    let mut node = Node::start(&["--dev", "--shutdown-timeout", "8"]);
    let mut clients = vec![
        node.connect_dev("42"),
        node.connect_dev("42"),
        node.connect_dev("7"),
    ];
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 3.0));

    // A burst, posted right before SIGTERM: small notices and a few large
    // ones, so that some of it is still queued when the drain starts.
    let big = "x".repeat(60_000);
    let mut sent = Vec::new();
    for i in 0..40 {
        let body = if i % 10 == 9 {
            format!(r#"{{"broadcast":true,"n":{i},"pad":"{big}"}}"#)
        } else {
            format!(r#"{{"broadcast":true,"n":{i}}}"#)
        };
        let (status, answer) = node.publish(&body);
        assert_eq!(status, 202, "{answer}");
        sent.push(body);
    }
    let to_42 = r#"{"userId":"42","text":"last one, for 42"}"#;
    assert_eq!(node.publish(to_42).0, 202);
    let signalled = Instant::now();
    node.signal(libc::SIGTERM);

    for (i, c) in clients.iter_mut().enumerate() {
        for (n, body) in sent.iter().enumerate() {
            let got = c.recv_text(T);
            assert_eq!(
                got.as_deref(),
                Some(body.as_str()),
                "client {i}: notice {n} of the burst before the close"
            );
        }
        if i < 2 {
            assert_eq!(c.recv_text(T).as_deref(), Some(to_42), "client {i}");
        }
        assert_eq!(c.recv_close(T), Some(1001), "client {i}: close code");
        // Answer the close as a browser does, then hang up.
        let _ = c.ws.flush();
    }
    clients.clear();

    let status = node
        .wait_exit(Duration::from_secs(8))
        .expect("exited within --shutdown-timeout (8 s)");
    assert!(status.success(), "exit status {status:?}");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "drain took {took:?}, over --shutdown-timeout"
    );
    assert!(node.log_contains("stop signal: draining 3 connections"));
    assert!(node.log_contains("stopped"));
}

#[test]
fn second_sigterm_during_a_stalled_drain_exits_at_once() {
    let _w = watchdog(60);
    let mut node = Node::start(&["--dev", "--shutdown-timeout", "120"]);
    // This client never reads and never answers the close: the drain would
    // wait the whole --shutdown-timeout for it.
    let _stuck = node.connect_dev("1");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 1.0));
    let big = "y".repeat(200_000);
    for i in 0..4 {
        let body = format!(r#"{{"userId":"1","n":{i},"pad":"{big}"}}"#);
        assert_eq!(node.publish(&body).0, 202);
    }

    node.signal(libc::SIGTERM);
    assert!(wait_until(T, || node.log_contains("stop signal")));
    // Draining: not ready any more, still running.
    let (status, body) = node.admin_get("/readyz");
    assert_eq!(status, 503, "{body}");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the drain should still be waiting for the stuck client"
    );

    let second = Instant::now();
    node.signal(libc::SIGTERM);
    let status = node
        .wait_exit(Duration::from_secs(3))
        .expect("a second SIGTERM ends the drain at once");
    assert!(
        status.code().is_some(),
        "the process exits by itself, not killed by the signal: {status:?}"
    );
    assert!(second.elapsed() < Duration::from_secs(3));
    assert!(node.log_contains("second stop signal"));
}

/// Reads notify datagrams until `f` says stop or `timeout` passes.
fn read_notify(
    sock: &UnixDatagram,
    got: &mut Vec<(Instant, String)>,
    timeout: Duration,
    mut done: impl FnMut(&[(Instant, String)]) -> bool,
) -> bool {
    let until = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        if done(got) {
            return true;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        sock.set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                eprintln!("[notify] {msg}");
                for line in msg.lines() {
                    got.push((Instant::now(), line.to_string()));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

fn count(got: &[(Instant, String)], what: &str) -> usize {
    got.iter().filter(|(_, m)| m == what).count()
}

#[test]
fn plays_systemd_notify_ready_watchdog_status_stopping() {
    let _w = watchdog(60);
    let dir = TempDir::new("notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut node = Node::start_cmd(
        Node::command()
            .args(["--dev", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "400000"),
    );
    let mut got = Vec::new();
    assert!(
        read_notify(&sock, &mut got, Duration::from_secs(10), |g| {
            count(g, "WATCHDOG=1") >= 3 && g.iter().any(|(_, m)| m.starts_with("STATUS="))
        }),
        "READY=1, 3 x WATCHDOG=1 and a STATUS= line expected, got {got:?}"
    );
    assert_eq!(got[0].1, "READY=1", "READY=1 comes first: {got:?}");
    assert_eq!(count(&got, "READY=1"), 1);
    let status = got
        .iter()
        .find(|(_, m)| m.starts_with("STATUS="))
        .unwrap()
        .1
        .clone();
    assert!(
        status.contains("connections") && status.contains("standalone"),
        "{status}"
    );
    // READY=1 means it is serving: a client gets in and is counted.
    let _c = node.connect_dev("5");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 1.0));

    // The watchdog keeps coming, and never lets WATCHDOG_USEC pass without a
    // ping (systemd would kill the service): sample about two more seconds.
    let from = got.len();
    read_notify(&sock, &mut got, Duration::from_secs(2), |_| false);
    let pings: Vec<Instant> = got
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    let max_gap = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} watchdog pings, the longest gap {max_gap:?}",
        pings.len()
    );
    assert!(
        count(&got[from..], "WATCHDOG=1") >= 3,
        "the watchdog pings continue: {got:?}"
    );
    assert!(
        max_gap < Duration::from_millis(400),
        "with WATCHDOG_USEC=400000 a ping must come at least every 400 ms; the longest gap was {max_gap:?}"
    );

    drop(_c);
    node.signal(libc::SIGTERM);
    assert!(
        read_notify(&sock, &mut got, T, |g| count(g, "STOPPING=1") == 1),
        "STOPPING=1 after SIGTERM: {got:?}"
    );
    let status = node.wait_exit(Duration::from_secs(10)).expect("exit");
    assert!(status.success(), "{status:?}");
}

#[test]
fn notify_on_an_abstract_socket_and_watchdog_pid_of_another_process() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let _w = watchdog(60);
    let name = format!("pushwire-test-{}-{}", std::process::id(), free_port());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let mut node = Node::start_cmd(
        Node::command()
            .args(["--dev", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .env("NOTIFY_SOCKET", format!("@{name}"))
            .env("WATCHDOG_USEC", "400000")
            // The watchdog is meant for another process: not for us.
            .env("WATCHDOG_PID", "1"),
    );
    let mut got = Vec::new();
    assert!(
        read_notify(&sock, &mut got, Duration::from_secs(10), |g| {
            count(g, "READY=1") == 1 && g.iter().any(|(_, m)| m.starts_with("STATUS="))
        }),
        "READY=1 and STATUS= on the abstract socket, got {got:?}"
    );
    read_notify(&sock, &mut got, Duration::from_millis(1500), |_| false);
    assert_eq!(
        count(&got, "WATCHDOG=1"),
        0,
        "WATCHDOG_PID names another process: no pings expected, got {got:?}"
    );
    node.signal(libc::SIGTERM);
    assert!(
        read_notify(&sock, &mut got, T, |g| count(g, "STOPPING=1") == 1),
        "STOPPING=1 after SIGTERM: {got:?}"
    );
    assert!(node.wait_exit(Duration::from_secs(10)).unwrap().success());
}

fn jwt(user: &str, key: &str) -> String {
    sign_hs256(&serde_json::json!({ "sub": user }), key.as_bytes())
}

#[test]
fn sighup_rotates_the_jwt_key_without_dropping_anyone() {
    let _w = watchdog(60);
    let dir = TempDir::new("sighup");
    let file = dir.join("jwt-secret");
    let (key_a, key_b) = ("key-A-0123456789", "key-B-9876543210");
    std::fs::write(&file, format!("{key_a}\n")).unwrap();
    let node = Node::start(&["--jwt-secret-file", file.to_str().unwrap()]);
    let connect = |user: &str, key: &str| {
        Client::connect(&node.url(&format!("/ws?token={}", jwt(user, key))))
    };
    let mut old = connect("42", key_a).expect("key A is valid at start");
    assert!(matches!(connect("1", key_b), Err(Refused { status: 401 })));

    // Rotate: write key B, SIGHUP.
    std::fs::write(&file, format!("{key_b}\n")).unwrap();
    node.signal(libc::SIGHUP);
    assert!(wait_until(T, || node.log_contains("SIGHUP: re-read")));
    let mut new = connect("42", key_b).expect("key B is valid after SIGHUP");
    match connect("43", key_a) {
        Err(Refused { status }) => assert_eq!(status, 401, "key A after rotation"),
        Ok(_) => panic!("key A still accepted after rotation"),
    }
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 2.0));
    let n1 = r#"{"userId":"42","text":"after rotation"}"#;
    assert_eq!(node.publish(n1).0, 202);
    assert_eq!(
        old.recv_text(T).as_deref(),
        Some(n1),
        "the connection made with key A stays open and served"
    );
    assert_eq!(new.recv_text(T).as_deref(), Some(n1));

    // A bad file (empty, then missing) is refused: key B stays valid.
    for (what, bad) in [("empty", Some("")), ("missing", None)] {
        let errors_before = node
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("ERROR") && l.contains("cannot re-read"))
            .count();
        match bad {
            Some(text) => std::fs::write(&file, text).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        node.signal(libc::SIGHUP);
        assert!(
            wait_until(T, || {
                node.log
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|l| l.contains("ERROR") && l.contains("cannot re-read"))
                    .count()
                    > errors_before
            }),
            "an error line for the {what} key file"
        );
        let mut c = connect("44", key_b)
            .unwrap_or_else(|r| panic!("key B refused ({}) after a {what} key file", r.status));
        assert!(matches!(connect("45", key_a), Err(Refused { status: 401 })));
        let n = format!(r#"{{"userId":"44","text":"{what}"}}"#);
        assert_eq!(node.publish(&n).0, 202);
        assert_eq!(c.recv_text(T), Some(n));
    }
    let n2 = r#"{"userId":"42","text":"still here"}"#;
    assert_eq!(node.publish(n2).0, 202);
    assert_eq!(old.recv_text(T).as_deref(), Some(n2));
    assert_eq!(new.recv_text(T).as_deref(), Some(n2));
}

#[test]
fn socket_activation_uses_the_listener_on_fd_3() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let _w = watchdog(60);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    // --listen names another port: the passed socket must win over it.
    let unused = free_port();
    let mut cmd = Command::new("sh");
    for v in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(v);
    }
    // LISTEN_PID must be the server's own pid: exec through sh, whose $$
    // the binary inherits.
    cmd.args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#, BIN])
        .args(["--dev", "--listen", &format!("127.0.0.1:{unused}")])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("LISTEN_FDS", "1");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let flags = libc::fcntl(3, libc::F_GETFD);
            if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let node = Node::start_cmd(&mut cmd);
    drop(listener);
    assert_eq!(node.ws, addr, "the server reports the passed socket");
    assert!(node.log_contains("socket activation"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "--listen is not bound when a socket is passed"
    );

    let mut c = Client::connect(&format!("ws://{addr}/ws?user=42")).expect("upgrade");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 1.0));
    let n = r#"{"userId":"42","text":"through the activated socket"}"#;
    let (status, body) = node.publish(n);
    assert_eq!(status, 202, "{body}");
    assert_eq!(c.recv_text(T).as_deref(), Some(n));
}

/// The systemd directory of the repository.
fn systemd_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

#[test]
fn systemd_units_verify_and_score_ok() {
    let _w = watchdog(60);
    let unit = std::fs::read_to_string(systemd_dir().join("pushwire.service")).unwrap();
    let socket = std::fs::read_to_string(systemd_dir().join("pushwire.socket")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LoadCredential=jwt-secret:",
        "DynamicUser=yes",
    ] {
        assert!(unit.contains(needed), "pushwire.service lacks {needed}");
    }
    assert!(socket.contains("ListenStream=8080"));

    // CI installs systemd-analyze (.ci/run): without it the units are not
    // verified, and that is a failure, not a pass.
    if let Err(e) = Command::new("systemd-analyze").arg("--version").output() {
        panic!(
            "systemd-analyze is required to verify the unit files ({e}): \
             install it (apt-get install -y systemd), as .ci/run does"
        );
    }
    // verify wants ExecStart= to exist: point it at the built binary.
    let dir = TempDir::new("units");
    let unit = unit.replace(
        "ExecStart=/usr/local/bin/pushwire",
        &format!("ExecStart={BIN}"),
    );
    assert!(unit.contains(BIN));
    std::fs::write(dir.join("pushwire.service"), &unit).unwrap();
    std::fs::write(dir.join("pushwire.socket"), &socket).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("pushwire.service"))
        .arg(dir.join("pushwire.socket"))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("pushwire.")).collect();
    assert!(ours.is_empty(), "systemd-analyze verify warns: {ours:?}");

    // The exposure score (systemd >= 252 knows --offline).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.join("pushwire.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let Some(line) = text.lines().find(|l| l.contains("Overall exposure level")) else {
        panic!(
            "this systemd-analyze cannot score a unit offline (systemd >= 252 can), \
             so the exposure score was not checked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    eprintln!("{line}");
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    assert!(score <= 2.0, "exposure {score} is above 2.0: {line}");
}

#[test]
fn env_file_lists_every_setting_with_its_default() {
    let _w = watchdog(30);
    let env = std::fs::read_to_string(systemd_dir().join("pushwire.env")).unwrap();
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let vars: Vec<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("PUSHWIRE_"))
        .collect();
    assert!(vars.len() >= 20, "{vars:?}");
    for v in vars {
        assert!(
            env.lines().any(|l| l.starts_with(&format!("#{v}="))),
            "systemd/pushwire.env lacks a commented-out {v}="
        );
    }
    // Everything is commented out: the file changes nothing as shipped.
    for l in env.lines() {
        assert!(l.is_empty() || l.starts_with('#'), "active line: {l}");
    }
}

#[test]
fn dev_serves_the_demo_page_and_proper_statuses_for_other_paths() {
    let _w = watchdog(30);
    let node = Node::start(&["--dev"]);
    let get = |path: &str| {
        http_raw(
            node.ws,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        )
    };
    let page = get("/?user=7");
    let (status, body) = parse_response(page.as_bytes());
    assert_eq!(status, 200, "{page}");
    let ctype = header_value(&page, "content-type").unwrap_or_default();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let len: usize = header_value(&page, "content-length")
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert_eq!(len, body.len());
    for needed in [
        "src=\"/pushwire.js\"",
        "id=\"status\"",
        "127.0.0.1:9090/publish",
    ] {
        assert!(body.contains(needed), "the page lacks {needed}");
    }
    // Small and self-contained: nothing fetched from elsewhere but the
    // client the node itself serves (on every node, not only --dev).
    assert!(body.len() < 8 * 1024, "{} bytes", body.len());
    let js = get("/pushwire.js");
    let (status, script) = parse_response(js.as_bytes());
    assert_eq!(status, 200, "{js}");
    let ctype = header_value(&js, "content-type").unwrap_or_default();
    assert!(ctype.starts_with("application/javascript"), "{ctype}");
    for needed in ["new WebSocket(", "since", "recovered"] {
        assert!(script.contains(needed), "pushwire.js lacks {needed}");
    }
    assert!(script.len() < 16 * 1024, "{} bytes", script.len());
    for external in ["src=\"http", "src=\"//", "href=\"http", "@import", "url("] {
        assert!(!body.contains(external), "external resource: {external}");
    }

    assert_eq!(parse_response(get("/nope").as_bytes()).0, 404);
    assert_eq!(parse_response(get("/index.html").as_bytes()).0, 404);
    assert_eq!(
        parse_response(get("/ws").as_bytes()).0,
        400,
        "a plain GET of the endpoint is not an upgrade"
    );
    // The page's WebSocket works alongside.
    let mut c = node.connect_dev("7");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 1.0));
    let n = r#"{"userId":"7","text":"hi"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(c.recv_text(T).as_deref(), Some(n));
}

#[test]
fn without_dev_there_is_no_demo_page() {
    let _w = watchdog(30);
    let node = Node::start(&["--jwt-secret", SECRET]);
    let resp = http_raw(
        node.ws,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(parse_response(resp.as_bytes()).0, 404, "{resp}");
}

/// The same promise under load: four publishers post broadcasts
/// concurrently to 150 connections on two loops, and SIGTERM follows the
/// last 202 at once. Every notice accepted before the signal must reach
/// every connection before its 1001. A race shows only now and then, so a
/// few rounds are run.
#[test]
fn sigterm_right_after_a_concurrent_burst_loses_nothing() {
    let _w = watchdog(120);
    const CLIENTS: usize = 150;
    const PUBLISHERS: usize = 4;
    const EACH: usize = 25;
    for round in 0..8 {
        let mut node = Node::start(&["--dev", "--shutdown-timeout", "8", "--workers", "2"]);
        let mut clients: Vec<Client> = (0..CLIENTS)
            .map(|i| node.connect_dev(&i.to_string()))
            .collect();
        assert!(node.wait_metric("pushwire_connections", T, |v| v == CLIENTS as f64));
        let admin = node.admin.unwrap();
        std::thread::scope(|s| {
            for t in 0..PUBLISHERS {
                s.spawn(move || {
                    for i in 0..EACH {
                        let body = format!(r#"{{"broadcast":true,"t":{t},"i":{i}}}"#);
                        let req = format!(
                            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        assert_eq!(http(admin, &req).0, 202);
                    }
                });
            }
        });
        node.signal(libc::SIGTERM);
        let mut short = Vec::new();
        for (i, c) in clients.iter_mut().enumerate() {
            // Every notice, then the end of the connection (the 1001).
            let mut n = 0;
            let end = loop {
                match c.recv(T) {
                    Recv::Text(_) => n += 1,
                    other => break other,
                }
            };
            if n != PUBLISHERS * EACH {
                short.push((i, n, end));
            }
        }
        clients.clear();
        let status = node.wait_exit(Duration::from_secs(10)).expect("exit");
        assert!(status.success(), "{status:?}");
        assert!(
            short.is_empty(),
            "round {round}: {} of {CLIENTS} connections got fewer than the {} notices \
             accepted (202) before SIGTERM, as (client, received, then): {:?}",
            short.len(),
            PUBLISHERS * EACH,
            &short[..short.len().min(8)]
        );
    }
}
