//! Durable notices, the Redis side (SPEC section 8): ids, the function
//! library that records and reads history (`src/durable.lua`), and the few
//! calls the node makes into it.
//!
//! The library does the work inside Redis so that a backend needs nothing
//! but `FCALL`, and so that assigning an id, recording it and publishing it
//! are one atomic step. This module only loads it, calls it and parses its
//! answers; the pure parts (ids, the envelope) are unit-tested here, the
//! rest against a real redis-server.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use redis::{ConnectionLike, RedisError, RedisResult, Value};

/// Must equal `VERSION` in `src/durable.lua` (a test checks it). Raise both
/// whenever the library's behaviour or key layout changes.
pub const LIBRARY_VERSION: i64 = 2;

const TEMPLATE: &str = include_str!("durable.lua");

/// The error code of a refused notice in the function's error reply
/// (`BADNOTICE <reason>`), so that a refusal is never taken for a Redis
/// failure or the other way round.
pub const REFUSED_CODE: &str = "BADNOTICE";

/// Longest epoch [`ClientId::parse`] accepts; the library makes about 11
/// characters (base 36 of the microsecond time).
pub const MAX_EPOCH_LEN: usize = 24;

/// A position in the fleet-wide order of durable notices: the stream entry
/// id `<ms>-<seq>` every stream the notice went to uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Id {
    pub ms: u64,
    pub seq: u64,
}

impl Id {
    /// `<ms>-<seq>`, decimal, no sign, no leading zeros: the only form the
    /// library writes, so that parse and Display round-trip.
    pub fn parse(s: &str) -> Option<Id> {
        let (ms, seq) = s.split_once('-')?;
        Some(Id {
            ms: canonical_u64(ms)?,
            seq: canonical_u64(seq)?,
        })
    }
}

fn canonical_u64(s: &str) -> Option<u64> {
    let ok =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if ok {
        s.parse().ok()
    } else {
        None
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The id a client sees and sends back as `since`: `<epoch>:<ms>-<seq>`.
/// The epoch changes whenever Redis loses its data, so that an id from
/// before the loss is recognised as unknown.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub epoch: String,
    pub id: Id,
}

impl ClientId {
    /// Strict: epoch `[0-9a-z]{1,24}`, `:`, then an [`Id`]. `None` is the
    /// 400 for a malformed `since`.
    pub fn parse(s: &str) -> Option<ClientId> {
        let (epoch, id) = s.split_once(':')?;
        let epoch_ok = !epoch.is_empty()
            && epoch.len() <= MAX_EPOCH_LEN
            && epoch
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
        if !epoch_ok {
            return None;
        }
        Some(ClientId {
            epoch: epoch.to_string(),
            id: Id::parse(id)?,
        })
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.id)
    }
}

/// Redis allows only these in library and function names, and the prefix
/// goes into both (and into a Lua string literal).
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The library's source for this configuration. `history_size` >= 1 (0
/// means history is off and nothing is loaded); a TTL under 1 s is taken
/// as 1 s. The caller checks [`valid_prefix`] (so does [`ensure_library`]).
pub fn library_source(prefix: &str, history_size: usize, history_ttl_secs: u64) -> String {
    TEMPLATE
        .replace("__PREFIX__", prefix)
        .replace("__HISTORY_SIZE__", &history_size.max(1).to_string())
        .replace(
            "__HISTORY_TTL_MS__",
            &history_ttl_secs.max(1).saturating_mul(1000).to_string(),
        )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Loaded (`previous`: the version it replaced, if one was loaded).
    Loaded { previous: Option<i64> },
    /// A newer node loaded a higher version: it stays.
    KeptNewer { theirs: i64 },
}

/// Makes sure Redis has the library, at our version or a newer one. Call it
/// on every (re)connect: a Redis restart without persistence loses
/// functions along with the data. Every node of a fleet must run with the
/// same `--history-size`/`--history-ttl`, or the last to connect wins.
pub fn ensure_library<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    history_size: usize,
    history_ttl_secs: u64,
) -> RedisResult<LoadOutcome> {
    if !valid_prefix(prefix) {
        return Err(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "--key-prefix must be 1-64 letters, digits or underscores",
        )));
    }
    let previous = match redis::cmd("FCALL_RO")
        .arg(format!("{prefix}_version"))
        .arg(0)
        .query::<i64>(conn)
    {
        Ok(v) => Some(v),
        Err(e) if is_missing_function(&e) => None,
        Err(e) => return Err(e),
    };
    if let Some(theirs) = previous.filter(|&v| v > LIBRARY_VERSION) {
        log::warn!(
            "Redis holds function library {prefix} version {theirs}, newer than this node's {LIBRARY_VERSION}: keeping it"
        );
        return Ok(LoadOutcome::KeptNewer { theirs });
    }
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(library_source(prefix, history_size, history_ttl_secs))
        .query::<String>(conn)?;
    Ok(LoadOutcome::Loaded { previous })
}

