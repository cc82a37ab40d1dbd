//! The control socket: Redis-protocol commands from backends (phpredis, predis, redis-cli).
//! Frames are parsed by `resp.rs`; this file checks authentication and arity, then acts on the
//! hub through the loop (`Server::publish`, sessions) and queues the reply. Replies keep the
//! order of pipelined commands because each is appended to the connection's output in turn.

use crate::hub;
use crate::resp;
use crate::server::Server;

/// Most arguments in one command: enough for any command here, small enough that a hostile
/// count cannot make the parser work hard.
const MAX_ARGS: usize = 1024;
/// Longest inline command line, as Redis.
const MAX_INLINE: usize = 64 * 1024;

/// Content type of messages published over RESP (they have no header to say otherwise).
pub const RESP_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// A reply to one command.
enum Reply {
    Simple(&'static str),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Null,
    EmptyArray,
    /// An already encoded reply (arrays, several pub/sub confirmations).
    Raw(Vec<u8>),
    /// None now: the cluster's Redis answers.
    Pending,
}

/// An array of bulk strings.
fn strings<'a>(items: impl ExactSizeIterator<Item = &'a str>) -> Reply {
    let mut o = Vec::new();
    resp::array_len(&mut o, items.len());
    for i in items {
        resp::bulk(&mut o, i.as_bytes());
    }
    Reply::Raw(o)
}

/// Sessions with their user ids, flat: `sid1 user1 sid2 user2 ...` (an unknown user is "").
fn sessions(list: &[(String, Option<String>)]) -> Reply {
    let mut o = Vec::new();
    resp::array_len(&mut o, list.len() * 2);
    for (sid, user) in list {
        resp::bulk(&mut o, sid.as_bytes());
        resp::bulk(&mut o, user.as_deref().unwrap_or("").as_bytes());
    }
    Reply::Raw(o)
}

fn arity(name: &str) -> Reply {
    Reply::Error(format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase()))
}

impl Server {
    /// Parses and runs the complete commands in connection `t`'s input.
    pub(crate) fn control_input(&mut self, t: usize) {
        let limits = resp::Limits { max_bulk: self.cfg.limits.max_message_bytes, max_args: MAX_ARGS, max_inline: MAX_INLINE };
        let out_pause = self.cfg.limits.max_output_bytes / 2;
        let mut pos = 0;
        // The argument ranges of each command; kept by the loop so parsing allocates nothing.
        let mut spans = std::mem::take(&mut self.resp_spans);
        loop {
            let Some(c) = self.conns.get_mut(t) else { break };
            if c.dead || c.close_after_write || c.store_wait || c.out.len() > out_pause {
                break;
            }
            match resp::parse_frame(&c.inbuf[pos..], &limits, &mut spans) {
                Ok(None) => break,
                Ok(Some((frame, n))) => {
                    // The command reads its arguments in place: the input buffer is lent to it
                    // (nothing a command does touches its own connection's input).
                    let inbuf = std::mem::take(&mut c.inbuf);
                    let bytes = &inbuf[pos..pos + n];
                    pos += n;
                    let ran = match frame {
                        resp::Frame::Bulks if !spans.is_empty() => resp::with_args(bytes, &spans, |args| self.command(t, args)),
                        resp::Frame::Inline(owned) if !owned.is_empty() => {
                            let args: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
                            self.command(t, &args)
                        }
                        _ => true,
                    };
                    if let Some(c) = self.conns.get_mut(t) {
                        c.inbuf = inbuf;
                    }
                    if !ran {
                        // Waits until this connection's replies from Redis are all in.
                        pos -= n;
                        break;
                    }
                }
                Err(e) => {
                    let peer = c.peer;
                    let why = e.message();
                    self.log_refusal(1, &format!("control protocol {}", peer.ip()), || format!("control connection from {peer} closed: {why}"));
                    let Some(c) = self.conns.get_mut(t) else { break };
                    c.out.append(|o| resp::error(o, &format!("ERR {}", e.message())));
                    c.close_after_write = true;
                    self.counters.rejected += 1;
                    break;
                }
            }
        }
        self.resp_spans = spans;
        if let Some(c) = self.conns.get_mut(t) {
            c.inbuf.drain(..pos);
        }
        self.flush(t);
    }

