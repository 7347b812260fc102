//! What a tunnel carries: its first flight, read before a byte goes upstream (docs/network.md).

use tokio::io::{AsyncRead, AsyncReadExt};

use super::gateway::HEAD_TIMEOUT;

/// Largest first TLS flight looked at for the SNI.
const MAX_HELLO_BYTES: usize = 64 * 1024;

/// What the first bytes of a tunnel are.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstFlight {
    /// Not enough bytes yet.
    NeedMore,
    /// A TLS ClientHello with this SNI (None: no SNI).
    Tls(Option<String>),
    /// An HTTP CONNECT request: proxying relayed through the tunnel.
    RelayedConnect,
    /// An HTTP request (not CONNECT).
    PlainHttp,
    /// Something else (plain text, another protocol).
    Other,
    /// A TLS record that is not a valid ClientHello.
    BadTls(String),
}

/// Classifies a tunnel's first bytes. The ClientHello is parsed by rustls (its server-side
/// `Acceptor` reads exactly the ClientHello and nothing else); the bytes are forwarded as
/// they came, the gateway never terminates the agent's TLS.
pub fn classify_first_flight(buf: &[u8]) -> FirstFlight {
    if buf.is_empty() {
        return FirstFlight::NeedMore;
    }
    if buf[0] == 0x16 {
        let mut acc = rustls::server::Acceptor::default();
        let mut rd: &[u8] = buf;
        while !rd.is_empty() {
            match acc.read_tls(&mut rd) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return FirstFlight::BadTls(e.to_string()),
            }
        }
        return match acc.accept() {
            Ok(None) => FirstFlight::NeedMore,
            Ok(Some(a)) => FirstFlight::Tls(a.client_hello().server_name().map(str::to_string)),
            Err((e, _)) => FirstFlight::BadTls(e.to_string()),
        };
    }
    // Leading blank lines and spaces are skipped (an HTTP parser may skip them too), so they
    // cannot hide what follows.
    let lead = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
        .count();
    if lead == buf.len() {
        return FirstFlight::NeedMore;
    }
    let buf = &buf[lead..];
    const CONNECT: &[u8] = b"CONNECT ";
    let n = buf.len().min(CONNECT.len());
    if buf[..n].eq_ignore_ascii_case(&CONNECT[..n]) {
        return if n == CONNECT.len() {
            FirstFlight::RelayedConnect
        } else {
            FirstFlight::NeedMore
        };
    }
    // An HTTP request line: METHOD SP (upper-case letters, then a space).
    let token = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if token > 0 && buf.get(token) == Some(&b' ') {
        return FirstFlight::PlainHttp;
    }
    if token == buf.len() && token < 8 {
        return FirstFlight::NeedMore;
    }
    FirstFlight::Other
}

/// What the first flight of a tunnel allows.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flight {
    /// Relay the bytes as they are (TLS with the right SNI; anything, to a service).
    Relay,
    /// Plain HTTP in a SOCKS5 tunnel: served as HTTP, each request decided on its own.
    PlainHttp,
}

/// Why a tunnel's first flight is refused (the reason of its `tunnel-inspection` event).
#[derive(Debug, thiserror::Error)]
pub(super) enum FlightError {
    #[error("TLS SNI {sni:?} does not match the tunnel's host {host:?}")]
    SniMismatch { sni: String, host: String },
    #[error("TLS ClientHello without SNI in a tunnel to {0:?}")]
    NoSni(String),
    #[error("a CONNECT request inside a tunnel (relayed proxying) is refused")]
    RelayedConnect,
    #[error("the tunnel to {0:?} does not start with a TLS ClientHello (tunnels carry TLS; plain HTTP goes through HTTP_PROXY)")]
    NotTls(String),
    #[error("malformed TLS ClientHello: {0}")]
    BadTls(String),
    #[error("the TLS ClientHello is too large")]
    TooLarge,
    #[error("no TLS ClientHello within the time limit")]
    Timeout,
    #[error("{0}")]
    Read(#[source] std::io::Error),
    #[error("closed before the first flight")]
    Closed,
    /// Not plain HTTP, to a service whose tokens the gateway counts.
    #[error(
        "the service {0:?} counts tokens (api = \"openai\"): plain HTTP only, nothing relayed"
    )]
    Metered(String),
}

