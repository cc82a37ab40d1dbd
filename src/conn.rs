//! One connection's state: its socket, input buffer, output queue and phase. Owned by the loop's
//! slab; only the loop (`server.rs` and the handlers it calls) touches it.
//!
//! The output queue holds chunks, so a message's encoded bytes are shared by `Arc` with every
//! subscriber instead of copied: a delivery pushes two pointers (the connection's own header
//! lines and the message's shared tail) and the socket write gathers them with `writev`.

use crate::hub::{Message, MsgId};
use crate::message::Wire;
use mio::net::TcpStream;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Which listener a connection came from, and so which protocol it speaks. (The values index
/// `Server::open_by_kind`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Long-poll HTTP.
    Browser = 0,
    /// RESP control socket.
    Control = 1,
    /// Admin HTTP.
    Admin = 2,
}

/// The phase of an HTTP connection. Legal moves:
/// `Idle -> Head` (first byte) `-> Body` (head with a body) `-> Idle` (answered, keep-alive) or
/// `-> Authorizing` (a worker checks access) `-> Held` (a poll that waits) `-> Idle` (answered);
/// a stream goes `Idle -> [Authorizing ->] Stream` and stays there until it ends (then closed);
/// any phase -> closed.
/// RESP connections stay `Idle` and are driven by their input alone.
#[derive(Debug)]
pub enum Phase {
    /// Between requests; the idle timer runs.
    Idle,
    /// Part of a head has arrived; the head timer runs from its first byte.
    Head,
    /// A head arrived; waiting until the input holds this many bytes: the head (kept, to be
    /// parsed again in place once the body is all there) and its `Content-Length` body.
    Body(usize),
    /// A poll waiting for its access check (a worker job); the job's ticket carries this
    /// connection's stamp.
    Authorizing(Box<PendingPoll<'static>>),
    /// A poll (or stream) on a channel this cluster node does not follow yet: it waits until the
    /// node has subscribed in Redis and fetched the channel's recent messages, then goes on as
    /// if just allowed (with the user its access check named). The hold timer runs meanwhile.
    Syncing(Box<(PendingPoll<'static>, Option<String>)>),
    /// A poll held on a channel until a message, a timeout, a delete or shutdown.
    Held(Hold),
    /// An open EventSource or WebSocket stream: a waiter on its channel that waits again after
    /// each message, until the channel is deleted, the session closed or kicked, the peer goes,
    /// or shutdown.
    Stream(Box<Stream>),
    /// A Mercure subscriber's event stream (`mercure_http.rs`): fed by the Mercure hub, not a
    /// waiter on a channel; it stays until the peer goes, its JWT expires, or shutdown.
    Mercure(Box<crate::mercure_http::Subscription>),
}

/// How a subscriber receives messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One HTTP answer per poll.
    LongPoll,
    /// `text/event-stream`.
    EventSource,
    /// WebSocket, with the handshake's accept key and the frame form its subprotocol asked for.
    WebSocket { accept: [u8; 28], wire: Wire },
}

/// An open stream.
#[derive(Debug)]
pub struct Stream {
    /// Its hold in the hub (the id stays the same across messages) and what it was opened with.
    pub hold: Hold,
    /// The wire form each message is sent in.
    pub wire: Wire,
    /// A WebSocket's reader of client frames; None for an event stream.
    pub ws: Option<crate::ws::Reader>,
    /// A Ping went out and no Pong came back yet (WebSocket).
    pub pong_due: bool,
    /// Its last bytes (a close event or frame) are queued: nothing more is sent.
    pub ending: bool,
    /// Messages are queued for it this turn, to be written before the loop sleeps.
    pub flush_queued: bool,
}

/// A poll on its way to being held or answered. It borrows its channel and session from the
/// request being handled; one whose access check runs on a worker owns them (`into_owned`).
#[derive(Debug)]
pub struct PendingPoll<'a> {
    /// The channel asked for.
    pub channel: Cow<'a, str>,
    /// The session id ("" when anonymous), the cache key with the channel.
    pub sid: Cow<'a, str>,
    /// Where to start reading once allowed.
    pub cursor: crate::hub::Cursor,
    /// The cursor to echo on 408.
    pub echo: Option<MsgId>,
    /// CORS lines for the answer; None for a request that needs none (the common same-origin
    /// poll, which then costs no reference count).
    pub lines: Option<Arc<[u8]>>,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
    /// The client accepts several messages in one `multipart/mixed` answer.
    pub multipart: bool,
    /// How it is answered: one poll, or a stream.
    pub transport: Transport,
    /// When the request arrived (for the access-check latency metric).
    pub asked: std::time::Instant,
    /// `Server::auth_generation` when the check was sent to a worker.
    pub generation: u64,
}

impl PendingPoll<'_> {
    /// The same poll owning its names, to outlive the request (an access check on a worker).
    pub fn into_owned(self) -> PendingPoll<'static> {
        PendingPoll { channel: Cow::Owned(self.channel.into_owned()), sid: Cow::Owned(self.sid.into_owned()), ..self }
    }
}

