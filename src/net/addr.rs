//! Which addresses are "inside": the gateway never connects to them on behalf of an egress
//! rule (only a granted service may point there).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
    } else if s[0] == 0xfd00 || (s[0] == 0xfec0) {
        Some("site-local")
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
        ] {
            assert!(internal_reason(a.parse().unwrap()).is_some(), "{a}");
        }
        for a in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(internal_reason(a.parse().unwrap()).is_none(), "{a}");
        }
    }
}
