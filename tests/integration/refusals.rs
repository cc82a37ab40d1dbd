//! Refusals say why, in the answer and in the log (issue 28): a WebSocket refused for its Origin
//! gets a 403 naming the Origin and Host, and one WARN line per Origin per minute.

use crate::common::*;
use std::thread;

fn ws_get(d: &Daemon, origin: &str) -> Response {
    let host = d.browser.to_string();
    d.browser().request(&get(
        "/sub/goods",
        &[
            ("Host", host.as_str()),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Origin", origin),
        ],
    ))
}

fn origin_lines(d: &Daemon, origin: &str) -> Vec<String> {
    d.logs().into_iter().filter(|l| l.contains(" WARN ") && l.contains(origin)).collect()
}

#[test]
fn issue_28_websocket_refused_for_its_origin_says_why_once_a_minute() {
    let d = Daemon::start();
    let host = d.browser.to_string();
    let r = ws_get(&d, "http://evil.test");
    assert_eq!(r.status, 403, "{r}");
    let body = r.text();
    assert!(body.starts_with("origin not allowed: Origin http://evil.test"), "{body}");
    assert!(body.contains(&host), "the body names the Host:\n{body}");
    assert!(body.contains("proxy_set_header Host $http_host;"), "the body names the fix:\n{body}");
    assert_eq!(body.trim_end().lines().count(), 1, "one sentence:\n{body}");

    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = origin_lines(&d, "http://evil.test");
        if !lines.is_empty() {
            break;
        }
        thread::sleep(ms(10));
    }
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert!(l.contains(&format!("{host:?}")), "the line names the Host: {l}");
    assert!(l.contains("http://site.test"), "the line names the allowed origins: {l}");
    assert!(l.contains("proxy_set_header Host $http_host;") && l.contains("allowed_origins"), "the line names the fix: {l}");

    // The same Origin again at once: refused, not logged again; another Origin gets its line.
    assert_eq!(ws_get(&d, "http://evil.test").status, 403);
    assert_eq!(ws_get(&d, "http://other.test").status, 403);
    for _ in 0..100 {
        if !origin_lines(&d, "http://other.test").is_empty() {
            break;
        }
        thread::sleep(ms(10));
    }
    assert_eq!(origin_lines(&d, "http://other.test").len(), 1, "{:?}", d.logs());
    assert_eq!(origin_lines(&d, "http://evil.test").len(), 1, "logged again within the minute: {:?}", d.logs());
}

#[test]
fn version_prints_the_crate_version() {
    let out = run_comet(&[std::ffi::OsStr::new("--version")], std::time::Duration::from_secs(5));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("comet {}\n", env!("CARGO_PKG_VERSION")));
}
