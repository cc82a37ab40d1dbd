//! The message store: restarts (SIGTERM, and kill -9 with `fsync = "always"`) lose no
//! acknowledged message, and browsers re-polling with their old cursor get exactly what they
//! missed, once, in order.

use crate::common::*;
use std::process::Command;
use std::time::Duration;

/// A daemon's config with a store of its own (a fresh temp dir) and the given `fsync`.
fn config(fsync: &str) -> Config {
    let store = temp_dir().join("store.sqlite");
    Config::default()
        .set("store", "path", &format!("{:?}", store.display().to_string()))
        .set("store", "fsync", &format!("{fsync:?}"))
        .set("channels", "buffer_length", "50")
}

/// Walks a channel from a cursor, returning the bodies until the poll is held.
fn walk(d: &Daemon, channel: &str, mut cursor: Option<(String, String)>) -> (Vec<String>, Option<(String, String)>) {
    let mut c = d.browser();
    c.set_timeout(ms(1500));
    let mut got = Vec::new();
    loop {
        let headers: Vec<(&str, &str)> = match &cursor {
            Some((lm, et)) => vec![("If-Modified-Since", lm.as_str()), ("If-None-Match", et.as_str())],
            None => vec![],
        };
        c.send(&get(&format!("/sub/{channel}"), &headers));
        match c.try_response() {
            Ok(r) if r.status == 200 => {
                got.push(r.text());
                cursor = Some(r.cursor());
            }
            Ok(r) => panic!("unexpected {r}"),
            Err(_) => return (got, cursor),
        }
    }
}

#[test]
fn sigterm_restart_keeps_buffers_and_cursors() {
    let cfg = config("everysec");
    let mut d = Daemon::start_with(&cfg);
    for i in 0..5 {
        d.publish("goods", &format!("m{i}"));
    }
    let (seen, cursor) = walk(&d, "goods", None);
    assert_eq!(seen, ["m0", "m1", "m2", "m3", "m4"]);
    d.publish("goods", "m5");
    d.publish("goods", "m6");
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(8)).is_some_and(|s| s.success()));

    let d = Daemon::start_with(&cfg);
    assert!(d.logs().iter().any(|l| l.contains("7 messages on 1 channels restored")), "{}", d.logs().join("\n"));
    // The browser comes back with its old cursor: exactly the two it missed, in order.
    let (missed, _) = walk(&d, "goods", cursor);
    assert_eq!(missed, ["m5", "m6"]);
    // Ids continue after the restart: a new message comes after the restored ones.
    d.publish("goods", "m7");
    let (all, _) = walk(&d, "goods", None);
    assert_eq!(all.last().map(String::as_str), Some("m7"));
    assert_eq!(all.len(), 8);
}

#[test]
fn kill_9_with_fsync_always_loses_no_acknowledged_message() {
    let cfg = config("always");
    let mut d = Daemon::start_with(&cfg);
    let mut backend = d.backend();
    let mut acked = Vec::new();
    for i in 0..30 {
        let r = backend.cmd(&["PUBLISH", "goods", &format!("m{i}")]);
        assert_eq!(r.to_string(), ":0", "an acknowledged publish");
        acked.push(format!("m{i}"));
    }
    // The admin endpoint acknowledges after the write too.
    let r = d.admin().request(&request("POST", "/pub?id=goods", &[("Authorization", "Bearer s3cret-token")], "m30"));
    assert_eq!(r.status, 202, "{r}");
    acked.push("m30".into());
    let status = Command::new("kill").arg("-9").arg(d.pid().to_string()).status().unwrap();
    assert!(status.success());
    d.wait_exit(Duration::from_secs(3));

    let d = Daemon::start_with(&cfg);
    let (all, _) = walk(&d, "goods", None);
    assert_eq!(all, acked, "every acknowledged message survives kill -9");
}

#[test]
fn cursor_older_than_the_buffer_is_told_it_skipped() {
    let cfg = config("everysec").set("channels", "buffer_length", "3");
    let mut d = Daemon::start_with(&cfg);
    d.publish("goods", "first");
    let r = d.browser().request(&get("/sub/goods", &[]));
    let cursor = r.cursor();
    assert!(r.header("X-Comet-Skipped").is_none());
    for i in 0..5 {
        d.publish("goods", &format!("m{i}"));
    }
    let skip = |d: &Daemon| {
        let r = d.browser().request(&get("/sub/goods", &[("If-Modified-Since", &cursor.0), ("If-None-Match", &cursor.1)]));
        (r.text(), r.header("X-Comet-Skipped").map(str::to_string))
    };
    assert_eq!(skip(&d), ("m2".to_string(), Some("1".to_string())), "m0 and m1 fell out of the buffer");
    // The same after a restart: what was dropped is remembered by the store.
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(8)).is_some_and(|s| s.success()));
    let d = Daemon::start_with(&cfg);
    assert_eq!(skip(&d), ("m2".to_string(), Some("1".to_string())));
}

