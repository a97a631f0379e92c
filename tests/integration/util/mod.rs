//! The one toolkit every test file uses, so that no test carries its own
//! copy of a helper that could drift from the others: a private
//! redis-server (`redis`), the pushwire binary (`node`), a blocking
//! WebSocket client whose reads tell a close from a timeout (`client`),
//! and raw sockets for what a well-behaved client never sends (`raw`).
//! The constants every test shares, the watchdog and the small helpers
//! live here.
#![allow(dead_code)]

mod client;
mod node;
mod raw;
// Private, so that `use crate::util::*` does not shadow the `redis` crate.
mod redis;

pub use self::client::*;
pub use self::node::*;
pub use self::raw::*;
pub use self::redis::*;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The HS256 key of [`Node::with_redis`] and of [`token`].
pub const SECRET: &str = "test-secret";

/// The channel notices arrive on (the server's default `--channel`).
pub const CHANNEL: &str = "websocket:sendMsgTopic";

/// How long a test waits for something that should happen at once.
pub const T: Duration = Duration::from_secs(5);

/// The notice size limit (SPEC section 3).
pub const MIB: usize = 1 << 20;

/// Fails the test process if the guard is not dropped in time.
pub struct Watchdog(Arc<AtomicBool>);

pub fn watchdog(secs: u64) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let name = std::thread::current().name().unwrap_or("test").to_string();
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("WATCHDOG: {name} did not finish within {secs}s");
        std::process::exit(101);
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A loopback port nothing listens on, never handed out twice in this
/// process. Taken below the kernel's ephemeral range (32768 and up), so
/// that `bind(0)` elsewhere cannot pick it either: a test that kills its
/// Redis and restarts it on the same port must not find another test's
/// server there (bind(0) hands a just-freed port to the next caller, and
/// two tests then shared one Redis: events and presence of one showed up
/// in the other).
pub fn free_port() -> u16 {
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes of the suite running at once (nextest) start apart.
    let start = LOW + (std::process::id() % 1_000) * 20;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = (LOW + (NEXT.fetch_add(1, Ordering::SeqCst) - LOW) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Signs `claims` as an HS256 JWT. The tests' own signer, not the
/// server's: a mistake in the server's JWT code cannot cancel itself out
/// here, and `pushwire::auth` need not be public for the tests.
pub fn sign_hs256(claims: &serde_json::Value, key: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(signed.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{sig}")
}

/// An HS256 token for `user` signed with [`SECRET`].
pub fn token(user: &str, exp: Option<u64>) -> String {
    let mut claims = serde_json::json!({ "sub": user });
    if let Some(e) = exp {
        claims["exp"] = e.into();
    }
    sign_hs256(&claims, SECRET.as_bytes())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A valid notice of exactly `len` bytes: `fields` (for example
/// `"userId":"42"`), then a `pad` string field filling it up.
pub fn padded_notice(fields: &str, len: usize) -> String {
    let head = format!(r#"{{{fields},"pad":""#);
    let tail = r#""}"#;
    let s = format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()));
    assert_eq!(s.len(), len);
    s
}

/// xorshift: random-looking bytes without a crate.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "pushwire-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
