//! The Mercure hub (`docs/mercure.md`) over raw sockets, and with Symfony's own client: publish
//! and its refusals, subscribe with strings, URIs and URI templates, private updates, resume,
//! one channel space with comet's channels, subscription events and the subscriptions API.

use crate::common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

/// The reference hub's example key (its conformance suite signs with it).
const KEY: &str = "!ChangeThisMercureHubJWTSecretKey!";
/// The conformance suite's token: publish and subscribe `*`, HS256 with `KEY`.
pub(crate) const ALL: &str = "eyJhbGciOiJIUzI1NiJ9.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdLCJzdWJzY3JpYmUiOlsiKiJdfX0.bVXdlWXwfw9ySx7-iV5OpUSHo34RkjUdVzDLBcc6l_g";

fn config() -> Config {
    with_mercure(Config::default())
}

/// `c` with the hub on (the example key, anonymous subscribers, subscriptions, history 5).
pub(crate) fn with_mercure(c: Config) -> Config {
    let q = |s: &str| format!("\"{s}\"");
    c.set("mercure", "publisher_jwt_key", &q(KEY))
        .set("mercure", "subscriber_jwt_key", &q(KEY))
        .set("mercure", "anonymous", "true")
        .set("mercure", "subscriptions", "true")
        .set("mercure", "history", "5")
}

/// A token with `claims`, signed with `key` (HS256).
fn token(claims: serde_json::Value, key: &str) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(key.as_bytes())).unwrap()
}

