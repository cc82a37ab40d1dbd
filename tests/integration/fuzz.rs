//! Property tests ("fuzzing" with std only) for the wire parsers and the cursor reader:
//! `comet::http::parse_head`, `comet::http::cursor`, `comet::resp::parse` and the WebSocket
//! client-frame reader `comet::ws::Reader`.
//!
//! Deterministic xorshift generators feed mutated valid inputs and junk to each function and
//! check, for every input:
//!
//! * no panic (the input is printed, escaped, when one happens);
//! * consumed bytes are sane: `1 <= n <= len`, within the caps (`max_head`, `max_args`,
//!   `max_bulk`), never 0 (a zero-length "complete" frame would loop the event loop forever);
//! * prefix stability: if a buffer parses `Complete(n)`, the same `n` bytes followed by anything
//!   parse to the same first frame; an error is final (anything appended gives the same error);
//!   an incomplete buffer has only incomplete prefixes;
//! * bounded waiting: "incomplete" is never the answer for a buffer already over the caps (the
//!   event loop would keep buffering a peer's bytes);
//! * round trips: encoded valid inputs parse back to what was encoded.
//!
//! Iterations per generator: `COMET_FUZZ_ITERS` (default 100000), or `COMET_FUZZ_SECS` seconds
//! when set; the seed: `COMET_FUZZ_SEED` (default fixed, so a failure reproduces). `scripts/fuzz`
//! runs them with large counts. Each test prints how many inputs it ran; a violated property
//! fails the test with the first (shortest seen) input for each property.

use crate::common::Rng;
use comet::http::{self, Request};
use comet::hub::MsgId;
use comet::resp::{self, Limits};
use comet::ws;
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Generator plumbing
// ---------------------------------------------------------------------------------------------

/// How long each generator runs: a count, or a time budget.
struct Budget {
    iters: u64,
    until: Option<Instant>,
}

impl Budget {
    fn from_env() -> Budget {
        let secs = std::env::var("COMET_FUZZ_SECS").ok().and_then(|s| s.parse::<u64>().ok());
        let iters = std::env::var("COMET_FUZZ_ITERS").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(if cfg!(debug_assertions) { 10_000 } else { 100_000 });
        Budget { iters: if secs.is_some() { u64::MAX } else { iters }, until: secs.map(|s| Instant::now() + Duration::from_secs(s)) }
    }
    fn go(&self, i: u64) -> bool {
        if i >= self.iters {
            return false;
        }
        match self.until {
            Some(t) => i % 256 != 0 || Instant::now() < t,
            None => true,
        }
    }
}

fn seed(salt: u64) -> u64 {
    std::env::var("COMET_FUZZ_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0x00C0_FFEE_D00D_F00D) ^ salt
}

/// Printable, escaped, runs of one byte shortened (`{'\n' x 9001}`), cut to a readable length.
fn show(b: &[u8]) -> String {
    let esc = |c: u8| match c {
        b'\r' => "\\r".to_string(),
        b'\n' => "\\n".to_string(),
        b'\\' => "\\\\".to_string(),
        b'"' => "\\\"".to_string(),
        0x20..=0x7e => (c as char).to_string(),
        _ => format!("\\x{c:02x}"),
    };
    let mut s = String::new();
    let mut i = 0;
    while i < b.len() && s.len() < 600 {
        let run = b[i..].iter().take_while(|&&c| c == b[i]).count();
        if run >= 8 {
            s.push_str(&format!("{{{} x {run}}}", esc(b[i])));
        } else {
            for &c in &b[i..i + run] {
                s.push_str(&esc(c));
            }
        }
        i += run;
    }
    if i < b.len() {
        s.push_str(&format!("... ({} bytes in all)", b.len()));
    }
    format!("\"{s}\"")
}

/// Violated properties: name -> (how many inputs, the shortest example, details).
#[derive(Default)]
struct Findings(BTreeMap<&'static str, (u64, Vec<u8>, String)>);

impl Findings {
    fn add(&mut self, property: &'static str, input: &[u8], detail: String) {
        let e = self.0.entry(property).or_insert_with(|| (0, input.to_vec(), detail.clone()));
        e.0 += 1;
        if input.len() < e.1.len() {
            e.1 = input.to_vec();
            e.2 = detail;
        }
    }
    fn finish(self, what: &str, ran: u64, started: Instant) {
        println!("fuzz {what}: {ran} inputs in {:.1} s, {} properties violated", started.elapsed().as_secs_f64(), self.0.len());
        if self.0.is_empty() {
            return;
        }
        let mut report = String::new();
        for (p, (n, input, detail)) in &self.0 {
            report.push_str(&format!("\n  property `{p}` violated by {n} inputs; shortest ({} bytes): {}\n    {detail}", input.len(), show(input)));
        }
        panic!("fuzz {what}: {ran} inputs, violations:{report}");
    }
}

/// Runs `f`, turning a panic into a finding.
fn guarded<T>(findings: &mut Findings, what: &'static str, input: &[u8], f: impl FnOnce() -> T) -> Option<T> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            findings.add(what, input, format!("panic: {msg}"));
            None
        }
    }
}

