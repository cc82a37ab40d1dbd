//! The channel hub: every channel's message buffer and held polls, and the open sessions. Pure
//! state: no sockets, no clock of its own (the loop passes `now`), so it is tested alone. The loop
//! asks it what a poll gets (a buffered message, or to wait) and, on publish, which held polls to
//! answer; the hub answers with ids (hold ids and slab tokens), never touching a connection.
//!
//! A message is kept as published (`message.rs`), not in any wire format, and shared by `Arc`
//! with every buffer and subscriber it reaches; each transport encodes it at most once. Buffers expire in publish order: since every message lives the same
//! `message_ttl_secs`, one global FIFO of (expiry, channel) finds the expired ones without
//! scanning channels.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A message id: the second it was published and its rank within that second on its channel.
/// Ordered by time then tag; strictly increasing per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgId {
    /// Unix second of publication.
    pub time: u64,
    /// Rank within that second, from 0.
    pub tag: u32,
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.time, self.tag)
    }
}

pub use crate::message::Message;

/// A poll waiting on a channel: its hold id (never reused) and the connection's slab token.
pub type Waiters = HashMap<u64, usize, std::hash::BuildHasherDefault<IdHasher>>;

/// Hashes hold ids: they are unique counters the daemon made, not peer input, so a multiply by
/// the golden ratio spreads them well at a fraction of SipHash's cost (one per held poll).
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Where a poll starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// The oldest buffered message.
    Oldest,
    /// Only messages published from now on.
    Newest,
    /// The first message after this id.
    After(MsgId),
}

/// What a poll gets.
#[derive(Debug)]
pub enum Poll {
    /// A buffered message, at once; `true` when messages after the cursor were dropped from the
    /// buffer before this one (the client missed some).
    Message(Arc<Message>, bool),
    /// Nothing yet: the poll is now a waiter on the channel, whose name is shared here so the
    /// held poll need not keep a copy.
    Held(Arc<str>),
}

/// What `info` reports about a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Buffered messages.
    pub messages: usize,
    /// Held polls.
    pub subscribers: usize,
    /// Seconds since a poll last asked, None if never.
    pub last_requested: Option<u64>,
    /// Id of the newest buffered message.
    pub last_id: Option<MsgId>,
}

/// An open session (logged in by the backend).
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The application's user id, if the backend gave one.
    pub user: Option<String>,
    /// Shared channels the backend joined it to: their messages are copied into its private
    /// channel.
    pub joined: std::collections::HashSet<Box<str>>,
}

#[derive(Default)]
struct Channel {
    /// Its name: the hub's map key, shared with the expiry queue, drops and held polls.
    name: Arc<str>,
    /// Buffered messages, oldest first, ids increasing.
    messages: VecDeque<Arc<Message>>,
    /// Id of the last message ever published here, kept after the buffer empties so ids stay
    /// increasing while the channel lives.
    last_id: Option<MsgId>,
    /// Held polls.
    waiters: Waiters,
    /// When a poll last asked.
    last_requested: Option<u64>,
    /// Id of the newest message dropped from the buffer (length or age limit).
    dropped: Option<MsgId>,
    /// Expiry time of its newest entry in the expiry queue: a channel queues one entry per
    /// second it publishes in, not one per message.
    expiry_queued: u64,
}

impl Channel {
    fn is_idle(&self) -> bool {
        self.messages.is_empty() && self.waiters.is_empty()
    }
}

/// Counters the hub keeps for `INFO`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Messages published since start.
    pub published: u64,
    /// Messages handed to a poll (held or immediate) since start.
    pub delivered: u64,
}

