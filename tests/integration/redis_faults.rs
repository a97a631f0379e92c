//! Redis going away, hanging, cutting the subscriber, requiring
//! credentials, and being down at start (SPEC sections 2 and 6).

use std::io::Write;
use std::time::{Duration, Instant};

use crate::util::*;

/// Reconnects back off up to 3 s (plus jitter): room for a couple of tries.
const RECOVER: Duration = Duration::from_secs(10);

fn readyz(node: &Node) -> u16 {
    node.admin_get("/readyz").0
}

/// Waits until /readyz answers 503 and the connected gauge is 0.
fn wait_not_ready(node: &Node, timeout: Duration) -> bool {
    wait_until(timeout, || readyz(node) == 503) && node.metric("pushwire_redis_connected") == 0.0
}

/// Publishes `notice` until the node counts it received (a publish made
/// while the node is not yet subscribed reaches nobody, by design).
fn publish_when_subscribed(redis: &Redis, node: &Node, notice: &str) {
    let before = node.metric("pushwire_notices_received_total");
    assert_eq!(
        redis.publish(CHANNEL, notice.as_bytes()),
        1,
        "the node is subscribed once /readyz says so"
    );
    assert!(node.wait_metric("pushwire_notices_received_total", T, |v| v == before + 1.0));
}

#[test]
fn redis_restart_keeps_clients_and_resumes_delivery() {
    let _w = watchdog(30);
    let mut redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let mut c42 = node.connect("42");
    let mut c7 = node.connect("7");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 2.0));
    let first = r#"{"userId":"42","text":"before"}"#;
    publish_when_subscribed(&redis, &node, first);
    assert_eq!(c42.recv_text(T).as_deref(), Some(first));
    // POST /publish opens its own Redis connection, kept for later.
    let via_admin = r#"{"userId":"42","text":"via admin"}"#;
    let (st, body) = node.publish(via_admin);
    assert_receivers(st, &body, 1);
    assert_eq!(c42.recv_text(T).as_deref(), Some(via_admin));
    assert_eq!(node.metric("pushwire_redis_reconnects_total"), 0.0);
    assert_eq!(node.metric("pushwire_redis_connected"), 1.0);

    redis.kill();
    assert!(
        wait_not_ready(&node, T),
        "/readyz must say 503 while Redis is away"
    );
    let (st, why) = node.admin_get("/readyz");
    assert_eq!(st, 503);
    assert!(
        !why.trim().is_empty(),
        "a 503 from /readyz gives the reason"
    );
    // Liveness is not readiness: the loops run.
    assert_eq!(node.admin_get("/healthz").0, 200);
    // The clients stay connected.
    assert_eq!(node.metric("pushwire_connections"), 2.0);
    // POST /publish cannot reach Redis: it says so rather than 202.
    let (st, body) = node.publish(r#"{"userId":"42","text":"lost"}"#);
    assert_eq!(st, 503, "POST /publish with Redis down: {body}");

    redis.restart();
    assert!(node.wait_ready(RECOVER), "ready again after Redis is back");
    assert_eq!(node.metric("pushwire_redis_connected"), 1.0);
    assert_eq!(node.metric("pushwire_redis_reconnects_total"), 1.0);

    // The next notice arrives on the very same connections: no resync
    // notice or anything else before it (no --resync-notice given).
    let after = r#"{"userId":"42","text":"after"}"#;
    publish_when_subscribed(&redis, &node, after);
    assert_eq!(c42.recv_text(T).as_deref(), Some(after));
    let all = r#"{"broadcast":true,"text":"all"}"#;
    publish_when_subscribed(&redis, &node, all);
    assert_eq!(c7.recv_text(T).as_deref(), Some(all));
    assert_eq!(c42.recv_text(T).as_deref(), Some(all));
    // POST /publish reconnects too.
    let (st, body) = node.publish(via_admin);
    assert_receivers(st, &body, 1);
    assert_eq!(c42.recv_text(T).as_deref(), Some(via_admin));
    assert_eq!(
        node.metric("pushwire_connections_accepted_total"),
        2.0,
        "no client reconnected"
    );
    assert_eq!(node.metric("pushwire_resync_notices_total"), 0.0);
    assert!(node.log_contains("redis"), "the loss is logged");
}

