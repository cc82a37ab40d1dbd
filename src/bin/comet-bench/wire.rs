//! The bytes the bench speaks: HTTP/1.1 responses parsed from a growing buffer, and the messages
//! of a `multipart/mixed` batch (subscribers), and small blocking clients for the publisher and
//! the "are they all held" probe (RESP to comet's control port, HTTP to nchan's publisher and
//! status locations).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response head parsed from the front of a buffer.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
    /// Bytes of the body after it.
    pub body_len: usize,
    /// `Last-Modified`, verbatim (the cursor's time).
    pub last_modified: Option<String>,
    /// `Etag`, verbatim (the cursor's tag).
    pub etag: Option<String>,
    /// The server will close after this response.
    pub close: bool,
    /// `Content-Type: multipart/mixed; boundary=<b>`: the body is a batch of messages.
    pub boundary: Option<String>,
}

/// Parses the response head at the front of `buf`: Ok(None) while it is incomplete.
/// Only `Content-Length` framing is accepted (both servers use it for long-poll answers).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > 64 * 1024 {
                return Err("response head over 64 KiB".into());
            }
            return Ok(None);
        }
        Err(e) => return Err(format!("bad response: {e}")),
    };
    let status = r.code.unwrap_or(0);
    let mut h = Head { status, head_len, body_len: 0, last_modified: None, etag: None, close: r.version == Some(0), boundary: None };
    let mut length = None;
    for hd in r.headers.iter() {
        let v = || String::from_utf8_lossy(hd.value).trim().to_string();
        if hd.name.eq_ignore_ascii_case("content-length") {
            length = Some(v().parse::<usize>().map_err(|_| "bad Content-Length".to_string())?);
        } else if hd.name.eq_ignore_ascii_case("last-modified") {
            h.last_modified = Some(v());
        } else if hd.name.eq_ignore_ascii_case("etag") {
            h.etag = Some(v());
        } else if hd.name.eq_ignore_ascii_case("content-type") {
            h.boundary = multipart_boundary(&v());
        } else if hd.name.eq_ignore_ascii_case("connection") {
            let c = v().to_ascii_lowercase();
            h.close = c.contains("close") || (r.version == Some(0) && !c.contains("keep-alive"));
        } else if hd.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("Transfer-Encoding {} not expected", v()));
        }
    }
    h.body_len = match length {
        Some(n) => n,
        None if status == 204 || status == 304 || (100..200).contains(&status) => 0,
        None => return Err(format!("status {status} without Content-Length")),
    };
    Ok(Some(h))
}

/// The boundary of a `multipart/mixed` content type, unquoted; None for any other type.
fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut it = content_type.split(';');
    if !it.next()?.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    it.find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
    })
    .filter(|b| !b.is_empty())
}

/// The bodies of the parts of a `multipart/mixed` body: each part is `--<b>` CRLF, its headers,
/// a blank line, its body, and CRLF before the next `--<b>`; the last is followed by `--<b>--`.
/// A part without headers (nchan, for a message published without a type) starts right with
/// the blank line. None when the body is not framed so.
pub fn parts<'a>(body: &'a [u8], boundary: &str) -> Option<Vec<&'a [u8]>> {
    let delim = format!("--{boundary}");
    let next = format!("\r\n--{boundary}");
    let mut rest = body.strip_prefix(delim.as_bytes())?;
    let mut out = Vec::new();
    loop {
        if let Some(end) = rest.strip_prefix(b"--") {
            // MIME allows an epilogue here, but neither server sends one: anything beyond the
            // line break means the framing is off.
            return matches!(end, b"" | b"\r\n").then_some(out);
        }
        rest = rest.strip_prefix(b"\r\n")?;
        let n = find(rest, next.as_bytes())?;
        let part = &rest[..n];
        let body = match part.strip_prefix(b"\r\n") {
            Some(b) => b,
            None => &part[find(part, b"\r\n\r\n")? + 4..],
        };
        out.push(body);
        rest = &rest[n + 2 + delim.len()..];
    }
}

