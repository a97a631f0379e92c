//! The hand-offs between threads: deliveries from the threads that receive
//! notices (the Redis subscriber, the admin listener) to the loops that own
//! the sockets, and accepted sockets from the acceptor to the other loops.
//! Messages carry connection ids, never sockets of an open connection.
//!
//! # Every queue, and what it does when full
//!
//! | queue | bound | when full |
//! |---|---|---|
//! | a loop's inbox (deliveries) | [`INBOX_CAPACITY`] messages | the delivery is dropped for that loop and counted in `pushwire_notices_dropped_total`; the sender never waits (a subscriber that blocked would let Redis cut it and lose everything) |
//! | a loop's accept queue | [`ACCEPT_CAPACITY`] sockets | the acceptor keeps the socket and serves it on its own loop: a burst of notices can never cost an accepted client |
//! | a connection's out queue | `--max-queue-bytes` | the connection is cut as a slow consumer (1008), see `connection` |
//! | the admin listener | 16 requests at once | 503 `busy` |
//!
//! Wakes are coalesced with a flag, so a burst of notices costs one eventfd
//! write per loop, not one per notice.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use crate::metrics::Metrics;
use crate::notice::{Notice, NoticeError, Route};
use crate::sessions::Sessions;

/// Bound of each loop's inbox, in messages. The channel is crossbeam's
/// list flavour, which allocates as it fills (the array flavour would keep
/// all of its slots resident, 1 MiB per loop, on an idle server), capped
/// by a counter: a capped queue, not an unbounded one.
pub const INBOX_CAPACITY: usize = 16_384;
/// Bound of each loop's queue of sockets accepted for it by loop 0.
pub const ACCEPT_CAPACITY: usize = 1024;

/// Deliveries a loop finds in its inbox.
pub enum Inbox {
    /// One frame for some of this loop's connections: (slot, generation).
    To(Bytes, Vec<(u32, u32)>),
    /// One frame for every open connection of this loop.
    All(Bytes),
}

/// A socket accepted by loop 0 for another loop to own.
pub struct Accepted(pub mio::net::TcpStream, pub SocketAddr);

/// How other threads reach one loop.
pub struct LoopHandle {
    inbox: Sender<Inbox>,
    accept: Sender<Accepted>,
    waker: mio::Waker,
    wake_pending: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
    heartbeat: Arc<AtomicU64>,
}

/// The loop's own end of its queues, given to it at creation.
#[derive(Clone)]
pub struct LoopEnd {
    inbox: Receiver<Inbox>,
    accept: Receiver<Accepted>,
    wake_pending: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
    heartbeat: Arc<AtomicU64>,
}

/// Both ends of one loop's queues; `waker` is registered on the loop's poll.
pub fn loop_channel(
    registry: &mio::Registry,
    waker: mio::Token,
) -> io::Result<(LoopHandle, LoopEnd)> {
    let waker = mio::Waker::new(registry, waker)?;
    let (inbox_tx, inbox_rx) = crossbeam_channel::unbounded();
    let (accept_tx, accept_rx) = crossbeam_channel::bounded(ACCEPT_CAPACITY);
    let wake_pending = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let heartbeat = Arc::new(AtomicU64::new(0));
    Ok((
        LoopHandle {
            inbox: inbox_tx,
            accept: accept_tx,
            waker,
            wake_pending: wake_pending.clone(),
            queued: queued.clone(),
            heartbeat: heartbeat.clone(),
        },
        LoopEnd {
            inbox: inbox_rx,
            accept: accept_rx,
            wake_pending,
            queued,
            heartbeat,
        },
    ))
}

impl LoopHandle {
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }

    /// Queues without waiting; hands the message back when the inbox is full.
    pub fn send(&self, msg: Inbox) -> Result<(), Inbox> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= INBOX_CAPACITY {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.wake();
            return Err(msg);
        }
        // The list flavour is never full; it fails only once the loop is gone.
        match self.inbox.send(msg) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Err(e.into_inner())
            }
        }
    }

    /// Hands an accepted socket to this loop; gives it back when full.
    pub fn hand_over(&self, a: Accepted) -> Result<(), Accepted> {
        match self.accept.try_send(a) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    /// `Status::now_ms` at the loop's last pass, for the watchdogs.
    pub fn heartbeat(&self) -> u64 {
        self.heartbeat.load(Ordering::Relaxed)
    }
}