#[test]
fn resync_notice_goes_to_every_connection_after_a_restart() {
    let _w = watchdog(30);
    let mut redis = Redis::start();
    let resync = r#"{"resync":true}"#;
    let node = Node::with_redis(&redis, &["--resync-notice", resync, "--workers", "2"]);
    let mut clients = [
        node.connect("42"),
        node.connect("42"),
        node.connect("7"),
        node.connect("8"),
    ];
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 4.0));
    // Nothing is sent on the first subscription.
    for c in clients.iter_mut() {
        c.expect_nothing(Duration::from_millis(100));
    }

    let killed = Instant::now();
    redis.kill();
    assert!(wait_not_ready(&node, T));
    let detected = killed.elapsed();
    let restarted = Instant::now();
    redis.restart();
    assert!(node.wait_ready(RECOVER));
    let ready = restarted.elapsed();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv_text(T).as_deref(), Some(resync), "client {i}");
    }
    eprintln!(
        "redis killed: not ready after {detected:?}; restarted: ready after {ready:?}, \
         resync at all 4 clients after {:?}",
        restarted.elapsed()
    );
    assert_eq!(node.metric("pushwire_resync_notices_total"), 1.0);
    assert_eq!(node.metric("pushwire_redis_reconnects_total"), 1.0);
    // Once only, and normal delivery follows.
    let n = r#"{"userIds":["42","8"],"text":"after"}"#;
    publish_when_subscribed(&redis, &node, n);
    for i in [0, 1, 3] {
        assert_eq!(clients[i].recv_text(T).as_deref(), Some(n), "client {i}");
    }
    clients[2].expect_nothing(Duration::from_millis(200));
    assert_eq!(node.metric("pushwire_connections_accepted_total"), 4.0);
}

/// A PUBLISH in the wire format, for a raw connection.
fn resp_publish(channel: &str, payload: &str) -> Vec<u8> {
    let mut v = b"*3\r\n$7\r\nPUBLISH\r\n".to_vec();
    for part in [channel, payload] {
        v.extend_from_slice(format!("${}\r\n{part}\r\n", part.len()).as_bytes());
    }
    v
}

#[test]
fn paused_redis_is_detected_and_what_was_published_meanwhile_still_arrives() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let resync = r#"{"resync":"paused"}"#;
    let node = Node::with_redis(&redis, &["--resync-notice", resync]);
    let mut c = node.connect("42");
    let first = r#"{"userId":"42","text":"before"}"#;
    publish_when_subscribed(&redis, &node, first);
    assert_eq!(c.recv_text(T).as_deref(), Some(first));
    // A publisher connected before the pause.
    let mut publisher = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();

    // The TCP connections stay open; only the proof can tell.
    redis.signal(libc::SIGSTOP);
    let paused = Instant::now();
    // Published while Redis is frozen: it waits in Redis's socket.
    let during = r#"{"userId":"42","text":"published during the pause"}"#;
    publisher.write_all(&resp_publish(CHANNEL, during)).unwrap();
    // Canary every 0.5 s, due back within 1 s: a few intervals.
    let detected = wait_not_ready(&node, Duration::from_secs(3));
    let took = paused.elapsed();
    redis.signal(libc::SIGCONT);
    assert!(detected, "/readyz still 200 {took:?} after Redis froze");
    eprintln!("paused Redis detected after {took:?}");

    let resumed = Instant::now();
    assert!(node.wait_ready(RECOVER), "ready again after SIGCONT");
    eprintln!(
        "paused Redis: ready again {:?} after SIGCONT",
        resumed.elapsed()
    );
    assert!(node.wait_metric("pushwire_redis_reconnects_total", T, |v| v >= 1.0));
    assert!(node.metric("pushwire_redis_canary_failures_total") >= 1.0);
    // The silent link was kept and read up to the new link's first canary:
    // the notice arrives, once, before the resync notice that follows every
    // recovered loss of the subscription.
    assert_eq!(c.recv_text(T).as_deref(), Some(during));
    assert_eq!(c.recv_text(T).as_deref(), Some(resync), "told to resync");
    let after = r#"{"userId":"42","text":"after"}"#;
    publish_when_subscribed(&redis, &node, after);
    assert_eq!(c.recv_text(T).as_deref(), Some(after));
    c.expect_nothing(Duration::from_millis(200));
    assert_eq!(node.metric("pushwire_resync_notices_total"), 1.0);
    assert_eq!(node.metric("pushwire_connections_accepted_total"), 1.0);
}

