//! The README's "Make a token" examples, run as written. Each fenced block
//! after a `<!-- token-example: LANG -->` line is taken out of README.md,
//! pointed at a key file made the README's way (`head -c 32 /dev/urandom |
//! base64`), and run; the token it prints must open a WebSocket on a node
//! started with `--jwt-secret-file`, as user 42.
//!
//! Python (with PyJWT) and the shell form (with openssl) must run: their
//! absence fails the test (`tests/run` installs them). Node and Java run
//! where `node`/`npm` and `java` are present, and are skipped with a line
//! saying so otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

use crate::util::*;

/// The key file the README's examples read; the test points them at its own.
const README_KEY_PATH: &str = "/etc/pushwire/jwt-secret";
const T: Duration = Duration::from_secs(5);

/// The body of the fenced block that follows `<!-- token-example: LANG -->`.
fn example(lang: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let marker = format!("<!-- token-example: {lang} -->");
    let mut lines = readme.lines().skip_while(|l| l.trim() != marker).skip(1);
    let fence = lines
        .next()
        .unwrap_or_else(|| panic!("README.md has no {marker} followed by a fenced block"));
    assert!(
        fence.starts_with("```"),
        "{marker} must be followed by a fence, not {fence:?}"
    );
    let body: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    let body = body.join("\n") + "\n";
    assert!(
        body.contains(README_KEY_PATH),
        "the {lang} example must read {README_KEY_PATH}"
    );
    body
}

/// A directory with `jwt-secret` made as the README makes it.
fn key_dir(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let status = Command::new("sh")
        .args(["-c", "head -c 32 /dev/urandom | base64 > jwt-secret"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let key = dir.join("jwt-secret");
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(
        text.ends_with('\n') && text.trim_end().len() == 44,
        "{text:?}"
    );
    (dir, key)
}

/// Runs `cmd` to its end, killing it after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("killing pid {pid} after {limit:?}");
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    out
}

/// The token a program printed, or the test fails with its output.
fn token_from(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !stdout.is_empty(),
        "the README's {what} example failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The token opens a WebSocket as user 42 (by query and by header), and
/// carries an `exp` in the next day.
fn assert_accepted_as_42(key: &Path, token: &str) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a compact JWT: {token:?}");
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "HS256", "{header}");
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["sub"], "42", "{claims}");
    let exp = claims["exp"].as_u64().expect("the example sets exp");
    let now = unix_now();
    assert!(exp > now && exp <= now + 86_400, "exp {exp}, now {now}");

    let node = Node::start(&["--jwt-secret-file", key.to_str().unwrap()]);
    let mut by_query = Client::connect(&node.url(&format!("/ws?token={token}")))
        .unwrap_or_else(|r| panic!("upgrade with ?token= refused: {}", r.status));
    let bearer = format!("Bearer {token}");
    let mut by_header = Client::connect_with(&node.url("/ws"), &[("Authorization", &bearer)])
        .unwrap_or_else(|r| panic!("upgrade with Authorization refused: {}", r.status));
    assert!(node.wait_metric("pushwire_users", T, |v| v == 1.0));
    assert_eq!(
        node.publish(r#"{"userId":"7","text":"not yours"}"#),
        (202, "{\"receivers\":0}\n".into())
    );
    let notice = r#"{"userId":42,"text":"yours"}"#;
    assert_eq!(node.publish(notice), (202, "{\"receivers\":2}\n".into()));
    assert_eq!(by_query.recv_text(T).as_deref(), Some(notice));
    assert_eq!(by_header.recv_text(T).as_deref(), Some(notice));
}

/// Writes the example into `dir` with the key path replaced.
fn write_example(lang: &str, dir: &TempDir, file: &str, key: &Path) -> PathBuf {
    let code = example(lang).replace(README_KEY_PATH, key.to_str().unwrap());
    let path = dir.join(file);
    std::fs::write(&path, code).unwrap();
    path
}

