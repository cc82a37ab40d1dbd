//! Helpers for the integration tests: start the real `comet` binary on ephemeral ports, and talk
//! to it with tiny std-only clients (raw HTTP/1.1 over a `TcpStream`, raw RESP2).
//!
//! Every test starts its own daemon from its own config file in its own temp dir, with every
//! listener on `127.0.0.1:0`; the daemon reports the bound ports on its `ready` log line, which
//! [`Daemon::start_with`] waits for. So tests run in parallel without sharing anything.
//!
//! The clients are deliberately dumb: they send exactly the bytes a test writes and parse one
//! reply at a time, so tests can assert on exact statuses, headers and bytes, pipeline, send
//! garbage, or check that the daemon closed the connection.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The secret of the `php` token in [`CONFIG`] (the daemon wants at least 8 characters).
pub const TOKEN: &str = "s3cret-token";

/// How long a client waits for an answer it expects (a held poll is answered well before).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The base config every test starts from; tests override single keys with [`Config::set`].
pub const CONFIG: &str = r#"[log]
level = "debug"
[browser]
listen = "127.0.0.1:0"
session_cookie = "PHPSESSID"
poll_timeout_secs = 2
allowed_origins = ["http://site.test"]
first_message = "oldest"
[control]
listen = "127.0.0.1:0"
[control.tokens]
php = "s3cret-token"
[admin]
listen = "127.0.0.1:0"
[channels]
buffer_length = 100
message_ttl_secs = 3600
[limits]
max_head_bytes = 8192
max_message_bytes = 1048576
max_channel_id_bytes = 128
"#;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

// ---------------------------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------------------------

/// A TOML config kept as sections of lines, so a test can change one key and keep the rest.
#[derive(Clone, Debug)]
pub struct Config {
    /// `(section header without brackets, lines of the section)`; the first has header "".
    sections: Vec<(String, Vec<String>)>,
}

impl Default for Config {
    fn default() -> Self {
        Config::parse(CONFIG)
    }
}

