//! The table: reads the result lines of every phase of every run (one `key=value ...` line per
//! file, as `comet-bench run` prints them and `scripts/bench` writes the redis-benchmark ones),
//! takes per scenario and server the median over the runs (loss and duplicates: the sum, so a
//! single bad run shows), and prints one markdown table: comet, the other server, and their
//! ratio, taken as the median of the per-run ratios (each run's two phases share the machine's
//! mood of the moment).

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
        match agg {
            Agg::Sum => (!v.is_empty()).then(|| v.iter().sum()),
            Agg::Median => median(&mut v),
        }
    }

    /// The median over runs of `a`'s figure divided by `b`'s in the same run. The two phases of a
    /// run go back to back, so a slow spell of the shared machine weighs on both sides of the
    /// same ratio instead of on one server's median.
    fn paired_ratio(&self, scenario: &str, a: &str, b: &str, key: &str) -> Option<f64> {
        let by_run = |server: &str| -> BTreeMap<String, f64> {
            self.0
                .get(&(scenario.to_string(), server.to_string()))
                .map(|runs| runs.iter().filter_map(|f| Some((f.get("run")?.clone(), f.get(key)?.parse::<f64>().ok()?))).collect())
                .unwrap_or_default()
        };
        let (va, vb) = (by_run(a), by_run(b));
        let mut ratios: Vec<f64> = va.iter().filter_map(|(run, x)| vb.get(run).filter(|y| **y != 0.0).map(|y| x / y)).collect();
        median(&mut ratios)
    }

    fn runs(&self, scenario: &str, server: &str) -> usize {
        self.0.get(&(scenario.to_string(), server.to_string())).map_or(0, Vec::len)
    }

    fn any(&self, scenario: &str) -> bool {
        self.0.keys().any(|(s, _)| s == scenario)
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
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

    /// Both servers' medians over the runs, and the median of the per-run ratios.
    fn median_row(&mut self, r: &Results, scenario: &str, servers: (&str, &str), key: &str, label: &str) {
        let c = r.get(scenario, servers.0, key, Agg::Median);
        let o = r.get(scenario, servers.1, key, Agg::Median);
        let paired = r.paired_ratio(scenario, servers.0, servers.1, key);
        let shown = match paired {
            Some(p) if c.is_some_and(|c| c != 0.0) => format!("{p:.2}"),
            _ => ratio(c, o),
        };
        self.text_row(label, &num(c), &num(o), &shown);
    }

    fn text_row(&mut self, label: &str, comet: &str, other: &str, r: &str) {
        self.out.push_str(&format!("| {label} | {comet} | {other} | {r} |\n"));
    }
}

