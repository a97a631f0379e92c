//! `storm`: a reconnect storm of durable clients (SPEC section 8).
//!
//! N durable clients (`since=`) on node A get one durable notice each, so
//! each has a last id. A is SIGKILLed; K durable notices per user are
//! published while nobody holds their connections; then all N reconnect to
//! node B at once with `since=<last id>`. Each must get its K missed
//! notices exactly once, in order, then `{"recovered":true,"replayed":K}`,
//! then live ones (one more per user, published after the recovery). Other
//! users, connected to B all along, get durable notices at `--live-rate`;
//! their latency during the recovery is B's cost of the storm.
//!
//! Seqs: prime 0..N, missed N..N+N*K (round j, user i: N + j*N + i), after
//! N+N*K..N+N*K+N; the live users count their own seqs from 0.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::clients::{Clients, Spec};
use crate::histogram::{hist_json, hist_line, ms};
use crate::options::Opts;
use crate::os::mono_ns;
use crate::probe::{Cpu, Probe, Window};
use crate::publisher::{pad_text, publish, user_for, wait_subscribers, MakeNotice, Pub};
use crate::report::{cpu_rows, mib, opt_f, Report};
use crate::scenarios::{client_cfg, need_redis};
use crate::stats::Stats;
use crate::wire::src_for;

fn start(o: &Opts, specs: Vec<Spec>, threads: usize, rate: f64) -> Result<Clients, String> {
    let mut cfg = client_cfg(o, None)?;
    cfg.since = true;
    let c = Clients::start(Arc::new(cfg), threads).map_err(|e| format!("client loops: {e}"))?;
    c.connect(specs, rate);
    Ok(c)
}

