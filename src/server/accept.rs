//! The listener side of loop 0: accept, spread the sockets over the loops,
//! survive running out of descriptors.
//!
//! We chose one acceptor over `SO_REUSEPORT` because it works the same with
//! a socket passed by systemd (one fd) and with port 0 in tests, and keeps
//! the connection limit and the EMFILE reserve in one place; accepting is
//! cheap next to the handshake, which runs on the owning loop. Sockets go
//! to the other loops on a queue of their own (not the notices' inbox), so
//! a burst of notices never costs an accepted client.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};

use crate::dispatch::{Accepted, LoopHandle};
use crate::metrics::Metrics;

/// Accepts per listener event before other work gets a turn.
const MAX_ACCEPTS_PER_PASS: usize = 256;
/// Pause after an accept error that retrying at once would not fix (EMFILE).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one accept-error line this often, however long the shortage.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Binds the WebSocket listener with a backlog fit for connection storms.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into()))
}

pub struct Acceptor {
    listener: TcpListener,
    loops: Arc<[LoopHandle]>,
    next_loop: usize,
    paused_until: Option<Instant>,
    last_warning: Option<Instant>,
    /// A spare descriptor, given up to accept-and-close when fds run out.
    reserve_fd: Option<std::fs::File>,
    stopped: bool,
}

impl Acceptor {
    pub fn new(listener: TcpListener, loops: Arc<[LoopHandle]>) -> Acceptor {
        Acceptor {
            listener,
            loops,
            next_loop: 0,
            paused_until: None,
            last_warning: None,
            reserve_fd: std::fs::File::open("/dev/null").ok(),
            stopped: false,
        }
    }

    /// When accepting resumes after a pause (an fd shortage, a capped pass).
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Stops accepting for good (the drain).
    pub fn stop(&mut self, registry: &mio::Registry) {
        let _ = registry.deregister(&mut self.listener);
        self.stopped = true;
        self.paused_until = None;
    }

    /// Accepts what is pending; sockets for loop `me` (and any another loop
    /// cannot take now) go to `keep`.
    pub fn accept(
        &mut self,
        me: u16,
        metrics: &Metrics,
        now: Instant,
        mut keep: impl FnMut(TcpStream, SocketAddr),
    ) {
        if self.stopped || self.paused_until.is_some_and(|p| now < p) {
            return;
        }
        self.paused_until = None;
        for _ in 0..MAX_ACCEPTS_PER_PASS {
            match self.listener.accept() {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    let target = self.next_loop % self.loops.len();
                    self.next_loop = self.next_loop.wrapping_add(1);
                    if target == me as usize {
                        keep(sock, peer);
                    } else if let Err(Accepted(sock, peer)) =
                        self.loops[target].hand_over(Accepted(sock, peer))
                    {
                        keep(sock, peer);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => return self.on_error(e, metrics, now),
            }
        }
        // Capped: come back on the next pass without waiting for an event.
        self.paused_until = Some(now);
    }

    fn on_error(&mut self, e: io::Error, metrics: &Metrics, now: Instant) {
        metrics.accept_errors.fetch_add(1, Ordering::Relaxed);
        // Out of descriptors: the pending connection stays queued and edge
        // triggering sends no new event, so retrying at once would spin.
        // Spend the reserve fd to accept and close one (the client learns
        // at once), then pause. Close every waiting client, one freed fd at
        // a time.
        if self.reserve_fd.take().is_some() {
            while let Ok((sock, _)) = self.listener.accept() {
                drop(sock);
                metrics.reject(crate::auth::Reason::Limit);
            }
        }
        // Reopen it (or retry a reserve lost to another thread).
        self.reserve_fd = std::fs::File::open("/dev/null").ok();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARNING_EVERY)
        {
            self.last_warning = Some(now);
            log::warn!("accept failed ({e}); refusing new connections and retrying every {ACCEPT_BACKOFF:?} (logged at most every {ACCEPT_WARNING_EVERY:?})");
        }
        self.paused_until = Some(now + ACCEPT_BACKOFF);
    }
}
