//! One connection's state machine: `Handshake -> Open -> Closing -> Done`.
//!
//! The connection reads and writes its own socket and changes its own
//! phase; each call returns a [`Step`] that names what the loop does next
//! (in the spirit of sozu's `SessionResult`). Policy (who may upgrade) and
//! the shared map of sessions stay with the loop: a transition that makes
//! a connection leave `Open` hands back the user, so the loop unregisters
//! it in one place.

mod durable;
mod out;
mod read;

use read::{discard_until_eof, read_request};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::TcpStream;
use tungstenite::handshake::server::Request;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

pub use durable::{intern_epoch, Durable, Recovery};
pub use out::{Io, OutQueue};

use crate::auth::{self, Refusal};
use crate::dispatch::Frames;
use crate::history::{ClientId, History};
use crate::notice;

/// Frames (or handshake reads) taken from one connection per event before
/// the others get a turn.
pub const MAX_READS_PER_PASS: usize = 32;
/// Largest HTTP upgrade request; a longer one is answered 431.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A client sending more control frames than this per tick is cut (1008).
const MAX_CONTROL_FRAMES_PER_TICK: u32 = 100;
/// How long a closing connection may take to flush and answer with EOF.
/// A frame still unfinished when it passes ends in a reset, never in a
/// clean end of stream.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

static PING: &[u8] = &[0x89, 0x00];

pub enum Phase {
    /// Reading the HTTP upgrade request.
    Handshake {
        io: Io,
        buf: Vec<u8>,
    },
    Open(Box<Open>),
    /// The last bytes (a close frame or an HTTP answer) are queued: flush
    /// them, half-close, and wait for the peer's EOF until `until`.
    Closing {
        io: Io,
        until: Instant,
        write_shut: bool,
    },
    /// Finished; the loop removes it. A transition leaves this behind only
    /// while it runs, so a panic inside one ends the connection.
    Done,
}

pub struct Open {
    pub ws: WebSocket<Io>,
    pub user: Box<str>,
    /// Unix seconds of the token's `exp`.
    pub expires: Option<u64>,
    /// Control frames seen from the client since the last tick.
    control_frames: u32,
    pub mode: Mode,
}

/// Which form of each notice a connection takes.
pub enum Mode {
    /// The published bytes, as they are (no `since` on the URL).
    Plain,
    /// Wrapped with their ids, recoverable (`since` on the URL).
    Durable(Box<Durable>),
}

/// What the loop decided for an upgrade it accepts.
pub struct Opening {
    /// The 101 response head.
    pub response: Vec<u8>,
    /// Bytes of the read buffer the request used (the rest are frames).
    pub used: usize,
    pub config: WebSocketConfig,
    pub identity: auth::Identity,
    pub mode: Mode,
    /// How much later than `--ping-interval` the first ping comes.
    pub first_ping: Duration,
}

/// What the loop does next with a connection.
#[derive(Debug)]
pub enum Step {
    /// Nothing until the next event.
    Continue,
    /// A read cap was hit: run again on the next pass, without an event.
    Again,
    /// A whole upgrade request (and how many bytes of the buffer it used):
    /// the loop decides between [`Conn::open`] and [`Conn::answer`].
    Request(Box<Request>, usize),
    /// Answer the handshake with this refusal.
    Refuse(Refusal),
    /// Close the open connection this way.
    Close(Close),
    /// The socket failed or the conversation is over: remove it.
    Gone,
}

/// How an open connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The peer closed; tungstenite already queued the answer.
    Answered,
    /// Send this code and reason behind what is queued.
    Code(u16, &'static str),
    /// Its queue passed `--max-queue-bytes`: drop the frames it has not
    /// started to receive, finish the one in flight, then 1008.
    SlowConsumer,
}

/// The outcome of queueing a frame for a connection.
pub enum Queued {
    Yes,
    /// The queue would pass `--max-queue-bytes`: a slow consumer to cut.
    Full,
    /// Handshaking or closing: not a recipient.
    NotOpen,
}

/// What a tick found due on one connection.
pub enum Due {
    Nothing,
    HandshakeTimeout,
    IdleTimeout,
    TokenExpired,
    /// A ping was queued: flush.
    Pinged,
    /// Closing took longer than its linger (or the drain limit).
    LingerOver,
}

/// The timers a tick checks.
pub struct Timers {
    pub handshake: Duration,
    pub idle: Duration,
    pub ping: Duration,
    /// Unix seconds, for token expiry.
    pub unix_now: u64,
}

pub struct Conn {
    pub generation: u32,
    pub peer: SocketAddr,
    pub phase: Phase,
    pub since: Instant,
    pub last_rx: Instant,
    pub last_ping: Instant,
    /// Queued for a flush at the end of this loop pass.
    pub dirty: bool,
}

