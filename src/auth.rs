//! An upgrade request becomes a user id, or the HTTP refusal it deserves.
//! Pure functions over the parsed request (plus the current key), so every
//! rule of SPEC section 4 is unit-tested without a socket.

use std::path::Path;
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;
use tungstenite::handshake::server::Request;

use crate::config::{AuthMode, Config, JwtKey};

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// Longest user id accepted from any source; longer ones are refused.
pub const MAX_USER_ID_LEN: usize = 256;
/// Longest token accepted; a JWT with a `sub` is far shorter.
const MAX_TOKEN_LEN: usize = 4096;

/// Why an upgrade was refused: the HTTP status, the metric label and a
/// short body for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub message: &'static str,
}

impl Refusal {
    pub const fn new(status: u16, reason: &'static str, message: &'static str) -> Self {
        Refusal {
            status,
            reason,
            message,
        }
    }
}

pub const NOT_FOUND: Refusal = Refusal::new(404, "not_found", "not found");
pub const NOT_UPGRADE: Refusal = Refusal::new(400, "bad_request", "not a WebSocket upgrade");
pub const FORBIDDEN_ORIGIN: Refusal = Refusal::new(403, "origin", "origin not allowed");
pub const UNAUTHORIZED: Refusal = Refusal::new(401, "unauthorized", "missing or bad credentials");
pub const TOKEN_EXPIRED: Refusal = Refusal::new(401, "unauthorized", "token expired");
pub const OVER_LIMIT: Refusal = Refusal::new(503, "limit", "connection limit reached");
pub const SHUTTING_DOWN: Refusal = Refusal::new(503, "shutdown", "shutting down");
pub const TOO_LARGE: Refusal = Refusal::new(431, "too_large", "request header too large");
pub const METHOD: Refusal = Refusal::new(405, "method", "method not allowed");

/// Who a connection is, as established at the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Unix seconds of the token's `exp`, when there is one.
    pub expires: Option<u64>,
}

/// The HS256 key, swappable at run time (SIGHUP re-reads the file).
pub struct Keys {
    source: JwtKey,
    current: RwLock<Arc<[u8]>>,
}

impl Keys {
    pub fn new(source: JwtKey) -> std::io::Result<Keys> {
        let key: Arc<[u8]> = match &source {
            JwtKey::None => Arc::from(&b""[..]),
            JwtKey::Inline(k) => Arc::from(&k[..]),
            JwtKey::File(p) => Arc::from(read_key_file(p)?),
        };
        Ok(Keys {
            source,
            current: RwLock::new(key),
        })
    }

    pub fn current(&self) -> Arc<[u8]> {
        match self.current.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the key file. On error the old key stays and the error is
    /// returned for the log. `Ok(false)` when there is no file to re-read.
    pub fn reload(&self) -> std::io::Result<bool> {
        let JwtKey::File(path) = &self.source else {
            return Ok(false);
        };
        let key = read_key_file(path)?;
        match self.current.write() {
            Ok(mut k) => *k = Arc::from(key),
            Err(poisoned) => *poisoned.into_inner() = Arc::from(key),
        }
        Ok(true)
    }
}

/// Reads a key file: its bytes without the trailing newline; empty is an error.
pub fn read_key_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut key = std::fs::read(path)?;
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    if key.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the key file is empty",
        ));
    }
    Ok(key)
}

/// The part of the configuration the upgrade checks need.
pub struct Policy {
    pub path: String,
    pub mode: AuthMode,
    pub user_header: String,
    pub allowed_origins: Option<Vec<String>>,
}

impl Policy {
    pub fn from_config(c: &Config) -> Policy {
        Policy {
            path: c.path.clone(),
            mode: c.auth,
            user_header: c.user_header.clone(),
            allowed_origins: c.allowed_origins.clone(),
        }
    }
}

