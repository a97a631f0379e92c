//! `targeted` and `two-nodes`: notices to one user at a time, via Redis.
//!
//! One step publishes at a fixed rate and checks every seq against who
//! should have it: delivered, lost, duplicated, misrouted, latency. With
//! `--max` the rate is stepped up (x1.5, then bisected) to the highest one
//! that passes.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::clients::Clients;
use crate::histogram::{hist_json, hist_line, ms, Hist};
use crate::options::Opts;
use crate::probe::{Cpu, Probe, Window};
use crate::publisher::{pad_text, publish, user_for, wait_subscribers, MakeNotice, Pub};
use crate::report::{connect_rows, cpu_rows, life_rows, mib, opt_f, Report};
use crate::scenarios::{barrier, client_cfg, connect_phase, need_redis};

struct Step {
    pub rate: f64,
    pub sent: u64,
    pub achieved: f64,
    pub delivered: u64,
    pub lost: u64,
    dup: u64,
    pub misrouted: u64,
    pub order_errors: u64,
    /// Status frames (`{"recovered":..}`) seen in the step: true, false,
    /// and on a connection that had not asked for one.
    status: (u64, u64, u64),
    /// The lost seqs, as ranges `[first, last]`, and how many users lost
    /// any: where a loss sits in the run tells what caused it.
    lost_ranges: Vec<(u64, u64)>,
    lost_users: usize,
    pub dropped: u64,
    pub lat: Hist,
    pub cpu: Cpu,
    pub receivers: i64,
    refused: u64,
    switches: u64,
    max_gap: u64,
    max_gap_at: u64,
}

impl Step {
    pub fn passes(&self, p99_ms: f64) -> bool {
        self.lost == 0
            && self.dup == 0
            && self.order_errors == 0
            && self.sent > 0
            && ms(self.lat.q(0.99)) < p99_ms
            && self.achieved >= 0.95 * self.rate
    }

