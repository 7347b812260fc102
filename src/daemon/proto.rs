//! The control protocol between `aitherctl` and `aitherd` on /run/aither/aitherd.sock, and the
//! frame format it shares with the agent channel (docs/protocol.md).
//!
//! A frame is a 4-byte big-endian length N (1..=MAX_FRAME), then N bytes of one JSON object.
//! Each request gets one reply; the follow forms of `logs` and `events` get a stream of replies
//! with `more: true` until the last one.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::supervise::Supervision;

/// Largest request frame (and any frame on an agent channel). A request is a few KiB at most
/// (a spawn with its environment); anything larger is refused before it is buffered.
pub const MAX_FRAME: usize = 64 * 1024;

/// Largest reply aitherd sends to aitherctl (`ps --json` of hundreds of agents, a page of
/// events). The client trusts its daemon; the bound only stops a runaway.
pub const MAX_REPLY: usize = 32 << 20;

/// Errors of reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("truncated frame (the peer closed mid-frame)")]
    Truncated,
    #[error("frame is not valid JSON: {0}")]
    BadJson(#[source] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl FrameError {
    /// The error code sent back to the peer.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::TooLarge(_) => "too_large",
            FrameError::Empty | FrameError::Truncated => "bad_frame",
            FrameError::BadJson(_) => "bad_json",
            FrameError::Io(_) => "io",
        }
    }

    /// Whether the stream can go on after this error (only a well-framed but invalid body).
    pub fn recoverable(&self) -> bool {
        matches!(self, FrameError::BadJson(_))
    }
}

/// Encodes one frame (at most MAX_FRAME).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    encode_limit(msg, MAX_FRAME)
}

/// Encodes one frame of at most `limit` bytes.
pub fn encode_limit<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(FrameError::BadJson)?;
    if body.len() > limit {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a frame header; returns the body length.
pub fn check_len(header: [u8; 4]) -> Result<usize, FrameError> {
    check_len_limit(header, MAX_FRAME)
}

fn check_len_limit(header: [u8; 4], limit: usize) -> Result<usize, FrameError> {
    let n = u32::from_be_bytes(header) as usize;
    if n == 0 {
        return Err(FrameError::Empty);
    }
    if n > limit {
        return Err(FrameError::TooLarge(n));
    }
    Ok(n)
}

/// Reads one frame's body (blocking). `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    read_frame_limit(r, MAX_FRAME)
}

/// Reads one frame of at most `limit` bytes (blocking).
pub fn read_frame_limit(r: &mut impl Read, limit: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let n = check_len_limit(header, limit)?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            e.into()
        }
    })?;
    Ok(Some(body))
}

/// Writes one frame (blocking).
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Most descriptors one frame may carry (SCM_RIGHTS); more are closed by the kernel.
pub const MAX_FDS: usize = 4;

/// Writes one frame with descriptors attached to its first byte (SCM_RIGHTS): a spawn's
/// workspace, opened by the caller with the caller's own rights (issue 18).
pub fn write_frame_fds<T: Serialize>(
    sock: &std::os::unix::net::UnixStream,
    msg: &T,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), FrameError> {
    use std::os::fd::AsRawFd;
    let bytes = encode(msg)?;
    if fds.is_empty() || fds.len() > MAX_FDS {
        let mut s = sock;
        s.write_all(&bytes)?;
        return Ok(());
    }
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; zero is "nothing set".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, enough for one header and `raw`.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(
            raw.as_ptr(),
            libc::CMSG_DATA(c) as *mut libc::c_int,
            raw.len(),
        );
    }
    // SAFETY: a live socket and a msghdr whose buffers outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // The descriptors went with the first byte; the rest is plain bytes.
    let mut s = sock;
    s.write_all(&bytes[n as usize..])?;
    Ok(())
}

/// One recvmsg(2): bytes into `buf`, SCM_RIGHTS descriptors (close-on-exec) into `fds`.
pub fn recv_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> io::Result<usize> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let payload = (MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zero is "nothing set".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: a live socket and buffers that outlive the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into `cbuf`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // Each is a new descriptor of ours (closed on drop if unused).
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(n as usize)
}

/// Async framing for the daemon.
pub mod aio {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{check_len, encode, encode_limit, FrameError, Reply, MAX_REPLY};