/// What a held poll needs to be answered later.
#[derive(Debug)]
pub struct Hold {
    /// The hold id, also the key of this poll in the channel's waiters. Never reused.
    pub id: u64,
    /// The channel it waits on (the hub's own name of it, shared).
    pub channel: Arc<str>,
    /// The session polling (None when anonymous), for presence: presence's own copy of the id,
    /// shared.
    pub sid: Option<Arc<str>>,
    /// The request's cursor, echoed on 408/503.
    pub cursor: Option<MsgId>,
    /// This request's CORS lines (None when it needs none), shared with the output queue on
    /// delivery.
    pub lines: Option<Arc<[u8]>>,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
}

impl Hold {
    /// The session polling, "" when anonymous.
    pub fn sid(&self) -> &str {
        self.sid.as_deref().unwrap_or("")
    }
}

/// A piece of pending output.
pub enum Chunk {
    /// Bytes owned by this connection (replies, error responses).
    Own(Vec<u8>),
    /// Bytes shared with other connections (per-request header lines).
    Shared(Arc<[u8]>),
    /// A message in one of its wire forms, shared.
    Msg(Arc<Message>, Wire),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Own(v) => v,
            Chunk::Shared(b) => b,
            Chunk::Msg(m, w) => m.wire(*w),
        }
    }
}

/// Most chunks handed to one `writev` (Linux takes up to 1024).
const MAX_IOVECS: usize = 64;
/// Output up to this size, in several chunks, is copied into one buffer for a single `write`.
const GATHER_BELOW: usize = 4096;

/// Pending output: chunks in order, and how much of the first one is already written.
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    offset: usize,
    /// Bytes not yet written, all chunks.
    len: usize,
}

impl OutQueue {
    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when everything is written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a chunk.
    pub fn push(&mut self, c: Chunk) {
        self.len += c.bytes().len();
        self.chunks.push_back(c);
    }

    /// Appends owned bytes: `f` writes into the last chunk when it is owned (replies pipelined
    /// back to back coalesce into one buffer), else into a new one.
    pub fn append(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        if !matches!(self.chunks.back(), Some(Chunk::Own(_))) {
            // Room for a response head or a few replies: one allocation, no regrowth.
            self.chunks.push_back(Chunk::Own(Vec::with_capacity(128)));
        }
        if let Some(Chunk::Own(v)) = self.chunks.back_mut() {
            let before = v.len();
            f(v);
            self.len += v.len() - before;
        }
    }

