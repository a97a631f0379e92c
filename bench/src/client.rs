//! One client thread: a mio loop over its share of the connections.
//!
//! It paces new connects, runs each connection from connect through the
//! upgrade to open, answers pings with masked pongs and closes with a close,
//! and hands text frames to its `Stats`. Per connection it keeps a socket,
//! a user id, a start time and two Vecs that are empty unless a frame or a
//! write was cut short. The main thread drives it with `Cmd`s.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::clients::{Cmd, Ctl, Resume, Spec};
use crate::os::mono_ns;
use crate::stats::Stats;
use crate::wire::{find, json_num, masked_frame, open_socket, short_err, ClientCfg, WS_ACCEPT};

#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    Connecting,
    Handshake,
    Open,
}

pub struct Conn {
    sock: TcpStream,
    user: u32,
    st: St,
    started: u64,
    /// A partial frame (or partial 101 answer) carried to the next read.
    inbuf: Vec<u8>,
    /// Bytes a write could not take yet.
    out: Vec<u8>,
    target: u16,
    src: u8,
    /// Durable clients: the last id and seq seen, whether this connection
    /// came back with `since=<id>`, frames before its status frame.
    last_id: String,
    last_seq: Option<u64>,
    resumed: bool,
    pre_status: u64,
    status_seen: bool,
}

pub const WAKE: Token = Token(usize::MAX - 1);

pub struct ClientLoop {
    pub poll: Poll,
    pub cfg: Arc<ClientCfg>,
    pub ctl: Arc<Ctl>,
    pub rx: Receiver<Cmd>,
    pub conns: Vec<Option<Conn>>,
    pub free: Vec<usize>,
    pub queue: VecDeque<Spec>,
    pub rate: f64,
    pub pace_start: u64,
    pub paced: u64,
    pub stats: Stats,
    pub scratch: Vec<u8>,
    pub frames_reported: u64,
    pub last_scan: u64,
    /// Durable connections the server dropped, kept for `Cmd::Reconnect`.
    pub dead: Vec<Spec>,
}

