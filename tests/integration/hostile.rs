//! Hostile peers over real sockets: slow consumers, oversized and malformed
//! frames, slowloris, expired tokens, connection and descriptor limits,
//! garbage before the upgrade, abusive publishers, inbox overload and a
//! Redis that cuts its subscriber. Each test fails if the defence it is
//! about is taken away, and prints the figures it measured.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::*;

const MB: f64 = MIB as f64;

// ---- outbound: a client that stops reading ----

#[test]
fn slow_consumer_is_cut_while_a_healthy_client_on_the_same_loop_gets_everything() {
    let _w = watchdog(90);
    let node = Node::start(&["--dev", "--workers", "1", "--max-queue-bytes", "65536"]);
    // Small window, then never read again.
    let mut stuck = raw_ws(node.ws, "/ws?user=stuck", Some(4096));
    let healthy = Client::connect(&node.url("/ws?user=healthy")).unwrap();
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 2.0));
    let rss0 = node.rss();

    const N: usize = 5000;
    const SIZE: usize = 10_000;
    let notice =
        |i: usize| padded_notice(&format!(r#""userIds":["stuck","healthy"],"seq":{i}"#), SIZE);
    // The healthy client reads as it comes; the publisher stays at most a
    // few notices ahead of it, so it never has more than 64 KB queued
    // however the threads are scheduled.
    let got = Arc::new(AtomicUsize::new(0));
    let seen = got.clone();
    let reader = std::thread::spawn(move || {
        let mut c = healthy;
        while seen.load(Ordering::Relaxed) < N {
            let i = seen.load(Ordering::Relaxed);
            match c.recv_text(Duration::from_secs(15)) {
                Some(t) => {
                    assert!(t == notice(i), "notice {i} out of order");
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        c
    });

    let t0 = Instant::now();
    let mut cut_after: Option<(Duration, usize)> = None;
    for i in 0..N {
        assert!(
            wait_until(Duration::from_secs(15), || got.load(Ordering::Relaxed) + 4
                >= i),
            "the healthy client stopped at {} of {i}",
            got.load(Ordering::Relaxed)
        );
        let (status, body) = node.publish(&notice(i));
        assert_eq!(status, 202, "{body}");
        if cut_after.is_none()
            && i % 20 == 0
            && node.metric("pushwire_slow_consumer_closed_total") == 1.0
        {
            cut_after = Some((t0.elapsed(), i));
        }
    }
    let publish_time = t0.elapsed();
    let _healthy = reader.join().unwrap();
    let rss1 = node.rss();
    assert_eq!(
        got.load(Ordering::Relaxed),
        N,
        "the healthy client missed notices"
    );
    assert_eq!(node.metric("pushwire_slow_consumer_closed_total"), 1.0);
    assert_eq!(node.metric("pushwire_connections"), 1.0);

    // The stuck client finds, once it reads, a cut stream: whatever the
    // kernel held, maybe a 1008 close, then the end.
    let end = read_until_end(&mut stuck, Duration::from_secs(10));
    assert!(end.ended, "the stuck connection was not closed: {end:?}");
    assert!(end.texts < N / 2, "{end:?}");
    assert!(
        end.close_code.is_none() || end.close_code == Some(1008),
        "{end:?}"
    );
    let pushed = (N * SIZE) as f64 / MB;
    eprintln!(
        "slow consumer: cut after {:?} (by notice {:?} of {N}); {pushed:.0} MB published in {publish_time:?}; \
         stuck client read {} notices then close {:?}; RSS {:.1} -> {:.1} MB",
        cut_after.map(|c| c.0),
        cut_after.map(|c| c.1),
        end.texts,
        end.close_code,
        rss0 / MB,
        rss1 / MB
    );
    assert!(
        rss1 - rss0 < 20.0 * MB,
        "RSS grew by {:.1} MB while {pushed:.0} MB went to a stuck client",
        (rss1 - rss0) / MB
    );
}

// ---- inbound limits ----

#[test]
fn inbound_frames_over_the_limit_get_1009_and_reserve_nothing() {
    let _w = watchdog(60);
    let mut node = Node::start(&["--dev", "--workers", "1", "--max-message-bytes", "1024"]);
    let mut healthy = Client::connect(&node.url("/ws?user=h")).unwrap();

    // At the limit: fine, the connection stays and gets notices.
    let mut ok = raw_ws(node.ws, "/ws?user=ok", None);
    ok.write_all(&masked(0x81, &[b'a'; 1024])).unwrap();
    let (first, two_parts) = (masked(0x01, &[b'b'; 512]), masked(0x80, &[b'c'; 512]));
    ok.write_all(&[first, two_parts].concat()).unwrap();
    let n = r#"{"userId":"ok","text":"still here"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(
        read_server_frame(&mut ok).unwrap(),
        (0x81, n.as_bytes().to_vec())
    );

    // One text frame over the limit.
    let mut s = raw_ws(node.ws, "/ws?user=big", None);
    s.write_all(&masked(0x81, &[b'a'; 2000])).unwrap();
    let one = read_until_end(&mut s, T);
    assert_eq!(one.close_code, Some(1009), "{one:?}");
    assert!(one.ended, "{one:?}");

    // Fragments, each under the limit, adding up over it.
    let mut s = raw_ws(node.ws, "/ws?user=frag", None);
    let mut frags = masked(0x01, &[b'a'; 600]);
    frags.extend(masked(0x00, &[b'b'; 600]));
    frags.extend(masked(0x80, &[b'c'; 600]));
    s.write_all(&frags).unwrap();
    let frag = read_until_end(&mut s, T);
    assert_eq!(frag.close_code, Some(1009), "{frag:?}");
    assert!(frag.ended, "{frag:?}");

    // Headers declaring huge frames, then a trickle of payload: refused at
    // the header, nothing reserved.
    let rss0 = node.rss();
    let mut huge = Vec::new();
    for (i, declared) in [1u64 << 62, 1 << 62, 1 << 40, 1 << 31, 256 << 20]
        .into_iter()
        .cycle()
        .take(20)
        .enumerate()
    {
        let mut s = raw_ws(node.ws, &format!("/ws?user=huge{i}"), None);
        let mut f = frame(0x82, &[], true, Some(declared));
        f.extend(noise(4096, i as u64 + 1));
        let _ = s.write_all(&f);
        huge.push(s);
    }
    let mut codes = Vec::new();
    for s in huge.iter_mut() {
        let e = read_until_end(s, T);
        assert!(e.ended, "{e:?}");
        codes.push(e.close_code);
    }
    let rss1 = node.rss();
    eprintln!(
        "inbound limits: over-limit frame -> {:?} in {:?}; fragments -> {:?} in {:?}; \
         huge declared lengths -> {codes:?}; RSS {:.1} -> {:.1} MB",
        one.close_code,
        one.after,
        frag.close_code,
        frag.after,
        rss0 / MB,
        rss1 / MB
    );
    assert!(codes.iter().all(|c| *c == Some(1009)), "{codes:?}");
    assert!(
        rss1 - rss0 < 4.0 * MB,
        "RSS grew by {:.1} MB",
        (rss1 - rss0) / MB
    );
    assert_eq!(node.metric("pushwire_protocol_closed_total"), 22.0);

    // Nobody else noticed.
    assert!(node.alive());
    let n = r#"{"userId":"h","text":"fine"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(healthy.recv_text(T).as_deref(), Some(n));
}

// ---- timeouts ----

#[test]
fn slowloris_handshakes_are_dropped_at_the_handshake_timeout() {
    let _w = watchdog(60);
    let node = Node::start(&["--dev", "--handshake-timeout", "1"]);
    let t0 = Instant::now();
    let mut silent = raw_connect(node.ws, None);
    let mut half = raw_connect(node.ws, None);
    half.write_all(b"GET /ws?user=a HTTP/1.1\r\nHost: x\r\nUpgr")
        .unwrap();
    // A byte every 200 ms: busy, but never finishing.
    let mut trickle = raw_connect(node.ws, None);
    let mut writer = trickle.try_clone().unwrap();
    std::thread::spawn(move || {
        for b in b"GET /ws?user=b HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            std::thread::sleep(Duration::from_millis(200));
            if writer.write_all(&[*b]).is_err() {
                break;
            }
        }
    });
    let took: Vec<Option<Duration>> = [&mut silent, &mut half, &mut trickle]
        .into_iter()
        .map(|s| wait_closed(s, T).map(|_| t0.elapsed()))
        .collect();
    eprintln!("slowloris: silent, half request, trickle dropped after {took:?} (timeout 1 s)");
    for t in &took {
        let t = t.expect("a slowloris connection was never dropped");
        assert!(
            t >= Duration::from_millis(900) && t < Duration::from_millis(2500),
            "{took:?}"
        );
    }
    assert!(node.wait_metric(
        r#"pushwire_handshake_rejected_total{reason="timeout"}"#,
        T,
        |v| v == 3.0
    ));
    // A normal client is not affected by the timeout once upgraded.
    let mut c = Client::connect(&node.url("/ws?user=c")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let n = r#"{"userId":"c"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(c.recv_text(T).as_deref(), Some(n));
}

#[test]
fn connections_opened_together_are_not_all_pinged_in_the_same_tick() {
    // A reconnect storm opens every connection at once. Were they all pinged
    // in one tick, a loop would write thousands of pings before it looked at
    // its inbox again (bench/ping-round.sh measured p99.9 5 -> 32 ms).
    let _w = watchdog(60);
    let node = Node::start(&[
        "--dev",
        "--workers",
        "1",
        "--ping-interval",
        "8",
        "--idle-timeout",
        "60",
    ]);
    let conns: Vec<TcpStream> = (0..48)
        .map(|i| raw_ws(node.ws, &format!("/ws?user=p{i}"), None))
        .collect();
    let opened = Instant::now();
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let (first, _) = read_server_frame(&mut s).expect("a ping within 15 s");
                assert_eq!(first & 0x0f, 0x9, "the first frame is a ping");
                Instant::now()
            })
        })
        .collect();
    let mut at: Vec<Duration> = readers
        .into_iter()
        .map(|r| r.join().unwrap().duration_since(opened))
        .collect();
    at.sort();
    // Ticks are 500 ms apart: pings that left in the same tick arrive within
    // a few ms of each other. Count the bursts.
    let bursts = 1 + at
        .windows(2)
        .filter(|w| w[1] - w[0] > Duration::from_millis(250))
        .count();
    eprintln!(
        "first pings: {bursts} bursts, from {:?} to {:?}",
        at[0],
        at[at.len() - 1]
    );
    assert!(
        at[0] >= Duration::from_millis(7500),
        "no ping before the interval: {at:?}"
    );
    assert!(
        at[at.len() - 1] <= Duration::from_millis(10_800),
        "every first ping within a quarter interval (plus a tick) after it: {at:?}"
    );
    assert!(
        bursts >= 3,
        "the first pings are spread over several ticks: {at:?}"
    );
}