#[test]
fn a_half_open_link_is_replaced_and_clients_are_told_to_resync() {
    // The node reaches Redis through a proxy that turns its connections
    // into black holes: no error, no close, nothing comes through. Only the
    // canary can tell. The silent link never brings the new link's first
    // canary, so notices may have been lost: a resync notice is due.
    let _w = watchdog(30);
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let resync = r#"{"resync":"half-open"}"#;
    let node = Node::on_redis_url(
        &format!("redis://127.0.0.1:{}", proxy.port),
        &["--resync-notice", resync],
    );
    assert!(node.wait_ready(T));
    let mut c = node.connect("42");
    let first = r#"{"userId":"42","text":"before"}"#;
    publish_when_subscribed(&redis, &node, first);
    assert_eq!(c.recv_text(T).as_deref(), Some(first));

    let t0 = Instant::now();
    proxy.freeze_existing();
    assert!(
        wait_not_ready(&node, Duration::from_secs(3)),
        "the silence is found"
    );
    let detected = t0.elapsed();
    assert!(node.wait_ready(RECOVER), "a new link through the proxy");
    assert_eq!(c.recv_text(T).as_deref(), Some(resync), "told to resync");
    eprintln!(
        "half-open link: not ready after {detected:?}; new link and resync after {:?}",
        t0.elapsed()
    );
    let after = r#"{"userId":"42","text":"after"}"#;
    publish_when_subscribed(&redis, &node, after);
    assert_eq!(c.recv_text(T).as_deref(), Some(after));
    c.expect_nothing(Duration::from_millis(200));
    assert_eq!(node.metric("pushwire_redis_reconnects_total"), 1.0);
    assert!(node.metric("pushwire_redis_canary_failures_total") >= 1.0);
    assert_eq!(node.metric("pushwire_resync_notices_total"), 1.0);
    assert_eq!(node.metric("pushwire_connections_accepted_total"), 1.0);
}

#[test]
fn killed_pubsub_client_is_resubscribed() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let resync = r#"{"resync":"killed"}"#;
    let node = Node::with_redis(&redis, &["--resync-notice", resync]);
    let mut c = node.connect("42");
    assert_eq!(
        redis
            .cmd(&["PUBSUB", "NUMSUB", CHANNEL])
            .unwrap()
            .lines()
            .nth(1),
        Some("1")
    );

    let t0 = Instant::now();
    let killed = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_eq!(killed.trim(), "1", "one subscriber connection killed");
    assert!(
        node.wait_metric("pushwire_redis_reconnects_total", RECOVER, |v| v == 1.0),
        "the subscription is rebuilt and counted"
    );
    assert!(node.wait_ready(T));
    assert_eq!(
        redis
            .cmd(&["PUBSUB", "NUMSUB", CHANNEL])
            .unwrap()
            .lines()
            .nth(1),
        Some("1"),
        "subscribed again, once"
    );
    assert_eq!(c.recv_text(T).as_deref(), Some(resync), "told to resync");
    eprintln!(
        "CLIENT KILL TYPE pubsub: resubscribed and resync received after {:?}",
        t0.elapsed()
    );
    assert_eq!(node.metric("pushwire_resync_notices_total"), 1.0);
    let n = r#"{"userId":"42","text":"after kill"}"#;
    publish_when_subscribed(&redis, &node, n);
    assert_eq!(c.recv_text(T).as_deref(), Some(n));
    assert_eq!(node.metric("pushwire_connections_accepted_total"), 1.0);
}

