//! Who is online across the cluster. Each node keeps its own presence (`presence.rs`: polls,
//! grace, events) and writes its share to Redis: once per loop turn, the turn's events as one
//! script call (`SHARE_LUA`), never a command per poll. The scripts keep cluster-wide counts
//! (per session, the nodes it is online on; per session and channel, the nodes it is on there)
//! and publish an event on `<prefix>:presence` only when a count goes from 0 to 1 or back: each
//! transition once for the cluster, in order, and a session whose polls alternate between nodes
//! (online on both within the grace) does not flap. Every node forwards those events to its
//! backends subscribed to `__presence__`.
//!
//! What Redis holds, under `<prefix>:`
//! - `po:<node>` (hash sid -> user value), `pj:<node>` (set of `sid \n channel`), `pa:<node>` (hash
//!   channel -> anonymous polls and subscribed backends): a node's share;
//! - `user` (hash sid -> user value, the sessions online anywhere), `on` (sid -> nodes),
//!   `ch:<channel>` (sid -> nodes), `chans` (channel -> sessions on it): the cluster's counts;
//! - `nodes` (sorted set node -> last heartbeat, ms of Redis's clock).
//!
//! Every second a node sends its heartbeat (`TICK_LUA`), which also removes the share of any node
//! not heard from for `NODE_TIMEOUT` plus the grace, announcing `leave`/`offline` for sessions that
//! were only there: a node that died stops counting then, not before. On every (re)connect a node
//! sends its whole share (`RESYNC_LUA`), which announces only what changed; after Redis lost its
//! data (the epoch key differs) that goes quietly, so a restarted Redis does not make everyone go
//! offline and online again.

use crate::cluster::{Asker, Waiting};
use crate::presence::Event;
use crate::resp::{self, Value};
use crate::server::{Deferred, Server};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// A node not heard from this long (plus the grace) is taken as gone, and its sessions with it.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most changes in one script call.
const OPS_PER_CALL: usize = 4096;
/// Sessions in the heartbeat's sample (the admin page).
const SAMPLE: usize = 100;

/// The functions every presence script shares. ARGV[1] is the key prefix. (A macro, so that
/// `concat!` can put it before each script's body.)
macro_rules! prelude {
    () => {
        r#"
local P = ARGV[1]
local function ms() local t = redis.call('TIME'); return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
local function ev(m) redis.call('PUBLISH', P .. ':presence', m) end
local function online_text(sid, val) if val == '' then return 'online ' .. sid end return 'online ' .. sid .. ' ' .. string.sub(val, 2) end
local function on_add(node, sid, val, quiet)
  local old = redis.call('HGET', P .. ':user', sid)
  -- A node that does not know the user id keeps the one another node knows.
  if val == '' and old then val = old end
  local new = redis.call('HSET', P .. ':po:' .. node, sid, val) == 1
  local first = new and redis.call('HINCRBY', P .. ':on', sid, 1) == 1
  if first or (old and old ~= val) then
    redis.call('HSET', P .. ':user', sid, val)
    if not quiet then ev(online_text(sid, val)) end
  end
end
local function on_del(node, sid, quiet)
  if redis.call('HDEL', P .. ':po:' .. node, sid) == 1 and redis.call('HINCRBY', P .. ':on', sid, -1) <= 0 then
    redis.call('HDEL', P .. ':on', sid)
    redis.call('HDEL', P .. ':user', sid)
    if not quiet then ev('offline ' .. sid) end
  end
end
local function ch_add(node, sid, ch, quiet)
  if redis.call('SADD', P .. ':pj:' .. node, sid .. '\n' .. ch) == 1 and redis.call('HINCRBY', P .. ':ch:' .. ch, sid, 1) == 1 then
    redis.call('HINCRBY', P .. ':chans', ch, 1)
    if not quiet then ev('join ' .. sid .. ' ' .. ch) end
  end
end
local function ch_del(node, sid, ch, quiet)
  if redis.call('SREM', P .. ':pj:' .. node, sid .. '\n' .. ch) == 1 and redis.call('HINCRBY', P .. ':ch:' .. ch, sid, -1) <= 0 then
    redis.call('HDEL', P .. ':ch:' .. ch, sid)
    if redis.call('HINCRBY', P .. ':chans', ch, -1) <= 0 then redis.call('HDEL', P .. ':chans', ch) end
    if not quiet then ev('leave ' .. sid .. ' ' .. ch) end
  end
end
local function split(op) return string.match(op, '^(%a)\n([^\n]*)\n?(.*)$') end
local function member(m) return string.match(m, '^([^\n]*)\n(.*)$') end
local function drop_share(node, quiet)
  for _, m in ipairs(redis.call('SMEMBERS', P .. ':pj:' .. node)) do local sid, ch = member(m); ch_del(node, sid, ch, quiet) end
  for _, sid in ipairs(redis.call('HKEYS', P .. ':po:' .. node)) do on_del(node, sid, quiet) end
  redis.call('DEL', P .. ':pa:' .. node, P .. ':pj:' .. node, P .. ':po:' .. node)
end
"#
    };
}

