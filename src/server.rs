//! The mio event loop: one per `--workers`, each owning its sockets.
//!
//! Accepting: loop 0 owns the listener and hands accepted sockets to the
//! loops in turn through their inboxes. We chose one acceptor over
//! `SO_REUSEPORT` because it works the same with a socket passed by systemd
//! (one fd) and with port 0 in tests, and keeps the connection limit and the
//! EMFILE reserve in one place; accepting is cheap next to the handshake,
//! which runs on the owning loop.
//!
//! Timers: one coarse tick scans the loop's connections for handshake
//! deadlines, idle timeouts, pings and token expiry. A scan costs a few ns
//! per connection, which is cheaper than keeping a timer structure per
//! connection in memory.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::machine::TryParse;
use tungstenite::handshake::server::{create_response, write_response, Request};
use tungstenite::protocol::{Message, Role, WebSocket, WebSocketConfig};

use crate::auth::{self, Refusal};
use crate::connection::{Conn, Io, Phase};
use crate::dispatch::{Inbox, WorkerHandle};
use crate::notice;
use crate::sessions::ConnId;
use crate::Shared;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// Events taken from one `poll`.
const EVENTS_CAPACITY: usize = 1024;
/// Accepts per listener event before other work gets a turn.
const MAX_ACCEPTS_PER_PASS: usize = 256;
/// Frames read from one connection per event before others get a turn.
const MAX_READS_PER_PASS: usize = 32;
/// Largest HTTP upgrade request; a longer one is answered 431.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// tungstenite's read buffer, set at accept: it stays resident for every
/// connection (its 128 KiB default would dwarf the rest). Clients send
/// little, mostly pongs, and the largest control frame a client can send
/// (125 bytes of payload, 6 of header) fits in one read. Idle server RSS
/// per connection: 1,349 B with 512, 1,092 B with 256 (10k connections).
const READ_BUFFER_BYTES: usize = 256;
/// Extra inbox drains before a pass's flush, while notices keep coming.
const MAX_EXTRA_DRAINS: usize = 4;

/// While flushing, the inbox is drained again after this many connections.
const FLUSH_DRAIN_EVERY: usize = 64;
/// How long a closing connection may take to flush and answer with EOF.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Consecutive broadcast frames are joined into buffers of at most this size
/// (and never more than `--max-queue-bytes`).
const BROADCAST_BATCH_BYTES: usize = 64 * 1024;

/// A client sending more control frames than this per tick is cut (1008).
const MAX_CONTROL_FRAMES_PER_TICK: u32 = 100;
/// Pause after an accept error that retrying at once would not fix (EMFILE).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one accept-error line this often, however long the shortage.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

static PING: &[u8] = &[0x89, 0x00];

/// Binds the WebSocket listener with a backlog fit for connection storms.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into()))
}

pub struct Worker {
    id: u16,
    poll: Poll,
    inbox: Receiver<Inbox>,
    wake_pending: Arc<AtomicBool>,
    shared: Arc<Shared>,
    conns: Slab<Conn>,
    next_generation: u32,
    listener: Option<TcpListener>,
    next_loop: usize,
    accept_paused_until: Option<Instant>,
    last_accept_warning: Option<Instant>,
    /// A spare descriptor, given up to accept-and-close when fds run out.
    reserve_fd: Option<std::fs::File>,
    /// Connections with reads or flushes left over from a capped pass.
    again: Vec<(usize, u32)>,
    dirty: Vec<usize>,
    ws_config: WebSocketConfig,
    tick: Duration,
    draining_until: Option<Instant>,
    delivered: u64,
}

impl Worker {
    /// Creates the loop's poll and the handle other threads reach it by.
    pub fn prepare(id: u16) -> io::Result<(Poll, WorkerHandle, Receiver<Inbox>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let _ = id;
        Ok((
            poll,
            WorkerHandle {
                tx,
                waker,
                wake_pending: Arc::new(AtomicBool::new(false)),
                heartbeat: AtomicU64::new(0),
                queued: Arc::new(AtomicUsize::new(0)),
            },
            rx,
        ))
    }

