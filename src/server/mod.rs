//! The mio event loop: one per `--workers`, each owning its sockets. This
//! file is the loop itself (polling, timers, fairness, the drain) and what
//! it does with each connection's [`Step`]; `accept` holds the listener
//! side, `inbox` the deliveries.
//!
//! Timers: one coarse tick scans the loop's connections for handshake
//! deadlines, idle timeouts, pings and token expiry. A scan costs a few ns
//! per connection, which is cheaper than keeping a timer structure per
//! connection in memory.

mod accept;
mod inbox;
mod recovery;
mod upgrade;

pub use recovery::from_replay_token;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

pub use accept::bind;
use accept::Acceptor;

use crate::auth::{self, Refusal};
use crate::config::Config;
use crate::connection::{Close, Conn, Due, Step, Timers};
use crate::dispatch::{DurableState, LoopEnd, LoopHandle};
use crate::metrics::Metrics;
use crate::replay::Replayer;
use crate::sessions::{ConnId, Sessions};
use crate::status::Status;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// The browser client served at `/pushwire.js`.
const CLIENT_JS: &[u8] = include_bytes!("../pushwire.js");

/// Events taken from one `poll`.
const EVENTS_CAPACITY: usize = 1024;
/// tungstenite's read buffer, set at accept: it stays resident for every
/// connection (its 128 KiB default would dwarf the rest). Clients send
/// little, mostly pongs, and the largest control frame a client can send
/// (125 bytes of payload, 6 of header) fits in one read. The measured
/// effect on idle memory is in bench/results.md ("Tuning").
const READ_BUFFER_BYTES: usize = 256;
/// Where a client asks about its own user (the demo page).
const PRESENCE_ME: &str = "/presence/me";
/// Extra inbox drains before a pass's flush, while notices keep coming.
const MAX_EXTRA_DRAINS: usize = 4;
/// How soon a loop with recoveries waiting for the replayer's room asks
/// again (it also asks whenever replies come back).
const RECOVERY_RETRY: Duration = Duration::from_millis(5);

/// What every loop reads and shares with the other threads.
#[derive(Clone)]
pub struct LoopCtx {
    pub config: Arc<Config>,
    pub keys: Arc<auth::Keys>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub durable: Arc<DurableState>,
    /// Recovery reads (with Redis and history on).
    pub replayer: Option<Arc<Replayer>>,
    /// Per-user counts to Redis (with Redis).
    pub presence: Option<Arc<crate::presence::Presence>>,
}

pub struct Worker {
    id: u16,
    poll: Poll,
    end: LoopEnd,
    ctx: LoopCtx,
    conns: Slab<Conn>,
    next_generation: u32,
    /// Loop 0 owns the listener.
    acceptor: Option<Acceptor>,
    /// Connections with reads left over from a capped pass.
    again: Vec<(usize, u32)>,
    dirty: Vec<usize>,
    ws_config: WebSocketConfig,
    tick: Duration,
    draining_until: Option<Instant>,
    delivered: u64,
    /// Open connections of this loop that use `since`.
    durable_here: usize,
    /// The upgrade's checks, at `/presence/me`.
    me_policy: auth::AuthConfig,
    /// Recovery reads waiting for room in the replayer's queue, in turn.
    recoveries_waiting: std::collections::VecDeque<crate::replay::Request>,
}

/// A loop's poll and the two ends of its queues, made before any loop runs
/// so that every loop (and the acceptor) can be given every handle.
pub fn prepare() -> io::Result<(Poll, LoopHandle, LoopEnd)> {
    let poll = Poll::new()?;
    let (handle, end) = crate::dispatch::loop_channel(poll.registry(), WAKER)?;
    Ok((poll, handle, end))
}

