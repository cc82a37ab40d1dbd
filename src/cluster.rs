//! Several nodes as one push service, through Redis. With `[cluster]` set, every publish goes
//! to Redis, which gives the message its id, keeps the channel's buffer and publishes it to the
//! nodes that follow the channel; each node delivers to its own browsers what arrives. Without
//! `[cluster]` none of this runs and nothing needs Redis.
//!
//! The link is the loop's own: two non-blocking RESP connections on the mio poller, one for
//! commands (pipelined; a FIFO of what waits for each reply) and one for SUBSCRIBE. Nothing waits
//! for Redis: a publisher's reply is queued when Redis answers; a poll on a channel the node does
//! not follow yet waits in `Phase::Syncing` while the node subscribes and fetches the channel's
//! recent messages.
//!
//! What Redis holds, under `<prefix>:`
//! - `b:<channel>`: the buffer, a list of entries `id \n origin \n content-type \n body`, trimmed
//!   to `buffer_length` and `message_ttl_secs` by the publish script;
//! - `i:<channel>`: a hash with `last` (the last id given) and `dropped` (the newest id trimmed);
//! - `sessions`: open sessions, sid -> "" or "=" user;
//! - pub/sub `m:<channel>`: each entry as published; `ctl`: session opens, closes, kicks and
//!   channel deletes, which every node applies to its own state.
//!
//! One publish is one round trip: `EVALSHA` of the publish script, which reads Redis's clock
//! (`TIME`), makes the id (`time:tag`, the tag counting within the second, strictly increasing per
//! channel on every node), stores, trims and publishes the entry, and answers the id.
//!
//! A node follows a channel (subscribes to `m:<channel>`) while its browsers or backends wait on
//! it and `LINGER` after; on subscribing it fetches the buffer, and messages that arrive before
//! the fetch's answer are kept and applied after it, duplicates dropped by id. When the link dies
//! every command waiting for a reply fails with a definite error (`-TRYAGAIN`, HTTP 503), held
//! polls stay held, and on reconnect (capped exponential backoff with jitter) every followed
//! channel is subscribed and fetched again, so what was published meanwhile is delivered.

use crate::conn::{Phase, Transport};
use crate::hub::{self, MsgId};
use crate::resp::{self, Value};
use crate::server::{Deferred, Server};
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The poller tokens of the two links.
pub const CMD: Token = Token(usize::MAX - 5);
pub const SUB: Token = Token(usize::MAX - 6);

/// Longest a TCP connect to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest Redis may take to answer the oldest command in flight before the link is deemed dead
/// (a stopped or wedged redis-server keeps the TCP connection up).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node keeps following a channel after its last waiter left: a browser's next poll
/// comes a moment after its answer, and should not cost a subscribe and a fetch each time.
pub const LINGER: Duration = Duration::from_secs(10);
/// Reconnect backoff: from this, doubling per failure, up to the cap, each with jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Followed channels looked at by the idle check each second.
const IDLE_CHECKS: usize = 2048;
/// Channels per SUBSCRIBE / UNSUBSCRIBE command when many go at once (a reconnect).
const SUBSCRIBE_BATCH: usize = 512;
/// Bytes of an entry's header (id, origin, content type) allowed beyond the message cap.
pub(crate) const ENTRY_HEADER_MAX: usize = 1024;
/// Bytes read from a link before what came is handled.
const READ_ROUND: usize = 1 << 20;
/// At most one line this often about malformed input from Redis.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Publishes one message: id from Redis's clock, stored, trimmed, published; and a copy of it on
/// the private channel of every session joined to the channel (`JOIN`), each with its own id.
/// ARGV: key prefix, content type, body, buffer length, ttl, then the channels (the first is the
/// one published to, the origin of the copies). Answers `{id, nodes that received it, buffered
/// messages}` for the first.
const PUBLISH_LUA: &str = r#"
local P, ct, body = ARGV[1], ARGV[2], ARGV[3]
local max, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = tonumber(redis.call('TIME')[1])
local function put(ch, origin)
  local kb, ki = P .. ':b:' .. ch, P .. ':i:' .. ch
  local time, tag = now, 0
  local last = redis.call('HGET', ki, 'last')
  if last then
    local lt, lg = string.match(last, '^(%d+):(%d+)$')
    lt = tonumber(lt)
    if lt and lt >= now then time = lt; tag = tonumber(lg) + 1 end
  end
  local id = string.format('%d:%d', time, tag)
  local entry = id .. '\n' .. origin .. '\n' .. ct .. '\n' .. body
  local len = redis.call('RPUSH', kb, entry)
  local dropped = nil
  while len > max do dropped = redis.call('LPOP', kb); len = len - 1 end
  while len > 0 do
    local ft = tonumber(string.match(redis.call('LINDEX', kb, 0), '^(%d+):'))
    if ft and ft + ttl > now then break end
    dropped = redis.call('LPOP', kb); len = len - 1
  end
  if dropped then redis.call('HSET', ki, 'dropped', string.match(dropped, '^([^\n]*)')) end
  redis.call('HSET', ki, 'last', id)
  redis.call('EXPIRE', kb, ttl)
  redis.call('EXPIRE', ki, ttl)
  return id, redis.call('PUBLISH', P .. ':m:' .. ch, entry), len
end
local id, n, len = put(ARGV[6], ARGV[6])
for i = 7, #ARGV do put(ARGV[i], ARGV[6]) end
return {id, n, len}
"#;

/// A channel's buffer: `{last id or "", newest dropped id or "", entries...}`. KEYS: list, hash.
const FETCH_LUA: &str = r#"
local r = {redis.call('HGET', KEYS[2], 'last') or '', redis.call('HGET', KEYS[2], 'dropped') or ''}
for i, e in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do r[i + 2] = e end
return r
"#;

/// Opens or closes a session and tells every node. KEYS: sessions hash, ctl channel, joins
/// hash. ARGV: "open" / "close", sid, stored value, ctl message. Answers 1, or HDEL's count.
const SESSION_LUA: &str = r#"
local r
if ARGV[1] == 'open' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]); r = 1
else r = redis.call('HDEL', KEYS[1], ARGV[2]); redis.call('HDEL', KEYS[3], ARGV[2]) end
redis.call('PUBLISH', KEYS[2], ARGV[4])
return r
"#;

