//! The main thread's handle on the client threads.
//!
//! It starts them, splits connections among them, asks each for its stats
//! or its open users over a channel plus a wake, and stops them. The
//! counters in `Ctl` let the main thread watch progress without asking.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use mio::{Poll, Waker};

use crate::client::{ClientLoop, WAKE};
use crate::stats::Stats;
use crate::wire::ClientCfg;

#[derive(Clone)]
pub struct Spec {
    pub user: u32,
    pub target: u16,
    pub src: u8,
    /// A durable client coming back: `since=<last_id>` on its URL.
    pub resume: Option<Box<Resume>>,
}

/// What a durable client keeps across a reconnect.
#[derive(Clone, Default)]
pub struct Resume {
    pub last_id: String,
    pub last_seq: Option<u64>,
}

pub enum Cmd {
    Connect(Vec<Spec>, f64),
    /// Reply with the stats; with Some(base), reset the message part.
    Collect(Option<u64>, Sender<Stats>),
    OpenUsers(Sender<Vec<u32>>),
    CloseAll,
    /// Every durable connection the server dropped, again, to this target
    /// with its last id, at this rate (0: all at once).
    Reconnect(u16, f64),
    Stop,
}

/// Counters the main thread watches while it waits.
#[derive(Default)]
pub struct Ctl {
    pub done: AtomicU64,
    pub open: AtomicU64,
    pub frames: AtomicU64,
}

/// The client threads, driven from the main thread.
pub struct Clients {
    txs: Vec<(Sender<Cmd>, Arc<Waker>)>,
    joins: Vec<JoinHandle<()>>,
    pub ctl: Arc<Ctl>,
}

impl Clients {
    pub fn start(cfg: Arc<ClientCfg>, threads: usize) -> io::Result<Clients> {
        let ctl = Arc::new(Ctl::default());
        let mut txs = Vec::new();
        let mut joins = Vec::new();
        for i in 0..threads {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
            let (tx, rx) = crossbeam_channel::unbounded();
            let lp = ClientLoop {
                poll,
                cfg: cfg.clone(),
                ctl: ctl.clone(),
                rx,
                conns: Vec::new(),
                free: Vec::new(),
                queue: VecDeque::new(),
                rate: 0.0,
                pace_start: 0,
                paced: 0,
                stats: Stats::default(),
                scratch: vec![0; 64 * 1024],
                frames_reported: 0,
                last_scan: 0,
                dead: Vec::new(),
            };
            joins.push(
                std::thread::Builder::new()
                    .name(format!("client-{i}"))
                    .spawn(move || lp.run())?,
            );
            txs.push((tx, waker));
        }
        Ok(Clients { txs, joins, ctl })
    }

    pub fn send(&self, i: usize, cmd: Cmd) {
        let _ = self.txs[i].0.send(cmd);
        let _ = self.txs[i].1.wake();
    }

    pub fn connect(&self, specs: Vec<Spec>, rate: f64) {
        let t = self.txs.len();
        let mut parts: Vec<Vec<Spec>> = vec![Vec::new(); t];
        for (i, s) in specs.into_iter().enumerate() {
            parts[i % t].push(s);
        }
        for (i, p) in parts.into_iter().enumerate() {
            self.send(i, Cmd::Connect(p, rate / t as f64));
        }
    }

    pub fn collect(&self, reset: Option<u64>) -> Stats {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..self.txs.len() {
            self.send(i, Cmd::Collect(reset, tx.clone()));
        }
        let mut s = Stats::default();
        for _ in 0..self.txs.len() {
            if let Ok(st) = rx.recv_timeout(Duration::from_secs(60)) {
                s.merge(&st);
            }
        }
        if let Some(b) = reset {
            s.seq_base = b;
        }
        s
    }

    pub fn open_users(&self) -> Vec<u32> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..self.txs.len() {
            self.send(i, Cmd::OpenUsers(tx.clone()));
        }
        let mut all = Vec::new();
        for _ in 0..self.txs.len() {
            if let Ok(v) = rx.recv_timeout(Duration::from_secs(60)) {
                all.extend(v);
            }
        }
        all.sort_unstable();
        all
    }

    pub fn open(&self) -> u64 {
        self.ctl.open.load(Ordering::Relaxed)
    }

    pub fn frames(&self) -> u64 {
        self.ctl.frames.load(Ordering::Relaxed)
    }

    pub fn reconnect(&self, target: u16, rate: f64) {
        let t = self.txs.len();
        for i in 0..t {
            self.send(i, Cmd::Reconnect(target, rate / t as f64));
        }
    }

    pub fn close_all(&self) {
        for i in 0..self.txs.len() {
            self.send(i, Cmd::CloseAll);
        }
    }

    pub fn stop(self) {
        for i in 0..self.txs.len() {
            self.send(i, Cmd::Stop);
        }
        for j in self.joins {
            let _ = j.join();
        }
    }
}