/// Reads the tunnel's first flight and checks it: a ClientHello whose SNI is `host`
/// (`any_protocol`: a granted service may also carry something else). Returns the bytes read.
pub(super) async fn first_flight<C: AsyncRead + Unpin>(
    client: &mut C,
    host: &str,
    any_protocol: bool,
    plain_http: bool,
) -> Result<(Vec<u8>, Flight), FlightError> {
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let want = host.trim_end_matches('.');
    loop {
        match classify_first_flight(&buf) {
            FirstFlight::NeedMore => {}
            FirstFlight::Tls(Some(sni)) if sni.eq_ignore_ascii_case(want) => {
                return Ok((buf, Flight::Relay))
            }
            FirstFlight::Tls(Some(sni)) => {
                return Err(FlightError::SniMismatch {
                    sni,
                    host: want.to_string(),
                })
            }
            FirstFlight::Tls(None) if any_protocol => return Ok((buf, Flight::Relay)),
            FirstFlight::Tls(None) => return Err(FlightError::NoSni(want.to_string())),
            FirstFlight::RelayedConnect => return Err(FlightError::RelayedConnect),
            // Plain HTTP is parsed request by request when it may be served (a CONNECT
            // anywhere in the stream is then refused by the HTTP path).
            FirstFlight::PlainHttp if plain_http => return Ok((buf, Flight::PlainHttp)),
            FirstFlight::Other | FirstFlight::PlainHttp if any_protocol => {
                if contains_connect(&buf) {
                    return Err(FlightError::RelayedConnect);
                }
                return Ok((buf, Flight::Relay));
            }
            FirstFlight::Other | FirstFlight::PlainHttp => {
                return Err(FlightError::NotTls(want.to_string()))
            }
            FirstFlight::BadTls(e) => return Err(FlightError::BadTls(e)),
        }
        if buf.len() >= MAX_HELLO_BYTES {
            return Err(FlightError::TooLarge);
        }
        let n = tokio::time::timeout_at(deadline, client.read(&mut chunk))
            .await
            .map_err(|_| FlightError::Timeout)?
            .map_err(FlightError::Read)?;
        if n == 0 {
            return Err(FlightError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether `buf` holds "CONNECT " anywhere (any case): a relayed first flight to a service
/// that is not HTTP from its first byte is refused when it carries one.
fn contains_connect(buf: &[u8]) -> bool {
    buf.windows(8).any(|w| w.eq_ignore_ascii_case(b"CONNECT "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_flights_are_classified() {
        assert_eq!(classify_first_flight(b""), FirstFlight::NeedMore);
        assert_eq!(classify_first_flight(b"CONN"), FirstFlight::NeedMore);
        assert_eq!(
            classify_first_flight(b"CONNECT evil:443 HTTP/1.1\r\n"),
            FirstFlight::RelayedConnect
        );
        assert_eq!(
            classify_first_flight(b"connect evil:443 HTTP/1.1\r\n"),
            FirstFlight::RelayedConnect
        );
        assert_eq!(
            classify_first_flight(b"GET / HTTP/1.1\r\n"),
            FirstFlight::PlainHttp
        );
        assert_eq!(classify_first_flight(b"GE"), FirstFlight::NeedMore);
        // Leading CRLF or spaces hide nothing.
        assert_eq!(
            classify_first_flight(b"\r\n CONNECT evil:443 HTTP/1.1\r\n"),
            FirstFlight::RelayedConnect
        );
        assert_eq!(classify_first_flight(b"\r\n\r\n"), FirstFlight::NeedMore);
        assert_eq!(
            classify_first_flight(b"\r\nGET / HTTP/1.1\r\n"),
            FirstFlight::PlainHttp
        );
        assert!(contains_connect(b"X\r\nconnect evil:443 HTTP/1.1"));
        assert_eq!(classify_first_flight(b"SSH-2.0-x\r\n"), FirstFlight::Other);
        assert!(matches!(
            classify_first_flight(&[0x16, 3, 1, 0, 5, 9, 9, 9, 9, 9]),
            FirstFlight::BadTls(_)
        ));
    }
}
