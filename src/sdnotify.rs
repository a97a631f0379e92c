//! The systemd side, without a crate: the notify protocol (`READY=1`,
//! `WATCHDOG=1`, `STOPPING=1`, `STATUS=`) over the datagram socket named by
//! `NOTIFY_SOCKET` (abstract names start with `@`), and socket activation
//! (`LISTEN_PID` is us and `LISTEN_FDS` >= 1: the listener is fd 3).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    target: Option<(UnixDatagram, String)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, path))
        });
        Notifier { target }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    pub fn send(&self, msg: &str) {
        let Some((sock, path)) = &self.target else {
            return;
        };
        let sent = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
        } else {
            sock.send_to(msg.as_bytes(), path)
        };
        if let Err(e) = sent {
            log::debug!("sd_notify {msg:?} to {path}: {e}");
        }
    }
}

/// Half of `WATCHDOG_USEC`, when systemd asks for watchdog pings for us.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The listening socket systemd passed us, if any (fd 3).
pub fn activated_listener() -> Option<mio::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // The variables are for us alone; children must not inherit them.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    const SD_LISTEN_FDS_START: i32 = 3;
    // SAFETY: systemd's protocol hands us ownership of fd 3, a listening socket.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(SD_LISTEN_FDS_START) };
    if let Err(e) = std_listener.set_nonblocking(true) {
        log::error!("socket activation: fd 3 is not usable: {e}");
        return None;
    }
    // SAFETY: FD_CLOEXEC on a valid fd we own.
    unsafe { libc::fcntl(SD_LISTEN_FDS_START, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(mio::net::TcpListener::from_std(std_listener))
}
