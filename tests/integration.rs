//! Integration tests: each test starts the real `comet` binary on ephemeral ports (see
//! `common::Daemon`) and checks it against `docs/protocol.md` over real sockets: browsers over
//! raw HTTP/1.1, backends over raw RESP2 and the real `redis-cli` and PHP + phpredis, the admin
//! publisher endpoint, the command line and shutdown.
//!
//! Tests are grouped like the protocol document: subscribe and cursors, admin, private channels,
//! CORS, connections, control socket, limits, command line, shutdown, real clients.

mod common;
#[path = "integration/auth.rs"] mod auth;
#[path = "integration/presence.rs"] mod presence;
#[path = "integration/ops.rs"] mod ops;
#[path = "integration/store.rs"] mod store;
#[path = "integration/faults.rs"] mod faults;
#[path = "integration/fuzz.rs"] mod fuzz;
#[path = "integration/hardening.rs"] mod hardening;
#[path = "integration/streams.rs"] mod streams;
#[path = "integration/cluster.rs"] mod cluster;
#[path = "integration/refusals.rs"] mod refusals;
#[path = "integration/mercure.rs"] mod mercure;

use common::*;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// Opens a browser connection and sends `GET target` with `headers`, without reading.
fn hold(d: &Daemon, target: &str, headers: &[(&str, &str)]) -> Http {
    let mut c = d.browser();
    c.send(&get(target, headers));
    c
}

/// Asserts the headers every `200` message response carries (docs/protocol.md, Subscribe).
fn assert_message(r: &Response, body: &str, content_type: &str) {
    assert_eq!(r.status, 200, "expected 200 with {body:?}:\n{r}");
    assert_eq!(r.text(), body, "body:\n{r}");
    assert_eq!(r.must("Content-Type"), content_type, "Content-Type:\n{r}");
    assert_eq!(r.must("Content-Length"), body.len().to_string());
    assert!(parse_http_date(r.must("Last-Modified")).is_some(), "Last-Modified not an HTTP date:\n{r}");
    let etag = r.must("Etag");
    assert!(etag.parse::<u64>().is_ok(), "Etag {etag:?} is not a bare number:\n{r}");
    assert_eq!(r.must("Cache-Control"), "no-cache, no-store", "Cache-Control:\n{r}");
    let vary = r.header_tokens("Vary");
    assert!(
        vary.contains(&"if-none-match".to_string()) && vary.contains(&"if-modified-since".to_string()),
        "Vary must name If-None-Match and If-Modified-Since:\n{r}"
    );
}

fn assert_text_message(r: &Response, body: &str) {
    assert_message(r, body, "text/plain; charset=utf-8");
}

/// The cursor headers to re-poll after `r`.
fn after(r: &Response) -> [(String, String); 2] {
    let (lm, etag) = r.cursor();
    [("If-Modified-Since".into(), lm), ("If-None-Match".into(), etag)]
}

fn get_after(target: &str, r: &Response) -> String {
    let h = after(r);
    get(target, &[(&h[0].0, &h[0].1), (&h[1].0, &h[1].1)])
}

/// A held poll on `/sub/bystander`, to check that something else does not disturb it.
struct Bystander(Http);

impl Bystander {
    fn new(d: &Daemon) -> Bystander {
        let mut c = hold(d, "/sub/bystander", &[]);
        d.wait_held(1);
        c.expect_nothing(ms(50));
        Bystander(c)
    }

    /// Publishes to the bystander's channel and checks it got the message on its connection.
    fn still_served(mut self, d: &Daemon) {
        assert_eq!(d.publish("bystander", "still-here"), 1, "the held bystander poll was lost");
        let r = self.0.response();
        assert_text_message(&r, "still-here");
    }
}

// =============================================================================================
// Subscribe, publish, cursors
// =============================================================================================

#[test]
fn resp_publish_reaches_held_poll_with_cursor_headers() {
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/goods", &[]);
    d.wait_held(1);
    poll.expect_nothing(ms(100));

    let mut backend = d.control();
    assert_eq!(backend.cmd(&["AUTH", "s3cret-token"]).to_string(), "+OK");
    let before = now_unix();
    assert_eq!(backend.cmd(&["PUBLISH", "goods", "hello"]).to_string(), ":1");

    let r = poll.response();
    assert_text_message(&r, "hello");
    assert_eq!(r.version, "HTTP/1.1");
    assert_eq!(r.must("Vary"), "If-None-Match, If-Modified-Since");
    let (time, tag) = r.message_id();
    assert!(time >= before && time <= now_unix(), "Last-Modified {time} is not the publish time");
    assert_eq!(tag, 0, "first message of a channel has tag 0");
    assert!(!r.closes(), "HTTP/1.1 poll must stay open:\n{r}");

    // Nobody held now: the message is buffered and the reply is 0.
    assert_eq!(backend.cmd(&["PUBLISH", "goods", "again"]).to_string(), ":0");
}

#[test]
fn publish_with_no_subscriber_replies_zero_and_buffers() {
    let d = Daemon::start();
    assert_eq!(d.backend().cmd(&["PUBLISH", "quiet", "buffered"]).to_string(), ":0");
    let r = d.browser().request(&get("/sub/quiet", &[]));
    assert_text_message(&r, "buffered");
}

#[test]
fn publish_fans_out_to_every_held_poll() {
    let d = Daemon::start();
    let mut a = hold(&d, "/sub/fan", &[]);
    let mut b = hold(&d, "/subscribe?id=fan", &[]);
    d.wait_held(2);
    assert_eq!(d.publish("fan", "both"), 2);
    assert_text_message(&a.response(), "both");
    assert_text_message(&b.response(), "both");
}

#[test]
fn cursor_walk_returns_each_message_once_in_order() {
    let d = Daemon::start();
    let mut backend = d.backend();
    let sent: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    for m in &sent {
        assert_eq!(backend.cmd(&["PUBLISH", "walk", m]).to_string(), ":0");
    }

    let mut c = d.browser();
    let mut got = Vec::new();
    let mut ids = Vec::new();
    let mut r = c.request(&get("/sub/walk", &[]));
    loop {
        assert_text_message(&r, &sent[got.len()]);
        got.push(r.text());
        ids.push(r.message_id());
        if got.len() == sent.len() {
            break;
        }
        r = c.request(&get_after("/sub/walk", &r));
    }
    assert_eq!(got, sent);
    for w in ids.windows(2) {
        assert!(w[0] < w[1], "message ids must strictly increase: {ids:?}");
        // Within one second the tag counts up from the previous one; a new second starts at 0.
        let want = if w[1].0 == w[0].0 { w[0].1 + 1 } else { 0 };
        assert_eq!(w[1].1, want, "tag after {:?}: {ids:?}", w[0]);
    }

    // The 6th poll, same connection, is held and gets the next publish.
    c.send(&get_after("/sub/walk", &r));
    d.wait_held(1);
    c.expect_nothing(ms(100));
    assert_eq!(backend.cmd(&["PUBLISH", "walk", "m5"]).to_string(), ":1");
    let r6 = c.response();
    assert_text_message(&r6, "m5");
    assert!(r6.message_id() > *ids.last().unwrap());
}

