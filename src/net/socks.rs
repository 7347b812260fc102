//! The SOCKS5 handshake (RFC 1928): no authentication, CONNECT only.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(super) enum SocksAsk {
    Name(String, u16),
    Address(SocketAddr),
    Refused(u8),
}

pub(super) fn socks_reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// The SOCKS5 greeting (no authentication) and request (RFC 1928).
pub(super) async fn socks5_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> io::Result<SocksAsk> {
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).await?;
    let mut methods = vec![0u8; hdr[1] as usize];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        return Ok(SocksAsk::Refused(0xff));
    }
    s.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(io::Error::other("not SOCKS5"));
    }
    if req[1] != 1 {
        // Only CONNECT: no BIND, no UDP ASSOCIATE.
        return Ok(SocksAsk::Refused(0x07));
    }
    let port = |b: [u8; 2]| u16::from_be_bytes(b);
    match req[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a).await?;
            let ip = std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(SocksAsk::Address(SocketAddr::new(
                ip.into(),
                port([a[4], a[5]]),
            )))
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a).await?;
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[..16]);
            let ip = std::net::Ipv6Addr::from(o);
            Ok(SocksAsk::Address(SocketAddr::new(
                ip.into(),
                port([a[16], a[17]]),
            )))
        }
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize + 2];
            s.read_exact(&mut name).await?;
            let p = port([name[name.len() - 2], name[name.len() - 1]]);
            name.truncate(name.len() - 2);
            match String::from_utf8(name) {
                Ok(n) if !n.is_empty() => Ok(SocksAsk::Name(n, p)),
                _ => Ok(SocksAsk::Refused(0x08)),
            }
        }
        _ => Ok(SocksAsk::Refused(0x08)),
    }
}