/// The markdown table for the results in `dir`.
pub fn table(dir: &Path) -> std::io::Result<String> {
    let r = Results::load(dir)?;
    let mut t = Table {
        out: String::from("| figure | comet | nchan (redis-server for PUBLISH) | ratio comet ÷ other (median of per-run ratios) |\n|---|---:|---:|---:|\n"),
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
            t.median_row(&r, sc, ("comet", "nchan"), "held", &format!("polls held, of {n} on {what}"));
            t.median_row(&r, sc, ("comet", "nchan"), "bytes_per_held", &format!("server RSS growth per held poll, bytes ({n} on {what})"));
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
        t.median_row(&r, sc, ("comet", "nchan"), "p50_ms", "delivery latency p50, ms");
        t.median_row(&r, sc, ("comet", "nchan"), "p99_ms", "delivery latency p99, ms");
        t.median_row(&r, sc, ("comet", "nchan"), "us_per_answer", "server time per answer within a fan-out, µs (median over messages)");
        let floor = r.get(sc, "floor", "floor_us", Agg::Median);
        if let Some(f) = floor.filter(|f| *f > 0.0) {
            let (c, o) = both(&r, sc, "us_per_answer", Agg::Median);
            t.text_row(
                &format!("the same, in multiples of the kernel's floor ({} µs per write from a program that only writes: `comet-bench floor`)", num(Some(f))),
                &num(c.map(|c| c / f)),
                &num(o.map(|o| o / f)),
                &r.paired_ratio(sc, "comet", "nchan", "us_per_answer").map_or_else(|| ratio(c, o), |p| format!("{p:.2}")),
            );
        }
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
            t.median_row(&r, sc, ("comet", "nchan"), "messages_per_response", "messages per response");
        }
        t.median_row(&r, sc, ("comet", "nchan"), "deliveries_per_s", "deliveries per second (wall clock; the load generator may be the limit)");
        t.median_row(&r, sc, ("comet", "nchan"), "cpu_us_per_delivery", "server CPU µs per delivery");
        t.median_row(&r, sc, ("comet", "nchan"), "p99_ms", "delivery latency p99, ms (includes queueing behind the burst)");
        t.median_row(&r, sc, ("comet", "nchan"), "loadgen_cpu_pct", "load generator CPU, % of its core (near 100: it is the limit)");
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
        t.median_row(&r, sc, ("comet", "nchan"), "deliveries_per_s", "deliveries per second");
        t.median_row(&r, sc, ("comet", "nchan"), "p99_ms", "delivery latency p99, ms");
        t.median_row(&r, sc, ("comet", "nchan"), "cpu_us_per_delivery", "server CPU µs per delivery");
        t.median_row(&r, sc, ("comet", "nchan"), "loadgen_cpu_pct", "load generator CPU, % of its core");
        loss_rows(&mut t, &r, sc, runs(&r, sc));
    }

    // 5. Publish rate.
    let sc = "publish";
    if r.any(sc) {
        t.section("5. Publish rate: redis-benchmark -P 16 -c 10, PUBLISH with a 100 B payload (other = redis-server)");
        t.median_row(&r, sc, ("comet", "redis"), "rps", "PUBLISH per second");
        t.median_row(&r, sc, ("comet", "redis"), "cpu_us_per_op", "server CPU µs per PUBLISH");
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
                let paired = r.paired_ratio(sc, "comet", "nchan", "cpu_us_per_delivery");
                let shown = paired.map_or_else(|| ratio(div(c), div(o)), |p| format!("{p:.2}"));
                t.text_row(&format!("{what}: CPU per delivery, in plain requests"), &num(div(c)), &num(div(o)), &shown);
            }
        }
    }
    // 7. Streams: each transport against nchan's subscriber of the same transport.
    for (tr, name) in [("es", "EventSource"), ("ws", "WebSocket (`ws+meta.nchan`)")] {
        let (idle, burst, fanout) = (format!("stream-idle-{tr}"), format!("stream-burst-{tr}"), format!("stream-fanout-{tr}"));
        if !(r.any(&idle) || r.any(&burst) || r.any(&fanout)) {
            continue;
        }
        t.section(&format!("7. Streams, {name}: comet against nchan's `{}` subscriber", if tr == "es" { "eventsource" } else { "websocket" }));
        if r.any(&idle) {
            let n = size(&r, &idle, "subs");
            t.median_row(&r, &idle, ("comet", "nchan"), "held", &format!("streams open, of {n} on one channel"));
            t.median_row(&r, &idle, ("comet", "nchan"), "bytes_per_held", &format!("server RSS growth per open stream, bytes ({n})"));
        }
        if r.any(&burst) {
            let what = format!("burst ({} x {})", size(&r, &burst, "subs"), size(&r, &burst, "messages"));
            t.median_row(&r, &burst, ("comet", "nchan"), "deliveries_per_s", &format!("{what}: deliveries per second"));
            t.median_row(&r, &burst, ("comet", "nchan"), "cpu_us_per_delivery", &format!("{what}: server CPU µs per delivery"));
            if let (Some(c), Some(lp)) = (r.get(&burst, "comet", "cpu_us_per_delivery", Agg::Median), r.get("burst", "comet", "cpu_us_per_delivery", Agg::Median)) {
                t.text_row(&format!("{what}: comet's CPU per delivery ÷ its own long-poll burst's"), &num(Some(c / lp)), "—", "—");
            }
            loss_rows(&mut t, &r, &burst, runs(&r, &burst));
        }
        if r.any(&fanout) {
            let what = format!("paced fan-out ({} at {}/s)", size(&r, &fanout, "subs"), size(&r, &fanout, "rate"));
            t.median_row(&r, &fanout, ("comet", "nchan"), "p50_ms", &format!("{what}: latency p50, ms"));
            t.median_row(&r, &fanout, ("comet", "nchan"), "p99_ms", &format!("{what}: latency p99, ms"));
            loss_rows(&mut t, &r, &fanout, runs(&r, &fanout));
        }
    }
    cluster(&mut t, &r);
    Ok(t.out)
}