impl ClientLoop {
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.queue.is_empty() {
                Duration::from_millis(50)
            } else if self.rate <= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_millis(1)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("client loop: poll: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKE {
                    continue;
                }
                let slot = ev.token().0;
                self.on_event(
                    slot,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                );
            }
            while let Ok(cmd) = self.rx.try_recv() {
                match cmd {
                    Cmd::Connect(specs, rate) => {
                        self.queue.extend(specs);
                        self.rate = rate;
                        self.pace_start = mono_ns();
                        self.paced = 0;
                    }
                    Cmd::Collect(reset, tx) => {
                        let _ = tx.send(self.stats.clone());
                        if let Some(base) = reset {
                            self.stats.reset_msgs(base);
                        }
                    }
                    Cmd::OpenUsers(tx) => {
                        let users = self
                            .conns
                            .iter()
                            .flatten()
                            .filter(|c| c.st == St::Open)
                            .map(|c| c.user)
                            .collect();
                        let _ = tx.send(users);
                    }
                    Cmd::CloseAll => self.close_all(),
                    Cmd::Reconnect(target, rate) => {
                        let mut dead = std::mem::take(&mut self.dead);
                        for s in &mut dead {
                            s.target = target;
                        }
                        self.queue.extend(dead);
                        self.rate = rate;
                        self.pace_start = mono_ns();
                        self.paced = 0;
                    }
                    Cmd::Stop => return,
                }
            }
            self.pace_connects();
            let now = mono_ns();
            if now.saturating_sub(self.last_scan) > 100_000_000 {
                self.last_scan = now;
                self.scan_timeouts(now);
            }
            let delta = self.stats.frames.wrapping_sub(self.frames_reported);
            if delta != 0 {
                self.ctl.frames.fetch_add(delta, Ordering::Relaxed);
                self.frames_reported = self.stats.frames;
            }
        }
    }

    fn pace_connects(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let now = mono_ns();
        let allowed = if self.rate <= 0.0 {
            u64::MAX
        } else {
            (now.saturating_sub(self.pace_start) as f64 * self.rate / 1e9) as u64 + 1
        };
        let mut n = 0;
        while self.paced < allowed && n < 256 {
            let Some(spec) = self.queue.pop_front() else {
                break;
            };
            self.start_connect(spec);
            self.paced += 1;
            n += 1;
        }
    }

    fn start_connect(&mut self, spec: Spec) {
        let now = mono_ns();
        self.stats.attempted += 1;
        if self.stats.first_attempt == 0 {
            self.stats.first_attempt = now;
        }
        let addr = self.cfg.targets[spec.target as usize].addr;
        let mut sock = match open_socket(addr, spec.src) {
            Ok(s) => s,
            Err(e) => {
                self.stats.fail(format!("local: {}", short_err(&e)));
                self.ctl.done.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            self.stats.fail(format!("register: {}", short_err(&e)));
            self.ctl.done.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let resumed = spec.resume.is_some();
        let r = spec.resume.map(|b| *b).unwrap_or_default();
        self.conns[slot] = Some(Conn {
            sock,
            user: spec.user,
            st: St::Connecting,
            started: now,
            inbuf: Vec::new(),
            out: Vec::new(),
            target: spec.target,
            src: spec.src,
            last_id: r.last_id,
            last_seq: r.last_seq,
            resumed,
            pre_status: 0,
            status_seen: false,
        });
    }

    fn conn_mut(&mut self, slot: usize) -> Option<&mut Conn> {
        self.conns.get_mut(slot).and_then(Option::as_mut)
    }

    /// Drops a connection: a failed attempt, or an open one the server cut.
    pub fn fail(&mut self, slot: usize, why: String) {
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::take) {
            self.free.push(slot);
            if c.st == St::Open {
                self.stats.dropped_open += 1;
                self.ctl.open.fetch_sub(1, Ordering::Relaxed);
                self.keep_dead(c);
            } else {
                self.stats.fail(why);
                self.ctl.done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A durable connection the server dropped: kept to come back with
    /// its last id.
    fn keep_dead(&mut self, c: Conn) {
        if self.cfg.since {
            self.dead.push(Spec {
                user: c.user,
                target: c.target,
                src: c.src,
                resume: Some(Box::new(Resume {
                    last_id: c.last_id,
                    last_seq: c.last_seq,
                })),
            });
        }
    }

    /// A text frame on a durable connection: the envelope's id and seq
    /// (order per connection), or the status frame after a recovery.
    fn on_durable(&mut self, slot: usize, p: &[u8], now: u64) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let st = &mut self.stats;
        if p.starts_with(b"{\"recovered\"") {
            // Not counted in `frames` (notices): a wait for N notices
            // must not end early on status frames.
            let ok = find(p, b"true").is_some();
            let n = json_num(p, b"\"replayed\":").unwrap_or(0);
            if ok {
                st.status_ok += 1;
                if n != conn.pre_status {
                    st.replayed_mismatch += 1;
                }
            } else {
                st.status_missed += 1;
            }
            if conn.status_seen || !conn.resumed {
                st.status_unexpected += 1;
            }
            st.replayed_sum += n;
            conn.status_seen = true;
            st.recover.record(now.saturating_sub(conn.started));
            st.last_recovered = st.last_recovered.max(now);
            return;
        }
        match p
            .strip_prefix(b"{\"id\":\"")
            .and_then(|r| r.iter().position(|&b| b == b'"').map(|e| &r[..e]))
        {
            Some(id) => conn.last_id = String::from_utf8_lossy(id).into_owned(),
            None => st.no_id += 1,
        }
        if let Some(seq) = json_num(p, b"\"seq\":") {
            if conn.last_seq.is_some_and(|l| seq <= l) {
                st.order_errors += 1;
            }
            conn.last_seq = Some(conn.last_seq.map_or(seq, |l| l.max(seq)));
            if conn.resumed && !conn.status_seen {
                conn.pre_status += 1;
                st.replay_frames += 1;
            }
        }
        let user = conn.user;
        self.stats.on_text(user, p, now);
    }

    pub fn opened(&mut self, slot: usize, now: u64) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        c.st = St::Open;
        self.stats.opened += 1;
        self.stats.connect.record(now.saturating_sub(c.started));
        self.stats.last_open = self.stats.last_open.max(now);
        self.ctl.open.fetch_add(1, Ordering::Relaxed);
        self.ctl.done.fetch_add(1, Ordering::Relaxed);
    }

    fn on_event(&mut self, slot: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if conn.st == St::Connecting {
            match conn.sock.take_error() {
                Ok(Some(e)) | Err(e) => {
                    return self.fail(slot, format!("connect: {}", short_err(&e)));
                }
                Ok(None) => {}
            }
            match conn.sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(slot, format!("connect: {}", short_err(&e))),
            }
            if self.cfg.raw {
                self.opened(slot, mono_ns());
            } else {
                let req = self.cfg.request(
                    &self.cfg.targets[conn.target as usize],
                    conn.user,
                    &conn.last_id,
                );
                conn.st = St::Handshake;
                if !self.write(slot, &req) {
                    return;
                }
            }
        }
        if writable && !self.flush_out(slot) {
            return;
        }
        if readable {
            self.read_ready(slot);
        }
    }

    /// Writes or queues bytes; false when the connection is gone.
    pub fn write(&mut self, slot: usize, bytes: &[u8]) -> bool {
        let Some(conn) = self.conn_mut(slot) else {
            return false;
        };
        if !conn.out.is_empty() {
            conn.out.extend_from_slice(bytes);
            return true;
        }
        let mut off = 0;
        while off < bytes.len() {
            match conn.sock.write(&bytes[off..]) {
                Ok(0) => {
                    self.fail(slot, "write: zero".into());
                    return false;
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.out.extend_from_slice(&bytes[off..]);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(slot, format!("write: {}", short_err(&e)));
                    return false;
                }
            }
        }
        true
    }

    fn flush_out(&mut self, slot: usize) -> bool {
        let Some(conn) = self.conn_mut(slot) else {
            return false;
        };
        let mut off = 0;
        while off < conn.out.len() {
            match conn.sock.write(&conn.out[off..]) {
                Ok(0) => break,
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(slot, format!("write: {}", short_err(&e)));
                    return false;
                }
            }
        }
        conn.out.drain(..off);
        if conn.out.is_empty() && conn.out.capacity() > 4096 {
            conn.out = Vec::new();
        }
        true
    }

    fn read_ready(&mut self, slot: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        while let Some(conn) = self.conn_mut(slot) {
            match conn.sock.read(&mut scratch) {
                Ok(0) => {
                    let why = if conn.st == St::Connecting {
                        "eof before connect"
                    } else {
                        "eof before 101"
                    };
                    self.fail(slot, why.into());
                    break;
                }
                Ok(n) => {
                    if !self.on_data(slot, &scratch[..n]) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(slot, format!("read: {}", short_err(&e)));
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Handles bytes read; false when the connection is gone.
    fn on_data(&mut self, slot: usize, data: &[u8]) -> bool {
        let now = mono_ns();
        let Some(conn) = self.conn_mut(slot) else {
            return false;
        };
        let mut buf = std::mem::take(&mut conn.inbuf);
        let alive = if buf.is_empty() {
            let (used, alive) = self.process(slot, data, now);
            if alive && used < data.len() {
                buf.extend_from_slice(&data[used..]);
            }
            alive
        } else {
            buf.extend_from_slice(data);
            let (used, alive) = self.process(slot, &buf, now);
            if alive {
                buf.drain(..used);
            }
            alive
        };
        if alive {
            if let Some(conn) = self.conn_mut(slot) {
                if buf.is_empty() && buf.capacity() > 4096 {
                    buf = Vec::new();
                }
                conn.inbuf = buf;
            }
        }
        alive
    }

    /// Consumes the 101 answer and complete frames from `input`; returns the
    /// bytes used and whether the connection is still there.
    pub fn process(&mut self, slot: usize, input: &[u8], now: u64) -> (usize, bool) {
        let Some(conn) = self.conn_mut(slot) else {
            return (0, false);
        };
        let user = conn.user;
        let mut pos = 0;
        match conn.st {
            St::Connecting => return (input.len(), true),
            St::Handshake => {
                let Some(end) = find(input, b"\r\n\r\n") else {
                    if input.len() > 16 * 1024 {
                        self.fail(slot, "101 answer too long".into());
                        return (0, false);
                    }
                    return (0, true);
                };
                let head = &input[..end];
                let status = std::str::from_utf8(head)
                    .ok()
                    .and_then(|h| h.split_whitespace().nth(1))
                    .and_then(|s| s.parse::<u16>().ok());
                if status != Some(101) {
                    let s = status.map_or("???".into(), |s| s.to_string());
                    self.fail(slot, format!("http {s}"));
                    return (0, false);
                }
                if find(head, WS_ACCEPT).is_none() {
                    self.fail(slot, "bad Sec-WebSocket-Accept".into());
                    return (0, false);
                }
                self.opened(slot, now);
                pos = end + 4;
            }
            St::Open => {}
        }
        loop {
            let rest = &input[pos..];
            if rest.len() < 2 {
                break;
            }
            let (b0, b1) = (rest[0], rest[1]);
            let mut len = (b1 & 0x7f) as u64;
            let mut hl = 2;
            if len == 126 {
                if rest.len() < 4 {
                    break;
                }
                len = u16::from_be_bytes([rest[2], rest[3]]) as u64;
                hl = 4;
            } else if len == 127 {
                if rest.len() < 10 {
                    break;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[2..10]);
                len = u64::from_be_bytes(b);
                hl = 10;
            }
            if b1 & 0x80 != 0 {
                hl += 4;
            }
            if len > 64 << 20 {
                self.fail(slot, "frame too large".into());
                return (pos, false);
            }
            let total = hl + len as usize;
            if rest.len() < total {
                break;
            }
            let payload = &rest[hl..total];
            pos += total;
            match b0 & 0x0f {
                0x1 if self.cfg.since => self.on_durable(slot, payload, now),
                0x1 => self.stats.on_text(user, payload, now),
                0x9 => {
                    self.stats.pings += 1;
                    let pong = masked_frame(0x8a, payload);
                    if !self.write(slot, &pong) {
                        return (pos, false);
                    }
                }
                0x8 => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    self.stats.closed_by_server += 1;
                    *self.stats.close_codes.entry(code).or_default() += 1;
                    let reply = masked_frame(0x88, &payload[..payload.len().min(2)]);
                    if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
                        let _ = c.sock.write(&reply);
                        self.free.push(slot);
                        self.ctl.open.fetch_sub(1, Ordering::Relaxed);
                        self.keep_dead(c);
                    }
                    return (pos, false);
                }
                _ => self.stats.other_frames += 1,
            }
        }
        (pos, true)
    }

    pub fn close_all(&mut self) {
        let close = masked_frame(0x88, &1000u16.to_be_bytes());
        for slot in 0..self.conns.len() {
            if let Some(mut c) = self.conns[slot].take() {
                if c.st == St::Open {
                    let _ = c.sock.write(&close);
                    self.ctl.open.fetch_sub(1, Ordering::Relaxed);
                } else {
                    self.stats.fail("closed by the bench before open".into());
                    self.ctl.done.fetch_add(1, Ordering::Relaxed);
                }
                self.free.push(slot);
            }
        }
        self.queue.clear();
    }

    fn scan_timeouts(&mut self, now: u64) {
        let limit = self.cfg.timeout_ns;
        let late: Vec<usize> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.as_ref()
                    .filter(|c| c.st != St::Open && now.saturating_sub(c.started) > limit)
                    .map(|_| i)
            })
            .collect();
        for slot in late {
            self.fail(slot, "timeout".into());
        }
    }
}
