//! An upgrade request becomes a user id, or the HTTP refusal it deserves.
//! Pure functions over the parsed request (plus the current key), so every
//! rule of SPEC section 4 is unit-tested without a socket. The settings
//! come in as an [`AuthConfig`] that `config` builds; this module reads no
//! files and knows nothing of flags.

use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;
use tungstenite::handshake::server::Request;

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
pub use crate::notice::MAX_USER_ID_LEN;
/// Longest token accepted; a JWT with a `sub` is far shorter.
const MAX_TOKEN_LEN: usize = 4096;

/// How a connection proves which user it belongs to (SPEC section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Jwt,
    Header,
    Query,
}

/// What the upgrade checks need from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// The WebSocket endpoint; other paths get 404.
    pub path: String,
    pub mode: AuthMode,
    /// The header `--auth header` takes the user from.
    pub user_header: String,
    /// `None` means any origin (`*`).
    pub allowed_origins: Option<Vec<String>>,
}

/// Why an upgrade was refused. Each reason is one label of
/// `pushwire_handshake_rejected_total` and indexes its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    BadRequest,
    NotFound,
    Method,
    Origin,
    NoToken,
    MalformedToken,
    BadSignature,
    AlgNotAllowed,
    TokenExpired,
    NotYetValid,
    SubMissing,
    NoUser,
    BadUser,
    Limit,
    UserLimit,
    Shutdown,
    TooLarge,
    Timeout,
}

impl Reason {
    /// Every reason, in the order of their counters (`ALL[r.index()] == r`).
    pub const ALL: [Reason; 18] = [
        Reason::BadRequest,
        Reason::NotFound,
        Reason::Method,
        Reason::Origin,
        Reason::NoToken,
        Reason::MalformedToken,
        Reason::BadSignature,
        Reason::AlgNotAllowed,
        Reason::TokenExpired,
        Reason::NotYetValid,
        Reason::SubMissing,
        Reason::NoUser,
        Reason::BadUser,
        Reason::Limit,
        Reason::UserLimit,
        Reason::Shutdown,
        Reason::TooLarge,
        Reason::Timeout,
    ];
    pub const COUNT: usize = Reason::ALL.len();

    pub const fn index(self) -> usize {
        self as usize
    }

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::BadRequest => "bad_request",
            Reason::NotFound => "not_found",
            Reason::Method => "method",
            Reason::Origin => "origin",
            Reason::NoToken => "no_token",
            Reason::MalformedToken => "malformed_token",
            Reason::BadSignature => "bad_signature",
            Reason::AlgNotAllowed => "alg_not_allowed",
            Reason::TokenExpired => "token_expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::SubMissing => "sub_missing",
            Reason::NoUser => "no_user",
            Reason::BadUser => "bad_user",
            Reason::Limit => "limit",
            Reason::UserLimit => "user_limit",
            Reason::Shutdown => "shutdown",
            Reason::TooLarge => "too_large",
            Reason::Timeout => "timeout",
        }
    }
}

/// A refused upgrade: the HTTP status, the reason it is counted under and
/// the body the client (and the debug log) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: Reason,
    pub message: &'static str,
}

impl Refusal {
    pub const fn new(status: u16, reason: Reason, message: &'static str) -> Self {
        Refusal {
            status,
            reason,
            message,
        }
    }
}

pub const NOT_FOUND: Refusal = Refusal::new(404, Reason::NotFound, "not found");
pub const NOT_UPGRADE: Refusal = Refusal::new(400, Reason::BadRequest, "not a WebSocket upgrade");
pub const FORBIDDEN_ORIGIN: Refusal = Refusal::new(403, Reason::Origin, "origin not allowed");
pub const NO_TOKEN: Refusal = Refusal::new(401, Reason::NoToken, "no token");
pub const MALFORMED_TOKEN: Refusal = Refusal::new(401, Reason::MalformedToken, "malformed token");
pub const BAD_SIGNATURE: Refusal = Refusal::new(401, Reason::BadSignature, "bad signature");
pub const ALG_NOT_ALLOWED: Refusal = Refusal::new(401, Reason::AlgNotAllowed, "alg not allowed");
pub const TOKEN_EXPIRED: Refusal = Refusal::new(401, Reason::TokenExpired, "token expired");
pub const NOT_YET_VALID: Refusal = Refusal::new(401, Reason::NotYetValid, "token not yet valid");
pub const SUB_MISSING: Refusal = Refusal::new(401, Reason::SubMissing, "sub missing");
pub const NO_USER: Refusal = Refusal::new(401, Reason::NoUser, "no user id");
pub const BAD_USER: Refusal = Refusal::new(401, Reason::BadUser, "bad user id");
pub const OVER_LIMIT: Refusal = Refusal::new(503, Reason::Limit, "connection limit reached");
pub const OVER_USER_LIMIT: Refusal =
    Refusal::new(429, Reason::UserLimit, "too many connections for this user");
