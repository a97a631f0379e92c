//! What an operator tailing the journal sees when Redis is not there at
//! start: why the node is not ready, never a "lost" link that never was.

use std::time::Duration;

use crate::util::*;

fn node_on(url: &str) -> Node {
    Node::start(&[
        "--redis",
        url,
        "--jwt-secret",
        SECRET,
        "--canary-interval",
        "0.5",
    ])
}

fn wait_log(node: &Node, needle: &str) -> bool {
    wait_until(Duration::from_secs(5), || node.log_contains(needle))
}

#[test]
fn redis_down_at_start_says_cannot_connect_with_the_cause() {
    let _w = watchdog(30);
    let mut redis = Redis::start();
    redis.kill();
    let node = node_on(&redis.url());
    let want = format!(
        "cannot connect to Redis at redis://127.0.0.1:{}",
        redis.port
    );
    assert!(wait_log(&node, &want), "no '{want}' line");
    assert!(
        node.log_contains("retrying every"),
        "the line says how it retries"
    );
    assert!(
        !node.log_contains("subscription lost"),
        "a link that never existed was reported lost"
    );
}

#[test]
fn a_wrong_redis_password_says_cannot_connect_with_the_cause_and_no_password() {
    let _w = watchdog(30);
    let redis = Redis::start();
    redis
        .cmd(&["CONFIG", "SET", "requirepass", "right-pw-456"])
        .expect("set requirepass");
    let url = format!("redis://:wrong-pw-123@127.0.0.1:{}", redis.port);
    let node = node_on(&url);
    assert!(wait_log(
        &node,
        "cannot connect to Redis at redis://***@127.0.0.1"
    ));
    let line = node
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("cannot connect to Redis"))
        .cloned()
        .unwrap_or_default();
    assert!(
        line.contains("WRONGPASS") || line.to_lowercase().contains("password"),
        "the cause is given: {line}"
    );
    assert!(
        !node.log_contains("wrong-pw-123"),
        "the password was logged"
    );
    assert!(!node.log_contains("subscription lost"));
}
