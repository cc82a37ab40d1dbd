//! The Mercure hub's state: the hub-wide history of updates (one order for every topic, bounded),
//! the open subscribers with their compiled selectors, and the active subscriptions the
//! subscriptions API lists. Pure: no sockets, no clock; the loop (`mercure_http.rs`) feeds it
//! updates and writes to the connections it names.
//!
//! An update is kept as its event-stream bytes, encoded once when it enters the hub and shared by
//! `Arc` with every subscriber it goes to. Each update has a sequence number: counted here on a
//! single node, given by Redis in a cluster, so every node keeps the same order and a subscriber
//! resumes on any node. Selectors that can match only one topic (plain strings, the common case)
//! are indexed by that topic; `*` and URI templates are matched one by one.

use crate::mercure::{self, Selector};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// An update as it travels between nodes (JSON through Redis) and enters the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The update's id (`urn:uuid:...` when the publisher gave none).
    pub id: String,
    /// Its topics: the first canonical, the rest alternates.
    pub topics: Vec<String>,
    /// The `data` field.
    pub data: String,
    /// Only subscribers whose JWT allows one of its topics get it.
    pub private: bool,
    /// The SSE `event:` name.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// The SSE `retry:` value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u64>,
    /// For a subscription event: the subscription it reports, for the subscriptions API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<SubEvent>,
}

/// A subscriber's subscription to one topic selector starting or ending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubEvent {
    /// The selector subscribed to.
    pub topic: String,
    /// The subscriber's id (`urn:uuid:...`).
    pub subscriber: String,
    /// Started (true) or ended.
    pub active: bool,
    /// The subscriber's `mercure.payload`.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// The node the subscriber is on (a cluster drops a dead node's subscriptions).
    #[serde(default)]
    pub node: String,
}

/// An update in the hub.
#[derive(Debug)]
pub struct Update {
    /// Its place in the hub-wide order.
    pub seq: u64,
    /// Its id.
    pub id: Box<str>,
    /// Its topics.
    pub topics: Box<[String]>,
    /// Private: only for subscribers allowed one of the topics.
    pub private: bool,
    /// The event as written to every subscriber.
    pub sse: Arc<[u8]>,
}

impl Update {
    /// The update of `e`, its event encoded once.
    pub fn new(seq: u64, e: &Entry) -> Update {
        let sse = mercure::event(&e.id, e.event_type.as_deref(), e.retry, &e.data);
        Update { seq, id: e.id.as_str().into(), topics: e.topics.clone().into_boxed_slice(), private: e.private, sse: sse.into() }
    }
}

/// An open subscriber.
#[derive(Debug)]
pub struct Subscriber {
    /// Its connection's slab token.
    pub token: usize,
    /// Its `topic` selectors.
    pub selectors: Vec<Selector>,
    /// What its JWT's `mercure.subscribe` allows among private updates (empty: none).
    pub allowed: Vec<Selector>,
}

impl Subscriber {
    /// Whether this subscriber gets `u`.
    pub fn wants(&self, u: &Update) -> bool {
        let topics = &u.topics;
        self.selectors.iter().any(|s| topics.iter().any(|t| s.matches(t))) && (!u.private || mercure::can_receive(&self.allowed, topics))
    }
}

/// Where a resume starts.
#[derive(Debug)]
pub enum Resume {
    /// The id is in the history: the updates after it (perhaps none).
    After(Vec<Arc<Update>>),
    /// Unknown id (or nothing kept): live updates only.
    Unknown,
}

/// An active subscription, as the subscriptions API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Active {
    /// The subscriber's `mercure.payload`.
    pub payload: Option<serde_json::Value>,
    /// The node it is on.
    pub node: Box<str>,
}

/// The hub.
pub struct Hub {
    /// The newest updates, oldest first, `seq` increasing.
    history: VecDeque<Arc<Update>>,
    /// Most updates kept.
    cap: usize,
    /// Id -> seq of the updates in the history (the newest of a reused id).
    ids: HashMap<Box<str>, u64>,
    /// The highest seq applied (0: none yet).
    pub last_seq: u64,
    /// Open subscribers by hold id.
    subs: HashMap<u64, Subscriber>,
    /// Topic -> subscribers with an exact selector on it.
    exact: HashMap<Box<str>, Vec<u64>>,
    /// Subscribers with a `*` or template selector.
    wild: HashSet<u64>,
    /// Active subscriptions by (topic selector, subscriber): the cluster's.
    active: BTreeMap<(String, String), Active>,
}

impl Hub {
    /// An empty hub keeping `cap` updates.
    pub fn new(cap: usize) -> Hub {
        Hub {
            history: VecDeque::new(),
            cap: cap.max(1),
            ids: HashMap::new(),
            last_seq: 0,
            subs: HashMap::new(),
            exact: HashMap::new(),
            wild: HashSet::new(),
            active: BTreeMap::new(),
        }
    }

