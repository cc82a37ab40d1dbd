//! The table: reads the result lines of every phase of every run (one `key=value ...` line per
//! file, as `comet-bench run` prints them and `scripts/bench` writes the redis-benchmark ones),
//! takes per scenario and server the median over the runs (loss and duplicates: the sum, so a
//! single bad run shows), and prints one markdown table: comet, the other server, their ratio.

use std::collections::BTreeMap;
use std::path::Path;

/// One result line: its fields.
type Fields = BTreeMap<String, String>;

fn parse_line(line: &str) -> Fields {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Results by (scenario, server): every run's fields.
struct Results(BTreeMap<(String, String), Vec<Fields>>);

#[derive(Clone, Copy)]
enum Agg {
    Median,
    Sum,
}

impl Results {
    fn load(dir: &Path) -> std::io::Result<Results> {
        let mut map: BTreeMap<(String, String), Vec<Fields>> = BTreeMap::new();
        let mut files: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else { continue };
            for line in text.lines().filter(|l| l.starts_with("scenario=")) {
                let fields = parse_line(line);
                let (Some(sc), Some(sv)) = (fields.get("scenario"), fields.get("server")) else { continue };
                map.entry((sc.clone(), sv.clone())).or_default().push(fields);
            }
        }
        Ok(Results(map))
    }

    fn values(&self, scenario: &str, server: &str, key: &str) -> Vec<f64> {
        self.0
            .get(&(scenario.to_string(), server.to_string()))
            .map(|runs| runs.iter().filter_map(|f| f.get(key)?.parse::<f64>().ok()).collect())
            .unwrap_or_default()
    }

    fn get(&self, scenario: &str, server: &str, key: &str, agg: Agg) -> Option<f64> {
        let mut v = self.values(scenario, server, key);
        if v.is_empty() {
            return None;
        }
        Some(match agg {
            Agg::Sum => v.iter().sum(),
            Agg::Median => {
                v.sort_by(|a, b| a.total_cmp(b));
                let m = v.len() / 2;
                if v.len() % 2 == 1 {
                    v[m]
                } else {
                    (v[m - 1] + v[m]) / 2.0
                }
            }
        })
    }

    fn runs(&self, scenario: &str, server: &str) -> usize {
        self.0.get(&(scenario.to_string(), server.to_string())).map_or(0, Vec::len)
    }

    fn any(&self, scenario: &str) -> bool {
        self.0.keys().any(|(s, _)| s == scenario)
    }
}

