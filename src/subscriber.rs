//! The Redis subscriber: one blocking thread with one SUBSCRIBE connection.
//!
//! It parses each notice once and hands it to the loops (`dispatch`), never
//! waiting on them. It does not trust an open TCP socket: every
//! `--canary-interval` it publishes a canary on a channel of its own, which
//! it also subscribes to; a canary that does not come back in time means
//! the subscription is silent (Redis paused, a half-open link, a failover),
//! and a new link is built. Readiness follows the canary. Reconnects back
//! off exponentially with jitter, capped at a few seconds.
//!
//! A silent link is not thrown away: Redis may only be paused, with the
//! notices published meanwhile still on their way to it. It is kept and read
//! while the new link is built, and then stitched to it: the first canary
//! of the new link marks the seam, the old link is read up to that canary
//! and the new one after it, so each notice is delivered once. When the old
//! link never brings the marker (it was really dead) what it held is lost.
//! Either way `--resync-notice` follows, as after a link that closed.
//!
//! Every link is built on the master found at that moment
//! ([`RedisTarget::find_master`]: with Sentinel, asked anew), never on the
//! last address; a server that says it is a replica, at link build or in
//! the `ROLE` check that follows each canary, is a lost link. With
//! Sentinel, a `+switch-master` announcement (watched on its own thread)
//! ends the link at once; it is only a shortcut, the canary stays the
//! proof. The master a canary proved is recorded in the target, and the
//! other Redis users (`POST /publish`, the history reader) follow it.
//!
//! About 570 lines: one thread's life (link, canary, stitch, durable
//! channel, loss and restore), kept in one file so its states read in order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult};

use crate::config::{Config, RedisTarget};
use crate::connection::intern_epoch;
use crate::dispatch::{Delivery, DurableId, Frames, Inbox};
use crate::history;
use crate::metrics::Metrics;
use crate::notice;
use crate::redis_target::{self, Master, RoleError};
use crate::resp;
use crate::status::Status;

/// What the subscriber reads and where it delivers.
pub struct Ctx {
    pub config: Arc<Config>,
    pub delivery: Delivery,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
}

