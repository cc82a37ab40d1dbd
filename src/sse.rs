//! The event-stream (EventSource) encoding, as nchan's `eventsource` subscriber writes it: a
//! stream opens with the comment `: hi`, each message is one event (`id: <time>:<tag>`, then one
//! `data:` line per line of the body, then a blank line), a bare comment keeps an idle stream
//! alive, and an ending is a `close` event saying why. Pure: bytes out, no sockets.

use crate::hub::MsgId;

/// The first bytes of every stream.
pub const HELLO: &[u8] = b": hi\n\n";

/// The keep-alive comment.
pub const PING: &[u8] = b":\n\n";

/// One message as an event. The body is split into `data:` lines at `\n`, `\r\n` and `\r`, the
/// three line ends an EventSource parser knows: a body whose lines end in `\n` arrives unchanged
/// (the browser joins the lines with `\n`); `\r\n` and `\r` arrive as `\n`.
pub fn event(id: MsgId, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 32 + body.len() / 8);
    out.extend_from_slice(format!("id: {id}\n").as_bytes());
    let mut rest = body;
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r').unwrap_or(rest.len());
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&rest[..end]);
        out.push(b'\n');
        if end == rest.len() {
            break;
        }
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') { 2 } else { 1 };
        rest = &rest[end + skip..];
    }
    out.push(b'\n');
    out
}

/// The event that ends a stream: `event: close`, its data the status and why ("410 channel
/// deleted"). Sent without an id, so the browser's last event id stays the last message's.
pub fn close(status: u16, why: &str) -> Vec<u8> {
    format!("event: close\ndata: {status} {why}\n\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_become_data_lines() {
        let id = MsgId { time: 10, tag: 2 };
        let table: &[(&[u8], &str)] = &[
            (b"", "id: 10:2\ndata: \n\n"),
            (b"x", "id: 10:2\ndata: x\n\n"),
            (b"a\nb", "id: 10:2\ndata: a\ndata: b\n\n"),
            (b"a\r\nb\rc", "id: 10:2\ndata: a\ndata: b\ndata: c\n\n"),
            (b"a\n", "id: 10:2\ndata: a\ndata: \n\n"),
            (b"\n\n", "id: 10:2\ndata: \ndata: \ndata: \n\n"),
            (b"data: x", "id: 10:2\ndata: data: x\n\n"),
        ];
        for (body, want) in table {
            assert_eq!(String::from_utf8(event(id, body)).unwrap(), *want, "{body:?}");
        }
        assert_eq!(close(410, "channel deleted"), b"event: close\ndata: 410 channel deleted\n\n");
    }

    /// What a browser's EventSource parser makes of an event: the data lines joined by `\n`.
    fn browser_data(ev: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(ev).unwrap();
        let lines: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        lines.join("\n").into_bytes()
    }

    #[test]
    fn a_body_with_newlines_arrives_unchanged() {
        for body in [&b"one"[..], b"two\nlines", b"\nleading", b"trailing\n", b"{\"a\":\n 1}"] {
            assert_eq!(browser_data(&event(MsgId { time: 1, tag: 0 }, body)), body);
        }
    }
}