/// Applies 1 to 4 random mutations: flip, insert a token, delete a range, duplicate a range,
/// truncate, splice a random byte run.
fn mutate(rng: &mut Rng, mut b: Vec<u8>, tokens: &[&[u8]]) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                b[i] = rng.next() as u8;
            }
            2 | 3 => {
                let i = rng.below(len + 1);
                let t = rng.pick(tokens).to_vec();
                b.splice(i..i, t);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let j = (i + 1 + rng.below(16)).min(len);
                b.drain(i..j);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let j = (i + 1 + rng.below(32)).min(len);
                let piece = b[i..j].to_vec();
                let cap = if rng.one_in(20) { 400 } else { 4 };
                let times = 1 + rng.below(cap);
                for _ in 0..times {
                    b.splice(j..j, piece.iter().copied());
                }
            }
            6 if len > 0 => {
                b.truncate(rng.below(len));
            }
            _ => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let junk = rng.bytes(n);
                b.splice(i..i, junk);
            }
        }
    }
    b
}

/// A random tail appended for the extension checks: junk, or more protocol.
fn tail(rng: &mut Rng, more: &[&[u8]]) -> Vec<u8> {
    match rng.below(3) {
        0 => {
            let n = 1 + rng.below(64);
            rng.bytes(n)
        }
        1 => rng.pick(more).to_vec(),
        _ => {
            let mut t = rng.pick(more).to_vec();
            let n = rng.below(16);
            t.extend(rng.bytes(n));
            t
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP heads
// ---------------------------------------------------------------------------------------------

const HTTP_SEEDS: &[&[u8]] = &[
    b"GET /sub/goods HTTP/1.1\r\nHost: push.test\r\n\r\n",
    b"GET /subscribe?id=goods&last_event_id=1795818600%3A2 HTTP/1.1\r\nHost: x\r\nCookie: PHPSESSID=abc; a=b\r\n\r\n",
    b"GET /sub/@me HTTP/1.1\r\nCookie: PHPSESSID=s1\r\nIf-Modified-Since: Thu, 01 Jan 1970 00:00:10 GMT\r\nIf-None-Match: W/\"3\"\r\nOrigin: http://site.test\r\n\r\n",
    b"POST /pub?id=goods HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nAuthorization: Bearer s3cret-token\r\n\r\nhello",
    b"OPTIONS /sub/x HTTP/1.1\r\nOrigin: http://site.test\r\nAccess-Control-Request-Method: GET\r\n\r\n",
    b"GET /sub/x HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    b"\r\n\r\nGET http://push.site.com/sub/x?multipart=1 HTTP/1.1\r\nAccept: multipart/mixed\r\nLast-Event-ID: 7:1\r\n\r\n",
    b"DELETE /pub/goods HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"PUT /pub?id=a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /sub/a%3Ab%2C HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\n\r\n",
];

const HTTP_TOKENS: &[&[u8]] = &[
    b"\r\n", b"\r\n\r\n", b"\n", b"\r", b"\0", b" ", b"\t", b":", b"%", b"%zz", b"%ff", b"%00", b"%3A", b"?", b"/", b"\"",
    b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0", b" HTTP/1.2", b"HTTP/", b"GET ", b"POST ",
    b"Content-Length: 99999999999999999999999\r\n", b"Content-Length: -1\r\n", b"Content-Length: 2000000\r\n",
    b"Content-Length: 3\r\n", b"Content-Length:  7 \r\n", b"Content-Length: 0x10\r\n", b"Content-Length: 1, 1\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip, identity\r\n", b"Connection: close\r\n",
    b"If-Modified-Since: Thu, 01 Jan 1970 00:00:10 GMT\r\n", b"Cookie: PHPSESSID=\xff\xfe\r\n", b"X: \x80\r\n",
    b" folded\r\n", b"Host:\r\n", b"\xef\xbb\xbf", b"\x7f", b"\xff",
];

fn http_input(rng: &mut Rng) -> Vec<u8> {
    match rng.below(20) {
        // Pure junk, sometimes big.
        0 => {
            let n = if rng.one_in(10) { 8000 + rng.below(12000) } else { rng.below(300) };
            rng.bytes(n)
        }
        // Floods of one token: blank lines, header lines, bytes (over the head cap now and then).
        1 => {
            const UNITS: [&[u8]; 5] = [b"\r\n", b"\n", b"X-A: b\r\n", b"a", b"\r"];
            let unit: &[u8] = *rng.pick(&UNITS);
            let n = if rng.one_in(4) { (9000 + rng.below(12_000)) / unit.len() } else { rng.below(200) };
            let mut v = Vec::new();
            if rng.one_in(2) {
                v.extend_from_slice(b"GET /sub/x HTTP/1.1\r\n");
            }
            for _ in 0..n {
                v.extend_from_slice(unit);
            }
            v
        }
        // Many headers, around the 64-line cap.
        2 => {
            let mut v = b"GET /sub/x HTTP/1.1\r\n".to_vec();
            for i in 0..60 + rng.below(10) {
                v.extend_from_slice(format!("X-{i}: {}\r\n", "v".repeat(rng.below(50))).as_bytes());
            }
            v.extend_from_slice(b"\r\n");
            v
        }
        // A long target near the cap.
        3 => {
            let n = 8150 + rng.below(80);
            format!("GET /sub/{} HTTP/1.1\r\n\r\n", "a".repeat(n)).into_bytes()
        }
        _ => {
            let s = rng.pick(HTTP_SEEDS).to_vec();
            mutate(rng, s, HTTP_TOKENS)
        }
    }
}

fn leading_blank(b: &[u8]) -> usize {
    b.iter().take_while(|&&c| c == b'\r' || c == b'\n').count()
}

#[test]
fn fuzz_http_parse_head() {
    const MAX_HEAD: usize = 8192;
    const MAX_BODY: usize = 1 << 20;
    let budget = Budget::from_env();
    let mut rng = Rng::new(seed(1));
    let mut f = Findings::default();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    fn parse(b: &[u8]) -> Result<Option<(http::Request<'_>, usize)>, http::HttpError> {
        http::parse_head(b, MAX_HEAD, MAX_BODY)
    }
    let mut i = 0;
    while budget.go(i) {
        i += 1;
        let input = http_input(&mut rng);
        let Some(res) = guarded(&mut f, "no panic", &input, || parse(&input)) else { continue };
        let key = match &res {
            Ok(None) => "incomplete".to_string(),
            Ok(Some(_)) => "complete".to_string(),
            Err(e) => format!("error {}", e.status),
        };
        *outcomes.entry(key).or_default() += 1;
        let mut ext = input.clone();
        ext.extend(tail(&mut rng, HTTP_SEEDS));
        match res {
            Ok(Some((req, n))) => {
                if n == 0 || n > input.len() {
                    f.add("1 <= consumed <= len", &input, format!("consumed {n} of {}", input.len()));
                    continue;
                }
                if n - leading_blank(&input) > MAX_HEAD {
                    f.add("head within max_head_bytes", &input, format!("head of {} bytes accepted", n - leading_blank(&input)));
                }
                if req.content_length > MAX_BODY {
                    f.add("content_length <= max_body", &input, format!("content_length {}", req.content_length));
                }
                if !matches!(&req.method, Some(_)) {
                    f.add("method set", &input, format!("{req:?}"));
                }
                // The head alone, and the head followed by anything, parse to the same request.
                let head = &input[..n];
                if let Some(again) = guarded(&mut f, "no panic", head, || parse(head)) {
                    if again != Ok(Some((req.clone(), n))) {
                        f.add("prefix stability (head alone)", &input, format!("whole: {:?}; head alone: {again:?}", (&req, n)));
                    }
                }
                let mut longer = head.to_vec();
                longer.extend(tail(&mut rng, HTTP_SEEDS));
                if let Some(again) = guarded(&mut f, "no panic", &longer, || parse(&longer)) {
                    if again != Ok(Some((req.clone(), n))) {
                        f.add("prefix stability (head + more)", &longer, format!("head alone: {:?}; with more: {again:?}", (&req, n)));
                    }
                }
                // Every strict prefix of a complete head is incomplete (sampled cuts).
                for _ in 0..2 {
                    let cut = rng.below(n);
                    let pre = &input[..cut];
                    if let Some(r) = guarded(&mut f, "no panic", pre, || parse(pre)) {
                        if r != Ok(None) {
                            f.add("strict prefix of a head is incomplete", pre, format!("prefix of {cut}/{n} bytes gave {r:?}"));
                        }
                    }
                }
            }
            Ok(None) => {
                // Leading blank lines and the head itself are each capped at max_head: more than
                // both together and still "incomplete" means a peer can make the loop buffer forever.
                if input.len() >= 2 * MAX_HEAD + 2 {
                    f.add(
                        "incomplete only below 2 x max_head_bytes (bounded buffering)",
                        &input,
                        format!("{} bytes buffered and still `incomplete`; max_head = {MAX_HEAD}", input.len()),
                    );
                }
                let cut = rng.below(input.len() + 1);
                let pre = &input[..cut];
                if let Some(r) = guarded(&mut f, "no panic", pre, || parse(pre)) {
                    if r != Ok(None) {
                        f.add("prefix of incomplete is incomplete", pre, format!("whole incomplete, prefix of {cut} bytes gave {r:?}"));
                    }
                }
            }
            Err(e) => {
                if !matches!(e.status, 400 | 413 | 431 | 501 | 505) {
                    f.add("error status in 400/413/431/501/505", &input, format!("status {}", e.status));
                }
                if let Some(r) = guarded(&mut f, "no panic", &ext, || parse(&ext)) {
                    if r.as_ref().map_err(|x| x.status) != Err(e.status) {
                        f.add("error is final", &ext, format!("prefix gave {}, with more bytes: {:?}", e.status, r.map(|o| o.map(|x| x.1))));
                    }
                }
            }
        }
    }
    println!("fuzz http::parse_head outcomes: {outcomes:?}");
    f.finish("http::parse_head", i, started);
}

// ---------------------------------------------------------------------------------------------
// Cursors
// ---------------------------------------------------------------------------------------------

fn random_date(rng: &mut Rng) -> (String, Option<u64>) {
    let t = match rng.below(4) {
        0 => rng.below(100_000) as u64,
        1 => 253_402_300_799 - rng.below(100_000) as u64, // the end of year 9999
        _ => 1_700_000_000 + rng.below(100_000_000) as u64,
    };
    let good = http::cursor_headers(Some(MsgId { time: t, tag: 0 }));
    // "Last-Modified: <date>\r\nEtag: 0\r\n" -> the date.
    let date = good.lines().next().unwrap_or("").trim_start_matches("Last-Modified: ").to_string();
    if rng.one_in(2) {
        return (date, Some(t));
    }
    let m = mutate(rng, date.into_bytes(), &[b" ", b",", b":", b"GMT", b"99", b"-1", b"0", b"Feb", b"\xff", b"+", b"60"]);
    (String::from_utf8_lossy(&m).into_owned(), None)
}

fn random_compound(rng: &mut Rng) -> (String, Option<MsgId>) {
    let time = match rng.below(3) {
        0 => rng.below(1000) as u64,
        1 => u64::MAX - rng.below(3) as u64,
        _ => rng.next(),
    };
    let tag = if rng.one_in(3) { u32::MAX - rng.below(3) as u32 } else { rng.below(1000) as u32 };
    let s = format!("{time}:{tag}");
    if rng.one_in(2) {
        return (s, Some(MsgId { time, tag }));
    }
    let m = mutate(rng, s.into_bytes(), &[b":", b"-", b"+", b" ", b"%", b"%3A", b"99999999999999999999", b"\0", b"\xe2\x82\xac"]);
    (String::from_utf8_lossy(&m).into_owned(), None)
}

#[test]
fn fuzz_http_cursor() {
    let budget = Budget::from_env();
    let mut rng = Rng::new(seed(2));
    let mut f = Findings::default();
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let started = Instant::now();
    let mut i = 0;
    while budget.go(i) {
        i += 1;
        let (lei_query, lei_q_want) = random_compound(&mut rng);
        let (lei_header, lei_h_want) = random_compound(&mut rng);
        let (ims, ims_want) = random_date(&mut rng);
        let tag = rng.below(100_000) as u32;
        let inm_forms = [tag.to_string(), format!("\"{tag}\""), format!("W/\"{tag}\"")];
        let inm_good = rng.pick(&inm_forms).clone();
        let inm = if rng.one_in(3) {
            String::from_utf8_lossy(&mutate(&mut rng, inm_good.clone().into_bytes(), &[b"W/", b"\"", b"-", b" ", b"99999999999"])).into_owned()
        } else {
            inm_good
        };
        let use_q = rng.below(3);
        let query = match use_q {
            0 => String::new(),
            1 => format!("id=x&last_event_id={}", lei_query.replace(':', if rng.one_in(2) { ":" } else { "%3A" })),
            _ => String::from_utf8_lossy(&mutate(&mut rng, format!("last_event_id={lei_query}&a=%zz").into_bytes(), &[b"&", b"=", b"%", b"+"])).into_owned(),
        };
        let with_lei_h = rng.one_in(2);
        let with_ims = rng.below(4) != 0;
        let with_inm = rng.one_in(2);
        let req = Request {
            query: &query,
            last_event_id: with_lei_h.then_some(lei_header.as_str()),
            if_modified_since: with_ims.then_some(ims.as_str()),
            if_none_match: with_inm.then_some(inm.as_str()),
            ..Default::default()
        };
        let label = format!("{req:?}");
        let Some(res) = guarded(&mut f, "no panic", label.as_bytes(), || http::cursor(&req)) else { continue };
        *outcomes.entry(match &res { Ok(None) => "none", Ok(Some(_)) => "cursor", Err(_) => "error" }).or_default() += 1;
        if let Err(e) = &res {
            if e.status != 400 {
                f.add("cursor errors are 400", label.as_bytes(), format!("{e:?}"));
            }
        }
        // What the documented precedence says, where the inputs are known-good.
        let expect: Option<Result<Option<MsgId>, ()>> = if with_lei_h {
            lei_h_want.map(|id| Ok(Some(id)))
        } else if use_q == 1 {
            lei_q_want.map(|id| Ok(Some(id)))
        } else if use_q == 0 {
            if !with_ims {
                Some(Ok(None))
            } else {
                match (ims_want, with_inm, inm.trim().trim_start_matches("W/").trim_matches('"').parse::<u32>()) {
                    (Some(t), false, _) => Some(Ok(Some(MsgId { time: t, tag: 0 }))),
                    (Some(t), true, Ok(tag)) => Some(Ok(Some(MsgId { time: t, tag }))),
                    _ => None,
                }
            }
        } else {
            None
        };
        if let Some(want) = expect {
            if res.map_err(|_| ()) != want {
                f.add("documented precedence and round trip", label.as_bytes(), format!("want {want:?}"));
            }
        }
    }
    println!("fuzz http::cursor outcomes: {outcomes:?}");
    f.finish("http::cursor", i, started);
}

// ---------------------------------------------------------------------------------------------
// RESP
// ---------------------------------------------------------------------------------------------

/// A command as RESP (the harness's encoder takes slices).
fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    crate::common::encode(&args.iter().map(Vec::as_slice).collect::<Vec<_>>())
}

const RESP_SEEDS: &[&[u8]] = &[
    b"*3\r\n$7\r\nPUBLISH\r\n$5\r\ngoods\r\n$5\r\nhello\r\n",
    b"*2\r\n$4\r\nAUTH\r\n$12\r\ns3cret-token\r\n",
    b"*1\r\n$4\r\nPING\r\n",
    b"*0\r\n",
    b"*-1\r\n",
    b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n",
    b"PING\r\n",
    b"PUBLISH goods \"he said \\\"hi\\\"\\x41\\n\" 'it''s'\r\n",
    b"SUBSCRIBE a b c\n",
    b"\r\n",
    b"*1\r\n*1\r\n*1\r\n*1\r\n$4\r\nPING\r\n",
    b"*2\r\n$-1\r\n$3\r\nfoo\r\n",
    b"$5\r\nhello\r\n",
    b":1\r\n+OK\r\n-ERR x\r\n",
];

const RESP_TOKENS: &[&[u8]] = &[
    b"\r\n", b"\n", b"\r", b"\0", b"*", b"$", b"-", b"-1", b"-0", b"0", b"00", b"+5", b"99999999999999999999", b"9223372036854775807",
    b"-9223372036854775808", b"1025", b"1048577", b"*1\r\n", b"$1\r\na\r\n", b"\"", b"'", b"\\x", b"\\xzz", b" ", b"\t", b"\xff",
];

fn resp_input(rng: &mut Rng, lim: &Limits) -> Vec<u8> {
    match rng.below(16) {
        0 => {
            let n = if rng.one_in(10) { 60_000 + rng.below(10_000) } else { rng.below(200) };
            rng.bytes(n)
        }
        // Deep nesting, sometimes very deep.
        1 => {
            let depth = if rng.one_in(4) { 10_000 + rng.below(50_000) } else { 1 + rng.below(50) };
            let mut v = Vec::with_capacity(depth * 4 + 16);
            for _ in 0..depth {
                v.extend_from_slice(b"*1\r\n");
            }
            v.extend_from_slice(b"$4\r\nPING\r\n");
            v
        }
        // Lengths around the caps, negative, huge.
        2 => {
            let which = rng.below(6);
            let n: i128 = match which {
                0 => lim.max_bulk as i128 + rng.below(3) as i128 - 1,
                1 => -(rng.below(10) as i128) - 1,
                2 => i64::MAX as i128 - rng.below(2) as i128,
                3 => i64::MIN as i128,
                4 => lim.max_args as i128 + rng.below(3) as i128 - 1,
                _ => rng.next() as i64 as i128,
            };
            if rng.one_in(2) {
                format!("*{n}\r\n$4\r\nPING\r\n").into_bytes()
            } else {
                format!("*2\r\n$4\r\nECHO\r\n${n}\r\nabc\r\n").into_bytes()
            }
        }
        // Long inline lines around the 64 KiB cap.
        3 if rng.one_in(4) => {
            let n = lim.max_inline - 2 + rng.below(5);
            let mut v = vec![b'a'; n];
            if rng.one_in(2) {
                v.extend_from_slice(b"\r\n");
            }
            v
        }
        // A valid frame of random arguments, maybe mutated.
        4..=7 => {
            let args: Vec<Vec<u8>> = (0..1 + rng.below(5)).map(|_| {
                let n = rng.below(40);
                rng.bytes(n)
            }).collect();
            let v = encode(&args);
            if rng.one_in(2) { v } else { mutate(rng, v, RESP_TOKENS) }
        }
        _ => {
            let s = rng.pick(RESP_SEEDS).to_vec();
            mutate(rng, s, RESP_TOKENS)
        }
    }
}

type RespOut = Result<Option<(Vec<Vec<u8>>, usize)>, resp::RespError>;

#[test]
fn fuzz_resp_parse() {
    let budget = Budget::from_env();
    let mut rng = Rng::new(seed(3));
    let lim = Limits { max_bulk: 1 << 20, max_args: 1024, max_inline: 64 * 1024 };
    let mut f = Findings::default();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    let parse = |b: &[u8]| -> RespOut { resp::parse(b, &lim) };
    let mut i = 0;
    while budget.go(i) {
        i += 1;
        // A round trip first: encoded arguments parse back exactly.
        if i % 4 == 0 {
            let args: Vec<Vec<u8>> = (0..1 + rng.below(8)).map(|_| {
                let n = if rng.one_in(50) { rng.below(70_000) } else { rng.below(30) };
                rng.bytes(n)
            }).collect();
            let wire = encode(&args);
            if let Some(r) = guarded(&mut f, "no panic", &wire, || parse(&wire)) {
                if r != Ok(Some((args.clone(), wire.len()))) {
                    f.add("round trip of an encoded command", &wire, format!("got {:?}", r.map(|o| o.map(|x| x.1))));
                }
            }
        }
        let input = resp_input(&mut rng, &lim);
        let Some(res) = guarded(&mut f, "no panic", &input, || parse(&input)) else { continue };
        let key = match &res {
            Ok(None) => "incomplete".to_string(),
            Ok(Some((a, _))) if a.is_empty() => "complete (empty)".to_string(),
            Ok(Some(_)) => "complete".to_string(),
            Err(e) => format!("error: {}", e.message()),
        };
        *outcomes.entry(key).or_default() += 1;
        match res {
            Ok(Some((args, n))) => {
                if n == 0 || n > input.len() {
                    // n == 0 would make the control loop parse the same bytes forever.
                    f.add("1 <= consumed <= len", &input, format!("consumed {n} of {}", input.len()));
                    continue;
                }
                if args.len() > lim.max_args {
                    f.add("args <= max_args", &input, format!("{} args", args.len()));
                }
                if let Some(a) = args.iter().find(|a| a.len() > lim.max_bulk) {
                    f.add("arg <= max_bulk", &input, format!("arg of {} bytes", a.len()));
                }
                if input.first() != Some(&b'*') && n > lim.max_inline + 1 {
                    f.add("inline line <= max_inline", &input, format!("line of {n} bytes"));
                }
                let frame = &input[..n];
                let mut longer = frame.to_vec();
                longer.extend(tail(&mut rng, RESP_SEEDS));
                if let Some(again) = guarded(&mut f, "no panic", &longer, || parse(&longer)) {
                    if again != Ok(Some((args.clone(), n))) {
                        f.add("prefix stability (frame + more)", &longer, format!("frame alone: {:?}; with more: {again:?}", (args.len(), n)));
                    }
                }
                for _ in 0..2 {
                    let cut = rng.below(n);
                    let pre = &input[..cut];
                    if let Some(r) = guarded(&mut f, "no panic", pre, || parse(pre)) {
                        if r != Ok(None) {
                            f.add("strict prefix of a frame is incomplete", pre, format!("prefix of {cut}/{n} bytes gave {:?}", r.map(|o| o.map(|x| x.1))));
                        }
                    }
                }
            }
            Ok(None) => {
                if input.first() != Some(&b'*') && input.len() > lim.max_inline + 1 {
                    f.add("incomplete inline only below max_inline", &input, format!("{} bytes still incomplete", input.len()));
                }
                let cut = rng.below(input.len() + 1);
                let pre = &input[..cut];
                if let Some(r) = guarded(&mut f, "no panic", pre, || parse(pre)) {
                    if r != Ok(None) {
                        f.add("prefix of incomplete is incomplete", pre, format!("prefix of {cut} bytes gave {:?}", r.map(|o| o.map(|x| x.1))));
                    }
                }
            }
            Err(e) => {
                if !e.message().starts_with("Protocol error") {
                    f.add("errors are protocol errors", &input, e.message().to_string());
                }
                let mut ext = input.clone();
                ext.extend(tail(&mut rng, RESP_SEEDS));
                if let Some(r) = guarded(&mut f, "no panic", &ext, || parse(&ext)) {
                    if r.as_ref().err() != Some(&e) {
                        f.add("error is final", &ext, format!("prefix gave {:?}, with more: {:?}", e.message(), r.map(|o| o.map(|x| x.1))));
                    }
                }
            }
        }
    }
    println!("fuzz resp::parse outcomes: {outcomes:?}");
    f.finish("resp::parse", i, started);
}

/// Pipelines: a buffer of many random frames, consumed frame by frame as the control loop does,
/// gives back exactly the commands encoded, whatever the chunking of the reads.
#[test]
fn fuzz_resp_pipeline_chunking() {
    let budget = Budget::from_env();
    let mut rng = Rng::new(seed(4));
    let lim = Limits { max_bulk: 4096, max_args: 16, max_inline: 1024 };
    let mut f = Findings::default();
    let started = Instant::now();
    let mut i = 0;
    while budget.go(i * 20) {
        i += 1;
        let mut want: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut wire = Vec::new();
        for _ in 0..1 + rng.below(8) {
            if rng.one_in(3) {
                // An inline command of plain words.
                let words: Vec<Vec<u8>> = (0..1 + rng.below(4))
                    .map(|_| (0..1 + rng.below(8)).map(|_| b'a' + rng.below(26) as u8).collect())
                    .collect();
                wire.extend(words.join(&b' '));
                wire.extend_from_slice(if rng.one_in(2) { b"\r\n" } else { b"\n" });
                want.push(words);
            } else {
                let args: Vec<Vec<u8>> = (0..1 + rng.below(4)).map(|_| {
                    let n = rng.below(100);
                    rng.bytes(n)
                }).collect();
                wire.extend(encode(&args));
                want.push(args);
            }
        }
        // Feed in random chunks, parsing after each one as the loop does.
        let mut got = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut ok = true;
        while fed < wire.len() && ok {
            let step = 1 + rng.below(64);
            let end = (fed + step).min(wire.len());
            buf.extend_from_slice(&wire[fed..end]);
            fed = end;
            loop {
                match guarded(&mut f, "no panic", &buf, || resp::parse(&buf, &lim)) {
                    Some(Ok(Some((args, n)))) => {
                        buf.drain(..n);
                        if !args.is_empty() {
                            got.push(args);
                        }
                    }
                    Some(Ok(None)) => break,
                    Some(Err(e)) => {
                        f.add("valid pipeline never errors", &wire, e.message().to_string());
                        ok = false;
                        break;
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
        }
        if ok && (got != want || !buf.is_empty()) {
            f.add("pipeline parses back to its commands", &wire, format!("{} commands sent, {} parsed, {} bytes left", want.len(), got.len(), buf.len()));
        }
    }
    f.finish("resp::parse pipelines", i, started);
}

// ---------------------------------------------------------------------------------------------
// ws::Reader: a WebSocket client's frames
// ---------------------------------------------------------------------------------------------

/// Reads `wire` fed in chunks of `step` bytes as the loop does; the events, or the first failure.
fn ws_read(wire: &[u8], steps: &mut dyn FnMut() -> usize) -> Result<Vec<ws::Event>, ws::Fail> {
    let mut r = ws::Reader::default();
    let (mut buf, mut fed, mut got) = (Vec::new(), 0, Vec::new());
    while fed < wire.len() {
        let end = (fed + steps()).min(wire.len());
        buf.extend_from_slice(&wire[fed..end]);
        fed = end;
        while let Some((ev, n)) = r.read(&buf)? {
            assert!(n > 0 && n <= buf.len(), "a frame uses some of what is there");
            buf.drain(..n);
            got.extend(ev);
        }
    }
    Ok(got)
}

/// Valid streams of client frames (data messages, some fragmented, with pings between), then
/// mutated: the reader never panics, a valid stream reads back to its messages however it is
/// chunked, and any input gives the same outcome whole or byte by byte.
#[test]
fn fuzz_ws_reader() {
    let budget = Budget::from_env();
    let mut rng = Rng::new(seed(5));
    let mut f = Findings::default();
    let started = Instant::now();
    let mut i = 0;
    while budget.go(i * 10) {
        i += 1;
        let mask = [rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8];
        let (mut wire, mut want) = (Vec::new(), Vec::new());
        for _ in 0..1 + rng.below(6) {
            if rng.one_in(4) {
                let n = rng.below(126);
                let p = rng.bytes(n);
                wire.extend(ws::client_frame(0x89, mask, &p));
                want.push(ws::Event::Ping(p));
                continue;
            }
            let text = rng.one_in(2);
            let n = rng.below(if text { 300 } else { 20_000 });
            let body: Vec<u8> = if text { (0..n).map(|_| b' ' + rng.below(90) as u8).collect() } else { rng.bytes(n) };
            let parts = 1 + rng.below(3);
            let cut = body.len() / parts;
            for k in 0..parts {
                let piece = if k + 1 == parts { &body[k * cut..] } else { &body[k * cut..(k + 1) * cut] };
                let op = if k > 0 { 0 } else if text { 1 } else { 2 };
                let fin = if k + 1 == parts { 0x80 } else { 0 };
                wire.extend(ws::client_frame(fin | op, mask, piece));
            }
            want.push(if body.len() > ws::MAX_CLIENT_MESSAGE {
                ws::Event::Close(None) // marker: the stream must fail with 1009 here
            } else {
                ws::Event::Message(if text { ws::Opcode::Text } else { ws::Opcode::Binary }, body.len())
            });
        }
        let too_big = want.iter().position(|e| *e == ws::Event::Close(None));
        let whole = guarded(&mut f, "no panic", &wire, || ws_read(&wire, &mut || usize::MAX));
        let mut chunk = || 1 + Rng::new(seed(i)).below(50);
        let chunked = guarded(&mut f, "no panic", &wire, || ws_read(&wire, &mut chunk));
        match (&whole, too_big) {
            (Some(Err(e)), Some(k)) if e.0 == ws::CLOSE_TOO_BIG && k < want.len() => {}
            (Some(Ok(got)), None) if *got == want => {}
            (Some(other), _) => f.add("valid frames read back to their messages", &wire, format!("{other:?}")),
            (None, _) => {}
        }
        if whole.as_ref().map(|r| r.as_ref().map_err(|e| *e)) != chunked.as_ref().map(|r| r.as_ref().map_err(|e| *e)) {
            f.add("chunking does not change the outcome", &wire, String::new());
        }
        let bad = mutate(&mut rng, wire, &[&[0x80], &[0x81], &[0x88], &[0xff], &[0x7f]]);
        let a = guarded(&mut f, "no panic", &bad, || ws_read(&bad, &mut || usize::MAX));
        let b = guarded(&mut f, "no panic", &bad, || ws_read(&bad, &mut || 1));
        if a.as_ref().map(|r| r.as_ref().map_err(|e| *e)) != b.as_ref().map(|r| r.as_ref().map_err(|e| *e)) {
            f.add("byte by byte reads as whole", &bad, format!("{a:?} vs {b:?}"));
        }
    }
    f.finish("ws::Reader", i, started);
}
