//! Presence (docs/protocol.md: Presence, Joined channels, the control commands) against the real
//! daemon: who is online and where (`ONLINE`, `PRESENCE`, `PUBSUB`), the grace period after a
//! browser vanishes (dropped, shut down, reset), server-side `JOIN`/`LEAVE` into `/sub/@me`,
//! `KICK`, the `__presence__` event stream read by a raw RESP client, `redis-cli` and a PHP worker
//! (phpredis `subscribe`), backends subscribed to ordinary channels, and the SQLite rows (after
//! a churn of 30 sessions, and across a restart).
//!
//! Every test starts its own daemon with a short grace (1-2 s). Events are read by a thread that
//! stamps each with its arrival time, so a test can assert that an `offline` came after the
//! grace and not before. Rows are written in batches by workers: tests poll the table until it
//! matches, with a deadline, and show the last difference when it never does.

use crate::common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

// =============================================================================================
// Helpers
// =============================================================================================

/// The base config with `[presence] grace_secs = grace`, and polls held long enough (30 s)
/// that no 408 ends one during a test unless the test asks for it.
fn config(grace: u64) -> Config {
    Config::default().set("presence", "grace_secs", &grace.to_string()).set("browser", "poll_timeout_secs", "30")
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

/// `GET target` with the session cookie when `sid` is given, and `extra` headers.
fn get_as(target: &str, sid: Option<&str>, extra: &[(&str, &str)]) -> String {
    let cookie: String;
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(s) = sid {
        cookie = format!("lang=en; PHPSESSID={s}");
        headers.push(("Cookie", &cookie));
    }
    get(target, &headers)
}

/// `GET target` on a new connection (as `sid`), not read.
fn poll_as(d: &Daemon, target: &str, sid: Option<&str>) -> Http {
    let mut c = d.browser();
    c.send(&get_as(target, sid, &[]));
    c
}

/// `GET target` (as `sid`) with the cursor of `r`, to re-poll after it.
fn get_after(target: &str, sid: Option<&str>, r: &Response) -> String {
    let (lm, etag) = r.cursor();
    get_as(target, sid, &[("If-Modified-Since", &lm), ("If-None-Match", &etag)])
}

/// A flat `sid user` reply as the harness prints it: `*4[$s1, $u1, $s2, $]`, or `*0`.
fn pairs(list: &[(&str, &str)]) -> String {
    if list.is_empty() {
        return "*0".into();
    }
    let items: Vec<String> = list.iter().flat_map(|(s, u)| [format!("${s}"), format!("${u}")]).collect();
    format!("*{}[{}]", items.len(), items.join(", "))
}

/// Runs a command on a backend connection and returns the reply as a string.
pub(crate) fn cmd(b: &mut Resp, args: &[&str]) -> String {
    b.cmd(args).to_string()
}

fn assert_status(r: &Response, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: expected {status}, got:\n{r}");
}

/// Asserts a 200 carrying `body`, published on `origin`.
fn assert_from(r: &Response, body: &str, origin: &str) {
    assert_eq!(r.status, 200, "expected 200 {body:?} from {origin}, got:\n{r}");
    assert_eq!(r.text(), body, "body:\n{r}");
    assert_eq!(r.header("X-Comet-Channel"), Some(origin), "X-Comet-Channel of {body:?}:\n{r}");
}

/// Asserts that no RESP frame arrives on `r` for `d`.
fn expect_no_frame(r: &mut Resp, d: Duration, what: &str) {
    r.stream.set_read_timeout(Some(d)).unwrap();
    let got = r.try_reply();
    r.stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    match got {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Ok(reply) => panic!("{what}: expected nothing, got {reply}"),
        Err(e) => panic!("{what}: expected nothing, the read failed: {e}"),
    }
}

/// Waits (5 s at most) until `f` returns Ok; panics with its last Err otherwise.
pub(crate) fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: not true after {limit:?}: {e}"),
            Err(_) => thread::sleep(ms(50)),
        }
    }
}

/// The `__presence__` events, each stamped with its arrival time by a reader thread.
pub(crate) struct Events {
    rx: Receiver<(Instant, String)>,
}

impl Events {
    /// A backend that sent `SUBSCRIBE __presence__` (confirmation checked).
    pub(crate) fn subscribe(d: &Daemon) -> Events {
        let mut r = d.backend();
        assert_eq!(cmd(&mut r, &["SUBSCRIBE", "__presence__"]), "*3[$subscribe, $__presence__, :1]");
        r.stream.set_read_timeout(None).unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || loop {
            let text = match r.try_reply() {
                Ok(Reply::Array(Some(items))) => match &items[..] {
                    [Reply::Bulk(Some(kind)), Reply::Bulk(Some(ch)), Reply::Bulk(Some(payload))]
                        if kind == b"message" && ch == b"__presence__" =>
                    {
                        String::from_utf8_lossy(payload).into_owned()
                    }
                    _ => format!("UNEXPECTED FRAME {}", Reply::Array(Some(items.clone()))),
                },
                Ok(other) => format!("UNEXPECTED FRAME {other}"),
                Err(_) => return, // the daemon went away
            };
            if tx.send((Instant::now(), text)).is_err() {
                return;
            }
        });
        Events { rx }
    }

    pub(crate) fn next(&self, timeout: Duration) -> Option<(Instant, String)> {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the __presence__ subscription was closed"),
        }
    }

    /// Expects exactly `want`, in order, all within `within`; returns their arrival times.
    pub(crate) fn expect(&self, want: &[&str], within: Duration) -> Vec<Instant> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        let mut times = Vec::new();
        while got.len() < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some((t, e)) => {
                    got.push(e);
                    times.push(t);
                }
                None => break,
            }
        }
        assert_eq!(got, want, "__presence__ events (waited {within:?})");
        times
    }

    /// Expects no event for `d`.
    pub(crate) fn expect_quiet(&self, d: Duration, what: &str) {
        if let Some((_, e)) = self.next(d) {
            panic!("{what}: expected no presence event, got {e:?}");
        }
    }

    /// Every event that arrives until `until`.
    fn collect_until(&self, until: Instant) -> Vec<(Instant, String)> {
        let mut out = Vec::new();
        while let Some(e) = self.next(until.saturating_duration_since(Instant::now())) {
            out.push(e);
        }
        out
    }
}

/// A child process killed and reaped on drop.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines a child prints on stdout, as they come.
fn stdout_lines(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads `n` lines (5 s at most for each).
fn read_lines(rx: &Receiver<String>, n: usize, what: &str) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(l) => got.push(l),
            Err(_) => panic!("{what}: got only {} of {n} lines: {got:?}", got.len()),
        }
    }
    got
}

