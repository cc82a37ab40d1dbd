//! RESP2, the Redis wire protocol, as pure functions: bytes in, result out.
//!
//! The control socket speaks RESP2 so that existing Redis clients (phpredis,
//! predis, redis-cli) can drive the daemon unchanged. This module only turns a
//! byte buffer into one command, and replies into bytes; it owns no socket, no
//! state and no buffer of its own, so the event loop stays in charge of I/O and
//! every rule here can be tested byte by byte. The parser follows Redis's
//! `processMultibulkBuffer` / `processInlineBuffer` (src/networking.c) and
//! `sdssplitargs` (src/sds.c), with the peer held to the caps in [`Limits`].

use std::fmt;
use std::ops::Range;

/// Caps a peer cannot exceed; a frame over a cap is a protocol error (the loop replies -ERR and closes that connection).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest bulk string accepted, in bytes (a published message is one bulk).
    pub max_bulk: usize,
    /// Most arguments in one command (multibulk length).
    pub max_args: usize,
    /// Longest inline command line, in bytes (Redis uses 64 KiB).
    pub max_inline: usize,
}

/// Why the stream cannot be parsed any further. The text is what Redis itself
/// would send after `-ERR `, so clients show familiar messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RespError(pub &'static str);

impl RespError {
    #[must_use]
    pub fn message(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for RespError {}

const INVALID_MBULK: &str = "Protocol error: invalid multibulk length";
const TOO_BIG_MBULK: &str = "Protocol error: too big mbulk count string";
const INVALID_BULK: &str = "Protocol error: invalid bulk length";
const TOO_BIG_BULK: &str = "Protocol error: too big bulk count string";
const EXPECTED_DOLLAR: &str = "Protocol error: expected '$'";
const BULK_NO_CRLF: &str = "Protocol error: bulk not terminated by CRLF";
const TOO_BIG_INLINE: &str = "Protocol error: too big inline request";
const UNBALANCED: &str = "Protocol error: unbalanced quotes in request";
const TOO_MANY_INLINE: &str = "Protocol error: too many arguments in inline request";

/// What [`parse`] and the inline parser yield; named to keep signatures short.
type Parsed = Result<Option<(Vec<Vec<u8>>, usize)>, RespError>;

/// Longest `*<n>` / `$<n>` line we wait for, type byte included, CRLF excluded.
/// A canonical i64 needs at most 20 characters, so anything longer can only be
/// garbage or a peer trying to make us buffer forever.
const MAX_HEADER_LINE: usize = 32;

/// One command found by [`parse_frame`].
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A multibulk command: its arguments are the ranges left in the caller's vector, relative
    /// to the start of the buffer given (no payload is copied).
    Bulks,
    /// An inline command: quotes and escapes are undone, so the arguments are new bytes.
    Inline(Vec<Vec<u8>>),
}

/// Parses one command from the start of `buf`, without copying a multibulk command's
/// arguments: their ranges are put in `spans` (cleared first), a vector the caller keeps from
/// command to command, so the publish path makes no allocation to parse.
/// Ok(None): incomplete, wait for more bytes; nothing grows with the peer's bytes meanwhile
/// (`spans` holds at most `limits.max_args` ranges).
/// Ok(Some((frame, consumed))): one command; `consumed` bytes to drop from the buffer. It may
/// have no argument (an empty inline line, or `*0\r\n`, or `*-1\r\n`): the caller skips it.
/// Err(e): the stream is broken; the caller sends `-ERR <e.message()>` and closes.
///
/// # Errors
///
/// Any frame that breaks RESP2 or exceeds `limits`. The error is final: the
/// same bytes followed by anything else give the same error, so there is no
/// point in reading more.
pub fn parse_frame(buf: &[u8], limits: &Limits, spans: &mut Vec<Range<usize>>) -> Result<Option<(Frame, usize)>, RespError> {
    spans.clear();
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, limits, spans),
        Some(_) => Ok(parse_inline(buf, limits)?.map(|(args, n)| (Frame::Inline(args), n))),
    }
}

/// [`parse_frame`] with the arguments copied out: for tests and tools, where an allocation per
/// argument does not matter.
///
/// # Errors
///
/// As [`parse_frame`].
// Spelled out rather than `Parsed` so the contract reads without a lookup.
#[allow(clippy::type_complexity)]
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(Vec<Vec<u8>>, usize)>, RespError> {
    let mut spans = Vec::new();
    Ok(parse_frame(buf, limits, &mut spans)?.map(|(frame, n)| match frame {
        Frame::Bulks => (spans.iter().map(|s| buf[s.clone()].to_vec()).collect(), n),
        Frame::Inline(args) => (args, n),
    }))
}