impl Ctx {
    /// The channel durable notices come on (SPEC section 8), when history
    /// is on.
    fn durable_channel(&self) -> Option<String> {
        (self.config.history_size > 0).then(|| format!("{}:notices", self.config.key_prefix))
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read and write timeout of commands (SUBSCRIBE, the canary's PUBLISH).
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Read timeout on the subscription: how often the thread looks up from
/// its reads to send canaries and check for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A subscription held after a `+switch-master` is read until the new
/// link's first canary comes on it, or it closes, or no notice came on it
/// for this long (see [`Sub::quiet_ends`]).
const SWITCHED_QUIET: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// How often "cannot connect" is repeated while Redis stays unreachable.
const UNAVAILABLE_LINE_EVERY: Duration = Duration::from_secs(60);

/// One link to Redis: a connection for the canary's PUBLISH and a
/// subscribed one.
struct Link {
    publisher: Connection,
    sub: Sub,
    /// The server both connections go to.
    master: Master,
}

/// A subscribed connection and what reading it means.
struct Sub {
    /// Read with `resp`'s reader over a reused buffer (the crate's reader
    /// zeroes 8 KiB per read); the crate's connection on TLS links.
    conn: resp::Subscription,
    /// Until this canary comes, the notices on this subscription were
    /// delivered through the link before it (the seam of a stitch), and
    /// are skipped.
    skip_until: Option<u64>,
    /// Held after a `+switch-master`: its server may stay a writable
    /// master for many seconds (Sentinel converts a healthy old master
    /// only later), so the new link's canary may never come here; once it
    /// has been quiet for [`SWITCHED_QUIET`] its publishers have moved on.
    quiet_ends: bool,
    durable: Option<String>,
    /// One shared string per epoch met.
    epoch: Option<Arc<str>>,
}

/// What one read of a subscription brought.
enum Read {
    Timeout,
    Notice,
    Canary(u64),
}

impl Sub {
    /// Reads one message, or times out after [`POLL_INTERVAL`]; hands a
    /// notice to the loops unless it is before the seam.
    fn read_one(&mut self, shared: &Ctx, canary: &str) -> Result<Read, resp::Error> {
        let Some(msg) = self.conn.next_message()? else {
            return Ok(Read::Timeout);
        };
        if msg.channel == canary.as_bytes() {
            // Not a number: not ours; it matches nothing.
            let seq = std::str::from_utf8(msg.payload)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            if self.skip_until == Some(seq) {
                self.skip_until = None;
            }
            return Ok(Read::Canary(seq));
        }
        if self.skip_until.is_none() {
            if self.durable.as_deref().map(str::as_bytes) == Some(msg.channel) {
                // `msg` borrows `conn`: only the epoch is lent on.
                Self::deliver_durable(&mut self.epoch, shared, msg.payload);
            } else {
                let _ = shared.delivery.handle_payload(msg.payload);
            }
        }
        Ok(Read::Notice)
    }

    /// A durable notice: `{"id":..,"notice":..}` as the function library
    /// published it. Delivered in both forms, built once each.
    fn deliver_durable(epoch_seen: &mut Option<Arc<str>>, shared: &Ctx, payload: &[u8]) {
        let d = &shared.delivery;
        d.metrics().notices_received.fetch_add(1, Ordering::Relaxed);
        let Some((id, id_str, range)) = history::parse_envelope(payload) else {
            d.invalid(&notice::NoticeError::NotJson(
                "not a durable notice envelope".into(),
            ));
            return;
        };
        let n = match notice::parse(&payload[range]) {
            Ok(n) => n,
            Err(e) => return d.invalid(&e),
        };
        let epoch = id_str.split(':').next().unwrap_or_default();
        let id = DurableId {
            id,
            epoch: intern_epoch(epoch_seen, epoch),
        };
        d.durable().set_last(&id);
        let wrapped = if d.durable().connections.load(Ordering::Relaxed) > 0 {
            notice::text_frame(payload)
        } else {
            bytes::Bytes::new()
        };
        let frames = Frames {
            plain: n.frame,
            wrapped,
            id: Some(id),
        };
        d.deliver_frames(&n.route, frames);
    }
}

enum End {
    Stop,
    /// Nothing more will come on the link (refused, closed, reset).
    Dead(String),
    /// The canary did not come back: the subscription is kept for the
    /// stitch.
    Silent(String, Sub),
    /// A Sentinel announced another master: the old subscription is kept
    /// for the stitch (a demoted master still relays what the new one
    /// publishes, canaries included).
    Switched(String, Sub),
}

struct State {
    /// A link was proven before: the next proof is a reconnect, owed a
    /// resync notice.
    ever_ready: bool,
    /// The last canary sequence number sent, over all links.
    seq: u64,
    /// A silent subscription, read until the next link's first canary.
    held: Option<Sub>,
    /// The current link's canary came back at least once.
    proven: bool,
}

pub fn run(target: RedisTarget, shared: Ctx) {
    if target.is_sentinel() {
        let t = target.clone();
        let status = shared.status.clone();
        let spawned = std::thread::Builder::new()
            .name("sentinel-watch".into())
            .spawn(move || t.watch_switches(|| status.is_shutting_down()));
        if let Err(e) = spawned {
            // Not fatal: the canary finds a failover without it.
            log::warn!("redis: cannot start the +switch-master watch: {e}");
        }
    }
    let canary = format!("pushwire:canary:{:016x}", random_u64());
    let mut backoff = BACKOFF_MIN;
    let mut st = State {
        ever_ready: false,
        seq: 0,
        held: None,
        proven: false,
    };
    let mut last_unavailable_line: Option<(Instant, String)> = None;
    let place = target.to_string();
    while !shared.status.is_shutting_down() {
        st.proven = false;
        let end = match open_link(&target, &shared, &canary) {
            Ok(link) => session(link, &target, &shared, &canary, &mut st),
            Err(why) => {
                shared
                    .metrics
                    .redis_connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                End::Dead(why)
            }
        };
        // Not ready from the moment the link is found dead; the other
        // Redis users drop their connections to it.
        set_ready(&shared, false);
        target.lost();
        let why = match end {
            End::Stop => break,
            End::Dead(why) => why,
            End::Silent(why, sub) => {
                shared
                    .metrics
                    .canary_failures
                    .fetch_add(1, Ordering::Relaxed);
                // Only one is held: the older one has the older notices.
                st.held.get_or_insert(sub);
                why
            }
            End::Switched(why, mut sub) => {
                sub.quiet_ends = true;
                st.held.get_or_insert(sub);
                why
            }
        };
        shared
            .status
            .set_redis_why(format!("redis link down: {why}"));
        if st.proven {
            log::warn!("redis: subscription lost: {why}; reconnecting");
            last_unavailable_line = None;
            // Connections that use `since` hold live notices from here and
            // are recovered from history once a link is proven again.
            shared.delivery.tell_all(|| Inbox::Lost);
        } else if backoff < BACKOFF_MAX
            || last_unavailable_line
                .as_ref()
                .is_none_or(|(t, last)| *last != why || t.elapsed() >= UNAVAILABLE_LINE_EVERY)
        {
            // A link that never worked (Redis down at start, a wrong
            // password, a bad certificate, a replica): say why, once per
            // backoff step, then when the reason changes and now and then
            // while it lasts, so that the journal tells an operator why
            // the node is not ready.
            log::warn!(
                "redis: cannot connect to Redis at {place}: {why} (retrying every {}s at most; repeated every {}s while it lasts)",
                BACKOFF_MAX.as_secs(),
                UNAVAILABLE_LINE_EVERY.as_secs()
            );
            last_unavailable_line = Some((Instant::now(), why));
        } else {
            log::debug!("redis: still unavailable: {why}");
        }
        if st.proven {
            // A link that worked is rebuilt at once: every millisecond
            // without a subscription loses what is published in it. If
            // Redis is gone, this first try fails fast and backs off.
            backoff = BACKOFF_MIN;
            continue;
        }
        // Jitter: somewhere between half and all of the backoff.
        let pause = backoff / 2
            + Duration::from_millis(random_u64() % (backoff.as_millis() as u64 / 2 + 1));
        if wait_reading_held(&target, &shared, &canary, &mut st, pause) {
            // A Sentinel named a new master: try it now, and from the
            // bottom of the backoff.
            backoff = BACKOFF_MIN;
        } else {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    log::debug!("redis: subscriber stopped");
}

fn set_ready(shared: &Ctx, ready: bool) {
    shared.status.set_redis_ready(ready);
    shared
        .metrics
        .redis_connected
        .store(ready as u64, Ordering::Relaxed);
}

fn open_link(target: &RedisTarget, shared: &Ctx, canary: &str) -> Result<Link, String> {
    // Found now (with Sentinel: asked now), ROLE master checked; the
    // subscription goes to the very same server.
    let found = target
        .find_master(CONNECT_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    let master = found.master;
    let mut publisher = found.conn;
    let io = Some(IO_TIMEOUT);
    publisher
        .set_read_timeout(io)
        .and_then(|_| publisher.set_write_timeout(io))
        .map_err(|e| format!("socket options: {e}"))?;
    // One command: Redis writes the confirmations back to back, so no
    // message can come between them.
    let durable = shared.durable_channel();
    let mut channels = vec![shared.config.channel.as_str(), canary];
    channels.extend(durable.as_deref());
    let timeouts = resp::Timeouts {
        connect: CONNECT_TIMEOUT,
        io: IO_TIMEOUT,
        poll: POLL_INTERVAL,
    };
    let client = target
        .client_for_master(&master)
        .map_err(|e| format!("connect: {e}"))?;
    let sub = resp::Subscription::open(&client, &channels, timeouts)
        .map_err(|e| format!("subscribe: {e}"))?;
    if durable.is_some() {
        load_library(shared, &mut publisher)?;
    }
    Ok(Link {
        master,
        publisher,
        sub: Sub {
            conn: sub,
            skip_until: None,
            quiet_ends: false,
            durable,
            epoch: None,
        },
    })
}

/// Loads (or upgrades) the function library on every new link: Redis may
/// have lost it (a restart without persistence, a failover). Not fatal:
/// plain notices flow without it; durable publishing answers an error.
/// Except READONLY: the server is a replica, and the link is not built.
fn load_library(shared: &Ctx, conn: &mut Connection) -> Result<(), String> {
    let c = &shared.config;
    match history::ensure_library(
        conn,
        &c.key_prefix,
        c.history_size,
        c.history_ttl.as_secs().max(1),
    ) {
        Ok(history::LoadOutcome::Loaded { previous }) => log::debug!(
            "redis: function library {} loaded (version {}, was {previous:?})",
            c.key_prefix,
            history::LIBRARY_VERSION
        ),
        Ok(history::LoadOutcome::KeptNewer { theirs }) => log::warn!(
            "redis: function library {} version {theirs} is newer than ours ({}): kept",
            c.key_prefix,
            history::LIBRARY_VERSION
        ),
        Err(e) if e.code() == Some("READONLY") => {
            return Err(format!(
                "the server is a replica (READONLY on FUNCTION LOAD): {e}"
            ))
        }
        Err(e) => log::warn!(
            "redis: cannot load the function library {} (durable notices need Redis 7): {e}",
            c.key_prefix
        ),
    }
    Ok(())
}

fn publish_canary(publisher: &mut Connection, canary: &str, seq: u64) -> RedisResult<i64> {
    redis::cmd("PUBLISH").arg(canary).arg(seq).query(publisher)
}

/// While waiting to reconnect, a held (silent) subscription is still read:
/// if Redis was only paused, its notices arrive there. True when the wait
/// was cut short by a `+switch-master` announcement.
fn wait_reading_held(
    target: &RedisTarget,
    shared: &Ctx,
    canary: &str,
    st: &mut State,
    d: Duration,
) -> bool {
    let until = Instant::now() + d;
    while !shared.status.is_shutting_down() {
        if let Some(to) = target.take_switch_announced() {
            log::info!("redis: Sentinel announced {to} as the master: reconnecting now");
            return true;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some(held) = st.held.as_mut() else {
            std::thread::sleep(left.min(Duration::from_millis(50)));
            continue;
        };
        if held.read_one(shared, canary).is_err() {
            st.held = None;
        }
    }
    false
}

/// Reads the held subscription up to the canary `marker`, handing its
/// notices to the loops. True when the marker came: the two links overlap,
/// and nothing was lost between them.
fn drain_held(mut held: Sub, shared: &Ctx, canary: &str, marker: u64, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut last_notice = Instant::now();
    while Instant::now() < until && !shared.status.is_shutting_down() {
        match held.read_one(shared, canary) {
            Ok(Read::Canary(seq)) if seq == marker => return true,
            Ok(Read::Notice) => last_notice = Instant::now(),
            Ok(_) if held.quiet_ends && last_notice.elapsed() >= SWITCHED_QUIET => {
                log::info!(
                    "redis: the old master has been quiet for {} ms since the switch: reading the new one",
                    SWITCHED_QUIET.as_millis()
                );
                return false;
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

fn session(
    mut link: Link,
    target: &RedisTarget,
    shared: &Ctx,
    canary: &str,
    st: &mut State,
) -> End {
    let interval = shared.config.canary_interval;
    let deadline = (interval * 2).max(Duration::from_millis(500));
    // The first canary of a link is also the seam of a stitch.
    st.seq += 1;
    let first = st.seq;
    if let Err(e) = publish_canary(&mut link.publisher, canary, first) {
        return End::Dead(format!("canary publish: {e}"));
    }
    // (sequence, sent at) of the canary we wait for.
    let mut outstanding: Option<(u64, Instant)> = Some((first, Instant::now()));
    if let Some(held) = st.held.take() {
        // What comes here before the seam was delivered through the held
        // link (or lost with it).
        link.sub.skip_until = Some(first);
        if drain_held(held, shared, canary, first, deadline) {
            log::info!(
                "redis: the silent link was read up to the new one's first canary: nothing lost"
            );
        } else {
            log::info!("redis: the silent link never brought the new one's first canary");
        }
    }
    let mut last_proof = Instant::now();
    let mut last_message = Instant::now();
    loop {
        if shared.status.is_shutting_down() {
            return End::Stop;
        }
        if let Some(to) = target.take_switch_announced().filter(|m| *m != link.master) {
            return End::Switched(
                format!(
                    "Sentinel announced +switch-master from {} to {to}",
                    link.master
                ),
                link.sub,
            );
        }
        let now = Instant::now();
        match outstanding {
            // Silence, not lateness, is the sign of a dead link: the canary
            // may queue behind a burst that is still being read.
            Some((_, sent)) if now.duration_since(sent.max(last_message)) > deadline => {
                return End::Silent(format!("canary not back within {deadline:?}"), link.sub);
            }
            None if now.duration_since(last_proof) >= interval => {
                st.seq += 1;
                if let Err(e) = publish_canary(&mut link.publisher, canary, st.seq) {
                    if e.code() == Some("READONLY") {
                        return End::Dead(format!(
                            "{} is a replica now (READONLY on the canary): {e}",
                            link.master
                        ));
                    }
                    // A paused Redis usually shows here first: the publish
                    // times out. The subscription itself may be fine.
                    return End::Silent(format!("canary publish: {e}"), link.sub);
                }
                outstanding = Some((st.seq, now));
                // A replica accepts PUBLISH (it reaches only its own
                // subscribers): a master demoted under this link shows in
                // ROLE only.
                match redis_target::check_master(&mut link.publisher) {
                    Ok(()) => {}
                    Err(RoleError::NotMaster(e)) => {
                        return End::Dead(format!("{}: {e}", link.master))
                    }
                    // As for the canary's publish: a paused Redis, the
                    // subscription kept for the stitch.
                    Err(RoleError::Unanswered(e)) => return End::Silent(e, link.sub),
                }
            }
            _ => {}
        }
        match link.sub.read_one(shared, canary) {
            Ok(Read::Timeout) => {}
            Ok(Read::Notice) => last_message = Instant::now(),
            Ok(Read::Canary(seq)) => {
                last_message = Instant::now();
                if outstanding.is_some_and(|(s, _)| s == seq) {
                    outstanding = None;
                    last_proof = last_message;
                    if !st.proven {
                        st.proven = true;
                        target.proven(&link.master);
                        on_proven(shared, canary, st, &link.master);
                    }
                }
            }
            Err(e) => return End::Dead(format!("read: {e}")),
        }
    }
}

/// A link's first canary came back: ready. After a loss of the
/// subscription (closed, reset or silent), clients get the resync notice:
/// even when the stitch delivered everything, the node cannot prove to a
/// client that nothing was missed.
fn on_proven(shared: &Ctx, canary: &str, st: &mut State, master: &Master) {
    set_ready(shared, true);
    if !st.ever_ready {
        st.ever_ready = true;
        log::info!(
            "redis: subscribed to {} on {master} (canary {canary})",
            shared.config.channel
        );
        return;
    }
    shared
        .metrics
        .redis_reconnects
        .fetch_add(1, Ordering::Relaxed);
    log::info!(
        "redis: subscription restored on {} (master {master})",
        shared.config.channel
    );
    let resync = shared.config.resync_notice.as_ref().map(|text| {
        shared.metrics.resync_sent.fetch_add(1, Ordering::Relaxed);
        notice::text_frame(text.as_bytes())
    });
    shared.delivery.tell_all(|| Inbox::Restored(resync.clone()));
}

/// A random number for jitter and the canary's channel name, from the
/// kernel (each node must pick its own channel); the clock if that fails.
fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_ne_bytes(b),
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()) << 32
        }
    }
}