#[test]
fn last_event_id_query_and_header_are_cursors() {
    let d = Daemon::start();
    for m in ["a", "b", "c"] {
        d.publish("ev", m);
    }
    let mut c = d.browser();
    let first = c.request(&get("/sub/ev", &[]));
    assert_text_message(&first, "a");
    let (t, tag) = first.message_id();

    let second = c.request(&get(&format!("/sub/ev?last_event_id={t}:{tag}"), &[]));
    assert_text_message(&second, "b");
    let (t2, tag2) = second.message_id();

    let id = format!("{t2}:{tag2}");
    let third = c.request(&get("/sub/ev", &[("Last-Event-ID", &id)]));
    assert_text_message(&third, "c");

    // The header wins over the query string (an EventSource reconnects to its first URL and
    // sends its newest id in the header), and the query string over If-Modified-Since.
    let r = c.request(&get(
        &format!("/subscribe?id=ev&last_event_id={t}:{tag}"),
        &[("Last-Event-ID", &id), ("If-Modified-Since", &http_date(t2)), ("If-None-Match", &tag2.to_string())],
    ));
    assert_text_message(&r, "c");
    let r = c.request(&get(
        &format!("/subscribe?id=ev&last_event_id={t}:{tag}"),
        &[("If-Modified-Since", &http_date(t2)), ("If-None-Match", &tag2.to_string())],
    ));
    assert_text_message(&r, "b");
}

#[test]
fn weak_and_quoted_etags_are_accepted_as_cursor() {
    let d = Daemon::start();
    for m in ["a", "b", "c"] {
        d.publish("tags", m);
    }
    let mut c = d.browser();
    let first = c.request(&get("/sub/tags", &[]));
    let (lm, etag) = first.cursor();
    let quoted = format!("\"{etag}\"");
    let r = c.request(&get("/sub/tags", &[("If-Modified-Since", &lm), ("If-None-Match", &quoted)]));
    assert_text_message(&r, "b");
    let (lm, etag) = r.cursor();
    let weak = format!("W/\"{etag}\"");
    let r = c.request(&get("/sub/tags", &[("If-Modified-Since", &lm), ("If-None-Match", &weak)]));
    assert_text_message(&r, "c");
}

#[test]
fn if_modified_since_without_etag_means_tag_zero() {
    let d = Daemon::start();
    let mut c = d.browser();
    // Walk until two messages share a second (they do unless a second boundary falls between).
    for attempt in 0..3 {
        let ch = format!("ims{attempt}");
        d.publish(&ch, "a");
        d.publish(&ch, "b");
        d.publish(&ch, "c");
        let a = c.request(&get(&format!("/sub/{ch}"), &[]));
        let b = c.request(&get_after(&format!("/sub/{ch}"), &a));
        let c_ = c.request(&get_after(&format!("/sub/{ch}"), &b));
        let (ta, tb, tc) = (a.message_id(), b.message_id(), c_.message_id());
        if ta.0 == tb.0 && tb.0 == tc.0 {
            assert_eq!((ta.1, tb.1, tc.1), (0, 1, 2));
            // If-Modified-Since alone is the cursor (t, 0): the answer is the message after "a".
            let lm = a.must("Last-Modified").to_string();
            let r = c.request(&get(&format!("/sub/{ch}"), &[("If-Modified-Since", &lm)]));
            assert_text_message(&r, "b");
            return;
        }
    }
    panic!("three publishes never fell in one second");
}

#[test]
fn expired_messages_are_not_served() {
    let d = Daemon::start_with(&Config::default().set("channels", "message_ttl_secs", "1"));
    d.publish("ttl", "old");
    thread::sleep(ms(2200));
    let mut poll = hold(&d, "/sub/ttl", &[]);
    poll.expect_nothing(ms(300));
    d.wait_held(1);
    assert_eq!(d.publish("ttl", "new"), 1);
    assert_text_message(&poll.response(), "new");
}

#[test]
fn many_held_polls_on_one_channel_all_get_the_message() {
    let d = Daemon::start();
    let mut polls: Vec<Http> = (0..50).map(|_| hold(&d, "/sub/crowd", &[])).collect();
    d.wait_held(50);
    assert_eq!(d.publish("crowd", "everyone"), 50);
    for p in &mut polls {
        assert_text_message(&p.response(), "everyone");
    }
}

#[test]
fn max_size_message_reaches_held_polls_intact() {
    let d = Daemon::start();
    let mut polls: Vec<Http> = (0..3).map(|_| hold(&d, "/sub/big", &[])).collect();
    d.wait_held(3);
    // 1 MiB (max_message_bytes), not a repeating pattern of a power-of-two length.
    let big: Vec<u8> = (0..1_048_576u32).map(|i| b'a' + (i % 23) as u8).collect();
    let mut b = d.backend();
    b.send_raw(&encode(&[b"PUBLISH", b"big", &big]));
    assert_eq!(b.reply().to_string(), ":3");
    for p in &mut polls {
        let r = p.response();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), big.len());
        assert!(r.body == big, "body differs from what was published");
    }
}

#[test]
fn no_cursor_gets_oldest_buffered_message() {
    let d = Daemon::start();
    d.publish("old", "first");
    d.publish("old", "second");
    let r = d.browser().request(&get("/sub/old", &[]));
    assert_text_message(&r, "first");
}

#[test]
fn first_message_newest_waits_for_next_publish() {
    let d = Daemon::start_with(&Config::default().set("browser", "first_message", "\"newest\""));
    d.publish("fresh", "stale-1");
    d.publish("fresh", "stale-2");
    let mut poll = hold(&d, "/sub/fresh", &[]);
    d.wait_held(1);
    poll.expect_nothing(ms(300));
    assert_eq!(d.publish("fresh", "new"), 1);
    assert_text_message(&poll.response(), "new");
}

#[test]
fn buffer_keeps_only_buffer_length_messages_and_old_cursor_gets_oldest() {
    let d = Daemon::start_with(&Config::default().set("channels", "buffer_length", "3"));
    let mut c = d.browser();
    d.publish("short", "m0");
    let m0 = c.request(&get("/sub/short", &[]));
    assert_text_message(&m0, "m0");
    for m in ["m1", "m2", "m3", "m4"] {
        d.publish("short", m);
    }
    // No cursor: the oldest kept is m2.
    assert_text_message(&c.request(&get("/sub/short", &[])), "m2");
    // A cursor older than everything buffered (m0's) also gets the oldest kept.
    assert_text_message(&c.request(&get_after("/sub/short", &m0)), "m2");
}

#[test]
fn cursor_ahead_of_channel_waits_for_next_publish() {
    let d = Daemon::start();
    d.publish("ahead", "before-restart");
    let future = now_unix() + 1000;
    let mut poll = hold(&d, &format!("/sub/ahead?last_event_id={future}:0"), &[]);
    d.wait_held(1);
    poll.expect_nothing(ms(200));
    assert_eq!(d.publish("ahead", "next"), 1);
    assert_text_message(&poll.response(), "next");
}

#[test]
fn percent_encoded_channel_id_is_decoded() {
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/news%3Atoday", &[]);
    d.wait_held(1);
    assert_eq!(d.publish("news:today", "decoded"), 1);
    assert_text_message(&poll.response(), "decoded");
}

#[test]
fn held_poll_times_out_with_408_echoing_cursor() {
    let d = Daemon::start_with(&Config::default().set("browser", "poll_timeout_secs", "1"));
    d.publish("slow", "only");
    let mut c = d.browser();
    let only = c.request(&get("/sub/slow", &[]));
    assert_text_message(&only, "only");
    let (lm, etag) = only.cursor();

    // With a cursor: echoed. Without (empty channel): no cursor headers.
    let mut with = hold(&d, "/sub/slow", &[("If-Modified-Since", &lm), ("If-None-Match", &etag)]);
    let mut without = hold(&d, "/sub/empty", &[]);
    let start = Instant::now();

    let r = with.response();
    let waited = start.elapsed();
    assert_eq!(r.status, 408, "expected 408:\n{r}");
    assert!(waited >= ms(800) && waited < Duration::from_millis(3500), "408 after {waited:?}, poll_timeout_secs = 1");
    assert_eq!(r.must("Last-Modified"), lm, "408 must echo the cursor time");
    assert_eq!(r.must("Etag"), etag, "408 must echo the cursor tag");
    assert!(r.header("Content-Length").is_some());

    let r = without.response();
    assert_eq!(r.status, 408, "expected 408:\n{r}");
    assert_eq!(r.header("Last-Modified"), None, "no cursor, no Last-Modified:\n{r}");
    assert_eq!(r.header("Etag"), None, "no cursor, no Etag:\n{r}");

    // The client re-polls on the same connection with the echoed cursor.
    with.send(&get("/sub/slow", &[("If-Modified-Since", &lm), ("If-None-Match", &etag)]));
    d.wait_held(1);
    assert_eq!(d.publish("slow", "after-408"), 1);
    assert_text_message(&with.response(), "after-408");
}

