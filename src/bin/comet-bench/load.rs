//! One phase of load: thousands of long-poll subscribers on one mio loop (one thread), the
//! publisher on a second thread, and the server's CPU and memory read around each step.
//!
//! Each subscriber behaves like a browser's long-poll client: one keep-alive connection, one
//! request at a time, the cursor (`Last-Modified` -> `If-Modified-Since`, `Etag` ->
//! `If-None-Match`) taken from every answer and sent with the next poll, a re-poll on `408`, a
//! reconnect (with the cursor) when the server closes. It checks each message's sequence number
//! and channel, and its latency from the send time written in the body. With `multipart` it asks
//! for batches (`Accept: multipart/mixed`) and checks every part of a batch the same way.
//!
//! Steps: connect every subscriber (at most `window` connects in flight, so the listen backlog
//! never overflows) and send its first poll; wait until the server reports them all held; then
//! publish, and stop when every subscriber has every message (or the time bound passes).
//! `plain` mode instead sends `requests` plain GETs per connection, back to back (the cost of
//! one HTTP request on this machine).

use crate::net;
use crate::procfs::{self, Sample};
use crate::publish::{self, Probe, Publisher, Schedule};
use crate::stream::{self, Transport};
use crate::wire;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Reconnects allowed per subscriber before it is counted as failed.
const MAX_RECONNECTS: u8 = 5;
/// Connect attempts per subscriber before it is counted as failed.
const MAX_CONNECT_TRIES: u8 = 3;

/// How the server reports its held polls.
#[derive(Clone, Debug)]
pub enum HeldCheck {
    /// comet `INFO` on the control port.
    CometInfo { control: SocketAddr, token: String },
    /// nchan `nchan_stub_status` at this path of the HTTP address.
    NchanStatus { path: String },
    /// No way to ask: wait this long after the last poll was sent.
    Settle(Duration),
}

/// Everything a phase needs.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where subscribers connect.
    pub http: SocketAddrV4,
    /// Path of a subscription without the channel id (`/sub/`), or the plain mode's path.
    pub sub_path: String,
    /// Polls send `Accept: multipart/mixed`: a subscriber behind by several messages may get
    /// them in one answer.
    pub multipart: bool,
    pub held: HeldCheck,
    pub publisher: Option<Publisher>,
    /// The server's processes (summed: a cluster's nodes and its redis-server).
    pub server_pids: Vec<u32>,
    /// A redis-server whose `INFO commandstats` is read at the same points as the CPU time.
    pub redis: Option<SocketAddr>,
    /// Servers whose own count of commands sent to Redis is read at the same points.
    pub redis_sent: Option<(publish::SentCount, Vec<SocketAddr>)>,
    pub subs: usize,
    pub channels: usize,
    pub messages: u32,
    pub rounds: u32,
    pub rate: f64,
    pub size: usize,
    pub prefix: String,
    /// Loopback source addresses to spread the sockets over.
    pub sources: usize,
    /// Connects in flight at once.
    pub window: usize,
    /// Connects started per second at most (0: no limit).
    pub connect_rate: f64,
    /// Bound on the whole phase.
    pub timeout: Duration,
    /// How long to wait for the next delivery once all is published (and for a round's).
    pub drain: Duration,
    /// `Some(n)`: plain mode, n requests per connection, no publishing.
    pub plain_requests: Option<u32>,
    /// Long-polls, or streams (EventSource, WebSocket with `ws+meta.nchan`).
    pub transport: Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not connected yet (or waiting to reconnect).
    Closed,
    Connecting,
    /// Connected, no request in flight (plain mode waits here for the start).
    Ready,
    /// A request is in flight.
    Polling,
    /// A stream is open (its head was read): events or frames come as published.
    Streaming,
    /// Finished its requests (plain mode).
    Done,
    /// Gave up (errors, refused connects).
    Failed,
}