impl Worker {
    pub fn new(
        id: u16,
        poll: Poll,
        end: LoopEnd,
        ctx: LoopCtx,
        listener: Option<(TcpListener, Arc<[LoopHandle]>)>,
    ) -> io::Result<Worker> {
        let acceptor = match listener {
            Some((mut l, loops)) => {
                poll.registry()
                    .register(&mut l, LISTENER, Interest::READABLE)?;
                Some(Acceptor::new(l, loops))
            }
            None => None,
        };
        let c = &ctx.config;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(c.max_message_bytes))
            .max_frame_size(Some(c.max_message_bytes));
        let me_policy = auth::AuthConfig {
            path: PRESENCE_ME.to_string(),
            ..c.auth.clone()
        };
        let tick = (c.ping_interval.min(c.handshake_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        Ok(Worker {
            id,
            poll,
            end,
            ctx,
            conns: Slab::new(),
            next_generation: 1,
            acceptor,
            again: Vec::new(),
            dirty: Vec::new(),
            ws_config,
            tick,
            draining_until: None,
            delivered: 0,
            durable_here: 0,
            me_policy,
            recoveries_waiting: std::collections::VecDeque::new(),
        })
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let mut next_tick = Instant::now() + self.tick;
        let end = self.end.clone();
        loop {
            end.beat(self.ctx.status.now_ms());
            let now = Instant::now();
            let mut timeout = next_tick.saturating_duration_since(now);
            if !self.again.is_empty() {
                timeout = Duration::ZERO;
            }
            if !self.recoveries_waiting.is_empty() {
                // The replayer's room frees as it answers any loop: look
                // again soon.
                timeout = timeout.min(RECOVERY_RETRY);
            }
            if let Some(p) = self.acceptor.as_ref().and_then(Acceptor::paused_until) {
                timeout = timeout.min(p.saturating_duration_since(now));
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("loop {}: poll failed: {e}", self.id);
                break;
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    WAKER => {}
                    Token(slot) => self.contain(slot, |w| w.on_event(slot, now)),
                }
            }
            end.clear_wake();
            for a in end.accepted() {
                self.add(a.0, a.1, now);
            }
            for r in end.replies() {
                self.on_replayed(r);
            }
            if !self.recoveries_waiting.is_empty() {
                self.ask_waiting_recoveries();
            }
            self.drain_inbox(&end, now);
            for (slot, generation) in std::mem::take(&mut self.again) {
                if self
                    .conns
                    .get(slot)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.contain(slot, |w| w.on_event(slot, now));
                }
            }
            // Notices that arrived meanwhile join this pass's writes: more
            // frames per writev, fewer syscalls in a burst, no added wait.
            for _ in 0..MAX_EXTRA_DRAINS {
                if end.is_empty() {
                    break;
                }
                self.drain_inbox(&end, now);
            }
            self.flush_dirty(&end, now);
            if self.delivered > 0 {
                self.ctx
                    .metrics
                    .messages_delivered
                    .fetch_add(self.delivered, Ordering::Relaxed);
                self.delivered = 0;
            }
            if self
                .acceptor
                .as_ref()
                .and_then(Acceptor::paused_until)
                .is_some_and(|p| now >= p)
            {
                self.accept(now);
            }
            if self.ctx.status.is_shutting_down() && self.draining_until.is_none() {
                // Notices accepted before the signal go out before the 1001.
                self.drain_inbox(&end, now);
                self.flush_dirty(&end, now);
                self.start_drain(now);
            }
            if now >= next_tick {
                self.on_tick(now);
                next_tick = now + self.tick;
            }
            if let Some(until) = self.draining_until {
                if self.conns.is_empty() || now >= until {
                    break;
                }
            }
        }
        let left = self.conns.len();
        let open = self.conns.iter().filter(|(_, c)| c.is_open()).count();
        self.ctx
            .metrics
            .connections
            .fetch_sub(open as u64, Ordering::Relaxed);
        log::debug!(
            "loop {} stopped ({left} connections cut at the drain limit)",
            self.id
        );
    }

    /// Runs one connection's handling; a panic in it (a bug: nothing a
    /// peer sends should cause one) costs that connection, not the loop.
    fn contain(&mut self, slot: usize, f: impl FnOnce(&mut Self)) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if r.is_err() {
            log::error!(
                "loop {}: a panic while handling conn={slot}; closing it with 1011",
                self.id
            );
            if self.conns.get(slot).is_some_and(Conn::is_open) {
                self.close(slot, Close::Code(1011, "internal error"), Instant::now());
            } else {
                self.remove(slot);
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        if self.draining_until.is_some() {
            return;
        }
        let Some(mut acceptor) = self.acceptor.take() else {
            return;
        };
        let metrics = self.ctx.metrics.clone();
        acceptor.accept(self.id, &metrics, now, |sock, peer| {
            self.add(sock, peer, now)
        });
        self.acceptor = Some(acceptor);
    }

    fn add(&mut self, mut sock: TcpStream, peer: SocketAddr, now: Instant) {
        if self.draining_until.is_some() {
            return;
        }
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register a connection from {peer}: {e}");
            return;
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        entry.insert(Conn::new(sock, peer, generation, now));
        // Edge-triggered: data that arrived before registration gave no event.
        self.on_event(slot, now);
    }

    fn on_event(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let step = conn.read(now);
        self.apply(slot, step, now);
        self.flush(slot);
    }

    /// Carries out what a connection asked for.
    fn apply(&mut self, slot: usize, step: Step, now: Instant) {
        match step {
            Step::Continue => {}
            Step::Again => {
                if let Some(c) = self.conns.get(slot) {
                    self.again.push((slot, c.generation));
                }
            }
            Step::Request(req, used) => self.upgrade(slot, &req, used, now),
            Step::Refuse(r) => self.refuse(slot, r, now),
            Step::Close(how) => {
                if let Close::Code(code, reason) = how {
                    self.ctx
                        .metrics
                        .protocol_closed
                        .fetch_add(1, Ordering::Relaxed);
                    log::debug!("conn={slot} closing {code} {reason}");
                }
                self.close(slot, how, now);
            }
            Step::Gone => self.remove(slot),
        }
    }

    fn conn_id(&self, slot: usize, generation: u32) -> ConnId {
        ConnId {
            worker: self.id,
            slot: slot as u32,
            generation,
        }
    }

    fn refuse(&mut self, slot: usize, r: Refusal, now: Instant) {
        self.ctx.metrics.reject(r.reason);
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        log::debug!(
            "conn={} peer={} refused {} {}",
            conn.label(slot),
            conn.peer,
            r.status,
            r.message
        );
        let body = format!("{}\n", r.message);
        conn.answer(r.status, "text/plain; charset=utf-8", body.as_bytes(), now);
        self.flush(slot);
    }

    /// Leaves the Open phase: unregisters the user and lingers until the
    /// close frame is flushed.
    fn close(&mut self, slot: usize, how: Close, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let generation = conn.generation;
        if let Some((user, durable)) = conn.close(how, now) {
            self.left(&user, durable, slot, generation);
        }
        self.flush(slot);
    }

    /// Bookkeeping for a connection that is no longer open.
    fn left(&mut self, user: &str, durable: bool, slot: usize, generation: u32) {
        if durable {
            self.durable_here -= 1;
            self.ctx.durable.connections.fetch_sub(1, Ordering::Relaxed);
        }
        self.ctx
            .sessions
            .remove(user, self.conn_id(slot, generation));
        if let Some(p) = &self.ctx.presence {
            p.changed(user);
        }
        self.ctx.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// `GET /presence/me`, authenticated exactly as the upgrade (token,
    /// header or `?user=`, origin): how many connections the caller's own
    /// user holds on this node. It takes no user parameter but the
    /// credentials, so it tells nobody anything about another user. Local,
    /// so the loop never waits on Redis.
    fn remove(&mut self, slot: usize) {
        let Some(conn) = self.conns.try_remove(slot) else {
            return;
        };
        if let Some((user, durable)) = conn.open_user() {
            self.left(user, durable, slot, conn.generation);
        }
        // Dropping the socket closes it and takes it out of the poll.
    }

    /// Writes the connection's queue; removes it when its socket failed.
    fn flush(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if let Step::Gone = conn.flush() {
            self.remove(slot);
        }
    }

    fn on_tick(&mut self, now: Instant) {
        let c = &self.ctx.config;
        let timers = Timers {
            handshake: c.handshake_timeout,
            idle: c.idle_timeout,
            ping: c.ping_interval,
            unix_now: auth::unix_now(),
        };
        let mut expired = Vec::new();
        let mut gone = Vec::new();
        let mut pinged = Vec::new();
        let (mut handshake_timeouts, mut idle) = (0, 0);
        for (slot, conn) in self.conns.iter_mut() {
            match conn.tick(now, &timers) {
                Due::Nothing => {}
                Due::HandshakeTimeout => {
                    handshake_timeouts += 1;
                    gone.push(slot);
                }
                Due::IdleTimeout => {
                    idle += 1;
                    gone.push(slot);
                }
                Due::TokenExpired => expired.push(slot),
                Due::Pinged => pinged.push(slot),
                Due::LingerOver => gone.push(slot),
            }
        }
        let m = &self.ctx.metrics;
        m.reject_n(auth::Reason::Timeout, handshake_timeouts);
        m.idle_closed.fetch_add(idle, Ordering::Relaxed);
        m.token_expired_closed
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        for slot in gone {
            self.remove(slot);
        }
        for slot in expired {
            self.close(slot, Close::Code(4001, "token expired"), now);
        }
        for slot in pinged {
            self.flush(slot);
        }
    }

    fn start_drain(&mut self, now: Instant) {
        self.draining_until = Some(now + self.ctx.config.shutdown_timeout);
        if let Some(a) = self.acceptor.as_mut() {
            a.stop(self.poll.registry());
        }
        let slots: Vec<(usize, bool)> = self.conns.iter().map(|(k, c)| (k, c.is_open())).collect();
        for (slot, open) in slots {
            if open {
                self.close(slot, Close::Code(1001, "going away"), now);
            } else {
                // Still handshaking: a 503 (a no-op for closing ones).
                self.refuse_if_handshaking(slot, now);
            }
        }
        // Closing connections linger until flushed or the drain limit.
        let until = now + self.ctx.config.shutdown_timeout;
        for (_, conn) in self.conns.iter_mut() {
            conn.linger_until(until);
        }
    }

    fn refuse_if_handshaking(&mut self, slot: usize, now: Instant) {
        if let Some(conn) = self.conns.get(slot) {
            if matches!(conn.phase, crate::connection::Phase::Handshake { .. }) {
                self.refuse(slot, auth::SHUTTING_DOWN, now);
            }
        }
    }
}
