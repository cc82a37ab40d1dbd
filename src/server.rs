//! The event loop: one mio `Poll` on one thread owns every socket, the connection slab, the
//! timers and the hub. Each turn: wait for readiness (or the next timer), accept, read until
//! `WouldBlock`, hand complete requests to the handlers (`browser.rs`, `admin.rs`, `control.rs`),
//! write eagerly, fire due timers, then reap the connections marked dead. Nothing here blocks:
//! work that would (database, HTTP callbacks) goes to worker threads, whose results come back on
//! a crossbeam channel and wake the loop through its single `mio::Waker`.
//!
//! Connections are never freed in the middle of dispatch: `kill` marks them, `reap` frees them
//! before the next poll (as Redis's `beforeSleep` does). Every deferred piece of work (a timer, a
//! held poll in the hub) carries a stamp from a counter that is never reused, so an entry that
//! outlived its connection or phase is recognised and skipped.

use crate::config::Config;
use crate::auth::{self, Verdict};
use crate::conn::{Chunk, Conn, Hold, Kind, OutQueue, PendingPoll, Phase};
use crate::worker::{self, Outcome, Pool, Ticket};
use crate::hub::{Hub, Message, Waiters};
use crate::message::Wire;
use crate::{debug, http, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BROWSER: Token = Token(usize::MAX - 1);
const CONTROL: Token = Token(usize::MAX - 2);
const ADMIN: Token = Token(usize::MAX - 3);
const WAKER: Token = Token(usize::MAX - 4);

/// One event of a turn: what the poller said of a token.
struct Ready {
    token: usize,
    readable: bool,
    writable: bool,
    read_closed: bool,
    error: bool,
}

impl Ready {
    fn of(ev: &mio::event::Event) -> Ready {
        Ready { token: ev.token().0, readable: ev.is_readable(), writable: ev.is_writable(), read_closed: ev.is_read_closed(), error: ev.is_error() }
    }
}

/// The start of a 200: status line, `Date`, `Connection` (the lines that differ per delivery).
fn ok_head(o: &mut Vec<u8>, date: &str, keep_alive: bool) {
    o.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    o.extend_from_slice(date.as_bytes());
    o.extend_from_slice(http::connection_header(keep_alive).as_bytes());
}

/// A multipart part whose message tail is shorter than this is copied into the answer's buffer
/// rather than queued as a shared chunk.
const COPY_PART_BELOW: usize = 2048;
/// Most messages in one multipart answer.
const MAX_BATCH: usize = 100;

/// A boundary no body will contain by chance: 128 bits from the std hasher's random keys.
fn make_boundary() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::from("comet-");
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i ^ std::process::id() as u64);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// The pub/sub channel on which backends receive presence events.
pub const PRESENCE_CHANNEL: &str = "__presence__";

/// Longest a shutdown waits for answers to drain before closing what is left.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// At most one log line per refusal reason and Origin (or address) this often.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// Bytes read from one connection in one turn before others get theirs.
const READ_BUDGET: usize = 1 << 20;

/// Largest emptied input buffer kept as the spare (a poll's head is a few hundred bytes; a
/// backend's pipelined commands a few KiB).
const SPARE_INBUF_MAX: usize = 4096;

/// Extra time a shutdown waits for the last store batch.
const STORE_SHUTDOWN_GRACE: Duration = Duration::from_secs(4);
/// Pause before accepting again after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Something that wakes the loop from another thread.
#[derive(Clone)]
pub struct Handle {
    waker: Arc<Waker>,
    shutdown: Arc<AtomicBool>,
}