    pub fn new(
        id: u16,
        poll: Poll,
        inbox: Receiver<Inbox>,
        shared: Arc<Shared>,
        mut listener: Option<TcpListener>,
    ) -> io::Result<Worker> {
        if let Some(l) = listener.as_mut() {
            poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        let c = &shared.config;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(c.max_message_bytes))
            .max_frame_size(Some(c.max_message_bytes));
        let tick = (c.ping_interval.min(c.handshake_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        let wake_pending = shared.workers[id as usize].wake_pending.clone();
        Ok(Worker {
            id,
            poll,
            inbox,
            wake_pending,
            conns: Slab::new(),
            next_generation: 1,
            reserve_fd: listener
                .as_ref()
                .and_then(|_| std::fs::File::open("/dev/null").ok()),
            listener,
            next_loop: 0,
            accept_paused_until: None,
            last_accept_warning: None,
            again: Vec::new(),
            dirty: Vec::new(),
            ws_config,
            tick,
            draining_until: None,
            delivered: 0,
            shared,
        })
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let mut next_tick = Instant::now() + self.tick;
        let inbox = self.inbox.clone();
        let shared = self.shared.clone();
        let heartbeat = &shared.workers[self.id as usize].heartbeat;
        loop {
            heartbeat.store(self.shared.now_ms(), Ordering::Relaxed);
            let now = Instant::now();
            let mut timeout = next_tick.saturating_duration_since(now);
            if !self.again.is_empty() {
                timeout = Duration::ZERO;
            }
            if let Some(p) = self.accept_paused_until {
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
            self.wake_pending.store(false, Ordering::Release);
            self.drain_inbox(&inbox, now);
            for (slot, generation) in std::mem::take(&mut self.again) {
                if self
                    .conns
                    .get(slot)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.on_event(slot, now);
                }
            }
            // Notices that arrived meanwhile join this pass's writes: more
            // frames per writev, fewer syscalls in a burst, no added wait.
            for _ in 0..MAX_EXTRA_DRAINS {
                if inbox.is_empty() {
                    break;
                }
                self.drain_inbox(&inbox, now);
            }
            self.flush_dirty(&inbox, now);
            if self.delivered > 0 {
                self.shared
                    .metrics
                    .messages_delivered
                    .fetch_add(self.delivered, Ordering::Relaxed);
                self.delivered = 0;
            }
            if self.accept_paused_until.is_some_and(|p| now >= p) {
                self.accept_paused_until = None;
                self.accept(now);
            }
            if self.shared.shutting_down.load(Ordering::Acquire) && self.draining_until.is_none() {
                // Notices accepted before the signal go out before the 1001.
                self.drain_inbox(&inbox, now);
                self.flush_dirty(&inbox, now);
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
        for (_, c) in self.conns.iter() {
            if c.is_open() {
                self.shared
                    .metrics
                    .connections
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
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
                self.close(slot, 1011, "internal error", Instant::now());
            } else {
                self.remove(slot);
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        if self.accept_paused_until.is_some() || self.draining_until.is_some() {
            return;
        }
        let Some(listener) = self.listener.take() else {
            return;
        };
        self.accept_from(&listener, now);
        self.listener = Some(listener);
    }

    fn accept_from(&mut self, listener: &TcpListener, now: Instant) {
        for _ in 0..MAX_ACCEPTS_PER_PASS {
            match listener.accept() {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    let target = self.next_loop % self.shared.workers.len();
                    self.next_loop = self.next_loop.wrapping_add(1);
                    if target == self.id as usize {
                        self.add(sock, peer, now);
                    } else if let Err(Inbox::Accepted(..)) =
                        self.shared.workers[target].send(Inbox::Accepted(sock, peer))
                    {
                        self.shared.metrics.reject(auth::Reason::Limit);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.shared
                        .metrics
                        .accept_errors
                        .fetch_add(1, Ordering::Relaxed);
                    // Out of descriptors: the pending connection stays queued
                    // and edge triggering sends no new event, so retrying at
                    // once would spin. Spend the reserve fd to accept and
                    // close one (the client learns at once), then pause.
                    // Close every waiting client, one freed fd at a time.
                    if self.reserve_fd.take().is_some() {
                        while let Ok((sock, _)) = listener.accept() {
                            drop(sock);
                            self.shared.metrics.reject(auth::Reason::Limit);
                        }
                    }
                    // Reopen it (or retry a reserve lost to another thread).
                    self.reserve_fd = std::fs::File::open("/dev/null").ok();
                    if self
                        .last_accept_warning
                        .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARNING_EVERY)
                    {
                        self.last_accept_warning = Some(now);
                        log::warn!("accept failed ({e}); refusing new connections and retrying every {ACCEPT_BACKOFF:?} (logged at most every {ACCEPT_WARNING_EVERY:?})");
                    }
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
        // Capped: come back on the next pass without waiting for an event.
        self.accept_paused_until = Some(now);
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
        entry.insert(Conn {
            generation,
            peer,
            phase: Phase::Handshake {
                io: Io::new(sock),
                buf: Vec::new(),
            },
            since: now,
            last_rx: now,
            last_ping: now,
            control_frames: 0,
            dirty: false,
        });
        // Edge-triggered: data that arrived before registration gave no event.
        self.on_event(slot, now);
    }

    /// Handles what is queued now, not what arrives while we work.
    fn drain_inbox(&mut self, inbox: &Receiver<Inbox>, now: Instant) {
        let n = inbox.len();
        if n == 0 {
            return;
        }
        let queued = self.shared.workers[self.id as usize].queued.clone();
        // Consecutive broadcasts (a burst) are joined into one buffer: each
        // connection is then visited once per batch, takes one chunk, and
        // the batch leaves in one write, however many notices it holds.
        let limit = BROADCAST_BATCH_BYTES.min(self.shared.config.max_queue_bytes);
        let mut batch: Vec<u8> = Vec::new();
        let mut batched = 0u64;
        for msg in inbox.try_iter().take(n) {
            queued.fetch_sub(1, Ordering::AcqRel);
            match msg {
                Inbox::All(frame) => {
                    // A frame over the limit makes a batch of its own.
                    if batched > 0 && batch.len() + frame.len() > limit {
                        self.broadcast(std::mem::take(&mut batch), batched, now);
                        batched = 0;
                    }
                    batch.extend_from_slice(&frame);
                    batched += 1;
                }
                other => {
                    if batched > 0 {
                        self.broadcast(std::mem::take(&mut batch), batched, now);
                        batched = 0;
                    }
                    self.on_inbox(other, now);
                }
            }
        }
        if batched > 0 {
            self.broadcast(batch, batched, now);
        }
    }

    /// Queues `frames` (`count` whole frames, one buffer of this loop's own:
    /// the loops would otherwise bounce one reference count between cores on
    /// every delivery) for every open connection.
    fn broadcast(&mut self, frames: Vec<u8>, count: u64, now: Instant) {
        let max = self.shared.config.max_queue_bytes;
        let frames = Bytes::from(frames);
        let mut cut = Vec::new();
        for (slot, conn) in self.conns.iter_mut() {
            match queue_frame(conn, slot, &frames, max, &mut self.dirty) {
                Queued::Yes => self.delivered += count,
                Queued::Full => cut.push(slot),
                Queued::NotOpen => {}
            }
        }
        self.cut_slow(cut, now);
    }

    fn on_inbox(&mut self, msg: Inbox, now: Instant) {
        let max = self.shared.config.max_queue_bytes;
        let mut cut = Vec::new();
        match msg {
            Inbox::Accepted(sock, peer) => self.add(sock, peer, now),
            Inbox::To(frame, targets) => {
                for (slot, generation) in targets {
                    let slot = slot as usize;
                    match self.conns.get_mut(slot) {
                        Some(conn) if conn.generation == generation => {
                            match queue_frame(conn, slot, &frame, max, &mut self.dirty) {
                                Queued::Yes => self.delivered += 1,
                                Queued::Full => cut.push(slot),
                                Queued::NotOpen => {}
                            }
                        }
                        _ => {}
                    }
                }
            }
            Inbox::All(frame) => self.broadcast(frame.to_vec(), 1, now),
        }
        self.cut_slow(cut, now);
    }

    fn cut_slow(&mut self, cut: Vec<usize>, now: Instant) {
        let max = self.shared.config.max_queue_bytes;
        for slot in cut {
            self.shared
                .metrics
                .slow_consumer_closed
                .fetch_add(1, Ordering::Relaxed);
            if let Some(conn) = self.conns.get(slot) {
                log::info!(
                    "conn={} peer={} slow consumer: queue over {max} bytes, closing 1008",
                    conn_label(slot, conn),
                    conn.peer
                );
            }
            self.close(slot, 1008, "slow consumer", now);
        }
    }

    /// Writes every connection with something queued. A flush of thousands
    /// of connections takes milliseconds, and the rest of a burst arrives
    /// meanwhile: every [`FLUSH_DRAIN_EVERY`] connections the inbox is
    /// drained again, so the connections not yet written take the new
    /// notices in the same write (those already written get one more write,
    /// in a second round). Nothing waits for more to come.
    fn flush_dirty(&mut self, inbox: &Receiver<Inbox>, now: Instant) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for (i, slot) in dirty.drain(..).enumerate() {
            if i % FLUSH_DRAIN_EVERY == FLUSH_DRAIN_EVERY - 1 && !inbox.is_empty() {
                self.drain_inbox(inbox, now);
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

    /// Writes the connection's queue; finishes a closing connection whose
    /// queue is empty; removes a connection whose socket failed.
    fn flush(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let Some(io) = conn.io_mut() else { return };
        match io.flush_out() {
            Ok(true) => {
                if let Phase::Closing { io, write_shut, .. } = &mut conn.phase {
                    if !*write_shut {
                        io.shutdown_write();
                        *write_shut = true;
                    }
                }
            }
            Ok(false) => {}
            Err(_) => self.remove(slot),
        }
    }

    fn on_event(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match &mut conn.phase {
            Phase::Handshake { .. } => self.read_handshake(slot, now),
            Phase::Open { .. } => self.read_frames(slot, now),
            Phase::Closing { io, .. } => {
                // Discard what the peer still sends; EOF means done.
                let mut scratch = [0u8; 1024];
                for _ in 0..MAX_READS_PER_PASS {
                    match io.sock.read(&mut scratch) {
                        Ok(0) => return self.remove(slot),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.remove(slot),
                    }
                }
            }
            Phase::Gone => {}
        }
        self.flush(slot);
    }

    fn read_handshake(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let Phase::Handshake { io, buf } = &mut conn.phase else {
            return;
        };
        let mut chunk = [0u8; 2048];
        let mut capped = true;
        let mut eof = false;
        for _ in 0..MAX_READS_PER_PASS {
            match io.sock.read(&mut chunk) {
                Ok(0) => {
                    // A request followed by a half-close still gets its answer.
                    eof = true;
                    capped = false;
                    break;
                }
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_REQUEST_BYTES {
                        return self.refuse(slot, auth::TOO_LARGE, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    capped = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.remove(slot),
            }
        }
        if capped {
            self.again.push((slot, conn.generation));
        }
        let parsed = Request::try_parse(buf);
        match parsed {
            Ok(None) if eof => self.remove(slot),
            Ok(None) => {}
            Err(WsError::Protocol(ProtocolError::WrongHttpMethod)) => {
                self.refuse(slot, auth::METHOD, now)
            }
            Err(_) => self.refuse(slot, auth::NOT_UPGRADE, now),
            Ok(Some((used, req))) => self.upgrade(slot, used, req, now),
        }
    }

    fn upgrade(&mut self, slot: usize, used: usize, req: Request, now: Instant) {
        let shared = self.shared.clone();
        if shared.config.dev && req.uri().path() == "/" {
            return self.answer(
                slot,
                200,
                "text/html; charset=utf-8",
                crate::admin::DEMO_PAGE.as_bytes(),
                now,
            );
        }
        if req.uri().path() != shared.config.auth.path {
            return self.refuse(slot, auth::NOT_FOUND, now);
        }
        let Ok(response) = create_response(&req) else {
            return self.refuse(slot, auth::NOT_UPGRADE, now);
        };
        if shared.shutting_down.load(Ordering::Relaxed) {
            return self.refuse(slot, auth::SHUTTING_DOWN, now);
        }
        let identity = match auth::check(
            &req,
            &shared.config.auth,
            &shared.keys.current(),
            auth::unix_now(),
        ) {
            Ok(id) => id,
            Err(r) => return self.refuse(slot, r, now),
        };
        let open = shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
        if open >= shared.config.max_connections as u64 {
            shared.metrics.connections.fetch_sub(1, Ordering::Relaxed);
            return self.refuse(slot, auth::OVER_LIMIT, now);
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let Phase::Handshake { mut io, buf } = std::mem::replace(&mut conn.phase, Phase::Gone)
        else {
            return;
        };
        let mut head = Vec::with_capacity(160);
        let _ = write_response(&mut head, &response);
        io.out.push(Bytes::from(head));
        let rest = buf.get(used..).map(<[u8]>::to_vec).unwrap_or_default();
        let ws = WebSocket::from_partially_read(io, rest, Role::Server, Some(self.ws_config));
        shared.sessions.add(
            &identity.user,
            ConnId {
                worker: self.id,
                slot: slot as u32,
                generation: conn.generation,
            },
        );
        shared
            .metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "conn={} user={} peer={} open",
            conn_label(slot, conn),
            identity.user,
            conn.peer
        );
        conn.phase = Phase::Open {
            ws: Box::new(ws),
            user: identity.user.into(),
            expires: identity.expires,
        };
        conn.last_rx = now;
        // The first ping comes `ping_skew` later than the interval, so that
        // connections opened together (a reconnect storm after a deploy)
        // are not all pinged in the same tick ever after.
        conn.last_ping = now + ping_skew(conn.generation, &self.shared.config);
        // Frames sent right behind the request are already buffered.
        self.read_frames(slot, now);
    }

    fn refuse(&mut self, slot: usize, r: Refusal, now: Instant) {
        self.shared.metrics.reject(r.reason);
        if let Some(conn) = self.conns.get(slot) {
            log::debug!(
                "conn={} peer={} refused {} {}",
                conn_label(slot, conn),
                conn.peer,
                r.status,
                r.message
            );
        }
        let body = format!("{}\n", r.message);
        self.answer(
            slot,
            r.status,
            "text/plain; charset=utf-8",
            body.as_bytes(),
            now,
        );
    }

    /// Answers plain HTTP and closes: every refusal is a proper response.
    fn answer(&mut self, slot: usize, status: u16, content_type: &str, body: &[u8], now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let Phase::Handshake { mut io, .. } = std::mem::replace(&mut conn.phase, Phase::Gone)
        else {
            return;
        };
        let reason = crate::http::reason_phrase(status);
        let mut head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            body.len()
        );
        if status == 503 {
            head.push_str("Retry-After: 5\r\n");
        }
        head.push_str("\r\n");
        io.out.push(Bytes::from(head));
        io.out.push(Bytes::copy_from_slice(body));
        conn.phase = Phase::Closing {
            io,
            until: now + CLOSE_LINGER,
            write_shut: false,
        };
        self.flush(slot);
    }

    fn read_frames(&mut self, slot: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let Phase::Open { ws, .. } = &mut conn.phase else {
            return;
        };
        let mut outcome = None;
        let mut capped = true;
        for _ in 0..MAX_READS_PER_PASS {
            match ws.read() {
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => conn.control_frames += 1,
                // Debug builds only: lets the test suite prove that a panic
                // is contained and that a stalled loop's inbox overflows
                // safely. Release builds have no such hooks.
                #[cfg(debug_assertions)]
                Ok(Message::Text(t)) if std::env::var_os("PUSHWIRE_TEST_HOOKS").is_some() => {
                    match t.as_str() {
                        "__pushwire_test_panic__" => panic!("test panic requested by the client"),
                        "__pushwire_test_stall__" => std::thread::sleep(Duration::from_secs(3)),
                        _ => {}
                    }
                }
                Ok(Message::Close(_)) => {
                    // tungstenite queued the close reply; send it and finish.
                    let _ = ws.flush();
                    outcome = Some((1000, ""));
                    break;
                }
                Ok(_) => {}
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    capped = false;
                    break;
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => {
                    outcome = Some((1000, ""));
                    break;
                }
                Err(WsError::Capacity(_)) => {
                    outcome = Some((1009, "message too big"));
                    break;
                }
                Err(WsError::Utf8(_)) => {
                    outcome = Some((1007, "invalid UTF-8"));
                    break;
                }
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                    outcome = Some((0, ""));
                    break;
                }
                Err(WsError::Protocol(_)) => {
                    outcome = Some((1002, "protocol error"));
                    break;
                }
                Err(_) => {
                    outcome = Some((0, ""));
                    break;
                }
            }
        }
        // Pongs tungstenite queued go to our queue (they never block there).
        let _ = ws.flush();
        let io = ws.get_mut();
        if std::mem::take(&mut io.got_bytes) {
            conn.last_rx = now;
        }
        if conn.control_frames > MAX_CONTROL_FRAMES_PER_TICK && outcome.is_none() {
            outcome = Some((1008, "too many control frames"));
        }
        match outcome {
            None => {
                if capped {
                    self.again.push((slot, conn.generation));
                }
                if !conn.dirty && !conn.io_mut().is_some_and(|io| io.out.is_empty()) {
                    conn.dirty = true;
                    self.dirty.push(slot);
                }
            }
            // The peer is gone: nothing to say.
            Some((0, _)) => self.remove(slot),
            Some((1000, _)) => self.close(slot, 0, "", now),
            Some((code, reason)) => {
                self.shared
                    .metrics
                    .protocol_closed
                    .fetch_add(1, Ordering::Relaxed);
                log::debug!("conn={slot} closing {code} {reason}");
                self.close(slot, code, reason, now);
            }
        }
    }

    /// Leaves the Open phase: unregisters the user, queues a close frame
    /// (code 0: none, tungstenite already answered the peer's close) behind
    /// whatever is queued, and lingers until flushed.
    fn close(&mut self, slot: usize, code: u16, reason: &str, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let Phase::Open { ws, user, .. } = std::mem::replace(&mut conn.phase, Phase::Gone) else {
            return;
        };
        self.shared.sessions.remove(
            &user,
            ConnId {
                worker: self.id,
                slot: slot as u32,
                generation: conn.generation,
            },
        );
        self.shared
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        let mut io = ws.into_inner();
        if code != 0 {
            io.out.push(notice::close_frame(code, reason));
        }
        conn.phase = Phase::Closing {
            io,
            until: now + CLOSE_LINGER,
            write_shut: false,
        };
        self.flush(slot);
    }

    fn remove(&mut self, slot: usize) {
        let Some(conn) = self.conns.try_remove(slot) else {
            return;
        };
        if let Phase::Open { user, .. } = &conn.phase {
            self.shared.sessions.remove(
                user,
                ConnId {
                    worker: self.id,
                    slot: slot as u32,
                    generation: conn.generation,
                },
            );
            self.shared
                .metrics
                .connections
                .fetch_sub(1, Ordering::Relaxed);
        }
        // Dropping the socket closes it and takes it out of the poll.
    }

    fn on_tick(&mut self, now: Instant) {
        let c = &self.shared.config;
        let (hs_timeout, idle, ping) = (c.handshake_timeout, c.idle_timeout, c.ping_interval);
        let unix = auth::unix_now();
        let mut expired = Vec::new();
        let mut idle_out = Vec::new();
        let mut gone = Vec::new();
        let mut pinged = Vec::new();
        let mut handshake_timeouts = 0;
        for (slot, conn) in self.conns.iter_mut() {
            conn.control_frames = 0;
            match &mut conn.phase {
                Phase::Handshake { .. } => {
                    if now.duration_since(conn.since) >= hs_timeout {
                        handshake_timeouts += 1;
                        gone.push(slot);
                    }
                }
                Phase::Open { ws, expires, .. } => {
                    if now.duration_since(conn.last_rx) >= idle {
                        idle_out.push(slot);
                    } else if expires.is_some_and(|e| unix > e.saturating_add(auth::LEEWAY_SECS)) {
                        expired.push(slot);
                    } else if now.duration_since(conn.last_rx.max(conn.last_ping)) >= ping {
                        ws.get_mut().out.push(Bytes::from_static(PING));
                        conn.last_ping = now;
                        pinged.push(slot);
                    }
                }
                Phase::Closing { until, .. } => {
                    if now >= *until {
                        gone.push(slot);
                    }
                }
                Phase::Gone => gone.push(slot),
            }
        }
        let m = &self.shared.metrics;
        m.reject_n(auth::Reason::Timeout, handshake_timeouts);
        m.idle_closed
            .fetch_add(idle_out.len() as u64, Ordering::Relaxed);
        m.token_expired_closed
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        for slot in gone.into_iter().chain(idle_out) {
            self.remove(slot);
        }
        for slot in expired {
            self.close(slot, 4001, "token expired", now);
        }
        for slot in pinged {
            self.flush(slot);
        }
    }

    fn start_drain(&mut self, now: Instant) {
        self.draining_until = Some(now + self.shared.config.shutdown_timeout);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let slots: Vec<(usize, bool)> = self.conns.iter().map(|(k, c)| (k, c.is_open())).collect();
        for (slot, open) in slots {
            if open {
                self.close(slot, 1001, "going away", now);
            } else if let Some(Phase::Handshake { .. }) = self.conns.get(slot).map(|c| &c.phase) {
                self.refuse(slot, auth::SHUTTING_DOWN, now);
            }
        }
        // Closing connections linger until flushed or the drain limit.
        let until = now + self.shared.config.shutdown_timeout;
        for (_, conn) in self.conns.iter_mut() {
            if let Phase::Closing { until: u, .. } = &mut conn.phase {
                *u = (*u).max(until);
            }
        }
    }
}

/// How much later than `--ping-interval` a connection gets its first ping:
/// spread evenly (golden-ratio steps over the loop's connection counter) over
/// a quarter of the interval, and never so much that the idle timeout comes
/// before the ping. A round of pings then costs a loop a few hundred sends
/// per tick instead of one send per connection in a single tick.
pub(crate) fn ping_skew(generation: u32, c: &crate::config::Config) -> Duration {
    let room = c
        .ping_interval
        .div_f64(4.0)
        .min(c.idle_timeout.saturating_sub(c.ping_interval) / 2);
    let fraction = (u64::from(generation).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64
        / (1u64 << 53) as f64;
    room.mul_f64(fraction)
}

enum Queued {
    Yes,
    /// The queue would pass `--max-queue-bytes`: a slow consumer to cut.
    Full,
    /// Handshaking or closing: not a recipient.
    NotOpen,
}

/// Queues a frame for an open connection and marks it for the flush at the
/// end of the pass. A frame always fits an empty queue, so a notice up to
/// the 1 MiB notice limit reaches a client that keeps up, whatever `max`.
fn queue_frame(
    conn: &mut Conn,
    slot: usize,
    frame: &Bytes,
    max: usize,
    dirty: &mut Vec<usize>,
) -> Queued {
    let Phase::Open { ws, .. } = &mut conn.phase else {
        return Queued::NotOpen;
    };
    let out = &mut ws.get_mut().out;
    if !out.is_empty() && out.len() + frame.len() > max {
        return Queued::Full;
    }
    out.push(frame.clone());
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(slot);
    }
    Queued::Yes
}

fn conn_label(slot: usize, conn: &Conn) -> String {
    format!("{slot}.{}", conn.generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_skew_spreads_first_pings_over_a_quarter_interval() {
        let c = crate::config::Config::default();
        let room = c.ping_interval / 4;
        let mut buckets = [0u32; 10];
        for g in 1..=1000u32 {
            let s = ping_skew(g, &c);
            assert!(s < room, "{s:?}");
            buckets[(s.as_secs_f64() / room.as_secs_f64() * 10.0) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (80..=120).contains(&n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn ping_skew_never_lets_the_idle_timeout_come_first() {
        let c = crate::config::Config {
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(26),
            ..Default::default()
        };
        for g in 1..=1000u32 {
            assert!(ping_skew(g, &c) <= Duration::from_millis(500));
        }
    }
}
