//! The server's CPU time and memory, read from /proc: `utime + stime` of /proc/PID/stat (all
//! threads of the process) and `VmRSS` of /proc/PID/status. For nginx the pid given is the
//! worker's, which does the work; the master only waits. A cluster is several processes (two
//! nodes and redis-server): their readings are summed.

/// Kernel clock ticks per second in /proc/PID/stat (USER_HZ: 100 on every Linux ABI the bench
/// runs on; the crate has no libc binding to ask sysconf).
const TICKS_PER_SEC: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// User + system CPU time, microseconds (10 ms resolution).
    pub cpu_us: u64,
    /// Resident set size, KiB.
    pub rss_kb: u64,
}

/// Reads process `pid`; None if it is gone or /proc is unreadable.
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the fields start at 3 (state); utime is field 14 and stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    Some(Sample { cpu_us: (utime + stime) * 1_000_000 / TICKS_PER_SEC, rss_kb })
}

/// Samples the server's processes, summed (no pid: nothing to measure; one gone: None).
pub fn maybe(pids: &[u32]) -> Option<Sample> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(Sample { cpu_us: 0, rss_kb: 0 }, |acc, &p| {
        let s = sample(p)?;
        Some(Sample { cpu_us: acc.cpu_us + s.cpu_us, rss_kb: acc.rss_kb + s.rss_kb })
    })
}
