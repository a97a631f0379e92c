//! Property tests of the pure parts: notice parsing, HS256 tokens, and the
//! upgrade checks. Unit tests of the crate (included from `lib.rs` under
//! `cfg(test)`), so what they reach in `auth` and `notice` need not be
//! public. They run `PROPTEST_CASES` cases each (proptest reads the
//! variable), 2000 when it is not set, so `cargo test` stays quick; for a
//! long run: `PROPTEST_CASES=1000000 cargo test --release --lib props::`.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::{Number, Value};
use tungstenite::handshake::machine::TryParse;
use tungstenite::handshake::server::Request;

use crate::auth::{self, AuthConfig, AuthMode, Claims, JwtError};
use crate::notice::{self, Route, MAX_NOTICE_BYTES};

fn config() -> ProptestConfig {
    // `default()` honours PROPTEST_CASES (and the other PROPTEST_* variables).
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 2000;
    }
    // Failing inputs are printed, shrunk; no regression files in the tree.
    c.failure_persistence = None;
    c
}

// ---- an independent reading of SPEC section 3 ----

const ROUTING: [&str; 3] = ["userId", "userIds", "broadcast"];

/// The top-level members of an object, routing values kept as `Value`,
/// others skipped (as the server skips them).
struct TopLevel(Vec<(String, Option<Value>)>);

impl<'de> serde::Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<TopLevel, A::Error> {
                let mut members = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    if ROUTING.contains(&k.as_str()) {
                        let v = m.next_value::<Value>()?;
                        members.push((k, Some(v)));
                    } else {
                        m.next_value::<IgnoredAny>()?;
                        members.push((k, None));
                    }
                }
                Ok(TopLevel(members))
            }
        }
        d.deserialize_map(V)
    }
}

fn user_of(v: &Value) -> Option<Box<str>> {
    match v {
        Value::String(s) if !s.is_empty() && s.len() <= 256 => Some(s.as_str().into()),
        Value::Number(n) => n
            .as_i64()
            .map(|i| i.to_string())
            .or_else(|| n.as_u64().map(|u| u.to_string()))
            .map(Into::into),
        _ => None,
    }
}

/// What the spec says a published message becomes.
fn expected_route(bytes: &[u8]) -> Result<Route, &'static str> {
    if bytes.len() > MAX_NOTICE_BYTES {
        return Err("too large");
    }
    std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("not an object");
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let top = serde::Deserialize::deserialize(&mut de).map_err(|_| "not JSON")?;
    de.end().map_err(|_| "not JSON")?;
    let TopLevel(members) = top;
    let routes: Vec<(&str, &Value)> = members
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.as_str(), v)))
        .collect();
    for name in ROUTING {
        if routes.iter().filter(|(k, _)| *k == name).count() > 1 {
            return Err("a routing field twice");
        }
    }
    match routes.as_slice() {
        [] => Err("no route"),
        [("userId", v)] => user_of(v).map(Route::User).ok_or("bad userId"),
        [("userIds", Value::Array(ids))] => {
            let mut list = ids
                .iter()
                .map(user_of)
                .collect::<Option<Vec<_>>>()
                .ok_or("bad userIds")?;
            list.sort_unstable();
            list.dedup();
            Ok(Route::Users(list))
        }
        [("userIds", _)] => Err("userIds not an array"),
        [("broadcast", Value::Bool(true))] => Ok(Route::Broadcast),
        [("broadcast", _)] => Err("broadcast not true"),
        _ => Err("many routes"),
    }
}

/// The frame is an unmasked final text frame, minimally sized, carrying
/// exactly `payload`.
fn assert_frame(frame: &[u8], payload: &[u8]) -> Result<(), TestCaseError> {
    prop_assert_eq!(frame[0], 0x81);
    let (len, header) = match frame[1] {
        n @ 0..=125 => (n as usize, 2),
        126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
        127 => (
            u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
            10,
        ),
        _ => return Err(TestCaseError::fail("masked server frame")),
    };
    prop_assert_eq!(len, payload.len());
    let minimal = match payload.len() {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    prop_assert_eq!(header, minimal);
    prop_assert!(&frame[header..] == payload, "payload differs");
    Ok(())
}

/// Parses and compares with the independent reading; never panics.
fn parse_agrees(bytes: &[u8]) -> Result<(), TestCaseError> {
    let got = notice::parse(bytes);
    let want = expected_route(bytes);
    match (&got, &want) {
        (Ok(n), Ok(r)) => {
            prop_assert_eq!(&n.route, r);
            assert_frame(&n.frame, bytes)?;
        }
        (Err(_), Err(_)) => {}
        _ => {
            return Err(TestCaseError::fail(format!(
                "parse {:?} but the spec says {:?} for {:?}",
                got.map(|n| n.route),
                want,
                String::from_utf8_lossy(bytes)
            )))
        }
    }
    Ok(())
}

// ---- generators ----

/// Arbitrary JSON values, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-zA-Z]{0,6}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Fragments that make near-JSON, routing words and edge cases included.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "{", "}", "[", "]", ":", ",", " ", "\n", "\t", "\u{c}",
            r#""userId""#, r#""userIds""#, r#""broadcast""#, r#""user\u0049d""#,
            r#""text""#, "true", "false", "null", "0", "42", "-7", "1.5", "1e400",
            "-0", "18446744073709551615", "18446744073709551616",
            "-9223372036854775808", "-9223372036854775809", r#""""#, r#""42""#,
            r#""\ud800""#, r#""\ud83d\ude00""#, r#""\u0000""#, "\"", "\\", "é", "\u{0}",
        ])
        .prop_map(str::to_string),
        1 => "\"[^\"\\\\]{0,300}\"",
        1 => json_value().prop_map(|v| v.to_string()),
    ]
}

