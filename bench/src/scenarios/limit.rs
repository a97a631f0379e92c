//! `limit`: the same broadcast, written by the barest writer there is.
//!
//! A child process of this binary (`limit-serve`) accepts the connections
//! and writes pre-framed bytes with mio alone: no WebSocket library, no
//! Redis. What it reaches is what the kernel allows, the ceiling to hold
//! the server's broadcast figures against.

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::options::Opts;
use crate::os::{mono_ns, raise_nofile, self_cpu_ns};
use crate::probe::{Probe, Window};
use crate::publisher::pad_text;
use crate::report::{broadcast_rows, connect_rows, cpu_rows, life_rows, mib, Report};
use crate::scenarios::{client_cfg, connect_phase, wait_frames};
use crate::wire::Target;

/// The parent side of `limit`: a child process of this binary writes.
pub fn limit(o: &Opts) -> Result<(), String> {
    let mut r = Report::new(o, "limit");
    let m = o.messages as u64;
    let rate = o.rate.unwrap_or(0.0);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "limit-serve".to_string(),
            "--messages".into(),
            m.to_string(),
            "--rate".into(),
            rate.to_string(),
            "--batch".into(),
            o.batch.to_string(),
            "--pad".into(),
            o.pad.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn the limit writer: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let port_line = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the limit writer did not start")?;
    let port: u16 = port_line
        .strip_prefix("PORT ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("limit writer said {port_line:?}"))?;
    let target = Target {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        host: format!("127.0.0.1:{port}"),
        path: "/".into(),
    };
    let probe = Probe {
        pids: vec![child.id()],
        admins: Vec::new(),
        redis_pid: None,
    };
    let rss0 = probe.rss();
    let c = connect_phase(
        o,
        client_cfg(o, Some(vec![target]))?,
        o.connect_rate.unwrap_or(5000.0),
    )?;
    connect_rows(&mut r, &c.stats, o.connections);
    let open = c.clients.open();
    c.clients.collect(Some(0));
    let frames0 = c.clients.frames();
    let w = Window::start(&probe);
    writeln!(stdin, "GO").map_err(|e| format!("limit writer: {e}"))?;
    let cap = Duration::from_secs_f64(
        o.seconds.unwrap_or(60.0) + if rate > 0.0 { m as f64 / rate } else { 0.0 },
    );
    wait_frames(
        &c.clients,
        frames0 + m * open,
        Duration::from_secs_f64(o.drain.max(1.0)),
        cap,
    );
    let mut cpu = w.end(&probe);
    let rss1 = probe.rss();
    let done = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    // The writer sends with send(2), which /proc/PID/io does not count:
    // take its own count.
    cpu.writes = done
        .split(", ")
        .find_map(|part| part.strip_suffix(" write calls"))
        .and_then(|n| n.parse().ok());
    let st = c.clients.collect(None);
    r.row(
        "writer",
        format!(
            "bare mio writer of pre-framed bytes, {} frame(s) per write, {}",
            o.batch,
            if rate > 0.0 {
                format!("{rate}/s")
            } else {
                "as fast as possible".into()
            }
        ),
    );
    r.row("writer says", done.clone());
    r.set("writer", done);
    r.set("messages", m);
    r.set("rate", rate);
    r.set("batch", o.batch as u64);
    broadcast_rows(&mut r, &st, m, open, &cpu);
    cpu_rows(&mut r, "broadcast", &cpu);
    if let (Some(a), Some(b)) = (rss0, rss1) {
        r.row(
            "writer RSS",
            format!(
                "{} before, {} after: {:.0} bytes per connection",
                mib(a),
                mib(b),
                (b as f64 - a as f64) / open.max(1) as f64
            ),
        );
    }
    life_rows(&mut r, &st);
    c.clients.close_all();
    drop(stdin);
    std::thread::sleep(Duration::from_millis(300));
    c.clients.stop();
    let _ = child.wait();
    r.print(o.json);
    Ok(())
}

struct RawConn {
    pub sock: TcpStream,
    pending: Vec<u8>,
}

/// Writes what it can; keeps the rest. True when nothing is left.
fn raw_write(c: &mut RawConn, bytes: &[u8], writes: &mut u64) -> bool {
    let mut off = 0;
    while off < bytes.len() {
        *writes += 1;
        match c.sock.write(&bytes[off..]) {
            Ok(0) => return true,
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.pending.extend_from_slice(&bytes[off..]);
                return false;
            }
            Err(_) => return true,
        }
    }
    true
}

