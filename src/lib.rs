//! pushwire: a small WebSocket push server fed by Redis pub/sub.
//!
//! [`start`] is the one place that wires the parts together: it binds the
//! listeners, starts `--workers` mio loops (`server`), the Redis subscriber
//! thread (`subscriber`), the presence writer (`presence`, with Redis) and
//! the admin listener (`admin`), and returns a
//! [`Server`] handle. [`run`] adds signals and systemd notification and
//! blocks until the process should exit; `main` only maps its result to an
//! exit status.

mod admin;
pub mod auth;
pub mod config;
mod connection;
mod dispatch;
mod history;
mod http;
mod metrics;
mod notice;
mod presence;
#[cfg(test)]
mod props;
mod redis_target;
mod replay;
mod resp;
mod sdnotify;
mod server;
mod sessions;
mod status;
mod subscriber;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::Config;

use dispatch::{Delivery, DurableState, LoopHandle, Replayed};
use metrics::Metrics;
use sessions::Sessions;
use status::Status;

#[derive(Debug)]
pub enum StartError {
    Bind(&'static str, SocketAddr, io::Error),
    Io(&'static str, io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind(what, addr, e) => write!(f, "cannot listen on {addr} ({what}): {e}"),
            StartError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running server.
pub struct Server {
    config: Arc<Config>,
    status: Arc<Status>,
    loops: Arc<[LoopHandle]>,
    keys: Arc<auth::Keys>,
    admin_token: Arc<auth::Keys>,
    metrics: Arc<Metrics>,
    sessions: Arc<Sessions>,
    ws_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    threads: Vec<JoinHandle<()>>,
    subscriber: Option<JoinHandle<()>>,
    replayer_stop: Arc<std::sync::atomic::AtomicBool>,
    replayer: Option<Arc<replay::Replayer>>,
    presence: Option<JoinHandle<()>>,
    /// Tells the presence thread that the loops are done: write the last
    /// state and leave.
    presence_stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Server {
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Starts the graceful drain: stop accepting, close every connection
    /// with 1001, flush, stop. Returns at once; [`Server::wait`] waits.
    pub fn shutdown(&self) {
        self.status.begin_shutdown();
        self.replayer_stop.store(true, Ordering::Relaxed);
        for l in self.loops.iter() {
            l.wake();
        }
    }

    /// Waits for the loops to finish draining and the subscriber to stop.
    pub fn wait(mut self) {
        for l in self.threads.drain(..) {
            let _ = l.join();
        }
        self.presence_stop.store(true, Ordering::Release);
        if let Some(p) = self.presence.take() {
            let _ = p.join();
        }
        if let Some(s) = self.subscriber.take() {
            let _ = s.join();
        }
        // The loops (and their handles on it) are gone; the admin listener
        // may still hold one, then the thread ends on its own.
        if let Some(r) = self.replayer.take().and_then(|r| Arc::try_unwrap(r).ok()) {
            r.join();
        }
    }

    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|l| l.is_finished())
    }
}

/// Binds the listeners and starts every thread: the one place that wires
/// the parts together.
pub fn start(mut config: Config) -> Result<Server, StartError> {
    let listener = match sdnotify::activated_listener() {
        Some(l) => {
            log::info!("using the listening socket passed by systemd (socket activation)");
            l
        }
        None => server::bind(config.listen)
            .map_err(|e| StartError::Bind("--listen", config.listen, e))?,
    };
    let ws_addr = listener
        .local_addr()
        .map_err(|e| StartError::Io("listener address", e))?;
    if config.listen.port() == 0 && config.node_id.ends_with(":0") {
        // The default node id names the port: the one bound, not 0.
        let host = &config.node_id[..config.node_id.len() - 2];
        config.node_id = format!("{host}:{}", ws_addr.port());
    }
    let admin = match config.admin_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| StartError::Bind("--admin-listen", addr, e))?,
        ),
        None => None,
    };
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let keys = Arc::new(auth::Keys::new(config.jwt_key.clone()));
    let admin_token = Arc::new(auth::Keys::new(
        config.admin_token.clone().unwrap_or_default(),
    ));
    if config.auth.mode == auth::AuthMode::Query && !ws_addr.ip().is_loopback() {
        log::warn!("--auth query trusts ?user= from anyone: use it for local trials only, not on {ws_addr}");
    }

    let mut prepared = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..config.workers {
        let (poll, handle, end) = server::prepare().map_err(|e| StartError::Io("event loop", e))?;
        prepared.push((poll, end));
        handles.push(handle);
    }
    let loops: Arc<[LoopHandle]> = handles.into();
    let status = Arc::new(Status::new(config.redis.is_none()));
    let metrics = Arc::new(Metrics::default());
    let sessions = Arc::new(Sessions::default());
    let config = Arc::new(config);
    let durable = Arc::new(DurableState::default());
    let replayer_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let replayer = match &config.redis {
        Some(target) if config.history_size > 0 => {
            let to = loops.clone();
            let sink = move |r: replay::Reply| {
                let (worker, slot, generation) = server::from_replay_token(r.token);
                if let Some(l) = to.get(worker as usize) {
                    l.reply(Replayed {
                        slot,
                        generation,
                        history: r.result.ok(),
                    });
                }
            };
            // Approximate trimming keeps up to one stream node (100
            // entries) more than --history-size, in each of two streams.
            let limit = history::Limit {
                entries: 2 * config.history_size + 200,
                bytes: config.max_queue_bytes,
            };
            let r = replay::Replayer::spawn(
                target.clone(),
                config.key_prefix.clone(),
                limit,
                replayer_stop.clone(),
                sink,
            )
            .map_err(|e| StartError::Io("spawn", e))?;
            Some(Arc::new(r))
        }
        _ => None,
    };
    let presence_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (presence, presence_thread) = match &config.redis {
        Some(target) => {
            let (handle, rx) = presence::Presence::new();
            let p = presence::Ctx {
                config: config.clone(),
                sessions: sessions.clone(),
                metrics: metrics.clone(),
                stop: presence_stop.clone(),
            };
            let t = presence::spawn(target.clone(), handle.clone(), rx, p)
                .map_err(|e| StartError::Io("spawn", e))?;
            (Some(handle), Some(t))
        }
        None => (None, None),
    };
    let delivery = Delivery::new(
        loops.clone(),
        sessions.clone(),
        metrics.clone(),
        durable.clone(),
    );

    let ctx = server::LoopCtx {
        keys: keys.clone(),
        sessions: sessions.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        config: config.clone(),
        durable: durable.clone(),
        replayer: replayer.clone(),
        presence,
    };
    let mut listener = Some((listener, loops.clone()));
    let mut threads = Vec::new();
    for (id, (poll, end)) in prepared.into_iter().enumerate() {
        let worker = server::Worker::new(id as u16, poll, end, ctx.clone(), listener.take())
            .map_err(|e| StartError::Io("event loop", e))?;
        let t = std::thread::Builder::new()
            .name(format!("loop-{id}"))
            .spawn(move || worker.run())
            .map_err(|e| StartError::Io("spawn", e))?;
        threads.push(t);
    }
    let subscriber = match config.redis.clone() {
        Some(target) => {
            let s = subscriber::Ctx {
                config: config.clone(),
                delivery: delivery.clone(),
                status: status.clone(),
                metrics: metrics.clone(),
            };
            Some(
                std::thread::Builder::new()
                    .name("subscriber".into())
                    .spawn(move || subscriber::run(target, s))
                    .map_err(|e| StartError::Io("spawn", e))?,
            )
        }
        None => None,
    };
    if let Some(admin) = admin {
        let a = admin::Ctx {
            config: config.clone(),
            delivery: delivery.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            sessions: sessions.clone(),
            admin_token: admin_token.clone(),
            replayer: replayer.clone(),
        };
        admin::start(admin, a).map_err(|e| StartError::Io("admin listener", e))?;
    }
    log::info!(
        "pushwire {} listening ws={} admin={} workers={} node={} redis={}",
        env!("CARGO_PKG_VERSION"),
        ws_addr,
        admin_addr.map_or("off".to_string(), |a| a.to_string()),
        config.workers,
        config.node_id,
        config
            .redis
            .as_ref()
            .map_or("off (standalone)".to_string(), |r| r.to_string()),
    );
    Ok(Server {
        config,
        status,
        loops,
        keys,
        admin_token,
        metrics,
        sessions,
        ws_addr,
        admin_addr,
        threads,
        subscriber,
        replayer_stop,
        replayer,
        presence: presence_thread,
        presence_stop,
    })
}

