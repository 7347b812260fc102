//! The egress gateway's socket inside the sandbox's network namespace (docs/network.md).
//!
//! The launcher (single-threaded, root) enters the sandbox's new network namespace for a moment,
//! brings its loopback up, binds and listens on 127.0.0.1:PORT there, and returns to its own
//! namespace. The socket stays in the sandbox's namespace for good (a socket belongs to the
//! namespace it was created in), while its descriptor stays with the manager: connections the
//! agent makes to 127.0.0.1:PORT are accepted by the gateway directly, with no process, veth or
//! route added to the sandbox.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;

use crate::sys;

/// Affects the calling thread only.
fn setns(fd: &OwnedFd) -> io::Result<()> {
    sys::setns(fd.as_fd(), libc::CLONE_NEWNET)
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
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    Ok(nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

fn bind_listen(port: u16) -> io::Result<OwnedFd> {
    // lo starts down in a new namespace; pid 1 brings it up too, later (idempotent).
    super::init::loopback_up()?;
    let fd = tcp_socket()?;
    let addr = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        port,
    ));
    nix::sys::socket::bind(fd.as_raw_fd(), &addr)?;
    // Raw: nix's Backlog refuses more than libc's SOMAXCONN, 128 on musl (the static build).
    // SAFETY: listen on a bound socket we own.
    Errno::result(unsafe { libc::listen(fd.as_raw_fd(), 4096) })?;
    Ok(fd)
}
