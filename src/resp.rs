//! The subscription's own RESP2 reader, over a buffer it keeps.
//!
//! Why: the `redis` crate's sync reader (combine's `decode!`) zeroes its
//! 8 KiB spare buffer before every `read()` and builds a `Value` tree per
//! message: about 10k of the subscriber's 15k instructions per notice
//! (`bench/callgrind.md`). A subscription only ever receives flat arrays of
//! scalars (`["message", channel, payload]`, `["subscribe", channel, n]`,
//! `["pong", ""]`) and a few `+OK`/`-ERR` lines, so a reader that knows only
//! that much fits here: it reads into a reused buffer (zeroed only when it
//! grows), parses replies in place and hands out slices of it, so the
//! payload is copied once, by the kernel.
//!
//! The crate still does everything else: the URL, commands (packed by
//! [`redis::Cmd`]), the canary's PUBLISH, and the whole subscription when
//! the address is one this reader does not speak (TLS): [`Subscription`]
//! keeps the crate's connection for those, behind the same `next_message`.
//!
//! Bounded: a bulk over [`MAX_BULK`], an array over [`MAX_ITEMS`], a nested
//! array, a RESP3 type or an over-long line is an error, and the caller
//! drops the link; the buffer never holds more than one such bounded reply
//! plus one read.
//!
//! Long because it carries its own proof: about 700 lines of reader and
//! link, then property tests over split and coalesced replies.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo};

/// The largest bulk string accepted: twice the largest notice
/// ([`crate::notice::MAX_NOTICE_BYTES`]), so a durable envelope around the
/// largest notice fits, and a notice just over the limit still reaches
/// `notice::parse` to be counted invalid. Anything larger is not ours: the
/// link is dropped (and rebuilt) rather than buffered.
pub const MAX_BULK: usize = 2 * crate::notice::MAX_NOTICE_BYTES;
/// Elements of one array: a `pmessage` has 4, every other push fewer.
pub const MAX_ITEMS: usize = 4;
/// The longest simple string or error line (the server's error texts are
/// short; a stream with no CRLF in sight is garbage).
const MAX_LINE: usize = 64 * 1024;
/// The longest `$`, `*` or `:` header line: a sign, 19 digits, CRLF.
const MAX_NUM_LINE: usize = 22;
/// The buffer a reader starts with; one read fills at most this much.
const INITIAL_BUF: usize = 16 * 1024;
/// A buffer grown past this (a large notice) is given back once it is
/// empty, so one big notice does not keep megabytes resident.
const KEEP_BUF: usize = 64 * 1024;

