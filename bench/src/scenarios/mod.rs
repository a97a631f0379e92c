//! The scenarios, and the phases they share.
//!
//! Each scenario is one function from `Opts` to a printed `Report`; what
//! they have in common (building the client config, the paced connect
//! phase, the barrier between bench processes, waiting for frames) lives
//! here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clients::{Clients, Spec};
use crate::options::Opts;
use crate::stats::Stats;
use crate::wire::{check_loopback_url, parse_ws_url, src_for, ClientCfg, Target};

mod broadcast;
mod idle;
mod limit;
mod storm;
mod targeted;

pub use broadcast::broadcast;
pub use idle::idle;
pub use limit::{limit, limit_serve};
pub use storm::storm;
pub use targeted::targeted;

pub fn client_cfg(o: &Opts, raw_targets: Option<Vec<Target>>) -> Result<ClientCfg, String> {
    let raw = raw_targets.is_some();
    let targets = match raw_targets {
        Some(t) => t,
        None => o
            .urls
            .iter()
            .map(|u| parse_ws_url(u))
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(ClientCfg {
        targets,
        auth: o.auth,
        secret: o.secret.as_bytes().to_vec(),
        user_header: o.user_header.clone(),
        raw,
        timeout_ns: (o.timeout * 1e9) as u64,
        since: o.durable,
    })
}

pub struct Connected {
    pub clients: Clients,
    pub stats: Stats,
}

pub fn connect_phase(o: &Opts, cfg: ClientCfg, rate: f64) -> Result<Connected, String> {
    let n = o.connections;
    let ntargets = cfg.targets.len();
    let clients =
        Clients::start(Arc::new(cfg), o.threads).map_err(|e| format!("client loops: {e}"))?;
    let users = o.users.unwrap_or(n).max(1);
    let specs: Vec<Spec> = (0..n)
        .map(|i| Spec {
            user: (o.user_offset + i % users) as u32,
            target: (i % ntargets) as u16,
            src: src_for(i + o.user_offset),
            resume: None,
        })
        .collect();
    clients.connect(specs, rate);
    let paced = if rate > 0.0 { n as f64 / rate } else { 0.0 };
    let until = Instant::now() + Duration::from_secs_f64(o.timeout + paced + 30.0);
    let mut last = Instant::now();
    while clients.ctl.done.load(Ordering::Relaxed) < n as u64 {
        if Instant::now() > until {
            eprintln!("  connect phase: gave up waiting");
            break;
        }
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            eprintln!(
                "  connecting: {}/{n} done, {} open",
                clients.ctl.done.load(Ordering::Relaxed),
                clients.open()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = clients.collect(None);
    Ok(Connected { clients, stats })
}

pub fn barrier(dir: &Option<String>) -> Result<(), String> {
    let Some(dir) = dir else { return Ok(()) };
    std::fs::create_dir_all(dir).map_err(|e| format!("--barrier {dir}: {e}"))?;
    let me = format!("{dir}/ready.{}", std::process::id());
    std::fs::write(&me, b"ready\n").map_err(|e| format!("{me}: {e}"))?;
    eprintln!("  barrier: waiting for {dir}/go");
    let until = Instant::now() + Duration::from_secs(3600);
    while !std::path::Path::new(&format!("{dir}/go")).exists() {
        if Instant::now() > until {
            return Err("barrier: no go within an hour".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn need_redis(o: &Opts) -> Result<String, String> {
    let url = match (&o.redis, &o.redis_sentinel) {
        (Some(u), _) => u.clone(),
        (None, Some(s)) => crate::publisher::Sentinel::parse(s)?.master_url()?,
        (None, None) => {
            return Err(
                "this scenario publishes through Redis: give --redis redis://127.0.0.1:PORT".into(),
            )
        }
    };
    check_loopback_url(&url, "redis://")?;
    Ok(url)
}

/// Waits until `want` text frames arrived or nothing arrives for `quiet`.
pub fn wait_frames(clients: &Clients, want: u64, quiet: Duration, cap: Duration) {
    let start = Instant::now();
    let mut last_n = clients.frames();
    let mut last_change = Instant::now();
    let mut last_print = Instant::now();
    while clients.frames() < want && start.elapsed() < cap {
        let n = clients.frames();
        if n != last_n {
            last_n = n;
            last_change = Instant::now();
        } else if last_change.elapsed() > quiet {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!("  received {n}/{want}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
