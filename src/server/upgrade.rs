//! The upgrade decision: a whole HTTP request becomes an open connection
//! (path, origin, credentials, `since`, the limits) or a plain HTTP answer
//! (a refusal, the demo page, the browser client, `/presence/me`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tungstenite::handshake::server::{create_response, write_response, Request};

use super::{Worker, CLIENT_JS, PRESENCE_ME};
use crate::auth;
use crate::config::Config;
use crate::connection::{Durable, Mode, Opening};
use crate::dispatch::DurableId;
use crate::history::ClientId;
use crate::sessions::ConnId;

/// The `--dev` demo page, served at `/` on the WebSocket port.
const DEMO_PAGE: &str = include_str!("../demo.html");

impl Worker {
    pub(super) fn upgrade(&mut self, slot: usize, req: &Request, used: usize, now: Instant) {
        let ctx = self.ctx.clone();
        if ctx.config.dev && req.uri().path() == "/" {
            let page = DEMO_PAGE.as_bytes();
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.answer(200, "text/html; charset=utf-8", page, now);
            }
            return;
        }
        if req.uri().path() == "/pushwire.js" {
            // The browser client, on every node (SPEC section 8).
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.answer(200, "application/javascript; charset=utf-8", CLIENT_JS, now);
            }
            return;
        }
        if req.uri().path() == PRESENCE_ME {
            return self.presence_me(slot, req, now);
        }
        if req.uri().path() != ctx.config.auth.path {
            return self.refuse(slot, auth::NOT_FOUND, now);
        }
        let Ok(response) = create_response(req) else {
            return self.refuse(slot, auth::NOT_UPGRADE, now);
        };
        if ctx.status.is_shutting_down() {
            return self.refuse(slot, auth::SHUTTING_DOWN, now);
        }
        let identity =
            match auth::check(req, &ctx.config.auth, &ctx.keys.current(), auth::unix_now()) {
                Ok(id) => id,
                Err(r) => return self.refuse(slot, r, now),
            };
        // `since` on the URL: absent, plain frames; empty, wrapped frames
        // from now on; an id, a recovery first.
        let since = match req
            .uri()
            .query()
            .and_then(|q| auth::query_param(q, "since"))
        {
            None => None,
            Some(s) if s.is_empty() => Some(None),
            Some(s) => match ClientId::parse(&s) {
                Some(id) => Some(Some(id)),
                None => return self.refuse(slot, auth::BAD_SINCE, now),
            },
        };
        let open = ctx.metrics.connections.fetch_add(1, Ordering::Relaxed);
        if open >= ctx.config.max_connections as u64 {
            ctx.metrics.connections.fetch_sub(1, Ordering::Relaxed);
            return self.refuse(slot, auth::OVER_LIMIT, now);
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            ctx.metrics.connections.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        let id = ConnId {
            worker: self.id,
            slot: slot as u32,
            generation: conn.generation,
        };
        // Checked and taken in one step, before the 101: a storm of one
        // user's upgrades over every loop gets at most the limit.
        if !ctx
            .sessions
            .try_add(&identity.user, id, ctx.config.max_connections_per_user)
        {
            ctx.metrics.connections.fetch_sub(1, Ordering::Relaxed);
            return self.refuse(slot, auth::OVER_USER_LIMIT, now);
        }
        let mut head = Vec::with_capacity(160);
        let _ = write_response(&mut head, &response);
        let user = identity.user.clone();
        let skew = ping_skew(conn.generation, &ctx.config);
        let mode = match &since {
            None => Mode::Plain,
            Some(None) => Mode::Durable(Box::new(Durable::new(ctx.durable.last(), false))),
            Some(Some(since)) => Mode::Durable(Box::new(Durable::new(
                Some(DurableId {
                    id: since.id,
                    epoch: since.epoch.as_str().into(),
                }),
                true,
            ))),
        };
        let generation = conn.generation;
        let opening = Opening {
            response: head,
            used,
            config: self.ws_config,
            identity,
            mode,
            first_ping: skew,
        };
        if !conn.open(opening, now) {
            ctx.sessions.remove(&user, id);
            ctx.metrics.connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        if since.is_some() {
            self.durable_here += 1;
            ctx.durable.connections.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(p) = &ctx.presence {
            p.changed(&user);
        }
        if let Some(Some(since)) = since {
            // Registered for live notices first, then the read: the seam.
            self.request_recovery(slot, generation, user.clone().into(), Some(since));
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        ctx.metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "conn={} user={} peer={} open",
            conn.label(slot),
            user,
            conn.peer
        );
        // Frames sent right behind the request are already buffered.
        let step = conn.read(now);
        self.apply(slot, step, now);
    }

    fn presence_me(&mut self, slot: usize, req: &Request, now: Instant) {
        let key = self.ctx.keys.current();
        let identity = match auth::check(req, &self.me_policy, &key, auth::unix_now()) {
            Ok(id) => id,
            Err(r) => return self.refuse(slot, r, now),
        };
        let body = crate::presence::local_user(&self.ctx.sessions, &identity.user) + "\n";
        if let Some(conn) = self.conns.get_mut(slot) {
            conn.answer(200, "application/json", body.as_bytes(), now);
        }
    }
}

/// How much later than `--ping-interval` a connection gets its first ping:
/// spread evenly (golden-ratio steps over the loop's connection counter) over
/// a quarter of the interval, and never so much that the idle timeout comes
/// before the ping. A round of pings then costs a loop a few hundred sends
/// per tick instead of one send per connection in a single tick.
pub(crate) fn ping_skew(generation: u32, c: &Config) -> Duration {
    let room = c
        .ping_interval
        .div_f64(4.0)
        .min(c.idle_timeout.saturating_sub(c.ping_interval) / 2);
    let fraction = (u64::from(generation).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64
        / (1u64 << 53) as f64;
    room.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_skew_spreads_first_pings_over_a_quarter_interval() {
        let c = Config::default();
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
        let c = Config {
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(26),
            ..Default::default()
        };
        for g in 1..=1000u32 {
            assert!(ping_skew(g, &c) <= Duration::from_millis(500));
        }
    }
}