/// The hub.
pub struct Hub {
    /// Channels by name.
    channels: HashMap<Arc<str>, Channel>,
    /// (expiry time, channel) for every buffered message, in publish order.
    expiry: VecDeque<(u64, Arc<str>)>,
    /// Open sessions by id.
    sessions: HashMap<Box<str>, Session>,
    /// Channel -> sessions joined to it (`JOIN`).
    joins: HashMap<Box<str>, std::collections::HashSet<Box<str>>>,
    /// Kicked sessions (refused until opened again), with when they were kicked.
    kicked: HashMap<Box<str>, u64>,
    /// Kick order, to forget kicks after `KICK_MEMORY_SECS`.
    kick_order: VecDeque<(u64, Box<str>)>,
    /// Messages kept per channel.
    buffer_length: usize,
    /// Seconds a message is kept.
    ttl: u64,
    /// Held polls, all channels.
    held: usize,
    /// Buffered messages, all channels.
    buffered: usize,
    /// Counters.
    pub stats: Stats,
    /// The second the daemon started.
    start_second: u64,
    /// Whether drops are recorded for the store.
    track_drops: bool,
    /// Messages that left buffers since the store last took them: (channel, newest id dropped).
    pub drops: Vec<(Arc<str>, MsgId)>,
}

/// How long a kicked session id stays refused when the backend does not open it again.
pub const KICK_MEMORY_SECS: u64 = 86_400;

/// Prefix of private channel names.
pub const SESSION_PREFIX: &str = "session:";

/// Whether `s` is a valid channel id: 1 to `max` bytes of `A-Z a-z 0-9 _ - . : ~ ,`. The set
/// keeps ids safe in URLs, logs and RESP replies; the comma is there because PHP session ids
/// (`session.sid_bits_per_character = 6`) use it. `@` is left out so the `@me` alias can never
/// name a real channel.
pub fn valid_channel(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:~,".contains(&b))
}

/// Whether `s` can be a session id: a valid channel id fragment of at most 120 bytes.
pub fn valid_session(s: &str) -> bool {
    valid_channel(s, 120)
}

/// Makes channel `name`, which keeps its map key: the expiry queue, drops and held polls share it.
fn add_channel<'a>(channels: &'a mut HashMap<Arc<str>, Channel>, name: &str) -> &'a mut Channel {
    let key: Arc<str> = Arc::from(name);
    channels.entry(key.clone()).or_insert_with(|| Channel { name: key, ..Channel::default() })
}

impl Hub {
    /// An empty hub with the buffer limits.
    pub fn new(buffer_length: usize, ttl: u64) -> Hub {
        Hub {
            channels: HashMap::new(),
            expiry: VecDeque::new(),
            sessions: HashMap::new(),
            joins: HashMap::new(),
            kicked: HashMap::new(),
            kick_order: VecDeque::new(),
            buffer_length,
            ttl,
            held: 0,
            buffered: 0,
            stats: Stats::default(),
            start_second: u64::MAX,
            track_drops: false,
            drops: Vec::new(),
        }
    }

    /// A poll on `name` from `cursor`: a buffered message, or held as waiter `hold` (on
    /// connection `token`) until `publish` or `cancel`.
    pub fn poll(&mut self, name: &str, cursor: Cursor, hold: u64, token: usize, now: u64) -> Poll {
        self.expire(now);
        let ch = match self.channels.get_mut(name) {
            Some(ch) => ch,
            None => add_channel(&mut self.channels, name),
        };
        ch.last_requested = Some(now);
        let (next, skipped) = match cursor {
            Cursor::Oldest => (ch.messages.front(), false),
            Cursor::Newest => (None, false),
            Cursor::After(id) => {
                let mut i = ch.messages.partition_point(|m| m.id <= id);
                // A cursor in the second the daemon started that names no message of this run
                // comes from the previous run, whose ids this run reuses in that second: the
                // client has seen none of this run's messages of that second.
                if id.time == self.start_second && ch.messages.get(i.wrapping_sub(1)).is_none_or(|m| m.id != id) {
                    i = ch.messages.partition_point(|m| m.id.time < id.time);
                }
                (ch.messages.get(i), i == 0 && ch.dropped.is_some_and(|d| d > id))
            }
        };
        if let Some(m) = next {
            self.stats.delivered += 1;
            return Poll::Message(m.clone(), skipped);
        }
        ch.waiters.insert(hold, token);
        self.held += 1;
        Poll::Held(ch.name.clone())
    }

    /// Tells the hub the second the daemon started (see `poll`).
    pub fn set_start_second(&mut self, t: u64) {
        self.start_second = t;
    }

    /// Records drops for the store from now on.
    pub fn track_drops(&mut self) {
        self.track_drops = true;
    }