impl LoopEnd {
    pub fn beat(&self, now_ms: u64) {
        self.heartbeat.store(now_ms, Ordering::Relaxed);
    }

    /// Called before draining: a wake sent from now on is a new one.
    pub fn clear_wake(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }

    pub fn is_empty(&self) -> bool {
        self.inbox.is_empty()
    }

    /// What is queued now, not what arrives while it is handled.
    pub fn drain(&self) -> impl Iterator<Item = Inbox> + '_ {
        let n = self.inbox.len();
        self.inbox.try_iter().take(n).inspect(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        })
    }

    pub fn accepted(&self) -> impl Iterator<Item = Accepted> + '_ {
        let n = self.accept.len();
        self.accept.try_iter().take(n)
    }
}

/// What the subscriber and the admin listener deliver through: the loops,
/// the map of who is where, and the counters.
#[derive(Clone)]
pub struct Delivery {
    loops: Arc<[LoopHandle]>,
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
}

impl Delivery {
    pub fn new(loops: Arc<[LoopHandle]>, sessions: Arc<Sessions>, metrics: Arc<Metrics>) -> Self {
        Delivery {
            loops,
            sessions,
            metrics,
        }
    }

    pub fn loops(&self) -> &[LoopHandle] {
        &self.loops
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn dropped(&self, n: usize) {
        self.metrics
            .notices_dropped
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Hands one notice to the loops holding its recipients. Returns how
    /// many connections it was queued for.
    pub fn deliver(&self, notice: &Notice) -> usize {
        let users: &mut dyn Iterator<Item = &str> = match &notice.route {
            Route::Broadcast => return self.broadcast_frame(notice.frame.clone()),
            Route::User(u) => &mut std::iter::once(&**u),
            Route::Users(list) => &mut list.iter().map(|u| &**u),
        };
        let mut targets: Vec<Vec<(u32, u32)>> = vec![Vec::new(); self.loops.len()];
        self.sessions.for_each(users, |c| {
            if let Some(t) = targets.get_mut(c.worker as usize) {
                t.push((c.slot, c.generation));
            }
        });
        let mut queued = 0;
        for (l, conns) in self.loops.iter().zip(targets) {
            if conns.is_empty() {
                continue;
            }
            let n = conns.len();
            match l.send(Inbox::To(notice.frame.clone(), conns)) {
                Ok(()) => queued += n,
                Err(_) => self.dropped(n),
            }
        }
        queued
    }

    /// Sends one frame to every connection of this node; returns the
    /// node's connection count when at least one loop took it (the loops
    /// know their own counts).
    pub fn broadcast_frame(&self, frame: Bytes) -> usize {
        let mut taken = 0;
        for l in self.loops.iter() {
            match l.send(Inbox::All(frame.clone())) {
                Ok(()) => taken += 1,
                Err(_) => self.dropped(1),
            }
        }
        if taken == 0 {
            0
        } else {
            self.metrics.connections.load(Ordering::Relaxed) as usize
        }
    }

    /// Counts, parses and delivers one published message. An invalid one is
    /// counted and logged (at most one line a second) and affects nothing
    /// else.
    pub fn handle_payload(&self, payload: &[u8]) -> Result<usize, NoticeError> {
        self.metrics
            .notices_received
            .fetch_add(1, Ordering::Relaxed);
        match crate::notice::parse(payload) {
            Ok(n) => Ok(self.deliver(&n)),
            Err(e) => {
                self.metrics.notices_invalid.fetch_add(1, Ordering::Relaxed);
                warn_invalid(&e);
                Err(e)
            }
        }
    }
}

static LAST_INVALID_LOG_SEC: AtomicU64 = AtomicU64::new(u64::MAX);
static INVALID_SINCE_LOG: AtomicU64 = AtomicU64::new(0);

/// One warning line a second at most, saying how many were not logged.
fn warn_invalid(e: &NoticeError) {
    let sec = crate::auth::unix_now();
    let suppressed = INVALID_SINCE_LOG.fetch_add(1, Ordering::Relaxed);
    let last = LAST_INVALID_LOG_SEC.load(Ordering::Relaxed);
    if last != sec
        && LAST_INVALID_LOG_SEC
            .compare_exchange(last, sec, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        INVALID_SINCE_LOG.store(0, Ordering::Relaxed);
        if suppressed > 0 {
            log::warn!("invalid notice dropped: {e} ({suppressed} more since the last line)");
        } else {
            log::warn!("invalid notice dropped: {e}");
        }
    }
}