/// The first `python3` that can import PyJWT: the one on PATH, else the
/// system's (Debian's python3-jwt is for /usr/bin/python3).
fn python_with_pyjwt() -> Option<String> {
    ["python3", "/usr/bin/python3"].into_iter().find_map(|py| {
        Command::new(py)
            .args(["-c", "import jwt"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            .then(|| py.to_string())
    })
}

#[test]
fn readme_python_example_mints_a_token_the_server_takes_as_user_42() {
    let _w = watchdog(60);
    let python = python_with_pyjwt().unwrap_or_else(|| {
        panic!(
            "python3 with PyJWT is required for this test: run tests/run (it installs \
             it), or python3 -m pip install pyjwt (Debian: apt-get install python3-jwt)"
        )
    });
    let (dir, key) = key_dir("token-python");
    let script = write_example("python", &dir, "mint.py", &key);
    let out = run(Command::new(&python).arg(&script), Duration::from_secs(30));
    assert_accepted_as_42(&key, &token_from("Python", out));
}

#[test]
fn readme_shell_example_mints_a_token_the_server_takes_as_user_42() {
    let _w = watchdog(60);
    assert!(
        Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "openssl is required for this test: run tests/run (it installs it), or apt-get install openssl"
    );
    let (dir, key) = key_dir("token-sh");
    let script = write_example("sh", &dir, "mint.sh", &key);
    // POSIX sh as the README says (dash on Debian), not bash.
    let out = run(Command::new("sh").arg(&script), Duration::from_secs(30));
    assert_accepted_as_42(&key, &token_from("shell", out));
}

/// `jsonwebtoken`, installed once per target dir from the npm registry.
fn node_modules() -> Result<PathBuf, String> {
    let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("npm-jsonwebtoken");
    let modules = prefix.join("node_modules");
    if modules.join("jsonwebtoken").join("package.json").exists() {
        return Ok(modules);
    }
    std::fs::create_dir_all(&prefix).map_err(|e| e.to_string())?;
    let out = run(
        Command::new("npm").args([
            "install",
            "--prefix",
            prefix.to_str().unwrap(),
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "jsonwebtoken@9",
        ]),
        Duration::from_secs(90),
    );
    if !out.status.success() || !modules.join("jsonwebtoken").exists() {
        return Err(format!(
            "npm install jsonwebtoken failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(modules)
}

fn present(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn readme_node_example_mints_a_token_the_server_takes_as_user_42() {
    let _w = watchdog(150);
    if !present("node") || !present("npm") {
        eprintln!(
            "SKIPPED: node and npm are not both installed; the README's Node example was not run"
        );
        return;
    }
    let modules = match node_modules() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: {e}; the README's Node example was not run");
            return;
        }
    };
    let (dir, key) = key_dir("token-node");
    let script = write_example("node", &dir, "mint.js", &key);
    let out = run(
        Command::new("node").arg(&script).env("NODE_PATH", &modules),
        Duration::from_secs(30),
    );
    assert_accepted_as_42(&key, &token_from("Node", out));
}

#[test]
fn readme_java_example_mints_a_token_the_server_takes_as_user_42() {
    let _w = watchdog(150);
    if !present("java") {
        eprintln!("SKIPPED: no java on PATH; the README's Java example was not run");
        return;
    }
    let (dir, key) = key_dir("token-java");
    let source = write_example("java", &dir, "PushwireToken.java", &key);
    // Source-file mode (JDK 11+), as the README runs it.
    let out = run(
        Command::new("java").arg(&source).current_dir(dir.path()),
        Duration::from_secs(120),
    );
    assert_accepted_as_42(&key, &token_from("Java", out));
}

/// The README's warning: the key is the file's text, so a token signed with
/// the base64-decoded bytes is refused, and one signed with the text
/// including its newline too.
#[test]
fn the_key_is_the_files_text_not_its_decoded_bytes() {
    let _w = watchdog(30);
    let (_dir, key) = key_dir("token-decoded");
    let text = std::fs::read_to_string(&key).unwrap();
    let decoded = STANDARD.decode(text.trim_end()).unwrap();
    assert_eq!(decoded.len(), 32);
    let node = Node::start(&["--jwt-secret-file", key.to_str().unwrap()]);
    let sign = |k: &[u8]| pushwire::auth::sign_hs256(&serde_json::json!({"sub": "42"}), k);
    let status = |t: String| match Client::connect(&node.url(&format!("/ws?token={t}"))) {
        Ok(_) => 101,
        Err(r) => r.status,
    };
    assert_eq!(status(sign(&decoded)), 401, "decoded bytes");
    assert_eq!(status(sign(text.as_bytes())), 401, "text with its newline");
    assert_eq!(status(sign(text.trim_end().as_bytes())), 101, "the text");
}