fn require_tool(cmd: &str, check_args: &[&str], what: &str) {
    let ok = Command::new(cmd).args(check_args).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "`{cmd}` is missing: {what} (scripts/test installs it with apt-get)");
}

fn require_phpredis() {
    require_tool("php", &["--version"], "install php-cli");
    let mods = Command::new("php").arg("-m").output().expect("php -m");
    assert!(
        String::from_utf8_lossy(&mods.stdout).lines().any(|l| l.trim().eq_ignore_ascii_case("redis")),
        "the phpredis extension is missing: install php-redis (scripts/test does)"
    );
}


/// A presence row: (session, user or "" for NULL, channel, daemon).
type Row = (String, String, String, String);

/// Every row of `table`, sorted (duplicates kept, so they show).
fn rows(db: &Path, table: &str) -> Result<Vec<Row>, String> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| e.to_string())?;
    c.busy_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
    let mut st = c
        .prepare(&format!("SELECT session, user, channel, daemon, since FROM {table}"))
        .map_err(|e| e.to_string())?;
    let now = now_unix() as i64;
    let mut out: Vec<Row> = Vec::new();
    let mapped = st
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, i64>(4)?))
        })
        .map_err(|e| e.to_string())?;
    for m in mapped {
        let (s, u, ch, dmn, since) = m.map_err(|e| e.to_string())?;
        if since > now + 2 || since < now - 600 {
            return Err(format!("row ({s}, {ch}) has since={since}, now is {now}"));
        }
        out.push((s, u.unwrap_or_default(), ch, dmn));
    }
    out.sort();
    Ok(out)
}

fn row(s: &str, u: &str, ch: &str, daemon: &str) -> Row {
    (s.into(), u.into(), ch.into(), daemon.into())
}

// =============================================================================================
// ONLINE, PRESENCE, PUBSUB
// =============================================================================================

#[test]
fn presence_lists_sessions_with_users_and_counts_anonymous_in_numsub_only() {
    let d = Daemon::start_with(&config(2));
    let mut b = d.backend();
    assert_eq!(cmd(&mut b, &["ONLINE"]), "*0");
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":0");
    assert_eq!(cmd(&mut b, &["PUBSUB", "CHANNELS"]), "*0");
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s2", "u2"]), "+OK");
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":0", "opened but not polling: not online");

    let _p2 = poll_as(&d, "/sub/goods", Some("s2"));
    d.wait_held(1);
    let _p1 = poll_as(&d, "/sub/goods", Some("s1"));
    d.wait_held(2);
    let both = pairs(&[("s1", "u1"), ("s2", "u2")]);
    assert_eq!(cmd(&mut b, &["PRESENCE", "goods"]), both, "sorted by session id");
    assert_eq!(cmd(&mut b, &["ONLINE"]), both);
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":2");
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods"]), "*2[$goods, :2]");
    assert_eq!(cmd(&mut b, &["PRESENCE", "news"]), "*0");

    // Anonymous polls count in NUMSUB (and CHANNELS), never as visitors.
    let _a1 = poll_as(&d, "/sub/goods", None);
    let _a2 = poll_as(&d, "/sub/news", None);
    d.wait_held(4);
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods", "news", "nobody"]), "*6[$goods, :3, $news, :1, $nobody, :0]");
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":2");
    assert_eq!(cmd(&mut b, &["ONLINE"]), both);
    assert_eq!(cmd(&mut b, &["PRESENCE", "goods"]), both);
    assert_eq!(cmd(&mut b, &["PRESENCE", "news"]), "*0", "an anonymous poll is not a visitor");
    assert_eq!(cmd(&mut b, &["PUBSUB", "CHANNELS"]), "*2[$goods, $news]");
    assert_eq!(cmd(&mut b, &["PUBSUB", "CHANNELS", "g*"]), "*1[$goods]");
    assert_eq!(cmd(&mut b, &["PUBSUB", "CHANNELS", "x*"]), "*0");
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMPAT"]), ":0");

    // A cookie the backend never opened still makes a visitor, with an unknown (empty) user id;
    // its private-channel poll (refused: not open) does not.
    assert_status(&poll_as(&d, "/sub/@me", Some("s0")).response(), 403, "@me of an unopened session");
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":2", "a refused poll is not presence");
    let _p0 = poll_as(&d, "/sub/goods", Some("s0"));
    d.wait_held(5);
    assert_eq!(cmd(&mut b, &["ONLINE"]), pairs(&[("s0", ""), ("s1", "u1"), ("s2", "u2")]));
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods"]), "*2[$goods, :4]");

    // Arity and syntax.
    assert_eq!(cmd(&mut b, &["ONLINE", "EVERYONE"]), "-ERR syntax: ONLINE [COUNT]");
    assert_eq!(cmd(&mut b, &["PRESENCE"]), "-ERR wrong number of arguments for 'presence' command");
    assert_eq!(cmd(&mut b, &["KICK"]), "-ERR wrong number of arguments for 'kick' command");
    assert_eq!(cmd(&mut b, &["JOIN", "s1"]), "-ERR wrong number of arguments for 'join' command");
}

// =============================================================================================
// Grace: vanishing browsers go offline after it, re-polls never flap
// =============================================================================================

/// The other session's keep-alive re-poll loop: re-polls at once after each answer (200 from a
/// publish, or 408), once after a pause shorter than the grace; stops when told.
fn repoller(d: &Daemon, sid: &'static str, pause: Duration, stop: Arc<AtomicBool>) -> thread::JoinHandle<(usize, usize)> {
    let addr: SocketAddr = d.browser;
    thread::spawn(move || {
        let mut c = Http::connect(addr);
        let (mut n200, mut n408) = (0, 0);
        let mut cursor: Option<(String, String)> = None;
        let mut paused = false;
        loop {
            let req = match &cursor {
                Some((lm, etag)) => get_as("/sub/goods", Some(sid), &[("If-Modified-Since", lm), ("If-None-Match", etag)]),
                None => get_as("/sub/goods", Some(sid), &[]),
            };
            c.send(&req);
            let r = c.response();
            match r.status {
                200 => {
                    n200 += 1;
                    cursor = Some(r.cursor());
                }
                408 => {
                    n408 += 1;
                    if let (Some(lm), Some(etag)) = (r.header("Last-Modified"), r.header("Etag")) {
                        cursor = Some((lm.to_string(), etag.to_string()));
                    }
                    if !paused {
                        paused = true;
                        thread::sleep(pause);
                    }
                }
                _ => panic!("{sid}: unexpected answer to a re-poll:\n{r}"),
            }
            assert!(!r.closes(), "{sid}: the re-poll connection must stay open:\n{r}");
            if stop.load(Ordering::SeqCst) {
                return (n200, n408);
            }
        }
    })
}