#[test]
fn bad_cursor_gets_400() {
    let d = Daemon::start();
    let r = d.browser().request(&get("/sub/x?last_event_id=yesterday", &[]));
    assert_eq!(r.status, 400, "{r}");
    let r = d.browser().request(&get("/sub/x", &[("Last-Event-ID", "1:two")]));
    assert_eq!(r.status, 400, "{r}");
}

#[test]
fn browser_unknown_path_404_and_other_method_405() {
    let d = Daemon::start();
    let r = d.browser().request(&get("/nothing/here", &[]));
    assert_eq!(r.status, 404, "{r}");
    let r = d.browser().request(&request("POST", "/sub/goods", &[], "body"));
    assert_eq!(r.status, 405, "{r}");
    assert_eq!(r.must("Allow"), "GET, OPTIONS");
}

// =============================================================================================
// Admin endpoint
// =============================================================================================

const BEARER: (&str, &str) = ("Authorization", "Bearer s3cret-token");

#[test]
fn admin_delete_answers_held_poll_with_410() {
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/doomed", &[]);
    d.wait_held(1);
    let mut admin = d.admin();
    let r = admin.request(&request("DELETE", "/pub?id=doomed", &[BEARER], ""));
    assert_eq!(r.status, 200, "{r}");
    let g = poll.response();
    assert_eq!(g.status, 410, "held poll on a deleted channel:\n{g}");
    // Gone now.
    let r = admin.request(&request("DELETE", "/pub?id=doomed", &[BEARER], ""));
    assert_eq!(r.status, 404, "{r}");
    let r = admin.request(&request("GET", "/pub?id=doomed", &[BEARER], ""));
    assert_eq!(r.status, 404, "{r}");
}

#[test]
fn admin_post_201_with_held_poll_and_202_without() {
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/news", &[]);
    d.wait_held(1);
    let mut admin = d.admin();
    let r = admin.request(&request(
        "POST",
        "/pub?id=news",
        &[BEARER, ("Content-Type", "application/json")],
        "{\"a\":1}",
    ));
    assert_eq!(r.status, 201, "POST with a held poll:\n{r}");
    assert_eq!(r.text().lines().next(), Some("queued messages: 1"), "body is the channel info:\n{r}");
    assert_message(&poll.response(), "{\"a\":1}", "application/json");

    // No one held: 202. PUT and /pub/<channel> are the same; no Content-Type -> text/plain.
    let r = admin.request(&request("PUT", "/pub/news", &[BEARER], "second"));
    assert_eq!(r.status, 202, "POST without a held poll:\n{r}");
    assert_eq!(r.text().lines().next(), Some("queued messages: 2"), "body is the channel info:\n{r}");
    let first = d.browser().request(&get("/sub/news", &[]));
    let r = d.browser().request(&get_after("/sub/news", &first));
    assert_message(&r, "second", "text/plain");
}

#[test]
fn admin_channel_info_text_and_json() {
    let d = Daemon::start();
    for m in ["a", "b", "c"] {
        d.publish("info", m);
    }
    let mut admin = d.admin();
    let r = admin.request(&request("GET", "/pub?id=info", &[BEARER], ""));
    assert_eq!(r.status, 200, "{r}");
    let text = r.text();
    let lines: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once(": ")).collect();
    let keys: Vec<&str> = lines.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        ["queued messages", "last requested", "active subscribers", "last message id"],
        "channel info lines:\n{text}"
    );
    assert_eq!(lines[0].1, "3");
    assert_eq!(lines[1].1.split_whitespace().next(), Some("-1"), "never requested:\n{text}");
    assert_eq!(lines[2].1, "0");
    let last_id = lines[3].1.to_string();

    let r = admin.request(&request("GET", "/pub?id=info", &[BEARER, ("Accept", "application/json")], ""));
    assert_eq!(r.status, 200, "{r}");
    assert!(r.must("Content-Type").starts_with("application/json"), "{r}");
    // A trailing newline is tolerated: the doc shows the object, not the framing.
    assert_eq!(
        r.text().trim_end(),
        format!("{{\"messages\":3,\"requested\":-1,\"subscribers\":0,\"last_message_id\":\"{last_id}\"}}"),
    );

    // The last message id is the id of "c".
    let mut c = d.browser();
    let mut m = c.request(&get("/sub/info", &[]));
    for _ in 0..2 {
        m = c.request(&get_after("/sub/info", &m));
    }
    assert_text_message(&m, "c");
    let (t, tag) = m.message_id();
    assert_eq!(last_id, format!("{t}:{tag}"));

    // Now someone asked, and someone is waiting.
    let _held = hold(&d, "/sub/info", &[("Last-Event-ID", &last_id)]);
    d.wait_held(1);
    let r = admin.request(&request("GET", "/pub?id=info", &[BEARER, ("Accept", "application/json")], ""));
    let json = r.text();
    assert!(json.contains("\"subscribers\":1"), "{json}");
    assert!(!json.contains("\"requested\":-1"), "{json}");

    let r = admin.request(&request("GET", "/pub?id=absent", &[BEARER], ""));
    assert_eq!(r.status, 404, "{r}");
}

#[test]
fn admin_requires_bearer_token() {
    let d = Daemon::start();
    let r = d.admin().request(&request("GET", "/status", &[], ""));
    assert_eq!(r.status, 401, "no Authorization:\n{r}");
    assert_eq!(r.must("WWW-Authenticate"), "Bearer");
    let r = d.admin().request(&request("GET", "/status", &[("Authorization", "Bearer wrong")], ""));
    assert_eq!(r.status, 401, "wrong bearer:\n{r}");
    let r = d.admin().request(&request("POST", "/pub?id=x", &[("Authorization", "Basic czNjcmV0")], "m"));
    assert_eq!(r.status, 401, "Basic is not Bearer:\n{r}");
    // The refused POST published nothing.
    let r = d.admin().request(&request("GET", "/pub?id=x", &[BEARER], ""));
    assert_eq!(r.status, 404, "{r}");

    let r = d.admin().request(&request("GET", "/status", &[BEARER], ""));
    assert_eq!(r.status, 200, "{r}");
    assert!(r.text().contains("\"held_polls\":"), "status is the INFO fields as JSON:\n{r}");
}

#[test]
fn admin_errors_400_404_405() {
    let d = Daemon::start();
    let mut a = d.admin();
    let r = a.request(&request("POST", "/pub", &[BEARER], "m"));
    assert_eq!(r.status, 400, "missing id:\n{r}");
    let r = d.admin().request(&request("POST", "/pub?id=a%20b", &[BEARER], "m"));
    assert_eq!(r.status, 400, "bad channel id:\n{r}");
    let r = d.admin().request(&request("GET", "/elsewhere", &[BEARER], ""));
    assert_eq!(r.status, 404, "{r}");
    let r = d.admin().request(&request("PATCH", "/pub?id=x", &[BEARER], "m"));
    assert_eq!(r.status, 405, "{r}");
}