/// Calls `f` with the arguments of a [`Frame::Bulks`] command as slices of `frame` (the buffer
/// given to [`parse_frame`]). Up to eight arguments live on the stack: no allocation for any
/// command but the rare long ones.
pub fn with_args<R>(frame: &[u8], spans: &[Range<usize>], f: impl FnOnce(&[&[u8]]) -> R) -> R {
    const SMALL: usize = 8;
    if spans.len() <= SMALL {
        let mut small: [&[u8]; SMALL] = [&[]; SMALL];
        for (a, s) in small.iter_mut().zip(spans) {
            *a = &frame[s.clone()];
        }
        f(&small[..spans.len()])
    } else {
        let all: Vec<&[u8]> = spans.iter().map(|s| &frame[s.clone()]).collect();
        f(&all)
    }
}

fn parse_multibulk(buf: &[u8], limits: &Limits, spans: &mut Vec<Range<usize>>) -> Result<Option<(Frame, usize)>, RespError> {
    let Some((count, body)) = header(buf, 0, TOO_BIG_MBULK, INVALID_MBULK)? else {
        return Ok(None);
    };
    // Redis treats every non-positive count (`*-1` is a null array) as a
    // no-op command rather than an error.
    if count <= 0 {
        return Ok(Some((Frame::Bulks, body)));
    }
    let n = usize::try_from(count).map_err(|_| RespError(INVALID_MBULK))?;
    if n > limits.max_args {
        return Err(RespError(INVALID_MBULK));
    }
    // One walk: the ranges are only kept if the whole frame turns out to be here, so a slow
    // or hostile peer feeding a frame byte by byte costs no memory until it is complete.
    match walk_bulks(buf, body, n, limits, |payload| spans.push(payload))? {
        Some(end) => Ok(Some((Frame::Bulks, end))),
        None => {
            spans.clear();
            Ok(None)
        }
    }
}

/// Walks `n` bulk strings starting at `pos`, handing each payload's range to `each`.
/// Returns the offset just past the last one, or None if the buffer ends first.
fn walk_bulks(
    buf: &[u8],
    mut pos: usize,
    n: usize,
    limits: &Limits,
    mut each: impl FnMut(Range<usize>),
) -> Result<Option<usize>, RespError> {
    for _ in 0..n {
        match bulk_at(buf, pos, limits)? {
            None => return Ok(None),
            Some((payload, next)) => {
                each(payload);
                pos = next;
            }
        }
    }
    Ok(Some(pos))
}

/// One `$<len>\r\n<payload>\r\n` at `pos`: the payload's range and the offset after it.
fn bulk_at(
    buf: &[u8],
    pos: usize,
    limits: &Limits,
) -> Result<Option<(Range<usize>, usize)>, RespError> {
    // Checked before the line is complete so that nested arrays or garbage
    // fail on their first byte instead of after a header's worth of waiting.
    match buf.get(pos) {
        None => return Ok(None),
        Some(b'$') => {}
        Some(_) => return Err(RespError(EXPECTED_DOLLAR)),
    }
    let Some((len, data)) = header(buf, pos, TOO_BIG_BULK, INVALID_BULK)? else {
        return Ok(None);
    };
    // Rejecting at the header means an oversized message is refused before
    // any of it has to be buffered.
    let len = usize::try_from(len).map_err(|_| RespError(INVALID_BULK))?;
    if len > limits.max_bulk {
        return Err(RespError(INVALID_BULK));
    }
    let end = data.checked_add(len).ok_or(RespError(INVALID_BULK))?;
    if end > buf.len() {
        return Ok(None);
    }
    let payload = data..end;
    // Redis skips these two bytes blindly; checking them catches a client
    // whose length disagrees with its payload before it desynchronises
    // every later command.
    match buf.get(end) {
        None => return Ok(None),
        Some(b'\r') => {}
        Some(_) => return Err(RespError(BULK_NO_CRLF)),
    }
    match buf.get(end + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((payload, end + 2))),
        Some(_) => Err(RespError(BULK_NO_CRLF)),
    }
}