pub const SHUTTING_DOWN: Refusal = Refusal::new(503, Reason::Shutdown, "shutting down");
pub const TOO_LARGE: Refusal = Refusal::new(431, Reason::TooLarge, "request header too large");
pub const BAD_SINCE: Refusal = Refusal::new(400, Reason::BadRequest, "since is not a notice id");
pub const METHOD: Refusal = Refusal::new(405, Reason::Method, "method not allowed");

/// Who a connection is, as established at the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Unix seconds of the token's `exp`, when there is one.
    pub expires: Option<u64>,
}

/// Secret bytes (the HS256 key, the admin token). `Debug` never shows them,
/// so a logged `Config` leaks nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Arc::from(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// A secret that SIGHUP may replace while others still use the old one.
pub struct Keys {
    current: RwLock<Arc<[u8]>>,
}

impl Keys {
    pub fn new(secret: Secret) -> Keys {
        Keys {
            current: RwLock::new(secret.0),
        }
    }

    pub fn current(&self) -> Arc<[u8]> {
        match self.current.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, secret: Secret) {
        match self.current.write() {
            Ok(mut k) => *k = secret.0,
            Err(poisoned) => *poisoned.into_inner() = secret.0,
        }
    }
}

/// Compares a presented secret with the expected one in constant time:
/// both are reduced to HMAC-SHA256 tags, and `hmac`'s verify compares the
/// tags in constant time, so neither the content nor the length of the
/// expected secret shows in the timing.
pub fn same_secret(expected: &[u8], presented: &[u8]) -> bool {
    let tag = |msg: &[u8]| {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(b"pushwire secret compare").expect("any key length");
        mac.update(msg);
        mac
    };
    let want = tag(expected).finalize().into_bytes();
    !expected.is_empty() && tag(presented).verify_slice(&want).is_ok()
}

/// The bearer token of an `Authorization` header value, if it has one.
pub fn bearer(header: &str) -> Option<&str> {
    let t = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))?
        .trim();
    (!t.is_empty()).then_some(t)
}

/// Checks path, origin and credentials, in that order.
pub fn check(
    req: &Request,
    policy: &AuthConfig,
    key: &[u8],
    now: u64,
) -> Result<Identity, Refusal> {
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
            let user = query_param(query, "user").ok_or(NO_USER)?;
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
                .ok_or(NO_USER)?;
            Ok(Identity {
                user: valid_user(user.trim())?,
                expires: None,
            })
        }
        AuthMode::Jwt => {
            // The header, when present, is the credential: a bad one is not
            // rescued by a query token.
            let token = match req.headers().get("authorization") {
                Some(h) => h.to_str().ok().and_then(bearer).map(str::to_string),
                None => query_param(query, "token").filter(|t| !t.is_empty()),
            }
            .ok_or(NO_TOKEN)?;
            let claims = verify_hs256(&token, key, now).map_err(JwtError::refusal)?;
            Ok(Identity {
                user: valid_user(&claims.sub)?,
                expires: claims.exp,
            })
        }
    }
}

