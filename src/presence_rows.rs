//! Presence rows in the application's SQLite database (`[presence] database`), so PHP can simply
//! `SELECT * FROM comet_online`. The loop gathers presence events and hands them to the worker
//! pool in batches, one batch in flight at a time so rows change in event order; a worker applies
//! a batch in one transaction. Nothing here runs on the loop thread except `prepare`, at start.
//!
//! Rows: `(session, user, channel, since, daemon)`; a session online has one row with
//! `channel = ''` and one row per channel it is on. `daemon` is `[presence] instance`: at start
//! the rows of that instance are deleted, so a restart leaves no ghosts.

use crate::presence::Event;
use rusqlite::{params, Connection};
use std::path::Path;
use std::time::Duration;

/// Opens the database read-write with a bounded wait on locks.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    // Each worker that writes rows keeps its own connection: a small page cache each (SQLite's
    // default is 2 MiB), since the writes touch a few pages of the index per batch.
    c.execute_batch("PRAGMA cache_size = -256")?;
    Ok(c)
}

/// Creates the table if needed and deletes this instance's old rows. Run once at start.
pub fn prepare(path: &Path, table: &str, instance: &str) -> Result<(), String> {
    let c = open(path).map_err(|e| format!("presence.database: cannot open {}: {e}", path.display()))?;
    c.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (session TEXT NOT NULL, user TEXT, channel TEXT NOT NULL DEFAULT '', \
         since INTEGER NOT NULL, daemon TEXT NOT NULL DEFAULT '');
         CREATE INDEX IF NOT EXISTS {table}_session ON {table} (session, channel);"
    ))
    .map_err(|e| format!("presence.table: cannot create {table}: {e}"))?;
    c.execute(&format!("DELETE FROM {table} WHERE daemon = ?1"), params![instance])
        .map_err(|e| format!("presence.table: cannot clear old rows: {e}"))?;
    Ok(())
}

/// Applies a batch of events in one transaction; with `clear_first`, the instance's rows are
/// deleted first (the batch is then a snapshot of the whole state).
pub fn apply(c: &mut Connection, table: &str, instance: &str, clear_first: bool, events: &[Event], now: u64) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    if clear_first {
        tx.execute(&format!("DELETE FROM {table} WHERE daemon = ?1"), params![instance])?;
    }
    for e in events {
        match e {
            Event::Online { sid, user } => {
                // Sent again when an online session's user id becomes known: update its rows.
                tx.prepare_cached(&format!("UPDATE {table} SET user = ?2 WHERE session = ?1 AND daemon = ?3"))?
                    .execute(params![sid, user, instance])?;
                tx.prepare_cached(&format!(
                    "INSERT INTO {table} (session, user, channel, since, daemon) SELECT ?1, ?2, '', ?3, ?4 \
                     WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE session = ?1 AND channel = '' AND daemon = ?4)"
                ))?
                .execute(params![sid, user, now as i64, instance])?;
            }
            Event::Offline { sid } => {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE session = ?1 AND daemon = ?2"))?.execute(params![sid, instance])?;
            }
            Event::Join { sid, channel } => {
                // The user id is the one on the session's online row.
                tx.prepare_cached(&format!(
                    "INSERT INTO {table} (session, user, channel, since, daemon) \
                     VALUES (?1, (SELECT user FROM {table} WHERE session = ?1 AND channel = '' AND daemon = ?4), ?2, ?3, ?4)"
                ))?
                .execute(params![sid, channel, now as i64, instance])?;
            }
            Event::Leave { sid, channel } => {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE session = ?1 AND channel = ?2 AND daemon = ?3"))?
                    .execute(params![sid, channel, instance])?;
            }
        }
    }
    tx.commit()
}

// ---- the loop's side: events batched, one batch in flight at a time (rows stay in order) ----

use crate::server::Server;
use crate::worker::{self, Outcome, Ticket};
use crate::warn;

/// The ticket token of presence-row batches (no connection has it).
pub const TICKET: usize = usize::MAX;
/// The ticket token of removing another node's rows (its answer is not waited for).
pub const FORGET: usize = usize::MAX - 2;

/// The worker's connection to the presence database, opened on its first job.
fn worker_db<'a>(res: &'a mut worker::Resources, path: &Path) -> Result<&'a mut Connection, String> {
    if res.presence_db.is_none() {
        res.presence_db = Some(open(path).map_err(|e| e.to_string())?);
    }
    res.presence_db.as_mut().ok_or_else(|| "no database".to_string())
}

