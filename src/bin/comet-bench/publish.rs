//! The publisher (its own thread, blocking sockets) and the probe that asks the server how many
//! polls it holds. Comet is driven over its control port (RESP `PUBLISH`, `INFO`), nchan over
//! HTTP (`POST /pub?id=`, `nchan_stub_status`).
//!
//! Each message carries its channel's sequence number and the Unix time it was encoded, so the
//! subscribers count loss, duplicates and latency on their own. Back-to-back publishing pipelines
//! commands in batches (a backend pushing a burst does the same); paced publishing sends one
//! message per tick and waits for its reply.

use crate::wire::{self, Blocking};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Commands written before their replies are read, in back-to-back mode.
const BATCH: usize = 64;

/// Where and how to publish.
#[derive(Clone, Debug)]
pub enum Publisher {
    /// RESP `PUBLISH` on comet's control port, after `AUTH token`.
    Comet { control: SocketAddr, token: String },
    /// HTTP `POST /pub?id=<channel>` (nchan, or comet's admin endpoint).
    Http { addr: SocketAddr, path: String, bearer: String },
}

/// What to publish.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub channels: usize,
    /// Messages per channel per round.
    pub messages: u32,
    pub rounds: u32,
    /// Messages per second over all channels; 0 publishes back to back.
    pub rate: f64,
    pub size: usize,
    pub prefix: String,
    /// Deliveries expected per round (subscribers x messages): the next round starts when the
    /// subscribers have counted this many more, or none came for `round_wait`.
    pub per_round: u64,
    pub round_wait: Duration,
}

/// What the publisher did.
#[derive(Debug, Default)]
pub struct Report {
    pub published: u64,
    /// Replies that were errors (RESP `-ERR`, HTTP not 2xx).
    pub errors: u64,
    /// Sum of the servers' "delivered at once" counts (comet `:n`), when it says.
    pub direct: u64,
    /// When the first command was written and the last reply read.
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// Set when the publisher gave up (connection failure), with why.
    pub failure: Option<String>,
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

struct Sink {
    conn: Blocking,
    kind: Publisher,
}

impl Sink {
    fn open(p: &Publisher) -> io::Result<Sink> {
        let conn = match p {
            Publisher::Comet { control, token } => wire::comet_control(*control, token)?,
            Publisher::Http { addr, .. } => Blocking::connect(*addr)?,
        };
        Ok(Sink { conn, kind: p.clone() })
    }