/// The child side of `limit`: accept, then on "GO" write M pre-framed text
/// frames to every connection, as fast as the kernel takes them.
pub fn limit_serve(o: &Opts) -> Result<(), String> {
    raise_nofile();
    let err = |e: io::Error| e.to_string();
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(err)?;
    s.listen(4096).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    let mut listener = TcpListener::from_std(s.into());
    let port = listener.local_addr().map_err(err)?.port();
    println!("PORT {port}");
    let _ = io::stdout().flush();
    let go = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    {
        let (go, quit) = (go.clone(), quit.clone());
        std::thread::spawn(move || {
            for line in io::stdin().lock().lines() {
                match line {
                    Ok(l) if l.trim() == "GO" => go.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            quit.store(true, Ordering::SeqCst);
        });
    }
    const LISTEN: Token = Token(usize::MAX - 1);
    let mut poll = Poll::new().map_err(err)?;
    poll.registry()
        .register(&mut listener, LISTEN, Interest::READABLE)
        .map_err(err)?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<RawConn> = Vec::new();
    let accept = |listener: &TcpListener, conns: &mut Vec<RawConn>, poll: &Poll| loop {
        match listener.accept() {
            Ok((mut sock, _)) => {
                let _ = sock.set_nodelay(true);
                let tok = Token(conns.len());
                if poll
                    .registry()
                    .register(&mut sock, tok, Interest::WRITABLE)
                    .is_ok()
                {
                    conns.push(RawConn {
                        sock,
                        pending: Vec::new(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    };
    while !go.load(Ordering::SeqCst) {
        if quit.load(Ordering::SeqCst) {
            return Ok(());
        }
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .map_err(err)?;
        accept(&listener, &mut conns, &poll);
    }
    accept(&listener, &mut conns, &poll);
    let m = o.messages as u64;
    let rate = o.rate.unwrap_or(0.0);
    let batch = o.batch as u64;
    let pad = pad_text(o.pad);
    let cpu0 = self_cpu_ns();
    let start = mono_ns();
    let mut next = 0u64;
    let mut backlog = 0usize;
    let mut writes = 0u64;
    let mut frames = Vec::new();
    let mut payload = Vec::new();
    while next < m || backlog > 0 {
        let due = if rate <= 0.0 {
            m
        } else {
            ((mono_ns() - start) as f64 * rate / 1e9) as u64 + 1
        }
        .min(m);
        if next < due {
            let k = (due - next).min(batch);
            frames.clear();
            let t = mono_ns();
            for seq in next..next + k {
                payload.clear();
                let _ = write!(
                    payload,
                    "{{\"broadcast\":true,\"seq\":{seq},\"t\":{t}{pad}}}"
                );
                frames.push(0x81);
                if payload.len() < 126 {
                    frames.push(payload.len() as u8);
                } else if payload.len() < 65536 {
                    frames.push(126);
                    frames.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                } else {
                    frames.push(127);
                    frames.extend_from_slice(&(payload.len() as u64).to_be_bytes());
                }
                frames.extend_from_slice(&payload);
            }
            for c in conns.iter_mut() {
                if !c.pending.is_empty() {
                    c.pending.extend_from_slice(&frames);
                } else if !raw_write(c, &frames, &mut writes) {
                    backlog += 1;
                }
            }
            next += k;
        }
        let more_now = next < m && (rate <= 0.0 || next < due);
        let timeout = if more_now {
            Duration::ZERO
        } else {
            Duration::from_millis(1)
        };
        poll.poll(&mut events, Some(timeout)).map_err(err)?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = conns.get_mut(i) else { continue };
            if c.pending.is_empty() {
                continue;
            }
            let data = std::mem::take(&mut c.pending);
            if raw_write(c, &data, &mut writes) {
                backlog -= 1;
            }
        }
        if quit.load(Ordering::SeqCst) {
            return Ok(());
        }
    }
    let elapsed = mono_ns() - start;
    let cpu = self_cpu_ns() - cpu0;
    println!(
        "DONE {} connections, {} frames each, {} write calls, {:.3} s, writer CPU {:.0}% of one core",
        conns.len(),
        m,
        writes,
        elapsed as f64 / 1e9,
        cpu as f64 / elapsed.max(1) as f64 * 100.0
    );
    let _ = io::stdout().flush();
    while !quit.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
