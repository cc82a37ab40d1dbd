//! `comet-bench`: the load generator of `scripts/bench`. It plays thousands of long-poll
//! subscribers (one mio loop, one thread) against comet or nchan, publishes to them from a
//! second thread, and prints what it measured as one `key=value` line: held polls and the
//! server's memory per held poll, delivery latency, loss, duplicates, deliveries per second and
//! the server's CPU time per delivery (read from /proc/PID of the server).
//!
//! ```text
//! comet-bench.rs        command line, one phase's figures printed
//! comet-bench/load.rs   the subscribers' loop: connect, poll, check each message, re-poll
//! comet-bench/floor.rs  the kernel's floor: a writer that does nothing but the fan-out's writes
//! comet-bench/publish.rs the publisher thread and the "are they all held?" probe
//! comet-bench/wire.rs   HTTP responses (and the parts of a batch), RESP replies, message bodies
//! comet-bench/stream.rs event streams and WebSocket frames (`--transport`)
//! comet-bench/net.rs    client sockets bound to 127.0.0.x before connecting
//! comet-bench/procfs.rs server CPU time and RSS from /proc
//! comet-bench/report.rs the median table over runs (markdown)
//! ```
//!
//! It is a program that prints figures, not a test: `tests/bench_smoke.rs` runs it small to
//! check that it still works and that comet loses nothing.

#[path = "comet-bench/floor.rs"]
mod floor;
#[path = "comet-bench/load.rs"]
mod load;
#[path = "comet-bench/net.rs"]
mod net;
#[path = "comet-bench/procfs.rs"]
mod procfs;
#[path = "comet-bench/publish.rs"]
mod publish;
#[path = "comet-bench/report.rs"]
mod report;
#[path = "comet-bench/stream.rs"]
mod stream;
#[path = "comet-bench/wire.rs"]
mod wire;

// The submodules sit in comet-bench/ beside this file (a crate root finds `mod x;` next to
// itself, hence the paths).
use load::{HeldCheck, Plan};
use publish::Publisher;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const HELP: &str = "\
comet-bench: long-poll load generator for comet and nchan