    /// Runs one command and queues its reply. False when it must wait for earlier replies that
    /// come from the cluster's Redis (it is run again once they are in).
    fn command(&mut self, t: usize, args: &[&[u8]]) -> bool {
        // The command name, upper-cased on the stack: no allocation per command on the publish
        // path. Names longer than any command fall through to "unknown command".
        let mut upper_buf = [0u8; 16];
        let upper = match args[0].len() {
            n if n <= upper_buf.len() => {
                upper_buf[..n].copy_from_slice(&args[0]);
                upper_buf[..n].make_ascii_uppercase();
                std::str::from_utf8(&upper_buf[..n]).unwrap_or("")
            }
            _ => "",
        };
        // The name as sent, for error replies only.
        let name = || String::from_utf8_lossy(&args[0]).into_owned();
        let argc = args.len();
        let clustered = self.cluster.is_some();
        if self.conns[t].redis_wait > 0 && !matches!(upper, "PUBLISH" | "SESSION.OPEN" | "SESSION.CLOSE" | "KICK" | "JOIN" | "LEAVE" | "ONLINE" | "PRESENCE" | "PUBSUB") {
            // Commands that go to Redis may follow one another (Redis answers in order); any
            // other command waits, so that its reply cannot overtake theirs.
            return false;
        }
        let asker = crate::cluster::Asker { token: t, conn: self.conns[t].id, http: None };
        // Client libraries send SELECT / CLIENT SETNAME / COMMAND while connecting, sometimes
        // before AUTH; they touch nothing but this connection, so they need no token.
        let authed = self.cfg.tokens.is_empty() || self.conns[t].backend.as_ref().is_some_and(|b| b.auth.is_some());
        let subscribed = self.conns[t].subscribed();
        if matches!(upper, "POST" | "HOST:") {
            // As Redis: an HTTP request on this port is a browser tricked into talking to it
            // (cross-protocol scripting). Close without a word.
            let peer = self.conns[t].peer;
            self.log_refusal(1, &format!("control http {}", peer.ip()), || {
                format!("control connection from {peer} sent an HTTP request (a browser, or a proxy pointed at the wrong port): closed")
            });
            self.counters.rejected += 1;
            self.kill(t);
            return true;
        }
        let reply = if !authed && !matches!(upper, "AUTH" | "PING" | "QUIT" | "SELECT" | "CLIENT" | "COMMAND") {
            Reply::Error("NOAUTH Authentication required.".into())
        } else if subscribed && !matches!(upper, "SUBSCRIBE" | "UNSUBSCRIBE" | "PING" | "QUIT") {
            // As Redis (RESP2): a connection in pub/sub mode only receives messages.
            Reply::Error(format!(
                "ERR Can't execute '{}': only SUBSCRIBE / UNSUBSCRIBE / PING / QUIT are allowed in this context",
                name().to_ascii_lowercase()
            ))
        } else if subscribed && upper == "PING" {
            let mut o = Vec::new();
            resp::array_len(&mut o, 2);
            resp::bulk(&mut o, b"pong");
            resp::bulk(&mut o, args.get(1).map_or(&b""[..], |a| &a[..]));
            Reply::Raw(o)
        } else {
            match upper {
                "PING" => match argc {
                    1 => Reply::Simple("PONG"),
                    2 => Reply::Bulk(args[1].to_vec()),
                    _ => arity(&name()),
                },
                "ECHO" if argc == 2 => Reply::Bulk(args[1].to_vec()),
                "QUIT" => {
                    self.conns[t].close_after_write = true;
                    Reply::Simple("OK")
                }
                "AUTH" if argc == 2 || argc == 3 => self.auth(t, &args[1..]),
                "SELECT" if argc == 2 => match &args[1][..] {
                    b"0" => Reply::Simple("OK"),
                    _ => Reply::Error("ERR DB index is out of range".into()),
                },
                "CLIENT" if argc >= 2 => self.client(t, &args[1..]),
                "COMMAND" => Reply::EmptyArray,
                "PUBLISH" if argc == 3 => match std::str::from_utf8(&args[1]) {
                    Ok(ch) if hub::valid_channel(ch, self.cfg.limits.max_channel_id_bytes) => {
                        if clustered {
                            // The reply (nodes that got it) comes once Redis has stored it.
                            self.cluster_publish(asker, ch, RESP_CONTENT_TYPE, &args[2]);
                            return true;
                        }
                        let n = self.publish(ch, RESP_CONTENT_TYPE, &args[2]) as i64;
                        if self.store_acks_wait() {
                            // fsync = "always": the reply waits until the message is on disk.
                            let mut o = Vec::new();
                            resp::integer(&mut o, n);
                            self.defer_reply(t, crate::server::Deferred::Resp(o));
                            return true;
                        }
                        Reply::Int(n)
                    }
                    _ => Reply::Error("ERR invalid channel id".into()),
                },
                "SESSION.OPEN" if argc == 2 || argc == 3 => match std::str::from_utf8(&args[1]) {
                    Ok(sid) if hub::valid_session(sid) => {
                        let user = args.get(2).map(|u| String::from_utf8_lossy(u).into_owned());
                        if clustered {
                            self.cluster_session_open(asker, sid, user);
                            return true;
                        }
                        self.session_opened(sid, user);
                        Reply::Simple("OK")
                    }
                    _ => Reply::Error("ERR invalid session id".into()),
                },
                "SESSION.CLOSE" if argc == 2 => match std::str::from_utf8(&args[1]) {
                    Ok(sid) if hub::valid_session(sid) => {
                        if clustered {
                            self.cluster_session_close(asker, sid, false);
                            return true;
                        }
                        Reply::Int(i64::from(self.session_closed(sid)))
                    }
                    _ => Reply::Error("ERR invalid session id".into()),
                },
                "INFO" if argc <= 2 => Reply::Bulk(self.info_text().into_bytes()),
                "AUTH.FLUSH" if argc <= 3 => self.auth_flush(&args[1..]),
                "SUBSCRIBE" if argc >= 2 => self.subscribe(t, &args[1..]),
                "UNSUBSCRIBE" => self.unsubscribe(t, &args[1..]),
                "ONLINE" if argc == 2 && !args[1].eq_ignore_ascii_case(b"COUNT") => Reply::Error("ERR syntax: ONLINE [COUNT]".into()),
                "ONLINE" if argc <= 2 && clustered => self.query_cluster(asker, upper, &args[1..]),
                "PRESENCE" if argc == 2 && clustered => self.query_cluster(asker, upper, &args[1..]),
                "PUBSUB" if argc >= 2 && clustered => self.query_cluster(asker, upper, &args[1..]),
                "ONLINE" if argc == 1 => sessions(&self.presence.online()),
                "ONLINE" if argc == 2 => Reply::Int(self.presence.online_count() as i64),
                "PRESENCE" if argc == 2 => sessions(&self.presence.on_channel(&String::from_utf8_lossy(&args[1]))),
                "PUBSUB" if argc >= 2 => self.pubsub(&args[1..]),
                "JOIN" | "LEAVE" if argc == 3 => match self.join_leave(asker, upper == "JOIN", &args[1], &args[2]) {
                    Some(r) => r,
                    None => return true,
                },
                "KICK" if argc == 2 => match std::str::from_utf8(&args[1]) {
                    Ok(sid) if hub::valid_session(sid) => {
                        if clustered {
                            self.cluster_session_close(asker, sid, true);
                            return true;
                        }
                        Reply::Int(self.session_kicked(sid) as i64)
                    }
                    _ => Reply::Error("ERR invalid session id".into()),
                },
                "SIGN" if (2..=4).contains(&argc) => self.sign(&args[1..]),
                "ECHO" | "AUTH" | "SELECT" | "CLIENT" | "PUBLISH" | "SESSION.OPEN" | "SESSION.CLOSE" | "INFO" | "AUTH.FLUSH"
                | "SIGN" | "SUBSCRIBE" | "ONLINE" | "PRESENCE" | "PUBSUB" | "JOIN" | "LEAVE" | "KICK" => arity(&name()),
                _ => Reply::Error(format!("ERR unknown command '{}'", name().replace(['\r', '\n'], " "))),
            }
        };
        if matches!(reply, Reply::Pending) {
            return true;
        }
        if let Reply::Error(e) = &reply {
            // Wrong tokens have their own lines (log_auth_failure). The key leaves out what the
            // peer wrote (an unknown command's name), so repeating it with variations is one key.
            if !e.starts_with("WRONGPASS") {
                let peer = self.conns[t].peer;
                let cmd = name();
                let key = format!("control {upper} {} {}", e.split('\'').next().unwrap_or(""), peer.ip());
                self.log_refusal(2, &key, || format!("control: {:?} from {peer} refused: {e}", cmd.replace(['\r', '\n'], " ")));
            }
        }
        let encode = |o: &mut Vec<u8>| match reply {
            Reply::Simple(s) => resp::simple(o, s),
            Reply::Error(e) => resp::error(o, &e),
            Reply::Int(n) => resp::integer(o, n),
            Reply::Bulk(b) => resp::bulk(o, &b),
            Reply::Null => resp::null_bulk(o),
            Reply::EmptyArray => resp::array_len(o, 0),
            Reply::Raw(b) => o.extend_from_slice(&b),
            Reply::Pending => {}
        };
        let Some(c) = self.conns.get_mut(t) else { return true };
        if c.redis_wait > 0 {
            // Earlier replies of this connection still wait for Redis: this one goes after them.
            let mut o = Vec::new();
            encode(&mut o);
            self.cluster_queue_reply(t, o);
        } else {
            c.out.append(encode);
        }
        true
    }

