//! `comet-churn`: the load generator of `scripts/bench-presence`. It plays thousands of browser
//! sessions (one mio loop, one thread) that long-poll comet, re-poll on kept-alive connections
//! when a message answers them, and vanish at random (socket dropped, shut down, or reset with
//! unread bytes), coming back sooner or later than the presence grace. A second thread publishes
//! so that held polls get answered. It follows the `__presence__` events meanwhile, and checks
//! each `offline` against what it did (a session must go offline one grace after its last poll
//! ended: not before, not much later).
//!
//! Against a cluster (`--http` and `--control` list every node, comma separated) each new
//! connection goes to a random node, and after an answer a session may re-poll on a new
//! connection to another node (`--switch`), as behind a balancer without stickiness. Publishes
//! go to random nodes; the events are followed on the first node only (they are the cluster's).
//!
//! When the churn ends every session either holds one poll or has gone; after grace (+ the node
//! timeout in a cluster) + settle it compares what it knows (the truth) with what every node
//! answers to `ONLINE`, `ONLINE COUNT`, `PRESENCE`, `PUBSUB NUMSUB` and `INFO`, with the presence
//! table in SQLite (each node's rows, and all of them together) and with the state replayed from
//! the events, prints the figures, and says MATCH (exit 0) or MISMATCH (exit 1). With `--redis`
//! it also counts the commands Redis ran during the churn (`INFO commandstats`) per poll started
//! or ended.
//!
//! `--hold N` is another mode: N long-polls of N sessions held across the nodes (by several
//! child processes of this program when one could not hold that many sockets), then each node's
//! RSS growth per held poll.
//!
//! It is a program that prints figures, not a test. Loopback only, bounded in time.

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

const HELP: &str = "\
comet-churn: presence churn load generator for comet (see scripts/bench-presence)

USAGE: comet-churn --http ADDR[,ADDR...] --control ADDR[,ADDR...] [OPTIONS]

OPTIONS:
    --http ADDRS       comet's browser listener (127.0.0.1:port); a cluster: every node's, comma separated
    --control ADDRS    comet's control listener(s), in the same order
    --token T          control token secret (none: no AUTH)
    --db PATH          comet's [presence] database (without it, rows are not compared)
    --table NAME       [presence] table (comet_online)
    --instance NAMES   [presence] instance of each node, comma separated (comet; a cluster: its node names)
    --grace SECS       comet's [presence] grace_secs (5)
    --sessions N       sessions, one connection at a time each (2000)
    --anon N           anonymous pollers (200)
    --channels N       shared channels room0..room<N-1> (10); some sessions are also JOINed to lobby
    --secs N           churn duration (60)
    --settle SECS      longest wait for everything to agree after the grace (15)
    --publish-ms MS    one PUBLISH to a random channel every MS (50)
    --switch PCT       after an answer, the chance that the next poll goes on a new connection to
                       another node (25 with several nodes, 0 with one)
    --redis ADDR       the cluster's redis-server: its commands during the churn are counted, and
                       the checks wait the node timeout as well as the grace
    --node-timeout S   the cluster's node timeout (5)
    --server-pid PIDS  comet's pid(s), in node order: CPU time and RSS are printed
    --seed N           random seed (from the clock)

HOLD MODE:
    --hold N           open N sessions and hold one long-poll of each, spread over the nodes, then
                       print each node's RSS growth per held poll (needs --server-pid)
    --hold-procs P     generator processes holding them (N / 15000 rounded up; each < 19,000 sockets)
    --hold-secs S      longest a child process holds its polls (600)
    --hold-anon        the held polls carry no session cookie (anonymous; no sessions opened)
";

// =============================================================================================
// Command line
// =============================================================================================

struct Opts {
    http: Vec<SocketAddr>,
    control: Vec<SocketAddr>,
    token: Option<String>,
    db: Option<PathBuf>,
    table: String,
    instance: Vec<String>,
    grace: Duration,
    sessions: usize,
    anon: usize,
    channels: usize,
    secs: u64,
    settle: Duration,
    publish_every: Duration,
    switch: Option<u64>,
    redis: Option<SocketAddr>,
    node_timeout: Duration,
    server_pid: Vec<u32>,
    seed: u64,
    hold: usize,
    hold_procs: usize,
    hold_secs: u64,
    hold_anon: bool,
    /// A child of `--hold`: holds polls `a..b`.
    hold_child: Option<(usize, usize)>,
}

impl Opts {
    fn nodes(&self) -> usize {
        self.http.len()
    }
    fn cluster(&self) -> bool {
        self.redis.is_some() || self.http.len() > 1
    }
    /// The name of node `k` (its presence instance when known).
    fn name(&self, k: usize) -> String {
        if self.instance.len() == self.nodes() {
            self.instance[k].clone()
        } else {
            format!("node{}", k + 1)
        }
    }
}

fn addr_list(flag: &str, v: &str) -> Result<Vec<SocketAddr>, String> {
    v.split(',').filter(|s| !s.is_empty()).map(|s| s.trim().parse().map_err(|e| format!("{flag} {s}: {e}"))).collect()
}

fn parse_args() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        http: vec![],
        control: vec![],
        token: None,
        db: None,
        table: "comet_online".into(),
        instance: vec!["comet".into()],
        grace: Duration::from_secs(5),
        sessions: 2000,
        anon: 200,
        channels: 10,
        secs: 60,
        settle: Duration::from_secs(15),
        publish_every: Duration::from_millis(50),
        switch: None,
        redis: None,
        node_timeout: Duration::from_secs(5),
        server_pid: vec![],
        seed: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1),
        hold: 0,
        hold_procs: 0,
        hold_secs: 600,
        hold_anon: false,
        hold_child: None,
    };
    let mut instance_given = false;
    while let Some(a) = args.next() {
        if a == "-h" || a == "--help" {
            print!("{HELP}");
            std::process::exit(0);
        }
        if a == "--hold-anon" {
            o.hold_anon = true;
            continue;
        }
        let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{a}: {v:?} is not a number"));
        match a.as_str() {
            "--http" => o.http = addr_list("--http", &v)?,
            "--control" => o.control = addr_list("--control", &v)?,
            "--token" => o.token = Some(v),
            "--db" => o.db = Some(v.into()),
            "--table" => o.table = v,
            "--instance" => {
                o.instance = v.split(',').map(str::to_string).collect();
                instance_given = true;
            }
            "--grace" => o.grace = Duration::from_secs(num(&v)?.max(1)),
            "--sessions" => o.sessions = num(&v)? as usize,
            "--anon" => o.anon = num(&v)? as usize,
            "--channels" => o.channels = (num(&v)? as usize).max(1),
            "--secs" => o.secs = num(&v)?.max(1),
            "--settle" => o.settle = Duration::from_secs(num(&v)?),
            "--publish-ms" => o.publish_every = Duration::from_millis(num(&v)?.max(1)),
            "--switch" => o.switch = Some(num(&v)?.min(100)),
            "--redis" => o.redis = Some(v.parse().map_err(|e| format!("--redis {v}: {e}"))?),
            "--node-timeout" => o.node_timeout = Duration::from_secs(num(&v)?),
            "--server-pid" => o.server_pid = v.split(',').map(|p| num(p).map(|p| p as u32)).collect::<Result<_, _>>()?,
            "--seed" => o.seed = num(&v)?,
            "--hold" => o.hold = num(&v)? as usize,
            "--hold-procs" => o.hold_procs = num(&v)? as usize,
            "--hold-secs" => o.hold_secs = num(&v)?.max(1),
            "--hold-child" => {
                let (x, y) = v.split_once(':').ok_or("--hold-child A:B")?;
                o.hold_child = Some((num(x)? as usize, num(y)? as usize));
            }
            _ => return Err(format!("unknown option {a}")),
        }
    }
    if o.http.is_empty() || (o.control.is_empty() && o.hold_child.is_none()) {
        return Err("--http and --control are required".into());
    }
    if o.hold_child.is_none() && o.control.len() != o.http.len() {
        return Err(format!("{} --http addresses but {} --control addresses", o.http.len(), o.control.len()));
    }
    for addr in o.http.iter().chain(&o.control).chain(&o.redis) {
        if !addr.ip().is_loopback() {
            return Err(format!("{addr}: loopback addresses only"));
        }
    }
    if !o.table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("--table {:?}: letters, digits and _ only", o.table));
    }
    if o.nodes() > 1 && o.instance.len() != o.nodes() && (o.db.is_some() || instance_given) {
        return Err(format!("--instance: one name per node ({} nodes, {} names)", o.nodes(), o.instance.len()));
    }
    if o.nodes() == 1 && o.instance.len() != 1 {
        return Err("--instance: one name per node".into());
    }
    if !o.server_pid.is_empty() && o.server_pid.len() != o.nodes() {
        return Err(format!("--server-pid: one pid per node ({} nodes, {} pids)", o.nodes(), o.server_pid.len()));
    }
    Ok(o)
}

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