#[test]
fn vanished_browser_goes_offline_after_grace_and_repolls_never_flap() {
    const GRACE: Duration = Duration::from_secs(2);
    let d = Daemon::start_with(&config(2).set("browser", "poll_timeout_secs", "1"));
    let ev = Events::subscribe(&d);
    let mut b = d.backend();
    for (s, u) in [("s1", "u1"), ("s2", "u2"), ("s3", "u3"), ("s4", "u4")] {
        assert_eq!(cmd(&mut b, &["SESSION.OPEN", s, u]), "+OK");
    }
    let p1 = poll_as(&d, "/sub/goods", Some("s1"));
    d.wait_held(1);
    ev.expect(&["online s1 u1", "join s1 goods"], Duration::from_secs(2));

    let stop = Arc::new(AtomicBool::new(false));
    let s2 = repoller(&d, "s2", ms(1200), stop.clone());
    d.wait_held(2);
    ev.expect(&["online s2 u2", "join s2 goods"], Duration::from_secs(2));

    let p3 = poll_as(&d, "/sub/goods", Some("s3"));
    d.wait_held(3);
    ev.expect(&["online s3 u3", "join s3 goods"], Duration::from_secs(2));
    // s4's poll is pipelined behind a request answered at once (404) that it never reads: closing
    // a socket with unread bytes sends a reset, not a FIN.
    let mut p4 = d.browser();
    p4.send(&format!("{}{}", get_as("/nothing-here", Some("s4"), &[]), get_as("/sub/goods", Some("s4"), &[])));
    d.wait_held(4);
    ev.expect(&["online s4 u4", "join s4 goods"], Duration::from_secs(2));
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":4");

    // s1 drops its socket, s3 shuts it down, s4 resets it, 300 ms apart.
    let t1 = Instant::now();
    drop(p1);
    thread::sleep(ms(300));
    let t3 = Instant::now();
    p3.stream.shutdown(Shutdown::Both).unwrap();
    thread::sleep(ms(300));
    let t4 = Instant::now();
    drop(p4);

    // Within the grace they are all still online and on goods.
    thread::sleep(ms(100));
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":4", "gone less than the grace ago: still online");
    assert_eq!(
        cmd(&mut b, &["PRESENCE", "goods"]),
        pairs(&[("s1", "u1"), ("s2", "u2"), ("s3", "u3"), ("s4", "u4")])
    );

    // Meanwhile publishes answer s2's polls, which re-polls at once on its connection.
    let publisher = {
        let addr = d.control;
        thread::spawn(move || {
            let mut p = Resp::connect(addr);
            assert_eq!(p.cmd(&["AUTH", TOKEN]).to_string(), "+OK");
            for i in 0..8 {
                thread::sleep(ms(350));
                let r = p.cmd(&["PUBLISH", "goods", &format!("tick-{i}")]);
                assert!(matches!(r, Reply::Integer(0 | 1)), "PUBLISH goods: {r}");
            }
        })
    };

    let events = ev.collect_until(t4 + GRACE + ms(1200));
    let texts: Vec<&str> = events.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(
        texts,
        ["leave s1 goods", "offline s1", "leave s3 goods", "offline s3", "leave s4 goods", "offline s4"],
        "only the vanished sessions go, each after its grace; s2 never flaps"
    );
    for ((at, e), closed) in events.iter().zip([t1, t1, t3, t3, t4, t4]) {
        let after = at.duration_since(closed);
        assert!(after >= GRACE - ms(100), "{e:?} came {after:?} after the close: before the {GRACE:?} grace");
        assert!(after <= GRACE + ms(1000), "{e:?} came {after:?} after the close: long after the {GRACE:?} grace");
    }
    publisher.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    assert_eq!(cmd(&mut b, &["ONLINE"]), pairs(&[("s2", "u2")]));
    assert_eq!(cmd(&mut b, &["PRESENCE", "goods"]), pairs(&[("s2", "u2")]));
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods"]), "*2[$goods, :1]");
    let (n200, n408) = s2.join().unwrap();
    assert!(n200 >= 3 && n408 >= 1, "s2 re-polled after {n200} messages and {n408} timeouts: too few to prove anything");
    ev.expect_quiet(ms(200), "after the re-polls");
}

#[test]
fn closing_one_of_two_tabs_leaves_only_its_channel_after_grace() {
    let d = Daemon::start_with(&config(1));
    let ev = Events::subscribe(&d);
    let mut b = d.backend();
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    let tab1 = poll_as(&d, "/sub/goods", Some("s1"));
    d.wait_held(1);
    let _tab2 = poll_as(&d, "/sub/goods", Some("s1"));
    d.wait_held(2);
    let tab3 = poll_as(&d, "/sub/news", Some("s1"));
    d.wait_held(3);
    ev.expect(&["online s1 u1", "join s1 goods", "join s1 news"], Duration::from_secs(2));
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods", "news"]), "*4[$goods, :1, $news, :1]", "a session counts once");

    // One of the two goods tabs closes: still on goods through the other, nothing happens.
    drop(tab1);
    ev.expect_quiet(ms(1600), "one of two tabs on goods closed");
    assert_eq!(cmd(&mut b, &["PRESENCE", "goods"]), pairs(&[("s1", "u1")]));
    // The news tab closes: s1 leaves news one grace later, and stays online.
    let t = Instant::now();
    drop(tab3);
    let at = ev.expect(&["leave s1 news"], Duration::from_secs(3));
    assert!(at[0].duration_since(t) >= ms(900), "leave came {:?} after the close: before the grace", at[0].duration_since(t));
    ev.expect_quiet(ms(300), "s1 still polls goods");
    assert_eq!(cmd(&mut b, &["ONLINE"]), pairs(&[("s1", "u1")]));
    assert_eq!(cmd(&mut b, &["PRESENCE", "news"]), "*0");
    assert_eq!(cmd(&mut b, &["PUBSUB", "CHANNELS"]), "*2[$__presence__, $goods]", "the event reader is a subscriber too");
}

// =============================================================================================
// JOIN / LEAVE into /sub/@me
// =============================================================================================