/// Where `needle` first occurs in `hay`. Batches run to tens of kilobytes per answer, and the
/// load generator must not become the limit of a burst: a compare at every offset costs about
/// 1 µs per part of a comet batch, glibc's `memmem` about a sixth of that.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    // SAFETY: memmem only reads the two ranges, both borrowed slices; the pointer it returns
    // is null or inside `hay`.
    let p = unsafe { libc::memmem(hay.as_ptr().cast(), hay.len(), needle.as_ptr().cast(), needle.len()) };
    (!p.is_null()).then(|| p as usize - hay.as_ptr() as usize)
}

/// A message body the bench publishes: `seq=<n> ch=<c> t=<unix ns> ` and padding to `size`.
pub fn message_body(seq: u32, ch: u32, t_ns: u64, size: usize, out: &mut Vec<u8>) {
    let start = out.len();
    let _ = write!(out, "seq={seq} ch={ch} t={t_ns} ");
    while out.len() - start < size {
        out.push(b'x');
    }
}

/// Reads `seq`, `ch` and `t` back from a body written by `message_body`.
pub fn parse_body(b: &[u8]) -> Option<(u32, u32, u64)> {
    let mut it = b.split(|&c| c == b' ');
    let field = |f: Option<&[u8]>, name: &[u8]| -> Option<u64> {
        let f = f?.strip_prefix(name)?;
        std::str::from_utf8(f).ok()?.parse().ok()
    };
    let seq = field(it.next(), b"seq=")?;
    let ch = field(it.next(), b"ch=")?;
    let t = field(it.next(), b"t=")?;
    Some((u32::try_from(seq).ok()?, u32::try_from(ch).ok()?, t))
}

/// A blocking connection with its own read buffer, for replies read one at a time.
pub struct Blocking {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
}