    /// Asks the whole cluster (`ONLINE`, `PRESENCE`, `PUBSUB`); the reply comes from Redis, or
    /// is an error now (a bad subcommand, the link down).
    fn query_cluster(&mut self, asker: crate::cluster::Asker, cmd: &str, args: &[&[u8]]) -> Reply {
        match self.cluster_query(asker, cmd, args) {
            Some(e) => Reply::Error(e),
            None => Reply::Pending,
        }
    }

    /// A session opened (here, or on another node of the cluster).
    pub(crate) fn session_opened(&mut self, sid: &str, user: Option<String>) {
        crate::debug!("session {sid} opened (user {user:?})");
        self.presence.set_user(sid, user.clone(), &mut self.events);
        self.store_session(sid, user.as_deref());
        self.hub.open_session(sid, user);
    }

    /// A session closed: its held polls get 410 and it leaves its joined channels. False if it
    /// was not open.
    pub(crate) fn session_closed(&mut self, sid: &str) -> bool {
        let joined: Vec<Box<str>> = self.hub.session(sid).map(|s| s.joined.iter().cloned().collect()).unwrap_or_default();
        let Some(waiters) = self.hub.close_session(sid) else { return false };
        self.store_delete(&format!("{}{sid}", hub::SESSION_PREFIX));
        self.store_session_closed(sid);
        crate::debug!("session {sid} closed ({} held polls answered 410)", waiters.len());
        self.end_holds(waiters, 410, "session closed");
        for ch in joined {
            self.presence.leave(sid, &ch, &mut self.events);
        }
        true
    }