    pub fn json(&self) -> Value {
        json!({
            "rate": self.rate,
            "sent": self.sent,
            "achieved_rate": (self.achieved * 10.0).round() / 10.0,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicated": self.dup,
            "misrouted": self.misrouted,
            "out_of_order": self.order_errors,
            "dropped_connections": self.dropped,
            "latency": hist_json(&self.lat),
            "server_cpu_pct": opt_f(self.cpu.server),
            "bench_cpu_pct": opt_f(Some(self.cpu.bench)),
            "server_threads_pct": json!(self.cpu.threads),
            "machine_busy_pct": opt_f(self.cpu.machine),
            "server_write_calls": self.cpu.writes,
            "server_cpu_us_per_notice": self.cpu.server_ns().map(|ns| ((ns / self.sent.max(1) as f64 / 1e3) * 100.0).round() / 100.0),
            "redis_cpu_pct": opt_f(self.cpu.redis),
            "redis_cpu_us_per_notice": self.cpu.redis_ns().map(|ns| ((ns / self.sent.max(1) as f64 / 1e3) * 100.0).round() / 100.0),
            "min_receivers": self.receivers,
            "refused": self.refused,
            "master_switches": self.switches,
            "max_delivery_gap_ms": (ms(self.max_gap) * 10.0).round() / 10.0,
            "max_delivery_gap_end_s": (self.max_gap_at as f64 / 1e7).round() / 100.0,
            "status_recovered": self.status.0,
            "status_missed": self.status.1,
            "status_unexpected": self.status.2,
            "lost_users": self.lost_users,
            "lost_seq_ranges": self.lost_ranges.iter().take(50).map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn targeted_step(
    o: &Opts,
    redis: &str,
    clients: &Clients,
    probe: &Probe,
    users: &Arc<Vec<u32>>,
    mult: &Arc<std::collections::HashMap<u32, u32>>,
    rate: f64,
    secs: f64,
    seq0: u64,
) -> Result<Step, String> {
    let before = clients.collect(Some(seq0));
    let count = (rate * secs).round().max(1.0) as u64;
    let frames0 = clients.frames();
    let u = users.clone();
    let pad = pad_text(o.pad);
    let make: MakeNotice = Box::new(move |seq, t, buf| {
        let user = user_for(&u, seq);
        let _ = write!(
            buf,
            "{{\"userId\":\"{user}\",\"seq\":{seq},\"t\":{t}{pad}}}"
        );
    });
    let w = Window::start(probe);
    let mut p = Pub::new(redis.into(), o.channel.clone(), rate, count, seq0);
    if o.durable {
        p.function = Some(format!("{}_publish", o.key_prefix));
        p.wait_replicas = o.wait_replicas;
    }
    if let Some(s) = &o.redis_sentinel {
        p.sentinel = Some(crate::publisher::Sentinel::parse(s)?);
    }
    let rep = publish(p, make)
        .join()
        .map_err(|_| "publisher panicked")??;
    let cpu = w.end(probe);
    let mut is_refused = vec![false; rep.sent as usize];
    for &(a, b) in &rep.refused {
        for x in &mut is_refused[a as usize..(b as usize).min(rep.sent as usize)] {
            *x = true;
        }
    }
    let refused = is_refused.iter().filter(|r| **r).count() as u64;
    let expected: u64 = (0..rep.sent)
        .filter(|k| !is_refused[*k as usize])
        .map(|k| *mult.get(&user_for(users, seq0 + k)).unwrap_or(&1) as u64)
        .sum();
    let until = Instant::now() + Duration::from_secs_f64(o.drain);
    while clients.frames() - frames0 < expected && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = clients.collect(None);
    let (mut delivered, mut lost, mut dup) = (0, 0, 0);
    let mut lost_ranges: Vec<(u64, u64)> = Vec::new();
    let mut lost_users = std::collections::HashSet::new();
    for k in 0..rep.sent {
        let user = user_for(users, seq0 + k);
        let want = *mult.get(&user).unwrap_or(&1) as u64;
        let got = st.seq_count.get(k as usize).copied().unwrap_or(0) as u64;
        delivered += got.min(want);
        if !is_refused[k as usize] && got < want {
            lost += want - got;
            lost_users.insert(user);
            match lost_ranges.last_mut() {
                Some(r) if r.1 + 1 == k => r.1 = k,
                _ => lost_ranges.push((k, k)),
            }
        }
        dup += got.saturating_sub(want);
    }
    Ok(Step {
        rate,
        sent: rep.sent,
        achieved: rep.rate(),
        delivered,
        lost,
        dup,
        misrouted: st.misrouted,
        order_errors: st.order_errors,
        status: (
            st.status_ok.saturating_sub(before.status_ok),
            st.status_missed.saturating_sub(before.status_missed),
            st.status_unexpected
                .saturating_sub(before.status_unexpected),
        ),
        lost_ranges,
        lost_users: lost_users.len(),
        dropped: (st.dropped_open + st.closed_by_server)
            .saturating_sub(before.dropped_open + before.closed_by_server),
        lat: st.lat,
        cpu,
        receivers: rep.min_receivers,
        refused,
        switches: rep.switches,
        max_gap: st.max_gap,
        max_gap_at: st.max_gap_end.saturating_sub(rep.start),
    })
}

fn step_row(s: &Step) -> String {
    format!(
        "{:>8.0}/s sent {} ({:.0}/s) delivered {} lost {} dup {} order {} | {} | server CPU {} redis {} bench {:.0}% machine {}%",
        s.rate,
        s.sent,
        s.achieved,
        s.delivered,
        s.lost,
        s.dup,
        s.order_errors,
        hist_line(&s.lat),
        s.cpu.server.map_or("n/a".into(), |c| format!("{c:.0}%")),
        s.cpu.redis.map_or("n/a".into(), |c| format!("{c:.0}%")),
        s.cpu.bench,
        s.cpu.machine.map_or("n/a".into(), |c| format!("{c:.0}"))
    )
}

/// `targeted` and `two-nodes`.
pub fn targeted(o: &Opts, name: &str) -> Result<(), String> {
    let redis = need_redis(o)?;
    let probe = Probe::new(o);
    let mut r = Report::new(o, name);
    let rate0 = o.rate.unwrap_or(1000.0);
    let c = connect_phase(o, client_cfg(o, None)?, o.connect_rate.unwrap_or(5000.0))?;
    connect_rows(&mut r, &c.stats, o.connections);
    let all = c.clients.open_users();
    if all.is_empty() {
        c.clients.stop();
        return Err("no connection opened".into());
    }
    let mut mult = std::collections::HashMap::new();
    for u in &all {
        *mult.entry(*u).or_insert(0u32) += 1;
    }
    let mut users = all.clone();
    users.dedup();
    let users = Arc::new(users);
    let mult = Arc::new(mult);
    let nodes = o.urls.len() as i64;
    let subs = wait_subscribers(&redis, &o.channel, nodes)?;
    r.row("nodes subscribed", subs.to_string());
    r.set("users", users.len() as u64);
    r.set("durable", o.durable);
    barrier(&o.barrier)?;
    if let Some(rss) = probe.rss() {
        r.row("server RSS", mib(rss));
        r.set("server_rss", rss);
    }
    let mut seq0 = 0;
    if !o.max {
        let secs = o.seconds.unwrap_or(10.0);
        let s = targeted_step(o, &redis, &c.clients, &probe, &users, &mult, rate0, secs, 0)?;
        r.row(
            "published",
            format!(
                "{} notices at {:.0}/s asked, {:.0}/s achieved, {}",
                s.sent,
                rate0,
                s.achieved,
                if o.durable {
                    format!("FCALL {}_publish (durable)", o.key_prefix)
                } else {
                    format!("PUBLISH receivers >= {}", s.receivers)
                }
            ),
        );
        r.row(
            "delivered",
            format!(
                "{} (lost {}, duplicated {}, misrouted {}, out of order {}, connections dropped {})",
                s.delivered, s.lost, s.dup, s.misrouted, s.order_errors, s.dropped
            ),
        );
        r.row("latency publish->receipt", hist_line(&s.lat));
        r.row(
            "delivery",
            format!(
                "longest pause {:.1} ms (ended {:.2} s after publishing began); refused {} (publish failed), master switches {}",
                ms(s.max_gap),
                s.max_gap_at as f64 / 1e9,
                s.refused,
                s.switches
            ),
        );
        cpu_rows(&mut r, "publish", &s.cpu);
        r.row(
            "CPU per notice",
            format!(
                "node {} us, redis {} us",
                s.cpu.server_ns().map_or("n/a".into(), |n| format!(
                    "{:.2}",
                    n / s.sent.max(1) as f64 / 1e3
                )),
                s.cpu
                    .redis_ns()
                    .map_or("n/a (give --redis-pid)".into(), |n| format!(
                        "{:.2}",
                        n / s.sent.max(1) as f64 / 1e3
                    )),
            ),
        );
        if let Value::Object(m) = s.json() {
            for (k, v) in m {
                if !k.contains("cpu_pct") && !k.contains("threads_pct") && !k.contains("machine") {
                    r.json.insert(k, v);
                }
            }
        }
    } else {
        let secs = o.seconds.unwrap_or(5.0);
        let mut rate = rate0;
        let mut best: Option<Step> = None;
        let mut fail_rate: Option<f64> = None;
        let mut steps = Vec::new();
        let mut bisect = 0;
        loop {
            let s = targeted_step(
                o, &redis, &c.clients, &probe, &users, &mult, rate, secs, seq0,
            )?;
            seq0 += s.sent + 1000;
            let ok = s.passes(o.p99_ms);
            eprintln!("  {} {}", if ok { "pass" } else { "FAIL" }, step_row(&s));
            r.row(
                &format!("step {}", steps.len() + 1),
                format!("{} {}", if ok { "pass" } else { "FAIL" }, step_row(&s)),
            );
            steps.push(s.json());
            if ok {
                best = Some(s);
            } else {
                fail_rate = Some(rate);
            }
            let b = best.as_ref().map(|s| s.rate);
            rate = match (b, fail_rate) {
                (Some(b), None) => b * 1.5,
                (Some(b), Some(f)) if bisect < 3 && f / b > 1.1 => {
                    bisect += 1;
                    ((b + f) / 2.0).round()
                }
                (None, Some(f)) if f > 100.0 && bisect < 4 => {
                    bisect += 1;
                    (f / 2.0).round()
                }
                _ => break,
            };
            if rate > 2_000_000.0 {
                break;
            }
        }
        r.set("steps", Value::Array(steps));
        match &best {
            Some(b) => {
                r.row(
                    "highest passing rate",
                    format!(
                        "{:.0}/s (p99 < {} ms, no loss): {}",
                        b.rate,
                        o.p99_ms,
                        hist_line(&b.lat)
                    ),
                );
                r.set("max_rate", b.rate);
                r.set("max_rate_p99_ms", ms(b.lat.q(0.99)));
            }
            None => {
                r.row("highest passing rate", "none");
                r.set("max_rate", Value::Null);
            }
        }
        r.set("first_failing_rate", opt_f(fail_rate));
    }
    if let Some(rss) = probe.rss() {
        r.row("server RSS after traffic", mib(rss));
        r.set("server_rss_after_traffic", rss);
    }
    let st = c.clients.collect(None);
    life_rows(&mut r, &st);
    c.clients.close_all();
    std::thread::sleep(Duration::from_millis(300));
    c.clients.stop();
    r.print(o.json);
    Ok(())
}
