//! The sandbox's pid 1 (aither-init's role): finishes the setup inside the new namespaces in a
//! fixed order, forks the agent, then reaps and forwards signals until the agent ends.
//!
//! This runs in a fork of the single-threaded launcher, so it may allocate; it never returns
//! (it `_exit`s), so no destructor of the launcher's state runs twice.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};

use super::channel::{self, now_ns, Msg, Stage};
use super::landlock::{self, Plan};
use super::seccomp::{self, Filter};
use super::spec::SandboxSpec;
use super::{caps, mounts, rlimits};
use crate::policy::NetworkMode;
use crate::sys::{self, ExitStatus};

/// What the launcher hands to the sandbox's pid 1.
pub(crate) struct ChildContext<'a> {
    pub spec: &'a SandboxSpec,
    pub etc_skeleton: Option<mounts::EtcSkeleton>,
    pub filter: Option<Filter>,
    pub landlock: Plan,
    /// The agent's stdin, stdout and stderr (supervised mode); `None` keeps the launcher's.
    pub stdio: Option<[OwnedFd; 3]>,
    /// A socket handed to the agent as fd 3 (supervised mode), with `AITHER_FD=3`.
    pub agent_fd: Option<OwnedFd>,
    /// Which of the agent's fds 0–2 is its pty (stdio.rs): made the controlling terminal of
    /// the sandbox's session.
    pub ctty: Option<RawFd>,
    /// A prepared sandbox (`launch::prepare`): `spec` is the template. pid 1 stops after the
    /// cgroup join with the root still writable, reports `Ready`, and takes the final spec,
    /// the agent's stdio and the workspace mount from a `Final` message.
    pub pooled: bool,
}

/// The descriptor number the agent finds its supervisor's socket at.
pub(crate) const AGENT_FD: RawFd = 3;

pub(crate) struct Failure {
    pub stage: Stage,
    pub errno: i32,
    pub detail: String,
}

impl Failure {
    /// The message pid 1 (or an exec'd command's setup) reports to its parent.
    pub(crate) fn into_msg(self) -> Msg {
        Msg::Failed {
            stage: self.stage,
            errno: self.errno,
            detail: self.detail,
        }
    }
}

enum Resolved {
    Program(PathBuf),
    NotFound,
}

pub(crate) trait At<T> {
    fn at(self, stage: Stage) -> Result<T, Failure>;
}

impl<T> At<T> for io::Result<T> {
    fn at(self, stage: Stage) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            stage,
            errno: sys::errno_of(&e),
            detail: e.to_string(),
        })
    }
}

/// uid/gid 0 of the sandbox's user namespace (a non-root host id), gid first.
pub(crate) fn become_ns_root() -> io::Result<()> {
    Ok(set_ids(0, 0)?)
}

/// setresgid then setresuid, all three ids each.
fn set_ids(uid: u32, gid: u32) -> nix::Result<()> {
    use nix::unistd::{setresgid, setresuid, Gid, Uid};
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setresgid(g, g, g)?;
    setresuid(u, u, u)
}

/// Entry point in the forked child. Never returns.
/// `sock` is owned here, outside the context, so that it is still open when a failure is
/// reported (a failed stage must reach the launcher with its cause).
pub(crate) fn run(ctx: ChildContext<'_>, sock: OwnedFd) -> ! {
    // A supervised agent gets fds 0–3 replaced later (`place_agent_fds`): the channel moves
    // above them now, before anything could need to report through it.
    let sock = if (ctx.stdio.is_some() || ctx.agent_fd.is_some() || ctx.pooled)
        && sock.as_raw_fd() <= AGENT_FD
    {
        match sys::dup_above(sock.as_fd(), AGENT_FD + 1) {
            Ok(moved) => moved,
            // Raw: nix 0.30 has no _exit (std's exit would run the launcher's atexit handlers).
            // SAFETY: _exit without the launcher's destructors; the launcher sees EOF.
            Err(_) => unsafe { libc::_exit(125) },
        }
    } else {
        sock
    };
    let code = match setup_and_reap(ctx, sock.as_fd()) {
        Ok(code) => code,
        Err(f) => {
            let fd = sock.as_fd();
            let msg = if f.stage == Stage::WaitForParent {
                None
            } else {
                Some(f.into_msg())
            };
            if let Some(m) = msg {
                let _ = channel::send(fd, &m);
            }
            125
        }
    };
    // Raw: nix 0.30 has no _exit (as above).
    // SAFETY: _exit ends the process without running the launcher's destructors.
    unsafe { libc::_exit(code) }
}