/// Why a read or a subscription failed. Every one of them ends the link:
/// the caller drops it and builds a new one.
#[derive(Debug)]
pub enum Error {
    /// The socket failed (a timeout is not an error: see
    /// [`Subscription::next_message`]).
    Io(io::Error),
    /// Redis closed the connection.
    Closed,
    /// Bytes that are not a reply this reader accepts: garbage, a RESP3
    /// type, a nested array. The stream cannot be resynchronised.
    Protocol(&'static str),
    /// A bulk string of this many bytes, over [`MAX_BULK`].
    TooLarge(u64),
    /// Redis answered an error (`-ERR ...`), e.g. to AUTH or SUBSCRIBE.
    Server(String),
    /// The `redis` crate's own connection failed (the TLS path).
    Redis(redis::RedisError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Closed => f.write_str("connection closed by Redis"),
            Error::Protocol(what) => write!(f, "protocol error: {what}"),
            Error::TooLarge(n) => {
                write!(f, "a bulk of {n} bytes is over the {MAX_BULK}-byte limit")
            }
            Error::Server(e) => write!(f, "{e}"),
            Error::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// One scalar of a reply, borrowed from the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Int(i64),
    Bulk(&'a [u8]),
    /// `$-1` or `*-1`.
    Nil,
}

/// A `["message", channel, payload]` push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub channel: &'a [u8],
    pub payload: &'a [u8],
}

/// One reply: a scalar, or a flat array of at most [`MAX_ITEMS`] scalars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    array: bool,
    len: usize,
    items: [Item<'a>; MAX_ITEMS],
}

impl<'a> Reply<'a> {
    /// The scalar, or the array's elements.
    pub fn items(&self) -> &[Item<'a>] {
        &self.items[..self.len]
    }

    #[cfg(test)]
    pub fn is_array(&self) -> bool {
        self.array
    }

    /// The text of an error reply (`-ERR ...`).
    pub fn error(&self) -> Option<&'a [u8]> {
        match self.items() {
            [Item::Error(e)] if !self.array => Some(e),
            _ => None,
        }
    }
}

/// A scalar as offsets into the unread part of the buffer: the parse
/// borrows nothing, so the reader can note what it consumed before it
/// lends the slices out.
#[derive(Debug, Clone, Copy)]
enum Raw {
    Simple(usize, usize),
    Error(usize, usize),
    Int(i64),
    Bulk(usize, usize),
    Nil,
}

impl Raw {
    fn resolve(self, b: &[u8]) -> Item<'_> {
        match self {
            Raw::Simple(s, e) => Item::Simple(&b[s..e]),
            Raw::Error(s, e) => Item::Error(&b[s..e]),
            Raw::Int(n) => Item::Int(n),
            Raw::Bulk(s, e) => Item::Bulk(&b[s..e]),
            Raw::Nil => Item::Nil,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Parsed {
    /// Bytes the reply takes.
    len: usize,
    array: bool,
    n: usize,
    items: [Raw; MAX_ITEMS],
}

/// A line from `at` up to CRLF: `Ok(Some((end_of_text, after_crlf)))`,
/// `Ok(None)` when the CRLF is not there yet.
fn line(b: &[u8], at: usize, max: usize) -> Result<Option<(usize, usize)>, Error> {
    let avail = &b[at..b.len().min(at + max)];
    match avail.iter().position(|&c| c == b'\r' || c == b'\n') {
        Some(i) => match (avail[i], b.get(at + i + 1)) {
            (b'\r', Some(b'\n')) => Ok(Some((at + i, at + i + 2))),
            (b'\r', None) => Ok(None),
            _ => Err(Error::Protocol("a line not ended by CRLF")),
        },
        None if avail.len() == max => Err(Error::Protocol("a line too long")),
        None => Ok(None),
    }
}

/// A signed decimal, as in `:`, `$` and `*` lines.
fn int(t: &[u8]) -> Result<i64, Error> {
    let (neg, digits) = match t {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, t),
    };
    if digits.is_empty() {
        return Err(Error::Protocol("an empty number"));
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(Error::Protocol("a number with a non-digit"));
        }
        let d = i64::from(d - b'0');
        n = n
            .checked_mul(10)
            .and_then(|n| {
                if neg {
                    n.checked_sub(d)
                } else {
                    n.checked_add(d)
                }
            })
            .ok_or(Error::Protocol("a number out of range"))?;
    }
    Ok(n)
}

/// One scalar at `at`: `Ok(Some((item, next)))`, `Ok(None)` if incomplete.
fn scalar(b: &[u8], at: usize) -> Result<Option<(Raw, usize)>, Error> {
    let Some(&tag) = b.get(at) else {
        return Ok(None);
    };
    let max = if matches!(tag, b'+' | b'-') {
        MAX_LINE
    } else {
        MAX_NUM_LINE
    };
    let Some((end, next)) = line(b, at + 1, max)? else {
        return Ok(None);
    };
    let text = at + 1..end;
    Ok(Some(match tag {
        b'+' => (Raw::Simple(text.start, text.end), next),
        b'-' => (Raw::Error(text.start, text.end), next),
        b':' => (Raw::Int(int(&b[text])?), next),
        b'$' => match int(&b[text])? {
            -1 => (Raw::Nil, next),
            n if n < 0 => return Err(Error::Protocol("a negative bulk length")),
            n if n as u64 > MAX_BULK as u64 => return Err(Error::TooLarge(n as u64)),
            n => {
                let n = n as usize;
                if b.len() < next + n + 2 {
                    return Ok(None);
                }
                if &b[next + n..next + n + 2] != b"\r\n" {
                    return Err(Error::Protocol("a bulk not ended by CRLF"));
                }
                (Raw::Bulk(next, next + n), next + n + 2)
            }
        },
        b'*' => return Err(Error::Protocol("a nested array")),
        _ => return Err(Error::Protocol("an unexpected type byte")),
    }))
}

/// How nearly every reply on a subscription starts: a `message` push.
const MESSAGE_HEAD: &[u8] = b"*3\r\n$7\r\nmessage\r\n";

/// A whole bulk at `at` whose length line is `$`, at most 7 digits (the
/// length of [`MAX_BULK`]) and CRLF: `(start, end, next)`. `None` for
/// anything else, complete or not, which the general path then reads or
/// refuses: this only saves it the work in the common case.
#[inline]
fn fast_bulk(b: &[u8], at: usize) -> Option<(usize, usize, usize)> {
    let rest = b.get(at..)?;
    if rest.first() != Some(&b'$') {
        return None;
    }
    let mut n = 0usize;
    let mut i = 1;
    while i <= 7 && i < rest.len() && rest[i].is_ascii_digit() {
        n = n * 10 + usize::from(rest[i] - b'0');
        i += 1;
    }
    if i == 1 || n > MAX_BULK || rest.get(i..i + 2) != Some(b"\r\n") {
        return None;
    }
    let start = at + i + 2;
    let end = start + n;
    (b.get(end..end + 2) == Some(b"\r\n")).then_some((start, end, end + 2))
}

/// One whole reply at the start of `b`, or `Ok(None)` if more bytes are
/// needed. Pure: the property tests drive it through [`Reader`].
fn parse(b: &[u8]) -> Result<Option<Parsed>, Error> {
    if b.starts_with(MESSAGE_HEAD) {
        if let Some((cs, ce, next)) = fast_bulk(b, MESSAGE_HEAD.len()) {
            if let Some((ps, pe, end)) = fast_bulk(b, next) {
                return Ok(Some(Parsed {
                    len: end,
                    array: true,
                    n: 3,
                    items: [
                        Raw::Bulk(8, 15),
                        Raw::Bulk(cs, ce),
                        Raw::Bulk(ps, pe),
                        Raw::Nil,
                    ],
                }));
            }
        }
    }
    let mut p = Parsed {
        len: 0,
        array: false,
        n: 0,
        items: [Raw::Nil; MAX_ITEMS],
    };
    if b.first() != Some(&b'*') {
        let Some((item, next)) = scalar(b, 0)? else {
            return Ok(None);
        };
        p.items[0] = item;
        p.n = 1;
        p.len = next;
        return Ok(Some(p));
    }
    let Some((end, mut at)) = line(b, 1, MAX_NUM_LINE)? else {
        return Ok(None);
    };
    p.array = true;
    match int(&b[1..end])? {
        // A null array: no elements, one `Nil`.
        -1 => {
            p.n = 1;
        }
        n if n < 0 => return Err(Error::Protocol("a negative array length")),
        n if n as u64 > MAX_ITEMS as u64 => return Err(Error::Protocol("an array too long")),
        n => {
            for i in 0..n as usize {
                let Some((item, next)) = scalar(b, at)? else {
                    return Ok(None);
                };
                p.items[i] = item;
                at = next;
            }
            p.n = n as usize;
        }
    }
    p.len = at;
    Ok(Some(p))
}

/// Reads replies from a byte stream into one reused buffer. A reply that
/// arrives in pieces (a timeout in the middle, a large notice) stays in
/// the buffer and is completed by the next call.
pub struct Reader {
    /// Always initialised: reads go into `buf[end..]`, which was zeroed
    /// once, when the buffer grew, never before each read.
    buf: Vec<u8>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes of the reply last handed out, consumed on the next call.
    lent: usize,
}

impl Default for Reader {
    fn default() -> Self {
        Reader::new()
    }
}

impl Reader {
    pub fn new() -> Reader {
        Reader {
            buf: vec![0; INITIAL_BUF],
            start: 0,
            end: 0,
            lent: 0,
        }
    }

