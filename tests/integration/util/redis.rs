//! A redis-server of the test's own, on a free port, and ways to publish
//! to it: one exact message, any URL (credentials, a db), or a pipelined
//! burst.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_until, CHANNEL, T};

/// A redis-server of the test's own, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    /// Its own `--dir`: a replica writes the RDB it syncs there (the
    /// working directory by default), and every later redis-server started
    /// in the same place would load it. Removed on drop.
    dir: std::path::PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// With extra `redis-server` arguments (kept for [`Redis::restart`]).
    pub fn start_with(extra: &[&str]) -> Redis {
        let port = free_port();
        let mut r = Redis {
            port,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: std::env::temp_dir()
                .join(format!("pushwire-test-redis-{}-{port}", std::process::id())),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("a directory for redis-server");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self.ping()),
            "redis-server did not start on port {}",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn ping(&self) -> bool {
        self.cmd(&["PING"]).is_ok_and(|r| r.contains("PONG"))
    }

    /// Runs a command through redis-cli; returns its output.
    pub fn cmd(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success()
            && !text.starts_with("Could not connect")
            && !text.starts_with("ERR")
        {
            Ok(text)
        } else {
            Err(text + &String::from_utf8_lossy(&out.stderr))
        }
    }

    /// PUBLISH through the redis crate (exact bytes); returns the receiver count.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        publish_url(&self.url(), channel, payload)
    }

    /// A connection of the redis crate, for pipelined bursts.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(T)
            .unwrap()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signals the child we started.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PUBLISH through the redis crate on any URL (with credentials, a db).
pub fn publish_url(url: &str, channel: &str, payload: &[u8]) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_connection_with_timeout(T).unwrap();
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query(&mut c)
        .unwrap()
}

/// PUBLISHes every payload on [`CHANNEL`] over one pipelined connection,
/// in batches of 5000.
pub fn publish_burst(con: &mut redis::Connection, payloads: impl IntoIterator<Item = Vec<u8>>) {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for p in payloads {
        pipe.cmd("PUBLISH").arg(CHANNEL).arg(p).ignore();
        n += 1;
        if n == 5000 {
            pipe.query::<()>(con).unwrap();
            pipe = redis::pipe();
            n = 0;
        }
    }
    if n > 0 {
        pipe.query::<()>(con).unwrap();
    }
}
