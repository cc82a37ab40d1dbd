//! The admin HTTP listener: the nginx push module's publisher endpoint (`POST`/`PUT` publish,
//! `GET` channel info, `DELETE` channel) for backends that would rather use curl than a Redis
//! client, and `GET /status` with the `INFO` text. Same tokens as the control socket, as
//! `Authorization: Bearer <secret>`.

use crate::http::{self, Method, Request};
use crate::hub;
use crate::server::Server;

/// The admin page, served at `/` on the admin listener.
const ADMIN_PAGE: &[u8] = include_bytes!("admin.html");

/// The hub channel the admin page's live snapshots go to. `@` is not a channel id character,
/// so no browser on the public listener can subscribe to it.
pub const ADMIN_CHANNEL: &str = "@admin";

/// Compares secrets in time independent of where they differ.
pub fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The push module's channel info (text, or JSON) and its content type.
pub fn info_body(messages: usize, requested: Option<u64>, subscribers: usize, last: Option<hub::MsgId>, json: bool) -> (&'static str, String) {
    let requested = requested.map_or(-1, |s| s as i64);
    let last = last.map(|id| id.to_string()).unwrap_or_default();
    if json {
        (
            "application/json",
            format!("{{\"messages\":{messages},\"requested\":{requested},\"subscribers\":{subscribers},\"last_message_id\":\"{last}\"}}\n"),
        )
    } else {
        (
            "text/plain; charset=utf-8",
            format!("queued messages: {messages}\r\nlast requested: {requested} sec. ago\r\nactive subscribers: {subscribers}\r\nlast message id: {last}\r\n"),
        )
    }
}

