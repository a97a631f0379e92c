//! A published message becomes a [`Notice`]: who gets it, and the bytes
//! they get. Parsed once per notice, however many connections receive it;
//! the WebSocket frame is built once too (server frames are unmasked, so
//! every recipient gets the very same bytes) and shared by reference count.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A user id as JSON gives it: a string as it is, an integer in decimal,
/// so `42` and `"42"` are the same user. Notices and the JWT `sub` both
/// go through here; length limits are the caller's.
pub fn canonical_user(v: &serde_json::Value) -> Option<Cow<'_, str>> {
    match v {
        serde_json::Value::String(s) => Some(Cow::Borrowed(s)),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(Cow::Owned(n.to_string())),
        _ => None,
    }
}

/// Longest user id accepted from any source; longer ones are refused.
pub const MAX_USER_ID_LEN: usize = 256;

/// Notices larger than this are dropped (SPEC section 3).
pub const MAX_NOTICE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    User(Box<str>),
    /// Sorted and without duplicates, so no connection gets a notice twice.
    Users(Vec<Box<str>>),
    Broadcast,
}

#[derive(Debug, Clone)]
pub struct Notice {
    pub route: Route,
    /// The complete text frame: header plus the published bytes.
    pub frame: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeError {
    TooLarge(usize),
    NotUtf8,
    NotJson(String),
    NotObject,
    NoRoute,
    ManyRoutes,
    BadType(&'static str),
}

impl std::fmt::Display for NoticeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoticeError::TooLarge(n) => write!(
                f,
                "notice of {n} bytes is over the {MAX_NOTICE_BYTES}-byte limit"
            ),
            NoticeError::NotUtf8 => f.write_str("notice is not valid UTF-8"),
            NoticeError::NotJson(e) => write!(f, "notice is not valid JSON: {e}"),
            NoticeError::NotObject => f.write_str("notice is not a JSON object"),
            NoticeError::NoRoute => {
                f.write_str("notice has no routing field (userId, userIds or broadcast)")
            }
            NoticeError::ManyRoutes => {
                f.write_str("notice has more than one routing field (userId, userIds, broadcast)")
            }
            NoticeError::BadType(what) => f.write_str(what),
        }
    }
}

/// Only the routing fields are kept; every other field is validated as
/// JSON and skipped.
#[derive(Deserialize)]
struct Routing {
    #[serde(rename = "userId", default, deserialize_with = "present")]
    user_id: Option<Value>,
    #[serde(rename = "userIds", default, deserialize_with = "present")]
    user_ids: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    broadcast: Option<Value>,
}

/// Tells "absent" from "present and null" (null is a wrongly typed field).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A user id from a notice: strings as they are, integers in decimal, so
/// `42` and `"42"` name the same user.
/// The JWT `sub` goes through the same [`canonical_user`].
fn user_id(v: &Value) -> Option<Box<str>> {
    canonical_user(v)
        .filter(|s| !s.is_empty() && s.len() <= MAX_USER_ID_LEN)
        .map(|s| s.into())
}

pub fn parse(payload: &[u8]) -> Result<Notice, NoticeError> {
    if payload.len() > MAX_NOTICE_BYTES {
        return Err(NoticeError::TooLarge(payload.len()));
    }
    if std::str::from_utf8(payload).is_err() {
        return Err(NoticeError::NotUtf8);
    }
    // A derived struct would also accept a JSON array; only objects are notices.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
            Ok(_) => Err(NoticeError::NotObject),
            Err(e) => Err(NoticeError::NotJson(e.to_string())),
        };
    }
    let r: Routing =
        serde_json::from_slice(payload).map_err(|e| NoticeError::NotJson(e.to_string()))?;
    let route =
        match (r.user_id, r.user_ids, r.broadcast) {
            (None, None, None) => return Err(NoticeError::NoRoute),
            (Some(id), None, None) => Route::User(user_id(&id).ok_or(NoticeError::BadType(
                "userId must be a non-empty string or an integer",
            ))?),
            (None, Some(Value::Array(ids)), None) => {
                let mut list = ids.iter().map(user_id).collect::<Option<Vec<_>>>().ok_or(
                    NoticeError::BadType("userIds must hold only non-empty strings or integers"),
                )?;
                list.sort_unstable();
                list.dedup();
                Route::Users(list)
            }
            (None, Some(_), None) => return Err(NoticeError::BadType("userIds must be an array")),
            (None, None, Some(Value::Bool(true))) => Route::Broadcast,
            (None, None, Some(_)) => return Err(NoticeError::BadType("broadcast must be true")),
            _ => return Err(NoticeError::ManyRoutes),
        };
    Ok(Notice {
        route,
        frame: text_frame(payload),
    })
}