#[test]
fn join_and_leave_change_what_the_private_stream_carries() {
    let d = Daemon::start_with(&config(2));
    let ev = Events::subscribe(&d);
    let mut b = d.backend();
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "goods"]), "-ERR no such session: open it with SESSION.OPEN first");
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "goods"]), ":1");
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "goods"]), ":0", "already joined");
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "session:s1"]), "-ERR invalid channel id");
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "bad channel"]), "-ERR invalid channel id");
    assert_eq!(cmd(&mut b, &["JOIN", "bad sid!", "goods"]), "-ERR invalid session id");
    assert_eq!(cmd(&mut b, &["LEAVE", "s1", "news"]), ":0", "never joined");
    assert_eq!(cmd(&mut b, &["PRESENCE", "goods"]), "*0", "joined but not online: not on the channel");
    ev.expect_quiet(ms(200), "JOIN of an offline session");

    let mut me = poll_as(&d, "/sub/@me", Some("s1"));
    d.wait_held(1);
    ev.expect(&["online s1 u1", "join s1 goods"], Duration::from_secs(2));
    assert_eq!(cmd(&mut b, &["PRESENCE", "goods"]), pairs(&[("s1", "u1")]));
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods"]), "*2[$goods, :1]");

    // A publish on goods reaches the held @me poll.
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "m0"]), ":1", "the held @me poll counts");
    let mut last = me.response();
    assert_from(&last, "m0", "goods");

    // Several messages, some while held, some between polls, mixed with the private channel's
    // own and with a channel not joined: the cursor walks them in order, none lost or repeated.
    me.send(&get_after("/sub/@me", Some("s1"), &last));
    d.wait_held(1);
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "m1"]), ":1");
    assert_eq!(cmd(&mut b, &["PUBLISH", "news", "n0"]), ":0");
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "m2"]), ":0");
    assert_eq!(cmd(&mut b, &["PUBLISH", "session:s1", "p0"]), ":0");
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "m3"]), ":0");
    let want = [("m1", "goods"), ("m2", "goods"), ("p0", "session:s1"), ("m3", "goods")];
    let mut ids = vec![last.message_id()];
    for (i, (body, origin)) in want.iter().enumerate() {
        if i > 0 {
            me.send(&get_after("/sub/@me", Some("s1"), &last));
        }
        last = me.response();
        assert_from(&last, body, origin);
        ids.push(last.message_id());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in the private stream must increase: {ids:?}");
    // The stream is now exhausted: the next poll is held.
    me.send(&get_after("/sub/@me", Some("s1"), &last));
    me.expect_nothing(ms(200));
    // goods itself still has its own stream.
    let r = d.browser().request(&get("/sub/goods", &[]));
    assert_from(&r, "m0", "goods");

    // LEAVE: goods no longer reaches the stream.
    assert_eq!(cmd(&mut b, &["LEAVE", "s1", "goods"]), ":1");
    ev.expect(&["leave s1 goods"], Duration::from_secs(1));
    assert_eq!(cmd(&mut b, &["LEAVE", "s1", "goods"]), ":0");
    assert_eq!(cmd(&mut b, &["PRESENCE", "goods"]), "*0");
    assert_eq!(cmd(&mut b, &["ONLINE"]), pairs(&[("s1", "u1")]), "still online on its private stream");
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "m4"]), ":0", "no joined session, no held poll on goods");
    me.expect_nothing(ms(200));
    assert_eq!(cmd(&mut b, &["PUBLISH", "session:s1", "p1"]), ":1");
    assert_from(&me.response(), "p1", "session:s1");

    // JOIN while online: on the channel at once.
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "news"]), ":1");
    ev.expect(&["join s1 news"], Duration::from_secs(1));
    assert_eq!(cmd(&mut b, &["PRESENCE", "news"]), pairs(&[("s1", "u1")]));
    ev.expect_quiet(ms(200), "after the joins");
}

#[test]
fn session_close_drops_joins_then_the_session_goes_offline_after_grace() {
    let d = Daemon::start_with(&config(1));
    let ev = Events::subscribe(&d);
    let mut b = d.backend();
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "news"]), ":1");
    let mut me = poll_as(&d, "/sub/@me", Some("s1"));
    d.wait_held(1);
    ev.expect(&["online s1 u1", "join s1 news"], Duration::from_secs(2));
    let t = Instant::now();
    assert_eq!(cmd(&mut b, &["SESSION.CLOSE", "s1"]), ":1");
    assert_status(&me.response(), 410, "held @me at SESSION.CLOSE");
    ev.expect(&["leave s1 news"], Duration::from_secs(1));
    assert_status(&me.request(&get_as("/sub/@me", Some("s1"), &[])), 403, "@me after SESSION.CLOSE");
    // Its last poll ended at the 410: offline one grace later.
    let at = ev.expect(&["offline s1"], Duration::from_secs(3));
    assert!(at[0].duration_since(t) >= ms(900), "offline {:?} after the close: before the grace", at[0].duration_since(t));
    assert_eq!(cmd(&mut b, &["SESSION.CLOSE", "s1"]), ":0");
}

// =============================================================================================
// KICK
// =============================================================================================

#[test]
fn kick_answers_410_refuses_403_until_reopened_and_goes_offline_at_once() {
    let d = Daemon::start_with(&config(2));
    let ev = Events::subscribe(&d);
    let mut b = d.backend();
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s2", "u2"]), "+OK");
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "news"]), ":1");
    let mut me = poll_as(&d, "/sub/@me", Some("s1"));
    d.wait_held(1);
    ev.expect(&["online s1 u1", "join s1 news"], Duration::from_secs(2));
    let mut g = poll_as(&d, "/sub/goods", Some("s1"));
    d.wait_held(2);
    ev.expect(&["join s1 goods"], Duration::from_secs(2));
    let mut other = poll_as(&d, "/sub/goods", Some("s2"));
    d.wait_held(3);
    ev.expect(&["online s2 u2", "join s2 goods"], Duration::from_secs(2));

    let t = Instant::now();
    assert_eq!(cmd(&mut b, &["KICK", "s1"]), ":2", "both held polls of s1 answered");
    assert_status(&me.response(), 410, "held @me at KICK");
    assert_status(&g.response(), 410, "held goods poll at KICK");
    let at = ev.expect(&["leave s1 goods", "leave s1 news", "offline s1"], Duration::from_secs(1));
    assert!(at[2].duration_since(t) < ms(800), "offline must come at once on KICK, not after the grace");
    assert_eq!(cmd(&mut b, &["ONLINE"]), pairs(&[("s2", "u2")]));
    assert_eq!(cmd(&mut b, &["PRESENCE", "goods"]), pairs(&[("s2", "u2")]));
    assert_eq!(cmd(&mut b, &["PRESENCE", "news"]), "*0");
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods", "news"]), "*4[$goods, :1, $news, :0]");

    // Refused until the backend opens it again: on the kept-alive connections and new ones,
    // private and shared channels alike; a refused poll is no presence.
    assert_status(&me.request(&get_as("/sub/@me", Some("s1"), &[])), 403, "@me after KICK");
    assert_status(&g.request(&get_as("/sub/goods", Some("s1"), &[])), 403, "goods after KICK");
    assert_status(&poll_as(&d, "/sub/goods", Some("s1")).response(), 403, "goods after KICK, new connection");
    ev.expect_quiet(ms(300), "refused polls of a kicked session");
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":1");

    // Opened again: it works, online again, without the joins the kick dropped.
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    let mut me = poll_as(&d, "/sub/@me", Some("s1"));
    d.wait_held(2);
    ev.expect(&["online s1 u1"], Duration::from_secs(2));
    ev.expect_quiet(ms(200), "re-opened session: the kick dropped its joins");
    assert_eq!(cmd(&mut b, &["PUBLISH", "news", "after-kick"]), ":0", "news no longer copied to s1");
    me.expect_nothing(ms(200));
    assert_eq!(cmd(&mut b, &["PUBLISH", "session:s1", "back"]), ":1");
    assert_from(&me.response(), "back", "session:s1");

    // A kick during the grace (no held poll): offline at once.
    let t = Instant::now();
    assert_eq!(cmd(&mut b, &["KICK", "s1"]), ":0", "no held poll to answer");
    let at = ev.expect(&["offline s1"], Duration::from_secs(1));
    assert!(at[0].duration_since(t) < ms(800), "offline must come at once on KICK");
    assert_eq!(cmd(&mut b, &["KICK", "nobody"]), ":0");
    assert_eq!(cmd(&mut b, &["KICK", "bad sid!"]), "-ERR invalid session id");
    ev.expect_quiet(ms(200), "KICK of unknown sessions");

    // The other session was never disturbed.
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "still"]), ":1");
    assert_from(&other.response(), "still", "goods");
}

