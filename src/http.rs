//! HTTP/1.x request heads and responses, as pure functions over byte buffers (no sockets): the
//! browser and admin listeners both feed their input here. `parse_head` says "incomplete" (Ok(None))
//! until a whole head is present, and fails with the status the peer should get (400, 431, 501,
//! 505) when the head is malformed or over the cap. Only the headers the daemon acts on are kept.
//! Also here: query and cookie lookup, percent-decoding, the message cursor (`time:tag`) and
//! response encoding, including the per-message part that is encoded once and shared.

use std::borrow::Cow;

use crate::hub::MsgId;
use crate::time;

/// Most header lines accepted in one request; more is answered like an oversized head.
const MAX_HEADERS: usize = 64;

/// The request methods the daemon distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Other,
}

/// A parsed request head. It borrows the input buffer it was parsed from: a poll's head is read
/// in place, with no copy of its path or headers (the path is copied only when it has escapes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request<'a> {
    /// The method.
    pub method: Option<Method>,
    /// The path, percent-decoded, without the query.
    pub path: Cow<'a, str>,
    /// The raw query string (after `?`), still encoded.
    pub query: &'a str,
    /// The path as sent, still encoded (where an escaped `/` must stay apart from a real one).
    pub raw_path: &'a str,
    /// HTTP/1.0 (keep-alive must be asked for) rather than 1.1.
    pub http10: bool,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Length of the body that follows the head.
    pub content_length: usize,
    /// `Cookie`, all lines joined with `; ` (a copy only when there are several).
    pub cookie: Option<Cow<'a, str>>,
    /// `If-Modified-Since`.
    pub if_modified_since: Option<&'a str>,
    /// `If-None-Match`.
    pub if_none_match: Option<&'a str>,
    /// `Last-Event-ID`.
    pub last_event_id: Option<&'a str>,
    /// `Origin`.
    pub origin: Option<&'a str>,
    /// `Content-Type`.
    pub content_type: Option<&'a str>,
    /// `Accept`.
    pub accept: Option<&'a str>,
    /// `Authorization`.
    pub authorization: Option<&'a str>,
    /// `Upgrade: websocket` with `Connection: upgrade`: a WebSocket handshake.
    pub websocket: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<&'a str>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<&'a str>,
    /// `Sec-WebSocket-Protocol` (the subprotocols offered, comma-separated).
    pub ws_protocol: Option<&'a str>,
    /// `Host`.
    pub host: Option<&'a str>,
}

impl Request<'_> {
    /// The method, `Other` when unknown.
    pub fn method(&self) -> Method {
        self.method.unwrap_or(Method::Other)
    }
}

/// Why a head was refused: the status to answer with, and a line of text for the body.
/// Every one of these closes the connection, since the stream can no longer be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpError {
    /// The HTTP status.
    pub status: u16,
    /// Human-readable reason, sent as the body.
    pub reason: &'static str,
}

const fn fail(status: u16, reason: &'static str) -> HttpError {
    HttpError { status, reason }
}

