//! systemd's notify protocol (`Type=notify`): one datagram to `$NOTIFY_SOCKET` says `READY=1`
//! once the listeners are open, `STOPPING=1` when a shutdown begins, and `WATCHDOG=1` every half
//! `$WATCHDOG_USEC` from the loop itself, so a loop that stops turning is restarted. Without
//! `$NOTIFY_SOCKET` every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager, if there is one.
pub struct Notifier {
    sock: Option<(UnixDatagram, String)>,
    /// How often to send `WATCHDOG=1` (half the watchdog timeout), if the watchdog is on.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, which must be ours).
    pub fn from_env() -> Notifier {
        let sock = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty()).and_then(|p| {
            let s = UnixDatagram::unbound().ok()?;
            // A datagram that cannot go at once is dropped rather than stalling the loop.
            s.set_nonblocking(true).ok()?;
            Some((s, p))
        });
        let ours = std::env::var("WATCHDOG_PID").ok().is_none_or(|p| p.parse() == Ok(std::process::id()));
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && ours && sock.is_some())
            .map(|u| Duration::from_micros(u / 2));
        Notifier { sock, watchdog }
    }

    /// Sends one state line, e.g. `READY=1`.
    pub fn send(&self, state: &str) {
        let Some((s, path)) = &self.sock else { return };
        let r = if let Some(name) = path.strip_prefix('@') {
            // An abstract socket (Linux): the name after '@'.
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).and_then(|a| s.send_to_addr(state.as_bytes(), &a))
        } else {
            s.send_to(state.as_bytes(), path)
        };
        if let Err(e) = r {
            crate::debug!("sd_notify {state:?} to {path} failed: {e}");
        }
    }
}