/// `JOIN` / `LEAVE`, kept in the joins hash (sid -> channels, one per line) and told to every
/// node. KEYS: sessions hash, joins hash, ctl channel. ARGV: "join" / "leave", sid, channel, ctl
/// message. Answers 1 (changed), 0 (already so), -1 (no such session, for a join).
const JOIN_LUA: &str = r#"
local sid, ch = ARGV[2], ARGV[3]
if ARGV[1] == 'join' and redis.call('HEXISTS', KEYS[1], sid) == 0 then return -1 end
local have = redis.call('HGET', KEYS[2], sid) or ''
local list, found = {}, false
for c in string.gmatch(have, '[^\n]+') do
  if c == ch then found = true else list[#list + 1] = c end
end
if ARGV[1] == 'join' then
  if found then return 0 end
  list[#list + 1] = ch
elseif not found then return 0 end
if #list == 0 then redis.call('HDEL', KEYS[2], sid) else redis.call('HSET', KEYS[2], sid, table.concat(list, '\n')) end
redis.call('PUBLISH', KEYS[3], ARGV[4])
return 1
"#;

/// Deletes a channel's buffer and tells every node. KEYS: list, hash, ctl channel. ARGV: ctl
/// message. Answers how many keys existed.
const DELETE_LUA: &str = r#"
local n = redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', KEYS[3], ARGV[1])
return n
"#;

pub(crate) const SCRIPTS: [&str; 10] = [
    PUBLISH_LUA,
    FETCH_LUA,
    SESSION_LUA,
    DELETE_LUA,
    JOIN_LUA,
    crate::cluster_presence::SHARE_LUA,
    crate::cluster_presence::RESYNC_LUA,
    crate::cluster_presence::TICK_LUA,
    crate::cluster_presence::QUERY_LUA,
    crate::mercure_cluster::MERCURE_LUA,
];
const PUBLISH: usize = 0;
const FETCH: usize = 1;
const SESSION: usize = 2;
const DELETE: usize = 3;
const JOIN: usize = 4;
pub(crate) const SHARE: usize = 5;
pub(crate) const RESYNC: usize = 6;
pub(crate) const TICK: usize = 7;
pub(crate) const QUERY: usize = 8;
pub(crate) const MERCURE: usize = 9;

/// The SHA1 of a script, as `SCRIPT LOAD` answers it and `EVALSHA` names it.
pub fn script_sha(script: &str) -> String {
    use sha1::{Digest, Sha1};
    Sha1::digest(script.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A message id as Redis keeps it: `time:tag`.
pub fn parse_id(b: &[u8]) -> Option<MsgId> {
    let s = std::str::from_utf8(b).ok()?;
    let (t, g) = s.split_once(':')?;
    let digits = |x: &str| !x.is_empty() && x.len() <= 19 && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(t) || !digits(g) {
        return None;
    }
    Some(MsgId { time: t.parse().ok()?, tag: g.parse().ok()? })
}

/// A buffered or published entry, read in place.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub id: MsgId,
    pub origin: &'a str,
    pub content_type: &'a str,
    pub body: &'a [u8],
}

/// Reads an entry (`id \n origin \n content-type \n body`), held to the node's caps: a valid
/// channel id of at most `max_channel` bytes as origin, a content type of at most 255 printable
/// bytes, a body of at most `max_body`. Anything else is foreign or malformed.
pub fn parse_entry(b: &[u8], max_channel: usize, max_body: usize) -> Result<Entry<'_>, &'static str> {
    let mut parts = b.splitn(4, |&c| c == b'\n');
    let (Some(id), Some(origin), Some(ct), Some(body)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not an entry (id, origin, content type, body)");
    };
    let id = parse_id(id).ok_or("bad message id")?;
    let origin = std::str::from_utf8(origin).ok().filter(|o| hub::valid_channel(o, max_channel)).ok_or("bad channel of origin")?;
    let content_type = std::str::from_utf8(ct)
        .ok()
        .filter(|c| c.len() <= 255 && c.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .ok_or("bad content type")?;
    if body.len() > max_body {
        return Err("message larger than limits.max_message_bytes");
    }
    Ok(Entry { id, origin, content_type, body })
}

/// What every node is told on the `ctl` channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Ctl<'a> {
    Open(&'a str, Option<&'a str>),
    Close(&'a str),
    Kick(&'a str),
    Delete(&'a str),
    Join(&'a str, &'a str),
    Leave(&'a str, &'a str),
}

impl Ctl<'_> {
    /// `verb \n name [\n user]`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Ctl::Open(sid, None) => format!("open\n{sid}"),
            Ctl::Open(sid, Some(user)) => format!("open\n{sid}\n{user}"),
            Ctl::Close(sid) => format!("close\n{sid}"),
            Ctl::Kick(sid) => format!("kick\n{sid}"),
            Ctl::Delete(ch) => format!("delete\n{ch}"),
            Ctl::Join(sid, ch) => format!("join\n{sid}\n{ch}"),
            Ctl::Leave(sid, ch) => format!("leave\n{sid}\n{ch}"),
        }
        .into_bytes()
    }

    /// Reads a ctl message; None when it is not one (names are checked as the commands check them).
    pub fn parse(b: &[u8], max_channel: usize) -> Option<Ctl<'_>> {
        let s = std::str::from_utf8(b).ok()?;
        let (verb, rest) = s.split_once('\n')?;
        let sid_ok = |x: &str| hub::valid_session(x);
        match verb {
            "open" => match rest.split_once('\n') {
                Some((sid, user)) if sid_ok(sid) => Some(Ctl::Open(sid, Some(user))),
                None if sid_ok(rest) => Some(Ctl::Open(rest, None)),
                _ => None,
            },
            "close" if sid_ok(rest) => Some(Ctl::Close(rest)),
            "kick" if sid_ok(rest) => Some(Ctl::Kick(rest)),
            "delete" if hub::valid_channel(rest, max_channel) => Some(Ctl::Delete(rest)),
            "join" | "leave" => {
                let (sid, ch) = rest.split_once('\n')?;
                if !sid_ok(sid) || !hub::valid_channel(ch, max_channel) || ch.starts_with(hub::SESSION_PREFIX) {
                    return None;
                }
                Some(if verb == "join" { Ctl::Join(sid, ch) } else { Ctl::Leave(sid, ch) })
            }
            _ => None,
        }
    }
}

/// A session's value in the sessions hash: "" for no user, "=" and the user id.
fn session_value(user: Option<&str>) -> String {
    user.map_or(String::new(), |u| format!("={u}"))
}

fn session_user(v: &[u8]) -> Option<String> {
    v.strip_prefix(b"=").map(|u| String::from_utf8_lossy(u).into_owned())
}

/// Appends a command as a RESP array of bulk strings.
fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    resp::array_len(out, args.len());
    for a in args {
        resp::bulk(out, a);
    }
}

/// Who waits for a reply: a connection (by token and id, so a reused slot is not answered),
/// and for an HTTP request its keep-alive and whether it asked for JSON.
#[derive(Debug, Clone, Copy)]
pub struct Asker {
    pub token: usize,
    pub conn: u64,
    pub http: Option<(bool, bool)>,
}

#[derive(Debug)]
pub(crate) enum SessionOp {
    Open(Box<str>, Option<String>),
    Close(Box<str>),
    Kick(Box<str>),
}

/// What a command in flight on the command link waits for.
#[derive(Debug)]
pub(crate) enum Waiting {
    /// AUTH, SCRIPT LOAD, the re-asserted sessions: an error takes the link down.
    Setup,
    /// The sessions hash, read on connect.
    Sessions,
    /// A followed channel's buffer.
    Fetch(Arc<str>),
    /// A publish: answers its publisher.
    Publish(Asker),
    Session(Asker, SessionOp),
    Delete(Asker, Box<str>),
    /// `GET /pub?id=`: the channel's buffer, for its info.
    Info(Asker, Box<str>),
    /// A reply already made, queued behind this connection's earlier ones (sent to nothing).
    Ready(Asker, Vec<u8>),
    /// `JOIN` / `LEAVE`.
    Join(Asker, bool, Box<str>, Box<str>),
    /// The joins hash, read on connect.
    Joins,
    /// The epoch key, read on connect: whether Redis kept its data.
    Epoch,
    /// This node's presence share, sent (a turn's changes, or the whole share).
    Share,
    /// The heartbeat: nodes alive, reaped, sessions online.
    Tick,
    /// `ONLINE`, `PRESENCE`, `PUBSUB` asked of the whole cluster.
    Query(Asker, crate::cluster_presence::Query),
    /// A Mercure update: its publisher (with its answer's CORS lines and the update's id), if one waits.
    Mercure(Option<(Asker, String, String)>),
    /// The Mercure history, read on connect.
    MercureHistory,
    /// The active Mercure subscriptions, read on connect.
    MercureSubs,
}

/// Capacity a link's buffers keep once emptied. A burst (a node's whole presence share on
/// connect, thousands of events at once) grows them far beyond this; kept, that would cost
/// every later second the memory of the largest burst.
const LINK_KEEP: usize = 64 << 10;

/// One TCP connection to Redis.
#[derive(Default)]
struct Link {
    stream: Option<TcpStream>,
    connected: bool,
    inbuf: Vec<u8>,
    /// Bytes of `inbuf` already parsed: removed once, when the rest is incomplete, rather than
    /// after every reply (a burst of thousands of messages arrives in one read).
    parsed: usize,
    out: Vec<u8>,
}

impl Link {
    /// The next complete reply or message, if one is all there.
    fn next(&mut self, limits: &resp::Limits) -> Result<Option<Value>, resp::RespError> {
        match resp::parse_reply(&self.inbuf[self.parsed..], limits)? {
            Some((v, n)) => {
                self.parsed += n;
                Ok(Some(v))
            }
            None => {
                self.inbuf.drain(..self.parsed);
                self.parsed = 0;
                if self.inbuf.is_empty() {
                    self.inbuf.shrink_to(LINK_KEEP);
                }
                Ok(None)
            }
        }
    }

    /// Writes what the socket takes.
    fn flush(&mut self) -> io::Result<()> {
        let Some(s) = self.stream.as_mut() else { return Ok(()) };
        if !self.connected {
            return Ok(());
        }
        let mut done = 0;
        while done < self.out.len() {
            match s.write(&self.out[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.out.drain(..done);
        if self.out.is_empty() {
            self.out.shrink_to(LINK_KEEP);
        }
        Ok(())
    }

    /// Reads what the socket has, at most `READ_ROUND` bytes: Ok(true) when there may be more
    /// (the caller handles what came, then reads again), Err on EOF, error, or a single reply
    /// that grew past `cap` bytes unfinished.
    fn fill(&mut self, scratch: &mut [u8], cap: usize) -> io::Result<bool> {
        let Some(s) = self.stream.as_mut() else { return Ok(false) };
        if self.inbuf.len() - self.parsed >= cap {
            return Err(io::Error::other("a reply larger than the node's caps"));
        }
        let mut got = 0;
        while got < READ_ROUND {
            match s.read(scratch) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection")),
                Ok(n) => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Where a followed channel stands.
#[derive(Debug)]
enum State {
    /// SUBSCRIBE sent (or to be sent once the link is up).
    Subscribing,
    /// Subscribed, the buffer asked for: entries that arrive meanwhile wait here.
    Fetching(Vec<Vec<u8>>),
    /// The node's buffer is Redis's, and every new message arrives.
    Live,
}

struct Follow {
    state: State,
    /// Polls waiting for `Live`: (token, stamp).
    parked: Vec<(usize, u64)>,
    /// Since when nothing waits on it.
    idle_since: Option<Instant>,
    /// A poll asked for it since the last idle check: subscribers that are behind are answered
    /// at once and never wait, yet the channel is in use.
    asked: bool,
}

/// The cluster's state, owned by the loop.
pub struct Cluster {
    pub(crate) cfg: crate::config::Cluster,
    cmd: Link,
    sub: Link,
    /// Both links connected and set up.
    pub(crate) up: bool,
    /// Since when the link has been up without a break.
    pub(crate) up_since: Option<Instant>,
    /// Was ever up (a later setup is a reconnect).
    was_up: bool,
    /// Connecting since (both links), or None.
    connecting: Option<Instant>,
    /// When to connect again after a failure.
    retry_at: Option<Instant>,
    failures: u32,
    waiting: VecDeque<(Instant, Waiting)>,
    follows: HashMap<Arc<str>, Follow>,
    /// Every followed channel, in the order the idle check visits them.
    idle_queue: VecDeque<Arc<str>>,
    pub(crate) shas: [String; 10],
    pub(crate) ctl: String,
    sessions_key: String,
    joins_key: String,
    /// `<prefix>:m:`, the start of every message channel.
    msg_prefix: String,
    limits: resp::Limits,
    inbuf_cap: usize,
    /// State for the backoff's jitter.
    rng: u64,
    next_tick: Instant,
    /// Why the link last went down.
    pub last_error: String,
    pub reconnects: u64,
    pub malformed: u64,
    malformed_logged: Option<Instant>,
    failure_logged: Option<Instant>,
    /// Commands sent, and publishes among them (for the commands-per-publish figure).
    pub commands: u64,
    pub publishes: u64,
    /// The cluster-wide presence: this node's share and what the heartbeat last said.
    pub(crate) presence: crate::cluster_presence::Share,
}

impl Cluster {
    /// The state for `cfg`, not connected yet.
    pub fn new(cfg: crate::config::Cluster, buffer_length: usize, max_message_bytes: usize) -> Cluster {
        let p = &cfg.prefix;
        let max_bulk = max_message_bytes + ENTRY_HEADER_MAX;
        Cluster {
            ctl: format!("{p}:ctl"),
            sessions_key: format!("{p}:sessions"),
            joins_key: format!("{p}:joins"),
            msg_prefix: format!("{p}:m:"),
            shas: SCRIPTS.map(script_sha),
            // A fetch answers at most a buffer of entries; HGETALL two strings per open session.
            limits: resp::Limits { max_bulk, max_args: 16 << 20, max_inline: 64 * 1024 },
            inbuf_cap: (buffer_length + 4).saturating_mul(max_bulk + 64).saturating_add(64 << 20),
            rng: (std::process::id() as u64) << 32 | crate::time::unix_now(),
            cfg,
            cmd: Link::default(),
            sub: Link::default(),
            up: false,
            up_since: None,
            was_up: false,
            connecting: None,
            retry_at: Some(Instant::now()),
            failures: 0,
            waiting: VecDeque::new(),
            follows: HashMap::new(),
            idle_queue: VecDeque::new(),
            next_tick: Instant::now(),
            last_error: "not connected yet".into(),
            reconnects: 0,
            malformed: 0,
            malformed_logged: None,
            failure_logged: None,
            commands: 0,
            publishes: 0,
            presence: crate::cluster_presence::Share::default(),
        }
    }

    /// Whether the node delivers `channel` from its own buffer: it follows it and is in sync.
    pub fn is_live(&self, channel: &str) -> bool {
        self.follows.get(channel).is_some_and(|f| matches!(f.state, State::Live))
    }

    /// Whether both links are up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The earliest moment the loop must look at the cluster again.
    pub fn next_deadline(&self) -> Instant {
        let mut at = self.next_tick;
        if let Some(r) = self.retry_at {
            at = at.min(r);
        }
        if let Some(c) = self.connecting {
            at = at.min(c + CONNECT_TIMEOUT);
        }
        if let Some((sent, _)) = self.waiting.front() {
            at = at.min(*sent + REPLY_TIMEOUT);
        }
        at
    }

    /// `up`, `connecting` or `down`.
    pub fn link_state(&self) -> &'static str {
        if self.up {
            "up"
        } else if self.connecting.is_some() {
            "connecting"
        } else {
            "down"
        }
    }

    /// Channels followed.
    pub fn followed(&self) -> usize {
        self.follows.len()
    }

    /// The `# Cluster` lines of `INFO`.
    pub fn info(&self) -> String {
        let live = self.follows.values().filter(|f| matches!(f.state, State::Live)).count();
        format!(
            "cluster_node:{}\r\ncluster_redis:{}\r\ncluster_prefix:{}\r\ncluster_link:{}\r\ncluster_last_error:{}\r\ncluster_reconnects:{}\r\n\
             cluster_channels_followed:{}\r\ncluster_channels_live:{live}\r\ncluster_commands_in_flight:{}\r\ncluster_commands_sent:{}\r\ncluster_publishes:{}\r\ncluster_malformed_messages:{}\r\n\
             cluster_rtt_ms:{}\r\ncluster_nodes_alive:{}\r\ncluster_nodes:{}\r\ncluster_sessions_online:{}\r\ncluster_nodes_removed:{}\r\n",
            self.cfg.node,
            self.cfg.redis,
            self.cfg.prefix,
            self.link_state(),
            if self.up { "" } else { &self.last_error },
            self.reconnects,
            self.follows.len(),
            self.waiting.len(),
            self.commands,
            self.publishes,
            self.malformed,
            self.presence.rtt.map_or(String::new(), |d| format!("{:.3}", d.as_secs_f64() * 1000.0)),
            self.presence.alive.len(),
            self.presence.alive.join(","),
            self.presence.online,
            self.presence.reaped,
        )
    }

    fn backoff(&mut self) -> Duration {
        let base = BACKOFF_MIN.saturating_mul(1 << self.failures.min(16)).min(BACKOFF_MAX);
        // xorshift: nodes that lost Redis together do not all come back in the same millisecond.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = base / 2;
        half + Duration::from_micros(self.rng % (half.as_micros() as u64 + 1))
    }

    /// Queues a command on the command link and what its reply is for.
    pub(crate) fn send(&mut self, args: &[&[u8]], w: Waiting, now: Instant) {
        command(&mut self.cmd.out, args);
        self.commands += 1;
        self.waiting.push_back((now, w));
    }

    /// Queues SUBSCRIBE or UNSUBSCRIBE of message channels on the subscriber link.
    fn subscribe(&mut self, verb: &[u8], channels: &[&str]) {
        for batch in channels.chunks(SUBSCRIBE_BATCH) {
            let names: Vec<String> = batch.iter().map(|c| format!("{}{c}", self.msg_prefix)).collect();
            let mut args: Vec<&[u8]> = vec![verb];
            args.extend(names.iter().map(|n| n.as_bytes()));
            command(&mut self.sub.out, &args);
        }
    }

    /// Queues SUBSCRIBE of pub/sub channels named in full (not message channels).
    pub(crate) fn subscribe_raw(&mut self, names: &[&str]) {
        let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        args.extend(names.iter().map(|n| n.as_bytes()));
        command(&mut self.sub.out, &args);
    }

    /// Raises the cap on a reply in the making (the Mercure history comes as one reply).
    pub(crate) fn allow_reply(&mut self, bytes: usize) {
        self.inbuf_cap = self.inbuf_cap.max(bytes);
    }

    fn keys(&self, channel: &str) -> (String, String) {
        (format!("{}:b:{channel}", self.cfg.prefix), format!("{}:i:{channel}", self.cfg.prefix))
    }

    /// Counts a malformed message from Redis; logs one line per `LOG_EVERY` at most.
    pub(crate) fn malformed(&mut self, what: &str, now: Instant) {
        self.malformed += 1;
        if self.malformed_logged.is_none_or(|at| now.duration_since(at) >= LOG_EVERY) {
            self.malformed_logged = Some(now);
            crate::warn!("cluster: skipped a malformed message from Redis: {what} ({} so far)", self.malformed);
        }
    }
}

/// The error a command gets when the link is down.
const DOWN: &str = "TRYAGAIN the cluster's Redis is not reachable; the command did nothing";
/// The error a command in flight gets when the link dies before Redis answered.
const LOST: &str = "TRYAGAIN the link to Redis was lost before it answered; the command may or may not have taken effect";

impl Server {
    pub(crate) fn cluster(&mut self) -> &mut Cluster {
        self.cluster.as_mut().expect("cluster mode")
    }

    /// Connects both links (non-blocking: the poller says when they are connected).
    fn cluster_connect(&mut self) {
        let addr = self.cluster().cfg.redis;
        let now = self.now;
        let mut ok = true;
        for token in [CMD, SUB] {
            match TcpStream::connect(addr) {
                Ok(mut s) => {
                    let _ = s.set_nodelay(true);
                    if let Err(e) = self.poll.registry().register(&mut s, token, Interest::READABLE | Interest::WRITABLE) {
                        crate::warn!("cluster: cannot register the link to Redis: {e}");
                        ok = false;
                    }
                    let c = self.cluster();
                    let link = if token == CMD { &mut c.cmd } else { &mut c.sub };
                    *link = Link { stream: Some(s), ..Link::default() };
                }
                Err(e) => {
                    self.cluster().last_error = format!("connect to {addr}: {e}");
                    ok = false;
                }
            }
        }
        let c = self.cluster();
        c.retry_at = None;
        c.connecting = Some(now);
        if !ok {
            let why = c.last_error.clone();
            self.cluster_down(&why);
        }
    }

    /// A link's socket is ready.
    pub(crate) fn cluster_event(&mut self, token: Token, writable: bool) {
        let which_cmd = token == CMD;
        {
            let Some(c) = self.cluster.as_mut() else { return };
            let link = if which_cmd { &mut c.cmd } else { &mut c.sub };
            let Some(s) = link.stream.as_ref() else { return };
            if !link.connected && writable {
                match (s.take_error(), s.peer_addr()) {
                    (Ok(None), Ok(_)) => link.connected = true,
                    (Ok(Some(e)) | Err(e), _) | (_, Err(e)) => {
                        if e.kind() != io::ErrorKind::NotConnected {
                            let why = format!("connect to {}: {e}", c.cfg.redis);
                            return self.cluster_down(&why);
                        }
                        return;
                    }
                }
                if c.cmd.connected && c.sub.connected && !c.up {
                    self.cluster_setup();
                }
            }
        }
        loop {
            let Some(c) = self.cluster.as_mut() else { return };
            let cap = c.inbuf_cap;
            let link = if which_cmd { &mut c.cmd } else { &mut c.sub };
            if !link.connected {
                return;
            }
            let more = match link.flush().and_then(|()| link.fill(&mut self.scratch, cap)) {
                Ok(more) => more,
                Err(e) => {
                    let why = format!("{e}");
                    return self.cluster_down(&why);
                }
            };
            if which_cmd {
                self.cluster_replies();
            } else {
                self.cluster_messages();
            }
            if !more {
                return;
            }
        }
    }

    /// Both links connected: authenticate, load the scripts, read the sessions, subscribe.
    fn cluster_setup(&mut self) {
        let now = self.now;
        let local: Vec<Arc<str>>;
        {
            let c = self.cluster();
            c.connecting = None;
            c.up = true;
            c.failures = 0;
            if c.was_up {
                c.reconnects += 1;
            }
            c.was_up = true;
            let password = c.cfg.password.clone();
            if !password.is_empty() {
                c.send(&[b"AUTH", password.as_bytes()], Waiting::Setup, now);
                command(&mut c.sub.out, &[b"AUTH", password.as_bytes()]);
            }
            for s in SCRIPTS {
                c.send(&[b"SCRIPT", b"LOAD", s.as_bytes()], Waiting::Setup, now);
            }
            let key = c.sessions_key.clone();
            c.send(&[b"HGETALL", key.as_bytes()], Waiting::Sessions, now);
            let joins = c.joins_key.clone();
            c.send(&[b"HGETALL", joins.as_bytes()], Waiting::Joins, now);
            // The epoch tells a Redis that kept its data from one that restarted empty.
            let epoch = format!("{}:epoch", c.cfg.prefix);
            let fresh = format!("{:016x}", c.rng ^ (crate::time::unix_now() << 20));
            c.send(&[b"SET", epoch.as_bytes(), fresh.as_bytes(), b"NX"], Waiting::Setup, now);
            c.send(&[b"GET", epoch.as_bytes()], Waiting::Epoch, now);
            c.up_since = Some(now);
            let ctl = c.ctl.clone();
            let events = c.presence.events_channel(&c.cfg.prefix);
            command(&mut c.sub.out, &[b"SUBSCRIBE", ctl.as_bytes(), events.as_bytes()]);
            for f in c.follows.values_mut() {
                f.state = State::Subscribing;
            }
            local = c.follows.keys().cloned().collect();
            let names: Vec<&str> = local.iter().map(|n| &**n).collect();
            c.subscribe(b"SUBSCRIBE", &names);
            crate::info!("cluster: node {} linked to Redis at {} ({} channels followed)", c.cfg.node, c.cfg.redis, names.len());
        }
        self.mercure_cluster_setup();
        self.cluster_flush();
    }

    /// The link failed: both connections close, every command in flight gets its error, held
    /// polls stay held, and a reconnect is scheduled.
    pub(crate) fn cluster_down(&mut self, why: &str) {
        let now = self.now;
        let Some(c) = self.cluster.as_mut() else { return };
        let was = c.up;
        for link in [&mut c.cmd, &mut c.sub] {
            if let Some(mut s) = link.stream.take() {
                let _ = self.poll.registry().deregister(&mut s);
            }
            *link = Link::default();
        }
        c.up = false;
        c.up_since = None;
        c.presence.link_lost();
        c.connecting = None;
        let wait = c.backoff();
        c.failures = c.failures.saturating_add(1);
        c.retry_at = Some(now + wait);
        c.last_error = why.to_string();
        for f in c.follows.values_mut() {
            f.state = State::Subscribing;
        }
        if was || c.failure_logged.is_none_or(|at| now.duration_since(at) >= LOG_EVERY) {
            c.failure_logged = Some(now);
            crate::warn!("cluster: link to Redis at {} {}: {why}; retrying in {} ms", c.cfg.redis, if was { "lost" } else { "failed" }, wait.as_millis());
        }
        let waiting = std::mem::take(&mut c.waiting);
        for (_, w) in waiting {
            match w {
                Waiting::Publish(a) | Waiting::Session(a, _) | Waiting::Delete(a, _) | Waiting::Info(a, _) | Waiting::Join(a, ..) | Waiting::Query(a, _) => {
                    self.cluster_fail(a, LOST)
                }
                Waiting::Ready(a, bytes) => self.cluster_answer(a, Deferred::Resp(bytes)),
                Waiting::Mercure(Some((a, cors, _))) => {
                    self.mercure_answer(a, &cors, 503, "the link to Redis was lost before it answered; the update may or may not have been published\n".into())
                }
                Waiting::Mercure(None) | Waiting::MercureHistory | Waiting::MercureSubs => {}
                Waiting::Setup | Waiting::Sessions | Waiting::Joins | Waiting::Fetch(_) | Waiting::Epoch | Waiting::Share | Waiting::Tick => {}
            }
        }
    }

    /// Timers: reconnect when due, a reply overdue, channels no longer needed.
    pub(crate) fn cluster_tick(&mut self) {
        let now = self.now;
        let Some(c) = self.cluster.as_mut() else { return };
        if c.retry_at.is_some_and(|at| at <= now) {
            return self.cluster_connect();
        }
        if c.connecting.is_some_and(|at| now.duration_since(at) >= CONNECT_TIMEOUT) {
            return self.cluster_down("connect timed out");
        }
        if c.waiting.front().is_some_and(|(sent, _)| now.duration_since(*sent) >= REPLY_TIMEOUT) {
            let why = format!("no reply within {} s", REPLY_TIMEOUT.as_secs());
            return self.cluster_down(&why);
        }
        if now < c.next_tick {
            return;
        }
        c.next_tick = now + Duration::from_secs(1);
        self.cluster_unfollow_idle();
        self.cluster_presence_tick();
        self.cluster_flush();
    }

    /// Stops following channels nothing waited on for `LINGER`: unsubscribes and forgets their
    /// buffer, which would go stale.
    ///
    /// At most `IDLE_CHECKS` follows a second, taken in turn from a queue: the cost of a second
    /// does not grow with the channels followed (with more of them, a channel is let go later).
    fn cluster_unfollow_idle(&mut self) {
        let now = self.now;
        let Some(mut c) = self.cluster.take() else { return };
        let mut gone = Vec::new();
        for _ in 0..c.idle_queue.len().min(IDLE_CHECKS) {
            let Some(name) = c.idle_queue.pop_front() else { break };
            // A name no longer followed leaves the queue here, as does one let go below.
            let Some(f) = c.follows.get_mut(&name) else { continue };
            let conns = &self.conns;
            f.parked.retain(|&(t, stamp)| conns.get(t).is_some_and(|c| c.stamp == stamp && !c.dead && matches!(c.phase, Phase::Syncing(_))));
            let used = std::mem::take(&mut f.asked) || !f.parked.is_empty() || self.hub.has_waiters(&name) || self.backend_subs.contains_key(&*name);
            if used {
                f.idle_since = None;
            } else if now.duration_since(*f.idle_since.get_or_insert(now)) >= LINGER {
                gone.push(name);
                continue;
            }
            c.idle_queue.push_back(name);
        }
        for name in &gone {
            c.follows.remove(name);
            self.hub.delete(name);
        }
        if c.up && !gone.is_empty() {
            let names: Vec<&str> = gone.iter().map(|n| &**n).collect();
            c.subscribe(b"UNSUBSCRIBE", &names);
        }
        self.cluster = Some(c);
        self.cluster_flush();
    }

    /// Writes what both links have queued (once per loop turn, so pipelined commands go together).
    pub(crate) fn cluster_flush(&mut self) {
        let Some(c) = self.cluster.as_mut() else { return };
        if !c.up {
            return;
        }
        if let Err(e) = c.cmd.flush().and_then(|()| c.sub.flush()) {
            let why = format!("write: {e}");
            self.cluster_down(&why);
        }
    }

    /// Starts following `channel` (subscribing when the link is up).
    pub(crate) fn cluster_follow(&mut self, channel: &str) {
        let Some(c) = self.cluster.as_mut() else { return };
        if channel.starts_with('@') || channel == crate::server::PRESENCE_CHANNEL || c.follows.contains_key(channel) {
            return;
        }
        let name: Arc<str> = Arc::from(channel);
        c.idle_queue.push_back(name.clone());
        c.follows.insert(name, Follow { state: State::Subscribing, parked: Vec::new(), idle_since: None, asked: true });
        if c.up {
            c.subscribe(b"SUBSCRIBE", &[channel]);
        }
    }

    /// Whether a poll on `channel` must wait for the node to get in sync with Redis first.
    pub(crate) fn cluster_must_park(&mut self, channel: &str) -> bool {
        let Some(c) = self.cluster.as_mut() else { return false };
        if channel.starts_with('@') {
            return false;
        }
        match c.follows.get_mut(channel) {
            Some(f) if matches!(f.state, State::Live) => {
                f.asked = true;
                false
            }
            _ => true,
        }
    }

    /// Parks an allowed poll until its channel is live on this node.
    pub(crate) fn cluster_park(&mut self, t: usize, p: crate::conn::PendingPoll<'_>, user: Option<String>) {
        let channel = p.channel.to_string();
        self.cluster_follow(&channel);
        let stamp = self.stamp();
        let Some(conn) = self.conns.get_mut(t) else { return };
        conn.stamp = stamp;
        conn.phase = Phase::Syncing(Box::new((p.into_owned(), user)));
        if let Some(f) = self.cluster().follows.get_mut(channel.as_str()) {
            f.parked.push((t, stamp));
        }
        self.start_hold_timer(t, stamp);
        self.cluster_flush();
    }

    /// Answers a parked poll that waited too long (408, or 503 for a stream, which a browser
    /// retries) or at shutdown (503).
    pub(crate) fn end_parked(&mut self, t: usize, status: u16) {
        let Some(c) = self.conns.get_mut(t) else { return };
        let Phase::Syncing(b) = std::mem::replace(&mut c.phase, Phase::Idle) else { return };
        let (p, _) = *b;
        let status = if p.transport != Transport::LongPoll { 503 } else { status };
        let mut lines = String::from_utf8_lossy(p.lines.as_deref().unwrap_or_default()).into_owned();
        lines.push_str(&crate::http::cursor_headers(p.echo));
        if status == 503 {
            lines.push_str("Retry-After: 1\r\n");
        }
        self.respond(t, status, &lines, b"", p.keep_alive && status != 503);
    }

    /// A channel is live: its parked polls go on.
    fn cluster_resume(&mut self, channel: &str) {
        let parked = match self.cluster().follows.get_mut(channel) {
            Some(f) => std::mem::take(&mut f.parked),
            None => return,
        };
        for (t, stamp) in parked {
            let Some(c) = self.conns.get_mut(t) else { continue };
            if c.stamp != stamp || c.dead || !matches!(c.phase, Phase::Syncing(_)) {
                continue;
            }
            let Phase::Syncing(b) = std::mem::replace(&mut c.phase, Phase::Idle) else { continue };
            let (p, user) = *b;
            self.hold(t, p, user);
        }
    }

    // ---- requests that go to Redis ----

    /// Whether a request must wait for the link: answers it with the error when the link is down.
    pub(crate) fn cluster_refuse_if_down(&mut self, a: Asker) -> bool {
        if self.cluster.as_ref().is_some_and(|c| c.up) {
            if let Some(c) = self.conns.get_mut(a.token) {
                c.redis_wait += 1;
            }
            return false;
        }
        self.counters.rejected += 1;
        self.cluster_fail(a, DOWN);
        true
    }

    /// `PUBLISH` / `POST /pub` in a cluster: one script call; the reply comes with Redis's.
    pub(crate) fn cluster_publish(&mut self, a: Asker, channel: &str, content_type: &str, body: &[u8]) {
        let down = !self.cluster.as_ref().is_some_and(|c| c.up);
        self.cluster_publish_channel(a, channel, content_type, body);
        if !down {
            self.mercure_relay(channel, body);
        }
    }

    /// `cluster_publish` for comet's own subscribers alone (an update the Mercure hub already has).
    pub(crate) fn cluster_publish_channel(&mut self, a: Asker, channel: &str, content_type: &str, body: &[u8]) {
        if self.cluster_refuse_if_down(a) {
            return;
        }
        let (buffer_length, ttl) = (self.cfg.channels.buffer_length.to_string(), self.cfg.channels.message_ttl_secs.to_string());
        // Sessions joined to the channel get their copy in the same script call.
        let copies: Vec<String> = self.hub.joined_to(channel).iter().map(|sid| format!("{}{sid}", hub::SESSION_PREFIX)).collect();
        let now = self.now;
        let c = self.cluster();
        let prefix = c.cfg.prefix.clone();
        let sha = c.shas[PUBLISH].clone();
        c.publishes += 1;
        let mut args: Vec<&[u8]> =
            vec![b"EVALSHA", sha.as_bytes(), b"0", prefix.as_bytes(), content_type.as_bytes(), body, buffer_length.as_bytes(), ttl.as_bytes(), channel.as_bytes()];
        args.extend(copies.iter().map(|c| c.as_bytes()));
        c.send(&args, Waiting::Publish(a), now);
    }

    /// `SESSION.OPEN` in a cluster.
    pub(crate) fn cluster_session_open(&mut self, a: Asker, sid: &str, user: Option<String>) {
        let msg = Ctl::Open(sid, user.as_deref()).encode();
        let value = session_value(user.as_deref());
        self.cluster_session(a, b"open", sid, value.as_bytes(), &msg, SessionOp::Open(sid.into(), user));
    }

    /// `SESSION.CLOSE` (kick false) or `KICK` in a cluster.
    pub(crate) fn cluster_session_close(&mut self, a: Asker, sid: &str, kick: bool) {
        let (msg, op) = if kick { (Ctl::Kick(sid).encode(), SessionOp::Kick(sid.into())) } else { (Ctl::Close(sid).encode(), SessionOp::Close(sid.into())) };
        self.cluster_session(a, b"close", sid, b"", &msg, op);
    }

    fn cluster_session(&mut self, a: Asker, verb: &[u8], sid: &str, value: &[u8], msg: &[u8], op: SessionOp) {
        if self.cluster_refuse_if_down(a) {
            return;
        }
        let now = self.now;
        let c = self.cluster();
        let (key, ctl, joins, sha) = (c.sessions_key.clone(), c.ctl.clone(), c.joins_key.clone(), c.shas[SESSION].clone());
        c.send(&[b"EVALSHA", sha.as_bytes(), b"3", key.as_bytes(), ctl.as_bytes(), joins.as_bytes(), verb, sid.as_bytes(), value, msg], Waiting::Session(a, op), now);
    }

    /// `JOIN` / `LEAVE` in a cluster: kept in Redis (a node that starts later reads them) and
    /// applied on every node, so the publishing node copies the message to the session.
    pub(crate) fn cluster_join(&mut self, a: Asker, join: bool, sid: &str, channel: &str) {
        if self.cluster_refuse_if_down(a) {
            return;
        }
        let now = self.now;
        let c = self.cluster();
        let (key, joins, ctl, sha) = (c.sessions_key.clone(), c.joins_key.clone(), c.ctl.clone(), c.shas[JOIN].clone());
        let msg = if join { Ctl::Join(sid, channel) } else { Ctl::Leave(sid, channel) }.encode();
        let verb: &[u8] = if join { b"join" } else { b"leave" };
        c.send(
            &[b"EVALSHA", sha.as_bytes(), b"3", key.as_bytes(), joins.as_bytes(), ctl.as_bytes(), verb, sid.as_bytes(), channel.as_bytes(), &msg],
            Waiting::Join(a, join, sid.into(), channel.into()),
            now,
        );
    }

    /// `DELETE /pub?id=` in a cluster.
    pub(crate) fn cluster_delete(&mut self, a: Asker, channel: &str) {
        if self.cluster_refuse_if_down(a) {
            return;
        }
        let now = self.now;
        let c = self.cluster();
        let (kb, ki) = c.keys(channel);
        let (ctl, sha) = (c.ctl.clone(), c.shas[DELETE].clone());
        let msg = Ctl::Delete(channel).encode();
        c.send(&[b"EVALSHA", sha.as_bytes(), b"3", kb.as_bytes(), ki.as_bytes(), ctl.as_bytes(), &msg], Waiting::Delete(a, channel.into()), now);
    }

    /// `GET /pub?id=` in a cluster: the channel's buffer as Redis has it.
    pub(crate) fn cluster_info(&mut self, a: Asker, channel: &str) {
        if self.cluster_refuse_if_down(a) {
            return;
        }
        self.cluster_fetch(channel, Waiting::Info(a, channel.into()));
    }

    fn cluster_fetch(&mut self, channel: &str, w: Waiting) {
        let now = self.now;
        let c = self.cluster();
        let (kb, ki) = c.keys(channel);
        let sha = c.shas[FETCH].clone();
        c.send(&[b"EVALSHA", sha.as_bytes(), b"2", kb.as_bytes(), ki.as_bytes()], w, now);
    }

    /// A reply made at once for a connection whose earlier replies still wait for Redis: queued
    /// behind them, so replies keep the order of the commands.
    pub(crate) fn cluster_queue_reply(&mut self, t: usize, bytes: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(t) else { return };
        conn.redis_wait += 1;
        let a = Asker { token: t, conn: conn.id, http: None };
        let now = self.now;
        self.cluster().waiting.push_back((now, Waiting::Ready(a, bytes)));
    }

    // ---- replies ----

    /// Answers `a` with a reply; the connection reads on once nothing of it waits for Redis.
    pub(crate) fn cluster_answer(&mut self, a: Asker, reply: Deferred) {
        let Some(c) = self.conns.get_mut(a.token) else { return };
        if c.id != a.conn || c.dead {
            return;
        }
        c.redis_wait = c.redis_wait.saturating_sub(1);
        match reply {
            Deferred::Resp(bytes) => c.out.append(|o| o.extend_from_slice(&bytes)),
            Deferred::Http(status, ct, body, ka) => {
                self.respond_typed(a.token, status, if status == 503 { "Retry-After: 1\r\n" } else { "" }, ct, &body, ka);
            }
        }
        if self.conns.get(a.token).is_some_and(|c| c.redis_wait == 0) {
            self.pending.push(a.token);
        }
        self.flush(a.token);
    }

    /// Answers `a` with an error: RESP `-<why>`, HTTP 503.
    pub(crate) fn cluster_fail(&mut self, a: Asker, why: &str) {
        let reply = match a.http {
            None => {
                let mut o = Vec::new();
                resp::error(&mut o, why);
                Deferred::Resp(o)
            }
            Some((ka, _)) => Deferred::Http(503, "text/plain; charset=utf-8", format!("{why}\n").into_bytes(), ka),
        };
        // A request refused at once was not counted as waiting: count it now so the answer
        // balances the books.
        if let Some(c) = self.conns.get_mut(a.token) {
            if c.id == a.conn && c.redis_wait == 0 {
                c.redis_wait = 1;
            }
        }
        self.cluster_answer(a, reply);
    }

    /// Handles the complete replies on the command link, in order.
    fn cluster_replies(&mut self) {
        loop {
            let Some(c) = self.cluster.as_mut() else { return };
            let limits = c.limits;
            let value = match c.cmd.next(&limits) {
                Ok(Some(v)) => v,
                Ok(None) => return,
                Err(e) => return self.cluster_down(&format!("unreadable reply: {}", e.message())),
            };
            let Some((sent, w)) = c.waiting.pop_front() else {
                return self.cluster_down("a reply to no command");
            };
            if matches!(w, Waiting::Tick) {
                c.presence.rtt = Some(self.now.saturating_duration_since(sent));
            }
            if let Value::Error(e) = &value {
                if e.starts_with(b"NOSCRIPT") {
                    // The scripts were flushed from Redis: reconnecting loads them again.
                    let now = self.now;
                    self.cluster().waiting.push_front((now, w));
                    return self.cluster_down("Redis lost comet's scripts (NOSCRIPT)");
                }
            }
            self.cluster_reply(w, value);
            // Replies made locally that waited behind this one go out now.
            while matches!(self.cluster.as_ref().and_then(|c| c.waiting.front()), Some((_, Waiting::Ready(..)))) {
                if let Some((_, Waiting::Ready(a, bytes))) = self.cluster().waiting.pop_front() {
                    self.cluster_answer(a, Deferred::Resp(bytes));
                }
            }
        }
    }

    fn cluster_reply(&mut self, w: Waiting, v: Value) {
        let err = |v: &Value| match v {
            Value::Error(e) => Some(String::from_utf8_lossy(e).into_owned()),
            _ => None,
        };
        match w {
            Waiting::Setup => {
                if let Some(e) = err(&v) {
                    self.cluster_down(&format!("Redis refused: {e}"));
                }
            }
            Waiting::Sessions => self.cluster_sessions(v),
            Waiting::Joins => self.cluster_joins(v),
            Waiting::Epoch => self.cluster_epoch(v),
            Waiting::Share => {
                if let Some(e) = err(&v) {
                    crate::warn!("cluster: Redis refused this node's presence share: {e}");
                }
            }
            Waiting::Tick => self.cluster_ticked(v),
            Waiting::Query(a, q) => match err(&v) {
                Some(e) => self.cluster_fail(a, &format!("ERR Redis: {e}")),
                None => self.cluster_queried(a, q, v),
            },
            Waiting::Join(a, join, sid, channel) => {
                if let Some(e) = err(&v) {
                    return self.cluster_fail(a, &format!("ERR Redis: {e}"));
                }
                let mut o = Vec::new();
                match v {
                    Value::Int(-1) => resp::error(&mut o, "ERR no such session: open it with SESSION.OPEN first"),
                    Value::Int(n) => {
                        // Done here at once; the ctl message does it again, changing nothing.
                        let _ = self.joined(join, &sid, &channel);
                        resp::integer(&mut o, n);
                    }
                    _ => resp::error(&mut o, "ERR Redis answered the join script with something else"),
                }
                self.cluster_answer(a, Deferred::Resp(o));
            }
            Waiting::Fetch(name) => self.cluster_fetched(&name, v),
            w @ (Waiting::Mercure(_) | Waiting::MercureHistory | Waiting::MercureSubs) => self.mercure_cluster_reply(w, v),
            Waiting::Ready(a, bytes) => self.cluster_answer(a, Deferred::Resp(bytes)),
            Waiting::Publish(a) => {
                if let Some(e) = err(&v) {
                    return self.cluster_fail(a, &format!("ERR Redis: {e}"));
                }
                let (id, nodes, len) = match &v {
                    Value::Array(x) if x.len() == 3 => (x[0].bytes().and_then(parse_id), int(&x[1]), int(&x[2])),
                    _ => (None, None, None),
                };
                let (Some(id), Some(nodes), Some(len)) = (id, nodes, len) else {
                    return self.cluster_fail(a, "ERR Redis answered the publish script with something else");
                };
                let reply = match a.http {
                    None => {
                        let mut o = Vec::new();
                        resp::integer(&mut o, nodes);
                        Deferred::Resp(o)
                    }
                    Some((ka, json)) => {
                        let (ct, body) = crate::admin::info_body(len as usize, None, nodes as usize, Some(id), json);
                        Deferred::Http(if nodes > 0 { 201 } else { 202 }, ct, body.into_bytes(), ka)
                    }
                };
                self.cluster_answer(a, reply);
            }
            Waiting::Session(a, op) => {
                if let Some(e) = err(&v) {
                    return self.cluster_fail(a, &format!("ERR Redis: {e}"));
                }
                let existed = matches!(v, Value::Int(n) if n > 0);
                let mut o = Vec::new();
                match op {
                    SessionOp::Open(sid, user) => {
                        self.session_opened(&sid, user);
                        resp::simple(&mut o, "OK");
                    }
                    SessionOp::Close(sid) => {
                        let here = self.session_closed(&sid);
                        resp::integer(&mut o, i64::from(existed || here));
                    }
                    SessionOp::Kick(sid) => {
                        let n = self.session_kicked(&sid);
                        resp::integer(&mut o, n as i64);
                    }
                }
                self.cluster_answer(a, Deferred::Resp(o));
            }
            Waiting::Delete(a, channel) => {
                let ka = a.http.map_or(false, |h| h.0);
                if let Some(e) = err(&v) {
                    return self.cluster_fail(a, &format!("ERR Redis: {e}"));
                }
                let here = self.channel_deleted(&channel);
                let reply = match (here, v) {
                    (Some(n), _) => Deferred::Http(200, "text/plain; charset=utf-8", format!("channel deleted, {n} subscribers gone\n").into_bytes(), ka),
                    (None, Value::Int(k)) if k > 0 => Deferred::Http(200, "text/plain; charset=utf-8", b"channel deleted, 0 subscribers gone\n".to_vec(), ka),
                    _ => Deferred::Http(404, "text/plain; charset=utf-8", b"no such channel".to_vec(), ka),
                };
                self.cluster_answer(a, reply);
            }
            Waiting::Info(a, channel) => {
                let (ka, json) = a.http.unwrap_or((false, false));
                let Value::Array(items) = v else { return self.cluster_fail(a, "ERR Redis answered the fetch script with something else") };
                let now = self.now_secs;
                let ttl = self.cfg.channels.message_ttl_secs;
                let ids: Vec<MsgId> = items.iter().skip(2).filter_map(|e| e.bytes().and_then(|b| parse_entry(b, usize::MAX, usize::MAX).ok()).map(|e| e.id)).filter(|id| id.time + ttl > now).collect();
                let local = self.hub.info(&channel, now);
                if ids.is_empty() && items.first().and_then(Value::bytes).is_none_or(|l| l.is_empty()) && local.is_none() {
                    return self.cluster_answer(a, Deferred::Http(404, "text/plain; charset=utf-8", b"no such channel".to_vec(), ka));
                }
                let requested = local.as_ref().and_then(|i| i.last_requested);
                let subscribers = local.as_ref().map_or(0, |i| i.subscribers);
                let (ct, body) = crate::admin::info_body(ids.len(), requested, subscribers, ids.last().copied(), json);
                self.cluster_answer(a, Deferred::Http(200, ct, body.into_bytes(), ka));
            }
        }
    }

    /// The sessions hash on connect: the union of Redis's and this node's. Sessions Redis has
    /// are opened here; sessions only this node knows (Redis restarted empty, or they were opened
    /// before it lost its data) are written back, so no open session is lost.
    fn cluster_sessions(&mut self, v: Value) {
        let Value::Array(items) = v else {
            return self.cluster_down("Redis answered HGETALL with something else");
        };
        let mut known: HashSet<Vec<u8>> = HashSet::with_capacity(items.len() / 2);
        for pair in items.chunks(2) {
            let [sid, value] = pair else { continue };
            let (Some(sid), Some(value)) = (sid.bytes(), value.bytes()) else { continue };
            let Ok(s) = std::str::from_utf8(sid) else { continue };
            if !hub::valid_session(s) {
                let now = self.now;
                self.cluster().malformed("a session id that is not one", now);
                continue;
            }
            known.insert(sid.to_vec());
            let user = session_user(value);
            if self.hub.session(s).is_none_or(|x| x.user != user) {
                self.session_opened(s, user);
            }
        }
        let missing: Vec<(String, String)> =
            self.hub.sessions().filter(|(sid, _)| !known.contains(sid.as_bytes())).map(|(sid, user)| (sid.to_string(), session_value(user))).collect();
        if missing.is_empty() {
            return;
        }
        crate::info!("cluster: {} open sessions this node knows were not in Redis; written back", missing.len());
        let now = self.now;
        let c = self.cluster();
        let key = c.sessions_key.clone();
        for batch in missing.chunks(512) {
            let mut args: Vec<&[u8]> = vec![b"HSET", key.as_bytes()];
            for (sid, value) in batch {
                args.push(sid.as_bytes());
                args.push(value.as_bytes());
            }
            c.send(&args, Waiting::Setup, now);
        }
    }

    /// A followed channel's buffer arrived: the node takes what it lacks (delivering it to polls
    /// held through an outage), then the messages that came meanwhile, and goes live.
    fn cluster_fetched(&mut self, name: &Arc<str>, v: Value) {
        let early = match self.cluster().follows.get_mut(&**name) {
            Some(f) => match std::mem::replace(&mut f.state, State::Live) {
                State::Fetching(early) => early,
                other => {
                    // Not waiting for this fetch (the link went down and up since): leave it be.
                    f.state = other;
                    return;
                }
            },
            None => return,
        };
        let Value::Array(items) = v else {
            return self.cluster_down("Redis answered the fetch script with something else");
        };
        if items.first().and_then(Value::bytes).is_some_and(|l| l.is_empty()) {
            if let Some(last) = self.hub.info(name, self.now_secs).and_then(|i| i.last_id) {
                // Redis has no last id for a channel this node holds messages of (it restarted
                // empty): give it back, so the next id there comes after the ones browsers have.
                let (now, ttl) = (self.now, self.cfg.channels.message_ttl_secs.to_string());
                let c = self.cluster();
                let (_, ki) = c.keys(name);
                let id = last.to_string();
                c.send(&[b"HSETNX", ki.as_bytes(), b"last", id.as_bytes()], Waiting::Setup, now);
                c.send(&[b"EXPIRE", ki.as_bytes(), ttl.as_bytes()], Waiting::Setup, now);
            }
        }
        if let Some(d) = items.get(1).and_then(Value::bytes).filter(|d| !d.is_empty()) {
            match parse_id(d) {
                Some(id) => self.hub.mark_dropped(name, id),
                None => {
                    let now = self.now;
                    self.cluster().malformed("a dropped id that is not an id", now);
                }
            }
        }
        for e in items.iter().skip(2) {
            match e.bytes() {
                Some(b) => self.cluster_deliver(name, b, false),
                None => {
                    let now = self.now;
                    self.cluster().malformed("a buffer entry that is not a string", now);
                }
            }
        }
        for b in early {
            self.cluster_deliver(name, &b, true);
        }
        self.cluster_resume(name);
    }

    /// Buffers an entry on `channel` and answers the polls and streams waiting there; `backends`
    /// also sends it to subscribed backends (new messages, not a fetched buffer).
    fn cluster_deliver(&mut self, channel: &str, b: &[u8], backends: bool) {
        let (max_channel, max_body) = (self.cfg.limits.max_channel_id_bytes, self.cfg.limits.max_message_bytes);
        let e = match parse_entry(b, max_channel, max_body) {
            Ok(e) => e,
            Err(why) => {
                let now = self.now;
                return self.cluster().malformed(why, now);
            }
        };
        if let Some((msg, waiters)) = self.hub.publish_at(channel, e.id, e.origin, e.content_type, e.body, self.now_secs) {
            self.fan_out(channel, &msg, waiters);
            if backends {
                self.to_backends(channel, e.body);
            }
        }
    }

    /// Handles what arrived on the subscriber link: confirmations, messages, ctl.
    fn cluster_messages(&mut self) {
        loop {
            let Some(c) = self.cluster.as_mut() else { return };
            let limits = c.limits;
            let value = match c.sub.next(&limits) {
                Ok(Some(v)) => v,
                Ok(None) => break,
                Err(e) => return self.cluster_down(&format!("unreadable message: {}", e.message())),
            };
            let mut items = match value {
                Value::Array(items) if items.len() == 3 => items,
                Value::Simple(_) => continue, // AUTH's OK
                Value::Error(e) => return self.cluster_down(&format!("Redis refused: {}", String::from_utf8_lossy(&e))),
                _ => {
                    let now = self.now;
                    self.cluster().malformed("a pub/sub frame of another shape", now);
                    continue;
                }
            };
            // The payload is taken out, not copied: it is the message's body, up to the caps.
            let payload = match items.pop() {
                Some(Value::Bulk(b)) => Some(b),
                _ => None,
            };
            let (Some(kind), Some(chan)) = (items[0].bytes(), items[1].bytes()) else { continue };
            let Ok(chan) = std::str::from_utf8(chan) else { continue };
            if self.mercure.as_ref().is_some_and(|m| m.redis_channel.as_deref() == Some(chan)) {
                if let (b"message", Some(b)) = (kind, &payload) {
                    self.mercure_cluster_message(b);
                }
                continue;
            }
            let cap = self.cfg.channels.buffer_length + 1;
            let c = self.cluster();
            if c.presence.is_events_channel(chan, &c.cfg.prefix) {
                if let (b"message", Some(b)) = (kind, &payload) {
                    self.to_backends(crate::server::PRESENCE_CHANNEL, b);
                }
                continue;
            }
            if chan == c.ctl {
                if let (b"message", Some(b)) = (kind, &payload) {
                    self.cluster_ctl(b);
                }
                continue;
            }

            let Some(name) = chan.strip_prefix(c.msg_prefix.as_str()) else {
                let now = self.now;
                self.cluster().malformed("a message on a channel comet did not subscribe to", now);
                continue;
            };
            let name = name.to_string();
            match kind {
                b"subscribe" => {
                    let Some(f) = c.follows.get_mut(name.as_str()) else { continue };
                    if matches!(f.state, State::Subscribing) {
                        f.state = State::Fetching(Vec::new());
                        let key: Arc<str> = c.follows.get_key_value(name.as_str()).map(|(k, _)| k.clone()).unwrap_or_else(|| Arc::from(name.as_str()));
                        self.cluster_fetch(&name, Waiting::Fetch(key));
                    }
                }
                b"message" => {
                    let Some(payload) = payload else { continue };
                    match c.follows.get_mut(name.as_str()).map(|f| &mut f.state) {
                        Some(State::Live) => self.cluster_deliver(&name, &payload, true),
                        Some(State::Fetching(early)) => {
                            // Only the last buffer's worth can matter: older ones would be trimmed.
                            if early.len() >= cap {
                                early.remove(0);
                            }
                            early.push(payload);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        self.cluster_flush();
    }

    /// Applies what another node (or this one) told every node.
    fn cluster_ctl(&mut self, b: &[u8]) {
        let Some(ctl) = Ctl::parse(b, self.cfg.limits.max_channel_id_bytes) else {
            let now = self.now;
            return self.cluster().malformed("a ctl message comet does not know", now);
        };
        match ctl {
            Ctl::Open(sid, user) => {
                let user = user.map(str::to_string);
                if self.hub.session(sid).is_none_or(|s| s.user != user) || self.hub.is_kicked(sid) {
                    self.session_opened(sid, user);
                }
            }
            Ctl::Close(sid) => {
                self.session_closed(sid);
            }
            Ctl::Kick(sid) => {
                self.session_kicked(sid);
            }
            Ctl::Delete(ch) => {
                self.channel_deleted(ch);
            }
            Ctl::Join(sid, ch) => {
                let _ = self.joined(true, sid, ch);
            }
            Ctl::Leave(sid, ch) => {
                let _ = self.joined(false, sid, ch);
            }
        }
    }

    /// The joins hash on connect: every join of a session this node knows.
    fn cluster_joins(&mut self, v: Value) {
        let Value::Array(items) = v else {
            return self.cluster_down("Redis answered HGETALL with something else");
        };
        let max = self.cfg.limits.max_channel_id_bytes;
        for pair in items.chunks(2) {
            let [sid, list] = pair else { continue };
            let (Some(sid), Some(list)) = (sid.bytes(), list.bytes()) else { continue };
            let (Ok(sid), Ok(list)) = (std::str::from_utf8(sid), std::str::from_utf8(list)) else { continue };
            for ch in list.split('\n').filter(|c| hub::valid_channel(c, max) && !c.starts_with(hub::SESSION_PREFIX)) {
                if self.hub.session(sid).is_some_and(|s| !s.joined.contains(ch)) {
                    let _ = self.joined(true, sid, ch);
                }
            }
        }
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_as_a_table_of_bytes() {
        let id = |time, tag| MsgId { time, tag };
        let ok: &[(&[u8], Entry)] = &[
            (b"100:0\nc\ntext/plain\nhello", Entry { id: id(100, 0), origin: "c", content_type: "text/plain", body: b"hello" }),
            (b"7:42\nsession:ab\n\n", Entry { id: id(7, 42), origin: "session:ab", content_type: "", body: b"" }),
            // The body is the rest, newlines and all.
            (b"1:1\nc\nt\na\nb\n", Entry { id: id(1, 1), origin: "c", content_type: "t", body: b"a\nb\n" }),
        ];
        for (bytes, want) in ok {
            assert_eq!(parse_entry(bytes, 64, 16).as_ref(), Ok(want), "{bytes:?}");
        }
        let bad: &[&[u8]] = &[
            b"",
            b"100:0\nc\nt",
            b"x:0\nc\nt\nb",
            b"100\nc\nt\nb",
            b"100:-1\nc\nt\nb",
            b"99999999999999999999:0\nc\nt\nb",
            b"1:0\nbad channel\nt\nb",
            b"1:0\n@me\nt\nb",
            b"1:0\nc\nt\r\x01\nb",
            b"1:0\nc\nt\n01234567890123456",
            b"1:0\n01234567890123456789012345678901234567890123456789012345678901234\nt\nb",
        ];
        for bytes in bad {
            assert!(parse_entry(bytes, 64, 16).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn ctl_messages_round_trip_and_foreign_ones_are_refused() {
        for ctl in [Ctl::Open("s1", None), Ctl::Open("s1", Some("42")), Ctl::Open("s1", Some("")), Ctl::Open("s,2", Some("a b\nc")), Ctl::Close("s"), Ctl::Kick("s"), Ctl::Delete("goods"), Ctl::Join("s", "goods"), Ctl::Leave("s", "goods")] {
            let b = ctl.encode();
            assert_eq!(Ctl::parse(&b, 64), Some(ctl));
        }
        for bad in [&b""[..], b"open", b"open\n", b"open\nbad sid", b"close\na b", b"delete\n@me", b"frobnicate\nx", b"\xff\nx", b"kick\n", b"join\ns", b"join\ns\nsession:x", b"leave\ns\nbad ch", b"join\nbad sid\nc"] {
            assert_eq!(Ctl::parse(bad, 64), None, "{bad:?}");
        }
    }

    #[test]
    fn session_values() {
        assert_eq!(session_user(session_value(None).as_bytes()), None);
        assert_eq!(session_user(session_value(Some("42")).as_bytes()).as_deref(), Some("42"));
        assert_eq!(session_user(session_value(Some("")).as_bytes()).as_deref(), Some(""));
    }

    #[test]
    fn script_sha_is_redis_sha1_hex() {
        // `redis-cli SCRIPT LOAD "return 1"` answers this.
        assert_eq!(script_sha("return 1"), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let cfg = crate::config::Cluster { redis: "127.0.0.1:1".parse().unwrap(), password: String::new(), node: "n".into(), prefix: "p".into() };
        let mut c = Cluster::new(cfg, 10, 1024);
        let mut last = Duration::ZERO;
        for f in 0..20 {
            c.failures = f;
            let d = c.backoff();
            let base = BACKOFF_MIN.saturating_mul(1 << f.min(16)).min(BACKOFF_MAX);
            assert!(d >= base / 2 && d <= base, "{f}: {d:?}");
            last = last.max(d);
        }
        assert!(last <= BACKOFF_MAX);
    }
}
