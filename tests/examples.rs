//! The PHP examples of `docs/examples/php/`, run as a reader would run them: php-cli (phpredis,
//! predis) against the real daemon on ephemeral ports, and the login/logout pages under PHP's
//! built-in web server. Each test checks what the example's comment promises.
//!
//! Needs php-cli, php-redis and php-predis (scripts/test installs them with apt-get).

#[path = "common/mod.rs"]
mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/php")
}

fn require_php(modules: &[(&str, &str)]) {
    let out = Command::new("php").arg("-m").output();
    let mods = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).to_lowercase(),
        _ => panic!("`php` is missing: install php-cli (scripts/test does)"),
    };
    for (module, package) in modules {
        assert!(
            mods.lines().any(|l| l.trim() == *module),
            "the PHP module {module} is missing: install {package} (scripts/test does)"
        );
    }
}

fn require_predis() {
    let ok = Command::new("php")
        .args(["-r", "exit((@include 'Predis/Autoloader.php') ? 0 : 1);"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "predis is missing: install php-predis (scripts/test does)");
}

/// `--host= --port= --token=` for `d`'s control socket.
fn conn_args(d: &Daemon) -> Vec<String> {
    vec![
        "--host=127.0.0.1".into(),
        format!("--port={}", d.control.port()),
        format!("--token={TOKEN}"),
    ]
}

fn php_cmd(script: &str) -> Command {
    let mut c = Command::new("php");
    c.arg(examples_dir().join(script));
    // The examples must not pick up settings from the environment of whoever runs the tests.
    for k in ["COMET_HOST", "COMET_PORT", "COMET_TOKEN", "COMET_KEY_SECRET"] {
        c.env_remove(k);
    }
    c.stdin(Stdio::null());
    c
}

/// Runs a command to completion within `timeout`.
fn run(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn php");
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "{cmd:?} still running after {timeout:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(ms(20));
    }
    child.wait_with_output().expect("wait_with_output")
}