fn form(fields: &[(&str, &str)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect::<Vec<_>>().join("&")
}

fn enc(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

pub(crate) fn publish(d: &Daemon, jwt: Option<&str>, fields: &[(&str, &str)]) -> Response {
    let body = form(fields);
    let auth = jwt.map(|t| format!("Bearer {t}"));
    let mut h = vec![("Content-Type", "application/x-www-form-urlencoded")];
    if let Some(a) = &auth {
        h.push(("Authorization", a));
    }
    d.browser().request(&request("POST", "/.well-known/mercure", &h, &body))
}

/// An open subscriber: its head, then its bytes as they come.
pub(crate) struct Sub {
    s: TcpStream,
    head: String,
    buf: Vec<u8>,
}

impl Sub {
    pub(crate) fn open(d: &Daemon, query: &str, headers: &[(&str, &str)]) -> Sub {
        let mut s = TcpStream::connect(d.browser).unwrap();
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        s.write_all(get(&format!("/.well-known/mercure?{query}"), headers).as_bytes()).unwrap();
        let mut sub = Sub { s, head: String::new(), buf: Vec::new() };
        sub.until(b"\r\n\r\n");
        let i = sub.buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        sub.head = String::from_utf8_lossy(&sub.buf[..i]).into_owned();
        sub.buf.drain(..i);
        sub
    }

    fn until(&mut self, what: &[u8]) {
        while !self.buf.windows(what.len()).any(|w| w == what) {
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("closed; got {:?}", String::from_utf8_lossy(&self.buf)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("waiting for {:?}: {e}; got {:?}", String::from_utf8_lossy(what), String::from_utf8_lossy(&self.buf)),
            }
        }
    }

    /// The next event (comments passed over), without its blank line.
    pub(crate) fn event(&mut self) -> String {
        loop {
            self.until(b"\n\n");
            let i = self.buf.windows(2).position(|w| w == b"\n\n").unwrap();
            let block = String::from_utf8_lossy(&self.buf[..i]).into_owned();
            self.buf.drain(..i + 2);
            let block: String = block.lines().filter(|l| !l.starts_with(':')).collect::<Vec<_>>().join("\n");
            if !block.is_empty() {
                return block;
            }
        }
    }

    /// Nothing but comments arrives for `d`.
    pub(crate) fn nothing(&mut self, d: std::time::Duration) {
        self.s.set_read_timeout(Some(d)).unwrap();
        let mut chunk = [0u8; 8192];
        if let Ok(n) = self.s.read(&mut chunk) {
            let got = String::from_utf8_lossy(&chunk[..n]).into_owned();
            assert!(got.lines().all(|l| l.is_empty() || l.starts_with(':')), "expected nothing, got {got:?}");
        }
        self.s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    }
}

#[test]
fn updates_reach_matching_subscribers_framed_as_the_reference_hub() {
    let d = Daemon::start_with(&config());
    let mut s = Sub::open(&d, "topic=https%3A%2F%2Fexample.com%2Fbooks%2F%7Bid%7D&topic=raw-string", &[]);
    assert!(s.head.starts_with("HTTP/1.1 200"), "{}", s.head);
    for h in ["Content-Type: text/event-stream", "X-Accel-Buffering: no", "Cache-Control: private, no-cache, no-store, must-revalidate, max-age=0"] {
        assert!(s.head.contains(h), "lacks {h}:\n{}", s.head);
    }
    let data = "first line\n\n  indented\r\nlast";
    let r = publish(&d, Some(ALL), &[("topic", "https://example.com/books/1"), ("data", data), ("id", "id-1"), ("type", "book"), ("retry", "7")]);
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.text(), "id-1");
    assert!(r.must("Content-Type").starts_with("text/plain"), "{r}");
    assert_eq!(s.event(), "event: book\nretry: 7\nid: id-1\ndata: first line\ndata: \ndata:   indented\ndata: last");

    // Not matching (another path, a deeper one, another string), and private to an anonymous
    // subscriber: nothing. A matching alternate topic: delivered.
    for topic in ["https://example.com/authors/1", "https://example.com/books/1/reviews", "raw-strin"] {
        assert_eq!(publish(&d, Some(ALL), &[("topic", topic), ("data", "no")]).status, 200);
    }
    assert_eq!(publish(&d, Some(ALL), &[("topic", "raw-string"), ("data", "secret"), ("private", "on")]).status, 200);
    let r = publish(&d, Some(ALL), &[("topic", "other"), ("topic", "raw-string"), ("data", "alternate")]);
    let id = r.text();
    assert!(id.starts_with("urn:uuid:"), "a generated id: {id}");
    assert_eq!(s.event(), format!("id: {id}\ndata: alternate"));

    // A subscriber whose JWT allows the topic gets the private update.
    let jwt = token(serde_json::json!({"mercure": {"subscribe": ["raw-string"]}}), KEY);
    let mut p = Sub::open(&d, &format!("topic=raw-string&authorization={jwt}"), &[]);
    assert_eq!(publish(&d, Some(ALL), &[("topic", "raw-string"), ("data", "secret2"), ("private", "on"), ("id", "p2")]).status, 200);
    assert_eq!(p.event(), "id: p2\ndata: secret2");
    s.nothing(ms(200));
}

#[test]
fn refused_publishes_say_why_and_change_nothing() {
    let d = Daemon::start_with(&config());
    let mut s = Sub::open(&d, "topic=t", &[]);
    let now = now_unix();
    let expired = token(serde_json::json!({"mercure": {"publish": ["*"]}, "exp": now - 10}), KEY);
    let wrong_key = token(serde_json::json!({"mercure": {"publish": ["*"]}}), "another-key-another-key-another-key");
    let narrow = token(serde_json::json!({"mercure": {"publish": ["t"]}}), KEY);
    let none = "eyJhbGciOiJub25lIn0.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdfX0.";
    let cases: &[(Option<&str>, &[(&str, &str)], u16)] = &[
        (None, &[("topic", "t"), ("data", "x")], 401),
        (Some("garbage"), &[("topic", "t"), ("data", "x")], 401),
        (Some(&expired), &[("topic", "t"), ("data", "x")], 401),
        (Some(&wrong_key), &[("topic", "t"), ("data", "x")], 401),
        (Some(none), &[("topic", "t"), ("data", "x")], 401),
        (Some(&narrow), &[("topic", "t"), ("topic", "u"), ("data", "x")], 401),
        (Some(ALL), &[("data", "x")], 400),
        (Some(ALL), &[("topic", "t"), ("retry", "soon")], 400),
        (Some(ALL), &[("topic", "t"), ("id", "#x")], 400),
    ];
    for (jwt, fields, want) in cases {
        let r = publish(&d, *jwt, fields);
        assert_eq!(r.status, *want, "{fields:?} with {jwt:?}:\n{r}");
        assert!(!r.text().trim().is_empty(), "a refusal says why:\n{r}");
    }
    let many: Vec<(&str, &str)> = std::iter::repeat_n(("topic", "t"), 1001).collect();
    assert_eq!(publish(&d, Some(ALL), &many).status, 400);
    // Nothing of that reached the subscriber; the narrow token publishes what it covers.
    assert_eq!(publish(&d, Some(&narrow), &[("topic", "t"), ("data", "ok"), ("id", "ok")]).status, 200);
    assert_eq!(s.event(), "id: ok\ndata: ok");
    // A subscriber JWT that is bad is refused too, with anonymous on.
    let mut c = d.browser();
    let r = c.request(&get("/.well-known/mercure?topic=t&authorization=garbage", &[]));
    assert_eq!(r.status, 401, "{r}");
    let r = d.browser().request(&get("/.well-known/mercure", &[]));
    assert_eq!(r.status, 400, "no topic:\n{r}");
}

#[test]
fn resume_sends_exactly_the_missed_updates_and_an_unknown_id_never_hangs() {
    let d = Daemon::start_with(&config().set("mercure", "subscriptions", "false").set("mercure", "history", "6"));
    for i in 1..=4 {
        assert_eq!(publish(&d, Some(ALL), &[("topic", "r"), ("data", &format!("d{i}")), ("id", &format!("r{i}"))]).status, 200);
        assert_eq!(publish(&d, Some(ALL), &[("topic", "other"), ("data", "x")]).status, 200);
    }
    // History 6: r2 .. r4 and the others between them are kept; r1 is gone.
    let mut s = Sub::open(&d, "topic=r", &[("Last-Event-ID", "r3")]);
    assert!(s.head.contains("Last-Event-ID: "), "{}", s.head);
    assert_eq!(s.event(), "id: r4\ndata: d4");
    let mut q = Sub::open(&d, "topic=r&lastEventID=r2", &[]);
    assert_eq!(q.event(), "id: r3\ndata: d3");
    assert_eq!(q.event(), "id: r4\ndata: d4");
    let mut e = Sub::open(&d, "topic=r&Last-Event-ID=earliest", &[]);
    assert!(e.event().starts_with("id: r"), "earliest replays what is kept");
    let mut u = Sub::open(&d, "topic=r", &[("Last-Event-ID", "r1")]);
    assert!(u.head.contains("Last-Event-ID: earliest"), "{}", u.head);
    assert_eq!(publish(&d, Some(ALL), &[("topic", "r"), ("data", "live"), ("id", "r5")]).status, 200);
    assert_eq!(u.event(), "id: r5\ndata: live", "an unknown id gets live updates");
    assert_eq!(s.event(), "id: r5\ndata: live", "once, after the replay");
    s.nothing(ms(100));
}

#[test]
fn a_topic_is_a_channel_both_ways() {
    let d = Daemon::start_with(&config());
    let mut s = Sub::open(&d, "topic=goods", &[]);
    assert_eq!(d.publish("goods", "from resp"), 0);
    let ev = s.event();
    assert!(ev.ends_with("\ndata: from resp") && ev.starts_with("id: urn:uuid:"), "{ev}");
    let mut poll = d.browser();
    poll.send(&get("/sub/goods2", &[]));
    d.wait_held(1);
    assert_eq!(publish(&d, Some(ALL), &[("topic", "goods2"), ("data", "from mercure")]).status, 200);
    let r = poll.response();
    assert_eq!((r.status, r.text()), (200, "from mercure".to_string()), "{r}");
}

#[test]
fn subscriptions_are_announced_and_listed() {
    let d = Daemon::start_with(&config());
    let watch = token(serde_json::json!({"mercure": {"subscribe": ["/.well-known/mercure/subscriptions{/topic}{/subscriber}"]}}), KEY);
    let mut w = Sub::open(&d, &format!("topic={}&authorization={watch}", enc("/.well-known/mercure/subscriptions{/topic}{/subscriber}")), &[]);
    let who = token(serde_json::json!({"mercure": {"subscribe": [], "payload": {"user": 7}}}), KEY);
    let s = Sub::open(&d, "topic=chat", &[("Authorization", &format!("Bearer {who}"))]);
    // The watcher's own subscription is announced first (to it as well).
    let mut ev = w.event();
    while !ev.contains("\"topic\":\"chat\"") {
        ev = w.event();
    }
    assert!(ev.contains("\"type\":\"Subscription\"") && ev.contains("\"active\":true") && ev.contains("\"topic\":\"chat\"") && ev.contains("\"user\":7"), "{ev}");
    let r = d.browser().request(&get("/.well-known/mercure/subscriptions/chat", &[("Authorization", &format!("Bearer {watch}"))]));
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.must("Content-Type"), "application/ld+json");
    let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(v["type"], "Subscriptions");
    assert_eq!(v["subscriptions"].as_array().map(|a| a.len()), Some(1), "{v}");
    let r = d.browser().request(&get("/.well-known/mercure/subscriptions", &[]));
    assert_eq!(r.status, 401, "the API needs a subscriber JWT:\n{r}");
    drop(s);
    let ev = w.event();
    assert!(ev.contains("\"active\":false"), "{ev}");
}

