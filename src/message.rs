//! A published message and its wire forms. The hub keeps the message (id, channel of origin,
//! content type, body), not a wire format: each transport's form (the long-poll answer's shared
//! tail, the event-stream event, the WebSocket frames) is encoded at most once per message, when
//! the first subscriber of that form needs it, and then shared by `Arc` with every other one.

use crate::hub::MsgId;
use std::sync::OnceLock;

/// The wire forms a message is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// The long-poll 200's shared part (`http::message_tail`).
    Http = 0,
    /// One event-stream event (`sse::event`).
    Sse = 1,
    /// A WebSocket frame of the body alone.
    WsPlain = 2,
    /// A WebSocket frame in nchan's `ws+meta.nchan` form.
    WsNchan = 3,
    /// A WebSocket frame in `ws+meta.comet` form (nchan's, with the channel of origin).
    WsComet = 4,
}

/// A published message, shared by every buffer slot and output queue that holds it.
#[derive(Debug)]
pub struct Message {
    /// Its id on its channel.
    pub id: MsgId,
    /// Where it was first published (a copy on a joined session's private channel names the
    /// shared channel here).
    pub origin: Box<str>,
    /// Its content type.
    pub content_type: Box<str>,
    /// The body as published.
    pub body: Box<[u8]>,
    /// The wire forms made so far, by `Wire`.
    forms: [OnceLock<Box<[u8]>>; 5],
}

impl Message {
    /// A message with no wire form made yet.
    pub fn new(id: MsgId, origin: &str, content_type: &str, body: &[u8]) -> Message {
        Message { id, origin: origin.into(), content_type: content_type.into(), body: body.into(), forms: Default::default() }
    }

    /// The bytes of form `w`, encoded on first use.
    pub fn wire(&self, w: Wire) -> &[u8] {
        self.forms[w as usize].get_or_init(|| self.encode(w).into_boxed_slice())
    }

    fn encode(&self, w: Wire) -> Vec<u8> {
        let (id, ct) = (self.id, &*self.content_type);
        match w {
            Wire::Http => crate::http::message_tail(id, &crate::time::http_date(id.time), &self.origin, ct, &self.body),
            Wire::Sse => crate::sse::event(id, &self.body),
            Wire::WsPlain | Wire::WsNchan | Wire::WsComet => {
                let mut payload = Vec::with_capacity(self.body.len() + 64);
                if w != Wire::WsPlain {
                    payload.extend_from_slice(format!("id: {id}\ncontent-type: {ct}\n").as_bytes());
                    if w == Wire::WsComet {
                        payload.extend_from_slice(format!("channel: {}\n", self.origin).as_bytes());
                    }
                    payload.push(b'\n');
                }
                payload.extend_from_slice(&self.body);
                let op = if ct == "application/octet-stream" { crate::ws::Opcode::Binary } else { crate::ws::Opcode::Text };
                let mut frame = Vec::with_capacity(payload.len() + 10);
                crate::ws::frame(&mut frame, op, &payload);
                frame
            }
        }
    }

    /// The body length, for accounting.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_is_made_once_and_says_the_same_message() {
        let m = Message::new(MsgId { time: 1_700_000_000, tag: 3 }, "goods", "text/plain", b"a\nb");
        let http = m.wire(Wire::Http).as_ptr();
        assert_eq!(m.wire(Wire::Http).as_ptr(), http, "encoded once, then shared");
        assert!(m.wire(Wire::Http).ends_with(b"\r\n\r\na\nb"));
        assert_eq!(m.wire(Wire::Sse), b"id: 1700000000:3\ndata: a\ndata: b\n\n");
        assert_eq!(&m.wire(Wire::WsPlain)[..], &[0x81, 3, b'a', b'\n', b'b']);
        let nchan = m.wire(Wire::WsNchan);
        assert_eq!(&nchan[2..], b"id: 1700000000:3\ncontent-type: text/plain\n\na\nb");
        let comet = m.wire(Wire::WsComet);
        assert_eq!(&comet[2..], b"id: 1700000000:3\ncontent-type: text/plain\nchannel: goods\n\na\nb");
        let bin = Message::new(MsgId { time: 1, tag: 0 }, "c", "application/octet-stream", &[0xff]);
        assert_eq!(bin.wire(Wire::WsPlain)[0], 0x82, "binary frame for octet-stream");
    }
}
