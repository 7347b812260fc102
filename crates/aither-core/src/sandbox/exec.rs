//! `aither-init exec`: runs a command inside a running sandbox (like `runc exec` or
//! `nsenter`), for health checks and `aitherctl exec`. The command joins the agent's cgroups
//! and namespaces and is confined exactly as the agent is, by the same code (`init::confine`).
//!
//! Order, and why:
//! 1. Preflight on the host: the Landlock plan and the seccomp filter (its cache is a host
//!    file, invisible once in the sandbox's mount namespace).
//! 2. pidfd_open(pid 1): from here the sandbox cannot be swapped for another process.
//! 3. The agent's cgroups, before the namespaces (the cgroup namespace hides the host's
//!    hierarchy), so that the command counts against the agent's limits from its birth.
//!    With `tty` (`exec -t`), a new pty owned by the agent's host uid is made here, on the host,
//!    and relayed to this process's terminal streams (stdio.rs): the command never gets them.
//! 4. setgroups(0), then one setns(pidfd, every namespace): atomic, so there is never a
//!    half-joined state.
//! 5. fork (a pid namespace applies to children only). The child becomes the namespace's root,
//!    goes to the working directory, is confined (`init::confine`), enters `-w DIR` again as
//!    the confined agent (never a directory the agent could not enter) and execs; the parent
//!    waits (relaying the pty), killing it at the timeout.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::channel::{self, Msg, Stage};
use super::init::{self, At, Confinement, Failure};
use super::landlock::{self, LandlockError};
use super::seccomp::{self, SeccompError};
use super::spec::SandboxSpec;
use super::stdio::Relay;
use crate::cgroup::{self, CgroupError};
use crate::sys::{self, ExitStatus, Forked};

/// Errors of `exec_in`. The command's own failures are its exit status, not these.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("aither-init exec must run as root (it joins the sandbox's namespaces)")]
    NotRoot,
    #[error("no command given")]
    NoCommand,
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("the sandbox's pid 1 ({pid}) is not running: {source}")]
    NoSandbox {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} is in no Aither cgroup: not a sandbox's pid 1")]
    NotASandbox { pid: i32 },
    #[error("joining the agent's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("joining the sandbox's namespaces (setns): {0}")]
    Setns(#[source] io::Error),
    #[error("starting the command in the sandbox: {0}")]
    Fork(#[source] io::Error),
    #[error("talking to the command's setup: {0}")]
    Channel(#[source] io::Error),
    #[error("setup of the command failed while {stage} ({errname}): {detail}", errname = sys::errno_name(*.errno))]
    Setup {
        stage: Stage,
        errno: i32,
        detail: String,
    },
    #[error("{program}: command not found in the sandbox")]
    NotFound { program: String },
    #[error("{program}: cannot execute in the sandbox ({errname})", errname = sys::errno_name(*.errno))]
    NotExecutable { program: String, errno: i32 },
    #[error("the command did not finish within {0:?} and was killed")]
    TimedOut(Duration),
    #[error("reading the agent's host uid from /proc/{pid}/uid_map: {detail}")]
    AgentUid { pid: i32, detail: String },
    #[error("giving the command a terminal of its own: {0}")]
    Stdio(#[source] io::Error),
}

impl ExecError {
    /// The exit status of `aither-init exec`: 124 at the timeout (as timeout(1)), 126/127 as
    /// a shell, 125 for Aither's own errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExecError::TimedOut(_) => 124,
            ExecError::NotFound { .. } => 127,
            ExecError::NotExecutable { .. } => 126,
            _ => 125,
        }
    }
}

/// What the daemon writes on `aither-init exec`'s stdin.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExecConfig {
    /// The running agent's spec (as given to its shim).
    pub spec: SandboxSpec,
    /// Host pid of the sandbox's pid 1 (the shim's `started` event).
    pub pid1: i32,
    pub argv: Vec<String>,
    /// Killed (SIGKILL) after this long; `None` waits for ever.
    pub timeout_ms: Option<u64>,
    /// `KEY=VALUE` pairs on top of the agent's environment (`aitherctl exec --env`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// The command's working directory (relative: to the agent's); `None`: the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<std::path::PathBuf>,
    /// A new pty for the command, relayed to this process's terminal streams (`exec -t`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
}