// =============================================================================================
// Private channels
// =============================================================================================

#[test]
fn private_channel_served_to_its_session_after_open() {
    let d = Daemon::start();
    let mut backend = d.backend();
    assert_eq!(backend.cmd(&["SESSION.OPEN", "abc", "42"]).to_string(), "+OK");
    let mut poll = hold(&d, "/sub/session:abc", &[("Cookie", "theme=dark; PHPSESSID=abc; lang=fr")]);
    d.wait_held(1);
    poll.expect_nothing(ms(100));
    assert_eq!(backend.cmd(&["PUBLISH", "session:abc", "for-abc"]).to_string(), ":1");
    assert_text_message(&poll.response(), "for-abc");
}

#[test]
fn private_channel_refuses_other_session_anonymous_and_unopened() {
    let d = Daemon::start();
    let mut backend = d.backend();
    // Before SESSION.OPEN, even the right cookie is refused.
    let r = d.browser().request(&get("/sub/session:abc", &[("Cookie", "PHPSESSID=abc")]));
    assert_eq!(r.status, 403, "before SESSION.OPEN:\n{r}");

    assert_eq!(backend.cmd(&["SESSION.OPEN", "abc", "42"]).to_string(), "+OK");
    backend.cmd(&["PUBLISH", "session:abc", "secret"]);
    let r = d.browser().request(&get("/sub/session:abc", &[("Cookie", "PHPSESSID=xyz")]));
    assert_eq!(r.status, 403, "another session:\n{r}");
    assert_ne!(r.text(), "secret");
    let r = d.browser().request(&get("/sub/session:abc", &[]));
    assert_eq!(r.status, 403, "anonymous:\n{r}");
    let r = d.browser().request(&get("/sub/session:abc", &[("Cookie", "OTHER=abc")]));
    assert_eq!(r.status, 403, "another cookie name:\n{r}");
    let r = d.browser().request(&get("/subscribe?id=session:abc", &[("Cookie", "PHPSESSID=xyz")]));
    assert_eq!(r.status, 403, "/subscribe form:\n{r}");
    // The owner gets it.
    let r = d.browser().request(&get("/sub/session:abc", &[("Cookie", "PHPSESSID=abc")]));
    assert_text_message(&r, "secret");
}

#[test]
fn me_alias_reads_own_private_channel() {
    let d = Daemon::start();
    let mut backend = d.backend();
    assert_eq!(backend.cmd(&["SESSION.OPEN", "abc"]).to_string(), "+OK");
    let mut poll = hold(&d, "/sub/@me", &[("Cookie", "PHPSESSID=abc")]);
    d.wait_held(1);
    assert_eq!(backend.cmd(&["PUBLISH", "session:abc", "mine"]).to_string(), ":1");
    assert_text_message(&poll.response(), "mine");

    let r = d.browser().request(&get("/sub/@me", &[]));
    assert_eq!(r.status, 403, "@me without a session cookie:\n{r}");
    let r = d.browser().request(&get("/sub/@me", &[("Cookie", "PHPSESSID=nobody")]));
    assert_eq!(r.status, 403, "@me of a session not opened:\n{r}");
}

#[test]
fn session_close_answers_held_poll_with_410_then_403() {
    let d = Daemon::start();
    let mut backend = d.backend();
    assert_eq!(backend.cmd(&["SESSION.OPEN", "abc", "42"]).to_string(), "+OK");
    backend.cmd(&["PUBLISH", "session:abc", "old"]);
    let first = d.browser().request(&get("/sub/@me", &[("Cookie", "PHPSESSID=abc")]));
    assert_text_message(&first, "old");
    let (lm, etag) = first.cursor();
    let mut poll = hold(
        &d,
        "/sub/session:abc",
        &[("Cookie", "PHPSESSID=abc"), ("If-Modified-Since", &lm), ("If-None-Match", &etag)],
    );
    d.wait_held(1);

    assert_eq!(backend.cmd(&["SESSION.CLOSE", "abc"]).to_string(), ":1");
    let r = poll.response();
    assert_eq!(r.status, 410, "held poll of a closed session:\n{r}");
    let r = d.browser().request(&get("/sub/session:abc", &[("Cookie", "PHPSESSID=abc")]));
    assert_eq!(r.status, 403, "after SESSION.CLOSE:\n{r}");
    assert_eq!(backend.cmd(&["SESSION.CLOSE", "abc"]).to_string(), ":0");

    // Opened again: the buffer was dropped, so "old" is not served again.
    assert_eq!(backend.cmd(&["SESSION.OPEN", "abc"]).to_string(), "+OK");
    let mut poll = hold(&d, "/sub/@me", &[("Cookie", "PHPSESSID=abc")]);
    d.wait_held(1);
    poll.expect_nothing(ms(100));
    backend.cmd(&["PUBLISH", "session:abc", "new"]);
    assert_text_message(&poll.response(), "new");
}

#[test]
fn session_commands_validate_ids() {
    let d = Daemon::start();
    let mut b = d.backend();
    assert_eq!(b.cmd(&["SESSION.OPEN", "bad/sid"]).to_string(), "-ERR invalid session id");
    let long = "s".repeat(121);
    assert_eq!(b.cmd(&["SESSION.OPEN", &long]).to_string(), "-ERR invalid session id");
    assert_eq!(b.cmd(&["SESSION.OPEN", &"s".repeat(120)]).to_string(), "+OK");
    assert_eq!(b.cmd(&["PUBLISH", "bad channel", "m"]).to_string(), "-ERR invalid channel id");
    assert_eq!(b.cmd(&["PUBLISH", &"c".repeat(129), "m"]).to_string(), "-ERR invalid channel id");
    assert_eq!(b.cmd(&["PUBLISH", &"c".repeat(128), "m"]).to_string(), ":0");
}

// =============================================================================================
// CORS
// =============================================================================================

fn preflight(origin: &str) -> String {
    request(
        "OPTIONS",
        "/sub/goods",
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "if-modified-since, if-none-match"),
        ],
        "",
    )
}

#[test]
fn cors_preflight_from_allowed_origin_gets_204() {
    let d = Daemon::start();
    let r = d.browser().request(&preflight("http://site.test"));
    assert_eq!(r.status, 204, "{r}");
    assert_eq!(r.must("Access-Control-Allow-Origin"), "http://site.test");
    assert_eq!(r.must("Access-Control-Allow-Credentials"), "true");
    assert_eq!(r.must("Access-Control-Allow-Methods"), "GET, OPTIONS");
    let allowed = r.header_tokens("Access-Control-Allow-Headers");
    for h in ["if-modified-since", "if-none-match", "last-event-id"] {
        assert!(allowed.contains(&h.to_string()), "Allow-Headers lacks {h}:\n{r}");
    }
    assert_eq!(r.must("Access-Control-Max-Age"), "600");
    assert!(r.header_tokens("Vary").contains(&"origin".to_string()), "Vary: Origin:\n{r}");
    assert_eq!(r.must("Content-Length"), "0");
}

#[test]
fn cors_preflight_from_other_origin_gets_403() {
    let d = Daemon::start();
    let r = d.browser().request(&preflight("http://evil.test"));
    assert_eq!(r.status, 403, "{r}");
    assert_eq!(r.header("Access-Control-Allow-Origin"), None, "{r}");
}

