//! Hardening: the daemon under hostile and careless peers. Each test starts its own daemon on
//! loopback, with small, bounded counts (the whole module runs in well under a minute), and checks
//! what must hold whatever peers do:
//!
//! * a flood of malformed requests on every listener leaves the daemon up, its memory flat, its
//!   answers 4xx (501/503/505 where HTTP says so, never another 5xx), while a canary subscriber and
//!   publisher see every message once, in order;
//! * slowloris connections, silent connections and idle keep-alive connections are closed on time;
//! * `max_connections` and running out of descriptors (EMFILE) refuse new peers without hurting
//!   the existing ones or spinning the CPU;
//! * slow readers (a backend, a browser) cost the daemon a bounded amount of memory, and idle
//!   backends that once sent a large command keep no input buffer;
//! * connection churn (half of it ended with RST) leaves descriptors and memory at their baseline.
//!
//! The heavy tests take one process-wide lock so they do not skew each other's timings and memory
//! readings. Measurements come from `/proc/<pid>/{status,stat,fd}`. `scripts/soak` runs the churn
//! test for minutes (`COMET_SOAK_SECS`).
//!
//! Knobs for investigating the flood test: `COMET_FLOOD_SECS` (how long it floods, default 2),
//! `COMET_FLOOD_ONLY=browser|admin|control` (one listener only), `COMET_FLOOD_IDLE` (sets
//! `idle_timeout_secs`), `COMET_HARDENING_VERBOSE=1` (VmRSS per round, per-connection timings).

use crate::common::*;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------------------------

static HEAVY: Mutex<()> = Mutex::new(());

/// Serialises the heavy tests of this module.
fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A number from `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`...), in kB.
fn proc_status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// Open descriptors of the process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time (user + system) the process used, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = s.rfind(')') else { return 0.0 };
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // After the comm: state(3) ... utime(14) stime(15), so indexes 11 and 12 here.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn alive(d: &mut Daemon) -> bool {
    d.wait_exit(Duration::ZERO).is_none()
}

fn info_num(d: &Daemon, key: &str) -> u64 {
    d.info().get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("INFO lacks a number for {key}"))
}

/// The base config of this module: less logging (the floods would make megabytes of debug lines;
/// `info` still prints the `ready` line the harness waits for).
fn base() -> Config {
    Config::default().set("log", "level", "\"info\"")
}

/// Reads what is there without waiting: Some(bytes) (possibly empty) while open, None once the
/// peer closed (EOF or RST).
fn poll_read(s: &mut TcpStream, into: &mut Vec<u8>) -> Option<()> {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
}

