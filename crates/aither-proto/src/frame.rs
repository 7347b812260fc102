//! The frame codec of the control socket and of the agent channel (fd 3): a 4-byte big-endian
//! length `N`, then `N` bytes of one UTF-8 JSON object, with `1 <= N <= limit`. Requests and
//! agent-channel frames have the limit [`MAX_FRAME`]; replies to `aitherctl` [`MAX_REPLY`].
//! A bad length is refused from the header alone, before any of the body is read or buffered.
//! The async and descriptor-passing forms live with the daemon (they need tokio and libc);
//! they use [`parse_header`] and [`encode_limit`] from here.

use std::io::{self, Read, Write};

use serde::Serialize;

use crate::ErrorCode;

/// Largest request frame, and any frame on an agent channel (64 KiB). A request is a few KiB
/// at most (a spawn with its environment); anything larger is refused before it is buffered.
pub const MAX_FRAME: usize = 64 * 1024;

/// Largest reply aitherd sends to aitherctl (`ps --json` of hundreds of agents, a page of
/// events). The client trusts its daemon; the bound only stops a runaway.
pub const MAX_REPLY: usize = 32 << 20;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Errors of reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A length above the limit (announced by a header, or of a body to send).
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u64, limit: usize },
    /// A length of 0: never valid (every frame holds one JSON object).
    #[error("empty frame")]
    Empty,
    /// The stream ended inside a frame (after part of its header or body).
    #[error("truncated frame (the peer closed mid-frame)")]
    Truncated,
    /// A message that does not encode, or a body that is not the JSON expected.
    #[error("frame is not valid JSON: {0}")]
    BadJson(#[source] serde_json::Error),
    /// The underlying read or write failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl FrameError {
    /// The error code sent back to the peer that sent this frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::TooLarge,
            FrameError::Empty | FrameError::Truncated => ErrorCode::BadFrame,
            FrameError::BadJson(_) => ErrorCode::BadJson,
            FrameError::Io(_) => ErrorCode::Io,
        }
    }

    /// The code of a reply to a peer whose frame had a bad length (`bad_frame`, `too_large`);
    /// `None` for local failures, which get no reply. Both codes end the channel: a stream
    /// cannot resynchronise after a bad length.
    pub fn wire_code(&self) -> Option<ErrorCode> {
        match self {
            FrameError::Empty => Some(ErrorCode::BadFrame),
            FrameError::TooLarge { .. } => Some(ErrorCode::TooLarge),
            _ => None,
        }
    }

    /// Whether the stream can go on after this error (only a well-framed but invalid body).
    pub fn recoverable(&self) -> bool {
        matches!(self, FrameError::BadJson(_))
    }
}

/// Checks a body length against `1..=limit`.
pub fn check_len(len: u64, limit: usize) -> Result<usize, FrameError> {
    match usize::try_from(len) {
        Ok(0) => Err(FrameError::Empty),
        Ok(n) if n <= limit => Ok(n),
        _ => Err(FrameError::TooLarge { len, limit }),
    }
}

/// The body length a header announces, checked against `1..=MAX_FRAME`.
pub fn parse_header(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    parse_header_limit(header, MAX_FRAME)
}

/// The body length a header announces, checked against `1..=limit`.
pub fn parse_header_limit(header: [u8; HEADER_LEN], limit: usize) -> Result<usize, FrameError> {
    check_len(u64::from(u32::from_be_bytes(header)), limit)
}

/// `body` with its length prefix (at most MAX_FRAME), ready to be sent in one write.
pub fn encode_body(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    encode_body_limit(body, MAX_FRAME)
}

/// `body` with its length prefix, at most `limit` bytes.
pub fn encode_body_limit(body: &[u8], limit: usize) -> Result<Vec<u8>, FrameError> {
    let len = check_len(body.len() as u64, limit.min(u32::MAX as usize))?;
    let mut frame = Vec::with_capacity(HEADER_LEN + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame.extend_from_slice(body);
    Ok(frame)
}

/// Encodes one message as a frame (at most MAX_FRAME).
pub fn encode<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    encode_limit(msg, MAX_FRAME)
}

/// Encodes one message as a frame of at most `limit` bytes.
pub fn encode_limit<T: Serialize + ?Sized>(msg: &T, limit: usize) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(FrameError::BadJson)?;
    encode_body_limit(&body, limit)
}

/// Fills `buf`; returns how many bytes were read before a clean end of stream.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads one frame's body (blocking, at most MAX_FRAME). `Ok(None)` is a clean end of stream
/// between frames; an end of stream inside a frame is [`FrameError::Truncated`].
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    read_frame_limit(r, MAX_FRAME)
}