    /// The next whole reply, reading from `src` as needed. An error from
    /// `src` (a read timeout) is returned as it is, and what was read of a
    /// reply so far is kept for the next call; `Ok(0)` is [`Error::Closed`].
    pub fn read<R: Read + ?Sized>(&mut self, src: &mut R) -> Result<Reply<'_>, Error> {
        let p = self.next_parsed(src)?;
        Ok(self.resolve(&p))
    }

    /// [`Reader::read`] as offsets, so that a caller can look at the reply
    /// and go on reading without the borrow of a returned one in the way.
    fn next_parsed<R: Read + ?Sized>(&mut self, src: &mut R) -> Result<Parsed, Error> {
        self.start += std::mem::take(&mut self.lent);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP_BUF {
                self.buf = vec![0; INITIAL_BUF];
            }
        }
        loop {
            if let Some(p) = parse(&self.buf[self.start..self.end])? {
                self.lent = p.len;
                return Ok(p);
            }
            if self.end == self.buf.len() {
                self.make_room();
            }
            match src.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    /// [`Reply::message`] of a reply [`Reader::next_parsed`] just returned.
    fn message(&self, p: &Parsed) -> Option<Message<'_>> {
        let b = &self.buf[self.start..self.start + p.len];
        match (p.array, p.n, p.items) {
            (true, 3, [Raw::Bulk(s, e), Raw::Bulk(cs, ce), Raw::Bulk(ps, pe), _])
                if &b[s..e] == b"message" =>
            {
                Some(Message {
                    channel: &b[cs..ce],
                    payload: &b[ps..pe],
                })
            }
            _ => None,
        }
    }

