//! Operations and delivery details: the systemd notify protocol, metrics, the admin page's live
//! feed, multipart batches, `/comet.js`.

use crate::common::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

const BEARER: (&str, &str) = ("Authorization", "Bearer s3cret-token");

fn recv_state(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(ms(1)))).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let s = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = s == want;
                seen.push(s);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no {want:?} within {timeout:?}; got {seen:?}");
}

#[test]
fn systemd_notify_ready_watchdog_stopping() {
    let path = temp_dir().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let p = path.to_str().unwrap();
    let mut d = Daemon::start_with_env(&Config::default(), &[("NOTIFY_SOCKET", p), ("WATCHDOG_USEC", "200000")]);
    let seen = recv_state(&sock, "READY=1", ms(2000));
    assert_eq!(seen, ["READY=1"], "READY=1 first, once the listeners are open");
    // Half the watchdog interval: at least two pings within 400 ms.
    recv_state(&sock, "WATCHDOG=1", ms(1000));
    recv_state(&sock, "WATCHDOG=1", ms(1000));
    d.sigterm();
    recv_state(&sock, "STOPPING=1", ms(2000));
    assert!(d.wait_exit(Duration::from_secs(3)).is_some_and(|s| s.success()));
}

#[test]
fn no_watchdog_pings_for_another_pid() {
    let path = temp_dir().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let p = path.to_str().unwrap();
    let _d = Daemon::start_with_env(&Config::default(), &[("NOTIFY_SOCKET", p), ("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")]);
    recv_state(&sock, "READY=1", ms(2000));
    sock.set_read_timeout(Some(ms(400))).unwrap();
    let mut buf = [0u8; 64];
    assert!(sock.recv(&mut buf).is_err(), "WATCHDOG_PID names another process: no pings");
}

#[test]
fn metrics_and_status_json() {
    let d = Daemon::start();
    let mut poll = d.browser();
    poll.send(&get("/sub/goods", &[("Cookie", "PHPSESSID=m1")]));
    d.wait_held(1);
    let m = d.admin().request(&request("GET", "/metrics", &[BEARER], ""));
    assert_eq!(m.status, 200);
    assert!(m.must("Content-Type").starts_with("text/plain; version=0.0.4"));
    let text = m.text();
    for line in ["comet_held_polls 1", "comet_sessions_online 1", "comet_connections{listener=\"browser\"} 1", "comet_auth_check_seconds_count 0"] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    let s = d.admin().request(&request("GET", "/status", &[BEARER], ""));
    assert_eq!(s.must("Content-Type"), "application/json");
    assert!(s.text().contains("\"held_polls\":1,"), "{s}");
    assert!(s.text().contains("\"comet_version\":\"0.1.0\""), "{s}");
    d.publish("goods", "x");
    assert_eq!(poll.response().status, 200);
}

#[test]
fn admin_page_is_served_and_live_feed_pushes_snapshots() {
    let d = Daemon::start_with(&Config::default().set("browser", "poll_timeout_secs", "5"));
    let page = d.admin().request(&get("/", &[]));
    assert_eq!(page.status, 200);
    assert!(page.must("Content-Type").starts_with("text/html"));
    assert!(page.text().contains("/live"));
    // The feed needs the token.
    assert_eq!(d.admin().request(&get("/live", &[])).status, 401);
    let mut visitor = d.browser();
    visitor.send(&get("/sub/goods", &[("Cookie", "PHPSESSID=v1")]));
    d.wait_held(1);
    let mut live = d.admin();
    let first = live.request(&get("/live", &[BEARER]));
    assert_eq!(first.status, 200, "{first}");
    let body = first.text();
    assert!(body.contains("\"online\":[{\"sid\":\"v1\",\"user\":\"\"}]"), "{body}");
    assert!(body.contains("{\"name\":\"goods\",\"subscribers\":1}"), "{body}");
    // The next snapshot follows the cursor, about a second later.
    let (lm, et) = first.cursor();
    let t0 = Instant::now();
    let next = live.request(&get("/live", &[BEARER, ("If-Modified-Since", &lm), ("If-None-Match", &et)]));
    assert_eq!(next.status, 200);
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_ne!(next.cursor(), (lm, et));
    // Snapshots are not counted as messages, and browsers cannot read the admin channel.
    assert_eq!(d.info()["messages_published"], "0");
    assert_eq!(d.browser().request(&get("/sub/@admin", &[])).status, 400);
}

