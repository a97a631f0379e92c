//! Upgrade refusals (SPEC section 4): each with its exact HTTP status, a
//! plain HTTP answer that says the precise reason, and its
//! `pushwire_handshake_rejected_total` reason.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::util::*;

fn rejected(node: &Node, reason: &str) -> f64 {
    node.metric(&format!(
        "pushwire_handshake_rejected_total{{reason=\"{reason}\"}}"
    ))
}

/// Every reason's counter, in `pushwire::auth::Reason::ALL` order.
fn all_rejected(node: &Node) -> Vec<(String, f64)> {
    pushwire::auth::Reason::ALL
        .iter()
        .map(|r| (r.label().to_string(), rejected(node, r.label())))
        .collect()
}

/// A raw upgrade request to `path_and_query` with extra header lines;
/// returns the status and the body of the refusal.
fn refusal(node: &Node, path_and_query: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let resp = http_raw(node.ws, req.as_bytes());
    let (st, body) = parse_response(resp.as_bytes());
    (st, body.trim_end().to_string())
}

/// Asserts that exactly the given reasons have the given counts and every
/// other reason is zero.
fn assert_rejected(node: &Node, expected: &[(&str, f64)]) {
    for (reason, n) in all_rejected(node) {
        let want = expected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0.0, |(_, n)| *n);
        assert_eq!(
            n, want,
            "pushwire_handshake_rejected_total{{reason=\"{reason}\"}}"
        );
    }
}

fn jwt_node(extra: &[&str]) -> Node {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    Node::start(&args)
}

fn status(r: Result<Client, Refused>) -> u16 {
    match r {
        Ok(_) => panic!("the upgrade was accepted, expected a refusal"),
        Err(Refused { status }) => status,
    }
}