/// 8. Two nodes and a redis-server (servers `comet` and `nchan` of the `cluster-*` scenarios),
/// and the same scenarios on one node of each without Redis (`comet1`, `nchan1`) for reference.
fn cluster(t: &mut Table, r: &Results) {
    let size = |sc: &str, key: &str| r.get(sc, "comet", key, Agg::Median).or(r.get(sc, "nchan", key, Agg::Median)).map_or("?".into(), |v| num(Some(v)));
    let setup = "comet: 2 nodes (`[cluster]`) + redis-server; nchan: 2 nginx (`nchan_redis_pass`) + redis-server; all on CPU 0, published on node A, \
                 every subscriber on node B; CPU summed over the three processes";
    for (n, sc) in ["cluster-channels", "cluster-burst", "cluster-fanout"].into_iter().enumerate() {
        if !r.any(sc) {
            continue;
        }
        let runs = r.runs(sc, "comet").max(r.runs(sc, "nchan"));
        let (what, keys): (String, &[(&str, &str)]) = match sc {
            "cluster-channels" => (
                format!("many channels: {} subscribers, a channel each, {} rounds", size(sc, "subs"), size(sc, "rounds")),
                &[("deliveries_per_s", "deliveries per second"), ("cpu_us_per_delivery", "server CPU µs per delivery"), ("p99_ms", "delivery latency p99, ms")],
            ),
            "cluster-burst" => (
                format!("burst: {} subscribers on one channel, {} messages back to back", size(sc, "subs"), size(sc, "messages")),
                &[("deliveries_per_s", "deliveries per second"), ("cpu_us_per_delivery", "server CPU µs per delivery")],
            ),
            _ => (
                format!("paced fan-out: {} subscribers on one channel, {} messages at {}/s", size(sc, "subs"), size(sc, "messages"), size(sc, "rate")),
                &[("p50_ms", "delivery latency p50, ms"), ("p99_ms", "delivery latency p99, ms"), ("max_ms", "delivery latency max, ms")],
            ),
        };
        t.section(&format!("8{}. Cluster, {what} ({setup})", ['a', 'b', 'c'][n]));
        for (key, label) in keys {
            t.median_row(r, sc, ("comet", "nchan"), key, label);
        }
        // Where the CPU went: --server-pid was node A, node B, redis-server.
        if keys.iter().any(|(k, _)| *k == "cpu_us_per_delivery") {
            for (i, part) in ["node A (publishing)", "node B (subscribers)", "redis-server"].into_iter().enumerate() {
                let c = cpu_part_per_delivery(r, sc, "comet", i);
                let o = cpu_part_per_delivery(r, sc, "nchan", i);
                t.row(&format!("of which {part}, µs per delivery"), c, o);
            }
        }
        t.median_row(r, sc, ("comet", "nchan"), "redis_sent_per_publish", "Redis round trips per published message (commands the servers sent)");
        t.median_row(r, sc, ("comet", "nchan"), "redis_scripts_per_publish", "of which script calls (EVALSHA) per published message");
        t.median_row(r, sc, ("comet", "nchan"), "redis_calls_per_publish", "commands Redis ran per published message (INFO commandstats: scripts' own calls included)");
        t.median_row(r, sc, ("comet", "nchan"), "loadgen_cpu_pct", "load generator CPU, % of its core");
        loss_rows_of(t, r, sc, runs, ("comet", "nchan"));
        // The same on one node without Redis, and what the cluster costs over it.
        for (key, label) in keys {
            t.median_row(r, sc, ("comet1", "nchan1"), key, &format!("one node, no Redis (reference): {label}"));
        }
        for (key, label) in keys {
            let c = r.paired_ratio(sc, "comet", "comet1", key);
            let o = r.paired_ratio(sc, "nchan", "nchan1", key);
            t.text_row(&format!("{label}: cluster ÷ one node (median of per-run ratios)"), &num(c), &num(o), &ratio(c, o));
        }
        loss_rows_of(t, r, sc, r.runs(sc, "comet1").max(r.runs(sc, "nchan1")), ("comet1", "nchan1"));
    }
}

