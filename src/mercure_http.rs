//! The Mercure hub on the browser listener, at `/.well-known/mercure` (the 0.x dialect that
//! symfony/mercure speaks): publishing (`POST`, a form and a publisher JWT), subscribing (`GET
//! ?topic=`, an event stream), resuming (`Last-Event-ID`), subscription events and the
//! subscriptions API. The protocol itself is pure code in `mercure.rs`, the hub's state in
//! `mercure_hub.rs`; this file is the loop's side: requests in, event streams out, heartbeats,
//! and the stream's end at its JWT's `exp`. In a cluster the updates go through Redis
//! (`mercure_cluster.rs`), which gives them their place in the one order of the whole cluster.
//!
//! One channel space: a Mercure topic is a comet channel. A public update is also published on
//! every one of its topics that is a valid channel id, so long-poll, EventSource, WebSocket and
//! RESP subscribers of that channel get it; and a message published on a channel through RESP or
//! the push-module endpoint reaches the Mercure subscribers of that topic, public when the
//! channel is open to anyone (`[auth]`), private otherwise.

use crate::auth;
use crate::config::{AuthMode, MercureCfg};
use crate::conn::{Chunk, Phase};
use crate::http::{self, Method, Request};
use crate::hub;
use crate::mercure::{self, Selector};
use crate::mercure_hub::{Entry, Hub, Resume, SubEvent, Subscriber, Update};
use crate::server::Server;
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

/// The hub's path.
pub const PATH: &str = "/.well-known/mercure";

/// The content type of a channel message made from an update.
const CHANNEL_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// The page served at `/` on the hub's origin (the conformance suite opens one first).
const PAGE: &[u8] = include_bytes!("mercure.html");

/// Whether a browser-listener request is the hub's (`/` is its page).
pub fn serves(path: &str) -> bool {
    path == "/" || path == PATH || path.starts_with("/.well-known/mercure/")
}

/// The Mercure side of the daemon, owned by the loop.
pub struct Mercure {
    /// The settings.
    pub cfg: MercureCfg,
    /// History, subscribers, active subscriptions.
    pub hub: Hub,
    /// Heartbeats due: (when, token, hold id); one interval for all, so a FIFO is in order.
    beats: VecDeque<(Instant, usize, u64)>,
    /// Streams to close at their JWT's `exp`: (unix second, token, hold id).
    expiries: BinaryHeap<Reverse<(u64, usize, u64)>>,
    /// The recipients of the update being delivered (kept for its capacity).
    recipients: Vec<(u64, usize)>,
    /// Updates published through the hub endpoint.
    pub published: u64,
    /// Events written to subscribers.
    pub delivered: u64,
    /// In a cluster: the pub/sub channel updates arrive on.
    pub redis_channel: Option<String>,
}

impl Mercure {
    /// The hub for `cfg`.
    pub fn new(cfg: MercureCfg) -> Mercure {
        let hub = Hub::new(cfg.history);
        Mercure { cfg, hub, beats: VecDeque::new(), expiries: BinaryHeap::new(), recipients: Vec::new(), published: 0, delivered: 0, redis_channel: None }
    }

    /// When the next heartbeat or expiry is due (expiries are in unix seconds: checked each second).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.beats.front().map(|b| b.0)
    }
}

/// An open Mercure subscriber's connection.
#[derive(Debug)]
pub struct Subscription {
    /// Its hold id in the hub (never reused).
    pub id: u64,
    /// Its subscriber id (`urn:uuid:...`).
    pub subscriber: Box<str>,
    /// Its topic selectors as written, for the subscription events at its end.
    pub topics: Vec<String>,
    /// Its JWT's `mercure.payload`.
    pub payload: Option<serde_json::Value>,
    /// Events are queued for it this turn, to be written before the loop sleeps.
    pub flush_queued: bool,
}