impl Conn {
    pub fn new(sock: TcpStream, peer: SocketAddr, generation: u32, now: Instant) -> Conn {
        Conn {
            generation,
            peer,
            phase: Phase::Handshake {
                io: Io::new(sock),
                buf: Vec::new(),
            },
            since: now,
            last_rx: now,
            last_ping: now,
            dirty: false,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    pub fn label(&self, slot: usize) -> String {
        format!("{slot}.{}", self.generation)
    }

    fn io_mut(&mut self) -> Option<&mut Io> {
        match &mut self.phase {
            Phase::Handshake { io, .. } | Phase::Closing { io, .. } => Some(io),
            Phase::Open(o) => Some(o.ws.get_mut()),
            Phase::Done => None,
        }
    }

    /// Reads what the socket has, as the phase reads it.
    pub fn read(&mut self, now: Instant) -> Step {
        match &mut self.phase {
            Phase::Handshake { io, buf } => read_request(io, buf),
            Phase::Open(open) => {
                let step = open.read_frames();
                let io = open.ws.get_mut();
                if std::mem::take(&mut io.got_bytes) {
                    self.last_rx = now;
                }
                step
            }
            Phase::Closing { io, .. } => discard_until_eof(io),
            Phase::Done => Step::Gone,
        }
    }

    /// Handshake -> Open: queues the 101 `response` head, and the frames
    /// that came right behind the request stay buffered for the next read.
    /// `false` (and nothing changed) when the connection is not handshaking.
    pub fn open(&mut self, o: Opening, now: Instant) -> bool {
        let Opening {
            response,
            used,
            config,
            identity,
            mode,
            first_ping,
        } = o;
        let Phase::Handshake { mut io, buf } =
            self.take_phase_if(|p| matches!(p, Phase::Handshake { .. }))
        else {
            return false;
        };
        io.out.push(Bytes::from(response));
        let rest = buf.get(used..).map(<[u8]>::to_vec).unwrap_or_default();
        let ws = WebSocket::from_partially_read(io, rest, Role::Server, Some(config));
        self.phase = Phase::Open(Box::new(Open {
            ws,
            user: identity.user.into(),
            expires: identity.expires,
            control_frames: 0,
            mode,
        }));
        self.last_rx = now;
        // The first ping comes `first_ping` later than the interval, so that
        // connections opened together are not all pinged in the same tick.
        self.last_ping = now + first_ping;
        true
    }

    /// Handshake -> Closing with a plain HTTP answer (a refusal, the demo
    /// page). `false` when the connection is not handshaking.
    pub fn answer(&mut self, status: u16, content_type: &str, body: &[u8], now: Instant) -> bool {
        let Phase::Handshake { mut io, .. } =
            self.take_phase_if(|p| matches!(p, Phase::Handshake { .. }))
        else {
            return false;
        };
        let reason = crate::http::reason_phrase(status);
        let mut head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            body.len()
        );
        if status == 503 {
            head.push_str("Retry-After: 5\r\n");
        }
        head.push_str("\r\n");
        io.out.push(Bytes::from(head));
        io.out.push(Bytes::copy_from_slice(body));
        self.phase = Phase::Closing {
            io,
            until: now + CLOSE_LINGER,
            write_shut: false,
        };
        true
    }

    /// Open -> Closing. Returns the user who left and whether it used
    /// `since`, for the loop to unregister; `None` (and nothing changed)
    /// when it was not open.
    pub fn close(&mut self, how: Close, now: Instant) -> Option<(Box<str>, bool)> {
        let Phase::Open(open) = self.take_phase_if(|p| matches!(p, Phase::Open(_))) else {
            return None;
        };
        let Open { ws, user, mode, .. } = *open;
        let durable = matches!(mode, Mode::Durable(_));
        let mut io = ws.into_inner();
        match how {
            Close::Answered => {}
            Close::Code(code, reason) => io.out.push(notice::close_frame(code, reason)),
            Close::SlowConsumer => {
                io.out.keep_frame_in_flight();
                io.out.push(notice::close_frame(1008, "slow consumer"));
            }
        }
        self.phase = Phase::Closing {
            io,
            until: now + CLOSE_LINGER,
            write_shut: false,
        };
        Some((user, durable))
    }

    /// Moves the phase out when `want` says it is the expected one;
    /// otherwise leaves it in place and returns `Done`.
    fn take_phase_if(&mut self, want: impl Fn(&Phase) -> bool) -> Phase {
        if want(&self.phase) {
            std::mem::replace(&mut self.phase, Phase::Done)
        } else {
            Phase::Done
        }
    }

    /// Queues a notice for an open connection, in the form it takes. A
    /// frame always fits an empty queue, so a notice up to the 1 MiB notice
    /// limit reaches a client that keeps up, whatever `max`.
    pub fn queue(&mut self, frames: &Frames, max: usize) -> Queued {
        let Phase::Open(open) = &mut self.phase else {
            return Queued::NotOpen;
        };
        let out = &mut open.ws.get_mut().out;
        match &mut open.mode {
            Mode::Plain => push_limited(out, &frames.plain, max),
            Mode::Durable(d) => d.queue(out, frames, max),
        }
    }

    /// Queues bytes (a batch of plain frames, the resync notice) for an
    /// open connection without `since`.
    pub fn queue_plain(&mut self, frame: &Bytes, max: usize) -> Queued {
        match &mut self.phase {
            Phase::Open(open) if matches!(open.mode, Mode::Plain) => {
                push_limited(&mut open.ws.get_mut().out, frame, max)
            }
            _ => Queued::NotOpen,
        }
    }

    /// The durable state of an open connection that uses `since`.
    pub fn durable(&mut self) -> Option<&mut Durable> {
        match &mut self.phase {
            Phase::Open(open) => match &mut open.mode {
                Mode::Durable(d) => Some(d),
                Mode::Plain => None,
            },
            _ => None,
        }
    }

    /// Ends a recovery with its answer; see [`Durable::finish`].
    pub fn finish_recovery(&mut self, history: Option<History>) -> Option<Recovery> {
        let Phase::Open(open) = &mut self.phase else {
            return None;
        };
        let Mode::Durable(d) = &mut open.mode else {
            return None;
        };
        d.finish(&mut open.ws.get_mut().out, history)
    }

    /// Who an open connection is and where it would recover from.
    pub fn recovery_point(&mut self) -> Option<(Box<str>, Option<ClientId>)> {
        let Phase::Open(open) = &mut self.phase else {
            return None;
        };
        let Mode::Durable(d) = &mut open.mode else {
            return None;
        };
        Some((open.user.clone(), d.begin_recovery()))
    }

    /// Writes the queue; a closing connection whose queue is empty
    /// half-closes. `Step::Gone` when the socket failed.
    pub fn flush(&mut self) -> Step {
        let Some(io) = self.io_mut() else {
            return Step::Gone;
        };
        match io.flush_out() {
            Ok(true) => {
                if let Phase::Closing { io, write_shut, .. } = &mut self.phase {
                    if !*write_shut {
                        io.shutdown_write();
                        *write_shut = true;
                    }
                }
                Step::Continue
            }
            Ok(false) => Step::Continue,
            Err(_) => Step::Gone,
        }
    }

    /// Checks the connection's timers; queues a ping when one is due.
    pub fn tick(&mut self, now: Instant, t: &Timers) -> Due {
        match &mut self.phase {
            Phase::Handshake { .. } if now.duration_since(self.since) >= t.handshake => {
                Due::HandshakeTimeout
            }
            Phase::Handshake { .. } => Due::Nothing,
            Phase::Open(open) => {
                open.control_frames = 0;
                if now.duration_since(self.last_rx) >= t.idle {
                    Due::IdleTimeout
                } else if open
                    .expires
                    .is_some_and(|e| t.unix_now > e.saturating_add(auth::LEEWAY_SECS))
                {
                    Due::TokenExpired
                } else if now.duration_since(self.last_rx.max(self.last_ping)) >= t.ping {
                    open.ws.get_mut().out.push(Bytes::from_static(PING));
                    self.last_ping = now;
                    Due::Pinged
                } else {
                    Due::Nothing
                }
            }
            Phase::Closing { io, until, .. } if now >= *until => {
                if !io.out.is_empty() {
                    io.reset_on_close();
                }
                Due::LingerOver
            }
            Phase::Closing { .. } => Due::Nothing,
            Phase::Done => Due::LingerOver,
        }
    }

    /// Lets a closing connection linger at least until `until` (the drain).
    pub fn linger_until(&mut self, until: Instant) {
        if let Phase::Closing { until: u, .. } = &mut self.phase {
            *u = (*u).max(until);
        }
    }

    /// The user of an open connection, and whether it uses `since` (for
    /// the loop's bookkeeping when it removes one).
    pub fn open_user(&self) -> Option<(&str, bool)> {
        match &self.phase {
            Phase::Open(o) => Some((&o.user, matches!(o.mode, Mode::Durable(_)))),
            _ => None,
        }
    }
}

/// Pushes unless the queue would pass `max` (a frame always fits an empty
/// queue).
fn push_limited(out: &mut OutQueue, frame: &Bytes, max: usize) -> Queued {
    if !out.is_empty() && out.len() + frame.len() > max {
        return Queued::Full;
    }
    out.push(frame.clone());
    Queued::Yes
}