#[test]
fn deleted_channels_stay_deleted_after_restart() {
    let cfg = config("always");
    let mut d = Daemon::start_with(&cfg);
    d.publish("gone", "x");
    d.publish("kept", "y");
    let r = d.admin().request(&request("DELETE", "/pub?id=gone", &[("Authorization", "Bearer s3cret-token")], ""));
    assert_eq!(r.status, 200);
    d.publish("kept", "z"); // commits the deletion before the reply
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(8)).is_some_and(|s| s.success()));
    let d = Daemon::start_with(&cfg);
    assert_eq!(d.admin().request(&request("GET", "/pub?id=gone", &[("Authorization", "Bearer s3cret-token")], "")).status, 404);
    let (kept, _) = walk(&d, "kept", None);
    assert_eq!(kept, ["y", "z"]);
}

#[test]
fn sessions_survive_a_restart() {
    let cfg = config("always");
    let mut d = Daemon::start_with(&cfg);
    let mut b = d.backend();
    assert_eq!(b.cmd(&["SESSION.OPEN", "alice1", "alice"]).to_string(), "+OK");
    assert_eq!(b.cmd(&["SESSION.OPEN", "bob1", "bob"]).to_string(), "+OK");
    assert_eq!(b.cmd(&["SESSION.CLOSE", "bob1"]).to_string(), ":1");
    assert_eq!(b.cmd(&["PUBLISH", "session:alice1", "hi"]).to_string(), ":0");
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(8)).is_some_and(|s| s.success()));
    let d = Daemon::start_with(&cfg);
    let cookie = ("Cookie", "PHPSESSID=alice1");
    let r = d.browser().request(&get("/sub/@me", &[cookie]));
    assert_eq!((r.status, r.text()), (200, "hi".to_string()), "the private stream is still open: {r}");
    let r = d.browser().request(&get("/sub/@me", &[("Cookie", "PHPSESSID=bob1")]));
    assert_eq!(r.status, 403, "a closed session stays closed");
}

#[test]
fn joins_survive_a_restart() {
    let cfg = config("always");
    let mut d = Daemon::start_with(&cfg);
    let mut b = d.backend();
    for sid in ["carol1", "dave1"] {
        assert_eq!(b.cmd(&["SESSION.OPEN", sid]).to_string(), "+OK");
    }
    assert_eq!(b.cmd(&["JOIN", "carol1", "goods"]).to_string(), ":1");
    assert_eq!(b.cmd(&["JOIN", "carol1", "news"]).to_string(), ":1");
    assert_eq!(b.cmd(&["LEAVE", "carol1", "news"]).to_string(), ":1");
    assert_eq!(b.cmd(&["JOIN", "dave1", "goods"]).to_string(), ":1");
    assert_eq!(b.cmd(&["SESSION.CLOSE", "dave1"]).to_string(), ":1");
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(8)).is_some_and(|s| s.success()));

    let d = Daemon::start_with(&cfg);
    let mut b = d.backend();
    // Still joined: a message on the shared channel reaches carol's private stream.
    assert_eq!(b.cmd(&["PUBLISH", "goods", "price 7"]).to_string(), ":0");
    let r = d.browser().request(&get("/sub/@me", &[("Cookie", "PHPSESSID=carol1")]));
    assert_eq!((r.status, r.text()), (200, "price 7".to_string()), "the join survived: {r}");
    assert_eq!(r.header("X-Comet-Channel"), Some("goods"), "{r}");
    // What was left is not joined again, and a closed session's joins are gone with it.
    assert_eq!(b.cmd(&["JOIN", "carol1", "news"]).to_string(), ":1", "news was left before the restart");
    assert_eq!(b.cmd(&["JOIN", "carol1", "goods"]).to_string(), ":0", "goods is still joined");
    assert_eq!(b.cmd(&["SESSION.OPEN", "dave1"]).to_string(), "+OK");
    assert_eq!(b.cmd(&["JOIN", "dave1", "goods"]).to_string(), ":1", "dave's join went with his session");
}