struct Sub {
    stream: Option<TcpStream>,
    state: State,
    ch: u32,
    /// Cursor from the last answer: `Last-Modified`, `Etag`.
    last_modified: Option<Box<str>>,
    etag: Option<Box<str>>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Next sequence number expected on its channel.
    next_seq: u32,
    unique: u32,
    reconnects: u8,
    connect_tries: u8,
    /// Plain mode: requests left, and when the one in flight was sent.
    left: u32,
    sent_at: Instant,
    /// The first poll was sent (counted once).
    started: bool,
    /// Its next poll waits in `Load::resend`.
    queued: bool,
    /// When the kernel received the data last read (Unix ns), if it stamps this socket.
    arrived: Option<u64>,
    /// A stream's last message id, sent as `Last-Event-ID` when it reconnects.
    last_id: Option<Box<str>>,
}

/// What the subscribers saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub connected: u64,
    pub connect_errors: u64,
    pub failed: u64,
    pub reconnects: u64,
    pub unique: u64,
    /// `200` answers to polls: a batch of messages counts once.
    pub responses: u64,
    pub dups: u64,
    pub gaps: u64,
    pub misrouted: u64,
    pub bad_bodies: u64,
    pub timeouts: u64,
    pub protocol_errors: u64,
    /// Other statuses, by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Latencies in microseconds (one per unique delivery, or per plain request).
    pub latencies: Vec<u32>,
    /// With one channel and paced messages: the latencies again, by message sequence number
    /// (each message is one fan-out to held polls), for the server's time per answer within a
    /// fan-out. Back to back, most answers come from the buffer to re-polls instead.
    pub by_message: Vec<Vec<u32>>,
    pub requests: u64,
    pub last_delivery: Option<Instant>,
    /// Sockets whose received data the kernel stamps with its arrival time.
    pub stamped_sockets: u64,
}

/// What a phase measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub tally: Tally,
    pub held: u64,
    pub expected: u64,
    pub publish: Option<publish::Report>,
    pub before: Option<Sample>,
    pub at_held: Option<Sample>,
    pub at_end: Option<Sample>,
    /// The load generator's own CPU time at the same two points (to tell when it is the limit).
    pub self_at_held: Option<Sample>,
    pub self_at_end: Option<Sample>,
    /// Each of the server's processes (in `plan.server_pids` order) at the same two points, when
    /// there are several.
    pub each_at_held: Vec<Option<Sample>>,
    pub each_at_end: Vec<Option<Sample>>,
    /// `plan.redis`'s calls per command at the start, once every poll is held, and at the end.
    pub redis_before: Option<RedisCalls>,
    pub redis_at_held: Option<RedisCalls>,
    pub redis_at_end: Option<RedisCalls>,
    /// `plan.redis_sent`'s count at the same three points.
    pub sent_before: Option<u64>,
    pub sent_at_held: Option<u64>,
    pub sent_at_end: Option<u64>,
    pub held_at: Option<Duration>,
    pub timed_out: bool,
    /// Plain mode: when the requests started and ended.
    pub plain_start: Option<Instant>,
    pub plain_end: Option<Instant>,
    pub note: Vec<String>,
}

/// Calls per command of a redis-server.
pub type RedisCalls = BTreeMap<String, u64>;

/// Reads `plan.redis`'s calls per command, if it is set; a failure is noted, not fatal.
fn redis_calls(plan: &Plan, note: &mut Vec<String>) -> Option<RedisCalls> {
    let addr = plan.redis?;
    match publish::redis_commandstats(addr) {
        Ok(c) => Some(c),
        Err(e) => {
            note.push(format!("INFO commandstats of {addr} failed: {e}"));
            None
        }
    }
}

/// Reads `plan.redis_sent`'s count, if it is set; a failure is noted, not fatal.
fn sent_count(plan: &Plan, note: &mut Vec<String>) -> Option<u64> {
    let (how, addrs) = plan.redis_sent.as_ref()?;
    match publish::redis_sent(how, addrs) {
        Ok(n) => Some(n),
        Err(e) => {
            note.push(format!("reading the servers' Redis command counts failed: {e}"));
            None
        }
    }
}

/// Each of the server's processes, when there are several (one: the sum says it all).
fn each(plan: &Plan) -> Vec<Option<Sample>> {
    if plan.server_pids.len() < 2 {
        return Vec::new();
    }
    plan.server_pids.iter().map(|&p| procfs::sample(p)).collect()
}

#[derive(PartialEq, Eq, Debug, Clone, Copy)]
enum Step {
    Connecting,
    Holding,
    Publishing,
    Finished,
}

