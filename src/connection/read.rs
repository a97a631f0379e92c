//! Reading, phase by phase: the upgrade request, frames of an open
//! connection (each read loop capped), and what a closing peer still sends.

use std::io::{self, Read};

use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::machine::TryParse;
use tungstenite::handshake::server::Request;
use tungstenite::protocol::Message;

use super::{
    Close, Io, Open, Step, MAX_CONTROL_FRAMES_PER_TICK, MAX_READS_PER_PASS, MAX_REQUEST_BYTES,
};
use crate::auth;

impl Open {
    pub(super) fn read_frames(&mut self) -> Step {
        let mut step = Step::Again;
        for _ in 0..MAX_READS_PER_PASS {
            match self.ws.read() {
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => self.control_frames += 1,
                // Debug builds only: lets the test suite prove that a panic
                // is contained and that a stalled loop's inbox overflows
                // safely. Release builds have no such hooks.
                #[cfg(debug_assertions)]
                Ok(Message::Text(t)) if std::env::var_os("PUSHWIRE_TEST_HOOKS").is_some() => {
                    match t.as_str() {
                        "__pushwire_test_panic__" => panic!("test panic requested by the client"),
                        "__pushwire_test_stall__" => {
                            std::thread::sleep(std::time::Duration::from_secs(3))
                        }
                        _ => {}
                    }
                }
                Ok(Message::Close(_)) => {
                    step = Step::Close(Close::Answered);
                    break;
                }
                Ok(_) => {}
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    step = Step::Continue;
                    break;
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => {
                    step = Step::Close(Close::Answered);
                    break;
                }
                Err(WsError::Capacity(_)) => {
                    step = Step::Close(Close::Code(1009, "message too big"));
                    break;
                }
                Err(WsError::Utf8(_)) => {
                    step = Step::Close(Close::Code(1007, "invalid UTF-8"));
                    break;
                }
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                    step = Step::Gone;
                    break;
                }
                Err(WsError::Protocol(_)) => {
                    step = Step::Close(Close::Code(1002, "protocol error"));
                    break;
                }
                Err(_) => {
                    step = Step::Gone;
                    break;
                }
            }
        }
        // Pongs and close replies tungstenite queued go to our queue (they
        // never block there).
        let _ = self.ws.flush();
        if self.control_frames > MAX_CONTROL_FRAMES_PER_TICK
            && matches!(step, Step::Continue | Step::Again)
        {
            step = Step::Close(Close::Code(1008, "too many control frames"));
        }
        step
    }
}

/// Reads the upgrade request until it is whole, too large, or the socket
/// has nothing more.
pub(super) fn read_request(io: &mut Io, buf: &mut Vec<u8>) -> Step {
    let mut chunk = [0u8; 2048];
    let mut capped = true;
    let mut eof = false;
    for _ in 0..MAX_READS_PER_PASS {
        match io.sock.read(&mut chunk) {
            Ok(0) => {
                // A request followed by a half-close still gets its answer.
                eof = true;
                capped = false;
                break;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_REQUEST_BYTES {
                    return Step::Refuse(auth::TOO_LARGE);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                capped = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Gone,
        }
    }
    match Request::try_parse(buf) {
        Ok(Some((used, req))) => Step::Request(Box::new(req), used),
        Ok(None) if eof => Step::Gone,
        Ok(None) if capped => Step::Again,
        Ok(None) => Step::Continue,
        Err(WsError::Protocol(ProtocolError::WrongHttpMethod)) => Step::Refuse(auth::METHOD),
        Err(_) => Step::Refuse(auth::NOT_UPGRADE),
    }
}

/// A closing connection discards what the peer still sends; EOF means done.
pub(super) fn discard_until_eof(io: &mut Io) -> Step {
    let mut scratch = [0u8; 1024];
    for _ in 0..MAX_READS_PER_PASS {
        match io.sock.read(&mut scratch) {
            Ok(0) => return Step::Gone,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Gone,
        }
    }
    Step::Again
}