fn ok_stdout(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn hold(d: &Daemon, target: &str, headers: &[(&str, &str)]) -> Http {
    let mut c = d.browser();
    c.send(&get(target, headers));
    c
}

// ---------------------------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------------------------

#[test]
fn publish_with_phpredis_reaches_a_held_poll() {
    require_php(&[("redis", "php-redis")]);
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/goods", &[]);
    d.wait_held(1);
    let mut cmd = php_cmd("publish-phpredis.php");
    cmd.args(conn_args(&d)).args(["goods", "price é 42"]);
    assert_eq!(ok_stdout(&run(cmd, Duration::from_secs(10)), "publish-phpredis.php").trim(), "1");
    let r = poll.response();
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.text(), "price é 42");
    assert_eq!(r.must("X-Comet-Channel"), "goods");

    // Settings from the environment instead of argv; no MESSAGE: a JSON object.
    let mut cmd = php_cmd("publish-phpredis.php");
    cmd.env("COMET_PORT", d.control.port().to_string()).env("COMET_TOKEN", TOKEN).arg("goods");
    assert_eq!(ok_stdout(&run(cmd, Duration::from_secs(10)), "publish-phpredis.php (env)").trim(), "0");
    let (lm, etag) = r.cursor();
    let r2 = d.browser().request(&get("/sub/goods", &[("If-Modified-Since", &lm), ("If-None-Match", &etag)]));
    assert_eq!(r2.status, 200, "{r2}");
    assert!(r2.text().starts_with("{\"price\":42"), "JSON body: {}", r2.text());

    // A refused command is an error exit with comet's reason.
    let mut cmd = php_cmd("publish-phpredis.php");
    cmd.args(conn_args(&d)).args(["bad id", "x"]);
    let out = run(cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid channel id"));

    // A wrong token.
    let mut cmd = php_cmd("publish-phpredis.php");
    cmd.args([format!("--port={}", d.control.port()), "--token=wrong-token".into()]).args(["goods", "x"]);
    assert_eq!(run(cmd, Duration::from_secs(10)).status.code(), Some(1), "a wrong token must fail");
}

#[test]
fn publish_with_predis_reaches_a_held_poll() {
    require_php(&[]);
    require_predis();
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/room:7", &[]);
    d.wait_held(1);
    let mut cmd = php_cmd("publish-predis.php");
    cmd.args(conn_args(&d)).args(["room:7", "from predis"]);
    assert_eq!(ok_stdout(&run(cmd, Duration::from_secs(10)), "publish-predis.php").trim(), "1");
    let r = poll.response();
    assert_eq!((r.status, r.text().as_str()), (200, "from predis"), "{r}");

    let mut cmd = php_cmd("publish-predis.php");
    cmd.args(conn_args(&d)).args(["bad id", "x"]);
    let out = run(cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid channel id"));
}

// ---------------------------------------------------------------------------------------------
// Login and logout under PHP's built-in web server
// ---------------------------------------------------------------------------------------------

/// `php -S` serving `docs/examples/php`, killed on drop.
struct PhpServer {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl PhpServer {
    fn start(d: &Daemon) -> PhpServer {
        let dir = temp_dir();
        // A free port: bind, read it, let go (php -S cannot report an ephemeral port).
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("php")
            .arg("-d")
            .arg(format!("session.save_path={}", dir.display()))
            .args(["-S", &addr.to_string(), "-t"])
            .arg(examples_dir())
            .env("COMET_HOST", "127.0.0.1")
            .env("COMET_PORT", d.control.port().to_string())
            .env("COMET_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn php -S");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "php -S did not listen on {addr} within 10 s");
            thread::sleep(ms(50));
        }
        PhpServer { child, addr, dir }
    }

    /// One request with `Connection: close`; the answer read to EOF (php -S sends no
    /// Content-Length): (status, head, body).
    fn request(&self, method: &str, path: &str, cookie: Option<&str>, body: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(self.addr).expect("connect php -S");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n");
        if let Some(c) = cookie {
            req.push_str(&format!("Cookie: PHPSESSID={c}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).expect("read php -S answer");
        let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, head.to_string(), body.to_string())
    }
}

impl Drop for PhpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of the last `Set-Cookie: PHPSESSID=...` in `head` (session_regenerate_id may send
/// two; the last wins in a browser).
fn session_cookie(head: &str) -> Option<String> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("set-cookie"))
        .filter_map(|(_, v)| v.trim().strip_prefix("PHPSESSID="))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
        .last()
}

#[test]
fn login_opens_and_logout_closes_the_private_stream() {
    require_php(&[("redis", "php-redis"), ("session", "php-cli")]);
    let d = Daemon::start();
    let site = PhpServer::start(&d);

    let (status, _, _) = site.request("GET", "/login.php", None, "");
    assert_eq!(status, 405, "login is a POST");
    let (status, _, body) = site.request("POST", "/login.php", None, "user=no%20spaces");
    assert_eq!(status, 400, "a bad name: {body}");

    // Login with a planted session id: PHP must hand out a new one (and open that one).
    let (status, head, body) = site.request("POST", "/login.php", Some("planted1"), "user=alice");
    assert_eq!(status, 200, "login: {head}\n{body}");
    assert_eq!(body.trim(), r#"{"user":"alice"}"#);
    let sid = session_cookie(&head).unwrap_or_else(|| panic!("no PHPSESSID cookie in:\n{head}"));
    assert_ne!(sid, "planted1", "the session id must change at login");
    let cookie = format!("PHPSESSID={sid}");
    let planted = d.browser().request(&get("/sub/@me", &[("Cookie", "PHPSESSID=planted1")]));
    assert_eq!(planted.status, 403, "the planted id has no stream:\n{planted}");

    // The session's private stream is open, and named after the user in presence.
    let mut poll = hold(&d, "/sub/@me", &[("Cookie", &cookie)]);
    poll.expect_nothing(ms(300));
    assert_eq!(d.publish(&format!("session:{sid}"), "for alice"), 1);
    let r = poll.response();
    assert_eq!((r.status, r.text().as_str()), (200, "for alice"), "{r}");
    assert_eq!(r.must("X-Comet-Channel"), format!("session:{sid}"));
    let online = d.backend().cmd(&["ONLINE"]).to_string();
    assert!(online.contains(&format!("${sid}, $alice")), "ONLINE names alice: {online}");

    // Logout answers the held poll with 410, and the id is refused afterwards.
    let (lm, etag) = r.cursor();
    poll.send(&get("/sub/@me", &[("Cookie", &cookie), ("If-Modified-Since", &lm), ("If-None-Match", &etag)]));
    d.wait_held(1);
    let (status, head, body) = site.request("POST", "/logout.php", Some(&sid), "");
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#), "logout: {head}");
    assert!(head.contains("PHPSESSID=deleted") || head.contains("PHPSESSID=;"), "logout clears the cookie:\n{head}");
    assert_eq!(poll.response().status, 410, "the held poll ends with 410");
    let after = d.browser().request(&get("/sub/@me", &[("Cookie", &cookie)]));
    assert_eq!(after.status, 403, "after logout:\n{after}");
    let (_, _, body) = site.request("POST", "/logout.php", Some(&sid), "");
    assert_eq!(body.trim(), r#"{"closed":0}"#, "a second logout closes nothing");
}

// ---------------------------------------------------------------------------------------------
// Signed keys
// ---------------------------------------------------------------------------------------------

const KEY_SECRET: &str = "0123456789abcdef-key-secret";

#[test]
fn signed_keys_from_sign_and_from_php_open_a_channel() {
    require_php(&[("redis", "php-redis")]);
    let d = Daemon::start_with(
        &Config::default().set("auth", "mode", "\"key\"").set("auth", "key_secret", &format!("\"{KEY_SECRET}\"")),
    );
    let sid = "sidSigned1";
    let mut cmd = php_cmd("sign.php");
    cmd.args(conn_args(&d)).arg(format!("--key-secret={KEY_SECRET}")).args(["goods", sid, "60"]);
    let out = ok_stdout(&run(cmd, Duration::from_secs(10)), "sign.php");
    let query = |label: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"))
            .trim()
            .to_string()
    };
    let (signed, hmac) = (query("sign:"), query("hmac:"));
    for q in [&signed, &hmac] {
        assert!(q.starts_with("key=") && q.contains("&expires="), "a query string: {q}");
        let exp: u64 = q.split("expires=").nth(1).unwrap().parse().unwrap();
        assert!(exp >= now_unix() + 55 && exp <= now_unix() + 61, "expires in 60 s: {q}");
    }

    let cookie = format!("PHPSESSID={sid}");
    // mode "key": no key, no entry.
    let r = d.browser().request(&get("/sub/goods", &[("Cookie", &cookie)]));
    assert_eq!(r.status, 403, "without a key:\n{r}");
    // Each key opens the channel for this session (the second poll goes on after the first
    // message, so that it is held too).
    let mut cursor = String::new();
    for q in [&signed, &hmac] {
        let mut poll = hold(&d, &format!("/sub/goods?{q}{cursor}"), &[("Cookie", &cookie)]);
        poll.expect_nothing(ms(200));
        assert_eq!(d.publish("goods", "signed"), 1, "the poll with {q} is held");
        let r = poll.response();
        assert_eq!(r.status, 200, "{r}");
        let (time, tag) = r.message_id();
        cursor = format!("&last_event_id={time}:{tag}");
        // ... and for this session only.
        let other = d.browser().request(&get(&format!("/sub/goods?{q}"), &[("Cookie", "PHPSESSID=someoneElse")]));
        assert_eq!(other.status, 403, "another session with {q}:\n{other}");
    }
}

// ---------------------------------------------------------------------------------------------
// The presence worker
// ---------------------------------------------------------------------------------------------

/// The newest message buffered on `channel` (a poll without a cursor gets the oldest, so walk).
fn newest(d: &Daemon, channel: &str) -> Option<String> {
    let mut c = d.browser();
    let mut r = c.request(&get(&format!("/sub/{channel}"), &[]));
    if r.status != 200 {
        return None;
    }
    loop {
        let (lm, etag) = r.cursor();
        c.send(&get(&format!("/sub/{channel}"), &[("If-Modified-Since", &lm), ("If-None-Match", &etag)]));
        c.set_timeout(ms(300));
        match c.try_response() {
            Ok(next) if next.status == 200 => r = next,
            _ => return Some(r.text()),
        }
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        thread::sleep(ms(50));
    }
}

#[test]
fn presence_worker_keeps_state_and_publishes_who_is_online() {
    require_php(&[("redis", "php-redis"), ("json", "php-cli")]);
    let d = Daemon::start_with(&Config::default().set("presence", "grace_secs", "1"));
    let state = d.dir().join("online.json");
    let mut worker = php_cmd("presence-worker.php")
        .args(conn_args(&d))
        .arg(format!("--state={}", state.display()))
        .args(["--publish=goods", "--max-events=4", "--idle-timeout=15"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn presence-worker.php");

    // Started: it subscribed, wrote its state and published the (empty) list.
    wait_for("the worker's SUBSCRIBE", Duration::from_secs(10), || {
        let r = d.backend().cmd(&["PUBSUB", "NUMSUB", "__presence__"]).to_string();
        (r == "*2[$__presence__, :1]").then_some(())
    });
    let first = wait_for("presence:goods", Duration::from_secs(5), || newest(&d, "presence:goods"));
    assert!(first.contains(r#""users":[]"#), "nobody at start: {first}");

    // alice polls goods: online, join; the state file and presence:goods name her.
    assert_eq!(d.backend().cmd(&["SESSION.OPEN", "sidAlice", "alice"]).to_string(), "+OK");
    let mut poll = hold(&d, "/sub/goods?last_event_id=1:0", &[("Cookie", "PHPSESSID=sidAlice")]);
    wait_for("alice in the state file", Duration::from_secs(5), || {
        let s = std::fs::read_to_string(&state).ok()?;
        (s.contains(r#""sidAlice": "alice""#) && s.contains(r#""goods": {"#)).then_some(())
    });
    let list = wait_for("alice on presence:goods", Duration::from_secs(5), || {
        newest(&d, "presence:goods").filter(|m| m.contains(r#""users":["alice"]"#))
    });
    assert!(list.contains(r#""sessions":1"#), "{list}");

    // Her poll ends and she does not come back: leave, offline after the grace.
    d.publish("goods", "bye");
    assert_eq!(poll.response().status, 200);
    drop(poll);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = worker.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            let out = worker.wait_with_output().unwrap();
            panic!(
                "the worker did not exit after 4 events; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(ms(50));
    };
    let out = worker.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(status.success(), "worker exit {status}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        events,
        ["online sidAlice alice", "join sidAlice goods", "leave sidAlice goods", "offline sidAlice"],
        "events in order"
    );
    let s = std::fs::read_to_string(&state).unwrap();
    assert!(!s.contains("sidAlice"), "alice gone from the state:\n{s}");
    let last = newest(&d, "presence:goods").unwrap();
    assert!(last.contains(r#""users":[]"#), "nobody left on presence:goods: {last}");
}

#[test]
fn presence_worker_exits_after_its_idle_timeout() {
    require_php(&[("redis", "php-redis")]);
    let d = Daemon::start();
    let mut cmd = php_cmd("presence-worker.php");
    cmd.args(conn_args(&d)).arg("--idle-timeout=1");
    let t = Instant::now();
    let out = run(cmd, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(3), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() >= ms(900), "it waited for events first");
}