/// Checks path, origin and credentials, in that order.
pub fn check(req: &Request, policy: &Policy, key: &[u8], now: u64) -> Result<Identity, Refusal> {
    if req.uri().path() != policy.path {
        return Err(NOT_FOUND);
    }
    if let (Some(allowed), Some(origin)) = (&policy.allowed_origins, req.headers().get("origin")) {
        let origin = origin.to_str().unwrap_or("");
        if !allowed.iter().any(|a| a == origin) {
            return Err(FORBIDDEN_ORIGIN);
        }
    }
    let query = req.uri().query().unwrap_or("");
    match policy.mode {
        AuthMode::Query => {
            let user = query_param(query, "user").ok_or(UNAUTHORIZED)?;
            Ok(Identity {
                user: valid_user(&user)?,
                expires: None,
            })
        }
        AuthMode::Header => {
            let user = req
                .headers()
                .get(policy.user_header.as_str())
                .and_then(|v| v.to_str().ok())
                .ok_or(UNAUTHORIZED)?;
            Ok(Identity {
                user: valid_user(user.trim())?,
                expires: None,
            })
        }
        AuthMode::Jwt => {
            let token = match req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
            {
                Some(h) => h
                    .strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
                    .map(|t| t.trim().to_string()),
                None => query_param(query, "token"),
            }
            .ok_or(UNAUTHORIZED)?;
            match verify_hs256(&token, key, now) {
                Ok(claims) => Ok(Identity {
                    user: valid_user(&claims.sub)?,
                    expires: claims.exp,
                }),
                Err(JwtError::Expired) => Err(TOKEN_EXPIRED),
                Err(_) => Err(UNAUTHORIZED),
            }
        }
    }
}

fn valid_user(user: &str) -> Result<String, Refusal> {
    if user.is_empty() || user.len() > MAX_USER_ID_LEN {
        return Err(UNAUTHORIZED);
    }
    Ok(user.to_string())
}

/// The first value of `name` in a query string, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != name {
            return None;
        }
        let v = v.replace('+', " ");
        percent_encoding::percent_decode_str(&v)
            .decode_utf8()
            .ok()
            .map(|s| s.into_owned())
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    Malformed,
    Algorithm,
    Signature,
    Expired,
    NotYetValid,
    NoSubject,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub exp: Option<u64>,
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<serde_json::Value>,
    exp: Option<serde_json::Number>,
    nbf: Option<serde_json::Number>,
}

/// Verifies a compact HS256 JWT. The signature is checked (in constant time,
/// by `hmac`) before the claims are looked at; any `alg` other than HS256 is
/// refused, `none` included.
pub fn verify_hs256(token: &str, key: &[u8], now: u64) -> Result<Claims, JwtError> {
    if token.len() > MAX_TOKEN_LEN || key.is_empty() {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Malformed)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| JwtError::Malformed)?;
    if header.alg != "HS256" {
        return Err(JwtError::Algorithm);
    }
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| JwtError::Malformed)?;
    mac.update(&token.as_bytes()[..h.len() + 1 + p.len()]);
    mac.verify_slice(&sig).map_err(|_| JwtError::Signature)?;

    let payload = URL_SAFE_NO_PAD.decode(p).map_err(|_| JwtError::Malformed)?;
    let claims: RawClaims = serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed)?;
    let time = |n: Option<serde_json::Number>| -> Result<Option<u64>, JwtError> {
        match n {
            None => Ok(None),
            Some(n) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or(JwtError::Malformed),
        }
    };
    let exp = time(claims.exp)?;
    let nbf = time(claims.nbf)?;
    if exp.is_some_and(|exp| now > exp.saturating_add(LEEWAY_SECS)) {
        return Err(JwtError::Expired);
    }
    if nbf.is_some_and(|nbf| now.saturating_add(LEEWAY_SECS) < nbf) {
        return Err(JwtError::NotYetValid);
    }
    match claims.sub {
        Some(serde_json::Value::String(sub)) if !sub.is_empty() => Ok(Claims { sub, exp }),
        _ => Err(JwtError::NoSubject),
    }
}