    fn auth(&mut self, t: usize, args: &[&[u8]]) -> Reply {
        if self.cfg.tokens.is_empty() {
            return Reply::Simple("OK");
        }
        let ip = self.conns[t].peer.ip();
        if let Some(left) = self.guard.blocked(ip, self.now) {
            // Even a right token waits out the penalty: guessing from this address is slowed to
            // `auth_max_failures` tries per penalty period.
            self.conns[t].close_after_write = true;
            return Reply::Error(format!("ERR too many failed AUTH attempts from this address; retry in {} s", left.as_secs() + 1));
        }
        let name = match args {
            [secret] => self.token_by_secret(secret).map(str::to_string),
            [user, secret] => {
                let user = String::from_utf8_lossy(user);
                self.cfg
                    .tokens
                    .get(user.as_ref())
                    .filter(|s| crate::admin::secret_eq(s.as_bytes(), secret))
                    .map(|_| user.into_owned())
            }
            _ => None,
        };
        if let Some(n) = name {
            let c = &mut self.conns[t];
            crate::info!("backend {} authenticated as {n}", c.peer);
            c.backend().auth = Some(n.into());
            return Reply::Simple("OK");
        }
        let blocked = self.guard.failed(ip, self.now);
        let c = &mut self.conns[t];
        let b = c.backend();
        b.auth = None;
        b.auth_failures = b.auth_failures.saturating_add(1);
        if u32::from(b.auth_failures) >= crate::guard::MAX_FAILURES_PER_CONNECTION {
            c.close_after_write = true;
        }
        let peer = c.peer;
        self.log_auth_failure(peer, "control", blocked);
        Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
    }

