//! Browser requests on the long-poll listener: identify the browser by its session cookie, pick
//! the channel and cursor, check who may read it, then either answer at once from the buffer or
//! hold the poll in the hub. Compatible with the nginx push module and nchan's long-poll
//! subscriber (`/sub/<id>`, `/subscribe?id=`, `Last-Modified`/`Etag` cursor, 408 on timeout).

use std::borrow::Cow;

use crate::auth::{self, Verdict};
use crate::config::{AuthMode, FirstMessage};
use crate::conn::{PendingPoll, Transport};
use crate::http::{self, Method, Request};
use crate::hub::{self, Cursor};
use crate::conn::Phase;
use crate::server::{Server, AUTH_BUCKETS};
use crate::worker::{self, Outcome, Ticket};
use std::sync::Arc;

/// The path by which a page names its own private channel without knowing its session id.
pub const MY_CHANNEL: &str = "@me";

/// The browser client, served at `/comet.js` so a page needs nothing else.
const CLIENT_JS: &[u8] = include_bytes!("comet.js");

/// The client's ETag: a hash of its bytes, the same for every run of one build.
fn client_etag() -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    CLIENT_JS.hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

/// Why a subscribe request is refused.
struct Refusal(u16, &'static str);

/// What a subscribe target resolves to.
struct Target<'a> {
    channel: Cow<'a, str>,
    sid: &'a str,
    cursor: Cursor,
    echo: Option<hub::MsgId>,
}

/// How a poll's access is decided.
enum Access {
    /// Allowed without asking anyone.
    Open,
    /// Refused at once.
    Refused(Refusal),
    /// Decided from the cache.
    Cached(Verdict),
    /// A worker must ask the database or the application.
    Ask(crate::worker::Task),
}

impl Server {
    /// CORS header lines for a request from an allowed origin; empty otherwise.
    fn cors_lines(&self, req: &Request<'_>) -> String {
        let Some(origin) = req.origin else { return String::new() };
        let allowed = &self.cfg.browser.allowed_origins;
        if !allowed.iter().any(|o| o == "*" || o == origin) {
            return String::new();
        }
        // The exact origin, never `*`: browsers refuse `*` on credentialed (cookie) requests.
        format!(
            "Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\n\
             Access-Control-Expose-Headers: Last-Modified, Etag, Content-Type, X-Comet-Channel\r\nVary: Origin\r\n"
        )
    }