struct Load<'a> {
    plan: &'a Plan,
    poll: Poll,
    subs: Vec<Sub>,
    tally: Tally,
    scratch: Box<[u8]>,
    /// Subscribers waiting to (re)connect, in order.
    to_open: VecDeque<usize>,
    connecting: usize,
    /// Subscribers that sent their first poll.
    started: usize,
    /// Connects started (for the rate limit).
    opened: u64,
    delivered: Arc<AtomicU64>,
    plain: bool,
    /// Subscribers whose answer came in this batch of readiness events: their next polls go out
    /// once the whole batch is read, so the batch's later answers are timed when they arrived,
    /// not after this one thread's writes for the earlier ones. (Holding them back until no
    /// answer at all is waiting would make a round's messages wait on re-polls still unsent.)
    resend: Vec<usize>,
}

fn ms(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

impl<'a> Load<'a> {
    fn request(&self, s: &Sub, out: &mut Vec<u8>) {
        out.clear();
        if self.plain {
            let _ = write!(out, "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", self.plan.sub_path);
            return;
        }
        let _ = write!(out, "GET {}{}{} HTTP/1.1\r\nHost: 127.0.0.1\r\n", self.plan.sub_path, self.plan.prefix, s.ch);
        match self.plan.transport {
            Transport::LongPoll => {}
            Transport::EventSource => out.extend_from_slice(b"Accept: text/event-stream\r\n"),
            Transport::WebSocket => {
                let _ = write!(
                    out,
                    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ws+meta.nchan\r\n",
                    stream::WS_KEY
                );
            }
        }
        if let Some(id) = &s.last_id {
            let _ = write!(out, "Last-Event-ID: {id}\r\n");
        }
        if let Some(lm) = &s.last_modified {
            let _ = write!(out, "If-Modified-Since: {lm}\r\n");
        }
        if let Some(e) = &s.etag {
            let _ = write!(out, "If-None-Match: {e}\r\n");
        }
        if self.plan.multipart {
            out.extend_from_slice(b"Accept: multipart/mixed\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    fn open(&mut self, i: usize) {
        let src = net::source(i, self.plan.sources);
        let s = &mut self.subs[i];
        s.connect_tries += 1;
        match net::connect_from(src, self.plan.http) {
            Ok(mut stream) => {
                if let Err(e) = self.poll.registry().register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE) {
                    eprintln!("comet-bench: register failed: {e}");
                    s.state = State::Failed;
                    self.tally.failed += 1;
                    return;
                }
                s.stream = Some(stream);
                s.state = State::Connecting;
                self.connecting += 1;
            }
            Err(e) => {
                self.tally.connect_errors += 1;
                if self.tally.connect_errors <= 3 {
                    eprintln!("comet-bench: connect from {src:?} failed: {e}");
                }
                self.retry_connect(i);
            }
        }
    }

    fn retry_connect(&mut self, i: usize) {
        let s = &mut self.subs[i];
        s.stream = None;
        if s.connect_tries < MAX_CONNECT_TRIES {
            s.state = State::Closed;
            self.to_open.push_back(i);
        } else {
            s.state = State::Failed;
            self.tally.failed += 1;
        }
    }

    /// The server closed (or broke) a connection with a poll in flight: reconnect, cursor kept.
    fn reconnect(&mut self, i: usize) {
        let s = &mut self.subs[i];
        if let Some(mut st) = s.stream.take() {
            let _ = self.poll.registry().deregister(&mut st);
        }
        s.inbuf.clear();
        s.out.clear();
        if s.reconnects >= MAX_RECONNECTS || s.state == State::Done {
            if s.state != State::Done {
                s.state = State::Failed;
                self.tally.failed += 1;
            }
            return;
        }
        s.reconnects += 1;
        s.connect_tries = 0;
        s.state = State::Closed;
        self.tally.reconnects += 1;
        self.to_open.push_back(i);
    }

    fn fail(&mut self, i: usize, why: &str) {
        if self.tally.failed < 3 {
            eprintln!("comet-bench: subscriber {i} failed: {why}");
        }
        let s = &mut self.subs[i];
        if let Some(mut st) = s.stream.take() {
            let _ = self.poll.registry().deregister(&mut st);
        }
        if s.state != State::Failed {
            s.state = State::Failed;
            self.tally.failed += 1;
        }
    }

    /// Sends the next request of subscriber `i`.
    fn send(&mut self, i: usize) {
        let mut out = std::mem::take(&mut self.subs[i].out);
        self.request(&self.subs[i], &mut out);
        let s = &mut self.subs[i];
        s.out = out;
        s.state = State::Polling;
        s.sent_at = Instant::now();
        if !s.started {
            s.started = true;
            self.started += 1;
        }
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let s = &mut self.subs[i];
        let Some(stream) = s.stream.as_mut() else { return };
        while !s.out.is_empty() {
            match stream.write(&s.out) {
                Ok(n) => {
                    s.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reconnect(i);
                    return;
                }
            }
        }
    }

    fn event(&mut self, i: usize, ev: &mio::event::Event) {
        let Some(s) = self.subs.get_mut(i) else { return };
        match s.state {
            State::Connecting => {
                let Some(stream) = s.stream.as_ref() else { return };
                match net::connected(stream) {
                    Ok(true) => {
                        self.connecting -= 1;
                        self.tally.connected += 1;
                        let _ = stream.set_nodelay(true);
                        if net::stamp_arrivals(stream) {
                            self.tally.stamped_sockets += 1;
                        }
                        s.state = State::Ready;
                        if !self.plain || s.started {
                            self.send(i);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.connecting -= 1;
                        self.tally.connect_errors += 1;
                        if self.tally.connect_errors <= 3 {
                            eprintln!("comet-bench: connect failed: {e}");
                        }
                        if let Some(mut st) = s.stream.take() {
                            let _ = self.poll.registry().deregister(&mut st);
                        }
                        self.retry_connect(i);
                    }
                }
            }
            State::Ready | State::Polling | State::Streaming | State::Done => {
                if ev.is_writable() && !s.out.is_empty() {
                    self.flush(i);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.read(i);
                }
            }
            State::Closed | State::Failed => {}
        }
    }

    fn read(&mut self, i: usize) {
        let mut eof = false;
        {
            let s = &mut self.subs[i];
            let Some(stream) = s.stream.as_mut() else { return };
            loop {
                match net::recv_stamped(stream, &mut self.scratch) {
                    Ok((0, _)) => {
                        eof = true;
                        break;
                    }
                    Ok((n, arrived)) => {
                        s.arrived = arrived;
                        s.inbuf.extend_from_slice(&self.scratch[..n]);
                        // A short read drained the socket; more data will raise a new edge.
                        // This saves the WouldBlock read per answer that a loop would cost.
                        if n < self.scratch.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        eof = true;
                        break;
                    }
                }
            }
        }
        if self.plan.transport != Transport::LongPoll {
            return self.read_stream(i, eof);
        }
        while self.subs[i].state == State::Polling && !self.subs[i].inbuf.is_empty() {
            let h = match wire::parse_head(&self.subs[i].inbuf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.tally.protocol_errors += 1;
                    self.fail(i, &e);
                    return;
                }
            };
            let total = h.head_len + h.body_len;
            if self.subs[i].inbuf.len() < total {
                break;
            }
            let close = h.close;
            self.answer(i, h, total);
            let s = &mut self.subs[i];
            s.inbuf.drain(..total);
            if close && s.state != State::Failed {
                // The server ends the connection after this answer: poll again on a new one.
                let state = s.state;
                self.reconnect(i);
                if state == State::Done {
                    self.subs[i].state = State::Done;
                }
                return;
            }
            if s.state == State::Ready {
                s.queued = true;
                self.resend.push(i);
                break;
            }
        }
        if eof {
            let s = &self.subs[i];
            match s.state {
                // Closed with the next poll still to send: that poll goes on a new connection.
                State::Polling => self.reconnect(i),
                State::Ready if s.queued => self.reconnect(i),
                State::Failed => {}
                _ => {
                    // Closed while idle (plain mode, done): nothing lost.
                    let s = &mut self.subs[i];
                    if let Some(mut st) = s.stream.take() {
                        let _ = self.poll.registry().deregister(&mut st);
                    }
                }
            }
        }
    }

    /// Reads a stream's input: its head, then events or frames, each message counted as a
    /// long-poll answer's is. A stream the server closes reconnects with its last id.
    fn read_stream(&mut self, i: usize, eof: bool) {
        let now = Instant::now();
        let ws = self.plan.transport == Transport::WebSocket;
        let mut inbuf = std::mem::take(&mut self.subs[i].inbuf);
        let mut at = 0;
        let mut pong = Vec::new();
        let mut closed = eof;
        loop {
            match self.subs[i].state {
                State::Polling => match stream::head(&inbuf[at..]) {
                    Ok(Some((status, n))) if status == if ws { 101 } else { 200 } => {
                        at += n;
                        self.subs[i].state = State::Streaming;
                    }
                    Ok(Some((status, _))) => {
                        *self.tally.statuses.entry(status).or_default() += 1;
                        self.fail(i, &format!("status {status}"));
                        return;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.tally.protocol_errors += 1;
                        self.fail(i, &e);
                        return;
                    }
                },
                State::Streaming if ws => match stream::ws_next(&inbuf[at..]) {
                    Ok(Some((op, r, n))) => {
                        let payload = &inbuf[at..][r];
                        match op {
                            1 | 2 => match stream::meta(payload) {
                                Some((id, body)) => {
                                    self.subs[i].last_id = Some(id.into());
                                    self.tally.responses += 1;
                                    self.message(i, body, now);
                                }
                                None => self.tally.bad_bodies += 1,
                            },
                            9 => pong.extend(stream::client_frame(10, payload)),
                            8 => closed = true,
                            _ => {}
                        }
                        at += n;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.tally.protocol_errors += 1;
                        self.fail(i, &e);
                        return;
                    }
                },
                State::Streaming => match stream::sse_next(&inbuf[at..]) {
                    Some((stream::Sse::Event(id, body), n)) => {
                        if let Some(id) = id {
                            self.subs[i].last_id = Some(id.into());
                        }
                        self.tally.responses += 1;
                        self.message(i, &body, now);
                        at += n;
                    }
                    Some((stream::Sse::Other, n)) => at += n,
                    None => break,
                },
                _ => break,
            }
        }
        inbuf.drain(..at);
        self.subs[i].inbuf = inbuf;
        if !pong.is_empty() {
            self.subs[i].out.extend_from_slice(&pong);
            self.flush(i);
        }
        if closed && matches!(self.subs[i].state, State::Polling | State::Streaming) {
            self.subs[i].state = State::Polling;
            self.reconnect(i);
        }
    }

    /// Handles one complete response of subscriber `i` (bytes `..total` of its input).
    fn answer(&mut self, i: usize, h: wire::Head, total: usize) {
        let now = Instant::now();
        if self.plain {
            let s = &mut self.subs[i];
            if (200..300).contains(&h.status) {
                self.tally.requests += 1;
                self.tally.latencies.push(now.duration_since(s.sent_at).as_micros().min(u32::MAX as u128) as u32);
                s.left = s.left.saturating_sub(1);
                s.state = if s.left == 0 { State::Done } else { State::Ready };
                if s.left == 0 {
                    self.tally.last_delivery = Some(now);
                }
            } else {
                *self.tally.statuses.entry(h.status).or_default() += 1;
                self.fail(i, &format!("status {}", h.status));
            }
            return;
        }
        let s = &mut self.subs[i];
        // Every answer that carries a cursor moves it (a 408 echoes the request's own).
        if let Some(lm) = h.last_modified {
            s.last_modified = Some(lm.into());
            s.etag = h.etag.map(Into::into);
        }
        match h.status {
            200 => {
                self.tally.responses += 1;
                s.state = State::Ready;
                // Out of the subscriber while its messages are counted (which updates it); the
                // caller drains the answer from it afterwards.
                let inbuf = std::mem::take(&mut s.inbuf);
                let body = &inbuf[h.head_len..total];
                match &h.boundary {
                    None => self.message(i, body, now),
                    Some(b) => match wire::parts(body, b) {
                        Some(parts) if !parts.is_empty() => {
                            for p in parts {
                                self.message(i, p, now);
                            }
                        }
                        _ => self.tally.bad_bodies += 1,
                    },
                }
                self.subs[i].inbuf = inbuf;
            }
            408 => {
                self.tally.timeouts += 1;
                s.state = State::Ready;
            }
            st => {
                *self.tally.statuses.entry(st).or_default() += 1;
                self.fail(i, &format!("status {st}"));
            }
        }
    }

    /// Counts one message that subscriber `i` received (a whole body, or a part of a batch).
    fn message(&mut self, i: usize, body: &[u8], now: Instant) {
        let s = &mut self.subs[i];
        match wire::parse_body(body) {
            Some((seq, ch, t)) if ch == s.ch => {
                if seq >= s.next_seq {
                    self.tally.gaps += (seq - s.next_seq) as u64;
                    s.next_seq = seq + 1;
                    s.unique += 1;
                    self.tally.unique += 1;
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                    // From the send time in the body to the answer's arrival in the socket (the
                    // read, on a kernel that does not stamp): the load generator's own delays in
                    // reading thousands of sockets on one thread are not the server's.
                    let arrived = s.arrived.unwrap_or_else(publish::now_ns);
                    let lat_us = (arrived.saturating_sub(t) / 1000).min(u32::MAX as u64) as u32;
                    self.tally.latencies.push(lat_us);
                    // Sequence numbers run below messages x rounds; one beyond is not a
                    // message of this run and must not size the table.
                    let published = self.plan.messages as u64 * self.plan.rounds as u64;
                    if self.plan.channels == 1 && self.plan.rate > 0.0 && (seq as u64) < published {
                        let m = &mut self.tally.by_message;
                        if m.len() <= seq as usize {
                            m.resize_with(seq as usize + 1, Vec::new);
                        }
                        m[seq as usize].push(lat_us);
                    }
                    self.tally.last_delivery = Some(now);
                } else {
                    self.tally.dups += 1;
                }
            }
            Some(_) => self.tally.misrouted += 1,
            None => self.tally.bad_bodies += 1,
        }
    }

    fn all_done(&self) -> bool {
        self.subs.iter().all(|s| matches!(s.state, State::Done | State::Failed))
    }
}

fn per_answer_median(by_message: &[Vec<u32>]) -> Option<f64> {
    let mut per: Vec<f64> = by_message
        .iter()
        .filter(|l| l.len() >= 100)
        .map(|l| {
            let mut l = l.clone();
            l.sort_unstable();
            let k = ((l.len() - 1) as f64 * 0.99).round() as usize;
            (l[k] - l[0]) as f64 / k as f64
        })
        .collect();
    per.sort_by(f64::total_cmp);
    per.get(per.len() / 2).copied()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64
}

impl Outcome {
    /// Latency percentile in milliseconds.
    pub fn latency_ms(&self, p: f64) -> f64 {
        percentile(&self.tally.latencies, p) / 1000.0
    }

    /// The server's time per answer within a fan-out, in microseconds: for each message that
    /// reached at least 100 subscribers, the time from its first arrival to its 99th-percentile
    /// one, divided by the answers in between; the median over those messages. Unlike the p99
    /// over all deliveries, one slow spell of the shared machine moves it only if it lasts for
    /// half of the messages. None unless messages went to one channel at a paced rate.
    pub fn us_per_answer(&self) -> Option<f64> {
        per_answer_median(&self.tally.by_message)
    }
}

/// Runs one phase.
pub fn run(plan: &Plan) -> io::Result<Outcome> {
    let plain = plan.plain_requests.is_some();
    let n = plan.subs;
    let channels = plan.channels.max(1);
    let mut load = Load {
        plan,
        poll: Poll::new()?,
        subs: (0..n)
            .map(|i| Sub {
                stream: None,
                state: State::Closed,
                ch: (i % channels) as u32,
                last_modified: None,
                etag: None,
                inbuf: Vec::new(),
                out: Vec::new(),
                next_seq: 0,
                unique: 0,
                reconnects: 0,
                connect_tries: 0,
                left: plan.plain_requests.unwrap_or(0),
                sent_at: Instant::now(),
                started: false,
                queued: false,
                arrived: None,
                last_id: None,
            })
            .collect(),
        tally: Tally::default(),
        scratch: vec![0; 64 * 1024].into_boxed_slice(),
        to_open: (0..n).collect(),
        connecting: 0,
        started: 0,
        opened: 0,
        delivered: Arc::new(AtomicU64::new(0)),
        plain,
        resend: Vec::new(),
    };
    let mut out = Outcome { expected: n as u64 * plan.messages as u64 * plan.rounds as u64, ..Outcome::default() };
    if plain {
        out.expected = n as u64 * plan.plain_requests.unwrap_or(0) as u64;
    }
    let t0 = Instant::now();
    let deadline = t0 + plan.timeout;
    out.before = procfs::maybe(&plan.server_pids);
    out.redis_before = redis_calls(plan, &mut out.note);
    out.sent_before = sent_count(plan, &mut out.note);
    let mut events = Events::with_capacity(4096);
    let mut step = Step::Connecting;
    let mut probe: Option<Probe> = None;
    let mut next_probe = t0;
    let mut all_sent_at: Option<Instant> = None;
    let stop = Arc::new(AtomicBool::new(false));
    let mut publisher: Option<std::thread::JoinHandle<publish::Report>> = None;
    let mut last_report = t0;
    while step != Step::Finished {
        // Connects are paced (in flight and per second): the servers' listen backlogs are short
        // (comet's is 128), and a SYN dropped on overflow costs its client a 1 s retransmit.
        let allowed = if plan.connect_rate > 0.0 { (t0.elapsed().as_secs_f64() * plan.connect_rate) as u64 + 1 } else { u64::MAX };
        while load.connecting < plan.window && load.opened < allowed {
            let Some(i) = load.to_open.pop_front() else { break };
            load.opened += 1;
            load.open(i);
        }
        load.poll.poll(&mut events, Some(Duration::from_millis(5)))?;
        for ev in events.iter() {
            load.event(ev.token().0, ev);
        }
        for i in std::mem::take(&mut load.resend) {
            let s = &mut load.subs[i];
            if std::mem::take(&mut s.queued) && s.state == State::Ready {
                load.send(i);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            out.timed_out = true;
            out.note.push(format!("time bound {} reached in step {step:?}", ms(plan.timeout)));
            break;
        }
        if now.duration_since(last_report) >= Duration::from_secs(5) {
            last_report = now;
            eprintln!(
                "comet-bench: {:?} at {}: connected {} started {} failed {} delivered {}/{}",
                step,
                ms(now - t0),
                load.tally.connected,
                load.started,
                load.tally.failed,
                if plain { load.tally.requests } else { load.tally.unique },
                out.expected
            );
        }
        match step {
            Step::Connecting => {
                // Every subscriber connected (plain) or polling (long-poll), or failed.
                let ready = load.to_open.is_empty()
                    && load.connecting == 0
                    && load.subs.iter().all(|s| match s.state {
                        State::Failed => true,
                        State::Ready => plain || s.started,
                        State::Polling | State::Streaming => true,
                        _ => false,
                    });
                let alive = n - load.tally.failed as usize;
                if ready {
                    all_sent_at = Some(now);
                    step = Step::Holding;
                    if plain {
                        // Everyone connected: start the clock and the requests together.
                        out.at_held = procfs::maybe(&plan.server_pids);
                        out.each_at_held = each(plan);
                        out.self_at_held = procfs::sample(std::process::id());
                        out.redis_at_held = redis_calls(plan, &mut out.note);
                        out.sent_at_held = sent_count(plan, &mut out.note);
                        out.held = alive as u64;
                        out.held_at = Some(now - t0);
                        out.plain_start = Some(Instant::now());
                        for i in 0..n {
                            if load.subs[i].state == State::Ready {
                                load.subs[i].started = true;
                                load.send(i);
                            }
                        }
                        step = Step::Publishing;
                    } else {
                        probe = match &plan.held {
                            HeldCheck::CometInfo { control, token } => Some(Probe::Comet(wire::comet_control(*control, token)?)),
                            HeldCheck::NchanStatus { path } => {
                                Some(Probe::NchanStatus(wire::Blocking::connect(SocketAddr::V4(plan.http))?, path.clone()))
                            }
                            HeldCheck::Settle(_) => None,
                        };
                    }
                }
            }
            Step::Holding => {
                let alive = (n - load.tally.failed as usize) as u64;
                let mut held_now = None;
                if let Some(p) = probe.as_mut() {
                    if now >= next_probe {
                        next_probe = now + Duration::from_millis(50);
                        match p.held() {
                            Ok(h) => {
                                out.held = h;
                                if h >= alive {
                                    held_now = Some(h);
                                }
                            }
                            Err(e) => return Err(io::Error::other(format!("held probe failed: {e}"))),
                        }
                    }
                } else if let HeldCheck::Settle(d) = plan.held {
                    if now >= all_sent_at.unwrap_or(now) + d {
                        out.held = alive;
                        held_now = Some(alive);
                    }
                }
                if held_now.is_some() {
                    out.held_at = Some(now - t0);
                    out.at_held = procfs::maybe(&plan.server_pids);
                    out.each_at_held = each(plan);
                    out.self_at_held = procfs::sample(std::process::id());
                    out.redis_at_held = redis_calls(plan, &mut out.note);
                    out.sent_at_held = sent_count(plan, &mut out.note);
                    eprintln!("comet-bench: {} polls held after {}", out.held, ms(now - t0));
                    if plan.messages == 0 || plan.publisher.is_none() {
                        step = Step::Finished;
                    } else {
                        let sched = Schedule {
                            channels,
                            messages: plan.messages,
                            rounds: plan.rounds,
                            rate: plan.rate,
                            size: plan.size,
                            prefix: plan.prefix.clone(),
                            per_round: n as u64 * plan.messages as u64,
                            round_wait: plan.drain,
                        };
                        let (p, d, s) = (plan.publisher.clone().unwrap(), load.delivered.clone(), stop.clone());
                        publisher = Some(std::thread::spawn(move || publish::run(p, sched, d, s)));
                        step = Step::Publishing;
                    }
                }
            }
            Step::Publishing => {
                if plain {
                    if load.all_done() {
                        out.plain_end = Some(now);
                        step = Step::Finished;
                    }
                    continue;
                }
                if load.tally.unique >= out.expected {
                    step = Step::Finished;
                } else if publisher.as_ref().is_some_and(|h| h.is_finished()) {
                    let h = publisher.take().unwrap();
                    let rep = h.join().unwrap_or_default();
                    if let Some(f) = &rep.failure {
                        out.note.push(format!("publisher failed: {f}"));
                    }
                    out.publish = Some(rep);
                }
                // Published everything: wait while deliveries still arrive; a message missing
                // `drain` after the last publish and the last delivery is lost.
                if let Some(rep) = out.publish.as_ref().filter(|_| step != Step::Finished) {
                    let progress = rep.last.into_iter().chain(load.tally.last_delivery).max().unwrap_or(now);
                    if now >= progress + plan.drain {
                        out.note.push(format!("deliveries missing: none arrived for {}", ms(plan.drain)));
                        step = Step::Finished;
                    }
                }
            }
            Step::Finished => {}
        }
    }
    out.at_end = procfs::maybe(&plan.server_pids);
    out.each_at_end = each(plan);
    out.self_at_end = procfs::sample(std::process::id());
    out.redis_at_end = redis_calls(plan, &mut out.note);
    out.sent_at_end = sent_count(plan, &mut out.note);
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = publisher.take() {
        out.publish = Some(h.join().unwrap_or_default());
    }
    // Close everything at once with RST: the next phase wants the ports, not TIME_WAIT.
    for s in load.subs.iter_mut() {
        if let Some(st) = s.stream.take() {
            net::abortive_close(&st);
        }
    }
    let unstarted = load.subs.iter().filter(|s| !matches!(s.state, State::Done | State::Failed | State::Polling | State::Streaming | State::Ready)).count();
    if unstarted > 0 {
        out.note.push(format!("{unstarted} subscribers never got connected"));
    }
    load.tally.latencies.sort_unstable();
    out.tally = load.tally;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::per_answer_median;

    #[test]
    fn time_per_answer_is_the_median_message_spread() {
        // 101 answers each: first at 100 us, the 99th-percentile one (index 99) at 100 + 99 * x.
        let message = |x: u32| -> Vec<u32> { (0..101).map(|i| 100 + i * x).rev().collect() };
        let by_message = vec![message(5), message(4), message(9), vec![1, 2, 3]];
        // Per message 5, 4 and 9 us; the short one (under 100 answers) takes no part.
        assert_eq!(per_answer_median(&by_message), Some(5.0));
        assert_eq!(per_answer_median(&[vec![7; 50]]), None);
        assert_eq!(per_answer_median(&[]), None);
    }
}