/// `ERR Function not found`: the library is not loaded (never was, or a
/// restart or FUNCTION FLUSH lost it).
pub fn is_missing_function(e: &RedisError) -> bool {
    e.code() == Some("ERR") && e.detail().is_some_and(|d| d.contains("Function not found"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The client id of the notice.
    pub id: String,
    /// Subscribers of `<prefix>:notices` (PUBSUB NUMSUB in the same round
    /// trip): the nodes it went to, as PUBLISH's count on the plain path.
    pub receivers: i64,
    /// With [`Wait`]: the replicas that acknowledged the write (`WAIT`'s
    /// answer, in the same round trip).
    pub replicas: Option<i64>,
}

/// `WAIT replicas timeout` after the publish: how many replicas must have
/// the notice before it counts as durable across a failover (Redis
/// replicates asynchronously; a master that dies or is demoted takes
/// what it did not pass on with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub replicas: u32,
    pub timeout: Duration,
}

#[derive(Debug)]
pub enum PublishError {
    /// The function refused the notice (POST /publish answers 400 with
    /// this reason): nothing was stored or sent.
    Refused(String),
    /// The library is not loaded: nothing was stored or sent; load it with
    /// [`ensure_library`] and publish again.
    NoLibrary,
    /// Redis failed or the link broke. The notice may or may not have been
    /// published: do not retry blindly, a retry can publish it twice.
    Redis(RedisError),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Refused(r) => f.write_str(r),
            PublishError::NoLibrary => f.write_str("the durable function library is not loaded"),
            PublishError::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

impl std::error::Error for PublishError {}

/// `FCALL <prefix>_publish 0 <notice>`: records the notice in history and
/// publishes it to every node. One round trip.
#[cfg(test)]
pub fn publish<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    notice: &[u8],
) -> Result<Published, PublishError> {
    publish_waiting(conn, prefix, notice, None)
}

/// [`publish`], then, with `wait`, `WAIT` for replicas in the same round
/// trip ([`Published::replicas`]).
pub fn publish_waiting<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    notice: &[u8],
    wait: Option<Wait>,
) -> Result<Published, PublishError> {
    let mut pipe = redis::pipe();
    pipe.cmd("FCALL")
        .arg(format!("{prefix}_publish"))
        .arg(0)
        .arg(notice)
        .cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("{prefix}:notices"));
    if let Some(w) = wait {
        // 0 would mean "forever" to WAIT.
        let ms = (w.timeout.as_millis() as u64).max(1);
        pipe.cmd("WAIT").arg(w.replicas).arg(ms);
    }
    let replies: Vec<Value> = pipe
        .ignore_errors()
        .query(conn)
        .map_err(PublishError::Redis)?;
    let mut replies = replies.into_iter();
    let id = match replies.next() {
        Some(Value::BulkString(b)) => String::from_utf8(b).ok(),
        Some(Value::ServerError(e)) => {
            let e = RedisError::from(e);
            return Err(if e.code() == Some(REFUSED_CODE) {
                PublishError::Refused(e.detail().unwrap_or("bad notice").to_string())
            } else if is_missing_function(&e) {
                PublishError::NoLibrary
            } else {
                PublishError::Redis(e)
            });
        }
        _ => None,
    };
    let id = id.ok_or_else(|| PublishError::Redis(unexpected("the publish reply")))?;
    let receivers = match replies.next() {
        Some(Value::Array(v)) => match v.get(1) {
            Some(Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    };
    let replicas = match (wait, replies.next()) {
        (None, _) => None,
        (Some(_), Some(Value::Int(n))) => Some(n),
        (Some(_), Some(Value::ServerError(e))) => return Err(PublishError::Redis(e.into())),
        (Some(_), _) => return Err(PublishError::Redis(unexpected("the WAIT reply"))),
    };
    Ok(Published {
        id,
        receivers,
        replicas,
    })
}

fn unexpected(what: &str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply from the durable function library",
        what.to_string(),
    ))
}

