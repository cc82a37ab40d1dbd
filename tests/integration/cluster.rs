//! Several nodes as one service through a real redis-server (docs/protocol.md, "Cluster"): each
//! test starts its own redis-server on a free loopback port and three comet nodes with
//! `[cluster]`, and talks to them with raw HTTP and RESP, redis-cli and PHP's phpredis.

use super::presence::{eventually, Events};
use super::{after, assert_text_message, hold, require_tool};
use crate::common::*;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A redis-server of the test's own, on loopback, stopped on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: Option<std::path::PathBuf>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Redis {
    fn start() -> Redis {
        require_tool("redis-server", &["--version"], "install redis-server");
        let mut r = Redis { child: None, port: free_port(), dir: None };
        r.restart();
        r
    }

    /// One that saves its data in `dir` (`SAVE`), loaded again on restart.
    fn start_in(dir: &std::path::Path) -> Redis {
        let mut r = Redis { child: None, port: free_port(), dir: Some(dir.to_path_buf()) };
        r.restart();
        r
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    /// (Re)starts it on its port, empty, and waits until it answers.
    fn restart(&mut self) {
        let mut c = Command::new("redis-server");
        c.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--enable-debug-command", "local"]);
        if let Some(d) = &self.dir {
            c.arg("--dir").arg(d);
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {}", self.port);
            thread::sleep(ms(20));
        }
    }

    /// SIGKILL: gone at once, its data with it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn node_config(redis: &Redis, name: &str) -> Config {
    Config::default().set("cluster", "redis", &format!("\"127.0.0.1:{}\"", redis.port)).set("cluster", "node", &format!("\"{name}\""))
}

/// Waits (10 s at most) until the node says its link to Redis is up.
fn wait_linked(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = d.info();
        if info.get("cluster_link").map(String::as_str) == Some("up") {
            return;
        }
        assert!(Instant::now() < deadline, "node never linked to Redis: {info:?}");
        thread::sleep(ms(20));
    }
}

fn nodes(redis: &Redis, n: usize, tweak: impl Fn(Config) -> Config) -> Vec<Daemon> {
    let ds: Vec<Daemon> = (0..n).map(|i| Daemon::start_with(&tweak(node_config(redis, &format!("n{i}"))))).collect();
    for d in &ds {
        wait_linked(d);
    }
    ds
}

/// Waits until node `d` follows a channel live and holds `n` polls or streams on it.
fn wait_live(d: &Daemon, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = d.info();
        let live: usize = info.get("cluster_channels_live").and_then(|v| v.parse().ok()).unwrap_or(0);
        let count = |k: &str| -> usize { info.get(k).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let held = count("held_polls") + count("eventsource_streams") + count("websocket_streams");
        if live >= 1 && held >= n {
            return;
        }
        assert!(Instant::now() < deadline, "poll never held on a live channel: {info:?}");
        thread::sleep(ms(10));
    }
}

fn publish_reply(d: &Daemon, channel: &str, msg: &str) -> Reply {
    d.backend().cmd(&["PUBLISH", channel, msg])
}

/// `POST /pub?id=channel` on a node's admin listener.
fn post(d: &Daemon, channel: &str, body: &str) -> Response {
    let auth = format!("Bearer {TOKEN}");
    let req = request("POST", &format!("/pub?id={channel}"), &[("Authorization", &auth), ("Content-Type", "text/plain; charset=utf-8")], body);
    d.admin().request(&req)
}

#[test]
fn a_publish_on_one_node_reaches_polls_on_the_others_from_redis_cli_phpredis_and_post() {
    require_tool("redis-cli", &["--version"], "install redis-tools");
    let redis = Redis::start();
    let ns = nodes(&redis, 3, |c| c);

    // redis-cli on node 0 -> a poll on node 1.
    let mut poll = hold(&ns[1], "/sub/goods", &[]);
    wait_live(&ns[1], 1);
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &ns[0].control.port().to_string(), "-a", TOKEN, "--no-auth-warning", "PUBLISH", "goods", "from-redis-cli"])
        .output()
        .expect("run redis-cli");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "one node held the channel");
    let first = poll.response();
    assert_text_message(&first, "from-redis-cli");

    // phpredis on node 2 -> a poll on node 0 that resumes after the first message.
    require_tool("php", &["-r", "exit(class_exists('Redis') ? 0 : 1);"], "install php-cli php-redis");
    let cursor = after(&first);
    let hdrs: Vec<(&str, &str)> = cursor.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut poll = hold(&ns[0], "/sub/goods", &hdrs);
    wait_live(&ns[0], 1);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/php/publish.php");
    let out = Command::new("php").args([script, "127.0.0.1", &ns[2].control.port().to_string(), TOKEN, "goods", "from-php"]).output().expect("run php");
    assert!(out.status.success(), "php: {}", String::from_utf8_lossy(&out.stderr));
    let second = poll.response();
    assert_text_message(&second, "from-php");
    assert!(second.message_id() > first.message_id(), "ids increase across nodes");

    // POST /pub on node 1 -> a poll on node 2, which never saw the channel: the POST's answer
    // names the id Redis gave.
    let cursor = after(&second);
    let hdrs: Vec<(&str, &str)> = cursor.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut poll = hold(&ns[2], "/sub/goods", &hdrs);
    wait_live(&ns[2], 1);
    let r = post(&ns[1], "goods", "from-post");
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.text().contains("queued messages: 3"), "{}", r.text());
    let third = poll.response();
    assert_text_message(&third, "from-post");
    let (t, tag) = third.message_id();
    assert!(r.text().contains(&format!("last message id: {t}:{tag}")), "{}", r.text());

    // The same message has the same id on every node: a poll from the start on node 0 sees the
    // three in order with the ids the others saw.
    let mut ids = Vec::new();
    let mut hdrs: Vec<(String, String)> = Vec::new();
    for _ in 0..3 {
        let h: Vec<(&str, &str)> = hdrs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = ns[0].browser().request(&get("/sub/goods", &h));
        assert_eq!(r.status, 200);
        ids.push(r.message_id());
        hdrs = after(&r).to_vec();
    }
    assert_eq!(ids, [first.message_id(), second.message_id(), third.message_id()]);
}