/// The payload of an unmasked frame built by [`frame`].
pub fn payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(header..).unwrap_or_default()
}

/// An unmasked, final text frame carrying `payload`.
pub fn text_frame(payload: &[u8]) -> Bytes {
    frame(0x81, payload)
}

/// An unmasked, final frame with the given first byte (FIN + opcode).
pub fn frame(first: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut b = BytesMut::with_capacity(len + 10);
    b.put_u8(first);
    if len < 126 {
        b.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        b.put_u8(126);
        b.put_u16(len as u16);
    } else {
        b.put_u8(127);
        b.put_u64(len as u64);
    }
    b.put_slice(payload);
    b.freeze()
}

/// A close frame with a status code and reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(reason.as_bytes());
    frame(0x88, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            parse(br#"{"userId":"42","text":"x"}"#).unwrap().route,
            Route::User("42".into())
        );
        assert_eq!(
            parse(br#"{"userId":42}"#).unwrap().route,
            Route::User("42".into())
        );
        assert_eq!(
            parse(br#"{"userIds":[7,"42",7]}"#).unwrap().route,
            Route::Users(vec!["42".into(), "7".into()])
        );
        assert_eq!(
            parse(br#" {"broadcast":true,"a":[1,{"b":null}]}"#)
                .unwrap()
                .route,
            Route::Broadcast
        );
    }

    #[test]
    fn frame_is_header_plus_the_exact_bytes() {
        let text = br#"{"userId":"42","text":"h\u00e9llo"}"#;
        let n = parse(text).unwrap();
        assert_eq!(&n.frame[..2], &[0x81, text.len() as u8]);
        assert_eq!(&n.frame[2..], text);
        let big = vec![b'a'; 70_000];
        let f = text_frame(&big);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(f.len(), big.len() + 10);
        let mid = vec![b'a'; 300];
        assert_eq!(&text_frame(&mid)[..4], &[0x81, 126, 1, 44]);
        for p in [&text[..], &mid[..], &big[..], b""] {
            assert_eq!(payload(&text_frame(p)), p);
        }
    }

    #[test]
    fn invalid_notices() {
        use NoticeError::*;
        type Case<'a> = (&'a [u8], fn(&NoticeError) -> bool);
        let cases: &[Case] = &[
            (b"not json", |e| matches!(e, NotJson(_))),
            (b"[1,2]", |e| *e == NotObject),
            (b"\"userId\"", |e| *e == NotObject),
            (b"{}", |e| *e == NoRoute),
            (br#"{"text":"x"}"#, |e| *e == NoRoute),
            (br#"{"userId":"1","broadcast":true}"#, |e| *e == ManyRoutes),
            (br#"{"userId":"1","userIds":["2"]}"#, |e| *e == ManyRoutes),
            (br#"{"userId":null}"#, |e| matches!(e, BadType(_))),
            (br#"{"userId":1.5}"#, |e| matches!(e, BadType(_))),
            (br#"{"userId":""}"#, |e| matches!(e, BadType(_))),
            (br#"{"userId":{"a":1}}"#, |e| matches!(e, BadType(_))),
            (br#"{"userIds":"42"}"#, |e| matches!(e, BadType(_))),
            (br#"{"userIds":[true]}"#, |e| matches!(e, BadType(_))),
            (br#"{"broadcast":false}"#, |e| matches!(e, BadType(_))),
            (br#"{"broadcast":"yes"}"#, |e| matches!(e, BadType(_))),
            (br#"{"userId":"1","userId":"2"}"#, |e| {
                matches!(e, NotJson(_))
            }),
            (b"{\"userId\":\"\xff\"}", |e| *e == NotUtf8),
            (br#"{"userId":"1"} trailing"#, |e| matches!(e, NotJson(_))),
        ];
        for (input, ok) in cases {
            let e = parse(input).unwrap_err();
            assert!(ok(&e), "{} -> {e:?}", String::from_utf8_lossy(input));
        }
        let nested = format!(
            "{{\"userId\":1,\"a\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        // Deep nesting in other fields is skipped without recursion: valid.
        assert_eq!(
            parse(nested.as_bytes()).unwrap().route,
            Route::User("1".into())
        );
        let deep_route = format!(
            "{{\"userIds\":{}1{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(matches!(parse(deep_route.as_bytes()), Err(NotJson(_))));
        let big = format!(
            "{{\"userId\":1,\"a\":\"{}\"}}",
            "x".repeat(MAX_NOTICE_BYTES)
        );
        assert!(matches!(parse(big.as_bytes()), Err(TooLarge(_))));
    }
}