// =============================================================================================
// User ids
// =============================================================================================

#[test]
fn presence_user_id_follows_session_open_while_online() {
    let scratch = Scratch::new();
    let db = scratch.path().join("app.sqlite");
    let d = Daemon::start_with(&config(2).set("presence", "database", &toml_str(&db.to_string_lossy())));
    let ev = Events::subscribe(&d);
    let mut b = d.backend();
    // The page polled before the login.
    let mut p = poll_as(&d, "/sub/goods", Some("s1"));
    d.wait_held(1);
    ev.expect(&["online s1", "join s1 goods"], Duration::from_secs(2));
    assert_eq!(cmd(&mut b, &["ONLINE"]), pairs(&[("s1", "")]));
    let anon_rows = vec![row("s1", "", "", "comet"), row("s1", "", "goods", "comet")];
    eventually("rows of the session with no user id yet", Duration::from_secs(5), || {
        let got = rows(&db, "comet_online")?;
        if got == anon_rows { Ok(()) } else { Err(format!("rows {got:?}, want {anon_rows:?}")) }
    });

    // Login: the backend names the user while the poll is held; the session is announced again
    // with its user id (docs/protocol.md, Presence).
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    ev.expect(&["online s1 u1"], Duration::from_secs(2));
    let named = pairs(&[("s1", "u1")]);
    let named_rows = vec![row("s1", "u1", "", "comet"), row("s1", "u1", "goods", "comet")];
    let mut diffs = Vec::new();
    let got = cmd(&mut b, &["ONLINE"]);
    if got != named {
        diffs.push(format!("ONLINE right after SESSION.OPEN s1 u1 (poll still held): {got}, want {named}"));
    }
    let got = cmd(&mut b, &["PRESENCE", "goods"]);
    if got != named {
        diffs.push(format!("PRESENCE goods right after SESSION.OPEN s1 u1: {got}, want {named}"));
    }
    // The page gets a message and re-polls (its next poll carries no news but the same cookie).
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "hi"]), ":1");
    let r = p.response();
    assert_from(&r, "hi", "goods");
    p.send(&get_after("/sub/goods", Some("s1"), &r));
    d.wait_held(1);
    let got = cmd(&mut b, &["ONLINE"]);
    if got != named {
        diffs.push(format!("ONLINE after the re-poll: {got}, want {named}"));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let got = loop {
        let got = rows(&db, "comet_online").unwrap();
        if got == named_rows || Instant::now() > deadline {
            break got;
        }
        thread::sleep(ms(50));
    };
    if got != named_rows {
        diffs.push(format!("table 3 s after SESSION.OPEN and a re-poll: {got:?}, want {named_rows:?}"));
    }
    ev.expect_quiet(ms(100), "a re-poll within grace");
    assert!(diffs.is_empty(), "the user id set by SESSION.OPEN while online is not shown everywhere:\n{}", diffs.join("\n"));
}

// =============================================================================================
// Real subscribers: redis-cli and a PHP worker
// =============================================================================================

