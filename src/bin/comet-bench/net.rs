//! Client sockets. One process may hold about 19,900 sockets, but one (source address,
//! destination) pair has only the ephemeral port range (32768-60999 here, about 28,000 ports,
//! fewer once earlier runs left TIME_WAIT behind). So subscriber sockets are spread over
//! 127.0.0.x source addresses: bound before connecting, with `IP_BIND_ADDRESS_NO_PORT` so the
//! port is still picked at connect time (per 4-tuple, not per address).
//!
//! std and mio cannot bind before connecting, so this file calls the four C functions it needs
//! directly (Linux only, as the whole bench is: it reads /proc). Everything else stays in safe
//! std/mio types, but for the receive with the kernel's arrival time (`recv_stamped`).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd};

const AF_INET: i32 = 2;
const SOCK_STREAM: i32 = 1;
const SOCK_NONBLOCK: i32 = 0o4000;
const SOCK_CLOEXEC: i32 = 0o2000000;
const IPPROTO_IP: i32 = 0;
const IP_BIND_ADDRESS_NO_PORT: i32 = 24;
const SOL_SOCKET: i32 = 1;
const SO_LINGER: i32 = 13;
const EINPROGRESS: i32 = 115;

#[repr(C)]
struct SockaddrIn {
    sin_family: u16,
    /// Network byte order.
    sin_port: u16,
    /// Network byte order (the octets as written).
    sin_addr: [u8; 4],
    sin_zero: [u8; 8],
}

#[repr(C)]
struct Linger {
    l_onoff: i32,
    l_linger: i32,
}

extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrIn, len: u32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrIn, len: u32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const std::ffi::c_void, len: u32) -> i32;
}

fn sockaddr(a: SocketAddrV4) -> SockaddrIn {
    SockaddrIn { sin_family: AF_INET as u16, sin_port: a.port().to_be(), sin_addr: a.ip().octets(), sin_zero: [0; 8] }
}

/// Starts a non-blocking connect to `dst`, from `src` when given (port chosen by the kernel).
/// The connection completes later: the socket turns writable, then `connected` tells.
pub fn connect_from(src: Option<Ipv4Addr>, dst: SocketAddrV4) -> io::Result<mio::net::TcpStream> {
    let Some(src) = src else {
        return mio::net::TcpStream::connect(SocketAddr::V4(dst));
    };
    // SAFETY: plain libc calls on a descriptor this function owns; the descriptor is handed to
    // `TcpStream` (which closes it) before any early return after its creation.
    unsafe {
        let fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let std_stream = std::net::TcpStream::from_raw_fd(fd);
        let one: i32 = 1;
        // Best effort: without it bind() reserves a port per address, which is still enough.
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one as *const i32 as *const _, 4);
        let local = sockaddr(SocketAddrV4::new(src, 0));
        if bind(fd, &local, std::mem::size_of::<SockaddrIn>() as u32) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr(dst);
        if connect(fd, &remote, std::mem::size_of::<SockaddrIn>() as u32) != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(mio::net::TcpStream::from_std(std_stream))
    }
}

/// Whether a connect started by `connect_from` has completed: Ok(true) connected, Ok(false)
/// still in progress (a spurious wake-up), Err the connect failed.
pub fn connected(s: &mio::net::TcpStream) -> io::Result<bool> {
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes the coming close send a RST instead of a FIN: the bench closes thousands of sockets at
/// the end of a phase, and this keeps them out of TIME_WAIT (whose ports the next phase wants).
pub fn abortive_close(s: &impl AsRawFd) {
    let l = Linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a live descriptor with a correctly sized value.
    unsafe {
        setsockopt(s.as_raw_fd(), SOL_SOCKET, SO_LINGER, &l as *const Linger as *const _, std::mem::size_of::<Linger>() as u32);
    }
}

/// The i-th of `n` loopback source addresses (127.0.0.1, 127.0.0.2, ...); None for a single one
/// (then the kernel picks, as for any client).
pub fn source(i: usize, n: usize) -> Option<Ipv4Addr> {
    if n <= 1 {
        return None;
    }
    Some(Ipv4Addr::new(127, 0, 0, 1 + (i % n.min(250)) as u8))
}

/// Asks the kernel to stamp the data this socket receives with its arrival time (software
/// receive timestamps), so a delivery's latency ends when the answer reached the client's socket,
/// not when this single thread, busy with thousands of others, got round to reading it. False
/// when the kernel refuses: latencies are then timed at the read.
pub fn stamp_arrivals(s: &impl AsRawFd) -> bool {
    let flags = (libc::SOF_TIMESTAMPING_RX_SOFTWARE | libc::SOF_TIMESTAMPING_SOFTWARE) as libc::c_int;
    // SAFETY: setsockopt on a live descriptor with a correctly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPING,
            &flags as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// `recv` into `buf`, with the arrival time (Unix nanoseconds, the wall clock the publisher
/// stamps messages with) of the last data read, when the socket has `stamp_arrivals` on.
pub fn recv_stamped(s: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // Room for one SCM_TIMESTAMPING message (three timespecs), aligned as a cmsghdr wants.
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; every pointer set in it outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg writes at most iov_len bytes into buf and msg_controllen into control.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* walk stays inside msg_control as the kernel filled it (msg_controllen).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPING {
                // The first of the three is the software stamp.
                let t: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                if t.tv_sec > 0 {
                    stamp = Some(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64);
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}
