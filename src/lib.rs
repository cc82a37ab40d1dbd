//! comet: a COMET (server push) daemon. Browsers long-poll it over HTTP (nginx push module /
//! nchan compatible); backends (PHP with phpredis or predis, `redis-cli`) drive it over a
//! Redis-protocol control socket; one thread runs everything that touches a socket.
//!
//! The files, in the order data flows through them:
//!
//! ```text
//! main.rs      command line, config, signals            -> Server::bind, Server::run
//! config.rs    server.toml -> raw serde struct -> validated Config
//! server.rs    the mio loop: accept -> read -> dispatch -> write -> timers -> reap
//! listen.rs    the listening sockets (backlog, SO_REUSEPORT)
//! conn.rs      one connection: input buffer, output queue of shared chunks, phase
//! http.rs      HTTP heads parsed (pure), responses encoded         \  protocol code:
//! resp.rs      RESP2 commands parsed (pure), replies encoded       /  bytes in, result out
//! browser.rs   a poll: identify the session, check the channel, hold or answer
//! stream.rs    an EventSource or WebSocket stream: opened like a poll, fed by every publish
//! sse.rs       the event-stream encoding (pure)
//! ws.rs        WebSocket handshake key and frames, the client's frames checked (pure)
//! control.rs   a backend command: AUTH, PUBLISH, SESSION.OPEN/CLOSE, INFO
//! cluster.rs   several nodes as one through Redis: the loop's own link, publish script, follows
//! cluster_presence.rs  who is online across the nodes: each node's share, counted in Redis
//! mercure_http.rs  the Mercure hub at /.well-known/mercure: publish, subscribe, resume, API
//! mercure.rs   Mercure forms, topic selectors, JWTs, event framing (pure)
//! mercure_hub.rs  Mercure's hub-wide history, subscribers, subscriptions (pure)
//! mercure_cluster.rs  Mercure's updates through Redis: one order for the whole cluster
//! guard.rs     failed-token counting per address: penalties, rate-limited log lines
//! admin.rs     the push module's publisher endpoint, /status, /metrics, the admin page
//! metrics.rs   Prometheus text, status JSON, the admin page's live snapshot
//! auth.rs      access checks: open patterns, signed keys, cache; SQLite and HTTP jobs
//! worker.rs    the pool that runs blocking jobs, answering through the loop's Waker
//! hub.rs       channels, buffers, held polls, sessions (pure: no sockets, no clock)
//! message.rs   a published message and its wire forms, each encoded at most once
//! presence.rs  who is online and where, with grace; online/offline/join/leave events (pure)
//! presence_rows.rs  those events as rows in the application's SQLite, batched by the loop
//! store.rs     channel buffers persisted to SQLite: the loop batches, a worker writes behind
//! time.rs      HTTP dates and log stamps
//! log.rs       one line per event on stderr
//! notify.rs    systemd's READY=1 / STOPPING=1 / WATCHDOG=1
//! ```
//!
//! `docs/architecture.md` walks one request through these files.

pub mod admin;
pub mod auth;
pub mod browser;
pub mod cluster;
pub mod cluster_presence;
pub mod check;
pub mod config;
pub mod conn;
pub mod control;
pub mod http;
pub mod hub;
pub mod listen;
pub mod guard;
pub mod log;
pub mod mercure;
pub mod mercure_cluster;
pub mod mercure_http;
pub mod mercure_hub;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod presence;
pub mod presence_rows;
pub mod resp;
pub mod server;
pub mod sse;
pub mod stream;
pub mod store;
pub mod time;
pub mod worker;
pub mod ws;