    fn encode(&self, out: &mut Vec<u8>, channel: &str, body: &[u8]) {
        match &self.kind {
            Publisher::Comet { .. } => wire::resp_command(out, &[b"PUBLISH", channel.as_bytes(), body]),
            Publisher::Http { path, bearer, .. } => {
                let auth = if bearer.is_empty() { String::new() } else { format!("Authorization: Bearer {bearer}\r\n") };
                let _ = write!(
                    out,
                    "POST {path}?id={channel} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                out.extend_from_slice(body);
            }
        }
    }

    /// Reads one reply: Ok(Some(n)) delivered-at-once count if the server says, Err on an error
    /// reply (as text).
    fn reply(&mut self) -> io::Result<Result<u64, String>> {
        match self.kind {
            Publisher::Comet { .. } => {
                let r = self.conn.resp()?;
                Ok(match r.strip_prefix(':') {
                    Some(n) => Ok(n.parse().unwrap_or(0)),
                    None => Err(r),
                })
            }
            Publisher::Http { .. } => {
                let (status, body) = self.conn.http()?;
                Ok(if (200..300).contains(&status) {
                    let text = String::from_utf8_lossy(&body);
                    Ok(wire::field(&text, "active subscribers").unwrap_or(0))
                } else {
                    Err(format!("HTTP {status}"))
                })
            }
        }
    }
}

/// Publishes the schedule; `delivered` is the subscribers' running count of unique deliveries,
/// `stop` asks it to end early.
pub fn run(p: Publisher, s: Schedule, delivered: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Report {
    let mut rep = Report::default();
    if let Err(e) = publish(&p, &s, &delivered, &stop, &mut rep) {
        rep.failure = Some(e.to_string());
    }
    rep
}

fn publish(p: &Publisher, s: &Schedule, delivered: &AtomicU64, stop: &AtomicBool, rep: &mut Report) -> io::Result<()> {
    let mut sink = Sink::open(p)?;
    let names: Vec<String> = (0..s.channels).map(|c| format!("{}{c}", s.prefix)).collect();
    // Message order within a round: each message index for every channel in turn.
    let per_round = s.channels as u64 * s.messages as u64;
    let mut buf = Vec::with_capacity(BATCH * (s.size + 128));
    let mut body = Vec::with_capacity(s.size + 64);
    let start = Instant::now();
    let mut sent: u64 = 0;
    for round in 0..s.rounds {
        let mut k: u64 = 0;
        while k < per_round {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Paced: one message per tick. Back to back: a pipelined batch.
            let n = if s.rate > 0.0 { 1 } else { BATCH.min((per_round - k) as usize) };
            if s.rate > 0.0 {
                let due = start + Duration::from_secs_f64(sent as f64 / s.rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            buf.clear();
            for j in 0..n as u64 {
                let idx = k + j;
                let ch = (idx % s.channels as u64) as usize;
                let seq = round * s.messages + (idx / s.channels as u64) as u32;
                body.clear();
                wire::message_body(seq, ch as u32, now_ns(), s.size, &mut body);
                sink.encode(&mut buf, &names[ch], &body);
            }
            if rep.first.is_none() {
                rep.first = Some(Instant::now());
            }
            sink.conn.stream.write_all(&buf)?;
            for _ in 0..n {
                match sink.reply()? {
                    Ok(d) => rep.direct += d,
                    Err(e) => {
                        if rep.errors == 0 {
                            eprintln!("comet-bench: publish error: {e}");
                        }
                        rep.errors += 1;
                    }
                }
            }
            rep.published += n as u64;
            rep.last = Some(Instant::now());
            k += n as u64;
            sent += n as u64;
        }
        if round + 1 < s.rounds {
            // Let this round's deliveries arrive before the next one starts (giving up once
            // none arrived for `round_wait`: those are lost, the subscribers will say).
            let target = (round as u64 + 1) * s.per_round;
            let (mut seen, mut moved) = (delivered.load(Ordering::Relaxed), Instant::now());
            while seen < target && moved.elapsed() < s.round_wait && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
                let now = delivered.load(Ordering::Relaxed);
                if now != seen {
                    (seen, moved) = (now, Instant::now());
                }
            }
        }
    }
    Ok(())
}

/// Asks the server how many polls it holds.
pub enum Probe {
    /// comet: `INFO`, `held_polls:N` plus the open streams.
    Comet(Blocking),
    /// nchan: `GET <path>` of a `nchan_stub_status` location, `subscribers: N`.
    NchanStatus(Blocking, String),
}

impl Probe {
    pub fn held(&mut self) -> io::Result<u64> {
        match self {
            Probe::Comet(c) => {
                let mut cmd = Vec::new();
                wire::resp_command(&mut cmd, &[b"INFO"]);
                c.stream.write_all(&cmd)?;
                let text = c.resp()?;
                let polls = wire::field(&text, "held_polls").ok_or_else(|| io::Error::other("no held_polls in INFO"))?;
                let streams: u64 = ["eventsource_streams", "websocket_streams", "mercure_subscribers"].iter().filter_map(|k| wire::field(&text, k)).sum();
                Ok(polls + streams)
            }
            Probe::NchanStatus(c, path) => {
                write!(c.stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
                let (status, body) = c.http()?;
                if status != 200 {
                    return Err(io::Error::other(format!("status page answered {status}")));
                }
                let text = String::from_utf8_lossy(&body);
                wire::field(&text, "subscribers").ok_or_else(|| io::Error::other("no subscribers: line in the status page"))
            }
        }
    }
}

/// Calls per command of a redis-server (`INFO commandstats`: `cmdstat_<name>:calls=N,...`), on a
/// connection of its own: the cluster's commands per published message are the difference of
/// two readings. The reading's own `INFO` is counted by the next one; `redis_calls` leaves
/// `info` out.
pub fn redis_commandstats(addr: SocketAddr) -> io::Result<std::collections::BTreeMap<String, u64>> {
    let mut c = Blocking::connect(addr)?;
    let mut cmd = Vec::new();
    wire::resp_command(&mut cmd, &[b"INFO", b"commandstats"]);
    c.stream.write_all(&cmd)?;
    let text = c.resp()?;
    if text.starts_with('-') {
        return Err(io::Error::other(format!("INFO commandstats: {text}")));
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_string(), calls))
        })
        .collect())
}

/// How to ask a server for its own count of the commands it sent to Redis.
#[derive(Clone, Debug)]
pub enum SentCount {
    /// comet: `INFO` on a control port, `cluster_commands_sent` (the command link; SUBSCRIBEs
    /// go on the other link and are not counted).
    Comet { token: String },
    /// nchan: its `nchan_stub_status` page at `path`, `total redis commands sent`.
    Nchan { path: String },
}

/// The commands sent to Redis by the servers at `addrs`, summed: the round trips a publish
/// costs, as the servers count them (Redis's own counts add the commands its scripts call).
pub fn redis_sent(how: &SentCount, addrs: &[SocketAddr]) -> io::Result<u64> {
    let mut total = 0;
    for &a in addrs {
        total += match how {
            SentCount::Comet { token } => {
                let mut c = wire::comet_control(a, token)?;
                let mut cmd = Vec::new();
                wire::resp_command(&mut cmd, &[b"INFO"]);
                c.stream.write_all(&cmd)?;
                let text = c.resp()?;
                wire::field(&text, "cluster_commands_sent").ok_or_else(|| io::Error::other(format!("{a}: no cluster_commands_sent in INFO")))?
            }
            SentCount::Nchan { path } => {
                let mut c = Blocking::connect(a)?;
                write!(c.stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
                let (status, body) = c.http()?;
                if status != 200 {
                    return Err(io::Error::other(format!("{a}: status page answered {status}")));
                }
                let text = String::from_utf8_lossy(&body);
                wire::field(&text, "total redis commands sent").ok_or_else(|| io::Error::other(format!("{a}: no total redis commands sent in the status page")))?
            }
        };
    }
    Ok(total)
}