#[test]
fn multipart_batch_for_a_client_behind() {
    let d = Daemon::start();
    for i in 0..3 {
        d.publish("goods", &format!("m{i}"));
    }
    let mut c = d.browser();
    let r = c.request(&get("/sub/goods", &[("Accept", "multipart/mixed")]));
    assert_eq!(r.status, 200, "{r}");
    let ct = r.must("Content-Type").to_string();
    let boundary = ct.strip_prefix("multipart/mixed; boundary=").expect("multipart content type").to_string();
    let body = r.text();
    let parts: Vec<&str> = body.split(&format!("--{boundary}")).collect();
    // "", three parts, "--\r\n"
    assert_eq!(parts.len(), 5, "{body}");
    assert_eq!(parts[4], "--\r\n");
    for (i, part) in parts[1..4].iter().enumerate() {
        assert!(part.contains(&format!("Etag: {i}\r\n")), "{part}");
        assert!(part.ends_with(&format!("\r\n\r\nm{i}\r\n")), "{part:?}");
    }
    // The response's cursor is the last message's: the next poll waits for new messages.
    let (lm, et) = r.cursor();
    assert_eq!(et, "2");
    c.send(&get("/sub/goods", &[("If-Modified-Since", &lm), ("If-None-Match", &et), ("Accept", "multipart/mixed")]));
    c.expect_nothing(ms(300));
    d.publish("goods", "m3");
    let r = c.response();
    assert_eq!(r.text(), "m3", "a single new message comes plain");
    // Without the Accept header, one message per response, as before.
    let r = d.browser().request(&get("/sub/goods", &[]));
    assert_eq!(r.text(), "m0");
    // The query form.
    let r = d.browser().request(&get("/sub/goods?multipart=1", &[]));
    assert!(r.must("Content-Type").starts_with("multipart/mixed"));
}

#[test]
fn multipart_batch_mixes_copied_and_shared_parts() {
    // Small parts are copied into the answer's buffer, large ones (over 2 KiB) sent from the
    // message itself; the bytes must come out the same either way, in order, with the length
    // the head announced (the client reads exactly Content-Length).
    let d = Daemon::start();
    let sizes = [10usize, 5000, 20, 70_000, 2100, 1];
    let bodies: Vec<String> = sizes.iter().enumerate().map(|(i, &n)| format!("{i}:{}", "y".repeat(n))).collect();
    for b in &bodies {
        d.publish("mix", b);
    }
    let mut c = d.browser();
    let r = c.request(&get("/sub/mix?multipart=1", &[]));
    assert_eq!(r.status, 200);
    let boundary = r.must("Content-Type").strip_prefix("multipart/mixed; boundary=").expect("multipart").to_string();
    let body = r.text();
    let parts: Vec<&str> = body.split(&format!("--{boundary}")).collect();
    assert_eq!(parts.len(), bodies.len() + 2, "every message in one answer");
    for (part, want) in parts[1..=bodies.len()].iter().zip(&bodies) {
        assert!(part.ends_with(&format!("\r\n\r\n{want}\r\n")), "part of {} bytes garbled", want.len());
    }
    assert_eq!(parts[bodies.len() + 1], "--\r\n");
}

#[test]
fn client_js_is_served_with_caching() {
    let d = Daemon::start();
    let r = d.browser().request(&get("/comet.js", &[]));
    assert_eq!(r.status, 200);
    assert!(r.must("Content-Type").starts_with("application/javascript"));
    assert!(r.must("Cache-Control").contains("max-age="));
    assert!(!r.body.is_empty());
}

