//! `comet-churn`: the load generator of `scripts/bench-presence`. It plays thousands of browser
//! sessions (one mio loop, one thread) that long-poll comet, re-poll on kept-alive connections
//! when a message answers them, and vanish at random (socket dropped, shut down, or reset with
//! unread bytes), coming back sooner or later than the presence grace. A second thread publishes
//! so that held polls get answered. It follows the `__presence__` events meanwhile, and checks
//! each `offline` against what it did (a session must go offline one grace after its last poll
//! ended: not before, not much later).
//!
//! When the churn ends every session either holds one poll or has gone; after grace + settle it
//! compares what it knows (the truth) with `ONLINE`, `ONLINE COUNT`, `PRESENCE`, `PUBSUB NUMSUB`,
//! the presence table in SQLite and the state replayed from the events, prints the figures, and
//! says MATCH (exit 0) or MISMATCH (exit 1). Loopback only, bounded in time.
//!
//! It is a program that prints figures, not a test.

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const HELP: &str = "\
comet-churn: presence churn load generator for comet (see scripts/bench-presence)

USAGE: comet-churn --http ADDR --control ADDR [OPTIONS]

OPTIONS:
    --http ADDR        comet's browser listener (127.0.0.1:port)
    --control ADDR     comet's control listener
    --token T          control token secret (none: no AUTH)
    --db PATH          comet's [presence] database (without it, rows are not compared)
    --table NAME       [presence] table (comet_online)
    --instance NAME    [presence] instance (comet)
    --grace SECS       comet's [presence] grace_secs (5)
    --sessions N       sessions, one connection at a time each (2000)
    --anon N           anonymous pollers (200)
    --channels N       shared channels room0..room<N-1> (10); some sessions are also JOINed to lobby
    --secs N           churn duration (60)
    --settle SECS      longest wait for everything to agree after the grace (15)
    --publish-ms MS    one PUBLISH to a random channel every MS (50)
    --server-pid PID   comet's pid: its CPU time and RSS are printed
    --seed N           random seed (from the clock)
";

// =============================================================================================
// Command line
// =============================================================================================

struct Opts {
    http: SocketAddr,
    control: SocketAddr,
    token: Option<String>,
    db: Option<PathBuf>,
    table: String,
    instance: String,
    grace: Duration,
    sessions: usize,
    anon: usize,
    channels: usize,
    secs: u64,
    settle: Duration,
    publish_every: Duration,
    server_pid: Option<u32>,
    seed: u64,
}

fn parse_args() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        http: "127.0.0.1:8100".parse().unwrap(),
        control: "127.0.0.1:8101".parse().unwrap(),
        token: None,
        db: None,
        table: "comet_online".into(),
        instance: "comet".into(),
        grace: Duration::from_secs(5),
        sessions: 2000,
        anon: 200,
        channels: 10,
        secs: 60,
        settle: Duration::from_secs(15),
        publish_every: Duration::from_millis(50),
        server_pid: None,
        seed: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1),
    };
    let (mut http, mut control) = (false, false);
    while let Some(a) = args.next() {
        if a == "-h" || a == "--help" {
            print!("{HELP}");
            std::process::exit(0);
        }
        let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{a}: {v:?} is not a number"));
        match a.as_str() {
            "--http" => {
                o.http = v.parse().map_err(|e| format!("--http {v}: {e}"))?;
                http = true;
            }
            "--control" => {
                o.control = v.parse().map_err(|e| format!("--control {v}: {e}"))?;
                control = true;
            }
            "--token" => o.token = Some(v),
            "--db" => o.db = Some(v.into()),
            "--table" => o.table = v,
            "--instance" => o.instance = v,
            "--grace" => o.grace = Duration::from_secs(num(&v)?.max(1)),
            "--sessions" => o.sessions = num(&v)? as usize,
            "--anon" => o.anon = num(&v)? as usize,
            "--channels" => o.channels = (num(&v)? as usize).max(1),
            "--secs" => o.secs = num(&v)?.max(1),
            "--settle" => o.settle = Duration::from_secs(num(&v)?),
            "--publish-ms" => o.publish_every = Duration::from_millis(num(&v)?.max(1)),
            "--server-pid" => o.server_pid = Some(num(&v)? as u32),
            "--seed" => o.seed = num(&v)?,
            _ => return Err(format!("unknown option {a}")),
        }
    }
    if !http || !control {
        return Err("--http and --control are required".into());
    }
    for addr in [o.http, o.control] {
        if !addr.ip().is_loopback() {
            return Err(format!("{addr}: loopback addresses only"));
        }
    }
    if !o.table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("--table {:?}: letters, digits and _ only", o.table));
    }
    Ok(o)
}

