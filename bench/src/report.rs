//! What a run prints: a human table and exactly one JSON line.
//!
//! Scripts keep the JSON line (bench/raw/*.jsonl) and render results from
//! it, so its keys are a contract; the rows shared by several scenarios are
//! built here so each key is spelled once.

use std::io::{self, Write};

use serde_json::{json, Value};

use crate::histogram::{hist_json, hist_line, Hist};
use crate::options::{Auth, Opts};
use crate::os::ncpu;
use crate::probe::Cpu;
use crate::stats::Stats;

pub struct Report {
    title: String,
    rows: Vec<(String, String)>,
    pub json: serde_json::Map<String, Value>,
}

impl Report {
    pub fn new(o: &Opts, scenario: &str) -> Report {
        let mut r = Report {
            title: scenario.to_string(),
            rows: Vec::new(),
            json: serde_json::Map::new(),
        };
        r.set("scenario", scenario);
        if let Some(l) = &o.label {
            r.set("label", l.as_str());
        }
        let cmd: Vec<String> = std::env::args().collect();
        r.set("cmd", cmd.join(" "));
        r.set("connections", o.connections as u64);
        r.set("threads", o.threads as u64);
        r.set("urls", json!(o.urls));
        r.set(
            "auth",
            match o.auth {
                Auth::Jwt => "jwt",
                Auth::Query => "query",
                Auth::Header => "header",
            },
        );
        r
    }

    pub fn row(&mut self, k: &str, v: impl Into<String>) {
        self.rows.push((k.to_string(), v.into()));
    }

    pub fn set(&mut self, k: &str, v: impl Into<Value>) {
        self.json.insert(k.to_string(), v.into());
    }

    pub fn print(&self, json_only: bool) {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut table = format!("== {} ==\n", self.title);
        for (k, v) in &self.rows {
            table.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        let line = Value::Object(self.json.clone()).to_string();
        if json_only {
            eprint!("{table}");
            println!("{line}");
        } else {
            print!("{table}");
            println!("{line}");
        }
        let _ = io::stdout().flush();
    }
}

pub fn opt_f(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!((x * 10.0).round() / 10.0))
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

pub fn cpu_rows(r: &mut Report, prefix: &str, c: &Cpu) {
    r.row(
        &format!("{prefix} CPU (% of one core)"),
        format!(
            "server {}  bench {:.1}  whole machine {} ({} cores)  over {:.2} s",
            c.server
                .map_or("n/a (give --server-pid)".into(), |s| format!("{s:.1}")),
            c.bench,
            c.machine.map_or("n/a".into(), |m| format!("{m:.0}")),
            ncpu(),
            c.secs
        ),
    );
    if !c.threads.is_empty() {
        let t: Vec<String> = c
            .threads
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect();
        r.row(&format!("{prefix} server threads %"), t.join(", "));
    }
    r.set(&format!("{prefix}_server_cpu_pct"), opt_f(c.server));
    r.set(&format!("{prefix}_bench_cpu_pct"), opt_f(Some(c.bench)));
    r.set(&format!("{prefix}_server_threads_pct"), json!(c.threads));
    r.set(&format!("{prefix}_machine_busy_pct"), opt_f(c.machine));
    r.set(
        &format!("{prefix}_secs"),
        (c.secs * 1000.0).round() / 1000.0,
    );
}

pub fn connect_rows(r: &mut Report, st: &Stats, n: usize) {
    let secs = st.last_open.saturating_sub(st.first_attempt) as f64 / 1e9;
    let rate = if secs > 0.0 {
        st.opened as f64 / secs
    } else {
        0.0
    };
    r.row(
        "connections",
        format!(
            "{} open of {n} attempted, {} failed",
            st.opened,
            st.failed()
        ),
    );
    if !st.fails.is_empty() {
        let f: Vec<String> = st.fails.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        r.row("failures", f.join(", "));
    }
    r.row(
        "connect rate",
        format!("{rate:.0} handshakes/s ({} in {secs:.2} s)", st.opened),
    );
    r.row("connect time", hist_line(&st.connect));
    r.set("open", st.opened);
    r.set("failed", st.failed());
    r.set("failures", json!(st.fails));
    r.set("connect_per_s", opt_f(Some(rate)));
    r.set("connect_secs", (secs * 1000.0).round() / 1000.0);
    r.set("connect_time", hist_json(&st.connect));
}

pub fn life_rows(r: &mut Report, st: &Stats) {
    r.row(
        "after open",
        format!(
            "{} closed by the server {:?}, {} dropped without close, {} pings answered",
            st.closed_by_server, st.close_codes, st.dropped_open, st.pings
        ),
    );
    r.set("closed_by_server", st.closed_by_server);
    r.set("close_codes", json!(st.close_codes));
    r.set("dropped", st.dropped_open);
    r.set("pings", st.pings);
}

/// Rows for `broadcast` and `limit`: M notices expected on each of `open`.
pub fn broadcast_rows(r: &mut Report, st: &Stats, m: u64, open: u64, cpu: &Cpu) {
    let expected = m * open;
    let mut comp = Hist::default();
    let mut incomplete = 0;
    for i in 0..m as usize {
        let got = st.seq_count.get(i).copied().unwrap_or(0) as u64;
        if got >= open {
            comp.record(st.seq_max[i]);
        } else {
            incomplete += 1;
        }
    }
    let delivered: u64 = st
        .seq_count
        .iter()
        .take(m as usize)
        .map(|c| *c as u64)
        .sum();
    let window = st.last_rx.saturating_sub(st.min_t) as f64 / 1e9;
    let per_s = if window > 0.0 {
        delivered as f64 / window
    } else {
        0.0
    };
    r.row(
        "delivered",
        format!(
            "{delivered} of {expected} ({} notices x {open} connections), {incomplete} notices not on every connection",
            m
        ),
    );
    r.row(
        "throughput",
        format!("{per_s:.0} deliveries/s ({:.0} bytes/s of payload) over {window:.3} s from first publish to last receipt",
            if window > 0.0 { st.bytes as f64 / window } else { 0.0 }),
    );
    r.row("until the last connection has it", hist_line(&comp));
    r.row("each delivery", hist_line(&st.lat));
    r.set("expected", expected);
    r.set("delivered", delivered);
    r.set("incomplete_notices", incomplete);
    r.set("deliveries_per_s", opt_f(Some(per_s)));
    r.set("window_secs", (window * 1000.0).round() / 1000.0);
    if let Some(ns) = cpu.server_ns() {
        let per = ns / delivered.max(1) as f64 / 1e3;
        r.row(
            "server CPU per delivery",
            format!("{per:.2} us (CPU ticks are 10 ms: rough when the window is short)"),
        );
        r.set("server_cpu_us_per_delivery", (per * 100.0).round() / 100.0);
    }
    if let Some(w) = cpu.writes {
        let per = delivered as f64 / w.max(1) as f64;
        r.row(
            "server write calls",
            format!("{w} ({per:.2} deliveries per call; /proc/PID/io syscw counts write/writev, not send)"),
        );
        r.set("server_write_calls", w);
        r.set("deliveries_per_write", (per * 100.0).round() / 100.0);
    }
    r.set("complete_latency", hist_json(&comp));
    r.set("delivery_latency", hist_json(&st.lat));
}