/// The median over runs of process `i`'s CPU (of `cpu_us_each`) per delivery.
fn cpu_part_per_delivery(r: &Results, sc: &str, server: &str, i: usize) -> Option<f64> {
    let runs = r.0.get(&(sc.to_string(), server.to_string()))?;
    let mut v: Vec<f64> = runs
        .iter()
        .filter_map(|f| {
            let us: f64 = f.get("cpu_us_each")?.split(',').nth(i)?.parse().ok()?;
            let delivered: f64 = f.get("delivered")?.parse().ok()?;
            (delivered > 0.0).then(|| us / delivered)
        })
        .collect();
    median(&mut v)
}

fn loss_rows(t: &mut Table, r: &Results, sc: &str, runs: usize) {
    loss_rows_of(t, r, sc, runs, ("comet", "nchan"));
}

fn loss_rows_of(t: &mut Table, r: &Results, sc: &str, runs: usize, servers: (&str, &str)) {
    let get = |srv: &str, k: &str| r.get(sc, srv, k, Agg::Sum);
    let (a, b) = servers;
    let of = if a == "comet1" { " (one node)" } else { "" };
    t.row(&format!("messages lost{of} (sum of {runs} runs)"), get(a, "lost"), get(b, "lost"));
    t.row(&format!("duplicates{of} (sum of {runs} runs)"), get(a, "dup"), get(b, "dup"));
    let expected = |srv: &str| r.get(sc, srv, "expected", Agg::Median);
    t.row(&format!("deliveries expected per run{of}"), expected(a), expected(b));
    let bad = |srv: &str| Some(get(srv, "failed")? + get(srv, "misrouted")? + get(srv, "errors")?);
    t.row(&format!("failed subscribers + misrouted + error answers{of} (sum of {runs} runs)"), bad(a), bad(b));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_the_runs() {
        let mut map: BTreeMap<(String, String), Vec<Fields>> = BTreeMap::new();
        for line in [
            "scenario=burst server=comet run=1 cpu=10",
            "scenario=burst server=nchan run=1 cpu=20",
            "scenario=burst server=comet run=2 cpu=30",
            "scenario=burst server=nchan run=2 cpu=40",
            "scenario=burst server=comet run=3 cpu=9",
            "scenario=burst server=nchan run=3 cpu=10",
            // A run whose partner is missing takes no part.
            "scenario=burst server=comet run=4 cpu=1000",
        ] {
            let f = parse_line(line);
            map.entry((f["scenario"].clone(), f["server"].clone())).or_default().push(f);
        }
        let r = Results(map);
        // Per run 0.5, 0.75, 0.9: the median is 0.75 (the ratio of the medians would say 1.00).
        assert_eq!(r.paired_ratio("burst", "comet", "nchan", "cpu"), Some(0.75));
        assert_eq!(r.get("burst", "comet", "cpu", Agg::Median), Some(20.0));
        assert_eq!(r.paired_ratio("burst", "comet", "nobody", "cpu"), None);
    }

    #[test]
    fn the_fan_out_is_shown_against_the_floor() {
        let dir = std::env::temp_dir().join(format!("comet-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("fanout.txt"),
            "scenario=fanout server=comet run=1 subs=1000 p99_ms=5 us_per_answer=4.4\n\
             scenario=fanout server=nchan run=1 subs=1000 p99_ms=9 us_per_answer=8.8\n\
             scenario=fanout server=floor run=1 subs=1000 floor_us=4.0\n",
        )
        .unwrap();
        let t = table(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(t.contains("| server time per answer within a fan-out, µs (median over messages) | 4.40 | 8.80 | 0.50 |"), "{t}");
        assert!(t.contains("kernel's floor (4 µs per write from a program that only writes: `comet-bench floor`) | 1.10 | 2.20 | 0.50 |"), "{t}");
    }

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