    /// Reads one frame's body. `Ok(None)` at a clean end of stream.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        r: &mut R,
    ) -> Result<Option<Vec<u8>>, FrameError> {
        let mut header = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut header[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => got += n,
            }
        }
        let n = check_len(header)?;
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                FrameError::Truncated
            } else {
                e.into()
            }
        })?;
        Ok(Some(body))
    }

    /// Reads one frame's body and the descriptors sent with it (SCM_RIGHTS). `Ok(None)` at a
    /// clean end of stream.
    pub async fn read_frame_fds(
        sock: &tokio::net::UnixStream,
    ) -> Result<Option<(Vec<u8>, Vec<std::os::fd::OwnedFd>)>, FrameError> {
        let mut fds = Vec::new();
        let mut header = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match fill(sock, &mut header[got..], &mut fds).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => got += n,
            }
        }
        let n = check_len(header)?;
        let mut body = vec![0u8; n];
        let mut have = 0;
        while have < n {
            match fill(sock, &mut body[have..], &mut fds).await? {
                0 => return Err(FrameError::Truncated),
                k => have += k,
            }
        }
        Ok(Some((body, fds)))
    }

    /// One recvmsg once the socket is readable.
    async fn fill(
        sock: &tokio::net::UnixStream,
        buf: &mut [u8],
        fds: &mut Vec<std::os::fd::OwnedFd>,
    ) -> std::io::Result<usize> {
        use std::os::fd::AsFd;
        loop {
            sock.readable().await?;
            match sock.try_io(tokio::io::Interest::READABLE, || {
                super::recv_with_fds(sock.as_fd(), buf, fds)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Writes a reply to aitherctl (up to MAX_REPLY); a reply that is still too large becomes
    /// a `too_large` error reply, so the client always hears why.
    pub async fn write_reply<W: AsyncWrite + Unpin>(
        w: &mut W,
        msg: &Reply,
    ) -> Result<(), FrameError> {
        let bytes = match encode_limit(msg, MAX_REPLY) {
            Ok(b) => b,
            Err(FrameError::TooLarge(n)) => encode(&Reply::err(
                "too_large",
                format!("the reply ({n} bytes) exceeds {MAX_REPLY} bytes"),
            ))?,
            Err(e) => return Err(e),
        };
        w.write_all(&bytes).await?;
        Ok(())
    }

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin, T: serde::Serialize>(
        w: &mut W,
        msg: &T,
    ) -> Result<(), FrameError> {
        w.write_all(&encode(msg)?).await?;
        Ok(())
    }
}

/// What `aitherctl spawn` asks for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub name: String,
    /// Policy name or absolute path (the client resolves relative paths).
    #[serde(default)]
    pub policy: Option<String>,
    /// A capability token's text; its subject must be `name`.
    #[serde(default)]
    pub token: Option<String>,
    pub argv: Vec<String>,
    /// Absolute path of the workspace (default: the client's working directory).
    #[serde(default)]
    pub workspace: Option<PathBuf>,
    /// The client's working directory (the default workspace).
    pub cwd: PathBuf,
    /// `--env KEY=VALUE`, in order.
    #[serde(default)]
    pub env: Vec<String>,
    /// The client's environment, for the policy's `pass_env` (only the variables the policy
    /// names reach the spec; the rest is never stored).
    #[serde(default)]
    pub pass_env: Vec<(String, String)>,
    #[serde(default)]
    pub supervision: Supervision,
    /// Narrower limits than the token's (bytes, CPUs, processes).
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub pids: Option<u64>,
    /// Replace an agent of the same name that is not running.
    #[serde(default)]
    pub replace: bool,
    /// Narrower GPU asks than the token's `gpu` claim (`--gpus`, `--gpu-vram`,
    /// `--gpu-priority`, `--gpu-exclusive`/`--gpu-shared`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_vram_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_exclusive: Option<bool>,
    /// Bus subjects granted on top of the policy's (`--bus-publish`, `--bus-subscribe`, an
    /// agent file's `[bus]`): only when aitherd mints the token from a policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bus_publish: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bus_subscribe: Vec<String>,
    /// Ports of the agent's sandbox published as named services (`--publish NAME=PORT`,
    /// docs/network.md), reachable by agents whose token grants NAME.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<(String, u16)>,
}

/// A request on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    Spawn(Box<SpawnRequest>),
    Ps,
    /// GPUs, their VRAM and leases (`aitherctl gpu ls`).
    GpuLs,
    /// The MicroScheduler's queue in order (`aitherctl gpu queue`).
    GpuQueue,
    Inspect {
        name: String,
    },
    Logs {
        name: String,
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        tail: Option<usize>,
    },
    Stop {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Kill {
        name: String,
        signal: i32,
    },
    Restart {
        name: String,
    },
    Rm {
        name: String,
        #[serde(default)]
        force: bool,
        /// Also delete every tier of the agent's memory (kept by default).
        #[serde(default)]
        purge_memory: bool,
    },
    /// A memory operation on `agent`'s memory, as an operator: `request` is a `mem.*` request
    /// as on the agent channel (docs/memory.md), plus the operator-only `mem.export`,
    /// `mem.import` and `mem.clear`.
    Mem {
        agent: String,
        request: serde_json::Value,
    },
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        since_ms: Option<u64>,
        #[serde(default)]
        name: Option<String>,
    },
    /// Publish on the bus as an operator (docs/bus.md). Requests may be pipelined.
    BusPub {
        subject: String,
        data: serde_json::Value,
        #[serde(default)]
        durable: bool,
    },
    /// Subscribe as an operator: a stream of `more: true` replies.
    BusSub {
        pattern: String,
        #[serde(default)]
        durable: Option<String>,
        #[serde(default)]
        from_seq: Option<u64>,
        #[serde(default)]
        since_ms: Option<u64>,
        #[serde(default)]
        queue: Option<usize>,
    },
    /// The durable log's statistics and the live subscriptions.
    BusStreams,
    /// Moves the caller's durable consumer's cursor to `seq` (`owner`: an admin acts on that
    /// uid's consumer; anyone else only on their own).
    BusAck {
        durable: String,
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// Deletes the caller's durable consumer (`owner`: as in `bus_ack`).
    BusConsumerRm {
        durable: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// Stores the caller's secret `name` (`owner`: an admin sets that uid's), replacing a value
    /// it had (a rotation). The value is never logged or echoed.
    SecretSet {
        name: String,
        value: SecretValue,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// The caller's secrets' names, sizes and times (an admin's: everyone's, with owners).
    SecretLs,
    /// Removes the caller's secret `name` (`owner`: as in `secret_set`).
    SecretRm {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<u32>,
    },
    /// The audit records the caller may see (`aitherctl audit` for a user who cannot read the
    /// root-only log): an admin's, all; anyone else's, those they asked for or that concern
    /// their agents. The reply is `{"lines": [...]}`, each a stored record's text.
    Audit {
        #[serde(default)]
        since_ms: Option<u64>,
        #[serde(default)]
        agent: Option<String>,
    },
}

/// A secret's value in a request: shown as `<secret>` by `Debug`, so no log of a request can
/// carry it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretValue(pub String);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// An error in a reply.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Machine-readable: bad_frame, too_large, bad_json, bad_request, not_found, exists,
    /// conflict, denied, invalid, internal.
    pub code: String,
    pub message: String,
}

/// One reply frame.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// The request's `id`, echoed (agent channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// More frames follow (the follow forms of logs and events).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

impl Reply {
    pub fn ok(data: serde_json::Value) -> Reply {
        Reply {
            id: None,
            ok: true,
            data: Some(data),
            error: None,
            more: false,
        }
    }

    pub fn chunk(data: serde_json::Value) -> Reply {
        Reply {
            more: true,
            ..Reply::ok(data)
        }
    }

    pub fn err(code: &str, message: impl Into<String>) -> Reply {
        Reply {
            id: None,
            ok: false,
            data: None,
            error: Some(ErrorBody {
                code: code.into(),
                message: message.into(),
            }),
            more: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let req = Request::Stop {
            name: "a".into(),
            timeout_ms: Some(5),
        };
        let bytes = encode(&req).unwrap();
        let body = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&body).unwrap(), req);
        // Oversized header refused before any body is read.
        let big = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &big[..]),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 0][..]),
            Err(FrameError::Empty)
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 9, b'{'][..]),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0][..]),
            Err(FrameError::Truncated)
        ));
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn replies_may_exceed_the_request_limit() {
        // `ps --json` of a few hundred agents is larger than any request may be.
        let big = Reply::ok(serde_json::json!({"rows": "x".repeat(MAX_FRAME * 3)}));
        assert!(matches!(encode(&big), Err(FrameError::TooLarge(_))));
        let bytes = encode_limit(&big, MAX_REPLY).unwrap();
        assert!(matches!(
            read_frame(&mut &bytes[..]),
            Err(FrameError::TooLarge(_))
        ));
        let body = read_frame_limit(&mut &bytes[..], MAX_REPLY)
            .unwrap()
            .unwrap();
        assert_eq!(serde_json::from_slice::<Reply>(&body).unwrap(), big);
    }
}