/// Sends a notice to `user` through POST /publish (standalone) and checks
/// that exactly this client receives it: proves who the connection is.
fn assert_is_user(node: &Node, client: &mut Client, user: &str) {
    let notice = format!(
        r#"{{"userId":{},"text":"who am i"}}"#,
        serde_json::json!(user)
    );
    let (st, body) = node.publish(&notice);
    assert_eq!(st, 202, "{body}");
    assert_eq!(body.trim(), r#"{"receivers":1}"#);
    assert_eq!(client.recv_text(T).as_deref(), Some(notice.as_str()));
}

#[test]
fn missing_token_is_401() {
    let _w = watchdog(20);
    let n = jwt_node(&[]);
    assert_eq!(status(Client::connect(&n.url("/ws"))), 401);
    assert_eq!(status(Client::connect(&n.url("/ws?token="))), 401);
    assert_eq!(status(Client::connect(&n.url("/ws?other=1"))), 401);
    // Query auth is off: ?user= must not be trusted under --auth jwt.
    assert_eq!(status(Client::connect(&n.url("/ws?user=42"))), 401);
    // A header with no Bearer scheme is no credential either.
    assert_eq!(
        status(Client::connect_with(
            &n.url("/ws"),
            &[("Authorization", "Basic dXNlcjpwdw==")]
        )),
        401
    );
    assert_rejected(&n, &[("no_token", 5.0)]);
    assert_eq!(n.metric("pushwire_connections"), 0.0);
    assert_eq!(n.metric("pushwire_connections_accepted_total"), 0.0);
}

#[test]
fn bad_signature_is_401() {
    let _w = watchdog(20);
    let n = jwt_node(&[]);
    let forged = sign_hs256(&serde_json::json!({"sub": "42"}), b"not-the-secret");
    assert_eq!(
        status(Client::connect(&n.url(&format!("/ws?token={forged}")))),
        401
    );
    // A good token with its payload swapped for another user's.
    let good = token("42", None);
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(br#"{"sub":"1"}"#);
    let tampered = parts.join(".");
    assert_eq!(
        status(Client::connect(&n.url(&format!("/ws?token={tampered}")))),
        401
    );
    // Garbage.
    assert_eq!(status(Client::connect(&n.url("/ws?token=a.b.c"))), 401);
    assert_rejected(&n, &[("bad_signature", 2.0), ("malformed_token", 1.0)]);
    // The genuine token still works.
    let mut c = Client::connect(&n.url(&format!("/ws?token={good}"))).expect("upgrade");
    assert_is_user(&n, &mut c, "42");
}

#[test]
fn alg_none_and_other_algs_are_401() {
    let _w = watchdog(20);
    let n = jwt_node(&[]);
    let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"42"}"#);
    let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let none_upper = URL_SAFE_NO_PAD.encode(br#"{"alg":"NONE","typ":"JWT"}"#);
    // Unsigned, empty-signed, and carrying a real HS256 signature of the
    // same claims under a none or HS512 header (alg confusion).
    let good = token("42", None);
    let good_sig = good.rsplit('.').next().unwrap();
    let hs512 = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512","typ":"JWT"}"#);
    let tokens = [
        format!("{none}.{payload}."),
        format!("{none}.{payload}"),
        format!("{none_upper}.{payload}."),
        format!("{none}.{payload}.{good_sig}"),
        format!("{hs512}.{payload}.{good_sig}"),
    ];
    for t in &tokens {
        assert_eq!(
            status(Client::connect(&n.url(&format!("/ws?token={t}")))),
            401,
            "token {t}"
        );
    }
    assert_rejected(&n, &[("alg_not_allowed", tokens.len() as f64)]);
    assert_eq!(n.metric("pushwire_connections_accepted_total"), 0.0);
}

#[test]
fn expired_token_is_401_but_leeway_is_honoured() {
    let _w = watchdog(20);
    let n = jwt_node(&[]);
    let now = unix_now();
    // Well past the 30 s leeway.
    let expired = token("42", Some(now - 120));
    assert_eq!(
        status(Client::connect(&n.url(&format!("/ws?token={expired}")))),
        401
    );
    // By the Authorization header too.
    let bearer = format!("Bearer {expired}");
    assert_eq!(
        status(Client::connect_with(
            &n.url("/ws"),
            &[("Authorization", bearer.as_str())]
        )),
        401
    );
    // nbf far in the future.
    let future = sign_hs256(
        &serde_json::json!({"sub": "42", "nbf": now + 600}),
        SECRET.as_bytes(),
    );
    assert_eq!(
        status(Client::connect(&n.url(&format!("/ws?token={future}")))),
        401
    );
    assert_rejected(&n, &[("token_expired", 2.0), ("not_yet_valid", 1.0)]);
    // Expired 10 s ago: inside the leeway, accepted.
    let recent = token("42", Some(now - 10));
    let mut c = Client::connect(&n.url(&format!("/ws?token={recent}"))).expect("within leeway");
    assert_is_user(&n, &mut c, "42");
}

#[test]
fn wrong_path_is_404() {
    let _w = watchdog(20);
    let n = jwt_node(&[]);
    let t = token("42", None);
    for path in ["/", "/wss", "/ws/", "/WS", "/other/ws"] {
        assert_eq!(
            status(Client::connect(&n.url(&format!("{path}?token={t}")))),
            404,
            "path {path}"
        );
    }
    assert_rejected(&n, &[("not_found", 5.0)]);

    // A custom --path moves the endpoint: /ws is then a 404.
    let m = jwt_node(&["--path", "/push/v1"]);
    assert_eq!(
        status(Client::connect(&m.url(&format!("/ws?token={t}")))),
        404
    );
    let mut c = Client::connect(&m.url(&format!("/push/v1?token={t}"))).expect("upgrade");
    assert_is_user(&m, &mut c, "42");
    assert_rejected(&m, &[("not_found", 1.0)]);
}

#[test]
fn plain_get_without_upgrade_is_400_with_a_proper_http_answer() {
    let _w = watchdog(20);
    let n = jwt_node(&[]);
    let t = token("42", None);
    let req = format!("GET /ws?token={t} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let resp = http_raw(n.ws, req.as_bytes());
    let (st, body) = parse_response(resp.as_bytes());
    assert_eq!(st, 400, "{resp}");
    let len: usize = header_value(&resp, "Content-Length")
        .unwrap_or_else(|| panic!("no Content-Length in {resp:?}"))
        .parse()
        .expect("numeric Content-Length");
    assert_eq!(
        len,
        body.len(),
        "Content-Length must match the body: {resp:?}"
    );
    assert_eq!(
        header_value(&resp, "Connection")
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Some("close"),
        "{resp:?}"
    );
    assert!(
        !resp.to_ascii_lowercase().contains("sec-websocket-accept"),
        "no WebSocket on a refusal: {resp:?}"
    );
    // An upgrade header without the WebSocket key is not an upgrade either.
    let req = format!(
        "GET /ws?token={t} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    let resp = http_raw(n.ws, req.as_bytes());
    assert_eq!(parse_response(resp.as_bytes()).0, 400, "{resp}");
    assert_rejected(&n, &[("bad_request", 2.0)]);
    // The refusals left nothing behind.
    assert_eq!(n.metric("pushwire_connections"), 0.0);
}

#[test]
fn origin_not_allowed_is_403_and_the_allowed_origin_works() {
    let _w = watchdog(20);
    let n = jwt_node(&["--allowed-origins", "https://app.example"]);
    let url = n.url(&format!("/ws?token={}", token("42", None)));
    for origin in [
        "https://evil.example",
        "http://app.example",
        "https://app.example.evil.example",
        "https://app.example:8443",
        "null",
    ] {
        assert_eq!(
            status(Client::connect_with(&url, &[("Origin", origin)])),
            403,
            "origin {origin}"
        );
    }
    assert_rejected(&n, &[("origin", 5.0)]);
    let mut c = Client::connect_with(&url, &[("Origin", "https://app.example")]).expect("allowed");
    assert_is_user(&n, &mut c, "42");
    // No Origin header at all (not a browser): allowed.
    let mut d = Client::connect(&url).expect("no Origin header");
    assert_eq!(n.metric("pushwire_connections"), 2.0);
    d.expect_nothing(Duration::from_millis(10));
    assert_rejected(&n, &[("origin", 5.0)]);
}

#[test]
fn connection_limit_is_503_and_frees_up_when_a_client_leaves() {
    let _w = watchdog(20);
    let n = jwt_node(&["--max-connections", "2"]);
    let a = n.connect("1");
    let mut b = n.connect("2");
    assert_eq!(n.metric("pushwire_connections"), 2.0);
    let url = n.url(&format!("/ws?token={}", token("3", None)));
    assert_eq!(status(Client::connect(&url)), 503);
    assert_eq!(status(Client::connect(&url)), 503);
    assert_rejected(&n, &[("limit", 2.0)]);
    // The refused ones were not counted as connections.
    assert_eq!(n.metric("pushwire_connections"), 2.0);
    assert_eq!(n.metric("pushwire_connections_accepted_total"), 2.0);

    drop(a);
    assert!(n.wait_metric("pushwire_connections", T, |v| v == 1.0));
    let mut c = Client::connect(&url).expect("a slot is free again");
    assert_eq!(n.metric("pushwire_connections"), 2.0);
    assert_is_user(&n, &mut c, "3");
    assert_is_user(&n, &mut b, "2");
    // Full again.
    assert_eq!(status(Client::connect(&url)), 503);
    assert_rejected(&n, &[("limit", 3.0)]);
}

#[test]
fn authorization_bearer_header_works() {
    let _w = watchdog(20);
    let n = jwt_node(&[]);
    let bearer = format!("Bearer {}", token("42", None));
    let mut c = Client::connect_with(&n.url("/ws"), &[("Authorization", bearer.as_str())])
        .expect("upgrade with Authorization: Bearer");
    assert_eq!(n.metric("pushwire_connections"), 1.0);
    assert_is_user(&n, &mut c, "42");
    // A bad bearer token is refused even when a good one is in the query:
    // the header, when present, is the credential.
    let bad = format!(
        "Bearer {}",
        sign_hs256(&serde_json::json!({"sub": "42"}), b"wrong")
    );
    let url = n.url(&format!("/ws?token={}", token("42", None)));
    assert_eq!(
        status(Client::connect_with(
            &url,
            &[("Authorization", bad.as_str())]
        )),
        401
    );
    assert_rejected(&n, &[("bad_signature", 1.0)]);
}

#[test]
fn auth_header_mode_takes_the_user_from_the_header() {
    let _w = watchdog(20);
    let n = Node::start(&["--auth", "header"]);
    let mut c = Client::connect_with(&n.url("/ws"), &[("X-User-Id", "42")]).expect("upgrade");
    assert_is_user(&n, &mut c, "42");
    // No header: 401. A token is not a credential in this mode.
    assert_eq!(status(Client::connect(&n.url("/ws"))), 401);
    let t = token("7", None);
    assert_eq!(
        status(Client::connect(&n.url(&format!("/ws?token={t}")))),
        401
    );
    assert_eq!(status(Client::connect(&n.url("/ws?user=7"))), 401);
    assert_rejected(&n, &[("no_user", 3.0)]);

    // A custom header name.
    let m = Node::start(&["--auth", "header", "--user-header", "X-Auth-User"]);
    let mut d = Client::connect_with(&m.url("/ws"), &[("X-Auth-User", "alice")]).expect("upgrade");
    assert_is_user(&m, &mut d, "alice");
    assert_eq!(
        status(Client::connect_with(
            &m.url("/ws"),
            &[("X-User-Id", "alice")]
        )),
        401
    );
}

#[test]
fn auth_query_mode_trusts_the_user_parameter() {
    let _w = watchdog(20);
    let n = Node::start(&["--auth", "query"]);
    let mut c = Client::connect(&n.url("/ws?user=42")).expect("upgrade");
    assert_is_user(&n, &mut c, "42");
    // Percent-decoded.
    let mut d = Client::connect(&n.url("/ws?x=1&user=a%20b")).expect("upgrade");
    assert_is_user(&n, &mut d, "a b");
    assert_eq!(status(Client::connect(&n.url("/ws"))), 401);
    assert_eq!(status(Client::connect(&n.url("/ws?user="))), 401);
    assert_rejected(&n, &[("no_user", 1.0), ("bad_user", 1.0)]);
    assert_eq!(n.metric("pushwire_connections"), 2.0);
    assert_eq!(n.metric("pushwire_users"), 2.0);
}

#[test]
fn each_refusal_says_its_reason_in_the_body_the_log_and_the_metric() {
    let _w = watchdog(30);
    let n = jwt_node(&["--log-level", "debug"]);
    let now = unix_now();
    let sign = |c: serde_json::Value, key: &[u8]| pushwire::auth::sign_hs256(&c, key);
    let key = SECRET.as_bytes();
    let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
    let claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"42"}"#);
    let cases: Vec<(String, &str, &str)> = vec![
        ("/ws".into(), "no token", "no_token"),
        (
            format!(
                "/ws?token={}",
                sign(serde_json::json!({"sub": "42"}), b"other")
            ),
            "bad signature",
            "bad_signature",
        ),
        (
            format!("/ws?token={none}.{claims}."),
            "alg not allowed",
            "alg_not_allowed",
        ),
        (
            format!("/ws?token={}", token("42", Some(now - 120))),
            "token expired",
            "token_expired",
        ),
        (
            format!(
                "/ws?token={}",
                sign(serde_json::json!({"sub": "42", "nbf": now + 600}), key)
            ),
            "token not yet valid",
            "not_yet_valid",
        ),
        (
            format!(
                "/ws?token={}",
                sign(serde_json::json!({"exp": now + 600}), key)
            ),
            "sub missing",
            "sub_missing",
        ),
        (
            format!("/ws?token={}", sign(serde_json::json!({"sub": [1]}), key)),
            "sub missing",
            "sub_missing",
        ),
        ("/ws?token=x.y".into(), "malformed token", "malformed_token"),
    ];
    for (path, message, reason) in &cases {
        let before = rejected(&n, reason);
        assert_eq!(refusal(&n, path, &[]), (401, message.to_string()), "{path}");
        assert_eq!(rejected(&n, reason), before + 1.0, "{reason}");
        assert!(
            wait_until(T, || n.log_contains(&format!("refused 401 {message}"))),
            "no debug line for {message}"
        );
    }
    // Through the header as well, and a bearer-less header is no token.
    let bearer = format!("Bearer {}", token("42", Some(now - 120)));
    assert_eq!(
        refusal(&n, "/ws", &[("Authorization", &bearer)]),
        (401, "token expired".into())
    );
    assert_eq!(
        refusal(&n, "/ws", &[("Authorization", "Basic eDp5")]),
        (401, "no token".into())
    );
    assert_eq!(n.metric("pushwire_connections_accepted_total"), 0.0);
}

#[test]
fn an_integer_sub_is_the_user_notices_name_with_an_integer_or_a_string() {
    let _w = watchdog(20);
    let n = jwt_node(&[]);
    let t = pushwire::auth::sign_hs256(&serde_json::json!({"sub": 42}), SECRET.as_bytes());
    let mut c = Client::connect(&n.url(&format!("/ws?token={t}"))).expect("integer sub");
    // The string form reaches it...
    assert_is_user(&n, &mut c, "42");
    // ...and so does the integer form.
    let notice = r#"{"userId":42,"text":"int"}"#;
    assert_eq!(n.publish(notice).0, 202);
    assert_eq!(c.recv_text(T).as_deref(), Some(notice));
    // A float or a boolean is not a user id.
    for sub in [serde_json::json!(4.5), serde_json::json!(true)] {
        let t = pushwire::auth::sign_hs256(&serde_json::json!({ "sub": sub }), SECRET.as_bytes());
        assert_eq!(refusal(&n, &format!("/ws?token={t}"), &[]).0, 401);
    }
    assert_rejected(&n, &[("sub_missing", 2.0)]);
}