USAGE:
    comet-bench run [OPTIONS]       one phase; prints one line of key=value figures
    comet-bench report DIR          the markdown table of the result lines in DIR's files
    comet-bench free-ports N        N free TCP ports on 127.0.0.1 (for the servers' configs)
    comet-bench wait-port ADDR [S]  wait up to S seconds (default 10) until ADDR accepts
    comet-bench proc PID            cpu_us=<utime+stime> rss_kb=<VmRSS> of a process
    comet-bench floor [OPTIONS]     the kernel's floor under a fan-out: microseconds per write
                                    when a program only writes the answers (prints one line)

RUN OPTIONS:
    --target comet|nchan|plain  how to publish and to ask for held polls (plain: no publishing,
                                back-to-back GETs of --path, e.g. nginx `return 204`)
    --http ADDR                 where subscribers connect (IPv4 address:port)
    --control ADDR --token T    comet: the control port (PUBLISH, INFO held_polls) and its token
    --pub-control ADDR          comet: PUBLISH on this control port instead (another node of a
                                cluster; held polls are still asked of --control)
    --pub-http ADDR             nchan: POST to this address instead of --http (another nginx
                                sharing the channels through Redis)
    --redis ADDR                a redis-server to read `INFO commandstats` of when every poll
                                is held and at the end: its calls per published message (the
                                commands its scripts call included)
    --redis-sent ADDR[,ADDR...] servers whose own count of commands sent to Redis is read at the
                                same points, summed: round trips per published message (comet:
                                control ports, `cluster_commands_sent`; nchan: HTTP addresses,
                                `total redis commands sent` of the --status-path page)
    --pub-path PATH             nchan: the publisher location (default /pub, as /pub?id=<ch>)
    --status-path PATH          nchan: the nchan_stub_status location to count held polls;
                                without it, a fixed --settle time is waited instead
    --settle SECS               wait after the last poll is sent when nothing can be asked (2)
    --server-pid PID[,PID...]   process to read CPU time and RSS of (nginx: the worker); with
                                several (a cluster's nodes and redis-server) they are summed
    --subs N                    subscribers (connections) (100)
    --channels N|each           channels; subscriber i polls channel i mod N (1)
    --messages N                messages per channel per round (0: only hold, measure memory)
    --rounds N                  rounds; each waits for the previous one's deliveries (1)
    --rate R                    messages per second over all channels; 0 = back to back (0)
    --size BYTES                message size (100)
    --requests N                plain: requests per connection (100)
    --path PATH                 plain: the path requested (/)
    --sub-path PATH             subscribers poll PATH<channel> (/sub/; nchan's batched location
                                in scripts/nchan.conf is /sub-multipart/)
    --transport T               longpoll (default), eventsource (`Accept: text/event-stream`) or
                                websocket (`ws+meta.nchan` frames): subscribers hold streams;
                                a stream the server closes reconnects with `Last-Event-ID`
    --multipart 1|0             polls send `Accept: multipart/mixed`, so a subscriber behind by
                                several messages may get them in one answer (0)
    --sources N                 spread sockets over 127.0.0.1..N source addresses (1)
    --window N                  connects in flight at once (100)
    --connect-rate N            connects started per second at most (0: no limit)
    --timeout SECS              bound on the whole phase (120)
    --drain SECS                once all is published, stop when no delivery came for SECS (15)
    --prefix STR                channel name prefix (unique per run by default)
    --tag 'k=v ...'             fields copied at the start of the result line
                                (scenario=..., server=... are what `report` groups by)

FLOOR OPTIONS (the writer runs here; pin it with taskset as the server would be):
    --subs N                    connections (1000)
    --rounds N                  rounds of one write per connection, 100 ms apart (50)
    --answer BYTES              bytes per write: comet's answer to a 100 B bench message (400)
    --request BYTES             bytes the reader sends back after each answer, as a poll (130)
    --reader-cpu CPU            the CPU the reader process is pinned to (default: not pinned)
    --tag 'k=v ...'             fields copied at the start of the result line
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("report") => match args.get(1) {
            Some(dir) => report::table(std::path::Path::new(dir)).map(|t| print!("{t}")).map_err(|e| e.to_string()),
            None => Err("report needs a DIR".into()),
        },
        Some("floor") => floor(&args[1..]),
        Some("floor-reader") => floor::reader(&args[1..]),
        Some("free-ports") => free_ports(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1)),
        Some("wait-port") => wait_port(args.get(1), args.get(2)),
        Some("proc") => match args.get(1).and_then(|p| p.parse().ok()).and_then(procfs::sample) {
            Some(s) => {
                println!("cpu_us={} rss_kb={}", s.cpu_us, s.rss_kb);
                Ok(())
            }
            None => Err("proc needs the PID of a live process".into()),
        },
        Some("-h" | "--help") | None => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown command {other:?}")),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("comet-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn free_ports(n: usize) -> Result<(), String> {
    // Hold them all before printing so the N are distinct; a server binds them right after.
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let ports: Vec<String> = ls.iter().map(|l| l.local_addr().map(|a| a.port().to_string())).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    println!("{}", ports.join(" "));
    Ok(())
}

fn wait_port(addr: Option<&String>, secs: Option<&String>) -> Result<(), String> {
    let addr: SocketAddr = addr.ok_or("wait-port needs ADDR")?.parse().map_err(|e| format!("bad ADDR: {e}"))?;
    let secs: f64 = secs.map_or(Ok(10.0), |s| s.parse()).map_err(|e| format!("bad seconds: {e}"))?;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(format!("{addr} not accepting after {secs}s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn floor(args: &[String]) -> Result<(), String> {
    let o = Opts::parse(args)?;
    if let Some(k) = o.0.keys().find(|k| !["subs", "rounds", "answer", "request", "reader-cpu", "tag"].contains(&k.as_str())) {
        return Err(format!("unknown option --{k}"));
    }
    let plan = floor::FloorPlan {
        conns: o.num("subs", 1000usize)?.max(1),
        rounds: o.num("rounds", 50usize)?.max(1),
        answer: o.num("answer", 400usize)?.max(1),
        request: o.num("request", 130usize)?.max(1),
        interval: Duration::from_millis(100),
        reader_cpu: o.0.get("reader-cpu").map(|c| c.parse().map_err(|_| format!("--reader-cpu: bad value {c:?}"))).transpose()?,
    };
    let f = floor::run(&plan)?;
    let mut per = f.per_write_us.clone();
    per.sort_by(f64::total_cmp);
    let at = |p: f64| per[((per.len() - 1) as f64 * p).round() as usize];
    let mut line = o.str("tag").unwrap_or("").trim().to_string();
    if !line.is_empty() {
        line.push(' ');
    }
    line.push_str(&format!(
        "subs={} rounds={} answer={} request={} short_writes={} floor_us={:.3} floor_us_min={:.3} floor_us_p90={:.3} floor_us_max={:.3}",
        plan.conns,
        plan.rounds,
        plan.answer,
        plan.request,
        f.short_writes,
        at(0.5),
        at(0.0),
        at(0.9),
        at(1.0)
    ));
    println!("{line}");
    Ok(())
}

/// `--key value` options.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut m = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a.strip_prefix("--").ok_or_else(|| format!("unexpected argument {a:?}"))?;
            let (k, v) = match key.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (key.to_string(), it.next().ok_or_else(|| format!("--{key} needs a value"))?.clone()),
            };
            m.insert(k, v);
        }
        Ok(Opts(m))
    }

    fn str(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T, String> {
        match self.0.get(k) {
            Some(v) => v.parse().map_err(|_| format!("--{k}: bad value {v:?}")),
            None => Ok(default),
        }
    }

    fn addr(&self, k: &str) -> Result<Option<SocketAddr>, String> {
        self.0.get(k).map(|v| v.parse().map_err(|_| format!("--{k}: {v:?} is not an address:port"))).transpose()
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let o = Opts::parse(args)?;
    let known = [
        "target", "http", "control", "pub-control", "pub-http", "redis", "redis-sent", "token", "pub-path", "status-path", "settle", "server-pid", "subs", "channels", "messages", "rounds", "rate",
        "size", "requests", "path", "sub-path", "multipart", "transport", "sources", "window", "connect-rate", "timeout", "drain", "prefix", "tag",
    ];
    if let Some(k) = o.0.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown option --{k}"));
    }
    let target = o.str("target").unwrap_or("comet").to_string();
    let http = match o.addr("http")? {
        Some(SocketAddr::V4(a)) => a,
        Some(_) => return Err("--http: an IPv4 address please".into()),
        None => return Err("--http ADDR is required".into()),
    };
    let token = o.str("token").unwrap_or("").to_string();
    let subs: usize = o.num("subs", 100)?;
    let channels = match o.str("channels") {
        Some("each") => subs,
        _ => o.num("channels", 1usize)?.max(1),
    };
    let (publisher, held, plain) = match target.as_str() {
        "comet" => {
            let control = o.addr("control")?.ok_or("--target comet needs --control ADDR")?;
            let publish_to = o.addr("pub-control")?.unwrap_or(control);
            (Some(Publisher::Comet { control: publish_to, token: token.clone() }), HeldCheck::CometInfo { control, token: token.clone() }, None)
        }
        "nchan" => {
            let held = match o.str("status-path") {
                Some(p) => HeldCheck::NchanStatus { path: p.to_string() },
                None => HeldCheck::Settle(Duration::from_secs_f64(o.num("settle", 2.0)?)),
            };
            let path = o.str("pub-path").unwrap_or("/pub").to_string();
            let addr = o.addr("pub-http")?.unwrap_or(SocketAddr::V4(http));
            (Some(Publisher::Http { addr, path, bearer: token.clone() }), held, None)
        }
        "plain" => (None, HeldCheck::Settle(Duration::ZERO), Some(o.num("requests", 100u32)?)),
        t => return Err(format!("--target: {t:?} is not comet, nchan or plain")),
    };
    let multipart = match o.str("multipart") {
        None | Some("0") => false,
        Some("1") => true,
        Some(v) => return Err(format!("--multipart: {v:?} is not 1 or 0")),
    };
    let default_prefix = format!("b{}-{}-", std::process::id(), publish::now_ns() / 1_000_000 % 100_000_000);
    let plan = Plan {
        http,
        sub_path: if plain.is_some() { o.str("path").unwrap_or("/") } else { o.str("sub-path").unwrap_or("/sub/") }.to_string(),
        multipart,
        held,
        publisher,
        server_pids: match o.str("server-pid") {
            Some(list) => list.split(',').map(|p| p.trim().parse().map_err(|_| format!("--server-pid: {p:?} is not a pid"))).collect::<Result<_, _>>()?,
            None => Vec::new(),
        },
        redis: o.addr("redis")?,
        redis_sent: match o.str("redis-sent") {
            None => None,
            Some(list) => {
                let addrs = list
                    .split(',')
                    .map(|a| a.trim().parse::<SocketAddr>().map_err(|_| format!("--redis-sent: {a:?} is not an address:port")))
                    .collect::<Result<Vec<_>, _>>()?;
                let how = match target.as_str() {
                    "comet" => publish::SentCount::Comet { token: token.clone() },
                    "nchan" => publish::SentCount::Nchan { path: o.str("status-path").unwrap_or("/nchan_status").to_string() },
                    t => return Err(format!("--redis-sent: not with --target {t}")),
                };
                Some((how, addrs))
            }
        },
        subs,
        channels,
        messages: o.num("messages", 0)?,
        rounds: o.num("rounds", 1u32)?.max(1),
        rate: o.num("rate", 0.0)?,
        size: o.num("size", 100)?,
        prefix: o.str("prefix").map_or(default_prefix, str::to_string),
        sources: o.num("sources", 1)?,
        window: o.num("window", 100usize)?.max(1),
        connect_rate: o.num("connect-rate", 0.0)?,
        timeout: Duration::from_secs_f64(o.num("timeout", 120.0)?),
        drain: Duration::from_secs_f64(o.num("drain", 15.0)?),
        plain_requests: plain,
        transport: match o.str("transport").unwrap_or("longpoll") {
            t => stream::Transport::parse(t).ok_or_else(|| format!("--transport: {t:?} is not longpoll, eventsource or websocket"))?,
        },
    };
    let out = load::run(&plan).map_err(|e| e.to_string())?;
    println!("{}", result_line(o.str("tag").unwrap_or(""), &target, &plan, &out));
    for n in &out.note {
        eprintln!("comet-bench: note: {n}");
    }
    Ok(())
}