// =============================================================================================
// Small pieces: random numbers, RESP, HTTP responses, /proc
// =============================================================================================

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 11) % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo).max(1)))
    }
}

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    fn text(&self) -> String {
        match self {
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Resp::Simple(s) => s.clone(),
            other => format!("{other:?}"),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One RESP value from the front of `buf`: Ok(None) when incomplete.
fn parse_resp(buf: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    let Some(eol) = find(buf, b"\r\n") else { return Ok(None) };
    if eol == 0 {
        return Err("empty RESP line".into());
    }
    let line = String::from_utf8_lossy(&buf[1..eol]).into_owned();
    let after = eol + 2;
    let int = |s: &str| s.parse::<i64>().map_err(|_| format!("bad RESP integer {s:?}"));
    Ok(Some(match buf[0] {
        b'+' => (Resp::Simple(line), after),
        b'-' => (Resp::Error(line), after),
        b':' => (Resp::Int(int(&line)?), after),
        b'$' => {
            let n = int(&line)?;
            if n < 0 {
                (Resp::Bulk(None), after)
            } else {
                let n = n as usize;
                if buf.len() < after + n + 2 {
                    return Ok(None);
                }
                (Resp::Bulk(Some(buf[after..after + n].to_vec())), after + n + 2)
            }
        }
        b'*' => {
            let n = int(&line)?;
            if n < 0 {
                (Resp::Array(None), after)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                let mut pos = after;
                for _ in 0..n {
                    match parse_resp(&buf[pos..])? {
                        Some((r, used)) => {
                            items.push(r);
                            pos += used;
                        }
                        None => return Ok(None),
                    }
                }
                (Resp::Array(Some(items)), pos)
            }
        }
        other => return Err(format!("unknown RESP type byte {:?}", other as char)),
    }))
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// A blocking control connection.
struct Control {
    s: std::net::TcpStream,
    buf: Vec<u8>,
}

impl Control {
    fn connect(addr: SocketAddr, token: Option<&str>) -> io::Result<Control> {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = Control { s, buf: Vec::new() };
        if let Some(t) = token {
            match c.cmd(&["AUTH", t])? {
                Resp::Simple(ok) if ok == "OK" => {}
                other => return Err(io::Error::other(format!("AUTH: {other:?}"))),
            }
        }
        Ok(c)
    }

    fn send(&mut self, args: &[&str]) -> io::Result<()> {
        self.s.write_all(&encode(args))
    }

    fn reply(&mut self) -> io::Result<Resp> {
        loop {
            match parse_resp(&self.buf).map_err(io::Error::other)? {
                Some((r, n)) => {
                    self.buf.drain(..n);
                    return Ok(r);
                }
                None => {
                    let mut chunk = [0u8; 65536];
                    let n = self.s.read(&mut chunk)?;
                    if n == 0 {
                        return Err(io::Error::new(ErrorKind::UnexpectedEof, "control connection closed"));
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    fn cmd(&mut self, args: &[&str]) -> io::Result<Resp> {
        self.send(args)?;
        self.reply()
    }

    fn int(&mut self, args: &[&str]) -> io::Result<i64> {
        match self.cmd(args)? {
            Resp::Int(n) => Ok(n),
            other => Err(io::Error::other(format!("{args:?}: expected an integer, got {other:?}"))),
        }
    }

    /// A flat `sid user sid user ...` reply as a map.
    fn pairs(&mut self, args: &[&str]) -> io::Result<BTreeMap<String, String>> {
        match self.cmd(args)? {
            Resp::Array(Some(items)) => Ok(items.chunks(2).map(|p| (p[0].text(), p.get(1).map(Resp::text).unwrap_or_default())).collect()),
            other => Err(io::Error::other(format!("{args:?}: expected an array, got {other:?}"))),
        }
    }
}

/// One parsed HTTP response head + body length used.
struct HttpResp {
    status: u16,
    last_modified: Option<String>,
    etag: Option<String>,
    used: usize,
}

fn parse_http(buf: &[u8]) -> Result<Option<HttpResp>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else { return Ok(None) };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let (mut cl, mut lm, mut etag) = (None, None, None);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                cl = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("last-modified") {
                lm = Some(v.to_string());
            } else if k.eq_ignore_ascii_case("etag") {
                etag = Some(v.to_string());
            }
        }
    }
    let cl = cl.ok_or("response without Content-Length")?;
    if buf.len() < end + 4 + cl {
        return Ok(None);
    }
    Ok(Some(HttpResp { status, last_modified: lm, etag, used: end + 4 + cl }))
}

/// (CPU seconds, RSS KiB) of a process, from /proc.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks as f64 / 100.0, rss))
}

// =============================================================================================
// Sessions
// =============================================================================================

/// How a poll's connection ends when the page goes away.
#[derive(Clone, Copy, PartialEq)]
enum End {
    Drop,
    Shutdown,
    /// A request answered at once (404) is pipelined before the poll and never read: closing a
    /// socket with unread bytes sends a reset.
    Reset,
}

enum State {
    /// No connection; the next one starts at `at` (None: never again).
    Off { at: Option<Instant> },
    /// Connecting to `ch`.
    Connecting { s: TcpStream, ch: usize, end_at: Instant, how: End },
    /// A poll on `ch` sent at `sent`, not answered; the connection ends at `end_at` (before
    /// the churn ends) the way `how` says.
    Polling { s: TcpStream, ch: usize, sent: Instant, end_at: Instant, how: End, buf: Vec<u8> },
}

struct Slot {
    /// Session id; None: anonymous.
    sid: Option<String>,
    user: String,
    /// JOINed to lobby by the backend.
    joined: bool,
    state: State,
    /// When its last poll ended, as this side saw it; None when unknown (a reset-bound
    /// connection never reads, so a publish may have ended its poll earlier).
    last_end: Option<Instant>,
    /// Cursor on the channel last polled: (channel, Last-Modified, Etag).
    cursor: Option<(usize, String, String)>,
}

#[derive(Default)]
struct Counters {
    connects: u64,
    connect_errors: u64,
    polls: u64,
    answered: u64,
    repolls: u64,
    leave_after_answer: u64,
    drops: u64,
    shutdowns: u64,
    resets: u64,
    server_closed: u64,
    bad_status: BTreeMap<u16, u64>,
    io_errors: u64,
}

/// The presence events, replayed.
#[derive(Default)]
struct Replay {
    online: BTreeMap<String, String>,
    on: BTreeMap<String, BTreeSet<String>>,
    counts: BTreeMap<&'static str, u64>,
    anomalies: Vec<String>,
    /// For each `offline`: how long after its last poll ended (as this side saw it), minus grace.
    offline_lag_ms: Vec<i64>,
    /// `offline` of a session holding a poll sent well before.
    offline_while_polling: u64,
}

impl Replay {
    fn anomaly(&mut self, s: String) {
        if self.anomalies.len() < 20 {
            self.anomalies.push(s);
        } else if self.anomalies.len() == 20 {
            self.anomalies.push("...".into());
        }
        *self.counts.entry("anomalies").or_default() += 1;
    }

    fn apply(&mut self, e: &str) {
        let w: Vec<&str> = e.split(' ').collect();
        match w[..] {
            ["online", s] | ["online", s, _] => {
                *self.counts.entry("online").or_default() += 1;
                if self.online.insert(s.into(), w.get(2).unwrap_or(&"").to_string()).is_some() {
                    self.anomaly(format!("{e:?}: already online"));
                }
            }
            ["offline", s] => {
                *self.counts.entry("offline").or_default() += 1;
                if self.online.remove(s).is_none() {
                    self.anomaly(format!("{e:?}: was not online"));
                }
                if self.on.values().any(|m| m.contains(s)) {
                    self.anomaly(format!("{e:?}: still on a channel"));
                }
            }
            ["join", s, ch] => {
                *self.counts.entry("join").or_default() += 1;
                if !self.online.contains_key(s) {
                    self.anomaly(format!("{e:?}: not online"));
                }
                if !self.on.entry(ch.into()).or_default().insert(s.into()) {
                    self.anomaly(format!("{e:?}: joined twice"));
                }
            }
            ["leave", s, ch] => {
                *self.counts.entry("leave").or_default() += 1;
                if !self.on.get_mut(ch).is_some_and(|m| m.remove(s)) {
                    self.anomaly(format!("{e:?}: leave without join"));
                }
            }
            _ => self.anomaly(format!("unknown event {e:?}")),
        }
    }
}

/// Online sessions (user), channel -> sessions on it, channel -> anonymous polls on it.
type Truth = (BTreeMap<String, String>, BTreeMap<String, BTreeSet<String>>, BTreeMap<String, u64>);

const SUBSCRIBER: Token = Token(usize::MAX - 1);

struct Churn {
    o: Opts,
    poll: Poll,
    slots: Vec<Slot>,
    rng: Rng,
    c: Counters,
    replay: Replay,
    sub: TcpStream,
    sub_buf: Vec<u8>,
    /// When the churn stops: no more ends, no new connections.
    stop_at: Instant,
    frozen: bool,
    sid_index: BTreeMap<String, usize>,
}

fn channel_name(i: usize) -> String {
    format!("room{i}")
}

impl Churn {
    fn request(&self, i: usize, ch: usize, with_cursor: bool, reset: bool) -> Vec<u8> {
        let slot = &self.slots[i];
        let mut head = String::new();
        let cookie = slot.sid.as_ref().map(|s| format!("Cookie: PHPSESSID={s}\r\n")).unwrap_or_default();
        if reset {
            head.push_str(&format!("GET /not-here HTTP/1.1\r\nHost: push.test\r\n{cookie}\r\n"));
        }
        head.push_str(&format!("GET /sub/{} HTTP/1.1\r\nHost: push.test\r\n{cookie}", channel_name(ch)));
        if let (true, Some((c, lm, etag))) = (with_cursor, &slot.cursor) {
            if *c == ch {
                head.push_str(&format!("If-Modified-Since: {lm}\r\nIf-None-Match: {etag}\r\n"));
            }
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    /// Starts a connection for slot `i`.
    fn connect(&mut self, i: usize, now: Instant) {
        let ch = self.rng.below(self.o.channels as u64) as usize;
        let hold = self.rng.millis(200, 6000);
        let how = match self.rng.below(10) {
            0..=4 => End::Drop,
            5..=7 => End::Shutdown,
            _ => End::Reset,
        };
        match TcpStream::connect(self.o.http) {
            Ok(mut s) => {
                if let Err(e) = self.poll.registry().register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE) {
                    eprintln!("register: {e}");
                    self.c.connect_errors += 1;
                    self.slots[i].state = State::Off { at: Some(now + Duration::from_secs(1)) };
                    return;
                }
                self.c.connects += 1;
                self.slots[i].state = State::Connecting { s, ch, end_at: now + hold, how };
            }
            Err(_) => {
                self.c.connect_errors += 1;
                self.slots[i].state = State::Off { at: Some(now + Duration::from_secs(1)) };
            }
        }
    }

    /// Ends slot `i`'s connection (the page went away) and plans when it comes back.
    fn end(&mut self, i: usize, now: Instant) {
        let state = std::mem::replace(&mut self.slots[i].state, State::Off { at: None });
        let (mut s, how, polling) = match state {
            State::Connecting { s, how, .. } => (s, how, false),
            State::Polling { s, how, .. } => (s, how, true),
            off => {
                self.slots[i].state = off;
                return;
            }
        };
        let _ = self.poll.registry().deregister(&mut s);
        match how {
            End::Drop => self.c.drops += 1,
            End::Shutdown => {
                let _ = s.shutdown(Shutdown::Both);
                self.c.shutdowns += 1;
            }
            End::Reset => self.c.resets += 1,
        }
        drop(s);
        if polling {
            self.slots[i].last_end = if how == End::Reset { None } else { Some(now) };
        }
        // Back within the grace (no offline expected) or well after it (offline, then online).
        let grace = self.o.grace.as_millis() as u64;
        let off = if self.rng.chance(50) { self.rng.millis(0, grace / 2) } else { self.rng.millis(grace + 500, grace + 4000) };
        self.slots[i].state = State::Off { at: if self.frozen { None } else { Some(now + off) } };
    }

    /// Sends a (re-)poll on slot `i`'s connected socket.
    fn send_poll(&mut self, i: usize, now: Instant, repoll: bool) {
        let (ch, how) = match &self.slots[i].state {
            State::Connecting { ch, how, .. } | State::Polling { ch, how, .. } => (*ch, *how),
            State::Off { .. } => return,
        };
        let reset = how == End::Reset && !repoll;
        let req = self.request(i, ch, repoll, reset);
        let ok = match &mut self.slots[i].state {
            State::Connecting { s, .. } | State::Polling { s, .. } => s.write_all(&req).is_ok(),
            State::Off { .. } => false,
        };
        if !ok {
            self.c.io_errors += 1;
            self.end(i, now);
            return;
        }
        self.c.polls += 1;
        if repoll {
            self.c.repolls += 1;
        }
        let state = std::mem::replace(&mut self.slots[i].state, State::Off { at: None });
        self.slots[i].state = match state {
            State::Connecting { s, ch, end_at, how } => State::Polling { s, ch, sent: now, end_at, how, buf: Vec::new() },
            State::Polling { s, ch, end_at, how, buf, .. } => State::Polling { s, ch, sent: now, end_at, how, buf },
            off => off,
        };
    }

    fn on_ready(&mut self, i: usize, writable: bool, now: Instant) {
        if matches!(self.slots[i].state, State::Connecting { .. }) {
            if !writable {
                return;
            }
            let connected = match &self.slots[i].state {
                State::Connecting { s, .. } => matches!(s.take_error(), Ok(None)) && s.peer_addr().is_ok(),
                _ => false,
            };
            if !connected {
                self.c.connect_errors += 1;
                self.end(i, now);
                return;
            }
            let _ = match &self.slots[i].state {
                State::Connecting { s, .. } => s.set_nodelay(true),
                _ => Ok(()),
            };
            self.send_poll(i, now, false);
            return;
        }
        // Polling: a reset-bound connection never reads (its unread 404 makes the reset).
        let State::Polling { s, buf, how, .. } = &mut self.slots[i].state else { return };
        if *how == End::Reset {
            return;
        }
        let mut closed = false;
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        loop {
            let State::Polling { buf, ch, .. } = &mut self.slots[i].state else { return };
            let ch = *ch;
            let r = match parse_http(buf) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("bad response: {e}");
                    self.c.io_errors += 1;
                    self.end(i, now);
                    return;
                }
            };
            buf.drain(..r.used);
            self.slots[i].last_end = Some(now);
            match r.status {
                200 | 408 => {
                    if r.status == 200 {
                        self.c.answered += 1;
                    }
                    if let (Some(lm), Some(etag)) = (r.last_modified, r.etag) {
                        self.slots[i].cursor = Some((ch, lm, etag));
                    }
                    if !self.frozen && self.rng.chance(4) {
                        // The visitor followed a link: the page (and its poll) goes away.
                        self.c.leave_after_answer += 1;
                        self.end(i, now);
                        return;
                    }
                    self.send_poll(i, now, true);
                }
                other => {
                    *self.c.bad_status.entry(other).or_default() += 1;
                    self.end(i, now);
                    return;
                }
            }
        }
        if closed {
            self.c.server_closed += 1;
            self.end(i, now);
        }
    }

    /// Reads `__presence__` messages and replays them, checking each `offline` against what
    /// this side did.
    fn on_events(&mut self, now: Instant) -> Result<(), String> {
        let mut chunk = [0u8; 65536];
        loop {
            match self.sub.read(&mut chunk) {
                Ok(0) => return Err("the __presence__ subscription was closed".into()),
                Ok(n) => self.sub_buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("__presence__ read: {e}")),
            }
        }
        while let Some((r, n)) = parse_resp(&self.sub_buf)? {
            self.sub_buf.drain(..n);
            let Resp::Array(Some(items)) = &r else { return Err(format!("unexpected frame {r:?}")) };
            if items.len() != 3 || items[0].text() != "message" || items[1].text() != "__presence__" {
                return Err(format!("unexpected frame {r:?}"));
            }
            let e = items[2].text();
            self.replay.apply(&e);
            if let Some(sid) = e.strip_prefix("offline ") {
                let Some(&i) = self.sid_index.get(sid) else {
                    self.replay.anomaly(format!("{e:?}: unknown session"));
                    continue;
                };
                match &self.slots[i].state {
                    State::Polling { sent, how, .. } if *how != End::Reset && now.duration_since(*sent) > Duration::from_millis(500) => {
                        self.replay.offline_while_polling += 1;
                        self.replay.anomaly(format!("{e:?} while it holds a poll sent {:?} ago", now.duration_since(*sent)));
                    }
                    State::Polling { .. } | State::Connecting { .. } => {} // came back just now
                    State::Off { .. } => {
                        if let Some(end) = self.slots[i].last_end {
                            let lag = now.duration_since(end).as_millis() as i64 - self.o.grace.as_millis() as i64;
                            self.replay.offline_lag_ms.push(lag);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One turn of the loop: readiness, then due starts and ends.
    fn turn(&mut self, events: &mut Events, timeout: Duration) -> Result<(), String> {
        self.poll.poll(events, Some(timeout)).map_err(|e| format!("poll: {e}"))?;
        let now = Instant::now();
        let ready: Vec<(Token, bool)> = events.iter().map(|e| (e.token(), e.is_writable())).collect();
        for (t, w) in ready {
            if t == SUBSCRIBER {
                self.on_events(now)?;
            } else {
                self.on_ready(t.0, w, now);
            }
        }
        if !self.frozen && now >= self.stop_at {
            self.freeze(now);
        }
        if !self.frozen {
            for i in 0..self.slots.len() {
                match &self.slots[i].state {
                    State::Off { at: Some(at) } if *at <= now => self.connect(i, now),
                    State::Polling { end_at, .. } | State::Connecting { end_at, .. } if *end_at <= now => self.end(i, now),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The churn ends: reset-bound connections (whose answers are never read) go, every other
    /// poll stays held, nobody comes back.
    fn freeze(&mut self, now: Instant) {
        self.frozen = true;
        for i in 0..self.slots.len() {
            match &self.slots[i].state {
                State::Polling { how: End::Reset, .. } | State::Connecting { how: End::Reset, .. } => self.end(i, now),
                State::Off { .. } => self.slots[i].state = State::Off { at: None },
                _ => {}
            }
        }
    }

    /// What presence must say now: online sessions (user), channel -> sessions, channel ->
    /// anonymous polls. Connections still connecting count as polling (settle lets them land).
    fn truth(&self) -> Truth {
        let (mut online, mut on, mut anon) = (BTreeMap::new(), BTreeMap::<String, BTreeSet<String>>::new(), BTreeMap::<String, u64>::new());
        for s in &self.slots {
            let ch = match &s.state {
                State::Polling { ch, .. } | State::Connecting { ch, .. } => *ch,
                State::Off { .. } => continue,
            };
            match &s.sid {
                Some(sid) => {
                    online.insert(sid.clone(), s.user.clone());
                    on.entry(channel_name(ch)).or_default().insert(sid.clone());
                    if s.joined {
                        on.entry("lobby".into()).or_default().insert(sid.clone());
                    }
                }
                None => *anon.entry(channel_name(ch)).or_default() += 1,
            }
        }
        (online, on, anon)
    }
}

/// The rows of this instance: sessions online (channel '') with users, channel -> sessions.
type Rows = (BTreeMap<String, String>, BTreeMap<String, BTreeSet<String>>, u64);

fn read_rows(db: &std::path::Path, table: &str, instance: &str) -> Result<Rows, String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| e.to_string())?;
    c.busy_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let mut st = c.prepare(&format!("SELECT session, user, channel FROM {table} WHERE daemon = ?1")).map_err(|e| e.to_string())?;
    let mut online = BTreeMap::new();
    let mut on: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut dups = 0;
    let rows = st
        .query_map([instance], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?)))
        .map_err(|e| e.to_string())?;
    for r in rows {
        let (s, u, ch) = r.map_err(|e| e.to_string())?;
        let fresh = if ch.is_empty() { online.insert(s, u.unwrap_or_default()).is_none() } else { on.entry(ch).or_default().insert(s) };
        if !fresh {
            dups += 1;
        }
    }
    Ok((online, on, dups))
}

fn diff_sets(what: &str, got: &BTreeSet<String>, want: &BTreeSet<String>, out: &mut Vec<String>) {
    if got != want {
        let extra: Vec<_> = got.difference(want).take(5).collect();
        let missing: Vec<_> = want.difference(got).take(5).collect();
        out.push(format!("{what}: {} vs truth {} (extra {extra:?}, missing {missing:?})", got.len(), want.len()));
    }
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("comet-churn: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match run(o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("comet-churn: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(o: Opts) -> Result<bool, String> {
    let hard_deadline = Instant::now() + Duration::from_secs(o.secs) + o.grace + o.settle + Duration::from_secs(60);
    let token = o.token.clone();
    let mut ctl = Control::connect(o.control, token.as_deref()).map_err(|e| format!("control {}: {e}", o.control))?;
    let mut rng = Rng(o.seed | 1);

    // Sessions: opened by the backend (nine in ten with a user id), one in ten JOINed to lobby.
    let mut slots = Vec::new();
    let mut sid_index = BTreeMap::new();
    for i in 0..o.sessions {
        let sid = format!("cs{i}");
        let user = if i % 10 == 9 { String::new() } else { format!("u{i}") };
        let joined = i % 10 == 3;
        if user.is_empty() {
            ctl.send(&["SESSION.OPEN", &sid]).map_err(|e| e.to_string())?;
        } else {
            ctl.send(&["SESSION.OPEN", &sid, &user]).map_err(|e| e.to_string())?;
        }
        if joined {
            ctl.send(&["JOIN", &sid, "lobby"]).map_err(|e| e.to_string())?;
        }
        sid_index.insert(sid.clone(), slots.len());
        slots.push(Slot { sid: Some(sid), user, joined, state: State::Off { at: None }, last_end: None, cursor: None });
    }
    for s in &slots {
        match ctl.reply().map_err(|e| e.to_string())? {
            Resp::Simple(ok) if ok == "OK" => {}
            other => return Err(format!("SESSION.OPEN: {other:?}")),
        }
        if s.joined {
            match ctl.reply().map_err(|e| e.to_string())? {
                Resp::Int(1) => {}
                other => return Err(format!("JOIN: {other:?}")),
            }
        }
    }
    for _ in 0..o.anon {
        slots.push(Slot { sid: None, user: String::new(), joined: false, state: State::Off { at: None }, last_end: None, cursor: None });
    }

    // The event subscriber, set up blocking, then handed to the loop.
    let mut sub = Control::connect(o.control, token.as_deref()).map_err(|e| format!("control {}: {e}", o.control))?;
    match sub.cmd(&["SUBSCRIBE", "__presence__"]).map_err(|e| e.to_string())? {
        Resp::Array(Some(a)) if a.len() == 3 && a[0].text() == "subscribe" => {}
        other => return Err(format!("SUBSCRIBE __presence__: {other:?}")),
    }
    let leftover = std::mem::take(&mut sub.buf);
    sub.s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut sub_stream = TcpStream::from_std(sub.s);
    let poll = Poll::new().map_err(|e| e.to_string())?;
    poll.registry().register(&mut sub_stream, SUBSCRIBER, Interest::READABLE).map_err(|e| e.to_string())?;

    let usage0 = o.server_pid.and_then(proc_usage);
    let start = Instant::now();
    // Starts spread over the first two seconds.
    for s in &mut slots {
        s.state = State::Off { at: Some(start + rng.millis(0, 2000)) };
    }
    let stop_at = start + Duration::from_secs(o.secs);

    // The publisher: one message to a random channel every --publish-ms, until shortly before
    // the churn stops (the polls left then stay held).
    let published = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let pub_stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (published, delivered, pub_stop) = (published.clone(), delivered.clone(), pub_stop.clone());
        let (addr, token, channels, every, seed) = (o.control, token.clone(), o.channels, o.publish_every, o.seed);
        let until = stop_at - Duration::from_millis(300);
        thread::spawn(move || -> Result<(), String> {
            let mut c = Control::connect(addr, token.as_deref()).map_err(|e| e.to_string())?;
            let mut rng = Rng(seed.rotate_left(17) | 1);
            let mut n = 0u64;
            while Instant::now() < until && !pub_stop.load(Ordering::Relaxed) {
                let ch = channel_name(rng.below(channels as u64) as usize);
                let got = c.int(&["PUBLISH", &ch, &format!("tick {n}")]).map_err(|e| e.to_string())?;
                n += 1;
                published.store(n, Ordering::Relaxed);
                delivered.fetch_add(got.max(0) as u64, Ordering::Relaxed);
                thread::sleep(every);
            }
            Ok(())
        })
    };

    let mut ch = Churn {
        o,
        poll,
        slots,
        rng,
        c: Counters::default(),
        replay: Replay::default(),
        sub: sub_stream,
        sub_buf: leftover,
        stop_at,
        frozen: false,
        sid_index,
    };
    let mut events = Events::with_capacity(4096);
    let mut last_line = start;
    let (mut peak_online, mut peak_polls) = (0usize, 0usize);
    println!(
        "comet-churn: {} sessions + {} anonymous pollers, {} channels (+ lobby), {} s churn, grace {} s, seed {}",
        ch.o.sessions,
        ch.o.anon,
        ch.o.channels,
        ch.o.secs,
        ch.o.grace.as_secs(),
        ch.o.seed
    );
    while Instant::now() < stop_at {
        ch.turn(&mut events, Duration::from_millis(20))?;
        if last_line.elapsed() >= Duration::from_secs(if ch.o.secs <= 20 { 2 } else { 10 }) {
            last_line = Instant::now();
            let polling = ch.slots.iter().filter(|s| matches!(s.state, State::Polling { .. })).count();
            let connecting = ch.slots.iter().filter(|s| matches!(s.state, State::Connecting { .. })).count();
            peak_polls = peak_polls.max(polling);
            peak_online = peak_online.max(ch.replay.online.len());
            println!(
                "  t={:>3}s polling={polling} connecting={connecting} online(events)={} connects={} polls={} answered={} offline-events={}",
                start.elapsed().as_secs(),
                ch.replay.online.len(),
                ch.c.connects,
                ch.c.polls,
                ch.c.answered,
                ch.replay.counts.get("offline").copied().unwrap_or(0)
            );
        }
    }
    pub_stop.store(true, Ordering::Relaxed);
    match publisher.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("publisher: {e}")),
        Err(_) => return Err("publisher panicked".into()),
    }
    let churn_secs = start.elapsed().as_secs_f64();
    let churn_events: u64 = ["online", "offline", "join", "leave"].iter().map(|k| ch.replay.counts.get(k).copied().unwrap_or(0)).sum();
    if !ch.frozen {
        ch.freeze(Instant::now());
    }

    // Grace: everything that went is gone after it; then wait for every view to agree.
    let frozen_at = Instant::now();
    while frozen_at.elapsed() < ch.o.grace + Duration::from_millis(500) {
        ch.turn(&mut events, Duration::from_millis(20))?;
    }
    let channels: Vec<String> = (0..ch.o.channels).map(channel_name).chain(["lobby".to_string()]).collect();
    let settle_start = Instant::now();
    let mut last_diffs;
    let mut figures;
    loop {
        // Drain what arrived (events, late answers) before looking.
        for _ in 0..5 {
            ch.turn(&mut events, Duration::from_millis(10))?;
        }
        let (t_online, t_on, t_anon) = ch.truth();
        let mut diffs = Vec::new();
        let d_online = ctl.pairs(&["ONLINE"]).map_err(|e| e.to_string())?;
        let d_count = ctl.int(&["ONLINE", "COUNT"]).map_err(|e| e.to_string())?;
        let rows = match &ch.o.db {
            Some(db) => Some(read_rows(db, &ch.o.table, &ch.o.instance)?),
            None => None,
        };
        if d_online != t_online {
            let got: BTreeSet<String> = d_online.keys().cloned().collect();
            let want: BTreeSet<String> = t_online.keys().cloned().collect();
            diff_sets("ONLINE", &got, &want, &mut diffs);
            if got == want {
                diffs.push("ONLINE: user ids differ".into());
            }
        }
        if d_count != t_online.len() as i64 {
            diffs.push(format!("ONLINE COUNT {d_count} vs truth {}", t_online.len()));
        }
        let ev_online: BTreeSet<String> = ch.replay.online.keys().cloned().collect();
        let t_online_set: BTreeSet<String> = t_online.keys().cloned().collect();
        diff_sets("online from events", &ev_online, &t_online_set, &mut diffs);
        if let Some((r_online, _, dups)) = &rows {
            if *r_online != t_online {
                let got: BTreeSet<String> = r_online.keys().cloned().collect();
                diff_sets("table online rows", &got, &t_online_set, &mut diffs);
                if got == t_online_set {
                    diffs.push("table: user ids differ".into());
                }
            }
            if *dups > 0 {
                diffs.push(format!("table: {dups} duplicate rows"));
            }
        }
        figures = vec![(
            "online".to_string(),
            t_online.len() as u64,
            0u64,
            d_count as u64,
            d_count as u64,
            rows.as_ref().map(|r| r.0.len() as u64),
            ch.replay.online.len() as u64,
        )];
        for c in &channels {
            let want = t_on.get(c).cloned().unwrap_or_default();
            let anon = t_anon.get(c).copied().unwrap_or(0);
            let presence: BTreeSet<String> = ctl.pairs(&["PRESENCE", c]).map_err(|e| e.to_string())?.into_keys().collect();
            let numsub = match ctl.cmd(&["PUBSUB", "NUMSUB", c]).map_err(|e| e.to_string())? {
                Resp::Array(Some(a)) if a.len() == 2 => match a[1] {
                    Resp::Int(n) => n as u64,
                    _ => u64::MAX,
                },
                other => return Err(format!("PUBSUB NUMSUB {c}: {other:?}")),
            };
            diff_sets(&format!("PRESENCE {c}"), &presence, &want, &mut diffs);
            if numsub != want.len() as u64 + anon {
                diffs.push(format!("PUBSUB NUMSUB {c} {numsub} vs truth {} sessions + {anon} anonymous", want.len()));
            }
            let ev: BTreeSet<String> = ch.replay.on.get(c).cloned().unwrap_or_default();
            diff_sets(&format!("{c} from events"), &ev, &want, &mut diffs);
            let table = rows.as_ref().map(|r| r.1.get(c).cloned().unwrap_or_default());
            if let Some(t) = &table {
                diff_sets(&format!("table rows of {c}"), t, &want, &mut diffs);
            }
            figures.push((c.clone(), want.len() as u64, anon, presence.len() as u64, numsub, table.map(|t| t.len() as u64), ev.len() as u64));
        }
        if let Some((_, r_on, _)) = &rows {
            for c in r_on.keys().filter(|c| !channels.contains(c)) {
                diffs.push(format!("table has rows of channel {c:?} nobody polled"));
            }
        }
        last_diffs = diffs;
        if last_diffs.is_empty() || settle_start.elapsed() >= ch.o.settle || Instant::now() >= hard_deadline {
            break;
        }
        let pause = Instant::now() + Duration::from_millis(250);
        while Instant::now() < pause {
            ch.turn(&mut events, Duration::from_millis(20))?;
        }
    }
    let settled = settle_start.elapsed();
    let usage1 = ch.o.server_pid.and_then(proc_usage);
    let info = match ctl.cmd(&["INFO"]).map_err(|e| e.to_string())? {
        Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        _ => String::new(),
    };
    let info_get = |k: &str| info.lines().find_map(|l| l.strip_prefix(&format!("{k}:"))).unwrap_or("?").trim().to_string();

    // ---- figures ----
    let c = &ch.c;
    println!();
    println!("churn ({churn_secs:.1} s):");
    println!(
        "  connections {} ({:.0}/s), polls {} ({:.0}/s), answered by a publish {}, re-polls on kept-alive connections {}",
        c.connects,
        c.connects as f64 / churn_secs,
        c.polls,
        c.polls as f64 / churn_secs,
        c.answered,
        c.repolls
    );
    println!(
        "  pages gone: dropped {}, shut down {}, reset {}, left after an answer {}; publishes {} (reached {} held polls at once)",
        c.drops,
        c.shutdowns,
        c.resets,
        c.leave_after_answer,
        published.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed)
    );
    let bad: Vec<String> = c.bad_status.iter().map(|(s, n)| format!("{s}x{n}")).collect();
    println!(
        "  errors: connect {}, io {}, closed by the server {}, unexpected statuses [{}]; peak polling {}, peak online {}",
        c.connect_errors,
        c.io_errors,
        c.server_closed,
        bad.join(" "),
        peak_polls,
        peak_online
    );
    let r = &ch.replay;
    let n = |k: &str| r.counts.get(k).copied().unwrap_or(0);
    println!(
        "presence events: online {} offline {} join {} leave {} ({:.0}/s during the churn)",
        n("online"),
        n("offline"),
        n("join"),
        n("leave"),
        churn_events as f64 / churn_secs
    );
    let mut lags = r.offline_lag_ms.clone();
    lags.sort_unstable();
    if !lags.is_empty() {
        let p = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
        let early = lags.iter().filter(|&&l| l < -200).count();
        println!(
            "  offline after last poll end, minus grace (ms): min {} p50 {} p99 {} max {}; early (< -200 ms) {early}; offline while polling {}",
            p(0.0),
            p(0.5),
            p(0.99),
            p(1.0),
            r.offline_while_polling
        );
    }
    println!("  event anomalies: {}", n("anomalies"));
    for a in &r.anomalies {
        println!("    {a}");
    }
    if let (Some((cpu0, _)), Some((cpu1, rss))) = (usage0, usage1) {
        println!("comet: cpu {:.2} s over the run, rss {} KiB; INFO held_polls {} connected_browsers {}", cpu1 - cpu0, rss, info_get("held_polls"), info_get("connected_browsers"));
    } else {
        println!("comet: INFO held_polls {} connected_browsers {}", info_get("held_polls"), info_get("connected_browsers"));
    }
    println!();
    println!("after grace + {:.1} s settle:", settled.as_secs_f64());
    println!(
        "  {:<10} {:>9} {:>6} {:>9} {:>7} {:>7} {:>7}",
        "", "truth", "+anon", "PRESENCE", "NUMSUB", "table", "events"
    );
    for (name, truth, anon, presence, numsub, table, ev) in &figures {
        let table = table.map(|t| t.to_string()).unwrap_or_else(|| "-".into());
        let (presence, numsub) = if name == "online" {
            (format!("{presence}"), format!("({numsub})"))
        } else {
            (presence.to_string(), numsub.to_string())
        };
        println!("  {name:<10} {truth:>9} {anon:>6} {presence:>9} {numsub:>7} {table:>7} {ev:>7}");
    }
    println!("  (online row: ONLINE COUNT under PRESENCE; table: rows with channel '' / of the channel)");
    let ok = last_diffs.is_empty() && n("anomalies") == 0;
    if ok {
        println!("MATCH");
    } else {
        for d in &last_diffs {
            println!("  {d}");
        }
        println!("MISMATCH");
    }
    Ok(ok)
}