#[test]
fn a_subscriber_alternating_nodes_gets_500_messages_from_random_nodes_in_order_once() {
    let redis = Redis::start();
    let ns = nodes(&redis, 3, |c| c.set("channels", "buffer_length", "1000"));
    let controls: Vec<_> = ns.iter().map(|d| d.control).collect();
    const N: usize = 500;
    let publisher = thread::spawn(move || {
        let mut rng = Rng::new(15);
        let mut conns: Vec<Resp> = controls.iter().map(|&a| {
            let mut r = Resp::connect(a);
            assert_eq!(r.cmd(&["AUTH", TOKEN]).to_string(), "+OK");
            r
        }).collect();
        for i in 0..N {
            let k = rng.below(conns.len());
            match conns[k].cmd(&["PUBLISH", "feed", &format!("m{i}")]) {
                Reply::Integer(_) => {}
                other => panic!("publish m{i} on node {k}: {other}"),
            }
            if rng.one_in(20) {
                thread::sleep(ms(2));
            }
        }
    });
    let mut got: Vec<String> = Vec::new();
    let mut ids: Vec<(u64, u64)> = Vec::new();
    let mut hdrs: Vec<(String, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut poll_no = 0;
    while got.len() < N {
        assert!(Instant::now() < deadline, "only {} of {N} messages after 60 s", got.len());
        let d = &ns[poll_no % ns.len()];
        poll_no += 1;
        let h: Vec<(&str, &str)> = hdrs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = d.browser().request(&get("/sub/feed", &h));
        match r.status {
            200 => {
                got.push(r.text());
                ids.push(r.message_id());
                hdrs = after(&r).to_vec();
            }
            408 => {}
            s => panic!("poll answered {s}: {}", r.text()),
        }
    }
    publisher.join().unwrap();
    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message, in order, once");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids strictly increase");
}

#[test]
fn a_cursor_resumes_on_a_node_that_never_saw_the_channel_and_skipped_is_still_said() {
    let redis = Redis::start();
    let ns = nodes(&redis, 3, |c| c.set("channels", "buffer_length", "3"));
    for i in 0..2 {
        assert_eq!(publish_reply(&ns[0], "quiet", &format!("q{i}")).to_string(), ":0", "no node follows it yet");
    }
    // Node 2 never saw the channel: it fetches the buffer and answers from it.
    let first = ns[2].browser().request(&get("/sub/quiet", &[]));
    assert_text_message(&first, "q0");
    let c = after(&first);
    let r = ns[2].browser().request(&get("/sub/quiet", &[(&c[0].0, &c[0].1), (&c[1].0, &c[1].1)]));
    assert_text_message(&r, "q1");
    // Four more: the buffer keeps three, so a cursor at q0 has missed some.
    for i in 2..6 {
        publish_reply(&ns[1], "quiet", &format!("q{i}"));
    }
    let r = ns[1].browser().request(&get("/sub/quiet", &[(&c[0].0, &c[0].1), (&c[1].0, &c[1].1)]));
    assert_text_message(&r, "q3");
    assert_eq!(r.header("X-Comet-Skipped"), Some("1"), "the cursor is older than the buffer");
    // Node 2 follows the channel now and got the new ones by subscription: same answer.
    let r2 = ns[2].browser().request(&get("/sub/quiet", &[(&c[0].0, &c[0].1), (&c[1].0, &c[1].1)]));
    assert_text_message(&r2, "q3");
    assert_eq!(r2.header("X-Comet-Skipped"), Some("1"));
    assert_eq!(r2.message_id(), r.message_id());
}

