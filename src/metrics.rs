//! Counters and gauges, shared by every thread as relaxed atomics and
//! rendered in the Prometheus text format by the admin listener.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::auth::Reason;

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_accepted: AtomicU64,
    /// Indexed by [`Reason::index`].
    pub handshake_rejected: [AtomicU64; Reason::COUNT],
    /// Admin requests refused for a missing or wrong token.
    pub admin_rejected: AtomicU64,
    pub notices_received: AtomicU64,
    pub notices_invalid: AtomicU64,
    pub notices_dropped: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub slow_consumer_closed: AtomicU64,
    pub token_expired_closed: AtomicU64,
    pub idle_closed: AtomicU64,
    pub protocol_closed: AtomicU64,
    pub accept_errors: AtomicU64,
    pub redis_connected: AtomicU64,
    pub redis_reconnects: AtomicU64,
    pub canary_failures: AtomicU64,
    /// Subscriber link builds that failed (refused, TLS, a replica, ...).
    pub redis_connect_failures: AtomicU64,
    pub resync_sent: AtomicU64,
    pub recoveries_recovered: AtomicU64,
    pub recoveries_missed: AtomicU64,
    pub replayed_notices: AtomicU64,
    pub durable_published: AtomicU64,
    pub durable_unreplicated: AtomicU64,
    /// Per-user counts written to Redis by the presence thread.
    pub presence_updates: AtomicU64,
    pub presence_errors: AtomicU64,
    pub events_online: AtomicU64,
    pub events_offline: AtomicU64,
}

impl Metrics {
    pub fn reject(&self, reason: Reason) {
        self.reject_n(reason, 1);
    }

    pub fn reject_n(&self, reason: Reason, n: u64) {
        self.handshake_rejected[reason.index()].fetch_add(n, Relaxed);
    }

    pub fn render(&self, users: usize) -> String {
        let mut out = String::with_capacity(2048);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        one(
            "pushwire_connections",
            "gauge",
            "Open WebSocket connections.",
            self.connections.load(Relaxed),
        );
        one(
            "pushwire_users",
            "gauge",
            "Users with at least one open connection.",
            users as u64,
        );
        one(
            "pushwire_connections_accepted_total",
            "counter",
            "Upgrades completed.",
            self.connections_accepted.load(Relaxed),
        );
        one(
            "pushwire_notices_received_total",
            "counter",
            "Notices received (valid or not).",
            self.notices_received.load(Relaxed),
        );
        one(
            "pushwire_notices_invalid_total",
            "counter",
            "Notices dropped as invalid.",
            self.notices_invalid.load(Relaxed),
        );
        one(
            "pushwire_notices_dropped_total",
            "counter",
            "Deliveries dropped because a loop's inbox was full.",
            self.notices_dropped.load(Relaxed),
        );
        one(
            "pushwire_messages_delivered_total",
            "counter",
            "Notice frames queued to connections.",
            self.messages_delivered.load(Relaxed),
        );
        one(
            "pushwire_slow_consumer_closed_total",
            "counter",
            "Connections cut for passing --max-queue-bytes.",
            self.slow_consumer_closed.load(Relaxed),
        );
        one(
            "pushwire_token_expired_closed_total",
            "counter",
            "Connections closed with 4001 when their token expired.",
            self.token_expired_closed.load(Relaxed),
        );
        one(
            "pushwire_idle_closed_total",
            "counter",
            "Connections dropped after --idle-timeout of silence.",
            self.idle_closed.load(Relaxed),
        );
        one(
            "pushwire_protocol_closed_total",
            "counter",
            "Connections closed for a protocol violation or an oversized message.",
            self.protocol_closed.load(Relaxed),
        );
        one(
            "pushwire_accept_errors_total",
            "counter",
            "Failed accept() calls (descriptor exhaustion and the like).",
            self.accept_errors.load(Relaxed),
        );
        one(
            "pushwire_redis_connected",
            "gauge",
            "1 while the subscription is proven by the canary.",
            self.redis_connected.load(Relaxed),
        );
        one(
            "pushwire_redis_reconnects_total",
            "counter",
            "Subscriber reconnects after a loss.",
            self.redis_reconnects.load(Relaxed),
        );
        one(
            "pushwire_redis_canary_failures_total",
            "counter",
            "Canaries that could not be published or did not come back in time.",
            self.canary_failures.load(Relaxed),
        );
        one(
            "pushwire_redis_connect_failures_total",
            "counter",
            "Subscriber links that could not be built (refused, TLS, auth, a replica); the reason is in the log and /readyz.",
            self.redis_connect_failures.load(Relaxed),
        );
        one(
            "pushwire_resync_notices_total",
            "counter",
            "Times the resync notice was sent after a loss.",
            self.resync_sent.load(Relaxed),
        );
        one(
            "pushwire_admin_rejected_total",
            "counter",
            "Admin requests refused for a missing or wrong token.",
            self.admin_rejected.load(Relaxed),
        );
        one(
            "pushwire_replayed_notices_total",
            "counter",
            "Durable notices replayed from history.",
            self.replayed_notices.load(Relaxed),
        );
        one(
            "pushwire_durable_published_total",
            "counter",
            "Durable notices published through POST /publish.",
            self.durable_published.load(Relaxed),
        );
        one(
            "pushwire_durable_unreplicated_total",
            "counter",
            "Durable notices POST /publish answered 503 for: fewer than --history-replicas replicas acknowledged them in time.",
            self.durable_unreplicated.load(Relaxed),
        );
        one(
            "pushwire_presence_updates_total",
            "counter",
            "Per-user connection counts this node wrote to Redis (presence).",
            self.presence_updates.load(Relaxed),
        );
        one(
            "pushwire_presence_errors_total",
            "counter",
            "Presence writes to Redis that failed (the node rewrites its state after one).",
            self.presence_errors.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP pushwire_events_published_total Online/offline events this node published, by event.\n# TYPE pushwire_events_published_total counter\npushwire_events_published_total{{event=\"online\"}} {}\npushwire_events_published_total{{event=\"offline\"}} {}", self.events_online.load(Relaxed), self.events_offline.load(Relaxed));
        let _ = writeln!(out, "# HELP pushwire_recoveries_total Recoveries from history (since on the URL, or after a Redis loss), by result.\n# TYPE pushwire_recoveries_total counter\npushwire_recoveries_total{{result=\"recovered\"}} {}\npushwire_recoveries_total{{result=\"missed\"}} {}", self.recoveries_recovered.load(Relaxed), self.recoveries_missed.load(Relaxed));
        let _ = writeln!(out, "# HELP pushwire_handshake_rejected_total Upgrades refused, by reason.\n# TYPE pushwire_handshake_rejected_total counter");
        for reason in Reason::ALL {
            let _ = writeln!(
                out,
                "pushwire_handshake_rejected_total{{reason=\"{}\"}} {}",
                reason.label(),
                self.handshake_rejected[reason.index()].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}", resident_bytes());
        out
    }
}

/// Resident set size from /proc/self/statm (0 where there is none).
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}
