//! The control protocol between `aitherctl` and `aitherd` on /run/aither/aitherd.sock, and the
//! frame format it shares with the agent channel (docs/protocol.md). The messages and the
//! blocking codec are defined once, in the `aither-proto` crate (re-exported here); this module
//! adds what needs libc or tokio: frames with descriptors (SCM_RIGHTS) and async framing.

use std::io::{self, Write};

use nix::errno::Errno;

use serde::Serialize;

pub use aither_proto::control::{
    CopyOp, ExecRequest, LogStream, Reply, Request, RunRequest, RunSignal, SecretValue,
    SpawnRequest, Via,
};
pub use aither_proto::frame::{
    encode, encode_limit, read_frame, read_frame_limit, write_frame, FrameError, MAX_FRAME,
    MAX_REPLY,
};
pub use aither_proto::{ErrorBody, ErrorCode};

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
    let n = nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[io::IoSlice::new(&bytes)],
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    // The descriptors went with the first byte; the rest is plain bytes.
    let mut s = sock;
    s.write_all(&bytes[n..])?;
    Ok(())
}

/// One sendmsg(2) of `bytes` with `fds` attached (SCM_RIGHTS), without blocking: the bytes
/// sent (the rest goes as plain bytes).
pub fn send_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[io::IoSlice::new(bytes)],
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)
}

/// A frame's body and the descriptors that came with it.
pub type FrameWithFds = (Vec<u8>, Vec<std::os::fd::OwnedFd>);

/// Reads one frame and the descriptors sent with it, blocking (the client's side of a reply
/// that carries descriptors). `Ok(None)` at a clean end of stream.
pub fn read_frame_fds_blocking(
    sock: std::os::fd::BorrowedFd<'_>,
    max: usize,
) -> Result<Option<FrameWithFds>, FrameError> {
    use std::os::fd::AsRawFd;
    let mut fds = Vec::new();
    let fill = |buf: &mut [u8], fds: &mut Vec<std::os::fd::OwnedFd>| -> io::Result<usize> {
        loop {
            match recv_with_fds(sock, buf, fds) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A blocking peek waits for the next bytes without taking them (nor
                    // their descriptors): recv_with_fds takes both.
                    let mut one = [0u8; 1];
                    match nix::sys::socket::recv(
                        sock.as_raw_fd(),
                        &mut one,
                        nix::sys::socket::MsgFlags::MSG_PEEK,
                    ) {
                        Ok(0) => return Ok(0),
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    };
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match fill(&mut header[got..], &mut fds)? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let n = aither_proto::frame::parse_header(header)?;
    if n > max {
        return Err(FrameError::Truncated);
    }
    let mut body = vec![0u8; n];
    let mut have = 0;
    while have < n {
        match fill(&mut body[have..], &mut fds)? {
            0 => return Err(FrameError::Truncated),
            k => have += k,
        }
    }
    Ok(Some((body, fds)))
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
    // Raw: nix's RecvMsg::cmsgs refuses a truncated control buffer (a client that sent more
    // than MAX_FDS) with ENOBUFS and hands over none of the descriptors that did arrive, which
    // would leak them in the daemon; this walk takes them (closed on drop).
    // SAFETY: a live socket and buffers that outlive the call.
    let n = Errno::result(unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    })?;
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

    use aither_proto::frame::parse_header;

    use super::{encode, encode_limit, ErrorCode, FrameError, Reply, MAX_REPLY};

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
        let n = parse_header(header)?;
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
        let n = parse_header(header)?;
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
            Err(FrameError::TooLarge { len: n, .. }) => encode(&Reply::err(
                ErrorCode::TooLarge,
                format!("the reply ({n} bytes) exceeds {MAX_REPLY} bytes"),
            ))?,
            Err(e) => return Err(e),
        };
        w.write_all(&bytes).await?;
        Ok(())
    }

    /// Writes a reply with descriptors attached to its first byte (SCM_RIGHTS).
    pub async fn write_reply_fds(
        sock: &tokio::net::UnixStream,
        msg: &Reply,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), FrameError> {
        use std::os::fd::AsFd;
        let bytes = encode_limit(msg, MAX_REPLY)?;
        let sent = loop {
            sock.writable().await?;
            match sock.try_io(tokio::io::Interest::WRITABLE, || {
                super::send_with_fds(sock.as_fd(), &bytes, fds)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => break r?,
            }
        };
        let mut rest = &bytes[sent..];
        while !rest.is_empty() {
            sock.writable().await?;
            match sock.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
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
