//! Notice validation (SPEC section 3) through Redis and through
//! POST /publish, and standalone delivery through POST /publish.

use crate::util::*;

/// Messages that are not notices, each with what makes it invalid.
fn invalid_payloads() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("not JSON", b"your order shipped".to_vec()),
        ("truncated JSON", br#"{"userId":"42","text":"x""#.to_vec()),
        ("empty", b"".to_vec()),
        ("a JSON array", br#"[{"userId":"42","text":"x"}]"#.to_vec()),
        ("a JSON string", br#""{\"userId\":\"42\"}""#.to_vec()),
        ("a JSON number", b"42".to_vec()),
        ("no routing field", br#"{"text":"x"}"#.to_vec()),
        (
            "userId and broadcast",
            br#"{"userId":"42","broadcast":true,"text":"x"}"#.to_vec(),
        ),
        (
            "userId and userIds",
            br#"{"userId":"42","userIds":["42"],"text":"x"}"#.to_vec(),
        ),
        (
            "userIds and broadcast",
            br#"{"userIds":["42"],"broadcast":true}"#.to_vec(),
        ),
        ("userId true", br#"{"userId":true,"text":"x"}"#.to_vec()),
        ("userId null", br#"{"userId":null}"#.to_vec()),
        ("userId float", br#"{"userId":42.5}"#.to_vec()),
        ("userId object", br#"{"userId":{"id":"42"}}"#.to_vec()),
        ("userId empty", br#"{"userId":""}"#.to_vec()),
        (
            "userIds a string",
            br#"{"userIds":"42","text":"x"}"#.to_vec(),
        ),
        (
            "userIds with a bool",
            br#"{"userIds":["42",true]}"#.to_vec(),
        ),
        (
            "broadcast \"yes\"",
            br#"{"broadcast":"yes","text":"x"}"#.to_vec(),
        ),
        ("broadcast false", br#"{"broadcast":false}"#.to_vec()),
        ("broadcast 1", br#"{"broadcast":1}"#.to_vec()),
        (
            "trailing garbage",
            br#"{"userId":"42"} {"userId":"42"}"#.to_vec(),
        ),
        (
            "not UTF-8",
            b"{\"userId\":\"42\",\"text\":\"\xff\xfe\"}".to_vec(),
        ),
        (
            "over 1 MiB",
            padded_notice(r#""userId":"42""#, MIB + 1).into_bytes(),
        ),
    ]
}

#[test]
fn invalid_notices_through_redis_are_dropped_counted_and_harmless() {
    let _w = watchdog(25);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let mut c42 = node.connect("42");
    let mut c7 = node.connect("7");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 2.0));
    let mut delivered = 0.0;

    for (i, (what, payload)) in invalid_payloads().into_iter().enumerate() {
        assert_eq!(redis.publish(CHANNEL, &payload), 1, "{what}");
        let invalid = (i + 1) as f64;
        assert!(
            node.wait_metric("pushwire_notices_invalid_total", T, |v| v == invalid),
            "{what}: pushwire_notices_invalid_total should be {invalid}, is {}",
            node.metric("pushwire_notices_invalid_total")
        );
        // Redis keeps the order: if the invalid one were delivered, it
        // would arrive before this valid one.
        let valid = format!(
            r#"{{"userId":"42","text":{},"i":{i}}}"#,
            serde_json::json!(format!("after {what}"))
        );
        assert_eq!(redis.publish(CHANNEL, valid.as_bytes()), 1);
        assert_eq!(
            c42.recv_text(T).as_deref(),
            Some(valid.as_str()),
            "after an invalid notice ({what})"
        );
        delivered += 1.0;
    }
    // User 7 never got any of them: the next thing it sees is a broadcast.
    let b = r#"{"broadcast":true,"text":"all"}"#;
    redis.publish(CHANNEL, b.as_bytes());
    assert_eq!(c7.recv_text(T).as_deref(), Some(b));
    assert_eq!(c42.recv_text(T).as_deref(), Some(b));
    delivered += 2.0;

    let n = invalid_payloads().len() as f64;
    assert_eq!(node.metric("pushwire_notices_invalid_total"), n);
    assert_eq!(
        node.metric("pushwire_notices_received_total"),
        2.0 * n + 1.0
    );
    // The loops add to the counter after flushing: poll.
    assert!(
        node.wait_metric("pushwire_messages_delivered_total", T, |v| v == delivered),
        "pushwire_messages_delivered_total should be {delivered}, is {}",
        node.metric("pushwire_messages_delivered_total")
    );
    // Nothing else was affected.
    assert_eq!(node.metric("pushwire_connections"), 2.0);
    assert_eq!(node.metric("pushwire_redis_reconnects_total"), 0.0);
    assert_eq!(node.admin_get("/readyz").0, 200);
    assert!(
        node.log_contains("invalid notice"),
        "an invalid notice is logged as a warning"
    );
}

#[test]
fn a_notice_of_exactly_one_mib_is_valid_and_delivered_byte_for_byte() {
    let _w = watchdog(25);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let mut c = node.connect("42");
    let big = padded_notice(r#""userId":"42""#, MIB);
    redis.publish(CHANNEL, big.as_bytes());
    let got = c.recv_text(T);
    assert_eq!(
        node.metric("pushwire_notices_invalid_total"),
        0.0,
        "1 MiB is the limit, not over it"
    );
    assert_eq!(
        node.metric("pushwire_slow_consumer_closed_total"),
        0.0,
        "an idle client with an empty queue was cut as a slow consumer by one 1 MiB notice"
    );
    assert!(
        got.as_deref() == Some(big.as_str()),
        "the 1 MiB notice did not arrive intact"
    );
    let small = r#"{"userId":"42","text":"after"}"#;
    redis.publish(CHANNEL, small.as_bytes());
    assert_eq!(c.recv_text(T).as_deref(), Some(small));
}

/// The reason a 400 gives: the `error` field of its JSON body.
fn error_reason(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"))
        .to_string()
}

fn check_publish_refusals(node: &Node, c: &mut Client) {
    let cases: &[(&[u8], &str)] = &[
        (b"not json", "JSON"),
        (br#"[{"userId":"42"}]"#, "object"),
        (br#"{"text":"x"}"#, "routing"),
        (br#"{"userId":"42","broadcast":true}"#, "more than one"),
        (br#"{"userId":true}"#, "userId"),
        (br#"{"userIds":"42"}"#, "userIds"),
        (br#"{"broadcast":"yes"}"#, "broadcast"),
        (b"{\"userId\":\"42\",\"t\":\"\xff\"}", "UTF-8"),
    ];
    for (body, reason) in cases {
        let (st, answer) = node.publish_bytes(body);
        assert_eq!(st, 400, "{} -> {answer}", String::from_utf8_lossy(body));
        let why = error_reason(&answer);
        assert!(
            why.contains(reason),
            "{}: the reason {why:?} should mention {reason:?}",
            String::from_utf8_lossy(body)
        );
    }
    // Over 1 MiB: 413, whether or not the server reads the body.
    let big = padded_notice(r#""userId":"42""#, MIB + 1);
    let (st, answer) = node.publish_bytes(big.as_bytes());
    assert_eq!(st, 413, "{answer}");
    // Exactly 1 MiB is not refused as too large.
    let (st, answer) = node.publish_bytes(padded_notice(r#""userId":"nobody""#, MIB).as_bytes());
    assert_eq!(st, 202, "{answer}");
    // None of them reached the client; the next valid one does.
    let ok = r#"{"userId":42,"text":"fine"}"#;
    let (st, answer) = node.publish_bytes(ok.as_bytes());
    assert_eq!(st, 202, "{answer}");
    assert_eq!(c.recv_text(T).as_deref(), Some(ok));
}

#[test]
fn publish_refuses_bad_notices_with_redis() {
    let _w = watchdog(25);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let mut c = node.connect("42");
    check_publish_refusals(&node, &mut c);
    // A refused notice never reached Redis: the node received only the two
    // good ones (the 1 MiB one and the last).
    assert!(node.wait_metric("pushwire_notices_received_total", T, |v| v == 2.0));
}

#[test]
fn publish_refuses_bad_notices_standalone() {
    let _w = watchdog(25);
    let node = Node::start(&["--jwt-secret", SECRET]);
    let mut c = node.connect("42");
    check_publish_refusals(&node, &mut c);
    assert!(node.wait_metric("pushwire_messages_delivered_total", T, |v| v == 1.0));
}

#[test]
fn standalone_publish_delivers_locally_with_the_receiver_count() {
    let _w = watchdog(25);
    let node = Node::start(&["--jwt-secret", SECRET]);
    assert_eq!(node.admin_get("/readyz").0, 200, "standalone is ready");
    let mut a = [node.connect("42"), node.connect("42")];
    let mut b = node.connect("7");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 3.0));

    let expect = |n: usize| format!(r#"{{"receivers":{n}}}"#);

    let n1 = r#"{"userId":42, "text":"h\u00e9llo","n":1}"#;
    let (st, body) = node.publish(n1);
    assert_eq!((st, body.trim()), (202, expect(2).as_str()));
    for c in a.iter_mut() {
        assert_eq!(c.recv_text(T).as_deref(), Some(n1));
    }

    let n2 = r#"{"userIds":["7",99,"7"],"text":"two"}"#;
    let (st, body) = node.publish(n2);
    assert_eq!((st, body.trim()), (202, expect(1).as_str()));
    assert_eq!(b.recv_text(T).as_deref(), Some(n2));

    let n3 = r#"{"userId":"nobody","text":"three"}"#;
    let (st, body) = node.publish(n3);
    assert_eq!((st, body.trim()), (202, expect(0).as_str()));

    let n4 = "{\"broadcast\":true,\n \"text\":\"four\"}";
    let (st, body) = node.publish(n4);
    assert_eq!((st, body.trim()), (202, expect(3).as_str()));
    // Every client's next frame is the broadcast: n2 and n3 went nowhere else.
    for c in a.iter_mut().chain([&mut b]) {
        assert_eq!(c.recv_text(T).as_deref(), Some(n4));
    }
    assert!(node.wait_metric("pushwire_messages_delivered_total", T, |v| v == 6.0));
    assert_eq!(node.metric("pushwire_notices_received_total"), 4.0);
    assert_eq!(node.metric("pushwire_notices_invalid_total"), 0.0);
}
