//! A blocking tungstenite client. Its reads never let a closed or broken
//! connection pass for a quiet one: [`Client::recv`] says which of the
//! four things happened, [`Client::recv_text`] returns `None` only for a
//! timeout (and fails the test on a close or an error), and
//! [`Client::expect_nothing`] fails on anything but silence.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use super::T;

pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

/// What a refused upgrade answered.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
}

/// What one read of a [`Client`] came to. Pings and pongs are skipped
/// (tungstenite answers pings by itself).
#[derive(Debug, Clone, PartialEq)]
pub enum Recv {
    /// A text frame.
    Text(String),
    /// Nothing but control frames within the time allowed; still open.
    Timeout,
    /// A close frame came, with this code (1005 when it carried none).
    Closed(u16),
    /// The stream failed or ended without a close frame, or the
    /// connection was already closed.
    Failed(String),
}

impl Client {
    pub fn connect(url: &str) -> Result<Client, Refused> {
        Self::connect_with(url, &[])
    }

    pub fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Client, Refused> {
        use tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let host = req.uri().host().unwrap().to_string();
        let port = req.uri().port_u16().unwrap();
        let stream = TcpStream::connect((host.as_str(), port)).unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        match tungstenite::client::client(req, MaybeTlsStream::Plain(stream)) {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                Err(Refused {
                    status: resp.status().as_u16(),
                })
            }
            Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
        }
    }

    fn set_timeout(&mut self, t: Duration) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(t)).unwrap();
        }
    }

    /// The next text frame, close or failure within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Recv {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Recv::Timeout;
            }
            self.set_timeout(left);
            match self.ws.read() {
                Ok(Message::Text(t)) => return Recv::Text(t.to_string()),
                Ok(Message::Close(Some(f))) => return Recv::Closed(u16::from(f.code)),
                Ok(Message::Close(None)) => return Recv::Closed(u16::from(CloseCode::Status)),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Recv::Timeout
                }
                Err(e) => return Recv::Failed(e.to_string()),
            }
        }
    }

    /// The next text frame within `timeout`, `None` when none came in time.
    /// A close or a failure fails the test: use [`Client::recv`] or
    /// [`Client::recv_close`] where one is expected.
    #[track_caller]
    pub fn recv_text(&mut self, timeout: Duration) -> Option<String> {
        match self.recv(timeout) {
            Recv::Text(t) => Some(t),
            Recv::Timeout => None,
            other => panic!("waiting for a text frame, the connection ended: {other:?}"),
        }
    }

    /// Reads until a close frame arrives (skipping text frames); returns its
    /// code, or `None` at the timeout or when the stream ended without one.
    pub fn recv_close(&mut self, timeout: Duration) -> Option<u16> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Recv::Text(_) => continue,
                Recv::Closed(code) => return Some(code),
                Recv::Timeout | Recv::Failed(_) => return None,
            }
        }
    }

    /// Asserts that the connection stays open and quiet (control frames
    /// aside) for `d`: a text frame, a close or a failure fails the test.
    #[track_caller]
    pub fn expect_nothing(&mut self, d: Duration) {
        match self.recv(d) {
            Recv::Timeout => {}
            Recv::Text(t) => panic!("unexpected notice: {t}"),
            other => panic!("expected an open, quiet connection: {other:?}"),
        }
    }

    /// Sends a text frame (a [`super::PANIC_HOOK`] or [`super::STALL_HOOK`]).
    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap();
    }
}
