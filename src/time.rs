//! Calendar arithmetic for the two date forms the daemon writes: HTTP dates (`Last-Modified`,
//! `If-Modified-Since`, always GMT, one-second resolution) and the ISO-8601 stamp on log lines.
//! Pure functions of a Unix time; the loop reads the clock, never this module.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date (the inverse of `civil_from_days`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 IMF-fixdate).
pub fn http_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form the daemon sends and
/// so the only one a client echoes back. The weekday is not checked: the date is the authority.
pub fn parse_http_date(s: &str) -> Option<u64> {
    // Every poll carries the Last-Modified of the message it got last, so the loop parses the
    // same few dates over and over: the last one parsed is remembered.
    thread_local! {
        static LAST: Cell<([u8; 32], usize, u64)> = const { Cell::new(([0; 32], 0, 0)) };
    }
    let s = s.trim();
    let cacheable = !s.is_empty() && s.len() <= 32;
    if cacheable {
        let (bytes, len, secs) = LAST.get();
        if len == s.len() && &bytes[..len] == s.as_bytes() {
            return Some(secs);
        }
    }
    let secs = parse_http_date_uncached(s)?;
    if cacheable {
        let mut bytes = [0; 32];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        LAST.set((bytes, s.len(), secs));
    }
    Some(secs)
}

fn parse_http_date_uncached(s: &str) -> Option<u64> {
    let (_, rest) = s.split_once(", ")?;
    let mut it = rest.split(' ');
    let day: u32 = it.next()?.parse().ok()?;
    let mon_name = it.next()?;
    let mon = MONTHS.iter().position(|m| *m == mon_name)? as u32 + 1;
    let year: i64 = it.next()?.parse().ok()?;
    let hms = it.next()?;
    if it.next()? != "GMT" || it.next().is_some() || !(1..=31).contains(&day) || !(1970..=9999).contains(&year) {
        return None;
    }
    let mut t = hms.split(':');
    let h: u64 = t.next()?.parse().ok()?;
    let mi: u64 = t.next()?.parse().ok()?;
    let se: u64 = t.next()?.parse().ok()?;
    if t.next().is_some() || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = days_from_civil(year, mon, day);
    Some(days as u64 * 86_400 + h * 3600 + mi * 60 + se)
}

/// `2026-11-27T22:30:00Z`, for log lines.
pub fn iso8601(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_date_never_answers_for_another() {
        let (a, b) = ("Sun, 06 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:38 GMT");
        for _ in 0..3 {
            assert_eq!(parse_http_date(a), Some(784_111_777));
            assert_eq!(parse_http_date(a), Some(784_111_777));
            assert_eq!(parse_http_date(b), Some(784_111_778));
            assert_eq!(parse_http_date(&a[..a.len() - 1]), None);
            assert_eq!(parse_http_date(""), None);
            assert_eq!(parse_http_date(&format!(" {a} ")), Some(784_111_777));
        }
    }

    #[test]
    fn http_dates_round_trip() {
        let table: &[(u64, &str)] = &[
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (784_111_777, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
            (1_795_818_600, "Fri, 27 Nov 2026 22:30:00 GMT"),
        ];
        for (secs, text) in table {
            assert_eq!(http_date(*secs), *text);
            assert_eq!(parse_http_date(text), Some(*secs));
        }
        for t in (0..5_000_000_000u64).step_by(86_399 * 37) {
            assert_eq!(parse_http_date(&http_date(t)), Some(t));
        }
    }

    #[test]
    fn bad_dates_are_none() {
        for s in ["", "yesterday", "Sun, 06 Nov 1994 08:49:37", "Sun, 32 Nov 1994 08:49:37 GMT", "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT", "Sun, 06 Nov 1994 08:49 GMT", "Sun, 06 Nov 1994 08:49:37 GMT x", "Sun, 06 Nov 99999999999999999999 08:49:37 GMT"] {
            assert_eq!(parse_http_date(s), None, "{s:?}");
        }
    }

    #[test]
    fn iso_stamp() {
        assert_eq!(iso8601(1_795_818_600), "2026-11-27T22:30:00Z");
    }
}
