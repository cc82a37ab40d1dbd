//! The worker pool: the one place where blocking work runs (SQLite queries, the HTTP auth
//! callback; later presence rows and the message store). The loop submits a job with a ticket
//! naming the connection and the phase stamp it was in; a worker runs it with its own resources
//! (each worker holds its own database connection) and sends the outcome back over a crossbeam
//! channel, then wakes the loop through its `mio::Waker`. The loop drops an outcome whose ticket
//! is stale (the connection went away or moved on), so a slow job can never act late.
//!
//! The queue is bounded: a full queue is reported at once (`Busy`) and the loop answers `503`;
//! it never waits for room.

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TrySendError};
use mio::Waker;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Names the connection and phase a job was submitted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Slab token of the connection.
    pub token: usize,
    /// The connection's stamp when the job was submitted.
    pub stamp: u64,
}

/// What a job produced.
#[derive(Debug)]
pub enum Outcome {
    /// An access decision (`auth.rs`).
    Access(crate::auth::Verdict),
    /// A batch of presence rows written (or the error).
    Rows(Result<(), String>),
    /// A store batch committed, up to this sequence number (or the error).
    Stored(u64, Result<(), String>),
    /// The job panicked; the request gets `503`.
    Failed,
}

/// A finished job.
#[derive(Debug)]
pub struct Done {
    /// The ticket it was submitted with.
    pub ticket: Ticket,
    /// What it produced.
    pub outcome: Outcome,
}

/// What one worker thread holds between jobs.
pub struct Resources {
    /// This worker's read-only connection to the application database, if `[auth] mode = "sqlite"`.
    pub auth_db: Option<rusqlite::Connection>,
    /// HTTP client for the auth callback.
    pub http: ureq::Agent,
    /// This worker's read-write connection to the presence database, opened on first use.
    pub presence_db: Option<rusqlite::Connection>,
    /// This worker's connection to the message store, opened on first use.
    pub store_db: Option<rusqlite::Connection>,
}

/// A job: runs on a worker with that worker's resources.
pub type Task = Box<dyn FnOnce(&mut Resources) -> Outcome + Send>;

/// The queue was full.
#[derive(Debug)]
pub struct Busy;

/// The pool: a bounded job queue, worker threads, and the channel outcomes come back on.
pub struct Pool {
    jobs: Sender<(Ticket, Task)>,
    /// Finished jobs, drained by the loop when its waker fires.
    pub results: Receiver<Done>,
}

impl Pool {
    /// Starts `threads` workers; `make` builds each worker's resources on its own thread.
    pub fn start<F>(threads: usize, queue: usize, waker: Arc<Waker>, make: F) -> std::io::Result<Pool>
    where
        F: Fn() -> Resources + Send + Sync + 'static,
    {
        let (jobs, rx) = bounded::<(Ticket, Task)>(queue);
        let (done_tx, results) = unbounded();
        let make = Arc::new(make);
        for i in 0..threads {
            let rx = rx.clone();
            let done_tx = done_tx.clone();
            let waker = waker.clone();
            let make = make.clone();
            std::thread::Builder::new().name(format!("comet-worker-{i}")).spawn(move || {
                let mut res = make();
                // Ends when the pool (the loop) drops its sender.
                for (ticket, task) in rx.iter() {
                    let outcome = catch_unwind(AssertUnwindSafe(|| task(&mut res))).unwrap_or(Outcome::Failed);
                    if done_tx.send(Done { ticket, outcome }).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        }
        Ok(Pool { jobs, results })
    }

    /// Queues a job, or says at once that the queue is full.
    pub fn submit(&self, ticket: Ticket, task: Task) -> Result<(), Busy> {
        match self.jobs.try_send((ticket, task)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(Busy),
        }
    }

    /// Whether the queue is full right now.
    pub fn is_full(&self) -> bool {
        self.jobs.is_full()
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool(threads: usize, queue: usize) -> (Pool, mio::Poll) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let p = Pool::start(threads, queue, waker, || Resources { auth_db: None, http: ureq::Agent::new(), presence_db: None, store_db: None }).unwrap();
        (p, poll)
    }

    #[test]
    fn jobs_come_back_with_their_ticket_and_wake_the_loop() {
        let (p, mut poll) = pool(2, 8);
        for i in 0..5 {
            p.submit(Ticket { token: i, stamp: 100 + i as u64 }, Box::new(|_| Outcome::Failed)).unwrap();
        }
        let mut events = mio::Events::with_capacity(4);
        let mut got = Vec::new();
        while got.len() < 5 {
            poll.poll(&mut events, Some(Duration::from_secs(5))).unwrap();
            assert!(!events.is_empty(), "the waker never fired");
            got.extend(p.results.try_iter().map(|d| d.ticket.stamp));
        }
        got.sort();
        assert_eq!(got, [100, 101, 102, 103, 104]);
    }

    #[test]
    fn full_queue_is_refused_at_once() {
        let (p, _poll) = pool(1, 1);
        let (block_tx, block_rx) = bounded::<()>(0);
        let t = Ticket { token: 0, stamp: 0 };
        p.submit(t, Box::new(move |_| {
            let _ = block_rx.recv();
            Outcome::Failed
        }))
        .unwrap();
        // One job runs (blocked), one waits in the queue; the next is refused.
        let mut refused = false;
        for _ in 0..3 {
            if p.submit(t, Box::new(|_| Outcome::Failed)).is_err() {
                refused = true;
            }
        }
        assert!(refused);
        drop(block_tx);
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_worker_survives() {
        let (p, _poll) = pool(1, 4);
        p.submit(Ticket { token: 1, stamp: 1 }, Box::new(|_| panic!("boom"))).unwrap();
        p.submit(Ticket { token: 2, stamp: 2 }, Box::new(|_| Outcome::Failed)).unwrap();
        let a = p.results.recv_timeout(Duration::from_secs(5)).unwrap();
        let b = p.results.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((a.ticket.token, b.ticket.token), (1, 2));
    }
}