fn setup_and_reap(
    mut ctx: ChildContext<'_>,
    sock: std::os::fd::BorrowedFd<'_>,
) -> Result<i32, Failure> {
    let template = ctx.spec;
    let spec = template;
    let mut stamps: Vec<(Stage, u64)> = Vec::with_capacity(24);
    let done = |s: Stage, stamps: &mut Vec<(Stage, u64)>| stamps.push((s, now_ns()));

    // While the launcher writes the maps (this needs nothing of them): this process is a fork
    // of aitherctl, and its argv and environment would be /proc/1/cmdline and /proc/1/environ
    // for everything in the sandbox.
    hide_launcher_args().at(Stage::HideLauncherArgs)?;
    // Nothing privileged can happen until the launcher has written our uid/gid maps.
    match channel::recv(sock).at(Stage::WaitForParent)? {
        Some(Msg::Go) => {}
        _ => return Err(launcher_went_away(Stage::WaitForParent)),
    }
    done(Stage::WaitForParent, &mut stamps);
    // Become uid/gid 0 of the namespace (a non-root host id): files created on the root tmpfs
    // need an owner the namespace maps.
    become_ns_root().at(Stage::BecomeNsRoot)?;

    // The view is built (and the host's root detached) while the launcher creates the cgroup
    // and id-maps the workspace (≈0.5 ms here): they arrive afterwards as descriptors.
    let mount_failure = |e: mounts::MountError| Failure {
        stage: Stage::Mounts,
        errno: sys::errno_of(&e.source),
        detail: e.to_string(),
    };
    let old_root = mounts::build_view(spec, ctx.etc_skeleton.as_ref()).map_err(mount_failure)?;
    done(Stage::Mounts, &mut stamps);
    // Loopback and hostname while the old root is being detached and the launcher prepares
    // the cgroup: they configure pid 1's own new namespaces, which nothing of the agent can use
    // before the cgroup join below.
    if spec.new_net_ns && spec.network != NetworkMode::Host {
        loopback_up().at(Stage::Loopback)?;
    }
    if spec.new_uts_ns {
        nix::unistd::sethostname(&spec.hostname)
            .map_err(io::Error::from)
            .at(Stage::Hostname)?;
    }
    let (msg, mut fds) = channel::recv_with_fds(sock).at(Stage::WaitForParent)?;
    let Some(Msg::Resources {
        cgroup_files,
        workspace,
    }) = msg
    else {
        return Err(launcher_went_away(Stage::JoinCgroup));
    };
    if fds.len() != cgroup_files + usize::from(workspace) {
        return Err(Failure {
            stage: Stage::JoinCgroup,
            errno: libc::EPROTO,
            detail: format!(
                "expected {} descriptors, got {}",
                cgroup_files + usize::from(workspace),
                fds.len()
            ),
        });
    }
    let mut ws_mount = if workspace { fds.pop() } else { None };
    // The host's root is gone before the cgroup join: that moves only the calling thread, so
    // the detaching one must have ended. A prepared sandbox keeps its root writable until its
    // finish (the final workspace's stubs, the hostname files), and read-only before the agent.
    if ctx.pooled {
        old_root.release_writable().map_err(mount_failure)?;
    } else {
        old_root.release().map_err(mount_failure)?;
    }
    // Join the v1 cgroups (a cgroup2 one was entered at clone3) before anything the agent
    // does. We are single-threaded, so moving this thread (`tasks`) moves the whole process.
    for fd in &fds {
        sys::write_all_once(fd.as_fd(), b"0").at(Stage::JoinCgroup)?;
    }
    drop(fds);
    done(Stage::JoinCgroup, &mut stamps);
    // The cgroup namespace is created after joining, so its root is the sandbox's own cgroup
    // (/proc/self/cgroup reads "/" and the host's hierarchy is hidden).
    if spec.new_cgroup_ns {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
            .map_err(io::Error::from)
            .at(Stage::UnshareCgroupNs)?;
    }
    // A prepared sandbox waits here, everything caller-independent done, for its final spec.
    let final_spec = if ctx.pooled {
        let _ = channel::send(sock, &Msg::Ready { stages: stamps });
        // The stamps from here on are the finish's (the trace of `Prepared::finish`).
        stamps = Vec::with_capacity(24);
        let (spec, ws) = receive_final(sock, &mut ctx)?;
        done(Stage::FinalSpec, &mut stamps);
        finish_view(template, &spec).map_err(|f| match f {
            Ok(e) => mount_failure(e),
            Err(f) => f,
        })?;
        done(Stage::FinishView, &mut stamps);
        ws_mount = ws;
        Some(spec)
    } else {
        None
    };
    let spec: &SandboxSpec = final_spec.as_deref().unwrap_or(template);
    mounts::finish(spec, ws_mount.as_ref()).map_err(mount_failure)?;
    drop(ws_mount);

    // The supervised agent's stdio and socket take their numbers now, before the descriptor
    // sweep (which keeps exactly them), and after the view is final (nothing left needs fds).
    let agent_fd = place_agent_fds(ctx.stdio, ctx.agent_fd).at(Stage::CloseFds)?;
    // Named so that `ps` on the host tells sandboxes apart from aitherctl itself.
    let _ = sys::prctl(libc::PR_SET_NAME, c"aither-init".as_ptr() as libc::c_ulong);
    let fd_env = AGENT_FD.to_string();
    let (keep, extra_env): (&[RawFd], Vec<(&str, &str)>) = if agent_fd.is_some() {
        (&[AGENT_FD], vec![("AITHER_FD", fd_env.as_str())])
    } else {
        (&[], Vec::new())
    };
    let confinement = Confinement {
        spec,
        landlock: &ctx.landlock,
        filter: ctx.filter.as_ref(),
        ctty: ctx.ctty,
    };
    let Some(prepared) = confine(
        &confinement,
        sock,
        keep,
        &spec.argv,
        &extra_env,
        &mut stamps,
    )?
    else {
        let _ = channel::send(
            sock,
            &Msg::NotFound {
                program: spec.argv[0].clone(),
            },
        );
        return Ok(127);
    };
    reap(sock, &prepared, agent_fd, stamps, spec.report)
}

