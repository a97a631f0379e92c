//! A connection that uses `since` (SPEC section 8): it takes notices
//! wrapped as `{"id":..,"notice":..}`, remembers the last durable id it was
//! sent, and while a recovery read is in flight holds live notices back,
//! so that the replay and the live stream meet without a gap or a repeat.
//!
//! The seam: the recovery read answers the entries after `since` and the
//! last id issued in the fleet when it read (`seam`). Every durable notice
//! up to `seam` for this client is in the answer; every one after it comes
//! live, and the connection was already registered for live notices when
//! the read was asked for. So held notices with an id up to `seam` are
//! dropped, the others follow the replay, and later live ones at or below
//! the last id sent are dropped too (the subscriber may lag the read).

use std::sync::Arc;

use bytes::Bytes;

use super::out::OutQueue;
use super::Queued;
use crate::dispatch::{wrap_plain, DurableId, Frames};
use crate::history::{ClientId, History};
use crate::notice;

pub struct Durable {
    /// The last durable notice sent, or where the client said it was.
    last: Option<DurableId>,
    /// While a recovery read is in flight: the live notices held back.
    held: Option<Held>,
}

#[derive(Default)]
struct Held {
    frames: Vec<Frames>,
    bytes: usize,
}

/// How a recovery ended, for the counters.
pub struct Recovery {
    pub recovered: bool,
    pub replayed: usize,
}

impl Durable {
    pub fn new(last: Option<DurableId>, recovering: bool) -> Durable {
        Durable {
            last,
            held: recovering.then(Held::default),
        }
    }

    /// Where a recovery starts: the last id sent (`None`: nowhere known).
    /// Live notices are held from now on.
    pub fn begin_recovery(&mut self) -> Option<ClientId> {
        self.hold(None);
        self.last.as_ref().map(DurableId::client_id)
    }

    /// Holds live notices (the subscription is lost: a recovery will come).
    /// A connection that has not been sent a durable notice yet resumes
    /// from `node_last`, the last one the node received before the loss:
    /// none after it can have reached this connection, and without a point
    /// to resume from its recovery could only answer `recovered:false`.
    pub fn hold(&mut self, node_last: Option<DurableId>) {
        if self.last.is_none() {
            self.last = node_last;
        }
        self.held.get_or_insert_with(Held::default);
    }

    /// Records `id` as the last sent. The epoch is shared by every notice
    /// of that epoch: while it stays the same, only the position changes
    /// (no reference count bounced between loops per delivery).
    fn sent(&mut self, id: &DurableId) {
        match &mut self.last {
            Some(last) if Arc::ptr_eq(&last.epoch, &id.epoch) => last.id = id.id,
            last => *last = Some(id.clone()),
        }
    }

    fn is_sent(&self, id: &Option<DurableId>) -> bool {
        match (id, &self.last) {
            (Some(id), Some(last)) => id.epoch == last.epoch && id.id <= last.id,
            _ => false,
        }
    }

    pub fn queue(&mut self, out: &mut OutQueue, f: &Frames, max: usize) -> Queued {
        if let Some(held) = &mut self.held {
            held.bytes += f.plain.len() + 16;
            held.frames.push(f.clone());
            return if held.bytes > max {
                Queued::Full
            } else {
                Queued::Yes
            };
        }
        if self.is_sent(&f.id) {
            return Queued::NotOpen;
        }
        let frame = wrapped_form(f);
        if !out.is_empty() && out.len() + frame.len() > max {
            return Queued::Full;
        }
        out.push(frame);
        if let Some(id) = &f.id {
            self.sent(id);
        }
        Queued::Yes
    }

    /// Ends a recovery: the replay (or `{"recovered":false}`), the status
    /// frame, then what was held back. `None` when none was in flight.
    pub fn finish(&mut self, out: &mut OutQueue, history: Option<History>) -> Option<Recovery> {
        let held = self.held.take()?;
        let epoch = self.last.as_ref().map(|l| l.epoch.clone());
        let (recovered, replayed, seam) = match (history, epoch) {
            (Some(History::Recovered(r)), Some(epoch)) => {
                let n = r.entries.len();
                for (id, id_str, notice) in r.entries {
                    out.push(envelope(&id_str, &notice));
                    self.last = Some(DurableId {
                        id,
                        epoch: epoch.clone(),
                    });
                }
                let seam = DurableId { id: r.last, epoch };
                if !self.is_sent(&Some(seam.clone())) {
                    self.last = Some(seam.clone());
                }
                (true, n, Some(seam))
            }
            _ => (false, 0, None),
        };
        out.push(status_frame(recovered, replayed));
        for f in held.frames {
            let before_seam = match (&f.id, &seam) {
                (Some(id), Some(seam)) => id.epoch == seam.epoch && id.id <= seam.id,
                _ => false,
            };
            if before_seam {
                continue;
            }
            out.push(wrapped_form(&f));
            if let Some(id) = f.id {
                if !self.is_sent(&Some(id.clone())) {
                    self.last = Some(id);
                }
            }
        }
        Some(Recovery {
            recovered,
            replayed,
        })
    }
}

/// The form a `since` connection takes a notice in. The subscriber builds
/// it only while the node has such connections; one that comes just then
/// builds its own, with the id when the notice has one.
fn wrapped_form(f: &Frames) -> Bytes {
    if !f.wrapped.is_empty() {
        return f.wrapped.clone();
    }
    let payload = notice::payload(&f.plain);
    match &f.id {
        Some(id) => envelope(&id.client_id().to_string(), payload),
        None => wrap_plain(payload),
    }
}

/// `{"id":"<id>","notice":<notice>}` as a text frame.
fn envelope(id: &str, notice: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(notice.len() + id.len() + 20);
    v.extend_from_slice(b"{\"id\":\"");
    v.extend_from_slice(id.as_bytes());
    v.extend_from_slice(b"\",\"notice\":");
    v.extend_from_slice(notice);
    v.push(b'}');
    notice::text_frame(&v)
}

fn status_frame(recovered: bool, replayed: usize) -> Bytes {
    let text = if recovered {
        format!("{{\"recovered\":true,\"replayed\":{replayed}}}")
    } else {
        "{\"recovered\":false}".to_string()
    };
    notice::text_frame(text.as_bytes())
}

/// One `Arc` per epoch string a node meets.
pub fn intern_epoch(current: &mut Option<Arc<str>>, epoch: &str) -> Arc<str> {
    match current {
        Some(e) if &**e == epoch => e.clone(),
        _ => {
            let e: Arc<str> = Arc::from(epoch);
            *current = Some(e.clone());
            e
        }
    }
}