    /// Adds update `u`: true if it is new and live (the caller delivers it), false if the hub
    /// already had it or it is older than what was applied (a fetch of the history merges those
    /// in place without delivering them).
    pub fn insert(&mut self, u: Update) -> Option<Arc<Update>> {
        if u.seq <= self.last_seq {
            let i = self.history.partition_point(|x| x.seq < u.seq);
            if self.history.get(i).is_none_or(|x| x.seq != u.seq) && (i > 0 || self.history.len() < self.cap) {
                self.ids.insert(u.id.clone(), u.seq);
                self.history.insert(i, Arc::new(u));
                self.trim();
            }
            return None;
        }
        self.last_seq = u.seq;
        self.ids.insert(u.id.clone(), u.seq);
        let u = Arc::new(u);
        self.history.push_back(u.clone());
        self.trim();
        Some(u)
    }

    fn trim(&mut self) {
        while self.history.len() > self.cap {
            if let Some(old) = self.history.pop_front() {
                if self.ids.get(&old.id) == Some(&old.seq) {
                    self.ids.remove(&old.id);
                }
            }
        }
    }

    /// The id of the newest update kept.
    pub fn last_id(&self) -> Option<&str> {
        self.history.back().map(|u| &*u.id)
    }

    /// Updates kept.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// What a subscriber resuming from `last_event_id` gets from the history: `earliest` is all
    /// of it. Only the updates it `wants` are returned.
    pub fn resume(&self, last_event_id: &str, sub: &Subscriber) -> Resume {
        let from = if last_event_id == "earliest" {
            0
        } else {
            match self.ids.get(last_event_id) {
                Some(&seq) => self.history.partition_point(|u| u.seq <= seq),
                None => return Resume::Unknown,
            }
        };
        Resume::After(self.history.range(from..).filter(|u| sub.wants(u)).cloned().collect())
    }

    /// Registers subscriber `id`.
    pub fn subscribe(&mut self, id: u64, sub: Subscriber) {
        for s in &sub.selectors {
            match s.is_exact() {
                Some(topic) => {
                    let list = self.exact.entry(topic.into()).or_default();
                    if !list.contains(&id) {
                        list.push(id);
                    }
                }
                None => {
                    self.wild.insert(id);
                }
            }
        }
        self.subs.insert(id, sub);
    }

    /// Removes subscriber `id`; returns it.
    pub fn unsubscribe(&mut self, id: u64) -> Option<Subscriber> {
        let sub = self.subs.remove(&id)?;
        self.wild.remove(&id);
        for s in &sub.selectors {
            if let Some(topic) = s.is_exact() {
                if let Some(list) = self.exact.get_mut(topic) {
                    list.retain(|&x| x != id);
                    if list.is_empty() {
                        self.exact.remove(topic);
                    }
                }
            }
        }
        Some(sub)
    }

    /// Open subscribers.
    pub fn subscribers(&self) -> usize {
        self.subs.len()
    }

    /// The subscribers that get `u`, as (hold id, token), in token order, each once.
    pub fn recipients(&self, u: &Update, out: &mut Vec<(u64, usize)>) {
        out.clear();
        for t in u.topics.iter() {
            for id in self.exact.get(t.as_str()).into_iter().flatten() {
                if let Some(s) = self.subs.get(id) {
                    if !u.private || mercure::can_receive(&s.allowed, &u.topics) {
                        out.push((*id, s.token));
                    }
                }
            }
        }
        for id in &self.wild {
            if let Some(s) = self.subs.get(id) {
                if s.wants(u) {
                    out.push((*id, s.token));
                }
            }
        }
        out.sort_unstable_by_key(|&(id, t)| (t, id));
        out.dedup();
    }

    /// Applies a subscription event to the list of active subscriptions.
    pub fn apply_sub(&mut self, e: &SubEvent) {
        let key = (e.topic.clone(), e.subscriber.clone());
        if e.active {
            self.active.insert(key, Active { payload: e.payload.clone(), node: e.node.as_str().into() });
        } else {
            self.active.remove(&key);
        }
    }

    /// The active subscriptions, filtered by topic selector and subscriber when given.
    pub fn active(&self, topic: Option<&str>, subscriber: Option<&str>) -> Vec<(&str, &str, &Active)> {
        self.active
            .iter()
            .filter(|((t, s), _)| topic.is_none_or(|x| x == t) && subscriber.is_none_or(|x| x == s))
            .map(|((t, s), a)| (t.as_str(), s.as_str(), a))
            .collect()
    }

