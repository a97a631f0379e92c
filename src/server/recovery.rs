//! Recovery on the loop (SPEC section 8): asking the replayer for a
//! connection's missed notices, applying its answer, and what the loop
//! does when the subscription is lost and restored.

use super::Worker;
use std::sync::atomic::Ordering;

use crate::connection::Queued;
use crate::dispatch::Replayed;
use crate::history::ClientId;
use crate::replay;

/// A connection's id as the replayer carries it: loop, slot and
/// generation in one `u64` (16 + 24 + 24 bits; a slot or generation past
/// 2^24 only wraps, which a request in flight for a few ms never meets).
pub(super) fn replay_token(worker: u16, slot: usize, generation: u32) -> u64 {
    (u64::from(worker) << 48)
        | ((slot as u64 & 0xff_ffff) << 24)
        | (u64::from(generation) & 0xff_ffff)
}

/// The loop, slot and (24-bit) generation of a replay token.
pub fn from_replay_token(t: u64) -> (u16, u32, u32) {
    (
        (t >> 48) as u16,
        ((t >> 24) & 0xff_ffff) as u32,
        (t & 0xff_ffff) as u32,
    )
}

impl Worker {
    /// Asks for a recovery read. Requests go to the replayer in turn,
    /// through [`Worker::ask_waiting_recoveries`]: with its queue full they
    /// wait on this loop (the connection keeps holding its live notices)
    /// and are asked again as replies come back, so a burst of recoveries
    /// (every `since` connection after a subscription loss, a reconnect
    /// storm) is read in turn, never answered `{"recovered":false}` for
    /// want of room. With no replayer, or no point to recover from, the
    /// answer is `{"recovered":false}` at once.
    pub(super) fn request_recovery(
        &mut self,
        slot: usize,
        generation: u32,
        user: Box<str>,
        since: Option<ClientId>,
    ) {
        match (&self.ctx.replayer, since) {
            (Some(_), Some(since)) => {
                self.recoveries_waiting.push_back(replay::Request {
                    token: replay_token(self.id, slot, generation),
                    user,
                    since,
                });
                self.ask_waiting_recoveries();
            }
            _ => self.on_replayed(Replayed {
                slot: slot as u32,
                generation,
                history: None,
            }),
        }
    }

    /// Hands the waiting recoveries to the replayer, oldest first, until
    /// its queue is full; those of connections gone meanwhile are dropped,
    /// and with the replayer stopped the rest are answered
    /// `{"recovered":false}`.
    pub(super) fn ask_waiting_recoveries(&mut self) {
        while let Some(r) = self.recoveries_waiting.pop_front() {
            let (_, slot, generation) = from_replay_token(r.token);
            let alive = self
                .conns
                .get(slot as usize)
                .is_some_and(|c| c.generation & 0xff_ffff == generation);
            if !alive {
                continue;
            }
            let Some(replayer) = &self.ctx.replayer else {
                return;
            };
            match replayer.try_request(r) {
                Ok(()) => {}
                Err(replay::Refused::Full(r)) => {
                    self.recoveries_waiting.push_front(r);
                    return;
                }
                Err(replay::Refused::Stopped) => {
                    self.on_replayed(Replayed {
                        slot,
                        generation,
                        history: None,
                    });
                }
            }
        }
    }

    /// A recovery read's answer: the replay, the status frame, then the
    /// live notices held meanwhile.
    pub(super) fn on_replayed(&mut self, r: Replayed) {
        let slot = r.slot as usize;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.generation & 0xff_ffff != r.generation & 0xff_ffff {
            return;
        }
        let Some(done) = conn.finish_recovery(r.history) else {
            return;
        };
        let m = &self.ctx.metrics;
        if done.recovered {
            m.recoveries_recovered.fetch_add(1, Ordering::Relaxed);
        } else {
            m.recoveries_missed.fetch_add(1, Ordering::Relaxed);
        }
        m.replayed_notices
            .fetch_add(done.replayed as u64, Ordering::Relaxed);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// The subscription is lost: connections that use `since` hold live
    /// notices from here, where their recovery will start.
    pub(super) fn on_lost(&mut self) {
        let node_last = self.ctx.durable.last();
        for (_, conn) in self.conns.iter_mut() {
            if let Some(d) = conn.durable() {
                d.hold(node_last.clone());
            }
        }
    }

    /// The subscription is back: recover the connections that use
    /// `since`, send the resync notice to the others.
    pub(super) fn on_restored(&mut self, resync: Option<bytes::Bytes>) {
        let max = self.ctx.config.max_queue_bytes;
        let mut recover = Vec::new();
        for (slot, conn) in self.conns.iter_mut() {
            if let Some((user, since)) = conn.recovery_point() {
                recover.push((slot, conn.generation, user, since));
            } else if let Some(frame) = &resync {
                if let Queued::Yes = conn.queue_plain(frame, max) {
                    if !conn.dirty {
                        conn.dirty = true;
                        self.dirty.push(slot);
                    }
                }
            }
        }
        for (slot, generation, user, since) in recover {
            self.request_recovery(slot, generation, user, since);
        }
    }
}
