//! Streams: EventSource and WebSocket subscribers on the same `/sub/` URLs as long-poll. A stream
//! is decided like a poll (session cookie, private channels, access checks on the workers, signed
//! keys); once allowed it gets its response head (a `200 text/event-stream`, or a `101` upgrade),
//! every buffered message after its cursor, and then stays a waiter on its channel under one hold
//! id: each publish writes the message's event or frame (encoded once per message and transport,
//! `message.rs`) and puts it back among the waiters. It counts as online from open to close.
//!
//! It ends on a channel delete, a session close or kick (a `close` event, or a Close frame
//! 1001 "410 Gone: ..."), at shutdown, when the peer goes, or when it stops reading (the
//! slow-reader caps of every connection). Keep-alives (`browser.stream_ping_secs`): a comment on
//! an event stream, a Ping on a WebSocket, which is closed when the Pong does not come back
//! before the next one. A WebSocket's client frames are read by `ws::Reader`; a protocol error
//! closes that connection with its code.

use crate::conn::{Chunk, Hold, PendingPoll, Phase, Stream, Transport};
use crate::http;
use crate::hub::{Cursor, Message, Poll};
use crate::message::Wire;
use crate::server::Server;
use crate::ws;
use std::sync::Arc;

/// The subprotocols a WebSocket may ask for, in the order they are preferred, and the frame form
/// each gets. nchan compares the offered value's start with its name, so `ws+meta.nchan` matches
/// as a prefix here too.
const SUBPROTOCOLS: [(&str, Wire); 2] = [("ws+meta.comet", Wire::WsComet), ("ws+meta.nchan", Wire::WsNchan)];

/// Which transport a subscribe request asks for, or why it cannot have it.
pub fn transport_of(req: &http::Request<'_>) -> Result<Transport, (u16, &'static str, &'static str)> {
    if req.websocket {
        match req.ws_version.map(str::trim) {
            Some("13") => {}
            _ => return Err((426, "Sec-WebSocket-Version: 13\r\n", "WebSocket version 13 only")),
        }
        let Some(key) = req.ws_key.filter(|k| ws::valid_key(k)) else { return Err((400, "", "bad Sec-WebSocket-Key")) };
        let offered = req.ws_protocol.unwrap_or("");
        let wire = offered
            .split(',')
            .map(str::trim)
            .find_map(|o| SUBPROTOCOLS.iter().find(|(name, _)| o.starts_with(name)).map(|&(_, w)| w))
            .unwrap_or(Wire::WsPlain);
        let mut accept = [0u8; 28];
        accept.copy_from_slice(ws::accept_key(key).as_bytes());
        return Ok(Transport::WebSocket { accept, wire });
    }
    if req.accept.is_some_and(|a| a.contains("text/event-stream")) {
        return Ok(Transport::EventSource);
    }
    Ok(Transport::LongPoll)
}

/// The index of a stream's transport in `Server::open_streams` and the delivery counters.
fn slot(wire: Wire) -> usize {
    if wire == Wire::Sse {
        0
    } else {
        1
    }
}

