//! The client side of the WebSocket wire, written by hand.
//!
//! The upgrade request is fixed text (with the user in a JWT, the query or
//! a header), the 101 answer is checked by its status line and accept key,
//! and frames are parsed in place by the client loop with the helpers here.
//! A library client would cost more per connection than the server does,
//! and then the bench would measure itself.
//!
//! It only sends load to loopback addresses: a non-loopback URL is refused.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use mio::net::TcpStream;
use serde_json::json;
use sha2::Sha256;
use socket2::{Domain, Protocol, Socket, Type};

use crate::options::Auth;

/// Where connections go and how their upgrade request looks.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

pub fn parse_ws_url(u: &str) -> Result<Target, String> {
    let rest = u
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{u}: only ws:// URLs"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{u}: {e}"))?
        .next()
        .ok_or_else(|| format!("{u}: no address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{u}: this bench sends load to loopback addresses only"
        ));
    }
    Ok(Target {
        addr,
        host: hostport.to_string(),
        path: path.to_string(),
    })
}

pub fn check_loopback_url(u: &str, scheme: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix(scheme)
        .ok_or_else(|| format!("{u}: expected {scheme}..."))?;
    let hostport = rest.split('/').next().unwrap_or("");
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    let ok = hostport
        .to_socket_addrs()
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!("{u}: loopback addresses only"))
    }
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub const WS_ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

pub struct ClientCfg {
    pub targets: Vec<Target>,
    pub auth: Auth,
    pub secret: Vec<u8>,
    pub user_header: String,
    /// No WebSocket handshake: open once TCP connects (the `limit` scenario).
    pub raw: bool,
    pub timeout_ns: u64,
    /// Durable clients (SPEC 8): `since=` (or `since=<last id>`) on the URL.
    pub since: bool,
}

impl ClientCfg {
    pub fn request(&self, t: &Target, user: u32, last_id: &str) -> Vec<u8> {
        let mut path = t.path.clone();
        if self.since {
            let sep = if path.contains('?') { '&' } else { '?' };
            path.push_str(&format!("{sep}since={last_id}"));
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut extra = String::new();
        match self.auth {
            Auth::Jwt => {
                let exp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    + 86_400;
                let tok = sign_hs256(&json!({"sub": user.to_string(), "exp": exp}), &self.secret);
                path.push_str(&format!("{sep}token={tok}"));
            }
            Auth::Query => path.push_str(&format!("{sep}user={user}")),
            Auth::Header => extra = format!("{}: {user}\r\n", self.user_header),
        }
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
            t.host
        )
        .into_bytes()
    }
}

/// Signs claims as an HS256 JWT, the way the server's `auth::sign_hs256`
/// does (a copy of eight lines, so the bench needs no part of the server).
fn sign_hs256(claims: &serde_json::Value, key: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(signing.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing}.{sig}")
}

/// A non-blocking socket, bound to 127.0.0.`src` (port chosen at connect
/// time, so each source address has its own ephemeral port range), with
/// the connect started.
pub fn open_socket(addr: SocketAddr, src: u8) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    if let IpAddr::V4(ip) = addr.ip() {
        if ip.is_loopback() {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a c_int option on a socket we own.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let local = SocketAddr::new(Ipv4Addr::new(127, 0, 0, src).into(), 0);
            s.bind(&local.into())?;
        }
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

/// Source address for connection `i`: 127.0.0.2 ..= 127.0.0.250.
pub fn src_for(i: usize) -> u8 {
    (2 + i % 249) as u8
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The unsigned number after `key` (a string of digits in quotes counts).
pub fn json_num(p: &[u8], key: &[u8]) -> Option<u64> {
    let start = find(p, key)? + key.len();
    let mut v: u64 = 0;
    let mut any = false;
    for &b in &p[start..] {
        if b.is_ascii_digit() {
            v = v.wrapping_mul(10).wrapping_add((b - b'0') as u64);
            any = true;
        } else if b == b'"' && !any {
            continue;
        } else {
            break;
        }
    }
    any.then_some(v)
}

/// A client frame (masked), for control frames of up to 125 bytes.
pub fn masked_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(125);
    let mut f = Vec::with_capacity(6 + len);
    f.push(b0);
    f.push(0x80 | len as u8);
    f.extend_from_slice(&MASK);
    f.extend(
        payload[..len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ MASK[i % 4]),
    );
    f
}

pub fn short_err(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy must sign exactly as the server verifies; the expected token
    /// was made independently (Python's hmac and base64).
    #[test]
    fn signs_like_the_server() {
        assert_eq!(
            sign_hs256(&json!({"sub": "42"}), b"bench"),
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI0MiJ9.9MUDJ0_QnwAYgJmSItW0XCDUQatxsR2EhxAGiUQCkHo"
        );
    }

    #[test]
    fn loopback_only() {
        assert!(parse_ws_url("ws://127.0.0.1:8080/ws").is_ok());
        assert!(parse_ws_url("ws://10.0.0.1:8080/ws").is_err());
        assert!(check_loopback_url("redis://:pw@127.0.0.1:6379", "redis://").is_ok());
        assert!(check_loopback_url("redis://10.0.0.1:6379", "redis://").is_err());
    }
}
