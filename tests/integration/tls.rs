//! `rediss://` (SPEC section 10): a redis-server with `--tls-port` and a CA
//! the test makes with openssl. Delivery works with the right CA (the CA
//! file flag or its variable), a wrong CA and a plain `redis://` to the TLS
//! port fail clearly (logged, counted, `/readyz` says why), mutual TLS
//! works, and the `insecure` opt-out is called insecure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and localhost, a client
/// certificate, and an unrelated CA: PEM files in a directory of the test.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn make() -> Pki {
        let dir = TempDir::new("tls");
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=pushwire test {ca}"),
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                ],
            );
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for leaf in ["server", "client"] {
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    &format!("/CN={leaf}"),
                    "-keyout",
                    &format!("{leaf}.key"),
                    "-out",
                    &format!("{leaf}.csr"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{leaf}.csr"),
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{leaf}.ext"),
                    "-out",
                    &format!("{leaf}.crt"),
                ],
            );
        }
        Pki { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn path(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }
}

/// A redis-server listening with TLS only, killed on drop.
struct TlsRedis {
    port: u16,
    ca: String,
    child: Child,
}

impl TlsRedis {
    fn start(pki: &Pki, client_certs: bool) -> TlsRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-cert-file",
                &pki.path("server.crt"),
                "--tls-key-file",
                &pki.path("server.key"),
                "--tls-ca-cert-file",
                &pki.path("ca.crt"),
                "--tls-auth-clients",
                if client_certs { "yes" } else { "no" },
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        let r = TlsRedis {
            port,
            ca: pki.path("ca.crt"),
            child,
        };
        let (cert, key) = (pki.path("client.crt"), pki.path("client.key"));
        assert!(
            wait_until(Duration::from_secs(10), || r
                .cli(&["--cert", &cert, "--key", &key, "PING"])
                .contains("PONG")),
            "redis-server with TLS did not start (built without TLS?)"
        );
        r
    }

    /// redis-cli over TLS (with the client certificate, which a server
    /// that does not ask for one ignores).
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--tls", "--cacert", &self.ca])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        out
    }

    fn publish(&self, pki: &Pki, notice: &str) -> String {
        let (cert, key) = (pki.path("client.crt"), pki.path("client.key"));
        self.cli(&["--cert", &cert, "--key", &key, "PUBLISH", CHANNEL, notice])
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
    let mut args = vec![
        "--redis",
        url,
        "--jwt-secret",
        SECRET,
        "--canary-interval",
        "0.5",
    ];
    args.extend_from_slice(extra);
    Node::start_env(&args, env)
}

/// Delivery through the TLS link: a PUBLISH over TLS and POST /publish.
fn delivers(redis: &TlsRedis, pki: &Pki, node: &Node) {
    let mut c = node.connect("42");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 1.0));
    let n1 = r#"{"userId":"42","text":"over tls"}"#;
    assert_eq!(redis.publish(pki, n1).trim(), "1");
    assert_eq!(c.recv_text(T).as_deref(), Some(n1));
    let n2 = r#"{"userId":"42","text":"post over tls"}"#;
    let (st, body) = node.publish(n2);
    assert_eq!(st, 202, "{body}");
    assert_eq!(c.recv_text(T).as_deref(), Some(n2));
}

/// Not ready, with `needle` in /readyz, the log, and the failure counted.
fn refused_clearly(node: &Node, needle: &str) {
    assert!(
        wait_until(T, || node.admin_get("/readyz").1.contains(needle)),
        "/readyz says {needle:?}: {:?}",
        node.admin_get("/readyz")
    );
    assert_eq!(node.admin_get("/readyz").0, 503);
    assert!(
        wait_until(T, || node.log_contains(needle)),
        "the log says {needle:?}"
    );
    assert_eq!(node.metric("pushwire_redis_connected"), 0.0);
    let failures = node.metric("pushwire_redis_connect_failures_total");
    assert!(failures >= 1.0);
    // At most one line per attempt (one per backoff step).
    let lines = node
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("cannot connect to Redis"))
        .count();
    assert!(
        lines as f64 <= node.metric("pushwire_redis_connect_failures_total"),
        "{lines} lines for {failures} failures"
    );
    let (st, body) = node.publish(r#"{"userId":"42","text":"x"}"#);
    assert_eq!(st, 503, "POST /publish while not ready: {body}");
}

#[test]
fn tls_with_the_right_ca_delivers() {
    let _w = watchdog(40);
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, false);
    // The CA through its variable.
    let ca = pki.path("ca.crt");
    let n = node(&redis.url(), &[], &[("PUSHWIRE_REDIS_CA_FILE", &ca)]);
    assert!(n.wait_ready(Duration::from_secs(10)), "ready over TLS");
    delivers(&redis, &pki, &n);
}

#[test]
fn tls_with_a_wrong_ca_fails_clearly() {
    let _w = watchdog(40);
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, false);
    let other = pki.path("other-ca.crt");
    let n = node(&redis.url(), &["--redis-ca-file", &other], &[]);
    refused_clearly(&n, "certificate");
    // Against the system roots, a private CA is refused too.
    let n = node(&redis.url(), &[], &[]);
    refused_clearly(&n, "certificate");
}

#[test]
fn plain_redis_url_to_the_tls_port_fails_clearly() {
    let _w = watchdog(40);
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, false);
    let n = node(&format!("redis://127.0.0.1:{}", redis.port), &[], &[]);
    refused_clearly(&n, "rediss://");
}

#[test]
fn mutual_tls_works_and_is_needed() {
    let _w = watchdog(40);
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, true);
    let (ca, cert, key) = (
        pki.path("ca.crt"),
        pki.path("client.crt"),
        pki.path("client.key"),
    );
    let n = node(
        &redis.url(),
        &[
            "--redis-ca-file",
            &ca,
            "--redis-cert-file",
            &cert,
            "--redis-key-file",
            &key,
        ],
        &[],
    );
    assert!(
        n.wait_ready(Duration::from_secs(10)),
        "ready with mutual TLS"
    );
    delivers(&redis, &pki, &n);
    // Without the client certificate the server refuses the handshake.
    let n = node(&redis.url(), &["--redis-ca-file", &ca], &[]);
    refused_clearly(&n, "TLS");
}

#[test]
fn the_insecure_opt_out_is_explicit_and_called_insecure() {
    let _w = watchdog(40);
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("INSECURE"), "{help}");
    assert!(help.contains("--redis-ca-file"), "{help}");
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, false);
    let n = node(&format!("{}?insecure=true", redis.url()), &[], &[]);
    assert!(
        n.wait_ready(Duration::from_secs(10)),
        "ready without verification"
    );
    assert!(n.log_contains("NOT verified"), "the start warns");
    delivers(&redis, &pki, &n);
    // A CA file and insecure=true exclude each other: refused at start.
    let ca = pki.path("ca.crt");
    let url = format!("{}?insecure=true", redis.url());
    let out = Command::new(BIN)
        .args([
            "--redis",
            &url,
            "--redis-ca-file",
            &ca,
            "--jwt-secret",
            SECRET,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exclude each other"));
}