/// Parses one request head at the start of `buf`. Ok(None): not all there yet. Ok(Some((req,
/// n))): the head used `n` bytes; `req.content_length` body bytes follow.
pub fn parse_head(buf: &[u8], max_head: usize, max_body: usize) -> Result<Option<(Request<'_>, usize)>, HttpError> {
    // Leading blank lines between pipelined requests are allowed (RFC 9112 2.2).
    let skip = buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    if skip >= max_head {
        // Blank lines count against the head's cap, or a peer could send them forever.
        return Err(fail(431, "request head too large"));
    }
    let data = &buf[skip..];
    let limit = data.len().min(max_head);
    // Left uninitialised: httparse fills only the lines the head has, and zeroing 64 slots
    // (2 KiB) for every poll cost more than parsing its three or four header lines.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(&data[..limit], &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if data.len() >= max_head => {
            return Err(fail(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(fail(431, "too many header lines")),
        Err(httparse::Error::Version) => return Err(fail(505, "only HTTP/1.0 and HTTP/1.1 are served")),
        Err(_) => return Err(fail(400, "malformed request")),
    };
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("");
    let (raw_path, query) = target.split_once('?').unwrap_or((target, ""));
    // Absolute-form targets (`GET http://host/sub/x`, sent to proxies) carry the path after the authority.
    let raw_path = match raw_path.strip_prefix("http://").or_else(|| raw_path.strip_prefix("https://")) {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => raw_path,
    };
    if !raw_path.starts_with('/') && !(method == Method::Options && raw_path == "*") {
        return Err(fail(400, "request target must be a path"));
    }
    let path = match percent_decode(raw_path, false) {
        Some(p) => p,
        None => return Err(fail(400, "bad percent-encoding in path")),
    };
    let http10 = req.version == Some(0);
    let mut r = Request {
        method: Some(method),
        path,
        query,
        raw_path,
        http10,
        keep_alive: !http10,
        ..Request::default()
    };
    let mut content_length: Option<usize> = None;
    let (mut conn_upgrade, mut upgrade_ws) = (false, false);
    for h in req.headers.iter() {
        // Most of a browser's header lines (User-Agent, Accept-Language, Sec-Fetch-*) are none of
        // those read here: they are passed over on their name, their value never looked at.
        let Some(field) = Field::of(h.name) else { continue };
        let value = match std::str::from_utf8(h.value) {
            Ok(v) => v.trim(),
            // Non-UTF-8 header values are legal octets but none of the headers we read can carry them.
            Err(_) => return Err(fail(400, "header value is not valid text")),
        };
        let slot = match field {
            Field::Connection => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        r.keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                        r.keep_alive = true;
                    } else if token.eq_ignore_ascii_case("upgrade") {
                        conn_upgrade = true;
                    }
                }
                continue;
            }
            Field::ContentLength => {
                let n: usize = match value.parse() {
                    Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => n,
                    _ => return Err(fail(400, "bad Content-Length")),
                };
                if content_length.is_some_and(|c| c != n) {
                    return Err(fail(400, "conflicting Content-Length headers"));
                }
                content_length = Some(n);
                continue;
            }
            // Bodies are for publishing only; publishers send Content-Length (curl -d, PHP).
            Field::TransferEncoding => return Err(fail(501, "Transfer-Encoding is not supported; send Content-Length")),
            Field::Cookie => {
                r.cookie = Some(match r.cookie.take() {
                    Some(c) => Cow::Owned(format!("{c}; {value}")),
                    None => Cow::Borrowed(value),
                });
                continue;
            }
            Field::Upgrade => {
                upgrade_ws |= value.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket"));
                continue;
            }
            Field::WsKey => &mut r.ws_key,
            Field::WsVersion => &mut r.ws_version,
            Field::WsProtocol => &mut r.ws_protocol,
            Field::Host => &mut r.host,
            Field::IfModifiedSince => &mut r.if_modified_since,
            Field::IfNoneMatch => &mut r.if_none_match,
            Field::LastEventId => &mut r.last_event_id,
            Field::Origin => &mut r.origin,
            Field::ContentType => &mut r.content_type,
            Field::Accept => &mut r.accept,
            Field::Authorization => &mut r.authorization,
        };
        *slot = Some(value);
    }
    r.websocket = conn_upgrade && upgrade_ws;
    r.content_length = content_length.unwrap_or(0);
    if r.content_length > max_body {
        return Err(fail(413, "body too large"));
    }
    Ok(Some((r, skip + n)))
}

/// The header lines `parse_head` reads.
#[derive(Clone, Copy)]
enum Field {
    Connection,
    ContentLength,
    TransferEncoding,
    Cookie,
    IfModifiedSince,
    IfNoneMatch,
    LastEventId,
    Origin,
    ContentType,
    Accept,
    Authorization,
    Upgrade,
    WsKey,
    WsVersion,
    WsProtocol,
    Host,
}