#[test]
fn sessions_open_close_and_private_messages_work_across_nodes() {
    let redis = Redis::start();
    let ns = nodes(&redis, 3, |c| c);
    assert_eq!(ns[0].backend().cmd(&["SESSION.OPEN", "sid42", "42"]).to_string(), "+OK");
    let cookie = [("Cookie", "PHPSESSID=sid42")];
    // Opened on node 0, polled on node 1; a publish to the private channel on node 2 reaches it.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut poll = loop {
        // The open reaches node 1 through Redis a moment later.
        let mut p = hold(&ns[1], "/sub/@me", &cookie);
        p.set_timeout(ms(300));
        match p.try_response() {
            Ok(r) if r.status == 403 && Instant::now() < deadline => continue,
            Ok(r) => panic!("poll on @me answered {} {}", r.status, r.text()),
            Err(_) => break p,
        }
    };
    poll.set_timeout(READ_TIMEOUT);
    wait_live(&ns[1], 1);
    assert_eq!(publish_reply(&ns[2], "session:sid42", "for-you").to_string(), ":1");
    let r = poll.response();
    assert_text_message(&r, "for-you");
    // Held again on node 1, then closed on node 0: 410 at once.
    let c = after(&r);
    let mut poll = hold(&ns[1], "/sub/@me", &[cookie[0], (&c[0].0, &c[0].1), (&c[1].0, &c[1].1)]);
    ns[1].wait_held(1);
    let t0 = Instant::now();
    assert_eq!(ns[0].backend().cmd(&["SESSION.CLOSE", "sid42"]).to_string(), ":1");
    let r = poll.response();
    assert_eq!(r.status, 410, "{}", r.text());
    assert!(t0.elapsed() < Duration::from_secs(1), "410 at once, not at the poll timeout");
    // Closed everywhere: node 2 refuses the private channel too.
    let r = ns[2].browser().request(&get("/sub/@me", &cookie));
    assert_eq!(r.status, 403, "{}", r.text());
    // A KICK on node 2 ends a poll held on node 0.
    assert_eq!(ns[1].backend().cmd(&["SESSION.OPEN", "sid43"]).to_string(), "+OK");
    thread::sleep(ms(100));
    let mut poll = hold(&ns[0], "/sub/goods", &[("Cookie", "PHPSESSID=sid43")]);
    ns[0].wait_held(1);
    assert_eq!(ns[2].backend().cmd(&["KICK", "sid43"]).to_string(), ":0", "no poll of it on node 2");
    assert_eq!(poll.response().status, 410);
    let r = ns[1].browser().request(&get("/sub/goods", &[("Cookie", "PHPSESSID=sid43")]));
    assert_eq!(r.status, 403, "kicked on every node: {}", r.text());
}

#[test]
fn delete_on_one_node_ends_polls_on_every_node() {
    let redis = Redis::start();
    let ns = nodes(&redis, 3, |c| c);
    publish_reply(&ns[0], "doomed", "m0");
    let first = ns[1].browser().request(&get("/sub/doomed", &[]));
    assert_text_message(&first, "m0");
    let c = after(&first);
    let hdrs = [(c[0].0.as_str(), c[0].1.as_str()), (c[1].0.as_str(), c[1].1.as_str())];
    let mut p1 = hold(&ns[1], "/sub/doomed", &hdrs);
    let mut p2 = hold(&ns[2], "/sub/doomed", &hdrs);
    ns[1].wait_held(1);
    ns[2].wait_held(1);
    let req = request("DELETE", "/pub?id=doomed", &[("Authorization", &format!("Bearer {TOKEN}"))], "");
    let r = ns[0].admin().request(&req);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(p1.response().status, 410);
    assert_eq!(p2.response().status, 410);
    assert_eq!(redis.cli(&["EXISTS", "comet:b:doomed", "comet:i:doomed"]), "0", "gone from Redis too");
    let r = ns[2].admin().request(&request("GET", "/pub?id=doomed", &[("Authorization", &format!("Bearer {TOKEN}"))], ""));
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn redis_killed_and_restarted_publishes_fail_visibly_held_polls_stay_and_delivery_resumes() {
    let mut redis = Redis::start();
    let ns = nodes(&redis, 3, |c| c.set("browser", "poll_timeout_secs", "30"));
    // A session and a message from before the outage.
    assert_eq!(ns[0].backend().cmd(&["SESSION.OPEN", "keep", "7"]).to_string(), "+OK");
    publish_reply(&ns[0], "ids", "before");
    let before = ns[1].browser().request(&get("/sub/ids", &[]));
    assert_text_message(&before, "before");
    let mut polls: Vec<Http> = (0..3).map(|i| hold(&ns[i], "/sub/steady", &[])).collect();
    for d in &ns {
        wait_live(d, 1);
    }
    redis.kill();
    // Every node sees the loss (at the latest at its next command); publishes now fail visibly.
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in &ns {
        loop {
            match publish_reply(d, "steady", "lost") {
                Reply::Error(e) => {
                    assert!(e.starts_with("TRYAGAIN"), "{e}");
                    break;
                }
                other => assert!(Instant::now() < deadline, "publish during the outage answered {other}"),
            }
            thread::sleep(ms(20));
        }
    }
    let r = post(&ns[1], "steady", "lost");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("Retry-After").is_some());
    // The held polls stay held: no answer, no error.
    for p in polls.iter_mut() {
        p.expect_nothing(ms(300));
    }
    let info = ns[0].info();
    assert_ne!(info["cluster_link"], "up");
    assert!(!info["cluster_last_error"].is_empty());
    redis.restart();
    for d in &ns {
        wait_linked(d);
        // Resubscribed and fetched again.
        wait_live(d, 1);
    }
    assert_eq!(publish_reply(&ns[2], "steady", "back").to_string(), ":3", "every node follows the channel again");
    for p in polls.iter_mut() {
        assert_text_message(&p.response(), "back");
    }
    assert!(ns[0].info()["cluster_reconnects"].parse::<u64>().unwrap() >= 1);
    // Redis came back empty: the nodes wrote back the open session, and the channel's ids go on
    // after the ones browsers already hold (even within the same second).
    assert_eq!(redis.cli(&["HGET", "comet:sessions", "keep"]), "=7");
    // Still open on every node: its private channel is held, not refused with 403.
    hold(&ns[2], "/sub/@me", &[("Cookie", "PHPSESSID=keep")]).expect_nothing(ms(300));
    let c = after(&before);
    let mut poll = hold(&ns[1], "/sub/ids", &[(&c[0].0, &c[0].1), (&c[1].0, &c[1].1)]);
    ns[1].wait_held(1);
    publish_reply(&ns[2], "ids", "after");
    let r = poll.response();
    assert_text_message(&r, "after");
    assert!(r.message_id() > before.message_id());
}