#[test]
fn cors_get_from_allowed_origin_exposes_cursor_headers() {
    let d = Daemon::start();
    d.publish("goods", "x");
    let r = d.browser().request(&get("/sub/goods", &[("Origin", "http://site.test")]));
    assert_text_message(&r, "x");
    assert_eq!(r.must("Access-Control-Allow-Origin"), "http://site.test");
    assert_eq!(r.must("Access-Control-Allow-Credentials"), "true");
    let exposed = r.header_tokens("Access-Control-Expose-Headers");
    for h in ["last-modified", "etag"] {
        assert!(exposed.contains(&h.to_string()), "Expose-Headers lacks {h}:\n{r}");
    }
    assert!(r.header_tokens("Vary").contains(&"origin".to_string()), "Vary: Origin:\n{r}");

    // Another origin: served, without CORS headers.
    let r = d.browser().request(&get("/sub/goods", &[("Origin", "http://evil.test")]));
    assert_text_message(&r, "x");
    assert_eq!(r.header("Access-Control-Allow-Origin"), None, "{r}");
    assert_eq!(r.header("Access-Control-Allow-Credentials"), None, "{r}");
}

/// A page can only read the echoed cursor of a 408 if the 408 carries the CORS headers too.
#[test]
fn cors_headers_on_408_so_the_page_can_read_the_cursor() {
    let d = Daemon::start_with(&Config::default().set("browser", "poll_timeout_secs", "1"));
    let mut poll = hold(&d, "/sub/cors-wait?last_event_id=1795818600:2", &[("Origin", "http://site.test")]);
    let r = poll.response();
    assert_eq!(r.status, 408, "{r}");
    assert_eq!(r.must("Access-Control-Allow-Origin"), "http://site.test", "{r}");
    assert_eq!(r.must("Access-Control-Allow-Credentials"), "true", "{r}");
    let exposed = r.header_tokens("Access-Control-Expose-Headers");
    assert!(exposed.contains(&"last-modified".to_string()) && exposed.contains(&"etag".to_string()), "{r}");
    assert_eq!(r.message_id(), (1795818600, 2), "the cursor echoed:\n{r}");
}

#[test]
fn cors_wildcard_config_echoes_the_origin_never_star() {
    let d = Daemon::start_with(&Config::default().set("browser", "allowed_origins", "[\"*\"]"));
    let r = d.browser().request(&preflight("https://any.example:8443"));
    assert_eq!(r.status, 204, "{r}");
    assert_eq!(r.must("Access-Control-Allow-Origin"), "https://any.example:8443");
}

// =============================================================================================
// Connections
// =============================================================================================

#[test]
fn keep_alive_repoll_on_same_connection() {
    let d = Daemon::start();
    d.publish("ka", "one");
    let mut c = d.browser();
    let first = c.request(&get("/sub/ka", &[]));
    assert_text_message(&first, "one");
    assert!(!first.closes(), "{first}");
    c.send(&get_after("/sub/ka", &first));
    d.wait_held(1);
    assert_eq!(d.publish("ka", "two"), 1);
    assert_text_message(&c.response(), "two");
    // And a third request still works on it.
    let r = c.request(&get("/sub/ka", &[]));
    assert_text_message(&r, "one");
}

#[test]
fn http10_gets_connection_close_and_is_closed() {
    let d = Daemon::start();
    d.publish("old-http", "m");
    let mut c = d.browser();
    let r = c.request("GET /sub/old-http HTTP/1.0\r\nHost: push.test\r\n\r\n");
    assert_text_message(&r, "m");
    assert!(r.closes(), "HTTP/1.0 response must say Connection: close:\n{r}");
    c.expect_closed();
}

#[test]
fn http10_keep_alive_is_kept() {
    let d = Daemon::start();
    d.publish("old-ka", "m");
    let mut c = d.browser();
    let req = "GET /sub/old-ka HTTP/1.0\r\nHost: push.test\r\nConnection: keep-alive\r\n\r\n";
    let r = c.request(req);
    assert_text_message(&r, "m");
    assert!(!r.closes(), "{r}");
    assert_text_message(&c.request(req), "m");
}

#[test]
fn connection_close_request_is_honoured() {
    let d = Daemon::start();
    d.publish("bye", "m");
    let mut c = d.browser();
    let r = c.request(&get("/sub/bye", &[("Connection", "close")]));
    assert_text_message(&r, "m");
    c.expect_closed();
}

#[test]
fn request_pipelined_behind_held_poll_waits_for_it() {
    let d = Daemon::start();
    d.publish("ready", "buffered");
    let mut c = d.browser();
    let mut both = get("/sub/later", &[]);
    both.push_str(&get("/sub/ready", &[]));
    c.send(&both);
    d.wait_held(1);
    c.expect_nothing(ms(200));
    assert_eq!(d.publish("later", "first"), 1);
    assert_text_message(&c.response(), "first");
    assert_text_message(&c.response(), "buffered");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let d = Daemon::start();
    d.publish("p1", "one");
    d.publish("p2", "two");
    let mut c = d.browser();
    let mut all = get("/sub/p1", &[]);
    all.push_str(&get("/nowhere", &[]));
    all.push_str(&get("/sub/p2", &[]));
    c.send(&all);
    assert_text_message(&c.response(), "one");
    assert_eq!(c.response().status, 404);
    assert_text_message(&c.response(), "two");
}

#[test]
fn request_sent_byte_by_byte_is_served() {
    let d = Daemon::start();
    d.publish("slowloris", "patience");
    let mut c = d.browser();
    for b in get("/sub/slowloris", &[("If-None-Match", "0")]).bytes() {
        c.send_bytes(&[b]);
        thread::sleep(ms(2));
    }
    assert_text_message(&c.response(), "patience");
}

#[test]
fn publish_body_arriving_in_pieces_is_kept_whole() {
    // The head is parsed in place and again once the body is all there: the pieces below stop
    // inside the head, between head and body, and inside the body, with a second POST pipelined
    // behind the first.
    let d = Daemon::start();
    let first = request("POST", "/pub/pieces", &[BEARER, ("Content-Type", "text/x-first")], "0123456789abcdefghij");
    let second = request("POST", "/pub/pieces%2Dtwo", &[BEARER], "second body");
    let all = format!("{first}{second}");
    let head_end = first.find("\r\n\r\n").unwrap() + 4;
    let cuts = [10, head_end - 1, head_end, head_end + 7, first.len() + 3, all.len()];
    let mut c = d.admin();
    let mut at = 0;
    for cut in cuts {
        c.send(&all[at..cut]);
        at = cut;
        thread::sleep(ms(30));
    }
    assert_eq!(c.response().status, 202);
    assert_eq!(c.response().status, 202);
    let mut b = d.browser();
    assert_message(&b.request(&get("/sub/pieces", &[("If-None-Match", "0")])), "0123456789abcdefghij", "text/x-first");
    assert_message(&b.request(&get("/sub/pieces-two", &[("If-None-Match", "0")])), "second body", "text/plain");
}

#[test]
fn client_disconnect_releases_held_poll() {
    let d = Daemon::start();
    let poll = hold(&d, "/sub/gone", &[]);
    d.wait_held(1);
    drop(poll);
    d.wait_held(0);
    assert_eq!(d.publish("gone", "m"), 0, "a closed client must not count as delivered");
}

// =============================================================================================
// Control socket (RESP)
// =============================================================================================

#[test]
fn resp_noauth_before_auth() {
    let d = Daemon::start();
    let mut c = d.control();
    assert_eq!(c.cmd(&["PUBLISH", "goods", "x"]).to_string(), "-NOAUTH Authentication required.");
    assert_eq!(c.cmd(&["INFO"]).to_string(), "-NOAUTH Authentication required.");
    assert_eq!(c.cmd(&["SESSION.OPEN", "abc"]).to_string(), "-NOAUTH Authentication required.");
    assert_eq!(c.cmd(&["PING"]).to_string(), "+PONG", "PING is allowed before AUTH");
    // The refused PUBLISH buffered nothing.
    let r = d.admin().request(&request("GET", "/pub?id=goods", &[BEARER], ""));
    assert_eq!(r.status, 404, "{r}");
}