impl Config {
    pub fn parse(text: &str) -> Config {
        let mut sections = vec![(String::new(), Vec::new())];
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('[') && t.ends_with(']') {
                sections.push((t[1..t.len() - 1].trim().to_string(), Vec::new()));
            } else if !t.is_empty() {
                sections.last_mut().unwrap().1.push(line.to_string());
            }
        }
        Config { sections }
    }

    /// Sets `key = value` (value written as raw TOML) in `[section]`, adding either if missing.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Config {
        let line = format!("{key} = {value}");
        let idx = match self.sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let lines = &mut self.sections[idx].1;
        match lines.iter().position(|l| line_key(l) == Some(key)) {
            Some(i) => lines[i] = line,
            None => lines.push(line),
        }
        self
    }

    /// Removes `key` from `[section]`.
    pub fn unset(mut self, section: &str, key: &str) -> Config {
        if let Some((_, lines)) = self.sections.iter_mut().find(|(s, _)| s == section) {
            lines.retain(|l| line_key(l) != Some(key));
        }
        self
    }

    /// Removes a whole `[section]`.
    pub fn remove_section(mut self, section: &str) -> Config {
        self.sections.retain(|(s, _)| s != section);
        self
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        for (header, lines) in &self.sections {
            if !header.is_empty() {
                out.push_str(&format!("[{header}]\n"));
            }
            for l in lines {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

fn line_key(line: &str) -> Option<&str> {
    let (k, _) = line.split_once('=')?;
    Some(k.trim())
}

/// A fresh directory under the system temp dir, unique per process and call.
pub fn temp_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("comet-test-{}-{}", std::process::id(), n));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// xorshift64*: a small, fast, deterministic generator for the property and flood tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        r.next();
        r
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A temp dir of a test's own, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        Scratch(temp_dir())
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `config` as `server.toml` in a fresh temp dir; returns (dir, path).
pub fn write_config(config: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir();
    let path = dir.join("server.toml");
    std::fs::write(&path, config).expect("write config");
    (dir, path)
}

pub fn comet_bin() -> &'static str {
    env!("CARGO_BIN_EXE_comet")
}

/// Runs `comet <args>` to completion (killed after `timeout`), returning its output.
pub fn run_comet(args: &[&std::ffi::OsStr], timeout: Duration) -> Output {
    let mut child = Command::new(comet_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn comet");
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => break,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "comet {:?} still running after {:?}; killed. stderr:\n{}",
                    args,
                    timeout,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => thread::sleep(ms(20)),
        }
    }
    child.wait_with_output().expect("wait_with_output")
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// A running `comet`, killed and reaped on drop.
pub struct Daemon {
    child: Child,
    exited: Option<ExitStatus>,
    pub browser: SocketAddr,
    pub control: SocketAddr,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
}

impl Daemon {
    /// Starts the daemon with the base [`CONFIG`].
    pub fn start() -> Daemon {
        Daemon::start_with(&Config::default())
    }

    /// Starts the daemon with `config` and waits (10 s at most) for its `ready` line.
    pub fn start_with(config: &Config) -> Daemon {
        Daemon::start_with_env(config, &[])
    }

    /// `start_with`, with extra environment variables for the daemon.
    pub fn start_with_env(config: &Config, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(config, |path| {
            let mut c = Command::new(comet_bin());
            c.envs(env.iter().copied()).arg("--config").arg(path);
            c
        })
    }

    /// `start_with`, the daemon limited to `nofile` open files (`ulimit -n`, through bash).
    pub fn start_with_nofile(config: &Config, nofile: u32) -> Daemon {
        Daemon::spawn(config, |path| {
            let mut c = Command::new("bash");
            c.arg("-c").arg(format!("ulimit -n {nofile} && exec \"$0\" --config \"$1\"")).arg(comet_bin()).arg(path);
            c
        })
    }

    /// Writes the config, runs the command `command(config path)` makes (which must end up
    /// exec'ing comet), and waits for the `ready` line.
    fn spawn(config: &Config, command: impl FnOnce(&Path) -> Command) -> Daemon {
        let (dir, path) = write_config(&config.text());
        let mut child = command(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn comet");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let logs = logs.clone();
            thread::spawn(move || {
                let mut r = BufReader::new(stderr);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let s = String::from_utf8_lossy(&line).trim_end().to_string();
                            logs.lock().unwrap().push(s.clone());
                            let _ = tx.send(s);
                        }
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let addrs = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addrs) = parse_ready(&line) {
                        break addrs;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = std::fs::remove_dir_all(&dir);
                    panic!(
                        "comet printed no `ready browser=` line within 10 s; stderr so far:\n{}",
                        logs.lock().unwrap().join("\n")
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stderr closed: the daemon died before getting ready.
                    let status = child.wait();
                    let _ = std::fs::remove_dir_all(&dir);
                    panic!(
                        "comet exited ({:?}) before its `ready` line; config:\n{}\nstderr:\n{}",
                        status,
                        config.text(),
                        logs.lock().unwrap().join("\n")
                    );
                }
            }
        };
        Daemon {
            child,
            exited: None,
            browser: addrs.0,
            control: addrs.1,
            admin: addrs.2,
            logs,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new connection to the browser listener.
    pub fn browser(&self) -> Http {
        Http::connect(self.browser)
    }

    /// A new connection to the admin listener.
    pub fn admin(&self) -> Http {
        Http::connect(self.admin)
    }

    /// A new, unauthenticated connection to the control socket.
    pub fn control(&self) -> Resp {
        Resp::connect(self.control)
    }

    /// A new control connection that has sent `AUTH s3cret-token` (and got `+OK`).
    pub fn backend(&self) -> Resp {
        let mut r = self.control();
        assert_eq!(r.cmd(&["AUTH", TOKEN]).to_string(), "+OK", "AUTH {TOKEN}");
        r
    }

    /// `PUBLISH channel message` on a fresh backend connection; returns the integer reply.
    pub fn publish(&self, channel: &str, message: &str) -> i64 {
        let reply = self.backend().cmd(&["PUBLISH", channel, message]);
        match reply {
            Reply::Integer(n) => n,
            other => panic!("PUBLISH {channel} {message}: expected an integer, got {other}"),
        }
    }

    /// The `INFO` text, as `key -> value`.
    pub fn info(&self) -> HashMap<String, String> {
        let reply = self.backend().cmd(&["INFO"]);
        match reply {
            Reply::Bulk(Some(b)) => parse_info(&String::from_utf8_lossy(&b)),
            other => panic!("INFO: expected a bulk string, got {other}"),
        }
    }

    /// Waits (3 s at most) until `INFO` says `held_polls:n`. It does not fail by itself when the
    /// count never shows up: the caller's own assertions (e.g. `PUBLISH` replying `:1`) decide,
    /// and `info_counts_held_polls_and_messages` checks the counter itself.
    pub fn wait_held(&self, n: usize) {
        let want = n.to_string();
        let mut backend = self.backend();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Reply::Bulk(Some(b)) = backend.cmd(&["INFO"]) {
                let info = parse_info(&String::from_utf8_lossy(&b));
                last = info.get("held_polls").cloned().unwrap_or_default();
                if last == want {
                    return;
                }
            }
            thread::sleep(ms(10));
        }
        eprintln!("warning: INFO never said held_polls:{want} (last: {last:?}); going on");
    }

    /// Sends SIGTERM with the `kill` command (no libc).
    pub fn sigterm(&self) {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(st);
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(ms(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("--- comet stderr ---\n{}\n---", self.logs().join("\n"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Parses `... ready browser=A control=B admin=C`.
fn parse_ready(line: &str) -> Option<(SocketAddr, SocketAddr, SocketAddr)> {
    let at = line.find("ready browser=")?;
    let mut map = HashMap::new();
    for word in line[at..].split_whitespace() {
        if let Some((k, v)) = word.split_once('=') {
            map.insert(k, v);
        }
    }
    let get = |k: &str| -> SocketAddr {
        let v = map.get(k).unwrap_or_else(|| panic!("ready line lacks {k}=: {line}"));
        v.parse().unwrap_or_else(|e| panic!("ready line: bad {k}={v}: {e}: {line}"))
    };
    Some((get("browser"), get("control"), get("admin")))
}

/// Parses Redis-style INFO text (`# Section` headers, `key:value` lines).
pub fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP client
// ---------------------------------------------------------------------------------------------

/// One HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// In order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The comma-separated tokens of every `name` header, trimmed, lowercased.
    pub fn header_tokens(&self, name: &str) -> Vec<String> {
        self.headers_named(name)
            .iter()
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// The header, or a panic naming it and showing the response.
    pub fn must(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("response lacks `{name}`:\n{self}"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `(Last-Modified, Etag)`, to send back as `If-Modified-Since` / `If-None-Match`.
    pub fn cursor(&self) -> (String, String) {
        (self.must("Last-Modified").to_string(), self.must("Etag").to_string())
    }

    /// The message id `(time, tag)` from `Last-Modified` and `Etag`.
    pub fn message_id(&self) -> (u64, u64) {
        let lm = self.must("Last-Modified");
        let time = parse_http_date(lm).unwrap_or_else(|| panic!("bad Last-Modified {lm:?}"));
        let etag = self.must("Etag");
        let tag = etag
            .parse()
            .unwrap_or_else(|_| panic!("Etag {etag:?} is not a bare number"));
        (time, tag)
    }

    pub fn closes(&self) -> bool {
        self.header_tokens("Connection").iter().any(|t| t == "close")
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} {} {}", self.version, self.status, self.reason)?;
        for (k, v) in &self.headers {
            writeln!(f, "{k}: {v}")?;
        }
        writeln!(f)?;
        write!(f, "{}", String::from_utf8_lossy(&self.body))
    }
}

/// Builds a request head (and body) with `Host` first, then `headers`, then `Content-Length`
/// when `body` is not empty.
pub fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut s = format!("{method} {target} HTTP/1.1\r\nHost: push.test\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        s.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    s.push_str("\r\n");
    s.push_str(body);
    s
}

/// `GET target` with `headers`.
pub fn get(target: &str, headers: &[(&str, &str)]) -> String {
    request("GET", target, headers, "")
}

/// A raw HTTP/1.x client connection.
pub struct Http {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    pub fn connect(addr: SocketAddr) -> Http {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        Http { stream, buf: Vec::new() }
    }

    pub fn set_timeout(&mut self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// Writes raw bytes.
    pub fn send(&mut self, raw: &str) {
        self.send_bytes(raw.as_bytes());
    }

    pub fn send_bytes(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).expect("write request");
    }

    /// Sends `raw` and reads one response.
    pub fn request(&mut self, raw: &str) -> Response {
        self.send(raw);
        self.response()
    }

    /// Reads one response, or panics (timeout, close, malformed).
    pub fn response(&mut self) -> Response {
        match self.try_response() {
            Ok(r) => r,
            Err(e) => panic!(
                "no complete HTTP response: {e}; bytes so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Reads one response: the head up to the blank line, then `Content-Length` bytes of body.
    pub fn try_response(&mut self) -> io::Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end - 4]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("").to_string();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, format!("bad status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        for l in lines {
            let (k, v) = l
                .split_once(':')
                .ok_or_else(|| io::Error::new(ErrorKind::InvalidData, format!("bad header line {l:?}")))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let cl = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("Content-Length"))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                io::Error::new(ErrorKind::InvalidData, format!("response without Content-Length:\n{head}"))
            })?;
        let cl: usize = cl
            .parse()
            .map_err(|_| io::Error::new(ErrorKind::InvalidData, format!("bad Content-Length {cl:?}")))?;
        while self.buf.len() < head_end + cl {
            self.fill()?;
        }
        let body = self.buf[head_end..head_end + cl].to_vec();
        self.buf.drain(..head_end + cl);
        Ok(Response { version, status, reason, headers, body })
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(ErrorKind::UnexpectedEof, "connection closed"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Asserts that nothing arrives (and the connection stays open) for `d`: a held poll.
    pub fn expect_nothing(&mut self, d: Duration) {
        if !self.buf.is_empty() {
            panic!("expected no response yet, have: {:?}", String::from_utf8_lossy(&self.buf));
        }
        self.set_timeout(d);
        let mut chunk = [0u8; 4096];
        let r = self.stream.read(&mut chunk);
        self.set_timeout(READ_TIMEOUT);
        match r {
            Ok(0) => panic!("expected a held request, but the server closed the connection"),
            Ok(n) => panic!(
                "expected a held request, but got: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("expected a held request, but read failed: {e}"),
        }
    }

    /// Asserts that the server closes the connection (within 3 s) without sending more bytes.
    pub fn expect_closed(&mut self) {
        if !self.buf.is_empty() {
            panic!("expected close, but have unread bytes: {:?}", String::from_utf8_lossy(&self.buf));
        }
        self.set_timeout(Duration::from_secs(3));
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => {}
            Ok(n) => panic!("expected close, got more bytes: {:?}", String::from_utf8_lossy(&chunk[..n])),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the server to close the connection: {e}"),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// HTTP dates
// ---------------------------------------------------------------------------------------------

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Unix seconds -> IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date(t: u64) -> String {
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[((days + 4) % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// IMF-fixdate -> Unix seconds.
pub fn parse_http_date(s: &str) -> Option<u64> {
    let w: Vec<&str> = s.split_whitespace().collect();
    if w.len() != 6 || w[5] != "GMT" || !w[0].ends_with(',') {
        return None;
    }
    let d: i64 = w[1].parse().ok()?;
    let m = MONTHS.iter().position(|x| *x == w[2])? as i64 + 1;
    let y: i64 = w[3].parse().ok()?;
    let hms: Vec<u64> = w[4].split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if hms.len() != 3 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    Some(days as u64 * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

// ---------------------------------------------------------------------------------------------
// Raw RESP2 client
// ---------------------------------------------------------------------------------------------

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// `+OK`, `-ERR ...`, `:1`, `$text`, `$-1`, `*0`, `*2[$a, :1]`: close to the wire form, so
/// tests compare replies as strings.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Simple(s) => write!(f, "+{s}"),
            Reply::Error(s) => write!(f, "-{s}"),
            Reply::Integer(n) => write!(f, ":{n}"),
            Reply::Bulk(None) => write!(f, "$-1"),
            Reply::Bulk(Some(b)) => write!(f, "${}", String::from_utf8_lossy(b)),
            Reply::Array(None) => write!(f, "*-1"),
            Reply::Array(Some(items)) => {
                write!(f, "*{}", items.len())?;
                if !items.is_empty() {
                    let parts: Vec<String> = items.iter().map(|r| r.to_string()).collect();
                    write!(f, "[{}]", parts.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

pub fn encode_str(args: &[&str]) -> Vec<u8> {
    let v: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    encode(&v)
}

/// A raw RESP2 client connection.
pub struct Resp {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Resp {
    pub fn connect(addr: SocketAddr) -> Resp {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        Resp { stream, buf: Vec::new() }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to control socket");
    }

    pub fn send(&mut self, args: &[&str]) {
        self.send_raw(&encode_str(args));
    }

    /// Sends a command and reads its reply.
    pub fn cmd(&mut self, args: &[&str]) -> Reply {
        self.send(args);
        self.reply()
    }

    /// Reads one reply, or panics.
    pub fn reply(&mut self) -> Reply {
        match self.try_reply() {
            Ok(r) => r,
            Err(e) => panic!(
                "no complete RESP reply: {e}; bytes so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    pub fn try_reply(&mut self) -> io::Result<Reply> {
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((r, used))) => {
                    self.buf.drain(..used);
                    return Ok(r);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e)),
            }
            let mut chunk = [0u8; 16384];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(ErrorKind::UnexpectedEof, "connection closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Asserts that the server closes the connection (within 3 s) without sending more bytes.
    pub fn expect_closed(&mut self) {
        if !self.buf.is_empty() {
            panic!("expected close, but have unread bytes: {:?}", String::from_utf8_lossy(&self.buf));
        }
        self.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => {}
            Ok(n) => panic!("expected close, got more bytes: {:?}", String::from_utf8_lossy(&chunk[..n])),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the server to close the connection: {e}"),
        }
    }
}

/// Parses one reply from the front of `buf`: `Ok(None)` when incomplete.
fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(eol) = find(buf, b"\r\n") else {
        return Ok(None);
    };
    if eol == 0 {
        return Err("empty reply line".into());
    }
    let line = String::from_utf8_lossy(&buf[1..eol]).into_owned();
    let after = eol + 2;
    let int = |s: &str| s.parse::<i64>().map_err(|_| format!("bad integer {s:?}"));
    match buf[0] {
        b'+' => Ok(Some((Reply::Simple(line), after))),
        b'-' => Ok(Some((Reply::Error(line), after))),
        b':' => Ok(Some((Reply::Integer(int(&line)?), after))),
        b'$' => {
            let n = int(&line)?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            let n = n as usize;
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            if &buf[after + n..after + n + 2] != b"\r\n" {
                return Err("bulk string not followed by CRLF".into());
            }
            Ok(Some((Reply::Bulk(Some(buf[after..after + n].to_vec())), after + n + 2)))
        }
        b'*' => {
            let n = int(&line)?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), after)));
            }
            let mut items = Vec::new();
            let mut pos = after;
            for _ in 0..n {
                match parse_reply(&buf[pos..])? {
                    Some((r, used)) => {
                        items.push(r);
                        pos += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), pos)))
        }
        other => Err(format!("unknown reply type byte {:?}", other as char)),
    }
}