impl Server {
    /// Opens an allowed stream: its head, the messages after its cursor, then it waits.
    pub(crate) fn open_stream(&mut self, t: usize, p: PendingPoll<'_>, user: Option<String>) {
        let id = self.stamp();
        let mut p = p;
        if !self.presence_start(&mut p, user, id, t) {
            // Anonymous: still counted on its channel while the stream is open.
            self.presence.poll_started("", None, &p.channel, id, t, &mut self.events);
        }
        // The backlog first, then the stream waits: nothing can be published in between.
        let (mut backlog, mut skipped, mut cursor) = (Vec::<Arc<Message>>::new(), false, p.cursor);
        let name = loop {
            match self.hub.poll(&p.channel, cursor, id, t, self.now_secs) {
                Poll::Held(name) => break name,
                Poll::Message(m, dropped) => {
                    skipped |= dropped && backlog.is_empty();
                    let rest = self.hub.after(&p.channel, m.id, usize::MAX);
                    self.hub.count_delivered(rest.len());
                    backlog.push(m);
                    backlog.extend(rest);
                    cursor = backlog.last().map_or(cursor, |m| Cursor::After(m.id));
                }
            }
        };
        let last = backlog.last().map(|m| m.id).or(p.echo);
        let (wire, accept) = match p.transport {
            Transport::WebSocket { accept, wire } => (wire, Some(accept)),
            _ => (Wire::Sse, None),
        };
        let mut head = Vec::with_capacity(256);
        match accept {
            Some(accept) => {
                head.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
                head.extend_from_slice(&accept);
                head.extend_from_slice(b"\r\n");
                if let Some((name, _)) = SUBPROTOCOLS.iter().find(|(_, w)| *w == wire) {
                    head.extend_from_slice(format!("Sec-WebSocket-Protocol: {name}\r\n").as_bytes());
                }
            }
            None => {
                head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
                head.extend_from_slice(format!("Date: {}\r\n", crate::time::http_date(self.now_secs)).as_bytes());
                head.extend_from_slice(
                    b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache, no-store\r\nX-Accel-Buffering: no\r\nConnection: close\r\n",
                );
                head.extend_from_slice(p.lines.as_deref().unwrap_or_default());
            }
        }
        if skipped {
            // The cursor is older than the buffer: say so, as a long-poll answer does.
            head.extend_from_slice(b"X-Comet-Skipped: 1\r\n");
        }
        head.extend_from_slice(b"\r\n");
        if accept.is_none() {
            head.extend_from_slice(crate::sse::HELLO);
        }
        let n = backlog.len() as u64;
        let k = slot(wire);
        self.open_streams[k] += 1;
        self.counters.stream_deliveries[k] += n;
        let Some(c) = self.conns.get_mut(t) else { return };
        c.out.append(|o| o.extend_from_slice(&head));
        for m in backlog {
            c.out.push(Chunk::Msg(m, wire));
        }
        c.stamp = id;
        if !c.inbuf.is_empty() {
            // Sent after the request (a WebSocket's first frames): `stream_input` reads it.
            self.pending.push(t);
        }
        let PendingPoll { sid, echo, lines, .. } = p;
        let cursor = last.or(echo);
        let sid = self.presence.shared_sid(&sid);
        let Some(c) = self.conns.get_mut(t) else { return };
        c.phase = Phase::Stream(Box::new(Stream {
            hold: Hold { id, channel: name, sid, cursor, lines, keep_alive: false },
            wire,
            ws: accept.map(|_| ws::Reader::default()),
            pong_due: false,
            ending: false,
            flush_queued: false,
        }));
        self.start_ping_timer(t, id);
        self.flush(t);
    }

    /// Writes `msg` to stream `t` if it is still hold `id`; true if it did (the stream waits again).
    pub(crate) fn stream_deliver(&mut self, t: usize, id: u64, msg: &Arc<Message>) -> bool {
        let Some(c) = self.conns.get_mut(t) else { return false };
        let wire = match &mut c.phase {
            Phase::Stream(s) if s.hold.id == id && !c.dead && !s.ending => {
                s.hold.cursor = Some(msg.id);
                s.wire
            }
            _ => return false,
        };
        self.counters.stream_deliveries[slot(wire)] += 1;
        // Queued, and written once the turn's input is handled (`flush_streams`): a backend's
        // pipelined burst then reaches each stream in one write, not one write per message.
        c.out.push(Chunk::Msg(msg.clone(), wire));
        if let Phase::Stream(s) = &mut c.phase {
            if !s.flush_queued {
                s.flush_queued = true;
                self.streams_to_flush.push(t);
            }
        }
        true
    }

    /// Writes what this turn's publishes queued for streams; the caps of `flush` apply.
    pub(crate) fn flush_streams(&mut self) {
        let mut list = std::mem::take(&mut self.streams_to_flush);
        // In token order, as the fan-out walks its waiters.
        list.sort_unstable();
        for t in list.drain(..) {
            match self.conns.get_mut(t).map(|c| &mut c.phase) {
                Some(Phase::Stream(s)) => s.flush_queued = false,
                Some(Phase::Mercure(s)) => s.flush_queued = false,
                _ => {}
            }
            self.flush(t);
        }
        self.streams_to_flush = list;
    }

