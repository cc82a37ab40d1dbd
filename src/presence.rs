//! Who is online, and where. Pure state like the hub: the loop tells it when a poll starts and
//! ends, and when the backend joins or leaves a session server-side; it answers with the events
//! that follow (`online`, `offline`, `join`, `leave`) and keeps the indexes behind `ONLINE`,
//! `PRESENCE` and `PUBSUB`.
//!
//! Long-poll leaves short gaps between a response and the next request, so a session stays
//! online for `grace` after its last poll ended, and on a channel for `grace` after its last poll
//! on that channel ended: a visitor does not flap at every re-poll, and one who vanished (tab
//! closed, network gone) goes offline after exactly that grace, never later. Grace timers share
//! one duration, so they sit in one FIFO; each carries a stamp and a stale one is skipped.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A presence change, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session came online (its first poll, or its first after going offline).
    Online { sid: String, user: Option<String> },
    /// A session went offline (grace over with no poll, kicked, or closed).
    Offline { sid: String },
    /// A session is now on a channel (a poll on it, or joined by the backend while online).
    Join { sid: String, channel: String },
    /// A session is no longer on a channel.
    Leave { sid: String, channel: String },
}

impl Event {
    /// The text sent to `__presence__` subscribers: `online <sid> [<user>]`, `offline <sid>`,
    /// `join <sid> <channel>`, `leave <sid> <channel>`.
    pub fn text(&self) -> String {
        match self {
            Event::Online { sid, user: Some(u) } => format!("online {sid} {u}"),
            Event::Online { sid, user: None } => format!("online {sid}"),
            Event::Offline { sid } => format!("offline {sid}"),
            Event::Join { sid, channel } => format!("join {sid} {channel}"),
            Event::Leave { sid, channel } => format!("leave {sid} {channel}"),
        }
    }
}

/// A session's polls on one channel.
#[derive(Default)]
struct OnChannel {
    /// Held polls on the channel.
    polls: u32,
    /// Stamp of the pending grace timer after the last poll ended; 0 when none.
    grace: u64,
}

/// A session the daemon knows: online, or joined to channels by the backend.
#[derive(Default)]
struct Visitor {
    /// The application's user id.
    user: Option<Box<str>>,
    /// Held polls, all channels, with the connection each is on (hold id, slab token). A
    /// vector, not a map: a session holds one or two polls at a time, and a visitor is kept for
    /// every session online, so its size is what a held poll costs in memory.
    holds: Vec<(u64, usize)>,
    /// Stamp of the pending grace timer after the last poll ended; 0 when none.
    grace: u64,
    /// Shared channels it polls (or polled within grace): a few, so a vector as `holds`.
    channels: Vec<(Arc<str>, OnChannel)>,
    /// Channels the backend joined it to (`JOIN`).
    joined: Vec<Arc<str>>,
}

impl Visitor {
    fn user_id(&self) -> Option<String> {
        self.user.as_deref().map(str::to_string)
    }

    fn online(&self) -> bool {
        !self.holds.is_empty() || self.grace != 0
    }

    /// The channels it is on now.
    fn on(&self) -> BTreeSet<Arc<str>> {
        if !self.online() {
            return BTreeSet::new();
        }
        self.channels.iter().map(|(c, _)| c).chain(self.joined.iter()).cloned().collect()
    }

    fn channel(&mut self, name: &str) -> Option<&mut OnChannel> {
        self.channels.iter_mut().find(|(c, _)| &**c == name).map(|(_, c)| c)
    }

    fn remove_channel(&mut self, name: &str) {
        self.channels.retain(|(c, _)| &**c != name);
    }
}

/// Pushes without the doubling growth: a visitor's vectors hold one or two items for almost
/// every session, and a vector's first push would reserve four, kept for as long as the session
/// is online.
fn push_exact<T>(v: &mut Vec<T>, item: T) {
    v.reserve_exact(1);
    v.push(item);
}

/// A grace timer: fires at `at` for `sid` (and `channel`, if a channel's grace) if its stamp
/// still matches.
struct Grace {
    at: Instant,
    sid: Arc<str>,
    channel: Option<Arc<str>>,
    stamp: u64,
}