/// `key:value` lines of an `INFO` reply.
fn info_map(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect()
}

impl Control {
    /// `INFO [section]` as a map.
    fn info(&mut self, section: Option<&str>) -> io::Result<BTreeMap<String, String>> {
        let r = match section {
            Some(s) => self.cmd(&["INFO", s])?,
            None => self.cmd(&["INFO"])?,
        };
        match r {
            Resp::Bulk(Some(b)) => Ok(info_map(&String::from_utf8_lossy(&b))),
            other => Err(io::Error::other(format!("INFO: {other:?}"))),
        }
    }
}

fn info_num(m: &BTreeMap<String, String>, k: &str) -> Option<u64> {
    m.get(k).and_then(|v| v.parse().ok())
}

/// Redis's `INFO commandstats`: command -> calls (commands run inside scripts included).
fn commandstats(r: &mut Control) -> io::Result<BTreeMap<String, u64>> {
    let m = r.info(Some("commandstats"))?;
    Ok(m.iter()
        .filter_map(|(k, v)| {
            let cmd = k.strip_prefix("cmdstat_")?;
            let calls = v.split(',').find_map(|f| f.strip_prefix("calls="))?.parse().ok()?;
            Some((cmd.to_string(), calls))
        })
        .collect())
}

/// Commands a script cannot run: what Redis counts of them came from its clients.
const TOP_LEVEL: [&str; 12] =
    ["evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "subscribe", "unsubscribe", "psubscribe", "punsubscribe", "script|load", "info", "auth"];

/// Raises the soft open-file limit to the hard one; answers the soft limit then.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        r.rlim_cur
    }
}

/// The loopback ephemeral port range (first, last).
fn port_range() -> Option<(u32, u32)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
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
    /// Connecting to node `node` for a poll on `ch`; `resume`: with the cursor (the session moves
    /// to another node after an answer).
    Connecting { s: TcpStream, node: usize, ch: usize, end_at: Instant, how: End, resume: bool },
    /// A poll on `ch` at node `node` sent at `sent`; the connection ends at `end_at` (before
    /// the churn ends) the way `how` says.
    Polling { s: TcpStream, node: usize, ch: usize, sent: Instant, end_at: Instant, how: End, buf: Vec<u8> },
}

struct Slot {
    /// Session id; None: anonymous.
    sid: Option<String>,
    user: String,
    /// JOINed to lobby by the backend.
    joined: bool,
    state: State,
    /// A poll was sent and has not ended (as this side knows).
    outstanding: bool,
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
    /// Polls ended: answered, or their connection gone.
    poll_ends: u64,
    answered: u64,
    repolls: u64,
    /// Re-polls on a new connection to another node.
    switches: u64,
    leave_after_answer: u64,
    drops: u64,
    shutdowns: u64,
    resets: u64,
    server_closed: u64,
    bad_status: BTreeMap<u16, u64>,
    io_errors: u64,
    /// Connections per node.
    per_node: Vec<u64>,
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
    /// The last few events of each session (for the report of an anomaly).
    recent: BTreeMap<String, VecDeque<(f64, String)>>,
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

    fn apply(&mut self, e: &str, t: f64) {
        let w: Vec<&str> = e.split(' ').collect();
        if let Some(sid) = w.get(1) {
            let q = self.recent.entry(sid.to_string()).or_default();
            q.push_back((t, e.to_string()));
            if q.len() > 6 {
                q.pop_front();
            }
        }
        let history = |r: &Replay, s: &str| -> String {
            r.recent.get(s).map(|q| q.iter().map(|(t, e)| format!("{t:.3}s {e:?}")).collect::<Vec<_>>().join(", ")).unwrap_or_default()
        };
        match w[..] {
            ["online", s] | ["online", s, _] => {
                *self.counts.entry("online").or_default() += 1;
                if self.online.insert(s.into(), w.get(2).unwrap_or(&"").to_string()).is_some() {
                    let h = history(self, s);
                    self.anomaly(format!("{e:?}: already online (no offline between; its last events: {h})"));
                }
            }
            ["offline", s] => {
                *self.counts.entry("offline").or_default() += 1;
                if self.online.remove(s).is_none() {
                    let h = history(self, s);
                    self.anomaly(format!("{e:?}: was not online (its last events: {h})"));
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
                    let h = history(self, s);
                    self.anomaly(format!("{e:?}: joined twice (its last events: {h})"));
                }
            }
            ["leave", s, ch] => {
                *self.counts.entry("leave").or_default() += 1;
                if !self.on.get_mut(ch).is_some_and(|m| m.remove(s)) {
                    let h = history(self, s);
                    self.anomaly(format!("{e:?}: leave without join (its last events: {h})"));
                }
            }
            _ => self.anomaly(format!("unknown event {e:?}")),
        }
    }
}