    /// How many subscriptions are active.
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Replaces the list of active subscriptions (read from Redis on connect).
    pub fn set_active(&mut self, list: Vec<SubEvent>) {
        self.active.clear();
        for e in list {
            self.apply_sub(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, topics: &[&str], private: bool) -> Entry {
        Entry { id: id.into(), topics: topics.iter().map(|t| t.to_string()).collect(), data: "d".into(), private, event_type: None, retry: None, sub: None }
    }

    fn sub(token: usize, sel: &[&str], allowed: &[&str]) -> Subscriber {
        let s = |v: &[&str]| v.iter().map(|x| Selector::new(x)).collect();
        Subscriber { token, selectors: s(sel), allowed: s(allowed) }
    }

    fn got(h: &Hub, u: &Update) -> Vec<usize> {
        let mut out = Vec::new();
        h.recipients(u, &mut out);
        out.into_iter().map(|(_, t)| t).collect()
    }

    #[test]
    fn updates_reach_matching_subscribers_once() {
        let mut h = Hub::new(10);
        h.subscribe(1, sub(10, &["a", "b"], &[]));
        h.subscribe(2, sub(20, &["https://x/{id}"], &[]));
        h.subscribe(3, sub(30, &["*"], &["*"]));
        h.subscribe(4, sub(40, &["c"], &["https://x/{id}"]));
        let table: &[(&[&str], bool, &[usize])] = &[
            (&["a"], false, &[10, 30]),
            (&["a", "b"], false, &[10, 30]),
            (&["https://x/1"], false, &[20, 30]),
            (&["https://x/1/2"], false, &[30]),
            (&["c"], false, &[30, 40]),
            (&["c"], true, &[30]),
            (&["c", "https://x/9"], true, &[30, 40]),
            (&["zzz"], false, &[30]),
        ];
        for (i, (topics, private, want)) in table.iter().enumerate() {
            let u = Update::new(i as u64 + 1, &entry("x", topics, *private));
            assert_eq!(got(&h, &u), *want, "{topics:?} private={private}");
        }
        h.unsubscribe(3);
        h.unsubscribe(1);
        assert_eq!(got(&h, &Update::new(99, &entry("x", &["a"], false))), Vec::<usize>::new());
    }

    #[test]
    fn history_is_bounded_and_resumes_after_an_id() {
        let mut h = Hub::new(3);
        for i in 1..=5u64 {
            assert!(h.insert(Update::new(i, &entry(&format!("id{i}"), &["t"], false))).is_some());
        }
        assert!(h.insert(Update::new(5, &entry("id5", &["t"], false))).is_none(), "a duplicate is not delivered twice");
        assert_eq!(h.history_len(), 3);
        let s = sub(1, &["t"], &[]);
        let ids = |r: Resume| match r {
            Resume::After(v) => Some(v.iter().map(|u| u.id.to_string()).collect::<Vec<_>>()),
            Resume::Unknown => None,
        };
        assert_eq!(ids(h.resume("id3", &s)), Some(vec!["id4".into(), "id5".into()]));
        assert_eq!(ids(h.resume("id5", &s)), Some(vec![]));
        assert_eq!(ids(h.resume("earliest", &s)), Some(vec!["id3".into(), "id4".into(), "id5".into()]));
        assert_eq!(ids(h.resume("id1", &s)), None, "trimmed: unknown");
        assert_eq!(ids(h.resume("nope", &s)), None);
        let other = sub(1, &["u"], &[]);
        assert_eq!(ids(h.resume("earliest", &other)), Some(vec![]), "only what the subscriber wants");
        assert_eq!(h.last_id(), Some("id5"));
    }

    #[test]
    fn a_fetched_history_merges_in_order_without_delivery() {
        let mut h = Hub::new(10);
        assert!(h.insert(Update::new(7, &entry("seven", &["t"], false))).is_some());
        assert!(h.insert(Update::new(5, &entry("five", &["t"], false))).is_none());
        assert!(h.insert(Update::new(6, &entry("six", &["t"], false))).is_none());
        let s = sub(1, &["t"], &[]);
        match h.resume("five", &s) {
            Resume::After(v) => assert_eq!(v.iter().map(|u| u.seq).collect::<Vec<_>>(), vec![6, 7]),
            Resume::Unknown => panic!("five was merged"),
        }
    }

    #[test]
    fn active_subscriptions_follow_their_events() {
        let mut h = Hub::new(10);
        let ev = |t: &str, s: &str, active: bool, node: &str| SubEvent { topic: t.into(), subscriber: s.into(), active, payload: None, node: node.into() };
        h.apply_sub(&ev("a", "s1", true, "n1"));
        h.apply_sub(&ev("b", "s1", true, "n1"));
        h.apply_sub(&ev("a", "s2", true, "n2"));
        assert_eq!(h.active(None, None).len(), 3);
        assert_eq!(h.active_count(), 3);
        assert_eq!(h.active(Some("a"), None).len(), 2);
        assert_eq!(h.active(Some("a"), Some("s2")).len(), 1);
        h.apply_sub(&ev("a", "s1", false, "n1"));
        assert_eq!(h.active(Some("a"), None).len(), 1);
    }

    #[test]
    fn entries_travel_as_json() {
        let mut e = entry("urn:uuid:1", &["a", "b"], true);
        e.event_type = Some("t".into());
        e.sub = Some(SubEvent { topic: "a".into(), subscriber: "s".into(), active: true, payload: Some(serde_json::json!({"u": 1})), node: "n".into() });
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), e);
    }
}