#[test]
fn a_client_that_never_answers_pings_is_dropped_after_the_idle_timeout() {
    let _w = watchdog(60);
    let node = Node::start(&["--dev", "--ping-interval", "0.5", "--idle-timeout", "1.5"]);
    let t0 = Instant::now();
    let mut mute = raw_ws(node.ws, "/ws?user=mute", None);
    let mut good = Client::connect(&node.url("/ws?user=good")).unwrap();
    let reader = std::thread::spawn(move || {
        // tungstenite answers pings while we read.
        good.expect_nothing(Duration::from_secs(4).saturating_sub(t0.elapsed()));
        good
    });
    let end = read_until_end(&mut mute, Duration::from_secs(6));
    let mut good = reader.join().unwrap();
    eprintln!(
        "idle: mute client dropped after {:?} having got {} pings; good client open after {:?}",
        end.after,
        end.pings,
        t0.elapsed()
    );
    assert!(end.ended, "{end:?}");
    assert!(end.pings >= 1, "{end:?}");
    assert!(
        end.after >= Duration::from_millis(1300) && end.after < Duration::from_secs(3),
        "{end:?}"
    );
    assert_eq!(node.metric("pushwire_idle_closed_total"), 1.0);
    assert_eq!(node.metric("pushwire_connections"), 1.0);
    let n = r#"{"userId":"good","text":"still here"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(good.recv_text(T).as_deref(), Some(n));
}