/// Client libraries send `SELECT` and `CLIENT SETNAME` while connecting, possibly before `AUTH`
/// (docs/protocol.md, Authentication: "HELLO-less handshake commands (SELECT, CLIENT)").
#[test]
fn resp_handshake_commands_allowed_before_auth() {
    let d = Daemon::start();
    let mut c = d.control();
    assert_eq!(c.cmd(&["PING"]).to_string(), "+PONG");
    assert_eq!(c.cmd(&["SELECT", "0"]).to_string(), "+OK", "SELECT 0 before AUTH");
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "early"]).to_string(), "+OK", "CLIENT SETNAME before AUTH");
    assert_eq!(c.cmd(&["QUIT"]).to_string(), "+OK", "QUIT before AUTH");
    c.expect_closed();
}

#[test]
fn resp_wrong_token_is_wrongpass() {
    let d = Daemon::start();
    let mut c = d.control();
    let wrongpass = "-WRONGPASS invalid username-password pair or user is disabled.";
    assert_eq!(c.cmd(&["AUTH", "nope"]).to_string(), wrongpass);
    assert_eq!(c.cmd(&["AUTH", "php", "nope"]).to_string(), wrongpass);
    assert_eq!(c.cmd(&["AUTH", "other", "s3cret-token"]).to_string(), wrongpass);
    // Three wrong tokens close the connection (brute-force guard).
    c.expect_closed();
    let mut c = d.control();
    assert_eq!(c.cmd(&["PUBLISH", "goods", "x"]).to_string(), "-NOAUTH Authentication required.");
}

#[test]
fn resp_auth_name_and_secret_form() {
    let d = Daemon::start();
    let mut c = d.control();
    assert_eq!(c.cmd(&["auth", "php", "s3cret-token"]).to_string(), "+OK");
    assert_eq!(c.cmd(&["publish", "goods", "x"]).to_string(), ":0");
}

#[test]
fn resp_handshake_and_utility_commands() {
    let d = Daemon::start();
    let mut c = d.control();
    assert_eq!(c.cmd(&["PING"]).to_string(), "+PONG");
    assert_eq!(c.cmd(&["AUTH", "s3cret-token"]).to_string(), "+OK");
    assert_eq!(c.cmd(&["ping", "hi there"]), Reply::Bulk(Some(b"hi there".to_vec())));
    assert_eq!(c.cmd(&["ECHO", "hello"]), Reply::Bulk(Some(b"hello".to_vec())));
    assert_eq!(c.cmd(&["ECHO", ""]), Reply::Bulk(Some(Vec::new())));
    assert_eq!(c.cmd(&["SELECT", "0"]).to_string(), "+OK");
    assert_eq!(c.cmd(&["SELECT", "3"]).to_string(), "-ERR DB index is out of range");
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).to_string(), "$-1");
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "shop-worker"]).to_string(), "+OK");
    assert_eq!(c.cmd(&["client", "getname"]).to_string(), "$shop-worker");
    let id = c.cmd(&["CLIENT", "ID"]);
    assert!(matches!(id, Reply::Integer(_)), "CLIENT ID: {id}");
    assert_ne!(d.backend().cmd(&["CLIENT", "ID"]), id, "two connections share a CLIENT ID");
    assert_eq!(c.cmd(&["CLIENT", "frobnicate"]).to_string(), "-ERR unknown subcommand 'frobnicate'");
    assert_eq!(c.cmd(&["COMMAND"]).to_string(), "*0");
    assert_eq!(c.cmd(&["COMMAND", "DOCS"]).to_string(), "*0");
    assert_eq!(c.cmd(&["QUIT"]).to_string(), "+OK");
    c.expect_closed();
}

#[test]
fn resp_binary_safe_publish() {
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/bin", &[]);
    d.wait_held(1);
    let mut c = d.backend();
    let msg: &[u8] = b"line1\r\nline2\0\xff end";
    c.send_raw(&encode(&[b"PUBLISH", b"bin", msg]));
    assert_eq!(c.reply().to_string(), ":1");
    let r = poll.response();
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.body, msg);
}

#[test]
fn resp_unknown_command_and_arity_errors() {
    let d = Daemon::start();
    let mut c = d.backend();
    assert_eq!(c.cmd(&["flushall"]).to_string(), "-ERR unknown command 'flushall'");
    assert_eq!(c.cmd(&["publish", "goods"]).to_string(), "-ERR wrong number of arguments for 'publish' command");
    assert_eq!(c.cmd(&["echo"]).to_string(), "-ERR wrong number of arguments for 'echo' command");
    assert_eq!(
        c.cmd(&["publish", "goods", "a", "b"]).to_string(),
        "-ERR wrong number of arguments for 'publish' command"
    );
    assert_eq!(c.cmd(&["session.close"]).to_string(), "-ERR wrong number of arguments for 'session.close' command");
    // Errors do not end the connection.
    assert_eq!(c.cmd(&["PING"]).to_string(), "+PONG");
}

#[test]
fn resp_pipelined_commands_answered_in_order() {
    let d = Daemon::start();
    let mut c = d.control();
    let mut bytes = encode_str(&["AUTH", "s3cret-token"]);
    bytes.extend(encode_str(&["PING"]));
    bytes.extend(encode_str(&["ECHO", "second"]));
    bytes.extend(encode_str(&["PUBLISH", "pipe", "m"]));
    bytes.extend(encode_str(&["nosuch"]));
    bytes.extend(encode_str(&["ECHO", "last"]));
    c.send_raw(&bytes);
    let got: Vec<String> = (0..6).map(|_| c.reply().to_string()).collect();
    assert_eq!(got, ["+OK", "+PONG", "$second", ":0", "-ERR unknown command 'nosuch'", "$last"]);
}

#[test]
fn resp_command_split_across_writes() {
    let d = Daemon::start();
    let mut c = d.backend();
    let bytes = encode_str(&["ECHO", "split-in-pieces"]);
    for chunk in bytes.chunks(3) {
        c.send_raw(chunk);
        thread::sleep(ms(5));
    }
    assert_eq!(c.reply().to_string(), "$split-in-pieces");
}

#[test]
fn resp_inline_commands() {
    let d = Daemon::start();
    let mut c = d.control();
    c.send_raw(b"PING\r\n");
    assert_eq!(c.reply().to_string(), "+PONG");
    c.send_raw(b"AUTH s3cret-token\r\nECHO inline\r\nPUBLISH inl hello\r\n");
    assert_eq!(c.reply().to_string(), "+OK");
    assert_eq!(c.reply().to_string(), "$inline");
    assert_eq!(c.reply().to_string(), ":0");
    // Inline and RESP mixed on one connection.
    c.send_raw(&encode_str(&["PING"]));
    c.send_raw(b"ping\r\n");
    assert_eq!(c.reply().to_string(), "+PONG");
    assert_eq!(c.reply().to_string(), "+PONG");
    let r = d.browser().request(&get("/sub/inl", &[]));
    assert_text_message(&r, "hello");
}

#[test]
fn resp_oversized_bulk_is_protocol_error_closing_only_that_connection() {
    let d = Daemon::start_with(&Config::default().set("limits", "max_message_bytes", "1024"));
    let bystander = Bystander::new(&d);
    let mut other = d.backend();
    let mut bad = d.backend();
    let big = "x".repeat(2000);
    bad.send(&["PUBLISH", "goods", &big]);
    let r = bad.reply().to_string();
    assert!(r.starts_with("-ERR Protocol error"), "expected -ERR Protocol error..., got {r}");
    bad.expect_closed();

    assert_eq!(other.cmd(&["PING"]).to_string(), "+PONG");
    let fine = "y".repeat(1024);
    assert_eq!(other.cmd(&["PUBLISH", "goods", &fine]).to_string(), ":0", "exactly max_message_bytes is allowed");
    bystander.still_served(&d);
}