/// Reads the `<type><integer>\r\n` line at `pos` (type byte already checked by
/// the caller): the integer and the offset after the CRLF.
fn header(
    buf: &[u8],
    pos: usize,
    too_big: &'static str,
    invalid: &'static str,
) -> Result<Option<(i64, usize)>, RespError> {
    let digits = pos + 1;
    let mut i = digits;
    // Only characters that can appear in an integer are waited on, so a line
    // like `*1\n` or `**1` fails at once rather than after MAX_HEADER_LINE bytes.
    loop {
        match buf.get(i) {
            None => return Ok(None),
            Some(b'\r') => break,
            Some(b'-' | b'0'..=b'9') => {}
            Some(_) => return Err(RespError(invalid)),
        }
        i += 1;
        if i - pos > MAX_HEADER_LINE {
            return Err(RespError(too_big));
        }
    }
    match buf.get(i + 1) {
        None => Ok(None),
        Some(b'\n') => {
            let n = parse_i64(&buf[digits..i]).ok_or(RespError(invalid))?;
            Ok(Some((n, i + 2)))
        }
        Some(_) => Err(RespError(invalid)),
    }
}

/// Redis's `string2ll`: optional `-`, no `+`, no leading zeros, no `-0`, no
/// overflow. Being as strict as Redis keeps every accepted header canonical.
fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits {
        [b'0'] => return (!neg).then_some(0),
        [] | [b'0', ..] => return None,
        _ => {}
    }
    let mut v: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        let d = i64::from(c - b'0');
        // Accumulating negatives downwards lets i64::MIN through, as Redis does.
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub(d)?
        } else {
            v.checked_add(d)?
        };
    }
    Some(v)
}

fn parse_inline(buf: &[u8], limits: &Limits) -> Parsed {
    // Searching only as far as the cap allows keeps each call O(max_inline)
    // however much pipelined data sits behind the line.
    let window = &buf[..buf.len().min(limits.max_inline.saturating_add(1))];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() > limits.max_inline {
            Err(RespError(TOO_BIG_INLINE))
        } else {
            Ok(None)
        };
    };
    let mut line = &buf[..nl];
    if let [rest @ .., b'\r'] = line {
        line = rest;
    }
    // Redis hands the line to sdssplitargs as a C string, so a NUL ends it;
    // doing the same keeps telnet sessions behaving exactly as against Redis.
    if let Some(nul) = line.iter().position(|&b| b == 0) {
        line = &line[..nul];
    }
    let args = split_args(line, limits.max_args).map_err(RespError)?;
    Ok(Some((args, nl + 1)))
}

/// C `isspace` in the "C" locale, which is what sdssplitargs uses between
/// arguments and after a closing quote.
fn is_c_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A transliteration of Redis's `sdssplitargs`, so quoting behaves exactly as
/// users know it from redis-cli. Unlike Redis it also enforces `max_args`, so
/// callers can rely on that cap whichever syntax the peer chose.
fn split_args(line: &[u8], max_args: usize) -> Result<Vec<Vec<u8>>, &'static str> {
    // Reading past the end yields 0, standing in for the C string terminator;
    // the caller has already cut the line at its first NUL, so 0 means "end".
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while is_c_space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Ok(args);
        }
        if args.len() == max_args {
            return Err(TOO_MANY_INLINE);
        }
        let mut cur = Vec::new();
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let c = at(p);
            if in_double {
                let hex = (at(p + 1) == b'x')
                    .then(|| hex_value(at(p + 2)).zip(hex_value(at(p + 3))))
                    .flatten();
                if let (b'\\', Some((hi, lo))) = (c, hex) {
                    cur.push(hi << 4 | lo);
                    p += 3;
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    cur.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    // `"a"b` would otherwise silently glue two arguments.
                    if at(p + 1) != 0 && !is_c_space(at(p + 1)) {
                        return Err(UNBALANCED);
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(UNBALANCED);
                } else {
                    cur.push(c);
                }
            } else if in_single {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_c_space(at(p + 1)) {
                        return Err(UNBALANCED);
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return Err(UNBALANCED);
                } else {
                    cur.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        if c != 0 {
                            p += 1;
                        }
                        break;
                    }
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    _ => cur.push(c),
                }
            }
            p += 1;
        }
        args.push(cur);
    }
}