/// Reads one frame of at most `limit` bytes (blocking). A bad length is refused before any
/// of the body is read.
pub fn read_frame_limit<R: Read + ?Sized>(
    r: &mut R,
    limit: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(r, &mut header)? {
        0 => return Ok(None),
        HEADER_LEN => {}
        _ => return Err(FrameError::Truncated),
    }
    let len = parse_header_limit(header, limit)?;
    let mut body = vec![0u8; len];
    if read_full(r, &mut body)? != len {
        return Err(FrameError::Truncated);
    }
    Ok(Some(body))
}

/// Writes one message as a frame (blocking), header and body in a single `write_all`, so that
/// processes sharing a channel do not interleave their frames.
pub fn write_frame<W: Write + ?Sized, T: Serialize + ?Sized>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Writes `body` (already JSON) as one frame, in a single `write_all`.
pub fn write_body<W: Write + ?Sized>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    w.write_all(&encode_body(body)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out one byte per call, as a slow stream may.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((b, rest)), Some(slot)) => {
                    *slot = *b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn encode_prefixes_big_endian_length() {
        assert_eq!(encode_body(b"{}").unwrap(), b"\0\0\0\x02{}");
        let big = vec![b'x'; 0x0102];
        assert_eq!(&encode_body(&big).unwrap()[..4], &[0, 0, 1, 2]);
        assert_eq!(
            encode(&serde_json::json!({"op": "ping"})).unwrap(),
            b"\0\0\0\x0d{\"op\":\"ping\"}"
        );
    }

    #[test]
    fn encode_refuses_empty_and_oversize() {
        assert!(matches!(encode_body(b""), Err(FrameError::Empty)));
        assert_eq!(
            encode_body(&vec![b'x'; MAX_FRAME]).unwrap().len(),
            MAX_FRAME + 4
        );
        let err = encode_body(&vec![b'x'; MAX_FRAME + 1]).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, limit } if len == MAX_FRAME as u64 + 1 && limit == MAX_FRAME)
        );
        assert_eq!(err.wire_code(), Some(ErrorCode::TooLarge));
        assert_eq!(
            err.to_string(),
            "frame of 65537 bytes exceeds the limit of 65536 bytes"
        );
    }

    #[test]
    fn read_round_trips_and_stops_cleanly() {
        let mut wire = Vec::new();
        write_body(&mut wire, br#"{"op":"ready"}"#).unwrap();
        write_frame(&mut wire, &serde_json::json!({"op": "heartbeat"})).unwrap();
        let mut r = Trickle(&wire);
        assert_eq!(read_frame(&mut r).unwrap().unwrap(), br#"{"op":"ready"}"#);
        assert_eq!(
            read_frame(&mut r).unwrap().unwrap(),
            br#"{"op":"heartbeat"}"#
        );
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn read_reports_truncation() {
        for wire in [&b"\0\0"[..], b"\0\0\0\x05{}", b"\0\0\0\x09{"] {
            assert!(matches!(
                read_frame(&mut &wire[..]),
                Err(FrameError::Truncated)
            ));
        }
        assert!(read_frame(&mut &b""[..]).unwrap().is_none());
    }

    #[test]
    fn read_refuses_bad_lengths_before_the_body() {
        let err = read_frame(&mut &b"\0\0\0\0{}"[..]).unwrap_err();
        assert!(matches!(err, FrameError::Empty));
        assert_eq!(err.wire_code(), Some(ErrorCode::BadFrame));
        assert_eq!(err.code(), ErrorCode::BadFrame);

        // A 4 GiB announcement must not allocate or read anything.
        let mut r = &b"\xff\xff\xff\xffrest"[..];
        let err = read_frame(&mut r).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0xffff_ffff,
                ..
            }
        ));
        assert_eq!(r, b"rest");

        let just_over = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            parse_header(just_over),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            parse_header((MAX_FRAME as u32).to_be_bytes()).unwrap(),
            MAX_FRAME
        );
    }

    #[test]
    fn replies_may_exceed_the_request_limit() {
        // `ps --json` of a few hundred agents is larger than any request may be.
        let big = serde_json::json!({"rows": "x".repeat(MAX_FRAME * 3)});
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
        let bytes = encode_limit(&big, MAX_REPLY).unwrap();
        assert!(matches!(
            read_frame(&mut &bytes[..]),
            Err(FrameError::TooLarge { .. })
        ));
        let body = read_frame_limit(&mut &bytes[..], MAX_REPLY)
            .unwrap()
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            big
        );
    }
}