/// What the subscriber receives on `<prefix>:notices`:
/// `{"id":"<client id>","notice":<the published bytes>}`, built by the
/// library with exactly this layout. Returns the id, the client id string
/// and where the notice's bytes are inside `payload`. No JSON parse: the
/// notice itself is parsed (and routed) by notice.rs as any other, which
/// also catches a truncated one.
pub fn parse_envelope(payload: &[u8]) -> Option<(Id, &str, Range<usize>)> {
    const HEAD: &[u8] = b"{\"id\":\"";
    const MID: &[u8] = b"\",\"notice\":";
    let rest = payload.strip_prefix(HEAD)?;
    let quote = rest.iter().take(64).position(|&b| b == b'"')?;
    let id_str = std::str::from_utf8(&rest[..quote]).ok()?;
    let id = ClientId::parse(id_str)?.id;
    let after = &rest[quote..];
    if !after.starts_with(MID) || payload.last() != Some(&b'}') {
        return None;
    }
    let start = HEAD.len() + quote + MID.len();
    let end = payload.len() - 1;
    (start < end).then_some((id, id_str, start..end))
}

/// The answer of `<prefix>_history` for one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// History holds every durable notice after `since`: these, in id
    /// order, and nothing else.
    Recovered(Recovered),
    /// History cannot prove completeness (trimmed, expired, unknown id,
    /// lost data, over the limit): the client must refetch its state.
    Missed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// (id, client id string, notice bytes), in id order, all > since.
    pub entries: Vec<(Id, String, Bytes)>,
    /// The last id issued (fleet-wide) when history was read: the seam.
    /// Live durable notices with an id <= it are in `entries` or were not
    /// for this client; those above it are delivered live.
    pub last: Id,
}

/// How much one recovery may bring back. Past either bound the answer is
/// [`History::Missed`]: the client refetches instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Entries, user and broadcast together. Give about 2 x
    /// `--history-size` plus slack: approximate trimming removes whole
    /// stream nodes, so a stream keeps up to one node more than
    /// `--history-size` (a node: at most 4 KB or 100 entries by default;
    /// measured: 100 to 118 entries of 200 B at size 100).
    pub entries: usize,
    /// Notice bytes in all (0: no bound). `--max-queue-bytes` is the
    /// natural value: a larger replay would cut the client as a slow
    /// consumer anyway.
    pub bytes: usize,
}

fn history_cmd(prefix: &str, user: &str, since: &ClientId, limit: Limit) -> redis::Cmd {
    let mut c = redis::cmd("FCALL_RO");
    c.arg(format!("{prefix}_history"))
        .arg(0)
        .arg(user)
        .arg(since.to_string())
        .arg(limit.entries.clamp(1, 100_000))
        .arg(limit.bytes);
    c
}

/// One recovery read.
#[cfg(test)]
pub fn read_history<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    user: &str,
    since: &ClientId,
    limit: Limit,
) -> RedisResult<History> {
    let v: Value = history_cmd(prefix, user, since, limit).query(conn)?;
    parse_history(v)
}

/// Many recovery reads in one round trip. The outer error is the link's
/// (every read failed); an inner one is that read's alone.
pub fn read_histories<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    requests: &[(&str, &ClientId)],
    limit: Limit,
) -> RedisResult<Vec<RedisResult<History>>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut p = redis::pipe();
    for (user, since) in requests {
        p.add_command(history_cmd(prefix, user, since, limit));
    }
    let replies: Vec<Value> = p.ignore_errors().query(conn)?;
    if replies.len() != requests.len() {
        return Err(unexpected("pipelined history replies"));
    }
    Ok(replies.into_iter().map(parse_history).collect())
}

fn parse_history(v: Value) -> RedisResult<History> {
    let items = match v {
        Value::Array(items) => items,
        Value::ServerError(e) => return Err(e.into()),
        _ => return Err(unexpected("history reply")),
    };
    let mut it = items.into_iter();
    let status = it.next();
    let last = it.next();
    match status {
        Some(Value::BulkString(s)) if s == b"missed" => return Ok(History::Missed),
        Some(Value::BulkString(s)) if s == b"ok" => {}
        _ => return Err(unexpected("history status")),
    }
    let last = match last {
        Some(Value::BulkString(s)) => std::str::from_utf8(&s)
            .ok()
            .and_then(ClientId::parse)
            .map(|c| c.id),
        _ => None,
    }
    .ok_or_else(|| unexpected("history last id"))?;
    let mut entries = Vec::with_capacity(it.len() / 2);
    while let Some(id) = it.next() {
        let (Value::BulkString(id), Some(Value::BulkString(notice))) = (id, it.next()) else {
            return Err(unexpected("history entry"));
        };
        let id = String::from_utf8(id).map_err(|_| unexpected("history entry id"))?;
        let parsed = ClientId::parse(&id).ok_or_else(|| unexpected("history entry id"))?;
        entries.push((parsed.id, id, Bytes::from(notice)));
    }
    Ok(History::Recovered(Recovered { entries, last }))
}

