//! Presence (SPEC section 9) over real nodes and a real Redis: fleet-wide
//! counts from every node and from `FCALL_RO`, a killed node dropping out,
//! online/offline events published once for the fleet, a connect storm, a
//! Redis restart, the per-user limit, and the answers to bad input.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::*;

fn user_answer(user: &str, connections: usize, nodes: usize) -> String {
    format!(r#"{{"userId":"{user}","connections":{connections},"nodes":{nodes}}}"#)
}

fn totals(users: usize, connections: usize, nodes: usize) -> String {
    format!(r#"{{"users":{users},"connections":{connections},"nodes":{nodes}}}"#)
}

/// What `FCALL_RO pushwire_presence 0 [user]` answers.
fn fcall(redis: &Redis, user: Option<&str>) -> String {
    let mut args = vec!["FCALL_RO", "pushwire_presence", "0"];
    args.extend(user);
    redis.cmd(&args).unwrap_or_else(|e| e).trim().to_string()
}

fn presence(node: &Node, query: &str) -> (u16, String) {
    let (status, body) = node.admin_get(&format!("/presence{query}"));
    (status, body.trim().to_string())
}

/// Waits until every node and Redis give `want` for `query` (`?user=ID` or "").
fn wait_everywhere(nodes: &[&Node], redis: &Redis, query: &str, want: &str, t: Duration) {
    let user = query.strip_prefix("?user=");
    let ok = wait_until(t, || {
        fcall(redis, user) == want && nodes.iter().all(|n| presence(n, query).1 == want)
    });
    let seen: Vec<_> = nodes.iter().map(|n| presence(n, query)).collect();
    assert!(
        ok,
        "wanted {want} for {query:?}; FCALL_RO {}, nodes {seen:?}",
        fcall(redis, user)
    );
}

/// Every message on `channel`, collected by a thread of its own.
fn collect(redis: &Redis, channel: &str) -> Arc<Mutex<Vec<String>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let mut conn = redis.conn();
    let channel = channel.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ps = conn.as_pubsub();
        ps.subscribe(&channel).unwrap();
        ready_tx.send(()).unwrap();
        while let Ok(m) = ps.get_message() {
            sink.lock()
                .unwrap()
                .push(m.get_payload::<String>().unwrap());
        }
    });
    ready_rx.recv_timeout(T).unwrap();
    got
}