/// A prepared sandbox's pid 1: the `Final` message (the final spec, the agent's stdio, the
/// workspace mount when there is one). EOF (the launcher gave the sandbox up) ends pid 1
/// quietly; anything else than a well-formed `Final` is a protocol failure.
fn receive_final(
    sock: BorrowedFd<'_>,
    ctx: &mut ChildContext<'_>,
) -> Result<(Box<SandboxSpec>, Option<OwnedFd>), Failure> {
    let (msg, mut fds) = channel::recv_large_with_fds(sock).at(Stage::FinalSpec)?;
    let Some(Msg::Final {
        spec,
        ctty,
        workspace,
        agent_fd,
    }) = msg
    else {
        // Reported as WaitForParent: nothing is sent back to a launcher that went away.
        return Err(launcher_went_away(Stage::WaitForParent));
    };
    let expected = 3 + usize::from(workspace) + usize::from(agent_fd);
    if fds.len() != expected || ctty.is_some_and(|c| !(0..3).contains(&c)) {
        return Err(Failure {
            stage: Stage::FinalSpec,
            errno: libc::EPROTO,
            detail: format!("expected {expected} descriptors, got {}", fds.len()),
        });
    }
    // In the order sent: stdio, the workspace, the agent's socket.
    ctx.agent_fd = if agent_fd { fds.pop() } else { None };
    let ws = if workspace { fds.pop() } else { None };
    let [a, b, c]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| launcher_went_away(Stage::FinalSpec))?;
    ctx.stdio = Some([a, b, c]);
    ctx.ctty = ctty;
    Ok((spec, ws))
}

