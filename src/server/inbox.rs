//! Deliveries from the inbox to the connections, and the flush that
//! writes them: the loop's fairness rules for a burst.

use std::time::Instant;

use bytes::Bytes;

use super::Worker;
use crate::connection::{Close, Conn, Queued};
use crate::dispatch::{Frames, Inbox, LoopEnd};

/// While flushing, the inbox is drained again after this many connections.
const FLUSH_DRAIN_EVERY: usize = 64;
/// Consecutive broadcast frames are joined into buffers of at most this size
/// (and never more than `--max-queue-bytes`).
const BROADCAST_BATCH_BYTES: usize = 64 * 1024;

impl Worker {
    /// Handles what is queued now, not what arrives while we work.
    /// Consecutive broadcasts (a burst) are joined into one buffer: each
    /// connection is then visited once per batch, takes one chunk, and the
    /// batch leaves in one write, however many notices it holds.
    pub(super) fn drain_inbox(&mut self, end: &LoopEnd, now: Instant) {
        let limit = BROADCAST_BATCH_BYTES.min(self.ctx.config.max_queue_bytes);
        let mut batch: Vec<u8> = Vec::new();
        let mut batched = 0u64;
        for msg in end.drain() {
            if batched > 0
                && !matches!(&msg, Inbox::All(f) if self.durable_here == 0 && batch.len() + f.plain.len() <= limit)
            {
                self.broadcast(std::mem::take(&mut batch), batched, now);
                batched = 0;
            }
            match msg {
                // Joined only while no connection here needs each notice
                // on its own (those that use `since` track ids).
                Inbox::All(frames) if self.durable_here == 0 => {
                    batch.extend_from_slice(&frames.plain);
                    batched += 1;
                }
                Inbox::All(frames) => self.broadcast_each(&frames, now),
                Inbox::To(frames, targets) => self.deliver_to(&frames, targets, now),
                Inbox::Lost => self.on_lost(),
                Inbox::Restored(resync) => self.on_restored(resync),
            }
        }
        if batched > 0 {
            self.broadcast(batch, batched, now);
        }
    }

    /// One broadcast notice to every open connection, in each one's form.
    fn broadcast_each(&mut self, frames: &Frames, now: Instant) {
        let max = self.ctx.config.max_queue_bytes;
        let mut outcome = Outcome {
            delivered: &mut self.delivered,
            dirty: &mut self.dirty,
            cut: Vec::new(),
        };
        for (slot, conn) in self.conns.iter_mut() {
            let queued = conn.queue(frames, max);
            outcome.note(queued, conn, slot, 1);
        }
        let cut = outcome.cut;
        self.cut_slow(cut, now);
    }

    /// Queues `frames` (`count` whole frames, one buffer of this loop's own:
    /// the loops would otherwise bounce one reference count between cores on
    /// every delivery) for every open connection.
    fn broadcast(&mut self, frames: Vec<u8>, count: u64, now: Instant) {
        let max = self.ctx.config.max_queue_bytes;
        let frames = Bytes::from(frames);
        let mut outcome = Outcome {
            delivered: &mut self.delivered,
            dirty: &mut self.dirty,
            cut: Vec::new(),
        };
        for (slot, conn) in self.conns.iter_mut() {
            let queued = conn.queue_plain(&frames, max);
            outcome.note(queued, conn, slot, count);
        }
        let cut = outcome.cut;
        self.cut_slow(cut, now);
    }

    fn deliver_to(&mut self, frame: &Frames, targets: Vec<(u32, u32)>, now: Instant) {
        let max = self.ctx.config.max_queue_bytes;
        let mut outcome = Outcome {
            delivered: &mut self.delivered,
            dirty: &mut self.dirty,
            cut: Vec::new(),
        };
        for (slot, generation) in targets {
            let slot = slot as usize;
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.generation != generation {
                continue;
            }
            let queued = conn.queue(frame, max);
            outcome.note(queued, conn, slot, 1);
        }
        let cut = outcome.cut;
        self.cut_slow(cut, now);
    }

    fn cut_slow(&mut self, cut: Vec<usize>, now: Instant) {
        let max = self.ctx.config.max_queue_bytes;
        for slot in cut {
            self.ctx
                .metrics
                .slow_consumer_closed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(conn) = self.conns.get(slot) {
                log::info!(
                    "conn={} peer={} slow consumer: queue over {max} bytes, closing 1008",
                    conn.label(slot),
                    conn.peer
                );
            }
            self.close(slot, Close::SlowConsumer, now);
        }
    }

    /// Writes every connection with something queued. A flush of thousands
    /// of connections takes milliseconds, and the rest of a burst arrives
    /// meanwhile: every [`FLUSH_DRAIN_EVERY`] connections the inbox is
    /// drained again, so the connections not yet written take the new
    /// notices in the same write (those already written get one more write,
    /// in a second round). Nothing waits for more to come.
    pub(super) fn flush_dirty(&mut self, end: &LoopEnd, now: Instant) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for (i, slot) in dirty.drain(..).enumerate() {
            if i % FLUSH_DRAIN_EVERY == FLUSH_DRAIN_EVERY - 1 && !end.is_empty() {
                self.drain_inbox(end, now);
            }
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            conn.dirty = false;
            self.flush(slot);
        }
        // The second round drains nothing, so it ends. Flushing marks
        // nothing dirty, so the first list (and its capacity) is kept for
        // the next pass: no allocation per pass.
        let again = std::mem::take(&mut self.dirty);
        for slot in again {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            conn.dirty = false;
            self.flush(slot);
        }
        self.dirty = dirty;
    }
}

/// What queueing a notice for one connection leads to, in one place:
/// counted and marked for the flush, or noted as a slow consumer to cut.
struct Outcome<'a> {
    delivered: &'a mut u64,
    dirty: &'a mut Vec<usize>,
    cut: Vec<usize>,
}

impl Outcome<'_> {
    fn note(&mut self, queued: Queued, conn: &mut Conn, slot: usize, frames: u64) {
        match queued {
            Queued::Yes => {
                *self.delivered += frames;
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.push(slot);
                }
            }
            Queued::Full => self.cut.push(slot),
            Queued::NotOpen => {}
        }
    }
}