/// An HTTP refusal: status and body.
type Refusal = (u16, Cow<'static, str>);

fn refusal(e: mercure::Error) -> Refusal {
    (e.status, Cow::Borrowed(e.reason))
}

impl Server {
    fn mercure_cfg(&self) -> &MercureCfg {
        &self.mercure.as_ref().expect("mercure on").cfg
    }

    fn m(&mut self) -> &mut Mercure {
        self.mercure.as_mut().expect("mercure on")
    }

    /// CORS lines for a request from one of `cors_origins`: the exact origin, with credentials.
    fn mercure_cors(&self, req: &Request<'_>) -> String {
        let Some(origin) = req.origin else { return String::new() };
        if !self.mercure_cfg().cors_origins.iter().any(|o| o == "*" || o == origin) {
            return String::new();
        }
        format!("Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\nAccess-Control-Expose-Headers: Last-Event-ID\r\nVary: Origin\r\n")
    }

    /// The JWT of a request, from the `Authorization: Bearer` header, the `authorization` query
    /// parameter, then the cookie; and whether it came from the cookie.
    fn mercure_token<'a>(&self, req: &'a Request<'_>, query_token: Option<&'a str>) -> Option<(Cow<'a, str>, bool)> {
        if let Some(h) = req.authorization {
            let h = h.trim();
            if let Some(t) = h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")) {
                return Some((Cow::Borrowed(t.trim()), false));
            }
        }
        if let Some(t) = query_token {
            return Some((Cow::Borrowed(t), false));
        }
        let cookie = req.cookie.as_deref()?;
        http::cookie(cookie, &self.mercure_cfg().cookie_name).map(|t| (Cow::Owned(t.to_string()), true))
    }

    /// Handles a request for the hub (`serves`).
    pub(crate) fn mercure_request(&mut self, t: usize, req: Request<'_>, body: &[u8]) {
        let ka = req.keep_alive;
        let cors = self.mercure_cors(&req);
        let rest = req.path.strip_prefix(PATH);
        let result = match (req.method(), rest) {
            (Method::Options, _) => {
                if cors.is_empty() {
                    Err::<(), Refusal>((403, Cow::Borrowed("origin not allowed: add it to mercure.cors_origins")))
                } else {
                    let lines = format!(
                        "{cors}Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n\
                         Access-Control-Allow-Headers: authorization, cache-control, last-event-id, content-type\r\n\
                         Access-Control-Max-Age: 600\r\n"
                    );
                    return self.respond(t, 204, &lines, b"", ka);
                }
            }
            (Method::Get | Method::Head, None | Some("/ui" | "/ui/")) => {
                let head = req.method() == Method::Head;
                return self.respond_head_or_get(t, 200, &cors, "text/html; charset=utf-8", PAGE, head, ka);
            }
            (Method::Get, Some("")) => match self.mercure_subscribe(t, &req, &cors) {
                Ok(()) => return,
                Err(r) => Err(r),
            },
            (Method::Post, Some("")) => match self.mercure_publish_request(t, &req, body, &cors) {
                Ok(()) => return,
                Err(r) => Err(r),
            },
            (Method::Get, Some(r)) if r == "/subscriptions" || r.starts_with("/subscriptions/") => {
                let raw = req.raw_path.strip_prefix("/.well-known/mercure/subscriptions").unwrap_or("");
                match self.mercure_subscriptions(&req, raw) {
                    Ok((etag, json)) => {
                        let lines = format!("{cors}ETag: \"{etag}\"\r\nCache-Control: no-cache\r\n");
                        if req.if_none_match.is_some_and(|v| v.trim_matches('"') == etag) {
                            return self.respond(t, 304, &lines, b"", ka);
                        }
                        return self.respond_typed(t, 200, &lines, "application/ld+json", json.as_bytes(), ka);
                    }
                    Err(r) => Err(r),
                }
            }
            (_, Some("")) => {
                self.counters.rejected += 1;
                return self.respond(t, 405, &format!("{cors}Allow: GET, POST, OPTIONS\r\n"), b"only GET, POST and OPTIONS here", ka);
            }
            _ => Err((404, Cow::Borrowed("not found"))),
        };
        if let Err((status, why)) = result {
            self.counters.rejected += 1;
            let lines = if status == 401 { format!("{cors}WWW-Authenticate: Bearer realm=\"mercure\"\r\n") } else { cors };
            self.respond(t, status, &lines, format!("{why}\n").as_bytes(), ka);
        }
    }

    // ---- publish ----

    fn mercure_publish_request(&mut self, t: usize, req: &Request<'_>, body: &[u8], cors: &str) -> Result<(), Refusal> {
        let query_token = http::query_arg(req.query, "authorization").flatten();
        let Some((token, from_cookie)) = self.mercure_token(req, query_token.as_deref()) else {
            return Err((401, Cow::Borrowed("a publisher JWT is needed (Authorization: Bearer)")));
        };
        if from_cookie {
            // A cookie goes with any request the browser makes to the hub: only pages of the
            // listed origins may publish with it.
            let origin = req.origin.unwrap_or("");
            let cfg = self.mercure_cfg();
            if !cfg.publish_origins.iter().any(|o| o == "*" || o == origin) {
                crate::debug!("mercure: a cookie-authorized publish from origin {origin:?} refused (mercure.publish_origins)");
                return Err((401, Cow::Borrowed("a publish with the cookie must come from an origin in mercure.publish_origins")));
            }
        }
        let claims = mercure::verify(&token, &self.mercure_cfg().publisher_key, self.now_secs).map_err(refusal)?;
        let form = mercure::parse_publish(body, mercure::MAX_TOPICS).map_err(refusal)?;
        let allowed = claims.publish.unwrap_or_default();
        if !mercure::can_publish(&allowed, &form.topics) {
            return Err((401, Cow::Borrowed("the JWT's mercure.publish does not cover every topic")));
        }
        let entry = Entry {
            id: form.id.unwrap_or_else(mercure::new_id),
            topics: form.topics,
            data: form.data,
            private: form.private,
            event_type: form.event_type,
            retry: form.retry,
            sub: None,
        };
        self.m().published += 1;
        self.mercure_bridge_to_channels(&entry);
        let id = entry.id.clone();
        if self.cluster.is_some() {
            let a = self.asker(t, req.keep_alive);
            self.cluster_mercure_publish(Some((a, cors.to_string())), &entry);
            return Ok(());
        }
        self.mercure_apply_local(entry);
        self.respond_typed(t, 200, cors, "text/plain; charset=utf-8", id.as_bytes(), req.keep_alive);
        Ok(())
    }

    /// Who a deferred HTTP answer goes to.
    fn asker(&self, t: usize, keep_alive: bool) -> crate::cluster::Asker {
        crate::cluster::Asker { token: t, conn: self.conns.get(t).map_or(0, |c| c.id), http: Some((keep_alive, false)) }
    }

    /// A public update, published on every one of its topics that is a channel id, for the
    /// subscribers of comet's own protocols.
    fn mercure_bridge_to_channels(&mut self, e: &Entry) {
        if e.private {
            return;
        }
        let max = self.cfg.limits.max_channel_id_bytes;
        let mut done: Vec<&str> = Vec::new();
        for topic in &e.topics {
            if !hub::valid_channel(topic, max) || topic.starts_with(hub::SESSION_PREFIX) || done.contains(&topic.as_str()) {
                continue;
            }
            done.push(topic);
            if self.cluster.is_some() {
                let a = crate::cluster::Asker { token: usize::MAX, conn: 0, http: None };
                self.cluster_publish_channel(a, topic, CHANNEL_CONTENT_TYPE, e.data.as_bytes());
            } else {
                self.publish_channel(topic, CHANNEL_CONTENT_TYPE, e.data.as_bytes());
            }
        }
    }

    /// A message published on `channel` through RESP or the push-module endpoint, as an update
    /// on topic `channel`: public when anyone may read the channel, private otherwise.
    pub(crate) fn mercure_relay(&mut self, channel: &str, body: &[u8]) {
        if self.mercure.is_none() || channel.starts_with(hub::SESSION_PREFIX) || channel.starts_with('@') || channel == crate::server::PRESENCE_CHANNEL {
            return;
        }
        let a = &*self.auth_cfg;
        let open = a.mode == AuthMode::None || a.open_channels.iter().any(|p| auth::pattern_match(p, channel));
        let entry = Entry {
            id: mercure::new_id(),
            topics: vec![channel.to_string()],
            data: String::from_utf8_lossy(body).into_owned(),
            private: !open,
            event_type: None,
            retry: None,
            sub: None,
        };
        if self.cluster.is_some() {
            self.cluster_mercure_publish(None, &entry);
        } else {
            self.mercure_apply_local(entry);
        }
    }

    /// Applies an update made on this single node: the next number of the hub's order.
    fn mercure_apply_local(&mut self, e: Entry) {
        let seq = self.m().hub.last_seq + 1;
        self.mercure_apply(seq, &e);
    }

    /// Applies update `seq` (made here, or arrived from Redis): kept, and written to every
    /// subscriber it is for.
    pub(crate) fn mercure_apply(&mut self, seq: u64, e: &Entry) {
        let Some(m) = self.mercure.as_mut() else { return };
        if let Some(s) = &e.sub {
            m.hub.apply_sub(s);
        }
        let Some(u) = m.hub.insert(Update::new(seq, e)) else { return };
        let mut to = std::mem::take(&mut m.recipients);
        m.hub.recipients(&u, &mut to);
        let mut n = 0;
        for &(id, t) in &to {
            let Some(c) = self.conns.get_mut(t) else { continue };
            let Phase::Mercure(s) = &mut c.phase else { continue };
            if s.id != id || c.dead {
                continue;
            }
            c.out.push(Chunk::Shared(u.sse.clone()));
            n += 1;
            // Written once the turn's input is handled (`flush_streams`), as comet's streams are.
            if !s.flush_queued {
                s.flush_queued = true;
                self.streams_to_flush.push(t);
            }
        }
        let m = self.m();
        m.delivered += n;
        m.recipients = to;
    }

    // ---- subscribe ----

    fn mercure_subscribe(&mut self, t: usize, req: &Request<'_>, cors: &str) -> Result<(), Refusal> {
        let q = mercure::parse_subscribe(req.query).map_err(refusal)?;
        let claims = match self.mercure_token(req, q.authorization.as_deref()) {
            Some((token, _)) => Some(mercure::verify(&token, &self.mercure_cfg().subscriber_key, self.now_secs).map_err(refusal)?),
            None if self.mercure_cfg().anonymous => None,
            None => return Err((401, Cow::Borrowed("a subscriber JWT is needed (mercure.anonymous is off)"))),
        };
        let last_event_id = req.last_event_id.map(str::to_string).or(q.last_event_id);
        let (allowed, payload, exp) = match claims {
            Some(c) => (mercure::selectors(&c.subscribe.unwrap_or_default()), c.payload, c.exp),
            None => (Vec::new(), None, None),
        };
        let id = self.stamp();
        let sub = Subscriber { token: t, selectors: mercure::selectors(&q.topics), allowed };
        let now = self.now;
        let m = self.m();
        let mut head = String::with_capacity(512);
        head.push_str("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n");
        head.push_str("Cache-Control: private, no-cache, no-store, must-revalidate, max-age=0\r\nPragma: no-cache\r\nExpires: 0\r\n");
        head.push_str("X-Accel-Buffering: no\r\nConnection: close\r\n");
        head.push_str(cors);
        let backlog = match last_event_id.as_deref() {
            Some(from) => {
                let (backlog, last) = match m.hub.resume(from, &sub) {
                    Resume::After(list) => (list, m.hub.last_id().unwrap_or("earliest").to_string()),
                    Resume::Unknown => (Vec::new(), "earliest".to_string()),
                };
                head.push_str(&format!("Last-Event-ID: {last}\r\n"));
                backlog
            }
            None => Vec::new(),
        };
        head.push_str("\r\n:\n");
        m.hub.subscribe(id, sub);
        m.beats.push_back((now + m.cfg.heartbeat, t, id));
        if let Some(exp) = exp {
            m.expiries.push(Reverse((exp, t, id)));
        }
        let subscriptions = m.cfg.subscriptions;
        let subscriber: Box<str> = mercure::new_id().into();
        m.delivered += backlog.len() as u64;
        let Some(c) = self.conns.get_mut(t) else { return Ok(()) };
        c.out.append(|o| o.extend_from_slice(head.as_bytes()));
        for u in backlog {
            c.out.push(Chunk::Shared(u.sse.clone()));
        }
        c.stamp = id;
        c.phase = Phase::Mercure(Box::new(Subscription { id, subscriber: subscriber.clone(), topics: q.topics.clone(), payload: payload.clone(), flush_queued: false }));
        self.flush(t);
        if subscriptions {
            for topic in &q.topics {
                self.mercure_subscription_event(topic, &subscriber, true, payload.clone(), None);
            }
        }
        Ok(())
    }

    /// Publishes the private update that says a subscription started or ended, on
    /// `/.well-known/mercure/subscriptions/{topic}/{subscriber}`. `node` names another node
    /// whose subscription it ends (that node died).
    pub(crate) fn mercure_subscription_event(&mut self, topic: &str, subscriber: &str, active: bool, payload: Option<serde_json::Value>, node: Option<&str>) {
        let node = node.map(str::to_string).or_else(|| self.cluster.as_ref().map(|c| c.cfg.node.clone())).unwrap_or_default();
        let entry = Entry {
            id: mercure::new_id(),
            topics: vec![mercure::subscription_topic(topic, subscriber)],
            data: mercure::subscription_json(topic, subscriber, active, payload.as_ref()),
            private: true,
            event_type: None,
            retry: None,
            sub: Some(SubEvent { topic: topic.to_string(), subscriber: subscriber.to_string(), active, payload, node }),
        };
        if self.cluster.is_some() {
            self.cluster_mercure_publish(None, &entry);
        } else {
            self.mercure_apply_local(entry);
        }
    }

    /// A subscriber's input: an event stream sends nothing after its request; anything is dropped.
    pub(crate) fn mercure_input(&mut self, t: usize) {
        if let Some(c) = self.conns.get_mut(t) {
            c.inbuf.clear();
        }
    }

    /// Frees what a subscriber holds as its connection is reaped, and says its subscriptions ended.
    pub(crate) fn mercure_closed(&mut self, s: &Subscription) {
        let Some(m) = self.mercure.as_mut() else { return };
        m.hub.unsubscribe(s.id);
        if m.cfg.subscriptions && self.stopping.is_none() {
            for topic in &s.topics {
                self.mercure_subscription_event(topic, &s.subscriber, false, s.payload.clone(), None);
            }
        }
    }

    /// Heartbeats due, and streams whose JWT expired.
    pub(crate) fn mercure_tick(&mut self, now: Instant) {
        let Some(m) = self.mercure.as_mut() else { return };
        let every = m.cfg.heartbeat;
        let mut due = Vec::new();
        while m.beats.front().is_some_and(|b| b.0 <= now) {
            if let Some(b) = m.beats.pop_front() {
                due.push(b);
            }
        }
        let mut expired = Vec::new();
        while m.expiries.peek().is_some_and(|Reverse(e)| e.0 <= self.now_secs) {
            if let Some(Reverse((_, t, id))) = m.expiries.pop() {
                expired.push((t, id));
            }
        }
        for (_, t, id) in due {
            let Some(c) = self.conns.get_mut(t) else { continue };
            match &c.phase {
                Phase::Mercure(s) if s.id == id && !c.dead => {}
                _ => continue,
            }
            c.out.append(|o| o.extend_from_slice(b":\n"));
            self.m().beats.push_back((now + every, t, id));
            self.flush(t);
        }
        for (t, id) in expired {
            let Some(c) = self.conns.get_mut(t) else { continue };
            match &c.phase {
                Phase::Mercure(s) if s.id == id && !c.dead => {}
                _ => continue,
            }
            // The spec's MUST: the stream ends with the token; the browser reconnects with a new one.
            crate::debug!("mercure: stream of {} closed at its JWT's exp", c.peer);
            c.close_after_write = true;
            if c.out.is_empty() {
                self.kill(t);
            } else {
                self.flush(t);
            }
        }
    }

    // ---- the subscriptions API ----

    /// `GET /.well-known/mercure/subscriptions[/{topic}[/{subscriber}]]`: (ETag, JSON-LD body).
    fn mercure_subscriptions(&self, req: &Request<'_>, raw: &str) -> Result<(String, String), Refusal> {
        let cfg = self.mercure_cfg();
        if !cfg.subscriptions {
            return Err((404, Cow::Borrowed("the subscriptions API is off (mercure.subscriptions)")));
        }
        let (topic, subscriber) = mercure::parse_subscriptions_path(raw).map_err(refusal)?;
        let query_token = http::query_arg(req.query, "authorization").flatten();
        let Some((token, _)) = self.mercure_token(req, query_token.as_deref()) else {
            return Err((401, Cow::Borrowed("a subscriber JWT is needed")));
        };
        let claims = mercure::verify(&token, &cfg.subscriber_key, self.now_secs).map_err(refusal)?;
        let url = match (&topic, &subscriber) {
            (Some(t), Some(s)) => mercure::subscription_topic(t, s),
            (Some(t), None) => format!("{PATH}/subscriptions/{}", mercure::query_escape(t)),
            _ => format!("{PATH}/subscriptions"),
        };
        let allowed: Vec<Selector> = mercure::selectors(&claims.subscribe.unwrap_or_default());
        if !allowed.iter().any(|s| s.matches(&url)) {
            return Err((401, Cow::Borrowed("the JWT's mercure.subscribe does not cover this URL")));
        }
        let hub = &self.mercure.as_ref().expect("mercure on").hub;
        let last = hub.last_id().unwrap_or("earliest").to_string();
        let items: Vec<serde_json::Value> = hub
            .active(topic.as_deref(), subscriber.as_deref())
            .into_iter()
            .map(|(t, s, a)| mercure::subscription_value(t, s, true, a.payload.as_ref()))
            .collect();
        if subscriber.is_some() {
            let Some(one) = items.into_iter().next() else { return Err((404, Cow::Borrowed("no such subscription"))) };
            let mut one = one;
            one["lastEventID"] = serde_json::Value::String(last.clone());
            return Ok((last, one.to_string()));
        }
        Ok((last.clone(), mercure::subscriptions_collection(&url, &last, &items)))
    }

    /// The `# Mercure` section of INFO.
    pub fn mercure_info(&self) -> String {
        let Some(m) = &self.mercure else { return String::new() };
        format!(
            "# Mercure\r\nmercure_subscribers:{}\r\nmercure_history:{}\r\nmercure_published:{}\r\nmercure_delivered:{}\r\nmercure_subscriptions:{}\r\n",
            m.hub.subscribers(),
            m.hub.history_len(),
            m.published,
            m.delivered,
            m.hub.active_count()
        )
    }
}