/// A turn's changes of one node's share. ARGV: prefix, node, then changes: `o\nsid\nuser value`
/// (online), `x\nsid` (offline), `j\nsid\nchannel`, `l\nsid\nchannel`, `a\nchannel\ncount`.
pub const SHARE_LUA: &str = concat!(
    prelude!(),
    r#"
local node = ARGV[2]
for i = 3, #ARGV do
  local kind, a, b = split(ARGV[i])
  if kind == 'o' then on_add(node, a, b, false)
  elseif kind == 'x' then on_del(node, a, false)
  elseif kind == 'j' then ch_add(node, a, b, false)
  elseif kind == 'l' then ch_del(node, a, b, false)
  elseif kind == 'a' then
    if (tonumber(b) or 0) > 0 then redis.call('HSET', P .. ':pa:' .. node, a, b) else redis.call('HDEL', P .. ':pa:' .. node, a) end
  end
end
redis.call('ZADD', P .. ':nodes', ms(), node)
return 1
"#
);

/// A node's whole share, on (re)connect: what it no longer has is removed (unless `keep`: a
/// process just started, whose predecessor's sessions get their grace), what it has is added;
/// only changes are announced, none when `quiet`. ARGV: prefix, node, quiet, keep, then the
/// share as `o`, `j` and `a` changes.
pub const RESYNC_LUA: &str = concat!(
    prelude!(),
    r#"
local node, quiet, keep = ARGV[2], ARGV[3] == '1', ARGV[4] == '1'
local want_o, order_o, want_j, order_j, anon = {}, {}, {}, {}, {}
for i = 5, #ARGV do
  local kind, a, b = split(ARGV[i])
  if kind == 'o' then want_o[a] = b; order_o[#order_o + 1] = a
  elseif kind == 'j' then want_j[a .. '\n' .. b] = true; order_j[#order_j + 1] = {a, b}
  elseif kind == 'a' then anon[#anon + 1] = {a, b} end
end
if not keep then
  for _, m in ipairs(redis.call('SMEMBERS', P .. ':pj:' .. node)) do
    if not want_j[m] then local sid, ch = member(m); ch_del(node, sid, ch, quiet) end
  end
  for _, sid in ipairs(redis.call('HKEYS', P .. ':po:' .. node)) do
    if want_o[sid] == nil then on_del(node, sid, quiet) end
  end
end
for _, sid in ipairs(order_o) do on_add(node, sid, want_o[sid], quiet) end
for _, x in ipairs(order_j) do ch_add(node, x[1], x[2], quiet) end
redis.call('DEL', P .. ':pa:' .. node)
for _, x in ipairs(anon) do redis.call('HSET', P .. ':pa:' .. node, x[1], x[2]) end
redis.call('ZADD', P .. ':nodes', ms(), node)
return 1
"#
);

/// The heartbeat. ARGV: prefix, node, ms after which a silent node is removed (0: remove none).
/// Answers `{sessions online, {nodes alive}, {nodes removed}, {sample: sid, value, ...}}`.
pub const TICK_LUA: &str = concat!(
    prelude!(),
    r#"
local node, age = ARGV[2], tonumber(ARGV[3])
local now = ms()
redis.call('ZADD', P .. ':nodes', now, node)
local reaped = {}
if age > 0 then
  for _, n in ipairs(redis.call('ZRANGEBYSCORE', P .. ':nodes', '-inf', now - age)) do
    if n ~= node then drop_share(n, false); redis.call('ZREM', P .. ':nodes', n); reaped[#reaped + 1] = n end
  end
end
local scan = redis.call('HSCAN', P .. ':user', 0, 'COUNT', 100)
return {redis.call('HLEN', P .. ':user'), redis.call('ZRANGE', P .. ':nodes', 0, -1), reaped, scan[2]}
"#
);

/// `ONLINE`, `ONLINE COUNT`, `PRESENCE`, `PUBSUB CHANNELS`, `PUBSUB NUMSUB` for the cluster.
/// ARGV: prefix, kind, arguments.
pub const QUERY_LUA: &str = concat!(
    prelude!(),
    r#"
local kind = ARGV[2]
if kind == 'online' then return redis.call('HGETALL', P .. ':user') end
if kind == 'count' then return redis.call('HLEN', P .. ':user') end
if kind == 'presence' then
  local r = {}
  for _, s in ipairs(redis.call('HKEYS', P .. ':ch:' .. ARGV[3])) do r[#r + 1] = s; r[#r + 1] = redis.call('HGET', P .. ':user', s) or '' end
  return r
end
local nodes = redis.call('ZRANGE', P .. ':nodes', 0, -1)
if kind == 'channels' then
  local seen, r = {}, {}
  local function add(c) if not seen[c] then seen[c] = true; r[#r + 1] = c end end
  for _, c in ipairs(redis.call('HKEYS', P .. ':chans')) do add(c) end
  for _, n in ipairs(nodes) do for _, c in ipairs(redis.call('HKEYS', P .. ':pa:' .. n)) do add(c) end end
  return r
end
local r = {}
for i = 3, #ARGV do
  local n = redis.call('HLEN', P .. ':ch:' .. ARGV[i])
  for _, node in ipairs(nodes) do n = n + (tonumber(redis.call('HGET', P .. ':pa:' .. node, ARGV[i])) or 0) end
  r[#r + 1] = n
end
return r
"#
);


/// A presence question asked of the whole cluster.
#[derive(Debug)]
pub enum Query {
    Online,
    Count,
    Presence,
    /// `PUBSUB CHANNELS [pattern]`.
    Channels(Option<String>),
    /// `PUBSUB NUMSUB ch...`: the channels, to pair with the counts.
    NumSub(Vec<String>),
}

/// This node's presence share and what the heartbeat last said of the cluster.
#[derive(Default)]
pub struct Share {
    /// This turn's changes, sent before the loop sleeps.
    ops: Vec<Vec<u8>>,
    /// The whole share was sent since the link came up: changes may follow.
    resynced: bool,
    /// The epoch Redis had when this node last linked.
    epoch: Option<Vec<u8>>,
    /// This process has sent its share before (a first share keeps its predecessor's sessions).
    sent_once: bool,
    /// When to send the whole share again, removing the predecessor's sessions that did not
    /// come back within the grace.
    cleanup_at: Option<Instant>,
    /// Channels whose anonymous polls or subscribed backends changed since they were last sent.
    pub(crate) dirty: HashSet<Box<str>>,
    /// When those counts go next: once a second, not every turn (they only feed NUMSUB and
    /// CHANNELS, and a fan-out changes them in every turn).
    counts_due: Option<Instant>,
    /// The heartbeat's round trip.
    pub rtt: Option<Duration>,
    /// Nodes alive, as Redis last said.
    pub alive: Vec<String>,
    /// Sessions online in the cluster, and a sample of them (for the admin page).
    pub online: i64,
    pub sample: Vec<(String, Option<String>)>,
    /// Nodes whose share this node removed.
    pub reaped: u64,
}

impl Share {
    pub fn events_channel(&self, prefix: &str) -> String {
        format!("{prefix}:presence")
    }

    pub fn is_events_channel(&self, chan: &str, prefix: &str) -> bool {
        chan.len() == prefix.len() + 9 && chan.starts_with(prefix) && chan.ends_with(":presence")
    }

    /// The link went down: changes from now on are covered by the whole share sent on reconnect.
    pub fn link_lost(&mut self) {
        self.ops.clear();
        self.dirty.clear();
        self.resynced = false;
    }
}

/// An event as a change of this node's share.
fn op(e: &Event) -> Vec<u8> {
    match e {
        Event::Online { sid, user } => format!("o\n{sid}\n{}", user.as_deref().map_or(String::new(), |u| format!("={u}"))),
        Event::Offline { sid } => format!("x\n{sid}"),
        Event::Join { sid, channel } => format!("j\n{sid}\n{channel}"),
        Event::Leave { sid, channel } => format!("l\n{sid}\n{channel}"),
    }
    .into_bytes()
}

fn user_of(v: &[u8]) -> Option<String> {
    v.strip_prefix(b"=").map(|u| String::from_utf8_lossy(u).into_owned())
}

/// Sessions and user ids as `ONLINE` answers them, sorted by session id.
fn sessions_reply(mut list: Vec<(String, Option<String>)>) -> Vec<u8> {
    list.sort();
    let mut o = Vec::new();
    resp::array_len(&mut o, list.len() * 2);
    for (sid, user) in list {
        resp::bulk(&mut o, sid.as_bytes());
        resp::bulk(&mut o, user.as_deref().unwrap_or("").as_bytes());
    }
    o
}

fn pairs(items: &[Value]) -> Vec<(String, Option<String>)> {
    items
        .chunks(2)
        .filter_map(|p| match p {
            [k, v] => Some((String::from_utf8_lossy(k.bytes()?).into_owned(), v.bytes().and_then(user_of))),
            _ => None,
        })
        .collect()
}

impl Server {
    /// This turn's presence events: in a cluster they go to Redis (which announces them once for
    /// the cluster), not straight to this node's backends.
    pub(crate) fn cluster_presence_events(&mut self, events: &[Event]) {
        let Some(c) = self.cluster.as_mut() else { return };
        if c.presence.resynced {
            c.presence.ops.extend(events.iter().map(op));
        }
    }

    /// Marks a channel whose anonymous polls or subscribed backends changed.
    pub(crate) fn cluster_presence_dirty(&mut self, channel: &str) {
        if let Some(c) = self.cluster.as_mut() {
            if c.presence.resynced && !channel.starts_with('@') && !channel.starts_with(crate::hub::SESSION_PREFIX) {
                c.presence.dirty.insert(channel.into());
            }
        }
    }

    /// What this node holds on `channel` besides sessions: anonymous polls and backends.
    fn anonymous_on(&self, channel: &str) -> usize {
        self.presence.anonymous(channel) + self.backend_subs.get(channel).map_or(0, |b| b.len())
    }

    /// Sends the turn's changes of this node's share, one script call per `OPS_PER_CALL`: the
    /// sessions' events every turn, the changed counts of anonymous polls once a second.
    pub(crate) fn cluster_presence_flush(&mut self) {
        let now = self.now;
        let Some(c) = self.cluster.as_mut() else { return };
        if !c.up || !c.presence.resynced {
            return;
        }
        if c.presence.counts_due.is_none_or(|at| at <= now) {
            c.presence.counts_due = Some(now + Duration::from_secs(1));
            self.cluster_presence_counts();
        }
        self.cluster_presence_send();
    }

    /// Queues the changed counts of anonymous polls and subscribed backends.
    fn cluster_presence_counts(&mut self) {
        let Some(c) = self.cluster.as_mut() else { return };
        let mut dirty: Vec<Box<str>> = c.presence.dirty.drain().collect();
        if let Some(set) = self.presence.anon_changed.as_mut() {
            dirty.extend(set.drain());
        }
        dirty.sort_unstable();
        dirty.dedup();
        for ch in dirty {
            let n = self.anonymous_on(&ch);
            self.cluster().presence.ops.push(format!("a\n{ch}\n{n}").into_bytes());
        }
    }

    /// Sends the queued changes.
    fn cluster_presence_send(&mut self) {
        let now = self.now;
        let c = self.cluster();
        if c.presence.ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut c.presence.ops);
        let (sha, prefix, node) = (c.shas[crate::cluster::SHARE].clone(), c.cfg.prefix.clone(), c.cfg.node.clone());
        for chunk in ops.chunks(OPS_PER_CALL) {
            let mut args: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"0", prefix.as_bytes(), node.as_bytes()];
            args.extend(chunk.iter().map(Vec::as_slice));
            c.send(&args, Waiting::Share, now);
        }
    }

    /// The epoch on connect: the node sends its whole share, quietly when Redis lost its data.
    pub(crate) fn cluster_epoch(&mut self, v: Value) {
        let got = v.bytes().map(<[u8]>::to_vec);
        let c = self.cluster();
        let lost = c.presence.epoch.is_some() && c.presence.epoch != got;
        if lost {
            crate::warn!("cluster: Redis lost its data (new epoch): this node's sessions and presence are written back");
        }
        c.presence.epoch = got;
        self.cluster_resync(lost);
    }

    /// Sends this node's whole share.
    fn cluster_resync(&mut self, quiet: bool) {
        let mut ops: Vec<Vec<u8>> = self.presence.snapshot().iter().map(op).collect();
        let mut chans: Vec<String> = self.presence.anonymous_channels();
        chans.extend(self.backend_subs.keys().map(|k| k.to_string()));
        chans.sort();
        chans.dedup();
        for ch in chans.iter().filter(|c| !c.starts_with('@') && *c != crate::server::PRESENCE_CHANNEL) {
            let n = self.anonymous_on(ch);
            if n > 0 {
                ops.push(format!("a\n{ch}\n{n}").into_bytes());
            }
        }
        let now = self.now;
        let grace = self.cfg.presence.grace;
        let c = self.cluster();
        // A process's first share leaves its predecessor's sessions (same node name, killed) in
        // place: they go only if they did not come back within the grace, as on any node's death.
        let keep = !c.presence.sent_once;
        if keep {
            c.presence.cleanup_at = Some(now + grace + NODE_TIMEOUT);
        }
        c.presence.sent_once = true;
        c.presence.resynced = true;
        c.presence.ops.clear();
        c.presence.dirty.clear();
        if let Some(set) = self.presence.anon_changed.as_mut() {
            set.clear();
        }
        let c = self.cluster();
        let (sha, prefix, node) = (c.shas[crate::cluster::RESYNC].clone(), c.cfg.prefix.clone(), c.cfg.node.clone());
        let mut args: Vec<&[u8]> =
            vec![b"EVALSHA", sha.as_bytes(), b"0", prefix.as_bytes(), node.as_bytes(), if quiet { b"1" } else { b"0" }, if keep { b"1" } else { b"0" }];
        args.extend(ops.iter().map(Vec::as_slice));
        c.send(&args, Waiting::Share, now);
    }

    /// Once a second: the heartbeat (and the removal of silent nodes), and the cleanup share.
    pub(crate) fn cluster_presence_tick(&mut self) {
        let now = self.now;
        let grace = self.cfg.presence.grace;
        let Some(c) = self.cluster.as_mut() else { return };
        if !c.up || !c.presence.resynced {
            return;
        }
        if c.presence.cleanup_at.is_some_and(|at| at <= now) {
            c.presence.cleanup_at = None;
            self.cluster_resync(false);
        }
        let c = self.cluster();
        // Only a node linked for longer than the timeout judges others silent: after an outage of
        // Redis every heartbeat is old, and nobody must be removed for it.
        let judge = c.up_since.is_some_and(|at| now.duration_since(at) >= NODE_TIMEOUT + grace);
        let age = if judge { (NODE_TIMEOUT + grace).as_millis().to_string() } else { "0".into() };
        let (sha, prefix, node) = (c.shas[crate::cluster::TICK].clone(), c.cfg.prefix.clone(), c.cfg.node.clone());
        c.send(&[b"EVALSHA", sha.as_bytes(), b"0", prefix.as_bytes(), node.as_bytes(), age.as_bytes()], Waiting::Tick, now);
    }

    /// The heartbeat's answer.
    pub(crate) fn cluster_ticked(&mut self, v: Value) {
        let Value::Array(items) = v else {
            let now = self.now;
            return self.cluster().malformed("an answer to the heartbeat of another shape", now);
        };
        let list = |v: Option<&Value>| -> Vec<String> {
            match v {
                Some(Value::Array(x)) => x.iter().filter_map(|n| n.bytes()).map(|b| String::from_utf8_lossy(b).into_owned()).collect(),
                _ => Vec::new(),
            }
        };
        let online = match items.first() {
            Some(Value::Int(n)) => *n,
            _ => 0,
        };
        let alive = list(items.get(1));
        let reaped = list(items.get(2));
        let sample = match items.get(3) {
            Some(Value::Array(x)) => pairs(x).into_iter().take(SAMPLE).collect(),
            _ => Vec::new(),
        };
        for n in &reaped {
            crate::warn!("cluster: node {n} not heard from for {} s: its sessions are no longer counted", (NODE_TIMEOUT + self.cfg.presence.grace).as_secs());
            self.forget_instance_rows(n);
            self.mercure_node_gone(n);
        }
        let c = self.cluster();
        c.presence.online = online;
        c.presence.alive = alive;
        c.presence.sample = sample;
        c.presence.reaped += reaped.len() as u64;
    }

    /// `ONLINE [COUNT]`, `PRESENCE ch`, `PUBSUB ...` for the whole cluster; Some(error) when the
    /// question is not one (the reply then comes at once).
    pub(crate) fn cluster_query(&mut self, a: Asker, cmd: &str, args: &[&[u8]]) -> Option<String> {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let (q, kind, extra): (Query, &[u8], Vec<String>) = match cmd {
            "ONLINE" if args.is_empty() => (Query::Online, b"online", vec![]),
            "ONLINE" => (Query::Count, b"count", vec![]),
            "PRESENCE" => (Query::Presence, b"presence", vec![text(args[0])]),
            _ => {
                let sub = text(args[0]).to_ascii_uppercase();
                match (sub.as_str(), args.len()) {
                    ("CHANNELS", 1 | 2) => (Query::Channels(args.get(1).map(|p| text(p))), b"channels", vec![]),
                    ("NUMSUB", _) => {
                        let chans: Vec<String> = args[1..].iter().map(|c| text(c)).collect();
                        (Query::NumSub(chans.clone()), b"numsub", chans)
                    }
                    ("NUMPAT", 1) => {
                        let mut o = Vec::new();
                        resp::integer(&mut o, 0);
                        self.cluster_queue_or_send(a, o);
                        return None;
                    }
                    _ => return Some(format!("ERR unknown subcommand or wrong number of arguments for 'pubsub|{}'", sub.to_ascii_lowercase())),
                }
            }
        };
        if self.cluster_refuse_if_down(a) {
            return None;
        }
        let now = self.now;
        let c = self.cluster();
        let (sha, prefix) = (c.shas[crate::cluster::QUERY].clone(), c.cfg.prefix.clone());
        let mut argv: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"0", prefix.as_bytes(), kind];
        argv.extend(extra.iter().map(|e| e.as_bytes()));
        c.send(&argv, Waiting::Query(a, q), now);
        None
    }

    /// A reply made now for `a`: behind its earlier ones if any wait for Redis, else at once.
    fn cluster_queue_or_send(&mut self, a: Asker, bytes: Vec<u8>) {
        if self.conns.get(a.token).is_some_and(|c| c.redis_wait > 0) {
            self.cluster_queue_reply(a.token, bytes);
        } else if let Some(c) = self.conns.get_mut(a.token) {
            c.out.append(|o| o.extend_from_slice(&bytes));
        }
    }

    /// Redis answered a presence question.
    pub(crate) fn cluster_queried(&mut self, a: Asker, q: Query, v: Value) {
        let mut o = Vec::new();
        match (q, v) {
            (Query::Online | Query::Presence, Value::Array(items)) => o = sessions_reply(pairs(&items)),
            (Query::Count, Value::Int(n)) => resp::integer(&mut o, n),
            (Query::Channels(pattern), Value::Array(items)) => {
                let mut all: Vec<String> = items.iter().filter_map(|c| c.bytes()).map(|b| String::from_utf8_lossy(b).into_owned()).collect();
                all.retain(|c| pattern.as_deref().is_none_or(|p| crate::auth::pattern_match(p, c)));
                all.sort();
                resp::array_len(&mut o, all.len());
                for c in all {
                    resp::bulk(&mut o, c.as_bytes());
                }
            }
            (Query::NumSub(chans), Value::Array(items)) if items.len() == chans.len() => {
                resp::array_len(&mut o, chans.len() * 2);
                for (c, n) in chans.iter().zip(&items) {
                    resp::bulk(&mut o, c.as_bytes());
                    resp::integer(&mut o, if let Value::Int(n) = n { *n } else { 0 });
                }
            }
            _ => resp::error(&mut o, "ERR Redis answered the presence query with something else"),
        }
        self.cluster_answer(a, Deferred::Resp(o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_share_changes() {
        let e = |x: Event| String::from_utf8(op(&x)).unwrap();
        assert_eq!(e(Event::Online { sid: "s".into(), user: Some("4 2".into()) }), "o\ns\n=4 2");
        assert_eq!(e(Event::Online { sid: "s".into(), user: None }), "o\ns\n");
        assert_eq!(e(Event::Offline { sid: "s".into() }), "x\ns");
        assert_eq!(e(Event::Join { sid: "s".into(), channel: "c".into() }), "j\ns\nc");
        assert_eq!(e(Event::Leave { sid: "s".into(), channel: "c".into() }), "l\ns\nc");
    }

    #[test]
    fn the_events_channel_is_recognised_exactly() {
        let s = Share::default();
        assert_eq!(s.events_channel("comet"), "comet:presence");
        assert!(s.is_events_channel("comet:presence", "comet"));
        for other in ["comet:presencex", "comet:m:presence", "other:presence", "comet:ctl"] {
            assert!(!s.is_events_channel(other, "comet"), "{other}");
        }
    }
}