    /// Ends stream `t` with a final event or Close frame; it is freed once that is written.
    /// The hub no longer holds it (the channel was deleted, or the caller cancelled it).
    pub(crate) fn end_stream(&mut self, t: usize, status: u16, why: &str) {
        let Some(c) = self.conns.get_mut(t) else { return };
        let Phase::Stream(s) = &mut c.phase else { return };
        if s.ending || c.dead {
            return;
        }
        s.ending = true;
        let bytes = match s.ws {
            Some(_) => ws::close_frame(ws::CLOSE_GOING_AWAY, &format!("{status} {}: {why}", http::reason(status))),
            None => crate::sse::close(status, why),
        };
        c.out.append(|o| o.extend_from_slice(&bytes));
        c.close_after_write = true;
        self.flush(t);
    }

    /// Frees what an open stream holds as its connection is reaped.
    pub(crate) fn stream_closed(&mut self, s: &Stream) {
        self.open_streams[slot(s.wire)] -= 1;
        self.hub.cancel(&s.hold.channel, s.hold.id);
        self.presence.poll_ended(s.hold.sid(), &s.hold.channel, s.hold.id, self.now);
    }

    /// Reads a stream's input: an event stream's is dropped; a WebSocket's frames are answered
    /// (Ping, Close) or passed over, and a protocol error closes it with its code.
    pub(crate) fn stream_input(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(t) else { return };
        let Phase::Stream(s) = &mut c.phase else { return };
        let Some(reader) = s.ws.as_mut() else {
            c.inbuf.clear();
            return;
        };
        if s.ending {
            c.inbuf.clear();
            return;
        }
        let mut used = 0;
        let mut reply = Vec::new();
        let mut close = false;
        loop {
            match reader.read(&c.inbuf[used..]) {
                Ok(None) => break,
                Ok(Some((event, n))) => {
                    used += n;
                    match event {
                        Some(ws::Event::Ping(payload)) => ws::frame(&mut reply, ws::Opcode::Pong, &payload),
                        Some(ws::Event::Pong) => s.pong_due = false,
                        Some(ws::Event::Close(code)) => {
                            // Echo the client's code (RFC 6455 5.5.1), then close.
                            match code {
                                Some(code) => reply.extend_from_slice(&ws::close_frame(code, "")),
                                None => ws::frame(&mut reply, ws::Opcode::Close, b""),
                            }
                            close = true;
                            break;
                        }
                        Some(ws::Event::Message(..)) | None => {}
                    }
                }
                Err(ws::Fail(code, why)) => {
                    crate::debug!("websocket from {} closed: {why} ({code})", c.peer);
                    self.counters.rejected += 1;
                    reply.extend_from_slice(&ws::close_frame(code, why));
                    close = true;
                    break;
                }
            }
        }
        if close {
            s.ending = true;
            c.inbuf.clear();
            c.close_after_write = true;
        } else {
            c.inbuf.drain(..used);
        }
        if !reply.is_empty() {
            c.out.append(|o| o.extend_from_slice(&reply));
        }
        if close || !reply.is_empty() {
            self.flush(t);
        }
    }

    /// A keep-alive is due on stream `t` (if it is still hold `id`): a WebSocket that did not
    /// answer the last Ping is closed.
    pub(crate) fn stream_ping(&mut self, t: usize, id: u64) {
        let Some(c) = self.conns.get_mut(t) else { return };
        let Phase::Stream(s) = &mut c.phase else { return };
        if s.hold.id != id || c.dead || s.ending {
            return;
        }
        match s.ws {
            Some(_) if s.pong_due => {
                crate::debug!("websocket from {} closed: no Pong since the last Ping", c.peer);
                self.kill(t);
                return;
            }
            Some(_) => {
                s.pong_due = true;
                c.out.append(|o| ws::frame(o, ws::Opcode::Ping, b""));
            }
            None => c.out.append(|o| o.extend_from_slice(crate::sse::PING)),
        }
        self.start_ping_timer(t, id);
        self.flush(t);
    }
}