#[test]
fn presence_events_reach_redis_cli_and_a_php_worker_in_order() {
    require_tool("redis-cli", &["--version"], "install redis-tools");
    require_phpredis();
    const WANT: [&str; 8] = [
        "online s1 u1",
        "join s1 goods",
        "join s1 news",
        "online s2",
        "join s2 goods",
        "leave s1 news",
        "leave s2 goods",
        "offline s2",
    ];
    let d = Daemon::start_with(&config(2));
    let port = d.control.port().to_string();
    let mut cli = Kid(
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "-a", TOKEN, "--no-auth-warning", "SUBSCRIBE", "__presence__"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run redis-cli"),
    );
    let cli_lines = stdout_lines(&mut cli.0);
    assert_eq!(read_lines(&cli_lines, 3, "redis-cli SUBSCRIBE"), ["subscribe", "__presence__", "1"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/php/presence_worker.php");
    let mut php = Kid(
        Command::new("php")
            .arg(script)
            .args(["127.0.0.1", &port, TOKEN, &WANT.len().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run php"),
    );
    let php_lines = stdout_lines(&mut php.0);
    let mut b = d.backend();
    eventually("both subscribers on __presence__", Duration::from_secs(5), || {
        match cmd(&mut b, &["PUBSUB", "NUMSUB", "__presence__"]).as_str() {
            "*2[$__presence__, :2]" => Ok(()),
            other => Err(other.to_string()),
        }
    });
    let ev = Events::subscribe(&d);

    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s2"]), "+OK");
    let _p1 = poll_as(&d, "/sub/goods", Some("s1"));
    d.wait_held(1);
    assert_eq!(cmd(&mut b, &["JOIN", "s1", "news"]), ":1");
    let mut p2 = poll_as(&d, "/sub/goods", Some("s2"));
    d.wait_held(2);
    assert_eq!(cmd(&mut b, &["LEAVE", "s1", "news"]), ":1");
    assert_eq!(cmd(&mut b, &["KICK", "s2"]), ":1");
    assert_status(&p2.response(), 410, "s2 kicked");

    ev.expect(&WANT, Duration::from_secs(3));
    let raw = read_lines(&cli_lines, 3 * WANT.len(), "redis-cli messages");
    for (i, triple) in raw.chunks(3).enumerate() {
        assert_eq!(triple, ["message", "__presence__", WANT[i]], "redis-cli output, message {i}: {raw:?}");
    }
    let got = read_lines(&php_lines, WANT.len(), "presence_worker.php");
    assert_eq!(got, WANT, "presence_worker.php output");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = php.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "presence_worker.php did not exit after {} events", WANT.len());
        thread::sleep(ms(20));
    };
    let mut err = String::new();
    let _ = php.0.stderr.take().unwrap().read_to_string(&mut err);
    assert!(status.success(), "presence_worker.php exited {status}: {err}");
    // The worker left: one subscriber fewer.
    eventually("the PHP worker's subscription is dropped", Duration::from_secs(3), || {
        match cmd(&mut b, &["PUBSUB", "NUMSUB", "__presence__"]).as_str() {
            "*2[$__presence__, :2]" => Ok(()), // redis-cli and the Events reader
            other => Err(other.to_string()),
        }
    });
}

// =============================================================================================
// Backends subscribed to ordinary channels
// =============================================================================================

#[test]
fn subscribed_backend_receives_publishes_and_is_limited_to_pubsub_commands() {
    // Browser polls wait for the next message (none of the buffered ones).
    let d = Daemon::start_with(&config(2).set("browser", "first_message", "\"newest\""));
    let mut sub = d.backend();
    assert_eq!(cmd(&mut sub, &["SUBSCRIBE", "goods", "news"]), "*3[$subscribe, $goods, :1]");
    assert_eq!(sub.reply().to_string(), "*3[$subscribe, $news, :2]");
    assert_eq!(cmd(&mut sub, &["SUBSCRIBE", "goods"]), "*3[$subscribe, $goods, :2]", "already subscribed");
    for (c, name) in [(vec!["PUBLISH", "goods", "x"], "publish"), (vec!["ONLINE"], "online"), (vec!["info"], "info")] {
        assert_eq!(
            cmd(&mut sub, &c),
            format!("-ERR Can't execute '{name}': only SUBSCRIBE / UNSUBSCRIBE / PING / QUIT are allowed in this context")
        );
    }
    assert_eq!(cmd(&mut sub, &["PING"]), "*2[$pong, $]");
    assert_eq!(cmd(&mut sub, &["PING", "hi"]), "*2[$pong, $hi]");

    let mut b = d.backend();
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods", "news", "other"]), "*6[$goods, :1, $news, :1, $other, :0]");
    assert_eq!(cmd(&mut b, &["PUBSUB", "CHANNELS"]), "*2[$goods, $news]");
    assert_eq!(cmd(&mut b, &["PUBSUB", "CHANNELS", "n*"]), "*1[$news]");
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "hello"]), ":1", "the subscribed backend counts");
    assert_eq!(sub.reply().to_string(), "*3[$message, $goods, $hello]");

    // With a held browser poll too; binary-safe payloads.
    let mut poll = poll_as(&d, "/sub/goods", None);
    d.wait_held(1);
    assert_eq!(cmd(&mut b, &["PUBSUB", "NUMSUB", "goods"]), "*2[$goods, :2]");
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "two\r\nlines"]), ":2");
    assert_eq!(sub.reply(), Reply::Array(Some(vec![
        Reply::Bulk(Some(b"message".to_vec())),
        Reply::Bulk(Some(b"goods".to_vec())),
        Reply::Bulk(Some(b"two\r\nlines".to_vec())),
    ])));
    assert_from(&poll.response(), "two\r\nlines", "goods");

    // A second subscriber; then the first unsubscribes from goods.
    let mut sub2 = d.backend();
    assert_eq!(cmd(&mut sub2, &["SUBSCRIBE", "goods"]), "*3[$subscribe, $goods, :1]");
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "three"]), ":2");
    assert_eq!(sub.reply().to_string(), "*3[$message, $goods, $three]");
    assert_eq!(sub2.reply().to_string(), "*3[$message, $goods, $three]");
    assert_eq!(cmd(&mut sub, &["UNSUBSCRIBE", "goods"]), "*3[$unsubscribe, $goods, :1]");
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "four"]), ":1");
    assert_eq!(sub2.reply().to_string(), "*3[$message, $goods, $four]");
    expect_no_frame(&mut sub, ms(200), "unsubscribed from goods");
    assert_eq!(cmd(&mut b, &["PUBLISH", "news", "n1"]), ":1");
    assert_eq!(sub.reply().to_string(), "*3[$message, $news, $n1]");
    assert_eq!(
        cmd(&mut sub, &["ECHO", "x"]),
        "-ERR Can't execute 'echo': only SUBSCRIBE / UNSUBSCRIBE / PING / QUIT are allowed in this context",
        "still subscribed to news"
    );

    // Unsubscribed from everything: an ordinary connection again.
    assert_eq!(cmd(&mut sub, &["UNSUBSCRIBE"]), "*3[$unsubscribe, $news, :0]");
    assert_eq!(cmd(&mut sub, &["UNSUBSCRIBE"]), "*3[$unsubscribe, $-1, :0]");
    assert_eq!(cmd(&mut sub, &["PING"]), "+PONG");
    assert_eq!(cmd(&mut sub, &["PUBLISH", "news", "n2"]), ":0");

    // A subscriber that goes away is forgotten.
    drop(sub2);
    eventually("the closed subscriber is dropped", Duration::from_secs(3), || {
        match cmd(&mut b, &["PUBSUB", "NUMSUB", "goods"]).as_str() {
            "*2[$goods, :0]" => Ok(()),
            other => Err(other.to_string()),
        }
    });
    assert_eq!(cmd(&mut b, &["PUBLISH", "goods", "five"]), ":0");
    assert_eq!(cmd(&mut b, &["PUBSUB", "CHANNELS"]), "*0");

    // QUIT in pub/sub mode.
    let mut sub3 = d.backend();
    assert_eq!(cmd(&mut sub3, &["SUBSCRIBE", "goods"]), "*3[$subscribe, $goods, :1]");
    assert_eq!(cmd(&mut sub3, &["QUIT"]), "+OK");
    sub3.expect_closed();
}

// =============================================================================================
// SQLite rows
// =============================================================================================

/// A tiny deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) % n
    }
}