#[test]
fn redis_with_a_password_and_a_db_works_end_to_end() {
    let _w = watchdog(30);
    let redis = Redis::start();
    // Set after start: Redis::ping (which start waits on) does not log in.
    // URL-special characters, percent-encoded in the URL.
    let pw = "s3cr@t:pw/#1";
    let pw_in_url = "s3cr%40t%3Apw%2F%231";
    redis
        .cmd(&["CONFIG", "SET", "requirepass", pw])
        .expect("set requirepass");
    let auth = ["-a", pw, "--no-auth-warning"];
    let url = format!("redis://:{pw_in_url}@127.0.0.1:{}/2", redis.port);
    let node = Node::on_redis_url(&url, &[]);
    assert!(node.wait_ready(RECOVER), "ready with a password");
    let mut c = node.connect("42");

    let n1 = r#"{"userId":"42","text":"through an authenticated redis"}"#;
    assert_eq!(publish_url(&url, CHANNEL, n1.as_bytes()), 1);
    assert_eq!(c.recv_text(T).as_deref(), Some(n1));
    // POST /publish logs in too.
    let n2 = r#"{"userId":"42","text":"via admin"}"#;
    let (st, body) = node.publish(n2);
    assert_receivers(st, &body, 1);
    assert_eq!(c.recv_text(T).as_deref(), Some(n2));
    // And after the subscription is cut, it logs in again.
    let mut args = auth.to_vec();
    args.extend(["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(redis.cmd(&args).unwrap().trim(), "1");
    assert!(node.wait_metric("pushwire_redis_reconnects_total", RECOVER, |v| v == 1.0));
    let n3 = r#"{"userId":"42","text":"after kill"}"#;
    assert!(wait_until(T, || readyz(&node) == 200));
    assert_eq!(publish_url(&url, CHANNEL, n3.as_bytes()), 1);
    assert_eq!(c.recv_text(T).as_deref(), Some(n3));
    // The password never reaches the log.
    assert!(
        !node.log_contains(pw) && !node.log_contains(pw_in_url),
        "the Redis password was logged"
    );
}

#[test]
fn redis_acl_user_works_and_a_wrong_password_is_not_ready() {
    let _w = watchdog(30);
    let redis = Redis::start();
    // A user that can only do pub/sub, connection housekeeping, and what
    // the durable path's functions run on pushwire's own keys.
    redis
        .cmd(&[
            "ACL",
            "SETUSER",
            "pusher",
            "on",
            ">pusher-pw",
            "resetchannels",
            "&*",
            "resetkeys",
            "~pushwire:*",
            "-@all",
            "+@pubsub",
            "+@connection",
            "+@scripting",
            "+@stream",
            "+@string",
            "+@keyspace",
            "+time",
        ])
        .expect("ACL SETUSER");
    let url = format!("redis://pusher:pusher-pw@127.0.0.1:{}", redis.port);
    let node = Node::on_redis_url(&url, &[]);
    assert!(node.wait_ready(RECOVER), "ready as an ACL user");
    let mut c = node.connect("42");
    let n1 = r#"{"userId":"42","text":"acl"}"#;
    assert_eq!(publish_url(&url, CHANNEL, n1.as_bytes()), 1);
    assert_eq!(c.recv_text(T).as_deref(), Some(n1));
    let n2 = r#"{"userId":"42","text":"acl via admin"}"#;
    let (st, body) = node.publish(n2);
    assert_receivers(st, &body, 1);
    assert_eq!(c.recv_text(T).as_deref(), Some(n2));
    assert!(
        !node.log_contains("pusher-pw"),
        "the Redis password was logged"
    );

    // The wrong password: running, never ready, says why.
    let bad = format!("redis://pusher:wrong-pw-123@127.0.0.1:{}", redis.port);
    let other = Node::on_redis_url(&bad, &[]);
    assert!(
        !wait_until(Duration::from_secs(2), || readyz(&other) == 200),
        "ready with a wrong password"
    );
    assert_eq!(other.admin_get("/healthz").0, 200);
    assert_eq!(other.metric("pushwire_redis_connected"), 0.0);
    let (st, why) = other.admin_get("/readyz");
    assert_eq!(st, 503);
    assert!(
        !why.trim().is_empty(),
        "a 503 from /readyz gives the reason"
    );
    assert!(
        !other.log_contains("wrong-pw-123"),
        "the Redis password was logged"
    );
}

#[test]
fn node_started_while_redis_is_down_becomes_ready_when_it_comes_up() {
    let _w = watchdog(30);
    let mut redis = Redis::start();
    redis.kill();
    let node = Node::on_redis_url(&redis.url(), &[]);
    // Running and serving, not ready.
    assert_eq!(node.admin_get("/healthz").0, 200);
    assert_eq!(readyz(&node), 503);
    assert_eq!(node.metric("pushwire_redis_connected"), 0.0);
    // Clients may connect meanwhile.
    let mut c = node.connect("42");
    assert!(
        !wait_until(Duration::from_millis(600), || readyz(&node) == 200),
        "ready while Redis is down"
    );

    redis.restart();
    assert!(node.wait_ready(RECOVER), "ready once Redis is up");
    assert_eq!(node.metric("pushwire_redis_connected"), 1.0);
    let n = r#"{"userId":"42","text":"hello late redis"}"#;
    publish_when_subscribed(&redis, &node, n);
    assert_eq!(c.recv_text(T).as_deref(), Some(n));
}

/// POST /publish with Redis goes through the durable path: 202 with the
/// notice's id and the subscribed nodes.
fn assert_receivers(status: u16, body: &str, nodes: u64) {
    assert_eq!(status, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(v["receivers"], nodes, "{body}");
    assert!(v["id"].is_string(), "{body}");
}
