//! One connection's state machine: `Handshake -> Open -> Closing`.
//!
//! Every byte a connection sends goes through one ordered [`OutQueue`]:
//! notices as shared, pre-built frames (no copy per recipient), and
//! whatever tungstenite writes itself (pongs, close replies), because the
//! [`Io`] it writes into appends to that same queue instead of the socket.
//! So frames never interleave, the queue's size is exact (the slow-consumer
//! rule reads it), and several pending frames leave in one `writev`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use bytes::{Buf, Bytes};
use mio::net::TcpStream;
use tungstenite::protocol::WebSocket;

/// Most iovecs handed to one `writev` (Linux allows 1024); a burst of
/// notices leaves in a few calls per connection.
const MAX_IOVECS: usize = 256;

/// Outbound bytes of one connection, in order.
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    bytes: usize,
}

impl OutQueue {
    pub fn push(&mut self, b: Bytes) {
        self.bytes += b.len();
        self.chunks.push_back(b);
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Writes until the queue is empty (`Ok(true)`) or the socket would
    /// block (`Ok(false)`; the next WRITABLE event resumes). The loop ends
    /// because each pass either empties the queue or fills the socket.
    pub fn write_to(&mut self, sock: &mut TcpStream) -> io::Result<bool> {
        while let Some(front) = self.chunks.front() {
            let result = if self.chunks.len() == 1 {
                // The common case (one notice): no iovec array to fill.
                sock.write(front)
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let n = self.chunks.len().min(MAX_IOVECS);
                for (slot, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
                    *slot = IoSlice::new(chunk);
                }
                sock.write_vectored(&slices[..n])
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    self.bytes -= written;
                    while written > 0 {
                        let Some(front) = self.chunks.front_mut() else {
                            break;
                        };
                        if written >= front.len() {
                            written -= front.len();
                            self.chunks.pop_front();
                        } else {
                            front.advance(written);
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // A burst can leave a long ring behind; give it back once drained.
        if self.chunks.capacity() > 16 {
            self.chunks = VecDeque::new();
        }
        Ok(true)
    }
}

/// The stream tungstenite drives: reads come from the socket, writes go to
/// the connection's queue (they never block and never fail).
pub struct Io {
    pub sock: TcpStream,
    pub out: OutQueue,
    /// Set whenever a read returns bytes: the idle timer's evidence of life.
    pub got_bytes: bool,
}

impl Io {
    pub fn new(sock: TcpStream) -> Io {
        Io {
            sock,
            out: OutQueue::default(),
            got_bytes: false,
        }
    }

    /// Flushes the queue to the socket; see [`OutQueue::write_to`].
    pub fn flush_out(&mut self) -> io::Result<bool> {
        self.out.write_to(&mut self.sock)
    }

    pub fn shutdown_write(&self) {
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        if n > 0 {
            self.got_bytes = true;
        }
        Ok(n)
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push(Bytes::copy_from_slice(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub enum Phase {
    /// Reading the HTTP upgrade request.
    Handshake { io: Io, buf: Vec<u8> },
    Open {
        ws: Box<WebSocket<Io>>,
        user: Box<str>,
        /// Unix seconds of the token's `exp`.
        expires: Option<u64>,
    },
    /// The last bytes (a close frame or an HTTP refusal) are queued: flush
    /// them, half-close, and wait for the peer's EOF until `until`.
    Closing {
        io: Io,
        until: Instant,
        write_shut: bool,
    },
    /// Transient, while a phase is being moved out.
    Gone,
}

pub struct Conn {
    pub generation: u32,
    pub peer: SocketAddr,
    pub phase: Phase,
    pub since: Instant,
    pub last_rx: Instant,
    pub last_ping: Instant,
    /// Control frames seen from the client since the last tick.
    pub control_frames: u32,
    /// Queued for a flush at the end of this loop pass.
    pub dirty: bool,
}

impl Conn {
    pub fn io_mut(&mut self) -> Option<&mut Io> {
        match &mut self.phase {
            Phase::Handshake { io, .. } | Phase::Closing { io, .. } => Some(io),
            Phase::Open { ws, .. } => Some(ws.get_mut()),
            Phase::Gone => None,
        }
    }

    pub fn user(&self) -> Option<&str> {
        match &self.phase {
            Phase::Open { user, .. } => Some(user),
            _ => None,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
    }
}