/// A prepared sandbox's view, finished for the final spec before the root turns read-only:
/// the workspace's stub directories (the template had no workspace), the hostname (the UTS
/// namespace and, when it differs from the template's, /etc/hostname and /etc/hosts).
/// `Ok(MountError)` and `Err(Failure)` as errors.
fn finish_view(
    template: &SandboxSpec,
    spec: &SandboxSpec,
) -> Result<(), Result<mounts::MountError, Failure>> {
    mounts::workspace_stub(spec).map_err(Ok)?;
    if spec.new_uts_ns && spec.hostname != template.hostname {
        nix::unistd::sethostname(&spec.hostname)
            .map_err(io::Error::from)
            .at(Stage::Hostname)
            .map_err(Err)?;
        mounts::replace_hostname_files(spec).map_err(Ok)?;
    }
    // Last: from here on the agent's root is read-only, as in a cold launch.
    mounts::root_read_only().map_err(Ok)
}

/// Puts the supervised agent's stdio on 0–2 and its socket on fd 3 (not close-on-exec), in
/// pid 1, whose children (the agent) inherit them. Returns pid 1's handle on fd 3, closed once
/// the agent has it. The channel to the launcher was moved above fd 3 first (`run`).
fn place_agent_fds(
    stdio: Option<[OwnedFd; 3]>,
    agent_fd: Option<OwnedFd>,
) -> io::Result<Option<OwnedFd>> {
    if let Some(stdio) = stdio {
        for (target, fd) in stdio.into_iter().enumerate() {
            // From here on fds 0–2 are pid 1's standard streams for the rest of its life.
            let _ = sys::place_fd(fd, target as RawFd)?.into_raw_fd();
        }
    }
    agent_fd.map(|fd| sys::place_fd(fd, AGENT_FD)).transpose()
}

/// What an agent is confined by. The agent (through pid 1) and a command `exec`'d into a
/// running sandbox (exec.rs) go through the same `confine`, so both get exactly the same
/// restrictions in the same order.
pub(crate) struct Confinement<'a> {
    pub spec: &'a SandboxSpec,
    pub landlock: &'a Plan,
    pub filter: Option<&'a Filter>,
    /// The descriptor (0–2) to make the new session's controlling terminal: the sandbox's own
    /// pty, never the caller's terminal (which the agent never gets, stdio.rs).
    pub ctty: Option<RawFd>,
}

/// A program ready for execve.
pub(crate) struct Prepared {
    pub path: CString,
    pub program: PathBuf,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// The Landlock status, for the trace.
    pub landlock: String,
}