impl Blocking {
    pub fn connect(addr: SocketAddr) -> io::Result<Blocking> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Blocking { stream, buf: Vec::with_capacity(64 * 1024), pos: 0 })
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 32 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut tmp = [0u8; 64 * 1024];
        let n = self.stream.read(&mut tmp)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"));
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    /// One line without its CRLF.
    pub fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let s = String::from_utf8_lossy(&self.buf[self.pos..self.pos + i]).into_owned();
                self.pos += i + 2;
                return Ok(s);
            }
            self.fill()?;
        }
    }

    /// Exactly `n` bytes.
    pub fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() - self.pos < n {
            self.fill()?;
        }
        let v = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(v)
    }

    /// One RESP reply: `+`/`-`/`:` lines as their text (errors prefixed with `-`), a bulk as
    /// its content.
    pub fn resp(&mut self) -> io::Result<String> {
        let l = self.line()?;
        if let Some(n) = l.strip_prefix('$') {
            let n: i64 = n.parse().map_err(|_| io::Error::other(format!("bad bulk length {l:?}")))?;
            if n < 0 {
                return Ok(String::new());
            }
            let body = self.take(n as usize + 2)?;
            return Ok(String::from_utf8_lossy(&body[..n as usize]).into_owned());
        }
        Ok(l)
    }

    /// One HTTP response: status and body (Content-Length framed).
    pub fn http(&mut self) -> io::Result<(u16, Vec<u8>)> {
        loop {
            match parse_head(&self.buf[self.pos..]) {
                Ok(Some(h)) => {
                    self.pos += h.head_len;
                    let body = self.take(h.body_len)?;
                    return Ok((h.status, body));
                }
                Ok(None) => self.fill()?,
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

/// Appends a RESP command (an array of bulk strings).
pub fn resp_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// A control connection to comet, authenticated with `token` when given.
pub fn comet_control(addr: SocketAddr, token: &str) -> io::Result<Blocking> {
    let mut c = Blocking::connect(addr)?;
    if !token.is_empty() {
        let mut cmd = Vec::new();
        resp_command(&mut cmd, &[b"AUTH", token.as_bytes()]);
        c.stream.write_all(&cmd)?;
        let r = c.resp()?;
        if r != "+OK" {
            return Err(io::Error::other(format!("AUTH refused: {r}")));
        }
    }
    Ok(c)
}

/// The value of `key:` (comet INFO) or `key: ` (nchan stub status) in a text of lines.
pub fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trip() {
        let mut b = Vec::new();
        message_body(7, 3, 1_700_000_000_123_456_789, 100, &mut b);
        assert_eq!(b.len(), 100);
        assert_eq!(parse_body(&b), Some((7, 3, 1_700_000_000_123_456_789)));
    }

    #[test]
    fn heads() {
        let r = b"HTTP/1.1 200 OK\r\nLast-Modified: Thu, 01 Jan 1970 00:00:00 GMT\r\nEtag: 1\r\nContent-Length: 2\r\n\r\nhi";
        for i in 0..r.len() - 2 {
            if i < r.len() - 4 {
                assert!(parse_head(&r[..i]).unwrap().is_none());
            }
        }
        let h = parse_head(r).unwrap().unwrap();
        assert_eq!((h.status, h.body_len, h.etag.as_deref(), h.close), (200, 2, Some("1"), false));
        let h = parse_head(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.status, h.body_len, h.close), (204, 0, true));
        assert_eq!(field("# Clients\r\nheld_polls:12\r\n", "held_polls"), Some(12));
        assert_eq!(field("channels: 3\nsubscribers: 19000\n", "subscribers"), Some(19000));
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: multipart/mixed; boundary=a/b.c\r\nContent-Length: 0\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.boundary.as_deref(), Some("a/b.c"));
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: Multipart/Mixed;Boundary=\"q r\"\r\nContent-Length: 0\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.boundary.as_deref(), Some("q r"));
        assert!(parse_head(r).unwrap().unwrap().boundary.is_none());
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; boundary=x\r\nContent-Length: 0\r\n\r\n").unwrap().unwrap();
        assert!(h.boundary.is_none());
    }

    #[test]
    fn multipart_parts() {
        // comet: every part has headers.
        let comet = b"--B\r\nEtag: 1\r\nContent-Length: 2\r\n\r\nm1\r\n--B\r\nEtag: 2\r\n\r\nm2\r\n--B--\r\n";
        assert_eq!(parts(comet, "B"), Some(vec![&b"m1"[..], b"m2"]));
        // nchan: no headers for a message without a type; an empty body. No line break at the end.
        let nchan = b"--x.y/z\r\n\r\nnh1\r\n--x.y/z\r\nContent-Type: text/plain\r\n\r\n\r\n--x.y/z--";
        assert_eq!(parts(nchan, "x.y/z"), Some(vec![&b"nh1"[..], b""]));
        // A body holding CRLF CRLF and a dash line that is not the boundary.
        let tricky = b"--B\r\nA: 1\r\n\r\nx\r\n\r\n--C\r\ny\r\n--B--\r\n";
        assert_eq!(parts(tricky, "B"), Some(vec![&b"x\r\n\r\n--C\r\ny"[..]]));
        assert_eq!(parts(b"--B--\r\n", "B"), Some(vec![]));
        assert_eq!(find(b"xx\r\n--bb\r\n--ab", b"\r\n--ab"), Some(8));
        assert_eq!(find(b"\r\n--a", b"\r\n--ab"), None);
        assert_eq!(find(b"", b"\r\n"), None);
        for bad in [
            &b""[..],
            b"m1",
            b"--B\r\nA: 1\r\n\r\nm1",                      // no closing delimiter
            b"--B\r\nA: 1\r\n\r\nm1\r\n--B",               // cut after the delimiter
            b"--B\r\nA: 1\r\nm1\r\n--B--\r\n",             // no blank line after the headers
            b"--BX\r\nA: 1\r\n\r\nm1\r\n--B--\r\n",        // another boundary
            b"--B\r\nA: 1\r\n\r\nm1\r\n--B--\r\ntrailing", // bytes after the end
            b"preamble\r\n--B\r\n\r\nm1\r\n--B--\r\n",
        ] {
            assert_eq!(parts(bad, "B"), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
