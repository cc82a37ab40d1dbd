//! WebSocket (RFC 6455), the server's side, as pure functions over bytes: the handshake's accept
//! key, the frames the server sends, and the client's frames read and checked.
//!
//! comet's own code rather than a framing crate such as `tungstenite`: a subscriber's socket is
//! the loop's (non-blocking, its output a queue of chunks shared between connections), and the
//! point of the streaming transports is that a message's frame is encoded once and the same bytes
//! go to every subscriber. A server frame is unmasked, so it is the same for all of them; a crate
//! that owns the stream and writes each frame per connection would encode (and copy) it once per
//! subscriber. What the server has to read is small: a subscriber only pings, pongs and closes, so
//! the reader checks what RFC 6455 requires (masking, control frame rules, UTF-8, a size cap) and
//! keeps nothing but a capped fragment buffer.

use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 section 1.3.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest message a client may send (a subscriber has nothing to say beyond pings and closes).
pub const MAX_CLIENT_MESSAGE: usize = 16 * 1024;

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0,
    Text = 1,
    Binary = 2,
    Close = 8,
    Ping = 9,
    Pong = 10,
}

/// Close codes the server sends.
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_BAD_DATA: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(GUID);
    base64(&h.finalize())
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether a `Sec-WebSocket-Key` is well formed: 16 bytes in base64 (24 characters).
pub fn valid_key(key: &str) -> bool {
    let k = key.trim().as_bytes();
    k.len() == 24 && k.ends_with(b"==") && k[..22].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// Appends one unmasked, unfragmented frame.
pub fn frame(out: &mut Vec<u8>, op: Opcode, payload: &[u8]) {
    out.push(0x80 | op as u8);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// A client's frame: first byte `b0` (FIN, opcode), the payload masked with `mask`. The server
/// never sends one; the load generator and the tests do.
pub fn client_frame(b0: u8, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    frame(&mut out, Opcode::Text, payload);
    let at = out.len() - payload.len();
    out[0] = b0;
    out[1] |= 0x80;
    out.splice(at..at, mask);
    for (i, b) in out[at + 4..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    out
}

/// A Close frame with a code and a reason (cut to fit a control frame's 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    let mut r = reason.len().min(123);
    while !reason.is_char_boundary(r) {
        r -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..r]);
    let mut out = Vec::with_capacity(p.len() + 2);
    frame(&mut out, Opcode::Close, &p);
    out
}

/// What a client's frames amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A whole data message (text checked as UTF-8): read and ignored by a subscriber.
    Message(Opcode, usize),
    /// A Ping: answer with a Pong carrying this payload.
    Ping(Vec<u8>),
    /// A Pong.
    Pong,
    /// A Close, with the client's code if it gave one.
    Close(Option<u16>),
}

/// Why the connection must be closed: the code to send, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fail(pub u16, pub &'static str);

/// The client's side of one connection as it is read: the message being assembled.
#[derive(Debug, Default)]
pub struct Reader {
    /// Opcode of the data message in progress (its first fragment's), if any.
    op: Option<Opcode>,
    /// Its payload so far (at most `MAX_CLIENT_MESSAGE`).
    data: Vec<u8>,
}