#[test]
fn brute_force_is_cut_per_connection_and_slowed_per_address() {
    let cfg = Config::default().set("limits", "auth_max_failures", "5").set("limits", "auth_penalty_secs", "2");
    let d = Daemon::start_with(&cfg);
    // Three wrong tokens close the connection.
    // (Pipelined, so the five failures land within one log-rate window.)
    let mut c = d.control();
    let mut raw = Vec::new();
    for i in 0..3 {
        raw.extend(encode_str(&["AUTH", &format!("guess{i}")]));
    }
    let mut c2 = d.control();
    c.send_raw(&raw);
    c2.send_raw(&[encode_str(&["AUTH", "guess3"]), encode_str(&["AUTH", "guess4"])].concat());
    for _ in 0..3 {
        let r = c.reply();
        assert!(r.to_string().starts_with("-WRONGPASS"), "{r}");
    }
    c.expect_closed();
    // Two more from the same address reach the limit: now even the right token is refused.
    c2.reply();
    c2.reply();
    let mut c = d.control();
    let r = c.cmd(&["AUTH", "s3cret-token"]);
    assert!(r.to_string().starts_with("-ERR too many failed AUTH attempts"), "{r}");
    // The admin listener shares the penalty.
    let r = d.admin().request(&request("GET", "/status", &[BEARER], ""));
    assert_eq!(r.status, 429, "{r}");
    assert!(r.header("Retry-After").is_some());
    // Log lines are rate-limited: five failures, far fewer "wrong token" lines. (The log reader
    // is a thread of the test: wait for the penalty line before counting.)
    let t0 = std::time::Instant::now();
    while !d.logs().iter().any(|l| l.contains("failed token checks")) && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(ms(20));
    }
    let wrong = d.logs().iter().filter(|l| l.contains("wrong token")).count();
    assert!((1..5).contains(&wrong), "{wrong} wrong-token lines:\n{}", d.logs().join("\n"));
    assert!(d.logs().iter().any(|l| l.contains("refused for 2 s after 5 failed token checks")));
    // After the penalty, the right token works again.
    std::thread::sleep(ms(2100));
    let mut c = d.control();
    assert_eq!(c.cmd(&["AUTH", "s3cret-token"]).to_string(), "+OK");
}

#[test]
fn client_js_revalidates_by_etag_and_answers_head() {
    let d = Daemon::start();
    let r = d.browser().request(&get("/comet.js", &[]));
    let etag = r.must("ETag").to_string();
    let again = d.browser().request(&get("/comet.js", &[("If-None-Match", &etag)]));
    assert_eq!(again.status, 304, "{again}");
    assert!(again.body.is_empty());
    let mut c = d.browser();
    c.send("HEAD /comet.js HTTP/1.1\r\nHost: x\r\n\r\n");
    // A HEAD answer has the GET's Content-Length and no body: the next response follows at once.
    c.send(&get("/comet.js", &[("If-None-Match", &etag)]));
    let mut buf = Vec::new();
    c.set_timeout(ms(500));
    let _ = std::io::Read::read_to_end(&mut c.stream, &mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains(&format!("Content-Length: {}\r\n", r.body.len())), "{text}");
    let second = text.find("HTTP/1.1 304").expect("the pipelined request is answered right after the head");
    assert!(text[..second].ends_with("\r\n\r\n"), "no body after the HEAD answer");
}

#[test]
fn a_reader_that_stops_reading_is_cut_after_idle_timeout() {
    let cfg = Config::default()
        .set("limits", "idle_timeout_secs", "1")
        .set("limits", "max_message_bytes", "1000000")
        .set("limits", "max_output_bytes", "64000000");
    let d = Daemon::start_with(&cfg);
    let mut sub = d.backend();
    assert!(sub.cmd(&["SUBSCRIBE", "firehose"]).to_string().starts_with("*3"));
    // Enough to fill the socket buffers, well under the output cap: only the clock can cut it.
    let mut b = d.backend();
    let big = "x".repeat(900_000);
    for _ in 0..20 {
        b.cmd(&["PUBLISH", "firehose", &big]);
    }
    let t0 = std::time::Instant::now();
    loop {
        if d.info()["slow_readers_cut"] == "1" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "the stuck subscriber was not cut:\n{}", d.logs().join("\n"));
        std::thread::sleep(ms(100));
    }
    assert!(d.logs().iter().any(|l| l.contains("read nothing of")));
    // A publisher that keeps going is not touched.
    assert_eq!(b.cmd(&["PUBLISH", "firehose", "x"]).to_string(), ":0");
}