    /// Writes as much as the socket takes. Ok(true) when the queue is empty. `scratch` is the
    /// loop's buffer, lent to gather a small answer into.
    pub fn flush(&mut self, w: &mut impl Write, scratch: &mut [u8]) -> io::Result<bool> {
        while self.len > 0 {
            // A small answer of several chunks (a delivery: head, CORS lines, message) is copied
            // into one buffer and sent with one plain write: copying a few hundred bytes costs less
            // than the kernel's handling of an iovec array (see docs/performance.md). Larger
            // output goes as it is.
            let result = if self.chunks.len() > 1 && self.len <= GATHER_BELOW.min(scratch.len()) {
                self.write_gathered(w, scratch)
            } else if self.chunks.len() <= 4 {
                self.write_some::<4>(w)
            } else {
                self.write_some::<MAX_IOVECS>(w)
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    self.len -= written;
                    while written > 0 {
                        let front = self.chunks.front().map_or(0, |c| c.bytes().len()) - self.offset;
                        if written >= front {
                            written -= front;
                            self.chunks.pop_front();
                            self.offset = 0;
                        } else {
                            self.offset += written;
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // Drop empty owned chunks and, once idle, the memory of large ones.
        self.chunks.clear();
        self.offset = 0;
        Ok(true)
    }

    /// Sends a small answer of a few parts straight from `scratch` when nothing is queued ahead
    /// of it, the common case of a delivery to a waiting socket: no chunk is queued and no
    /// reference count is taken. What the socket does not take is queued as owned bytes.
    /// Ok(false) when output is already queued or the answer is larger than the scratch: the
    /// caller queues it as chunks.
    pub fn write_direct(&mut self, w: &mut impl Write, scratch: &mut [u8], parts: &[&[u8]]) -> io::Result<bool> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if self.len > 0 || total > GATHER_BELOW.min(scratch.len()) {
            return Ok(false);
        }
        let n = gather(scratch, parts.iter().copied());
        let written = loop {
            match w.write(&scratch[..n]) {
                Ok(k) => break k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if written < n {
            self.push(Chunk::Own(scratch[written..n].to_vec()));
        }
        Ok(true)
    }

    /// The bytes still to write, chunk by chunk (the first one less what is already written).
    fn unwritten(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().enumerate().map(|(i, c)| if i == 0 { &c.bytes()[self.offset..] } else { c.bytes() })
    }

    /// One `write` of every chunk, copied into `scratch` (which holds them all).
    fn write_gathered(&self, w: &mut impl Write, scratch: &mut [u8]) -> io::Result<usize> {
        let n = gather(scratch, self.unwritten());
        w.write(&scratch[..n])
    }

    /// One `writev` of the first `N` chunks at most. Each `writev` is a trip through the whole
    /// TCP stack, so it takes as many chunks as there are, up to `N`.
    fn write_some<const N: usize>(&self, w: &mut impl Write) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); N];
        let mut n = 0;
        for (slot, b) in slices.iter_mut().zip(self.unwritten()) {
            *slot = IoSlice::new(b);
            n += 1;
        }
        w.write_vectored(&slices[..n])
    }
}

/// Copies `pieces` one after the other to the start of `scratch` (which holds them all); returns
/// how many bytes that is.
fn gather<'a>(scratch: &mut [u8], pieces: impl Iterator<Item = &'a [u8]>) -> usize {
    let mut n = 0;
    for b in pieces {
        scratch[n..n + b.len()].copy_from_slice(b);
        n += b.len();
    }
    n
}

/// The state of a backend connection on the control port.
#[derive(Default)]
pub struct Backend {
    /// Authenticated as this token name.
    pub auth: Option<Box<str>>,
    /// Failed `AUTH` commands on this connection.
    pub auth_failures: u8,
    /// `CLIENT SETNAME` value.
    pub name: Option<Box<str>>,
    /// Channels this backend is subscribed to (`SUBSCRIBE`): it is in pub/sub mode when any.
    pub subs: std::collections::HashSet<Box<str>>,
}

/// A connection.
pub struct Conn {
    /// Unique for the daemon's life (slab tokens are reused; this is not).
    pub id: u64,
    /// Listener it came from.
    pub kind: Kind,
    /// The socket.
    pub stream: TcpStream,
    /// Peer address, for logs.
    pub peer: SocketAddr,
    /// Bytes read and not yet parsed.
    pub inbuf: Vec<u8>,
    /// Bytes to write.
    pub out: OutQueue,
    /// HTTP phase (RESP: always Idle).
    pub phase: Phase,
    /// Stamp of the current phase; timers carry the stamp they were set for and a changed stamp
    /// makes them stale. Drawn from the same never-reused counter as hold ids.
    pub stamp: u64,
    /// Close once the output is flushed (after an error response, `Connection: close`, QUIT).
    pub close_after_write: bool,
    /// The socket may have unread bytes (edge-triggered readiness not yet drained).
    pub readable: bool,
    /// What only a backend (control) connection has; browsers, most of the connections, carry
    /// none of it.
    pub backend: Option<Box<Backend>>,
    /// A reply waits for the store to commit (`fsync = "always"`); nothing more is read meanwhile.
    pub store_wait: bool,
    /// Replies waiting for the cluster's Redis. While any wait, a backend's pipelined commands
    /// that also go to Redis go on (Redis answers in order), any other waits its turn; an HTTP
    /// request's next request waits.
    pub redis_wait: u32,
    /// The peer closed its side (read returned 0).
    pub eof: bool,
    /// The poller signalled the peer's FIN or an error: read until the 0.
    pub hup: bool,
    /// Stamp of the write timer set when the output stopped moving; 0 while it moves.
    pub write_blocked: u64,
    /// Used up its read budget this turn: read again only after the next poll.
    pub yielded: bool,
    /// Marked for reaping before the next poll; nothing more is done with it.
    pub dead: bool,
    /// When the connection was accepted.
    pub since: Instant,
}

impl Conn {
    /// The backend state of a control connection (made on first use).
    pub fn backend(&mut self) -> &mut Backend {
        self.backend.get_or_insert_with(Default::default)
    }

