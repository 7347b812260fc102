//! The typed messages between the launcher and the sandbox's pid 1, over a SOCK_SEQPACKET
//! socketpair (one message per packet, JSON). Failures cross as typed frames naming the stage
//! and errno, never as free text to be parsed.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags};

use serde::{Deserialize, Serialize};

use crate::sys::ExitStatus;

/// A launch stage inside the sandbox, in execution order.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Stage {
    JoinCgroup,
    UnshareCgroupNs,
    WaitForParent,
    BecomeNsRoot,
    Mounts,
    Loopback,
    Hostname,
    Rlimits,
    NewSession,
    CloseFds,
    NotDumpable,
    DropBoundingCaps,
    SetAgentIds,
    ClearCaps,
    ParentDeathSignal,
    NoNewPrivs,
    Landlock,
    ResolveCommand,
    Seccomp,
    ForkAgent,
    HideLauncherArgs,
    /// `aitherctl exec -w DIR`: entering the command's working directory.
    WorkingDir,
    /// A prepared sandbox (`launch::prepare`): waiting for, then receiving, the final spec.
    FinalSpec,
    /// A prepared sandbox: the workspace's stub directories, its mount, the hostname, then
    /// the root made read-only.
    FinishView,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Stage::JoinCgroup => "joining the cgroup",
            Stage::UnshareCgroupNs => "creating the cgroup namespace",
            Stage::WaitForParent => "waiting for the launcher",
            Stage::BecomeNsRoot => "switching to the namespace's setup identity",
            Stage::HideLauncherArgs => "hiding the launcher's arguments and environment",
            Stage::Mounts => "building the filesystem view",
            Stage::Loopback => "bringing up loopback",
            Stage::Hostname => "setting the hostname",
            Stage::Rlimits => "setting resource limits",
            Stage::NewSession => "starting a new session",
            Stage::CloseFds => "closing inherited descriptors",
            Stage::NotDumpable => "marking the process non-dumpable",
            Stage::DropBoundingCaps => "dropping the capability bounding set",
            Stage::SetAgentIds => "switching to the agent's uid/gid",
            Stage::ClearCaps => "clearing capabilities",
            Stage::ParentDeathSignal => "arming the parent-death signal",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::Landlock => "enforcing Landlock",
            Stage::ResolveCommand => "finding the command",
            Stage::Seccomp => "installing the seccomp filter",
            Stage::ForkAgent => "starting the agent",
            Stage::WorkingDir => "entering the working directory",
            Stage::FinalSpec => "receiving the final spec",
            Stage::FinishView => {
                "finishing the prepared view (workspace, hostname, read-only root)"
            }
        };
        f.write_str(s)
    }
}

/// One message.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Msg {
    /// Launcher → pid 1: the id maps are written, go on.
    Go,
    /// Launcher → pid 1, with descriptors: the cgroup files to write "0" to (the first
    /// `cgroup_files`), then the id-mapped workspace mount when `workspace`. Prepared while
    /// pid 1 builds its mount view.
    Resources {
        cgroup_files: usize,
        workspace: bool,
    },
    /// pid 1 → launcher: the agent was exec'ed. Stage timestamps are CLOCK_MONOTONIC ns.
    Started {
        agent_pid: i32,
        stages: Vec<(Stage, u64)>,
        landlock: String,
        /// What pid 1 read from /proc after confinement (when the spec asks for a report).
        #[serde(default)]
        inside: Option<super::report::Inside>,
    },
    /// pid 1 → launcher: a stage failed; nothing was run.
    Failed {
        stage: Stage,
        errno: i32,
        detail: String,
    },
    /// The command does not exist in the sandbox's view (exit 127).
    NotFound { program: String },
    /// The command exists but could not be executed (exit 126).
    NotExecutable { program: String, errno: i32 },
    /// pid 1 → launcher: the agent ended.
    Exited(ExitStatus),
    /// pid 1 → launcher, a prepared sandbox (`launch::prepare`): the caller-independent setup
    /// is done (mounts but the workspace, lo up, cgroups joined); waiting for `Final`.
    Ready { stages: Vec<(Stage, u64)> },
    /// Launcher → pid 1, a prepared sandbox, with descriptors: the agent's stdin, stdout and
    /// stderr, then the id-mapped workspace mount when `workspace`. `ctty`: which of the
    /// three is the sandbox's own pty. Larger than other frames (argv, env): read with
    /// `recv_large_with_fds`. `agent_fd`: the agent's socket follows, last (a supervised
    /// agent's, `Prepared::finish_supervised`; it becomes the agent's fd 3).
    Final {
        spec: Box<super::spec::SandboxSpec>,
        ctty: Option<i32>,
        workspace: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        agent_fd: bool,
    },
}

/// Largest frame accepted.
pub const MAX_FRAME: usize = 8 * 1024;

pub fn send(fd: BorrowedFd<'_>, msg: &Msg) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    // MSG_NOSIGNAL: a peer that went away is EPIPE, not SIGPIPE.
    nix::sys::socket::send(fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL)?;
    Ok(())
}

/// Receives one message; `None` when the peer closed its end.
pub fn recv(fd: BorrowedFd<'_>) -> io::Result<Option<Msg>> {
    // On the stack: a heap buffer would be fresh pages to fault in, on every launch.
    let mut buf = [0u8; MAX_FRAME];
    loop {
        let n = match nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(Errno::EINTR) => continue,
            r => r?,
        };
        if n == 0 {
            return Ok(None);
        }
        return serde_json::from_slice(&buf[..n])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    }
}

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 16;

