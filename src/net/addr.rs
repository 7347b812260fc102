//! Which addresses are "inside": the gateway never connects to them on behalf of an egress
//! rule (only a granted service may point there). Inside means an internal range
//! ([`internal_reason`]) or an address of one of the host's own interfaces ([`HostAddrs`]): a
//! service the host binds on 0.0.0.0 is reachable at its public address too.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::RwLock;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

/// The addresses of the host's interfaces (getifaddrs), read at start and again whenever the
/// kernel reports an address change: a netlink socket subscribed to the IPv4 and IPv6 address
/// groups is drained (without blocking) at every check, and any message, or an overflow,
/// makes the check read the list again first. Without that socket every check reads the list.
/// A failed read keeps the previous list; with no list at all every address counts as the
/// host's own (fail closed).
pub struct HostAddrs {
    addrs: RwLock<Option<HashSet<IpAddr>>>,
    watch: Option<OwnedFd>,
}

impl Default for HostAddrs {
    fn default() -> Self {
        // The watch first: a change between the read and the subscription would be missed.
        let watch = match address_watch() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "no netlink address watch: the host's addresses are read at every decision");
                None
            }
        };
        let h = HostAddrs {
            addrs: RwLock::new(None),
            watch,
        };
        h.refresh();
        h
    }
}

impl HostAddrs {
    fn refresh(&self) {
        match interface_addrs() {
            Ok(set) => {
                if let Ok(mut a) = self.addrs.write() {
                    *a = Some(set);
                }
            }
            Err(e) => tracing::error!(error = %e, "reading the host's interface addresses"),
        }
    }

    /// Whether the kernel reported an address change since the last call (drains them).
    fn changed(&self) -> bool {
        let Some(fd) = &self.watch else {
            return true;
        };
        let mut buf = [0u8; 8192];
        let mut changed = false;
        loop {
            match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return changed,
                Ok(_) => changed = true,
                Err(Errno::EINTR) => {}
                // Drained.
                Err(Errno::EAGAIN) => return changed,
                // ENOBUFS (messages lost) or anything else: read the list again.
                Err(_) => return true,
            }
        }
    }

    /// Whether `ip` (an IPv4-mapped address as its IPv4 form) is one of the host's own.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.changed() {
            self.refresh();
        }
        let ip = canonical(ip);
        match self.addrs.read() {
            Ok(a) => a.as_ref().is_none_or(|set| set.contains(&ip)),
            Err(_) => true,
        }
    }
}

/// A netlink socket subscribed to address changes (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR).
fn address_watch() -> std::io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    Ok(fd)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Every address of every interface of the calling thread's network namespace.
pub fn interface_addrs() -> std::io::Result<HashSet<IpAddr>> {
    let mut out = HashSet::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(a) = ifa.address else { continue };
        if let Some(sin) = a.as_sockaddr_in() {
            out.insert(IpAddr::V4(sin.ip()));
        } else if let Some(sin6) = a.as_sockaddr_in6() {
            out.insert(canonical(IpAddr::V6(sin6.ip())));
        }
    }
    Ok(out)
}

/// Why an address is internal, for the denial message; None for a public address.
pub fn internal_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_reason(v4);
            }
            v6_reason(v6)
        }
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("this-network (0.0.0.0/8)")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if o[0] == 169 && o[1] == 254 {
        // 169.254.169.254 is the cloud metadata service.
        Some("link-local / cloud metadata (169.254.0.0/16)")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("carrier-grade NAT (100.64.0.0/10)")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignments (192.0.0.0/24)")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking (198.18.0.0/15)")
    } else if o[0] >= 224 {
        Some("multicast or reserved (224.0.0.0/3)")
    } else if ip.is_documentation() {
        Some("documentation (TEST-NET)")
    } else {
        None
    }
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback (::1)")
    } else if ip.is_unspecified() {
        Some("unspecified (::)")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique local (fc00::/7)")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local (fe80::/10)")
    } else if (s[0] & 0xff00) == 0xff00 {
        Some("multicast (ff00::/8)")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64 can carry any IPv4 address, internal ones included.
        Some("NAT64 (64:ff9b::/96)")
    } else if s[0] == 0x2002 {
        Some("6to4 (2002::/16)")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation (2001:db8::/32)")
    } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
        Some("IPv4-compatible (::/96)")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("site-local (fec0::/10)")
    } else if (s[0] & 0xe000) != 0x2000 {
        // Everything outside global unicast is reserved or special-purpose.
        Some("not global unicast (outside 2000::/3)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_named() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "fec0::1",
            "fed0::1",
            "feff::1",
            "fe00::1",
            "4000::1",
        ] {
            assert!(internal_reason(a.parse().unwrap()).is_some(), "{a}");
        }
        for a in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(internal_reason(a.parse().unwrap()).is_none(), "{a}");
        }
    }

    #[test]
    fn the_hosts_own_addresses_are_read() {
        let own = interface_addrs().unwrap();
        assert!(own.contains(&"127.0.0.1".parse().unwrap()), "{own:?}");
        let h = HostAddrs::default();
        assert!(h.contains("127.0.0.1".parse().unwrap()));
        assert!(h.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!h.contains("192.0.2.77".parse().unwrap()));
    }
}
