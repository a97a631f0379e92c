//! What one client thread counts, and the checker that reads each notice.
//!
//! Every notice carries its seq and its publish time; `on_text` turns a
//! received frame into a latency sample and a per-seq count, from which
//! the scenarios work out delivered, lost and duplicated. The main thread
//! merges the threads' copies.

use std::collections::BTreeMap;

use crate::histogram::Hist;
use crate::wire::json_num;

/// Most seq numbers one run tracks (memory guard).
const MAX_SEQ: u64 = 50_000_000;

#[derive(Clone, Default)]
pub struct Stats {
    pub attempted: u64,
    pub opened: u64,
    pub fails: BTreeMap<String, u64>,
    pub connect: Hist,
    pub first_attempt: u64,
    pub last_open: u64,
    pub closed_by_server: u64,
    pub close_codes: BTreeMap<u16, u64>,
    pub dropped_open: u64,
    pub pings: u64,
    // Message part, reset between --max steps.
    pub frames: u64,
    pub bytes: u64,
    pub other_frames: u64,
    unparsed: u64,
    stale: u64,
    pub misrouted: u64,
    pub lat: Hist,
    pub seq_base: u64,
    pub seq_count: Vec<u32>,
    pub seq_max: Vec<u64>,
    pub min_t: u64,
    first_rx: u64,
    pub last_rx: u64,
    /// Longest pause between two received notices (of one client thread)
    /// and the receive time that ended it: how long delivery stopped.
    pub max_gap: u64,
    pub max_gap_end: u64,
    // Durable clients (SPEC 8).
    pub order_errors: u64,
    pub no_id: u64,
    pub status_ok: u64,
    pub status_missed: u64,
    pub status_unexpected: u64,
    pub replayed_sum: u64,
    pub replay_frames: u64,
    pub replayed_mismatch: u64,
    pub recover: Hist,
    pub last_recovered: u64,
}

impl Stats {
    pub fn fail(&mut self, why: String) {
        *self.fails.entry(why).or_default() += 1;
    }

    pub fn failed(&self) -> u64 {
        self.fails.values().sum()
    }

    pub fn reset_msgs(&mut self, base: u64) {
        self.frames = 0;
        self.bytes = 0;
        self.other_frames = 0;
        self.unparsed = 0;
        self.stale = 0;
        self.misrouted = 0;
        self.lat = Hist::default();
        self.seq_base = base;
        self.seq_count = Vec::new();
        self.seq_max = Vec::new();
        self.min_t = 0;
        self.first_rx = 0;
        self.last_rx = 0;
        self.max_gap = 0;
        self.max_gap_end = 0;
        self.order_errors = 0;
        self.no_id = 0;
    }

    pub fn merge(&mut self, o: &Stats) {
        fn lo(a: u64, b: u64) -> u64 {
            match (a, b) {
                (0, b) => b,
                (a, 0) => a,
                (a, b) => a.min(b),
            }
        }
        self.attempted += o.attempted;
        self.opened += o.opened;
        for (k, v) in &o.fails {
            *self.fails.entry(k.clone()).or_default() += v;
        }
        self.connect.merge(&o.connect);
        self.first_attempt = lo(self.first_attempt, o.first_attempt);
        self.last_open = self.last_open.max(o.last_open);
        self.closed_by_server += o.closed_by_server;
        for (k, v) in &o.close_codes {
            *self.close_codes.entry(*k).or_default() += v;
        }
        self.dropped_open += o.dropped_open;
        self.pings += o.pings;
        self.frames += o.frames;
        self.bytes += o.bytes;
        self.other_frames += o.other_frames;
        self.unparsed += o.unparsed;
        self.stale += o.stale;
        self.misrouted += o.misrouted;
        self.lat.merge(&o.lat);
        self.seq_base = o.seq_base;
        if o.seq_count.len() > self.seq_count.len() {
            self.seq_count.resize(o.seq_count.len(), 0);
            self.seq_max.resize(o.seq_count.len(), 0);
        }
        for (i, (c, m)) in o.seq_count.iter().zip(&o.seq_max).enumerate() {
            self.seq_count[i] += c;
            self.seq_max[i] = self.seq_max[i].max(*m);
        }
        self.min_t = lo(self.min_t, o.min_t);
        self.first_rx = lo(self.first_rx, o.first_rx);
        self.last_rx = self.last_rx.max(o.last_rx);
        if o.max_gap > self.max_gap {
            self.max_gap = o.max_gap;
            self.max_gap_end = o.max_gap_end;
        }
        self.order_errors += o.order_errors;
        self.no_id += o.no_id;
        self.status_ok += o.status_ok;
        self.status_missed += o.status_missed;
        self.status_unexpected += o.status_unexpected;
        self.replayed_sum += o.replayed_sum;
        self.replay_frames += o.replay_frames;
        self.replayed_mismatch += o.replayed_mismatch;
        self.recover.merge(&o.recover);
        self.last_recovered = self.last_recovered.max(o.last_recovered);
    }
}

impl Stats {
    pub fn on_text(&mut self, user: u32, p: &[u8], now: u64) {
        self.frames += 1;
        self.bytes += p.len() as u64;
        if self.first_rx == 0 {
            self.first_rx = now;
        } else if now.saturating_sub(self.last_rx) > self.max_gap {
            self.max_gap = now.saturating_sub(self.last_rx);
            self.max_gap_end = now;
        }
        self.last_rx = now;
        let (Some(seq), Some(t)) = (json_num(p, b"\"seq\":"), json_num(p, b"\"t\":")) else {
            self.unparsed += 1;
            return;
        };
        if seq < self.seq_base {
            self.stale += 1;
            return;
        }
        let i = seq - self.seq_base;
        if i >= MAX_SEQ {
            self.unparsed += 1;
            return;
        }
        let i = i as usize;
        if i >= self.seq_count.len() {
            self.seq_count.resize(i + 1, 0);
            self.seq_max.resize(i + 1, 0);
        }
        let lat = now.saturating_sub(t);
        self.seq_count[i] += 1;
        self.seq_max[i] = self.seq_max[i].max(lat);
        self.lat.record(lat);
        if self.min_t == 0 || t < self.min_t {
            self.min_t = t;
        }
        if let Some(u) = json_num(p, b"\"userId\":") {
            if u != user as u64 {
                self.misrouted += 1;
            }
        }
    }
}