#[test]
fn a_token_that_expires_on_an_open_connection_gets_4001() {
    let _w = watchdog(60);
    let node = Node::start(&["--jwt-secret", SECRET]);
    // exp 25 s ago: still inside the 30 s leeway, so the upgrade succeeds;
    // the leeway runs out about 5 s from now.
    let tok = token("42", Some(unix_now() - 25));
    let mut c = Client::connect(&node.url(&format!("/ws?token={tok}"))).expect("accepted");
    let t0 = Instant::now();
    let mut other = node.connect("7");
    let code = c.recv_close(Duration::from_secs(15));
    let took = t0.elapsed();
    eprintln!("token expiry: close {code:?} after {took:?} (expected about 5-6 s)");
    assert_eq!(code, Some(4001));
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(node.metric("pushwire_token_expired_closed_total"), 1.0);
    let n = r#"{"userId":"7"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(other.recv_text(T).as_deref(), Some(n));
}

// ---- limits ----

#[test]
fn the_connection_limit_answers_503_and_frees_up() {
    let _w = watchdog(60);
    let node = Node::start(&["--dev", "--max-connections", "3"]);
    let url = |u: &str| node.url(&format!("/ws?user={u}"));
    let a = Client::connect(&url("a")).unwrap();
    let _b = Client::connect(&url("b")).unwrap();
    let _c = Client::connect(&url("c")).unwrap();
    let refused = Client::connect(&url("d")).err().map(|r| r.status);
    assert_eq!(refused, Some(503));
    assert_eq!(
        node.metric(r#"pushwire_handshake_rejected_total{reason="limit"}"#),
        1.0
    );
    drop(a);
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 2.0));
    let mut d = Client::connect(&url("d")).expect("accepted once one left");
    let n = r#"{"userId":"d"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(d.recv_text(T).as_deref(), Some(n));
}