/// Calls per command between two `INFO commandstats` readings, those that moved, leaving out the
/// readings' own `INFO`.
fn redis_diff(a: &load::RedisCalls, b: &load::RedisCalls) -> Vec<(String, u64)> {
    b.iter()
        .filter(|(k, _)| k.as_str() != "info")
        .map(|(k, n)| (k.clone(), n.saturating_sub(a.get(k).copied().unwrap_or(0))))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The figures of a phase as one `key=value` line.
fn result_line(tag: &str, target: &str, plan: &Plan, out: &load::Outcome) -> String {
    let mut f: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| f.push((k.to_string(), v));
    let tally = &out.tally;
    if !tag.contains("scenario=") {
        put("scenario", "adhoc".into());
    }
    if !tag.contains("server=") {
        put("server", target.into());
    }
    put("subs", plan.subs.to_string());
    put("connected", tally.connected.to_string());
    put("failed", tally.failed.to_string());
    put("connect_errors", tally.connect_errors.to_string());
    put("reconnects", tally.reconnects.to_string());
    // Sockets the kernel stamps arrivals on: their latencies end at the arrival, not the read.
    put("arrival_stamped", tally.stamped_sockets.to_string());
    put("held", out.held.to_string());
    if let Some(d) = out.held_at {
        put("held_s", format!("{:.3}", d.as_secs_f64()));
    }
    let cpu = |a: Option<procfs::Sample>, b: Option<procfs::Sample>| Some(b?.cpu_us.saturating_sub(a?.cpu_us));
    if let (Some(b), Some(h)) = (out.before, out.at_held) {
        put("rss0_kb", b.rss_kb.to_string());
        put("rss_held_kb", h.rss_kb.to_string());
        let growth = h.rss_kb.saturating_sub(b.rss_kb) * 1024;
        if out.held > 0 {
            put("bytes_per_held", format!("{:.0}", growth as f64 / out.held as f64));
        }
        put("cpu_connect_us", cpu(out.before, out.at_held).unwrap_or(0).to_string());
    }
    if let Some(e) = out.at_end {
        put("rss_end_kb", e.rss_kb.to_string());
    }
    let phase_cpu = cpu(out.at_held, out.at_end);
    // Several processes (a cluster): each one's share of the phase's CPU, in --server-pid order.
    if !out.each_at_held.is_empty() && out.each_at_held.len() == out.each_at_end.len() {
        let each: Vec<String> =
            out.each_at_held.iter().zip(&out.each_at_end).map(|(a, b)| cpu(*a, *b).map_or("?".into(), |c| c.to_string())).collect();
        put("cpu_us_each", each.join(","));
    }
    let statuses: Vec<String> = tally.statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect();
    let errors: u64 = tally.statuses.values().sum::<u64>() + tally.protocol_errors + tally.bad_bodies;
    if let Some(reqs) = plan.plain_requests {
        put("requests_per_conn", reqs.to_string());
        put("expected", out.expected.to_string());
        put("requests", tally.requests.to_string());
        if let (Some(a), Some(b)) = (out.plain_start, tally.last_delivery.or(out.plain_end)) {
            let secs = b.duration_since(a).as_secs_f64();
            put("elapsed_s", format!("{secs:.3}"));
            put("requests_per_s", format!("{:.0}", tally.requests as f64 / secs.max(1e-9)));
        }
        if let Some(c) = phase_cpu {
            put("cpu_us", c.to_string());
            put("cpu_us_per_request", format!("{:.3}", c as f64 / tally.requests.max(1) as f64));
        }
    } else {
        put("channels", plan.channels.to_string());
        put("messages", plan.messages.to_string());
        put("rounds", plan.rounds.to_string());
        put("rate", plan.rate.to_string());
        put("size", plan.size.to_string());
        put("expected", out.expected.to_string());
        put("delivered", tally.unique.to_string());
        put("responses", tally.responses.to_string());
        if tally.responses > 0 {
            put("messages_per_response", format!("{:.2}", tally.unique as f64 / tally.responses as f64));
        }
        put("lost", out.expected.saturating_sub(tally.unique).to_string());
        put("dup", tally.dups.to_string());
        put("gaps", tally.gaps.to_string());
        put("misrouted", tally.misrouted.to_string());
        put("timeouts_408", tally.timeouts.to_string());
        if let Some(p) = &out.publish {
            put("published", p.published.to_string());
            put("publish_errors", p.errors.to_string());
            put("direct", p.direct.to_string());
            if let (Some(a), Some(b)) = (p.first, tally.last_delivery) {
                let secs = b.saturating_duration_since(a).as_secs_f64();
                put("elapsed_s", format!("{secs:.3}"));
                put("deliveries_per_s", format!("{:.0}", tally.unique as f64 / secs.max(1e-9)));
            }
        }
        if plan.messages > 0 {
            if let Some(c) = phase_cpu {
                put("cpu_us", c.to_string());
                put("cpu_us_per_delivery", format!("{:.3}", c as f64 / tally.unique.max(1) as f64));
            }
        }
        // Redis commands (`--redis`): while the subscribers connected (subscribes, buffer
        // fetches), and while messages were published and delivered, per published message.
        if let (Some(b), Some(h)) = (&out.redis_before, &out.redis_at_held) {
            put("redis_calls_connect", redis_diff(b, h).iter().map(|(_, n)| n).sum::<u64>().to_string());
        }
        if let (Some(h), Some(e)) = (&out.redis_at_held, &out.redis_at_end) {
            let diff = redis_diff(h, e);
            let total: u64 = diff.iter().map(|(_, n)| n).sum();
            // Script calls (one round trip each, however many commands the script runs).
            let scripts: u64 = diff.iter().filter(|(k, _)| ["eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"].contains(&k.as_str())).map(|(_, n)| n).sum();
            put("redis_calls", total.to_string());
            put("redis_scripts", scripts.to_string());
            if let Some(p) = out.publish.as_ref().filter(|p| p.published > 0) {
                put("redis_calls_per_publish", format!("{:.3}", total as f64 / p.published as f64));
                put("redis_scripts_per_publish", format!("{:.3}", scripts as f64 / p.published as f64));
            }
            let by: Vec<String> = diff.iter().map(|(k, n)| format!("{k}:{n}")).collect();
            put("redis_cmds", if by.is_empty() { "none".into() } else { by.join(",") });
        }
        if let (Some(b), Some(h)) = (out.sent_before, out.sent_at_held) {
            put("redis_sent_connect", h.saturating_sub(b).to_string());
        }
        if let (Some(h), Some(e)) = (out.sent_at_held, out.sent_at_end) {
            put("redis_sent", e.saturating_sub(h).to_string());
            if let Some(p) = out.publish.as_ref().filter(|p| p.published > 0) {
                put("redis_sent_per_publish", format!("{:.3}", e.saturating_sub(h) as f64 / p.published as f64));
            }
        }
    }
    // The load generator's CPU over the same phase: near 100% of the elapsed time means the
    // wall-clock rate is its limit, not the server's.
    if let (Some(c), Some(e)) = (cpu(out.self_at_held, out.self_at_end), f.iter().find(|(k, _)| k == "elapsed_s")) {
        if let Ok(secs) = e.1.parse::<f64>() {
            f.push(("loadgen_cpu_pct".into(), format!("{:.0}", c as f64 / 1e4 / secs.max(1e-9))));
        }
    }
    let mut put = |k: &str, v: String| f.push((k.to_string(), v));
    put("errors", errors.to_string());
    if !statuses.is_empty() {
        put("statuses", statuses.join(","));
    }
    if !tally.latencies.is_empty() {
        put("p50_ms", format!("{:.3}", out.latency_ms(0.50)));
        put("p99_ms", format!("{:.3}", out.latency_ms(0.99)));
        put("max_ms", format!("{:.3}", out.latency_ms(1.0)));
    }
    if let Some(us) = out.us_per_answer() {
        put("us_per_answer", format!("{us:.3}"));
    }
    put("timed_out", (out.timed_out as u8).to_string());
    let mut line = tag.trim().to_string();
    for (k, v) in f {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&format!("{k}={v}"));
    }
    line
}
