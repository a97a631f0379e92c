//! pushwire-bench: load generator and measurement harness for pushwire.
//!
//! One process, a few client threads each running its own mio loop over a
//! share of the connections, plus (when a scenario publishes) one blocking
//! publisher thread that PUBLISHes pipelined batches to Redis at a fixed
//! rate. The WebSocket client side is hand-written: the upgrade request is
//! fixed text, the 101 answer is checked by its status line and accept
//! key, and server frames are parsed in place (unmasked text, ping answered
//! with a masked pong, close answered and dropped). Per connection the
//! bench keeps a socket, a user id, a start time and two Vecs that are
//! empty unless a frame or a write was cut short.
//!
//! Every notice carries its publish time as nanoseconds of CLOCK_MONOTONIC,
//! which is system-wide on Linux, so latency is measured across threads and
//! across bench processes alike.
//!
//! It only sends load to loopback addresses: a non-loopback URL is refused.
//!
//! This file only parses the flags, raises the descriptor limit, runs the
//! scenario and maps the result to an exit status (2: bad flags, 1: the
//! run failed).

mod client;
mod clients;
mod histogram;
mod options;
mod os;
mod probe;
mod publisher;
mod report;
mod scenarios;
mod stats;
mod wire;

fn main() {
    let o = match options::parse_opts(std::env::args_os().skip(1).collect()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("pushwire-bench: {e}");
            std::process::exit(2);
        }
    };
    let nofile = os::raise_nofile();
    if o.scenario != "limit-serve" && nofile < o.connections as u64 + 64 {
        eprintln!(
            "pushwire-bench: warning: RLIMIT_NOFILE is {nofile}, fewer than --connections {} needs",
            o.connections
        );
    }
    let result = match o.scenario.as_str() {
        "idle" => scenarios::idle(&o, false),
        "connect" => scenarios::idle(&o, true),
        "targeted" => scenarios::targeted(&o, "targeted"),
        "two-nodes" => {
            if o.urls.len() < 2 {
                Err("two-nodes needs --url twice (one per node)".into())
            } else {
                scenarios::targeted(&o, "two-nodes")
            }
        }
        "broadcast" => scenarios::broadcast(&o),
        "storm" => scenarios::storm(&o),
        "limit" => scenarios::limit(&o),
        "limit-serve" => scenarios::limit_serve(&o),
        other => Err(format!("unknown scenario {other} (see --help)")),
    };
    if let Err(e) = result {
        eprintln!("pushwire-bench: {e}");
        std::process::exit(1);
    }
}