/// A node whose descriptor limit is 64.
fn node_with_64_fds() -> Node {
    let node = Node::start_cmd(Command::new("sh").args([
        "-c",
        r#"ulimit -n 64 && exec "$0" "$@""#,
        BIN,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--dev",
        "--workers",
        "1",
    ]));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", node.child.id())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 64 ")),
        "{limits}"
    );
    node
}

/// Upgrades until one is refused; returns the open connections.
fn exhaust(node: &Node) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for i in 0..200 {
        let mut s = raw_connect(node.ws, None);
        match raw_upgrade_on(&mut s, &format!("/ws?user=u{i}")) {
            101 => open.push(s),
            status => {
                assert_eq!(status, 0, "refused with an HTTP answer?");
                return open;
            }
        }
    }
    panic!("200 connections on 64 descriptors?");
}

#[test]
fn descriptor_exhaustion_neither_spins_nor_kills_and_recovers() {
    let _w = watchdog(60);
    let mut node = node_with_64_fds();
    let mut open = exhaust(&node);
    let held = open.len();
    assert!(held > 30, "only {held} connections on 64 descriptors");

    // While exhausted, more clients keep knocking.
    let cpu0 = node.cpu_time();
    let t0 = Instant::now();
    let mut knocks = Vec::new();
    while t0.elapsed() < Duration::from_secs(2) {
        let mut s = raw_connect(node.ws, None);
        let _ = s.write_all(b"GET /ws?user=late HTTP/1.1\r\n");
        knocks.push(s);
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = node.cpu_time() - cpu0;
    let waited = t0.elapsed();
    // Knockers are told at once (closed) rather than left hanging.
    let told = knocks
        .iter_mut()
        .map(|s| wait_closed(s, Duration::from_secs(2)))
        .filter(Option::is_some)
        .count();
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the node died when out of descriptors"
    );

    // Some leave: the node accepts again.
    let knocked = knocks.len();
    drop(knocks);
    open.truncate(held - 10);
    let t1 = Instant::now();
    let mut back = None;
    assert!(wait_until(T, || {
        let mut s = raw_connect(node.ws, None);
        let ok = raw_upgrade_on(&mut s, "/ws?user=back") == 101;
        if ok {
            back = Some(s);
        }
        ok
    }));
    let recovered = t1.elapsed();
    eprintln!(
        "fd exhaustion: {held} connections held at ulimit 64; CPU {cpu:?} over {waited:?} exhausted; \
         {told}/{knocked} late clients closed promptly; accepting again {recovered:?} after 10 left"
    );
    assert!(
        cpu < Duration::from_millis(500),
        "the node spun: {cpu:?} of CPU in {waited:?}"
    );
    // The survivors and the newcomer all still get notices.
    assert!(node.alive());
    let n = r#"{"broadcast":true}"#;
    assert_eq!(node.publish(n).0, 202);
    let mut back = back.unwrap();
    assert_eq!(read_server_frame(&mut back).unwrap().1, n.as_bytes());
    for s in open.iter_mut() {
        assert_eq!(read_server_frame(s).unwrap().1, n.as_bytes());
    }
}