/// What presence must say, for the cluster or for one node: online sessions (user), channel ->
/// sessions on it, channel -> anonymous polls on it, polls held.
#[derive(Default, Clone)]
struct Truth {
    online: BTreeMap<String, String>,
    on: BTreeMap<String, BTreeSet<String>>,
    anon: BTreeMap<String, u64>,
    polls: u64,
}

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
    /// Percent of answers after which the next poll goes to another node.
    switch: u64,
    start: Instant,
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

    /// Starts a connection for slot `i`: to a random node and channel, or (`resume`: channel
    /// and node it leaves) on the same channel at another node, with its cursor.
    fn connect(&mut self, i: usize, now: Instant, resume: Option<(usize, usize)>) {
        let nodes = self.o.nodes();
        let (ch, node) = match resume {
            Some((ch, from)) if nodes > 1 => (ch, (from + 1 + self.rng.below(nodes as u64 - 1) as usize) % nodes),
            Some((ch, from)) => (ch, from),
            None => (self.rng.below(self.o.channels as u64) as usize, self.rng.below(nodes as u64) as usize),
        };
        let hold = self.rng.millis(200, 6000);
        let how = match self.rng.below(10) {
            0..=4 => End::Drop,
            5..=7 => End::Shutdown,
            _ => End::Reset,
        };
        match TcpStream::connect(self.o.http[node]) {
            Ok(mut s) => {
                if let Err(e) = self.poll.registry().register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE) {
                    eprintln!("register: {e}");
                    self.c.connect_errors += 1;
                    self.slots[i].state = State::Off { at: Some(now + Duration::from_secs(1)) };
                    return;
                }
                self.c.connects += 1;
                self.c.per_node[node] += 1;
                self.slots[i].state = State::Connecting { s, node, ch, end_at: now + hold, how, resume: resume.is_some() };
            }
            Err(_) => {
                self.c.connect_errors += 1;
                self.slots[i].state = State::Off { at: Some(now + Duration::from_secs(1)) };
            }
        }
    }

    /// Closes slot `i`'s connection the way it was meant to end; answers whether a poll was on it.
    fn close(&mut self, i: usize, now: Instant) -> bool {
        let state = std::mem::replace(&mut self.slots[i].state, State::Off { at: None });
        let (mut s, how, polling) = match state {
            State::Connecting { s, how, .. } => (s, how, false),
            State::Polling { s, how, .. } => (s, how, true),
            off => {
                self.slots[i].state = off;
                return false;
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
        if self.slots[i].outstanding {
            self.slots[i].outstanding = false;
            self.c.poll_ends += 1;
            self.slots[i].last_end = if how == End::Reset { None } else { Some(now) };
        }
        polling
    }

    /// Ends slot `i`'s connection (the page went away) and plans when it comes back.
    fn end(&mut self, i: usize, now: Instant) {
        if matches!(self.slots[i].state, State::Off { .. }) {
            return;
        }
        self.close(i, now);
        // Back within the grace (no offline expected) or well after it (offline, then online).
        let grace = self.o.grace.as_millis() as u64;
        let off = if self.rng.chance(50) { self.rng.millis(0, grace / 2) } else { self.rng.millis(grace + 500, grace + 4000) };
        self.slots[i].state = State::Off { at: if self.frozen { None } else { Some(now + off) } };
    }

    /// Sends a (re-)poll on slot `i`'s connected socket.
    fn send_poll(&mut self, i: usize, now: Instant, repoll: bool) {
        let (ch, how, resume) = match &self.slots[i].state {
            State::Connecting { ch, how, resume, .. } => (*ch, *how, *resume),
            State::Polling { ch, how, .. } => (*ch, *how, false),
            State::Off { .. } => return,
        };
        let reset = how == End::Reset && !repoll;
        let req = self.request(i, ch, repoll || resume, reset);
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
        self.slots[i].outstanding = true;
        if repoll {
            self.c.repolls += 1;
        }
        if resume {
            self.c.switches += 1;
        }
        let state = std::mem::replace(&mut self.slots[i].state, State::Off { at: None });
        self.slots[i].state = match state {
            State::Connecting { s, node, ch, end_at, how, .. } => State::Polling { s, node, ch, sent: now, end_at, how, buf: Vec::new() },
            State::Polling { s, node, ch, end_at, how, buf, .. } => State::Polling { s, node, ch, sent: now, end_at, how, buf },
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
            let State::Polling { buf, ch, node, .. } = &mut self.slots[i].state else { return };
            let (ch, node) = (*ch, *node);
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
            if self.slots[i].outstanding {
                self.slots[i].outstanding = false;
                self.c.poll_ends += 1;
            }
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
                    if !self.frozen && self.o.nodes() > 1 && self.rng.chance(self.switch) {
                        // The balancer sends the next poll to another node, on a new connection.
                        self.close(i, now);
                        self.connect(i, now, Some((ch, node)));
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
        let t = now.duration_since(self.start).as_secs_f64();
        let mut used = 0;
        while let Some((r, n)) = parse_resp(&self.sub_buf[used..])? {
            used += n;
            let Resp::Array(Some(items)) = &r else { return Err(format!("unexpected frame {r:?}")) };
            if items.len() != 3 || items[0].text() != "message" || items[1].text() != "__presence__" {
                return Err(format!("unexpected frame {r:?}"));
            }
            let e = items[2].text();
            self.replay.apply(&e, t);
            if let Some(sid) = e.strip_prefix("offline ") {
                let Some(&i) = self.sid_index.get(sid) else {
                    self.replay.anomaly(format!("{e:?}: unknown session"));
                    continue;
                };
                match &self.slots[i].state {
                    State::Polling { sent, how, node, .. } if *how != End::Reset && now.duration_since(*sent) > Duration::from_millis(500) => {
                        self.replay.offline_while_polling += 1;
                        let (ago, node) = (now.duration_since(*sent), self.o.name(*node));
                        self.replay.anomaly(format!("{e:?} at {t:.3}s while it holds a poll on {node} sent {ago:?} ago"));
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
        self.sub_buf.drain(..used);
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
                    State::Off { at: Some(at) } if *at <= now => self.connect(i, now, None),
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

    /// What presence must say now, for the cluster and for each node (each session polls on
    /// one node at most). Connections still connecting count as polling (settle lets them land).
    fn truth(&self) -> (Truth, Vec<Truth>) {
        let mut all = Truth::default();
        let mut per = vec![Truth::default(); self.o.nodes()];
        for s in &self.slots {
            let (ch, node) = match &s.state {
                State::Polling { ch, node, .. } | State::Connecting { ch, node, .. } => (*ch, *node),
                State::Off { .. } => continue,
            };
            for t in [&mut all, &mut per[node]] {
                t.polls += 1;
                match &s.sid {
                    Some(sid) => {
                        t.online.insert(sid.clone(), s.user.clone());
                        t.on.entry(channel_name(ch)).or_default().insert(sid.clone());
                        if s.joined {
                            t.on.entry("lobby".into()).or_default().insert(sid.clone());
                        }
                    }
                    None => *t.anon.entry(channel_name(ch)).or_default() += 1,
                }
            }
        }
        (all, per)
    }
}

/// One daemon's rows: sessions online (channel '') with users, channel -> sessions, duplicates.
#[derive(Default)]
struct Rows {
    online: BTreeMap<String, String>,
    on: BTreeMap<String, BTreeSet<String>>,
    dups: u64,
}

/// Every row of the table, by `daemon`.
fn read_rows(db: &std::path::Path, table: &str) -> Result<BTreeMap<String, Rows>, String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| e.to_string())?;
    c.busy_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let mut st = c.prepare(&format!("SELECT session, user, channel, daemon FROM {table}")).map_err(|e| e.to_string())?;
    let mut out: BTreeMap<String, Rows> = BTreeMap::new();
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?)))
        .map_err(|e| e.to_string())?;
    for r in rows {
        let (s, u, ch, daemon) = r.map_err(|e| e.to_string())?;
        let d = out.entry(daemon).or_default();
        let fresh = if ch.is_empty() { d.online.insert(s, u.unwrap_or_default()).is_none() } else { d.on.entry(ch).or_default().insert(s) };
        if !fresh {
            d.dups += 1;
        }
    }
    Ok(out)
}

fn diff_sets(what: &str, got: &BTreeSet<String>, want: &BTreeSet<String>, out: &mut Vec<String>) {
    if got != want {
        let extra: Vec<_> = got.difference(want).take(5).collect();
        let missing: Vec<_> = want.difference(got).take(5).collect();
        out.push(format!("{what}: {} vs truth {} (extra {extra:?}, missing {missing:?})", got.len(), want.len()));
    }
}

fn diff_users(what: &str, got: &BTreeMap<String, String>, want: &BTreeMap<String, String>, out: &mut Vec<String>) {
    let g: BTreeSet<String> = got.keys().cloned().collect();
    let w: BTreeSet<String> = want.keys().cloned().collect();
    diff_sets(what, &g, &w, out);
    let wrong: Vec<String> = got.iter().filter(|(s, u)| want.get(*s).is_some_and(|w| w != *u)).take(5).map(|(s, u)| format!("{s}={u:?} (truth {:?})", want[s])).collect();
    if !wrong.is_empty() {
        out.push(format!("{what}: user ids differ: {}", wrong.join(", ")));
    }
}

/// Compares one daemon's rows with the truth of that daemon.
fn diff_rows(what: &str, r: &Rows, t: &Truth, channels: &[String], out: &mut Vec<String>) {
    diff_users(&format!("{what} online rows"), &r.online, &t.online, out);
    for c in channels {
        diff_sets(&format!("{what} rows of {c}"), &r.on.get(c).cloned().unwrap_or_default(), &t.on.get(c).cloned().unwrap_or_default(), out);
    }
    for c in r.on.keys().filter(|c| !channels.contains(c)) {
        out.push(format!("{what} has rows of channel {c:?} nobody polled"));
    }
    if r.dups > 0 {
        out.push(format!("{what}: {} duplicate rows", r.dups));
    }
}

/// What one node answered in a check.
#[derive(Default)]
struct NodeView {
    count: i64,
    /// Per channel: PRESENCE size, NUMSUB.
    channels: Vec<(u64, u64)>,
    info: BTreeMap<String, String>,
    rows: Option<(u64, u64)>,
}

/// One check of everything against the truth: (diffs per node, diffs of the events and of the
/// whole table, what each node answered, the truth, the table's distinct counts per channel).
struct Check {
    node_diffs: Vec<Vec<String>>,
    global: Vec<String>,
    views: Vec<NodeView>,
    truth: Truth,
    per: Vec<Truth>,
    table: Option<Vec<u64>>,
}

fn numsub(ctl: &mut Control, c: &str) -> Result<u64, String> {
    match ctl.cmd(&["PUBSUB", "NUMSUB", c]).map_err(|e| e.to_string())? {
        Resp::Array(Some(a)) if a.len() == 2 => match a[1] {
            Resp::Int(n) => Ok(n as u64),
            _ => Ok(u64::MAX),
        },
        other => Err(format!("PUBSUB NUMSUB {c}: {other:?}")),
    }
}

impl Churn {
    fn check(&mut self, ctls: &mut [Control], channels: &[String]) -> Result<Check, String> {
        let (truth, per) = self.truth();
        let nodes = self.o.nodes();
        let cluster = self.o.cluster();
        let mut node_diffs = vec![Vec::new(); nodes];
        let mut views = Vec::new();
        let rows = match &self.o.db {
            Some(db) => Some(read_rows(db, &self.o.table)?),
            None => None,
        };
        for (k, ctl) in ctls.iter_mut().enumerate() {
            let d = &mut node_diffs[k];
            let mut v = NodeView::default();
            let d_online = ctl.pairs(&["ONLINE"]).map_err(|e| e.to_string())?;
            if d_online != truth.online {
                diff_users("ONLINE", &d_online, &truth.online, d);
            }
            v.count = ctl.int(&["ONLINE", "COUNT"]).map_err(|e| e.to_string())?;
            if v.count != truth.online.len() as i64 {
                d.push(format!("ONLINE COUNT {} vs truth {}", v.count, truth.online.len()));
            }
            for c in channels {
                let want = truth.on.get(c).cloned().unwrap_or_default();
                let anon = truth.anon.get(c).copied().unwrap_or(0);
                let presence: BTreeSet<String> = ctl.pairs(&["PRESENCE", c]).map_err(|e| e.to_string())?.into_keys().collect();
                let n = numsub(ctl, c)?;
                diff_sets(&format!("PRESENCE {c}"), &presence, &want, d);
                if n != want.len() as u64 + anon {
                    d.push(format!("PUBSUB NUMSUB {c} {n} vs truth {} sessions + {anon} anonymous", want.len()));
                }
                v.channels.push((presence.len() as u64, n));
            }
            v.info = ctl.info(None).map_err(|e| e.to_string())?;
            let local = &per[k];
            let held = info_num(&v.info, "held_polls");
            if held != Some(local.polls) {
                d.push(format!("INFO held_polls {held:?} vs truth {} polls on this node", local.polls));
            }
            let on = info_num(&v.info, "online_sessions");
            if on != Some(local.online.len() as u64) {
                d.push(format!("INFO online_sessions {on:?} vs truth {} sessions polling on this node", local.online.len()));
            }
            if cluster {
                let link = v.info.get("cluster_link").cloned().unwrap_or_default();
                if link != "up" {
                    d.push(format!("INFO cluster_link {link:?}"));
                }
                let alive = info_num(&v.info, "cluster_nodes_alive");
                if alive != Some(nodes as u64) {
                    d.push(format!("INFO cluster_nodes_alive {alive:?} vs {nodes} nodes ({:?})", v.info.get("cluster_nodes")));
                }
                let so = info_num(&v.info, "cluster_sessions_online");
                if so != Some(truth.online.len() as u64) {
                    d.push(format!("INFO cluster_sessions_online {so:?} vs truth {}", truth.online.len()));
                }
                let removed = info_num(&v.info, "cluster_nodes_removed");
                if removed != Some(0) {
                    d.push(format!("INFO cluster_nodes_removed {removed:?}: a live node was taken as dead"));
                }
            }
            if let Some(rows) = &rows {
                let name = self.o.instance[k.min(self.o.instance.len() - 1)].clone();
                let empty = Rows::default();
                let r = rows.get(&name).unwrap_or(&empty);
                diff_rows(&format!("table (daemon {name:?})"), r, local, channels, d);
                v.rows = Some((r.online.len() as u64, r.on.values().map(|s| s.len() as u64).sum()));
            }
            views.push(v);
        }
        // The events (one stream for the cluster) and the table as a whole.
        let mut global = Vec::new();
        let ev_online: BTreeSet<String> = self.replay.online.keys().cloned().collect();
        let t_online: BTreeSet<String> = truth.online.keys().cloned().collect();
        diff_sets("online from events", &ev_online, &t_online, &mut global);
        for c in channels {
            let ev = self.replay.on.get(c).cloned().unwrap_or_default();
            diff_sets(&format!("{c} from events"), &ev, &truth.on.get(c).cloned().unwrap_or_default(), &mut global);
        }
        let mut table = None;
        if let Some(rows) = &rows {
            let mine: Vec<&String> = self.o.instance.iter().collect();
            if nodes > 1 {
                for d in rows.keys().filter(|d| !mine.contains(d)) {
                    global.push(format!("table has rows of daemon {d:?}, no node of this cluster"));
                }
            }
            // SELECT DISTINCT session, user ... WHERE channel = '' (and per channel), all daemons.
            let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut on: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (d, r) in rows {
                if !mine.contains(&d) {
                    continue;
                }
                for (s, u) in &r.online {
                    users.entry(s.clone()).or_default().insert(u.clone());
                }
                for (c, set) in &r.on {
                    on.entry(c.clone()).or_default().extend(set.iter().cloned());
                }
            }
            let distinct: BTreeSet<String> = users.keys().cloned().collect();
            diff_sets("table DISTINCT online sessions", &distinct, &t_online, &mut global);
            let wrong: Vec<String> = users
                .iter()
                .filter(|(s, u)| u.len() > 1 || truth.online.get(*s).is_some_and(|w| !u.contains(w)))
                .take(5)
                .map(|(s, u)| format!("{s}={u:?}"))
                .collect();
            if !wrong.is_empty() {
                global.push(format!("table: user ids differ: {}", wrong.join(", ")));
            }
            let mut counts = vec![distinct.len() as u64];
            for c in channels {
                let got = on.get(c).cloned().unwrap_or_default();
                diff_sets(&format!("table DISTINCT sessions of {c}"), &got, &truth.on.get(c).cloned().unwrap_or_default(), &mut global);
                counts.push(got.len() as u64);
            }
            table = Some(counts);
        }
        Ok(Check { node_diffs, global, views, truth, per, table })
    }
}

/// Node INFO figures summed over the nodes: (commands sent to Redis, publishes).
fn sent_totals(ctls: &mut [Control]) -> Result<(u64, u64), String> {
    let mut t = (0, 0);
    for c in ctls {
        let i = c.info(None).map_err(|e| e.to_string())?;
        t.0 += info_num(&i, "cluster_commands_sent").unwrap_or(0);
        t.1 += info_num(&i, "cluster_publishes").unwrap_or(0);
    }
    Ok(t)
}

fn run(o: Opts) -> Result<bool, String> {
    let nodes = o.nodes();
    let cluster = o.cluster();
    let wait_after = o.grace + if cluster { o.node_timeout } else { Duration::ZERO } + Duration::from_millis(500);
    let hard_deadline = Instant::now() + Duration::from_secs(o.secs) + wait_after + o.settle + Duration::from_secs(90);
    let token = o.token.clone();
    let nofile = raise_nofile();
    if (o.sessions + o.anon) as u64 + 64 > nofile {
        return Err(format!("{} sockets needed, the open-file limit is {nofile}", o.sessions + o.anon));
    }
    let mut ctls = Vec::new();
    for addr in &o.control {
        ctls.push(Control::connect(*addr, token.as_deref()).map_err(|e| format!("control {addr}: {e}"))?);
    }
    let mut rng = Rng(o.seed | 1);

    // Sessions: opened by the backend (nine in ten with a user id) on the nodes in turn, one in
    // ten JOINed to lobby (on the node that opened it, so that the join comes after the open).
    let mut slots = Vec::new();
    let mut sid_index = BTreeMap::new();
    for i in 0..o.sessions {
        let sid = format!("cs{i}");
        let user = if i % 10 == 9 { String::new() } else { format!("u{i}") };
        let joined = i % 10 == 3;
        let ctl = &mut ctls[i % nodes];
        if user.is_empty() {
            ctl.send(&["SESSION.OPEN", &sid]).map_err(|e| e.to_string())?;
        } else {
            ctl.send(&["SESSION.OPEN", &sid, &user]).map_err(|e| e.to_string())?;
        }
        if joined {
            ctl.send(&["JOIN", &sid, "lobby"]).map_err(|e| e.to_string())?;
        }
        sid_index.insert(sid.clone(), slots.len());
        slots.push(Slot { sid: Some(sid), user, joined, state: State::Off { at: None }, outstanding: false, last_end: None, cursor: None });
    }
    for (i, s) in slots.iter().enumerate() {
        let ctl = &mut ctls[i % nodes];
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
    if cluster {
        // Every node must know every session (and its user) before the first poll reaches it.
        let until = Instant::now() + Duration::from_secs(30);
        for (k, ctl) in ctls.iter_mut().enumerate() {
            loop {
                let n = info_num(&ctl.info(None).map_err(|e| e.to_string())?, "sessions").unwrap_or(0);
                if n >= o.sessions as u64 {
                    break;
                }
                if Instant::now() > until {
                    return Err(format!("{}: INFO sessions {n} after 30 s, {} opened", o.name(k), o.sessions));
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        thread::sleep(Duration::from_millis(500));
    }
    for _ in 0..o.anon {
        slots.push(Slot { sid: None, user: String::new(), joined: false, state: State::Off { at: None }, outstanding: false, last_end: None, cursor: None });
    }

    // The event subscriber (first node only: the events are the cluster's), set up blocking,
    // then handed to the loop.
    let mut sub = Control::connect(o.control[0], token.as_deref()).map_err(|e| format!("control {}: {e}", o.control[0]))?;
    match sub.cmd(&["SUBSCRIBE", "__presence__"]).map_err(|e| e.to_string())? {
        Resp::Array(Some(a)) if a.len() == 3 && a[0].text() == "subscribe" => {}
        other => return Err(format!("SUBSCRIBE __presence__: {other:?}")),
    }
    let leftover = std::mem::take(&mut sub.buf);
    sub.s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut sub_stream = TcpStream::from_std(sub.s);
    let poll = Poll::new().map_err(|e| e.to_string())?;
    poll.registry().register(&mut sub_stream, SUBSCRIBER, Interest::READABLE).map_err(|e| e.to_string())?;

    let mut redis = match o.redis {
        Some(a) => Some(Control::connect(a, None).map_err(|e| format!("redis {a}: {e}"))?),
        None => None,
    };
    let stats0 = match redis.as_mut() {
        Some(r) => Some(commandstats(r).map_err(|e| format!("redis INFO commandstats: {e}"))?),
        None => None,
    };
    let sent0 = if cluster { Some(sent_totals(&mut ctls)?) } else { None };
    let usage0: Vec<Option<(f64, u64)>> = o.server_pid.iter().map(|p| proc_usage(*p)).collect();
    let start = Instant::now();
    // Starts spread over the first two seconds.
    for s in &mut slots {
        s.state = State::Off { at: Some(start + rng.millis(0, 2000)) };
    }
    let stop_at = start + Duration::from_secs(o.secs);

    // The publisher: one message to a random channel through a random node every --publish-ms,
    // until shortly before the churn stops (the polls left then stay held).
    let published = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let pub_stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (published, delivered, pub_stop) = (published.clone(), delivered.clone(), pub_stop.clone());
        let (addrs, token, channels, every, seed) = (o.control.clone(), token.clone(), o.channels, o.publish_every, o.seed);
        let until = stop_at - Duration::from_millis(300);
        thread::spawn(move || -> Result<(), String> {
            let mut cs = Vec::new();
            for a in &addrs {
                cs.push(Control::connect(*a, token.as_deref()).map_err(|e| e.to_string())?);
            }
            let mut rng = Rng(seed.rotate_left(17) | 1);
            let mut n = 0u64;
            while Instant::now() < until && !pub_stop.load(Ordering::Relaxed) {
                let ch = channel_name(rng.below(channels as u64) as usize);
                let k = rng.below(cs.len() as u64) as usize;
                let got = cs[k].int(&["PUBLISH", &ch, &format!("tick {n}")]).map_err(|e| e.to_string())?;
                n += 1;
                published.store(n, Ordering::Relaxed);
                delivered.fetch_add(got.max(0) as u64, Ordering::Relaxed);
                thread::sleep(every);
            }
            Ok(())
        })
    };

    let switch = o.switch.unwrap_or(if nodes > 1 { 25 } else { 0 });
    let mut ch = Churn {
        poll,
        slots,
        rng,
        c: Counters { per_node: vec![0; nodes], ..Counters::default() },
        replay: Replay::default(),
        sub: sub_stream,
        sub_buf: leftover,
        stop_at,
        frozen: false,
        sid_index,
        switch,
        start,
        o,
    };
    let mut events = Events::with_capacity(4096);
    let mut last_line = start;
    let (mut peak_online, mut peak_polls) = (0usize, 0usize);
    let names: Vec<String> = (0..nodes).map(|k| ch.o.name(k)).collect();
    println!(
        "comet-churn: {} sessions + {} anonymous pollers, {} channels (+ lobby), {} s churn, grace {} s, seed {}{}",
        ch.o.sessions,
        ch.o.anon,
        ch.o.channels,
        ch.o.secs,
        ch.o.grace.as_secs(),
        ch.o.seed,
        if nodes > 1 || cluster { format!("; {nodes} node(s) {}, {switch}% of re-polls to another node", names.join(",")) } else { String::new() }
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

    // Grace (and, in a cluster, the node timeout: no live node may be taken as dead): everything
    // that went is gone after it; then wait for every view to agree.
    let frozen_at = Instant::now();
    while frozen_at.elapsed() < wait_after {
        ch.turn(&mut events, Duration::from_millis(20))?;
    }
    let counted_secs = start.elapsed().as_secs_f64();
    let stats1 = match redis.as_mut() {
        Some(r) => Some(commandstats(r).map_err(|e| format!("redis INFO commandstats: {e}"))?),
        None => None,
    };
    let sent1 = if cluster { Some(sent_totals(&mut ctls)?) } else { None };
    let (polls_counted, ends_counted) = (ch.c.polls, ch.c.poll_ends);
    let channels: Vec<String> = (0..ch.o.channels).map(channel_name).chain(["lobby".to_string()]).collect();
    let settle_start = Instant::now();
    let mut check;
    loop {
        // Drain what arrived (events, late answers) before looking.
        for _ in 0..5 {
            ch.turn(&mut events, Duration::from_millis(10))?;
        }
        check = ch.check(&mut ctls, &channels)?;
        let clean = check.global.is_empty() && check.node_diffs.iter().all(Vec::is_empty);
        if clean || settle_start.elapsed() >= ch.o.settle || Instant::now() >= hard_deadline {
            break;
        }
        let pause = Instant::now() + Duration::from_millis(250);
        while Instant::now() < pause {
            ch.turn(&mut events, Duration::from_millis(20))?;
        }
    }
    let settled = settle_start.elapsed();
    let usage1: Vec<Option<(f64, u64)>> = ch.o.server_pid.iter().map(|p| proc_usage(*p)).collect();

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
    if nodes > 1 {
        let per: Vec<String> = names.iter().zip(&c.per_node).map(|(n, k)| format!("{n} {k}")).collect();
        println!("  connections per node: {}; re-polls moved to another node after an answer {}", per.join(", "), c.switches);
    }
    println!(
        "  pages gone: dropped {}, shut down {}, reset {}, left after an answer {}; publishes {} ({})",
        c.drops,
        c.shutdowns,
        c.resets,
        c.leave_after_answer,
        published.load(Ordering::Relaxed),
        if cluster {
            format!("their answers, the nodes reached, sum to {}", delivered.load(Ordering::Relaxed))
        } else {
            format!("reached {} held polls at once", delivered.load(Ordering::Relaxed))
        }
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
        "presence events{}: online {} offline {} join {} leave {} ({:.0}/s during the churn)",
        if nodes > 1 { format!(" (subscribed on {})", names[0]) } else { String::new() },
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
    println!("  event anomalies (online twice without offline, leave without join, ...): {}", n("anomalies"));
    for a in &r.anomalies {
        println!("    {a}");
    }
    if let (Some(s0), Some(s1)) = (&stats0, &stats1) {
        let delta: BTreeMap<&String, u64> = s1.iter().map(|(k, v)| (k, v.saturating_sub(s0.get(k).copied().unwrap_or(0)))).filter(|(_, v)| *v > 0).collect();
        let info_calls = 1; // this program's own INFO commandstats
        let all: u64 = delta.values().sum::<u64>().saturating_sub(info_calls);
        let top: u64 = delta.iter().filter(|(k, _)| TOP_LEVEL.contains(&k.as_str())).map(|(_, v)| *v).sum::<u64>().saturating_sub(info_calls);
        let evalsha = delta.get(&"evalsha".to_string()).copied().unwrap_or(0);
        let pubs = published.load(Ordering::Relaxed);
        let pe = (polls_counted + ends_counted).max(1) as f64;
        let mut list: Vec<(&&String, &u64)> = delta.iter().collect();
        list.sort_by(|a, b| b.1.cmp(a.1));
        let list: Vec<String> = list.iter().take(12).map(|(k, v)| format!("{k} {v}")).collect();
        println!("redis commands over the churn + grace{} ({counted_secs:.1} s):", if cluster { " + node timeout" } else { "" });
        println!("  polls started {polls_counted} + ended {ends_counted} = {}", polls_counted + ends_counted);
        println!(
            "  INFO commandstats, sum of calls= (commands run inside scripts included): {all} -> {:.3} per poll start/end",
            all as f64 / pe
        );
        println!(
            "  of which sent by clients (EVALSHA, SUBSCRIBE, ...): {top} -> {:.4} per poll start/end; EVALSHA {evalsha} less {pubs} publishes = {} -> {:.4} per poll start/end (the turns' presence shares, and about {} heartbeats at {nodes}/s)",
            top as f64 / pe,
            evalsha.saturating_sub(pubs),
            evalsha.saturating_sub(pubs) as f64 / pe,
            (counted_secs * nodes as f64).round()
        );
        println!("  by command: {}", list.join(", "));
    }
    if let (Some(a), Some(b)) = (sent0, sent1) {
        let cmds = b.0.saturating_sub(a.0);
        let pubs = b.1.saturating_sub(a.1);
        let pe = (polls_counted + ends_counted).max(1) as f64;
        println!(
            "  nodes' INFO cluster_commands_sent: {cmds} (publishes {pubs}); less the publishes: {} -> {:.4} per poll start/end",
            cmds.saturating_sub(pubs),
            cmds.saturating_sub(pubs) as f64 / pe
        );
    }
    for (k, name) in names.iter().enumerate() {
        let v = &check.views[k];
        let cpu = match (usage0.get(k).copied().flatten(), usage1.get(k).copied().flatten()) {
            (Some((c0, _)), Some((c1, rss))) => format!("cpu {:.2} s over the run, rss {} KiB; ", c1 - c0, rss),
            _ => String::new(),
        };
        println!(
            "comet{}: {cpu}INFO held_polls {} connected_browsers {}",
            if nodes > 1 || cluster { format!(" {name}") } else { String::new() },
            v.info.get("held_polls").map_or("?", |s| s.as_str()),
            v.info.get("connected_browsers").map_or("?", |s| s.as_str())
        );
    }
    println!();
    println!("after grace{} + {:.1} s settle:", if cluster { " + node timeout" } else { "" }, settled.as_secs_f64());
    let t = &check.truth;
    if nodes == 1 {
        let v = &check.views[0];
        println!("  {:<10} {:>9} {:>6} {:>9} {:>7} {:>7} {:>7}", "", "truth", "+anon", "PRESENCE", "NUMSUB", "table", "events");
        let table = |i: usize| check.table.as_ref().map(|t| t[i].to_string()).unwrap_or_else(|| "-".into());
        println!("  {:<10} {:>9} {:>6} {:>9} {:>7} {:>7} {:>7}", "online", t.online.len(), 0, v.count, format!("({})", v.count), table(0), r.online.len());
        for (i, c) in channels.iter().enumerate() {
            let ev = r.on.get(c).map_or(0, |s| s.len());
            let (p, ns) = v.channels[i];
            println!("  {c:<10} {:>9} {:>6} {p:>9} {ns:>7} {:>7} {ev:>7}", t.on.get(c).map_or(0, |s| s.len()), t.anon.get(c).copied().unwrap_or(0), table(i + 1));
        }
        println!("  (online row: ONLINE COUNT under PRESENCE; table: rows with channel '' / of the channel)");
    } else {
        let mut head = format!("  {:<10} {:>6} {:>6}", "", "truth", "+anon");
        for n in &names {
            head.push_str(&format!(" {:>13}", format!("{n} PRES/NSUB")));
        }
        head.push_str(&format!(" {:>7} {:>7}", "table", "events"));
        println!("{head}");
        let table = |i: usize| check.table.as_ref().map(|t| t[i].to_string()).unwrap_or_else(|| "-".into());
        let mut line = format!("  {:<10} {:>6} {:>6}", "online", t.online.len(), 0);
        for v in &check.views {
            line.push_str(&format!(" {:>13}", format!("{}/-", v.count)));
        }
        line.push_str(&format!(" {:>7} {:>7}", table(0), r.online.len()));
        println!("{line}");
        for (i, c) in channels.iter().enumerate() {
            let mut line = format!("  {c:<10} {:>6} {:>6}", t.on.get(c).map_or(0, |s| s.len()), t.anon.get(c).copied().unwrap_or(0));
            for v in &check.views {
                let (p, ns) = v.channels[i];
                line.push_str(&format!(" {:>13}", format!("{p}/{ns}")));
            }
            line.push_str(&format!(" {:>7} {:>7}", table(i + 1), r.on.get(c).map_or(0, |s| s.len())));
            println!("{line}");
        }
        println!("  (online row: ONLINE COUNT; table: DISTINCT sessions over every node's rows with channel '' / of the channel)");
    }
    let mut ok = true;
    for (k, name) in names.iter().enumerate() {
        let v = &check.views[k];
        let local = &check.per[k];
        let d = &check.node_diffs[k];
        let rows = v.rows.map(|(o, c)| format!(", rows {o} online + {c} channel")).unwrap_or_default();
        let cl = if cluster {
            format!(
                "; cluster_link {} nodes_alive {} sessions_online {} nodes_removed {}",
                v.info.get("cluster_link").map_or("?", |s| s.as_str()),
                v.info.get("cluster_nodes_alive").map_or("?", |s| s.as_str()),
                v.info.get("cluster_sessions_online").map_or("?", |s| s.as_str()),
                v.info.get("cluster_nodes_removed").map_or("?", |s| s.as_str())
            )
        } else {
            String::new()
        };
        println!(
            "  node {name}: polls here {} (INFO held_polls {}), sessions here {} (INFO online_sessions {}{rows}){cl}: {}",
            local.polls,
            v.info.get("held_polls").map_or("?", |s| s.as_str()),
            local.online.len(),
            v.info.get("online_sessions").map_or("?", |s| s.as_str()),
            if d.is_empty() { "MATCH" } else { "MISMATCH" }
        );
        for x in d {
            println!("    {x}");
        }
        ok &= d.is_empty();
    }
    let events_ok = n("anomalies") == 0;
    let global_ok = check.global.is_empty();
    println!(
        "  events{} and table{}: {}",
        if nodes > 1 { format!(" (from {})", names[0]) } else { String::new() },
        if nodes > 1 { " (all nodes' rows)" } else { "" },
        if global_ok && events_ok { "MATCH" } else { "MISMATCH" }
    );
    for x in &check.global {
        println!("    {x}");
    }
    if !events_ok {
        println!("    {} event anomalies (above)", n("anomalies"));
    }
    ok &= global_ok && events_ok;
    println!("{}", if ok { "MATCH" } else { "MISMATCH" });
    Ok(ok)
}

// =============================================================================================
// Hold mode: memory per held poll
// =============================================================================================

fn hold_sid(i: usize) -> String {
    format!("hs{i}")
}

/// Poll `i` of the hold: its node and channel (hold0.., never published to).
fn hold_target(i: usize, nodes: usize, channels: usize) -> (usize, String) {
    (i % nodes, format!("hold{}", (i / nodes) % channels))
}

/// Reads what is there: (reads that got bytes, whether the connection is gone).
fn drain(s: &mut TcpStream, chunk: &mut [u8]) -> (u64, bool) {
    let mut got = 0;
    loop {
        match s.read(chunk) {
            Ok(0) => return (got, true),
            Ok(_) => got += 1,
            Err(x) if x.kind() == ErrorKind::WouldBlock => return (got, false),
            Err(x) if x.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return (got, true),
        }
    }
}

/// A child of `--hold`: connects polls `a..b` (at most `INFLIGHT` connecting at once), says
/// `ready held=H failed=F`, holds them until its standard input closes (or `--hold-secs`),
/// then says `done answered=A closed=C` and exits.
fn run_hold_child(o: &Opts, a: usize, b: usize) -> Result<bool, String> {
    const INFLIGHT: usize = 256;
    let nodes = o.nodes();
    let n = b.saturating_sub(a);
    let nofile = raise_nofile();
    if n as u64 + 64 > nofile {
        return Err(format!("{n} sockets in one process, the open-file limit is {nofile}"));
    }
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(4096);
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut sent = vec![false; n];
    let mut tries = vec![0u8; n];
    let mut retry: VecDeque<(Instant, usize)> = VecDeque::new();
    let (mut next, mut inflight, mut held, mut failed, mut answered, mut closed) = (0usize, 0usize, 0usize, 0usize, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut chunk = [0u8; 4096];
    let fail = |j: usize, tries: &mut Vec<u8>, retry: &mut VecDeque<(Instant, usize)>, failed: &mut usize| {
        tries[j] += 1;
        if tries[j] < 5 {
            retry.push_back((Instant::now() + Duration::from_millis(200), j));
        } else {
            *failed += 1;
        }
    };
    while held + failed < n && Instant::now() < deadline {
        while inflight < INFLIGHT {
            let j = match retry.front() {
                Some(&(at, j)) if at <= Instant::now() => {
                    retry.pop_front();
                    j
                }
                _ if next < n => {
                    next += 1;
                    next - 1
                }
                _ => break,
            };
            let (node, _) = hold_target(a + j, nodes, o.channels);
            match TcpStream::connect(o.http[node]) {
                Ok(mut s) => {
                    poll.registry().register(&mut s, Token(j), Interest::READABLE | Interest::WRITABLE).map_err(|e| e.to_string())?;
                    conns[j] = Some(s);
                    inflight += 1;
                }
                Err(_) => fail(j, &mut tries, &mut retry, &mut failed),
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(20))).map_err(|e| e.to_string())?;
        for e in events.iter() {
            let j = e.token().0;
            let Some(s) = conns[j].as_mut() else { continue };
            if !sent[j] {
                if !e.is_writable() {
                    continue;
                }
                inflight -= 1;
                let ok = matches!(s.take_error(), Ok(None)) && s.peer_addr().is_ok() && {
                    let (_, ch) = hold_target(a + j, nodes, o.channels);
                    let cookie = if o.hold_anon { String::new() } else { format!("Cookie: PHPSESSID={}\r\n", hold_sid(a + j)) };
                    let req = format!("GET /sub/{ch} HTTP/1.1\r\nHost: push.test\r\n{cookie}\r\n");
                    s.write(req.as_bytes()).is_ok_and(|w| w == req.len())
                };
                if ok {
                    sent[j] = true;
                    held += 1;
                } else {
                    let mut s = conns[j].take().unwrap();
                    let _ = poll.registry().deregister(&mut s);
                    fail(j, &mut tries, &mut retry, &mut failed);
                }
            } else if e.is_readable() {
                let (got, gone) = drain(s, &mut chunk);
                answered += got;
                if gone {
                    closed += 1;
                    let mut s = conns[j].take().unwrap();
                    let _ = poll.registry().deregister(&mut s);
                }
            }
        }
    }
    let failed = n - held;
    println!("ready held={held} failed={failed}");
    let _ = io::stdout().flush();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = io::stdin().read_to_end(&mut sink);
            stop.store(true, Ordering::Relaxed);
        });
    }
    let until = Instant::now() + Duration::from_secs(o.hold_secs);
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        poll.poll(&mut events, Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
        for e in events.iter() {
            let j = e.token().0;
            let Some(s) = conns[j].as_mut() else { continue };
            if e.is_readable() {
                let (got, gone) = drain(s, &mut chunk);
                answered += got;
                if gone {
                    closed += 1;
                    let mut s = conns[j].take().unwrap();
                    let _ = poll.registry().deregister(&mut s);
                }
            }
        }
    }
    println!("done answered={answered} closed={closed}");
    let _ = io::stdout().flush();
    Ok(answered == 0 && closed == 0)
}

/// `--hold N`: opens N sessions, then (in child processes) holds one poll of each, spread over
/// the nodes; prints each node's RSS growth per held poll.
fn run_hold(o: &Opts) -> Result<bool, String> {
    let n = o.hold;
    let nodes = o.nodes();
    let names: Vec<String> = (0..nodes).map(|k| o.name(k)).collect();
    let procs = if o.hold_procs > 0 { o.hold_procs } else { n.div_ceil(15_000).max(1) };
    let per_proc = n.div_ceil(procs);
    if per_proc > 18_500 {
        return Err(format!("{per_proc} polls per generator process: at most 18,500 (20,000 open files); use --hold-procs"));
    }
    let per_node: Vec<usize> = (0..nodes).map(|k| (0..n).filter(|i| i % nodes == k).count()).collect();
    if let Some((lo, hi)) = port_range() {
        let range = (hi + 1).saturating_sub(lo) as usize;
        let most = per_node.iter().copied().max().unwrap_or(0);
        println!(
            "hold: ephemeral ports {lo}-{hi} ({range}); the most connections to one node's port {most}: {}",
            if most < range { "fits (the 4-tuple includes the server port)" } else { "DOES NOT FIT" }
        );
        if most >= range {
            return Err("not enough ephemeral ports for the polls of one node".into());
        }
    }
    if o.server_pid.len() != nodes {
        return Err("--hold needs --server-pid (one per node)".into());
    }
    let token = o.token.clone();
    let mut ctls = Vec::new();
    for addr in &o.control {
        ctls.push(Control::connect(*addr, token.as_deref()).map_err(|e| format!("control {addr}: {e}"))?);
    }
    let t0 = Instant::now();
    // Sessions, opened in batches of 1,000 pipelined commands, on the nodes in turn.
    for start in (0..if o.hold_anon { 0 } else { n }).step_by(1000) {
        let end = (start + 1000).min(n);
        let ctl = &mut ctls[(start / 1000) % nodes];
        for i in start..end {
            ctl.send(&["SESSION.OPEN", &hold_sid(i), &format!("u{i}")]).map_err(|e| e.to_string())?;
        }
        for _ in start..end {
            match ctl.reply().map_err(|e| e.to_string())? {
                Resp::Simple(ok) if ok == "OK" => {}
                other => return Err(format!("SESSION.OPEN: {other:?}")),
            }
        }
    }
    let until = Instant::now() + Duration::from_secs(60);
    for (k, ctl) in ctls.iter_mut().enumerate() {
        loop {
            let got = info_num(&ctl.info(None).map_err(|e| e.to_string())?, "sessions").unwrap_or(0);
            if o.hold_anon || got >= n as u64 {
                break;
            }
            if Instant::now() > until {
                return Err(format!("{}: INFO sessions {got} after 60 s, {n} opened", names[k]));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    if !o.hold_anon {
        println!("hold: {n} sessions opened and known to every node in {:.1} s", t0.elapsed().as_secs_f64());
    }
    thread::sleep(Duration::from_secs(2));
    let rss0: Vec<u64> = o.server_pid.iter().map(|p| proc_usage(*p).map_or(0, |u| u.1)).collect();
    let mut redis = match o.redis {
        Some(a) => Some(Control::connect(a, None).map_err(|e| format!("redis {a}: {e}"))?),
        None => None,
    };
    let redis_mem = |r: &mut Option<Control>| r.as_mut().and_then(|r| r.info(Some("memory")).ok()).and_then(|m| info_num(&m, "used_memory"));
    let rmem0 = redis_mem(&mut redis);

    // The children, each with its share of the polls.
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let http: Vec<String> = o.http.iter().map(|a| a.to_string()).collect();
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    let t1 = Instant::now();
    for p in 0..procs {
        let (a, b) = (p * per_proc, ((p + 1) * per_proc).min(n));
        if a >= b {
            break;
        }
        let mut child = std::process::Command::new(&exe)
            .args(["--hold-child", &format!("{a}:{b}"), "--http", &http.join(","), "--channels", &o.channels.to_string(), "--hold-secs", &o.hold_secs.to_string()])
            .args(if o.hold_anon { &["--hold-anon"][..] } else { &[][..] })
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", exe.display()))?;
        let out = child.stdout.take().unwrap();
        let tx = tx.clone();
        thread::spawn(move || {
            for line in io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((p, line)).is_err() {
                    break;
                }
            }
        });
        children.push((child, a, b));
    }
    drop(tx);
    let mut ready = 0;
    let (mut held, mut failed) = (0u64, 0u64);
    let until = Instant::now() + Duration::from_secs(240);
    while ready < children.len() {
        let left = until.saturating_duration_since(Instant::now());
        let Ok((p, line)) = rx.recv_timeout(left.max(Duration::from_millis(1))) else { break };
        if let Some(rest) = line.strip_prefix("ready ") {
            ready += 1;
            for f in rest.split(' ') {
                match f.split_once('=') {
                    Some(("held", v)) => held += v.parse::<u64>().unwrap_or(0),
                    Some(("failed", v)) => failed += v.parse::<u64>().unwrap_or(0),
                    _ => {}
                }
            }
            let (_, a, b) = &children[p];
            println!("  generator {} (pid {}): polls {a}..{b}: {line}", p + 1, children[p].0.id());
        }
    }
    let connect_secs = t1.elapsed().as_secs_f64();
    // Wait until the nodes hold them all.
    let until = Instant::now() + Duration::from_secs(60);
    let mut infos;
    loop {
        infos = Vec::new();
        for ctl in ctls.iter_mut() {
            infos.push(ctl.info(None).map_err(|e| e.to_string())?);
        }
        let sum: u64 = infos.iter().map(|i| info_num(i, "held_polls").unwrap_or(0)).sum();
        if sum >= held || Instant::now() > until {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    // Let the turn's presence writes and rows land before looking at memory.
    thread::sleep(Duration::from_secs(3));
    let rss1: Vec<u64> = o.server_pid.iter().map(|p| proc_usage(*p).map_or(0, |u| u.1)).collect();
    let rmem1 = redis_mem(&mut redis);
    let mut infos = Vec::new();
    let mut counts = Vec::new();
    for ctl in ctls.iter_mut() {
        infos.push(ctl.info(None).map_err(|e| e.to_string())?);
        counts.push(ctl.int(&["ONLINE", "COUNT"]).map_err(|e| e.to_string())?);
    }
    println!(
        "hold: {held} {} polls connected by {} generator processes in {connect_secs:.1} s ({failed} failed)",
        if o.hold_anon { "anonymous" } else { "session" },
        children.len()
    );
    println!("  {:<8} {:>7} {:>10} {:>15} {:>15} {:>12} {:>9}", "node", "polls", "held_polls", "rss before KiB", "rss after KiB", "growth KiB", "per poll");
    let mut ok = failed == 0 && held == n as u64;
    let (mut tp, mut tg) = (0u64, 0i64);
    let mut worst = 0f64;
    for k in 0..nodes {
        let hp = info_num(&infos[k], "held_polls").unwrap_or(0);
        let growth = rss1[k] as i64 - rss0[k] as i64;
        let per = if hp > 0 { growth as f64 * 1024.0 / hp as f64 } else { f64::NAN };
        worst = worst.max(per);
        tp += hp;
        tg += growth;
        println!("  {:<8} {:>7} {:>10} {:>15} {:>15} {:>12} {:>7.0} B", names[k], per_node[k], hp, rss0[k], rss1[k], growth, per);
        ok &= hp == per_node[k] as u64;
    }
    let per_all = if tp > 0 { tg as f64 * 1024.0 / tp as f64 } else { f64::NAN };
    println!("  {:<8} {:>7} {:>10} {:>15} {:>15} {:>12} {:>7.0} B", "all", n, tp, rss0.iter().sum::<u64>(), rss1.iter().sum::<u64>(), tg, per_all);
    for (k, i) in infos.iter().enumerate() {
        let cl = if o.cluster() { format!(", cluster_sessions_online {}", i.get("cluster_sessions_online").map_or("?", |s| s.as_str())) } else { String::new() };
        println!(
            "  {}: ONLINE COUNT {}, online_sessions {}{cl}, connected_browsers {}",
            names[k],
            counts[k],
            i.get("online_sessions").map_or("?", |s| s.as_str()),
            i.get("connected_browsers").map_or("?", |s| s.as_str())
        );
        ok &= counts[k] == if o.hold_anon { 0 } else { n as i64 };
    }
    if let (Some(a), Some(b)) = (rmem0, rmem1) {
        println!("  redis used_memory {} -> {} KiB: {:.0} B per poll (not comet's)", a / 1024, b / 1024, (b as f64 - a as f64) / n.max(1) as f64);
    }
    println!(
        "  comet RSS per held poll: worst node {worst:.0} B, all nodes {per_all:.0} B: {} the 1 KiB target",
        if worst <= 1024.0 { "within" } else { "ABOVE" }
    );
    // Let the children go.
    let mut done = Vec::new();
    for (child, _, _) in &mut children {
        drop(child.stdin.take());
    }
    let until = Instant::now() + Duration::from_secs(30);
    while done.len() < children.len() {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok((p, line)) if line.starts_with("done ") => done.push((p, line)),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    for (p, line) in &done {
        if line != "done answered=0 closed=0" {
            println!("  generator {}: {line} (a held poll was answered or closed)", p + 1);
            ok = false;
        }
    }
    for (child, _, _) in &mut children {
        let until = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
            thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    println!("{}", if ok { "HOLD OK" } else { "HOLD FAILED" });
    Ok(ok)
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("comet-churn: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let r = if let Some((a, b)) = o.hold_child {
        run_hold_child(&o, a, b)
    } else if o.hold > 0 {
        run_hold(&o)
    } else {
        run(o)
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("comet-churn: {e}");
            ExitCode::from(2)
        }
    }
}