    /// `SUBSCRIBE ch [ch ...]`: this backend receives what is published on those channels, and
    /// presence events on `__presence__`. One confirmation per channel, as Redis.
    fn subscribe(&mut self, t: usize, chans: &[&[u8]]) -> Reply {
        let mut o = Vec::new();
        for ch in chans {
            let name = String::from_utf8_lossy(ch).into_owned();
            let subs = &mut self.conns[t].backend().subs;
            if subs.insert(name.as_str().into()) {
                self.backend_subs.entry(name.as_str().into()).or_default().insert(t);
                // In a cluster the node follows the channel, so messages published on any node
                // reach this backend, and NUMSUB counts it.
                self.cluster_follow(&name);
                self.cluster_presence_dirty(&name);
            }
            resp::array_len(&mut o, 3);
            resp::bulk(&mut o, b"subscribe");
            resp::bulk(&mut o, name.as_bytes());
            resp::integer(&mut o, self.conns[t].backend().subs.len() as i64);
        }
        Reply::Raw(o)
    }

    /// `UNSUBSCRIBE [ch ...]` (none: all).
    fn unsubscribe(&mut self, t: usize, chans: &[&[u8]]) -> Reply {
        let names: Vec<Box<str>> = if chans.is_empty() {
            self.conns[t].backend().subs.iter().cloned().collect()
        } else {
            chans.iter().map(|c| String::from_utf8_lossy(c).into_owned().into_boxed_str()).collect()
        };
        let mut o = Vec::new();
        if names.is_empty() {
            resp::array_len(&mut o, 3);
            resp::bulk(&mut o, b"unsubscribe");
            resp::null_bulk(&mut o);
            resp::integer(&mut o, 0);
        }
        for name in names {
            self.cluster_presence_dirty(&name);
            self.conns[t].backend().subs.remove(&name);
            if let Some(set) = self.backend_subs.get_mut(&name) {
                set.remove(&t);
                if set.is_empty() {
                    self.backend_subs.remove(&name);
                }
            }
            resp::array_len(&mut o, 3);
            resp::bulk(&mut o, b"unsubscribe");
            resp::bulk(&mut o, name.as_bytes());
            resp::integer(&mut o, self.conns[t].backend().subs.len() as i64);
        }
        Reply::Raw(o)
    }

