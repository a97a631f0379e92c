//! Durable notices (SPEC section 8) over real nodes and a real Redis: ids,
//! envelopes, recovery on reconnect to another node, bad input.

use std::time::Duration;

use serde_json::Value;

use crate::util::*;

/// A client of `user` on `node` with `since` (empty or an id).
fn connect_since(node: &Node, user: &str, since: &str) -> Client {
    let token = token(user, None);
    let since = since.replace(':', "%3A");
    Client::connect(&node.url(&format!("/ws?token={token}&since={since}"))).expect("upgrade")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `FCALL pushwire_publish 0 <notice>` through redis-cli: the id.
fn fcall(redis: &Redis, notice: &str) -> Result<String, String> {
    let mut conn = redis.conn();
    redis::cmd("FCALL")
        .arg("pushwire_publish")
        .arg(0)
        .arg(notice)
        .query::<String>(&mut conn)
        .map_err(|e| e.to_string())
}

/// Reads one envelope: (id or None, the notice as published).
fn envelope(c: &mut Client) -> (Option<String>, String) {
    let text = c.recv_text(T).expect("an envelope");
    let v = json(&text);
    let id = v.get("id").and_then(Value::as_str).map(str::to_string);
    // The notice's bytes are the envelope's tail, unchanged.
    let start = text.find("\"notice\":").expect("a notice field") + 9;
    let notice = text[start..text.len() - 1].to_string();
    (id, notice)
}

#[test]
fn a_client_reconnecting_to_another_node_gets_what_it_missed_then_live_notices() {
    let _w = watchdog(60);
    let redis = Redis::start();
    let a = Node::with_redis(&redis, &[]);
    let b = Node::with_redis(&redis, &[]);
    let mut c = connect_since(&a, "42", "");
    let mut plain = a.connect("42");

    // A durable notice: the envelope for `since` clients, the published
    // bytes unchanged for the others.
    let n1 = r#"{"userId":"42","text":"one"}"#;
    let id1 = fcall(&redis, n1).expect("FCALL");
    assert_eq!(envelope(&mut c), (Some(id1.clone()), n1.to_string()));
    assert_eq!(plain.recv_text(T).as_deref(), Some(n1));
    // A plain PUBLISH: no id.
    let p = r#"{"userId":"42","text":"plain"}"#;
    assert_eq!(redis.publish(CHANNEL, p.as_bytes()), 2);
    assert_eq!(envelope(&mut c), (None, p.to_string()));
    assert_eq!(plain.recv_text(T).as_deref(), Some(p));
    drop(c);

    // Missed while away: through FCALL and through POST /publish on B.
    let n2 = r#"{"userId":42,"text":"two"}"#;
    let id2 = fcall(&redis, n2).expect("FCALL");
    let n3 = r#"{"userId":"42","text":"three"}"#;
    let (st, body) = b.publish(n3);
    assert_eq!(st, 202, "{body}");
    let answer = json(&body);
    let id3 = answer["id"].as_str().expect("an id").to_string();
    assert_eq!(answer["receivers"], 2, "{body}");
    assert!(id1 < id2 && id2 < id3, "{id1} {id2} {id3}");

    let mut c = connect_since(&b, "42", &id1);
    assert_eq!(envelope(&mut c), (Some(id2.clone()), n2.to_string()));
    assert_eq!(envelope(&mut c), (Some(id3.clone()), n3.to_string()));
    assert_eq!(
        json(&c.recv_text(T).expect("status")),
        serde_json::json!({"recovered": true, "replayed": 2})
    );
    let n4 = r#"{"userId":"42","text":"four"}"#;
    let id4 = fcall(&redis, n4).expect("FCALL");
    assert_eq!(envelope(&mut c), (Some(id4), n4.to_string()));
    c.expect_nothing(Duration::from_millis(200));
    assert_eq!(
        b.metric("pushwire_recoveries_total{result=\"recovered\"}"),
        1.0
    );
    assert_eq!(b.metric("pushwire_replayed_notices_total"), 2.0);
    // The plain client got every notice, byte for byte, and no status.
    for n in [n2, n3, n4] {
        assert_eq!(plain.recv_text(T).as_deref(), Some(n));
    }
    plain.expect_nothing(Duration::from_millis(200));
}

#[test]
fn a_bad_notice_is_refused_by_fcall_and_post_and_nothing_is_stored_or_sent() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let mut c = connect_since(&node, "42", "");
    for bad in [
        r#"{"text":"no route"}"#,
        r#"{"userId":"42","broadcast":true}"#,
        r#"{"userIds":"42"}"#,
        "not json",
        "[1,2]",
    ] {
        let e = fcall(&redis, bad).expect_err("a bad notice is an error reply");
        assert!(e.contains("BADNOTICE"), "{bad}: {e}");
        let (st, body) = node.publish(bad);
        assert_eq!(st, 400, "{bad}: {body}");
        assert!(json(&body)["error"].is_string(), "{body}");
    }
    assert_eq!(
        redis
            .cmd(&["EXISTS", "pushwire:history:42"])
            .unwrap()
            .trim(),
        "0"
    );
    assert_eq!(
        redis.cmd(&["EXISTS", "pushwire:broadcast"]).unwrap().trim(),
        "0"
    );
    c.expect_nothing(Duration::from_millis(300));
}