    /// Puts back a stored message at start (ids as they were; oldest first per channel). Too
    /// old messages are left out and the length cap applies as for a publish.
    pub fn restore(&mut self, name: &str, id: MsgId, content_type: &str, body: &[u8], now: u64) {
        if id.time.saturating_add(self.ttl) <= now {
            return;
        }
        let ch = match self.channels.get_mut(name) {
            Some(ch) => ch,
            None => add_channel(&mut self.channels, name),
        };
        if ch.last_id.is_some_and(|l| l >= id) {
            return;
        }
        ch.last_id = Some(id);
        ch.messages.push_back(Arc::new(Message::new(id, name, content_type, body)));
        self.buffered += 1;
        if ch.messages.len() > self.buffer_length {
            if let Some(old) = ch.messages.pop_front() {
                ch.dropped = Some(old.id);
            }
            self.buffered -= 1;
        }
        // Expiry runs from the message's own time, not from the restart.
        let at = id.time.saturating_add(self.ttl);
        ch.expiry_queued = ch.expiry_queued.max(at);
        self.expiry.push_back((at, ch.name.clone()));
    }

    /// Restores what a channel had dropped before a restart (for the skipped-messages header).
    pub fn restore_dropped(&mut self, name: &str, id: MsgId) {
        if let Some(ch) = self.channels.get_mut(name) {
            ch.dropped = ch.dropped.max(Some(id));
            if ch.last_id < Some(id) {
                ch.last_id = Some(id);
            }
        }
    }

    /// Up to `max` buffered messages after `id` (for a batch answer to a client that is behind).
    pub fn after(&self, name: &str, id: MsgId, max: usize) -> Vec<Arc<Message>> {
        let Some(ch) = self.channels.get(name) else { return Vec::new() };
        let i = ch.messages.partition_point(|m| m.id <= id);
        ch.messages.range(i..).take(max).cloned().collect()
    }

    /// Counts messages handed out in a batch beyond the first.
    pub fn count_delivered(&mut self, n: usize) {
        self.stats.delivered += n as u64;
    }

    /// Puts streams answered by a publish back among `name`'s waiters: a stream, unlike a poll,
    /// waits again for the next message under the same hold id.
    pub fn rewait(&mut self, name: &str, streams: impl Iterator<Item = (u64, usize)>) {
        let Some(ch) = self.channels.get_mut(name) else { return };
        let before = ch.waiters.len();
        ch.waiters.extend(streams);
        self.held += ch.waiters.len() - before;
    }

    /// Removes waiter `hold` (timed out, or its connection went away).
    pub fn cancel(&mut self, name: &str, hold: u64) {
        if let Some(ch) = self.channels.get_mut(name) {
            if ch.waiters.remove(&hold).is_some() {
                self.held -= 1;
            }
            if ch.is_idle() {
                self.channels.remove(name);
            }
        }
    }

    /// Publishes a message: buffers it and returns it with the waiters to answer (each now
    /// removed from the channel).
    pub fn publish(&mut self, name: &str, content_type: &str, body: &[u8], now: u64) -> (Arc<Message>, Waiters) {
        self.publish_from(name, name, content_type, body, now)
    }

    /// Publishes on `name` a message first published on `origin` (a copy for a joined session's
    /// private channel; the copy's `X-Comet-Channel` header names the origin).
    pub fn publish_from(&mut self, name: &str, origin: &str, content_type: &str, body: &[u8], now: u64) -> (Arc<Message>, Waiters) {
        self.expire(now);
        // One lookup when the channel exists (the common case).
        let ch = match self.channels.get_mut(name) {
            Some(ch) => ch,
            None => add_channel(&mut self.channels, name),
        };
        let id = match ch.last_id {
            // Same second, or a clock that stepped back: keep the time, raise the tag.
            Some(last) if last.time >= now => match last.tag.checked_add(1) {
                Some(tag) => MsgId { time: last.time, tag },
                None => MsgId { time: last.time + 1, tag: 0 },
            },
            _ => MsgId { time: now, tag: 0 },
        };
        self.append(name, id, origin, content_type, body, now.saturating_add(self.ttl))
    }

