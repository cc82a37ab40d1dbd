//! Logging: one line per event worth an operator's attention, on stderr, with a UTC stamp and a
//! level. The level comes from `[log] level`, or from `RUST_LOG` when set (`RUST_LOG=debug` or
//! `RUST_LOG=comet=debug`). Kept to a global atomic and four macros: nothing here allocates
//! unless the line is actually written.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(2);
const NAMES: [&str; 4] = ["ERROR", "WARN", "INFO", "DEBUG"];

/// Sets the level from the config, unless `RUST_LOG` names a valid one.
pub fn init(config_level: u8) {
    let from_env = std::env::var("RUST_LOG").ok().and_then(|v| {
        // Accept both `debug` and `comet=debug` (the env_logger form operators know).
        let v = v.rsplit(',').find(|p| !p.contains('=') || p.starts_with("comet=")).unwrap_or("").to_string();
        crate::config::parse_level(v.trim_start_matches("comet="))
    });
    LEVEL.store(from_env.unwrap_or(config_level), Ordering::Relaxed);
}

/// True when lines of `level` are written.
pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one line. A full stderr pipe would block here, as it does for Redis; run under
/// systemd (journald reads promptly) or redirect to a file.
pub fn write(level: u8, args: std::fmt::Arguments<'_>) {
    let line = format!("{} {} {}\n", crate::time::iso8601(crate::time::unix_now()), NAMES[level.min(3) as usize], args);
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[macro_export]
macro_rules! error { ($($t:tt)*) => { if $crate::log::enabled(0) { $crate::log::write(0, format_args!($($t)*)) } } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { if $crate::log::enabled(1) { $crate::log::write(1, format_args!($($t)*)) } } }
#[macro_export]
macro_rules! info { ($($t:tt)*) => { if $crate::log::enabled(2) { $crate::log::write(2, format_args!($($t)*)) } } }
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { if $crate::log::enabled(3) { $crate::log::write(3, format_args!($($t)*)) } } }
