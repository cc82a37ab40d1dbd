//! The message store (`[store] path`, optional): channel buffers and message ids kept in SQLite so
//! a restarted daemon has every acknowledged message and browsers that re-poll with their old
//! cursor get exactly what they missed. Write-behind: the loop gathers operations (a message
//! published, messages dropped from a buffer, a channel deleted, a session opened or closed) and hands them to the worker pool
//! in batches, one batch in flight at a time so they apply in order. Only `open` and `load` run on
//! the loop thread, at start, before anything is accepted.
//!
//! Durability follows `[store] fsync`, as Redis's `appendfsync`:
//! - `always`: each batch is committed with `synchronous = FULL` and a publisher's reply waits for
//!   the commit of the batch holding its message: an acknowledged message survives `kill -9` and a
//!   power cut.
//! - `everysec` (default): batches are written at most a second apart with `synchronous = NORMAL`
//!   (WAL): what was written survives a crash of the daemon; a power cut may lose the last second.
//! - `no`: `synchronous = OFF`; the operating system decides when data reaches the disk.

use crate::hub::MsgId;
use rusqlite::{params, Connection};
use std::path::Path;

/// The durability policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Reply after the commit is on disk.
    Always,
    /// Write at most a second late.
    EverySec,
    /// Leave it to the operating system.
    No,
}

/// One change to apply.
#[derive(Debug, Clone)]
pub enum Op {
    /// A message was published.
    Put { channel: String, id: MsgId, content_type: String, body: Vec<u8> },
    /// Messages up to `upto` left the channel's buffer (length or age limit).
    Drop { channel: String, upto: MsgId },
    /// The channel was deleted.
    Delete { channel: String },
    /// A session was opened (or its user id changed).
    Session { sid: String, user: Option<String> },
    /// A session was closed or kicked (its joins go with it).
    SessionClosed { sid: String },
    /// A session was joined to a shared channel (`JOIN`).
    Join { sid: String, channel: String },
    /// A session left a shared channel (`LEAVE`).
    Leave { sid: String, channel: String },
}

/// A stored message, as `load` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its channel.
    pub channel: String,
    /// Its id.
    pub id: MsgId,
    /// Its content type.
    pub content_type: String,
    /// Its body.
    pub body: Vec<u8>,
}

/// Opens the store (creating it) with the policy's settings.
pub fn open(path: &Path, fsync: Fsync) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match fsync {
        Fsync::Always => "FULL",
        Fsync::EverySec => "NORMAL",
        Fsync::No => "OFF",
    };
    c.pragma_update(None, "synchronous", sync)?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS comet_messages (channel TEXT NOT NULL, time INTEGER NOT NULL, tag INTEGER NOT NULL,
             content_type TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (channel, time, tag)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS comet_channels (channel TEXT PRIMARY KEY, dropped_time INTEGER NOT NULL,
             dropped_tag INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS comet_sessions (sid TEXT PRIMARY KEY, user TEXT) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS comet_joins (sid TEXT NOT NULL, channel TEXT NOT NULL,
             PRIMARY KEY (sid, channel)) WITHOUT ROWID;",
    )?;
    Ok(c)
}

/// What `load` returns.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The messages, by channel then id.
    pub messages: Vec<Stored>,
    /// Each channel's newest dropped id.
    pub dropped: Vec<(String, MsgId)>,
    /// The open sessions with their user ids.
    pub sessions: Vec<(String, Option<String>)>,
    /// The shared channels each session is joined to: (session, channel).
    pub joins: Vec<(String, String)>,
}