#[test]
fn a_node_killed_with_sigkill_loses_nothing_for_browsers_that_move_to_another_node() {
    let redis = Redis::start();
    let ns = nodes(&redis, 3, |c| c.set("channels", "buffer_length", "200"));
    let mut got = Vec::new();
    let mut hdrs: Vec<(String, String)> = Vec::new();
    let mut next = 0;
    let poll_on = |d: &Daemon, hdrs: &mut Vec<(String, String)>, got: &mut Vec<String>| {
        let h: Vec<(&str, &str)> = hdrs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = d.browser().request(&get("/sub/life", &h));
        if r.status == 200 {
            got.push(r.text());
            *hdrs = after(&r).to_vec();
        }
    };
    for _ in 0..10 {
        publish_reply(&ns[0], "life", &format!("m{next}"));
        next += 1;
        poll_on(&ns[1], &mut hdrs, &mut got);
    }
    // The node the browser polls dies mid-stream; messages go on being published meanwhile.
    let st = Command::new("kill").args(["-KILL", &ns[1].pid().to_string()]).status().unwrap();
    assert!(st.success());
    for _ in 0..10 {
        publish_reply(&ns[0], "life", &format!("m{next}"));
        next += 1;
    }
    // The browser's next polls land on node 2 with its cursor.
    while got.len() < next {
        let before = got.len();
        poll_on(&ns[2], &mut hdrs, &mut got);
        assert!(got.len() > before, "node 2 held a poll that had messages waiting");
    }
    let want: Vec<String> = (0..next).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
}

#[test]
fn malformed_messages_on_comets_redis_channels_are_counted_and_skipped() {
    let redis = Redis::start();
    let ns = nodes(&redis, 1, |c| c);
    let mut poll = hold(&ns[0], "/sub/safe", &[]);
    wait_live(&ns[0], 1);
    for junk in ["garbage", "1:0\nbad channel\nt\nbody", "99999999999999999999999:0\nsafe\nt\nb", "frobnicate\nx"] {
        redis.cli(&["PUBLISH", "comet:m:safe", junk]);
        redis.cli(&["PUBLISH", "comet:ctl", junk]);
    }
    poll.expect_nothing(ms(200));
    let info = ns[0].info();
    assert_eq!(info["cluster_malformed_messages"], "8", "{info:?}");
    assert_eq!(info["cluster_link"], "up");
    assert!(ns[0].logs().iter().filter(|l| l.contains("malformed message from Redis")).count() == 1, "logged once per 10 s");
    assert_eq!(publish_reply(&ns[0], "safe", "still-fine").to_string(), ":1");
    assert_text_message(&poll.response(), "still-fine");
}

#[test]
fn a_redis_that_answers_garbage_or_closes_mid_reply_makes_the_node_reconnect_not_crash() {
    // A fake Redis: accepts, reads, then answers garbage, or half a reply and closes.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    thread::spawn(move || {
        for (i, s) in l.incoming().enumerate() {
            let Ok(mut s) = s else { continue };
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                let _ = s.set_read_timeout(Some(ms(500)));
                let _ = s.read(&mut buf);
                let _ = s.write_all(if i % 2 == 0 { b"!garbage\r\n" } else { b"*3\r\n$7\r\nmess" });
            });
        }
    });
    let cfg = Config::default().set("cluster", "redis", &format!("\"127.0.0.1:{port}\"")).set("cluster", "node", "\"lonely\"");
    let d = Daemon::start_with(&cfg);
    let deadline = Instant::now() + Duration::from_secs(5);
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < 6 {
        assert!(Instant::now() < deadline, "the node did not reconnect");
        thread::sleep(ms(20));
    }
    let info = d.info();
    assert_ne!(info["cluster_link"], "up");
    let r = publish_reply(&d, "x", "y");
    assert!(r.to_string().starts_with("-TRYAGAIN"), "{r}");
    // Polls wait (held until the timeout), the node still answers everything else.
    let r = d.browser().request(&get("/sub/x", &[]));
    assert_eq!(r.status, 408);
    assert_eq!(d.admin().request(&get("/status", &[("Authorization", &format!("Bearer {TOKEN}"))])).status, 200);
}

#[test]
fn pipelined_commands_keep_their_order_when_some_go_to_redis() {
    let redis = Redis::start();
    let ns = nodes(&redis, 1, |c| c);
    let mut b = ns[0].backend();
    let mut bytes = Vec::new();
    for args in [&["PUBLISH", "p", "1"][..], &["PING"], &["PUBLISH", "bad channel", "x"], &["PUBLISH", "p", "2"], &["ECHO", "e"], &["SESSION.OPEN", "s1"], &["INFO", "x"]] {
        bytes.extend(encode_str(args));
    }
    b.send_raw(&bytes);
    let replies: Vec<String> = (0..7).map(|_| b.reply().to_string()).collect();
    assert_eq!(replies[..6], [":0", "+PONG", "-ERR invalid channel id", ":0", "$e", "+OK"]);
    assert!(replies[6].contains("cluster_enabled:1"));
    // The two were stored in order with increasing ids.
    let r = ns[0].browser().request(&get("/sub/p", &[]));
    assert_text_message(&r, "1");
    let c = after(&r);
    let r2 = ns[0].browser().request(&get("/sub/p", &[(&c[0].0, &c[0].1), (&c[1].0, &c[1].1)]));
    assert_text_message(&r2, "2");
}

