//! The kernel's floor under a fan-out: what one `write` of an answer to a loopback socket costs
//! on this machine when a program does nothing else. `floor` accepts N connections from a reader
//! process (this program again, as `floor-reader`, pinned to another CPU), then in each round
//! writes one answer of the given size to every connection, one `write` each, and times the
//! loop. The reader reads each answer and at once sends the next request, as a long-poll client
//! does, and the writer reads those requests between rounds, as a server does: the sockets carry
//! the same traffic as in the paced fan-out. A server's time per answer in that scenario can come
//! near this figure but not under it (with one write per answer).
//!
//! On loopback the write's time includes the reader socket's receive and wakeup: the kernel runs
//! them on the writing CPU. That is why the floor is several microseconds, not the write call's
//! own fraction of one.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// What `floor` measures with.
pub struct FloorPlan {
    pub conns: usize,
    pub rounds: usize,
    pub answer: usize,
    pub request: usize,
    /// Pause before each round: the reader is idle and every request has been read.
    pub interval: Duration,
    pub reader_cpu: Option<usize>,
}

/// The writer's figures: microseconds per write, one value per round.
pub struct Floor {
    pub per_write_us: Vec<f64>,
    pub short_writes: u64,
}

/// Runs the writer here and the reader in a child process; bounded by the rounds and by
/// timeouts on every wait.
pub fn run(plan: &FloorPlan) -> Result<Floor, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["floor-reader", &addr.to_string(), &plan.conns.to_string(), &plan.request.to_string()]);
    if let Some(cpu) = plan.reader_cpu {
        cmd.arg(cpu.to_string());
    }
    let mut child = cmd.spawn().map_err(|e| format!("reader: {e}"))?;
    let result = write_rounds(&listener, plan, &mut child);
    // The reader ends when its connections close (they close with the writer's streams, dropped
    // in write_rounds), or at its own deadline; then it is waited for, never left behind.
    let _ = child.wait();
    result
}

fn write_rounds(listener: &TcpListener, plan: &FloorPlan, reader: &mut std::process::Child) -> Result<Floor, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conns: Vec<TcpStream> = Vec::with_capacity(plan.conns);
    while conns.len() < plan.conns {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                // As comet does: an answer leaves at once.
                let _ = s.set_nodelay(true);
                conns.push(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Ok(Some(status)) = reader.try_wait() {
                    return Err(format!("the reader exited with {status} after {} of {} connections", conns.len(), plan.conns));
                }
                if Instant::now() > deadline {
                    return Err(format!("only {} of {} connections after 30 s", conns.len(), plan.conns));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    let answer = vec![b'a'; plan.answer];
    let mut buf = vec![0u8; 64 * 1024];
    let mut per_write_us = Vec::with_capacity(plan.rounds);
    let mut short_writes = 0;
    // Every connection's first request is read before the first round, as a server holds a
    // poll only once it has read it.
    std::thread::sleep(Duration::from_millis(200));
    drain(&mut conns, &mut buf);
    for _ in 0..plan.rounds {
        std::thread::sleep(plan.interval);
        let t0 = Instant::now();
        for s in conns.iter_mut() {
            match s.write(&answer) {
                Ok(n) if n == answer.len() => {}
                _ => short_writes += 1,
            }
        }
        per_write_us.push(t0.elapsed().as_secs_f64() * 1e6 / conns.len().max(1) as f64);
        // The requests that answer brought, read as a server would before the next message.
        std::thread::sleep(Duration::from_millis(20));
        drain(&mut conns, &mut buf);
    }
    Ok(Floor { per_write_us, short_writes })
}

/// Reads whatever each connection has (non-blocking).
fn drain(conns: &mut [TcpStream], buf: &mut [u8]) {
    for s in conns.iter_mut() {
        while let Ok(n) = s.read(buf) {
            if n == 0 {
                break;
            }
        }
    }
}

/// The reader process: `floor-reader ADDR N REQUEST_BYTES [CPU]`. Opens N connections, sends a
/// request on each, and after every answer read sends the next one; ends when the writer has
/// closed them all, or after 10 minutes.
pub fn reader(args: &[String]) -> Result<(), String> {
    let addr: SocketAddr = args.first().ok_or("floor-reader needs ADDR")?.parse().map_err(|e| format!("bad ADDR: {e}"))?;
    let n: usize = args.get(1).ok_or("floor-reader needs N")?.parse().map_err(|e| format!("bad N: {e}"))?;
    let size: usize = args.get(2).ok_or("floor-reader needs REQUEST_BYTES")?.parse().map_err(|e| format!("bad size: {e}"))?;
    if let Some(cpu) = args.get(3) {
        pin(cpu.parse().map_err(|e| format!("bad CPU: {e}"))?)?;
    }
    let request = vec![b'q'; size];
    let mut poll = mio::Poll::new().map_err(|e| e.to_string())?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let std_stream = TcpStream::connect(addr).map_err(|e| format!("connect {i}: {e}"))?;
        let _ = std_stream.set_nodelay(true);
        (&std_stream).write_all(&request).map_err(|e| format!("first request: {e}"))?;
        std_stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut s = mio::net::TcpStream::from_std(std_stream);
        poll.registry().register(&mut s, mio::Token(i), mio::Interest::READABLE).map_err(|e| e.to_string())?;
        conns.push(Some(s));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = n;
    while open > 0 && Instant::now() < deadline {
        poll.poll(&mut events, Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(s) = conns[i].as_mut() else { continue };
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        conns[i] = None;
                        open -= 1;
                        break;
                    }
                    Ok(_) => {
                        let _ = s.write(&request);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        conns[i] = None;
                        open -= 1;
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Pins this process to one CPU.
pub fn pin(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("cannot pin to CPU {cpu}: a CPU set holds {} CPUs", libc::CPU_SETSIZE));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}
