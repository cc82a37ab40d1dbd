//! Browser requests on the long-poll listener: identify the browser by its session cookie, pick
//! the channel and cursor, check who may read it, then either answer at once from the buffer or
//! hold the poll in the hub. Compatible with the nginx push module and nchan's long-poll
//! subscriber (`/sub/<id>`, `/subscribe?id=`, `Last-Modified`/`Etag` cursor, 408 on timeout).

use crate::config::FirstMessage;
use crate::http::{self, Method, Request};
use crate::hub::{self, Cursor};
use crate::server::Server;
use std::sync::Arc;

/// The path by which a page names its own private channel without knowing its session id.
pub const MY_CHANNEL: &str = "@me";

/// Why a subscribe request is refused.
struct Refusal(u16, &'static str);

impl Server {
    /// CORS header lines for a request from an allowed origin; empty otherwise.
    fn cors_lines(&self, req: &Request) -> String {
        let Some(origin) = req.origin.as_deref() else { return String::new() };
        let allowed = &self.cfg.browser.allowed_origins;
        if !allowed.iter().any(|o| o == "*" || o == origin) {
            return String::new();
        }
        // The exact origin, never `*`: browsers refuse `*` on credentialed (cookie) requests.
        format!(
            "Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\n\
             Access-Control-Expose-Headers: Last-Modified, Etag, Content-Type\r\nVary: Origin\r\n"
        )
    }

    /// Handles one request on the browser listener.
    pub(crate) fn browser_request(&mut self, t: usize, req: Request) {
        let keep_alive = req.keep_alive;
        let cors = self.cors_lines(&req);
        match req.method() {
            Method::Options => {
                if cors.is_empty() {
                    self.counters.rejected += 1;
                    return self.respond(t, 403, "", b"origin not allowed", keep_alive);
                }
                let lines = format!(
                    "{cors}Access-Control-Allow-Methods: GET, OPTIONS\r\n\
                     Access-Control-Allow-Headers: If-Modified-Since, If-None-Match, Last-Event-ID, Cache-Control, X-Requested-With\r\n\
                     Access-Control-Max-Age: 600\r\n"
                );
                self.respond(t, 204, &lines, b"", keep_alive)
            }
            Method::Get => match self.subscribe_target(&req) {
                Ok((channel, cursor, echo)) => self.hold(t, &channel, cursor, echo, Arc::from(cors.as_bytes()), keep_alive),
                Err(Refusal(status, why)) => {
                    self.counters.rejected += 1;
                    self.respond(t, status, &cors, why.as_bytes(), keep_alive)
                }
            },
            _ => {
                self.counters.rejected += 1;
                let lines = format!("{cors}Allow: GET, OPTIONS\r\n");
                self.respond(t, 405, &lines, b"only GET and OPTIONS here", keep_alive)
            }
        }
    }

    /// The channel, starting cursor and cursor to echo for a subscribe request, or why not.
    fn subscribe_target(&self, req: &Request) -> Result<(String, Cursor, Option<hub::MsgId>), Refusal> {
        let raw = if let Some(rest) = req.path.strip_prefix("/sub/") {
            rest.to_string()
        } else if req.path == "/subscribe" || req.path == "/sub" {
            match http::query_arg(&req.query, "id") {
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
                Some(s) if hub::valid_session(s) => format!("{}{s}", hub::SESSION_PREFIX),
                _ => return Err(Refusal(403, "no session: @me needs the session cookie")),
            }
        } else {
            raw
        };
        if !hub::valid_channel(&channel, self.cfg.limits.max_channel_id_bytes) {
            return Err(Refusal(400, "bad channel id"));
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
        Ok((channel, cursor, echo))
    }
}