/// The presence state.
pub struct Presence {
    grace: Duration,
    /// Sessions by id. The id is allocated once, here, and shared (with the channels' member
    /// sets, the grace timers and the held polls): a held poll of a session pays for one copy.
    /// Boxed: the table keeps about twice as many slots as entries, and a slot is two words.
    visitors: HashMap<Arc<str>, Box<Visitor>>,
    /// Channel -> sessions on it. The channel's name is shared with its visitors' lists.
    members: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Channel -> anonymous held polls on it.
    anon: HashMap<Box<str>, u32>,
    /// Pending grace timers, in deadline order.
    timers: VecDeque<Grace>,
    /// Sessions online.
    online: usize,
    last_stamp: u64,
    /// Channels whose anonymous polls changed since the cluster last took them; None when no
    /// one asks (a single node).
    pub anon_changed: Option<HashSet<Box<str>>>,
}

/// Whether a channel is a session's private channel or an internal one (`@admin`): not a place
/// where visitors meet.
fn private(channel: &str) -> bool {
    channel.starts_with(crate::hub::SESSION_PREFIX) || channel.starts_with('@')
}

impl Presence {
    /// Empty, with the grace period.
    pub fn new(grace: Duration) -> Presence {
        Presence {
            grace,
            visitors: HashMap::new(),
            members: HashMap::new(),
            anon: HashMap::new(),
            timers: VecDeque::new(),
            online: 0,
            last_stamp: 0,
            anon_changed: None,
        }
    }

    /// The members index's own name of a channel, to share, when the channel has members.
    fn shared_channel(&self, channel: &str) -> Option<Arc<str>> {
        self.members.get_key_value(channel).map(|(k, _)| k.clone())
    }

    fn stamp(&mut self) -> u64 {
        self.last_stamp += 1;
        self.last_stamp
    }

