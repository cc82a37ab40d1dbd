//! EventSource and WebSocket subscribers (`docs/protocol.md`, "Streams"), over raw sockets: the
//! event stream's bytes, the WebSocket handshake and frames, resume by id, endings (delete,
//! session close, kick, shutdown), keep-alives, bad client frames, and what a long-poll has that
//! a stream has too (private channels, presence, joins, counts, the slow-reader cap).

use crate::common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// An open event stream: the response head, then the body as it comes.
struct Sse {
    stream: TcpStream,
    head: String,
    buf: Vec<u8>,
}

impl Sse {
    fn open(d: &Daemon, target: &str, headers: &[(&str, &str)]) -> Sse {
        let mut all = vec![("Accept", "text/event-stream")];
        all.extend_from_slice(headers);
        let mut stream = TcpStream::connect(d.browser).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.write_all(get(target, &all).as_bytes()).unwrap();
        let mut s = Sse { stream, head: String::new(), buf: Vec::new() };
        let end = loop {
            if let Some(i) = s.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            s.fill().expect("the stream's head");
        };
        s.head = String::from_utf8_lossy(&s.buf[..end]).into_owned();
        s.buf.drain(..end);
        s
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next block (up to a blank line), without its final blank line.
    fn block(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let b = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return b;
            }
            match self.fill() {
                Ok(0) => panic!("stream closed; left: {:?}", String::from_utf8_lossy(&self.buf)),
                Ok(_) => {}
                Err(e) => panic!("no event: {e}; left: {:?}", String::from_utf8_lossy(&self.buf)),
            }
        }
    }

    /// The next message event, as (id, data lines joined by `\n`), passing keep-alives over.
    fn event(&mut self) -> (String, String) {
        loop {
            let b = self.block();
            if b.starts_with(':') {
                continue;
            }
            let id = b.lines().find_map(|l| l.strip_prefix("id: ")).unwrap_or_else(|| panic!("no id in {b:?}")).to_string();
            let data: Vec<&str> = b.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            return (id, data.join("\n"));
        }
    }

    /// Reads until the server closes; returns what came.
    fn rest(&mut self) -> String {
        while let Ok(n) = self.fill() {
            if n == 0 {
                break;
            }
        }
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
    }
}

/// An open WebSocket.
struct Ws {
    stream: TcpStream,
    head: String,
    buf: Vec<u8>,
}

/// A masked client frame.
fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    comet::ws::client_frame(b0, [9, 0x81, 0x40, 0xee], payload)
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

impl Ws {
    fn handshake(d: &Daemon, target: &str, headers: &[(&str, &str)]) -> (TcpStream, String, Vec<u8>) {
        let host = d.browser.to_string();
        let mut all = vec![("Host", host.as_str()), ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")];
        all.extend_from_slice(headers);
        let mut stream = TcpStream::connect(d.browser).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.write_all(get(target, &all).as_bytes()).unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).expect("the handshake's answer");
            assert!(n > 0, "closed during the handshake: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        (stream, head, buf)
    }

    fn open(d: &Daemon, target: &str, headers: &[(&str, &str)]) -> Ws {
        let (stream, head, buf) = Ws::handshake(d, target, headers);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        Ws { stream, head, buf }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next frame: (opcode, payload); None once the server closed the connection.
    fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (b0, b1) = (self.buf[0], self.buf[1]);
                assert_eq!(b1 & 0x80, 0, "server frames are not masked");
                assert_eq!(b0 & 0x80, 0x80, "server frames are not fragmented");
                let (len, at) = match b1 & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((b0 & 0x0f, payload));
                }
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("no frame: {e}"),
            }
        }
    }

    /// The next data frame's payload as text, answering the server's Pings on the way.
    fn message(&mut self) -> String {
        loop {
            let (op, payload) = self.frame().expect("a message, not a close");
            match op {
                9 => self.send(&client_frame(0x8a, &payload)),
                1 | 2 => return String::from_utf8_lossy(&payload).into_owned(),
                other => panic!("unexpected frame {other}: {payload:?}"),
            }
        }
    }

    /// The Close frame the server sends next (passing data frames and Pings over): its code and reason.
    fn close(&mut self) -> (u16, String) {
        loop {
            match self.frame() {
                Some((8, p)) => return (u16::from_be_bytes([p[0], p[1]]), String::from_utf8_lossy(&p[2..]).into_owned()),
                Some(_) => continue,
                None => panic!("closed without a Close frame"),
            }
        }
    }

    /// True when the server closed the connection (reads until it does, within the read timeout).
    fn ends(&mut self) -> bool {
        loop {
            match self.frame() {
                None => return true,
                Some(_) => continue,
            }
        }
    }
}

