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
    ///
    /// A held notice with an id up to the seam is normally in the replay
    /// too, and is dropped. One that is not came from a master whose
    /// history the one read from does not have (Sentinel promoted another
    /// and the old one still took notices until its publishers moved on):
    /// it is sent in its place among the replayed ones, by id, rather than
    /// lost.
    pub fn finish(&mut self, out: &mut OutQueue, history: Option<History>) -> Option<Recovery> {
        let held = self.held.take()?;
        let since = self.last.clone();
        let epoch = since.as_ref().map(|l| l.epoch.clone());
        // `late`: what follows the status frame (after the seam, or all of
        // it when history could not prove completeness).
        let (recovered, replayed, late) = match (history, epoch) {
            (Some(History::Recovered(r)), Some(epoch)) => {
                let seam = DurableId {
                    id: r.last,
                    epoch: epoch.clone(),
                };
                let mut late = Vec::with_capacity(held.frames.len());
                let mut orphans = Vec::new();
                for f in held.frames {
                    match &f.id {
                        Some(id) if id.epoch == epoch && id.id <= seam.id => {
                            let sent_before = since.as_ref().is_some_and(|s| id.id <= s.id);
                            let replayed = r.entries.binary_search_by(|e| e.0.cmp(&id.id)).is_ok();
                            if !sent_before && !replayed {
                                orphans.push(f);
                            }
                        }
                        _ => late.push(f),
                    }
                }
                orphans.sort_by_key(|f| f.id.as_ref().map(|i| i.id));
                let n = r.entries.len() + orphans.len();
                let mut orphans = orphans.into_iter().peekable();
                for (id, id_str, notice) in r.entries {
                    while let Some(o) =
                        orphans.next_if(|o| o.id.as_ref().is_some_and(|o| o.id < id))
                    {
                        out.push(wrapped_form(&o));
                    }
                    out.push(envelope(&id_str, &notice));
                }
                for o in orphans {
                    out.push(wrapped_form(&o));
                }
                if !self.is_sent(&Some(seam.clone())) {
                    self.last = Some(seam);
                }
                (true, n, late)
            }
            _ => (false, 0, held.frames),
        };
        out.push(status_frame(recovered, replayed));
        for f in late {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Id, Recovered};

    fn id(ms: u64) -> Id {
        Id::parse(&format!("{ms}-0")).unwrap()
    }

    fn live(epoch: &Arc<str>, ms: u64) -> Frames {
        Frames {
            plain: notice::text_frame(format!(r#"{{"userId":"7","n":{ms}}}"#).as_bytes()),
            wrapped: Bytes::new(),
            id: Some(DurableId {
                id: id(ms),
                epoch: epoch.clone(),
            }),
        }
    }

    fn entry(ms: u64) -> (Id, String, Bytes) {
        let notice = format!(r#"{{"userId":"7","n":{ms}}}"#);
        (id(ms), format!("e:{ms}-0"), Bytes::from(notice))
    }

    fn texts(out: &OutQueue) -> Vec<String> {
        out.frames()
            .iter()
            .map(|f| String::from_utf8(notice::payload(f).to_vec()).unwrap())
            .collect()
    }

    /// Resumes from e:100-0 with notices 101, 102 and 105 held; history
    /// (read from a promoted replica) has 101 and 103, last 104: 101 is
    /// dropped from the held ones, 102 (only the demoted master had it) is
    /// sent in its place by id, 105 comes after the status frame.
    #[test]
    fn held_notices_history_lacks_are_merged_by_id_and_the_rest_follow() {
        let epoch: Arc<str> = Arc::from("e");
        let mut d = Durable::new(
            Some(DurableId {
                id: id(100),
                epoch: epoch.clone(),
            }),
            false,
        );
        assert_eq!(
            d.begin_recovery().map(|c| c.to_string()).as_deref(),
            Some("e:100-0")
        );
        let mut out = OutQueue::default();
        for ms in [101, 102, 105] {
            assert!(matches!(
                d.queue(&mut out, &live(&epoch, ms), 1 << 20),
                Queued::Yes
            ));
        }
        assert!(out.is_empty(), "held while the read is in flight");
        let history = History::Recovered(Recovered {
            entries: vec![entry(101), entry(103)],
            last: id(104),
        });
        let done = d.finish(&mut out, Some(history)).unwrap();
        assert!(done.recovered);
        assert_eq!(done.replayed, 3);
        let n = |ms: u64| format!(r#"{{"id":"e:{ms}-0","notice":{{"userId":"7","n":{ms}}}}}"#);
        assert_eq!(
            texts(&out),
            vec![
                n(101),
                n(102),
                n(103),
                r#"{"recovered":true,"replayed":3}"#.to_string(),
                n(105)
            ]
        );
        // Later live notices at or below what was sent are dropped.
        assert!(matches!(
            d.queue(&mut out, &live(&epoch, 104), 1 << 20),
            Queued::NotOpen
        ));
        assert!(matches!(
            d.queue(&mut out, &live(&epoch, 106), 1 << 20),
            Queued::Yes
        ));
    }

    /// A missed recovery sends every held notice after the status frame.
    #[test]
    fn a_missed_recovery_sends_what_was_held_after_the_status() {
        let epoch: Arc<str> = Arc::from("e");
        let mut d = Durable::new(None, true);
        let mut out = OutQueue::default();
        d.queue(&mut out, &live(&epoch, 5), 1 << 20);
        let done = d.finish(&mut out, Some(History::Missed)).unwrap();
        assert!(!done.recovered);
        let t = texts(&out);
        assert_eq!(t[0], r#"{"recovered":false}"#);
        assert_eq!(t.len(), 2, "{t:?}");
        assert!(
            d.finish(&mut out, None).is_none(),
            "one recovery, one answer"
        );
    }
}