impl Reader {
    /// Reads one frame from the start of `buf`. Ok(None): not all there yet. Ok(Some((event,
    /// n))): the frame used `n` bytes, and `event` is what it completed (None for a fragment
    /// that is not the last).
    pub fn read(&mut self, buf: &[u8]) -> Result<Option<(Option<Event>, usize)>, Fail> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return Err(Fail(CLOSE_PROTOCOL, "reserved bits set"));
        }
        let op = match b0 & 0x0f {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            10 => Opcode::Pong,
            _ => return Err(Fail(CLOSE_PROTOCOL, "unknown opcode")),
        };
        if b1 & 0x80 == 0 {
            return Err(Fail(CLOSE_PROTOCOL, "client frame not masked"));
        }
        let control = op as u8 >= 8;
        let (len, mut at) = match b1 & 0x7f {
            126 => {
                let Some(b) = buf.get(2..4) else { return Ok(None) };
                (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
            }
            127 => {
                let Some(b) = buf.get(2..10) else { return Ok(None) };
                let mut a = [0; 8];
                a.copy_from_slice(b);
                (u64::from_be_bytes(a), 10)
            }
            n => (u64::from(n), 2),
        };
        if control && (len > 125 || !fin) {
            return Err(Fail(CLOSE_PROTOCOL, "bad control frame"));
        }
        // Checked before the payload is waited for: an oversized frame is refused at its header.
        if !control && (self.data.len() as u64).saturating_add(len) > MAX_CLIENT_MESSAGE as u64 {
            return Err(Fail(CLOSE_TOO_BIG, "message too big"));
        }
        let len = len as usize;
        let Some(mask) = buf.get(at..at + 4) else { return Ok(None) };
        let mask = [mask[0], mask[1], mask[2], mask[3]];
        at += 4;
        let Some(masked) = buf.get(at..at + len) else { return Ok(None) };
        let payload: Vec<u8> = masked.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]).collect();
        let used = at + len;
        let event = match op {
            Opcode::Ping => Some(Event::Ping(payload)),
            Opcode::Pong => Some(Event::Pong),
            Opcode::Close => {
                let code = match payload.len() {
                    0 => None,
                    1 => return Err(Fail(CLOSE_PROTOCOL, "bad close frame")),
                    _ => Some(u16::from_be_bytes([payload[0], payload[1]])),
                };
                if payload.len() > 2 && std::str::from_utf8(&payload[2..]).is_err() {
                    return Err(Fail(CLOSE_BAD_DATA, "close reason not UTF-8"));
                }
                Some(Event::Close(code))
            }
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                match (op, self.op) {
                    (Opcode::Continuation, None) => return Err(Fail(CLOSE_PROTOCOL, "continuation without a message")),
                    (Opcode::Text | Opcode::Binary, Some(_)) => return Err(Fail(CLOSE_PROTOCOL, "new message inside a fragmented one")),
                    (Opcode::Text | Opcode::Binary, None) => self.op = Some(op),
                    _ => {}
                }
                self.data.extend_from_slice(&payload);
                if !fin {
                    None
                } else {
                    let op = self.op.take().unwrap_or(Opcode::Binary);
                    let data = std::mem::take(&mut self.data);
                    if op == Opcode::Text && std::str::from_utf8(&data).is_err() {
                        return Err(Fail(CLOSE_BAD_DATA, "text message not UTF-8"));
                    }
                    Some(Event::Message(op, data.len()))
                }
            }
        };
        Ok(Some((event, used)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame, masked.
    fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
        client_frame(b0, [0x37, 0xfa, 0x21, 0x3d], payload)
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Event>, Fail> {
        let mut r = Reader::default();
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((ev, n)) = r.read(&bytes[at..])? {
            got.extend(ev);
            at += n;
        }
        assert_eq!(at, bytes.len(), "every byte used");
        Ok(got)
    }

    #[test]
    fn the_accept_key_of_rfc_6455() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in ["", "short==", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZ$=="] {
            assert!(!valid_key(bad), "{bad}");
        }
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn server_frames() {
        let mut f = Vec::new();
        frame(&mut f, Opcode::Text, b"hi");
        assert_eq!(f, [0x81, 2, b'h', b'i']);
        for (n, head) in [(125usize, 2usize), (126, 4), (65535, 4), (65536, 10)] {
            let mut f = Vec::new();
            frame(&mut f, Opcode::Binary, &vec![7; n]);
            assert_eq!(f.len(), head + n, "{n}");
        }
        let c = close_frame(1001, "410 Gone: channel deleted");
        assert_eq!(&c[..4], &[0x88, 27, 0x03, 0xe9]);
        assert_eq!(close_frame(1000, &"é".repeat(100)).len(), 2 + 2 + 122, "cut on a character");
    }

    #[test]
    fn client_frames_as_a_table() {
        let mut frag = client(0x01, b"he");
        frag.extend(client(0x89, b"p")); // a ping between fragments is allowed
        frag.extend(client(0x80, b"llo"));
        let table: Vec<(Vec<u8>, Result<Vec<Event>, Fail>)> = vec![
            (client(0x81, b"hello"), Ok(vec![Event::Message(Opcode::Text, 5)])),
            (client(0x82, &[0xff, 0]), Ok(vec![Event::Message(Opcode::Binary, 2)])),
            (client(0x89, b"abc"), Ok(vec![Event::Ping(b"abc".to_vec())])),
            (client(0x8a, b""), Ok(vec![Event::Pong])),
            (client(0x88, &[0x03, 0xe8, b'b', b'y', b'e']), Ok(vec![Event::Close(Some(1000))])),
            (client(0x88, b""), Ok(vec![Event::Close(None)])),
            (client(0x81, &vec![b'x'; 300]), Ok(vec![Event::Message(Opcode::Text, 300)])),
            (frag, Ok(vec![Event::Ping(b"p".to_vec()), Event::Message(Opcode::Text, 5)])),
            (vec![0x81, 0x02, b'h', b'i'], Err(Fail(CLOSE_PROTOCOL, "client frame not masked"))),
            (client(0xc1, b"x"), Err(Fail(CLOSE_PROTOCOL, "reserved bits set"))),
            (client(0x83, b"x"), Err(Fail(CLOSE_PROTOCOL, "unknown opcode"))),
            (client(0x09, b"x"), Err(Fail(CLOSE_PROTOCOL, "bad control frame"))),
            (client(0x89, &[0; 126]), Err(Fail(CLOSE_PROTOCOL, "bad control frame"))),
            (client(0x80, b"x"), Err(Fail(CLOSE_PROTOCOL, "continuation without a message"))),
            ([client(0x01, b"a"), client(0x81, b"b")].concat(), Err(Fail(CLOSE_PROTOCOL, "new message inside a fragmented one"))),
            (client(0x81, &[0xc3, 0x28]), Err(Fail(CLOSE_BAD_DATA, "text message not UTF-8"))),
            // UTF-8 split across fragments is checked on the whole message.
            ([client(0x01, &[0xc3]), client(0x80, &[0xa9])].concat(), Ok(vec![Event::Message(Opcode::Text, 2)])),
            (client(0x88, &[0x03]), Err(Fail(CLOSE_PROTOCOL, "bad close frame"))),
            (client(0x82, &vec![0; MAX_CLIENT_MESSAGE + 1]), Err(Fail(CLOSE_TOO_BIG, "message too big"))),
            (
                [client(0x02, &vec![0; MAX_CLIENT_MESSAGE]), client(0x80, b"x")].concat(),
                Err(Fail(CLOSE_TOO_BIG, "message too big")),
            ),
        ];
        for (bytes, want) in &table {
            assert_eq!(&read_all(bytes), want, "{:02x?}", &bytes[..bytes.len().min(12)]);
            // Split at every byte: the first part alone is incomplete (or already the error).
            for cut in 0..bytes.len() {
                let mut r = Reader::default();
                match r.read(&bytes[..cut]) {
                    Ok(None) => {}
                    Ok(Some((_, n))) => assert!(n <= cut),
                    Err(e) => assert_eq!(want.as_ref().err(), Some(&e), "an error shows in the bytes that carry it"),
                }
            }
        }
    }

    #[test]
    fn an_oversized_length_is_refused_before_its_payload_arrives() {
        let mut head = vec![0x82, 0x80 | 127];
        head.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(Reader::default().read(&head), Err(Fail(CLOSE_TOO_BIG, "message too big")));
    }
}