    /// Buffers a message whose id was given elsewhere (a cluster's Redis), as `publish_from`
    /// does with its own: None when the channel already has that id or a later one (a copy that
    /// arrived twice, by subscription and by fetch) or when it is already older than the ttl.
    /// Expiry runs from the id's own time, the same on every node.
    pub fn publish_at(&mut self, name: &str, id: MsgId, origin: &str, content_type: &str, body: &[u8], now: u64) -> Option<(Arc<Message>, Waiters)> {
        self.expire(now);
        let at = id.time.saturating_add(self.ttl);
        if at <= now || self.channels.get(name).is_some_and(|ch| ch.last_id.is_some_and(|l| l >= id)) {
            return None;
        }
        Some(self.append(name, id, origin, content_type, body, at))
    }

    /// Appends message `id` to channel `name` (made if needed), to expire at `at`; returns it
    /// with the waiters to answer (each now removed from the channel).
    fn append(&mut self, name: &str, id: MsgId, origin: &str, content_type: &str, body: &[u8], at: u64) -> (Arc<Message>, Waiters) {
        let ch = match self.channels.get_mut(name) {
            Some(ch) => ch,
            None => add_channel(&mut self.channels, name),
        };
        ch.last_id = Some(id);
        let msg = Arc::new(Message::new(id, origin, content_type, body));
        ch.messages.push_back(msg.clone());
        self.buffered += 1;
        if ch.messages.len() > self.buffer_length {
            if let Some(old) = ch.messages.pop_front() {
                ch.dropped = Some(old.id);
                if self.track_drops {
                    let key = ch.name.clone();
                    self.drops.push((key, old.id));
                }
            }
            self.buffered -= 1;
        }
        let waiters = std::mem::take(&mut ch.waiters);
        // Messages of one second expire together: one queue entry covers them all, and a busy
        // channel costs the queue one entry a second instead of one per message.
        if at > ch.expiry_queued {
            ch.expiry_queued = at;
            let key = ch.name.clone();
            self.expiry.push_back((at, key));
            if self.expiry.len() > 2 * self.buffered + 1024 {
                self.compact_expiry();
            }
        }
        self.held -= waiters.len();
        self.stats.published += 1;
        self.stats.delivered += waiters.len() as u64;
        (msg, waiters)
    }

    /// Records that messages up to `id` left the channel's buffer elsewhere (a cluster's Redis
    /// trimmed them), for the skipped-messages header; makes the channel if needed.
    pub fn mark_dropped(&mut self, name: &str, id: MsgId) {
        let ch = match self.channels.get_mut(name) {
            Some(ch) => ch,
            None => add_channel(&mut self.channels, name),
        };
        ch.dropped = ch.dropped.max(Some(id));
    }

    /// Whether polls or streams wait on `name`.
    pub fn has_waiters(&self, name: &str) -> bool {
        self.channels.get(name).is_some_and(|c| !c.waiters.is_empty())
    }

    /// Takes back `n` deliveries counted by a publish that were not made (a cluster's waiter
    /// whose cursor was already past the message waits on).
    pub fn uncount_delivered(&mut self, n: usize) {
        self.stats.delivered = self.stats.delivered.saturating_sub(n as u64);
    }

    /// Deletes a channel; returns its waiters (to be answered `410`), None if it did not exist.
    pub fn delete(&mut self, name: &str) -> Option<Waiters> {
        let ch = self.channels.remove(name)?;
        self.held -= ch.waiters.len();
        self.buffered -= ch.messages.len();
        Some(ch.waiters)
    }

    /// Drops expired messages and the channels they leave empty. Costs only the expired entries.
    pub fn expire(&mut self, now: u64) {
        while let Some((at, _)) = self.expiry.front() {
            if *at > now {
                break;
            }
            let Some((_, name)) = self.expiry.pop_front() else { break };
            let Some(ch) = self.channels.get_mut(&name) else { continue };
            // The entry may be stale (message already pushed out by the length cap, or the
            // channel deleted and made anew): drop only messages that are really due.
            let limit = now.saturating_sub(self.ttl);
            while ch.messages.front().is_some_and(|m| m.id.time <= limit) {
                if let Some(old) = ch.messages.pop_front() {
                    ch.dropped = Some(old.id);
                    if self.track_drops {
                        self.drops.push((name.clone(), old.id));
                    }
                }
                self.buffered -= 1;
            }
            if ch.is_idle() {
                self.channels.remove(&name);
            }
        }
    }