#[test]
fn resp_too_many_arguments_is_protocol_error() {
    let d = Daemon::start();
    let mut bad = d.backend();
    let args: Vec<&str> = std::iter::once("ECHO").chain(std::iter::repeat("a").take(1025)).collect();
    bad.send(&args);
    let r = bad.reply().to_string();
    assert!(r.starts_with("-ERR Protocol error"), "1026 arguments: expected -ERR Protocol error..., got {r}");
    bad.expect_closed();
    // 1024 arguments is a frame, merely the wrong arity.
    let mut ok = d.backend();
    // (Lowercase name: whether the error repeats the name as sent or lowercased is not specified.)
    let args: Vec<&str> = std::iter::once("echo").chain(std::iter::repeat("a").take(1023)).collect();
    assert_eq!(ok.cmd(&args).to_string(), "-ERR wrong number of arguments for 'echo' command");
}

#[test]
fn resp_inline_line_over_64k_is_protocol_error() {
    let d = Daemon::start();
    let mut other = d.backend();
    let mut bad = d.control();
    let mut line = b"PING ".to_vec();
    line.extend(std::iter::repeat(b'x').take(70 * 1024));
    line.extend_from_slice(b"\r\n");
    bad.send_raw(&line);
    let r = bad.reply().to_string();
    assert!(r.starts_with("-ERR Protocol error"), "70 KiB inline line: expected -ERR Protocol error..., got {r}");
    bad.expect_closed();
    assert_eq!(other.cmd(&["PING"]).to_string(), "+PONG");
}

#[test]
fn resp_malformed_frame_is_protocol_error_and_closes() {
    let d = Daemon::start();
    let mut other = d.backend();
    let mut bad = d.backend();
    bad.send_raw(b"*2\r\n$4\r\nECHO\r\n$abc\r\n");
    let r = bad.reply().to_string();
    assert!(r.starts_with("-ERR Protocol error"), "expected -ERR Protocol error..., got {r}");
    bad.expect_closed();
    assert_eq!(other.cmd(&["PING"]).to_string(), "+PONG");
}

/// INFO fields; indexing a missing key panics naming it.
struct Info(HashMap<String, String>);

impl std::ops::Index<&str> for Info {
    type Output = String;
    fn index(&self, k: &str) -> &String {
        self.0.get(k).unwrap_or_else(|| panic!("INFO lacks {k}: {:?}", self.0))
    }
}