/// One session's churn until `until`: polls on random channels over new connections, re-polls
/// on the same connection after messages, ends each connection by dropping it, shutting it
/// down, or leaving it with unread bytes (a reset). Then, on a coin flip, one last held poll,
/// returned with its channel.
fn churn(addr: SocketAddr, sid: String, seed: u64, until: Instant) -> Result<Option<(Http, &'static str)>, String> {
    const CHANNELS: [&str; 2] = ["goods", "news"];
    let mut rng = Rng(seed | 1);
    while Instant::now() < until {
        let ch = CHANNELS[rng.below(2) as usize];
        let target = format!("/sub/{ch}");
        let mut c = Http::connect(addr);
        let mut req = get_as(&target, Some(&sid), &[]);
        let reset = rng.below(4) == 0;
        if reset {
            req = format!("{}{req}", get_as("/nothing-here", Some(&sid), &[]));
        }
        c.send(&req);
        for _ in 0..rng.below(4) {
            c.set_timeout(ms(50 + rng.below(350)));
            match c.try_response() {
                Ok(r) if r.status == 404 && reset => {
                    // Read it after all: the next read is the poll.
                    continue;
                }
                Ok(r) if r.status == 200 => c.send(&get_after(&target, Some(&sid), &r)),
                Ok(r) => return Err(format!("{sid}: unexpected answer:\n{r}")),
                Err(_) => break,
            }
        }
        if rng.below(3) == 0 {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        drop(c);
        thread::sleep(ms(rng.below(80)));
    }
    if rng.below(2) == 0 {
        let ch = CHANNELS[rng.below(2) as usize];
        let mut c = Http::connect(addr);
        c.send(&get_as(&format!("/sub/{ch}"), Some(&sid), &[]));
        return Ok(Some((c, ch)));
    }
    Ok(None)
}

/// What presence should say: online sessions with users, and channel -> sessions.
struct Truth {
    online: BTreeMap<String, String>,
    on: BTreeMap<String, BTreeSet<String>>,
}

impl Truth {
    fn rows(&self) -> Vec<Row> {
        let mut v: Vec<Row> = self.online.iter().map(|(s, u)| row(s, u, "", "comet")).collect();
        for (ch, sids) in &self.on {
            v.extend(sids.iter().map(|s| row(s, &self.online[s], ch, "comet")));
        }
        v.sort();
        v
    }

    fn list(&self, sids: impl Iterator<Item = String>) -> String {
        let items: Vec<(String, String)> = sids.map(|s| (s.clone(), self.online[&s].clone())).collect();
        let refs: Vec<(&str, &str)> = items.iter().map(|(s, u)| (s.as_str(), u.as_str())).collect();
        pairs(&refs)
    }

    /// Compares the daemon's replies and the table with the truth.
    fn check(&self, b: &mut Resp, db: &Path, channels: &[&str]) -> Result<(), String> {
        let mut diffs = Vec::new();
        let online = self.list(self.online.keys().cloned());
        let got = cmd(b, &["ONLINE"]);
        if got != online {
            diffs.push(format!("ONLINE {got}, want {online}"));
        }
        let got = cmd(b, &["ONLINE", "COUNT"]);
        if got != format!(":{}", self.online.len()) {
            diffs.push(format!("ONLINE COUNT {got}, want {}", self.online.len()));
        }
        for ch in channels {
            let sids = self.on.get(*ch).cloned().unwrap_or_default();
            let want = self.list(sids.iter().cloned());
            let got = cmd(b, &["PRESENCE", ch]);
            if got != want {
                diffs.push(format!("PRESENCE {ch} {got}, want {want}"));
            }
            let got = cmd(b, &["PUBSUB", "NUMSUB", ch]);
            let want = format!("*2[${ch}, :{}]", sids.len());
            if got != want {
                diffs.push(format!("PUBSUB NUMSUB {ch} {got}, want {want}"));
            }
        }
        let want = self.rows();
        match rows(db, "comet_online") {
            Ok(got) if got == want => {}
            Ok(got) => {
                let g: BTreeSet<&Row> = got.iter().collect();
                let w: BTreeSet<&Row> = want.iter().collect();
                diffs.push(format!(
                    "table: {} rows, want {}; extra {:?}; missing {:?}",
                    got.len(),
                    want.len(),
                    g.difference(&w).collect::<Vec<_>>(),
                    w.difference(&g).collect::<Vec<_>>()
                ));
            }
            Err(e) => diffs.push(format!("table: {e}")),
        }
        if diffs.is_empty() { Ok(()) } else { Err(diffs.join("\n")) }
    }
}

/// Replays the event stream, checking it makes sense (no double online, no join twice, every
/// leave before its offline); returns the state it ends in.
fn replay(events: &[String]) -> Result<Truth, String> {
    let mut online: BTreeMap<String, String> = BTreeMap::new();
    let mut on: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        let w: Vec<&str> = e.split(' ').collect();
        let bad = |why: &str| Err(format!("event {i} {e:?}: {why}; events so far: {:?}", &events[..=i]));
        match w[..] {
            ["online", s] | ["online", s, _] => {
                if online.insert(s.into(), w.get(2).unwrap_or(&"").to_string()).is_some() {
                    return bad("already online");
                }
            }
            ["offline", s] => {
                if online.remove(s).is_none() {
                    return bad("was not online");
                }
                if on.values().any(|m| m.contains(s)) {
                    return bad("offline while still on a channel");
                }
            }
            ["join", s, ch] => {
                if !online.contains_key(s) {
                    return bad("join while offline");
                }
                if !on.entry(ch.into()).or_default().insert(s.into()) {
                    return bad("joined twice");
                }
            }
            ["leave", s, ch] => {
                if !on.get_mut(ch).is_some_and(|m| m.remove(s)) {
                    return bad("leave without join");
                }
            }
            _ => return bad("unknown event"),
        }
    }
    on.retain(|_, m| !m.is_empty());
    Ok(Truth { online, on })
}