    /// The slices of a reply [`Reader::next_parsed`] just returned.
    fn resolve(&self, p: &Parsed) -> Reply<'_> {
        let b = &self.buf[self.start..self.start + p.len];
        let mut reply = Reply {
            array: p.array,
            len: p.n,
            items: [Item::Nil; MAX_ITEMS],
        };
        for (out, raw) in reply.items.iter_mut().zip(&p.items[..p.n]) {
            *out = raw.resolve(b);
        }
        reply
    }

    /// Room for one more read: the unread bytes move to the front, or the
    /// buffer doubles when they fill it. [`parse`] refuses any reply larger
    /// than [`MAX_ITEMS`] bounded scalars, so this growth is bounded too.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        } else {
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
    }
}

/// A subscribed connection: this module's reader over a socket of its own
/// for plain TCP and Unix sockets, or the `redis` crate's connection for
/// the addresses it does not speak (TLS).
pub struct Subscription(Link);

enum Link {
    Tcp(TcpStream, Reader),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream, Reader),
    /// The crate's connection, and the last message read from it (the
    /// slices handed out borrow it).
    Crate(Box<(redis::Connection, Option<redis::Msg>)>),
}

/// Timeouts of [`Subscription::open`].
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Of AUTH and SUBSCRIBE, and of every write.
    pub io: Duration,
    /// Of the reads after the subscription: how often `next_message`
    /// returns `Ok(None)` when nothing comes.
    pub poll: Duration,
}