    /// `PUBSUB CHANNELS [pattern]`, `PUBSUB NUMSUB [ch ...]`, `PUBSUB NUMPAT`: channels with
    /// subscribers (browsers on them, anonymous held polls, subscribed backends) and their counts.
    fn pubsub(&mut self, args: &[&[u8]]) -> Reply {
        let sub = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        let numsub = |s: &Server, ch: &str| s.presence.numsub(ch) + s.backend_subs.get(ch).map_or(0, |b| b.len());
        match (sub.as_str(), args.len()) {
            ("CHANNELS", 1 | 2) => {
                let pattern = args.get(1).map(|p| String::from_utf8_lossy(p).into_owned());
                let mut all = self.presence.channels();
                all.extend(self.backend_subs.keys().map(|k| k.to_string()));
                all.sort();
                all.dedup();
                all.retain(|c| pattern.as_deref().is_none_or(|p| crate::auth::pattern_match(p, c)));
                strings(all.iter().map(String::as_str))
            }
            ("NUMSUB", _) => {
                let mut o = Vec::new();
                resp::array_len(&mut o, (args.len() - 1) * 2);
                for ch in &args[1..] {
                    let ch = String::from_utf8_lossy(ch);
                    resp::bulk(&mut o, ch.as_bytes());
                    resp::integer(&mut o, numsub(self, &ch) as i64);
                }
                Reply::Raw(o)
            }
            ("NUMPAT", 1) => Reply::Int(0),
            _ => Reply::Error(format!("ERR unknown subcommand or wrong number of arguments for 'pubsub|{}'", sub.to_ascii_lowercase())),
        }
    }

    /// `JOIN sid channel` / `LEAVE sid channel`: attach a visitor to a shared channel from the
    /// server side (its messages then reach the session's private stream) or detach it.
    /// None when the reply comes from the cluster's Redis.
    fn join_leave(&mut self, asker: crate::cluster::Asker, join: bool, sid: &[u8], channel: &[u8]) -> Option<Reply> {
        let (Ok(sid), Ok(channel)) = (std::str::from_utf8(sid), std::str::from_utf8(channel)) else {
            return Some(Reply::Error("ERR invalid session or channel id".into()));
        };
        if !hub::valid_session(sid) {
            return Some(Reply::Error("ERR invalid session id".into()));
        }
        if !hub::valid_channel(channel, self.cfg.limits.max_channel_id_bytes) || channel.starts_with(hub::SESSION_PREFIX) {
            return Some(Reply::Error("ERR invalid channel id".into()));
        }
        if self.cluster.is_some() {
            self.cluster_join(asker, join, sid, channel);
            return None;
        }
        Some(match self.joined(join, sid, channel) {
            Err(()) => Reply::Error("ERR no such session: open it with SESSION.OPEN first".into()),
            Ok(changed) => Reply::Int(changed as i64),
        })
    }

    /// Joins a session to a channel or takes it off (here, or on every node of a cluster).
    /// Ok(whether it changed); Err when joining a session that is not open.
    pub(crate) fn joined(&mut self, join: bool, sid: &str, channel: &str) -> Result<bool, ()> {
        if join {
            let added = self.hub.join(sid, channel)?;
            self.presence.join(sid, channel, &mut self.events);
            if added {
                self.store_join(true, sid, channel);
            }
            Ok(added)
        } else {
            let removed = self.hub.leave(sid, channel);
            self.presence.leave(sid, channel, &mut self.events);
            if removed {
                self.store_join(false, sid, channel);
            }
            Ok(removed)
        }
    }

