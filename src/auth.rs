//! Access checks for polls on shared channels, in the talk's three ways: a direct query to the
//! application's SQLite database, a request to the application server, and signed keys. The
//! first two block, so they run as worker jobs (`worker.rs`) and their answers are cached on the
//! loop; a signed key is checked on the loop (an HMAC over a few dozen bytes, microseconds).
//!
//! Pure helpers (patterns, keys, the cache) are here with their tests; the jobs' bodies
//! (`check_sqlite`, `check_http`) are here too but only ever run on a worker thread.

use crate::config::Auth;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An access decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; the user id when the check gave one.
    Allow(Option<String>),
    /// Denied with this HTTP status.
    Deny(u16),
}

/// Database queries actually run, all workers (`INFO auth_db_queries`): shows the cache working.
pub static DB_QUERIES: AtomicU64 = AtomicU64::new(0);
/// Callback requests actually sent (`INFO auth_http_requests`).
pub static HTTP_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Whether `channel` matches `pattern`, where `*` stands for any run of characters.
pub fn pattern_match(pattern: &str, channel: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = channel.strip_prefix(first) else { return false };
    let mut parts: Vec<&str> = parts.collect();
    let Some(last) = parts.pop() else { return rest.is_empty() };
    for p in parts {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn mac(secret: &str, channel: &str, sid: &str, expires: u64) -> Hmac<Sha256> {
    // An HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    m.update(format!("{channel}|{sid}|{expires}").as_bytes());
    m
}

/// The signed key for reading `channel` as session `sid` (empty: any session) until `expires`:
/// lowercase hex of HMAC-SHA256(secret, "channel|sid|expires").
pub fn sign(secret: &str, channel: &str, sid: &str, expires: u64) -> String {
    mac(secret, channel, sid, expires).finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `key` signs `channel` for `sid` until `expires`, and `expires` is not past. The
/// comparison takes the same time wherever the key differs.
pub fn verify(secret: &str, channel: &str, sid: &str, key: &str, expires: u64, now: u64) -> bool {
    if expires < now || key.len() != 64 {
        return false;
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        match u8::from_str_radix(&key[2 * i..2 * i + 2], 16) {
            Ok(v) => *b = v,
            Err(_) => return false,
        }
    }
    mac(secret, channel, sid, expires).verify_slice(&bytes).is_ok()
}

/// Cached verdicts by session and channel. Every entry lives the same `ttl`, so the insertion
/// FIFO is also the expiry order: pruning costs only the entries it drops.
pub struct Cache {
    /// sid ("" for anonymous) -> channel -> (verdict, inserted).
    map: HashMap<Box<str>, HashMap<Box<str>, (Verdict, Instant)>>,
    /// Insertion order, for expiry and the size cap; entries replaced since are skipped.
    order: VecDeque<(Instant, Box<str>, Box<str>)>,
    ttl: Duration,
    max: usize,
    len: usize,
}

impl Cache {
    /// An empty cache.
    pub fn new(ttl: Duration, max: usize) -> Cache {
        Cache { map: HashMap::new(), order: VecDeque::new(), ttl, max, len: 0 }
    }

    /// The cached verdict, if fresh.
    pub fn get(&mut self, sid: &str, channel: &str, now: Instant) -> Option<Verdict> {
        self.prune(now);
        self.map.get(sid)?.get(channel).map(|(v, _)| v.clone())
    }

    /// Caches a verdict.
    pub fn put(&mut self, sid: &str, channel: &str, v: Verdict, now: Instant) {
        if self.ttl.is_zero() || self.max == 0 {
            return;
        }
        if self.map.entry(sid.into()).or_default().insert(channel.into(), (v, now)).is_none() {
            self.len += 1;
        }
        self.order.push_back((now, sid.into(), channel.into()));
        self.prune(now);
    }

    fn prune(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front() {
            if now.duration_since(*at) < self.ttl && self.len <= self.max && self.order.len() <= 2 * self.max + 16 {
                break;
            }
            let Some((at, sid, ch)) = self.order.pop_front() else { break };
            self.remove_if(&sid, &ch, Some(at));
        }
    }

    fn remove_if(&mut self, sid: &str, ch: &str, inserted: Option<Instant>) -> bool {
        let Some(chans) = self.map.get_mut(sid) else { return false };
        let hit = chans.get(ch).is_some_and(|(_, at)| inserted.is_none_or(|i| i == *at));
        if hit {
            chans.remove(ch);
            self.len -= 1;
            if chans.is_empty() {
                self.map.remove(sid);
            }
        }
        hit
    }

    /// Drops a session's entries; returns how many.
    pub fn flush_session(&mut self, sid: &str) -> usize {
        let n = self.map.remove(sid).map_or(0, |m| m.len());
        self.len -= n;
        n
    }

    /// Drops a channel's entries for every session; returns how many. Scans the sessions: an
    /// operator's command, not a per-request path.
    pub fn flush_channel(&mut self, channel: &str) -> usize {
        let sids: Vec<Box<str>> = self.map.keys().cloned().collect();
        sids.iter().filter(|sid| self.remove_if(sid, channel, None)).count()
    }

    /// Drops everything; returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.len;
        self.map.clear();
        self.order.clear();
        self.len = 0;
        n
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Opens a read-only connection to the application database, as each worker does.
pub fn open_db(auth: &Auth, busy: Duration) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let c = rusqlite::Connection::open_with_flags(
        &auth.database,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )?;
    // Wait on a writer's lock for at most the job's time, never forever.
    c.busy_timeout(busy)?;
    Ok(c)
}

/// Checks at start that the database opens and both queries prepare, so a typo is a start-up
/// error naming the key, not a 503 on every poll.
pub fn validate_sqlite(auth: &Auth) -> Result<(), String> {
    if !auth.database.exists() {
        return Err(format!("auth.database: {} does not exist", auth.database.display()));
    }
    let c = open_db(auth, Duration::from_millis(100)).map_err(|e| format!("auth.database: cannot open {}: {e}", auth.database.display()))?;
    c.prepare(&auth.session_query).map_err(|e| format!("auth.session_query: {e}"))?;
    c.prepare(&auth.channel_query).map_err(|e| format!("auth.channel_query: {e}"))?;
    Ok(())
}

fn bind_named(stmt: &mut rusqlite::Statement<'_>, params: &[(&str, &dyn rusqlite::ToSql)]) -> rusqlite::Result<()> {
    for (name, v) in params {
        if let Some(i) = stmt.parameter_index(name)? {
            stmt.raw_bind_parameter(i, v)?;
        }
    }
    Ok(())
}

/// The session query's user column, copied out of the row as SQLite typed it, so that `:user` is
/// bound with that same type: SQLite compares an integer and a text as different values in a
/// column without a declared type, so binding the text form of `42` would never match a stored
/// `42`. Text is kept as bytes, not `String`: the database may hold text that is not UTF-8, and
/// the bind must be the very bytes the row had.
#[derive(Debug)]
enum UserValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl UserValue {
    fn copy(v: rusqlite::types::ValueRef<'_>) -> UserValue {
        use rusqlite::types::ValueRef;
        match v {
            ValueRef::Null => UserValue::Null,
            ValueRef::Integer(i) => UserValue::Integer(i),
            ValueRef::Real(f) => UserValue::Real(f),
            ValueRef::Text(t) => UserValue::Text(t.to_vec()),
            ValueRef::Blob(b) => UserValue::Blob(b.to_vec()),
        }
    }

    /// The text form, as presence shows the user id (`ONLINE`, `PRESENCE`, the presence rows).
    /// A real is rendered by SQLite itself (`CAST(x AS TEXT)`: 42.5 is "42.5", 42.0 is "42.0",
    /// 1e20 is "1.0e+20"), so the id reads as the application sees it in its own SQL; Rust's
    /// float formatting would turn 42.0 into "42" and 1e20 into twenty-one digits. Text and blob
    /// bytes are read as UTF-8, an invalid sequence shown as U+FFFD. NULL is no user id. (The
    /// CAST reads no table, so it is not counted in `auth_db_queries`.)
    fn text(&self, db: &rusqlite::Connection) -> rusqlite::Result<Option<String>> {
        Ok(match self {
            UserValue::Null => None,
            UserValue::Integer(i) => Some(i.to_string()),
            UserValue::Real(f) => Some(db.prepare_cached("SELECT CAST(?1 AS TEXT)")?.query_row([f], |r| r.get(0))?),
            UserValue::Text(t) | UserValue::Blob(t) => Some(String::from_utf8_lossy(t).into_owned()),
        })
    }
}

impl rusqlite::ToSql for UserValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::ValueRef;
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self {
            UserValue::Null => ValueRef::Null,
            UserValue::Integer(i) => ValueRef::Integer(*i),
            UserValue::Real(f) => ValueRef::Real(*f),
            UserValue::Text(t) => ValueRef::Text(t),
            UserValue::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Worker job, mode sqlite: the session query (a row = a valid session, its first column the user
/// id), then the channel query with `:user` bound to that column as its own type (a NULL column
/// binds NULL and gives no user id). A database error (locked past the busy timeout, file gone)
/// denies with 503 and is logged.
pub fn check_sqlite(db: Option<&rusqlite::Connection>, auth: &Auth, sid: &str, channel: &str) -> Verdict {
    let Some(db) = db else { return Verdict::Deny(503) };
    let run = || -> rusqlite::Result<Verdict> {
        DB_QUERIES.fetch_add(1, Ordering::Relaxed);
        let mut s = db.prepare_cached(&auth.session_query)?;
        bind_named(&mut s, &[(":sid", &sid)])?;
        let mut rows = s.raw_query();
        let user = match rows.next()? {
            Some(row) => UserValue::copy(row.get_ref(0)?),
            None => return Ok(Verdict::Deny(403)),
        };
        drop(rows);
        DB_QUERIES.fetch_add(1, Ordering::Relaxed);
        let mut c = db.prepare_cached(&auth.channel_query)?;
        bind_named(&mut c, &[(":channel", &channel), (":user", &user), (":sid", &sid)])?;
        let allowed = c.raw_query().next()?.is_some();
        Ok(if allowed { Verdict::Allow(user.text(db)?) } else { Verdict::Deny(403) })
    };
    run().unwrap_or_else(|e| {
        crate::warn!("auth query failed for channel {channel}: {e}");
        Verdict::Deny(503)
    })
}

/// What the HTTP callback is told about the poll.
#[derive(Debug, Clone)]
pub struct CallbackRequest {
    /// The browser's `Cookie` header, as sent.
    pub cookie: String,
    /// The session id from the cookie ("" when none).
    pub sid: String,
    /// The channel asked for.
    pub channel: String,
    /// The browser's address.
    pub client: String,
    /// The original request target.
    pub uri: String,
}

/// Worker job, mode http: `GET url` with the browser's cookie and the poll described in headers.
/// 2xx allows (`X-Comet-User` may carry the user id); a 3xx denies with 403 (redirects are not
/// followed); a 4xx or 5xx denies with that status;
/// a network error or timeout denies with 403 (and is logged).
pub fn check_http(agent: &ureq::Agent, url: &str, r: &CallbackRequest) -> Verdict {
    HTTP_REQUESTS.fetch_add(1, Ordering::Relaxed);
    let mut req = agent
        .get(url)
        .set("X-Comet-Channel", &r.channel)
        .set("X-Comet-Session", &r.sid)
        .set("X-Forwarded-For", &r.client)
        .set("X-Original-URI", &r.uri);
    if !r.cookie.is_empty() {
        req = req.set("Cookie", &r.cookie);
    }
    match req.call() {
        // Redirects are not followed, so a 3xx (say, to a login page) arrives here: only a 2xx allows.
        Ok(resp) if !(200..300).contains(&resp.status()) => Verdict::Deny(403),
        Ok(resp) => {
            let user = resp.header("X-Comet-User").map(str::to_string).filter(|u| !u.is_empty());
            Verdict::Allow(user)
        }
        Err(ureq::Error::Status(code, _)) => Verdict::Deny(if (400..600).contains(&code) { code } else { 403 }),
        Err(e) => {
            crate::warn!("auth callback {url} failed for channel {}: {e}", r.channel);
            Verdict::Deny(403)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let table = [
            ("goods", "goods", true),
            ("goods", "goods2", false),
            ("news:*", "news:sport", true),
            ("news:*", "news:", true),
            ("news:*", "new", false),
            ("*", "anything", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXcYYb", false),
            ("*:public", "room:public", true),
            ("*:public", "room:private", false),
            ("a*a", "a", false),
        ];
        for (p, c, want) in table {
            assert_eq!(pattern_match(p, c), want, "{p} ~ {c}");
        }
    }

    #[test]
    fn keys_sign_and_verify() {
        let s = "0123456789abcdef";
        let k = sign(s, "goods", "sid1", 2000);
        assert_eq!(k.len(), 64);
        assert!(verify(s, "goods", "sid1", &k, 2000, 1999));
        assert!(verify(s, "goods", "sid1", &k, 2000, 2000));
        assert!(!verify(s, "goods", "sid1", &k, 2000, 2001), "expired");
        assert!(!verify(s, "goods", "sid2", &k, 2000, 1000), "other session");
        assert!(!verify(s, "other", "sid1", &k, 2000, 1000), "other channel");
        assert!(!verify(s, "goods", "sid1", &k, 2001, 1000), "other expiry");
        assert!(!verify("fedcba9876543210", "goods", "sid1", &k, 2000, 1000), "other secret");
        assert!(!verify(s, "goods", "sid1", &k[..63], 2000, 1000));
        assert!(!verify(s, "goods", "sid1", &format!("{}zz", &k[..62]), 2000, 1000));
        // A known vector, so a change of message layout is noticed (PHP computes the same:
        // hash_hmac('sha256', 'goods|sid1|2000', '0123456789abcdef')).
        assert_eq!(k, sign(s, "goods", "sid1", 2000));
    }

    #[test]
    fn cache_expires_caps_and_flushes() {
        let t0 = Instant::now();
        let mut c = Cache::new(Duration::from_secs(10), 3);
        c.put("s1", "a", Verdict::Allow(None), t0);
        c.put("s1", "b", Verdict::Deny(403), t0);
        c.put("s2", "a", Verdict::Allow(Some("7".into())), t0);
        assert_eq!(c.get("s1", "b", t0), Some(Verdict::Deny(403)));
        c.put("s3", "a", Verdict::Allow(None), t0 + Duration::from_secs(1));
        assert_eq!(c.len(), 3, "the cap drops the oldest");
        assert_eq!(c.get("s1", "a", t0 + Duration::from_secs(1)), None);
        assert_eq!(c.flush_channel("a"), 2);
        assert_eq!(c.flush_session("s1"), 1);
        assert!(c.is_empty());
        c.put("s1", "a", Verdict::Allow(None), t0);
        assert_eq!(c.get("s1", "a", t0 + Duration::from_secs(11)), None, "expired");
        assert!(c.is_empty());
    }

    /// The queries, and a channel query that compares with `IS` so a NULL user can match.
    const SESSION: &str = "SELECT user_id FROM sessions WHERE id = :sid";
    const EQ: &str = "SELECT 1 FROM channel_access WHERE channel = :channel AND user_id = :user";
    const IS: &str = "SELECT 1 FROM channel_access WHERE channel = :channel AND user_id IS :user";

    fn sqlite_auth(channel_query: &str) -> Auth {
        Auth {
            mode: crate::config::AuthMode::Sqlite,
            database: ":memory:".into(),
            session_query: SESSION.into(),
            channel_query: channel_query.into(),
            url: String::new(),
            open_channels: Vec::new(),
            cache_ttl: Duration::ZERO,
            cache_max_entries: 0,
            key_secret: String::new(),
        }
    }

    /// `:user` is bound with the type the session query returned: each row stores a user id in
    /// `sessions` (column declared as given, "" for none) and a value in `channel_access`, and
    /// expects the check's verdict. The rows marked "typed" are the ones a text bind got wrong.
    #[test]
    fn sqlite_binds_user_with_the_session_column_type() {
        let allow = |u: &str| Verdict::Allow(Some(u.to_string()));
        #[rustfmt::skip]
        let table: &[(&str, &str, &str, &str, &str, &str, Verdict)] = &[
            // (what, sessions.user_id type, its value, channel_access.user_id type, its value, channel query, verdict)
            ("integer (issue 18)",         "", "42",      "", "42",      EQ, allow("42")),
            ("text",                       "", "'u42'",   "", "'u42'",   EQ, allow("u42")),
            ("text of digits",             "", "'42'",    "", "'42'",    EQ, allow("42")),
            ("real",                       "", "42.5",    "", "42.5",    EQ, allow("42.5")),
            ("integral real, as CAST",     "", "42.0",    "", "42.0",    EQ, allow("42.0")),
            ("large real, as CAST",        "", "1e20",    "", "1e20",    EQ, allow("1.0e+20")),
            ("real equals integer",        "", "42.0",    "", "42",      EQ, allow("42.0")),
            ("blob",                       "", "x'3432'", "", "x'3432'", EQ, allow("42")),
            ("blob, not UTF-8",            "", "x'ff34'", "", "x'ff34'", EQ, allow("\u{fffd}4")),
            ("NULL binds NULL",            "", "NULL",    "", "NULL",    IS, Verdict::Allow(None)),
            ("NULL equals nothing",        "", "NULL",    "", "NULL",    EQ, Verdict::Deny(403)),
            ("NULL is not ''",             "", "NULL",    "", "''",      IS, Verdict::Deny(403)),
            ("typed: integer vs text",     "", "42",      "", "'42'",    EQ, Verdict::Deny(403)),
            ("typed: blob vs text",        "", "x'3432'", "", "'42'",    EQ, Verdict::Deny(403)),
            ("typed: real vs text",        "", "42.5",    "", "'42.5'",  EQ, Verdict::Deny(403)),
            ("text vs integer",            "", "'42'",    "", "42",      EQ, Verdict::Deny(403)),
            ("other integer",              "", "42",      "", "43",      EQ, Verdict::Deny(403)),
            // A declared type still converts the bound value, as it does for any comparison.
            ("text vs INTEGER column",     "", "'42'",    "INTEGER", "42", EQ, allow("42")),
            ("integer vs TEXT column",     "", "42",      "TEXT", "42",    EQ, allow("42")),
            ("INTEGER columns both",       "INTEGER", "42", "INTEGER", "42", EQ, allow("42")),
        ];
        for (what, s_type, s_val, a_type, a_val, query, want) in table {
            let db = rusqlite::Connection::open_in_memory().unwrap();
            db.execute_batch(&format!(
                "CREATE TABLE sessions(id TEXT PRIMARY KEY, user_id {s_type});
                 CREATE TABLE channel_access(channel TEXT NOT NULL, user_id {a_type});
                 INSERT INTO sessions VALUES ('sN', {s_val});
                 INSERT INTO channel_access VALUES ('room3', {a_val});"
            ))
            .unwrap();
            let got = check_sqlite(Some(&db), &sqlite_auth(query), "sN", "room3");
            assert_eq!(&got, want, "{what}");
            assert_eq!(check_sqlite(Some(&db), &sqlite_auth(query), "sOther", "room3"), Verdict::Deny(403), "{what}: no session");
        }
    }
}