#[test]
fn symfony_mercure_publishes_public_and_private_updates() {
    let autoload = "/usr/share/php/Symfony/Component/Mercure/autoload.php";
    assert!(std::path::Path::new(autoload).exists(), "php-symfony-mercure is missing (scripts/test installs it)");
    let d = Daemon::start_with(&config().set("mercure", "subscriptions", "false"));
    let mut s = Sub::open(&d, "topic=https%3A%2F%2Fexample.com%2Fbooks%2F%7Bid%7D", &[]);
    let jwt = token(serde_json::json!({"mercure": {"subscribe": ["*"]}}), KEY);
    let mut p = Sub::open(&d, &format!("topic=*&authorization={jwt}"), &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/php/mercure_publish.php");
    let url = format!("http://{}/.well-known/mercure", d.browser);
    let out = Command::new("php").arg(script).args([url.as_str(), ALL]).output().expect("run php");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "php failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().collect::<Vec<_>>(), ["book-1", "secret-1"], "the ids the hub answered");
    assert_eq!(s.event(), "event: update\nretry: 3000\nid: book-1\ndata: {\"title\":\"Dune\"}");
    assert_eq!(p.event(), "event: update\nretry: 3000\nid: book-1\ndata: {\"title\":\"Dune\"}");
    assert_eq!(p.event(), "id: secret-1\ndata: private");
    s.nothing(ms(200));
}
