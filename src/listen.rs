//! The listening sockets: a backlog larger than mio's default, and SO_REUSEPORT when several
//! nodes of a cluster on one host share their ports (`[browser] reuse_port`).

use crate::server::StartError;
use mio::net::TcpListener;
use mio::{Interest, Poll, Token};
use std::io;
use std::net::SocketAddr;

/// Pending connections the kernel queues per listener. mio (like std) listens with 128, which
/// overflows when thousands of browsers reconnect at once after a restart; nginx uses 511.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket with SO_REUSEPORT (and SO_REUSEADDR, as mio sets), for `reuse_port`:
/// every node on the host that binds the same address gets its share of the connections.
fn reuse_port_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscalls on a descriptor this function creates and either hands to the
    // listener (which then owns and closes it) or closes itself on error.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fail = |fd| {
            let e = io::Error::last_os_error();
            libc::close(fd);
            Err(e)
        };
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            if libc::setsockopt(fd, libc::SOL_SOCKET, opt, &one as *const _ as *const libc::c_void, std::mem::size_of::<libc::c_int>() as libc::socklen_t) != 0 {
                return fail(fd);
            }
        }
        let (raw, len) = match addr {
            SocketAddr::V4(a) => {
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = a.port().to_be();
                sa.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
                let mut st: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::copy_nonoverlapping(&sa as *const _ as *const u8, &mut st as *mut _ as *mut u8, std::mem::size_of::<libc::sockaddr_in>());
                (st, std::mem::size_of::<libc::sockaddr_in>())
            }
            SocketAddr::V6(a) => {
                let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_port = a.port().to_be();
                sa.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
                sa.sin6_scope_id = a.scope_id();
                let mut st: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::copy_nonoverlapping(&sa as *const _ as *const u8, &mut st as *mut _ as *mut u8, std::mem::size_of::<libc::sockaddr_in6>());
                (st, std::mem::size_of::<libc::sockaddr_in6>())
            }
        };
        if libc::bind(fd, &raw as *const _ as *const libc::sockaddr, len as libc::socklen_t) != 0 || libc::listen(fd, LISTEN_BACKLOG) != 0 {
            return fail(fd);
        }
        Ok(TcpListener::from_std(std::net::TcpListener::from_raw_fd(fd)))
    }
}

/// Opens and registers a listener for `token`; errors name the config key (`what.listen`).
pub fn bind(poll: &Poll, addr: SocketAddr, token: Token, what: &str, reuse_port: bool) -> Result<TcpListener, StartError> {
    let bound = if reuse_port { reuse_port_listener(addr) } else { TcpListener::bind(addr) };
    let mut l = bound.map_err(|e| StartError(format!("{what}.listen: cannot listen on {addr}: {e}")))?;
    // Linux lets listen() be called again to change the backlog (capped by net.core.somaxconn).
    // SAFETY: a plain syscall on a listening socket this function owns.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::listen(l.as_raw_fd(), LISTEN_BACKLOG);
    }
    poll.registry()
        .register(&mut l, token, Interest::READABLE)
        .map_err(|e| StartError(format!("{what}.listen: {e}")))?;
    Ok(l)
}