impl Handle {
    /// Asks the loop to shut down gracefully (from a signal handler thread).
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// A timer entry: fires at `at` for the connection at `token` if its stamp is still `stamp`.
struct Timer {
    at: Instant,
    token: usize,
    stamp: u64,
}

/// Timer queues. Each kind has one fixed duration, so entries are pushed in deadline order and
/// a FIFO is a priority queue: pushing and popping are O(1), stale entries are skipped.
#[derive(Default)]
struct Timers {
    /// Held polls: `poll_timeout` -> 408.
    hold: VecDeque<Timer>,
    /// Request heads started and not finished: `head_timeout` -> 408 and close.
    head: VecDeque<Timer>,
    /// Keep-alive HTTP connections between requests: `idle_timeout` -> close.
    idle: VecDeque<Timer>,
    /// Polls waiting for a worker's access check: `job_timeout` -> 504.
    job: VecDeque<Timer>,
    /// Connections whose output has not moved: `idle_timeout` -> cut as a slow reader.
    write: VecDeque<Timer>,
    /// Open streams: `stream_ping` -> a keep-alive (stamp: the stream's hold id).
    ping: VecDeque<Timer>,
}

/// Counters for `INFO` and `/status`.
#[derive(Default)]
pub struct Counters {
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections refused at accept (over `max_connections`).
    pub refused: u64,
    /// Requests answered with a 4xx/5xx error or a RESP protocol error.
    pub rejected: u64,
    /// Connections cut for not reading their output.
    pub slow_readers: u64,
    /// Access checks answered from the cache.
    pub auth_cache_hits: u64,
    /// Access-check jobs submitted to the pool.
    pub auth_jobs: u64,
    /// Jobs refused because the queue was full (503).
    pub jobs_refused: u64,
    /// Jobs whose answer came too late (504).
    pub jobs_timed_out: u64,
    /// Access checks answered by a worker: allowed, denied, failed (503).
    pub auth_allowed: u64,
    pub auth_denied: u64,
    pub auth_failed: u64,
    /// Access-check latency histogram: counts per `AUTH_BUCKETS` bound, then the sum in seconds.
    pub auth_latency: [u64; AUTH_BUCKETS.len()],
    pub auth_latency_sum: f64,
    /// Messages written to streams: event streams, WebSockets.
    pub stream_deliveries: [u64; 2],
}

/// A reply held back until the store has committed the message it acknowledges.
pub enum Deferred {
    /// RESP bytes.
    Resp(Vec<u8>),
    /// An HTTP answer: status, content type, body, keep-alive.
    Http(u16, &'static str, Vec<u8>, bool),
}

/// Upper bounds (seconds) of the access-check latency histogram buckets.
pub const AUTH_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// The daemon's state, owned by the loop thread.
pub struct Server {
    /// The validated configuration.
    pub cfg: Config,
    /// The channel hub.
    pub hub: Hub,
    /// Who is online, and where.
    pub presence: crate::presence::Presence,
    /// Presence events gathered this turn, sent before the next poll.
    pub events: Vec<crate::presence::Event>,
    /// The cached `Date:` line and the second it was made for.
    date: String,
    date_secs: u64,
    /// The start of a 200 for this second, closing and keep-alive (`ok_head`): shared by every
    /// single-message answer, so a delivery allocates nothing.
    ok_heads: [Arc<[u8]>; 2],
    /// The multipart boundary: random per daemon run, so a message body cannot contain it by
    /// accident, and the same for every batch, so message tails are shared as they are.
    boundary: String,
    /// The argument ranges of the control command being parsed (see `resp::parse_frame`).
    pub(crate) resp_spans: Vec<std::ops::Range<usize>>,
    /// Holds a publish answered, waiting for their presence bookkeeping (kept for its memory).
    ended_holds: Vec<Hold>,
    /// The waiters of the message being fanned out, in token order (kept for its capacity).
    fanout: Vec<(u64, usize)>,
    /// The streams that message was written to, to wait again (kept for its capacity).
    streams_fed: Vec<(u64, usize)>,
    /// Streams with messages queued this turn, written before the loop sleeps.
    pub(crate) streams_to_flush: Vec<usize>,
    /// The events of the turn, in token order (kept for its capacity).
    ready: Vec<Ready>,
    /// Store operations waiting for the next batch.
    pub(crate) store_batch: Vec<crate::store::Op>,
    /// A store batch is being written.
    pub(crate) store_in_flight: bool,
    /// Sequence number of the last operation queued for the store.
    pub store_seq: u64,
    /// Replies waiting for the store (`fsync = "always"`): (sequence, token, connection id, reply).
    pub(crate) store_acks: VecDeque<(u64, usize, u64, Deferred)>,
    /// When the next write-behind batch may go (`everysec` / `no`).
    pub(crate) store_next_flush: Instant,
    /// Presence events waiting to be written as rows.
    pub(crate) rows_batch: Vec<crate::presence::Event>,
    /// A batch of rows is being written (one at a time keeps rows in event order).
    pub(crate) rows_in_flight: bool,
    /// A batch failed: the next one rewrites the table from the live state.
    pub(crate) rows_resync: bool,
    /// Channel -> control connections subscribed to it (`SUBSCRIBE`).
    pub backend_subs: std::collections::HashMap<Box<str>, std::collections::HashSet<usize>>,
    /// Every connection, by token.
    pub conns: Slab<Conn>,
    /// The link to the cluster's Redis and the channels followed there; None on a single node.
    pub(crate) cluster: Option<Box<crate::cluster::Cluster>>,
    /// The Mercure hub; None when `[mercure]` is not set.
    pub(crate) mercure: Option<Box<crate::mercure_http::Mercure>>,
    /// Counters.
    pub counters: Counters,
    /// Open connections by kind (browser, control, admin), kept as they open and close so
    /// `INFO` and `/metrics` do not walk every connection.
    pub open_by_kind: [usize; 3],
    /// Open streams: event streams, WebSockets.
    pub open_streams: [usize; 2],
    /// Unix seconds at the start of this turn (the hub's clock).
    pub now_secs: u64,
    /// Monotonic time at the start of this turn (the timers' clock).
    pub now: Instant,
    /// When the daemon started.
    pub started: Instant,
    /// Bound addresses: browser, control, admin.
    pub addrs: [SocketAddr; 3],
    /// The worker pool.
    pub pool: Pool,
    /// Cached access verdicts.
    pub auth_cache: auth::Cache,
    /// Bumped by every `AUTH.FLUSH`; a check started before it is not cached.
    pub auth_generation: u64,
    /// Failed token checks by address.
    pub guard: crate::guard::Guard,
    /// Log lines about refused requests: one per reason and Origin (or address) a minute.
    pub refusals: crate::guard::Throttle,
    /// The access-check settings, shared with worker jobs.
    pub auth_cfg: Arc<crate::config::Auth>,
    pub(crate) poll: Poll,
    listeners: [Option<TcpListener>; 3],
    timers: Timers,
    /// Last stamp handed out (connection ids, hold ids, phase stamps share it).
    last_stamp: u64,
    /// Connections to look at before sleeping (input left after a hold ended or output drained).
    pub(crate) pending: Vec<usize>,
    /// Connections marked dead, freed before the next poll.
    dead: Vec<usize>,
    /// Connections that used up their read budget: driven again after the next poll.
    yielded: Vec<usize>,
    /// Read buffer shared by all connections: a read lands here, then only the bytes read are
    /// appended to the connection's own buffer. Between reads it is lent to `OutQueue::flush` to
    /// gather a small answer into one write.
    pub(crate) scratch: Box<[u8]>,
    /// One emptied input buffer, for the next connection that reads (`free_inbuf`).
    spare_inbuf: Vec<u8>,
    handle: Handle,
    /// When accepting may resume after running out of descriptors.
    accept_paused_until: Option<Instant>,
    /// Failed accepts, and when one was last logged.
    accept_failures: u64,
    accept_logged: Option<Instant>,
    /// Shutdown deadline once a shutdown began.
    pub(crate) stopping: Option<Instant>,
    /// systemd notifications.
    notifier: crate::notify::Notifier,
    /// When the admin page's next snapshot is due, and the published count at the last one.
    admin_tick: Instant,
    admin_last_published: u64,
    /// When the next `WATCHDOG=1` is due.
    watchdog_at: Option<Instant>,
}

/// The error a start-up step failed with.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl Server {
    /// Opens the listeners. Nothing is accepted until `run`.
    pub fn bind(cfg: Config) -> Result<Server, StartError> {
        let poll = Poll::new().map_err(|e| StartError(format!("cannot create the poller: {e}")))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| StartError(format!("cannot create the waker: {e}")))?);
        let reuse = cfg.browser.reuse_port;
        let b = crate::listen::bind(&poll, cfg.browser.listen, BROWSER, "browser", reuse)?;
        let c = crate::listen::bind(&poll, cfg.control_listen, CONTROL, "control", reuse)?;
        let a = crate::listen::bind(&poll, cfg.admin_listen, ADMIN, "admin", reuse)?;
        let addr = |l: &TcpListener| l.local_addr().map_err(|e| StartError(e.to_string()));
        let addrs = [addr(&b)?, addr(&c)?, addr(&a)?];
        let mut hub = Hub::new(cfg.channels.buffer_length, cfg.channels.message_ttl_secs);
        if cfg.cluster.is_none() {
            // In a cluster ids come from Redis's clock and never repeat across restarts.
            hub.set_start_second(crate::time::unix_now());
        }
        let mut cluster = cfg.cluster.clone().map(|c| Box::new(crate::cluster::Cluster::new(c, cfg.channels.buffer_length, cfg.limits.max_message_bytes)));
        if let (Some(c), Some(m)) = (cluster.as_mut(), &cfg.mercure) {
            // The Mercure history is read back as one reply of up to `history` entries.
            c.allow_reply(m.history.saturating_mul(cfg.limits.max_message_bytes + crate::cluster::ENTRY_HEADER_MAX + 64).saturating_add(64 << 20));
        }
        let mut presence = crate::presence::Presence::new(cfg.presence.grace);
        if cluster.is_some() {
            presence.anon_changed = Some(Default::default());
        }
        if let Some((path, fsync)) = &cfg.store {
            // At start, before anything is accepted: the one time the loop thread reads the store.
            let c = crate::store::open(path, *fsync).map_err(|e| StartError(format!("store.path: cannot open {}: {e}", path.display())))?;
            let crate::store::Loaded { messages: msgs, dropped, sessions, joins } =
                crate::store::load(&c).map_err(|e| StartError(format!("store.path: cannot read {}: {e}", path.display())))?;
            for (sid, user) in sessions {
                hub.open_session(&sid, user);
            }
            for (sid, channel) in joins {
                // A join whose session is gone (closed in a batch that did not land) is dropped.
                let _ = hub.join(&sid, &channel);
            }
            let now = crate::time::unix_now();
            let n = msgs.len();
            for m in msgs {
                hub.restore(&m.channel, m.id, &m.content_type, &m.body, now);
            }
            for (ch, id) in dropped {
                hub.restore_dropped(&ch, id);
            }
            hub.track_drops();
            info!("store {}: {n} messages on {} channels restored", path.display(), hub.channel_count());
        }
        let auth_cfg = Arc::new(cfg.auth.clone());
        if auth_cfg.mode == crate::config::AuthMode::Sqlite {
            auth::validate_sqlite(&auth_cfg).map_err(StartError)?;
        }
        if let Some(db) = &cfg.presence.database {
            crate::presence_rows::prepare(db, &cfg.presence.table, &cfg.presence.instance).map_err(StartError)?;
        }
        let pool = {
            let a = auth_cfg.clone();
            // The workers' own limits (HTTP timeout, SQLite busy timeout) sit above the loop's job
            // timer, so a slow check is always answered 504 by the loop, never 403/503 by a worker
            // that gave up first.
            let job_timeout = cfg.workers.job_timeout + cfg.workers.job_timeout / 4 + Duration::from_millis(250);
            Pool::start(cfg.workers.threads, cfg.workers.queue, waker.clone(), move || worker::Resources {
                auth_db: (a.mode == crate::config::AuthMode::Sqlite)
                    .then(|| auth::open_db(&a, job_timeout))
                    .and_then(|r| r.map_err(|e| crate::error!("worker cannot open {}: {e}", a.database.display())).ok()),
                http: ureq::AgentBuilder::new().timeout(job_timeout).redirects(0).build(),
                presence_db: None,
                store_db: None,
            })
            .map_err(|e| StartError(format!("cannot start the worker threads: {e}")))?
        };
        let mut server = Server {
            hub,
            store_batch: Vec::new(),
            store_in_flight: false,
            store_seq: 0,
            store_acks: VecDeque::new(),
            store_next_flush: Instant::now(),
            presence,
            events: Vec::new(),
            rows_batch: Vec::new(),
            date: String::new(),
            date_secs: 0,
            ok_heads: [Arc::from(&b""[..]), Arc::from(&b""[..])],
            boundary: make_boundary(),
            resp_spans: Vec::new(),
            ended_holds: Vec::new(),
            fanout: Vec::new(),
            streams_fed: Vec::new(),
            streams_to_flush: Vec::new(),
            ready: Vec::new(),
            rows_in_flight: false,
            rows_resync: false,
            backend_subs: Default::default(),
            pool,
            auth_cache: auth::Cache::new(cfg.auth.cache_ttl, cfg.auth.cache_max_entries),
            auth_generation: 0,
            guard: crate::guard::Guard::new(cfg.limits.auth_max_failures, cfg.limits.auth_penalty),
            refusals: crate::guard::Throttle::new(REFUSAL_LOG_EVERY),
            auth_cfg,
            conns: Slab::with_capacity(1024),
            cluster,
            mercure: cfg.mercure.clone().map(|m| Box::new(crate::mercure_http::Mercure::new(m))),
            counters: Counters::default(),
            open_by_kind: [0; 3],
            open_streams: [0; 2],
            now_secs: crate::time::unix_now(),
            now: Instant::now(),
            started: Instant::now(),
            addrs,
            poll,
            listeners: [Some(b), Some(c), Some(a)],
            timers: Timers::default(),
            last_stamp: 0,
            pending: Vec::new(),
            dead: Vec::new(),
            yielded: Vec::new(),
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
            spare_inbuf: Vec::new(),
            handle: Handle { waker, shutdown: Arc::new(AtomicBool::new(false)) },
            accept_paused_until: None,
            accept_failures: 0,
            accept_logged: None,
            stopping: None,
            notifier: crate::notify::Notifier::from_env(),
            watchdog_at: None,
            admin_tick: Instant::now(),
            admin_last_published: 0,
            cfg,
        };
        server.mercure_cluster_init();
        Ok(server)
    }

    /// A handle to wake or stop the loop from another thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// A fresh stamp: never handed out before.
    pub fn stamp(&mut self) -> u64 {
        self.last_stamp += 1;
        self.last_stamp
    }

    /// Runs until shut down.
    pub fn run(&mut self) -> io::Result<()> {
        info!("ready browser={} control={} admin={}", self.addrs[0], self.addrs[1], self.addrs[2]);
        self.notifier.send("READY=1");
        self.watchdog_at = self.notifier.watchdog.map(|d| Instant::now() + d);
        let mut events = Events::with_capacity(1024);
        loop {
            self.before_sleep();
            if let Some(deadline) = self.stopping {
                let store_idle = !self.store_in_flight && self.store_batch.is_empty();
                // The store gets longer than the connections: what was acknowledged must land.
                let store_deadline = deadline + STORE_SHUTDOWN_GRACE;
                if store_idle && (self.conns.is_empty() || Instant::now() >= deadline) || Instant::now() >= store_deadline {
                    if !store_idle {
                        crate::error!("shutdown: the store did not finish writing in time");
                    }
                    info!("shutdown complete ({} connections closed)", self.conns.len());
                    return Ok(());
                }
            }
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = Instant::now();
            self.now_secs = crate::time::unix_now();
            // The turn's events are handled in token order, not the order they became ready:
            // connections accepted one after the other sit next to each other, in the slab and
            // in the kernel (socket, file, descriptor), so the turn walks memory in order. The
            // listeners and the waker, whose tokens are the highest, come last.
            let mut ready = std::mem::take(&mut self.ready);
            ready.extend(events.iter().map(Ready::of));
            ready.sort_unstable_by_key(|r| r.token);
            for r in ready.drain(..) {
                match Token(r.token) {
                    BROWSER => self.accept(0, Kind::Browser),
                    CONTROL => self.accept(1, Kind::Control),
                    ADMIN => self.accept(2, Kind::Admin),
                    WAKER => self.woken(),
                    crate::cluster::CMD | crate::cluster::SUB => self.cluster_event(Token(r.token), r.writable || r.error),
                    Token(t) => {
                        if r.writable || r.error {
                            self.flush(t);
                        }
                        if r.readable || r.read_closed || r.error {
                            if let Some(c) = self.conns.get_mut(t) {
                                c.readable = true;
                                c.hup |= r.read_closed || r.error;
                            }
                            self.drive(t);
                        }
                    }
                }
            }
            self.ready = ready;
            for t in std::mem::take(&mut self.yielded) {
                if let Some(c) = self.conns.get_mut(t) {
                    c.yielded = false;
                }
                self.drive(t);
            }
            self.fire_timers();
        }
    }

    /// Work done before every poll: input left waiting, the streams' queued messages, then
    /// freeing dead connections.
    fn before_sleep(&mut self) {
        // Input left waiting may publish (streams to write), and writing may free input that
        // waited on output: both, until neither has anything left.
        loop {
            while let Some(t) = self.pending.pop() {
                self.drive(t);
            }
            if self.streams_to_flush.is_empty() {
                break;
            }
            self.flush_streams();
        }
        self.hub.expire(self.now_secs);
        self.emit_events();
        self.cluster_presence_flush();
        // Every command the turn queued for Redis goes in one write.
        self.cluster_flush();
        self.submit_rows();
        self.submit_store();
        for t in std::mem::take(&mut self.dead) {
            if self.conns.get(t).is_some_and(|c| c.dead) {
                let mut c = self.conns.remove(t);
                self.open_by_kind[c.kind as usize] -= 1;
                match &c.phase {
                    Phase::Held(h) => {
                        self.hub.cancel(&h.channel, h.id);
                        self.presence.poll_ended(h.sid(), &h.channel, h.id, self.now);
                    }
                    Phase::Stream(s) => self.stream_closed(s),
                    Phase::Mercure(s) => self.mercure_closed(s),
                    _ => {}
                }
                for ch in c.backend.iter().flat_map(|b| &b.subs) {
                    if let Some(set) = self.backend_subs.get_mut(ch) {
                        set.remove(&t);
                        if set.is_empty() {
                            self.backend_subs.remove(ch);
                        }
                    }
                    if let Some(cl) = self.cluster.as_mut() {
                        cl.presence.dirty.insert(ch.clone());
                    }
                }
                let _ = self.poll.registry().deregister(&mut c.stream);
                debug!("closed {:?} connection {} from {}", c.kind, c.id, c.peer);
            }
        }
        // What reaping queued for Redis (a Mercure subscriber's departure) goes now.
        self.cluster_flush();
    }

    fn next_timeout(&self) -> Option<Duration> {
        if !self.yielded.is_empty() || !self.streams_to_flush.is_empty() {
            // Input is waiting, or events queued while connections were reaped (a Mercure
            // subscriber's departure): look at everyone's events, but do not sleep.
            return Some(Duration::ZERO);
        }
        let mut next = self.now + Duration::from_secs(1);
        for q in [&self.timers.hold, &self.timers.head, &self.timers.idle, &self.timers.job, &self.timers.write, &self.timers.ping] {
            if let Some(t) = q.front() {
                next = next.min(t.at);
            }
        }
        if let Some(at) = self.presence.next_deadline() {
            next = next.min(at);
        }
        if let Some(c) = &self.cluster {
            next = next.min(c.next_deadline());
        }
        if let Some(at) = self.mercure.as_ref().and_then(|m| m.next_deadline()) {
            next = next.min(at);
        }
        if let Some(at) = self.accept_paused_until {
            next = next.min(at);
        }
        if let Some(at) = self.stopping {
            // Past the connections' grace only the store is waited for (its answer wakes the
            // loop): sleep toward the store's deadline instead of spinning.
            next = next.min(if at <= Instant::now() { at + STORE_SHUTDOWN_GRACE } else { at });
        }
        if let Some(at) = self.watchdog_at {
            next = next.min(at);
        }
        next = next.min(self.admin_tick);
        if !self.store_batch.is_empty() {
            next = next.min(self.store_next_flush);
        }
        Some(next.saturating_duration_since(Instant::now()))
    }

    fn woken(&mut self) {
        while let Ok(done) = self.pool.results.try_recv() {
            self.job_done(done.ticket, done.outcome);
        }
        if self.handle.shutdown.load(Ordering::SeqCst) && self.stopping.is_none() {
            self.begin_shutdown();
        }
    }

    /// A worker finished a job: each kind goes to the file of its concern (the store, the
    /// presence rows, a poll's access check), which acts on it if it is still wanted.
    fn job_done(&mut self, ticket: Ticket, outcome: Outcome) {
        match (ticket.token, outcome) {
            (_, Outcome::Stored(upto, result)) => self.store_done(upto, result),
            // A job that panicked still ends its batch, or the next one would never go.
            (crate::store::TICKET, _) => self.store_done(ticket.stamp, Err("the store job failed".into())),
            (crate::presence_rows::TICKET, Outcome::Rows(result)) => self.rows_done(result),
            (crate::presence_rows::TICKET, _) => self.rows_done(Err("the job failed".into())),
            (crate::presence_rows::FORGET, _) => {}
            (_, outcome) => self.access_done(ticket, outcome),
        }
    }

    // ---- accept ----

    fn accept(&mut self, which: usize, kind: Kind) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listeners[which] else { return };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer, kind),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or a transient error: retrying at once
                    // would spin on a listener that stays readable, so pause all accepting briefly.
                    // Logged at most every 10 s: at the limit this repeats ten times a second.
                    self.accept_failures += 1;
                    if self.accept_logged.is_none_or(|at| self.now.duration_since(at) >= Duration::from_secs(10)) {
                        warn!(
                            "accept on {:?} listener failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?} ({} failures so far)",
                            kind, self.accept_failures
                        );
                        self.accept_logged = Some(self.now);
                    }
                    self.accept_paused_until = Some(self.now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr, kind: Kind) {
        self.counters.accepted += 1;
        if self.conns.len() >= self.cfg.limits.max_connections {
            self.counters.refused += 1;
            let max = self.cfg.limits.max_connections;
            self.log_refusal(1, "max_connections", || {
                format!("{kind:?} connection from {peer} refused: {max} connections open (limits.max_connections; raise it with LimitNOFILE)")
            });
            // Best effort: the socket is fresh, so a short answer fits its send buffer.
            let msg: &[u8] = match kind {
                Kind::Control => b"-ERR max number of clients reached\r\n",
                _ => b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            };
            let _ = io::Write::write(&mut stream, msg);
            return;
        }
        let _ = stream.set_nodelay(true);
        let id = self.stamp();
        let entry = self.conns.vacant_entry();
        let token = entry.key();
        if let Err(e) = self.poll.registry().register(&mut stream, Token(token), Interest::READABLE | Interest::WRITABLE) {
            warn!("cannot register connection from {peer}: {e}");
            return;
        }
        self.open_by_kind[kind as usize] += 1;
        entry.insert(Conn {
            id,
            kind,
            stream,
            peer,
            inbuf: Vec::new(),
            out: OutQueue::default(),
            phase: Phase::Idle,
            stamp: id,
            close_after_write: false,
            readable: true,
            backend: None,
            store_wait: false,
            redis_wait: 0,
            eof: false,
            hup: false,
            write_blocked: 0,
            yielded: false,
            dead: false,
            since: self.now,
        });
        if kind != Kind::Control {
            // A fresh connection must start its request within the head timeout. (The head
            // queue: every entry there has the same duration, which keeps the FIFO in order.)
            self.timers.head.push_back(Timer { at: self.now + self.cfg.limits.head_timeout, token, stamp: id });
        }
        debug!("accepted {:?} connection {id} from {peer}", kind);
    }

    // ---- read ----

    /// Most bytes kept unparsed for one connection: a full head and body, and a margin.
    fn inbuf_cap(&self) -> usize {
        self.cfg.limits.max_head_bytes + self.cfg.limits.max_message_bytes + 16 * 1024
    }

    /// Reads what the socket has and processes it, until the socket is drained or the
    /// connection must wait (output backed up, a held poll, a full input buffer).
    fn drive(&mut self, t: usize) {
        self.process(t);
        let cap = self.inbuf_cap();
        let out_pause = self.cfg.limits.max_output_bytes / 2;
        let mut budget = READ_BUDGET;
        loop {
            let Some(c) = self.conns.get_mut(t) else { return };
            if c.dead || c.eof || !c.readable || c.inbuf.len() >= cap || c.out.len() > out_pause {
                break;
            }
            if budget == 0 || c.yielded {
                // This peer had its share of the turn (a backend pipelining megabytes); the
                // rest of its input waits for the next turn, after everyone else's events.
                if !c.yielded {
                    c.yielded = true;
                    self.yielded.push(t);
                }
                break;
            }
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    c.eof = true;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if c.inbuf.capacity() == 0 {
                        c.inbuf = std::mem::take(&mut self.spare_inbuf);
                    }
                    c.inbuf.extend_from_slice(&self.scratch[..n]);
                    // A short read emptied the socket: skip the read that would only say
                    // WouldBlock (a syscall per request). New data raises a new edge. After the
                    // peer's FIN was signalled, read on to see the 0.
                    if n < self.scratch.len() && !c.hup {
                        c.readable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("read from {} failed: {e}", c.peer);
                    self.kill(t);
                    return;
                }
            }
            self.process(t);
        }
        let Some(c) = self.conns.get_mut(t) else { return };
        if c.inbuf.len() >= cap && !c.dead && !c.close_after_write && c.out.len() <= out_pause && !matches!(c.phase, Phase::Held(_) | Phase::Authorizing(_) | Phase::Stream(_) | Phase::Mercure(_) | Phase::Syncing(_)) && !c.store_wait && c.redis_wait == 0 {
            // Full, nothing parseable, and nothing waiting on output: a request larger than any
            // the caps allow (say, a RESP command whose arguments add up past them). Refuse it
            // rather than wait forever for bytes that cannot fit.
            self.counters.rejected += 1;
            let (kind, peer) = (c.kind, c.peer);
            self.log_refusal(1, &format!("too large {}", peer.ip()), || {
                format!("{kind:?} connection from {peer} closed: request larger than the input buffer ({cap} bytes: limits.max_head_bytes + max_message_bytes)")
            });
            let Some(c) = self.conns.get_mut(t) else { return };
            if c.kind == Kind::Control {
                c.out.append(|o| crate::resp::error(o, "ERR Protocol error: request too large"));
                c.close_after_write = true;
                self.flush(t);
            } else {
                self.respond(t, 413, "", b"request too large", false);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(t) else { return };
        if c.inbuf.is_empty() && c.inbuf.capacity() > 0 {
            // Everything read is handled: the buffer goes back until the next read.
            let inbuf = std::mem::take(&mut c.inbuf);
            self.free_inbuf(inbuf);
        }
        let Some(c) = self.conns.get_mut(t) else { return };
        if c.eof && !c.dead {
            // The peer is gone or half-closed: a held poll has no one to answer; anything else
            // gets its pending answers flushed, then the connection closes.
            if matches!(c.phase, Phase::Held(_) | Phase::Authorizing(_) | Phase::Stream(_) | Phase::Mercure(_) | Phase::Syncing(_)) || c.out.is_empty() {
                self.kill(t);
            } else {
                c.close_after_write = true;
            }
        }
    }

    /// Parses and handles whatever complete requests the input buffer holds.
    fn process(&mut self, t: usize) {
        let Some(c) = self.conns.get(t) else { return };
        if c.dead {
            return;
        }
        match c.kind {
            Kind::Control => self.control_input(t),
            Kind::Browser if matches!(c.phase, Phase::Stream(_)) => self.stream_input(t),
            Kind::Browser if matches!(c.phase, Phase::Mercure(_)) => self.mercure_input(t),
            Kind::Browser | Kind::Admin => self.http_input(t),
        }
    }

    fn http_input(&mut self, t: usize) {
        let limits = self.cfg.limits;
        loop {
            let Some(c) = self.conns.get_mut(t) else { return };
            if c.dead || c.close_after_write || c.store_wait || c.redis_wait > 0 || c.out.len() > limits.max_output_bytes / 2 {
                return;
            }
            let waiting = match c.phase {
                Phase::Held(_) | Phase::Authorizing(_) | Phase::Syncing(_) | Phase::Mercure(_) => return,
                Phase::Stream(_) => {
                    // Bytes that came with the request that opened the stream (a WebSocket's first
                    // frames) are the stream's to read.
                    if !c.inbuf.is_empty() {
                        self.pending.push(t);
                    }
                    return;
                }
                Phase::Body(need) => need,
                Phase::Idle | Phase::Head => 0,
            };
            if c.inbuf.is_empty() || c.inbuf.len() < waiting {
                return;
            }
            // The request is handled in place: the input buffer is lent to it, and nothing a
            // request does touches its own connection's input. Its head is parsed again once
            // its body is all there (a POST waits for its body; a poll has none).
            let inbuf = std::mem::take(&mut c.inbuf);
            let used = match http::parse_head(&inbuf, limits.max_head_bytes, limits.max_message_bytes) {
                Ok(Some((req, n))) if inbuf.len() >= n + req.content_length => {
                    let whole = n + req.content_length;
                    c.phase = Phase::Idle;
                    self.request(t, req, &inbuf[n..whole]);
                    whole
                }
                Ok(partial) => {
                    // A head, or a body, still on its way. The body is on the same clock as
                    // the head (which started at its first byte): a stalled sender is cut.
                    let fresh = matches!(c.phase, Phase::Idle);
                    c.phase = match partial {
                        Some((req, n)) => Phase::Body(n + req.content_length),
                        None => Phase::Head,
                    };
                    c.inbuf = inbuf;
                    if fresh {
                        let stamp = self.stamp();
                        self.set_stamp(t, stamp);
                        self.timers.head.push_back(Timer { at: self.now + limits.head_timeout, token: t, stamp });
                    }
                    return;
                }
                Err(e) => {
                    c.inbuf = inbuf;
                    let (kind, peer) = (c.kind, c.peer);
                    self.log_refusal(2, &format!("bad request {} {}", e.reason, peer.ip()), || {
                        format!("{kind:?} connection from {peer}: bad request, answered {} and closed: {}", e.status, e.reason)
                    });
                    self.counters.rejected += 1;
                    self.respond(t, e.status, "", e.reason.as_bytes(), false);
                    return;
                }
            };
            let Some(c) = self.conns.get_mut(t) else { return };
            let mut inbuf = inbuf;
            inbuf.drain(..used);
            c.inbuf = inbuf;
        }
    }

    /// Takes back an emptied input buffer. A connection has one only while it holds unparsed
    /// bytes: an idle keep-alive connection or a held poll (perhaps for minutes) keeps none. One
    /// small buffer is kept as the spare for the next connection that reads, so a subscriber's
    /// next poll costs no allocation and lands in memory the loop touched a moment ago; any
    /// other goes back to the allocator.
    fn free_inbuf(&mut self, buf: Vec<u8>) {
        if self.spare_inbuf.capacity() == 0 && buf.capacity() <= SPARE_INBUF_MAX {
            self.spare_inbuf = buf;
        }
    }

    fn request(&mut self, t: usize, req: http::Request<'_>, body: &[u8]) {
        let stamp = self.stamp();
        self.set_stamp(t, stamp);
        match self.conns[t].kind {
            Kind::Admin => self.admin_request(t, req, body),
            _ if self.mercure.is_some() && crate::mercure_http::serves(&req.path) => self.mercure_request(t, req, body),
            _ => self.browser_request(t, req),
        }
    }

    fn set_stamp(&mut self, t: usize, stamp: u64) {
        if let Some(c) = self.conns.get_mut(t) {
            c.stamp = stamp;
        }
    }

    // ---- answer ----

    /// Logs why a peer was refused, at `level` (0 error .. 3 debug): at most one line per `key`
    /// (the reason, with the Origin or address it concerns) every `REFUSAL_LOG_EVERY`, telling
    /// how many were held back, so a peer repeating a refused request cannot flood the log. The
    /// line is only formatted when it is written.
    pub(crate) fn log_refusal(&mut self, level: u8, key: &str, line: impl FnOnce() -> String) {
        if !crate::log::enabled(level) {
            return;
        }
        if let Some(held) = self.refusals.may_log(key, self.now) {
            let more = if held > 0 { format!(" ({held} more like it since the last line)") } else { String::new() };
            crate::log::write(level, format_args!("{}{more}", line()));
        }
    }

    /// Answers the current HTTP request (not a held poll): `lines` are extra header lines.
    /// Closes after writing unless `keep_alive`.
    pub fn respond(&mut self, t: usize, status: u16, lines: &str, body: &[u8], keep_alive: bool) {
        self.respond_typed(t, status, lines, "text/plain; charset=utf-8", body, keep_alive);
    }

    /// `respond` with a content type.
    pub fn respond_typed(&mut self, t: usize, status: u16, lines: &str, content_type: &str, body: &[u8], keep_alive: bool) {
        self.refresh_date();
        let Some(c) = self.conns.get_mut(t) else { return };
        let ct = if body.is_empty() { "" } else { content_type };
        let date = &self.date;
        c.out.append(|out| {
            let mut all = String::with_capacity(lines.len() + 64);
            all.push_str(date);
            all.push_str(lines);
            all.push_str(http::connection_header(keep_alive));
            http::response(out, status, all.as_bytes(), ct, body);
        });
        self.finish_request(t, keep_alive);
    }

    /// `respond_typed`, or for `HEAD` the same head with no body (`Content-Length` of the body).
    pub fn respond_head_or_get(&mut self, t: usize, status: u16, lines: &str, content_type: &str, body: &[u8], head: bool, keep_alive: bool) {
        if !head {
            return self.respond_typed(t, status, lines, content_type, body, keep_alive);
        }
        self.refresh_date();
        let Some(c) = self.conns.get_mut(t) else { return };
        let date = &self.date;
        c.out.append(|out| {
            let mut all = format!("{date}{lines}{}", http::connection_header(keep_alive));
            all.push_str(&format!("Content-Type: {content_type}\r\n"));
            http::response_head(out, status, all.as_bytes(), body.len());
        });
        self.finish_request(t, keep_alive);
    }

    /// After an answer is queued: back to idle (or closing), then write.
    fn finish_request(&mut self, t: usize, keep_alive: bool) {
        let stamp = self.stamp();
        let idle = self.cfg.limits.idle_timeout;
        let Some(c) = self.conns.get_mut(t) else { return };
        c.phase = Phase::Idle;
        c.stamp = stamp;
        if !keep_alive {
            c.close_after_write = true;
        } else {
            self.timers.idle.push_back(Timer { at: self.now + idle, token: t, stamp });
        }
        if !c.inbuf.is_empty() || c.readable {
            self.pending.push(t);
        }
        self.flush(t);
    }

    /// Holds a poll, or answers it at once with a buffered message. Either way the session
    /// counts as polling (online, and on the channel) from now.
    pub fn hold(&mut self, t: usize, p: PendingPoll<'_>, user: Option<String>) {
        if self.cluster_must_park(&p.channel) {
            return self.cluster_park(t, p, user);
        }
        if p.transport != crate::conn::Transport::LongPoll {
            return self.open_stream(t, p, user);
        }
        let id = self.stamp();
        let mut p = p;
        // An anonymous poll counts only while it is held: one answered at once from the buffer
        // (a client catching up) leaves no trace in presence, and costs it nothing.
        let anonymous = !self.presence_start(&mut p, user, id, t);
        match self.hub.poll(&p.channel, p.cursor, id, t, self.now_secs) {
            crate::hub::Poll::Message(m, skipped) => {
                if !anonymous {
                    self.presence.poll_ended(&p.sid, &p.channel, id, self.now);
                }
                if skipped {
                    // The cursor is older than the buffer: say so (nchan skips silently).
                    let mut lines = p.lines.as_deref().unwrap_or_default().to_vec();
                    lines.extend_from_slice(b"X-Comet-Skipped: 1\r\n");
                    p.lines = Some(Arc::from(lines));
                }
                if p.multipart {
                    let rest = self.hub.after(&p.channel, m.id, MAX_BATCH - 1);
                    if !rest.is_empty() {
                        let mut batch = Vec::with_capacity(rest.len() + 1);
                        batch.push(m);
                        batch.extend(rest);
                        return self.answer_batch(t, &p.lines, batch, p.keep_alive);
                    }
                }
                self.answer_message(t, &p.lines, &m, p.keep_alive)
            }
            crate::hub::Poll::Held(name) => {
                if anonymous {
                    self.presence.poll_started("", None, &name, id, t, &mut self.events);
                }
                let Some(c) = self.conns.get_mut(t) else { return };
                c.stamp = id;
                if c.inbuf.is_empty() {
                    let inbuf = std::mem::take(&mut c.inbuf);
                    self.free_inbuf(inbuf);
                }
                let PendingPoll { sid, echo, lines, keep_alive, .. } = p;
                let sid = self.presence.shared_sid(&sid);
                let Some(c) = self.conns.get_mut(t) else { return };
                c.phase = Phase::Held(Hold { id, channel: name, sid, cursor: echo, lines, keep_alive });
                self.timers.hold.push_back(Timer { at: self.now + self.cfg.browser.poll_timeout, token: t, stamp: id });
            }
        }
    }

    /// Counts a poll or stream of a session as started in presence (hold `id` on connection
    /// `t`). False when it is anonymous, which the caller counts (or not) itself.
    pub(crate) fn presence_start(&mut self, p: &mut PendingPoll<'_>, user: Option<String>, id: u64, t: usize) -> bool {
        if p.sid.is_empty() {
            return false;
        }
        let user = user.or_else(|| self.hub.session(&p.sid).and_then(|s| s.user.clone()));
        // A session the application vouched for (opened it, or an access check named its user)
        // is always tracked; a cookie nobody vouched for only while there is room, so made-up
        // cookies cannot grow presence without bound.
        let vouched = user.is_some() || self.hub.session(&p.sid).is_some();
        let cap = if vouched { usize::MAX } else { self.cfg.limits.max_connections };
        if !self.presence.poll_started_capped(&p.sid, user.as_deref(), &p.channel, id, t, cap, &mut self.events) {
            // Counted as anonymous: it must end as anonymous too.
            p.sid = Cow::Borrowed("");
        }
        true
    }

    /// Starts the hold timer of connection `t` for `stamp` (a poll that waits: `poll_timeout`).
    pub(crate) fn start_hold_timer(&mut self, t: usize, stamp: u64) {
        self.timers.hold.push_back(Timer { at: self.now + self.cfg.browser.poll_timeout, token: t, stamp });
    }

    /// Starts the job timer of connection `t` for `stamp` (an access check: `job_timeout` -> 504).
    pub(crate) fn start_job_timer(&mut self, t: usize, stamp: u64) {
        self.timers.job.push_back(Timer { at: self.now + self.cfg.workers.job_timeout, token: t, stamp });
    }

    /// Queues a keep-alive for stream `t` (hold `id`), when keep-alives are on.
    pub(crate) fn start_ping_timer(&mut self, t: usize, id: u64) {
        if let Some(every) = self.cfg.browser.stream_ping {
            self.timers.ping.push_back(Timer { at: self.now + every, token: t, stamp: id });
        }
    }

    fn answer_message(&mut self, t: usize, lines: &Option<Arc<[u8]>>, m: &Arc<Message>, keep_alive: bool) {
        self.refresh_date();
        let Some(c) = self.conns.get_mut(t) else { return };
        let head = &self.ok_heads[usize::from(keep_alive)];
        match c.out.write_direct(&mut c.stream, &mut self.scratch, &[head, lines.as_deref().unwrap_or_default(), m.wire(Wire::Http)]) {
            Ok(true) => {}
            Ok(false) => {
                c.out.push(Chunk::Shared(head.clone()));
                if let Some(lines) = lines {
                    c.out.push(Chunk::Shared(lines.clone()));
                }
                c.out.push(Chunk::Msg(m.clone(), Wire::Http));
            }
            Err(e) => {
                debug!("write to {} failed: {e}", c.peer);
                self.kill(t);
                return;
            }
        }
        self.finish_request(t, keep_alive);
    }

    /// Answers with several buffered messages in one `multipart/mixed` response, as nchan's
    /// `nchan_longpoll_multipart_response` does. Each part is `--boundary`, then the message's
    /// tail (its headers, a blank line, its body) as encoded at publish: no message is encoded
    /// again. The response's own `Last-Modified`/`Etag` are the last message's, so the client's
    /// next poll continues after the batch.
    fn answer_batch(&mut self, t: usize, lines: &Option<Arc<[u8]>>, batch: Vec<Arc<Message>>, keep_alive: bool) {
        self.refresh_date();
        let Some(last) = batch.last().map(|m| m.id) else { return };
        let boundary = &self.boundary;
        let framing = boundary.len() + 6; // "--" boundary "\r\n" before, "\r\n" after
        let len: usize = batch.iter().map(|m| m.wire(Wire::Http).len() + framing).sum::<usize>() + boundary.len() + 6;
        self.hub.count_delivered(batch.len() - 1);
        let Some(c) = self.conns.get_mut(t) else { return };
        let date = &self.date;
        c.out.append(|o| {
            ok_head(o, date, keep_alive);
            o.extend_from_slice(http::cursor_headers(Some(last)).as_bytes());
            o.extend_from_slice(
                format!(
                    "Vary: If-None-Match, If-Modified-Since\r\nCache-Control: no-cache, no-store\r\nContent-Type: multipart/mixed; boundary={boundary}\r\nContent-Length: {len}\r\n"
                )
                .as_bytes(),
            );
        });
        if let Some(lines) = lines {
            c.out.push(Chunk::Shared(lines.clone()));
        }
        // Small parts are copied into one buffer: a part of a few hundred bytes costs less to
        // copy than to queue as chunks of its own, and the whole batch then goes out in one
        // `writev` instead of one per handful of parts. Large tails are still shared, not copied.
        let small: usize = batch.iter().filter(|m| m.wire(Wire::Http).len() < COPY_PART_BELOW).map(|m| m.wire(Wire::Http).len() + framing).sum();
        c.out.append(|o| {
            o.reserve(small + boundary.len() + 8);
            o.extend_from_slice(b"\r\n");
        });
        for m in batch {
            let copy = m.wire(Wire::Http).len() < COPY_PART_BELOW;
            c.out.append(|o| {
                o.extend_from_slice(b"--");
                o.extend_from_slice(boundary.as_bytes());
                o.extend_from_slice(b"\r\n");
                if copy {
                    o.extend_from_slice(m.wire(Wire::Http));
                    o.extend_from_slice(b"\r\n");
                }
            });
            if !copy {
                c.out.push(Chunk::Msg(m, Wire::Http));
                c.out.append(|o| o.extend_from_slice(b"\r\n"));
            }
        }
        c.out.append(|o| {
            o.extend_from_slice(b"--");
            o.extend_from_slice(boundary.as_bytes());
            o.extend_from_slice(b"--\r\n");
        });
        self.finish_request(t, keep_alive);
    }

    /// Publishes the admin page's snapshot, only while an admin page is watching. Snapshots are
    /// not counted as published or delivered messages.
    fn admin_publish(&mut self) {
        let ch = crate::admin::ADMIN_CHANNEL;
        if self.hub.info(ch, self.now_secs).is_none_or(|i| i.subscribers == 0) {
            self.admin_last_published = self.hub.stats.published;
            return;
        }
        let rate = self.hub.stats.published.saturating_sub(self.admin_last_published) as f64;
        let snap = self.admin_snapshot(rate);
        let (before_p, before_d) = (self.hub.stats.published, self.hub.stats.delivered);
        self.publish_one(ch, ch, "application/json", snap.as_bytes());
        self.hub.stats.published = before_p;
        self.hub.stats.delivered = before_d;
        self.admin_last_published = before_p;
    }

    /// Keeps the `Date:` line current: formatted once per second, not per response.
    fn refresh_date(&mut self) {
        if self.date_secs != self.now_secs || self.ok_heads[0].is_empty() {
            self.date_secs = self.now_secs;
            self.date = format!("Date: {}\r\n", crate::time::http_date(self.now_secs));
            self.ok_heads = [false, true].map(|keep_alive| {
                let mut o = Vec::new();
                ok_head(&mut o, &self.date, keep_alive);
                Arc::from(o)
            });
        }
    }

    /// Takes the held poll of connection `t` if it is still hold `id`.
    fn take_hold(&mut self, t: usize, id: u64) -> Option<Hold> {
        let h = self.detach_hold(t, id)?;
        self.presence.poll_ended(h.sid(), &h.channel, h.id, self.now);
        Some(h)
    }

    /// `take_hold` without the presence bookkeeping, which the caller owes.
    fn detach_hold(&mut self, t: usize, id: u64) -> Option<Hold> {
        let c = self.conns.get_mut(t)?;
        match &c.phase {
            Phase::Held(h) if h.id == id && !c.dead => {}
            _ => return None,
        }
        match std::mem::replace(&mut c.phase, Phase::Idle) {
            Phase::Held(h) => Some(h),
            _ => None,
        }
    }

    /// Ends a held poll that is still a waiter in the hub (kick, timeout): removes it there, then
    /// answers it.
    pub fn cut_hold(&mut self, t: usize, id: u64, status: u16, why: &str) {
        let channel = match self.conns.get(t).map(|c| (&c.phase, c.stamp)) {
            Some((Phase::Syncing(_), stamp)) if stamp == id => return self.end_parked(t, status),
            Some((Phase::Held(h), _)) if h.id == id => h.channel.clone(),
            Some((Phase::Stream(s), _)) if s.hold.id == id => s.hold.channel.clone(),
            _ => return,
        };
        self.hub.cancel(&channel, id);
        self.end_hold(t, id, status, why);
    }

    /// Publishes a message: answers the held polls it reaches, copies it to the private
    /// channels of sessions joined to the channel, and sends it to backends subscribed to it.
    /// Returns how many held polls and backends got it at once.
    pub fn publish(&mut self, channel: &str, content_type: &str, body: &[u8]) -> usize {
        let n = self.publish_channel(channel, content_type, body);
        self.mercure_relay(channel, body);
        n
    }

    /// `publish` for comet's own subscribers alone (an update the Mercure hub already has).
    pub(crate) fn publish_channel(&mut self, channel: &str, content_type: &str, body: &[u8]) -> usize {
        let mut n = self.publish_one(channel, channel, content_type, body);
        for sid in self.hub.joined_to(channel) {
            let private = format!("{}{sid}", crate::hub::SESSION_PREFIX);
            n += self.publish_one(&private, channel, content_type, body);
        }
        n + self.to_backends(channel, body)
    }

    fn publish_one(&mut self, channel: &str, origin: &str, content_type: &str, body: &[u8]) -> usize {
        let (msg, waiters) = self.hub.publish_from(channel, origin, content_type, body, self.now_secs);
        if self.cfg.store.is_some() && !channel.starts_with('@') {
            self.store_batch.push(crate::store::Op::Put {
                channel: channel.to_string(),
                id: msg.id,
                content_type: content_type.to_string(),
                body: body.to_vec(),
            });
            self.store_seq += 1;
        }
        self.fan_out(channel, &msg, waiters)
    }

    /// Answers the waiters a publish took from `channel` with `msg`: held polls get their answer,
    /// streams the message and wait again. Returns how many got it.
    pub(crate) fn fan_out(&mut self, channel: &str, msg: &Arc<Message>, waiters: Waiters) -> usize {
        // The answers go out first; the presence bookkeeping (and freeing the holds) waits until
        // the last one is written, so the thousandth subscriber does not wait on it.
        // They go out in token order, not the waiter map's, for the reason the loop handles its
        // events in that order (`run`).
        let mut ended = std::mem::take(&mut self.ended_holds);
        let mut order = std::mem::take(&mut self.fanout);
        let mut streams = std::mem::take(&mut self.streams_fed);
        order.extend(waiters);
        order.sort_unstable_by_key(|&(_, t)| t);
        let clustered = self.cluster.is_some();
        let mut passed = 0;
        for (id, t) in order.drain(..) {
            if clustered && self.cursor_past(t, id, msg.id) {
                // In a cluster a poll may bring a cursor from another node that already got this
                // message: it waits for the next one instead of getting it twice.
                streams.push((id, t));
                passed += 1;
                continue;
            }
            if let Some(h) = self.detach_hold(t, id) {
                self.answer_message(t, &h.lines, msg, h.keep_alive);
                ended.push(h);
            } else if self.stream_deliver(t, id, msg) {
                streams.push((id, t));
            }
        }
        self.fanout = order;
        let n = ended.len() + streams.len() - passed;
        self.hub.uncount_delivered(passed);
        // Streams wait again for the next message.
        self.hub.rewait(channel, streams.drain(..));
        self.streams_fed = streams;
        for h in ended.drain(..) {
            self.presence.poll_ended(h.sid(), &h.channel, h.id, self.now);
        }
        self.ended_holds = ended;
        debug!("published {} to {channel}: {} bytes, {n} held polls", msg.id, msg.body_len());
        n
    }

    /// Whether waiter `id` on connection `t` holds a cursor at or past message `m`.
    fn cursor_past(&self, t: usize, id: u64, m: crate::hub::MsgId) -> bool {
        match self.conns.get(t).map(|c| &c.phase) {
            Some(Phase::Held(h)) if h.id == id => h.cursor.is_some_and(|c| c >= m),
            Some(Phase::Stream(s)) if s.hold.id == id => s.hold.cursor.is_some_and(|c| c >= m),
            _ => false,
        }
    }

    /// Sends a pub/sub message to the backends subscribed to `channel`: the RESP frame is built
    /// once and shared. Returns how many.
    pub fn to_backends(&mut self, channel: &str, payload: &[u8]) -> usize {
        let Some(subs) = self.backend_subs.get(channel) else { return 0 };
        let tokens: Vec<usize> = subs.iter().copied().collect();
        let mut frame = Vec::with_capacity(payload.len() + channel.len() + 40);
        crate::resp::array_len(&mut frame, 3);
        crate::resp::bulk(&mut frame, b"message");
        crate::resp::bulk(&mut frame, channel.as_bytes());
        crate::resp::bulk(&mut frame, payload);
        let frame: Arc<[u8]> = frame.into();
        let mut n = 0;
        for &t in &tokens {
            // A subscriber cut earlier in this turn (a slow reader) gets nothing more.
            match self.conns.get_mut(t) {
                Some(c) if !c.dead => c.out.push(Chunk::Shared(frame.clone())),
                _ => continue,
            }
            n += 1;
            self.flush(t);
        }
        n
    }

    /// Sends the presence events gathered this turn to `__presence__` subscribers (and, when
    /// configured, to the presence table through the pool).
    fn emit_events(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.events);
        if self.cluster.is_some() {
            // Announced once for the cluster by Redis, which sends them back to every node.
            self.cluster_presence_events(&events);
        } else {
            for e in &events {
                let text = e.text();
                debug!("presence: {text}");
                self.to_backends(PRESENCE_CHANNEL, text.as_bytes());
            }
        }
        self.presence_rows(events);
    }

    /// Answers held polls that end without a message (408, 410, 503), the cursor echoed, and
    /// ends streams saying `why` ("channel deleted").
    pub fn end_holds(&mut self, waiters: Waiters, status: u16, why: &str) {
        for (id, t) in waiters {
            self.end_hold(t, id, status, why);
        }
    }

    fn end_hold(&mut self, t: usize, id: u64, status: u16, why: &str) {
        if matches!(self.conns.get(t).map(|c| &c.phase), Some(Phase::Stream(s)) if s.hold.id == id) {
            return self.end_stream(t, status, why);
        }
        let Some(h) = self.take_hold(t, id) else { return };
        let mut lines = String::from_utf8_lossy(h.lines.as_deref().unwrap_or_default()).into_owned();
        lines.push_str(&http::cursor_headers(h.cursor));
        if status == 503 {
            lines.push_str("Retry-After: 1\r\n");
        }
        // A shutdown answer closes: the daemon is going away.
        self.respond(t, status, &lines, b"", h.keep_alive && status != 503);
    }

    // ---- write ----

    /// Writes what the socket takes. Closes the connection once it is flushed if asked to, or at
    /// once if its output has grown past the slow-reader cap.
    pub fn flush(&mut self, t: usize) {
        let max_out = self.cfg.limits.max_output_bytes;
        let Some(c) = self.conns.get_mut(t) else { return };
        if c.dead {
            return;
        }
        let had_output = !c.out.is_empty();
        let before = c.out.len();
        let result = c.out.flush(&mut c.stream, &mut self.scratch);
        if c.out.len() < before {
            // Progress: the write clock starts again at the next block.
            c.write_blocked = 0;
        }
        match result {
            Ok(true) => {
                if c.close_after_write {
                    self.kill(t);
                } else if had_output && (!c.inbuf.is_empty() || c.readable) {
                    // Output drained: input that waited on it may go on.
                    self.pending.push(t);
                }
            }
            Ok(false) => {
                if c.out.len() > max_out {
                    warn!("{:?} connection from {} cut: {} bytes unread (limits.max_output_bytes)", c.kind, c.peer, c.out.len());
                    self.counters.slow_readers += 1;
                    self.kill(t);
                } else if c.write_blocked == 0 {
                    // The peer stopped reading: it has idle_timeout to take some bytes.
                    self.last_stamp += 1;
                    c.write_blocked = self.last_stamp;
                    let at = self.now + self.cfg.limits.idle_timeout;
                    self.timers.write.push_back(Timer { at, token: t, stamp: self.last_stamp });
                }
            }
            Err(e) => {
                debug!("write to {} failed: {e}", c.peer);
                self.kill(t);
            }
        }
    }

    /// Marks a connection dead; it is freed before the next poll.
    pub fn kill(&mut self, t: usize) {
        if let Some(c) = self.conns.get_mut(t) {
            if !c.dead {
                c.dead = true;
                self.dead.push(t);
            }
        }
    }

    // ---- timers ----

    /// Drops timer entries that can no longer fire (their connection moved on or went away), once
    /// a queue holds twice as many entries as there are connections: a busy keep-alive connection
    /// pushes an idle timer per answer, and without this the queue would grow with the request
    /// rate times `idle_timeout`. Order is kept, so the queues stay sorted; amortised O(1).
    fn compact_timers(&mut self) {
        let limit = 2 * self.conns.len() + 1024;
        let conns = &self.conns;
        for q in [&mut self.timers.hold, &mut self.timers.head, &mut self.timers.idle, &mut self.timers.job, &mut self.timers.ping] {
            if q.len() > limit {
                q.retain(|x| conns.get(x.token).is_some_and(|c| c.stamp == x.stamp && !c.dead));
                q.shrink_to(limit);
            }
        }
        let q = &mut self.timers.write;
        if q.len() > limit {
            q.retain(|x| conns.get(x.token).is_some_and(|c| c.write_blocked == x.stamp && !c.dead));
            q.shrink_to(limit);
        }
    }

    fn fire_timers(&mut self) {
        self.compact_timers();
        let now = Instant::now();
        while self.timers.hold.front().is_some_and(|x| x.at <= now) {
            let Some(x) = self.timers.hold.pop_front() else { break };
            self.cut_hold(x.token, x.stamp, 408, "timeout");
        }
        self.presence.tick(now, &mut self.events);
        while self.timers.job.front().is_some_and(|x| x.at <= now) {
            let Some(x) = self.timers.job.pop_front() else { break };
            let waiting = self.conns.get(x.token).is_some_and(|c| c.stamp == x.stamp && matches!(c.phase, Phase::Authorizing(_)) && !c.dead);
            if waiting {
                let c = &mut self.conns[x.token];
                let Phase::Authorizing(p) = std::mem::replace(&mut c.phase, Phase::Idle) else { continue };
                self.counters.jobs_timed_out += 1;
                let Some(peer) = self.conns.get(x.token).map(|c| c.peer) else { continue };
                let channel = &p.channel;
                self.log_refusal(1, &format!("job timeout {channel}"), || {
                    format!("access check for {channel} from {peer} timed out (workers.job_timeout_ms): 504")
                });
                self.access_decided(x.token, *p, Verdict::Deny(504));
            }
        }
        while self.timers.head.front().is_some_and(|x| x.at <= now) {
            let Some(x) = self.timers.head.pop_front() else { break };
            let Some(c) = self.conns.get(x.token) else { continue };
            if c.stamp != x.stamp || c.dead {
                continue;
            }
            match c.phase {
                Phase::Head | Phase::Body(_) => {
                    let (peer, after) = (c.peer, self.cfg.limits.head_timeout);
                    self.log_refusal(2, &format!("head timeout {}", peer.ip()), || {
                        format!("connection from {peer}: request not complete {after:?} after its first byte (limits.head_timeout_secs): 408, closed")
                    });
                    self.counters.rejected += 1;
                    self.respond(x.token, 408, "", b"request head not received in time", false);
                }
                // Connected and never sent a byte.
                Phase::Idle => self.kill(x.token),
                _ => {}
            }
        }
        while self.timers.write.front().is_some_and(|x| x.at <= now) {
            let Some(x) = self.timers.write.pop_front() else { break };
            let Some(c) = self.conns.get(x.token) else { continue };
            if c.write_blocked == x.stamp && !c.out.is_empty() && !c.dead {
                warn!("{:?} connection from {} cut: read nothing of {} bytes for {:?} (limits.idle_timeout_secs)", c.kind, c.peer, c.out.len(), self.cfg.limits.idle_timeout);
                self.counters.slow_readers += 1;
                self.kill(x.token);
            }
        }
        while self.timers.ping.front().is_some_and(|x| x.at <= now) {
            let Some(x) = self.timers.ping.pop_front() else { break };
            self.stream_ping(x.token, x.stamp);
        }
        while self.timers.idle.front().is_some_and(|x| x.at <= now) {
            let Some(x) = self.timers.idle.pop_front() else { break };
            if self.conns.get(x.token).is_some_and(|c| c.stamp == x.stamp && matches!(c.phase, Phase::Idle) && c.out.is_empty()) {
                self.kill(x.token);
            }
        }
        self.cluster_tick();
        self.mercure_tick(now);
        if now >= self.admin_tick {
            self.admin_tick = now + Duration::from_secs(1);
            self.admin_publish();
        }
        if let (Some(at), Some(every)) = (self.watchdog_at, self.notifier.watchdog) {
            if at <= now {
                // Sent from the loop itself: if the loop stalls, systemd notices.
                self.notifier.send("WATCHDOG=1");
                self.watchdog_at = Some(now + every);
            }
        }
        if self.accept_paused_until.is_some_and(|at| at <= now) {
            self.accept_paused_until = None;
            self.accept(0, Kind::Browser);
            self.accept(1, Kind::Control);
            self.accept(2, Kind::Admin);
        }
    }

    // ---- shutdown ----

    fn begin_shutdown(&mut self) {
        info!("shutting down: {} connections, {} held polls", self.conns.len(), self.hub.held_count());
        self.notifier.send("STOPPING=1");
        for l in self.listeners.iter_mut() {
            if let Some(mut l) = l.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
        }
        self.stopping = Some(self.now + SHUTDOWN_GRACE);
        let tokens: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        for t in tokens {
            let c = &mut self.conns[t];
            c.close_after_write = true;
            if let Phase::Held(Hold { id, .. }) = &c.phase {
                let id = *id;
                self.cut_hold(t, id, 503, "shutting down");
            } else if let Phase::Stream(s) = &c.phase {
                let id = s.hold.id;
                self.cut_hold(t, id, 503, "shutting down");
            } else if let Phase::Syncing(_) = &c.phase {
                let stamp = c.stamp;
                self.cut_hold(t, stamp, 503, "shutting down");
            } else if c.out.is_empty() {
                self.kill(t);
            }
        }
    }

    /// Long-polls held (the hub's waiters less the open streams).
    pub fn held_polls(&self) -> usize {
        self.hub.held_count().saturating_sub(self.open_streams[0] + self.open_streams[1])
    }

    /// The `INFO` text (RESP `INFO`, admin `/status`).
    pub fn info_text(&self) -> String {
        let [browsers, backends, admins] = self.open_by_kind;
        let s = &self.hub.stats;
        format!(
            "# Server\r\ncomet_version:{}\r\nprocess_id:{}\r\nuptime_in_seconds:{}\r\nbrowser_listen:{}\r\ncontrol_listen:{}\r\nadmin_listen:{}\r\n\
             # Clients\r\nconnected_browsers:{browsers}\r\nheld_polls:{}\r\neventsource_streams:{}\r\nwebsocket_streams:{}\r\nconnected_backends:{backends}\r\nconnected_admin:{admins}\r\nonline_sessions:{}\r\npubsub_channels:{}\r\n\
             # Stats\r\nchannels:{}\r\nsessions:{}\r\nbuffered_messages:{}\r\nmessages_published:{}\r\nmessages_delivered:{}\r\n\
             total_connections_received:{}\r\nrejected_connections:{}\r\nrejected_requests:{}\r\nslow_readers_cut:{}\r\n\
             # Auth\r\nauth_mode:{}\r\nauth_cache_entries:{}\r\nauth_cache_hits:{}\r\nauth_jobs:{}\r\nauth_db_queries:{}\r\nauth_http_requests:{}\r\n\
             jobs_queued:{}\r\njobs_refused:{}\r\njobs_timed_out:{}\r\n\
             # Cluster\r\ncluster_enabled:{}\r\n{}{}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            self.started.elapsed().as_secs(),
            self.addrs[0],
            self.addrs[1],
            self.addrs[2],
            self.held_polls(),
            self.open_streams[0],
            self.open_streams[1],
            self.presence.online_count(),
            self.backend_subs.len(),
            self.hub.channel_count(),
            self.hub.session_count(),
            self.hub.buffered_count(),
            s.published,
            s.delivered,
            self.counters.accepted,
            self.counters.refused,
            self.counters.rejected,
            self.counters.slow_readers,
            self.auth_cfg.mode.name(),
            self.auth_cache.len(),
            self.counters.auth_cache_hits,
            self.counters.auth_jobs,
            auth::DB_QUERIES.load(Ordering::Relaxed),
            auth::HTTP_REQUESTS.load(Ordering::Relaxed),
            self.pool.queued(),
            self.counters.jobs_refused,
            self.counters.jobs_timed_out,
            u8::from(self.cluster.is_some()),
            self.cluster.as_ref().map(|c| c.info()).unwrap_or_default(),
            self.mercure_info(),
        )
    }
}
