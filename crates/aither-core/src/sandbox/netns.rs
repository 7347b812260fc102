//! The egress gateway's socket inside the sandbox's network namespace (docs/network.md).
//!
//! The launcher (single-threaded, root) enters the sandbox's new network namespace for a moment,
//! brings its loopback up, binds and listens on 127.0.0.1:PORT there, and returns to its own
//! namespace. The socket stays in the sandbox's namespace for good (a socket belongs to the
//! namespace it was created in), while its descriptor stays with the manager: connections the
//! agent makes to 127.0.0.1:PORT are accepted by the gateway directly, with no process, veth or
//! route added to the sandbox.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::sys;

fn setns(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns on a namespace descriptor we hold; affects the calling thread only.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Binds a listening TCP socket on 127.0.0.1:`port` in the network namespace of `pid`.
pub fn listen_in(pid: i32, port: u16) -> io::Result<OwnedFd> {
    let own = sys::open(Path::new("/proc/thread-self/ns/net"), libc::O_RDONLY)?;
    let theirs = sys::open(Path::new(&format!("/proc/{pid}/ns/net")), libc::O_RDONLY)?;
    setns(&theirs)?;
    let made = bind_listen(port);
    // Back to our own namespace whatever happened: every later socket of the launcher (and of
    // the gateway, for `aitherctl run`) must be the host's.
    if let Err(e) = setns(&own) {
        return Err(io::Error::new(
            e.kind(),
            format!("returning to the launcher's network namespace: {e}"),
        ));
    }
    made
}

/// A non-blocking TCP socket (unbound, unconnected) created in the network namespace `ns`,
/// for the gateway to connect to a port published on that namespace's loopback. The calling
/// thread must be one that ends right after (its namespace may be left changed on error).
pub fn socket_in(ns: &OwnedFd) -> io::Result<OwnedFd> {
    let own = sys::open(Path::new("/proc/thread-self/ns/net"), libc::O_RDONLY)?;
    setns(ns)?;
    let made = tcp_socket();
    setns(&own)?;
    made
}

fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind_listen(port: u16) -> io::Result<OwnedFd> {
    // lo starts down in a new namespace; pid 1 brings it up too, later (idempotent).
    super::init::loopback_up()?;
    let fd = tcp_socket()?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: bind with a sockaddr_in of the stated size.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 4096) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
