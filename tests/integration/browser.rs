//! A real browser against the `--dev` demo page: headless Chromium opens
//! the page, the page's own WebSocket connects as user 42, a notice is
//! posted to `/publish`, and the DOM shows it. The page is driven over the
//! DevTools protocol (a WebSocket, spoken with tungstenite), because
//! `--dump-dom` does not wait for WebSocket traffic.
//!
//! Chromium is expected at /usr/bin/chromium (or `PUSHWIRE_CHROMIUM`). CI
//! installs it, so its absence fails the test, unless
//! `PUSHWIRE_SKIP_BROWSER=1` is set.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message;

use crate::util::*;

const BOOT: Duration = Duration::from_secs(45);
/// A browser on a loaded box answers slower than the server: not [`T`].
const PAGE_T: Duration = Duration::from_secs(15);

/// The browser, killed with its whole process group on drop (also when the
/// test fails).
struct Chromium {
    child: Child,
    dir: TempDir,
}

impl Chromium {
    fn launch(binary: &str, url: &str) -> Chromium {
        use std::os::unix::process::CommandExt;
        let dir = TempDir::new("chromium");
        let log = std::fs::File::create(dir.join("chromium.log")).unwrap();
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group, so the drop kills renderers and helpers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Chromium { child, dir }
    }

    /// The DevTools port, from the DevToolsActivePort file Chromium writes.
    fn devtools_port(&mut self) -> u16 {
        let file = self.dir.join("profile").join("DevToolsActivePort");
        let mut port = None;
        let found = wait_until(BOOT, || {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("chromium exited early ({s}):\n{}", self.log_tail());
            }
            port = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse().ok());
            port.is_some()
        });
        assert!(
            found,
            "chromium wrote no {} within {BOOT:?}:\n{}",
            file.display(),
            self.log_tail()
        );
        port.unwrap()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("chromium log (tail):\n{}", self.log_tail());
        }
        let pgid = self.child.id() as i32;
        // SAFETY: signals the process group of the child we started.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A DevTools session with one page target.
struct Page {
    ws: Client,
    next_id: u64,
    port: u16,
    url: String,
}

impl Page {
    /// Finds the page target showing `url` and attaches to it.
    fn attach(port: u16, url: &str) -> Page {
        Page {
            ws: Self::connect(port, url),
            next_id: 1,
            port,
            url: url.to_string(),
        }
    }