fn valid_user(user: &str) -> Result<String, Refusal> {
    if user.is_empty() || user.len() > MAX_USER_ID_LEN {
        return Err(BAD_USER);
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
    /// Not three base64url JSON parts, a bad claim type, or too long.
    Malformed,
    /// `alg` is not HS256 (`none` included).
    Algorithm,
    Signature,
    Expired,
    NotYetValid,
    /// No `sub`, an empty one, or one that is neither string nor integer.
    NoSubject,
}

impl JwtError {
    pub const fn refusal(self) -> Refusal {
        match self {
            JwtError::Malformed => MALFORMED_TOKEN,
            JwtError::Algorithm => ALG_NOT_ALLOWED,
            JwtError::Signature => BAD_SIGNATURE,
            JwtError::Expired => TOKEN_EXPIRED,
            JwtError::NotYetValid => NOT_YET_VALID,
            JwtError::NoSubject => SUB_MISSING,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Claims {
    /// The user, in the canonical form of [`canonical_user`].
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
/// refused, `none` included (also when it comes without a signature part).
pub fn verify_hs256(token: &str, key: &[u8], now: u64) -> Result<Claims, JwtError> {
    if token.len() > MAX_TOKEN_LEN || key.is_empty() {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let h = parts.next().unwrap_or("");
    let header = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Malformed)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| JwtError::Malformed)?;
    if header.alg != "HS256" {
        return Err(JwtError::Algorithm);
    }
    let (Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed);
    };
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
    match claims.sub.as_ref().and_then(crate::notice::canonical_user) {
        Some(sub) if !sub.is_empty() => Ok(Claims {
            sub: sub.into_owned(),
            exp,
        }),
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

    fn policy(mode: AuthMode) -> AuthConfig {
        AuthConfig {
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
        assert_eq!(check(&req("/ws", &[]), &p, KEY, NOW), Err(NO_TOKEN));
        assert_eq!(check(&req("/ws?token=", &[]), &p, KEY, NOW), Err(NO_TOKEN));
        let basic = [("Authorization", "Basic dXNlcjpwdw==")];
        assert_eq!(check(&req("/ws", &basic), &p, KEY, NOW), Err(NO_TOKEN));
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
            Err(BAD_SIGNATURE)
        );
        // Each token fault is refused with its own reason.
        let tok = |c: serde_json::Value| sign_hs256(&c, KEY);
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"1"}"#);
        for (t, want) in [
            (tok(json!({"sub": "1", "exp": NOW - 100})), TOKEN_EXPIRED),
            (tok(json!({"sub": "1", "nbf": NOW + 100})), NOT_YET_VALID),
            (tok(json!({"exp": NOW + 100})), SUB_MISSING),
            (tok(json!({"sub": null})), SUB_MISSING),
            (tok(json!({"sub": 4.5})), SUB_MISSING),
            (
                tok(json!({"sub": "x".repeat(MAX_USER_ID_LEN + 1)})),
                BAD_USER,
            ),
            (format!("{none}.{body}"), ALG_NOT_ALLOWED),
            ("a.b.c".to_string(), MALFORMED_TOKEN),
        ] {
            let got = check(&req(&format!("/ws?token={t}"), &[]), &p, KEY, NOW);
            assert_eq!(got, Err(want), "{t}");
            assert_eq!(want.status, 401);
        }
    }

    #[test]
    fn an_integer_sub_is_the_same_user_as_its_string() {
        let p = policy(AuthMode::Jwt);
        for (sub, user) in [
            (json!(42), "42"),
            (json!(-7), "-7"),
            (json!(u64::MAX), "18446744073709551615"),
        ] {
            let t = sign_hs256(&json!({ "sub": sub }), KEY);
            let id = check(&req(&format!("/ws?token={t}"), &[]), &p, KEY, NOW).unwrap();
            assert_eq!(id.user, user);
            // The very user a notice with this userId goes to.
            let n = crate::notice::parse(json!({ "userId": sub }).to_string().as_bytes()).unwrap();
            assert_eq!(n.route, crate::notice::Route::User(user.into()));
        }
    }

    #[test]
    fn reasons_index_their_counters() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        let mut labels: Vec<&str> = Reason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reason::COUNT);
    }

    #[test]
    fn secrets_compare_by_content_only() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"token", b"Token"));
        assert!(!same_secret(b"token", b"token2"));
        assert!(!same_secret(b"token", b""));
        assert!(!same_secret(b"", b""));
        assert_eq!(
            format!("{:?}", Secret::new(b"hush".to_vec())),
            "Secret(4 bytes)"
        );
        let k = Keys::new(Secret::new(b"a".to_vec()));
        k.replace(Secret::new(b"b".to_vec()));
        assert_eq!(&k.current()[..], b"b");
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
            verify_hs256(&tok(json!({"sub": 42})), KEY, NOW).map(|c| c.sub),
            Ok("42".to_string())
        );
        assert_eq!(
            verify_hs256(&tok(json!({"sub": true})), KEY, NOW),
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
        assert_eq!(check(&req("/ws?user=", &[]), &p, KEY, NOW), Err(BAD_USER));
        assert_eq!(check(&req("/ws", &[]), &p, KEY, NOW), Err(NO_USER));
        let p = policy(AuthMode::Header);
        assert_eq!(
            check(&req("/ws", &[("x-user-id", "7")]), &p, KEY, NOW)
                .unwrap()
                .user,
            "7"
        );
        assert_eq!(check(&req("/ws", &[]), &p, KEY, NOW), Err(NO_USER));
    }
}
