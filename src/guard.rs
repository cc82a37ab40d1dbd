//! Brute-force guard for the control socket and the admin listener: counts failed token checks
//! per address, refuses an address that failed too often for a penalty period, and rate-limits
//! the log lines about wrong tokens so an attack cannot flood the log. Pure state: time is passed in.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures are counted over this window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Failed AUTH commands after which a control connection is closed.
pub const MAX_FAILURES_PER_CONNECTION: u32 = 3;
/// Most addresses tracked; beyond it the oldest are forgotten (memory stays bounded).
const MAX_TRACKED: usize = 100_000;

struct Record {
    /// Failures in the current window.
    count: u32,
    /// When the window started.
    since: Instant,
    /// Refused until then.
    blocked_until: Option<Instant>,
}

/// The guard.
pub struct Guard {
    records: HashMap<IpAddr, Record>,
    /// Addresses in the order first seen, for expiry.
    order: VecDeque<(Instant, IpAddr)>,
    /// Failures per window that trigger the penalty.
    limit: u32,
    /// How long a penalised address is refused.
    penalty: Duration,
    /// When the last "wrong token" line was logged, and lines held back since.
    last_log: Option<Instant>,
    suppressed: u64,
}

impl Guard {
    /// A guard that blocks an address for `penalty` after `limit` failures within `WINDOW`.
    pub fn new(limit: u32, penalty: Duration) -> Guard {
        Guard { records: HashMap::new(), order: VecDeque::new(), limit, penalty, last_log: None, suppressed: 0 }
    }

    fn prune(&mut self, now: Instant) {
        while let Some((at, ip)) = self.order.front().copied() {
            let old = now.duration_since(at) >= WINDOW + self.penalty;
            if !old && self.order.len() <= MAX_TRACKED {
                break;
            }
            self.order.pop_front();
            if self.records.get(&ip).is_some_and(|r| r.since == at) {
                self.records.remove(&ip);
            }
        }
    }

    /// How much longer `ip` is refused, if it is.
    pub fn blocked(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        self.prune(now);
        let until = self.records.get(&ip)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failure; true if it put the address under penalty.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.prune(now);
        let r = self.records.entry(ip).or_insert_with(|| Record { count: 0, since: now, blocked_until: None });
        if now.duration_since(r.since) >= WINDOW {
            r.count = 0;
            r.since = now;
        }
        if r.count == 0 {
            self.order.push_back((r.since, ip));
        }
        r.count += 1;
        if r.count >= self.limit && r.blocked_until.is_none_or(|u| u <= now) {
            r.blocked_until = Some(now + self.penalty);
            return true;
        }
        false
    }

    /// Whether a line about a failure may be logged now (one a second); the number of lines
    /// held back since the last one is returned with the permission.
    pub fn may_log(&mut self, now: Instant) -> Option<u64> {
        if self.last_log.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return None;
        }
        self.last_log = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_then_forgives() {
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let mut g = Guard::new(3, Duration::from_secs(10));
        assert!(!g.failed(a, t0));
        assert!(!g.failed(a, t0));
        assert!(g.blocked(a, t0).is_none());
        assert!(g.failed(a, t0), "third failure blocks");
        assert_eq!(g.blocked(a, t0 + Duration::from_secs(4)), Some(Duration::from_secs(6)));
        assert!(g.blocked(b, t0).is_none(), "other addresses unaffected");
        assert!(g.blocked(a, t0 + Duration::from_secs(10)).is_none(), "penalty over");
        // A new window starts after WINDOW.
        assert!(!g.failed(a, t0 + WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn log_lines_are_rate_limited() {
        let t0 = Instant::now();
        let mut g = Guard::new(3, Duration::from_secs(10));
        assert_eq!(g.may_log(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(g.may_log(t0 + Duration::from_millis(10)), None);
        }
        assert_eq!(g.may_log(t0 + Duration::from_secs(1)), Some(5));
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut g = Guard::new(3, Duration::from_secs(10));
        for i in 0..(MAX_TRACKED as u32 + 1000) {
            g.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(g.records.len() <= MAX_TRACKED + 1);
    }
}