fn jsonish() -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 0..40).prop_map(|t| t.concat())
}

/// Objects with a random set of members, routing ones included, as text.
fn object_like() -> impl Strategy<Value = String> {
    let member = prop_oneof![
        (
            prop::sample::select(vec!["userId", "userIds", "broadcast"]),
            prop_oneof![
                json_value(),
                prop::collection::vec(id_value(), 0..4).prop_map(Value::Array),
                id_value(),
                Just(Value::Bool(true)),
            ]
        )
            .prop_map(|(k, v)| (k.to_string(), v)),
        ("[a-z]{1,8}", json_value()),
    ];
    (prop::collection::vec(member, 0..5), whitespace()).prop_map(|(members, ws)| {
        let body: Vec<String> = members
            .iter()
            .map(|(k, v)| format!("{ws}{}{ws}:{ws}{v}{ws}", Value::from(k.as_str())))
            .collect();
        format!("{ws}{{{}}}{ws}", body.join(","))
    })
}

fn whitespace() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", " ", "\n", "\t", "\r\n  "])
}

/// A user id as published: a string (up to 256 bytes) or an integer.
fn id_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        ".{1,64}".prop_map(Value::String),
        "[0-9a-z]{1,8}".prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u8..50).prop_map(Value::from),
    ]
}

/// A JSON string literal, either as serde_json writes it or with every
/// non-ASCII character (and some ASCII) as `\u` escapes.
fn string_literal(s: &str, ascii: bool) -> String {
    if !ascii {
        return Value::from(s).to_string();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | ' ' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

fn id_literal(v: &Value, ascii: bool) -> String {
    match v {
        Value::String(s) => string_literal(s, ascii),
        other => other.to_string(),
    }
}

fn id_text(v: &Value) -> Box<str> {
    match v {
        Value::String(s) => s.as_str().into(),
        other => other.to_string().into(),
    }
}

#[derive(Debug, Clone)]
enum RouteSpec {
    User(Value),
    Users(Vec<Value>),
    Broadcast,
}

/// A valid notice as text, and the route it must get.
fn valid_notice() -> impl Strategy<Value = (String, Route)> {
    let route = prop_oneof![
        id_value().prop_map(RouteSpec::User),
        prop::collection::vec(id_value(), 0..8).prop_map(RouteSpec::Users),
        Just(RouteSpec::Broadcast),
    ];
    let extras = prop::collection::vec(("x_[a-zA-Z0-9_]{0,8}", json_value()), 0..5);
    (
        route,
        extras,
        any::<prop::sample::Index>(),
        whitespace(),
        any::<bool>(),
    )
        .prop_map(|(spec, extras, at, ws, ascii)| {
            let (member, route) = match &spec {
                RouteSpec::User(v) => (
                    format!("\"userId\"{ws}:{ws}{}", id_literal(v, ascii)),
                    Route::User(id_text(v)),
                ),
                RouteSpec::Users(vs) => {
                    let lits: Vec<String> = vs.iter().map(|v| id_literal(v, ascii)).collect();
                    let mut ids: Vec<Box<str>> = vs.iter().map(id_text).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    (
                        format!("\"userIds\"{ws}:{ws}[{}]", lits.join(&format!(",{ws}"))),
                        Route::Users(ids),
                    )
                }
                RouteSpec::Broadcast => (format!("\"broadcast\"{ws}:{ws}true"), Route::Broadcast),
            };
            let mut members: Vec<String> = extras
                .iter()
                .map(|(k, v)| format!("{}{ws}:{ws}{v}", string_literal(k, ascii)))
                .collect();
            members.insert(at.index(members.len() + 1), member);
            let text = format!("{ws}{{{ws}{}{ws}}}{ws}", members.join(&format!(",{ws}")));
            (text, route)
        })
}

// ---- tokens ----

const NOW: u64 = 1_800_000_000;

#[derive(Debug, Clone)]
struct ClaimSpec {
    sub: Option<Value>,
    exp: Option<u64>,
    nbf: Option<u64>,
    extra: Option<Value>,
}

fn near_now() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => NOW - 100..NOW + 100,
        1 => any::<u64>(),
        1 => Just(0u64),
    ]
}