impl Server {
    /// The token name whose secret is `secret`.
    pub fn token_by_secret(&self, secret: &[u8]) -> Option<&str> {
        // Every token is compared, so the time taken does not tell which one matched.
        let mut found = None;
        for (name, s) in &self.cfg.tokens {
            if secret_eq(s.as_bytes(), secret) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// Logs a wrong token, at most one line a second (with how many were held back), and the
    /// moment an address is put under penalty.
    pub(crate) fn log_auth_failure(&mut self, peer: std::net::SocketAddr, listener: &str, blocked: bool) {
        if blocked {
            crate::warn!(
                "{listener}: {} refused for {} s after {} failed token checks",
                peer.ip(),
                self.cfg.limits.auth_penalty.as_secs(),
                self.cfg.limits.auth_max_failures
            );
        } else if let Some(held_back) = self.guard.may_log(self.now) {
            let more = if held_back > 0 { format!(" ({held_back} more since the last line)") } else { String::new() };
            crate::warn!("{listener}: wrong token from {peer}{more}");
        }
    }

    /// Handles one request on the admin listener.
    pub(crate) fn admin_request(&mut self, t: usize, req: Request<'_>, body: &[u8]) {
        let ka = req.keep_alive;
        if req.path == "/" && req.method() == Method::Get {
            // The page holds no data: it asks for the token (kept in the URL fragment, never sent
            // to a server) and uses it to long-poll /live.
            return self.respond_typed(t, 200, "Cache-Control: no-cache\r\n", "text/html; charset=utf-8", ADMIN_PAGE, ka);
        }
        if !self.cfg.tokens.is_empty() {
            let peer = self.conns[t].peer;
            if let Some(left) = self.guard.blocked(peer.ip(), self.now) {
                self.counters.rejected += 1;
                self.log_refusal(2, &format!("admin penalty {}", peer.ip()), || {
                    format!("admin: {peer} refused 429: under penalty for failed token checks ({} s left)", left.as_secs() + 1)
                });
                let lines = format!("Retry-After: {}\r\n", left.as_secs() + 1);
                return self.respond(t, 429, &lines, b"too many failed token checks from this address", false);
            }
            let secret = req.authorization.and_then(|a| a.strip_prefix("Bearer ")).map(str::trim);
            if secret.and_then(|s| self.token_by_secret(s.as_bytes())).is_none() {
                self.counters.rejected += 1;
                // A request without any token is a mistake, not a guess: only wrong tokens count.
                let blocked = secret.is_some() && self.guard.failed(peer.ip(), self.now);
                if secret.is_some() {
                    self.log_auth_failure(peer, "admin", blocked);
                } else {
                    let path = &req.path;
                    self.log_refusal(2, &format!("admin no token {}", peer.ip()), || {
                        format!("admin: {path:?} from {peer} refused 401: no Authorization: Bearer <token> header")
                    });
                }
                return self.respond(t, 401, "WWW-Authenticate: Bearer\r\n", b"a token is required: Authorization: Bearer <secret>", ka);
            }
        }
        if req.path == "/live" && req.method() == Method::Get {
            // The admin page's push: a long-poll on the snapshots the loop publishes each second
            // while someone watches.
            let echo = match http::cursor(&req) {
                Ok(c) => c,
                Err(e) => return self.reject(t, e.status, e.reason, ka),
            };
            let cursor = echo.map_or(hub::Cursor::Newest, hub::Cursor::After);
            let p = crate::conn::PendingPoll {
                channel: ADMIN_CHANNEL.into(),
                sid: "".into(),
                cursor,
                echo,
                lines: None,
                keep_alive: ka,
                multipart: false,
                transport: crate::conn::Transport::LongPoll,
                asked: self.now,
                generation: 0,
            };
            return self.hold(t, p, None);
        }
        if matches!(&*req.path, "/status" | "/metrics") {
            if req.method() != Method::Get {
                return self.respond(t, 405, "Allow: GET\r\n", b"GET only", ka);
            }
            return if req.path == "/metrics" {
                let text = self.metrics_text();
                self.respond_typed(t, 200, "", "text/plain; version=0.0.4", text.as_bytes(), ka)
            } else {
                let json = self.status_json();
                self.respond_typed(t, 200, "", "application/json", json.as_bytes(), ka)
            };
        }
        let channel = if let Some(rest) = req.path.strip_prefix("/pub/") {
            std::borrow::Cow::Borrowed(rest)
        } else if req.path == "/pub" {
            match http::query_arg(req.query, "id") {
                Some(Some(id)) => id,
                _ => return self.reject(t, 400, "missing or badly encoded id argument", ka),
            }
        } else {
            return self.reject(t, 404, "not found: use /pub?id=<channel> or /status", ka);
        };
        if !hub::valid_channel(&channel, self.cfg.limits.max_channel_id_bytes) {
            return self.reject(t, 400, "bad channel id", ka);
        }
        let json = req.accept.is_some_and(|a| a.contains("application/json"));
        match req.method() {
            Method::Post | Method::Put | Method::Get | Method::Delete if self.cluster.is_some() => {
                // Through Redis; the answer comes with its reply.
                let a = crate::cluster::Asker { token: t, conn: self.conns[t].id, http: Some((ka, json)) };
                match req.method() {
                    Method::Get => self.cluster_info(a, &channel),
                    Method::Delete => self.cluster_delete(a, &channel),
                    _ => {
                        let ct = req.content_type.filter(|c| !c.is_empty()).unwrap_or("text/plain");
                        self.cluster_publish(a, &channel, ct, body);
                    }
                }
            }
            Method::Post | Method::Put => {
                let ct = req.content_type.filter(|c| !c.is_empty()).unwrap_or("text/plain");
                let n = self.publish(&channel, ct, body);
                let status = if n > 0 { 201 } else { 202 };
                if self.store_acks_wait() {
                    // fsync = "always": the answer waits until the message is on disk.
                    let (ct, info) = self.channel_info_body(&channel, json);
                    self.defer_reply(t, crate::server::Deferred::Http(status, ct, info.into_bytes(), ka));
                    return;
                }
                self.channel_info(t, &channel, status, json, ka);
            }
            Method::Get => self.channel_info(t, &channel, 200, json, ka),
            Method::Delete => match self.channel_deleted(&channel) {
                Some(n) => {
                    let body = format!("channel deleted, {n} subscribers gone\n");
                    self.respond(t, 200, "", body.as_bytes(), ka)
                }
                None => self.reject(t, 404, "no such channel", ka),
            },
            _ => self.respond(t, 405, "Allow: GET, POST, PUT, DELETE\r\n", b"method not allowed", ka),
        }
    }

    /// Deletes a channel (here, or on every node of a cluster): its held polls get 410. The
    /// number of them, None if the channel did not exist here.
    pub(crate) fn channel_deleted(&mut self, channel: &str) -> Option<usize> {
        let waiters = self.hub.delete(channel)?;
        self.store_delete(channel);
        let n = waiters.len();
        self.end_holds(waiters, 410, "channel deleted");
        crate::info!("channel {channel} deleted ({n} held polls answered 410)");
        Some(n)
    }

    fn reject(&mut self, t: usize, status: u16, why: &str, ka: bool) {
        self.counters.rejected += 1;
        if let Some(peer) = self.conns.get(t).map(|c| c.peer) {
            self.log_refusal(2, &format!("admin {status} {why} {}", peer.ip()), || format!("admin: request from {peer} refused {status}: {why}"));
        }
        self.respond(t, status, "", why.as_bytes(), ka)
    }

    /// The channel info body (text, or JSON), and its content type; None when absent.
    fn channel_info_body(&self, channel: &str, json: bool) -> (&'static str, String) {
        let Some(i) = self.hub.info(channel, self.now_secs) else { return ("", String::new()) };
        info_body(i.messages, i.last_requested, i.subscribers, i.last_id, json)
    }

    fn channel_info(&mut self, t: usize, channel: &str, status: u16, json: bool, ka: bool) {
        let (ct, body) = self.channel_info_body(channel, json);
        if ct.is_empty() {
            return self.reject(t, 404, "no such channel", ka);
        }
        self.respond_typed(t, status, "", ct, body.as_bytes(), ka)
    }
}