/// Appends a one-line reply; CR and LF would end the line early and let the
/// rest be read as another reply, so they become spaces.
fn line(out: &mut Vec<u8>, prefix: u8, s: &str) {
    out.reserve(s.len() + 3);
    out.push(prefix);
    out.extend(
        s.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

fn decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(digits(n, &mut [0u8; 20]));
}

/// Writes `n` in decimal at the end of `buf`; returns the digits (also used by
/// `http::message_tail`).
pub(crate) fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// `+OK\r\n`. CR/LF inside `s` are replaced by spaces, as for [`error`].
pub fn simple(out: &mut Vec<u8>, s: &str) {
    line(out, b'+', s);
}

/// `s` is given without the leading `-`: `"ERR unknown command 'x'"` becomes
/// `-ERR unknown command 'x'\r\n`. CR/LF inside `s` are replaced by spaces, so
/// echoing peer input in an error cannot forge extra replies.
pub fn error(out: &mut Vec<u8>, s: &str) {
    line(out, b'-', s);
}

/// `:3\r\n`
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    if n < 0 {
        out.push(b'-');
    }
    decimal(out, n.unsigned_abs());
    out.extend_from_slice(b"\r\n");
}

/// `$3\r\nabc\r\n`; the payload is binary-safe.
pub fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.reserve(b.len() + 16);
    out.push(b'$');
    decimal(out, b.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// `$-1\r\n`, the RESP2 "nil" (e.g. a missing key).
pub fn null_bulk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// `*2\r\n`; the caller then appends the `n` elements.
pub fn array_len(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    decimal(out, n as u64);
    out.extend_from_slice(b"\r\n");
}

// ---- replies, as a client reads them (the cluster's link to redis-server) ----

/// A reply from a Redis server. Bulk payloads are owned: a reply outlives the link's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Simple(Vec<u8>),
    /// `-ERR ...`, without the `-`.
    Error(Vec<u8>),
    /// `:3`
    Int(i64),
    /// `$3\r\nabc`
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`.
    Nil,
    /// `*2 ...`
    Array(Vec<Value>),
}

impl Value {
    /// The payload of a bulk or simple string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(b) | Value::Simple(b) => Some(b),
            _ => None,
        }
    }
}

/// Deepest nesting of arrays accepted in a reply: comet's own commands get at most two levels
/// (a pub/sub message, an array of message entries).
const MAX_REPLY_DEPTH: usize = 4;

const BAD_REPLY_TYPE: &str = "Protocol error: unknown reply type";
const BAD_REPLY_LEN: &str = "Protocol error: bad reply length";
const TOO_DEEP: &str = "Protocol error: reply nested too deep";
const TOO_LONG_LINE: &str = "Protocol error: reply line too long";

/// Parses one reply from the start of `buf`: Ok(None) until it is complete, then the reply and
/// the bytes it used. The server is held to the same caps as a peer: a bulk over
/// `limits.max_bulk`, an array over `limits.max_args` elements, a status line over
/// `limits.max_inline` bytes or nesting past [`MAX_REPLY_DEPTH`] is an error, so a Redis that
/// answers garbage costs a reconnect, never unbounded memory.
pub fn parse_reply(buf: &[u8], limits: &Limits) -> Result<Option<(Value, usize)>, RespError> {
    reply_at(buf, 0, limits, 0)
}

fn reply_line(buf: &[u8], from: usize, max: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let window = &buf[from..buf.len().min(from + max + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some((&window[..i], from + i + 2))),
        None if window.len() >= max + 2 => Err(RespError(TOO_LONG_LINE)),
        None => Ok(None),
    }
}

fn reply_int(line: &[u8]) -> Result<i64, RespError> {
    let (neg, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(RespError(BAD_REPLY_LEN));
    }
    let n = digits.iter().fold(0i64, |n, d| n.wrapping_mul(10).wrapping_add(i64::from(d - b'0')));
    Ok(if neg { -n } else { n })
}

fn reply_at(buf: &[u8], at: usize, limits: &Limits, depth: usize) -> Result<Option<(Value, usize)>, RespError> {
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    let max = if matches!(kind, b'+' | b'-') { limits.max_inline } else { MAX_HEADER_LINE };
    let Some((line, next)) = reply_line(buf, at + 1, max)? else { return Ok(None) };
    match kind {
        b'+' => Ok(Some((Value::Simple(line.to_vec()), next))),
        b'-' => Ok(Some((Value::Error(line.to_vec()), next))),
        b':' => Ok(Some((Value::Int(reply_int(line)?), next))),
        b'$' => {
            let n = reply_int(line)?;
            if n == -1 {
                return Ok(Some((Value::Nil, next)));
            }
            if n < 0 || n as u64 > limits.max_bulk as u64 {
                return Err(RespError(BAD_REPLY_LEN));
            }
            let end = next + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError(BULK_NO_CRLF));
            }
            Ok(Some((Value::Bulk(buf[next..end].to_vec()), end + 2)))
        }
        b'*' => {
            let n = reply_int(line)?;
            if n == -1 {
                return Ok(Some((Value::Nil, next)));
            }
            if n < 0 || n as u64 > limits.max_args as u64 {
                return Err(RespError(BAD_REPLY_LEN));
            }
            if n > 0 && depth + 1 > MAX_REPLY_DEPTH {
                return Err(RespError(TOO_DEEP));
            }
            // The count is the peer's word: reserve for what a reply of this size usually holds,
            // not for whatever it claims, and let the items themselves grow the vector.
            let mut items = Vec::with_capacity((n as usize).min(1024));
            let mut pos = next;
            for _ in 0..n {
                let Some((v, p)) = reply_at(buf, pos, limits, depth + 1)? else { return Ok(None) };
                items.push(v);
                pos = p;
            }
            Ok(Some((Value::Array(items), pos)))
        }
        _ => Err(RespError(BAD_REPLY_TYPE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bulk: 1024,
        max_args: 16,
        max_inline: 64,
    };

    enum Want {
        /// One complete command spanning the whole input.
        Cmd(&'static [&'static [u8]]),
        Err(&'static str),
        Incomplete,
    }
    use Want::{Cmd, Err as Fail, Incomplete};

    fn table() -> Vec<(&'static [u8], Want)> {
        vec![
            // Multibulk, valid.
            (b"*1\r\n$4\r\nPING\r\n", Cmd(&[b"PING"])),
            (
                b"*3\r\n$7\r\nPUBLISH\r\n$4\r\nchan\r\n$5\r\nhello\r\n",
                Cmd(&[b"PUBLISH", b"chan", b"hello"]),
            ),
            (
                b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n",
                Cmd(&[b"GET", b"a\r\nb"]),
            ),
            (
                b"*2\r\n$3\r\nSET\r\n$3\r\n\x00\xff*\r\n",
                Cmd(&[b"SET", b"\x00\xff*"]),
            ),
            (b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n", Cmd(&[b"ECHO", b""])),
            (b"*0\r\n", Cmd(&[])),
            (b"*-1\r\n", Cmd(&[])),
            (b"*-7\r\n", Cmd(&[])),
            // Inline, valid.
            (b"PING\r\n", Cmd(&[b"PING"])),
            (b"PING\n", Cmd(&[b"PING"])),
            (b"  SET  k\tv \r\n", Cmd(&[b"SET", b"k", b"v"])),
            (
                b"SET \"a b\\n\\r\\t\\b\\a\\\\\\\"\\x41\\x4g\\q\" 'it\\'s \\n'\r\n",
                Cmd(&[b"SET", b"a b\n\r\t\x08\x07\\\"Ax4gq", b"it's \\n"]),
            ),
            (b"ECHO \"\" ''\n", Cmd(&[b"ECHO", b"", b""])),
            (b"a\"b c\" d\n", Cmd(&[b"ab c", b"d"])),
            (b"PING\0ignored \"\n", Cmd(&[b"PING"])),
            (b"\r\n", Cmd(&[])),
            (b"\n", Cmd(&[])),
            (b" \t \r\n", Cmd(&[])),
            // Incomplete.
            (b"", Incomplete),
            (b"*", Incomplete),
            (b"*2\r\n$3\r\nGET\r\n", Incomplete),
            (b"*1\r\n$5\r\nab", Incomplete),
            (b"*1\r\n$2\r\nab\r", Incomplete),
            (b"PING", Incomplete),
            // Multibulk errors.
            (b"*1\r\n$-5\r\nabc\r\n", Fail(INVALID_BULK)),
            (b"*1\r\n$99999999999999999999\r\n", Fail(INVALID_BULK)),
            (b"*1\r\n$1025\r\n", Fail(INVALID_BULK)),
            (b"*1\r\n$01\r\na\r\n", Fail(INVALID_BULK)),
            (b"*1\r\n$\r\n", Fail(INVALID_BULK)),
            (b"*1\r\n$1x", Fail(INVALID_BULK)),
            (b"*1\r\n$1\rx", Fail(INVALID_BULK)),
            (b"*17\r\n", Fail(INVALID_MBULK)),
            (b"*99999999999999999999\r\n", Fail(INVALID_MBULK)),
            (b"*abc\r\n", Fail(INVALID_MBULK)),
            (b"*+1\r\n", Fail(INVALID_MBULK)),
            (b"*-0\r\n", Fail(INVALID_MBULK)),
            (b"*1\n", Fail(INVALID_MBULK)),
            (b"**1\r\n", Fail(INVALID_MBULK)),
            (b"*1\r\n*1\r\n$1\r\na\r\n", Fail(EXPECTED_DOLLAR)),
            (b"*1\r\n:1\r\n", Fail(EXPECTED_DOLLAR)),
            (b"*1\r\n$3\r\nabcd\r\n", Fail(BULK_NO_CRLF)),
            (b"*1\r\n$3\r\nabc\rx", Fail(BULK_NO_CRLF)),
            (b"*1\r\n$3\r\nabc\n", Fail(BULK_NO_CRLF)),
            (b"*1111111111111111111111111111111111", Fail(TOO_BIG_MBULK)),
            (
                b"*1\r\n$0000000000000000000000000000000000",
                Fail(TOO_BIG_BULK),
            ),
            // Inline errors.
            (b"SET \"abc\n", Fail(UNBALANCED)),
            (b"SET 'abc\n", Fail(UNBALANCED)),
            (b"SET \"a\"b\n", Fail(UNBALANCED)),
            (b"SET 'a'b\n", Fail(UNBALANCED)),
            (b"SET \"a\\\n", Fail(UNBALANCED)),
            (&[b'x'; 65], Fail(TOO_BIG_INLINE)),
            (&[b'x'; 200], Fail(TOO_BIG_INLINE)),
            (
                b"a b c d e f g h i j k l m n o p\n",
                Cmd(&[
                    b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h", b"i", b"j", b"k", b"l", b"m",
                    b"n", b"o", b"p",
                ]),
            ),
            (
                b"a b c d e f g h i j k l m n o p q\n",
                Fail(TOO_MANY_INLINE),
            ),
        ]
    }

    fn owned(args: &[&[u8]]) -> Vec<Vec<u8>> {
        args.iter().map(|a| a.to_vec()).collect()
    }

    fn name(input: &[u8]) -> String {
        String::from_utf8_lossy(input).escape_debug().to_string()
    }

    #[test]
    fn table_whole_inputs() {
        for (input, want) in table() {
            let got = parse(input, &LIMITS);
            match want {
                Cmd(args) => {
                    assert_eq!(got, Ok(Some((owned(args), input.len()))), "{}", name(input))
                }
                Fail(msg) => assert_eq!(got, Err(RespError(msg)), "{}", name(input)),
                Incomplete => assert_eq!(got, Ok(None), "{}", name(input)),
            }
        }
    }

    #[test]
    fn every_prefix_of_a_command_is_incomplete() {
        for (input, want) in table() {
            if let Cmd(_) = want {
                for cut in 0..input.len() {
                    assert_eq!(
                        parse(&input[..cut], &LIMITS),
                        Ok(None),
                        "{} cut at {cut}",
                        name(input)
                    );
                }
            }
        }
    }

    #[test]
    fn pipelined_pairs_parse_in_order() {
        let cmds: Vec<_> = table()
            .into_iter()
            .filter_map(|(input, want)| match want {
                Cmd(args) => Some((input, owned(args))),
                _ => None,
            })
            .collect();
        for (a, a_args) in &cmds {
            for (b, b_args) in &cmds {
                let buf = [*a, *b].concat();
                let (args, used) = parse(&buf, &LIMITS).unwrap().unwrap();
                assert_eq!(
                    (&args, used),
                    (a_args, a.len()),
                    "{} then {}",
                    name(a),
                    name(b)
                );
                let rest = &buf[used..];
                assert_eq!(parse(rest, &LIMITS), Ok(Some((b_args.clone(), b.len()))));
            }
        }
    }

    #[test]
    fn oversized_bulk_fails_at_its_header() {
        let limits = Limits {
            max_bulk: 1 << 20,
            ..LIMITS
        };
        let got = parse(b"*2\r\n$7\r\nPUBLISH\r\n$10485760\r\n", &limits);
        assert_eq!(got, Err(RespError(INVALID_BULK)));
        // A bulk exactly at the cap is only waited for.
        assert_eq!(parse(b"*1\r\n$1048576\r\n", &limits), Ok(None));
    }

    #[test]
    fn caps_are_inclusive() {
        let limits = Limits {
            max_bulk: 3,
            max_args: 2,
            max_inline: 6,
        };
        assert!(matches!(
            parse(b"*2\r\n$3\r\nabc\r\n$0\r\n\r\n", &limits),
            Ok(Some(_))
        ));
        assert_eq!(parse(b"*3\r\n", &limits), Err(RespError(INVALID_MBULK)));
        assert_eq!(
            parse(b"*1\r\n$4\r\n", &limits),
            Err(RespError(INVALID_BULK))
        );
        assert_eq!(
            parse(b"abcdef\n", &limits),
            Ok(Some((owned(&[b"abcdef"]), 7)))
        );
        assert_eq!(parse(b"abcdef", &limits), Ok(None));
        assert_eq!(parse(b"abcdefg", &limits), Err(RespError(TOO_BIG_INLINE)));
        assert_eq!(parse(b"abcdefg\n", &limits), Err(RespError(TOO_BIG_INLINE)));
    }

    #[test]
    fn extreme_limits_do_not_overflow() {
        let limits = Limits {
            max_bulk: usize::MAX,
            max_args: usize::MAX,
            max_inline: usize::MAX,
        };
        assert_eq!(
            parse(b"*9223372036854775807\r\n$9223372036854775807\r\n", &limits),
            Ok(None)
        );
        assert_eq!(
            parse(b"*-9223372036854775808\r\n", &limits),
            Ok(Some((vec![], 23)))
        );
        assert_eq!(
            parse(b"*-9223372036854775809\r\n", &limits),
            Err(RespError(INVALID_MBULK))
        );
        assert_eq!(parse(b"PING", &limits), Ok(None));
    }

    /// xorshift64*: deterministic, so a failure is reproducible from its round.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn encode(args: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        array_len(&mut out, args.len());
        for a in args {
            bulk(&mut out, a);
        }
        out
    }

    #[test]
    fn fuzz_never_panics_and_is_prefix_stable() {
        const ALPHABET: &[u8] = b"*$:+-0123456789\r\n\r\n \t\"'\\xaFg\0";
        let limits = Limits {
            max_bulk: 32,
            max_args: 8,
            max_inline: 48,
        };
        let seeds: Vec<&[u8]> = table().into_iter().map(|(input, _)| input).collect();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut buf = Vec::new();
        // [multibulk command, inline command, wait, error]: proves the
        // generator reaches every outcome rather than only garbage.
        let mut seen = [0u32; 4];
        for round in 0..200_000 {
            buf.clear();
            match rng.below(3) {
                0 => {
                    for _ in 0..rng.below(80) {
                        let b = if rng.below(4) == 0 {
                            rng.next() as u8
                        } else {
                            ALPHABET[rng.below(ALPHABET.len())]
                        };
                        buf.push(b);
                    }
                }
                _ => {
                    for _ in 0..1 + rng.below(3) {
                        buf.extend_from_slice(seeds[rng.below(seeds.len())]);
                    }
                    for _ in 0..rng.below(4) {
                        if buf.is_empty() {
                            break;
                        }
                        let i = rng.below(buf.len());
                        match rng.below(4) {
                            0 => buf[i] = ALPHABET[rng.below(ALPHABET.len())],
                            1 => buf[i] = rng.next() as u8,
                            2 => buf.insert(i, ALPHABET[rng.below(ALPHABET.len())]),
                            _ => {
                                buf.remove(i);
                            }
                        }
                    }
                }
            }
            let whole = parse(&buf, &limits);
            seen[match &whole {
                Ok(Some(_)) if buf[0] == b'*' => 0,
                Ok(Some(_)) => 1,
                Ok(None) => 2,
                Err(_) => 3,
            }] += 1;
            if let Ok(Some((args, used))) = &whole {
                assert!(
                    *used > 0 && *used <= buf.len(),
                    "round {round}: {}",
                    name(&buf)
                );
                // An accepted header is canonical, so re-encoding reproduces it.
                if buf[0] == b'*' && !args.is_empty() {
                    assert_eq!(encode(args), &buf[..*used], "round {round}");
                }
                assert!(args.len() <= limits.max_args);
                assert!(args
                    .iter()
                    .all(|a| buf[0] != b'*' || a.len() <= limits.max_bulk));
            }
            // Whatever a prefix decides (other than "wait") must stand once
            // more bytes arrive, or results would depend on read boundaries.
            let cut = rng.below(buf.len() + 1);
            let part = parse(&buf[..cut], &limits);
            if part != Ok(None) {
                assert_eq!(part, whole, "round {round}: cut {cut} of {}", name(&buf));
            }
        }
        assert!(seen.iter().all(|&n| n > 5_000), "outcomes {seen:?}");
    }

    #[test]
    fn encoders_exact_bytes() {
        type Encode = fn(&mut Vec<u8>);
        let cases: Vec<(Encode, &[u8])> = vec![
            (|o| simple(o, "OK"), b"+OK\r\n"),
            (|o| simple(o, "a\r\nb"), b"+a  b\r\n"),
            (
                |o| error(o, "ERR unknown command 'x'"),
                b"-ERR unknown command 'x'\r\n",
            ),
            (|o| error(o, "ERR bad\r\n+OK"), b"-ERR bad  +OK\r\n"),
            (|o| integer(o, 3), b":3\r\n"),
            (|o| integer(o, 0), b":0\r\n"),
            (|o| integer(o, -42), b":-42\r\n"),
            (|o| integer(o, i64::MAX), b":9223372036854775807\r\n"),
            (|o| integer(o, i64::MIN), b":-9223372036854775808\r\n"),
            (|o| decimal(o, u64::MAX), b"18446744073709551615"),
            (|o| bulk(o, b"abc"), b"$3\r\nabc\r\n"),
            (|o| bulk(o, b""), b"$0\r\n\r\n"),
            (|o| bulk(o, b"\r\n\0"), b"$3\r\n\r\n\0\r\n"),
            (null_bulk, b"$-1\r\n"),
            (|o| array_len(o, 2), b"*2\r\n"),
            (|o| array_len(o, 0), b"*0\r\n"),
        ];
        for (encode, want) in cases {
            // Encoders append; they must not disturb what is already queued.
            let mut out = b"prev".to_vec();
            encode(&mut out);
            assert_eq!(&out[4..], want, "{}", name(want));
            assert_eq!(&out[..4], b"prev");
        }
    }

    #[test]
    fn error_message_and_display() {
        let e = RespError(INVALID_BULK);
        assert_eq!(e.message(), "Protocol error: invalid bulk length");
        assert_eq!(e.to_string(), e.message());
    }

    #[test]
    fn replies_as_a_table_of_bytes() {
        use Value::*;
        let lim = Limits { max_bulk: 16, max_args: 4, max_inline: 32 };
        let ok: &[(&[u8], Value)] = &[
            (b"+OK\r\n", Simple(b"OK".to_vec())),
            (b"-NOSCRIPT No matching script\r\n", Error(b"NOSCRIPT No matching script".to_vec())),
            (b":0\r\n", Int(0)),
            (b":-42\r\n", Int(-42)),
            (b"$0\r\n\r\n", Bulk(Vec::new())),
            (b"$5\r\na\r\nb\x00\r\n", Bulk(b"a\r\nb\x00".to_vec())),
            (b"$-1\r\n", Nil),
            (b"*-1\r\n", Nil),
            (b"*0\r\n", Array(vec![])),
            (
                b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n",
                Array(vec![Bulk(b"message".to_vec()), Bulk(b"c".to_vec()), Bulk(b"hi".to_vec())]),
            ),
            (b"*2\r\n*1\r\n:1\r\n$-1\r\n", Array(vec![Array(vec![Int(1)]), Nil])),
        ];
        for (bytes, want) in ok {
            assert_eq!(parse_reply(bytes, &lim), Ok(Some((want.clone(), bytes.len()))), "{:?}", String::from_utf8_lossy(bytes));
            // Split at every byte: each prefix is incomplete, never an error or a wrong reply.
            for cut in 0..bytes.len() {
                assert_eq!(parse_reply(&bytes[..cut], &lim), Ok(None), "{:?} cut at {cut}", String::from_utf8_lossy(bytes));
            }
            // Followed by the next reply: only its own bytes are used.
            let mut two = bytes.to_vec();
            two.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(parse_reply(&two, &lim), Ok(Some((want.clone(), bytes.len()))));
        }
        let bad: &[(&[u8], &str)] = &[
            (b"?x\r\n", BAD_REPLY_TYPE),
            (b":12a\r\n", BAD_REPLY_LEN),
            (b":\r\n", BAD_REPLY_LEN),
            (b"$17\r\n", BAD_REPLY_LEN),
            (b"$-2\r\n", BAD_REPLY_LEN),
            (b"$2\r\nabcd", BULK_NO_CRLF),
            (b"*5\r\n", BAD_REPLY_LEN),
            (b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", TOO_DEEP),
            (b"+0123456789012345678901234567890123456789", TOO_LONG_LINE),
            (b":123456789012345678901234567890123456789", TOO_LONG_LINE),
        ];
        for (bytes, why) in bad {
            assert_eq!(parse_reply(bytes, &lim), Err(RespError(why)), "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