/// A figure: thousands separated when large, a few decimals when small.
fn num(v: Option<f64>) -> String {
    let Some(v) = v else { return "n/a".into() };
    if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 100.0 || v == v.trunc() {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else if v.abs() >= 1.0 {
        format!("{:.2}", v)
    } else {
        format!("{:.3}", v)
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        (Some(a), Some(b)) if a == 0.0 && b == 0.0 => "=".into(),
        _ => "—".into(),
    }
}

struct Table {
    out: String,
}

impl Table {
    fn section(&mut self, title: &str) {
        self.out.push_str(&format!("| **{title}** | | | |\n"));
    }

    fn row(&mut self, label: &str, comet: Option<f64>, other: Option<f64>) {
        self.out.push_str(&format!("| {label} | {} | {} | {} |\n", num(comet), num(other), ratio(comet, other)));
    }

    fn text_row(&mut self, label: &str, comet: &str, other: &str, r: &str) {
        self.out.push_str(&format!("| {label} | {comet} | {other} | {r} |\n"));
    }
}

/// The markdown table for the results in `dir`.
pub fn table(dir: &Path) -> std::io::Result<String> {
    let r = Results::load(dir)?;
    let mut t = Table {
        out: String::from("| figure | comet | nchan (redis-server for PUBLISH) | ratio comet ÷ other |\n|---|---:|---:|---:|\n"),
    };
    let both = |r: &Results, sc: &str, key: &str, agg: Agg| (r.get(sc, "comet", key, agg), r.get(sc, "nchan", key, agg));
    let runs = |r: &Results, sc: &str| r.runs(sc, "comet").max(r.runs(sc, "nchan"));
    let size = |r: &Results, sc: &str, key: &str| r.get(sc, "comet", key, Agg::Median).or(r.get(sc, "nchan", key, Agg::Median)).map_or("?".into(), |v| num(Some(v)));

    // 1. Idle held polls, in order of size, one channel before one each.
    let mut idle: Vec<(u64, bool, String)> = r
        .0
        .keys()
        .filter(|(s, _)| s.starts_with("idle-"))
        .filter_map(|(s, _)| {
            let mut p = s.split('-').skip(1);
            let n: u64 = p.next()?.parse().ok()?;
            Some((n, p.next() == Some("each"), s.clone()))
        })
        .collect();
    idle.sort();
    idle.dedup();
    if !idle.is_empty() {
        t.section("1. Idle held polls (median of runs)");
        for (n, each, sc) in &idle {
            let what = if *each { "one channel each" } else { "one channel" };
            let n = num(Some(*n as f64));
            let (c, o) = both(&r, sc, "held", Agg::Median);
            t.row(&format!("polls held, of {n} on {what}"), c, o);
            let (c, o) = both(&r, sc, "bytes_per_held", Agg::Median);
            t.row(&format!("server RSS growth per held poll, bytes ({n} on {what})"), c, o);
        }
    }

    // 2. Paced fan-out.
    let sc = "fanout";
    if r.any(sc) {
        t.section(&format!(
            "2. Paced fan-out: {} subscribers on one channel, {} messages at {}/s, {} B",
            size(&r, sc, "subs"),
            size(&r, sc, "messages"),
            size(&r, sc, "rate"),
            size(&r, sc, "size")
        ));
        let (c, o) = both(&r, sc, "p50_ms", Agg::Median);
        t.row("delivery latency p50, ms", c, o);
        let (c, o) = both(&r, sc, "p99_ms", Agg::Median);
        t.row("delivery latency p99, ms", c, o);
        loss_rows(&mut t, &r, sc, runs(&r, sc));
    }

    // 3. Burst fan-out, and 3b. the same with batched answers.
    for (sc, title) in [
        ("burst", "3. Burst fan-out"),
        ("burst-batched", "3b. Burst fan-out, batched (`Accept: multipart/mixed`; nchan: `nchan_longpoll_multipart_response on`)"),
    ] {
        if !r.any(sc) {
            continue;
        }
        t.section(&format!(
            "{title}: {} subscribers on one channel, {} messages back to back",
            size(&r, sc, "subs"),
            size(&r, sc, "messages")
        ));
        if sc == "burst-batched" {
            let (c, o) = both(&r, sc, "messages_per_response", Agg::Median);
            t.row("messages per response", c, o);
        }
        let (c, o) = both(&r, sc, "deliveries_per_s", Agg::Median);
        t.row("deliveries per second (wall clock; the load generator may be the limit)", c, o);
        let (c, o) = both(&r, sc, "cpu_us_per_delivery", Agg::Median);
        t.row("server CPU µs per delivery", c, o);
        let (c, o) = both(&r, sc, "p99_ms", Agg::Median);
        t.row("delivery latency p99, ms (includes queueing behind the burst)", c, o);
        let (c, o) = both(&r, sc, "loadgen_cpu_pct", Agg::Median);
        t.row("load generator CPU, % of its core (near 100: it is the limit)", c, o);
        loss_rows(&mut t, &r, sc, runs(&r, sc));
    }

    // 4. Many channels.
    let sc = "channels";
    if r.any(sc) {
        t.section(&format!(
            "4. Many channels: {} subscribers on {} channels, one message per channel, {} rounds",
            size(&r, sc, "subs"),
            size(&r, sc, "channels"),
            size(&r, sc, "rounds")
        ));
        let (c, o) = both(&r, sc, "deliveries_per_s", Agg::Median);
        t.row("deliveries per second", c, o);
        let (c, o) = both(&r, sc, "p99_ms", Agg::Median);
        t.row("delivery latency p99, ms", c, o);
        let (c, o) = both(&r, sc, "cpu_us_per_delivery", Agg::Median);
        t.row("server CPU µs per delivery", c, o);
        let (c, o) = both(&r, sc, "loadgen_cpu_pct", Agg::Median);
        t.row("load generator CPU, % of its core", c, o);
        loss_rows(&mut t, &r, sc, runs(&r, sc));
    }

    // 5. Publish rate.
    let sc = "publish";
    if r.any(sc) {
        t.section("5. Publish rate: redis-benchmark -P 16 -c 10, PUBLISH with a 100 B payload (other = redis-server)");
        let c = r.get(sc, "comet", "rps", Agg::Median);
        let o = r.get(sc, "redis", "rps", Agg::Median);
        t.row("PUBLISH per second", c, o);
        let c = r.get(sc, "comet", "cpu_us_per_op", Agg::Median);
        let o = r.get(sc, "redis", "cpu_us_per_op", Agg::Median);
        t.row("server CPU µs per PUBLISH", c, o);
    }

    // 6. Plain request baseline.
    let sc = "plain";
    if r.any(sc) {
        let base = r.get(sc, "nginx", "cpu_us_per_request", Agg::Median);
        t.section(&format!(
            "6. Baseline: nginx `return 204`, {} keep-alive connections x {} requests (other = nginx)",
            num(r.get(sc, "nginx", "subs", Agg::Median)),
            num(r.get(sc, "nginx", "requests_per_conn", Agg::Median))
        ));
        t.text_row("requests per second", "—", &num(r.get(sc, "nginx", "requests_per_s", Agg::Median)), "—");
        t.text_row("server CPU µs per request", "—", &num(base), "—");
        t.text_row("load generator CPU, % of its core", "—", &num(r.get(sc, "nginx", "loadgen_cpu_pct", Agg::Median)), "—");
        for (sc, what) in [("burst", "burst"), ("burst-batched", "burst, batched"), ("channels", "many channels")] {
            let (c, o) = both(&r, sc, "cpu_us_per_delivery", Agg::Median);
            let div = |v: Option<f64>| match (v, base) {
                (Some(v), Some(b)) if b > 0.0 => Some(v / b),
                _ => None,
            };
            if c.is_some() || o.is_some() {
                t.row(&format!("{what}: CPU per delivery, in plain requests"), div(c), div(o));
            }
        }
    }
    Ok(t.out)
}

fn loss_rows(t: &mut Table, r: &Results, sc: &str, runs: usize) {
    let get = |srv: &str, k: &str| r.get(sc, srv, k, Agg::Sum);
    t.row(&format!("messages lost (sum of {runs} runs)"), get("comet", "lost"), get("nchan", "lost"));
    t.row(&format!("duplicates (sum of {runs} runs)"), get("comet", "dup"), get("nchan", "dup"));
    let expected = |srv: &str| r.get(sc, srv, "expected", Agg::Median);
    t.row("deliveries expected per run", expected("comet"), expected("nchan"));
    let bad = |srv: &str| Some(get(srv, "failed")? + get(srv, "misrouted")? + get(srv, "errors")?);
    t.row(&format!("failed subscribers + misrouted + error answers (sum of {runs} runs)"), bad("comet"), bad("nchan"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(num(Some(1234567.0)), "1,234,567");
        assert_eq!(num(Some(0.1234)), "0.123");
        assert_eq!(num(Some(12.34)), "12.3");
        assert_eq!(num(Some(0.0)), "0");
        assert_eq!(num(None), "n/a");
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25");
    }
}