#[test]
fn a_malformed_since_is_refused_with_400() {
    let _w = watchdog(30);
    let redis = Redis::start();
    let node = Node::with_redis(&redis, &[]);
    let token = token("42", None);
    for since in ["nope", "abc:1", "abc:1-x", "ABC:1-0", ":1-0", "abc:01-0"] {
        let url = node.url(&format!("/ws?token={token}&since={since}"));
        match Client::connect(&url) {
            Ok(_) => panic!("since={since} was accepted"),
            Err(r) => assert_eq!(r.status, 400, "since={since}"),
        }
    }
}

#[test]
fn standalone_since_clients_get_wrapped_notices_and_cannot_recover() {
    let _w = watchdog(30);
    let node = Node::start(&["--dev"]);
    let mut c = Client::connect(&node.url("/ws?user=42&since=")).unwrap();
    let n = r#"{"userId":"42","text":"local"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(envelope(&mut c), (None, n.to_string()));
    let mut r = Client::connect(&node.url("/ws?user=42&since=abc%3A1-0")).unwrap();
    assert_eq!(
        json(&r.recv_text(T).expect("status")),
        serde_json::json!({"recovered": false})
    );
}

#[test]
fn a_redis_restart_with_persistence_loses_nothing_durable() {
    let _w = watchdog(60);
    let dir = TempDir::new("redis-aof");
    let dir_arg = dir.path().display().to_string();
    let mut redis = Redis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir_arg,
    ]);
    let node = Node::with_redis(&redis, &[]);
    let mut stays = connect_since(&node, "42", "");
    let mut away = connect_since(&node, "7", "");
    let n1 = r#"{"userIds":["42","7"],"text":"before"}"#;
    let id1 = fcall(&redis, n1).expect("FCALL");
    assert_eq!(envelope(&mut stays), (Some(id1.clone()), n1.to_string()));
    assert_eq!(envelope(&mut away), (Some(id1.clone()), n1.to_string()));
    drop(away);
    let n2 = r#"{"userId":"7","text":"missed"}"#;
    let id2 = fcall(&redis, n2).expect("FCALL");

    // SIGKILL, then the same data back from the append-only file.
    redis.restart();
    assert!(
        node.wait_ready(Duration::from_secs(15)),
        "ready after the restart"
    );
    // The connection that stayed is recovered from its last id: nothing
    // was missed, and it is told so instead of a resync notice.
    assert_eq!(
        json(&stays.recv_text(T).expect("status")),
        serde_json::json!({"recovered": true, "replayed": 0})
    );
    let n3 = r#"{"userIds":["42","7"],"text":"after"}"#;
    let id3 = fcall(&redis, n3).expect("FCALL after the restart");
    assert_eq!(envelope(&mut stays), (Some(id3.clone()), n3.to_string()));
    // The one that was away gets what it missed across the restart.
    let mut back = connect_since(&node, "7", &id1);
    assert_eq!(envelope(&mut back), (Some(id2), n2.to_string()));
    assert_eq!(envelope(&mut back), (Some(id3), n3.to_string()));
    assert_eq!(
        json(&back.recv_text(T).expect("status")),
        serde_json::json!({"recovered": true, "replayed": 2})
    );
}

#[test]
fn post_publish_with_history_replicas_waits_for_a_replica_and_says_when_none_has_it() {
    let _w = watchdog(40);
    // No 5 s wait for more replicas before the sync (Redis 7's default).
    let master = Redis::start_with(&["--repl-diskless-sync-delay", "0"]);
    let node = Node::with_redis(
        &master,
        &[
            "--history-replicas",
            "1",
            // Long enough for a loaded machine's replica to acknowledge;
            // the publish with no replica waits all of it.
            "--history-replicas-timeout",
            "2",
        ],
    );
    let mut c = connect_since(&node, "42", "");
    // No replica: stored and sent on the master, but a failover could take
    // it away, so the publisher is told (503, with the id), not 202.
    let (st, body) = node.publish(r#"{"userId":"42","text":"alone"}"#);
    assert_eq!(st, 503, "{body}");
    let v = json(&body);
    assert_eq!(v["replicas"], 0, "{body}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("replicas")),
        "{body}"
    );
    let id = v["id"].as_str().expect("the id").to_string();
    let (got, notice) = envelope(&mut c);
    assert_eq!(got.as_deref(), Some(id.as_str()));
    assert_eq!(notice, r#"{"userId":"42","text":"alone"}"#);
    assert_eq!(node.metric("pushwire_durable_unreplicated_total"), 1.0);

    // A replica in sync: 202, and the replica has the notice in history.
    let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    assert!(wait_until(T, || replica
        .cmd(&["INFO", "replication"])
        .is_ok_and(|s| s.contains("master_link_status:up"))));
    let (st, body) = node.publish(r#"{"userId":"42","text":"replicated"}"#);
    assert_eq!(st, 202, "{body}");
    assert_eq!(json(&body)["replicas"], 1, "{body}");
    let (_, notice) = envelope(&mut c);
    assert_eq!(notice, r#"{"userId":"42","text":"replicated"}"#);
    let on_replica = replica
        .cmd(&["XRANGE", "pushwire:history:42", "-", "+"])
        .unwrap();
    assert!(on_replica.contains("replicated"), "{on_replica}");
    assert_eq!(node.metric("pushwire_durable_unreplicated_total"), 1.0);
}