#[test]
fn a_node_starts_while_redis_is_down_and_links_when_it_comes() {
    let mut redis = Redis::start();
    redis.kill();
    let d = Daemon::start_with(&node_config(&redis, "early"));
    assert_ne!(d.info()["cluster_link"], "up");
    assert_eq!(d.admin().request(&get("/status", &[("Authorization", &format!("Bearer {TOKEN}"))])).status, 200);
    redis.restart();
    wait_linked(&d);
    assert!(d.logs().iter().any(|l| l.contains("linked to Redis")));
}

#[test]
fn streams_on_one_node_get_publishes_from_another() {
    let redis = Redis::start();
    let ns = nodes(&redis, 2, |c| c);
    let mut es = ns[1].browser();
    es.send(&get("/sub/live", &[("Accept", "text/event-stream")]));
    wait_live(&ns[1], 1);
    assert_eq!(publish_reply(&ns[0], "live", "over-es").to_string(), ":1");
    es.set_timeout(READ_TIMEOUT);
    let mut seen = Vec::new();
    let deadline = Instant::now() + READ_TIMEOUT;
    while !String::from_utf8_lossy(&seen).contains("data: over-es") {
        assert!(Instant::now() < deadline, "no event: {}", String::from_utf8_lossy(&seen));
        let mut buf = [0u8; 4096];
        let n = std::io::Read::read(&mut es.stream, &mut buf).unwrap();
        assert!(n > 0, "stream closed");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
}

// ---- who is online across the cluster, control from any node (docs/protocol.md, "Cluster") ----

fn presence_nodes(redis: &Redis, n: usize, grace: u64) -> Vec<Daemon> {
    nodes(redis, n, |c| c.set("presence", "grace_secs", &grace.to_string()).set("browser", "poll_timeout_secs", "30"))
}

fn online(d: &Daemon) -> String {
    d.backend().cmd(&["ONLINE"]).to_string()
}

#[test]
fn sessions_on_different_nodes_are_listed_together_on_a_third() {
    let redis = Redis::start();
    let ns = presence_nodes(&redis, 3, 15);
    ns[0].backend().cmd(&["SESSION.OPEN", "sa", "alice"]);
    ns[1].backend().cmd(&["SESSION.OPEN", "sb", "bob"]);
    thread::sleep(ms(100));
    let _a = hold(&ns[0], "/sub/room", &[("Cookie", "PHPSESSID=sa")]);
    let _b = hold(&ns[1], "/sub/room", &[("Cookie", "PHPSESSID=sb")]);
    let _anon = hold(&ns[1], "/sub/room", &[]);
    let _other = hold(&ns[0], "/sub/hall", &[]);
    eventually("ONLINE on node 2 lists both", Duration::from_secs(5), || {
        let got = online(&ns[2]);
        (got == "*4[$sa, $alice, $sb, $bob]").then_some(()).ok_or(got)
    });
    let mut b = ns[2].backend();
    assert_eq!(b.cmd(&["ONLINE", "COUNT"]).to_string(), ":2");
    assert_eq!(b.cmd(&["PRESENCE", "room"]).to_string(), "*4[$sa, $alice, $sb, $bob]");
    assert_eq!(b.cmd(&["PRESENCE", "nowhere"]).to_string(), "*0");
    // Anonymous polls are counted once a second.
    eventually("NUMSUB counts the anonymous polls too", Duration::from_secs(3), || {
        let got = ns[2].backend().cmd(&["PUBSUB", "NUMSUB", "room", "hall", "nowhere"]).to_string();
        (got == "*6[$room, :3, $hall, :1, $nowhere, :0]").then_some(()).ok_or(got)
    });
    assert_eq!(b.cmd(&["PUBSUB", "CHANNELS"]).to_string(), "*2[$hall, $room]");
    assert_eq!(b.cmd(&["PUBSUB", "CHANNELS", "r*"]).to_string(), "*1[$room]");
    assert_eq!(b.cmd(&["PUBSUB", "FROB"]).to_string(), "-ERR unknown subcommand or wrong number of arguments for 'pubsub|frob'");
    let info = ns[2].info();
    assert_eq!(info["cluster_nodes_alive"], "3");
    assert_eq!(info["cluster_sessions_online"], "2");
    assert!(!info["cluster_rtt_ms"].is_empty());
    let m = ns[2].admin().request(&get("/metrics", &[("Authorization", &format!("Bearer {TOKEN}"))])).text();
    assert!(m.contains("comet_cluster_nodes 3"), "{m}");
    assert!(m.contains("comet_cluster_link_up 1"), "{m}");
    // The admin page's feed shows the cluster's nodes and who is online across them.
    let auth = format!("Bearer {TOKEN}");
    let r = ns[2].admin().request(&get("/live", &[("Authorization", &auth)]));
    assert_eq!(r.status, 200);
    let snap = r.text();
    assert!(snap.contains(r#""cluster":{"node":"n2","link":"up","nodes":["n0","n1","n2"]}"#), "{snap}");
    assert!(snap.contains(r#""online_count":2"#) && snap.contains(r#"{"sid":"sa","user":"alice"}"#) && snap.contains(r#"{"sid":"sb","user":"bob"}"#), "{snap}");
}

#[test]
fn alternating_polls_make_one_online_event_and_no_flap_and_one_offline_after_the_grace() {
    let redis = Redis::start();
    let ns = presence_nodes(&redis, 3, 2);
    let events = Events::subscribe(&ns[2]);
    thread::sleep(ms(100));
    let cookie = [("Cookie", "PHPSESSID=roamer")];
    // Each poll is answered by a publish, the next goes to the other node.
    let mut hdrs: Vec<(String, String)> = Vec::new();
    for i in 0..6 {
        let d = &ns[i % 2];
        let mut h: Vec<(&str, &str)> = hdrs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        h.push(cookie[0]);
        let mut p = hold(d, "/sub/lobby", &h);
        wait_live(d, 1);
        publish_reply(&ns[2], "lobby", &format!("m{i}"));
        let r = p.response();
        assert_eq!(r.status, 200);
        hdrs = after(&r).to_vec();
        thread::sleep(ms(150));
    }
    events.expect(&["online roamer", "join roamer lobby"], Duration::from_secs(3));
    events.expect_quiet(ms(500), "while the session keeps polling on either node");
    // Gone from both: one leave and one offline, after the grace.
    events.expect(&["leave roamer lobby", "offline roamer"], Duration::from_secs(5));
    events.expect_quiet(ms(500), "nothing twice");
}

#[test]
fn a_killed_nodes_sessions_go_offline_after_the_node_timeout_and_grace_once() {
    let redis = Redis::start();
    let ns = presence_nodes(&redis, 3, 1);
    let events = Events::subscribe(&ns[0]);
    ns[0].backend().cmd(&["SESSION.OPEN", "doomed", "7"]);
    thread::sleep(ms(100));
    let _p = hold(&ns[1], "/sub/room", &[("Cookie", "PHPSESSID=doomed")]);
    events.expect(&["online doomed 7", "join doomed room"], Duration::from_secs(3));
    // Also on a surviving node: it must stay online.
    let _q = hold(&ns[2], "/sub/room", &[("Cookie", "PHPSESSID=kept")]);
    events.expect(&["online kept", "join kept room"], Duration::from_secs(3));
    // The node timeout counts from a node's link being up that long: wait for it.
    thread::sleep(Duration::from_secs(6));
    let killed = Instant::now();
    assert!(Command::new("kill").args(["-KILL", &ns[1].pid().to_string()]).status().unwrap().success());
    let mut b = ns[0].backend();
    thread::sleep(Duration::from_secs(3));
    assert_eq!(b.cmd(&["PRESENCE", "room"]).to_string(), "*4[$doomed, $7, $kept, $]", "still counted before the timeout");
    let t = events.expect(&["leave doomed room", "offline doomed"], Duration::from_secs(8));
    let took = t[1].duration_since(killed);
    assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(9), "offline {took:?} after the kill (5 s + 1 s grace + a heartbeat)");
    assert_eq!(b.cmd(&["PRESENCE", "room"]).to_string(), "*2[$kept, $]");
    eventually("node 2's heartbeat sees two nodes", Duration::from_secs(3), || {
        let n = ns[2].info()["cluster_nodes_alive"].clone();
        (n == "2").then_some(()).ok_or(n)
    });
    events.expect_quiet(ms(1500), "one offline, from one node only");
}

#[test]
fn join_kick_and_signed_keys_work_from_any_node() {
    let redis = Redis::start();
    let ns = nodes(&redis, 3, |c| c.set("auth", "key_secret", "\"0123456789abcdef0123\"").set("auth", "mode", "\"key\""));
    let mut b0 = ns[0].backend();
    assert_eq!(b0.cmd(&["SESSION.OPEN", "vis"]).to_string(), "+OK");
    assert_eq!(b0.cmd(&["JOIN", "nobody", "goods"]).to_string(), "-ERR no such session: open it with SESSION.OPEN first");
    assert_eq!(b0.cmd(&["JOIN", "vis", "goods"]).to_string(), ":1");
    assert_eq!(b0.cmd(&["JOIN", "vis", "goods"]).to_string(), ":0");
    thread::sleep(ms(100));
    // Its private channel polled on node 1 gets what is published to goods on node 2.
    let mut p = hold(&ns[1], "/sub/@me", &[("Cookie", "PHPSESSID=vis")]);
    wait_live(&ns[1], 1);
    publish_reply(&ns[2], "goods", "copied");
    let r = p.response();
    assert_text_message(&r, "copied");
    assert_eq!(r.header("X-Comet-Channel"), Some("goods"));
    // LEAVE on node 2: no more copies.
    assert_eq!(ns[2].backend().cmd(&["LEAVE", "vis", "goods"]).to_string(), ":1");
    thread::sleep(ms(100));
    let c = after(&r);
    let mut p = hold(&ns[1], "/sub/@me", &[("Cookie", "PHPSESSID=vis"), (&c[0].0, &c[0].1), (&c[1].0, &c[1].1)]);
    publish_reply(&ns[0], "goods", "not-copied");
    p.expect_nothing(ms(300));
    // KICK on node 0 ends that poll on node 1.
    ns[0].backend().cmd(&["KICK", "vis"]);
    assert_eq!(p.response().status, 410);
    // A key signed on node 2 opens the channel on node 0.
    let q = match ns[2].backend().cmd(&["SIGN", "secret-room"]) {
        Reply::Bulk(Some(b)) => String::from_utf8(b).unwrap(),
        other => panic!("SIGN: {other}"),
    };
    publish_reply(&ns[1], "secret-room", "signed");
    let r = ns[0].browser().request(&get(&format!("/sub/secret-room?{q}"), &[]));
    assert_text_message(&r, "signed");
    assert_eq!(ns[0].browser().request(&get("/sub/secret-room", &[])).status, 403);
}

#[test]
fn the_presence_table_filled_by_three_nodes_matches_online() {
    let redis = Redis::start();
    let dir = Scratch::new();
    let db = dir.path().join("app.db");
    let ns = nodes(&redis, 3, |c| c.set("presence", "database", &format!("{:?}", db.display().to_string())).set("browser", "poll_timeout_secs", "30"));
    let mut polls = Vec::new();
    for i in 0..9 {
        polls.push(hold(&ns[i % 3], "/sub/room", &[("Cookie", &format!("PHPSESSID=s{i}"))]));
    }
    // s0 also on a second node.
    polls.push(hold(&ns[1], "/sub/hall", &[("Cookie", "PHPSESSID=s0")]));
    let want: Vec<String> = (0..9).map(|i| format!("s{i}")).collect();
    eventually("ONLINE has all nine", Duration::from_secs(5), || {
        let got = online(&ns[0]);
        (got.matches("$s").count() == 9).then_some(()).ok_or(got)
    });
    let rows = eventually("the rows have all nine", Duration::from_secs(5), || {
        let c = rusqlite::Connection::open(&db).map_err(|e| e.to_string())?;
        let mut st = c.prepare("SELECT DISTINCT session FROM comet_online WHERE channel = '' ORDER BY session").map_err(|e| e.to_string())?;
        let rows: Vec<String> = st.query_map([], |r| r.get(0)).map_err(|e| e.to_string())?.map(Result::unwrap).collect();
        (rows == want).then_some(rows.clone()).ok_or(format!("{rows:?}"))
    });
    assert_eq!(rows, want);
    let c = rusqlite::Connection::open(&db).unwrap();
    let daemons: Vec<String> =
        c.prepare("SELECT DISTINCT daemon FROM comet_online ORDER BY daemon").unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    assert_eq!(daemons, ["n0", "n1", "n2"], "each node's rows under its name");
}

#[test]
fn redis_restarted_with_or_without_its_data_announces_no_one_offline_or_online_again() {
    let dir = Scratch::new();
    let mut redis = Redis::start_in(dir.path());
    let ns = presence_nodes(&redis, 2, 15);
    let events = Events::subscribe(&ns[1]);
    ns[0].backend().cmd(&["SESSION.OPEN", "stay", "1"]);
    thread::sleep(ms(100));
    // One after the other: events are in order per session, not across nodes.
    let _p = hold(&ns[0], "/sub/room", &[("Cookie", "PHPSESSID=stay")]);
    events.expect(&["online stay 1", "join stay room"], Duration::from_secs(3));
    let _q = hold(&ns[1], "/sub/room", &[("Cookie", "PHPSESSID=also")]);
    events.expect(&["online also", "join also room"], Duration::from_secs(3));
    for keep in [true, false] {
        if keep {
            assert_eq!(redis.cli(&["SAVE"]), "OK");
        } else {
            let _ = std::fs::remove_file(dir.path().join("dump.rdb"));
        }
        redis.kill();
        thread::sleep(ms(300));
        redis.restart();
        for d in &ns {
            wait_linked(d);
        }
        // The subscriber's node resubscribed to the events channel too; give the shares time.
        events.expect_quiet(Duration::from_secs(2), if keep { "Redis restarted with its data" } else { "Redis restarted empty" });
        eventually("both still online", Duration::from_secs(3), || {
            let got = online(&ns[1]);
            (got == "*4[$also, $, $stay, $1]").then_some(()).ok_or(got)
        });
        assert_eq!(redis.cli(&["HGET", "comet:sessions", "stay"]), "=1", "the open session is kept");
    }
}

#[test]
fn a_stopped_or_slow_redis_delays_no_delivery_of_messages_already_on_the_node() {
    let redis = Redis::start();
    let ns = presence_nodes(&redis, 2, 15);
    for i in 0..3 {
        publish_reply(&ns[0], "held", &format!("m{i}"));
    }
    let first = ns[1].browser().request(&get("/sub/held", &[]));
    assert_text_message(&first, "m0");
    let c = after(&first);
    let cursor = [(c[0].0.as_str(), c[0].1.as_str()), (c[1].0.as_str(), c[1].1.as_str())];
    let events = Events::subscribe(&ns[1]);
    let _p = hold(&ns[1], "/sub/held", &[("Cookie", "PHPSESSID=poller")]);
    events.expect(&["online poller", "join poller held"], Duration::from_secs(3));
    // A command that takes Redis 2 s, then Redis stopped outright for 2 s.
    let port = redis.port.to_string();
    let mut slow = Some(thread::spawn(move || Command::new("redis-cli").args(["-p", &port, "DEBUG", "SLEEP", "2"]).output().unwrap()));
    thread::sleep(ms(200));
    for what in ["slow", "stopped"] {
        if what == "stopped" {
            let out = slow.take().unwrap().join().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK", "DEBUG SLEEP ran: {}", String::from_utf8_lossy(&out.stderr));
            redis.signal("-STOP");
        }
        let t = Instant::now();
        let r = ns[1].browser().request(&get("/sub/held", &cursor));
        assert_text_message(&r, "m1");
        assert!(t.elapsed() < ms(500), "{what} Redis: answered from the node's buffer in {:?}", t.elapsed());
        assert_eq!(ns[1].admin().request(&get("/status", &[("Authorization", &format!("Bearer {TOKEN}"))])).status, 200);
    }
    thread::sleep(Duration::from_secs(2));
    redis.signal("-CONT");
    // Back: publishing works again, and no one flapped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match publish_reply(&ns[0], "held", "m3") {
            Reply::Integer(_) => break,
            other => assert!(Instant::now() < deadline, "publish after SIGCONT: {other}"),
        }
        thread::sleep(ms(100));
    }
    events.expect_quiet(Duration::from_secs(1), "a short stop of Redis");
}

#[test]
fn nodes_with_reuse_port_share_one_browser_port() {
    let redis = Redis::start();
    let port = free_port();
    let ns = nodes(&redis, 2, |c| c.set("browser", "listen", &format!("\"127.0.0.1:{port}\"")).set("browser", "reuse_port", "true"));
    assert!(ns.iter().all(|d| d.browser.port() == port));
    // The kernel spreads connections over both.
    for _ in 0..40 {
        let r = Http::connect(ns[0].browser).request(&get("/comet.js", &[]));
        assert_eq!(r.status, 200);
    }
    let counts: Vec<u64> = ns.iter().map(|d| d.info()["total_connections_received"].parse().unwrap()).collect();
    assert!(counts.iter().all(|&n| n >= 5), "connections per node: {counts:?}");
    // Without reuse_port another bind of the port fails with a clear error.
    let (dir, path) = write_config(&Config::default().set("browser", "listen", &format!("\"127.0.0.1:{port}\"")).text());
    let out = run_comet(&[std::ffi::OsStr::new("--config"), path.as_os_str()], Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("browser.listen: cannot listen"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_node_subscribes_on_the_first_poll_and_unsubscribes_a_while_after_the_last() {
    let redis = Redis::start();
    let ns = nodes(&redis, 2, |c| c);
    let numsub = || redis.cli(&["PUBSUB", "NUMSUB", "comet:m:brief"]);
    assert_eq!(numsub(), "comet:m:brief\n0", "no node follows a channel nobody asked for");
    let mut p = hold(&ns[1], "/sub/brief", &[]);
    wait_live(&ns[1], 1);
    assert_eq!(numsub(), "comet:m:brief\n1", "the node with the poll subscribed, the other did not");
    publish_reply(&ns[0], "brief", "one");
    let first = p.response();
    assert_text_message(&first, "one");
    // Nobody waits there now: the node lets the channel go after the linger.
    eventually("the node unsubscribed", Duration::from_secs(15), || {
        let n = numsub();
        (n == "comet:m:brief\n0").then_some(()).ok_or(n)
    });
    assert_eq!(ns[1].info()["cluster_channels_followed"], "0");
    // A later poll follows it again and resumes from its cursor.
    publish_reply(&ns[0], "brief", "two");
    let c = after(&first);
    let r = ns[1].browser().request(&get("/sub/brief", &[(&c[0].0, &c[0].1), (&c[1].0, &c[1].1)]));
    assert_text_message(&r, "two");
}

#[test]
fn mercure_updates_cross_nodes_in_one_order_and_resume_on_a_node_that_never_saw_the_subscriber() {
    use crate::mercure::{publish, with_mercure, Sub, ALL};
    let redis = Redis::start();
    let ns = nodes(&redis, 2, |c| with_mercure(c).set("mercure", "history", "50"));
    let mut a = Sub::open(&ns[0], "topic=t", &[]);
    let mut b = Sub::open(&ns[1], "topic=t", &[]);
    for (i, d) in [&ns[0], &ns[1], &ns[0], &ns[1]].iter().enumerate() {
        let r = publish(d, Some(ALL), &[("topic", "t"), ("data", &format!("d{i}")), ("id", &format!("m{i}"))]);
        assert_eq!((r.status, r.text()), (200, format!("m{i}")), "{r}");
    }
    for s in [&mut a, &mut b] {
        for i in 0..4 {
            assert_eq!(s.event(), format!("id: m{i}\ndata: d{i}"), "every node, one order, each once");
        }
    }
    // A subscriber of node 0 resumes on node 1.
    let mut r = Sub::open(&ns[1], "topic=t&lastEventID=m1", &[]);
    assert_eq!(r.event(), "id: m2\ndata: d2");
    assert_eq!(r.event(), "id: m3\ndata: d3");
    // One channel space across nodes: a RESP publish on node 1 reaches node 0's subscriber.
    assert_eq!(publish_reply(&ns[1], "t", "from resp").to_string().starts_with(':'), true);
    assert!(a.event().ends_with("\ndata: from resp"));
    // The subscriptions of both nodes, listed by either.
    let watch = format!("Bearer {ALL}");
    for d in &ns {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let resp = d.browser().request(&get("/.well-known/mercure/subscriptions/t", &[("Authorization", &watch)]));
            assert_eq!(resp.status, 200, "{resp}");
            let v: serde_json::Value = serde_json::from_str(&resp.text()).unwrap();
            if v["subscriptions"].as_array().map(|x| x.len()) == Some(3) {
                break;
            }
            assert!(Instant::now() < deadline, "never listed the three subscriptions: {v}");
            thread::sleep(ms(20));
        }
    }
    assert!(b.event().ends_with("\ndata: from resp"));
    b.nothing(ms(100));
}