/// Waits up to `within` for the peer to close `s`; returns when it did (None: still open) and the
/// bytes that came before.
fn wait_closed(s: &mut TcpStream, within: Duration) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (None, got);
        }
        s.set_read_timeout(Some(left.max(ms(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (Some(start.elapsed()), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return (None, got),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (Some(start.elapsed()), got),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The canary: a subscriber following the cursor and a publisher, running through a test
// ---------------------------------------------------------------------------------------------

struct Canary {
    stop: Arc<AtomicBool>,
    publisher: JoinHandle<(usize, Duration, Vec<String>)>,
    subscriber: JoinHandle<(Vec<usize>, Duration, usize, Vec<String>)>,
}

struct CanaryReport {
    published: usize,
    received: Vec<usize>,
    max_latency: Duration,
    max_publish_rtt: Duration,
    timeouts: usize,
    errors: Vec<String>,
}

impl CanaryReport {
    /// Every message arrived, once, in order, and nothing went wrong.
    fn assert_exact(&self) {
        let want: Vec<usize> = (0..self.published).collect();
        assert!(self.errors.is_empty(), "canary errors: {:?}", self.errors);
        if self.received != want {
            let missing: Vec<usize> = want.iter().filter(|i| !self.received.contains(i)).copied().take(20).collect();
            panic!(
                "canary: published {}, received {} (in order: {}); first missing: {missing:?}; received head: {:?}",
                self.published,
                self.received.len(),
                self.received.windows(2).all(|w| w[0] < w[1]),
                &self.received[..self.received.len().min(30)]
            );
        }
    }
}

impl Canary {
    /// Starts the subscriber (keep-alive, following `Last-Modified`/`Etag`) on `/sub/<channel>`
    /// and a publisher sending `c<i>` every 20 ms on the control socket.
    fn start(d: &Daemon, channel: &str) -> Canary {
        let stop = Arc::new(AtomicBool::new(false));
        let sent_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let sub_ready = Arc::new(AtomicBool::new(false));
        let subscriber = {
            let (addr, channel, sent_at, ready) = (d.browser, channel.to_string(), sent_at.clone(), sub_ready.clone());
            thread::spawn(move || {
                let mut got = Vec::new();
                let mut errors = Vec::new();
                let mut max_latency = Duration::ZERO;
                let mut timeouts = 0;
                let mut cursor: Option<(String, String)> = None;
                let mut c = Http::connect(addr);
                let give_up = Instant::now() + Duration::from_secs(120);
                loop {
                    let mut h: Vec<(&str, &str)> = Vec::new();
                    if let Some((lm, et)) = &cursor {
                        h.push(("If-Modified-Since", lm));
                        h.push(("If-None-Match", et));
                    }
                    c.send(&get(&format!("/sub/{channel}"), &h));
                    ready.store(true, Ordering::SeqCst);
                    match c.try_response() {
                        Ok(r) if r.status == 200 => {
                            let body = r.text();
                            cursor = Some(r.cursor());
                            if body == "end" {
                                break;
                            }
                            match body.strip_prefix('c').and_then(|n| n.parse::<usize>().ok()) {
                                Some(i) => {
                                    if let Some(at) = sent_at.lock().unwrap().get(i) {
                                        max_latency = max_latency.max(at.elapsed());
                                    }
                                    got.push(i);
                                }
                                None => errors.push(format!("unexpected body {body:?}")),
                            }
                        }
                        Ok(r) if r.status == 408 => {
                            timeouts += 1;
                            if let (Some(lm), Some(et)) = (r.header("Last-Modified"), r.header("Etag")) {
                                cursor = Some((lm.to_string(), et.to_string()));
                            }
                        }
                        Ok(r) => {
                            errors.push(format!("status {}: {}", r.status, r.text()));
                            c = Http::connect(addr);
                        }
                        Err(e) => {
                            errors.push(format!("subscriber: {e}"));
                            c = Http::connect(addr);
                        }
                    }
                    if Instant::now() > give_up || errors.len() > 20 {
                        errors.push("subscriber gave up".into());
                        break;
                    }
                }
                (got, max_latency, timeouts, errors)
            })
        };
        // The subscriber's first poll (no cursor, first_message = oldest) is held before any
        // message exists, so it starts at c0.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sub_ready.load(Ordering::SeqCst) && Instant::now() < deadline {
            thread::sleep(ms(5));
        }
        d.wait_held(1);
        let publisher = {
            let (stop, mut backend, channel) = (stop.clone(), d.backend(), channel.to_string());
            thread::spawn(move || {
                let mut n = 0;
                let mut max_rtt = Duration::ZERO;
                let mut errors = Vec::new();
                let mut next = Instant::now();
                loop {
                    let stopping = stop.load(Ordering::SeqCst);
                    let body = if stopping { "end".to_string() } else { format!("c{n}") };
                    if !stopping {
                        sent_at.lock().unwrap().push(Instant::now());
                    }
                    let t0 = Instant::now();
                    backend.send(&["PUBLISH", &channel, &body]);
                    match backend.try_reply() {
                        Ok(Reply::Integer(_)) => {}
                        Ok(other) => errors.push(format!("PUBLISH: {other}")),
                        Err(e) => {
                            errors.push(format!("PUBLISH: {e}"));
                            break;
                        }
                    }
                    max_rtt = max_rtt.max(t0.elapsed());
                    if stopping {
                        break;
                    }
                    n += 1;
                    next += ms(20);
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                (n, max_rtt, errors)
            })
        };
        Canary { stop, publisher, subscriber }
    }

    fn finish(self) -> CanaryReport {
        self.stop.store(true, Ordering::SeqCst);
        let (published, max_publish_rtt, mut errors) = self.publisher.join().expect("canary publisher panicked");
        let (received, max_latency, timeouts, sub_errors) = self.subscriber.join().expect("canary subscriber panicked");
        errors.extend(sub_errors);
        let r = CanaryReport { published, received, max_latency, max_publish_rtt, timeouts, errors };
        println!(
            "canary: published {}, received {}, max delivery latency {:?}, max PUBLISH round trip {:?}, 408s {}",
            r.published,
            r.received.len(),
            r.max_latency,
            r.max_publish_rtt,
            r.timeouts
        );
        r
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Hostile input on every listener
// ---------------------------------------------------------------------------------------------

/// One hostile HTTP request: its bytes, the status HTTP requires if any, and a name for reports.
struct HReq {
    bytes: Vec<u8>,
    want: Option<u16>,
    label: &'static str,
}

fn hreq(s: impl Into<Vec<u8>>, want: Option<u16>, label: &'static str) -> HReq {
    HReq { bytes: s.into(), want, label }
}

/// What the hostile generators need to know about the daemon's state.
#[derive(Clone)]
struct Scene {
    /// A cursor older than every message buffered on `old` (those messages fell out).
    fell_out: String,
}

const BEARER: &str = "Authorization: Bearer s3cret-token\r\n";

/// Browser requests the connection survives (the daemon answers and keeps it open).
fn browser_keepalive(rng: &mut Rng, scene: &Scene) -> HReq {
    let r = rng.below(26);
    match r {
        0 => hreq("GET /sub/a!b HTTP/1.1\r\nHost: h\r\n\r\n", Some(400), "bad channel chars"),
        1 => hreq(format!("GET /sub/{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(129 + rng.below(6000))), Some(400), "overlong channel id"),
        2 => hreq("GET /subscribe?id=%zz HTTP/1.1\r\n\r\n", Some(400), "bad percent-encoding in id"),
        3 => hreq("GET /subscribe?id=%ff%fe%00 HTTP/1.1\r\n\r\n", Some(400), "non-UTF-8 id"),
        4 => hreq("GET /subscribe?x=1 HTTP/1.1\r\n\r\n", Some(400), "missing id"),
        5 => {
            let junk = ["abc", "1:", ":1", "1:99999999999", "-1:0", "%zz", "1:0:0", "18446744073709551616:0", "%00", "+1:2"];
            hreq(format!("GET /sub/old?last_event_id={} HTTP/1.1\r\n\r\n", junk[rng.below(junk.len())]), Some(400), "bad last_event_id")
        }
        6 => {
            let junk = ["yesterday", "Thu, 32 Jan 1970 00:00:00 GMT", "Thu, 01 Jan 1970 25:00:00 GMT", "", "Thu, 01 Jan 99999999999999 00:00:00 GMT", "Thu, 01 Foo 1970 00:00:00 GMT"];
            hreq(format!("GET /sub/old HTTP/1.1\r\nIf-Modified-Since: {}\r\n\r\n", junk[rng.below(junk.len())]), Some(400), "bad If-Modified-Since")
        }
        7 => hreq("GET /sub/old HTTP/1.1\r\nIf-Modified-Since: Thu, 01 Jan 1970 00:00:10 GMT\r\nIf-None-Match: \"x\"\r\n\r\n", Some(400), "bad If-None-Match"),
        8 => hreq("GET /sub/old?last_event_id=1:0 HTTP/1.1\r\n\r\n", Some(200), "cursor that never existed"),
        9 => hreq(format!("GET /sub/old?last_event_id={} HTTP/1.1\r\n\r\n", scene.fell_out), Some(200), "cursor that fell out of the buffer"),
        10 => hreq("GET /sub/old HTTP/1.1\r\nIf-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT\r\nIf-None-Match: W/\"0\"\r\n\r\n", Some(200), "epoch cursor"),
        11 => hreq("GET /nope/x HTTP/1.1\r\n\r\n", Some(404), "unknown path"),
        12 => hreq("POST /sub/old HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", Some(405), "POST with a body"),
        13 => {
            let m = ["BREW", "HEAD", "DELETE", "PUT", "TRACE", "CONNECT", "G\x45T"];
            let m = m[rng.below(m.len())];
            let want = if m == "GET" { 200 } else { 405 };
            hreq(format!("{m} /sub/old HTTP/1.1\r\n\r\n"), Some(want), "odd method")
        }
        14 => hreq("OPTIONS /sub/old HTTP/1.1\r\nOrigin: http://evil.test\r\n\r\n", Some(403), "preflight, bad origin"),
        15 => hreq("OPTIONS /sub/old HTTP/1.1\r\nOrigin: http://site.test\r\n\r\n", Some(204), "preflight, good origin"),
        16 => hreq("GET /sub/@me HTTP/1.1\r\n\r\n", Some(403), "@me without a cookie"),
        17 => hreq("GET /sub/session:abc HTTP/1.1\r\nCookie: PHPSESSID=zzz\r\n\r\n", Some(403), "another session's channel"),
        18 => {
            let mut s = String::from("GET /sub/old HTTP/1.1\r\n");
            for i in 0..60 {
                s.push_str(&format!("X-Junk-{i}: {}\r\n", "j".repeat(rng.below(40))));
            }
            s.push_str("\r\n");
            hreq(s, Some(200), "60 header lines")
        }
        19 => hreq(format!("GET /sub/old HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(7000)), Some(200), "7 KB header"),
        20 => hreq("\r\n\r\n\r\nGET /sub/old HTTP/1.1\r\n\r\n", Some(200), "leading blank lines"),
        21 if rng.below(8) == 0 => hreq("GET /comet.js HTTP/1.1\r\n\r\n", Some(200), "comet.js"),
        22 => hreq("GET /sub/ol%64 HTTP/1.1\r\nCookie: PHPSESSID=s1; x=\"y\"\r\n\r\n", Some(200), "percent-encoded channel"),
        23 => hreq("GET http://push.test/sub/old HTTP/1.1\r\n\r\n", Some(200), "absolute-form target"),
        24 => hreq("GET /sub/old HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\nLast-Event-ID: 1:0\r\n\r\n", Some(200), "repeated Content-Length 0"),
        _ => hreq("GET /sub/old?id=x&last_event_id=1%3A0&&&=&a HTTP/1.1\r\nCookie: ;;;=;PHPSESSID\r\n\r\n", Some(200), "odd query and cookie"),
    }
}

/// HTTP requests after which the daemon closes the connection (or that are simply broken).
fn http_fatal(rng: &mut Rng, target: &str) -> HReq {
    match rng.below(22) {
        0 => hreq(format!("GET {target} HTTP/2.0\r\n\r\n"), Some(505), "HTTP/2.0"),
        1 => hreq(format!("GET {target} HTTP/1.2\r\n\r\n"), None, "HTTP/1.2"),
        2 => hreq(format!("POST {target} HTTP/1.1\r\n{BEARER}Transfer-Encoding: chunked\r\n\r\n"), Some(501), "chunked"),
        3 => hreq(format!("POST {target} HTTP/1.1\r\n{BEARER}Transfer-Encoding: gzip, x-unknown\r\n\r\n"), Some(501), "unknown transfer coding"),
        4 => hreq(format!("POST {target} HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"), Some(400), "absurd Content-Length"),
        5 => hreq(format!("POST {target} HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), Some(400), "negative Content-Length"),
        6 => hreq(format!("POST {target} HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), Some(400), "conflicting Content-Length"),
        7 => hreq(format!("POST {target} HTTP/1.1\r\n{BEARER}Content-Length: 2000000\r\n\r\n"), Some(413), "Content-Length over the cap"),
        8 => {
            let mut s = format!("GET {target} HTTP/1.1\r\n");
            for i in 0..70 {
                s.push_str(&format!("X-{i}: y\r\n"));
            }
            s.push_str("\r\n");
            hreq(s, Some(431), "70 header lines")
        }
        9 => hreq(format!("GET {target} HTTP/1.1\r\nX-Huge: {}\r\n\r\n", "h".repeat(9000)), Some(431), "head over max_head_bytes"),
        10 => hreq(format!("GET {target}\0 HTTP/1.1\r\n\r\n"), Some(400), "NUL in the target"),
        11 => hreq(format!("GET {target} HTTP/1.1\r\nX: a\0b\r\n\r\n"), Some(400), "NUL in a header"),
        12 => hreq("GET /sub/%zz HTTP/1.1\r\n\r\n", Some(400), "bad percent-encoding in path"),
        13 => hreq("GET /sub/%ff%fe HTTP/1.1\r\n\r\n", Some(400), "non-UTF-8 path"),
        14 => hreq(b"GET /sub/old HTTP/1.1\r\nCookie: PHPSESSID=\xff\xfe\r\n\r\n".to_vec(), Some(400), "non-UTF-8 header value"),
        15 => {
            let n = 1 + rng.below(300);
            let mut junk = rng.bytes(n);
            if junk.first().is_some_and(|&b| b == b'\r' || b == b'\n') {
                junk[0] = b'J';
            }
            hreq(junk, None, "binary junk")
        }
        16 => {
            let mut line = format!("GET {target} HTTP/1.1").into_bytes();
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(line.len());
                line[i] = rng.next() as u8;
            }
            line.extend_from_slice(b"\r\n\r\n");
            hreq(line, None, "mutated request line")
        }
        17 => hreq(format!("GET {target} HTTP/1.1\r\n{BEARER}Connection: close\r\n\r\n"), None, "Connection: close"),
        18 => hreq(format!("GET {target} HTTP/1.0\r\n{BEARER}\r\n"), None, "HTTP/1.0"),
        19 => hreq(format!("GET {target} HTTP/1.1\r\nX: a\r\n folded\r\n\r\n"), None, "obsolete line folding"),
        20 => hreq(format!("GET  {target}  HTTP/1.1\r\n\r\n"), None, "double spaces"),
        _ => hreq(format!("GET {target} HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n", "%".repeat(100)), None, "percent soup"),
    }
}

fn admin_keepalive(rng: &mut Rng) -> HReq {
    match rng.below(12) {
        0 => hreq(format!("POST /pub?id=a!b HTTP/1.1\r\n{BEARER}Content-Length: 2\r\n\r\nhi"), Some(400), "admin: bad channel"),
        1 => hreq(format!("POST /pub HTTP/1.1\r\n{BEARER}Content-Length: 2\r\n\r\nhi"), Some(400), "admin: missing id"),
        2 => hreq(format!("GET /pub?id=nosuch{} HTTP/1.1\r\n{BEARER}\r\n", rng.below(1000)), Some(404), "admin: unknown channel"),
        3 => hreq(format!("DELETE /pub?id=nosuch{} HTTP/1.1\r\n{BEARER}\r\n", rng.below(1000)), Some(404), "admin: delete unknown"),
        4 => hreq(format!("PATCH /pub?id=x HTTP/1.1\r\n{BEARER}\r\n"), Some(405), "admin: PATCH"),
        5 => hreq(format!("GET /nope HTTP/1.1\r\n{BEARER}\r\n"), Some(404), "admin: unknown path"),
        6 => hreq(format!("GET /status HTTP/1.1\r\n{BEARER}\r\n"), Some(200), "admin: status"),
        7 => {
            let n = rng.below(1000);
            let body = rng.bytes(n);
            let mut v = format!("POST /pub?id=hostile HTTP/1.1\r\n{BEARER}Content-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n").into_bytes();
            v.extend(body);
            hreq(v, None, "admin: publish junk")
        }
        8 => hreq(format!("GET /pub?id={} HTTP/1.1\r\n{BEARER}\r\n", "a".repeat(129 + rng.below(3000))), Some(400), "admin: overlong id"),
        9 => hreq("GET /status HTTP/1.1\r\n\r\n", Some(401), "admin: no token"),
        10 => hreq("GET /status HTTP/1.1\r\nAuthorization: Bearer wrong-token-x\r\n\r\n", Some(401), "admin: wrong token"),
        _ => hreq(format!("POST /pub/%41%42 HTTP/1.1\r\n{BEARER}Content-Length: 0\r\n\r\n"), None, "admin: percent-encoded channel"),
    }
}

/// A RESP command the connection survives, and how many replies it gets.
fn control_keepalive(rng: &mut Rng, authed: bool, wrong_auths: &mut u32) -> Vec<u8> {
    let bin = |rng: &mut Rng, n: usize| rng.bytes(n);
    match rng.below(16) {
        0 => encode_str(&["FOO", "bar"]),
        1 => encode(&[b"PUBLISH", "a".repeat(200 + rng.below(500)).as_bytes(), b"x"]),
        2 => encode(&[b"PUBLISH", b"a b\0c\xff", b"x"]),
        3 => {
            let n = rng.below(2000);
            encode(&[b"PUBLISH", b"hostile", &bin(rng, n)])
        }
        4 => encode_str(&["PING"]),
        5 => {
            let n = rng.below(100);
            encode(&[b"ECHO", &bin(rng, n)])
        }
        6 => encode_str(&["SELECT", "7"]),
        7 => encode_str(&["PUBLISH", "a"]),
        8 => b"PUBLISH hostile \"q \\x41\\n\\\"\" 'it\\'s'\r\n".to_vec(),
        9 => encode(&[b"SESSION.OPEN", "s".repeat(200).as_bytes()]),
        10 => encode_str(&["INFO"]),
        11 => encode_str(&["LEAVE", "nobody-here", "hostile"]),
        12 if authed && *wrong_auths == 0 && rng.below(8) == 0 => {
            // Only now and then: a wrong AUTH logs the connection out (NOAUTH from then on).
            *wrong_auths += 1;
            encode_str(&["AUTH", "wrong-secret-123"])
        }
        13 => encode_str(&["CLIENT", "FOO"]),
        14 => encode(&[b""]),
        _ => b"ECHO   plain   words\n".to_vec(),
    }
}

/// RESP that breaks the stream (the daemon answers a protocol error and closes) or junk.
fn control_fatal(rng: &mut Rng) -> (Vec<u8>, &'static str) {
    match rng.below(10) {
        0 => (b"*2\r\n$4\r\nECHO\r\n$-5\r\nabc\r\n".to_vec(), "negative bulk length"),
        1 => (b"*2\r\n$4\r\nECHO\r\n$99999999999\r\n".to_vec(), "huge bulk length"),
        2 => (b"*99999\r\n$4\r\nPING\r\n".to_vec(), "too many arguments"),
        3 => (b"*1\r\n".repeat(1000 + rng.below(5000)), "deep nesting"),
        4 => (b"ECHO \"unbalanced\r\n".to_vec(), "unbalanced quotes"),
        5 => (vec![b'x'; 70_000], "inline line over 64 KiB"),
        6 => (b"*1\r\n$4\r\nPI".to_vec(), "truncated frame"),
        7 => (b"*3\r\n$3\r\nfoo\r\n:1\r\n".to_vec(), "integer inside a command"),
        8 => (b"*9223372036854775807\r\n".to_vec(), "i64::MAX arguments"),
        _ => {
            let n = 1 + rng.below(500);
            (rng.bytes(n), "binary junk")
        }
    }
}

#[derive(Default)]
struct Tally {
    /// "listener outcome" -> count.
    counts: BTreeMap<String, u64>,
    /// Requests sent.
    sent: u64,
    /// Keep-alive requests that got no answer.
    unanswered: u64,
    /// A status other than the one HTTP requires.
    wrong: Vec<String>,
    /// A 5xx other than 501/503/505, or an unparsable answer.
    forbidden: Vec<String>,
}

impl Tally {
    fn count(&mut self, key: String) {
        *self.counts.entry(key).or_default() += 1;
    }
    fn merge(&mut self, o: Tally) {
        for (k, v) in o.counts {
            *self.counts.entry(k).or_default() += v;
        }
        self.sent += o.sent;
        self.unanswered += o.unanswered;
        self.wrong.extend(o.wrong);
        self.forbidden.extend(o.forbidden);
    }
    fn print(&self, title: &str) {
        println!("{title}: {} requests sent; answers by listener and status:", self.sent);
        for (k, v) in &self.counts {
            println!("    {k:<40} {v:>7}");
        }
        println!("    unanswered keep-alive requests: {}; wrong status: {}; forbidden: {}", self.unanswered, self.wrong.len(), self.forbidden.len());
    }
}

fn http_status_ok(status: u16) -> bool {
    (200..300).contains(&status) || (400..500).contains(&status) || matches!(status, 501 | 503 | 505)
}

/// Classifies one HTTP answer (or its absence).
fn http_outcome(t: &mut Tally, who: &str, req: &HReq, res: std::io::Result<Response>) -> bool {
    match res {
        Ok(r) => {
            t.count(format!("{who} {}", r.status));
            if !http_status_ok(r.status) {
                t.forbidden.push(format!("{who} {:?} -> {} {}", req.label, r.status, r.text()));
            }
            if let Some(w) = req.want {
                if w != r.status && !(r.status == 503 && w != 200) {
                    t.wrong.push(format!("{who} {:?}: want {w}, got {} {}", req.label, r.status, r.text()));
                }
            }
            true
        }
        Err(e) => {
            let k = match e.kind() {
                ErrorKind::UnexpectedEof => "closed, no answer",
                ErrorKind::ConnectionReset => "reset, no answer",
                ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout, no answer",
                ErrorKind::InvalidData => {
                    t.forbidden.push(format!("{who} {:?}: unparsable answer: {e}", req.label));
                    "unparsable answer"
                }
                _ => "error",
            };
            t.count(format!("{who} {k}"));
            false
        }
    }
}

/// One hostile HTTP connection: `keep` requests it survives, then one that ends it; the write
/// side is shut after sending. Every keep-alive request must be answered.
fn http_conn(addr: SocketAddr, who: &str, reqs: Vec<HReq>, last: HReq) -> Tally {
    let mut t = Tally::default();
    let mut c = Http::connect(addr);
    c.set_timeout(Duration::from_secs(5));
    let mut wire = Vec::new();
    for r in reqs.iter().chain(std::iter::once(&last)) {
        wire.extend_from_slice(&r.bytes);
    }
    t.sent += reqs.len() as u64 + 1;
    if c.stream.write_all(&wire).is_err() {
        t.count(format!("{who} write failed"));
    }
    let _ = c.stream.shutdown(Shutdown::Write);
    for r in &reqs {
        let res = c.try_response();
        if !http_outcome(&mut t, who, r, res) {
            t.unanswered += 1;
            if t.unanswered == 1 && std::env::var("COMET_HARDENING_VERBOSE").is_ok() {
                eprintln!("unanswered {who} {:?}", r.label);
            }
            return t;
        }
    }
    let res = c.try_response();
    http_outcome(&mut t, who, &last, res);
    t
}

fn reply_class(r: &Reply) -> String {
    match r {
        Reply::Simple(s) => format!("+{}", s.split_whitespace().next().unwrap_or("")),
        Reply::Error(s) => {
            let w: Vec<&str> = s.split_whitespace().take(2).collect();
            format!("-{}", w.join(" "))
        }
        Reply::Integer(_) => ":int".into(),
        Reply::Bulk(_) => "$bulk".into(),
        Reply::Array(_) => "*array".into(),
    }
}

fn control_conn(addr: SocketAddr, rng: &mut Rng, keep: usize) -> Tally {
    let mut t = Tally::default();
    let mut c = Resp::connect(addr);
    let authed = rng.below(4) != 0;
    let mut wire = Vec::new();
    let mut expect = 0;
    if authed {
        wire.extend(encode_str(&["AUTH", TOKEN]));
        expect += 1;
    }
    let mut wrong = 0;
    for _ in 0..keep {
        wire.extend(control_keepalive(rng, authed, &mut wrong));
        expect += 1;
    }
    let (fatal, _label) = control_fatal(rng);
    wire.extend(fatal);
    t.sent += expect as u64 + 1;
    // A writer thread: a reply stream may back up while the junk is still being written.
    let mut w = c.stream.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&wire);
        let _ = w.shutdown(Shutdown::Write);
    });
    c.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..expect + 64 {
        match c.try_reply() {
            Ok(r) => {
                // After the expected replies, junk may parse as inline commands: anything goes.
                t.count(format!("control {}", reply_class(&r)));
            }
            Err(e) => {
                if i < expect {
                    t.unanswered += (expect - i) as u64;
                }
                let k = match e.kind() {
                    ErrorKind::UnexpectedEof => "closed",
                    ErrorKind::ConnectionReset => "reset",
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout",
                    ErrorKind::InvalidData => {
                        t.forbidden.push(format!("control: unparsable reply: {e}"));
                        "unparsable"
                    }
                    _ => "error",
                };
                t.count(format!("control {k}"));
                break;
            }
        }
    }
    let _ = writer.join();
    t
}

/// Runs `conns` hostile connections on `threads` threads: 60% browser, 20% admin, 20% control,
/// `keep` keep-alive requests each then one fatal one.
fn flood(d: &Daemon, scene: &Scene, conns: usize, keep: usize, round: u64) -> Tally {
    let threads = 8;
    let (b, c, a) = (d.browser, d.control, d.admin);
    let handles: Vec<_> = (0..threads)
        .map(|w| {
            let scene = scene.clone();
            thread::spawn(move || {
                let mut t = Tally::default();
                for i in (w..conns).step_by(threads) {
                    let mut rng = Rng::new(round * 1_000_003 + i as u64);
                    let kind = match std::env::var("COMET_FLOOD_ONLY").as_deref() {
                        Ok("browser") => 0,
                        Ok("admin") => 3,
                        Ok("control") => 4,
                        _ => i % 5,
                    };
                    match kind {
                        0..=2 => {
                            let reqs = (0..keep).map(|_| browser_keepalive(&mut rng, &scene)).collect();
                            let last = http_fatal(&mut rng, "/sub/old");
                            t.merge(http_conn(b, "browser", reqs, last));
                        }
                        3 => {
                            let reqs = (0..keep).map(|_| admin_keepalive(&mut rng)).collect();
                            let last = http_fatal(&mut rng, "/pub?id=hostile");
                            t.merge(http_conn(a, "admin", reqs, last));
                        }
                        _ => t.merge(control_conn(c, &mut rng, keep)),
                    }
                }
                t
            })
        })
        .collect();
    let mut t = Tally::default();
    for h in handles {
        t.merge(h.join().expect("flood thread panicked"));
    }
    t
}

/// Polls that are held (cursor ahead of the channel, a channel nobody publishes on) and answered
/// 408 at `poll_timeout_secs`, the cursor echoed.
fn held_polls(d: &Daemon, n: usize) -> Vec<JoinHandle<Result<u16, String>>> {
    (0..n)
        .map(|i| {
            let addr = d.browser;
            thread::spawn(move || {
                let mut c = Http::connect(addr);
                let target = if i % 2 == 0 { "/sub/old?last_event_id=99999999999:7".to_string() } else { format!("/sub/quiet{i}") };
                c.send(&get(&target, &[]));
                match c.try_response() {
                    Ok(r) if r.status == 408 && i % 2 == 0 && r.header("Etag") != Some("7") => Err(format!("408 without the cursor echoed:\n{r}")),
                    Ok(r) => Ok(r.status),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect()
}

#[test]
fn hostile_flood_on_every_listener() {
    let _g = heavy();
    let cfg = base()
        .set("channels", "buffer_length", "32")
        .set("limits", "head_timeout_secs", "2")
        .set("limits", "auth_max_failures", "1000000");
    let cfg = match std::env::var("COMET_FLOOD_IDLE") {
        Ok(v) => cfg.set("limits", "idle_timeout_secs", &v),
        Err(_) => cfg,
    };
    let mut d = Daemon::start_with(&cfg);
    // `old`: 100 messages, of which the newest 32 are kept.
    let mut backend = d.backend();
    for i in 0..100 {
        backend.cmd(&["PUBLISH", "old", &format!("m{i}")]);
    }
    let mut c = d.browser();
    let oldest = c.request(&get("/sub/old?last_event_id=1:0", &[]));
    assert_eq!(oldest.text(), "m68", "buffer_length = 32 keeps m68..m99:\n{oldest}");
    let (time, tag) = oldest.message_id();
    let fell_out = if tag >= 3 { format!("{time}:{}", tag - 3) } else { format!("{}:0", time - 1) };
    let scene = Scene { fell_out };
    drop(c);

    let canary = Canary::start(&d, "canary");
    // Warm-up round (allocator arenas, slab, buffers), then the baseline.
    let warm = flood(&d, &scene, 40, 49, 1);
    thread::sleep(ms(300));
    let rss0 = rss_kb(d.pid());
    let fds0 = fds(d.pid());
    let started = Instant::now();
    let held = held_polls(&d, 30);
    // Rounds of 400 connections x 50 requests (20,000), for at least 2 s so the canary runs
    // through the flood.
    let mut t = Tally::default();
    let mut round = 2;
    let flood_secs: u64 = std::env::var("COMET_FLOOD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    while round == 2 || (started.elapsed() < Duration::from_secs(flood_secs) && round < 12 + 6 * flood_secs) {
        t.merge(flood(&d, &scene, 400, 49, round));
        if std::env::var("COMET_HARDENING_VERBOSE").is_ok() {
            println!("  after round {round}: VmRSS {} kB", rss_kb(d.pid()));
        }
        round += 1;
    }
    let flood_time = started.elapsed();
    let mut held_statuses = BTreeMap::new();
    for h in held {
        match h.join().unwrap() {
            Ok(s) => *held_statuses.entry(s).or_insert(0) += 1,
            Err(e) => t.forbidden.push(format!("held poll: {e}")),
        }
    }
    thread::sleep(ms(500));
    let rss1 = rss_kb(d.pid());
    let fds1 = fds(d.pid());
    let report = canary.finish();
    let up = alive(&mut d);
    t.merge(warm);
    t.print("hostile flood");
    println!("held polls (cursor ahead / quiet channel): {held_statuses:?}");
    println!("flood: {} rounds in {flood_time:?}; VmRSS {rss0} kB -> {rss1} kB ({:+} kB); fds {fds0} -> {fds1}", round - 2, rss1 as i64 - rss0 as i64);
    for w in t.wrong.iter().take(15) {
        println!("  wrong status: {w}");
    }
    for w in t.forbidden.iter().take(15) {
        println!("  FORBIDDEN: {w}");
    }
    assert!(up, "the daemon died during the flood");
    let info = d.info();
    println!("INFO rejected_requests:{} total_connections_received:{}", info["rejected_requests"], info["total_connections_received"]);
    assert!(t.sent >= 20_000, "the flood sent {} requests", t.sent);
    assert!(t.forbidden.is_empty(), "5xx other than 501/503/505, or an unparsable answer: {:#?}", &t.forbidden[..t.forbidden.len().min(20)]);
    assert!(t.wrong.is_empty(), "{} answers with another status than HTTP requires, e.g. {:#?}", t.wrong.len(), &t.wrong[..t.wrong.len().min(20)]);
    assert_eq!(t.unanswered, 0, "keep-alive requests left unanswered");
    assert_eq!(held_statuses.get(&408), Some(&30), "held polls must end in 408: {held_statuses:?}");
    report.assert_exact();
    assert!(
        rss1 <= rss0 + 4096,
        "VmRSS grew by {} kB during the flood ({rss0} -> {rss1} kB, {:.0} bytes per request sent). The growth is linear \
         in HTTP requests (control requests alone leave it flat) and stops once entries expire when idle_timeout_secs is \
         small (COMET_FLOOD_IDLE=1 COMET_FLOOD_SECS=6): every keep-alive answer pushes a Timer into timers.idle \
         (server.rs finish_request), kept until idle_timeout_secs (120 s by default) even when the connection is long \
         gone, so memory grows with request rate x idle_timeout",
        rss1 as i64 - rss0 as i64,
        (rss1 as f64 - rss0 as f64) * 1024.0 / t.sent.max(1) as f64
    );
    assert!(fds1 <= fds0 + 2, "descriptors {fds0} -> {fds1} after the flood");
}

/// Blank lines before a request head are allowed (RFC 9112 2.2), but not without bound: a peer
/// sending nothing but CRLF must be refused once it has sent more than `max_head_bytes`, like any
/// oversized head, not buffered up to the whole input cap (head + message + 16 KiB per connection).
#[test]
fn endless_blank_lines_are_refused_like_an_oversized_head() {
    let _g = heavy();
    let d = Daemon::start_with(&base().set("limits", "head_timeout_secs", "10"));
    let pid = d.pid();
    let rss0 = rss_kb(pid);
    let (stop, sampler) = rss_sampler(pid);
    let n = 60;
    // 60 connections, each writing 1.5 MB of CRLF (more than the input cap) in parallel; a daemon
    // that refuses them makes the writes fail, one that buffers them makes them stall.
    let writers: Vec<_> = (0..n)
        .map(|_| {
            let addr = d.browser;
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
                let chunk = b"\r\n".repeat(16 * 1024);
                let mut sent = 0;
                while sent < 1_500_000 {
                    match s.write(&chunk) {
                        Ok(k) => sent += k,
                        Err(_) => break,
                    }
                }
                (s, sent)
            })
        })
        .collect();
    let mut conns: Vec<(TcpStream, usize)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    thread::sleep(ms(1500));
    stop.store(true, Ordering::SeqCst);
    let rss1 = sampler.join().unwrap();
    let mut refused = 0;
    let mut first: Option<String> = None;
    for (s, _) in conns.iter_mut() {
        s.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let open = poll_read(s, &mut got).is_some();
        if !open || !got.is_empty() {
            refused += 1;
        }
        if first.is_none() {
            first = Some(String::from_utf8_lossy(&got[..got.len().min(40)]).into_owned());
        }
    }
    let sent: usize = conns.iter().map(|c| c.1).sum();
    println!(
        "{n} connections sent {} kB of CRLF in all: VmRSS {rss0} -> peak {rss1} kB ({:+} kB); answered or closed: {refused}; first answer: {first:?}",
        sent / 1024,
        rss1 as i64 - rss0 as i64
    );
    assert!(rss1 < rss0 + 10_240, "VmRSS grew by {} kB holding blank lines for {n} connections", rss1 as i64 - rss0 as i64);
    assert_eq!(refused, n, "CRLF floods were buffered instead of refused (431) past max_head_bytes = 8192");
}

/// Sends `frame` from a second thread (it may be larger than the socket buffers) while waiting
/// up to 5 s for the reply; returns the reply and how the write went.
fn send_big(r: &mut Resp, frame: Vec<u8>) -> (std::io::Result<Reply>, Result<(), String>) {
    let mut w = r.stream.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let writer = thread::spawn(move || w.write_all(&frame).map_err(|e| e.to_string()));
    r.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reply = r.try_reply();
    (reply, writer.join().unwrap())
}

/// A RESP command within the caps (each bulk <= max_message_bytes, <= 1024 arguments) but larger
/// than the input buffer cap (max_head_bytes + max_message_bytes + 16 KiB) must be answered or
/// refused, not left hanging forever with the connection stuck.
#[test]
fn control_frame_over_the_input_cap_is_not_left_hanging() {
    let _g = heavy();
    let d = Daemon::start_with(&base().set("limits", "max_message_bytes", "1048576"));
    let big = vec![b'a'; 1_000_000];
    let (reply, wrote) = send_big(&mut d.backend(), encode(&[b"PUBLISH", &big, &big]));
    println!("2 MB PUBLISH (1 MB channel id, 1 MB message): write {wrote:?}, reply {reply:?}");
    match reply {
        Ok(Reply::Error(e)) => assert!(e.contains("invalid channel id") || e.contains("Protocol"), "{e}"),
        Ok(other) => panic!("unexpected reply {other}"),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof || e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no reply and no close within 5 s ({e}); the daemon stopped reading at its input cap and the command hangs (write: {wrote:?})"),
    }
    // A command with many arguments, each within the caps, is the same case.
    let arg = vec![b'b'; 1100];
    let args: Vec<&[u8]> = std::iter::once(&b"ECHO"[..]).chain(std::iter::repeat(&arg[..]).take(1000)).collect();
    let (reply, wrote) = send_big(&mut d.backend(), encode(&args));
    println!("ECHO with 1000 x 1100-byte arguments (1.1 MB): write {wrote:?}, reply {reply:?}");
    match reply {
        Ok(Reply::Error(_)) => {}
        Ok(other) => panic!("unexpected reply {other}"),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof || e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no reply and no close within 5 s ({e}) for a 1.1 MB command within the caps"),
    }
}

/// Cross-protocol requests: a web page can make a browser POST to the control socket on
/// loopback, its body being inline commands. Redis closes a connection whose command is `POST` or
/// `Host:` ("possible SECURITY ATTACK detected"); comet follows Redis's parser, and without tokens
/// (allowed on loopback) nothing else stands in the way.
#[test]
fn control_socket_drops_http_requests_like_redis() {
    let d = Daemon::start_with(&base().remove_section("control.tokens"));
    let body = "PUBLISH xproto pwned\r\n";
    let req = format!("POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let mut c = d.control();
    c.send_raw(req.as_bytes());
    let mut replies = Vec::new();
    c.stream.set_read_timeout(Some(ms(500))).unwrap();
    while let Ok(r) = c.try_reply() {
        replies.push(r.to_string());
    }
    let info = d.admin().request(&get("/pub?id=xproto", &[]));
    println!("HTTP POST to the control socket: replies {replies:?}; channel xproto afterwards: {}", info.status);
    assert_eq!(
        info.status, 404,
        "the command in an HTTP body sent to the control socket ran (replies {replies:?}); Redis closes the connection on `POST` / `Host:`"
    );
}

/// Presence state made by anyone: a session cookie that polls a shared channel is a visitor,
/// online for `grace_secs`, even when the backend never opened that session. One connection
/// pipelining polls with made-up cookies must not grow the daemon without bound (here: 50,000
/// cookies in about a second).
#[test]
fn made_up_session_cookies_cost_bounded_memory() {
    let _g = heavy();
    let d = Daemon::start_with(&base().set("presence", "grace_secs", "5"));
    let pid = d.pid();
    d.publish("open", "hi");
    let mut warm = d.browser();
    assert_eq!(warm.request(&get("/sub/open", &[("Cookie", "PHPSESSID=warm")])).status, 200);
    drop(warm);
    thread::sleep(ms(200));
    let rss0 = rss_kb(pid);
    let n = 50_000;
    let mut c = d.browser();
    let mut w = c.stream.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut batch = String::with_capacity(n * 64);
        for i in 0..n {
            batch.push_str(&format!("GET /sub/open HTTP/1.1\r\nCookie: PHPSESSID=made-up-{i}\r\n\r\n"));
        }
        w.write_all(batch.as_bytes()).unwrap();
    });
    let t0 = Instant::now();
    for _ in 0..n {
        assert_eq!(c.response().status, 200);
    }
    let took = t0.elapsed();
    writer.join().unwrap();
    let online = d.backend().cmd(&["ONLINE", "COUNT"]).to_string();
    let rss1 = rss_kb(pid);
    println!(
        "{n} polls with made-up session cookies in {took:?}: ONLINE COUNT {online}; VmRSS {rss0} -> {rss1} kB ({:+} kB, {} bytes per cookie)",
        rss1 as i64 - rss0 as i64,
        (rss1 as i64 - rss0 as i64) * 1024 / n as i64
    );
    // Sessions nobody vouched for (not opened by the backend, no user from an access check) are
    // tracked only up to [limits] max_connections (19,000 by default); beyond, their polls count
    // as anonymous. So presence memory is bounded by that cap, not by request rate x grace.
    assert_eq!(online, ":19000", "made-up sessions beyond the cap must not be tracked");
    assert!(
        rss1 < rss0 + 19_000 * 3 / 2,
        "VmRSS grew {} kB for {n} made-up session cookies (ONLINE COUNT {online}): more than 1.5 KiB per tracked session",
        rss1 as i64 - rss0 as i64
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Slowloris, silent and idle connections
// ---------------------------------------------------------------------------------------------

#[test]
fn slowloris_connections_are_closed_at_head_timeout() {
    let _g = heavy();
    // idle_timeout = head_timeout: silent connections' timers share a queue with idle ones (see
    // silent_connection_is_closed_on_time_while_another_idles), kept apart from this test.
    let cfg = base().set("limits", "head_timeout_secs", "2").set("limits", "idle_timeout_secs", "2");
    let mut d = Daemon::start_with(&cfg);
    let canary = Canary::start(&d, "canary");
    let n = 2000;
    let silent = 100;
    let addr = d.browser;
    let (tx, rx) = mpsc::channel();
    let connectors: Vec<_> = (0..4)
        .map(|w| {
            let tx = tx.clone();
            thread::spawn(move || {
                for i in (w..n + silent).step_by(4) {
                    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect #{i}: {e}"));
                    let _ = s.set_nodelay(true);
                    let at = Instant::now();
                    // A trickler's first byte goes at once (else it is a silent connection).
                    let first = (i < n).then(|| s.write_all(b"G").map(|_| Instant::now()).ok()).flatten();
                    s.set_nonblocking(true).unwrap();
                    tx.send((i, s, at, first)).unwrap();
                }
            })
        })
        .collect();
    drop(tx);
    for c in connectors {
        c.join().unwrap();
    }
    let mut all: Vec<(usize, TcpStream, Instant, Option<Instant>)> = rx.iter().collect();
    all.sort_by_key(|c| c.0);
    let request = b"GET /sub/slow HTTP/1.1\r\nHost: slow.test\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    // first byte time, bytes sent, closed at, answer
    let first: Vec<Option<Instant>> = all.iter().map(|c| c.3).collect();
    let mut sent: Vec<usize> = first.iter().map(|f| usize::from(f.is_some())).collect();
    let mut conns: Vec<(usize, TcpStream, Instant)> = all.into_iter().map(|c| (c.0, c.1, c.2)).collect();
    let mut closed: Vec<Option<Instant>> = vec![None; n + silent];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); n + silent];
    let start = Instant::now();
    let mut next_tick = start + Duration::from_secs(1);
    let deadline = start + Duration::from_secs(6);
    while Instant::now() < deadline && closed.iter().any(|c| c.is_none()) {
        if Instant::now() >= next_tick {
            // One byte on every open trickler, once a second.
            for (i, s, _) in conns.iter_mut().take(n) {
                if closed[*i].is_some() {
                    continue;
                }
                match s.write(&request[sent[*i] % request.len()..][..1]) {
                    Ok(_) => sent[*i] += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {
                        closed[*i].get_or_insert_with(Instant::now);
                    }
                }
            }
            next_tick += Duration::from_secs(1);
        }
        for (i, s, _) in conns.iter_mut() {
            if closed[*i].is_none() && poll_read(s, &mut got[*i]).is_none() {
                closed[*i] = Some(Instant::now());
            }
        }
        thread::sleep(ms(25));
    }
    let report = canary.finish();
    let mut late = Vec::new();
    let mut early = 0;
    let mut with_408 = 0;
    let mut open = 0;
    let mut worst = Duration::ZERO;
    for (i, _, accepted) in &conns {
        let from = if *i < n { first[*i].unwrap_or(*accepted) } else { *accepted };
        match closed[*i] {
            None => open += 1,
            Some(at) => {
                let took = at.saturating_duration_since(from);
                worst = worst.max(took);
                if took > Duration::from_millis(3500) {
                    late.push((*i, took));
                }
                if took < Duration::from_millis(1800) {
                    early += 1;
                }
            }
        }
        if got[*i].starts_with(b"HTTP/1.1 408") {
            with_408 += 1;
        }
    }
    if std::env::var("COMET_HARDENING_VERBOSE").is_ok() {
        for (i, _, accepted) in conns.iter().step_by(97) {
            println!(
                "  conn {i}: accepted +{:?}, first byte +{:?}, closed +{:?}, sent {}, got {:?}",
                accepted.saturating_duration_since(start),
                first[*i].map(|f| f.saturating_duration_since(start)),
                closed[*i].map(|f| f.saturating_duration_since(start)),
                sent[*i],
                String::from_utf8_lossy(&got[*i][..got[*i].len().min(20)])
            );
        }
    }
    println!(
        "slowloris: {n} tricklers + {silent} silent: still open {open}, closed late (> 3.5 s) {}, closed early (< 1.8 s) {early}, answered 408 first {with_408}, slowest close {worst:?}",
        late.len()
    );
    assert!(alive(&mut d));
    assert_eq!(open, 0, "connections still open 6 s after their first byte");
    assert!(late.is_empty(), "closed later than head_timeout + 1.5 s: {:?}", &late[..late.len().min(10)]);
    assert_eq!(early, 0, "connections closed before head_timeout");
    assert!(with_408 >= n * 9 / 10, "tricklers should mostly get a 408 before the close: {with_408} of {n}");
    report.assert_exact();
    assert!(report.max_latency < ms(500), "canary latency {:?} under slowloris", report.max_latency);
}

/// An idle keep-alive browser connection is closed `idle_timeout_secs` after its last answer
/// (here 1 s, with the default head_timeout_secs = 10).
#[test]
fn idle_keepalive_connection_is_closed_after_idle_timeout() {
    let d = Daemon::start_with(&base().set("limits", "idle_timeout_secs", "1"));
    d.publish("idle", "m");
    let mut c = d.browser();
    assert_eq!(c.request(&get("/sub/idle", &[])).status, 200);
    let (at, bytes) = wait_closed(&mut c.stream, Duration::from_secs(3));
    println!("idle keep-alive closed after {at:?}");
    if at.is_none() {
        // Evidence: when does it close?
        let (later, _) = wait_closed(&mut c.stream, Duration::from_secs(9));
        panic!(
            "idle keep-alive connection still open 3 s after its answer (idle_timeout_secs = 1); it closed {:?} after that. \
             The connection's first timer (head_timeout, 10 s, pushed at accept) and its idle timer (1 s) share the FIFO \
             timers.idle, which fire_timers pops only while the front entry is due: the 1 s entry waits behind the 10 s one.",
            later.map(|l| l + Duration::from_secs(3))
        );
    }
    let at = at.unwrap();
    assert!(bytes.is_empty(), "bytes before the close: {:?}", String::from_utf8_lossy(&bytes));
    assert!(at >= ms(800) && at <= ms(2500), "closed after {at:?}, want about 1 s");
}

/// A connection that sends nothing is closed after head_timeout.
#[test]
fn silent_connection_is_closed_after_head_timeout() {
    let d = Daemon::start_with(&base().set("limits", "head_timeout_secs", "2"));
    let mut s = TcpStream::connect(d.browser).unwrap();
    let (at, bytes) = wait_closed(&mut s, Duration::from_secs(5));
    println!("silent connection closed after {at:?}, sent {:?}", String::from_utf8_lossy(&bytes));
    let at = at.expect("silent connection still open 5 s after connecting (head_timeout_secs = 2)");
    assert!(at >= ms(1800) && at <= ms(3500), "closed after {at:?}, want about 2 s");
}

/// The same, while another connection idles between keep-alive requests with a longer
/// `idle_timeout_secs`: every timer must fire on time, whatever other timers are pending.
#[test]
fn silent_connection_is_closed_on_time_while_another_idles() {
    let d = Daemon::start_with(&base().set("limits", "head_timeout_secs", "2").set("limits", "idle_timeout_secs", "8"));
    d.publish("t", "m");
    let mut keep = d.browser();
    assert_eq!(keep.request(&get("/sub/t", &[])).status, 200);
    let mut s = TcpStream::connect(d.browser).unwrap();
    let (at, _) = wait_closed(&mut s, Duration::from_secs(4));
    println!("silent connection (another idling, idle_timeout 8 s) closed after {at:?}");
    if at.is_none() {
        let (later, _) = wait_closed(&mut s, Duration::from_secs(7));
        panic!(
            "silent connection still open 4 s after connecting (head_timeout_secs = 2); it closed {:?} after connecting, \
             when the idle keep-alive connection's 8 s timer ahead of it in the FIFO timers.idle fired (server.rs: admit \
             pushes head_timeout entries into timers.idle, finish_request pushes idle_timeout entries there; fire_timers \
             pops only due entries from the front). With the defaults (10 s / 120 s) a silent connection lives up to 120 s.",
            later.map(|l| l + Duration::from_secs(4))
        );
    }
    assert!(at.unwrap() <= ms(3500), "closed after {at:?}, want about 2 s");
}

// ---------------------------------------------------------------------------------------------
// 4. Descriptors: max_connections and EMFILE
// ---------------------------------------------------------------------------------------------

#[test]
fn max_connections_refuses_the_51st_with_503() {
    let _g = heavy();
    let d = Daemon::start_with(&base().set("limits", "max_connections", "50"));
    d.publish("mc", "m");
    thread::sleep(ms(200)); // the publishing backend's connection is reaped
    let mut conns: Vec<Http> = (0..50).map(|_| d.browser()).collect();
    for c in conns.iter_mut() {
        assert_eq!(c.request(&get("/sub/mc", &[])).status, 200);
    }
    // The 51st, on each listener.
    let mut extra = d.browser();
    let r = extra.try_response().expect("the 51st browser connection gets an answer");
    assert_eq!(r.status, 503, "51st browser connection:\n{r}");
    extra.expect_closed();
    let mut extra = d.admin();
    let r = extra.try_response().expect("the 51st admin connection gets an answer");
    assert_eq!(r.status, 503, "51st admin connection:\n{r}");
    let mut extra = d.control();
    assert_eq!(extra.try_reply().expect("a reply on the control socket").to_string(), "-ERR max number of clients reached");
    // The 50 keep working.
    for c in conns.iter_mut() {
        assert_eq!(c.request(&get("/sub/mc", &[])).status, 200);
    }
    // Close 10; new ones are accepted.
    conns.truncate(40);
    thread::sleep(ms(300));
    let mut fresh = d.browser();
    assert_eq!(fresh.request(&get("/sub/mc", &[])).status, 200, "a new connection after some closed");
    drop(fresh);
    thread::sleep(ms(200));
    let info = d.info();
    println!("INFO rejected_connections:{} total_connections_received:{}", info["rejected_connections"], info["total_connections_received"]);
    assert!(info["rejected_connections"].parse::<u64>().unwrap() >= 3);
}

#[test]
fn out_of_descriptors_does_not_spin_or_hurt_existing_connections() {
    let _g = heavy();
    let u = Daemon::start_with_nofile(&base(), 128);
    let pid = u.pid();
    let mut backend = Resp::connect(u.control);
    assert_eq!(backend.cmd(&["AUTH", TOKEN]).to_string(), "+OK");
    backend.cmd(&["PUBLISH", "ready", "r"]);
    let mut held = Http::connect(u.browser);
    held.send(&get("/sub/emfile?last_event_id=1:0", &[]));
    thread::sleep(ms(100));
    let fds0 = fds(pid);
    // 200 more: the daemon runs out of descriptors part way.
    let mut conns: Vec<TcpStream> = (0..200).map(|i| TcpStream::connect(u.browser).unwrap_or_else(|e| panic!("connect #{i}: {e}"))).collect();
    thread::sleep(ms(500));
    let at_limit = fds(pid);
    let cpu0 = cpu_secs(pid);
    thread::sleep(Duration::from_secs(1));
    let cpu = cpu_secs(pid) - cpu0;
    let warnings = u.logs().iter().filter(|l| l.contains("accept")).count();
    println!("EMFILE: daemon fds {fds0} -> {at_limit} (limit 128); CPU over 1 s at the limit: {cpu:.2} s; accept warnings so far: {warnings}");
    assert!(cpu < 0.2, "the daemon used {cpu:.2} s of CPU in 1 s while out of descriptors: it spins");
    assert!(at_limit >= 120, "the daemon should be at its descriptor limit, has {at_limit}");
    // The held poll still gets its message.
    assert_eq!(backend.cmd(&["PUBLISH", "emfile", "still here"]), Reply::Integer(1), "publish to the held poll");
    held.set_timeout(Duration::from_secs(2));
    let r = held.try_response().expect("held poll answered while the daemon is out of descriptors");
    assert_eq!(r.text(), "still here");
    // An accepted connection still works: the first of the 200.
    conns[0].set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    conns[0].write_all(get("/sub/ready", &[]).as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    let n = conns[0].read(&mut buf).unwrap_or(0);
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "an accepted connection at the limit: {:?}", String::from_utf8_lossy(&buf[..n]));
    // Close 100 (the first ones, accepted); the backlog drains and a new connection is served.
    conns.drain(..100);
    let t0 = Instant::now();
    let mut fresh = Http::connect(u.browser);
    fresh.set_timeout(Duration::from_millis(1500));
    fresh.send(&get("/sub/ready", &[]));
    let r = fresh.try_response();
    let took = t0.elapsed();
    println!("after closing 100: a new connection answered in {took:?}: {:?}", r.as_ref().map(|r| r.status));
    assert_eq!(r.expect("a new connection is served within 1.5 s after 100 closed").status, 200);
    // The rest of the 200 (left in the backlog while the daemon was out) were accepted too.
    let mut served = 0;
    for s in conns.iter_mut().skip(1) {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        if s.write_all(get("/sub/ready", &[]).as_bytes()).is_ok() {
            let n = s.read(&mut buf).unwrap_or(0);
            if buf[..n].starts_with(b"HTTP/1.1 200") {
                served += 1;
            }
        }
    }
    println!("backlogged connections served after the descriptors came back: {served} of {}", conns.len() - 1);
    assert_eq!(served, conns.len() - 1, "connections left in the backlog were not all served");
}

// ---------------------------------------------------------------------------------------------
// 5. Slow readers
// ---------------------------------------------------------------------------------------------

/// Samples the daemon's VmRSS every 10 ms until stopped; returns the peak.
fn rss_sampler(pid: u32) -> (Arc<AtomicBool>, JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = thread::spawn(move || {
        let mut peak = 0;
        while !s.load(Ordering::SeqCst) {
            peak = peak.max(rss_kb(pid));
            thread::sleep(ms(10));
        }
        peak.max(rss_kb(pid))
    });
    (stop, h)
}

#[test]
fn slow_backend_subscriber_is_cut_at_max_output_bytes() {
    let _g = heavy();
    let cfg = base()
        .set("limits", "max_message_bytes", "204800")
        .set("limits", "max_output_bytes", "1048576")
        // Small enough that the buffered 100 KB messages do not hide the output cap in the RSS
        // figure, large enough that the canary (a message every 20 ms) never falls out of it
        // while the loop works through the 50 MB.
        .set("channels", "buffer_length", "16");
    let d = Daemon::start_with(&cfg);
    let pid = d.pid();
    let canary = Canary::start(&d, "canary");
    let mut sub = d.backend();
    assert_eq!(sub.cmd(&["SUBSCRIBE", "goods"]).to_string(), "*3[$subscribe, $goods, :1]");
    // Warm up the allocator with a few messages the subscriber does read.
    let mut publisher = d.backend();
    let payload = vec![b'p'; 100 * 1024];
    let payload_str = String::from_utf8(payload.clone()).unwrap();
    for _ in 0..3 {
        publisher.cmd(&["PUBLISH", "goods", &payload_str]);
        sub.reply();
    }
    thread::sleep(ms(200));
    let rss0 = rss_kb(pid);
    let (stop, sampler) = rss_sampler(pid);
    // 500 x 100 KB = 50 MB at a subscriber that never reads again; replies read as they come.
    let frame = encode(&[b"PUBLISH", b"goods", &payload]);
    let mut w = publisher.stream.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for _ in 0..500 {
            w.write_all(&frame).unwrap();
        }
    });
    let mut delivered = Vec::new();
    for _ in 0..500 {
        match publisher.reply() {
            Reply::Integer(n) => delivered.push(n),
            other => panic!("PUBLISH: {other}"),
        }
    }
    writer.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    let report = canary.finish();
    let cut = info_num(&d, "slow_readers_cut");
    let reached = delivered.iter().filter(|&&n| n == 1).count();
    // The subscriber's socket: what the kernel buffered, then the close.
    sub.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let end = loop {
        match sub.stream.read(&mut buf) {
            Ok(0) => break "EOF",
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break "RST",
            Err(_) => break "still open",
        }
    };
    println!(
        "slow backend: PUBLISH reached it {reached} times of 500; slow_readers_cut {cut}; it could still read {total} bytes then {end}; VmRSS {rss0} -> peak {peak} kB ({:+} kB)",
        peak as i64 - rss0 as i64
    );
    report.assert_exact();
    assert!(cut >= 1, "INFO slow_readers_cut = {cut}");
    assert_ne!(end, "still open", "the slow subscriber was not cut");
    assert!(
        peak < rss0 + 8 * 1024 && reached < 500,
        "VmRSS peaked {} kB over the start (max_output_bytes = 1 MiB) and PUBLISH counted the subscriber {reached} times of 500 \
         although it was cut: after `kill` marks it dead, the subscriber stays in backend_subs until the reap before the \
         next poll, and to_backends keeps pushing every pipelined message into its output queue (and counting it) for \
         the rest of the turn -- a turn that lasts as long as the publisher's socket has data",
        peak as i64 - rss0 as i64
    );
}

#[test]
fn answers_the_socket_takes_in_part_are_finished_in_order() {
    // A small answer goes straight from the loop's scratch buffer to the socket, and what the
    // socket does not take is queued. A client pipelining thousands of polls, each answered at
    // once, and reading none of it for a while fills its socket somewhere inside an answer; every
    // answer must still arrive whole and in order once it reads.
    let _g = heavy();
    let cfg = base().set("limits", "max_message_bytes", "1024").set("limits", "max_output_bytes", "65536");
    let d = Daemon::start_with(&cfg);
    d.publish("small", "m1");
    let poll = get("/sub/small", &[("If-Modified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")]);
    // The length of one answer (all are the same message; the Date line has a fixed width).
    let mut one = d.browser();
    one.send(&poll);
    let r = one.response();
    assert_eq!((r.status, &r.body[..]), (200, &b"m1"[..]));
    let mut probe = TcpStream::connect(d.browser).unwrap();
    probe.write_all(poll.as_bytes()).unwrap();
    probe.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"\r\n\r\nm1") {
        let n = probe.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let len = answer.len();

    const POLLS: usize = 40_000;
    let mut s = TcpStream::connect(d.browser).unwrap();
    let mut w = s.try_clone().unwrap();
    let batch = poll.repeat(POLLS);
    let writer = thread::spawn(move || w.write_all(batch.as_bytes()));
    // Meanwhile the answers fill both sockets' buffers, then the connection's queue, and the
    // daemon stops reading its requests until this client reads.
    thread::sleep(ms(500));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::with_capacity(POLLS * len);
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < POLLS * len {
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("after {} bytes of {}: {e}", got.len(), POLLS * len));
        assert!(n > 0, "closed after {} bytes of {}", got.len(), POLLS * len);
        got.extend_from_slice(&buf[..n]);
    }
    writer.join().unwrap().unwrap();
    assert_eq!(got.len(), POLLS * len, "nothing after the last answer");
    for (i, a) in got.chunks(len).enumerate() {
        assert!(a.starts_with(b"HTTP/1.1 200 OK\r\n") && a.ends_with(b"\r\n\r\nm1"), "answer {i}: {:?}", String::from_utf8_lossy(a));
    }
}

#[test]
fn pipelining_browser_that_never_reads_costs_bounded_memory() {
    let _g = heavy();
    let cfg = base()
        .set("limits", "max_message_bytes", "204800")
        .set("limits", "max_output_bytes", "1048576")
        .set("limits", "idle_timeout_secs", "2")
        .set("channels", "buffer_length", "1");
    let mut d = Daemon::start_with(&cfg);
    let pid = d.pid();
    let big = "B".repeat(100 * 1024);
    d.publish("big", &big);
    let mut warm = d.browser();
    assert_eq!(warm.request(&get("/sub/big", &[])).status, 200);
    drop(warm);
    thread::sleep(ms(200));
    let rss0 = rss_kb(pid);
    let (stop, sampler) = rss_sampler(pid);
    // Ten browsers pipelining polls (shared message bytes) and ten pipelining /comet.js (bytes
    // owned by each connection), none reading. Each writes until its socket stops taking bytes.
    let writers: Vec<_> = (0..20)
        .map(|i| {
            let addr = d.browser;
            thread::spawn(move || {
                let s = TcpStream::connect(addr).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
                let one = if i % 2 == 0 { get("/sub/big", &[]) } else { get("/comet.js", &[]) };
                let batch = one.repeat(100);
                let mut sent = 0usize;
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(3) {
                    match (&s).write(batch.as_bytes()) {
                        Ok(n) => sent += n,
                        Err(_) => break,
                    }
                }
                (s, sent)
            })
        })
        .collect();
    let mut socks = Vec::new();
    let mut sent_total = 0;
    for w in writers {
        let (s, sent) = w.join().unwrap();
        sent_total += sent;
        socks.push(s);
    }
    thread::sleep(ms(300));
    stop.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    let rss1 = rss_kb(pid);
    // Another client is served meanwhile.
    let mut other = d.browser();
    assert_eq!(other.request(&get("/sub/big", &[])).status, 200);
    // Are the non-readers ever closed? (no write progress for longer than idle_timeout_secs)
    thread::sleep(Duration::from_secs(3));
    let mut still_open = 0;
    for s in socks.iter_mut() {
        s.set_nonblocking(true).unwrap();
        let mut sink = Vec::new();
        if poll_read(s, &mut sink).is_some() {
            still_open += 1;
        }
    }
    let rss2 = rss_kb(pid);
    println!(
        "20 pipelining non-readers sent {} kB of requests; VmRSS {rss0} -> peak {peak} -> {rss1} kB ({:+} kB); after 3 more s: {rss2} kB, {still_open} of 20 still open (no write timeout)",
        sent_total / 1024,
        peak as i64 - rss0 as i64
    );
    assert!(alive(&mut d));
    assert!(peak < rss0 + 16 * 1024, "VmRSS grew {} kB with 20 non-reading browsers (max_output_bytes 1 MiB)", peak as i64 - rss0 as i64);
    assert!(sent_total < 200 * 1024 * 1024, "the daemon kept reading pipelined requests it could not answer: {} MB", sent_total >> 20);
}

// ---------------------------------------------------------------------------------------------
// 6. Churn
// ---------------------------------------------------------------------------------------------

/// `n` connect/poll/close cycles with RST (SO_LINGER 0) from a Python child; half on a channel
/// with a buffered message (answered), half held then reset.
fn python_rst_cycles(addr: SocketAddr, n: usize) -> std::process::Child {
    let script = r#"
import socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
done = 0
for i in range(n):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    ch = 'churn-ready' if i % 2 == 0 else 'churn-held%d' % (i % 7)
    s.sendall(('GET /sub/%s HTTP/1.1\r\nHost: churn\r\n\r\n' % ch).encode())
    if i % 2 == 0:
        s.settimeout(5)
        buf = b''
        while b'\r\n\r\n' not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    s.close()
    done += 1
print(done)
"#;
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(n.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 for the RST half of the churn")
}

/// `n` connect/poll/close cycles ended with FIN, on 4 threads.
fn fin_cycles(addr: SocketAddr, n: usize) {
    let hs: Vec<_> = (0..4)
        .map(|w| {
            thread::spawn(move || {
                for i in (w..n).step_by(4) {
                    let mut c = Http::connect(addr);
                    if i % 2 == 0 {
                        assert_eq!(c.request(&get("/sub/churn-ready", &[])).status, 200);
                    } else {
                        c.send(&get(&format!("/sub/churn-held{}", i % 7), &[]));
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

fn churn_round(addr: SocketAddr, n: usize) {
    let py = python_rst_cycles(addr, n / 2);
    fin_cycles(addr, n - n / 2);
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success(), "python RST churn failed");
    let done: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    assert_eq!(done, n / 2, "python RST cycles done");
}

#[test]
fn churn_leaves_no_descriptors_or_memory() {
    let _g = heavy();
    let d = Daemon::start_with(&base());
    let pid = d.pid();
    d.publish("churn-ready", "m");
    let soak = std::env::var("COMET_SOAK_SECS").ok().and_then(|s| s.parse::<u64>().ok());
    churn_round(d.browser, 500);
    thread::sleep(ms(500));
    let (rss0, fds0) = (rss_kb(pid), fds(pid));
    println!("churn baseline: VmRSS {rss0} kB, fds {fds0}");
    let mut cycles = 0;
    let t0 = Instant::now();
    match soak {
        None => {
            churn_round(d.browser, 5000);
            cycles += 5000;
        }
        Some(secs) => {
            let mut next_report = Duration::from_secs(10);
            while t0.elapsed() < Duration::from_secs(secs) {
                churn_round(d.browser, 1000);
                cycles += 1000;
                if t0.elapsed() >= next_report {
                    println!("soak t={:>4}s cycles={cycles:>8} VmRSS={} kB fds={}", t0.elapsed().as_secs(), rss_kb(pid), fds(pid));
                    next_report += Duration::from_secs(10);
                }
            }
        }
    }
    let took = t0.elapsed();
    thread::sleep(Duration::from_millis(1500));
    let (rss1, fds1) = (rss_kb(pid), fds(pid));
    let info = d.info();
    println!(
        "churn: {cycles} cycles in {took:?} (half RST); VmRSS {rss0} -> {rss1} kB ({:+} kB), fds {fds0} -> {fds1}; INFO connected_browsers:{} held_polls:{} channels:{}",
        rss1 as i64 - rss0 as i64,
        info["connected_browsers"],
        info["held_polls"],
        info["channels"]
    );
    assert_eq!(info["connected_browsers"], "0");
    assert_eq!(info["held_polls"], "0");
    assert!(fds1 <= fds0 + 2, "descriptors {fds0} -> {fds1} after churn");
    assert!(rss1 <= rss0 + 2048, "VmRSS {rss0} -> {rss1} kB after churn");
}

/// A backend that sent a large `PUBLISH` and then sits idle keeps no input buffer: 40 connections
/// each publish one message of almost 1 MiB and stay open, and the daemon's RSS does not grow by
/// their 40 MiB of input (the channel keeps one message: `buffer_length = 1`).
#[test]
fn idle_backends_keep_no_input_buffer() {
    let _g = heavy();
    let d = Daemon::start_with(&base().set("channels", "buffer_length", "1"));
    let body = "x".repeat(1_000_000);
    let mut first = d.backend();
    assert_eq!(first.cmd(&["PUBLISH", "big", &body]).to_string(), ":0");
    let before = rss_kb(d.pid());
    let mut idle = Vec::new();
    for _ in 0..40 {
        let mut b = d.backend();
        assert_eq!(b.cmd(&["PUBLISH", "big", &body]).to_string(), ":0");
        idle.push(b);
    }
    let grown = rss_kb(d.pid()).saturating_sub(before);
    assert!(grown < 16 * 1024, "VmRSS grew by {grown} kB with 40 idle backends that each sent 1 MB once");
    // They are still served.
    assert_eq!(idle[39].cmd(&["PING"]).to_string(), "+PONG");
}