impl Field {
    /// The field a header name is, in any case; None for the lines not read. The length and the
    /// first letter pick the one candidate to compare with.
    fn of(name: &str) -> Option<Field> {
        // ASCII letters lower-cased; any other byte fails the comparison below anyway.
        let first = name.as_bytes().first()? | 0x20;
        let (field, want) = match (name.len(), first) {
            (6, b'c') => (Field::Cookie, "cookie"),
            (6, b'o') => (Field::Origin, "origin"),
            (6, b'a') => (Field::Accept, "accept"),
            (10, b'c') => (Field::Connection, "connection"),
            (12, b'c') => (Field::ContentType, "content-type"),
            (13, b'i') => (Field::IfNoneMatch, "if-none-match"),
            (13, b'l') => (Field::LastEventId, "last-event-id"),
            (13, b'a') => (Field::Authorization, "authorization"),
            (14, b'c') => (Field::ContentLength, "content-length"),
            (17, b'i') => (Field::IfModifiedSince, "if-modified-since"),
            (17, b't') => (Field::TransferEncoding, "transfer-encoding"),
            (4, b'h') => (Field::Host, "host"),
            (7, b'u') => (Field::Upgrade, "upgrade"),
            (17, b's') => (Field::WsKey, "sec-websocket-key"),
            (21, b's') => (Field::WsVersion, "sec-websocket-version"),
            (22, b's') => (Field::WsProtocol, "sec-websocket-protocol"),
            _ => return None,
        };
        name.eq_ignore_ascii_case(want).then_some(field)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` (and `+` as space in query strings). None on a broken escape or non-UTF-8
/// result. Text without escapes is returned as it is, not copied.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<Cow<'_, str>> {
    if !s.contains('%') && !(plus_is_space && s.contains('+')) {
        return Some(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex(*b.get(i + 1)?)?;
                let lo = hex(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The value of query argument `key`: None when absent, Some(None) when badly encoded.
pub fn query_arg<'a>(query: &'a str, key: &str) -> Option<Option<Cow<'a, str>>> {
    if query.is_empty() {
        // Most polls have no query; this is asked several times per poll.
        return None;
    }
    query
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then(|| percent_decode(v, true))
        })
        .next()
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"')).filter(|v| !v.is_empty())
    })
}

/// A message cursor from a request: Ok(None) when the request carries none, Err on a malformed
/// one. The `Last-Event-ID` header wins over `last_event_id` (query), which wins over the
/// `If-Modified-Since` / `If-None-Match` pair: a browser's EventSource reconnects to the URL it
/// was opened with (perhaps with an old `last_event_id`) and sends its newest id in the header.
pub fn cursor(req: &Request<'_>) -> Result<Option<MsgId>, HttpError> {
    let bad = fail(400, "bad cursor: expected <unix-time>:<tag> or an HTTP date");
    let compound = match (req.last_event_id, query_arg(req.query, "last_event_id")) {
        (Some(v), _) => Some(Cow::Borrowed(v)),
        (None, Some(Some(v))) => Some(v),
        (None, Some(None)) => return Err(bad),
        (None, None) => None,
    };
    if let Some(v) = compound {
        let (t, tag) = v.split_once(':').ok_or(bad)?;
        return match (t.parse(), tag.parse()) {
            (Ok(time), Ok(tag)) => Ok(Some(MsgId { time, tag })),
            _ => Err(bad),
        };
    }
    let Some(ims) = req.if_modified_since else { return Ok(None) };
    let time = time::parse_http_date(ims).ok_or(bad)?;
    let tag = match req.if_none_match {
        None => 0,
        Some(v) => {
            // Weak markers stripped as `trim_start_matches("W/")` would, without its substring
            // searcher (built per call, it was a visible part of a poll's cost).
            let mut v = v.trim();
            while let Some(rest) = v.strip_prefix("W/") {
                v = rest;
            }
            let v = v.trim_matches('"');
            v.parse().map_err(|_| bad)?
        }
    };
    Ok(Some(MsgId { time, tag }))
}

/// The reason phrase of a status the daemon sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Appends a whole response. `lines` are the header lines particular to this connection and
/// response (`Connection`, CORS, cursor...), each ending in `\r\n`.
pub fn response(out: &mut Vec<u8>, status: u16, lines: &[u8], content_type: &str, body: &[u8]) {
    use std::io::Write;
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    out.extend_from_slice(lines);
    if !content_type.is_empty() {
        let _ = write!(out, "Content-Type: {content_type}\r\n");
    }
    let _ = write!(out, "Content-Length: {}\r\n\r\n", body.len());
    out.extend_from_slice(body);
}

/// Appends a response head only (for `HEAD`): `Content-Length` says what a `GET` would carry.
pub fn response_head(out: &mut Vec<u8>, status: u16, lines: &[u8], content_length: usize) {
    use std::io::Write;
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    out.extend_from_slice(lines);
    let _ = write!(out, "Content-Length: {content_length}\r\n\r\n");
}

/// The `Connection` line every response carries.
pub fn connection_header(keep_alive: bool) -> &'static str {
    if keep_alive {
        "Connection: keep-alive\r\n"
    } else {
        "Connection: close\r\n"
    }
}

/// Cursor headers for a 408/503, echoing the request's cursor so the client keeps its place.
pub fn cursor_headers(c: Option<MsgId>) -> String {
    match c {
        Some(id) => format!("Last-Modified: {}\r\nEtag: {}\r\n", time::http_date(id.time), id.tag),
        None => String::new(),
    }
}

/// The part of a message's 200 response that is the same for every subscriber: the headers
/// after the status line and connection-specific lines, then the body. Encoded once at publish;
/// `date` is `time::http_date(id.time)`, which the hub formats once per second.
/// `channel` is where the message was published (`X-Comet-Channel`: a private stream carries
/// copies of joined channels' messages, and the page tells them apart by it).
pub fn message_tail(id: MsgId, date: &str, channel: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    // Assembled from pieces into an exact-size buffer: this runs once per publish, and the
    // formatting machinery and a shrinking reallocation were a tenth of a PUBLISH's cost.
    let (mut tag, mut len) = ([0u8; 20], [0u8; 20]);
    let tag = crate::resp::digits(u64::from(id.tag), &mut tag);
    let len = crate::resp::digits(body.len() as u64, &mut len);
    let parts: [&[u8]; 12] = [
        b"Last-Modified: ",
        date.as_bytes(),
        b"\r\nEtag: ",
        tag,
        b"\r\nX-Comet-Channel: ",
        channel.as_bytes(),
        b"\r\nVary: If-None-Match, If-Modified-Since\r\nCache-Control: no-cache, no-store\r\nContent-Type: ",
        content_type.as_bytes(),
        b"\r\nContent-Length: ",
        len,
        b"\r\n\r\n",
        body,
    ];
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    fn parse(b: &[u8]) -> Result<Option<(Request<'_>, usize)>, HttpError> {
        parse_head(b, MAX, 1 << 20)
    }

    #[test]
    fn heads_table() {
        struct Case {
            input: &'static [u8],
            method: Method,
            path: &'static str,
            query: &'static str,
            keep_alive: bool,
        }
        let cases = [
            Case { input: b"GET /sub/goods HTTP/1.1\r\nHost: x\r\n\r\n", method: Method::Get, path: "/sub/goods", query: "", keep_alive: true },
            Case { input: b"GET /subscribe?id=goods HTTP/1.1\r\n\r\n", method: Method::Get, path: "/subscribe", query: "id=goods", keep_alive: true },
            Case { input: b"GET /sub/a%3Ab HTTP/1.1\r\nConnection: close\r\n\r\n", method: Method::Get, path: "/sub/a:b", query: "", keep_alive: false },
            Case { input: b"GET /sub/x HTTP/1.0\r\n\r\n", method: Method::Get, path: "/sub/x", query: "", keep_alive: false },
            Case { input: b"GET /sub/x HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", method: Method::Get, path: "/sub/x", query: "", keep_alive: true },
            Case { input: b"\r\nOPTIONS /sub/x HTTP/1.1\r\nOrigin: http://a\r\n\r\n", method: Method::Options, path: "/sub/x", query: "", keep_alive: true },
            Case { input: b"POST /pub?id=a HTTP/1.1\r\nContent-Length: 5\r\n\r\n", method: Method::Post, path: "/pub", query: "id=a", keep_alive: true },
            Case { input: b"BREW /pot HTTP/1.1\r\n\r\n", method: Method::Other, path: "/pot", query: "", keep_alive: true },
            Case { input: b"GET http://push.site.com/sub/x HTTP/1.1\r\n\r\n", method: Method::Get, path: "/sub/x", query: "", keep_alive: true },
        ];
        for c in &cases {
            // Every split point: each strict prefix is incomplete, the whole is complete.
            for cut in 0..c.input.len() {
                assert_eq!(parse(&c.input[..cut]), Ok(None), "{:?} cut at {cut}", String::from_utf8_lossy(c.input));
            }
            let (r, n) = parse(c.input).unwrap().unwrap();
            assert_eq!(n, c.input.len());
            assert_eq!((r.method(), &*r.path, r.query, r.keep_alive), (c.method, c.path, c.query, c.keep_alive));
            // Pipelined: the head's length stops at its own end.
            let mut two = c.input.to_vec();
            two.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            assert_eq!(parse(&two).unwrap().unwrap().1, c.input.len());
        }
    }

    #[test]
    fn headers_kept() {
        let (r, _) = parse(
            b"GET /sub/x HTTP/1.1\r\nCookie: a=1\r\ncookie: PHPSESSID=abc\r\nIf-Modified-Since: Thu, 01 Jan 1970 00:00:10 GMT\r\nIf-None-Match: \"3\"\r\nOrigin: http://s\r\nAccept: application/json\r\nAuthorization: Bearer t\r\nContent-Type: text/x\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(cookie(r.cookie.as_deref().unwrap(), "PHPSESSID"), Some("abc"));
        assert_eq!(cookie(r.cookie.as_deref().unwrap(), "a"), Some("1"));
        assert_eq!(r.origin.as_deref(), Some("http://s"));
        assert_eq!(r.authorization.as_deref(), Some("Bearer t"));
        assert_eq!(cursor(&r), Ok(Some(MsgId { time: 10, tag: 3 })));
        // Names in any case; lines not read pass whatever octets they carry; names of the same
        // length as a read one are not mistaken for it.
        let (r, _) = parse(
            b"GET /sub/x HTTP/1.1\r\nUser-Agent: caf\xe9\r\nORIGIN: http://o\r\nIF-NONE-MATCH: 5\r\nif-modified-since: Thu, 01 Jan 1970 00:00:10 GMT\r\nAccepts: no\r\nOrigine: no\r\nConnectioN: close\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.origin, r.accept, r.keep_alive), (Some("http://o"), None, false));
        assert_eq!(cursor(&r), Ok(Some(MsgId { time: 10, tag: 5 })));
        for name in ["cookiE", "origin", "accept", "Connection", "content-type", "if-none-match", "Last-Event-ID", "authorization", "content-length", "If-Modified-Since", "transfer-encoding", "Host", "upgrade", "Sec-WebSocket-Key", "sec-websocket-version", "Sec-WebSocket-Protocol"] {
            assert!(Field::of(name).is_some(), "{name}");
        }
        for name in ["cookies", "hostname", "accepx", "x-origin", "range", "if-match", "content-lengths", "", "\u{e9}ookie"] {
            assert!(Field::of(name).is_none(), "{name}");
        }
    }

    #[test]
    fn websocket_handshake_heads() {
        let ws = b"GET /sub/x HTTP/1.1\r\nHost: h:1\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ws+meta.nchan\r\n\r\n";
        let (r, _) = parse(ws).unwrap().unwrap();
        assert!(r.websocket);
        assert_eq!((r.host, r.ws_key, r.ws_version, r.ws_protocol), (Some("h:1"), Some("k"), Some("13"), Some("ws+meta.nchan")));
        // Both headers are needed: an Upgrade alone (or to another protocol) is a plain GET.
        for head in [&b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..], b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n", b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"] {
            assert!(!parse(head).unwrap().unwrap().0.websocket);
        }
    }

    #[test]
    fn errors_table() {
        let big = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS + 1));
        let cases: Vec<(&[u8], u16)> = vec![
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
            (b"GET /\0 HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n", 413),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\n\r\n", 501),
            (b"GET / HTTP/1.1\r\nCookie: s=\xff\r\n\r\n", 400),
            (b"GET /a%zz HTTP/1.1\r\n\r\n", 400),
            (b"GET /a%ff HTTP/1.1\r\n\r\n", 400),
            (b"GET noslash HTTP/1.1\r\n\r\n", 400),
            (big.as_bytes(), 431),
            (many.as_bytes(), 431),
        ];
        for (input, status) in cases {
            assert_eq!(parse(input).map(|_| ()).unwrap_err().status, status, "{:?}", String::from_utf8_lossy(input));
        }
        // Oversized and still partial: refused as soon as the cap is reached, not at the end.
        assert_eq!(parse(&vec![b'a'; MAX]).unwrap_err().status, 431);
        assert_eq!(parse(&b"\r\n".repeat(MAX / 2)).unwrap_err().status, 431, "blank lines count too");
    }

    #[test]
    fn cursors() {
        let req = |query: &'static str, if_modified_since: Option<&'static str>, if_none_match: Option<&'static str>, last_event_id: Option<&'static str>| Request {
            query,
            if_modified_since,
            if_none_match,
            last_event_id,
            ..Request::default()
        };
        let date = "Thu, 01 Jan 1970 00:01:40 GMT";
        let table: Vec<(Request<'_>, Result<Option<MsgId>, u16>)> = vec![
            (req("", None, None, None), Ok(None)),
            (req("last_event_id=100:2", None, None, None), Ok(Some(MsgId { time: 100, tag: 2 }))),
            (req("last_event_id=100%3A2", None, None, None), Ok(Some(MsgId { time: 100, tag: 2 }))),
            (req("", None, None, Some("7:1")), Ok(Some(MsgId { time: 7, tag: 1 }))),
            // An EventSource's reconnect: the header's newer id beats the URL's old one.
            (req("last_event_id=5:0", None, None, Some("7:1")), Ok(Some(MsgId { time: 7, tag: 1 }))),
            (req("last_event_id=%zz", None, None, Some("7:1")), Ok(Some(MsgId { time: 7, tag: 1 }))),
            (req("last_event_id=5:0", Some(date), Some("4"), None), Ok(Some(MsgId { time: 5, tag: 0 }))),
            (req("", Some(date), Some("4"), None), Ok(Some(MsgId { time: 100, tag: 4 }))),
            (req("", Some(date), Some("W/\"4\""), None), Ok(Some(MsgId { time: 100, tag: 4 }))),
            (req("", Some(date), None, None), Ok(Some(MsgId { time: 100, tag: 0 }))),
            (req("last_event_id=abc", None, None, None), Err(400)),
            (req("last_event_id=1:99999999999", None, None, None), Err(400)),
            (req("last_event_id=%zz", None, None, None), Err(400)),
            (req("", Some("yesterday"), None, None), Err(400)),
            (req("", Some(date), Some("x"), None), Err(400)),
        ];
        for (r, want) in table {
            assert_eq!(cursor(&r).map_err(|e| e.status), want, "{r:?}");
        }
    }

    #[test]
    fn query_and_cookie_lookup() {
        assert_eq!(query_arg("a=1&id=goods%21&b", "id"), Some(Some("goods!".into())));
        assert_eq!(query_arg("a=1", "id"), None);
        assert_eq!(query_arg("id=%", "id"), Some(None));
        assert_eq!(cookie("x=1;  PHPSESSID = \"s1\" ", "PHPSESSID"), Some("s1"));
        assert_eq!(cookie("PHPSESSID=", "PHPSESSID"), None);
    }

    #[test]
    fn response_bytes() {
        let mut out = Vec::new();
        response(&mut out, 404, connection_header(false).as_bytes(), "text/plain", b"no");
        assert_eq!(out, b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nno");
        let tail = message_tail(MsgId { time: 0, tag: 1 }, &time::http_date(0), "c", "text/plain", b"hi");
        assert_eq!(tail.len(), tail.capacity(), "exact size: no shrinking copy into the Box");
        let big = message_tail(MsgId { time: 0, tag: u32::MAX }, "d", "c", "t", &[b'x'; 12345]);
        assert!(String::from_utf8_lossy(&big).contains("Etag: 4294967295\r\n"));
        assert!(String::from_utf8_lossy(&big).contains("Content-Length: 12345\r\n\r\n"));
        assert!(tail.starts_with(b"Last-Modified: Thu, 01 Jan 1970 00:00:00 GMT\r\nEtag: 1\r\n"));
        assert!(tail.ends_with(b"Content-Length: 2\r\n\r\nhi"));
    }
}