impl Server {
    /// A batch of rows was written, or failed.
    pub(crate) fn rows_done(&mut self, result: Result<(), String>) {
        self.rows_in_flight = false;
        if let Err(e) = result {
            // The batch is lost with its transaction: rewrite the whole table from the live
            // state next time, so the rows cannot drift from the truth.
            crate::error!("presence rows not written ({e}); the table will be rewritten");
            self.rows_resync = true;
        }
        self.submit_rows();
    }

    /// Queues presence events for the rows table and starts a batch if none is in flight.
    pub(crate) fn presence_rows(&mut self, events: Vec<crate::presence::Event>) {
        if self.cfg.presence.database.is_none() {
            return;
        }
        self.rows_batch.extend(events);
        self.submit_rows();
    }

    /// Deletes the rows of another cluster node, found dead (its `daemon` column is its name).
    pub(crate) fn forget_instance_rows(&mut self, instance: &str) {
        let Some(path) = self.cfg.presence.database.clone() else { return };
        let (table, node) = (self.cfg.presence.table.clone(), instance.to_string());
        let instance = node.clone();
        let task: worker::Task = Box::new(move |res| {
            let db = match worker_db(res, &path) {
                Ok(db) => db,
                Err(e) => return Outcome::Rows(Err(e)),
            };
            let r = db.execute(&format!("DELETE FROM {table} WHERE daemon = ?1"), params![instance]);
            if let Err(e) = &r {
                crate::error!("presence rows of node {instance} not deleted: {e}");
            }
            Outcome::Rows(r.map(|_| ()).map_err(|e| e.to_string()))
        });
        if self.pool.submit(Ticket { token: FORGET, stamp: 0 }, task).is_err() {
            warn!("worker queue full: the rows of node {node} stay until it starts again");
        }
    }

    pub(crate) fn submit_rows(&mut self) {
        if self.rows_in_flight || (self.rows_batch.is_empty() && !self.rows_resync) {
            return;
        }
        let Some(path) = self.cfg.presence.database.clone() else { return };
        let resync = self.rows_resync;
        let batch = if resync { self.presence.snapshot() } else { std::mem::take(&mut self.rows_batch) };
        let (table, instance, now) = (self.cfg.presence.table.clone(), self.cfg.presence.instance.clone(), self.now_secs);
        // Rows are one copy of the events the batch holds; if the queue is full they are kept for
        // the next turn (the loop wakes at least every second).
        let task: worker::Task = Box::new(move |res| {
            let db = match worker_db(res, &path) {
                Ok(db) => db,
                Err(e) => return Outcome::Rows(Err(e)),
            };
            Outcome::Rows(crate::presence_rows::apply(db, &table, &instance, resync, &batch, now).map_err(|e| e.to_string()))
        });
        match self.pool.submit(Ticket { token: TICKET, stamp: 0 }, task) {
            Ok(()) => {
                self.rows_in_flight = true;
                if resync {
                    self.rows_resync = false;
                    self.rows_batch.clear();
                }
            }
            Err(worker::Busy) => warn!("worker queue full: presence rows wait for the next turn"),
        }
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_events_and_restart_clears() {
        let dir = std::env::temp_dir().join(format!("comet-rows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sqlite");
        let _ = std::fs::remove_file(&path);
        prepare(&path, "comet_online", "a").unwrap();
        let mut c = open(&path).unwrap();
        let s = |x: &str| x.to_string();
        apply(
            &mut c,
            "comet_online",
            "a",
            false,
            &[
                Event::Online { sid: s("s1"), user: Some(s("42")) },
                Event::Join { sid: s("s1"), channel: s("goods") },
                Event::Online { sid: s("s2"), user: None },
                Event::Join { sid: s("s2"), channel: s("goods") },
                Event::Leave { sid: s("s2"), channel: s("goods") },
                Event::Offline { sid: s("s2") },
                Event::Online { sid: s("s1"), user: Some(s("42")) },
            ],
            100,
        )
        .unwrap();
        let rows: Vec<(String, Option<String>, String)> = c
            .prepare("SELECT session, user, channel FROM comet_online ORDER BY session, channel")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(s("s1"), Some(s("42")), s("")), (s("s1"), Some(s("42")), s("goods"))]);
        // Another instance's rows survive this one's restart.
        c.execute("INSERT INTO comet_online (session, channel, since, daemon) VALUES ('x', '', 1, 'b')", []).unwrap();
        prepare(&path, "comet_online", "a").unwrap();
        let n: i64 = c.query_row("SELECT COUNT(*) FROM comet_online", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
