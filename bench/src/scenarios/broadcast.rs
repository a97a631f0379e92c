//! `broadcast`: M notices to every connection, via Redis.
//!
//! Reports deliveries/s and, per notice, the time until the last connection
//! had it. With `--no-publish` it only listens, so several bench processes
//! can share one publisher (see `--barrier`).

use std::io::Write;
use std::time::Duration;

use crate::options::Opts;
use crate::probe::{Probe, Window};
use crate::publisher::{pad_text, publisher, wait_subscribers, MakeNotice};
use crate::report::{broadcast_rows, connect_rows, cpu_rows, life_rows, mib, Report};
use crate::scenarios::{barrier, client_cfg, connect_phase, need_redis, wait_frames};

pub fn broadcast(o: &Opts) -> Result<(), String> {
    let probe = Probe::new(o);
    let mut r = Report::new(o, "broadcast");
    let m = o.messages as u64;
    let rate = o.rate.unwrap_or(0.0);
    let redis = if o.publish {
        Some(need_redis(o)?)
    } else {
        None
    };
    let c = connect_phase(o, client_cfg(o, None)?, o.connect_rate.unwrap_or(5000.0))?;
    connect_rows(&mut r, &c.stats, o.connections);
    if let Some(url) = &redis {
        wait_subscribers(url, &o.channel, o.urls.len() as i64)?;
    }
    // Reset before the barrier: another process may publish as soon as it
    // passes it, and frames counted before a later reset would be lost.
    let open = c.clients.open();
    let frames0 = c.clients.frames();
    c.clients.collect(Some(0));
    barrier(&o.barrier)?;
    if let Some(rss) = probe.rss() {
        r.row("server RSS", mib(rss));
        r.set("server_rss", rss);
    }
    let pad = pad_text(o.pad);
    let w = Window::start(&probe);
    if let Some(url) = redis {
        let make: MakeNotice = Box::new(move |seq, t, buf| {
            let _ = write!(buf, "{{\"broadcast\":true,\"seq\":{seq},\"t\":{t}{pad}}}");
        });
        let rep = publisher(url, o.channel.clone(), rate, m, 0, make)
            .join()
            .map_err(|_| "publisher panicked")??;
        r.row(
            "published",
            format!(
                "{} broadcast notices, {} ({:.0}/s achieved), PUBLISH receivers >= {}",
                rep.sent,
                if rate > 0.0 {
                    format!("{rate}/s asked")
                } else {
                    "all at once".into()
                },
                rep.rate(),
                rep.min_receivers
            ),
        );
        r.set("messages", rep.sent);
        r.set("rate", rate);
    } else {
        r.row("published", "by another process (--no-publish)");
    }
    let cap = Duration::from_secs_f64(
        o.seconds.unwrap_or(60.0) + if rate > 0.0 { m as f64 / rate } else { 0.0 },
    );
    wait_frames(
        &c.clients,
        frames0 + m * open,
        Duration::from_secs_f64(o.drain.max(1.0)),
        cap,
    );
    let cpu = w.end(&probe);
    let st = c.clients.collect(None);
    broadcast_rows(&mut r, &st, m, open, &cpu);
    cpu_rows(&mut r, "broadcast", &cpu);
    if let Some(rss) = probe.rss() {
        r.row("server RSS after traffic", mib(rss));
        r.set("server_rss_after_traffic", rss);
    }
    life_rows(&mut r, &st);
    c.clients.close_all();
    std::thread::sleep(Duration::from_millis(300));
    c.clients.stop();
    r.print(o.json);
    Ok(())
}
