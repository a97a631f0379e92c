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
//! | the replayer's requests (recovery reads) | `replay::QUEUE_CAPACITY` | the connection is answered `{"recovered":false}` at once |
//! | a loop's replies (recovery answers) | as many as requests in flight | never full |
//! | a recovering connection's held live notices | `--max-queue-bytes` | cut as a slow consumer (1008) |
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

use crate::history::{ClientId, History, Id};
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
    /// One notice for some of this loop's connections: (slot, generation).
    To(Frames, Vec<(u32, u32)>),
    /// One notice for every open connection of this loop.
    All(Frames),
    /// The subscription was found dead: connections that use `since`
    /// remember where they were and hold live notices until `Restored`.
    Lost,
    /// The subscription is proven again after a loss: connections that use
    /// `since` are recovered from history; the others get this frame (the
    /// `--resync-notice`), if any.
    Restored(Option<Bytes>),
}

/// A durable notice's place in the fleet's order, with its epoch (shared:
/// one allocation per epoch, not per notice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableId {
    pub id: Id,
    pub epoch: Arc<str>,
}

impl DurableId {
    pub fn client_id(&self) -> ClientId {
        ClientId {
            epoch: self.epoch.to_string(),
            id: self.id,
        }
    }
}

/// One notice in the two forms a connection may take it in, each built
/// once and shared by every recipient.
#[derive(Clone)]
pub struct Frames {
    /// The published bytes, for connections without `since`.
    pub plain: Bytes,
    /// `{"id":..,"notice":..}`, or `{"notice":..}` for a plain PUBLISH, for
    /// connections that use `since`. Empty when the node had no such
    /// connection as it was built: a connection that needs it then builds
    /// its own.
    pub wrapped: Bytes,
    pub id: Option<DurableId>,
}

/// A recovery read's answer for one connection.
pub struct Replayed {
    pub slot: u32,
    pub generation: u32,
    /// `None`: Redis could not answer (treated as missed).
    pub history: Option<History>,
}

/// What the node knows of durable notices, shared by the loops and the
/// subscriber.
#[derive(Default)]
pub struct DurableState {
    /// Open connections that use `since`: the subscriber builds wrapped
    /// frames only while there are some.
    pub connections: AtomicUsize,
    /// The last durable notice this node received: where a connection with
    /// an empty `since` starts.
    pub last: std::sync::Mutex<Option<DurableId>>,
}

impl DurableState {
    pub fn last(&self) -> Option<DurableId> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_last(&self, id: &DurableId) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last
            .as_ref()
            .is_none_or(|l| l.epoch != id.epoch || l.id < id.id)
        {
            *last = Some(id.clone());
        }
    }
}

/// `{"notice":<payload>}` as a text frame.
pub fn wrap_plain(payload: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(payload.len() + 11);
    v.extend_from_slice(b"{\"notice\":");
    v.extend_from_slice(payload);
    v.push(b'}');
    crate::notice::text_frame(&v)
}

/// A socket accepted by loop 0 for another loop to own.
pub struct Accepted(pub mio::net::TcpStream, pub SocketAddr);

/// How other threads reach one loop.
pub struct LoopHandle {
    inbox: Sender<Inbox>,
    accept: Sender<Accepted>,
    replies: Sender<Replayed>,
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
    replies: Receiver<Replayed>,
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
    // Bounded by the replayer's own queue: one reply per request taken.
    let (replies_tx, replies_rx) = crossbeam_channel::unbounded();
    let wake_pending = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let heartbeat = Arc::new(AtomicU64::new(0));
    Ok((
        LoopHandle {
            inbox: inbox_tx,
            accept: accept_tx,
            replies: replies_tx,
            waker,
            wake_pending: wake_pending.clone(),
            queued: queued.clone(),
            heartbeat: heartbeat.clone(),
        },
        LoopEnd {
            inbox: inbox_rx,
            accept: accept_rx,
            replies: replies_rx,
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

    /// Hands a recovery read's answer to this loop. Never refused: there
    /// are never more in flight than the replayer's queue holds.
    pub fn reply(&self, r: Replayed) {
        if self.replies.send(r).is_ok() {
            self.wake();
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

    pub fn replies(&self) -> impl Iterator<Item = Replayed> + '_ {
        let n = self.replies.len();
        self.replies.try_iter().take(n)
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
    durable: Arc<DurableState>,
}

impl Delivery {
    pub fn new(
        loops: Arc<[LoopHandle]>,
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
        durable: Arc<DurableState>,
    ) -> Self {
        Delivery {
            loops,
            sessions,
            metrics,
            durable,
        }
    }

    pub fn durable(&self) -> &DurableState {
        &self.durable
    }

    /// Tells every loop (the subscription's loss and return).
    pub fn tell_all(&self, msg: impl Fn() -> Inbox) {
        for l in self.loops.iter() {
            if l.send(msg()).is_err() {
                self.dropped(1);
            }
        }
    }

    pub fn loops(&self) -> &[LoopHandle] {
        &self.loops
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn dropped(&self, n: usize) {
        self.metrics
            .notices_dropped
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Hands one plain notice to the loops holding its recipients. Returns
    /// how many connections it was queued for.
    pub fn deliver(&self, notice: &Notice) -> usize {
        let wrapped = if self.durable.connections.load(Ordering::Relaxed) > 0 {
            wrap_plain(crate::notice::payload(&notice.frame))
        } else {
            Bytes::new()
        };
        let frames = Frames {
            plain: notice.frame.clone(),
            wrapped,
            id: None,
        };
        self.deliver_frames(&notice.route, frames)
    }

    /// Hands one notice, in both its forms, to the loops holding its
    /// recipients.
    pub fn deliver_frames(&self, route: &Route, frames: Frames) -> usize {
        let users: &mut dyn Iterator<Item = &str> = match route {
            Route::Broadcast => return self.broadcast(frames),
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
            match l.send(Inbox::To(frames.clone(), conns)) {
                Ok(()) => queued += n,
                Err(_) => self.dropped(n),
            }
        }
        queued
    }

    /// Sends one notice to every connection of this node; returns the
    /// node's connection count when at least one loop took it (the loops
    /// know their own counts).
    pub fn broadcast(&self, frames: Frames) -> usize {
        let mut taken = 0;
        for l in self.loops.iter() {
            match l.send(Inbox::All(frames.clone())) {
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

    /// Counts an invalid notice and logs it (at most one line a second).
    pub fn invalid(&self, e: &NoticeError) {
        self.metrics.notices_invalid.fetch_add(1, Ordering::Relaxed);
        warn_invalid(e);
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
                self.invalid(&e);
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