    /// Drops expiry entries of messages already gone (pushed out by the length cap, or their
    /// channel deleted), so the queue stays proportional to what is buffered even when a busy
    /// channel publishes far more than it keeps. Amortised: runs once the queue doubles.
    fn compact_expiry(&mut self) {
        // Keep, per channel, as many of the newest entries as it has messages; older ones are stale.
        let mut left: HashMap<Arc<str>, usize> = HashMap::new();
        let mut kept = VecDeque::with_capacity(self.buffered);
        for (at, name) in self.expiry.drain(..).rev() {
            let n = left.entry(name.clone()).or_insert_with(|| self.channels.get(&name).map_or(0, |c| c.messages.len()));
            if *n > 0 {
                *n -= 1;
                kept.push_front((at, name));
            }
        }
        self.expiry = kept;
    }

    /// Facts about one channel.
    pub fn info(&self, name: &str, now: u64) -> Option<ChannelInfo> {
        let ch = self.channels.get(name)?;
        Some(ChannelInfo {
            messages: ch.messages.len(),
            subscribers: ch.waiters.len(),
            last_requested: ch.last_requested.map(|t| now.saturating_sub(t)),
            last_id: ch.messages.back().map(|m| m.id),
        })
    }

    /// Opens (or re-opens, updating the user) a session; a kicked session is allowed again.
    pub fn open_session(&mut self, sid: &str, user: Option<String>) {
        self.kicked.remove(sid);
        match self.sessions.get_mut(sid) {
            Some(s) => s.user = user,
            None => {
                self.sessions.insert(sid.into(), Session { user, joined: Default::default() });
            }
        }
    }

    /// Closes a session: drops its joins and deletes its private channel. None if it was not
    /// open, else the private channel's waiters (to be answered `410`).
    pub fn close_session(&mut self, sid: &str) -> Option<Waiters> {
        let s = self.sessions.remove(sid)?;
        for ch in s.joined {
            self.unjoin_index(&ch, sid);
        }
        Some(self.delete(&format!("{SESSION_PREFIX}{sid}")).unwrap_or_default())
    }

    /// Closes a session and refuses it until the backend opens it again. Kicks are remembered
    /// for `KICK_MEMORY_SECS` (a session id is not reused in that time).
    pub fn kick(&mut self, sid: &str, now: u64) -> Option<Waiters> {
        while self.kick_order.front().is_some_and(|(at, _)| at + KICK_MEMORY_SECS <= now) {
            if let Some((at, s)) = self.kick_order.pop_front() {
                if self.kicked.get(&s) == Some(&at) {
                    self.kicked.remove(&s);
                }
            }
        }
        self.kicked.insert(sid.into(), now);
        self.kick_order.push_back((now, sid.into()));
        self.close_session(sid)
    }

    /// Whether a session was kicked and not opened since.
    pub fn is_kicked(&self, sid: &str) -> bool {
        self.kicked.contains_key(sid)
    }

    /// Joins an open session to a shared channel: its messages are copied to the session's
    /// private channel. Err if the session is not open; Ok(false) if already joined.
    pub fn join(&mut self, sid: &str, channel: &str) -> Result<bool, ()> {
        let s = self.sessions.get_mut(sid).ok_or(())?;
        if !s.joined.insert(channel.into()) {
            return Ok(false);
        }
        self.joins.entry(channel.into()).or_default().insert(sid.into());
        Ok(true)
    }

    /// Undoes `join`; true if it was joined.
    pub fn leave(&mut self, sid: &str, channel: &str) -> bool {
        let Some(s) = self.sessions.get_mut(sid) else { return false };
        if !s.joined.remove(channel) {
            return false;
        }
        self.unjoin_index(channel, sid);
        true
    }