/// Confines the calling process as the agent, from rlimits to seccomp, inside the sandbox's
/// namespaces and with the namespace's root identity. `sock` is the channel to the parent
/// (kept open, as are 0–2 and `keep`; every other descriptor is closed). Returns `None` when
/// the command does not exist (then seccomp is not installed and the caller reports it).
pub(crate) fn confine(
    c: &Confinement<'_>,
    sock: BorrowedFd<'_>,
    keep: &[RawFd],
    argv: &[String],
    extra_env: &[(&str, &str)],
    stamps: &mut Vec<(Stage, u64)>,
) -> Result<Option<Prepared>, Failure> {
    let spec = c.spec;
    let done = |s: Stage, stamps: &mut Vec<(Stage, u64)>| stamps.push((s, now_ns()));
    // rlimits while still privileged in the namespace: hard limits can only be lowered later.
    rlimits::apply(spec)
        .and_then(|()| injected_fault(Stage::Rlimits))
        .at(Stage::Rlimits)?;
    // A new session without a controlling terminal: TIOCSTI on the caller's terminal needs it
    // to be our controlling tty (CVE-2017-5226), and terminal signals reach us via the launcher.
    nix::unistd::setsid()
        .map_err(io::Error::from)
        .at(Stage::NewSession)?;
    // The sandbox's pty as its controlling terminal, so that ^C and the window size reach the
    // agent through its own line discipline. Right after setsid (a session leader without a
    // terminal is what TIOCSCTTY needs).
    if let Some(fd) = c.ctty {
        // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal).
        unsafe { tiocsctty(fd, 0) }
            .map_err(io::Error::from)
            .at(Stage::NewSession)?;
    }
    // No inherited descriptor but the channel (and the agent's own) may survive: a leaked host
    // fd (a directory, a cgroup file) is a way out of the mount namespace (runc CVE-2024-21626).
    let mut kept: Vec<RawFd> = keep.to_vec();
    kept.push(sock.as_raw_fd());
    close_fds_except(&kept).at(Stage::CloseFds)?;
    // Each stamp names the last step it closes (the trace prints the time since the previous).
    done(Stage::CloseFds, stamps);
    // The bounding set needs CAP_SETPCAP, so it goes before the uid switch.
    caps::drop_bounding().at(Stage::DropBoundingCaps)?;
    caps::clear_ambient().at(Stage::DropBoundingCaps)?;
    // Leaving uid 0 empties the permitted and effective sets (no KEEPCAPS).
    set_ids(spec.uid, spec.gid)
        .map_err(io::Error::from)
        .at(Stage::SetAgentIds)?;
    caps::clear_all().at(Stage::ClearCaps)?;
    // Non-dumpable: the agent can neither ptrace us nor open /proc/1/mem or /proc/1/environ
    // (runc CVE-2019-5736). After the credential change, which resets dumpable to
    // fs.suid_dumpable (1 on some hosts). The agent, after execve, is dumpable as usual.
    sys::prctl(libc::PR_SET_DUMPABLE, 0).at(Stage::NotDumpable)?;
    // After the credential change (which clears it): die with the launcher, never orphaned.
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)
        .at(Stage::ParentDeathSignal)?;
    if launcher_gone(sock) {
        return Err(Failure {
            stage: Stage::ParentDeathSignal,
            errno: libc::EPIPE,
            detail: "launcher went away".into(),
        });
    }
    done(Stage::ParentDeathSignal, stamps);
    // no_new_privs before Landlock and seccomp: both require it without CAP_SYS_ADMIN, and it
    // makes setuid binaries inert.
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).at(Stage::NoNewPrivs)?;
    // Landlock after the mount view is final (its rules name paths of that view) and before
    // seccomp (whose allowlist would not let us build a ruleset with every call we need).
    let ll = landlock::enforce(spec, c.landlock).map_err(|e| Failure {
        stage: Stage::Landlock,
        errno: libc::EPERM,
        detail: e.to_string(),
    })?;
    done(Stage::Landlock, stamps);

    // Resolved under Landlock, as the agent: what it cannot see cannot be run.
    let program = match resolve(&argv[0], &spec.env, &spec.cwd).at(Stage::ResolveCommand)? {
        Resolved::Program(p) => p,
        Resolved::NotFound => return Ok(None),
    };
    let argv = cstrings(argv.iter().map(String::as_str)).at(Stage::ResolveCommand)?;
    let env: Vec<String> = spec
        .env
        .iter()
        .filter(|(k, _)| !extra_env.iter().any(|(x, _)| x == k))
        .map(|(k, v)| format!("{k}={v}"))
        .chain(extra_env.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    let envp = cstrings(env.iter().map(String::as_str)).at(Stage::ResolveCommand)?;
    let path = sys::cstr(&program).at(Stage::ResolveCommand)?;

    // Seccomp last: from here on only the allowlist is available, and what remains is
    // fork, exec, wait and signal forwarding.
    if let Some(f) = c.filter {
        seccomp::install(f).map_err(|e| Failure {
            stage: Stage::Seccomp,
            errno: libc::EPERM,
            detail: e.to_string(),
        })?;
    }
    done(Stage::Seccomp, stamps);
    Ok(Some(Prepared {
        path,
        program,
        argv,
        envp,
        landlock: format!("{ll:?}"),
    }))
}

/// Closes every descriptor from 3 up except those in `keep`.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd >= 3)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for k in keep {
        sys::close_range(first, k.saturating_sub(1), 0)?;
        first = k + 1;
    }
    sys::close_range(first, u32::MAX, 0)
}

/// The name /proc/1/cmdline shows.
const PID1_NAME: &[u8] = b"aither-init\0";

