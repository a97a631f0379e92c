//! A connection's outbound bytes and the stream tungstenite drives.
//!
//! Every byte a connection sends goes through one ordered [`OutQueue`]:
//! notices as shared, pre-built frames (no copy per recipient), and
//! whatever tungstenite writes itself (pongs, close replies), because the
//! [`Io`] it writes into appends to that same queue instead of the socket.
//! So frames never interleave, the queue's size is exact (the slow-consumer
//! rule reads it), and several pending frames leave in one `writev`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use bytes::Bytes;
use mio::net::TcpStream;

/// Most iovecs handed to one `writev` (Linux allows 1024); a burst of
/// notices leaves in a few calls per connection.
const MAX_IOVECS: usize = 256;

/// Outbound bytes of one connection, in order. The front chunk is kept
/// whole, with how much of it is written, so that the frame in flight can
/// be found when the rest is dropped (a slow consumer's cut).
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    /// Bytes queued and not yet written.
    bytes: usize,
    /// Bytes of the front chunk already written.
    front_sent: usize,
}

impl OutQueue {
    pub fn push(&mut self, b: Bytes) {
        self.bytes += b.len();
        self.chunks.push_back(b);
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    /// The queued frames, for tests.
    #[cfg(test)]
    pub fn frames(&self) -> Vec<Bytes> {
        self.chunks.iter().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Drops every queued frame the peer has not started to receive and
    /// keeps the one in flight, so that what follows (a close frame) comes
    /// right behind a whole frame. Only for queues that hold WebSocket
    /// frames end to end (an open connection's).
    pub fn keep_frame_in_flight(&mut self) {
        let Some(front) = self.chunks.front() else {
            return;
        };
        if self.front_sent == 0 {
            self.chunks.clear();
            self.bytes = 0;
            return;
        }
        // A chunk is one frame or several joined (a broadcast batch): walk
        // the headers to the frame that holds the first unsent byte.
        let mut pos = 0;
        let mut keep = front.len();
        while let Some(len) = frame_len(&front[pos..]) {
            if pos == self.front_sent {
                // On a boundary: the next frame has not started.
                keep = pos;
                break;
            }
            if pos + len > self.front_sent {
                keep = (pos + len).min(front.len());
                break;
            }
            pos += len;
        }
        let front = front.slice(..keep);
        self.chunks.clear();
        if keep <= self.front_sent {
            self.bytes = 0;
            self.front_sent = 0;
            return;
        }
        self.bytes = front.len() - self.front_sent;
        self.chunks.push_back(front);
    }

    /// Writes until the queue is empty (`Ok(true)`) or the socket would
    /// block (`Ok(false)`; the next WRITABLE event resumes). The loop ends
    /// because each pass either empties the queue or fills the socket.
    pub fn write_to(&mut self, sock: &mut TcpStream) -> io::Result<bool> {
        while let Some(front) = self.chunks.front() {
            let result = if self.chunks.len() == 1 {
                // The common case (one notice): no iovec array to fill.
                sock.write(&front[self.front_sent..])
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let n = self.chunks.len().min(MAX_IOVECS);
                for (i, (slot, chunk)) in slices.iter_mut().zip(self.chunks.iter()).enumerate() {
                    let from = if i == 0 { self.front_sent } else { 0 };
                    *slot = IoSlice::new(&chunk[from..]);
                }
                sock.write_vectored(&slices[..n])
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.consume(written),
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

    fn consume(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.len() - self.front_sent;
            if written >= left {
                written -= left;
                self.chunks.pop_front();
                self.front_sent = 0;
            } else {
                self.front_sent += written;
                written = 0;
            }
        }
    }
}

/// The length of the unmasked-or-masked WebSocket frame at the start of
/// `b`, header included; `None` when `b` does not hold a whole header.
fn frame_len(b: &[u8]) -> Option<usize> {
    let (&b1, rest) = b.get(1).map(|x| (x, &b[2..]))?;
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (header, payload) = match b1 & 0x7f {
        126 => (
            4,
            u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize,
        ),
        127 => (
            10,
            usize::try_from(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)).ok()?,
        ),
        n => (2, n as usize),
    };
    Some(header + mask + payload)
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

    /// Makes the coming close a reset: a peer must never take a frame cut
    /// short followed by a clean end of stream for a whole conversation.
    pub fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.sock).set_linger(Some(Duration::ZERO));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notice::text_frame;

    #[test]
    fn frame_len_reads_every_header_form() {
        assert_eq!(frame_len(&text_frame(b"hi")), Some(4));
        assert_eq!(frame_len(&text_frame(&[b'a'; 300])), Some(304));
        assert_eq!(frame_len(&text_frame(&[b'a'; 70_000])), Some(70_010));
        assert_eq!(frame_len(&[0x81]), None);
        assert_eq!(frame_len(&[0x81, 0xfe, 0x01]), None);
    }

    #[test]
    fn keep_frame_in_flight_keeps_only_the_started_frame() {
        let a = text_frame(&[b'a'; 10]);
        let b = text_frame(&[b'b'; 10]);
        let c = text_frame(&[b'c'; 10]);
        let mut joined = a.to_vec();
        joined.extend_from_slice(&b);
        let mut q = OutQueue::default();
        q.push(Bytes::from(joined));
        q.push(c.clone());
        // 15 bytes written: inside b (a is 12 bytes long).
        q.consume(15);
        q.keep_frame_in_flight();
        assert_eq!(q.len(), 24 - 15);
        assert_eq!(q.chunks.len(), 1);
        // Nothing started: everything goes.
        let mut q = OutQueue::default();
        q.push(a);
        q.push(c);
        q.keep_frame_in_flight();
        assert!(q.is_empty());
    }
}