impl Subscription {
    /// Connects to `info`, authenticates (`AUTH [user] pass`; no HELLO:
    /// pub/sub pushes are RESP2 arrays) and subscribes to `channels` in one
    /// command, waiting for every confirmation: no message can come before
    /// them.
    pub fn open(client: &redis::Client, channels: &[&str], t: Timeouts) -> Result<Self, Error> {
        let info = client.get_connection_info();
        let link = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let s = connect_tcp(host, *port, info, t.connect)?;
                Link::Tcp(s, Reader::new())
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Link::Unix(
                std::os::unix::net::UnixStream::connect(path)?,
                Reader::new(),
            ),
            _ => return Self::open_crate(client, channels, t),
        };
        let mut sub = Subscription(link);
        sub.set_timeouts(Some(t.io), t.io)?;
        let r = info.redis_settings();
        if let Some(pass) = r.password() {
            sub.auth(r.username(), pass)?;
        }
        let mut cmd = redis::cmd("SUBSCRIBE");
        for c in channels {
            cmd.arg(*c);
        }
        sub.write_all(&cmd.get_packed_command())?;
        for _ in channels {
            let reply = sub.reply()?;
            if let Some(e) = reply.error() {
                return Err(Error::Server(String::from_utf8_lossy(e).into_owned()));
            }
            if !matches!(reply.items(), [Item::Bulk(b"subscribe"), ..]) {
                return Err(Error::Protocol("not a subscribe confirmation"));
            }
        }
        sub.set_timeouts(Some(t.poll), t.io)?;
        Ok(sub)
    }

    /// `AUTH user pass`, then `AUTH pass` if the server has no ACL users
    /// (Redis 5 refuses the two-argument form), as the crate does.
    fn auth(&mut self, user: Option<&str>, pass: &str) -> Result<(), Error> {
        let mut cmd = redis::cmd("AUTH");
        if let Some(u) = user {
            cmd.arg(u);
        }
        cmd.arg(pass);
        self.write_all(&cmd.get_packed_command())?;
        let reply = self.reply()?;
        let Some(e) = reply.error() else {
            return Ok(());
        };
        let e = String::from_utf8_lossy(e).into_owned();
        if user.is_some() && e.contains("wrong number of arguments") {
            return self.auth(None, pass);
        }
        Err(Error::Server(format!("AUTH: {e}")))
    }

    /// The crate's connection, subscribed the same way: the path for TLS.
    fn open_crate(client: &redis::Client, channels: &[&str], t: Timeouts) -> Result<Self, Error> {
        let mut conn = client
            .get_connection_with_timeout(t.connect)
            .map_err(Error::Redis)?;
        conn.set_read_timeout(Some(t.io))
            .and_then(|_| conn.set_write_timeout(Some(t.io)))
            .map_err(Error::Redis)?;
        let mut cmd = redis::cmd("SUBSCRIBE");
        for c in channels {
            cmd.arg(*c);
        }
        conn.send_packed_command(&cmd.get_packed_command())
            .map_err(Error::Redis)?;
        for _ in channels {
            if let redis::Value::ServerError(e) = conn.recv_response().map_err(Error::Redis)? {
                return Err(Error::Server(e.to_string()));
            }
        }
        conn.set_read_timeout(Some(t.poll)).map_err(Error::Redis)?;
        Ok(Subscription(Link::Crate(Box::new((conn, None)))))
    }

    /// Whether the fast path (this module's reader) is in use.
    #[cfg(test)]
    pub fn is_own_reader(&self) -> bool {
        !matches!(self.0, Link::Crate(..))
    }

    /// The next `["message", channel, payload]`, skipping the other pushes
    /// (confirmations, pongs); `Ok(None)` when the poll timeout passed
    /// first. A timeout leaves the link usable; an error does not.
    pub fn next_message(&mut self) -> Result<Option<Message<'_>>, Error> {
        let (reader, src): (&mut Reader, &mut dyn Read) = match &mut self.0 {
            Link::Tcp(s, r) => (r, s),
            #[cfg(unix)]
            Link::Unix(s, r) => (r, s),
            Link::Crate(c) => {
                let (conn, last) = &mut **c;
                // A `PubSub` would unsubscribe when dropped (and wait for
                // Redis to answer): this one only reads, and is never dropped.
                let mut ps = std::mem::ManuallyDrop::new(conn.as_pubsub());
                return match ps.get_message() {
                    Ok(m) => {
                        let m = last.insert(m);
                        Ok(Some(Message {
                            channel: m.get_channel_name().as_bytes(),
                            payload: m.get_payload_bytes(),
                        }))
                    }
                    Err(e) if e.is_timeout() => Ok(None),
                    Err(e) => Err(Error::Redis(e)),
                };
            }
        };
        let mut skipped = 0usize;
        loop {
            let p = match reader.next_parsed(src) {
                Ok(p) => p,
                Err(Error::Io(e)) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            // Only the two slices a message needs, not a whole `Reply`.
            // (Asked twice: a borrow returned from one turn of the loop
            // would outlive the next turn's read, for the borrow checker.)
            if reader.message(&p).is_some() {
                return Ok(reader.message(&p));
            }
            if let Some(e) = reader.resolve(&p).error() {
                return Err(Error::Server(String::from_utf8_lossy(e).into_owned()));
            }
            skipped += 1;
            if skipped > 1024 {
                // Only confirmations and pongs come unasked; an endless
                // stream of them is not a subscription.
                return Err(Error::Protocol("too many pushes that are not messages"));
            }
        }
    }

    fn reply(&mut self) -> Result<Reply<'_>, Error> {
        match &mut self.0 {
            Link::Tcp(s, r) => r.read(s),
            #[cfg(unix)]
            Link::Unix(s, r) => r.read(s),
            Link::Crate(..) => Err(Error::Protocol("no own reader on this link")),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> Result<(), Error> {
        match &mut self.0 {
            Link::Tcp(s, _) => s.write_all(b)?,
            #[cfg(unix)]
            Link::Unix(s, _) => s.write_all(b)?,
            Link::Crate(..) => return Err(Error::Protocol("no own writer on this link")),
        }
        Ok(())
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Duration) -> Result<(), Error> {
        match &self.0 {
            Link::Tcp(s, _) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(Some(write))?;
            }
            #[cfg(unix)]
            Link::Unix(s, _) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(Some(write))?;
            }
            Link::Crate(..) => {}
        }
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connects as the crate would: every address of the host in turn, then
/// the crate's TCP settings (nodelay, keepalive, user timeout).
fn connect_tcp(
    host: &str,
    port: u16,
    info: &ConnectionInfo,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                let t = info.tcp_settings();
                s.set_nodelay(t.nodelay())?;
                let s2 = socket2::SockRef::from(&s);
                if let Some(k) = t.keepalive() {
                    s2.set_tcp_keepalive(k)?;
                }
                #[cfg(target_os = "linux")]
                s2.set_tcp_user_timeout(t.user_timeout())?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Error::Io(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "could not resolve to any addresses",
        )
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::Config as ProptestConfig;

    fn config() -> ProptestConfig {
        // As in `props`: PROPTEST_CASES is honoured, 1000 when it is not set.
        let mut c = ProptestConfig::default();
        if std::env::var_os("PROPTEST_CASES").is_none() {
            c.cases = 1000;
        }
        c.failure_persistence = None;
        c
    }

    /// A reply as the tests write it, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum O {
        Simple(Vec<u8>),
        Error(Vec<u8>),
        Int(i64),
        Bulk(Vec<u8>),
        Nil,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Frame {
        array: bool,
        items: Vec<O>,
    }

    fn owned(r: &Reply<'_>) -> Frame {
        let items = r
            .items()
            .iter()
            .map(|i| match *i {
                Item::Simple(s) => O::Simple(s.to_vec()),
                Item::Error(s) => O::Error(s.to_vec()),
                Item::Int(n) => O::Int(n),
                Item::Bulk(b) => O::Bulk(b.to_vec()),
                Item::Nil => O::Nil,
            })
            .collect();
        Frame {
            array: r.is_array(),
            items,
        }
    }

    /// An encoder of its own, written from the RESP2 specification.
    fn put(o: &O, out: &mut Vec<u8>) {
        match o {
            O::Simple(s) => out.extend([&b"+"[..], s, b"\r\n"].concat()),
            O::Error(s) => out.extend([&b"-"[..], s, b"\r\n"].concat()),
            O::Int(n) => out.extend(format!(":{n}\r\n").bytes()),
            O::Bulk(b) => {
                out.extend(format!("${}\r\n", b.len()).bytes());
                out.extend(b);
                out.extend(b"\r\n");
            }
            O::Nil => out.extend(b"$-1\r\n"),
        }
    }

    fn encode(f: &Frame, out: &mut Vec<u8>) {
        if !f.array {
            return put(&f.items[0], out);
        }
        if f.items == [O::Nil] {
            return out.extend(b"*-1\r\n");
        }
        out.extend(format!("*{}\r\n", f.items.len()).bytes());
        for i in &f.items {
            put(i, out);
        }
    }

    fn bulk(b: &[u8]) -> O {
        O::Bulk(b.to_vec())
    }

    fn line_text() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            any::<u8>().prop_filter("no CR/LF", |c| *c != b'\r' && *c != b'\n'),
            0..40,
        )
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            8 => prop::collection::vec(any::<u8>(), 0..64),
            // CRLF inside bulks: a length-prefixed bulk may hold anything.
            1 => Just(b"a\r\nb\r\n".to_vec()),
            // Large notices: past the first buffer and past KEEP_BUF.
            1 => (any::<u8>(), 0usize..150_000).prop_map(|(c, n)| vec![c; n]),
        ]
    }

    fn scalar_o() -> impl Strategy<Value = O> {
        prop_oneof![
            line_text().prop_map(O::Simple),
            line_text().prop_map(O::Error),
            any::<i64>().prop_map(O::Int),
            bytes().prop_map(O::Bulk),
            Just(O::Nil),
        ]
    }

    /// Pushes a subscription meets, and any other reply the reader takes.
    fn frame() -> impl Strategy<Value = Frame> {
        let array = |items| Frame { array: true, items };
        prop_oneof![
            6 => (bytes(), bytes()).prop_map(move |(c, p)| array(vec![bulk(b"message"), O::Bulk(c), O::Bulk(p)])),
            1 => (bytes(), any::<i64>()).prop_map(move |(c, n)| array(vec![bulk(b"subscribe"), O::Bulk(c), O::Int(n)])),
            1 => bytes().prop_map(move |p| array(vec![bulk(b"pong"), O::Bulk(p)])),
            1 => (bytes(), bytes(), bytes()).prop_map(move |(p, c, m)| array(vec![bulk(b"pmessage"), O::Bulk(p), O::Bulk(c), O::Bulk(m)])),
            1 => Just(array(vec![O::Nil])),
            1 => prop::collection::vec(scalar_o(), 0..=MAX_ITEMS).prop_map(array),
            2 => scalar_o().prop_map(|o| Frame { array: false, items: vec![o] }),
        ]
    }

    /// A stream that hands out `data` in the pieces `cuts` makes, with a
    /// timeout (`WouldBlock`) between pieces when `stall` is set, as a
    /// socket with a read timeout would.
    struct Pieces {
        data: Vec<u8>,
        cuts: Vec<usize>,
        pos: usize,
        stall: bool,
        stalled: bool,
    }

    impl Pieces {
        fn new(data: Vec<u8>, mut cuts: Vec<usize>, stall: bool) -> Pieces {
            let n = data.len().max(1);
            for c in &mut cuts {
                *c %= n;
            }
            cuts.sort_unstable();
            Pieces {
                data,
                cuts,
                pos: 0,
                stall,
                stalled: false,
            }
        }
    }

    impl Read for Pieces {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.stall && !self.stalled {
                self.stalled = true;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.stalled = false;
            let next = self
                .cuts
                .iter()
                .copied()
                .find(|&c| c > self.pos)
                .unwrap_or(self.data.len());
            let n = (next - self.pos).min(out.len());
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    /// Every reply in the stream, retrying timeouts, up to the end.
    fn read_all(src: &mut Pieces) -> (Vec<Frame>, Error) {
        let mut r = Reader::new();
        let mut got = Vec::new();
        loop {
            match r.read(src) {
                Ok(reply) => got.push(owned(&reply)),
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return (got, e),
            }
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn resp_split_or_coalesced_replies_parse_back(
            frames in prop::collection::vec(frame(), 0..12),
            cuts in prop::collection::vec(any::<usize>(), 0..24),
            stall in any::<bool>(),
        ) {
            let mut data = Vec::new();
            for f in &frames {
                encode(f, &mut data);
            }
            let (got, end) = read_all(&mut Pieces::new(data, cuts, stall));
            prop_assert!(matches!(end, Error::Closed), "{end}");
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn resp_byte_at_a_time_replies_parse_back(
            frames in prop::collection::vec(frame(), 0..4),
        ) {
            let mut data = Vec::new();
            for f in &frames {
                encode(f, &mut data);
            }
            if data.len() > 4096 {
                // A byte at a time re-parses the reply per byte: keep it small.
                return Ok(());
            }
            let cuts = (0..data.len()).collect();
            let (got, end) = read_all(&mut Pieces::new(data, cuts, true));
            prop_assert!(matches!(end, Error::Closed), "{end}");
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn resp_garbage_never_panics(
            prefix in prop::collection::vec(frame(), 0..3),
            garbage in prop::collection::vec(any::<u8>(), 0..256),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut data = Vec::new();
            for f in &prefix {
                encode(f, &mut data);
            }
            data.extend(&garbage);
            let (got, _) = read_all(&mut Pieces::new(data, cuts, false));
            // What came before the garbage is read as it was written.
            prop_assert_eq!(&got[..prefix.len()], &prefix[..]);
        }

        #[test]
        fn resp_garbage_of_resp_bytes_never_panics(
            garbage in prop::collection::vec(
                prop::sample::select(b"*$:+-\r\n0123456789-".to_vec()), 0..128),
        ) {
            let _ = read_all(&mut Pieces::new(garbage, vec![], false));
        }

        #[test]
        fn resp_oversized_bulks_are_refused_before_their_bytes(
            n in (MAX_BULK as u64 + 1)..=(i64::MAX as u64),
            in_message in any::<bool>(),
        ) {
            let mut data = Vec::new();
            if in_message {
                data.extend(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n");
            }
            data.extend(format!("${n}\r\nxyz").bytes());
            let (got, end) = read_all(&mut Pieces::new(data, vec![], false));
            prop_assert!(got.is_empty());
            prop_assert!(matches!(end, Error::TooLarge(m) if m == n), "{end}");
        }
    }

    #[test]
    fn resp_a_bulk_of_max_size_is_read_and_its_buffer_given_back() {
        let payload = vec![b'x'; MAX_BULK];
        let big = Frame {
            array: true,
            items: vec![bulk(b"message"), bulk(b"c"), O::Bulk(payload)],
        };
        let small = Frame {
            array: false,
            items: vec![O::Simple(b"OK".to_vec())],
        };
        let mut data = Vec::new();
        encode(&big, &mut data);
        encode(&small, &mut data);
        let mut src = Pieces::new(data, vec![1000, 70_000], false);
        let mut r = Reader::new();
        assert_eq!(owned(&r.read(&mut src).unwrap()), big);
        assert!(r.buf.len() > MAX_BULK);
        assert_eq!(owned(&r.read(&mut src).unwrap()), small);
        assert!(matches!(r.read(&mut src), Err(Error::Closed)));
        assert_eq!(r.buf.len(), INITIAL_BUF);
    }

    #[test]
    fn resp_refuses_what_a_subscription_never_gets() {
        for (bytes, what) in [
            (&b"*1\r\n*0\r\n"[..], "a nested array"),
            (b"*5\r\n", "an array too long"),
            (b">3\r\n", "an unexpected type byte"),
            (b"$3\r\nabcd\r\n", "a bulk not ended by CRLF"),
            (b"+OK\n", "a line not ended by CRLF"),
            (b":12a\r\n", "a number with a non-digit"),
            (b":99999999999999999999\r\n", "a number out of range"),
            (b":999999999999999999999999\r\n", "a line too long"),
            (b"$-2\r\n", "a negative bulk length"),
        ] {
            match read_all(&mut Pieces::new(bytes.to_vec(), vec![], false)) {
                (got, Error::Protocol(w)) if got.is_empty() => assert_eq!(w, what, "{bytes:?}"),
                (got, e) => panic!("{bytes:?}: {got:?} {e}"),
            }
        }
        let long = [&b"+"[..], &vec![b'a'; MAX_LINE + 1]].concat();
        assert!(matches!(
            read_all(&mut Pieces::new(long, vec![], false)).1,
            Error::Protocol("a line too long")
        ));
    }

    /// A fake Redis on a loopback socket: the AUTH fallback, SUBSCRIBE,
    /// and messages split and coalesced around pongs and read timeouts.
    #[test]
    fn resp_subscription_auths_subscribes_and_reads_messages() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = Reader::new();
            let expect = |s: &mut TcpStream, r: &mut Reader, want: &[&[u8]]| {
                // Commands are arrays of bulks: a `*N` over MAX_ITEMS is
                // not needed here.
                let got = owned(&r.read(s).unwrap());
                let want: Vec<O> = want.iter().map(|w| bulk(w)).collect();
                assert_eq!(got.items, want);
            };
            expect(&mut s, &mut r, &[b"AUTH", b"u", b"p"]);
            s.write_all(b"-ERR wrong number of arguments for 'auth' command\r\n")
                .unwrap();
            expect(&mut s, &mut r, &[b"AUTH", b"p"]);
            s.write_all(b"+OK\r\n").unwrap();
            expect(&mut s, &mut r, &[b"SUBSCRIBE", b"a", b"b"]);
            s.write_all(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n")
                .unwrap();
            let msg = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhello\r\n";
            s.write_all(&msg[..10]).unwrap();
            std::thread::sleep(Duration::from_millis(80));
            s.write_all(&msg[10..]).unwrap();
            s.write_all(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n").unwrap();
            s.write_all(b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$2\r\n{}\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$0\r\n\r\n")
                .unwrap();
        });
        let client = redis::Client::open(format!("redis://u:p@127.0.0.1:{port}")).unwrap();
        let t = Timeouts {
            connect: Duration::from_secs(2),
            io: Duration::from_secs(2),
            poll: Duration::from_millis(20),
        };
        let mut sub = Subscription::open(&client, &["a", "b"], t).unwrap();
        assert!(sub.is_own_reader());
        let mut got = Vec::new();
        let mut timeouts = 0;
        while got.len() < 3 {
            match sub.next_message() {
                Ok(Some(m)) => got.push((m.channel.to_vec(), m.payload.to_vec())),
                Ok(None) => timeouts += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(timeouts > 0);
        let want: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"a".to_vec(), b"hello".to_vec()),
            (b"b".to_vec(), b"{}".to_vec()),
            (b"a".to_vec(), b"".to_vec()),
        ];
        assert_eq!(got, want);
        server.join().unwrap();
        assert!(matches!(sub.next_message(), Err(Error::Closed)));
    }
}
