//! The typed messages between the launcher and the sandbox's pid 1, over a SOCK_SEQPACKET
//! socketpair (one message per packet, JSON). Failures cross as typed frames naming the stage
//! and errno, never as free text to be parsed.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Stage::JoinCgroup => "joining the cgroup",
            Stage::UnshareCgroupNs => "creating the cgroup namespace",
            Stage::WaitForParent => "waiting for the launcher",
            Stage::BecomeNsRoot => "switching to the namespace's setup identity",
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
        };
        f.write_str(s)
    }
}

/// One message.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Msg {
    /// Launcher → pid 1: the id maps are written, go on.
    Go,
    /// pid 1 → launcher: the agent was exec'ed. Stage timestamps are CLOCK_MONOTONIC ns.
    Started {
        agent_pid: i32,
        stages: Vec<(Stage, u64)>,
        landlock: String,
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
}

/// Largest frame accepted.
pub const MAX_FRAME: usize = 64 * 1024;

pub fn send(fd: BorrowedFd<'_>, msg: &Msg) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    // SAFETY: sending from a valid buffer on a valid socket; MSG_NOSIGNAL avoids SIGPIPE.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message; `None` when the peer closed its end.
pub fn recv(fd: BorrowedFd<'_>) -> io::Result<Option<Msg>> {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        // SAFETY: receiving into a buffer of the stated length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(None);
        }
        return serde_json::from_slice(&buf[..n as usize])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    }
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across the launcher and the sandbox).
pub fn now_ns() -> u64 {
    // SAFETY: zeroed timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
        drop(a);
        assert_eq!(recv(b.as_fd()).unwrap(), None);
    }
}