impl ExecConfig {
    /// A command with the agent's environment and working directory.
    pub fn new(spec: SandboxSpec, pid1: i32, argv: Vec<String>, timeout: Option<Duration>) -> Self {
        ExecConfig {
            spec,
            pid1,
            argv,
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
            env: Vec::new(),
            cwd: None,
            tty: false,
        }
    }
}

/// Runs `argv` inside the running sandbox of `spec` whose pid 1 is host pid `pid1`, confined
/// as its agent, with this process's stdio. Returns the command's status.
///
/// The calling process must be single-threaded (setns into a user namespace and the fork
/// require it), and it stays in the sandbox's namespaces afterwards: call it from a process
/// that exits next, as `aither-init exec` does.
pub fn exec_in(cfg: &ExecConfig) -> Result<ExitStatus, ExecError> {
    let (spec, pid1, argv) = (&cfg.spec, cfg.pid1, &cfg.argv);
    let timeout = cfg.timeout_ms.map(Duration::from_millis);
    if !nix::unistd::geteuid().is_root() {
        return Err(ExecError::NotRoot);
    }
    if argv.is_empty() {
        return Err(ExecError::NoCommand);
    }
    // 1. Preflight, on the host: the filter's cache is a host file.
    let plan = landlock::plan(spec, landlock::kernel_abi())?;
    let filter = spec
        .seccomp_profile
        .as_deref()
        .map(seccomp::load)
        .transpose()?;

    // 2. Pin pid 1, then read its cgroups; it must still be alive after the read, or the
    // file may have described a recycled pid.
    let sandbox =
        sys::pidfd_open(pid1).map_err(|source| ExecError::NoSandbox { pid: pid1, source })?;
    let dirs = cgroup::aither_dirs_of(&cgroup::root(), pid1)?;
    // `-t`: the pty's owner, read from pid 1's uid_map under the same liveness check.
    let agent_uid = cfg
        .tty
        .then(|| agent_host_uid(pid1, spec.uid))
        .transpose()?;
    sys::pidfd_send_signal(sandbox.as_fd(), 0)
        .map_err(|source| ExecError::NoSandbox { pid: pid1, source })?;
    if dirs.is_empty() {
        return Err(ExecError::NotASandbox { pid: pid1 });
    }
    // 3. The cgroups before the namespaces: the cgroup namespace would hide the hierarchy.
    cgroup::join(&dirs)?;

    // 3b. `-t`: a new pty (and pipes) for the command, relayed to our streams, never handed
    // over (stdio.rs, as for `aitherctl run`): made on the host, owned by the agent's host uid.
    let mut relay = match agent_uid {
        Some(uid) => Relay::new(uid).map_err(ExecError::Stdio)?,
        None => None,
    };

    // 4. Our supplementary groups would survive into the sandbox (its `setgroups deny` forbids
    // dropping them inside), so they go first.
    nix::unistd::setgroups(&[]).map_err(|e| ExecError::Setns(e.into()))?;
    // This process gains capabilities in the sandbox's user namespace: non-dumpable before
    // that, so nothing in there can ptrace it or read its memory.
    sys::prctl(libc::PR_SET_DUMPABLE, 0).map_err(ExecError::Setns)?;
    sys::setns(sandbox.as_fd(), namespaces(spec)).map_err(ExecError::Setns)?;

    // 5. Fork into the pid namespace; the channel reports a failed setup with its stage.
    let (parent_sock, child_sock) = sys::seqpacket_pair().map_err(ExecError::Channel)?;
    // SAFETY: aither-init is single-threaded (documented requirement of exec_in).
    let forked = unsafe { sys::clone3_fork(0, None) }.map_err(ExecError::Fork)?;
    let child = match forked {
        Forked::Child => {
            drop(parent_sock);
            drop(sandbox);
            let conf = Confinement {
                spec,
                landlock: &plan,
                filter: filter.as_ref(),
                ctty: relay.as_ref().and_then(Relay::ctty),
            };
            let stdio = relay.as_mut().and_then(Relay::take_agent);
            child(&conf, cfg, stdio, child_sock)
        }
        Forked::Parent { pidfd, .. } => pidfd,
    };
    drop(child_sock);
    // The command's ends of the relay close here; our terminal goes raw now that the pty has
    // its settings (restored when `relay` drops, on every return path).
    if let Some(r) = relay.as_mut() {
        if let Err(e) = r.started() {
            let _ = sys::pidfd_send_signal(child.as_fd(), libc::SIGKILL);
            let _ = sys::wait_pidfd(child.as_fd());
            return Err(ExecError::Stdio(e));
        }
    }
    wait(child.as_fd(), parent_sock.as_fd(), timeout, relay.as_mut())
}

