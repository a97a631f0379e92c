//! The Redis subscriber: one blocking thread with one SUBSCRIBE connection.
//!
//! It parses each notice once and hands it to the loops (`dispatch`), never
//! waiting on them. It does not trust an open TCP socket: every
//! `--canary-interval` it publishes a canary on a channel of its own, which
//! it also subscribes to; a canary that does not come back in time means
//! the subscription is dead (Redis paused, a half-open link, a failover),
//! and the link is rebuilt. Readiness follows the canary. Reconnects back
//! off exponentially with jitter, capped at a few seconds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Client, RedisError};

use crate::{dispatch, notice, Shared};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read timeout on the subscription: how often the thread looks up from
/// `get_message` to send canaries and check for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

enum End {
    Stop,
    Lost(String),
}

pub fn run(url: String, shared: Arc<Shared>) {
    let client = match Client::open(url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            // The URL was validated at start; this cannot happen.
            log::error!("redis: bad URL: {e}");
            return;
        }
    };
    let canary = format!("pushwire:canary:{:016x}", random_u64());
    let mut backoff = BACKOFF_MIN;
    let mut was_lost = false;
    let mut ever_ready = false;
    while !shared.shutting_down.load(Ordering::Relaxed) {
        let mut became_ready = false;
        let end = session(&client, &shared, &canary, &mut || {
            became_ready = true;
            if ever_ready {
                shared
                    .metrics
                    .redis_reconnects
                    .fetch_add(1, Ordering::Relaxed);
                log::info!("redis: subscription restored on {}", shared.config.channel);
            } else {
                log::info!(
                    "redis: subscribed to {} (canary {canary})",
                    shared.config.channel
                );
            }
            set_ready(&shared, true);
            if was_lost {
                if let Some(text) = &shared.config.resync_notice {
                    shared.metrics.resync_sent.fetch_add(1, Ordering::Relaxed);
                    dispatch::broadcast_frame(&shared, notice::text_frame(text.as_bytes()));
                }
            }
            ever_ready = true;
            was_lost = false;
        });
        set_ready(&shared, false);
        match end {
            End::Stop => break,
            End::Lost(why) => {
                if became_ready || !was_lost {
                    log::warn!("redis: subscription lost: {why}; reconnecting");
                } else {
                    log::debug!("redis: still unavailable: {why}");
                }
                if became_ready {
                    backoff = BACKOFF_MIN;
                }
                was_lost = true;
            }
        }
        // Jitter: somewhere between half and all of the backoff.
        let sleep = backoff / 2
            + Duration::from_millis(random_u64() % (backoff.as_millis() as u64 / 2 + 1));
        sleep_unless_stopping(&shared, sleep);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    log::debug!("redis: subscriber stopped");
}

fn set_ready(shared: &Shared, ready: bool) {
    shared.redis_ready.store(ready, Ordering::Relaxed);
    shared
        .metrics
        .redis_connected
        .store(ready as u64, Ordering::Relaxed);
}

fn sleep_unless_stopping(shared: &Shared, d: Duration) {
    let until = Instant::now() + d;
    while !shared.shutting_down.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

fn session(client: &Client, shared: &Shared, canary: &str, on_ready: &mut dyn FnMut()) -> End {
    let lost = |what: &str, e: RedisError| End::Lost(format!("{what}: {e}"));
    let mut publisher = match client.get_connection_with_timeout(CONNECT_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return lost("connect", e),
    };
    let mut sub = match client.get_connection_with_timeout(CONNECT_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return lost("connect", e),
    };
    let io_timeout = Some(Duration::from_secs(1));
    if let Err(e) = publisher
        .set_read_timeout(io_timeout)
        .and_then(|_| publisher.set_write_timeout(io_timeout))
        .and_then(|_| sub.set_write_timeout(io_timeout))
        .and_then(|_| sub.set_read_timeout(io_timeout))
    {
        return lost("socket options", e);
    }
    let mut ps = sub.as_pubsub();
    // One channel per call: the crate reads one confirmation per call.
    if let Err(e) = ps.subscribe(&shared.config.channel) {
        return lost("subscribe", e);
    }
    if let Err(e) = ps.subscribe(canary) {
        return lost("subscribe", e);
    }
    if let Err(e) = ps.set_read_timeout(Some(POLL_INTERVAL)) {
        return lost("socket options", e);
    }
    let interval = shared.config.canary_interval;
    let deadline = (interval * 2).max(Duration::from_millis(500));
    let mut seq: u64 = 0;
    // (sequence, sent at) of the canary we wait for.
    let mut outstanding: Option<(u64, Instant)> = None;
    let mut last_proof = Instant::now() - interval;
    let mut ready = false;
    let mut last_message = Instant::now();
    loop {
        if shared.shutting_down.load(Ordering::Relaxed) {
            return End::Stop;
        }
        let now = Instant::now();
        match outstanding {
            // Silence, not lateness, is the sign of a dead link: the canary
            // may queue behind a burst that is still being read.
            Some((_, sent)) if now.duration_since(sent.max(last_message)) > deadline => {
                shared
                    .metrics
                    .canary_failures
                    .fetch_add(1, Ordering::Relaxed);
                return End::Lost(format!("canary not back within {deadline:?}"));
            }
            None if now.duration_since(last_proof) >= interval || !ready => {
                seq += 1;
                let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(canary)
                    .arg(seq)
                    .query(&mut publisher);
                if let Err(e) = r {
                    // A paused Redis usually shows here first: the publish times out.
                    shared
                        .metrics
                        .canary_failures
                        .fetch_add(1, Ordering::Relaxed);
                    return lost("canary publish", e);
                }
                outstanding = Some((seq, now));
            }
            _ => {}
        }
        let msg = match ps.get_message() {
            Ok(m) => {
                last_message = Instant::now();
                m
            }
            Err(e) if e.is_timeout() => continue,
            Err(e) => return lost("read", e),
        };
        let payload = msg.get_payload_bytes();
        if msg.get_channel_name() == canary {
            if outstanding.is_some_and(|(s, _)| payload == s.to_string().as_bytes()) {
                outstanding = None;
                last_proof = Instant::now();
                if !ready {
                    ready = true;
                    on_ready();
                }
            }
            continue;
        }
        let _ = dispatch::handle_payload(shared, payload);
    }
}

/// A cheap random number for jitter and names (no crate needed: std's
/// hasher is randomly keyed per process).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}
