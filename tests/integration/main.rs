//! Behaviour over real sockets: the real `pushwire` binary, a real
//! `redis-server` each test starts on a free port, real WebSocket clients,
//! and a watchdog in every test so a hang fails fast. The pure functions'
//! property tests are unit tests of the crate (`src/props.rs`).

mod util;

mod admin_auth;
mod browser;
mod cli;
mod durable;
mod durable_faults;
mod handshake;
mod hostile;
mod lifecycle;
mod notices;
mod presence;
mod push;
mod redis_faults;
mod sentinel;
mod slow;
mod startup;
mod tls;
mod tokens;
mod toolkit;
