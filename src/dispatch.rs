//! The hand-off from the threads that receive notices (the Redis
//! subscriber, the admin listener) to the loops that own the sockets.
//!
//! Each loop has a bounded inbox and a `mio::Waker`. A sender never waits:
//! when an inbox is full the delivery is dropped and counted in
//! `pushwire_notices_dropped_total` (a subscriber that blocked would let
//! Redis cut it and lose everything). Wakes are coalesced with a flag, so
//! a burst of notices costs one eventfd write per loop, not one per notice.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Sender, TrySendError};

use crate::notice::{Notice, Route};
use crate::Shared;

/// Messages a loop finds in its inbox.
pub enum Inbox {
    /// One frame for some of this loop's connections: (slot, generation).
    To(Bytes, Vec<(u32, u32)>),
    /// One frame for every open connection of this loop.
    All(Bytes),
    /// A socket accepted by loop 0 for this loop to own.
    Accepted(mio::net::TcpStream, std::net::SocketAddr),
}

/// Bound of each loop's inbox, in messages. The channel itself is
/// crossbeam's list flavour, which allocates as it fills: the array flavour
/// would keep all of it resident (1 MiB per loop) on an idle server. The
/// bound is kept by [`WorkerHandle::queued`].
pub const INBOX_CAPACITY: usize = 16_384;

pub struct WorkerHandle {
    pub tx: Sender<Inbox>,
    pub waker: Arc<mio::Waker>,
    /// True while a wake is pending and the loop has not drained yet.
    pub wake_pending: Arc<AtomicBool>,
    /// `Shared::now_ms` at the loop's last pass, for the systemd watchdog.
    pub heartbeat: AtomicU64,
    /// Messages in the inbox; senders refuse at [`INBOX_CAPACITY`].
    pub queued: Arc<AtomicUsize>,
}

impl WorkerHandle {
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }

    /// Queues without waiting; returns the message when the inbox is full.
    pub fn send(&self, msg: Inbox) -> Result<(), Inbox> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= INBOX_CAPACITY {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.wake();
            return Err(msg);
        }
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Err(m)
            }
        }
    }
}

/// Hands one notice to the loops holding its recipients. Returns how many
/// connections it was queued for.
pub fn deliver(shared: &Shared, notice: &Notice) -> usize {
    let workers = &shared.workers;
    let dropped = |n: usize| {
        shared
            .metrics
            .notices_dropped
            .fetch_add(n as u64, Ordering::Relaxed);
    };
    let per_worker = |users: &mut dyn Iterator<Item = &str>| {
        let mut targets: Vec<Vec<(u32, u32)>> = vec![Vec::new(); workers.len()];
        shared.sessions.for_each(users, |c| {
            if let Some(t) = targets.get_mut(c.worker as usize) {
                t.push((c.slot, c.generation));
            }
        });
        targets
    };
    let targets = match &notice.route {
        Route::Broadcast => {
            let mut total = 0;
            for w in workers {
                if w.send(Inbox::All(notice.frame.clone())).is_err() {
                    dropped(1);
                } else {
                    total += 1;
                }
            }
            // The loops know their own counts; report the node's.
            return if total == 0 {
                0
            } else {
                shared.metrics.connections.load(Ordering::Relaxed) as usize
            };
        }
        Route::User(u) => per_worker(&mut std::iter::once(&**u)),
        Route::Users(list) => per_worker(&mut list.iter().map(|u| &**u)),
    };
    let mut queued = 0;
    for (w, conns) in workers.iter().zip(targets) {
        if conns.is_empty() {
            continue;
        }
        let n = conns.len();
        match w.send(Inbox::To(notice.frame.clone(), conns)) {
            Ok(()) => queued += n,
            Err(_) => dropped(n),
        }
    }
    queued
}

/// Sends one frame to every connection of this node (the resync notice).
pub fn broadcast_frame(shared: &Shared, frame: Bytes) {
    for w in &shared.workers {
        if w.send(Inbox::All(frame.clone())).is_err() {
            shared
                .metrics
                .notices_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts, parses and delivers one published message. An invalid one is
/// counted and logged (at most one line a second) and affects nothing else.
pub fn handle_payload(
    shared: &Shared,
    payload: &[u8],
) -> Result<usize, crate::notice::NoticeError> {
    shared
        .metrics
        .notices_received
        .fetch_add(1, Ordering::Relaxed);
    match crate::notice::parse(payload) {
        Ok(n) => Ok(deliver(shared, &n)),
        Err(e) => {
            shared
                .metrics
                .notices_invalid
                .fetch_add(1, Ordering::Relaxed);
            warn_invalid(shared, &e);
            Err(e)
        }
    }
}

static LAST_INVALID_LOG_SEC: AtomicU64 = AtomicU64::new(u64::MAX);
static INVALID_SINCE_LOG: AtomicU64 = AtomicU64::new(0);

fn warn_invalid(shared: &Shared, e: &crate::notice::NoticeError) {
    let sec = shared.now_ms() / 1000;
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