#[test]
fn descriptor_exhaustion_with_an_admin_request_neither_spins_nor_loses_the_reserve() {
    let _w = watchdog(60);
    let mut node = node_with_64_fds();
    let admin = node.admin.unwrap();
    let mut open = exhaust(&node);
    let held = open.len();

    // A health check arrives while no descriptor is left, from a slow
    // client that takes its time to send the request. The admin thread
    // accepts it (its blocking accept() held a descriptor slot already)
    // and is back in accept() with no descriptor to get.
    let cpu0 = node.cpu_time();
    let t0 = Instant::now();
    let mut probe = TcpStream::connect(admin).unwrap();
    probe.set_read_timeout(Some(T)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Late WebSocket clients must still be told at once (the loop spends
    // its reserve descriptor to accept and close them), not left hanging.
    let mut knocks: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = raw_connect(node.ws, None);
            let _ = s.write_all(b"GET /ws?user=late HTTP/1.1\r\n");
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    let told = knocks
        .iter_mut()
        .map(|s| {
            let left = deadline.saturating_duration_since(Instant::now());
            wait_closed(s, left.max(Duration::from_millis(20)))
        })
        .filter(Option::is_some)
        .count();
    let cpu = node.cpu_time() - cpu0;
    let waited = t0.elapsed();
    let _ = probe.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = probe.read_to_end(&mut answer);
    let health = parse_response(&answer).0;
    drop(knocks);
    open.truncate(held - 10);
    eprintln!(
        "fd exhaustion + a slow health check: CPU {cpu:?} over {waited:?}; \
         {told}/5 late WebSocket clients closed promptly; the check answered {health}"
    );
    assert!(node.alive());
    assert!(
        cpu < Duration::from_millis(300),
        "the node spun: {cpu:?} of CPU in {waited:?} at the descriptor limit"
    );
    assert_eq!(
        told, 5,
        "late clients left hanging: the loop's reserve descriptor is gone"
    );
    assert_eq!(health, 200);
}

// ---- protocol abuse after the upgrade ----

#[test]
fn protocol_abuse_gets_the_right_close_code_and_harms_nobody_else() {
    let _w = watchdog(60);
    let mut node = Node::start(&["--dev", "--workers", "1"]);
    let mut healthy = Client::connect(&node.url("/ws?user=h")).unwrap();
    let floods: Vec<u8> = (0..1000).flat_map(|_| masked(0x89, b"ping")).collect();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", frame(0x81, b"hello", false, None), 1002),
        ("reserved data opcode 0x3", masked(0x83, b"x"), 1002),
        ("reserved control opcode 0xB", masked(0x8B, b"x"), 1002),
        ("RSV1 set", masked(0xC1, b"hello"), 1002),
        ("RSV2+RSV3 set", masked(0xB1, b"hello"), 1002),
        (
            "invalid UTF-8",
            masked(0x81, &[b'a', 0xff, 0xfe, b'z']),
            1007,
        ),
        (
            "UTF-8 broken across fragments",
            [masked(0x01, &[0xe2, 0x82]), masked(0x80, &[0x28])].concat(),
            1007,
        ),
        ("control frame of 126 bytes", masked(0x89, &[7; 126]), 1002),
        ("fragmented control frame", masked(0x09, b"x"), 1002),
        ("continuation without a start", masked(0x80, b"x"), 1002),
        (
            "new message inside a fragmented one",
            [masked(0x01, b"a"), masked(0x81, b"b")].concat(),
            1002,
        ),
        ("1000 pings at once", floods, 1008),
    ];
    let mut report = Vec::new();
    for (i, (what, bytes, want)) in cases.iter().enumerate() {
        let mut s = raw_ws(node.ws, &format!("/ws?user=bad{i}"), None);
        let _ = s.write_all(bytes);
        let e = read_until_end(&mut s, T);
        report.push(format!(
            "{what}: close {:?} after {:?}{}",
            e.close_code,
            e.after,
            if e.pongs > 0 {
                format!(" ({} pongs first)", e.pongs)
            } else {
                String::new()
            }
        ));
        assert_eq!(e.close_code, Some(*want), "{what}: {e:?}");
        assert!(e.ended, "{what}: {e:?}");
        let n = format!(r#"{{"userId":"h","after":{i}}}"#);
        assert_eq!(node.publish(&n).0, 202);
        assert_eq!(healthy.recv_text(T), Some(n), "after {what}");
    }
    eprintln!("protocol abuse:\n  {}", report.join("\n  "));
    assert_eq!(
        node.metric("pushwire_protocol_closed_total"),
        cases.len() as f64
    );
    assert_eq!(node.metric("pushwire_connections"), 1.0);
    assert!(node.alive());
}

// ---- garbage before the upgrade ----

#[test]
fn garbage_before_the_upgrade_gets_4xx_and_bounded_memory() {
    let _w = watchdog(90);
    let mut node = Node::start(&["--dev", "--workers", "1"]);
    let mut healthy = Client::connect(&node.url("/ws?user=h")).unwrap();
    let rss0 = node.rss();
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let mut big_headers = format!("GET /ws?user=x HTTP/1.1\r\nHost: x\r\n{upgrade}");
    let mut i = 0;
    while big_headers.len() < 200 * 1024 {
        big_headers.push_str(&format!("X-Pad-{i}: {}\r\n", "v".repeat(100)));
        i += 1;
    }
    big_headers.push_str("\r\n");
    let long_line = format!(
        "GET /ws?user={} HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n",
        "a".repeat(2 << 20)
    );
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("300 random bytes", noise(300, 3), &[400]),
        ("64 KB of random bytes", noise(64 * 1024, 7), &[400, 431]),
        ("1 MB of zeros", vec![0; 1 << 20], &[400, 431]),
        ("200 KB of headers", big_headers.into_bytes(), &[431]),
        ("a 2 MB request line", long_line.into_bytes(), &[414, 431]),
        (
            "POST",
            format!(
                "POST /ws?user=x HTTP/1.1\r\nHost: x\r\n{upgrade}Content-Length: 5\r\n\r\nhello"
            )
            .into_bytes(),
            &[405],
        ),
        (
            "PUT",
            format!("PUT /ws?user=x HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n").into_bytes(),
            &[405],
        ),
        (
            "HTTP/1.0 upgrade",
            format!("GET /ws?user=x HTTP/1.0\r\nHost: x\r\n{upgrade}\r\n").into_bytes(),
            &[400, 505],
        ),
        (
            "plain GET without upgrade",
            b"GET /ws?user=x HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            &[400],
        ),
        ("a bare newline flood", b"\r\n".repeat(50_000), &[400, 431]),
    ];
    let mut report = Vec::new();
    for (what, bytes, want) in &cases {
        // Ten times each, five at once.
        let answers: Vec<u16> = (0..2)
            .flat_map(|_| {
                let ts: Vec<_> = (0..5)
                    .map(|_| {
                        let b = bytes.clone();
                        let addr = node.ws;
                        std::thread::spawn(move || send_garbage(addr, &b))
                    })
                    .collect();
                ts.into_iter()
                    .map(|t| t.join().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        report.push(format!("{what}: {answers:?}"));
        assert!(
            answers.iter().all(|a| want.contains(a)),
            "{what}: answered {answers:?}, expected one of {want:?}"
        );
    }
    let rss1 = node.rss();
    eprintln!(
        "garbage before the upgrade (RSS {:.1} -> {:.1} MB):\n  {}",
        rss0 / MB,
        rss1 / MB,
        report.join("\n  ")
    );
    assert!(
        rss1 - rss0 < 8.0 * MB,
        "RSS grew by {:.1} MB",
        (rss1 - rss0) / MB
    );
    assert!(node.alive());
    let n = r#"{"userId":"h"}"#;
    assert_eq!(node.publish(n).0, 202);
    assert_eq!(healthy.recv_text(T).as_deref(), Some(n));
    assert!(Client::connect(&node.url("/ws?user=new")).is_ok());
}

// ---- publishers ----

#[test]
fn publisher_abuse_is_counted_and_harmless() {
    let _w = watchdog(90);
    let redis = Redis::start();
    // A relaxed canary: a burst that takes the subscriber longer than two
    // canary intervals to drain trips the canary (the inbox-overload test
    // below is about that); this test is about what the notices are.
    let mut node = Node::with_redis(&redis, &["--workers", "1", "--canary-interval", "5"]);
    let mut c = node.connect("42");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 1.0));
    let rss0 = node.rss();
    let mut con = redis.conn();
    let t0 = Instant::now();

    // 100,000 invalid notices in one pipelined burst, of every kind.
    const BURST: usize = 100_000;
    let kinds: [&dyn Fn(usize) -> String; 6] = [
        &|i| format!("not json {i}"),
        &|i| format!(r#"{{"text":"no route {i}"}}"#),
        &|i| format!(r#"{{"userId":"42","broadcast":true,"n":{i}}}"#),
        &|i| format!(r#"[{{"userId":"42","n":{i}}}]"#),
        &|i| format!(r#"{{"userId":null,"n":{i}}}"#),
        &|i| format!(r#"{{"userId":"42","n":{i}"#),
    ];
    publish_burst(
        &mut con,
        (0..BURST).map(|i| kinds[i % kinds.len()](i).into_bytes()),
    );
    let burst_time = t0.elapsed();

    // Notices over 1 MiB (valid JSON, for a connected user).
    let pad = "x".repeat((1 << 20) + 10);
    let too_large: Vec<Vec<u8>> = (0..3)
        .map(|i| format!(r#"{{"userId":"42","n":{i},"pad":"{pad}"}}"#).into_bytes())
        .collect();
    // Deep nesting where a Value is built (the route) and at the top.
    let depth = 100_000;
    let deep = |open: &str, close: &str| format!("{}{}", open.repeat(depth), close.repeat(depth));
    let nested: Vec<Vec<u8>> = vec![
        deep("[", "]").into_bytes(),
        format!(r#"{{"userId":{}}}"#, deep("[", "]")).into_bytes(),
        format!(r#"{{"userIds":{}}}"#, deep(r#"{"a":"#, "}")).into_bytes(),
        format!(r#"{{"broadcast":{}}}"#, deep("[", "]")).into_bytes(),
    ];
    // Invalid UTF-8.
    let not_utf8 = b"{\"userId\":\"42\",\"t\":\"\xff\xfe\"}".to_vec();
    let invalid = BURST + too_large.len() + nested.len() + 1;
    publish_burst(
        &mut con,
        too_large
            .into_iter()
            .chain(nested)
            .chain(std::iter::once(not_utf8)),
    );
    // A lone surrogate escape in a field that is not a routing field is a
    // valid notice: the bytes are UTF-8, the JSON grammar allows any \uXXXX
    // escape, and the server only checks the syntax of the fields it skips
    // (notice::parse, and the property tests' reading of SPEC section 3).
    // It arrives byte for byte like any other.
    let surrogate = r#"{"userId":"42","t":"\ud800"}"#;
    publish_burst(&mut con, std::iter::once(surrogate.as_bytes().to_vec()));

    // A valid notice for 100,000 users (42 among them, twice).
    let mut ids: Vec<String> = (0..100_000).map(|i| format!("\"u{i}\"")).collect();
    ids.push("42".into());
    ids.push("\"42\"".into());
    let wide = format!(r#"{{"userIds":[{}],"text":"wide"}}"#, ids.join(","));
    assert!(wide.len() < 1 << 20);
    publish_burst(&mut con, std::iter::once(wide.clone().into_bytes()));
    let after = r#"{"userId":"42","text":"after the abuse"}"#;
    publish_burst(&mut con, std::iter::once(after.as_bytes().to_vec()));

    let total = invalid + 3;
    let (received, took) = node.wait_received(total, Duration::from_secs(30));
    let counted = node.metric("pushwire_notices_invalid_total");
    let reconnects = node.metric("pushwire_redis_reconnects_total");
    let rss1 = node.rss();

    // Whatever happened, the node is up, ready, and delivers a fresh notice.
    assert!(node.alive());
    assert!(node.wait_ready(T));
    let fresh = r#"{"userId":"42","text":"fresh"}"#;
    assert_eq!(redis.publish(CHANNEL, fresh.as_bytes()), 1);
    let mut got = Vec::new();
    while let Some(t) = c.recv_text(T) {
        let done = t == fresh;
        got.push(t);
        if done {
            break;
        }
    }
    eprintln!(
        "publisher abuse: {BURST} invalid published in {burst_time:?}; {received} of {total} received, \
         {counted} counted invalid (of {invalid} sent invalid) by {took:?}; {reconnects} subscriber reconnects; \
         RSS {:.1} -> {:.1} MB; user 42 got {} notices: {:?}",
        rss0 / MB,
        rss1 / MB,
        got.len(),
        got.iter().map(|t| &t[..t.len().min(40)]).collect::<Vec<_>>()
    );
    assert_eq!(got.last().map(String::as_str), Some(fresh));
    assert!(
        rss1 - rss0 < 32.0 * MB,
        "RSS grew by {:.1} MB",
        (rss1 - rss0) / MB
    );
    assert_eq!(
        received, total as f64,
        "the subscriber lost notices ({reconnects} reconnects)"
    );
    assert_eq!(
        counted, invalid as f64,
        "{counted} counted invalid, {invalid} sent"
    );
    let expect = vec![
        surrogate.to_string(),
        wide,
        after.to_string(),
        fresh.to_string(),
    ];
    assert_eq!(got, expect);
}

#[test]
fn a_burst_that_overflows_the_loop_inbox_is_counted_and_the_node_recovers() {
    let _w = watchdog(90);
    let redis = Redis::start();
    let node = Node::with_redis_env(
        &redis,
        &["--workers", "1", "--max-queue-bytes", "268435456"],
        TEST_HOOKS,
    );
    let mut slow = node.connect("42");
    let mut staller = node.connect("9");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 2.0));

    // A loop keeps up with a subscriber that only parses (a burst alone
    // left nothing dropped, run after run), so the loop is held for 3 s
    // while the burst comes in: its inbox must overflow, and the
    // subscriber must go on reading and count what it cannot queue.
    staller.send_text(STALL_HOOK);
    std::thread::sleep(Duration::from_millis(300));
    const N: usize = 200_000;
    let mut con = redis.conn();
    let t0 = Instant::now();
    publish_burst(
        &mut con,
        (0..N).map(|i| format!(r#"{{"userId":"42","n":{i}}}"#).into_bytes()),
    );
    let published_in = t0.elapsed();
    let (received, _) = node.wait_received(N, Duration::from_secs(30));
    let reconnects = node.metric("pushwire_redis_reconnects_total");
    let settle_time = t0.elapsed();
    // The loop has what its inbox held left to deliver; the client starts
    // reading only once it has.
    let counted = || {
        node.metric("pushwire_messages_delivered_total")
            + node.metric("pushwire_notices_dropped_total")
    };
    wait_until(T, || counted() >= N as f64);
    let delivered = node.metric("pushwire_messages_delivered_total");
    let dropped = node.metric("pushwire_notices_dropped_total");
    let mut read = 0usize;
    let mut last = -1i64;
    while (read as f64) < delivered {
        let Some(t) = slow.recv_text(T) else { break };
        let n: serde_json::Value = serde_json::from_str(&t).unwrap();
        let n = n["n"].as_i64().unwrap();
        assert!(n > last, "out of order: {n} after {last}");
        last = n;
        read += 1;
    }
    eprintln!(
        "inbox overload: {N} published in {published_in:?}; {received} received by {settle_time:?} \
         ({reconnects} reconnects); {delivered} delivered, {dropped} dropped; client read {read}"
    );
    assert!(dropped > 0.0, "the inbox did not overflow: nothing dropped");
    assert_eq!(read as f64, delivered);
    assert!(node.wait_ready(T), "the subscriber is stalled");
    let n = r#"{"userId":"42","text":"later"}"#;
    assert_eq!(redis.publish(CHANNEL, n.as_bytes()), 1);
    assert_eq!(slow.recv_text(T).as_deref(), Some(n));
    assert_eq!(
        received, N as f64,
        "the subscriber lost notices ({reconnects} reconnects)"
    );
    assert_eq!(
        delivered + dropped,
        N as f64,
        "every delivery queued or counted"
    );
}

#[test]
fn redis_cutting_a_lagging_subscriber_is_survived() {
    let _w = watchdog(90);
    let dir = TempDir::new("hostile-redis");
    let redis_log = dir.join("redis.log");
    let redis = Redis::start_with(&[
        "--client-output-buffer-limit",
        "pubsub 1mb 512kb 1",
        "--logfile",
        redis_log.to_str().unwrap(),
    ]);
    let limit = redis
        .cmd(&["CONFIG", "GET", "client-output-buffer-limit"])
        .unwrap();
    assert!(limit.contains("pubsub 1048576 524288 1"), "{limit}");
    let node = Node::with_redis(&redis, &[]);
    let mut c = node.connect("42");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 1.0));

    // 60 MB as fast as Redis takes it, for nobody connected.
    let pad = "x".repeat(100 * 1024);
    let mut con = redis.conn();
    let t0 = Instant::now();
    publish_burst(
        &mut con,
        (0..600).map(|i| format!(r#"{{"userId":"nobody","n":{i},"pad":"{pad}"}}"#).into_bytes()),
    );
    let cut = node.wait_metric(
        "pushwire_redis_reconnects_total",
        Duration::from_secs(15),
        |v| v >= 1.0,
    );
    let reconnected_after = t0.elapsed();
    let log = std::fs::read_to_string(&redis_log).unwrap_or_default();
    let redis_cuts = log
        .lines()
        .filter(|l| l.contains("output buffer limits"))
        .count();
    let received = node.metric("pushwire_notices_received_total");
    eprintln!(
        "redis output-buffer cut: Redis logged {redis_cuts} output-buffer disconnections; reconnected after {reconnected_after:?}; \
         {received} of 600 notices received before the cut"
    );
    assert!(cut, "the subscriber never reconnected");
    assert!(redis_cuts >= 1, "Redis did not cut anyone:\n{log}");
    assert!(node.wait_ready(T));
    let n = r#"{"userId":"42","text":"after the cut"}"#;
    assert!(wait_until(T, || redis.publish(CHANNEL, n.as_bytes()) == 1));
    assert_eq!(c.recv_text(T).as_deref(), Some(n));
}