/// The host uid that `inside` maps to in pid 1's user namespace (its uid_map).
fn agent_host_uid(pid1: i32, inside: u32) -> Result<u32, ExecError> {
    let err = |detail: String| ExecError::AgentUid { pid: pid1, detail };
    let map =
        std::fs::read_to_string(format!("/proc/{pid1}/uid_map")).map_err(|e| err(e.to_string()))?;
    host_id(&map, inside).ok_or_else(|| err(format!("uid {inside} is not mapped")))
}

/// The outside id of `inside` in an id map's text (`inside outside count` per line).
fn host_id(map: &str, inside: u32) -> Option<u32> {
    map.lines().find_map(|l| {
        let v: Vec<u32> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match v[..] {
            [start, host, len] if (start..start.saturating_add(len)).contains(&inside) => {
                host.checked_add(inside - start)
            }
            _ => None,
        }
    })
}

/// The namespaces the launcher created for `spec` (the cgroup one by pid 1 itself).
fn namespaces(spec: &SandboxSpec) -> libc::c_int {
    let mut flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID;
    for (on, f) in [
        (spec.new_net_ns, libc::CLONE_NEWNET),
        (spec.new_ipc_ns, libc::CLONE_NEWIPC),
        (spec.new_uts_ns, libc::CLONE_NEWUTS),
        (spec.new_cgroup_ns, libc::CLONE_NEWCGROUP),
    ] {
        if on {
            flags |= f;
        }
    }
    flags
}

/// The forked command: confined like the agent, then exec'd. Never returns.
fn child(
    conf: &Confinement<'_>,
    cfg: &ExecConfig,
    stdio: Option<[OwnedFd; 3]>,
    sock: OwnedFd,
) -> ! {
    let code = match prepare_and_exec(conf, cfg, stdio, sock.as_fd()) {
        Ok(msg) => {
            let code = match &msg {
                Msg::NotFound { .. } => 127,
                _ => 126,
            };
            let _ = channel::send(sock.as_fd(), &msg);
            code
        }
        Err(f) => {
            let _ = channel::send(sock.as_fd(), &f.into_msg());
            125
        }
    };
    // Raw: nix 0.30 has no _exit (std's exit would run the parent's atexit handlers here).
    // SAFETY: _exit without running the parent's destructors in this copy of it.
    unsafe { libc::_exit(code) }
}

/// Returns only on failure: the message to report (NotFound or NotExecutable) or the stage.
fn prepare_and_exec(
    conf: &Confinement<'_>,
    cfg: &ExecConfig,
    stdio: Option<[OwnedFd; 3]>,
    sock: BorrowedFd<'_>,
) -> Result<Msg, Failure> {
    let (spec, argv) = (conf.spec, &cfg.argv);
    // `-t`: the relay's ends replace our 0–2 (the caller's streams, never the command's).
    if let Some(stdio) = stdio {
        for (target, fd) in stdio.into_iter().enumerate() {
            let _ = sys::place_fd(fd, target as i32)
                .at(Stage::CloseFds)?
                .into_raw_fd();
        }
    }
    // The namespace's root identity first, as pid 1 had while it set up the agent.
    init::become_ns_root().at(Stage::BecomeNsRoot)?;
    // The agent's working directory, entered with the setup identity as pid 1 entered it.
    std::env::set_current_dir(&spec.cwd).at(Stage::Mounts)?;
    // `-w DIR`: entered now, so that a relative command resolves from it, and entered again
    // below as the confined agent, so that the command is never in a directory the agent
    // itself could not enter.
    let cwd = cfg.cwd.as_ref().map(|c| spec.cwd.join(c));
    if let Some(c) = &cwd {
        std::env::set_current_dir(c).at(Stage::WorkingDir)?;
    }
    let extra: Vec<(&str, &str)> = cfg.env.iter().filter_map(|kv| kv.split_once('=')).collect();
    let mut stamps = Vec::new();
    let Some(p) = init::confine(conf, sock, &[], argv, &extra, &mut stamps)? else {
        return Ok(Msg::NotFound {
            program: argv[0].clone(),
        });
    };
    if let Some(c) = &cwd {
        std::env::set_current_dir(c).at(Stage::WorkingDir)?;
    }
    // Default dispositions and an empty mask, as the agent gets (Rust ignores SIGPIPE).
    init::reset_signals();
    // A fork of the single-threaded `aither-init exec`: nix's execve may allocate its pointer
    // arrays here. It returns only on failure.
    let Err(e) = nix::unistd::execve(&p.path, &p.argv, &p.envp);
    Ok(Msg::NotExecutable {
        program: p.program.display().to_string(),
        errno: e as i32,
    })
}

