//! The channel's framing: a 4-byte big-endian length `N`, then `N` bytes of one UTF-8 JSON
//! object, with `1 <= N <= MAX_FRAME`. Both sides use the same rules; this module knows nothing
//! of the JSON inside, so the daemon can reuse it (or [`parse_header`] alone, with its own
//! reads) without depending on the SDK's types.

use std::io::{self, Read, Write};

/// The largest payload a frame may carry (64 KiB). Longer frames are refused by both sides.
pub const MAX_FRAME: usize = 64 * 1024;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// What can go wrong while encoding or reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A length of 0: never valid (every frame holds one JSON object).
    #[error("empty frame (length 0)")]
    Empty,
    /// A length above [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(u64),
    /// The stream ended inside a frame (after part of its header or payload).
    #[error("the channel closed in the middle of a frame")]
    Truncated,
    /// The underlying read or write failed.
    #[error("channel I/O: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// The protocol's error code for a peer that sent this frame (`bad_frame` for an empty
    /// frame, `too_large` for an oversize one); `None` for local failures, which get no reply.
    /// Both codes end the channel: a stream cannot resynchronise after a bad length.
    pub fn wire_code(&self) -> Option<&'static str> {
        match self {
            FrameError::Empty => Some("bad_frame"),
            FrameError::TooLarge(_) => Some("too_large"),
            FrameError::Truncated | FrameError::Io(_) => None,
        }
    }
}

fn check_len(len: u64) -> Result<usize, FrameError> {
    match usize::try_from(len) {
        Ok(0) => Err(FrameError::Empty),
        Ok(n) if n <= MAX_FRAME => Ok(n),
        _ => Err(FrameError::TooLarge(len)),
    }
}

/// The payload length announced by a header, checked against `1..=MAX_FRAME`.
pub fn parse_header(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    check_len(u64::from(u32::from_be_bytes(header)))
}

/// `payload` with its length prefix, ready to be sent in one write.
pub fn encode(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = check_len(payload.len() as u64)?;
    let header = u32::try_from(len)
        .map_err(|_| FrameError::TooLarge(len as u64))?
        .to_be_bytes();
    let mut frame = Vec::with_capacity(HEADER_LEN + len);
    frame.extend_from_slice(&header);
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// Writes `payload` as one frame with a single `write_all` of header and payload together, so
/// that processes sharing the channel do not interleave their frames.
pub fn write_frame_sync<W: Write>(w: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    let frame = encode(payload)?;
    w.write_all(&frame)?;
    Ok(())
}

/// Fills `buf`; returns how many bytes were read before a clean end of stream.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
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

/// Reads one frame's payload. `Ok(None)` is a clean end of stream between frames; an end of
/// stream inside a frame is [`FrameError::Truncated`]. A bad length is refused before any of
/// the payload is read.
pub fn read_frame_sync<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(r, &mut header)? {
        0 => return Ok(None),
        HEADER_LEN => {}
        _ => return Err(FrameError::Truncated),
    }
    let len = parse_header(header)?;
    let mut payload = vec![0u8; len];
    if read_full(r, &mut payload)? != len {
        return Err(FrameError::Truncated);
    }
    Ok(Some(payload))
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
        assert_eq!(encode(b"{}").unwrap(), b"\0\0\0\x02{}");
        let big = vec![b'x'; 0x0102];
        assert_eq!(&encode(&big).unwrap()[..4], &[0, 0, 1, 2]);
    }

    #[test]
    fn encode_refuses_empty_and_oversize() {
        assert!(matches!(encode(b""), Err(FrameError::Empty)));
        assert_eq!(encode(&vec![b'x'; MAX_FRAME]).unwrap().len(), MAX_FRAME + 4);
        let err = encode(&vec![b'x'; MAX_FRAME + 1]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n) if n == MAX_FRAME as u64 + 1));
        assert_eq!(err.wire_code(), Some("too_large"));
    }

    #[test]
    fn read_round_trips_and_stops_cleanly() {
        let mut wire = Vec::new();
        write_frame_sync(&mut wire, br#"{"op":"ready"}"#).unwrap();
        write_frame_sync(&mut wire, br#"{"op":"heartbeat"}"#).unwrap();
        let mut r = Trickle(&wire);
        assert_eq!(
            read_frame_sync(&mut r).unwrap().unwrap(),
            br#"{"op":"ready"}"#
        );
        assert_eq!(
            read_frame_sync(&mut r).unwrap().unwrap(),
            br#"{"op":"heartbeat"}"#
        );
        assert!(read_frame_sync(&mut r).unwrap().is_none());
    }

    #[test]
    fn read_reports_truncation() {
        assert!(matches!(
            read_frame_sync(&mut &b"\0\0"[..]),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame_sync(&mut &b"\0\0\0\x05{}"[..]),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn read_refuses_bad_lengths_before_the_payload() {
        let err = read_frame_sync(&mut &b"\0\0\0\0{}"[..]).unwrap_err();
        assert!(matches!(err, FrameError::Empty));
        assert_eq!(err.wire_code(), Some("bad_frame"));

        // A 4 GiB announcement must not allocate or read anything.
        let mut r = &b"\xff\xff\xff\xffrest"[..];
        let err = read_frame_sync(&mut r).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(0xffff_ffff)));
        assert_eq!(r, b"rest");

        let just_over = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            parse_header(just_over),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(
            parse_header((MAX_FRAME as u32).to_be_bytes()).unwrap(),
            MAX_FRAME
        );
    }
}
