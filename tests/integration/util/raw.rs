//! Raw sockets, for what a well-behaved client never does: upgrades read
//! byte by byte, hand-made frames (unmasked, reserved bits, huge declared
//! lengths), server frames read one by one, raw HTTP, and a TCP proxy
//! that can turn its links into black holes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::T;

/// A raw TCP connection to `addr`, with a receive buffer of `rcvbuf` bytes
/// set before connecting (so the advertised window stays small), if given.
pub fn raw_connect(addr: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    s.connect_timeout(&addr.into(), T).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    s
}

/// Sends a WebSocket upgrade on a raw stream and reads the answer up to the
/// end of its head, byte by byte (no frame behind it is consumed). Returns
/// the status, or 0 when the peer closed (or stayed silent) instead.
pub fn raw_upgrade_on(s: &mut TcpStream, path_and_query: &str) -> u16 {
    let req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return 0,
        }
    }
    parse_response(&head).0
}

/// A raw, upgraded WebSocket connection.
pub fn raw_ws(addr: SocketAddr, path_and_query: &str, rcvbuf: Option<usize>) -> TcpStream {
    let mut s = raw_connect(addr, rcvbuf);
    let status = raw_upgrade_on(&mut s, path_and_query);
    assert_eq!(status, 101, "raw upgrade of {path_and_query}");
    s
}

/// A client frame. `first` is FIN/RSV/opcode; the payload is masked with a
/// fixed key unless `masked` is false; `declared` overrides the length.
pub fn frame(first: u8, payload: &[u8], masked: bool, declared: Option<u64>) -> Vec<u8> {
    let len = declared.unwrap_or(payload.len() as u64);
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut f = vec![first];
    if len < 126 {
        f.push(mask_bit | len as u8);
    } else if len <= u16::MAX as u64 {
        f.push(mask_bit | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(mask_bit | 127);
        f.extend_from_slice(&len.to_be_bytes());
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// A masked, final frame.
pub fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    frame(first, payload, true, None)
}

/// One server frame: (first byte, payload); `Err` holds the I/O error kind
/// (`UnexpectedEof` for a clean end of stream).
pub fn read_server_frame(s: &mut impl Read) -> Result<(u8, Vec<u8>), std::io::ErrorKind> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).map_err(|e| e.kind())?;
    assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).map_err(|e| e.kind())?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).map_err(|e| e.kind())?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).map_err(|e| e.kind())?;
    Ok((h[0], p))
}

/// How a raw connection ended.
#[derive(Debug, Default)]
pub struct Ending {
    pub texts: usize,
    pub pings: usize,
    pub pongs: usize,
    /// The close frame's code, when one came.
    pub close_code: Option<u16>,
    /// EOF or reset within the time allowed.
    pub ended: bool,
    /// How long until the end (or the timeout).
    pub after: Duration,
}

/// Reads server frames until the stream ends or `timeout` passes.
pub fn read_until_end(s: &mut TcpStream, timeout: Duration) -> Ending {
    let t0 = Instant::now();
    let until = t0 + timeout;
    let mut e = Ending::default();
    let mut r = std::io::BufReader::with_capacity(64 * 1024, s.try_clone().unwrap());
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match read_server_frame(&mut r) {
            Ok((first, p)) => match first & 0x0f {
                0x1 => e.texts += 1,
                0x9 => e.pings += 1,
                0xA => e.pongs += 1,
                0x8 => e.close_code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])),
                _ => {}
            },
            Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(_) => {
                e.ended = true;
                break;
            }
        }
    }
    e.after = t0.elapsed();
    e
}

/// Waits for the peer to close a raw stream, discarding what it sends;
/// returns how long that took, or `None` at the timeout.
pub fn wait_closed(s: &mut TcpStream, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(t0.elapsed()),
        }
    }
}

/// Writes `bytes` (ignoring a server that stops listening) and returns
/// the HTTP status answered (0: none, dropped). The socket is not
/// half-closed: the server drops a request followed by EOF unanswered.
pub fn send_garbage(addr: SocketAddr, bytes: &[u8]) -> u16 {
    let mut s = raw_connect(addr, None);
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    parse_response(&buf).0
}

/// Sends a raw HTTP request and returns the status and body.
pub fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    parse_response(http_raw(addr, request).as_bytes())
}

/// The status and body of an HTTP response (status 0 when there is none).
pub fn parse_response(buf: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends a raw HTTP request and returns the whole response as text.
pub fn http_raw(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before the whole request is written.
    let _ = s.write_all(request.as_ref());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}

/// The value of a response header (case-insensitive name), from [`http_raw`] text.
pub fn header_value(response: &str, name: &str) -> Option<String> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// A TCP forwarder in front of a port that can turn the connections it
/// already carries into black holes (a half-open link: nothing comes
/// through, nothing is closed) while new connections pass.
pub struct Proxy {
    pub port: u16,
    accepted: Arc<AtomicU64>,
    frozen_up_to: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let frozen_up_to = Arc::new(AtomicU64::new(0));
        let (a, f) = (accepted.clone(), frozen_up_to.clone());
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                let id = a.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (from, to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || pump(id, from, to, &f));
                }
            }
        });
        Proxy {
            port,
            accepted,
            frozen_up_to,
        }
    }

    /// From now on, every connection accepted so far forwards nothing.
    pub fn freeze_existing(&self) {
        self.frozen_up_to
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

fn pump(id: u64, mut from: TcpStream, mut to: TcpStream, frozen_up_to: &AtomicU64) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                if id <= frozen_up_to.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