fn event(what: &str, user: &str) -> String {
    format!(r#"{{"event":"{what}","userId":"{user}"}}"#)
}

/// Opens `n` upgrades of users `<tag>0..` with `?user=` from a few threads,
/// writing every request before reading the answers; returns the sockets
/// once every one answered 101.
fn storm(node: &Node, tag: &str, n: usize, threads: usize) -> Vec<TcpStream> {
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let addr = node.ws;
            let tag = tag.to_string();
            std::thread::spawn(move || {
                let ids = (t * per)..((t + 1) * per).min(n);
                let mut socks: Vec<TcpStream> = ids
                    .map(|i| {
                        let mut s = raw_connect(addr, None);
                        let req = format!(
                            "GET /ws?user={tag}{i} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        );
                        s.write_all(req.as_bytes()).unwrap();
                        s
                    })
                    .collect();
                for s in socks.iter_mut() {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut head = Vec::new();
                    let mut buf = [0u8; 512];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let k = s.read(&mut buf).unwrap();
                        assert!(k > 0, "closed before the 101");
                        head.extend_from_slice(&buf[..k]);
                    }
                    assert!(head.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&head));
                }
                socks
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

#[test]
fn presence_three_nodes_answer_the_fleet_and_fcall_ro_the_same() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let a = Node::with_redis(&redis, &[]);
    let b = Node::with_redis(&redis, &[]);
    let c = Node::with_redis(&redis, &[]);
    let all = [&a, &b, &c];
    let a1 = a.connect("42");
    let a2 = a.connect("42");
    let b1 = b.connect("42");
    let other = c.connect("7");
    wait_everywhere(&all, &redis, "?user=42", &user_answer("42", 3, 2), T);
    wait_everywhere(&all, &redis, "", &totals(2, 4, 3), T);
    wait_everywhere(&all, &redis, "?user=7", &user_answer("7", 1, 1), T);
    wait_everywhere(
        &all,
        &redis,
        "?user=nobody",
        &user_answer("nobody", 0, 0),
        T,
    );
    for n in all {
        assert!(n.metric("pushwire_presence_updates_total") >= 1.0);
        assert_eq!(n.metric("pushwire_presence_errors_total"), 0.0);
    }
    drop((a1, a2, b1, other));
    wait_everywhere(&all, &redis, "?user=42", &user_answer("42", 0, 0), T);
    wait_everywhere(&all, &redis, "", &totals(0, 0, 3), T);
}

#[test]
fn presence_killed_node_drops_out_and_its_users_go_offline_once() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let events = collect(&redis, "ev");
    let args = ["--events-channel", "ev", "--offline-grace", "1"];
    let a = Node::with_redis(&redis, &args);
    let mut b = Node::with_redis(&redis, &args);
    let c = Node::with_redis(&redis, &args);
    let _shared_a = a.connect("shared");
    let _shared_b = b.connect("shared");
    let _b1 = b.connect("bonly1");
    let _b2 = b.connect("bonly2");
    let _b3 = b.connect("bonly2");
    let _c1 = c.connect("conly");
    wait_everywhere(&[&a, &c], &redis, "", &totals(4, 6, 3), T);
    assert!(wait_until(T, || events.lock().unwrap().len() == 4));
    // SIGKILL: no goodbye.
    b.child.kill().unwrap();
    let killed = Instant::now();
    // 3 x --canary-interval (0.5 s) plus a heartbeat and a margin.
    let limit = Duration::from_millis(1500 + 500 + 1000);
    wait_everywhere(
        &[&a, &c],
        &redis,
        "?user=bonly2",
        &user_answer("bonly2", 0, 0),
        limit,
    );
    wait_everywhere(
        &[&a, &c],
        &redis,
        "?user=shared",
        &user_answer("shared", 1, 1),
        T,
    );
    wait_everywhere(&[&a, &c], &redis, "", &totals(2, 2, 2), T);
    let dropped = killed.elapsed();
    eprintln!("the killed node stopped counting after {dropped:?}");
    assert!(dropped < limit + Duration::from_millis(500), "{dropped:?}");
    // Offline after the grace (1 s), once each for the whole fleet.
    assert!(wait_until(Duration::from_secs(5), || events
        .lock()
        .unwrap()
        .len()
        >= 6));
    std::thread::sleep(Duration::from_millis(1500));
    let mut got = events.lock().unwrap().clone();
    got.sort();
    let mut want = vec![
        event("online", "shared"),
        event("online", "bonly1"),
        event("online", "bonly2"),
        event("online", "conly"),
        event("offline", "bonly1"),
        event("offline", "bonly2"),
    ];
    want.sort();
    assert_eq!(got, want);
    let published = |what: &str| -> f64 {
        [&a, &c]
            .iter()
            .map(|n| {
                n.metric(&format!(
                    "pushwire_events_published_total{{event=\"{what}\"}}"
                ))
            })
            .sum()
    };
    assert_eq!(published("offline"), 2.0);
}

#[test]
fn presence_moving_between_nodes_inside_the_grace_sends_nothing() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let events = collect(&redis, "ev");
    let args = ["--events-channel", "ev", "--offline-grace", "2"];
    let a = Node::with_redis(&redis, &args);
    let b = Node::with_redis(&redis, &args);
    let mut on_a = a.connect("mover");
    assert!(wait_until(T, || events.lock().unwrap().len() == 1));
    assert_eq!(events.lock().unwrap()[0], event("online", "mover"));
    on_a.ws.close(None).unwrap();
    let _ = on_a.recv(T);
    drop(on_a);
    wait_everywhere(
        &[&a, &b],
        &redis,
        "?user=mover",
        &user_answer("mover", 0, 0),
        T,
    );
    let _on_b = b.connect("mover");
    wait_everywhere(
        &[&a, &b],
        &redis,
        "?user=mover",
        &user_answer("mover", 1, 1),
        T,
    );
    // Past the grace and a heartbeat or two: still the one event.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(*events.lock().unwrap(), vec![event("online", "mover")]);
}

#[test]
fn presence_connect_storm_converges_within_a_second() {
    let _w = watchdog(120);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &["--auth", "query", "--workers", "2"]);
    const N: usize = 10_000;
    let t0 = Instant::now();
    let socks = storm(&node, "s", N, 4);
    let upgraded = Instant::now();
    let want = totals(N, N, 1);
    assert!(
        wait_until(Duration::from_secs(10), || fcall(&redis, None) == want),
        "{}",
        fcall(&redis, None)
    );
    let converged = upgraded.elapsed();
    eprintln!(
        "storm: {N} upgrades in {:?} ({:.0}/s); presence exact {converged:?} after the last",
        upgraded - t0,
        N as f64 / (upgraded - t0).as_secs_f64()
    );
    assert!(converged < Duration::from_secs(1), "{converged:?}");
    drop(socks);
    assert!(wait_until(T, || fcall(&redis, None) == totals(0, 0, 1)));
}

#[test]
fn presence_is_rebuilt_by_every_node_after_a_redis_restart() {
    let _w = watchdog(90);
    let mut redis = Redis::start();
    let a = Node::with_redis(&redis, &["--auth", "query"]);
    let b = Node::with_redis(&redis, &["--auth", "query"]);
    let _sa = storm(&a, "a", 500, 2);
    let _sb = storm(&b, "b", 500, 2);
    wait_everywhere(&[&a, &b], &redis, "", &totals(1000, 1000, 2), T);
    redis.restart();
    wait_everywhere(
        &[&a, &b],
        &redis,
        "",
        &totals(1000, 1000, 2),
        Duration::from_secs(15),
    );
    wait_everywhere(&[&a, &b], &redis, "?user=b7", &user_answer("b7", 1, 1), T);
    assert!(a.metric("pushwire_presence_errors_total") >= 1.0);
}

