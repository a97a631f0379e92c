//! `idle` and `connect`: what a connection costs the server.
//!
//! `idle` opens N connections at a paced rate and reports server RSS per
//! connection and CPU while they sit idle; `connect` opens them all at once
//! and reports handshakes/s and the connect-time spread.

use std::time::Duration;

use crate::options::Opts;
use crate::os::{meminfo_slab, proc_rss, sockstat_mem};
use crate::probe::{Probe, Window};
use crate::report::{connect_rows, cpu_rows, life_rows, mib, Report};
use crate::scenarios::{barrier, client_cfg, connect_phase};

/// `idle` and `connect`.
pub fn idle(o: &Opts, storm: bool) -> Result<(), String> {
    let probe = Probe::new(o);
    let mut r = Report::new(o, if storm { "connect" } else { "idle" });
    let rate = o.connect_rate.unwrap_or(if storm { 0.0 } else { 5000.0 });
    let rss0 = probe.rss();
    let sock0 = sockstat_mem();
    let slab0 = meminfo_slab();
    let me0 = proc_rss(std::process::id());
    let w = Window::start(&probe);
    let c = connect_phase(o, client_cfg(o, None)?, rate)?;
    let during = w.end(&probe);
    connect_rows(&mut r, &c.stats, o.connections);
    r.set("connect_rate_asked", rate);
    barrier(&o.barrier)?;
    cpu_rows(&mut r, "connect", &during);
    // Let the loops settle (handshake buffers freed) before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let rss1 = probe.rss();
    let sock1 = sockstat_mem();
    let slab1 = meminfo_slab();
    let me1 = proc_rss(std::process::id());
    let open = c.stats.opened.max(1);
    if let (Some(a), Some(b)) = (rss0, rss1) {
        let per = (b as f64 - a as f64) / open as f64;
        r.row(
            "server RSS",
            format!(
                "{} before, {} with {} open: {per:.0} bytes per connection",
                mib(a),
                mib(b),
                c.stats.opened
            ),
        );
        r.set("server_rss_before", a);
        r.set("server_rss_after", b);
        r.set("server_bytes_per_conn", per.round());
    } else {
        r.row("server RSS", "n/a (give --server-pid or --admin)");
    }
    if let (Some(a), Some(b)) = (sock0, sock1) {
        let per = (b as f64 - a as f64) / open as f64;
        r.row(
            "kernel TCP buffers",
            format!("{per:.0} bytes per connection, both ends (/proc/net/sockstat mem)"),
        );
        r.set("kernel_tcp_bytes_per_conn", per.round());
    }
    if let (Some(a), Some(b)) = (slab0, slab1) {
        let per = (b as f64 - a as f64) / open as f64;
        r.row(
            "kernel slab",
            format!("{per:.0} bytes per connection, both ends (/proc/meminfo Slab, machine-wide: noisy)"),
        );
        r.set("kernel_slab_bytes_per_conn", per.round());
    }
    if let (Some(a), Some(b)) = (me0, me1) {
        let per = (b as f64 - a as f64) / open as f64;
        r.row("bench RSS", format!("{per:.0} bytes per connection"));
        r.set("bench_bytes_per_conn", per.round());
    }
    if let Some(g) = probe.gauge("pushwire_connections") {
        r.row("server gauge", format!("pushwire_connections {g}"));
        r.set("server_connections_gauge", g);
    }
    if !storm {
        let secs = o.seconds.unwrap_or(10.0);
        let w = Window::start(&probe);
        std::thread::sleep(Duration::from_secs_f64(secs));
        cpu_rows(&mut r, "idle", &w.end(&probe));
        if let Some(b) = probe.rss() {
            r.row("server RSS after idle", mib(b));
            r.set("server_rss_after_idle", b);
        }
    }
    let st = c.clients.collect(None);
    life_rows(&mut r, &st);
    c.clients.close_all();
    std::thread::sleep(Duration::from_millis(300));
    c.clients.stop();
    r.print(o.json);
    Ok(())
}
