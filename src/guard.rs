//! Brute-force guard for the control socket and the admin listener: counts failed token checks
//! per address, refuses an address that failed too often for a penalty period, and rate-limits
//! the log lines about wrong tokens so an attack cannot flood the log. [`Throttle`] does the same
//! for every other refusal's log line: one line per reason (and Origin, or address) per minute,
//! in a bounded map. Pure state: time is passed in.

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

/// Most keys a [`Throttle`] remembers. Past it, lines for keys it has no room for share one
/// line a second between them, so a flood of distinct Origins grows neither memory nor the log.
const THROTTLE_KEYS: usize = 1024;

/// Rate-limits log lines by key (a refusal's reason, with the Origin or the address it came
/// from): the first line of a key is written, the next ones within `every` are counted, and
/// the count is told on the key's next line.
pub struct Throttle {
    /// Key -> (when its last line was written, lines held back since).
    seen: HashMap<Box<str>, (Instant, u64)>,
    /// Keys in the order their line was written, for expiry. A key logged again is pushed again;
    /// its stale entry is skipped when it comes up (the map's stamp no longer matches).
    order: VecDeque<(Instant, Box<str>)>,
    /// At most one line per key this often.
    every: Duration,
    /// The shared limit for keys there was no room for: last line, lines held back.
    overflow: (Option<Instant>, u64),
}

impl Throttle {
    /// At most one line per key every `every`.
    pub fn new(every: Duration) -> Throttle {
        Throttle { seen: HashMap::new(), order: VecDeque::new(), every, overflow: (None, 0) }
    }

    /// Whether a line for `key` may be written now; with the permission, how many lines for it
    /// were held back since its last one.
    pub fn may_log(&mut self, key: &str, now: Instant) -> Option<u64> {
        while let Some((at, k)) = self.order.front() {
            if now.duration_since(*at) <= self.every && self.order.len() <= 2 * THROTTLE_KEYS {
                break;
            }
            if self.seen.get(k).is_some_and(|(last, _)| last == at) {
                self.seen.remove(k);
            }
            self.order.pop_front();
        }
        if let Some((last, held)) = self.seen.get_mut(key) {
            if now.duration_since(*last) < self.every {
                *held += 1;
                return None;
            }
            *last = now;
            self.order.push_back((now, key.into()));
            return Some(std::mem::take(held));
        }
        if self.seen.len() >= THROTTLE_KEYS {
            let (last, held) = &mut self.overflow;
            if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
                *held += 1;
                return None;
            }
            *last = Some(now);
            return Some(std::mem::take(held));
        }
        self.seen.insert(key.into(), (now, 0));
        self.order.push_back((now, key.into()));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_one_line_per_key_per_period() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(60));
        assert_eq!(t.may_log("origin https://a", t0), Some(0));
        assert_eq!(t.may_log("origin https://b", t0), Some(0), "another key has its own line");
        for _ in 0..3 {
            assert_eq!(t.may_log("origin https://a", t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(t.may_log("origin https://a", t0 + Duration::from_secs(59)), None);
        assert_eq!(t.may_log("origin https://a", t0 + Duration::from_secs(60)), Some(4), "the held-back count comes with the next line");
        assert_eq!(t.may_log("origin https://a", t0 + Duration::from_secs(61)), None);
        // b expired from the map: logged again, with nothing held back.
        assert_eq!(t.may_log("origin https://b", t0 + Duration::from_secs(120)), Some(0));
    }

    #[test]
    fn throttle_memory_and_lines_are_bounded_under_a_flood_of_keys() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(60));
        let mut written = 0;
        for i in 0..100_000 {
            if t.may_log(&format!("origin https://{i}.evil"), t0 + Duration::from_micros(i)).is_some() {
                written += 1;
            }
        }
        assert!(t.seen.len() <= THROTTLE_KEYS, "{} keys kept", t.seen.len());
        assert!(t.order.len() <= 2 * THROTTLE_KEYS + 1, "{} entries queued", t.order.len());
        // The first THROTTLE_KEYS get their line; the rest (all within 0.1 s) share one.
        assert_eq!(written, THROTTLE_KEYS + 1);
        // A minute on, the old keys have expired and new ones get their own lines again.
        assert_eq!(t.may_log("origin https://late", t0 + Duration::from_secs(61)), Some(0));
        assert!(t.seen.len() <= 2);
    }

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