/// Runs until SIGTERM/SIGINT and a graceful drain: signals, systemd
/// notification, the watchdog fed by the loops' progress.
pub fn run(config: Config) -> Result<(), StartError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use signal_hook_mio::v1_0::Signals;

    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|e| StartError::Io("signals", e))?;
    let mut poll = mio::Poll::new().map_err(|e| StartError::Io("poll", e))?;
    poll.registry()
        .register(&mut signals, mio::Token(0), mio::Interest::READABLE)
        .map_err(|e| StartError::Io("signals", e))?;
    let shutdown_timeout = config.shutdown_timeout;
    let server = start(config)?;
    let notify = sdnotify::Notifier::from_env();
    notify.send("READY=1");
    let watchdog = sdnotify::watchdog_interval();
    let status_every = Duration::from_secs(5);
    let mut last_status = Instant::now() - status_every;
    let mut last_watchdog = Instant::now();
    let mut events = mio::Events::with_capacity(8);
    let mut drain_started: Option<Instant> = None;
    loop {
        let tick = match (drain_started, watchdog) {
            // Draining: notice the loops' end promptly.
            (Some(_), _) => Duration::from_millis(10),
            (None, Some(w)) => w.min(Duration::from_secs(1)),
            (None, None) => Duration::from_secs(1),
        };
        if let Err(e) = poll.poll(&mut events, Some(tick)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(StartError::Io("poll", e));
            }
        }
        for sig in signals.pending() {
            match sig {
                SIGHUP => {
                    match config::reload(server.config.jwt_key_file.as_deref(), &server.keys) {
                        Ok(true) => log::info!(
                            "SIGHUP: re-read the JWT key file; new connections need the new key"
                        ),
                        Ok(false) => log::info!("SIGHUP: no --jwt-secret-file to re-read"),
                        Err(e) => log::error!(
                            "SIGHUP: cannot re-read the JWT key file, keeping the old key: {e}"
                        ),
                    }
                    let admin = server.config.admin_token_file.as_deref();
                    match config::reload(admin, &server.admin_token) {
                        Ok(true) => log::info!("SIGHUP: re-read the admin token file"),
                        Ok(false) => {}
                        Err(e) => log::error!(
                            "SIGHUP: cannot re-read the admin token file, keeping the old token: {e}"
                        ),
                    }
                }
                _ if drain_started.is_some() => {
                    log::warn!("second stop signal during the drain: exiting now");
                    std::process::exit(1);
                }
                _ => {
                    log::info!(
                        "stop signal: draining {} connections (at most {:?})",
                        server.metrics.connections.load(Ordering::Relaxed),
                        shutdown_timeout
                    );
                    notify.send("STOPPING=1");
                    drain_started = Some(Instant::now());
                    server.shutdown();
                }
            }
        }
        if server.is_finished() {
            break;
        }
        if let Some(w) = watchdog {
            // Only when every loop made progress recently: a stuck loop
            // stops the pings and systemd restarts the service.
            // A loop passes at least once a tick (at most 500 ms).
            let limit = w.max(Duration::from_millis(1500)).as_millis() as u64;
            let now = server.status.now_ms();
            let stale = server
                .loops
                .iter()
                .any(|h| now.saturating_sub(h.heartbeat()) > limit);
            if !stale && last_watchdog.elapsed() >= w && drain_started.is_none() {
                notify.send("WATCHDOG=1");
                last_watchdog = Instant::now();
            }
        }
        if notify.is_enabled() && last_status.elapsed() >= status_every {
            let redis = match (&server.config.redis, server.status.is_ready()) {
                (None, _) => "standalone",
                (Some(_), true) => "redis subscribed",
                (Some(_), false) => "redis NOT subscribed",
            };
            notify.send(&format!(
                "STATUS={} connections, {} users, {}",
                server.metrics.connections.load(Ordering::Relaxed),
                server.sessions.users(),
                redis
            ));
            last_status = Instant::now();
        }
    }
    server.wait();
    log::info!("stopped");
    Ok(())
}