#[test]
fn presence_per_user_limit_refuses_the_third_upgrade_with_429() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &["--max-connections-per-user", "2"]);
    let mut first = node.connect("lim");
    let mut second = node.connect("lim");
    let url = node.url(&format!("/ws?token={}", token("lim", None)));
    assert_eq!(Client::connect(&url).err().map(|r| r.status), Some(429));
    // The same token in a loop: never more than two.
    for _ in 0..20 {
        assert_eq!(Client::connect(&url).err().map(|r| r.status), Some(429));
    }
    assert_eq!(
        node.metric(r#"pushwire_handshake_rejected_total{reason="user_limit"}"#),
        21.0
    );
    let _other = node.connect("someone-else");
    let n = r#"{"userId":"lim","text":"both"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(first.recv_text(T).as_deref(), Some(n));
    assert_eq!(second.recv_text(T).as_deref(), Some(n));
    first.ws.close(None).unwrap();
    let _ = first.recv(T);
    let mut third = None;
    assert!(wait_until(T, || {
        third = Client::connect(&url).ok();
        third.is_some()
    }));
    wait_everywhere(&[&node], &redis, "?user=lim", &user_answer("lim", 2, 1), T);
}

#[test]
fn presence_bad_input_is_a_clear_answer_and_standalone_answers_itself() {
    let _w = watchdog(30);
    let node = Node::start(&["--dev"]);
    let _c1 = node.connect_dev("42");
    let _c2 = node.connect_dev("42");
    let _c3 = node.connect_dev("7");
    assert!(wait_until(T, || presence(&node, "?user=42").1
        == user_answer("42", 2, 1)));
    assert_eq!(presence(&node, ""), (200, totals(2, 3, 1)));
    assert_eq!(
        presence(&node, "?user=nobody"),
        (200, user_answer("nobody", 0, 0))
    );
    assert_eq!(
        presence(&node, "?user=a%22b"),
        (
            200,
            r#"{"userId":"a\"b","connections":0,"nodes":0}"#.to_string()
        )
    );
    for bad in ["?user=", "?user=%FF", "?user=%C3%28"] {
        let (status, body) = presence(&node, bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("error"), "{body}");
    }
    let (status, body) = presence(&node, &format!("?user={}", "x".repeat(257)));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("1 to 256 bytes"), "{body}");
    let (status, _) = presence(&node, &format!("?user={}", "x".repeat(7000)));
    assert_eq!(status, 400);
    let (status, _) = presence(&node, &format!("?user={}", "x".repeat(20_000)));
    assert!(status == 400 || status == 431, "{status}");
    let (status, _) = http(
        node.admin.unwrap(),
        "POST /presence HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405);
}

#[test]
fn presence_me_answers_only_for_the_callers_own_user() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let _c1 = node.connect("42");
    let _c2 = node.connect("42");
    let me = |q: &str| {
        let (s, b) = http(
            node.ws,
            &format!("GET /presence/me{q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        (s, b.trim().to_string())
    };
    assert_eq!(
        me(&format!("?token={}", token("42", None))),
        (200, user_answer("42", 2, 1))
    );
    // Another user's token tells about that user only; a user parameter
    // is not listened to.
    assert_eq!(
        me(&format!("?token={}&user=42", token("7", None))),
        (200, user_answer("7", 0, 0))
    );
    assert_eq!(me("?user=42").0, 401);
    assert_eq!(me(&format!("?token={}x", token("42", None))).0, 401);
}

#[test]
fn presence_a_node_that_stops_leaves_at_once() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let a = Node::with_redis(&redis, &[]);
    // Its heartbeat would keep it counted for 15 s.
    let mut b = Node::with_redis(
        &redis,
        &["--canary-interval", "5", "--shutdown-timeout", "2"],
    );
    let _on_a = a.connect("stay");
    let _on_b = b.connect("go");
    wait_everywhere(&[&a, &b], &redis, "", &totals(2, 2, 2), T);
    b.signal(libc::SIGTERM);
    let stopped = Instant::now();
    // Its connections stop counting as the drain closes them...
    wait_everywhere(
        &[&a],
        &redis,
        "?user=go",
        &user_answer("go", 0, 0),
        Duration::from_secs(1),
    );
    // ...and the node itself as it exits, not 15 s later.
    assert!(b.wait_exit(Duration::from_secs(5)).is_some());
    wait_everywhere(
        &[&a],
        &redis,
        "",
        &totals(1, 1, 1),
        Duration::from_millis(500),
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopped.elapsed()
    );
}