/// How often an `exec -t` command's pty takes the caller's window size.
const WINSIZE_POLL: Duration = Duration::from_millis(200);

/// Waits for the command; SIGKILL at the timeout. A setup failure reported on `sock` wins
/// over the exit status it caused.
fn wait(
    child: BorrowedFd<'_>,
    sock: BorrowedFd<'_>,
    timeout: Option<Duration>,
    mut relay: Option<&mut Relay>,
) -> Result<ExitStatus, ExecError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut failure: Option<ExecError> = None;
    let mut sock_open = true;
    let mut last_winch = Instant::now();
    loop {
        let mut ms = deadline.map_or(-1, |d| {
            d.saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32
        });
        if let Some(r) = relay.as_deref() {
            // The caller's SIGWINCH goes to aitherctl, not to us: the pty takes the caller's
            // size every WINSIZE_POLL instead (the kernel signals the command only on a
            // change).
            if last_winch.elapsed() >= WINSIZE_POLL {
                r.winch();
                last_winch = Instant::now();
            }
            let poll = WINSIZE_POLL.as_millis() as i32;
            ms = if ms < 0 { poll } else { ms.min(poll) };
        }
        let mut fds = vec![
            libc::pollfd {
                fd: child.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if sock_open { sock.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // The relay's entries after the two fixed ones.
        fds.extend(relay.as_ref().map(|r| r.pollfds()).unwrap_or_default());
        // Raw: a closed channel's entry, and an idle relay pump's, has a negative fd, which
        // nix's PollFd (a BorrowedFd) cannot hold.
        // SAFETY: valid pollfd entries (a negative fd is skipped).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            continue;
        }
        if let Some(r) = relay.as_deref_mut() {
            r.step(&fds[2..]);
        }
        if fds[1].revents != 0 {
            match channel::recv(sock) {
                Ok(Some(m)) => failure = Some(to_error(m)),
                Ok(None) | Err(_) => sock_open = false,
            }
        }
        if fds[0].revents != 0 {
            let st = sys::wait_pidfd(child).map_err(ExecError::Fork)?;
            // What the command wrote and the caller has not got yet.
            if let Some(r) = relay.as_deref_mut() {
                r.drain();
            }
            if failure.is_none() && sock_open {
                if let Ok(Some(m)) = channel::recv(sock) {
                    failure = Some(to_error(m));
                }
            }
            return failure.map_or(Ok(st), Err);
        }
        if let (Some(t), Some(d)) = (timeout, deadline) {
            if Instant::now() >= d {
                // SIGKILL to the command only: what it started is reparented to the sandbox's
                // pid 1 and counted in the agent's cgroup, like the agent's own children.
                let _ = sys::pidfd_send_signal(child, libc::SIGKILL);
                let _ = sys::wait_pidfd(child);
                return Err(ExecError::TimedOut(t));
            }
        }
    }
}

fn to_error(m: Msg) -> ExecError {
    match m {
        Msg::Failed {
            stage,
            errno,
            detail,
        } => ExecError::Setup {
            stage,
            errno,
            detail,
        },
        Msg::NotFound { program } => ExecError::NotFound { program },
        Msg::NotExecutable { program, errno } => ExecError::NotExecutable { program, errno },
        other => ExecError::Channel(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected message {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::host_id;

    #[test]
    fn the_agents_host_uid_comes_from_its_line_of_the_map() {
        // As the launcher writes it (userns::map_text): the setup id, then the agent.
        let map = "         0 1879048192          1\n      1000 1879048193          1\n";
        assert_eq!(host_id(map, 1000), Some(1_879_048_193));
        assert_eq!(host_id(map, 0), Some(1_879_048_192));
        assert_eq!(host_id(map, 1001), None);
        assert_eq!(host_id("0 100 65536\n", 1000), Some(1100));
        assert_eq!(host_id("garbage\n", 0), None);
    }
}