fn wait_done(c: &Clients, n: u64, what: &str, cap: Duration) {
    let until = Instant::now() + cap;
    let mut last = Instant::now();
    while c.ctl.done.load(Ordering::Relaxed) < n && Instant::now() < until {
        if last.elapsed() > Duration::from_secs(2) {
            last = Instant::now();
            eprintln!(
                "  {what}: {}/{n} done, {} open",
                c.ctl.done.load(Ordering::Relaxed),
                c.open()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_frames(c: &Clients, want: u64, cap: Duration) {
    let until = Instant::now() + cap;
    while c.frames() < want && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One durable publisher thread; `user(seq)` names the target.
fn durable_pub(
    o: &Opts,
    redis: &str,
    rate: f64,
    count: u64,
    seq0: u64,
    user: impl Fn(u64) -> u32 + Send + 'static,
) -> (Pub, MakeNotice) {
    let pad = pad_text(o.pad);
    let make: MakeNotice = Box::new(move |seq, t, buf| {
        let _ = write!(
            buf,
            "{{\"userId\":\"{}\",\"seq\":{seq},\"t\":{t}{pad}}}",
            user(seq)
        );
    });
    let mut p = Pub::new(redis.into(), o.channel.clone(), rate, count, seq0);
    p.function = Some(format!("{}_publish", o.key_prefix));
    (p, make)
}

/// Redis's used_memory, sampled every 20 ms until stopped: (first, max).
fn mem_sampler(redis: &str, stop: Arc<AtomicBool>) -> JoinHandle<Option<(u64, u64)>> {
    let url = redis.to_string();
    std::thread::spawn(move || {
        let client = redis::Client::open(url.as_str()).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .ok()?;
        let mut first = None;
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(m) = info_num(&mut con, "memory", "used_memory") {
                first.get_or_insert(m);
                max = max.max(m);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        first.map(|f| (f, max))
    })
}

fn info_num(con: &mut redis::Connection, section: &str, key: &str) -> Option<u64> {
    let s: String = redis::cmd("INFO").arg(section).query(con).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// (delivered, lost, duplicated) for seqs lo..hi, each once.
fn once(st: &Stats, lo: u64, hi: u64) -> (u64, u64, u64) {
    let (mut d, mut l, mut x) = (0, 0, 0);
    for s in lo..hi {
        let i = s.wrapping_sub(st.seq_base) as usize;
        let got = st.seq_count.get(i).copied().unwrap_or(0) as u64;
        d += got.min(1);
        l += u64::from(got == 0);
        x += got.saturating_sub(1);
    }
    (d, l, x)
}

fn per_notice(c: &Cpu, n: u64) -> (Option<f64>, Option<f64>) {
    let f = |ns: f64| (ns / n.max(1) as f64 / 1e3 * 100.0).round() / 100.0;
    (c.server_ns().map(f), c.redis_ns().map(f))
}

pub fn storm(o: &Opts) -> Result<(), String> {
    let redis = need_redis(o)?;
    if o.urls.len() < 2 {
        return Err("storm needs --url twice: node A (to be killed), then node B".into());
    }
    let kill_pid = o
        .kill_pid
        .ok_or("storm: give --kill-pid, the pid of node A (the first --url)")?;
    let probe = Probe::new(o);
    let mut r = Report::new(o, "storm");
    let n = o.connections as u64;
    let k = o.missed as u64;
    let base = o.user_offset as u32;
    let nlive = o.live_users;
    let crate_rate = o.connect_rate.unwrap_or(5000.0);

    // Storm clients on A, live clients on B.
    let specs = (0..n as usize)
        .map(|i| Spec {
            user: base + i as u32,
            target: 0,
            src: src_for(i),
            resume: None,
        })
        .collect();
    let storm = start(o, specs, o.threads, crate_rate)?;
    wait_done(&storm, n, "storm clients on A", Duration::from_secs(60));
    let live_users: Arc<Vec<u32>> =
        Arc::new((0..nlive as u32).map(|j| base + n as u32 + j).collect());
    let live = if nlive > 0 {
        let specs = live_users
            .iter()
            .enumerate()
            .map(|(j, u)| Spec {
                user: *u,
                target: 1,
                src: src_for(n as usize + j),
                resume: None,
            })
            .collect();
        let l = start(o, specs, 1, crate_rate)?;
        wait_done(
            &l,
            nlive as u64,
            "live clients on B",
            Duration::from_secs(60),
        );
        Some(l)
    } else {
        None
    };
    let opened = storm.open();
    r.row("storm clients", format!("{opened} open on node A of {n}"));
    r.set("storm_open", opened);
    r.set("live_users", nlive as u64);
    r.set("missed_per_user", k);
    if let Some(l) = &live {
        r.row("live clients", format!("{} open on node B", l.open()));
        r.set("live_open", l.open());
    }
    if opened < n {
        storm.stop();
        return Err(format!("only {opened} of {n} storm clients opened"));
    }
    let subs = wait_subscribers(&redis, &o.channel, 2)?;
    r.row("nodes subscribed", subs.to_string());
    let rcon = redis::Client::open(redis.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
        .map_err(|e| format!("redis: {e}"))?;
    let mut rcon = rcon;

    // Prime: one durable notice per storm user, so each has a last id.
    let (p, make) = durable_pub(o, &redis, 0.0, n, 0, move |s| base + s as u32);
    publish(p, make)
        .join()
        .map_err(|_| "publisher panicked")??;
    wait_frames(&storm, n, Duration::from_secs(30));
    let st0 = storm.collect(None);
    r.row(
        "primed",
        format!(
            "{} of {n} storm clients have a last id",
            st0.frames - st0.no_id
        ),
    );

    // Baseline: live notices to the other users before the storm.
    let live_rate = o.live_rate;
    let secs = o.seconds.unwrap_or(3.0);
    let mut live_seq = 0u64;
    if let (Some(l), true) = (&live, live_rate > 0.0) {
        let count = (live_rate * secs).round() as u64;
        let lu = live_users.clone();
        let (p, make) = durable_pub(o, &redis, live_rate, count, 0, move |s| user_for(&lu, s));
        let w = Window::start(&probe);
        let rep = publish(p, make)
            .join()
            .map_err(|_| "publisher panicked")??;
        let cpu = w.end(&probe);
        wait_frames(l, rep.sent, Duration::from_secs_f64(o.drain));
        let st = l.collect(None);
        let (d, lost, dup) = once(&st, 0, rep.sent);
        r.row(
            "live before the storm",
            format!(
                "{:.0}/s for {secs} s: delivered {d} lost {lost} dup {dup} | {} | node B CPU {}",
                rep.rate(),
                hist_line(&st.lat),
                cpu.server.map_or("n/a".into(), |c| format!("{c:.0}%"))
            ),
        );
        r.set(
            "live_before",
            json!({"rate": live_rate, "achieved_rate": (rep.rate() * 10.0).round() / 10.0, "sent": rep.sent,
                   "delivered": d, "lost": lost, "duplicated": dup, "latency": hist_json(&st.lat),
                   "node_b_cpu_pct": opt_f(cpu.server), "redis_cpu_pct": opt_f(cpu.redis)}),
        );
        live_seq = rep.sent + 1000;
    }

    // The storm. Live notices all through it.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let live_pub = match (&live, live_rate > 0.0) {
        (Some(l), true) => {
            l.collect(Some(live_seq));
            let lu = live_users.clone();
            let (mut p, make) = durable_pub(
                o,
                &redis,
                live_rate,
                (live_rate * 600.0) as u64,
                live_seq,
                move |s| user_for(&lu, s),
            );
            p.stop = Some(stop.clone());
            p.progress = Some(progress.clone());
            let h = publish(p, make);
            std::thread::sleep(Duration::from_millis(500));
            Some(h)
        }
        _ => None,
    };
    let mem_stop = Arc::new(AtomicBool::new(false));
    let mem = mem_sampler(&redis, mem_stop.clone());
    std::thread::sleep(Duration::from_millis(100));
    let t_kill = mono_ns();
    // SAFETY: kill(2) on a pid the caller named; no memory is involved.
    if unsafe { libc::kill(kill_pid as libc::pid_t, libc::SIGKILL) } != 0 {
        return Err(format!(
            "kill -9 {kill_pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let until = Instant::now() + Duration::from_secs(10);
    while storm.open() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    let t_dropped = mono_ns();
    r.row(
        "node A killed",
        format!(
            "SIGKILL pid {kill_pid}; {} of {n} clients saw it in {:.1} ms",
            n - storm.open(),
            ms(t_dropped - t_kill)
        ),
    );

    // K missed notices per user, as fast as Redis takes them.
    let w = Window::start(&probe);
    let (p, make) = durable_pub(o, &redis, 0.0, n * k, n, move |s| {
        base + ((s - n) % n) as u32
    });
    let rep = publish(p, make)
        .join()
        .map_err(|_| "publisher panicked")??;
    let cpu_missed = w.end(&probe);
    r.row(
        "missed notices published",
        format!(
            "{} FCALLs in {:.2} s ({:.0}/s) while nobody listened; Redis CPU {}",
            rep.sent,
            cpu_missed.secs,
            rep.rate(),
            cpu_missed
                .redis
                .map_or("n/a".into(), |c| format!("{c:.0}%"))
        ),
    );
    r.set("missed_publish_rate", (rep.rate() * 10.0).round() / 10.0);
    r.set("missed_publish_redis_cpu_pct", opt_f(cpu_missed.redis));

    // Everyone back, to B, at once.
    let live_base = live_seq + progress.load(Ordering::Relaxed);
    // Checked from the first notice published after the reset: one in
    // flight while the client threads reset could arrive just before it
    // and be counted lost.
    let mut live_from = live_base;
    if let Some(l) = &live {
        l.collect(Some(live_base));
        std::thread::sleep(Duration::from_millis(50));
        live_from = live_seq + progress.load(Ordering::Relaxed);
    }
    let mem_before = info_num(&mut rcon, "memory", "used_memory");
    let w_rec = Window::start(&probe);
    let t_re = mono_ns();
    storm.reconnect(1, 0.0);
    let until = Instant::now() + Duration::from_secs(60);
    let mut st;
    loop {
        st = storm.collect(None);
        if st.status_ok + st.status_missed >= n || Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu_rec = w_rec.end(&probe);
    stop.store(true, Ordering::Relaxed);
    mem_stop.store(true, Ordering::Relaxed);
    let live_rep = match live_pub {
        Some(h) => Some(h.join().map_err(|_| "publisher panicked")??),
        None => None,
    };
    let mem = mem.join().ok().flatten();
    let peak_info = info_num(&mut rcon, "memory", "used_memory_peak");

    // Live again for the recovered: one more each, after the status frame.
    let after0 = n + n * k;
    let (p, make) = durable_pub(o, &redis, 0.0, n, after0, move |s| {
        base + (s - after0) as u32
    });
    publish(p, make)
        .join()
        .map_err(|_| "publisher panicked")??;
    wait_frames(
        &storm,
        st.frames + n,
        Duration::from_secs_f64(o.drain + 5.0),
    );
    let st = storm.collect(None);

    // Checks.
    let recovered = st.status_ok;
    let last = st.last_recovered.saturating_sub(t_re);
    let (pd, pl, px) = once(&st, 0, n);
    let (md, ml, mx) = once(&st, n, n + n * k);
    let (ad, al, ax) = once(&st, after0, after0 + n);
    r.row(
        "recovered",
        format!(
            "{recovered} recovered:true, {} recovered:false, {} unexpected status frames, of {n}",
            st.status_missed, st.status_unexpected
        ),
    );
    r.row(
        "time to the last recovered",
        format!(
            "{:.1} ms after the reconnect began (per client, connect to status: {})",
            ms(last),
            hist_line(&st.recover)
        ),
    );
    r.row(
        "missed notices",
        format!(
            "{md} of {} delivered (lost {ml}, duplicated {mx}); replayed {} (status frames say {}); \
             {} connections whose status count differs from what came before it; out of order {}",
            n * k,
            st.replay_frames,
            st.replayed_sum,
            st.replayed_mismatch,
            st.order_errors
        ),
    );
    r.row(
        "prime and after",
        format!("prime {pd} (lost {pl}, dup {px}); after recovery {ad} (lost {al}, dup {ax})"),
    );
    let fails: u64 = st.failed();
    r.row("reconnect failures", format!("{fails} {:?}", st.fails));
    let exact = recovered == n
        && st.status_missed == 0
        && st.status_unexpected == 0
        && ml == 0
        && mx == 0
        && st.replay_frames == n * k
        && st.replayed_mismatch == 0
        && st.order_errors == 0
        && al == 0
        && ax == 0;
    r.row(
        "verdict",
        if exact {
            "every missed notice exactly once, in order, before the status frame and live ones"
        } else {
            "FAILED the exactly-once-in-order check"
        },
    );
    cpu_rows(&mut r, "recovery", &cpu_rec);
    let (node_us, redis_us) = per_notice(&cpu_rec, n * k);
    r.row(
        "recovery CPU per replayed notice",
        format!(
            "node B {} us, Redis {} us (Redis {}% of one core during recovery)",
            node_us.map_or("n/a".into(), |v| format!("{v:.2}")),
            redis_us.map_or("n/a".into(), |v| format!("{v:.2}")),
            cpu_rec.redis.map_or("n/a".into(), |c| format!("{c:.0}"))
        ),
    );
    if let Some((first, max)) = mem {
        r.row(
            "Redis used_memory",
            format!(
                "{} before the kill, peak {} during the storm (sampled every 20 ms), {} at the reconnect; used_memory_peak {}",
                mib(first),
                mib(max),
                mem_before.map_or("n/a".into(), mib),
                peak_info.map_or("n/a".into(), mib)
            ),
        );
        r.set("redis_used_memory_before", first);
        r.set("redis_used_memory_storm_max", max);
    }
    r.set("redis_used_memory_peak", peak_info);
    if let Some(rss) = probe.rss() {
        r.row("node B RSS after", mib(rss));
        r.set("node_b_rss_after", rss);
    }
    r.set("recovered", recovered);
    r.set("recovered_false", st.status_missed);
    r.set("status_unexpected", st.status_unexpected);
    r.set("last_recovered_ms", ms(last));
    r.set("recover_time", hist_json(&st.recover));
    r.set("missed_delivered", md);
    r.set("missed_lost", ml);
    r.set("missed_duplicated", mx);
    r.set("replayed_frames", st.replay_frames);
    r.set("replayed_status_sum", st.replayed_sum);
    r.set("replayed_mismatch", st.replayed_mismatch);
    r.set("out_of_order", st.order_errors);
    r.set("after_lost", al);
    r.set("after_duplicated", ax);
    r.set("reconnect_failures", fails);
    r.set("exactly_once_in_order", exact);
    r.set("recovery_secs", (cpu_rec.secs * 1000.0).round() / 1000.0);
    r.set("recovery_node_b_cpu_pct", opt_f(cpu_rec.server));
    r.set("recovery_redis_cpu_pct", opt_f(cpu_rec.redis));
    r.set("recovery_machine_busy_pct", opt_f(cpu_rec.machine));
    r.set("recovery_node_b_us_per_replayed", node_us);
    r.set("recovery_redis_us_per_replayed", redis_us);

    if let (Some(l), Some(rep)) = (&live, live_rep) {
        let end = live_seq + rep.sent;
        wait_frames(l, end - live_base, Duration::from_secs_f64(o.drain));
        let lst = l.collect(None);
        let (d, lost, dup) = once(&lst, live_from, end);
        let checked = end - live_from;
        r.row(
            "live during the recovery",
            format!(
                "{live_rate:.0}/s asked: {} sent, delivered {d} lost {lost} dup {dup} | {}",
                checked,
                hist_line(&lst.lat)
            ),
        );
        r.set(
            "live_during",
            json!({"rate": live_rate, "sent": checked, "delivered": d, "lost": lost,
                   "duplicated": dup, "out_of_order": lst.order_errors, "latency": hist_json(&lst.lat)}),
        );
        l.close_all();
    }
    storm.close_all();
    std::thread::sleep(Duration::from_millis(300));
    storm.stop();
    if let Some(l) = live {
        l.stop();
    }
    r.print(o.json);
    Ok(())
}