    /// Applies a change to one visitor and reports the events it caused, keeping the indexes.
    fn change(&mut self, sid: &str, out: &mut Vec<Event>, f: impl FnOnce(&mut Visitor)) {
        // Look up before inserting: `entry` would allocate the key on every change.
        let key = match self.visitors.get_key_value(sid) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = sid.into();
                self.visitors.insert(k.clone(), Box::default());
                k
            }
        };
        let Some(v) = self.visitors.get_mut(sid).map(|v| &mut **v) else { return };
        let (was_online, before) = (v.online(), v.on());
        f(v);
        let (is_online, after) = (v.online(), v.on());
        let user = v.user_id();
        if v.holds.is_empty() && v.grace == 0 && v.joined.is_empty() {
            self.visitors.remove(sid);
        }
        if !was_online && is_online {
            self.online += 1;
            out.push(Event::Online { sid: sid.into(), user });
        }
        for ch in before.difference(&after) {
            if let Some(m) = self.members.get_mut(ch) {
                m.remove(sid);
                if m.is_empty() {
                    self.members.remove(ch);
                }
            }
            out.push(Event::Leave { sid: sid.into(), channel: ch.to_string() });
        }
        for ch in after.difference(&before) {
            self.members.entry(ch.clone()).or_default().insert(key.clone());
            out.push(Event::Join { sid: sid.into(), channel: ch.to_string() });
        }
        if was_online && !is_online {
            self.online -= 1;
            out.push(Event::Offline { sid: sid.into() });
        }
    }

    /// A poll (hold `hold` on connection `token`) started on `channel`; `sid` is "" when
    /// anonymous; `user` is the session's user id when known.
    pub fn poll_started(&mut self, sid: &str, user: Option<&str>, channel: &str, hold: u64, token: usize, out: &mut Vec<Event>) {
        if sid.is_empty() {
            if !private(channel) {
                if let Some(set) = self.anon_changed.as_mut() {
                    if !set.contains(channel) {
                        set.insert(channel.into());
                    }
                }
                // Look up before inserting: `entry` would allocate the key on every poll.
                match self.anon.get_mut(channel) {
                    Some(n) => *n += 1,
                    None => {
                        self.anon.insert(channel.into(), 1);
                    }
                }
            }
            return;
        }
        let name = self.shared_channel(channel);
        self.change(sid, out, |v| {
            if let Some(u) = user {
                if v.user.as_deref() != Some(u) {
                    v.user = Some(u.into());
                }
            }
            push_exact(&mut v.holds, (hold, token));
            v.grace = 0;
            if !private(channel) {
                if v.channel(channel).is_none() {
                    push_exact(&mut v.channels, (name.unwrap_or_else(|| channel.into()), OnChannel::default()));
                }
                if let Some(c) = v.channel(channel) {
                    c.polls += 1;
                    c.grace = 0;
                }
            }
        });
    }

    /// `poll_started`, but a session not yet known is tracked only while fewer than `cap`
    /// sessions are; beyond that its poll counts as an anonymous one. Returns whether the
    /// session is tracked: the caller must end the poll under "" when it is not.
    #[allow(clippy::too_many_arguments)]
    pub fn poll_started_capped(&mut self, sid: &str, user: Option<&str>, channel: &str, hold: u64, token: usize, cap: usize, out: &mut Vec<Event>) -> bool {
        let tracked = sid.is_empty() || self.visitors.len() < cap || self.visitors.contains_key(sid);
        self.poll_started(if tracked { sid } else { "" }, user, channel, hold, token, out);
        tracked && !sid.is_empty()
    }

    /// A poll ended (answered, timed out, or its connection closed). Nothing changes until grace.
    pub fn poll_ended(&mut self, sid: &str, channel: &str, hold: u64, now: Instant) {
        if sid.is_empty() {
            if let Some(set) = self.anon_changed.as_mut() {
                if !private(channel) && !set.contains(channel) {
                    set.insert(channel.into());
                }
            }
            if let Some(n) = self.anon.get_mut(channel) {
                *n -= 1;
                if *n == 0 {
                    self.anon.remove(channel);
                }
            }
            return;
        }
        let (s1, s2) = (self.stamp(), self.stamp());
        let at = now + self.grace;
        let Some(key) = self.visitors.get_key_value(sid).map(|(k, _)| k.clone()) else { return };
        let Some(v) = self.visitors.get_mut(sid) else { return };
        let Some(i) = v.holds.iter().position(|&(h, _)| h == hold) else { return };
        v.holds.swap_remove(i);
        if let Some((name, c)) = v.channels.iter_mut().find(|(c, _)| &**c == channel) {
            c.polls -= 1;
            if c.polls == 0 {
                c.grace = s1;
                self.timers.push_back(Grace { at, sid: key.clone(), channel: Some(name.clone()), stamp: s1 });
            }
        }
        if v.holds.is_empty() {
            v.grace = s2;
            self.timers.push_back(Grace { at, sid: key, channel: None, stamp: s2 });
        }
    }

    /// Fires due grace timers.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Event>) {
        while self.timers.front().is_some_and(|g| g.at <= now) {
            let Some(g) = self.timers.pop_front() else { break };
            let Some(v) = self.visitors.get(&g.sid) else { continue };
            match &g.channel {
                Some(ch) => {
                    if v.channels.iter().any(|(c, o)| c == ch && o.grace == g.stamp && o.polls == 0) {
                        self.change(&g.sid, out, |v| v.remove_channel(ch));
                    }
                }
                None => {
                    if v.grace == g.stamp && v.holds.is_empty() {
                        self.change(&g.sid, out, |v| {
                            v.grace = 0;
                            v.channels.clear();
                        });
                    }
                }
            }
        }
    }

    /// When the next grace timer is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.front().map(|g| g.at)
    }

    /// Records the session's user id (from `SESSION.OPEN` or an access check).
    /// An online session whose user id becomes known or changes is announced again with
    /// `online <sid> <user>`, so a backend's list gets the name.
    pub fn set_user(&mut self, sid: &str, user: Option<String>, out: &mut Vec<Event>) {
        let Some(v) = self.visitors.get_mut(sid) else { return };
        if user.is_none() || v.user.as_deref() == user.as_deref() {
            return;
        }
        v.user = user.as_deref().map(Box::from);
        if v.online() {
            out.push(Event::Online { sid: sid.into(), user });
        }
    }

    /// The backend joined the session to a channel.
    pub fn join(&mut self, sid: &str, channel: &str, out: &mut Vec<Event>) {
        let name = self.shared_channel(channel);
        self.change(sid, out, |v| {
            if !v.joined.iter().any(|c| &**c == channel) {
                push_exact(&mut v.joined, name.unwrap_or_else(|| channel.into()));
            }
        });
    }

    /// The backend took the session off a channel it joined.
    pub fn leave(&mut self, sid: &str, channel: &str, out: &mut Vec<Event>) {
        if self.visitors.contains_key(sid) {
            self.change(sid, out, |v| {
                v.joined.retain(|c| &**c != channel);
            });
        }
    }

    /// The session is closed or kicked: it leaves everything and goes offline now. Returns its
    /// held polls (hold id, token) for the loop to answer.
    pub fn forget(&mut self, sid: &str, out: &mut Vec<Event>) -> Vec<(u64, usize)> {
        let Some(v) = self.visitors.get(sid) else { return Vec::new() };
        let holds = v.holds.clone();
        self.change(sid, out, |v| {
            v.holds.clear();
            v.grace = 0;
            v.channels.clear();
            v.joined.clear();
        });
        holds
    }

    /// The whole state as events (online, then joins), for rewriting the presence rows.
    pub fn snapshot(&self) -> Vec<Event> {
        let mut out = Vec::new();
        for (sid, v) in self.visitors.iter().filter(|(_, v)| v.online()) {
            out.push(Event::Online { sid: sid.to_string(), user: v.user_id() });
            out.extend(v.on().into_iter().map(|c| Event::Join { sid: sid.to_string(), channel: c.to_string() }));
        }
        out
    }

    /// Online sessions with their user ids, sorted by session id.
    pub fn online(&self) -> Vec<(String, Option<String>)> {
        let mut v: Vec<_> = self.visitors.iter().filter(|(_, v)| v.online()).map(|(s, v)| (s.to_string(), v.user_id())).collect();
        v.sort();
        v
    }

    /// At most `limit` online sessions (any), sorted: for the admin page, whose cost must not
    /// grow with the number online.
    pub fn online_sample(&self, limit: usize) -> Vec<(String, Option<String>)> {
        let mut v: Vec<_> =
            self.visitors.iter().filter(|(_, v)| v.online()).take(limit).map(|(s, v)| (s.to_string(), v.user_id())).collect();
        v.sort();
        v
    }

    /// At most `limit` channels with browsers and their counts, sorted by name.
    pub fn channels_sample(&self, limit: usize) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self.members.keys().map(|c| &**c).chain(self.anon.keys().map(|c| &**c).filter(|k| !self.members.contains_key(*k))).take(limit).map(|c| (c.to_string(), self.numsub(c))).collect();
        v.sort();
        v
    }

    /// Sessions online.
    pub fn online_count(&self) -> usize {
        self.online
    }

    /// The id a held poll keeps: None for "" (anonymous), presence's own copy when the session
    /// is tracked (shared, so the poll costs no second copy), a new one otherwise.
    pub fn shared_sid(&self, sid: &str) -> Option<Arc<str>> {
        if sid.is_empty() {
            return None;
        }
        Some(self.visitors.get_key_value(sid).map_or_else(|| sid.into(), |(k, _)| k.clone()))
    }

    /// Whether a session is online.
    pub fn is_online(&self, sid: &str) -> bool {
        self.visitors.get(sid).is_some_and(|v| v.online())
    }

    /// Sessions on a channel with their user ids, sorted.
    pub fn on_channel(&self, channel: &str) -> Vec<(String, Option<String>)> {
        let mut v: Vec<_> = self
            .members
            .get(channel)
            .into_iter()
            .flatten()
            .map(|s| (s.to_string(), self.visitors.get(s).and_then(|v| v.user_id())))
            .collect();
        v.sort();
        v
    }

    /// Browsers on a channel: sessions on it and anonymous held polls.
    pub fn numsub(&self, channel: &str) -> usize {
        self.members.get(channel).map_or(0, HashSet::len) + self.anon.get(channel).copied().unwrap_or(0) as usize
    }

    /// Anonymous held polls on a channel.
    pub fn anonymous(&self, channel: &str) -> usize {
        self.anon.get(channel).copied().unwrap_or(0) as usize
    }

    /// Channels with anonymous held polls.
    pub fn anonymous_channels(&self) -> Vec<String> {
        self.anon.keys().map(|c| c.to_string()).collect()
    }

    /// Channels with at least one browser, sorted.
    pub fn channels(&self) -> Vec<String> {
        let mut v: Vec<String> = self.members.keys().map(|c| c.to_string()).chain(self.anon.keys().map(|c| c.to_string())).collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Duration = Duration::from_secs(15);

    fn texts(ev: &[Event]) -> Vec<String> {
        ev.iter().map(Event::text).collect()
    }

    #[test]
    fn one_copy_of_a_session_id_and_of_a_channel_name() {
        let mut p = Presence::new(G);
        let mut ev = Vec::new();
        p.poll_started("s1", None, "goods", 1, 10, &mut ev);
        p.poll_started("s2", None, "goods", 2, 11, &mut ev);
        p.poll_started("s1", None, "news", 3, 10, &mut ev);
        assert_eq!(p.shared_sid(""), None);
        let (a, b) = (p.shared_sid("s1").unwrap(), p.shared_sid("s1").unwrap());
        assert!(Arc::ptr_eq(&a, &b), "a held poll shares presence's copy of the id");
        let key = p.visitors.get_key_value("s1").unwrap().0;
        assert!(Arc::ptr_eq(key, &a));
        assert!(p.members["goods"].iter().any(|m| Arc::ptr_eq(m, key)), "the members index shares it too");
        // The second visitor on a channel keeps the members index's name of it.
        let goods = p.members.get_key_value("goods").unwrap().0;
        let of = |sid: &str| p.visitors[sid].channels.iter().find(|(c, _)| &**c == "goods").unwrap().0.clone();
        assert!(Arc::ptr_eq(&of("s2"), goods));
        // A session presence does not track still gets an id to end its poll under.
        assert_eq!(p.shared_sid("s9").as_deref(), Some("s9"));
        // Ended with the shared id, the polls count down as before.
        p.poll_ended(&a, "goods", 1, Instant::now());
        p.poll_ended(&a, "news", 3, Instant::now());
        assert!(p.visitors["s1"].holds.is_empty());
        assert_eq!(p.numsub("goods"), 2, "both still on goods within grace");
    }

    #[test]
    fn re_polls_within_grace_do_not_flap() {
        let t0 = Instant::now();
        let mut p = Presence::new(G);
        let mut ev = Vec::new();
        p.poll_started("s1", Some("42"), "goods", 1, 10, &mut ev);
        assert_eq!(texts(&ev), ["online s1 42", "join s1 goods"]);
        ev.clear();
        for i in 0..100u64 {
            let now = t0 + Duration::from_millis(i * 100);
            p.poll_ended("s1", "goods", 1 + i, now);
            p.tick(now + Duration::from_millis(50), &mut ev);
            p.poll_started("s1", None, "goods", 2 + i, 10, &mut ev);
        }
        p.tick(t0 + Duration::from_secs(60), &mut ev);
        assert!(ev.is_empty(), "no events while re-polling: {ev:?}");
        assert_eq!(p.online(), [("s1".to_string(), Some("42".to_string()))]);
        assert_eq!(p.numsub("goods"), 1);
    }

    #[test]
    fn a_user_id_learned_while_online_is_announced() {
        let mut p = Presence::new(G);
        let mut ev = Vec::new();
        p.poll_started("s1", None, "goods", 1, 10, &mut ev);
        ev.clear();
        p.set_user("s1", Some("alice".into()), &mut ev);
        p.set_user("s1", Some("alice".into()), &mut ev);
        assert_eq!(texts(&ev), ["online s1 alice"], "once, and only when it changes");
        assert_eq!(p.online_count(), 1);
    }

    #[test]
    fn abrupt_end_goes_offline_after_grace_exactly() {
        let t0 = Instant::now();
        let mut p = Presence::new(G);
        let mut ev = Vec::new();
        p.poll_started("s1", None, "goods", 1, 10, &mut ev);
        p.poll_started("s2", None, "goods", 2, 11, &mut ev);
        ev.clear();
        p.poll_ended("s1", "goods", 1, t0);
        p.tick(t0 + G - Duration::from_millis(1), &mut ev);
        assert!(ev.is_empty());
        assert_eq!(p.on_channel("goods").len(), 2);
        p.tick(t0 + G, &mut ev);
        assert_eq!(texts(&ev), ["leave s1 goods", "offline s1"]);
        assert_eq!(p.online_count(), 1);
        assert_eq!(p.channels(), ["goods"]);
    }

    #[test]
    fn joins_count_while_online_and_forget_clears() {
        let t0 = Instant::now();
        let mut p = Presence::new(G);
        let mut ev = Vec::new();
        p.join("s1", "goods", &mut ev);
        assert!(ev.is_empty(), "joined but offline: not on the channel yet");
        p.poll_started("s1", None, "session:s1", 1, 10, &mut ev);
        assert_eq!(texts(&ev), ["online s1", "join s1 goods"]);
        ev.clear();
        p.leave("s1", "goods", &mut ev);
        assert_eq!(texts(&ev), ["leave s1 goods"]);
        ev.clear();
        p.join("s1", "news", &mut ev);
        p.poll_ended("s1", "session:s1", 1, t0);
        assert_eq!(p.forget("s1", &mut ev), Vec::<(u64, usize)>::new());
        assert_eq!(texts(&ev), ["join s1 news", "leave s1 news", "offline s1"]);
        assert_eq!(p.online_count(), 0);
        assert!(p.channels().is_empty());
        p.tick(t0 + G, &mut ev);
        assert_eq!(ev.len(), 3, "stale timers are skipped");
    }

    #[test]
    fn anonymous_polls_count_on_channels_only() {
        let mut p = Presence::new(G);
        let mut ev = Vec::new();
        p.poll_started("", None, "goods", 1, 10, &mut ev);
        p.poll_started("", None, "goods", 2, 11, &mut ev);
        assert!(ev.is_empty());
        assert_eq!(p.numsub("goods"), 2);
        assert_eq!(p.online_count(), 0);
        p.poll_ended("", "goods", 1, Instant::now());
        p.poll_ended("", "goods", 2, Instant::now());
        assert!(p.channels().is_empty());
    }

    #[test]
    fn unknown_sessions_beyond_the_cap_count_as_anonymous() {
        let mut p = Presence::new(G);
        let mut ev = Vec::new();
        assert!(p.poll_started_capped("a", None, "goods", 1, 1, 2, &mut ev));
        assert!(p.poll_started_capped("b", None, "goods", 2, 2, 2, &mut ev));
        assert!(!p.poll_started_capped("c", None, "goods", 3, 3, 2, &mut ev), "over the cap");
        assert!(p.poll_started_capped("a", None, "goods", 4, 4, 2, &mut ev), "known sessions still count");
        assert_eq!((p.online_count(), p.numsub("goods")), (2, 3));
        p.poll_ended("", "goods", 3, Instant::now());
        assert_eq!(p.numsub("goods"), 2, "the anonymous count does not drift");
    }

    #[test]
    fn kick_returns_the_held_polls() {
        let mut p = Presence::new(G);
        let mut ev = Vec::new();
        p.poll_started("s1", None, "goods", 7, 3, &mut ev);
        p.poll_started("s1", None, "session:s1", 8, 4, &mut ev);
        let mut holds = p.forget("s1", &mut ev);
        holds.sort();
        assert_eq!(holds, [(7, 3), (8, 4)]);
        // The loop ends those polls afterwards: nothing more happens.
        p.poll_ended("s1", "goods", 7, Instant::now());
        assert!(!p.is_online("s1"));
    }
}