/// Everything stored.
pub fn load(c: &Connection) -> rusqlite::Result<Loaded> {
    let mut s = c.prepare("SELECT channel, time, tag, content_type, body FROM comet_messages ORDER BY channel, time, tag")?;
    let msgs = s
        .query_map([], |r| {
            Ok(Stored {
                channel: r.get(0)?,
                id: MsgId { time: r.get::<_, i64>(1)? as u64, tag: r.get::<_, i64>(2)? as u32 },
                content_type: r.get(3)?,
                body: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut s = c.prepare("SELECT channel, dropped_time, dropped_tag FROM comet_channels")?;
    let dropped = s
        .query_map([], |r| Ok((r.get(0)?, MsgId { time: r.get::<_, i64>(1)? as u64, tag: r.get::<_, i64>(2)? as u32 })))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut s = c.prepare("SELECT sid, user FROM comet_sessions")?;
    let sessions = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
    let mut s = c.prepare("SELECT sid, channel FROM comet_joins")?;
    let joins = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded { messages: msgs, dropped, sessions, joins })
}

/// Applies a batch in one transaction.
pub fn apply(c: &mut Connection, ops: &[Op]) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    for op in ops {
        match op {
            Op::Put { channel, id, content_type, body } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO comet_messages (channel, time, tag, content_type, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![channel, id.time as i64, id.tag as i64, content_type, body])?;
            }
            Op::Drop { channel, upto } => {
                tx.prepare_cached("DELETE FROM comet_messages WHERE channel = ?1 AND (time < ?2 OR (time = ?2 AND tag <= ?3))")?
                    .execute(params![channel, upto.time as i64, upto.tag as i64])?;
                tx.prepare_cached("INSERT OR REPLACE INTO comet_channels (channel, dropped_time, dropped_tag) VALUES (?1, ?2, ?3)")?
                    .execute(params![channel, upto.time as i64, upto.tag as i64])?;
            }
            Op::Delete { channel } => {
                tx.prepare_cached("DELETE FROM comet_messages WHERE channel = ?1")?.execute(params![channel])?;
                tx.prepare_cached("DELETE FROM comet_channels WHERE channel = ?1")?.execute(params![channel])?;
            }
            Op::Session { sid, user } => {
                tx.prepare_cached("INSERT OR REPLACE INTO comet_sessions (sid, user) VALUES (?1, ?2)")?.execute(params![sid, user])?;
            }
            Op::SessionClosed { sid } => {
                tx.prepare_cached("DELETE FROM comet_sessions WHERE sid = ?1")?.execute(params![sid])?;
                tx.prepare_cached("DELETE FROM comet_joins WHERE sid = ?1")?.execute(params![sid])?;
            }
            Op::Join { sid, channel } => {
                tx.prepare_cached("INSERT OR IGNORE INTO comet_joins (sid, channel) VALUES (?1, ?2)")?.execute(params![sid, channel])?;
            }
            Op::Leave { sid, channel } => {
                tx.prepare_cached("DELETE FROM comet_joins WHERE sid = ?1 AND channel = ?2")?.execute(params![sid, channel])?;
            }
        }
    }
    tx.commit()
}

// ---- the loop's side: operations batched per turn, written behind by a worker ----

use crate::server::{Deferred, Server};
use crate::worker::{self, Outcome, Ticket};
use crate::warn;
use std::time::Duration;

/// The ticket token of store batches (no connection has it); the stamp is the batch's sequence.
pub const TICKET: usize = usize::MAX - 1;

impl Server {
    /// Records an opened session (or its new user id) for the store, so a restart keeps it.
    pub fn store_session(&mut self, sid: &str, user: Option<&str>) {
        if self.cfg.store.is_some() {
            self.store_batch.push(crate::store::Op::Session { sid: sid.to_string(), user: user.map(str::to_string) });
            self.store_seq += 1;
        }
    }

    /// Records a closed session for the store.
    pub fn store_session_closed(&mut self, sid: &str) {
        if self.cfg.store.is_some() {
            self.store_batch.push(crate::store::Op::SessionClosed { sid: sid.to_string() });
            self.store_seq += 1;
        }
    }

    /// Records a `JOIN` or `LEAVE` for the store, so a restarted daemon still copies the shared
    /// channel's messages to the session's private stream.
    pub fn store_join(&mut self, join: bool, sid: &str, channel: &str) {
        if self.cfg.store.is_some() {
            let (sid, channel) = (sid.to_string(), channel.to_string());
            self.store_batch.push(if join { crate::store::Op::Join { sid, channel } } else { crate::store::Op::Leave { sid, channel } });
            self.store_seq += 1;
        }
    }

    /// Records a channel deletion for the store.
    pub fn store_delete(&mut self, channel: &str) {
        if self.cfg.store.is_some() {
            self.store_batch.push(crate::store::Op::Delete { channel: channel.to_string() });
            self.store_seq += 1;
        }
    }

    /// Whether replies to publishers wait for the store (`fsync = "always"`).
    pub fn store_acks_wait(&self) -> bool {
        matches!(self.cfg.store, Some((_, crate::store::Fsync::Always)))
    }

    /// Holds connection `t`'s reply until the store has committed everything queued so far;
    /// the connection reads nothing more meanwhile, so replies keep their order.
    pub fn defer_reply(&mut self, t: usize, reply: Deferred) {
        let Some(c) = self.conns.get_mut(t) else { return };
        c.store_wait = true;
        self.store_acks.push_back((self.store_seq, t, c.id, reply));
    }

    /// Sends the store batch to a worker when it is due: at once with `always` (a publisher is
    /// waiting) or during shutdown, else at most once a second.
    pub(crate) fn submit_store(&mut self) {
        let Some(fsync) = self.cfg.store.as_ref().map(|s| s.1) else { return };
        for (ch, upto) in self.hub.drops.drain(..) {
            if !ch.starts_with('@') {
                self.store_batch.push(crate::store::Op::Drop { channel: ch.to_string(), upto });
                self.store_seq += 1;
            }
        }
        let due = fsync == crate::store::Fsync::Always || self.stopping.is_some() || self.now >= self.store_next_flush;
        if self.store_in_flight || self.store_batch.is_empty() || !due {
            return;
        }
        if self.pool.is_full() {
            // The loop is the only producer, so room seen here is room at submit; without room
            // the batch stays queued for the next turn (the loop wakes at least every second).
            warn!("worker queue full: the store batch waits for the next turn");
            return;
        }
        let Some(path) = self.cfg.store.as_ref().map(|s| s.0.clone()) else { return };
        let batch = std::mem::take(&mut self.store_batch);
        let upto = self.store_seq;
        let task: worker::Task = Box::new(move |res| {
            if res.store_db.is_none() {
                match crate::store::open(&path, fsync) {
                    Ok(c) => res.store_db = Some(c),
                    Err(e) => return Outcome::Stored(upto, Err(e.to_string())),
                }
            }
            let Some(db) = res.store_db.as_mut() else { return Outcome::Stored(upto, Err("no store".into())) };
            Outcome::Stored(upto, crate::store::apply(db, &batch).map_err(|e| e.to_string()))
        });
        match self.pool.submit(Ticket { token: TICKET, stamp: upto }, task) {
            Ok(()) => {
                self.store_in_flight = true;
                self.store_next_flush = self.now + Duration::from_secs(1);
            }
            Err(worker::Busy) => crate::error!("worker queue full after a check for room: store batch lost"),
        }
    }

    /// A store batch finished: release the replies it acknowledges.
    pub(crate) fn store_done(&mut self, upto: u64, result: Result<(), String>) {
        self.store_in_flight = false;
        if let Err(e) = &result {
            crate::error!("store write failed: {e}; messages up to #{upto} are not persisted");
        }
        while self.store_acks.front().is_some_and(|(seq, ..)| *seq <= upto) {
            let Some((_, t, id, reply)) = self.store_acks.pop_front() else { break };
            let Some(c) = self.conns.get_mut(t) else { continue };
            if c.id != id || c.dead {
                continue;
            }
            c.store_wait = false;
            let failed = result.as_ref().err();
            match reply {
                Deferred::Resp(bytes) => match failed {
                    None => c.out.append(|o| o.extend_from_slice(&bytes)),
                    Some(e) => c.out.append(|o| crate::resp::error(o, &format!("ERR published but not persisted: {e}"))),
                },
                Deferred::Http(status, ct, body, ka) => match failed {
                    None => self.respond_typed(t, status, "", ct, &body, ka),
                    Some(_) => self.respond(t, 503, "Retry-After: 1\r\n", b"published but not persisted (store error)", ka),
                },
            }
            self.pending.push(t);
            self.flush(t);
        }
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip() {
        let dir = std::env::temp_dir().join(format!("comet-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sqlite");
        let _ = std::fs::remove_file(&path);
        let mut c = open(&path, Fsync::Always).unwrap();
        let id = |time, tag| MsgId { time, tag };
        let put = |ch: &str, i: MsgId, b: &str| Op::Put { channel: ch.into(), id: i, content_type: "t".into(), body: b.as_bytes().to_vec() };
        apply(
            &mut c,
            &[
                put("a", id(10, 0), "a0"),
                put("a", id(10, 1), "a1"),
                put("a", id(11, 0), "a2"),
                put("b", id(10, 0), "b0"),
                Op::Drop { channel: "a".into(), upto: id(10, 1) },
                Op::Delete { channel: "b".into() },
                Op::Session { sid: "s1".into(), user: Some("7".into()) },
                Op::Session { sid: "s2".into(), user: None },
                Op::Join { sid: "s1".into(), channel: "goods".into() },
                Op::Join { sid: "s1".into(), channel: "news".into() },
                Op::Join { sid: "s1".into(), channel: "news".into() },
                Op::Leave { sid: "s1".into(), channel: "news".into() },
                Op::Join { sid: "s2".into(), channel: "goods".into() },
                Op::SessionClosed { sid: "s2".into() },
            ],
        )
        .unwrap();
        drop(c);
        let c = open(&path, Fsync::Always).unwrap();
        let Loaded { messages: msgs, dropped, sessions, joins } = load(&c).unwrap();
        assert_eq!(sessions, [("s1".to_string(), Some("7".to_string()))]);
        assert_eq!(joins, [("s1".to_string(), "goods".to_string())]);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].channel.as_str(), msgs[0].id, msgs[0].body.as_slice()), ("a", id(11, 0), &b"a2"[..]));
        assert_eq!(dropped, [("a".to_string(), id(10, 1))]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