fn claims() -> impl Strategy<Value = ClaimSpec> {
    let sub = prop_oneof![
        4 => ".{1,40}".prop_map(|s| Some(Value::String(s))),
        1 => Just(Some(Value::String(String::new()))),
        1 => any::<i64>().prop_map(|n| Some(Value::from(n))),
        1 => Just(Some(Value::Null)),
        1 => Just(None),
    ];
    (
        sub,
        prop::option::of(near_now()),
        prop::option::of(near_now()),
        prop::option::of(json_value()),
    )
        .prop_map(|(sub, exp, nbf, extra)| ClaimSpec {
            sub,
            exp,
            nbf,
            extra,
        })
}

impl ClaimSpec {
    fn json(&self) -> Value {
        let mut m = serde_json::Map::new();
        if let Some(s) = &self.sub {
            m.insert("sub".into(), s.clone());
        }
        if let Some(e) = self.exp {
            m.insert("exp".into(), e.into());
        }
        if let Some(n) = self.nbf {
            m.insert("nbf".into(), n.into());
        }
        if let Some(x) = &self.extra {
            m.insert("extra".into(), x.clone());
        }
        Value::Object(m)
    }

    /// SPEC section 4: exp and nbf with 30 s leeway, `sub` a non-empty
    /// string or an integer (as its decimal, the form notices use).
    fn expected(&self, now: u64) -> Result<Claims, JwtError> {
        if self.exp.is_some_and(|e| now > e.saturating_add(30)) {
            return Err(JwtError::Expired);
        }
        if self.nbf.is_some_and(|n| now.saturating_add(30) < n) {
            return Err(JwtError::NotYetValid);
        }
        match &self.sub {
            Some(Value::String(s)) if !s.is_empty() => Ok(Claims {
                sub: s.clone(),
                exp: self.exp,
            }),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Claims {
                sub: n.to_string(),
                exp: self.exp,
            }),
            _ => Err(JwtError::NoSubject),
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Strings shaped like tokens: three (or so) base64url segments of
/// arbitrary or JSON-ish content, with the HS256 header often.
fn token_like() -> impl Strategy<Value = String> {
    let header = prop_oneof![
        Just(br#"{"alg":"HS256","typ":"JWT"}"#.to_vec()),
        Just(br#"{"alg":"none"}"#.to_vec()),
        Just(br#"{"alg":"HS256","alg":"none"}"#.to_vec()),
        jsonish().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
    ];
    let segment = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80).prop_map(|b| b64(&b)),
        jsonish().prop_map(|s| b64(s.as_bytes())),
        "[A-Za-z0-9_=+/.-]{0,60}",
    ];
    (header, prop::collection::vec(segment, 0..4)).prop_map(|(h, rest)| {
        let mut parts = vec![b64(&h)];
        parts.extend(rest);
        parts.join(".")
    })
}

// ---- upgrade requests ----

fn policies() -> Vec<AuthConfig> {
    let mut v = Vec::new();
    for mode in [AuthMode::Jwt, AuthMode::Header, AuthMode::Query] {
        for origins in [None, Some(vec!["https://app.example".to_string()])] {
            v.push(AuthConfig {
                path: "/ws".into(),
                mode,
                user_header: "X-User-Id".into(),
                allowed_origins: origins,
            });
        }
    }
    v
}

/// Header values as a hostile client might send them (any byte but CR/LF).
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(
            any::<u8>().prop_map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            0..60
        ),
        "[ -~]{0,60}".prop_map(String::into_bytes),
        Just(b"https://app.example".to_vec()),
        Just(b"websocket".to_vec()),
    ]
}

/// Upgrade-shaped requests with hostile paths, queries and headers.
fn request_like() -> impl Strategy<Value = Vec<u8>> {
    let path = prop_oneof![
        Just("/ws".to_string()),
        Just("/ws?user=42".to_string()),
        "/ws\\?user=[%0-9A-Fa-f+]{0,30}",
        "/ws\\?token=[A-Za-z0-9_.%-]{0,80}",
        "/[!-~]{0,40}",
        Just("*".to_string()),
        Just("http://h/ws?user=1".to_string()),
    ];
    let name = prop_oneof![
        prop::sample::select(vec![
            "Host",
            "Upgrade",
            "Connection",
            "Origin",
            "Authorization",
            "X-User-Id",
            "x-user-id",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
        ])
        .prop_map(str::to_string),
        "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}",
    ];
    let bearer = (claims(), any::<bool>()).prop_map(|(c, good)| {
        let key: &[u8] = if good { b"k" } else { b"other" };
        format!("Bearer {}", auth::sign_hs256(&c.json(), key)).into_bytes()
    });
    let value = prop_oneof![3 => header_value(), 1 => bearer];
    (path, prop::collection::vec((name, value), 0..8)).prop_map(|(path, headers)| {
        let mut r = format!("GET {path} HTTP/1.1\r\n").into_bytes();
        for (n, v) in headers {
            r.extend_from_slice(n.as_bytes());
            r.extend_from_slice(b": ");
            r.extend_from_slice(&v);
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"\r\n");
        r
    })
}

/// Parses a request and runs every policy over it; never panics, and what
/// it accepts is a sane user.
fn check_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(Some((_, req))) = Request::try_parse(bytes) else {
        return Ok(());
    };
    for p in policies() {
        match auth::check(&req, &p, b"k", NOW) {
            Ok(id) => {
                prop_assert!(!id.user.is_empty() && id.user.len() <= auth::MAX_USER_ID_LEN);
                prop_assert_eq!(req.uri().path(), "/ws");
                if p.mode != AuthMode::Jwt {
                    prop_assert_eq!(id.expires, None);
                }
            }
            Err(r) => prop_assert!([401, 403, 404].contains(&r.status), "{:?}", r),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn notice_parse_agrees_with_the_spec_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        parse_agrees(&bytes)?;
    }

    #[test]
    fn notice_parse_agrees_with_the_spec_on_jsonish_text(text in jsonish()) {
        parse_agrees(text.as_bytes())?;
    }

    #[test]
    fn notice_parse_agrees_with_the_spec_on_object_like_text(text in object_like()) {
        parse_agrees(text.as_bytes())?;
    }

    #[test]
    fn valid_notices_round_trip_byte_for_byte((text, route) in valid_notice()) {
        let n = notice::parse(text.as_bytes());
        prop_assert!(n.is_ok(), "refused {:?}: {:?}", text, n.err());
        let n = n.unwrap();
        prop_assert_eq!(n.route, route);
        assert_frame(&n.frame, text.as_bytes())?;
    }

    #[test]
    fn verify_never_panics_on_arbitrary_strings(s in any::<String>(), key in prop::collection::vec(any::<u8>(), 0..16)) {
        prop_assert!(auth::verify_hs256(&s, &key, NOW).is_err());
    }

    #[test]
    fn verify_never_panics_on_token_shaped_strings(s in token_like()) {
        prop_assert!(auth::verify_hs256(&s, b"k", NOW).is_err());
    }

    #[test]
    fn verify_accepts_exactly_the_tokens_signed_with_the_key(
        c in claims(),
        key in prop::collection::vec(any::<u8>(), 1..64),
        now in near_now(),
        flip in any::<prop::sample::Index>(),
        with in prop::sample::select(b"AQgw_-.9".to_vec()),
    ) {
        let token = auth::sign_hs256(&c.json(), &key);
        prop_assert_eq!(auth::verify_hs256(&token, &key, now), c.expected(now));

        // Another key (HMAC pads keys with zeros: change a byte, not the length).
        let mut other = key.clone();
        other[0] ^= 1;
        prop_assert_eq!(auth::verify_hs256(&token, &other, now), Err(JwtError::Signature));

        // Any one character changed: refused.
        let i = flip.index(token.len());
        if token.as_bytes()[i] != with {
            let mut t = token.clone().into_bytes();
            t[i] = with;
            let t = String::from_utf8(t).unwrap();
            prop_assert!(auth::verify_hs256(&t, &key, now).is_err(), "{} accepted", t);
        }

        // Through the upgrade check, as query and as header.
        let p = &policies()[0];
        let req = |uri: &str, auth: Option<&str>| {
            let mut b = Request::builder().uri(uri);
            if let Some(a) = auth {
                b = b.header("Authorization", a);
            }
            b.body(()).unwrap()
        };
        let want = c
            .expected(now)
            .ok()
            .filter(|cl| cl.sub.len() <= auth::MAX_USER_ID_LEN)
            .map(|cl| (cl.sub, cl.exp));
        for r in [req(&format!("/ws?token={token}"), None), req("/ws", Some(&format!("Bearer {token}")))] {
            let got = auth::check(&r, p, &key, now).ok().map(|id| (id.user, id.expires));
            prop_assert_eq!(&got, &want);
        }
    }

    #[test]
    fn upgrade_checks_never_panic_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        check_all(&bytes)?;
    }

    #[test]
    fn upgrade_checks_never_panic_on_hostile_requests(bytes in request_like()) {
        check_all(&bytes)?;
    }
}