/// Signs claims as an HS256 JWT. Used by tests, the benchmark and the
/// demo; the server itself only verifies.
pub fn sign_hs256(claims: &serde_json::Value, key: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(signing.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing}.{sig}")
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &[u8] = b"secret";
    const NOW: u64 = 1_800_000_000;

    fn policy(mode: AuthMode) -> Policy {
        Policy {
            path: "/ws".into(),
            mode,
            user_header: "X-User-Id".into(),
            allowed_origins: Some(vec!["https://app.example".into()]),
        }
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn good_token_by_query_and_header() {
        let t = sign_hs256(&json!({"sub": "42", "exp": NOW + 60}), KEY);
        let p = policy(AuthMode::Jwt);
        let id = check(&req(&format!("/ws?token={t}"), &[]), &p, KEY, NOW).unwrap();
        assert_eq!(
            id,
            Identity {
                user: "42".into(),
                expires: Some(NOW + 60)
            }
        );
        let bearer = format!("Bearer {t}");
        let id = check(&req("/ws", &[("Authorization", &bearer)]), &p, KEY, NOW).unwrap();
        assert_eq!(id.user, "42");
    }

    #[test]
    fn refusals() {
        let p = policy(AuthMode::Jwt);
        let good = sign_hs256(&json!({"sub": "42"}), KEY);
        assert_eq!(check(&req("/other", &[]), &p, KEY, NOW), Err(NOT_FOUND));
        assert_eq!(check(&req("/ws", &[]), &p, KEY, NOW), Err(UNAUTHORIZED));
        let origin = [("Origin", "https://evil.example")];
        assert_eq!(
            check(&req(&format!("/ws?token={good}"), &origin), &p, KEY, NOW),
            Err(FORBIDDEN_ORIGIN)
        );
        let ok_origin = [("Origin", "https://app.example")];
        assert!(check(&req(&format!("/ws?token={good}"), &ok_origin), &p, KEY, NOW).is_ok());
        let bad = sign_hs256(&json!({"sub": "42"}), b"other");
        assert_eq!(
            check(&req(&format!("/ws?token={bad}"), &[]), &p, KEY, NOW),
            Err(UNAUTHORIZED)
        );
    }

    #[test]
    fn jwt_rules() {
        let tok = |c: serde_json::Value| sign_hs256(&c, KEY);
        assert_eq!(
            verify_hs256(&tok(json!({"sub":"1","exp": NOW - 31})), KEY, NOW),
            Err(JwtError::Expired)
        );
        assert!(verify_hs256(&tok(json!({"sub":"1","exp": NOW - 29})), KEY, NOW).is_ok());
        assert_eq!(
            verify_hs256(&tok(json!({"sub":"1","nbf": NOW + 31})), KEY, NOW),
            Err(JwtError::NotYetValid)
        );
        assert!(verify_hs256(&tok(json!({"sub":"1","nbf": NOW + 29})), KEY, NOW).is_ok());
        assert_eq!(
            verify_hs256(&tok(json!({"exp": NOW})), KEY, NOW),
            Err(JwtError::NoSubject)
        );
        assert_eq!(
            verify_hs256(&tok(json!({"sub": 42})), KEY, NOW),
            Err(JwtError::NoSubject)
        );
        // alg none, with or without a signature
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let p = URL_SAFE_NO_PAD.encode(br#"{"sub":"1"}"#);
        assert_eq!(
            verify_hs256(&format!("{h}.{p}."), KEY, NOW),
            Err(JwtError::Algorithm)
        );
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512"}"#);
        assert_eq!(
            verify_hs256(&format!("{h}.{p}.abc"), KEY, NOW),
            Err(JwtError::Algorithm)
        );
        // tampered payload
        let good = tok(json!({"sub":"1"}));
        let mut parts: Vec<&str> = good.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(br#"{"sub":"2"}"#);
        parts[1] = &evil;
        assert_eq!(
            verify_hs256(&parts.join("."), KEY, NOW),
            Err(JwtError::Signature)
        );
        for junk in ["", ".", "..", "a.b.c.d", "!!!.???.###"] {
            assert!(verify_hs256(junk, KEY, NOW).is_err());
        }
    }

    #[test]
    fn query_and_header_modes() {
        let p = policy(AuthMode::Query);
        assert_eq!(
            check(&req("/ws?a=1&user=4%202", &[]), &p, KEY, NOW)
                .unwrap()
                .user,
            "4 2"
        );
        assert_eq!(
            check(&req("/ws?user=", &[]), &p, KEY, NOW),
            Err(UNAUTHORIZED)
        );
        let p = policy(AuthMode::Header);
        assert_eq!(
            check(&req("/ws", &[("x-user-id", "7")]), &p, KEY, NOW)
                .unwrap()
                .user,
            "7"
        );
        assert_eq!(check(&req("/ws", &[]), &p, KEY, NOW), Err(UNAUTHORIZED));
    }
}