    fn connect(port: u16, url: &str) -> Client {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut ws_url = None;
        let found = wait_until(BOOT, || {
            // Chromium builds the debugger URL from this Host header.
            let resp = http_raw(
                addr,
                format!("GET /json/list HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
            );
            let (_, body) = parse_response(resp.as_bytes());
            let Ok(Value::Array(targets)) = serde_json::from_str::<Value>(&body) else {
                return false;
            };
            ws_url = targets.iter().find_map(|t| {
                (t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url)))
                    .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
                    .flatten()
            });
            ws_url.is_some()
        });
        assert!(found, "no DevTools page target for {url}");
        Client::connect(&ws_url.unwrap())
            .unwrap_or_else(|r| panic!("DevTools refused the WebSocket: {}", r.status))
    }

    /// Sends one DevTools command and returns its `result`. The commands
    /// used here only read the page, so when the DevTools connection itself
    /// fails (it did, once in a few dozen runs, on a loaded machine), the
    /// session is attached again and the command resent.
    fn call(&mut self, method: &str, params: Value) -> Value {
        for attempt in 1..=3 {
            match self.try_call(method, &params) {
                Ok(v) => return v,
                Err(e) if attempt < 3 => {
                    eprintln!("DevTools connection failed ({e}); attaching again");
                    self.ws = Self::connect(self.port, &self.url);
                }
                Err(e) => panic!("DevTools connection: {e}"),
            }
        }
        unreachable!()
    }

    fn try_call(&mut self, method: &str, params: &Value) -> Result<Value, tungstenite::Error> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.ws.ws.send(Message::Text(msg.to_string().into()))?;
        let until = Instant::now() + PAGE_T;
        while Instant::now() < until {
            match self.ws.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("DevTools JSON");
                    if v["id"] == id {
                        if let Some(e) = v.get("error") {
                            panic!("DevTools {method}: {e}");
                        }
                        return Ok(v["result"].clone());
                    }
                    // An event: not ours.
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        panic!("DevTools {method}: no answer within {PAGE_T:?}");
    }

    /// Evaluates a JavaScript expression in the page; returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expression` until `f` accepts its value; returns the last value.
    fn eval_until(
        &mut self,
        expression: &str,
        timeout: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let until = Instant::now() + timeout;
        loop {
            let v = self.eval(expression);
            if f(&v) || Instant::now() >= until {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn chromium_binary() -> Option<String> {
    let path = std::env::var("PUSHWIRE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    PathBuf::from(&path).exists().then_some(path)
}

const NOTICES: &str =
    "JSON.stringify(Array.from(document.querySelectorAll('li.notice'), e => e.textContent))";

fn notices(v: &Value) -> Vec<String> {
    v.as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// The notices' ids (`data-id`; null for a notice that came without one).
const IDS: &str =
    "JSON.stringify(Array.from(document.querySelectorAll('li.notice'), e => e.dataset.id || null))";

fn ids(v: &Value) -> Vec<Option<String>> {
    v.as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// The Chromium binary; None when it is missing and `PUSHWIRE_SKIP_BROWSER=1`.
fn chromium_or_skip() -> Option<String> {
    if let Some(binary) = chromium_binary() {
        return Some(binary);
    }
    if std::env::var("PUSHWIRE_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("SKIPPED: no chromium at /usr/bin/chromium and PUSHWIRE_SKIP_BROWSER=1");
        return None;
    }
    panic!(
        "headless Chromium is required for this test: install it (apt-get install -y chromium) \
         so that /usr/bin/chromium exists, point PUSHWIRE_CHROMIUM at it, or set \
         PUSHWIRE_SKIP_BROWSER=1 to skip the browser test"
    );
}

/// Waits until the page's connection is open.
fn wait_open(page: &mut Page) {
    let state = page.eval_until(
        "document.getElementById('status').dataset.state",
        BOOT,
        |v| v == "open",
    );
    assert_eq!(
        state,
        "open",
        "page status: {}",
        page.eval("document.getElementById('status').textContent")
    );
}

#[test]
fn demo_page_in_headless_chromium_shows_a_published_notice() {
    let _w = watchdog(150);
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    let node = Node::start(&["--dev"]);
    let url = format!("http://{}/?user=42", node.ws);
    let mut browser = Chromium::launch(&binary, &url);
    let port = browser.devtools_port();
    let mut page = Page::attach(port, &url);

    // The page's own WebSocket connects as user 42.
    wait_open(&mut page);
    assert!(node.wait_metric("pushwire_connections", PAGE_T, |v| v == 1.0));
    assert_eq!(
        page.eval("document.getElementById('user').textContent"),
        "42"
    );
    let curl = page.eval("document.getElementById('curl').textContent");
    assert_eq!(
        curl,
        r#"curl -X POST http://127.0.0.1:9090/publish -d '{"userId":"42","text":"hello"}'"#
    );
    assert_eq!(notices(&page.eval(NOTICES)), Vec::<String>::new());

    let n1 = r#"{"userId":"42","text":"hello from the browser test"}"#;
    let (status, body) = node.publish(n1);
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"receivers\":1"), "{body}");
    let shown = page.eval_until(NOTICES, PAGE_T, |v| !notices(v).is_empty());
    assert_eq!(notices(&shown), vec![n1.to_string()], "byte for byte, once");

    // Another user's notice is not shown; markup in a notice stays text.
    assert_eq!(node.publish(r#"{"userId":"7","text":"not for 42"}"#).0, 202);
    let n2 = r#"{"userId":42,"text":"<b>bold?</b> & <script>x</script>"}"#;
    assert_eq!(node.publish(n2).0, 202);
    let shown = page.eval_until(NOTICES, PAGE_T, |v| notices(v).len() >= 2);
    assert_eq!(notices(&shown), vec![n1.to_string(), n2.to_string()]);
    assert_eq!(
        page.eval("document.querySelectorAll('li.notice b, li.notice script').length"),
        0,
        "notice text is never parsed as HTML"
    );
    assert_eq!(
        page.eval("document.getElementById('count').textContent"),
        "2"
    );
    drop(page);
    drop(browser);
}

/// A `--dev` node on Redis, listening on `listen`, subscribed.
fn dev_node(redis: &Redis, listen: &str) -> Node {
    let url = redis.url();
    let node = Node::start(&[
        "--dev",
        "--redis",
        &url,
        "--canary-interval",
        "0.5",
        // Last one wins over Node::start's `--listen 127.0.0.1:0`.
        "--listen",
        listen,
    ]);
    assert!(node.wait_ready(PAGE_T), "node did not become ready");
    node
}

/// The page's client (/pushwire.js) keeps the last durable id it saw; when
/// the node it is connected to restarts, it comes back with `since=<that
/// id>` and is replayed what was published while it was away, then told
/// `{"recovered":true,"replayed":2}`.
#[test]
fn reconnect_with_recovery_in_chromium() {
    let _w = watchdog(200);
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    let redis = Redis::start();
    let mut node = dev_node(&redis, "127.0.0.1:0");
    let listen = node.ws.to_string();
    let url = format!("http://{listen}/?user=42");
    let mut browser = Chromium::launch(&binary, &url);
    let port = browser.devtools_port();
    let mut page = Page::attach(port, &url);
    wait_open(&mut page);
    assert!(node.wait_metric("pushwire_connections", PAGE_T, |v| v == 1.0));
    // Record every close code the client reports, to see the 1001 below.
    page.eval(
        "window.closeCodes = []; { const f = client.opts.onStatus; \
         client.opts.onStatus = (s, d) => { if (s === 'closed') closeCodes.push(d.code); f(s, d); }; } 0",
    );

    // With Redis, POST /publish is durable: it answers the id, and the page
    // shows the notice with that id.
    let n1 = r#"{"userId":"42","text":"before the restart"}"#;
    let (status, body) = node.publish(n1);
    assert_eq!(status, 202, "{body}");
    let id1 = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {body}"))
        .to_string();
    let shown = page.eval_until(NOTICES, PAGE_T, |v| !notices(v).is_empty());
    assert_eq!(notices(&shown), vec![n1.to_string()], "byte for byte, once");
    assert_eq!(ids(&page.eval(IDS)), vec![Some(id1.clone())]);
    assert_eq!(
        page.eval("document.getElementById('lastid').textContent"),
        id1.as_str()
    );
    assert_eq!(
        page.eval("document.getElementById('recovery').dataset.state"),
        "none",
        "a first connect (empty since) gets no status frame"
    );

    // The node shuts down: the page sees 1001 and retries with backoff
    // against a closed port.
    node.signal(libc::SIGTERM);
    let exit = node.wait_exit(PAGE_T);
    assert!(exit.is_some_and(|s| s.success()), "node exit: {exit:?}");
    let codes = page.eval_until("JSON.stringify(closeCodes)", PAGE_T, |v| v != "[]");
    assert!(
        codes.as_str().is_some_and(|c| c.starts_with("[1001")),
        "close codes seen by the page: {codes}"
    );

    // Two durable notices while no node is up, straight through Redis.
    let mut missed = Vec::new();
    for text in ["while down 1", "while down 2"] {
        let n = format!(r#"{{"userId":"42","text":"{text}"}}"#);
        let id = redis
            .cmd(&["FCALL", "pushwire_publish", "0", &n])
            .unwrap_or_else(|e| panic!("FCALL pushwire_publish: {e}"));
        missed.push((n, id.trim().to_string()));
    }
    assert_ne!(missed[0].1, missed[1].1);
    assert!(!page.eval(NOTICES).as_str().unwrap().contains("while down"));

    // A node again on the same address: the page reconnects with
    // since=<id1>, is replayed both, in order, then told recovered 2.
    let node = dev_node(&redis, &listen);
    let recovery = "JSON.stringify([document.getElementById('recovery').dataset.state, \
                    document.getElementById('recovery').dataset.replayed || null])";
    let rec = page.eval_until(recovery, Duration::from_secs(60), |v| {
        v.as_str().is_some_and(|s| s.contains("recovered"))
    });
    assert_eq!(
        rec,
        r#"["recovered","2"]"#,
        "recovery status; page status: {}",
        page.eval("document.getElementById('status').textContent")
    );
    let shown = page.eval_until(NOTICES, PAGE_T, |v| notices(v).len() >= 3);
    assert_eq!(
        notices(&shown),
        vec![n1.to_string(), missed[0].0.clone(), missed[1].0.clone()],
        "the missed notices, byte for byte, once each, in order"
    );
    assert_eq!(
        ids(&page.eval(IDS)),
        vec![
            Some(id1),
            Some(missed[0].1.clone()),
            Some(missed[1].1.clone())
        ]
    );
    assert_eq!(
        page.eval("document.getElementById('status').dataset.state"),
        "open"
    );
    assert_eq!(
        page.eval("document.getElementById('lastid').textContent"),
        missed[1].1.as_str()
    );
    assert_eq!(
        node.metric(r#"pushwire_recoveries_total{result="recovered"}"#),
        1.0
    );

    // Live notices follow the replay on the new connection.
    let n4 = r#"{"userId":"42","text":"after the restart"}"#;
    let (status, body) = node.publish(n4);
    assert_eq!(status, 202, "{body}");
    let shown = page.eval_until(NOTICES, PAGE_T, |v| notices(v).len() >= 4);
    assert_eq!(notices(&shown).len(), 4, "{shown}");
    assert_eq!(notices(&shown)[3], n4);
    assert_eq!(
        page.eval("document.getElementById('count').textContent"),
        "4"
    );
    drop(page);
    drop(browser);
}
