//! Keeps the benchmark from rotting: a tiny run of the load generator (`comet-bench`, the program
//! behind `scripts/bench`) against the real daemon. It starts `comet` on `127.0.0.1:0` listeners,
//! reads the bound ports from the daemon's `ready` line, runs a few hundred subscribers through a
//! burst on one channel (plain and batched answers) and rounds on one channel each, and checks
//! the result line: every message delivered once, none lost, no failed subscriber. It asserts
//! nothing about speed (benchmarks are programs that print figures, not timed tests).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

const TOKEN: &str = "bench-smoke-token";

/// The daemon, killed when dropped.
struct Daemon {
    child: Child,
    browser: String,
    control: String,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_comet() -> Daemon {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("comet-bench-smoke-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("server.toml");
    // Info level: the `ready` line with the bound addresses is written at info.
    std::fs::write(
        &config,
        format!(
            "[log]\nlevel = \"info\"\n[browser]\nlisten = \"127.0.0.1:0\"\n[control]\nlisten = \"127.0.0.1:0\"\n\
             [control.tokens]\nbench = \"{TOKEN}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [channels]\nbuffer_length = 100\nmessage_ttl_secs = 3600\n[limits]\nmax_connections = 2000\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_comet"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start comet");
    // Read stderr on a thread (the daemon keeps writing to it) and hand over the ready line.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" ready ") {
                let _ = tx.send(line.clone());
            }
            eprintln!("comet: {line}");
        }
    });
    let ready = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            panic!("comet wrote no ready line within 10 s");
        }
    };
    let addr = |key: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {ready:?}"))
            .to_string()
    };
    Daemon { browser: addr("browser"), control: addr("control"), child, dir }
}

/// Runs `comet-bench run` against the daemon with `args`; returns its result fields.
fn bench(d: &Daemon, args: &[&str]) -> HashMap<String, String> {
    let pid = d.child.id().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_comet-bench"))
        .args(["run", "--target", "comet", "--http", &d.browser, "--control", &d.control, "--token", TOKEN])
        .args(["--server-pid", &pid, "--timeout", "60", "--drain", "10"])
        .args(args)
        .output()
        .expect("run comet-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "comet-bench failed: {stderr}\n{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("scenario=")).unwrap_or_else(|| panic!("no result line in {stdout:?}; stderr: {stderr}"));
    eprintln!("{line}");
    line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn num(f: &HashMap<String, String>, k: &str) -> u64 {
    f.get(k).unwrap_or_else(|| panic!("no {k} in the result")).parse().unwrap_or_else(|_| panic!("{k} is not a number"))
}

fn assert_all_delivered(f: &HashMap<String, String>, expected: u64) {
    assert_eq!(num(f, "failed"), 0, "failed subscribers: {f:?}");
    assert_eq!(num(f, "timed_out"), 0, "phase timed out: {f:?}");
    assert_eq!(num(f, "expected"), expected);
    assert_eq!(num(f, "delivered"), expected, "not all delivered: {f:?}");
    assert_eq!(num(f, "lost"), 0, "lost messages: {f:?}");
    assert_eq!(num(f, "dup"), 0, "duplicates: {f:?}");
    assert_eq!(num(f, "misrouted"), 0, "messages of another channel: {f:?}");
    assert_eq!(num(f, "errors"), 0, "error answers: {f:?}");
    assert_eq!(num(f, "publish_errors"), 0, "publish errors: {f:?}");
}

#[test]
fn burst_on_one_channel_loses_nothing() {
    let d = start_comet();
    let f = bench(&d, &["--subs", "300", "--channels", "1", "--messages", "30", "--sources", "2"]);
    assert_eq!(num(&f, "held"), 300, "every subscriber held before publishing: {f:?}");
    assert_all_delivered(&f, 300 * 30);
    assert!(f.contains_key("cpu_us_per_delivery") && f.contains_key("bytes_per_held"), "server figures read from /proc: {f:?}");
    // Back to back, most answers go to re-polls from the buffer: no fan-out time is claimed.
    assert!(!f.contains_key("us_per_answer"), "{f:?}");
}

#[test]
fn streams_lose_nothing_over_either_transport() {
    for transport in ["eventsource", "websocket"] {
        let d = start_comet();
        let f = bench(&d, &["--subs", "300", "--channels", "3", "--messages", "30", "--transport", transport]);
        assert_eq!(num(&f, "held"), 300, "every stream open before publishing ({transport}): {f:?}");
        assert_all_delivered(&f, 300 * 30);
        assert_eq!(num(&f, "responses"), 300 * 30, "one event or frame per message ({transport}): {f:?}");
    }
}

#[test]
fn paced_fan_out_loses_nothing_and_is_timed_per_answer() {
    let d = start_comet();
    let f = bench(&d, &["--subs", "200", "--channels", "1", "--messages", "10", "--rate", "20"]);
    assert_all_delivered(&f, 200 * 10);
    // Every message is one fan-out to the 200 held polls: its time per answer is measured.
    let per: f64 = f.get("us_per_answer").unwrap_or_else(|| panic!("no us_per_answer: {f:?}")).parse().expect("a number");
    assert!(per > 0.0 && per < 100_000.0, "time per answer: {f:?}");
}

#[test]
fn batched_burst_loses_nothing() {
    let d = start_comet();
    let f = bench(&d, &["--subs", "300", "--channels", "1", "--messages", "20", "--multipart", "1"]);
    assert_all_delivered(&f, 300 * 20);
    // The held polls are answered one message each; the re-polls find the rest of the burst
    // buffered and must get it in batches, or the multipart path went unexercised.
    let per: f64 = f["messages_per_response"].parse().expect("messages_per_response is a number");
    assert!(per > 1.0, "no batch answered: {f:?}");
}

#[test]
fn rounds_on_many_channels_lose_nothing() {
    let d = start_comet();
    let f = bench(&d, &["--subs", "200", "--channels", "each", "--messages", "1", "--rounds", "3"]);
    assert_all_delivered(&f, 200 * 3);
    // One subscriber per channel: there is no fan-out to time.
    assert!(!f.contains_key("us_per_answer"), "{f:?}");
}

#[test]
fn the_floor_writes_every_answer_and_leaves_no_reader_behind() {
    let out = Command::new(env!("CARGO_BIN_EXE_comet-bench"))
        .args(["floor", "--subs", "50", "--rounds", "3", "--tag", "scenario=fanout server=floor"])
        .output()
        .expect("run comet-bench floor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "comet-bench floor failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("scenario=fanout server=floor ")).unwrap_or_else(|| panic!("no result line in {stdout:?}"));
    let f: HashMap<String, String> = line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(num(&f, "subs"), 50);
    assert_eq!(num(&f, "rounds"), 3);
    assert_eq!(num(&f, "short_writes"), 0, "every answer written whole: {f:?}");
    let us: f64 = f["floor_us"].parse().expect("floor_us is a number");
    assert!(us > 0.0 && us < 10_000.0, "{f:?}");
    // `output()` returned, so the reader (a child that inherited the pipes) has exited too.
}

#[test]
fn the_floor_says_so_when_its_reader_cannot_start() {
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_comet-bench"))
        .args(["floor", "--subs", "10", "--rounds", "1", "--reader-cpu", "100000"])
        .output()
        .expect("run comet-bench floor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a reader that cannot be pinned fails the run: {stderr}");
    assert!(stderr.contains("cannot pin to CPU 100000") && stderr.contains("the reader exited"), "{stderr}");
    // Told at once, not after the 30 s wait for connections.
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
}
