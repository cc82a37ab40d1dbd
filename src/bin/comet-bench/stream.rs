//! The streaming subscribers' wire, as pure functions over a buffer: the response head of a
//! stream (`200` event stream, `101` WebSocket), event-stream events, and a server's WebSocket
//! frames with nchan's `ws+meta.nchan` header (`id: <id>\ncontent-type: <ct>\n\n<body>`), which
//! both comet and nchan send to a client that asks for it.

/// Which transport the subscribers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    LongPoll,
    EventSource,
    WebSocket,
}

impl Transport {
    pub fn parse(s: &str) -> Option<Transport> {
        match s {
            "longpoll" => Some(Transport::LongPoll),
            "eventsource" => Some(Transport::EventSource),
            "websocket" => Some(Transport::WebSocket),
            _ => None,
        }
    }
}

/// The key every subscriber sends; the load generator does not check the accept value.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A stream's response head: Ok(Some((status, length))) once it is all there.
pub fn head(buf: &[u8]) -> Result<Option<(u16, usize)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > 64 * 1024 { Err("stream head over 64 KiB".into()) } else { Ok(None) };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "head not text".to_string())?;
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad status line {:?}", line.lines().next()))?;
    Ok(Some((status, end + 4)))
}

/// One item of an event stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Sse<'a> {
    /// A comment block (`: hi`, keep-alives) or an event without data.
    Other,
    /// An event: its id (if any) and its data lines joined by `\n`.
    Event(Option<&'a str>, Vec<u8>),
}

/// The next block of an event stream (up to a blank line): the item and the bytes it used.
pub fn sse_next(buf: &[u8]) -> Option<(Sse<'_>, usize)> {
    let end = buf.windows(2).position(|w| w == b"\n\n")?;
    let block = &buf[..end];
    let (mut id, mut data, mut any) = (None, Vec::new(), false);
    for line in block.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"id: ") {
            id = std::str::from_utf8(v).ok();
        } else if let Some(v) = line.strip_prefix(b"data: ").or_else(|| line.strip_prefix(b"data:")) {
            if any {
                data.push(b'\n');
            }
            data.extend_from_slice(v);
            any = true;
        }
    }
    Some((if any { Sse::Event(id, data) } else { Sse::Other }, end + 2))
}

/// The next server frame: (opcode, payload range in `buf`, bytes used).
pub fn ws_next(buf: &[u8]) -> Result<Option<(u8, std::ops::Range<usize>, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] & 0x80 != 0 {
        return Err("masked server frame".into());
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(a) as usize, 10)
        }
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    Ok(Some((buf[0] & 0x0f, at..at + len, at + len)))
}

/// A `ws+meta.nchan` payload: its id and body.
pub fn meta(payload: &[u8]) -> Option<(&str, &[u8])> {
    let rest = payload.strip_prefix(b"id: ")?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let id = std::str::from_utf8(&rest[..nl]).ok()?;
    let end = payload.windows(2).position(|w| w == b"\n\n")?;
    Some((id, &payload[end + 2..]))
}

/// A masked client frame (a Pong answering a Ping).
pub fn client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut out = vec![0x80 | op, 0x80 | payload.len().min(125) as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().take(125).enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_stream_items_whole_and_split_at_every_byte() {
        let wire = b": hi\n\nid: 5:0\ndata: a\ndata: b\n\n:\n\nid: 5:1\ndata: \n\n";
        let want = [Sse::Other, Sse::Event(Some("5:0"), b"a\nb".to_vec()), Sse::Other, Sse::Event(Some("5:1"), Vec::new())];
        let mut at = 0;
        for w in &want {
            let (item, n) = sse_next(&wire[at..]).unwrap();
            assert_eq!(&item, w);
            at += n;
        }
        assert_eq!(at, wire.len());
        for cut in 0..wire.len() {
            // A prefix reads only items wholly inside it.
            let mut at = 0;
            while let Some((_, n)) = sse_next(&wire[at..cut]) {
                at += n;
            }
            assert!(at <= cut);
        }
    }

    #[test]
    fn websocket_frames_whole_and_split_at_every_byte() {
        let mut wire = vec![0x81, 17];
        wire.extend_from_slice(b"id: 7:2\nct: t\n\nhi");
        wire.extend_from_slice(&[0x89, 0]);
        let mut big = vec![0x82, 126, 0x01, 0x00];
        big.extend(std::iter::repeat_n(7u8, 256));
        wire.extend_from_slice(&big);
        let mut long = vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        long.extend(std::iter::repeat_n(1u8, 65536));
        wire.extend_from_slice(&long);
        let mut got = Vec::new();
        let mut at = 0;
        while let Some((op, r, n)) = ws_next(&wire[at..]).unwrap() {
            got.push((op, r.len()));
            if op == 1 {
                assert_eq!(meta(&wire[at..][r]), Some(("7:2", &b"hi"[..])));
            }
            at += n;
        }
        assert_eq!(got, [(1, 17), (9, 0), (2, 256), (2, 65536)]);
        for cut in 0..2 + 17 + 2 + 4 + 256 {
            let mut at = 0;
            while let Some((_, _, n)) = ws_next(&wire[at..cut]).unwrap() {
                at += n;
            }
            assert!(at <= cut);
        }
        assert!(ws_next(&[0x81, 0x81, 0, 0, 0, 0, 0]).is_err(), "masked");
        assert_eq!(head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81").unwrap(), Some((101, 56)));
        assert_eq!(head(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
    }
}