    /// `KICK sid`: every held poll of the session gets 410, its private channel is closed, it
    /// goes offline now, and its polls get 403 until the backend opens it again. Returns how
    /// many held polls it ended.
    pub(crate) fn session_kicked(&mut self, sid: &str) -> usize {
        let holds = self.presence.forget(sid, &mut self.events);
        let n = holds.len();
        for (id, t) in holds {
            self.cut_hold(t, id, 410, "session kicked");
        }
        if let Some(waiters) = self.hub.kick(sid, self.now_secs) {
            self.end_holds(waiters, 410, "session kicked");
            self.store_delete(&format!("{}{sid}", hub::SESSION_PREFIX));
            self.store_session_closed(sid);
        }
        crate::info!("session {sid} kicked ({n} held polls answered 410)");
        n
    }

    /// `AUTH.FLUSH` (everything), `AUTH.FLUSH SESSION <sid>`, `AUTH.FLUSH CHANNEL <channel>`:
    /// forget cached access verdicts, e.g. after the application changed a user's rights.
    fn auth_flush(&mut self, args: &[&[u8]]) -> Reply {
        let what = args.first().map(|a| String::from_utf8_lossy(a).to_ascii_uppercase());
        let arg = args.get(1).map(|a| String::from_utf8_lossy(a).into_owned());
        // Checks in flight were asked before this flush: their answers will not be cached.
        self.auth_generation += 1;
        let n = match (what.as_deref(), arg) {
            (None, None) => self.auth_cache.clear(),
            (Some("SESSION"), Some(sid)) => self.auth_cache.flush_session(&sid),
            (Some("CHANNEL"), Some(ch)) => self.auth_cache.flush_channel(&ch),
            _ => return Reply::Error("ERR syntax: AUTH.FLUSH [SESSION <sid> | CHANNEL <channel>]".into()),
        };
        Reply::Int(n as i64)
    }

    /// `SIGN <channel> [sid] [ttl-secs]`: the query string (`key=...&expires=...`) that lets a
    /// page read `channel` (as session `sid`, or any session when empty) for `ttl` seconds.
    fn sign(&mut self, args: &[&[u8]]) -> Reply {
        let secret = &self.auth_cfg.key_secret;
        if secret.is_empty() {
            return Reply::Error("ERR signed keys are off: set [auth] key_secret".into());
        }
        let channel = String::from_utf8_lossy(&args[0]);
        if !hub::valid_channel(&channel, self.cfg.limits.max_channel_id_bytes) {
            return Reply::Error("ERR invalid channel id".into());
        }
        let sid = args.get(1).map(|s| String::from_utf8_lossy(s).into_owned()).unwrap_or_default();
        let ttl = match args.get(2).map(|t| std::str::from_utf8(t).ok().and_then(|t| t.parse::<u64>().ok())) {
            None => 3600,
            Some(Some(t)) if t > 0 && t <= 366 * 86_400 => t,
            Some(_) => return Reply::Error("ERR ttl must be a number of seconds from 1 to 31622400".into()),
        };
        let expires = self.now_secs + ttl;
        let key = crate::auth::sign(secret, &channel, &sid, expires);
        Reply::Bulk(format!("key={key}&expires={expires}").into_bytes())
    }

    fn client(&mut self, t: usize, args: &[&[u8]]) -> Reply {
        let sub = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        let c = &mut self.conns[t];
        match (sub.as_str(), args.len()) {
            ("SETNAME", 2) => {
                c.backend().name = Some(String::from_utf8_lossy(&args[1]).into());
                Reply::Simple("OK")
            }
            ("GETNAME", 1) => match &c.backend().name {
                Some(n) => Reply::Bulk(n.as_bytes().to_vec()),
                None => Reply::Null,
            },
            ("ID", 1) => Reply::Int(c.id as i64),
            // Client libraries send these on connect; accepting them keeps them working.
            ("SETINFO", 3) => Reply::Simple("OK"),
            ("SETNAME" | "GETNAME" | "ID" | "SETINFO", _) => arity("client"),
            _ => Reply::Error(format!("ERR unknown subcommand '{}'", String::from_utf8_lossy(&args[0]).replace(['\r', '\n'], " "))),
        }
    }
}
