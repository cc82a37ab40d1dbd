//! Faults around the daemon: a backend that disconnects in the middle of a pipeline, a browser
//! that disconnects in the middle of a response, the auth database deleted under it. Each costs
//! only the requests that depend on it.

use crate::common::*;
use std::time::Duration;

#[test]
fn backend_disconnecting_mid_pipeline_publishes_what_it_completed() {
    let d = Daemon::start();
    let mut b = d.backend();
    let mut raw = Vec::new();
    for i in 0..100 {
        raw.extend(encode_str(&["PUBLISH", "pipe", &format!("m{i}")]));
    }
    // Half a command, then the socket goes away.
    let half = encode_str(&["PUBLISH", "pipe", "never"]);
    raw.extend_from_slice(&half[..half.len() / 2]);
    b.send_raw(&raw);
    drop(b);
    // The 100 complete commands were published in order; the half one was not.
    let mut c = d.browser();
    let mut cursor: Option<(String, String)> = None;
    for i in 0..100 {
        let headers: Vec<(&str, &str)> = match &cursor {
            Some((lm, et)) => vec![("If-Modified-Since", lm), ("If-None-Match", et)],
            None => vec![],
        };
        let r = c.request(&get("/sub/pipe", &headers));
        assert_eq!(r.text(), format!("m{i}"));
        cursor = Some(r.cursor());
    }
    let (lm, et) = cursor.unwrap();
    c.send(&get("/sub/pipe", &[("If-Modified-Since", &lm), ("If-None-Match", &et)]));
    c.expect_nothing(ms(300));
    // And the daemon serves others as before.
    assert_eq!(d.publish("pipe", "after"), 1);
    assert_eq!(c.response().text(), "after");
}

#[test]
fn browser_disconnecting_mid_response_costs_only_itself() {
    let cfg = Config::default().set("limits", "max_message_bytes", "4000000").set("limits", "max_output_bytes", "8000000");
    let d = Daemon::start_with(&cfg);
    let big = "x".repeat(3_000_000);
    let mut quitters: Vec<Http> = (0..20).map(|_| d.browser()).collect();
    for q in &mut quitters {
        q.send(&get("/sub/big", &[]));
    }
    let mut stayer = d.browser();
    stayer.send(&get("/sub/big", &[]));
    d.wait_held(21);
    let mut b = d.backend();
    assert_eq!(b.cmd(&["PUBLISH", "big", &big]).to_string(), ":21");
    // The quitters read a little of the 3 MB answer and vanish.
    for q in &mut quitters {
        let mut buf = [0u8; 1024];
        let _ = std::io::Read::read(&mut q.stream, &mut buf);
    }
    drop(quitters);
    let r = stayer.response();
    assert_eq!(r.body.len(), big.len(), "the one that stayed gets all of it");
    // The daemon let go of the others' sockets and buffers.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let browsers: usize = d.info()["connected_browsers"].parse().unwrap();
        if browsers <= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{browsers} browser connections left");
        std::thread::sleep(ms(50));
    }
    assert_eq!(b.cmd(&["PUBLISH", "small", "ok"]).to_string(), ":0");
}

#[test]
fn auth_database_deleted_mid_run_keeps_the_daemon_serving() {
    let dir = temp_dir();
    let db = dir.join("app.sqlite");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE sessions (id TEXT, user_id TEXT); INSERT INTO sessions VALUES ('s1', 'u1');
             CREATE TABLE access (channel TEXT, user_id TEXT); INSERT INTO access VALUES ('room', 'u1');",
        )
        .unwrap();
    }
    let cfg = Config::default()
        .set("auth", "mode", "\"sqlite\"")
        .set("auth", "database", &format!("{:?}", db.display().to_string()))
        .set("auth", "session_query", "\"SELECT user_id FROM sessions WHERE id = :sid\"")
        .set("auth", "channel_query", "\"SELECT 1 FROM access WHERE channel = :channel AND user_id = :user\"")
        .set("auth", "open_channels", "[\"open\"]")
        .set("auth", "cache_ttl_secs", "0");
    let d = Daemon::start_with(&cfg);
    let cookie = ("Cookie", "PHPSESSID=s1");
    let mut p = d.browser();
    p.send(&get("/sub/room", &[cookie]));
    d.wait_held(1);
    d.publish("room", "before");
    assert_eq!(p.response().text(), "before");
    std::fs::remove_file(&db).unwrap();
    // Checks now answer whatever the workers' open connections can say (the unlinked file is still
    // readable through them) or 503; never a hang, never a crash, and open channels are untouched.
    let r = d.browser().request(&get("/sub/room?last_event_id=1:0", &[cookie]));
    assert!(matches!(r.status, 200 | 503), "{r}");
    let mut open = d.browser();
    open.send(&get("/sub/open", &[]));
    d.wait_held(1);
    assert!(d.publish("open", "still here") >= 1);
    assert_eq!(open.response().text(), "still here");
}
