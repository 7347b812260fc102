//! The channel's framing: a 4-byte big-endian length `N`, then `N` bytes of one UTF-8 JSON
//! object, with `1 <= N <= MAX_FRAME`. The codec is aither-proto's, shared with the daemon;
//! this module keeps the SDK's names for it.

pub use aither_proto::frame::{
    encode_body as encode, parse_header, read_frame as read_frame_sync,
    write_body as write_frame_sync, FrameError, HEADER_LEN, MAX_FRAME,
};
