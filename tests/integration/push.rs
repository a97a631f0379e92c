//! The push path end to end: two nodes on one Redis.

use std::time::Duration;

use crate::util::*;

const QUIET: Duration = Duration::from_millis(300);

#[test]
fn two_nodes_route_each_notice_to_exactly_the_right_connections() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let a = Node::with_redis(&redis, &[]);
    let b = Node::with_redis(&redis, &[]);
    let mut a42 = [a.connect("42"), a.connect("42")];
    let mut b42 = b.connect("42");
    let mut b7 = b.connect("7");
    assert!(a.wait_metric("pushwire_connections", T, |v| v == 2.0));
    assert!(b.wait_metric("pushwire_connections", T, |v| v == 2.0));
    assert_eq!(a.metric("pushwire_users"), 1.0);

    // Integer userId reaches user 42 on both nodes, byte for byte.
    let n1 = r#"{"userId":42,  "text":"h\u00e9llo shipped","n":1}"#;
    assert_eq!(
        redis.publish(CHANNEL, n1.as_bytes()),
        2,
        "both nodes subscribed"
    );
    for c in a42.iter_mut() {
        assert_eq!(c.recv_text(T).as_deref(), Some(n1));
    }
    assert_eq!(b42.recv_text(T).as_deref(), Some(n1));
    b7.expect_nothing(QUIET);

    // String userId: the same user.
    let n2 = r#"{"userId":"42","text":"two"}"#;
    redis.publish(CHANNEL, n2.as_bytes());
    for c in a42.iter_mut() {
        assert_eq!(c.recv_text(T).as_deref(), Some(n2));
    }
    assert_eq!(b42.recv_text(T).as_deref(), Some(n2));
    b7.expect_nothing(QUIET);

    // userIds: only 7 of the listed users is here besides 42... list 7 and 99.
    let n3 = r#"{"userIds":["7",99],"text":"three"}"#;
    redis.publish(CHANNEL, n3.as_bytes());
    assert_eq!(b7.recv_text(T).as_deref(), Some(n3));
    b42.expect_nothing(QUIET);
    for c in a42.iter_mut() {
        c.expect_nothing(Duration::from_millis(50));
    }

    // broadcast: everyone, once.
    let n4 = r#"{"broadcast":true,"text":"four"}"#;
    redis.publish(CHANNEL, n4.as_bytes());
    for c in a42.iter_mut().chain([&mut b42, &mut b7]) {
        assert_eq!(c.recv_text(T).as_deref(), Some(n4));
    }
    for c in a42.iter_mut().chain([&mut b42, &mut b7]) {
        c.expect_nothing(Duration::from_millis(100));
    }

    // POST /publish on A reaches user 7 on B.
    let n5 = r#"{"userId":"7","text":"via admin"}"#;
    let (status, body) = a.publish(n5);
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"receivers\":2"), "{body}");
    assert_eq!(b7.recv_text(T).as_deref(), Some(n5));
    b42.expect_nothing(QUIET);

    assert_eq!(
        a.metric("pushwire_messages_delivered_total"),
        2.0 + 2.0 + 2.0
    );
    assert_eq!(b.metric("pushwire_notices_received_total"), 5.0);

    // A closed connection leaves the map.
    drop(b7);
    assert!(b.wait_metric("pushwire_users", T, |v| v == 1.0));
}

#[test]
fn a_panic_in_one_connection_costs_only_that_connection() {
    let _w = watchdog(30);
    let node = Node::start_env(&["--dev", "--workers", "1"], TEST_HOOKS);
    let mut healthy = Client::connect(&node.url("/ws?user=1")).unwrap();
    let mut bad = Client::connect(&node.url("/ws?user=2")).unwrap();
    bad.send_text(PANIC_HOOK);
    assert_eq!(bad.recv_close(T), Some(1011));
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 1.0));
    // The log is read by another thread: wait for the line, do not race it.
    assert!(wait_until(T, || node.log_contains("a panic while handling")));
    let n = r#"{"userId":1,"after":"panic"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(healthy.recv_text(T).as_deref(), Some(n));
    // The loop still accepts.
    let mut again = Client::connect(&node.url("/ws?user=3")).unwrap();
    node.publish(r#"{"userId":3}"#);
    assert!(again.recv_text(T).is_some());
}

#[test]
fn a_stalled_loop_overflows_its_inbox_safely_and_catches_up() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let node = Node::with_redis_env(&redis, &["--workers", "1"], TEST_HOOKS);
    let mut user = node.connect("42");
    let mut staller = node.connect("9");
    staller.send_text(STALL_HOOK);
    // The loop sleeps 3 s; the subscriber must go on reading and drop what
    // the loop's inbox (16384 messages) cannot hold.
    std::thread::sleep(Duration::from_millis(300));
    let total = 30_000;
    publish_burst(
        &mut redis.conn(),
        (0..total).map(|i| format!("{{\"userId\":42,\"n\":{i}}}").into_bytes()),
    );
    // Counted while the loop still sleeps: the subscriber did not wait on it.
    assert!(node.wait_metric("pushwire_notices_received_total", T, |v| v >= total as f64));
    let dropped = node.metric("pushwire_notices_dropped_total");
    assert!(dropped > 0.0, "the inbox did not overflow");
    assert!(node.admin_get("/readyz").0 == 200, "the subscriber stalled");
    // The loop catches up: the user gets exactly what was not dropped, in order.
    let mut got = 0u64;
    let mut last = -1i64;
    while let Some(t) = user.recv_text(T) {
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        let n = v["n"].as_i64().unwrap();
        assert!(n > last, "out of order: {n} after {last}");
        last = n;
        got += 1;
        if got as f64 + dropped >= total as f64 {
            break;
        }
    }
    assert_eq!(got as f64 + dropped, total as f64);
    let n = r#"{"userId":42,"after":"stall"}"#;
    redis.publish(CHANNEL, n.as_bytes());
    assert_eq!(user.recv_text(T).as_deref(), Some(n));
}

#[test]
fn a_pipelined_burst_of_broadcasts_and_targeted_notices_arrives_whole_and_in_order() {
    // The loop joins consecutive broadcasts into one buffer per batch: each
    // notice must still be its own frame, byte for byte, in publish order,
    // with targeted notices in their places and batches cut at any size.
    let _w = watchdog(60);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &["--workers", "1"]);
    let mut a = node.connect("a");
    let mut b = node.connect("b");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 2.0));
    let notices: Vec<String> = (0..1000)
        .map(|i| match i {
            _ if i % 7 == 3 => format!(r#"{{"userId":"a","seq":{i}}}"#),
            500 | 501 => format!(
                r#"{{"broadcast":true,"seq":{i},"pad":"{}"}}"#,
                "y".repeat(70_000)
            ),
            _ => format!(
                r#"{{"broadcast":true,"seq":{i},"pad":"{}"}}"#,
                "x".repeat(i % 300)
            ),
        })
        .collect();
    publish_burst(
        &mut redis.conn(),
        notices.iter().map(|n| n.clone().into_bytes()),
    );
    for n in &notices {
        assert_eq!(a.recv_text(T).as_deref(), Some(n.as_str()));
    }
    for n in notices.iter().filter(|n| n.contains("broadcast")) {
        assert_eq!(b.recv_text(T).as_deref(), Some(n.as_str()));
    }
    a.expect_nothing(QUIET);
    b.expect_nothing(QUIET);
    let broadcasts = notices.iter().filter(|n| n.contains("broadcast")).count();
    assert_eq!(
        node.metric("pushwire_messages_delivered_total"),
        (notices.len() + broadcasts) as f64
    );
}