/// A throwaway redis-server for tests: a free port, no persistence, killed
/// on drop. Never the machine's 6379.
#[cfg(test)]
pub(crate) mod test_redis {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct TestRedis {
        child: Child,
        pub port: u16,
        dir: std::path::PathBuf,
    }

    impl TestRedis {
        pub fn start() -> TestRedis {
            TestRedis::start_on(Self::free_port())
        }

        /// A free loopback port never handed out twice in this process,
        /// below the kernel's ephemeral range: `bind(0)` can hand a port
        /// just closed to the next caller, and two tests then shared one
        /// Redis (the second redis-server failed to bind, and its ping
        /// reached the first).
        fn free_port() -> u16 {
            use std::sync::atomic::{AtomicU32, Ordering};
            const LOW: u32 = 10_000;
            const SPAN: u32 = 22_000;
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let start = LOW + (std::process::id() % 1_000) * 20;
            let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
            loop {
                let port = (LOW + (NEXT.fetch_add(1, Ordering::SeqCst) - LOW) % SPAN) as u16;
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                    return port;
                }
            }
        }

        pub fn start_on(port: u16) -> TestRedis {
            // A directory of its own, so that no RDB left in the working
            // directory is loaded.
            let dir = std::env::temp_dir()
                .join(format!("pushwire-unit-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a directory for redis-server");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            let r = TestRedis { child, port, dir };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let ok = r
                    .client()
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
                if ok.is_ok() {
                    return r;
                }
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        pub fn client(&self) -> redis::Client {
            redis::Client::open(self.url()).expect("client")
        }

        pub fn conn(&self) -> redis::Connection {
            let c = self
                .client()
                .get_connection_with_timeout(Duration::from_secs(2))
                .expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10))).ok();
            c
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_redis::TestRedis;
    use super::*;
    use std::time::{Duration, Instant};

    const P: &str = "pushwire";

    fn setup(size: usize, ttl: u64) -> (TestRedis, redis::Connection) {
        let r = TestRedis::start();
        let mut c = r.conn();
        assert_eq!(
            ensure_library(&mut c, P, size, ttl).unwrap(),
            LoadOutcome::Loaded { previous: None }
        );
        (r, c)
    }

    fn publish_ok(c: &mut redis::Connection, notice: &str) -> ClientId {
        let p = publish(c, P, notice.as_bytes()).unwrap_or_else(|e| panic!("{notice}: {e}"));
        ClientId::parse(&p.id).unwrap()
    }

    fn lim(entries: usize) -> Limit {
        Limit { entries, bytes: 0 }
    }

    fn recovered(h: History) -> Recovered {
        match h {
            History::Recovered(r) => r,
            History::Missed => panic!("missed"),
        }
    }

    fn notices(r: &Recovered) -> Vec<String> {
        r.entries
            .iter()
            .map(|e| String::from_utf8(e.2.to_vec()).unwrap())
            .collect()
    }

    fn keys(c: &mut redis::Connection) -> Vec<String> {
        let mut k: Vec<String> = redis::cmd("KEYS").arg("*").query(c).unwrap();
        k.sort();
        k
    }

    #[test]
    fn history_ids_parse_strictly_and_round_trip() {
        for s in [
            "abc123:1764620000123-0",
            "0:0-0",
            "z:18446744073709551615-7",
        ] {
            assert_eq!(ClientId::parse(s).unwrap().to_string(), s);
        }
        for s in [
            "",
            ":1-0",
            "ABC:1-0",
            "a:1",
            "a:1-",
            "a:-1",
            "a:01-0",
            "a:1-00",
            "a:1-0 ",
            "a:+1-0",
            "a:1-0-0",
            "a:18446744073709551616-0",
            "a-b:1-0",
            "aaaaaaaaaaaaaaaaaaaaaaaaa:1-0",
        ] {
            assert_eq!(ClientId::parse(s), None, "{s:?}");
        }
        let a = Id { ms: 5, seq: 9 };
        assert!(a < Id { ms: 6, seq: 0 } && a > Id { ms: 5, seq: 8 });
    }