#[test]
fn presence_table_matches_online_after_churn() {
    const SESSIONS: usize = 30;
    const CHURN: Duration = Duration::from_secs(3);
    let scratch = Scratch::new();
    let db = scratch.path().join("app.sqlite");
    let d = Daemon::start_with(
        &config(1)
            .set("presence", "database", &toml_str(&db.to_string_lossy()))
            .set("browser", "poll_timeout_secs", "30")
            .set("browser", "first_message", "\"newest\"")
            .set("log", "level", "\"info\""),
    );
    let ev = Events::subscribe(&d);
    let mut b = d.backend();
    let sids: Vec<String> = (0..SESSIONS).map(|i| format!("c{i:02}")).collect();
    let user = |i: usize| if i % 5 == 4 { String::new() } else { format!("user{i}") };
    for (i, s) in sids.iter().enumerate() {
        let u = user(i);
        let args: Vec<&str> = if u.is_empty() { vec!["SESSION.OPEN", s] } else { vec!["SESSION.OPEN", s, &u] };
        assert_eq!(cmd(&mut b, &args), "+OK");
    }
    // A few are joined server-side to lobby: on it whenever online.
    for s in &sids[..6] {
        assert_eq!(cmd(&mut b, &["JOIN", s, "lobby"]), ":1");
    }

    let until = Instant::now() + CHURN;
    let seed = now_unix();
    let workers: Vec<_> = sids
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (addr, s) = (d.browser, s.clone());
            thread::spawn(move || churn(addr, s, seed.wrapping_mul(31).wrapping_add(i as u64 * 7919), until))
        })
        .collect();
    // Messages answer held polls; the pollers re-poll on the same connection.
    let mut published = 0;
    while Instant::now() + ms(300) < until {
        for ch in ["goods", "news"] {
            let r = b.cmd(&["PUBLISH", ch, "tick"]);
            assert!(matches!(r, Reply::Integer(_)), "PUBLISH {ch}: {r}");
            published += 1;
        }
        thread::sleep(ms(60));
    }
    let mut held = Vec::new();
    let mut truth = Truth { online: BTreeMap::new(), on: BTreeMap::new() };
    for (i, w) in workers.into_iter().enumerate() {
        match w.join().expect("churn thread panicked") {
            Ok(Some((c, ch))) => {
                truth.online.insert(sids[i].clone(), user(i));
                truth.on.entry(ch.to_string()).or_default().insert(sids[i].clone());
                if i < 6 {
                    truth.on.entry("lobby".into()).or_default().insert(sids[i].clone());
                }
                held.push(c);
            }
            Ok(None) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(published > 20, "only {published} publishes during the churn");
    d.wait_held(held.len());
    // Everything else went more than a grace ago after this, then rows settle.
    thread::sleep(Duration::from_secs(1) + ms(300));
    let seen_at = Instant::now();
    eventually(
        &format!("ONLINE, PRESENCE, NUMSUB and the table match the {} sessions left holding a poll", held.len()),
        Duration::from_secs(6),
        || truth.check(&mut b, &db, &["goods", "news", "lobby"]),
    );
    eprintln!("presence churn: {} of {SESSIONS} sessions left online; settled {:?} after grace", held.len(), seen_at.elapsed());

    // The event stream tells the same story, and every step of it made sense.
    let mut events = Vec::new();
    while let Some((_, e)) = ev.next(ms(300)) {
        events.push(e);
    }
    assert!(events.len() >= 2 * SESSIONS, "only {} presence events for {SESSIONS} churning sessions", events.len());
    let replayed = replay(&events).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(replayed.online, truth.online, "online set from replaying {} events", events.len());
    assert_eq!(replayed.on, truth.on, "channels from replaying {} events", events.len());
    drop(held);
}

#[test]
fn restart_deletes_the_rows_of_its_instance_only() {
    let scratch = Scratch::new();
    let db = scratch.path().join("app.sqlite");
    let cfg = config(1)
        .set("presence", "database", &toml_str(&db.to_string_lossy()))
        .set("presence", "table", "\"online_now\"")
        .set("presence", "instance", "\"node-a\"");
    {
        let d1 = Daemon::start_with(&cfg);
        let mut b = d1.backend();
        assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
        let _p = poll_as(&d1, "/sub/goods", Some("s1"));
        d1.wait_held(1);
        let want = vec![row("s1", "u1", "", "node-a"), row("s1", "u1", "goods", "node-a")];
        eventually("rows of the first run", Duration::from_secs(5), || {
            let got = rows(&db, "online_now")?;
            if got == want { Ok(()) } else { Err(format!("{got:?}")) }
        });
        // Another daemon sharing the table.
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute("INSERT INTO online_now (session, user, channel, since, daemon) VALUES ('x9', 'u9', '', ?1, 'node-b')", [now_unix() as i64])
            .unwrap();
        // d1 dies without a word (SIGKILL on drop): its rows stay behind as ghosts.
    }
    let ghosts = rows(&db, "online_now").unwrap();
    assert_eq!(ghosts.len(), 3, "after a crash the rows are still there: {ghosts:?}");

    let d2 = Daemon::start_with(&cfg);
    assert_eq!(
        rows(&db, "online_now").unwrap(),
        vec![row("x9", "u9", "", "node-b")],
        "at start (before `ready`), the rows of instance node-a are deleted, node-b's kept"
    );
    let mut b = d2.backend();
    assert_eq!(cmd(&mut b, &["ONLINE", "COUNT"]), ":0");
    let _p = poll_as(&d2, "/sub/news", Some("s2"));
    d2.wait_held(1);
    eventually("rows of the second run", Duration::from_secs(5), || {
        let got = rows(&db, "online_now")?;
        let want = vec![row("s2", "", "", "node-a"), row("s2", "", "news", "node-a"), row("x9", "u9", "", "node-b")];
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    });
}

#[test]
fn rows_catch_up_after_the_database_was_locked() {
    let scratch = Scratch::new();
    let db = scratch.path().join("app.sqlite");
    let d = Daemon::start_with(&config(1).set("presence", "database", &toml_str(&db.to_string_lossy())));
    let mut b = d.backend();
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s1", "u1"]), "+OK");
    assert_eq!(cmd(&mut b, &["SESSION.OPEN", "s2", "u2"]), "+OK");
    let p1 = poll_as(&d, "/sub/goods", Some("s1"));
    d.wait_held(1);
    eventually("rows before the lock", Duration::from_secs(5), || {
        let got = rows(&db, "comet_online")?;
        let want = vec![row("s1", "u1", "", "comet"), row("s1", "u1", "goods", "comet")];
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    });

    // The application holds the database longer than the daemon's 5 s busy timeout while
    // sessions come and go: the batch in flight fails, and the table must be rewritten from the
    // live state afterwards.
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let _p2 = poll_as(&d, "/sub/news", Some("s2"));
    d.wait_held(2);
    drop(p1);
    let _p3 = poll_as(&d, "/sub/goods", Some("s3"));
    d.wait_held(2);
    thread::sleep(Duration::from_millis(5800));
    assert_eq!(cmd(&mut b, &["ONLINE"]), pairs(&[("s2", "u2"), ("s3", "")]), "presence itself never waits on the database");
    locker.execute_batch("ROLLBACK").unwrap();
    let want = vec![row("s2", "u2", "", "comet"), row("s2", "u2", "news", "comet"), row("s3", "", "", "comet"), row("s3", "", "goods", "comet")];
    eventually("rows after the lock is released", Duration::from_secs(8), || {
        let got = rows(&db, "comet_online")?;
        if got == want { Ok(()) } else { Err(format!("{got:?}, want {want:?}")) }
    });
}