/// Overwrites the launcher's argv and environment strings in this process's memory (the
/// kernel reads /proc/PID/cmdline and /proc/PID/environ from there: `--token` text, `--env`
/// values, the caller's environment), leaving `aither-init` as the command line and an
/// environment of NUL bytes. The environment this process itself still reads (test knobs) is
/// copied out first. Costs one read of /proc/self/stat and two memsets (≈20 µs), while the
/// launcher writes the id maps.
fn hide_launcher_args() -> io::Result<()> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may contain anything, so after the last ')'):
    // field 3 (state) is the first; arg_start..env_end are fields 48–51 (proc(5)).
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| io::Error::other("/proc/self/stat: no ')'"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> io::Result<usize> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other(format!("/proc/self/stat: field {n} missing")))
    };
    let (arg_start, arg_end) = (field(48)?, field(49)?);
    let (env_start, env_end) = (field(50)?, field(51)?);
    if arg_end < arg_start || env_end < env_start {
        return Err(io::Error::other("/proc/self/stat: bad argv/environ bounds"));
    }
    // The environment moves to memory of its own (setenv copies) before its strings go.
    let env: Vec<_> = std::env::vars_os().collect();
    // SAFETY: single-threaded (a fork of the single-threaded launcher); clearenv only resets
    // libc's `environ`, which nothing holds a reference into across this call.
    // (libc's clearenv cannot fail; its result was never read.)
    let _ = unsafe { nix::env::clearenv() };
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    // SAFETY: [env_start, env_end) and [arg_start, arg_end) are this process's own argv and
    // environment strings, mapped and writable (the kernel put them on the initial stack).
    // Nothing reads them any more: the environment was copied out above, and std's argv
    // pointers (std::env::args) are never used by pid 1.
    unsafe {
        std::ptr::write_bytes(env_start as *mut u8, 0, env_end - env_start);
        let len = arg_end - arg_start;
        std::ptr::write_bytes(arg_start as *mut u8, 0, len);
        let n = PID1_NAME.len().min(len);
        std::ptr::copy_nonoverlapping(PID1_NAME.as_ptr(), arg_start as *mut u8, n);
        // A non-NUL last byte makes the kernel read the command line as a title (up to its
        // first NUL, setproctitle(3) semantics) instead of the whole area of NULs.
        if len > PID1_NAME.len() {
            *((arg_end - 1) as *mut u8) = b' ';
        }
    }
    Ok(())
}

/// Test builds only: `AITHER_TEST_FAIL_STAGE=Rlimits` makes that stage fail with EPERM, so
/// that the report of a failing stage can be tested end to end. Compiled out of release builds.
fn injected_fault(stage: Stage) -> io::Result<()> {
    if crate::testhooks::var("AITHER_TEST_FAIL_STAGE").is_some_and(|v| v == format!("{stage:?}")) {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

fn launcher_went_away(stage: Stage) -> Failure {
    Failure {
        stage,
        errno: libc::EPIPE,
        detail: "launcher went away".into(),
    }
}

fn launcher_gone(sock: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut p = [PollFd::new(sock, PollFlags::POLLIN)];
    let n = poll(&mut p, PollTimeout::ZERO).unwrap_or(0);
    n > 0
        && p[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

fn cstrings<'a>(it: impl Iterator<Item = &'a str>) -> io::Result<Vec<CString>> {
    it.map(|s| {
        CString::new(s).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte")
        })
    })
    .collect()
}

/// Finds the program as execvp would, in the sandbox's own view and PATH.
fn resolve(name: &str, env: &[(String, String)], cwd: &Path) -> io::Result<Resolved> {
    if name.contains('/') {
        let p = cwd.join(name);
        return Ok(if p.exists() {
            Resolved::Program(p)
        } else {
            Resolved::NotFound
        });
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/bin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(name);
        if let Ok(m) = std::fs::metadata(&p) {
            if !m.is_dir() {
                return Ok(Resolved::Program(p));
            }
        }
    }
    Ok(Resolved::NotFound)
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Brings up `lo` in the new network namespace (it starts down).
pub(crate) fn loopback_up() -> io::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    let s = nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq of the right size.
    unsafe { siocgifflags(s.as_raw_fd(), &mut req) }?;
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above.
    unsafe { siocsifflags(s.as_raw_fd(), &req) }?;
    Ok(())
}

nix::ioctl_read_bad!(siocgifflags, libc::SIOCGIFFLAGS, IfReq);
nix::ioctl_write_ptr_bad!(siocsifflags, libc::SIOCSIFFLAGS, IfReq);
nix::ioctl_write_int_bad!(tiocsctty, libc::TIOCSCTTY);

struct ExecRequest {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    errfd: libc::c_int,
}

/// The agent's first instructions (in a CLONE_VM child: async-signal-safe calls only).
extern "C" fn exec_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ExecRequest that the suspended parent keeps alive.
    let req = unsafe { &*(arg as *const ExecRequest) };
    // The agent gets default dispositions and an empty mask: the launcher ignored SIGPIPE and
    // pid 1 blocks everything, and both would survive execve.
    reset_signals();
    // Raw, to the end: nix's execve builds its pointer arrays on the heap (this child may not
    // allocate), and nix has no _exit.
    // SAFETY: execve is async-signal-safe; the pointers stay valid while the parent waits.
    unsafe { libc::execve(req.path, req.argv, req.envp) };
    // SAFETY: errno location of this task; write and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(req.errfd, (&errno as *const libc::c_int).cast(), 4);
        libc::_exit(127)
    }
}