/// The id `<time>:<tag>` of the long-poll answer to `GET /sub/<ch>` with cursor `after`.
fn longpoll_id(d: &Daemon, ch: &str, after: Option<&str>) -> (String, String) {
    let q = after.map(|a| format!("?last_event_id={a}")).unwrap_or_default();
    let r = d.browser().request(&get(&format!("/sub/{ch}{q}"), &[]));
    assert_eq!(r.status, 200, "{r}");
    let (t, tag) = r.message_id();
    (format!("{t}:{tag}"), r.text())
}

fn config() -> Config {
    Config::default().set("browser", "stream_ping_secs", "0")
}

// ---- EventSource ----

#[test]
fn an_event_stream_gets_the_backlog_then_each_message_with_long_polls_ids() {
    let d = Daemon::start_with(&config());
    d.publish("goods", "first");
    d.publish("goods", "two\nlines");
    let mut s = Sse::open(&d, "/sub/goods", &[]);
    assert!(s.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", s.head);
    for line in ["Content-Type: text/event-stream; charset=utf-8", "Cache-Control: no-cache, no-store", "X-Accel-Buffering: no"] {
        assert!(s.head.contains(line), "{line} in {}", s.head);
    }
    assert!(!s.head.to_ascii_lowercase().contains("content-length"), "{}", s.head);
    assert_eq!(s.block(), ": hi");
    let (id1, data1) = s.event();
    let (id2, data2) = s.event();
    assert_eq!((data1.as_str(), data2.as_str()), ("first", "two\nlines"), "a body with newlines arrives unchanged");
    // The same cursor as long-poll's Last-Modified + Etag.
    assert_eq!(longpoll_id(&d, "goods", None), (id1.clone(), "first".into()));
    assert_eq!(longpoll_id(&d, "goods", Some(&id1)).0, id2);
    assert_eq!(d.publish("goods", "live"), 1, "the open stream counts as a subscriber");
    let (id3, data3) = s.event();
    assert_eq!(data3, "live");
    assert_eq!(longpoll_id(&d, "goods", Some(&id2)).0, id3);
    assert_eq!(d.publish("goods", ""), 1);
    assert_eq!(s.event().1, "", "an empty body is one empty data line");
}

#[test]
fn an_event_stream_resumes_after_its_id_and_the_header_beats_the_query() {
    let d = Daemon::start_with(&config());
    for i in 0..5 {
        d.publish("goods", &format!("m{i}"));
    }
    let (id0, _) = longpoll_id(&d, "goods", None);
    let (id1, _) = longpoll_id(&d, "goods", Some(&id0));
    let (id2, _) = longpoll_id(&d, "goods", Some(&id1));
    let mut s = Sse::open(&d, &format!("/sub/goods?last_event_id={id0}"), &[("Last-Event-ID", &id2)]);
    s.block();
    assert_eq!(s.event().1, "m3");
    assert_eq!(s.event().1, "m4");
    let mut q = Sse::open(&d, &format!("/sub/goods?last_event_id={id1}"), &[]);
    q.block();
    assert_eq!(q.event().1, "m2", "the query argument when there is no header");
    // A bad id is refused before any stream starts.
    let r = d.browser().request(&get("/sub/goods", &[("Accept", "text/event-stream"), ("Last-Event-ID", "nope")]));
    assert_eq!(r.status, 400, "{r}");
}

#[test]
fn an_event_stream_with_a_cursor_older_than_the_buffer_says_so() {
    let d = Daemon::start_with(&config().set("channels", "buffer_length", "2"));
    for i in 0..4 {
        d.publish("goods", &format!("m{i}"));
    }
    let mut s = Sse::open(&d, "/sub/goods?last_event_id=1:0", &[]);
    assert!(s.head.contains("X-Comet-Skipped: 1\r\n"), "{}", s.head);
    s.block();
    assert_eq!(s.event().1, "m2");
}

#[test]
fn an_event_stream_ends_with_a_close_event_on_delete_session_close_and_kick() {
    let d = Daemon::start_with(&config());
    let mut s = Sse::open(&d, "/sub/goods", &[]);
    s.block();
    let mut admin = d.admin();
    let r = admin.request(&request("DELETE", "/pub?id=goods", &[("Authorization", &format!("Bearer {TOKEN}"))], ""));
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(s.rest(), "event: close\ndata: 410 channel deleted\n\n");

    let mut b = d.backend();
    for (sid, how, why) in [("sA", "SESSION.CLOSE", "410 session closed"), ("sB", "KICK", "410 session kicked")] {
        assert_eq!(b.cmd(&["SESSION.OPEN", sid]).to_string(), "+OK");
        let cookie = format!("PHPSESSID={sid}");
        let mut s = Sse::open(&d, "/sub/@me", &[("Cookie", &cookie)]);
        s.block();
        b.cmd(&[how, sid]);
        assert_eq!(s.rest(), format!("event: close\ndata: {why}\n\n"), "{how}");
    }
}

#[test]
fn an_idle_event_stream_gets_keep_alive_comments() {
    let d = Daemon::start_with(&Config::default().set("browser", "stream_ping_secs", "1"));
    let mut s = Sse::open(&d, "/sub/goods", &[]);
    assert_eq!(s.block(), ": hi");
    let t = Instant::now();
    assert_eq!(s.block(), ":");
    assert_eq!(s.block(), ":");
    assert!(t.elapsed() >= Duration::from_millis(1500), "one a second, not a flood");
    d.publish("goods", "still here");
    assert_eq!(s.event().1, "still here");
}

#[test]
fn an_event_stream_has_cors_a_private_channel_and_access_refusals_before_it_starts() {
    let d = Daemon::start_with(&config());
    let s = Sse::open(&d, "/sub/goods", &[("Origin", "http://site.test")]);
    assert!(s.head.contains("Access-Control-Allow-Origin: http://site.test\r\n"), "{}", s.head);
    assert!(s.head.contains("Access-Control-Allow-Credentials: true\r\n"), "{}", s.head);
    // @me needs an open session; another session's channel is refused.
    let r = d.browser().request(&get("/sub/@me", &[("Accept", "text/event-stream"), ("Cookie", "PHPSESSID=sX")]));
    assert_eq!(r.status, 403, "{r}");
    d.backend().cmd(&["SESSION.OPEN", "sX"]);
    let r = d.browser().request(&get("/sub/session:sX", &[("Accept", "text/event-stream"), ("Cookie", "PHPSESSID=sY")]));
    assert_eq!(r.status, 403, "{r}");
    let mut me = Sse::open(&d, "/sub/@me", &[("Cookie", "PHPSESSID=sX")]);
    me.block();
    assert_eq!(d.publish("session:sX", "private"), 1);
    assert_eq!(me.event().1, "private");
}

#[test]
fn a_signed_key_opens_a_stream_in_key_mode() {
    let d = Daemon::start_with(&config().set("auth", "mode", "\"key\"").set("auth", "key_secret", "\"0123456789abcdef0123\""));
    let r = d.browser().request(&get("/sub/goods", &[("Accept", "text/event-stream")]));
    assert_eq!(r.status, 403, "no key: {r}");
    let signed = d.backend().cmd(&["SIGN", "goods"]).to_string();
    let q = signed.trim_start_matches('$');
    let mut s = Sse::open(&d, &format!("/sub/goods?{q}"), &[]);
    assert!(s.head.starts_with("HTTP/1.1 200"), "{}", s.head);
    s.block();
    d.publish("goods", "signed");
    assert_eq!(s.event().1, "signed");
}

// ---- WebSocket ----

#[test]
fn a_websocket_handshake_and_nchans_meta_frames() {
    let d = Daemon::start_with(&config());
    d.publish("goods", "before");
    let mut w = Ws::open(&d, "/sub/goods", &[("Sec-WebSocket-Protocol", "ws+meta.nchan")]);
    assert!(w.head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{}", w.head);
    assert!(w.head.contains("Sec-WebSocket-Protocol: ws+meta.nchan\r\n"), "{}", w.head);
    let (id, _) = longpoll_id(&d, "goods", None);
    assert_eq!(w.message(), format!("id: {id}\ncontent-type: text/plain; charset=utf-8\n\nbefore"));
    assert_eq!(d.publish("goods", "a\nb"), 1);
    let m = w.message();
    assert!(m.starts_with("id: ") && m.ends_with("\n\na\nb"), "{m:?}");
}

#[test]
fn websocket_frame_forms_plain_comet_and_binary() {
    let d = Daemon::start_with(&config());
    let mut plain = Ws::open(&d, "/sub/goods", &[]);
    assert!(!plain.head.contains("Sec-WebSocket-Protocol"), "{}", plain.head);
    let mut comet = Ws::open(&d, "/sub/goods", &[("Sec-WebSocket-Protocol", "chat, ws+meta.comet")]);
    assert!(comet.head.contains("Sec-WebSocket-Protocol: ws+meta.comet\r\n"), "{}", comet.head);
    assert_eq!(d.publish("goods", "hello"), 2);
    assert_eq!(plain.message(), "hello");
    let m = comet.message();
    assert!(m.contains("\nchannel: goods\n\nhello"), "{m:?}");
    // application/octet-stream goes out as a binary frame.
    let mut admin = d.admin();
    let r = admin.request(&request(
        "POST",
        "/pub?id=goods",
        &[("Authorization", &format!("Bearer {TOKEN}")), ("Content-Type", "application/octet-stream")],
        "\u{1}\u{2}",
    ));
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(plain.frame(), Some((2, vec![1, 2])));
}

#[test]
fn websocket_resume_from_last_event_id() {
    let d = Daemon::start_with(&config());
    for i in 0..3 {
        d.publish("goods", &format!("m{i}"));
    }
    let (id0, _) = longpoll_id(&d, "goods", None);
    let mut w = Ws::open(&d, &format!("/sub/goods?last_event_id={id0}"), &[]);
    assert_eq!(w.message(), "m1");
    assert_eq!(w.message(), "m2");
}

#[test]
fn websocket_pings_both_ways() {
    let d = Daemon::start_with(&Config::default().set("browser", "stream_ping_secs", "1"));
    let mut w = Ws::open(&d, "/sub/goods", &[]);
    w.send(&client_frame(0x89, b"are you there"));
    assert_eq!(w.frame(), Some((10, b"are you there".to_vec())), "a Pong with the Ping's payload");
    // The server's Ping, answered: the socket stays open.
    assert_eq!(w.frame().map(|f| f.0), Some(9));
    w.send(&client_frame(0x8a, b""));
    assert_eq!(w.frame().map(|f| f.0), Some(9), "a second Ping after a Pong");
    // Not answered: closed by the next one.
    let t = Instant::now();
    assert!(w.ends());
    assert!(t.elapsed() >= Duration::from_millis(500), "{:?}", t.elapsed());
}

#[test]
fn websocket_close_codes_for_delete_session_close_kick_and_the_clients_close() {
    let d = Daemon::start_with(&config());
    let mut w = Ws::open(&d, "/sub/goods", &[]);
    let mut admin = d.admin();
    admin.request(&request("DELETE", "/pub?id=goods", &[("Authorization", &format!("Bearer {TOKEN}"))], ""));
    assert_eq!(w.close(), (1001, "410 Gone: channel deleted".into()));
    assert!(w.ends());
    let mut b = d.backend();
    for (sid, how, why) in [("sA", "SESSION.CLOSE", "410 Gone: session closed"), ("sB", "KICK", "410 Gone: session kicked")] {
        b.cmd(&["SESSION.OPEN", sid]);
        let cookie = format!("PHPSESSID={sid}");
        let mut w = Ws::open(&d, "/sub/@me", &[("Cookie", &cookie)]);
        b.cmd(&[how, sid]);
        assert_eq!(w.close(), (1001, why.into()), "{how}");
    }
    let mut w = Ws::open(&d, "/sub/goods", &[]);
    w.send(&client_frame(0x88, &[0x0f, 0xa0]));
    assert_eq!(w.close().0, 4000, "the client's code echoed");
    assert!(w.ends());
}

#[test]
fn bad_client_frames_close_that_websocket_only() {
    let d = Daemon::start_with(&config());
    let mut bystander = Ws::open(&d, "/sub/goods", &[]);
    let mut big = client_frame(0x82, &vec![0; 16 * 1024 + 1]);
    big.truncate(20); // the header says it all
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (vec![0x81, 0x02, b'h', b'i'], 1002),
        (client_frame(0x81, &[0xc3, 0x28]), 1007),
        (big, 1009),
        (client_frame(0x83, b""), 1002),
        ([client_frame(0x01, b"a"), client_frame(0x81, b"b")].concat(), 1002),
    ];
    for (bytes, code) in cases {
        let mut w = Ws::open(&d, "/sub/goods", &[]);
        w.send(&client_frame(0x81, b"text frames are read and ignored"));
        w.send(&bytes);
        assert_eq!(w.close().0, code, "{:02x?}", &bytes[..4]);
        assert!(w.ends());
    }
    assert_eq!(d.publish("goods", "still delivered"), 1);
    assert_eq!(bystander.message(), "still delivered");
}

#[test]
fn websocket_handshakes_that_are_refused() {
    let d = Daemon::start_with(&config());
    let mut c = d.browser();
    let r = c.request(&get("/sub/goods", &[("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "8")]));
    assert_eq!(r.status, 426, "{r}");
    assert_eq!(r.header("Sec-WebSocket-Version"), Some("13"));
    let r = d.browser().request(&get("/sub/goods", &[("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]));
    assert_eq!(r.status, 400, "no key: {r}");
    // Another site's page: refused (its cookie would otherwise open the visitor's channels).
    let (_, head, _) = Ws::handshake(&d, "/sub/goods", &[("Origin", "http://evil.test")]);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let ok = Ws::open(&d, "/sub/goods", &[("Origin", "http://site.test")]);
    assert!(ok.head.starts_with("HTTP/1.1 101"));
    let own = format!("http://{}", d.browser);
    assert!(Ws::open(&d, "/sub/goods", &[("Origin", &own)]).head.starts_with("HTTP/1.1 101"), "the page's own host");
    let r = d.browser().request(&get("/sub/@me", &[("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]));
    assert_eq!(r.status, 403, "{r}");
}

// ---- what a stream shares with a poll ----

#[test]
fn streams_count_as_online_get_join_copies_and_show_in_info_and_metrics() {
    let d = Daemon::start_with(&config().set("presence", "grace_secs", "1"));
    let mut b = d.backend();
    b.cmd(&["SESSION.OPEN", "sW", "7"]);
    let mut events = d.backend();
    events.cmd(&["SUBSCRIBE", "__presence__"]);
    let mut w = Ws::open(&d, "/sub/@me", &[("Cookie", "PHPSESSID=sW"), ("Sec-WebSocket-Protocol", "ws+meta.comet")]);
    let mut s = Sse::open(&d, "/sub/goods", &[("Cookie", "PHPSESSID=sE")]);
    s.block();
    let online = b.cmd(&["ONLINE"]).to_string();
    assert!(online.contains("sW") && online.contains("sE"), "{online}");
    assert_eq!(b.cmd(&["JOIN", "sW", "goods"]).to_string(), ":1");
    assert_eq!(d.publish("goods", "bid"), 2, "the stream on goods and the copy on sW's channel");
    assert!(w.message().contains("\nchannel: goods\n\nbid"), "a joined channel's copy names its channel");
    assert_eq!(s.event().1, "bid");
    let info = d.info();
    assert_eq!((info["eventsource_streams"].as_str(), info["websocket_streams"].as_str(), info["held_polls"].as_str()), ("1", "1", "0"));
    let m = d.admin().request(&get("/metrics", &[("Authorization", &format!("Bearer {TOKEN}"))]));
    let text = m.text();
    for line in ["comet_streams{transport=\"eventsource\"} 1", "comet_streams{transport=\"websocket\"} 1", "comet_deliveries_total{transport=\"websocket\"} 1", "comet_deliveries_total{transport=\"eventsource\"} 1"] {
        assert!(text.contains(line), "{line} in /metrics");
    }
    // Closing the stream starts the grace: offline a second later, not at once.
    drop(s);
    let t = Instant::now();
    loop {
        let online = b.cmd(&["ONLINE"]).to_string();
        if !online.contains("sE") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(4), "still online: {online}");
        std::thread::sleep(ms(50));
    }
    assert!(t.elapsed() >= Duration::from_millis(700), "offline only after the grace: {:?}", t.elapsed());
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &String| e.contains("offline sE")) {
        seen.push(events.reply().to_string());
    }
    assert!(seen.iter().any(|e| e.contains("online sW 7")), "{seen:?}");
    assert!(seen.iter().any(|e| e.contains("online sE")), "{seen:?}");
    assert!(d.info()["eventsource_streams"] == "0");
}

#[test]
fn a_stream_that_stops_reading_is_cut_as_a_slow_reader() {
    let d = Daemon::start_with(&config().set("limits", "max_message_bytes", "65536").set("limits", "max_output_bytes", "131072"));
    let mut w = Ws::open(&d, "/sub/goods", &[]);
    let s = TcpStream::connect(d.browser).unwrap();
    // A raw subscriber that never reads: its kernel buffers fill, then comet's queue.
    (&s).write_all(get("/sub/goods", &[("Accept", "text/event-stream")]).as_bytes()).unwrap();
    let body = "x".repeat(60_000);
    let mut b = d.backend();
    let t = Instant::now();
    loop {
        b.cmd(&["PUBLISH", "goods", &body]);
        if d.info()["slow_readers_cut"] == "1" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never cut");
        // The reading WebSocket keeps up.
        assert_eq!(w.message().len(), body.len());
    }
    assert_eq!(d.info()["eventsource_streams"], "0");
    drop(s);
}

#[test]
fn shutdown_ends_streams_with_503() {
    let mut d = Daemon::start_with(&config());
    let mut s = Sse::open(&d, "/sub/goods", &[]);
    s.block();
    let mut w = Ws::open(&d, "/sub/goods", &[]);
    d.sigterm();
    assert_eq!(s.rest(), "event: close\ndata: 503 shutting down\n\n");
    assert_eq!(w.close(), (1001, "503 Service Unavailable: shutting down".into()));
    assert!(d.wait_exit(Duration::from_secs(5)).is_some());
}

#[test]
fn websocket_frames_sent_with_the_handshake_are_read() {
    let d = Daemon::start_with(&config());
    let host = d.browser.to_string();
    let mut raw = get("/sub/goods", &[("Host", &host), ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]).into_bytes();
    raw.extend(client_frame(0x89, b"early"));
    let mut stream = TcpStream::connect(d.browser).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.write_all(&raw).unwrap();
    let mut w = Ws { stream, head: String::new(), buf: Vec::new() };
    let mut all = Vec::new();
    while !all.windows(4).any(|x| x == b"\r\n\r\n") {
        let mut b = [0u8; 1];
        w.stream.read_exact(&mut b).unwrap();
        all.push(b[0]);
    }
    w.head = String::from_utf8_lossy(&all).into_owned();
    assert!(w.head.starts_with("HTTP/1.1 101"), "{}", w.head);
    assert_eq!(w.frame(), Some((10, b"early".to_vec())), "the Ping that came with the handshake is answered");
}