    fn unjoin_index(&mut self, channel: &str, sid: &str) {
        if let Some(set) = self.joins.get_mut(channel) {
            set.remove(sid);
            if set.is_empty() {
                self.joins.remove(channel);
            }
        }
    }

    /// Sessions joined to a channel (whose private channels get its messages).
    pub fn joined_to(&self, channel: &str) -> Vec<Box<str>> {
        self.joins.get(channel).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Every open session with its user id.
    pub fn sessions(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.sessions.iter().map(|(sid, s)| (&**sid, s.user.as_deref()))
    }

    /// The open session `sid`.
    pub fn session(&self, sid: &str) -> Option<&Session> {
        self.sessions.get(sid)
    }

    /// Channels alive (with messages or held polls).
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Held polls, all channels.
    pub fn held_count(&self) -> usize {
        self.held
    }

    /// Buffered messages, all channels.
    pub fn buffered_count(&self) -> usize {
        self.buffered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(m: &Message) -> &[u8] {
        &m.body
    }

    fn got(p: Poll) -> Arc<Message> {
        match p {
            Poll::Message(m, _) => m,
            Poll::Held(_) => panic!("held, expected a message"),
        }
    }

    #[test]
    fn cursor_walks_buffer_without_gaps() {
        let mut hub = Hub::new(10, 60);
        for (i, now) in [100, 100, 100, 101, 105].iter().enumerate() {
            hub.publish("c", "text/plain", format!("m{i}").as_bytes(), *now);
        }
        let mut cursor = Cursor::Oldest;
        let mut seen = Vec::new();
        loop {
            match hub.poll("c", cursor, 1, 0, 106) {
                Poll::Message(m, _) => {
                    seen.push((m.id, String::from_utf8(body(&m).to_vec()).unwrap()));
                    cursor = Cursor::After(m.id);
                }
                Poll::Held(_) => break,
            }
        }
        let ids: Vec<_> = seen.iter().map(|(id, _)| (id.time, id.tag)).collect();
        assert_eq!(ids, [(100, 0), (100, 1), (100, 2), (101, 0), (105, 0)]);
        assert_eq!(seen[4].1, "m4");
        assert_eq!(hub.held_count(), 1);
        let (m, waiters) = hub.publish("c", "text/plain", b"m5", 107);
        assert_eq!(waiters.into_iter().collect::<Vec<_>>(), [(1, 0)]);
        assert_eq!(body(&m), b"m5");
        assert_eq!(hub.held_count(), 0);
    }

    #[test]
    fn ids_increase_when_clock_steps_back() {
        let mut hub = Hub::new(10, 60);
        let a = hub.publish("c", "t", b"", 200).0.id;
        let b = hub.publish("c", "t", b"", 150).0.id;
        assert!(b > a);
    }

    #[test]
    fn newest_waits_and_old_cursor_gets_oldest() {
        let mut hub = Hub::new(2, 60);
        for i in 0..5u8 {
            hub.publish("c", "t", &[b'0' + i], 100 + u64::from(i));
        }
        assert!(matches!(hub.poll("c", Cursor::Newest, 1, 0, 110), Poll::Held(_)));
        hub.cancel("c", 1);
        // Cursor fell out of the buffer: the oldest kept message, not nothing.
        assert_eq!(body(&got(hub.poll("c", Cursor::After(MsgId { time: 50, tag: 0 }), 2, 0, 110))), b"3");
        // Cursor ahead of everything (client from before a restart): wait.
        assert!(matches!(hub.poll("c", Cursor::After(MsgId { time: 999, tag: 0 }), 3, 0, 110), Poll::Held(_)));
    }

    #[test]
    fn expiry_and_idle_channels_disappear() {
        let mut hub = Hub::new(10, 60);
        hub.publish("a", "t", b"x", 100);
        hub.publish("b", "t", b"y", 130);
        hub.expire(160);
        assert_eq!(hub.channel_count(), 1);
        assert!(hub.info("a", 160).is_none());
        hub.expire(190);
        assert_eq!(hub.channel_count(), 0);
        assert_eq!(hub.buffered_count(), 0);
        // A held poll keeps an empty channel alive until cancelled.
        assert!(matches!(hub.poll("c", Cursor::Oldest, 7, 3, 200), Poll::Held(_)));
        assert_eq!(hub.info("c", 201).unwrap().subscribers, 1);
        hub.cancel("c", 7);
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn delete_and_sessions() {
        let mut hub = Hub::new(10, 60);
        assert!(matches!(hub.poll("c", Cursor::Oldest, 1, 9, 0), Poll::Held(_)));
        assert_eq!(hub.delete("c").unwrap().len(), 1);
        assert!(hub.delete("c").is_none());
        assert!(hub.close_session("s").is_none());
        hub.open_session("s", Some("42".into()));
        assert_eq!(hub.session("s").unwrap().user.as_deref(), Some("42"));
        assert!(matches!(hub.poll("session:s", Cursor::Oldest, 2, 9, 0), Poll::Held(_)));
        assert_eq!(hub.close_session("s").unwrap().len(), 1);
        assert!(hub.session("s").is_none());
        assert_eq!(hub.held_count(), 0);
    }

    #[test]
    fn expiry_queue_stays_bounded() {
        let mut hub = Hub::new(2, 60);
        for i in 0..100_000u64 {
            hub.publish("c", "t", b"x", 100 + i / 1000);
        }
        assert!(hub.expiry.len() <= 2 * hub.buffered_count() + 1025);
        hub.expire(100 + 100 + 60);
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn one_expiry_entry_per_channel_second() {
        let mut hub = Hub::new(100, 60);
        for _ in 0..50 {
            hub.publish("c", "t", b"x", 100);
        }
        hub.publish("c", "t", b"y", 101);
        hub.publish("d", "t", b"z", 101);
        assert_eq!(hub.expiry.len(), 3);
        // The single entry of second 100 takes all fifty of its messages, and only them.
        hub.expire(160);
        assert_eq!(hub.info("c", 160).unwrap().messages, 1);
        assert_eq!(hub.buffered_count(), 2);
        hub.expire(161);
        assert_eq!((hub.channel_count(), hub.buffered_count(), hub.expiry.len()), (0, 0, 0));
        // A channel made anew queues its own entry, even in the second the old one had.
        hub.publish("c", "t", b"w", 161);
        hub.expire(221);
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn joins_and_kicks() {
        let mut hub = Hub::new(10, 60);
        assert!(hub.join("s", "goods").is_err(), "not open");
        hub.open_session("s", None);
        assert_eq!(hub.join("s", "goods"), Ok(true));
        assert_eq!(hub.join("s", "goods"), Ok(false));
        assert_eq!(hub.joined_to("goods"), vec![Box::from("s")]);
        assert!(hub.leave("s", "goods"));
        assert!(hub.joined_to("goods").is_empty());
        hub.join("s", "goods").unwrap();
        assert!(hub.kick("s", 100).is_some());
        assert!(hub.is_kicked("s"));
        assert!(hub.joined_to("goods").is_empty());
        hub.open_session("s", None);
        assert!(!hub.is_kicked("s"));
        hub.kick("t", 100);
        hub.kick("u", 100 + KICK_MEMORY_SECS);
        assert!(!hub.is_kicked("t"), "forgotten after a day");
        assert!(hub.is_kicked("u"));
    }

    #[test]
    fn channel_ids() {
        for ok in ["goods", "session:abc", "a-b_c.d:e~f,g", "x"] {
            assert!(valid_channel(ok, 16), "{ok}");
        }
        for bad in ["", "a b", "@me", "a/b", "é", "a\0", "12345678901234567"] {
            assert!(!valid_channel(bad, 16), "{bad:?}");
        }
    }

    #[test]
    fn skipped_is_reported_and_restore_keeps_ids() {
        let mut hub = Hub::new(2, 60);
        hub.track_drops();
        for i in 0..4u8 {
            hub.publish("c", "t", &[b'0' + i], 100);
        }
        assert_eq!(hub.drops.len(), 2);
        let early = MsgId { time: 100, tag: 0 };
        match hub.poll("c", Cursor::After(early), 1, 0, 100) {
            Poll::Message(m, skipped) => assert!(skipped && m.id == MsgId { time: 100, tag: 2 }),
            Poll::Held(_) => panic!(),
        }
        match hub.poll("c", Cursor::After(MsgId { time: 100, tag: 1 }), 2, 0, 100) {
            Poll::Message(_, skipped) => assert!(!skipped, "nothing missed after the newest dropped"),
            Poll::Held(_) => panic!(),
        }
        let mut back = Hub::new(2, 60);
        back.restore("c", MsgId { time: 100, tag: 2 }, "t", b"2", 130);
        back.restore("c", MsgId { time: 100, tag: 3 }, "t", b"3", 130);
        back.restore_dropped("c", MsgId { time: 100, tag: 1 });
        back.restore("old", MsgId { time: 10, tag: 0 }, "t", b"x", 130);
        assert_eq!(back.channel_count(), 1, "expired messages are not restored");
        let next = back.publish("c", "t", b"4", 100).0.id;
        assert_eq!(next, MsgId { time: 100, tag: 4 }, "ids continue after a restart");
    }

    #[test]
    fn a_cursor_from_the_previous_run_in_the_start_second_misses_nothing() {
        let mut hub = Hub::new(10, 60);
        hub.set_start_second(100);
        // The previous run gave (100, 0..=5); this run starts in second 100 too.
        let old_cursor = MsgId { time: 100, tag: 5 };
        hub.publish("c", "t", b"new0", 100);
        hub.publish("c", "t", b"new1", 100);
        match hub.poll("c", Cursor::After(old_cursor), 1, 0, 100) {
            Poll::Message(m, _) => assert_eq!(body(&m), b"new0"),
            Poll::Held(_) => panic!("the old cursor must not hide this run's messages"),
        }
        // A cursor of this run walks on normally.
        match hub.poll("c", Cursor::After(MsgId { time: 100, tag: 0 }), 2, 0, 100) {
            Poll::Message(m, _) => assert_eq!(body(&m), b"new1"),
            Poll::Held(_) => panic!(),
        }
        assert!(matches!(hub.poll("c", Cursor::After(MsgId { time: 100, tag: 1 }), 3, 0, 100), Poll::Held(_)));
    }

    #[test]
    fn ids_given_elsewhere_are_kept_once_in_order() {
        let mut hub = Hub::new(2, 60);
        let id = |time, tag| MsgId { time, tag };
        assert!(matches!(hub.poll("c", Cursor::Oldest, 1, 4, 100), Poll::Held(_)));
        let (m, w) = hub.publish_at("c", id(100, 0), "c", "t", b"a", 100).unwrap();
        assert_eq!((m.id, w.len()), (id(100, 0), 1));
        assert!(hub.publish_at("c", id(100, 0), "c", "t", b"a", 100).is_none(), "a copy that came twice");
        assert!(hub.publish_at("c", id(99, 5), "c", "t", b"z", 100).is_none(), "older than the last");
        assert!(hub.publish_at("c", id(30, 0), "old", "t", b"z", 100).is_none(), "past the ttl");
        hub.publish_at("c", id(100, 1), "c", "t", b"b", 100).unwrap();
        hub.publish_at("c", id(101, 0), "c", "t", b"c", 101).unwrap();
        assert_eq!(hub.buffered_count(), 2);
        assert_eq!(body(&got(hub.poll("c", Cursor::After(id(100, 0)), 2, 4, 101))), b"b");
        hub.mark_dropped("d", id(90, 0));
        match hub.poll("d", Cursor::After(id(80, 0)), 3, 4, 101) {
            Poll::Held(_) => assert!(hub.has_waiters("d")),
            Poll::Message(..) => panic!(),
        }
        hub.expire(161);
        assert!(hub.info("c", 161).is_none(), "expired by the ids' own time");
    }

    #[test]
    fn buffer_length_caps() {
        let mut hub = Hub::new(3, 60);
        for i in 0..10u8 {
            hub.publish("c", "t", &[i], 100);
        }
        let info = hub.info("c", 100).unwrap();
        assert_eq!(info.messages, 3);
        assert_eq!(info.last_id, Some(MsgId { time: 100, tag: 9 }));
        assert_eq!(hub.buffered_count(), 3);
    }
}