    /// Whether this is a backend subscribed to channels (pub/sub mode).
    pub fn subscribed(&self) -> bool {
        self.backend.as_ref().is_some_and(|b| !b.subs.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `per_call` bytes per write, then says WouldBlock once every
    /// `block_every` calls, and records how many slices each `writev` got.
    struct Sink {
        got: Vec<u8>,
        per_call: usize,
        block_every: usize,
        calls: usize,
        slices: Vec<usize>,
    }

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.block_every > 0 && self.calls % self.block_every == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.slices.push(bufs.len());
            let mut left = self.per_call;
            for b in bufs {
                let n = b.len().min(left);
                self.got.extend_from_slice(&b[..n]);
                left -= n;
            }
            Ok(self.per_call - left)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn chunks_come_out_in_order_across_partial_writes() {
        let msg = Arc::new(Message::new(MsgId { time: 1, tag: 0 }, "c", "text/plain", b"tail-bytes"));
        let shared: Arc<[u8]> = Arc::from(&b"shared"[..]);
        for chunks in [1usize, 3, 4, 5, 63, 64, 65, 200] {
            for (per_call, block_every, scratch_len) in [(usize::MAX, 0, 0), (usize::MAX, 0, 64 * 1024), (1, 0, 64 * 1024), (7, 3, 0), (1000, 2, 64 * 1024)] {
                let mut q = OutQueue::default();
                let mut want = Vec::new();
                for i in 0..chunks {
                    match i % 3 {
                        0 => {
                            q.append(|o| o.extend_from_slice(format!("own{i};").as_bytes()));
                            want.extend_from_slice(format!("own{i};").as_bytes());
                        }
                        1 => {
                            q.push(Chunk::Shared(shared.clone()));
                            want.extend_from_slice(&shared);
                        }
                        _ => {
                            q.push(Chunk::Msg(msg.clone(), Wire::Sse));
                            want.extend_from_slice(msg.wire(Wire::Sse));
                        }
                    }
                }
                assert_eq!(q.len(), want.len());
                let mut sink = Sink { got: Vec::new(), per_call, block_every, calls: 0, slices: Vec::new() };
                let mut scratch = vec![0; scratch_len];
                let mut rounds = 0;
                while !q.flush(&mut sink, &mut scratch).unwrap() {
                    rounds += 1;
                    assert!(rounds < 100_000, "no progress");
                }
                assert_eq!(sink.got, want, "{chunks} chunks, {per_call} bytes per call");
                assert!(q.is_empty());
                assert!(sink.slices.iter().all(|&n| (1..=MAX_IOVECS).contains(&n)));
                if per_call == usize::MAX && block_every == 0 {
                    // Everything the socket takes goes in one write when small enough to gather,
                    // else in as few writev calls as the cap allows.
                    let calls = if chunks > 1 && want.len() <= GATHER_BELOW.min(scratch_len) { 1 } else { chunks.div_ceil(MAX_IOVECS) };
                    assert_eq!(sink.slices.len(), calls, "{chunks} chunks, scratch {scratch_len}");
                }
            }
        }
    }

    #[test]
    fn a_direct_answer_queues_only_what_the_socket_did_not_take() {
        let parts: [&[u8]; 3] = [b"head;", b"", b"message-tail"];
        let want = b"head;message-tail";
        // (bytes the socket takes per call, WouldBlock every n calls): all of it, part, none.
        for (per_call, block_every) in [(usize::MAX, 0), (7, 0), (1, 0), (usize::MAX, 1)] {
            let mut q = OutQueue::default();
            let mut sink = Sink { got: Vec::new(), per_call, block_every, calls: 0, slices: Vec::new() };
            let mut scratch = vec![0; 64];
            assert!(q.write_direct(&mut sink, &mut scratch, &parts).unwrap());
            let took = sink.got.len();
            assert_eq!(sink.calls, 1, "one write, however much it took");
            assert_eq!(q.len(), want.len() - took);
            assert_eq!(q.chunks.len(), usize::from(took < want.len()), "the rest is one owned chunk");
            sink.block_every = 0;
            while !q.flush(&mut sink, &mut scratch).unwrap() {}
            assert_eq!(sink.got, want, "{per_call} bytes per call, block every {block_every}");
        }
        // Output already queued goes first, and an answer larger than the scratch is left to the
        // caller to queue as chunks: neither writes anything.
        let mut sink = Sink { got: Vec::new(), per_call: usize::MAX, block_every: 0, calls: 0, slices: Vec::new() };
        let mut q = OutQueue::default();
        q.append(|o| o.extend_from_slice(b"earlier"));
        assert!(!q.write_direct(&mut sink, &mut [0; 64], &parts).unwrap());
        let mut q = OutQueue::default();
        assert!(!q.write_direct(&mut sink, &mut [0; 8], &parts).unwrap());
        assert_eq!((sink.calls, q.len()), (0, 0));
    }
}