    #[test]
    fn history_envelope_round_trips() {
        let notice = br#"{"userId":"42","text":"h\u00e9llo }"}"#;
        let mut payload = b"{\"id\":\"k3x9:1764620000123-4\",\"notice\":".to_vec();
        payload.extend_from_slice(notice);
        payload.push(b'}');
        let (id, s, range) = parse_envelope(&payload).unwrap();
        assert_eq!(
            id,
            Id {
                ms: 1764620000123,
                seq: 4
            }
        );
        assert_eq!(s, "k3x9:1764620000123-4");
        assert_eq!(&payload[range], notice);
        for bad in [
            &b"{\"id\":\"k3x9:1-4\",\"notice\":}"[..],
            b"{\"id\":\"K:1-4\",\"notice\":{}}",
            b"{\"id\":\"k:1-4\", \"notice\":{}}",
            b"{\"userId\":\"42\"}",
            b"",
        ] {
            assert_eq!(
                parse_envelope(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn history_library_version_matches_the_template() {
        let src = library_source("pw_1", 100, 300);
        assert!(src.starts_with("#!lua name=pw_1\n"));
        assert!(src.contains(&format!("local VERSION = {LIBRARY_VERSION}\n")));
        assert!(src.contains("local SIZE = 100\n") && src.contains("local TTL_MS = 300000\n"));
        assert!(!src.contains("__"), "a placeholder left");
        assert!(valid_prefix("pushwire") && !valid_prefix("a:b") && !valid_prefix(""));
    }

    #[test]
    fn history_publish_validates_like_notice_rs() {
        let (_r, mut c) = setup(100, 300);
        let big = format!(
            "{{\"userId\":1,\"a\":\"{}\"}}",
            "x".repeat(crate::notice::MAX_NOTICE_BYTES)
        );
        let long_user = format!("{{\"userId\":\"{}\"}}", "u".repeat(257));
        let bad: Vec<&[u8]> = vec![
            b"not json",
            b"[1,2]",
            b"\"userId\"",
            b"{}",
            br#"{"text":"x"}"#,
            br#"{"userId":"1","broadcast":true}"#,
            br#"{"userId":"1","userIds":["2"]}"#,
            br#"{"userId":null}"#,
            br#"{"userId":1.5}"#,
            br#"{"userId":42.0}"#,
            br#"{"userId":4e1}"#,
            br#"{"userId":-0}"#,
            br#"{"userId":18446744073709551616}"#,
            br#"{"userId":""}"#,
            br#"{"userId":{"a":1}}"#,
            br#"{"userIds":"42"}"#,
            br#"{"userIds":{}}"#,
            br#"{"userIds":[true]}"#,
            br#"{"userIds":[1.5]}"#,
            br#"{"broadcast":false}"#,
            br#"{"broadcast":"yes"}"#,
            br#"{"userId":"1","userId":"2"}"#,
            br#"{"userId":"1","\u0075serId":"2"}"#,
            b"{\"userId\":\"\xff\"}",
            b"{\"userId\":\"\xed\xa0\x80\"}",
            br#"{"userId":"1"} trailing"#,
            br#"{"userId":0x10}"#,
            br#"{"userId":1,"a":007}"#,
            br#"{"userId":1,"a":inf}"#,
            b"{\"userId\":\"a\tb\"}",
            long_user.as_bytes(),
            big.as_bytes(),
        ];
        for input in bad {
            let rust = crate::notice::parse(input).expect_err("notice.rs refuses it too");
            match publish(&mut c, P, input) {
                Err(PublishError::Refused(reason)) => {
                    let want = rust.to_string();
                    let same = match rust {
                        crate::notice::NoticeError::NotJson(_) => {
                            reason.starts_with("notice is not valid JSON: ")
                        }
                        _ => reason == want,
                    };
                    assert!(
                        same,
                        "{:?}: {reason:?} vs {want:?}",
                        String::from_utf8_lossy(input)
                    );
                }
                other => panic!("{:?} -> {other:?}", String::from_utf8_lossy(input)),
            }
        }
        assert_eq!(keys(&mut c), Vec::<String>::new(), "nothing stored");
        // Accepted alike, and routed alike.
        let good: &[(&str, &[&str])] = &[
            (r#"{"userId":"42","text":"x"}"#, &["42"]),
            (r#"{"userId":42}"#, &["42"]),
            (
                r#"{"userId":-9223372036854775808}"#,
                &["-9223372036854775808"],
            ),
            (
                r#"{"userId":18446744073709551615}"#,
                &["18446744073709551615"],
            ),
            (r#"{"userIds":[7,"42",7]}"#, &["42", "7"]),
            (r#"{"userIds":[]}"#, &[]),
            (r#" {"broadcast":true,"a":[1,{"b":null}],"c":-1.5e-3}"#, &[]),
            (r#"{"\u0075serId":"x\"y","userid":1}"#, &["x\"y"]),
        ];
        for (n, users) in good {
            let before = keys(&mut c).len();
            let id = publish_ok(&mut c, n);
            crate::notice::parse(n.as_bytes()).unwrap();
            for u in *users {
                let top: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                    .arg(format!("pushwire:history:{u}"))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query(&mut c)
                    .unwrap();
                assert_eq!(top[0].0, id.id.to_string(), "{n} for {u}");
                assert_eq!(top[0].1[0].1, *n);
            }
            if users.is_empty() && !n.contains("broadcast") {
                assert_eq!(keys(&mut c).len(), before, "{n}");
            }
        }
    }

    #[test]
    fn history_ids_increase_within_a_millisecond() {
        let (_r, mut c) = setup(1000, 300);
        let mut prev: Option<ClientId> = None;
        let mut same_ms = 0;
        for i in 0..500 {
            let id = publish_ok(&mut c, &format!(r#"{{"userId":"u{}","i":{i}}}"#, i % 3));
            if let Some(p) = &prev {
                assert_eq!(p.epoch, id.epoch);
                assert!(id.id > p.id, "{p} then {id}");
                same_ms += (id.id.ms == p.id.ms) as u32;
            }
            prev = Some(id);
        }
        // Pipelined, many land in one millisecond.
        let mut p = redis::pipe();
        for i in 0..200 {
            p.cmd("FCALL")
                .arg("pushwire_publish")
                .arg(0)
                .arg(format!(r#"{{"broadcast":true,"i":{i}}}"#));
        }
        let ids: Vec<String> = p.query(&mut c).unwrap();
        let ids: Vec<Id> = ids.iter().map(|s| ClientId::parse(s).unwrap().id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(ids.windows(2).any(|w| w[0].ms == w[1].ms) || same_ms > 0);
    }

    #[test]
    fn history_user_ids_and_broadcast_streams() {
        let (_r, mut c) = setup(100, 300);
        let a = publish_ok(&mut c, r#"{"userIds":["a","b"],"n":1}"#);
        let b = publish_ok(&mut c, r#"{"broadcast":true,"n":2}"#);
        for (key, ids) in [
            ("pushwire:history:a", vec![a.id]),
            ("pushwire:history:b", vec![a.id]),
            ("pushwire:broadcast", vec![b.id]),
        ] {
            let got: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query(&mut c)
                .unwrap();
            let got: Vec<Id> = got.iter().map(|e| Id::parse(&e.0).unwrap()).collect();
            assert_eq!(got, ids, "{key}");
            let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut c).unwrap();
            assert!(ttl > 290_000 && ttl <= 300_000, "{key} {ttl}");
        }
    }

    #[test]
    fn history_merges_user_and_broadcast_after_since() {
        let (_r, mut c) = setup(100, 300);
        let first = publish_ok(&mut c, r#"{"userId":"42","n":0}"#);
        let want = [
            r#"{"userId":"42","n":1}"#,
            r#"{"broadcast":true,"n":2}"#,
            r#"{"userId":"7","n":3}"#,
            r#"{"userIds":["7","42"],"n":4}"#,
            r#"{"broadcast":true,"n":5}"#,
            r#"{"userId":42,"n":6}"#,
        ];
        let ids: Vec<ClientId> = want.iter().map(|n| publish_ok(&mut c, n)).collect();
        let r = recovered(read_history(&mut c, P, "42", &first, lim(100)).unwrap());
        let mine: Vec<&str> = want
            .iter()
            .copied()
            .filter(|n| !n.contains(r#""7","n":3"#))
            .collect();
        assert_eq!(notices(&r), mine);
        assert!(r.entries.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(r.last, ids[5].id);
        assert_eq!(r.entries[0].1, ids[0].to_string());
        // Only ids after since.
        let r = recovered(read_history(&mut c, P, "42", &ids[3], lim(100)).unwrap());
        assert_eq!(notices(&r), [want[4], want[5]]);
        let r = recovered(read_history(&mut c, P, "42", &ids[5], lim(100)).unwrap());
        assert!(r.entries.is_empty());
        // A user with no history of their own still gets the broadcasts.
        let r = recovered(read_history(&mut c, P, "nobody", &first, lim(100)).unwrap());
        assert_eq!(notices(&r), [want[1], want[4]]);
        // Over the limit: cannot be complete.
        assert_eq!(
            read_history(&mut c, P, "42", &first, lim(4)).unwrap(),
            History::Missed
        );
        assert!(matches!(
            read_history(&mut c, P, "42", &first, lim(5)).unwrap(),
            History::Recovered(_)
        ));
        // Over the byte bound: missed too.
        let bytes: usize = want
            .iter()
            .filter(|n| !n.contains(r#""7","n":3"#))
            .map(|n| n.len())
            .sum();
        for (b, ok) in [(bytes, true), (bytes - 1, false)] {
            let h = read_history(
                &mut c,
                P,
                "42",
                &first,
                Limit {
                    entries: 100,
                    bytes: b,
                },
            )
            .unwrap();
            assert_eq!(matches!(h, History::Recovered(_)), ok, "{b}");
        }
        // Pipelined form.
        let many = read_histories(&mut c, P, &[("42", &first), ("7", &ids[2])], lim(100)).unwrap();
        assert_eq!(notices(&recovered(many[0].clone().unwrap())).len(), 5);
        assert_eq!(
            notices(&recovered(many[1].clone().unwrap())),
            [want[3], want[4]]
        );
    }

    #[test]
    fn history_trimmed_past_since_is_missed() {
        let (_r, mut c) = setup(10, 300);
        let since = publish_ok(&mut c, r#"{"userId":"42","n":0}"#);
        let mut last = since.clone();
        let mut n = 1;
        // Approximate trimming removes whole stream nodes (100 entries).
        while redis::cmd("XLEN")
            .arg("pushwire:history:42")
            .query::<usize>(&mut c)
            .unwrap()
            > 50
            || n < 60
        {
            last = publish_ok(&mut c, &format!(r#"{{"userId":"42","n":{n}}}"#));
            n += 1;
            assert!(n < 1000, "never trimmed");
        }
        assert_eq!(
            read_history(&mut c, P, "42", &since, lim(100_000)).unwrap(),
            History::Missed
        );
        // A since that is still held is complete.
        let first: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg("pushwire:history:42")
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query(&mut c)
            .unwrap();
        let held = ClientId {
            epoch: since.epoch.clone(),
            id: Id::parse(&first[0].0).unwrap(),
        };
        let r = recovered(read_history(&mut c, P, "42", &held, lim(100_000)).unwrap());
        assert_eq!(r.entries.last().unwrap().0, last.id);
        assert!(!r.entries.is_empty());
    }

    #[test]
    fn history_expired_is_missed() {
        let (_r, mut c) = setup(100, 1);
        let since = publish_ok(&mut c, r#"{"userId":"42","n":0}"#);
        publish_ok(&mut c, r#"{"userId":"42","n":1}"#);
        assert!(matches!(
            read_history(&mut c, P, "42", &since, lim(100)).unwrap(),
            History::Recovered(_)
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis::cmd("EXISTS")
            .arg("pushwire:history:42")
            .query::<i64>(&mut c)
            .unwrap()
            == 1
        {
            assert!(Instant::now() < deadline, "never expired");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            read_history(&mut c, P, "42", &since, lim(100)).unwrap(),
            History::Missed
        );
        // And a new stream of that user remembers that the old one expired.
        publish_ok(&mut c, r#"{"userId":"42","n":2}"#);
        assert_eq!(
            read_history(&mut c, P, "42", &since, lim(100)).unwrap(),
            History::Missed
        );
        // A since newer than the TTL with no stream at all is complete.
        let fresh = publish_ok(&mut c, r#"{"userId":"other"}"#);
        let r = recovered(read_history(&mut c, P, "someone", &fresh, lim(100)).unwrap());
        assert!(r.entries.is_empty());
    }

    #[test]
    fn history_after_flushall_old_ids_are_missed() {
        let (_r, mut c) = setup(100, 300);
        let old = publish_ok(&mut c, r#"{"userId":"42","n":0}"#);
        redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
        assert_eq!(
            read_history(&mut c, P, "42", &old, lim(100)).unwrap(),
            History::Missed
        );
        let new = publish_ok(&mut c, r#"{"userId":"42","n":1}"#);
        assert_ne!(new.epoch, old.epoch);
        assert_eq!(
            read_history(&mut c, P, "42", &old, lim(100)).unwrap(),
            History::Missed
        );
        // Losing only the last id is a loss too: a new epoch. A stream left
        // with ids above the new ones is started afresh.
        redis::cmd("XADD")
            .arg("pushwire:history:42")
            .arg("99999999999999-0")
            .arg("n")
            .arg("stale")
            .query::<String>(&mut c)
            .unwrap();
        redis::cmd("DEL")
            .arg("pushwire:last")
            .query::<()>(&mut c)
            .unwrap();
        let newer = publish_ok(&mut c, r#"{"userId":"42","n":2}"#);
        assert_ne!(newer.epoch, new.epoch);
        let newest = publish_ok(&mut c, r#"{"userId":"42","n":3}"#);
        let r = recovered(read_history(&mut c, P, "42", &newer, lim(100)).unwrap());
        assert_eq!(notices(&r), [r#"{"userId":"42","n":3}"#]);
        assert_eq!(r.last, newest.id);
        assert_eq!(
            read_history(&mut c, P, "42", &new, lim(100)).unwrap(),
            History::Missed
        );
    }

    #[test]
    fn history_since_beyond_last_is_missed() {
        let (_r, mut c) = setup(100, 300);
        let id = publish_ok(&mut c, r#"{"userId":"42"}"#);
        let ahead = ClientId {
            epoch: id.epoch.clone(),
            id: Id {
                ms: id.id.ms,
                seq: id.id.seq + 1,
            },
        };
        assert_eq!(
            read_history(&mut c, P, "42", &ahead, lim(100)).unwrap(),
            History::Missed
        );
        let far = ClientId {
            epoch: id.epoch.clone(),
            id: Id {
                ms: u64::MAX,
                seq: u64::MAX,
            },
        };
        assert_eq!(
            read_history(&mut c, P, "42", &far, lim(100)).unwrap(),
            History::Missed
        );
        let other_epoch = ClientId {
            epoch: "zzz".into(),
            id: id.id,
        };
        assert_eq!(
            read_history(&mut c, P, "42", &other_epoch, lim(100)).unwrap(),
            History::Missed
        );
        assert!(matches!(
            read_history(&mut c, P, "42", &id, lim(100)).unwrap(),
            History::Recovered(_)
        ));
    }

    #[test]
    fn history_library_versions() {
        let r = TestRedis::start();
        let mut c = r.conn();
        assert_eq!(
            publish(&mut c, P, br#"{"userId":"1"}"#)
                .unwrap_err()
                .to_string(),
            PublishError::NoLibrary.to_string()
        );
        assert_eq!(
            ensure_library(&mut c, P, 100, 300).unwrap(),
            LoadOutcome::Loaded { previous: None }
        );
        assert_eq!(
            ensure_library(&mut c, P, 100, 300).unwrap(),
            LoadOutcome::Loaded {
                previous: Some(LIBRARY_VERSION)
            }
        );
        let newer = library_source(P, 100, 300).replace(
            &format!("local VERSION = {LIBRARY_VERSION}\n"),
            &format!("local VERSION = {}\n", LIBRARY_VERSION + 1),
        );
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(newer)
            .query::<String>(&mut c)
            .unwrap();
        assert_eq!(
            ensure_library(&mut c, P, 100, 300).unwrap(),
            LoadOutcome::KeptNewer {
                theirs: LIBRARY_VERSION + 1
            }
        );
        let v: i64 = redis::cmd("FCALL_RO")
            .arg("pushwire_version")
            .arg(0)
            .query(&mut c)
            .unwrap();
        assert_eq!(v, LIBRARY_VERSION + 1);
        // Another prefix is another library.
        assert_eq!(
            ensure_library(&mut c, "other", 100, 300).unwrap(),
            LoadOutcome::Loaded { previous: None }
        );
        assert!(ensure_library(&mut c, "a:b", 100, 300).is_err());
    }

    #[test]
    fn history_publish_sends_the_envelope() {
        let (r, mut c) = setup(100, 300);
        let mut sub = r.conn();
        let mut ps = sub.as_pubsub();
        ps.subscribe("pushwire:notices").unwrap();
        let notice = r#"{"userId":"42","text":"h\u00e9llo é"}"#;
        let p = publish(&mut c, P, notice.as_bytes()).unwrap();
        assert_eq!(p.receivers, 1);
        let msg = ps.get_message().unwrap();
        let payload = msg.get_payload_bytes();
        let (id, s, range) = parse_envelope(payload).unwrap();
        assert_eq!(s, p.id);
        assert_eq!(id, ClientId::parse(&p.id).unwrap().id);
        assert_eq!(&payload[range], notice.as_bytes());
        serde_json::from_slice::<serde_json::Value>(payload).unwrap();
    }

    /// Not a pass/fail test: prints MEMORY USAGE of one user's history.
    /// `cargo test --lib history_memory -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn history_memory_usage() {
        let (_r, mut c) = setup(100, 300);
        let body = "x".repeat(170);
        let one = format!(r#"{{"userId":"user-000042","text":"{body}"}}"#);
        println!("notice bytes: {}", one.len());
        let mut published = 0;
        for n in [100, 199, 200] {
            while published < n {
                publish_ok(&mut c, &one);
                published += 1;
            }
            let len: usize = redis::cmd("XLEN")
                .arg("pushwire:history:user-000042")
                .query(&mut c)
                .unwrap();
            let mem: i64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg("pushwire:history:user-000042")
                .arg("SAMPLES")
                .arg(0)
                .query(&mut c)
                .unwrap();
            println!("after {n} publishes: XLEN {len}, MEMORY USAGE {mem} bytes");
        }
    }
}