/// Sends a message with descriptors attached (SCM_RIGHTS).
pub fn send_with_fds(fd: BorrowedFd<'_>, msg: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.is_empty() {
        return send(fd, msg);
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    nix::sys::socket::sendmsg::<()>(
        fd.as_raw_fd(),
        &[io::IoSlice::new(&bytes)],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message and the descriptors attached to it (close-on-exec).
pub fn recv_with_fds(fd: BorrowedFd<'_>) -> io::Result<(Option<Msg>, Vec<OwnedFd>)> {
    // On the stack: a heap buffer would be fresh pages to fault in, on every launch.
    let mut buf = [0u8; MAX_FRAME];
    recv_with_fds_into(fd, &mut buf)
}

/// Largest frame `recv_large_with_fds` accepts (a final spec's argv and env; below the
/// default socket send buffer, which bounds one SOCK_SEQPACKET message).
pub const MAX_LARGE_FRAME: usize = 192 * 1024;

/// `recv_with_fds` for frames up to `MAX_LARGE_FRAME` (the final spec); a longer one is an
/// error (EMSGSIZE), never a truncated parse.
pub fn recv_large_with_fds(fd: BorrowedFd<'_>) -> io::Result<(Option<Msg>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; next_len(fd)?.min(MAX_LARGE_FRAME) + 1];
    let (bytes, fds) = recv_bytes_with_fds(fd, &mut buf)?;
    match bytes {
        None => Ok((None, fds)),
        Some(b) if b.len() > MAX_LARGE_FRAME => Err(io::Error::from_raw_os_error(libc::EMSGSIZE)),
        Some(b) => {
            let msg = serde_json::from_slice(b)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            Ok((Some(msg), fds))
        }
    }
}

/// The length of the next packet, without taking it (MSG_PEEK|MSG_TRUNC: the kernel reports a
/// unix packet's whole length); 0 at EOF. Waits for one. Sizes the buffer of a large frame
/// (a 192 KiB buffer zeroed per receive costs more than this call).
pub fn next_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    loop {
        match nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut [],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
        ) {
            Err(Errno::EINTR) => continue,
            r => return Ok(r?),
        }
    }
}

/// One packet and its descriptors (close-on-exec), unparsed: `None` at EOF. A packet longer
/// than `buf` comes back as `buf.len()` bytes (callers size `buf` one above their limit).
pub fn recv_bytes_with_fds<'b>(
    fd: BorrowedFd<'_>,
    buf: &'b mut [u8],
) -> io::Result<(Option<&'b [u8]>, Vec<OwnedFd>)> {
    let mut cbuf = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [io::IoSliceMut::new(buf)];
        let got = match nix::sys::socket::recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cbuf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            r => r?,
        };
        let n = got.bytes;
        let mut fds = Vec::new();
        // ENOBUFS when the control data was truncated (more than MAX_FDS: never sent so).
        for c in got.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: SCM_RIGHTS descriptors are new in this process; nothing else owns
                // them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|r| unsafe { OwnedFd::from_raw_fd(r) }),
                );
            }
        }
        if n == 0 {
            return Ok((None, fds));
        }
        return Ok((Some(&buf[..n]), fds));
    }
}

fn recv_with_fds_into(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(Option<Msg>, Vec<OwnedFd>)> {
    let (bytes, fds) = recv_bytes_with_fds(fd, buf)?;
    let msg = bytes
        .map(|b| {
            serde_json::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        })
        .transpose()?;
    Ok((msg, fds))
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across the launcher and the sandbox).
pub fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        // Cannot fail for CLOCK_MONOTONIC; libc's result was ignored here before too.
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_round_trip_and_eof_is_none() {
        let (a, b) = crate::sys::seqpacket_pair().unwrap();
        let msgs = [
            Msg::Go,
            Msg::Failed {
                stage: Stage::Landlock,
                errno: libc::EPERM,
                detail: "x".into(),
            },
            Msg::Exited(ExitStatus::Signaled(9)),
        ];
        for m in &msgs {
            send(a.as_fd(), m).unwrap();
        }
        for m in &msgs {
            assert_eq!(recv(b.as_fd()).unwrap().as_ref(), Some(m));
        }
        let (r, w) = crate::sys::pipe().unwrap();
        send_with_fds(
            a.as_fd(),
            &Msg::Resources {
                cgroup_files: 1,
                workspace: false,
            },
            &[w.as_fd()],
        )
        .unwrap();
        drop(w);
        let (m, fds) = recv_with_fds(b.as_fd()).unwrap();
        assert_eq!(
            m,
            Some(Msg::Resources {
                cgroup_files: 1,
                workspace: false
            })
        );
        assert_eq!(fds.len(), 1);
        crate::sys::write_all_once(fds[0].as_fd(), b"x").unwrap();
        drop(fds);
        let mut byte = [0u8; 2];
        let n = nix::unistd::read(&r, &mut byte).unwrap();
        assert_eq!(
            (n, byte[0]),
            (1, b'x'),
            "the passed descriptor is the pipe's write end"
        );
        drop(a);
        assert_eq!(recv(b.as_fd()).unwrap(), None);
    }
}