#[test]
fn info_counts_held_polls_and_messages() {
    let d = Daemon::start();
    let mut b = d.backend();
    let info = |b: &mut Resp| -> Info {
        match b.cmd(&["INFO"]) {
            Reply::Bulk(Some(t)) => {
                let text = String::from_utf8_lossy(&t).into_owned();
                for s in ["# Server", "# Clients", "# Stats"] {
                    assert!(text.lines().any(|l| l.trim() == s), "INFO lacks {s}:\n{text}");
                }
                Info(parse_info(&text))
            }
            other => panic!("INFO: expected bulk, got {other}"),
        }
    };
    let i = info(&mut b);
    assert_eq!(i["held_polls"], "0");
    assert_eq!(i["channels"], "0");
    assert_eq!(i["messages_published"], "0");
    assert_eq!(i["process_id"], d.pid().to_string());
    assert_eq!(i["browser_listen"], d.browser.to_string());
    assert_eq!(i["connected_backends"], "1");
    for k in [
        "comet_version", "uptime_in_seconds", "connected_browsers", "connected_admin", "sessions",
        "buffered_messages", "messages_delivered", "total_connections_received", "rejected_requests",
    ] {
        assert!(i.0.contains_key(k), "INFO lacks {k}: {:?}", i.0);
    }

    let mut poll = hold(&d, "/sub/counted", &[]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while info(&mut b).0.get("held_polls").map(String::as_str) != Some("1") {
        assert!(Instant::now() < deadline, "INFO never said held_polls:1 with a held poll");
        thread::sleep(ms(10));
    }
    let i = info(&mut b);
    assert_eq!(i["connected_browsers"], "1");
    assert_eq!(i["channels"], "1");

    assert_eq!(b.cmd(&["PUBLISH", "counted", "m"]).to_string(), ":1");
    assert_text_message(&poll.response(), "m");
    assert_eq!(b.cmd(&["PUBLISH", "other", "m"]).to_string(), ":0");
    assert_eq!(b.cmd(&["SESSION.OPEN", "s1"]).to_string(), "+OK");
    let i = info(&mut b);
    assert_eq!(i["held_polls"], "0");
    assert_eq!(i["messages_published"], "2");
    assert_eq!(i["messages_delivered"], "1");
    assert_eq!(i["buffered_messages"], "2");
    assert_eq!(i["channels"], "2");
    assert_eq!(i["sessions"], "1");

    match b.cmd(&["INFO", "clients"]) {
        Reply::Bulk(Some(t)) => {
            let text = String::from_utf8_lossy(&t).into_owned();
            assert!(text.contains("held_polls:0"), "INFO clients:\n{text}");
        }
        other => panic!("INFO clients: expected bulk, got {other}"),
    }
}

#[test]
fn no_tokens_on_loopback_needs_no_auth() {
    let d = Daemon::start_with(&Config::default().remove_section("control.tokens"));
    let mut c = d.control();
    assert_eq!(c.cmd(&["PUBLISH", "open", "m"]).to_string(), ":0");
    assert_eq!(c.cmd(&["AUTH", "anything"]).to_string(), "+OK");
    let r = d.admin().request(&request("GET", "/pub?id=open", &[], ""));
    assert_eq!(r.status, 200, "admin needs no bearer without tokens:\n{r}");
}

// =============================================================================================
// Limits: each refused request leaves a concurrent held poll alone
// =============================================================================================

#[test]
fn oversized_head_gets_431_and_held_poll_survives() {
    let d = Daemon::start();
    let bystander = Bystander::new(&d);
    let mut c = d.browser();
    let pad = "a".repeat(9000);
    let r = c.request(&get("/sub/goods", &[("X-Pad", &pad)]));
    assert_eq!(r.status, 431, "{r}");
    c.expect_closed();
    bystander.still_served(&d);
}

#[test]
fn bad_channel_ids_get_400_and_held_poll_survives() {
    let d = Daemon::start();
    let bystander = Bystander::new(&d);
    let long = "c".repeat(200);
    for target in [
        "/sub/a%20b".to_string(),
        format!("/sub/{long}"),
        "/sub/a%2Fb".to_string(),
        "/subscribe?id=".to_string(),
        "/subscribe?id=semi;colon".to_string(),
    ] {
        let r = d.browser().request(&get(&target, &[]));
        assert_eq!(r.status, 400, "GET {target}:\n{r}");
    }
    let ok = "c".repeat(128);
    d.publish(&ok, "max-length id");
    let r = d.browser().request(&get(&format!("/sub/{ok}"), &[]));
    assert_text_message(&r, "max-length id");
    bystander.still_served(&d);
}

#[test]
fn garbage_request_line_gets_400_and_close() {
    let d = Daemon::start();
    let bystander = Bystander::new(&d);
    let mut c = d.browser();
    let r = c.request("GARBAGE\r\n\r\n");
    assert_eq!(r.status, 400, "{r}");
    c.expect_closed();
    let mut c = d.browser();
    let r = c.request("GET /sub/x HTTP/1.1\r\nNo colon here\r\n\r\n");
    assert_eq!(r.status, 400, "{r}");
    c.expect_closed();
    bystander.still_served(&d);
}

#[test]
fn http2_version_gets_505_and_close() {
    let d = Daemon::start();
    let bystander = Bystander::new(&d);
    let mut c = d.browser();
    let r = c.request("GET /sub/goods HTTP/2.0\r\nHost: push.test\r\n\r\n");
    assert_eq!(r.status, 505, "{r}");
    c.expect_closed();
    bystander.still_served(&d);
}

#[test]
fn unknown_transfer_encoding_gets_501() {
    let d = Daemon::start();
    let bystander = Bystander::new(&d);
    let mut c = d.admin();
    let r = c.request(&request("POST", "/pub?id=x", &[BEARER, ("Transfer-Encoding", "gzip")], ""));
    assert_eq!(r.status, 501, "{r}");
    c.expect_closed();
    bystander.still_served(&d);
}

#[test]
fn admin_body_over_max_message_bytes_gets_413() {
    let d = Daemon::start_with(&Config::default().set("limits", "max_message_bytes", "1024"));
    let bystander = Bystander::new(&d);
    // Only the head: the declared length alone is over the limit.
    let mut c = d.admin();
    c.send("POST /pub?id=bystander HTTP/1.1\r\nHost: push.test\r\nAuthorization: Bearer s3cret-token\r\nContent-Length: 5000\r\n\r\n");
    let r = c.response();
    assert_eq!(r.status, 413, "{r}");
    c.expect_closed();
    // Exactly at the limit is fine.
    let body = "z".repeat(1024);
    let mut c = d.admin();
    let r = c.request(&request("POST", "/pub?id=other", &[BEARER], &body));
    assert_eq!(r.status, 202, "{r}");
    bystander.still_served(&d);
}

#[test]
fn admin_refuses_like_the_browser_listener() {
    let d = Daemon::start();
    let mut c = d.admin();
    let r = c.request("GET /status HTTP/2.0\r\nHost: push.test\r\nAuthorization: Bearer s3cret-token\r\n\r\n");
    assert_eq!(r.status, 505, "{r}");
    c.expect_closed();
    let mut c = d.admin();
    let pad = "a".repeat(9000);
    let r = c.request(&request("GET", "/status", &[BEARER, ("X-Pad", &pad)], ""));
    assert_eq!(r.status, 431, "{r}");
    c.expect_closed();
    let mut c = d.admin();
    let r = c.request("NONSENSE\r\n\r\n");
    assert_eq!(r.status, 400, "{r}");
    c.expect_closed();
}

// =============================================================================================
// Command line
// =============================================================================================

fn check(config: &str) -> std::process::Output {
    let (dir, path) = write_config(config);
    let args = [OsStr::new("--check"), OsStr::new("--config"), path.as_os_str()];
    let out = run_comet(&args, Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(dir);
    out
}

#[test]
fn check_accepts_good_config() {
    let out = check(&Config::default().text());
    assert!(
        out.status.success(),
        "comet --check on a good config: {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_rejects_bad_value_naming_the_key() {
    let out = check(&Config::default().set("browser", "poll_timeout_secs", "\"x\"").text());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--check accepted poll_timeout_secs = \"x\"");
    assert!(stderr.contains("poll_timeout_secs"), "stderr does not name the key:\n{stderr}");
}

#[test]
fn check_rejects_unknown_key_naming_it() {
    let out = check(&Config::default().set("browser", "pol_timeout_secs", "3").text());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--check accepted an unknown key");
    assert!(stderr.contains("pol_timeout_secs"), "stderr does not name the key:\n{stderr}");
}

#[test]
fn refuses_non_loopback_control_without_tokens() {
    let cfg = Config::default()
        .set("control", "listen", "\"0.0.0.0:0\"")
        .remove_section("control.tokens");
    let (dir, path) = write_config(&cfg.text());
    let out = run_comet(&[OsStr::new("--config"), path.as_os_str()], Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with an open control socket and no tokens:\n{stderr}");
    assert!(!stderr.contains("ready browser="), "got ready:\n{stderr}");
    let lower = stderr.to_lowercase();
    assert!(lower.contains("token"), "the refusal should say tokens are needed:\n{stderr}");
}

// =============================================================================================
// Shutdown
// =============================================================================================

#[test]
fn sigterm_answers_held_poll_with_503_and_exits_zero() {
    let mut d = Daemon::start();
    d.publish("stay", "seen");
    let seen = d.browser().request(&get("/sub/stay", &[]));
    let (lm, etag) = seen.cursor();
    let mut poll = hold(&d, "/sub/stay", &[("If-Modified-Since", &lm), ("If-None-Match", &etag)]);
    d.wait_held(1);

    let start = Instant::now();
    d.sigterm();
    let r = poll.response();
    assert_eq!(r.status, 503, "{r}");
    assert_eq!(r.must("Retry-After"), "1");
    assert_eq!(r.must("Last-Modified"), lm, "503 must echo the cursor");
    assert_eq!(r.must("Etag"), etag, "503 must echo the cursor");
    let status = d.wait_exit(Duration::from_secs(3).saturating_sub(start.elapsed()));
    match status {
        Some(st) => assert!(st.success(), "exit status {st:?}"),
        None => panic!("comet still running 3 s after SIGTERM"),
    }
}

#[test]
fn sigint_also_shuts_down_gracefully() {
    let mut d = Daemon::start();
    let mut poll = hold(&d, "/sub/int", &[]);
    d.wait_held(1);
    let st = Command::new("kill").arg("-INT").arg(d.pid().to_string()).status().expect("kill");
    assert!(st.success());
    let r = poll.response();
    assert_eq!(r.status, 503, "{r}");
    assert_eq!(r.must("Retry-After"), "1");
    assert_eq!(r.header("Last-Modified"), None, "no cursor to echo:\n{r}");
    match d.wait_exit(Duration::from_secs(3)) {
        Some(st) => assert!(st.success(), "exit status {st:?}"),
        None => panic!("comet still running 3 s after SIGINT"),
    }
}

// =============================================================================================
// Real clients
// =============================================================================================

fn require_tool(cmd: &str, check_args: &[&str], what: &str) {
    let ok = Command::new(cmd).args(check_args).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "`{cmd}` is missing: {what} (scripts/test installs it with apt-get)");
}

#[test]
fn redis_cli_publish_reaches_held_poll() {
    require_tool("redis-cli", &["--version"], "install redis-tools");
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/goods", &[]);
    d.wait_held(1);
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &d.control.port().to_string(), "-a", TOKEN, "--no-auth-warning"])
        .args(["PUBLISH", "goods", "from-redis-cli"])
        .output()
        .expect("run redis-cli");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "redis-cli failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "1", "redis-cli output");
    assert_text_message(&poll.response(), "from-redis-cli");
}

#[test]
fn php_redis_publish_reaches_held_poll() {
    require_tool("php", &["--version"], "install php-cli");
    let mods = Command::new("php").arg("-m").output().expect("php -m");
    assert!(
        String::from_utf8_lossy(&mods.stdout).lines().any(|l| l.trim().eq_ignore_ascii_case("redis")),
        "the phpredis extension is missing: install php-redis (scripts/test does)"
    );
    let d = Daemon::start();
    let mut poll = hold(&d, "/sub/goods", &[]);
    d.wait_held(1);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/php/publish.php");
    let out = Command::new("php")
        .arg(script)
        .args(["127.0.0.1", &d.control.port().to_string(), TOKEN, "goods", "from-php"])
        .output()
        .expect("run php");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "php failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    assert_eq!(stdout.trim(), "1", "publish.php output");
    assert_text_message(&poll.response(), "from-php");
}