/// Default dispositions for every signal and an empty mask (both survive execve).
/// Async-signal-safe: used in the CLONE_VM child that becomes the agent.
pub(crate) fn reset_signals() {
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // Raw: nix's signal takes its Signal enum, which has no realtime signals (34–64).
            // SAFETY: resetting a disposition is async-signal-safe.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // An empty set on our stack; sigprocmask is async-signal-safe (no allocation in nix's).
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Forks the agent and stays as its reaper. Returns pid 1's own exit code.
fn reap(
    sock: BorrowedFd<'_>,
    prepared: &Prepared,
    agent_fd: Option<OwnedFd>,
    mut stamps: Vec<(Stage, u64)>,
    report: bool,
) -> Result<i32, Failure> {
    let Prepared {
        path,
        program,
        argv,
        envp,
        landlock,
    } = prepared;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let (exec_r, exec_w) = sys::pipe().at(Stage::ForkAgent)?;

    // Block every signal before fork, so none is lost between fork and the wait loop.
    let all = SigSet::all();
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&all), None);
    // vfork-style (CLONE_VM | CLONE_VFORK, as posix_spawn does): no copy of the address
    // space, and pid 1 sleeps until the agent has exec'ed or failed.
    let mut req = ExecRequest {
        path: path.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        errfd: exec_w.as_raw_fd(),
    };
    // Uninitialised capacity: only the pages the child actually uses get faulted in.
    let mut stack: Vec<u8> = Vec::with_capacity(32 * 1024);
    // SAFETY: the stack grows down from the end of the allocation and outlives the child's use
    // of it (CLONE_VFORK suspends us until the child execs or exits).
    let top = unsafe { stack.as_mut_ptr().add(stack.capacity()) } as *mut libc::c_void;
    // Raw: nix's clone takes a boxed closure and allocates; this child runs on a vfork'd
    // stack and may only make async-signal-safe calls.
    // SAFETY: `exec_child` only makes async-signal-safe calls on data that stays valid while we
    // are suspended.
    let pid = unsafe {
        libc::clone(
            exec_child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut req as *mut ExecRequest as *mut libc::c_void,
        )
    };
    let pid = Errno::result(pid)
        .map_err(io::Error::from)
        .at(Stage::ForkAgent)?;
    drop(stack);
    drop(exec_w);
    // EOF on the close-on-exec pipe means execve succeeded; four bytes are its errno.
    let mut buf = [0u8; 4];
    let n = nix::unistd::read(&exec_r, &mut buf);
    drop(exec_r);
    if n == Ok(4) {
        let errno = i32::from_le_bytes(buf);
        // Reaping our own child (it _exit'ed with 127); its status is not needed.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let _ = channel::send(
            sock,
            &Msg::NotExecutable {
                program: program.display().to_string(),
                errno,
            },
        );
        return Ok(126);
    }
    // The agent has its copy of the supervisor's socket now; pid 1's would keep the
    // connection open after the agent (and everything it started) is gone.
    drop(agent_fd);
    // Likewise the agent's stdio (pid 1 writes nothing there): the launcher's relay and a
    // supervisor's log pipes reach EOF when the agent's processes are gone, not when pid 1
    // exits, so the status can be reported before the sandbox's teardown.
    let _ = sys::close_range(0, 2, 0);
    stamps.push((Stage::ForkAgent, now_ns()));
    let _ = channel::send(
        sock,
        &Msg::Started {
            agent_pid: pid,
            stages: stamps,
            landlock: landlock.clone(),
            // Read now, confined exactly as the agent it just started.
            inside: report.then(super::report::read_inside),
        },
    );

    loop {
        // SAFETY: zeroed siginfo is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // Raw: nix's SigSet::wait returns its Signal enum, which has no realtime signals (they
        // are forwarded too).
        // SAFETY: waits for any blocked signal.
        let sig = unsafe { libc::sigwaitinfo(all.as_ref(), &mut info) };
        if sig < 0 {
            continue;
        }
        if sig == libc::SIGCHLD {
            loop {
                let mut st = 0;
                // Raw: nix's waitpid fails with EINVAL, after reaping, when a realtime signal
                // killed the child (it maps the status into its Signal enum).
                // SAFETY: reaps any child: the agent, or orphans re-parented to pid 1.
                let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
                if r <= 0 {
                    break;
                }
                if r == pid {
                    let status = ExitStatus::from_wait_status(st);
                    // The status means "nothing of the agent runs any more": what it left
                    // behind is killed and reaped first (docs/architecture.md, "Warm start").
                    end_the_rest();
                    let _ = channel::send(sock, &Msg::Exited(status));
                    return Ok(status.code());
                }
            }
        } else {
            // Forward to the agent (it has handlers; pid 1 does not act on signals itself).
            // Raw: nix's kill takes its Signal enum, which has no realtime signals.
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Called by pid 1 once the agent has exited: SIGKILL to every other process of the pid
/// namespace, then reaps until it has no child left, so that the status pid 1 reports next
/// means that no process of the agent exists any more (the launcher may answer its caller
/// before pid 1's own exit and the namespaces' teardown). What the kernel does when pid 1
/// exits, done ahead of it.
///
/// kill(-1) from a namespace's pid 1 signals every process of the namespace but itself: one
/// pass suffices (a process with SIGKILL pending forks no more, and the pass holds the task
/// list, so no process is born during it). Every process the agent started descends from
/// pid 1 and ends as its child (reaped here) or its grandchild (re-parented to it when its
/// parent dies). A command `aitherctl exec` started is neither: its parent is outside the
/// namespace, and it sits in another Landlock domain, which pid 1 may not signal (kill(-1)
/// skips it, and still returns 0); the launcher finds it (and what it started) in the cgroup
/// and then waits for pid 1's exit, whose kill of the namespace ends it (launch.rs
/// `supervise`). What such a command left behind is re-parented to pid 1 and cannot be killed
/// from here either, so the reaping stops once `REAP_IDLE` passes with children left and none
/// exiting: the status goes out, the launcher sees the cgroup is not empty and waits for pid
/// 1's exit. (A killed process slower than that to exit takes the same way: the guarantee is
/// the launcher's cgroup check; this wait only makes the usual case early.)
fn end_the_rest() {
    /// How long a child that is left may go without exiting before pid 1 reports anyway.
    const REAP_IDLE: libc::timespec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    // SAFETY: kill(2) with pid -1 inside our own pid namespace, of which we are pid 1.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let mut chld = SigSet::empty();
    chld.add(nix::sys::signal::Signal::SIGCHLD);
    loop {
        let mut st = 0;
        // SAFETY: reaps any child (orphans re-parented to pid 1) without blocking.
        match unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) } {
            r if r > 0 => {}
            // Children left, none exited yet: wait for one (every signal is blocked, so
            // SIGCHLD is only ever taken here); none within REAP_IDLE (EAGAIN) ends the wait.
            0 => {
                // SAFETY: a zeroed siginfo is a valid out-parameter; SIGCHLD is blocked.
                let r = unsafe {
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    libc::sigtimedwait(chld.as_ref(), &mut info, &REAP_IDLE)
                };
                if r < 0 && Errno::last() != Errno::EINTR {
                    return;
                }
            }
            // ECHILD: none left.
            _ if Errno::last() == Errno::EINTR => {}
            _ => return,
        }
    }
}