    /// Whether a WebSocket handshake's `Origin` may open a stream: none (not a browser), the
    /// request's own host, or one of `browser.allowed_origins`.
    fn ws_origin_allowed(&self, req: &Request<'_>) -> bool {
        let Some(origin) = req.origin else { return true };
        let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
        req.host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) || self.cfg.browser.allowed_origins.iter().any(|o| o == "*" || o == origin)
    }

    /// Refuses a request for its Origin (a WebSocket handshake, or a CORS preflight) with a 403
    /// that says why, and logs the same, once a minute per Origin. The usual cause of a refused
    /// WebSocket from the site itself is a proxy that rewrote the Host, so both are named.
    fn refuse_origin(&mut self, t: usize, req: &Request<'_>, websocket: bool, keep_alive: bool) {
        self.counters.rejected += 1;
        let origin = req.origin.unwrap_or_default();
        let host = req.host.unwrap_or("(none)");
        let allowed = format!("{:?}", self.cfg.browser.allowed_origins);
        // The body names no allowed origin: any site's page may read it.
        let body = if websocket {
            format!(
                "origin not allowed: Origin {origin} matches neither the Host this request carried ({host}) nor [browser] allowed_origins; \
                 behind nginx set `proxy_set_header Host $http_host;`, or list the origin in allowed_origins\n"
            )
        } else {
            format!("origin not allowed: Origin {origin} is not in [browser] allowed_origins\n")
        };
        let key = format!("origin {origin}");
        self.log_refusal(1, &key, || {
            if websocket {
                format!(
                    "WebSocket refused 403: Origin {origin:?} matches neither the request's Host {host:?} nor [browser] allowed_origins {allowed}; \
                     behind nginx add `proxy_set_header Host $http_host;` to the location, or list the origin in [browser] allowed_origins \
                     (logged at most once a minute per Origin)"
                )
            } else {
                format!(
                    "CORS preflight refused 403: Origin {origin:?} is not in [browser] allowed_origins {allowed}; \
                     list it there to let that site's pages poll (logged at most once a minute per Origin)"
                )
            }
        });
        self.respond(t, 403, "", body.as_bytes(), keep_alive)
    }

    /// Logs a refused browser request, once a minute per reason and address.
    fn log_browser_refusal(&mut self, t: usize, req: &Request<'_>, status: u16, why: &str) {
        let Some(peer) = self.conns.get(t).map(|c| c.peer) else { return };
        let path = &req.path;
        self.log_refusal(2, &format!("{status} {why} {}", peer.ip()), || format!("browser {peer}: {path:?} refused {status}: {why}"));
    }

    /// Handles one request on the browser listener.
    pub(crate) fn browser_request(&mut self, t: usize, req: Request<'_>) {
        let keep_alive = req.keep_alive;
        let cors = self.cors_lines(&req);
        match req.method() {
            Method::Options => {
                if cors.is_empty() {
                    return self.refuse_origin(t, &req, false, keep_alive);
                }
                let lines = format!(
                    "{cors}Access-Control-Allow-Methods: GET, OPTIONS\r\n\
                     Access-Control-Allow-Headers: If-Modified-Since, If-None-Match, Last-Event-ID, Cache-Control, X-Requested-With\r\n\
                     Access-Control-Max-Age: 600\r\n"
                );
                self.respond(t, 204, &lines, b"", keep_alive)
            }
            Method::Get | Method::Head if req.path == "/comet.js" => {
                // Cached for a day, then revalidated by its ETag (a hash of the file).
                let etag = client_etag();
                let lines = format!("{cors}Cache-Control: public, max-age=86400\r\nETag: {etag}\r\n");
                if req.if_none_match == Some(etag.as_str()) {
                    return self.respond(t, 304, &lines, b"", keep_alive);
                }
                let head = req.method() == Method::Head;
                self.respond_head_or_get(t, 200, &lines, "application/javascript; charset=utf-8", CLIENT_JS, head, keep_alive)
            }
            Method::Get => {
                let transport = match crate::stream::transport_of(&req) {
                    Ok(tr) => tr,
                    Err((status, lines, why)) => {
                        self.counters.rejected += 1;
                        self.log_browser_refusal(t, &req, status, why);
                        return self.respond(t, status, &format!("{cors}{lines}"), why.as_bytes(), false);
                    }
                };
                if matches!(transport, Transport::WebSocket { .. }) && !self.ws_origin_allowed(&req) {
                    // Browsers apply no CORS to WebSockets but send the cookie: without this check
                    // any site's page could read a visitor's private channel.
                    return self.refuse_origin(t, &req, true, false);
                }
                let refused = match self.subscribe_target(&req) {
                    Ok(target) => match self.access(t, &req, &target) {
                        Access::Refused(r) => r,
                        access => {
                            let Target { channel, sid, cursor, echo } = target;
                            let multipart = req.accept.is_some_and(|a| a.contains("multipart/mixed"))
                                || http::query_arg(req.query, "multipart").is_some_and(|v| v.as_deref() == Some("1"));
                            let p = PendingPoll { channel, sid: Cow::Borrowed(sid), cursor, echo, lines: (!cors.is_empty()).then(|| Arc::from(cors.as_bytes())), keep_alive, multipart, transport, asked: self.now, generation: 0 };
                            return match access {
                                Access::Ask(task) => self.submit_check(t, p, task),
                                Access::Cached(v) => self.access_decided(t, p, v),
                                _ => self.hold(t, p, None),
                            };
                        }
                    },
                    Err(r) => r,
                };
                self.counters.rejected += 1;
                self.log_browser_refusal(t, &req, refused.0, refused.1);
                self.respond(t, refused.0, &cors, refused.1.as_bytes(), keep_alive)
            }
            _ => {
                self.counters.rejected += 1;
                self.log_browser_refusal(t, &req, 405, "only GET and OPTIONS here");
                let lines = format!("{cors}Allow: GET, OPTIONS\r\n");
                self.respond(t, 405, &lines, b"only GET and OPTIONS here", keep_alive)
            }
        }
    }

    /// How this poll's access is decided: private channels were checked by `subscribe_target`;
    /// then open patterns, a signed key, the mode, the cache, and last a worker job.
    fn access(&mut self, t: usize, req: &Request<'_>, target: &Target<'_>) -> Access {
        // Borrowed while the poll is decided here; only a check sent to a worker takes a reference.
        let a = &*self.auth_cfg;
        let (channel, sid) = (&*target.channel, target.sid);
        if channel.starts_with(hub::SESSION_PREFIX) || a.open_channels.iter().any(|p| auth::pattern_match(p, channel)) {
            return Access::Open;
        }
        if let Some(key) = http::query_arg(req.query, "key") {
            let expires = http::query_arg(req.query, "expires").flatten().and_then(|e| e.parse::<u64>().ok());
            let ok = match (key, expires, a.key_secret.is_empty()) {
                (Some(key), Some(exp), false) => {
                    auth::verify(&a.key_secret, channel, sid, &key, exp, self.now_secs)
                        || auth::verify(&a.key_secret, channel, "", &key, exp, self.now_secs)
                }
                _ => false,
            };
            return if ok { Access::Open } else { Access::Refused(Refusal(403, "bad or expired key")) };
        }
        match a.mode {
            AuthMode::None => return Access::Open,
            AuthMode::Key => return Access::Refused(Refusal(403, "this channel needs a signed key")),
            AuthMode::Sqlite if sid.is_empty() => return Access::Refused(Refusal(403, "no session")),
            AuthMode::Sqlite | AuthMode::Http => {}
        }
        if let Some(v) = self.auth_cache.get(sid, channel, self.now) {
            self.counters.auth_cache_hits += 1;
            return Access::Cached(v);
        }
        let (sid, channel) = (sid.to_string(), channel.to_string());
        let a = self.auth_cfg.clone();
        if a.mode == AuthMode::Sqlite {
            return Access::Ask(Box::new(move |res| {
                crate::worker::Outcome::Access(auth::check_sqlite(res.auth_db.as_ref(), &a, &sid, &channel))
            }));
        }
        let cb = auth::CallbackRequest {
            cookie: req.cookie.as_deref().unwrap_or_default().to_string(),
            sid,
            channel,
            client: self.conns[t].peer.ip().to_string(),
            uri: if req.query.is_empty() { req.path.to_string() } else { format!("{}?{}", req.path, req.query) },
        };
        Access::Ask(Box::new(move |res| crate::worker::Outcome::Access(auth::check_http(&res.http, &a.url, &cb))))
    }

    /// The channel, session, starting cursor and cursor to echo for a subscribe request.
    fn subscribe_target<'a>(&self, req: &'a Request<'_>) -> Result<Target<'a>, Refusal> {
        let raw = if let Some(rest) = req.path.strip_prefix("/sub/") {
            Cow::Borrowed(rest)
        } else if req.path == "/subscribe" || req.path == "/sub" {
            match http::query_arg(req.query, "id") {
                Some(Some(id)) => id,
                Some(None) => return Err(Refusal(400, "bad percent-encoding in id")),
                None => return Err(Refusal(400, "missing id argument")),
            }
        } else {
            return Err(Refusal(404, "not found: subscribe at /sub/<channel>"));
        };
        let sid = req.cookie.as_deref().and_then(|c| http::cookie(c, &self.cfg.browser.session_cookie));
        let channel = if raw == MY_CHANNEL {
            match sid {
                Some(s) if hub::valid_session(s) => Cow::Owned(format!("{}{s}", hub::SESSION_PREFIX)),
                _ => return Err(Refusal(403, "no session: @me needs the session cookie")),
            }
        } else {
            raw
        };
        if !hub::valid_channel(&channel, self.cfg.limits.max_channel_id_bytes) {
            return Err(Refusal(400, "bad channel id"));
        }
        if sid.is_some_and(|s| self.hub.is_kicked(s)) {
            return Err(Refusal(403, "session kicked: the application must open it again"));
        }
        if let Some(owner) = channel.strip_prefix(hub::SESSION_PREFIX) {
            // Private: the cookie must be the owner's, and the backend must have opened it.
            if sid != Some(owner) {
                return Err(Refusal(403, "private channel of another session"));
            }
            if self.hub.session(owner).is_none() {
                return Err(Refusal(403, "session not open"));
            }
        }
        let echo = http::cursor(req).map_err(|e| Refusal(e.status, e.reason))?;
        let cursor = match (echo, self.cfg.browser.first_message) {
            (Some(id), _) => Cursor::After(id),
            (None, FirstMessage::Oldest) => Cursor::Oldest,
            (None, FirstMessage::Newest) => Cursor::Newest,
        };
        Ok(Target { channel, sid: sid.unwrap_or(""), cursor, echo })
    }

    /// A worker answered a poll's access check: the poll goes on if it still waits for it.
    pub(crate) fn access_done(&mut self, ticket: Ticket, outcome: Outcome) {
        let Some(c) = self.conns.get_mut(ticket.token) else { return };
        if c.dead || c.stamp != ticket.stamp || !matches!(c.phase, Phase::Authorizing(_)) {
            // The browser left, or the check timed out (504 already sent): the answer is moot.
            return;
        }
        let Phase::Authorizing(p) = std::mem::replace(&mut c.phase, Phase::Idle) else { return };
        let verdict = match outcome {
            Outcome::Access(v) => v,
            Outcome::Failed | Outcome::Rows(_) | Outcome::Stored(..) => Verdict::Deny(503),
        };
        let took = self.now.saturating_duration_since(p.asked).as_secs_f64();
        let k = &mut self.counters;
        k.auth_latency_sum += took;
        for (i, bound) in AUTH_BUCKETS.iter().enumerate() {
            if took <= *bound {
                k.auth_latency[i] += 1;
            }
        }
        match verdict {
            Verdict::Allow(_) => k.auth_allowed += 1,
            Verdict::Deny(503 | 504) => k.auth_failed += 1,
            Verdict::Deny(_) => k.auth_denied += 1,
        }
        // Transient failures (database locked, callback down) are not remembered, nor an answer
        // to a question asked before the backend flushed the cache (it may be out of date).
        if !matches!(verdict, Verdict::Deny(503 | 504)) && p.generation == self.auth_generation {
            self.auth_cache.put(&p.sid, &p.channel, verdict.clone(), self.now);
        }
        self.access_decided(ticket.token, *p, verdict);
    }


    /// Continues a poll once its access is known.
    pub(crate) fn access_decided(&mut self, t: usize, p: PendingPoll<'_>, verdict: Verdict) {
        match verdict {
            Verdict::Allow(user) => self.hold(t, p, user),
            Verdict::Deny(status) => {
                self.counters.rejected += 1;
                let why = match status {
                    503 => "the access check failed (database or callback unavailable, or the worker queue full)",
                    504 => "the access check did not answer within workers.job_timeout_ms",
                    _ => "the access check denied it",
                };
                let ip = self.conns.get(t).map(|c| c.peer.ip());
                let channel = &p.channel;
                self.log_refusal(2, &format!("{status} check {ip:?}"), || {
                    format!("browser {}: poll on {channel:?} refused {status}: {why}", ip.map_or_else(String::new, |i| i.to_string()))
                });
                let lines = String::from_utf8_lossy(p.lines.as_deref().unwrap_or_default()).into_owned();
                let retry = if status == 503 { "Retry-After: 1\r\n" } else { "" };
                self.respond(t, status, &format!("{lines}{retry}"), b"access denied", p.keep_alive)
            }
        }
    }

    /// Sends a poll's access check to the pool. A full queue answers 503 at once.
    pub(crate) fn submit_check(&mut self, t: usize, p: PendingPoll<'_>, task: worker::Task) {
        let stamp = self.stamp();
        match self.pool.submit(Ticket { token: t, stamp }, task) {
            Ok(()) => {
                self.counters.auth_jobs += 1;
                let mut p = p;
                p.generation = self.auth_generation;
                let Some(c) = self.conns.get_mut(t) else { return };
                c.stamp = stamp;
                c.phase = Phase::Authorizing(Box::new(p.into_owned()));
                self.start_job_timer(t, stamp);
            }
            Err(worker::Busy) => {
                self.counters.jobs_refused += 1;
                let queue = self.cfg.workers.queue;
                let channel = &p.channel;
                self.log_refusal(1, "worker queue full", || format!("worker queue full ({queue} jobs, workers.queue): poll on {channel} refused with 503"));
                self.access_decided(t, p, Verdict::Deny(503));
            }
        }
    }
}
