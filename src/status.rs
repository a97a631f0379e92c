//! The node's life as every thread sees it: when it started, whether it is
//! shutting down, whether its Redis subscription is proven. Plain atomics,
//! so the loops, the subscriber and the admin listener read it without a
//! lock and without knowing about each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

pub struct Status {
    started: Instant,
    shutting_down: AtomicBool,
    /// Set while the subscription is proven end to end; always set
    /// standalone (no Redis).
    redis_ready: AtomicBool,
    /// Why the subscription is not proven, for `/readyz` (a lock held
    /// only to copy the string in or out).
    redis_why: Mutex<String>,
}

impl Status {
    pub fn new(standalone: bool) -> Status {
        Status {
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            redis_ready: AtomicBool::new(standalone),
            redis_why: Mutex::new("redis subscription not established yet".into()),
        }
    }

    /// Milliseconds since start, the unit of the loops' heartbeats.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn redis_ready(&self) -> bool {
        self.redis_ready.load(Ordering::Relaxed)
    }

    pub fn set_redis_ready(&self, ready: bool) {
        self.redis_ready.store(ready, Ordering::Relaxed);
    }

    /// Says why the subscription is not proven (shown by `/readyz`).
    pub fn set_redis_why(&self, why: impl Into<String>) {
        *self
            .redis_why
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = why.into();
    }

    pub fn redis_why(&self) -> String {
        self.redis_why
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ready for traffic: subscribed (or standalone) and not draining.
    pub fn is_ready(&self) -> bool {
        self.redis_ready() && !self.is_shutting_down()
    }
}
