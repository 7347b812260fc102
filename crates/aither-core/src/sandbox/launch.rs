//! The launcher (host side): validates, prepares, clones the sandbox's pid 1, writes its id
//! maps, supervises it, and cleans up. It must run single-threaded (aitherctl run, aither-init):
//! the sandbox is a fork of this process.
//!
//! Order, and why:
//! 1. Preflight without side effects: the Landlock plan against the kernel's ABI and the
//!    compiled seccomp filter; a protection the kernel cannot give refuses here (fail closed).
//! 2. The cgroup2 directory the sandbox is born in (CLONE_INTO_CGROUP needs it at the clone).
//! 3. clone() with the new user, pid, mount, net, ipc and uts namespaces.
//! 4. uid_map/gid_map (setgroups denied), then "Go": pid 1 builds its mount view.
//! 5. Meanwhile, in parallel: the cgroup's limits (a thread) and the id-mapped workspace mount
//!    (only host root can create it); both go to pid 1 as descriptors, and pid 1 joins the
//!    cgroup before anything of the agent runs (limits apply from its first page).
//! 6. Supervise: forward signals, enforce the timeout, collect the exit status.
//! 7. Remove the cgroup (killing anything still inside first, when it is not empty).

use std::borrow::Cow;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::channel::{self, now_ns, Msg, Stage};
use super::init::{self, ChildContext};
use super::landlock::{self, LandlockError};
use super::mounts;
use super::netns;
use super::report::{CgroupReport, Inside, LandlockReport, Report, SeccompReport};
use super::seccomp::{self, Filter, SeccompError};
use super::spec::SandboxSpec;
use super::stdio::Relay;
use super::userns::{self, HostIds};
use crate::cgroup::{self, Cgroup, CgroupError, CgroupManager};
use crate::policy::Protection;
use crate::sys::{self, ExitStatus, Forked};

/// Errors that stop a launch. Every one is reported before or instead of running the agent.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("preparing the workspace mount: {0}")]
    Workspace(#[source] io::Error),
    #[error("creating the sandbox's namespaces (clone): {0}{hint}", hint = clone_hint(.0))]
    Clone(#[source] io::Error),
    #[error("writing the sandbox's uid/gid maps: {0}")]
    IdMaps(#[source] io::Error),
    #[error("talking to the sandbox: {0}")]
    Channel(#[source] io::Error),
    #[error("sandbox setup failed while {stage} ({errname}): {detail}", errname = sys::errno_name(*.errno))]
    Setup {
        stage: Stage,
        errno: i32,
        detail: String,
    },
    #[error("{program}: command not found in the sandbox")]
    NotFound { program: String },
    #[error("{program}: cannot execute in the sandbox ({errname}: {msg})", errname = sys::errno_name(*.errno), msg = io::Error::from_raw_os_error(*.errno))]
    NotExecutable { program: String, errno: i32 },
    #[error("the sandbox's pid 1 died during setup ({0:?})")]
    Died(ExitStatus),
    #[error("preparing the agent's stdio pipes: {0}")]
    Stdio(#[source] io::Error),
    #[error("opening the sandbox's network namespace (for its published ports): {0}")]
    Netns(#[source] io::Error),
    #[error("creating the egress gateway's socket in the sandbox's network namespace: {0}")]
    Egress(#[source] io::Error),
    #[error("aitherctl must run as root to create sandboxes (it maps each agent to an unprivileged host uid)")]
    NotRoot,
    /// `prepare` or `Prepared::finish`: this spec cannot use a prepared sandbox (launch it
    /// cold).
    #[error("not poolable: {0} (launch it without a prepared sandbox)")]
    NotPoolable(String),
    /// `Prepared::finish`: the final spec differs from the template in a field that was
    /// already built into the sandbox.
    #[error("the final spec does not match the prepared sandbox: prepared_key {got} differs from the template's {prepared} (a field other than name, hostname, argv, env, cwd, workspace, timeout and report changed)")]
    KeyMismatch { prepared: String, got: String },
}

fn clone_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::ENOSPC) => " (user namespaces may be disabled: check user.max_user_namespaces, kernel.unprivileged_userns_clone, or the container's seccomp/AppArmor profile)",
        _ => "",
    }
}

impl LaunchError {
    /// The exit status aitherctl reports (Docker's convention).
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::NotFound { .. } => 127,
            LaunchError::NotExecutable { .. } => 126,
            _ => 125,
        }
    }
}

/// How a sandboxed run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: ExitStatus,
    /// The kernel's OOM killer acted in the sandbox's cgroup.
    pub oom_killed: bool,
    /// The wall-clock limit was reached and the agent stopped.
    pub timed_out: bool,
    /// Protections skipped as best-effort (empty for strict).
    pub skipped: Vec<String>,
    /// The enforcement report, when the spec asked for one.
    pub report: Option<Report>,
}

impl Outcome {
    /// The lines `aitherctl run` (and aitherd's launchers, on the caller's stderr) print about
    /// how a run ended: protections skipped as best-effort, the timeout, an OOM kill.
    pub fn notes(&self, spec: &SandboxSpec) -> Vec<String> {
        let mut v: Vec<String> = self
            .skipped
            .iter()
            .map(|s| {
                format!(
                    "aither: best-effort: {s} was not enforced on this host (policy {:?} allows it)",
                    spec.policy
                )
            })
            .collect();
        if self.timed_out {
            let t = spec
                .timeout
                .map(crate::units::format_duration)
                .unwrap_or_default();
            v.push(format!("aither: timeout: the agent was stopped after {t}"));
        } else if self.oom_killed {
            let m = spec
                .limits
                .memory
                .map(|m| crate::units::Size(m).to_string())
                .unwrap_or_default();
            v.push(format!(
                "aither: the agent was killed by the OOM killer (memory limit {m})"
            ));
        }
        v
    }

    /// The launcher's exit code: the agent's status (128+signal), 124 at the timeout.
    pub fn code(&self) -> i32 {
        if self.timed_out {
            124
        } else {
            self.status.code()
        }
    }
}

/// What a supervising caller (`aither-init shim`) adds to a launch. `LaunchIo::default()` is
/// `aitherctl run`: the agent shares the caller's stdio and gets no extra descriptor.
#[derive(Default)]
pub struct LaunchIo<'a> {
    /// Given to the agent as fd 3 (not close-on-exec), with `AITHER_FD=3` in its environment.
    /// Nothing else the launcher holds enters the sandbox. The launcher's copy is closed as soon
    /// as pid 1 has its own (right after the clone).
    pub agent_channel: Option<OwnedFd>,
    /// Captures the agent's output: its stdin becomes /dev/null, its stdout and stderr two
    /// pipes whose bytes, in arrival order and told apart, go to this sink (logging never stops
    /// supervision). Everything left in the pipes is drained before `run_with` returns.
    pub log: Option<&'a mut dyn LogSink>,
    /// Called once, when the agent has been exec'ed.
    pub on_started: Option<OnStarted<'a>>,
    /// Run by the launcher while pid 1 builds the sandbox (the launcher would only wait):
    /// host-side bookkeeping that must not lengthen the launch, e.g. the audit record.
    pub during_setup: Option<Box<dyn FnOnce() + 'a>>,
    /// Receives the egress gateway's listening socket (bound inside the sandbox's network
    /// namespace, `spec.egress_port`) before the agent exists. Called after the clone, so the
    /// callee may start threads (the gateway) without touching the forked sandbox.
    pub on_egress: Option<Box<dyn FnOnce(OwnedFd) + 'a>>,
    /// Receives a descriptor of the sandbox's own network namespace (`spec.new_net_ns`), for
    /// aitherd to reach ports the agent publishes (`spawn --publish`, `--publish-host`).
    /// Opened after the clone and before Go, while pid 1 is the launcher's unreaped child:
    /// its pid cannot name another process then.
    pub on_netns: Option<Box<dyn FnOnce(OwnedFd) + 'a>>,
    /// Called once with the outcome as soon as the agent is done (as `Prepared::finish_reporting`'s:
    /// no process of the sandbox left, the relay drained and dropped, the caller's terminal
    /// mode restored); the teardown (pid 1's exit, the cgroup) follows before `run_with`
    /// returns. Not with `log`, and not called when the run ends otherwise.
    pub on_exited: Option<OnExited<'a>>,
}

/// Where a supervised agent's output goes (the shim's log, src/sandbox/shim.rs).
pub trait LogSink {
    /// What one read of `stream`'s pipe returned (at most 16 KiB), in the order read.
    fn output(&mut self, stream: crate::logfmt::Stream, bytes: &[u8]);
    /// Called once the pipes are drained at the end.
    fn flush(&mut self) {}
}

/// `LaunchIo::on_started`.
pub type OnStarted<'a> = Box<dyn FnOnce(&Started) + 'a>;

/// Called once with the outcome, as soon as the agent is done (`Prepared::finish_reporting`).
pub type OnExited<'a> = Box<dyn FnOnce(&Outcome) + 'a>;

/// The running sandbox, as `LaunchIo::on_started` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    /// Host pid of the sandbox's pid 1.
    pub pid1: i32,
    /// Host pid of the agent, when it could be found (it may already have exited).
    pub agent_pid: Option<i32>,
    /// The cgroup id, `<name>-<launcher pid>` (the directory name in each hierarchy).
    pub cgroup: String,
    /// The enforcement report, when the spec asked for one.
    pub report: Option<Report>,
}

/// The agent's end of the captured stdio, and the launcher's read ends.
struct Capture {
    agent: [OwnedFd; 3],
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl Capture {
    /// /dev/null and two pipes whose inode belongs to the agent's host uid (as LentPipes does
    /// for the caller's pipes), so that the agent can reopen /dev/stdout. Only the read ends
    /// stay with the launcher (non-blocking, for the supervise loop).
    fn new(agent_uid: u32) -> io::Result<Capture> {
        let null = sys::open(std::path::Path::new("/dev/null"), libc::O_RDWR)?;
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        let (uid, gid) = (
            nix::unistd::Uid::from_raw(agent_uid),
            nix::unistd::Gid::from_raw(agent_uid),
        );
        for w in [&out_w, &err_w] {
            nix::unistd::fchown(w, Some(uid), Some(gid))?;
        }
        for r in [&out_r, &err_r] {
            use nix::fcntl::{fcntl, FcntlArg, OFlag};
            fcntl(r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        Ok(Capture {
            agent: [null, out_w, err_w],
            stdout: out_r,
            stderr: err_r,
        })
    }
}

/// The launcher's side of a capture during supervision.
struct LogPipes<'a> {
    fds: [Option<OwnedFd>; 2],
    sink: &'a mut dyn LogSink,
}

/// The stream of `LogPipes::fds[i]`.
const STREAMS: [crate::logfmt::Stream; 2] =
    [crate::logfmt::Stream::Stdout, crate::logfmt::Stream::Stderr];

impl LogPipes<'_> {
    /// Copies what is in pipe `i` to the sink; closes it at EOF. At most 16 reads (256 KiB) a
    /// call: an agent that writes without pause cannot hold the loop (signals, the other
    /// stream) away; poll reports the rest at once.
    fn pump(&mut self, i: usize) {
        let Some(fd) = &self.fds[i] else { return };
        let mut buf = [0u8; 16 * 1024];
        for _ in 0..16 {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => {
                    self.fds[i] = None;
                    return;
                }
                Ok(n) => self.sink.output(STREAMS[i], &buf[..n]),
                Err(Errno::EINTR) => {}
                // EAGAIN: empty for now.
                Err(_) => return,
            }
        }
    }

    fn raw(&self, i: usize) -> RawFd {
        self.fds[i].as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// After the sandbox ended: everything still buffered. Every writer died with the pid
    /// namespace, so EOF comes at once; the bound only guards against a writer we do not know.
    fn drain(&mut self) {
        let until = Instant::now() + Duration::from_secs(2);
        while self.fds.iter().any(Option::is_some) && Instant::now() < until {
            let mut p = [0, 1].map(|i| libc::pollfd {
                fd: self.raw(i),
                events: libc::POLLIN,
                revents: 0,
            });
            // Raw: a closed pipe's entry has a negative fd, which nix's PollFd (a BorrowedFd)
            // cannot hold.
            // SAFETY: two valid pollfd entries (a negative fd is skipped).
            if unsafe { libc::poll(p.as_mut_ptr(), 2, 100) } <= 0 {
                break;
            }
            for (i, pf) in p.iter().enumerate() {
                if pf.revents != 0 {
                    self.pump(i);
                }
            }
        }
        self.sink.flush();
    }
}

/// Host pid of pid 1's child whose pid in the sandbox is `ns_pid` (the agent).
fn agent_host_pid(pid1: i32, ns_pid: i32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{pid1}/task/{pid1}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|st| {
                    st.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|l| l.split_whitespace().last()?.parse::<i32>().ok())
                })
                == Some(ns_pid)
        })
}

/// Time an agent gets between SIGTERM and SIGKILL at a timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

struct CgroupGuard {
    mgr: Box<dyn CgroupManager>,
    cg: Option<Cgroup>,
    /// pid 1 was reaped: its pid namespace, and with it every process born in the cgroup, is
    /// gone, so the cgroup is normally empty and is removed without reading it first.
    reaped: bool,
}

impl CgroupGuard {
    fn cg(&self) -> &Cgroup {
        self.cg.as_ref().expect("cgroup present until drop")
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.cg.take() {
            // Still busy after the sandbox ended: a process that joined from outside the pid
            // namespace (`aitherctl exec`); kill it, then remove with retries.
            if !(self.reaped && cg.remove_now()) {
                self.mgr.kill_all(&cg);
                let _ = cg.remove();
            }
        }
    }
}

/// Signals the launcher forwards to the sandbox.
const FORWARDED: &[Signal] = &[
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

struct SignalGuard {
    old: SigSet,
    fd: SignalFd,
}

impl SignalGuard {
    fn new() -> io::Result<SignalGuard> {
        let set: SigSet = FORWARDED.iter().copied().collect();
        let mut old = SigSet::empty();
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
        Ok(SignalGuard { old, fd })
    }

    fn read(&self) -> Option<libc::c_int> {
        // None: nothing pending (EAGAIN), or a failed read.
        let info = self.fd.read_signal().ok()??;
        Some(info.ssi_signo as libc::c_int)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // Restores the mask saved at construction.
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&self.old), None);
    }
}

fn trace_enabled() -> bool {
    crate::trace::enabled()
}

/// Runs `spec` in a new sandbox and waits for it.
pub fn run(spec: &SandboxSpec) -> Result<Outcome, LaunchError> {
    run_with(spec, LaunchIo::default())
}

/// `run`, with what a supervisor adds (see `LaunchIo`). The launch is a list of named stages
/// in a fixed order (docs/architecture.md, "The launcher"); the reason for each stage's place
/// is given where it is called.
pub fn run_with(spec: &SandboxSpec, mut io: LaunchIo<'_>) -> Result<Outcome, LaunchError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LaunchError::NotRoot);
    }
    let t0 = now_ns();
    let mut marks: Vec<(&str, u64)> = Vec::with_capacity(12);

    // 1. Preflight: decide what is enforced; refuse what the kernel cannot give.
    let (plan, filter, enforced) = preflight(spec)?;
    marks.push(("preflight", now_ns()));

    // 2. The cgroup: its cgroup2 directory now (the sandbox is born in it, no migration);
    // the rest while pid 1 builds its mount view (step 6).
    let slot = std::process::id();
    let id = format!("{}-{slot}", spec.name);
    let (mut guard, into) = cgroup_birth(&id)?;
    marks.push(("cgroup2 dir", now_ns()));

    // 3. Host ids, the /etc skeleton (cached), the caller's stdio pipes lent.
    let mut ids = HostIds::for_slot(slot);
    // The --workspace-as-owner fallback is decided here, before the clone, because it changes
    // the agent's host ids (written right after the clone); without it the workspace is
    // prepared in step 6, in parallel with the cgroup.
    let (spec, early_ws) = workspace_early(spec, &mut ids)?;
    let spec: &SandboxSpec = &spec;
    let etc_skeleton = mounts::prepare_etc(spec);
    let (mut capture, mut relay) = stdio(io.log.is_some(), ids.agent)?;
    // The launcher's supplementary groups would survive into the sandbox (`setgroups deny`
    // keeps them, docs/architecture.md launcher step 4), so drop them before cloning.
    drop_supplementary_groups()?;
    let (parent_sock, child_sock) = sys::seqpacket_pair().map_err(LaunchError::Channel)?;
    let signals = SignalGuard::new().map_err(LaunchError::Channel)?;
    marks.push(("etc+channel", now_ns()));

    // 4. The sandbox's pid 1, in new namespaces. The cgroup namespace comes later (after it
    // has joined its cgroups).
    let (pid, pidfd) = match clone_pid1(spec, ids, into.as_ref())? {
        Forked::Child => {
            drop(parent_sock);
            drop(into);
            init::run(
                ChildContext {
                    spec,
                    etc_skeleton,
                    filter,
                    landlock: plan,
                    ctty: relay.as_ref().and_then(Relay::ctty),
                    stdio: capture
                        .take()
                        .map(|c| c.agent)
                        .or_else(|| relay.as_mut().and_then(Relay::take_agent)),
                    agent_fd: io.agent_channel.take(),
                    pooled: false,
                },
                child_sock,
            )
        }
        Forked::Parent { pid, pidfd } => (pid, pidfd),
    };
    drop(child_sock);
    drop(into);
    // pid 1 has its own copies now: the agent's socket must not stay open here (its peer would
    // never see EOF), and the write ends must close here for the log to see EOF at the end.
    drop(io.agent_channel.take());
    let mut log = log_pipes(capture, io.log.take());
    // The agent's ends of the relay close here; the caller's terminal goes raw only now that
    // the pty has its settings (restored when `relay` drops, on every return path).
    if let Some(r) = relay.as_mut() {
        if let Err(e) = r.started() {
            return Err(kill_pid1(pidfd.as_fd(), LaunchError::Stdio(e)));
        }
    }
    marks.push(("clone", now_ns()));
    let abort = |e: LaunchError| -> LaunchError { kill_pid1(pidfd.as_fd(), e) };

    // 5. Maps, then Go. If this fails the child sees EOF and exits.
    maps_then_go(
        spec,
        pid,
        ids,
        parent_sock.as_fd(),
        &mut io.on_egress,
        &mut io.on_netns,
        &mut marks,
    )
    .map_err(abort)?;
    marks.push(("maps", now_ns()));

    // 6. While pid 1 builds its view, in parallel with each other: the cgroup's limits (a
    // thread: the launcher is free to have one now that pid 1 is forked) and the id-mapped
    // workspace mount. Both are in place before the agent exists, which is what matters, and
    // both travel as descriptors.
    let (created, workspace) = cgroup_and_workspace(guard.mgr.as_ref(), &id, spec, ids, early_ws);
    let (cg, join) = created.map_err(|e| abort(e.into()))?;
    guard.cg = Some(cg);
    let join = join.map_err(|e| abort(e.into()))?;
    marks.push(("cgroup+workspace", now_ns()));
    let (workspace, idmap_helper) = match workspace {
        Ok(Some((fd, helper))) => (Some(fd), helper),
        Ok(None) => (None, None),
        Err(e) => return Err(abort(LaunchError::Workspace(e))),
    };
    send_resources(parent_sock.as_fd(), join, workspace);
    marks.push(("resources sent", now_ns()));

    // While pid 1 mounts, confines itself and execs: the caller's bookkeeping, off the
    // critical path.
    if let Some(f) = io.during_setup.take() {
        f();
    }
    // Leftovers of launchers that were SIGKILLed (their sandboxes died with them; the
    // directories did not): here, where the launcher would only wait.
    cgroup::collect_garbage(&guard.mgr.subtree_dirs());
    // Long dead by now (killed before the workspace was sent); reaped while pid 1 works. A
    // layered workspace's lock stays held until the sandbox is gone (sandbox::layer::lock).
    let _layer_lock = idmap_helper.and_then(userns::IdmapHelper::into_hold);
    marks.push(("during-setup", now_ns()));

    // 7. Wait for the agent to start.
    let (agent_pid, stages, landlock_status, inside) =
        wait_started(parent_sock.as_fd(), pidfd.as_fd())?;
    let started_at = now_ns();
    if trace_enabled() {
        print_trace(
            t0,
            &marks,
            &stages,
            started_at,
            "started-seen",
            &landlock_status,
        );
    }
    let report = spec
        .report
        .then(|| enforcement_report(spec, &guard, &id, ids, &enforced, &landlock_status, &inside));
    // The supervisor hears of the start before supervision begins, so it knows the pids and
    // the cgroup for as long as the sandbox can run.
    if let Some(cb) = io.on_started.take() {
        cb(&Started {
            pid1: pid,
            agent_pid: agent_host_pid(pid, agent_pid),
            cgroup: id.clone(),
            report: report.clone(),
        });
    }

    // 8. Supervise.
    // With `on_exited` (aitherd's cold launcher), the agent's end is reported before the
    // teardown, as a prepared sandbox's (docs/architecture.md, "Warm start"); without it
    // (aitherctl run, whose caller waits for its exit anyway; the shim), once pid 1 is reaped.
    let on_exited = io.on_exited.take().filter(|_| log.is_none());
    let cg = guard.cg();
    // pid 1 (it may have left the cgroup already, on its way out) and nothing else.
    let alone = || cg.pids().iter().all(|&p| p == pid);
    let (status, timed_out, ended) = supervise(
        spec,
        pidfd.as_fd(),
        parent_sock.as_fd(),
        &signals,
        log.as_mut(),
        relay.as_mut(),
        on_exited.is_some().then_some(&alone as &dyn Fn() -> bool),
    );
    // Before the status goes out (as in `finish_with`).
    let oom_killed = guard.mgr.oom_kills(guard.cg()) > 0;
    let skipped = skipped_protections(guard.cg(), &enforced.landlock_skipped);
    let outcome = Outcome {
        status,
        oom_killed,
        timed_out,
        skipped,
        report,
    };
    let exited_at = now_ns();
    let early = matches!(ended, Ended::AgentDone);
    if early {
        // The caller's terminal gets its mode back before the caller hears of the end.
        drop(relay.take());
        if let Some(cb) = on_exited {
            cb(&outcome);
        }
        let _ = sys::wait_pidfd(pidfd.as_fd());
    }
    // Signals stay blocked until pid 1 is reaped (as in `finish_with`).
    drop(signals);
    guard.reaped = true;
    let reaped_at = now_ns();
    drop(guard);
    if trace_enabled() {
        print_exit_trace(t0, exited_at, early.then_some(reaped_at));
    }
    Ok(outcome)
}

/// A sandbox prepared ahead of its caller (`prepare`): the caller-independent stages done,
/// pid 1 waiting for the final spec. Used once, by `finish`; dropped unused, pid 1 is killed
/// and reaped and the cgroup removed (docs/architecture.md, "Warm start").
pub struct Prepared {
    template: SandboxSpec,
    key: String,
    live: Live,
    sock: OwnedFd,
    id: String,
    ids: HostIds,
    enforced: Enforced,
    signals: SignalGuard,
}

/// A prepared sandbox's pid 1 and cgroup, in their drop order: pid 1 is killed and reaped
/// before the cgroup is removed.
struct Live {
    pid1: Pid1,
    guard: CgroupGuard,
}

/// pid 1 of a prepared sandbox: killed and reaped on drop unless reaped already.
struct Pid1 {
    pid: i32,
    pidfd: OwnedFd,
    reaped: bool,
}

impl Drop for Pid1 {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
            let _ = sys::wait_pidfd(self.pidfd.as_fd());
        }
    }
}

/// Whether a run's (final) spec could be served by a prepared sandbox: aitherd asks before it
/// learns a shape (src/daemon/pool.rs), with the same rules `prepare` and `finish` apply.
pub fn poolable(spec: &SandboxSpec) -> Result<(), LaunchError> {
    per_run_resources(spec)?;
    poolable_final(spec)
}

/// Refuses a host-side resource per run that is set up before the agent's pid 1 exists.
fn per_run_resources(spec: &SandboxSpec) -> Result<(), LaunchError> {
    let refuse = |why: &str| Err(LaunchError::NotPoolable(why.into()));
    if spec.egress_port.is_some() {
        return refuse("an egress gateway (its socket is bound per run before Go)");
    }
    if !spec.publish_ports.is_empty() {
        return refuse("published ports (aitherd needs the namespace per run)");
    }
    if !spec.devices.is_empty() {
        return refuse("device nodes (a GPU lease is per run)");
    }
    Ok(())
}

/// Refuses a template `prepare` cannot build ahead: what needs the caller, or a host-side
/// resource per run that is set up before the agent's pid 1 exists.
fn poolable_template(spec: &SandboxSpec) -> Result<(), LaunchError> {
    per_run_resources(spec)?;
    if spec.workspace.is_some() {
        return Err(LaunchError::NotPoolable(
            "a template with a workspace (the workspace is the caller's, given at finish)".into(),
        ));
    }
    Ok(())
}

/// Refuses a final spec whose workspace cannot be added at finish.
fn poolable_final(spec: &SandboxSpec) -> Result<(), LaunchError> {
    match &spec.workspace {
        Some(w) if w.access == crate::policy::WorkspaceAccess::Layered => Err(
            LaunchError::NotPoolable("a layered workspace (its overlay is per agent)".into()),
        ),
        Some(w) if w.as_owner => Err(LaunchError::NotPoolable(
            "--workspace-as-owner (it may change the agent's host ids, written at the clone)"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Prepares a sandbox for `template` ahead of its caller: stages 1–6 of `run_with` that do
/// not depend on the caller (preflight, the cgroup with its limits, the clone, the maps,
/// pid 1's mounts but the workspace, lo up, the cgroups joined), then pid 1 waits for
/// `Prepared::finish`. The calling process must stay single-threaded, as for `run_with`; the
/// forwarded signals are blocked from here on (`Prepared::signal_fd` reports them).
/// `template`'s caller-dependent fields (`SandboxSpec::prepared_key`) are placeholders, and it
/// has no workspace; templates with an egress port, published ports or devices are refused
/// (`LaunchError::NotPoolable`).
pub fn prepare(template: &SandboxSpec) -> Result<Prepared, LaunchError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LaunchError::NotRoot);
    }
    poolable_template(template)?;
    let spec = template;
    let t0 = now_ns();
    let mut marks: Vec<(&str, u64)> = Vec::with_capacity(12);
    // 1. Preflight (as run_with). The Landlock plan is the kernel's ABI against the policy's
    // rights: the workspace path only enters at enforcement, in pid 1, with the final spec.
    let (plan, filter, enforced) = preflight(spec)?;
    marks.push(("preflight", now_ns()));
    // 2. The cgroup2 directory, named after the template (the agent's name comes later).
    let slot = std::process::id();
    let id = format!("{}-{slot}", spec.name);
    let (mut guard, into) = cgroup_birth(&id)?;
    marks.push(("cgroup2 dir", now_ns()));
    // 3. As run_with, but no stdio yet: the caller's arrives at finish.
    let ids = HostIds::for_slot(slot);
    let etc_skeleton = mounts::prepare_etc(spec);
    drop_supplementary_groups()?;
    let (parent_sock, child_sock) = sys::seqpacket_pair().map_err(LaunchError::Channel)?;
    let signals = SignalGuard::new().map_err(LaunchError::Channel)?;
    marks.push(("etc+channel", now_ns()));
    // 4. pid 1, in new namespaces.
    let (pid, pidfd) = match clone_pid1(spec, ids, into.as_ref())? {
        Forked::Child => {
            drop(parent_sock);
            drop(into);
            // Nothing of the pool launcher's (its control socket, the signalfd) stays open in
            // a sandbox that may wait long for its caller: only the channel (and 0–2, which
            // the agent's stdio replaces at finish).
            if init::close_fds_except(&[child_sock.as_raw_fd()]).is_err() {
                // SAFETY: _exit without the launcher's destructors; the launcher sees EOF.
                unsafe { libc::_exit(125) }
            }
            init::run(
                ChildContext {
                    spec,
                    etc_skeleton,
                    filter,
                    landlock: plan,
                    ctty: None,
                    stdio: None,
                    agent_fd: None,
                    pooled: true,
                },
                child_sock,
            )
        }
        Forked::Parent { pid, pidfd } => (pid, pidfd),
    };
    drop(child_sock);
    drop(into);
    let pid1 = Pid1 {
        pid,
        pidfd,
        reaped: false,
    };
    marks.push(("clone", now_ns()));
    // 5. Maps, then Go (no egress, no netns hand-out: refused above).
    maps_then_go(
        spec,
        pid,
        ids,
        parent_sock.as_fd(),
        &mut None,
        &mut None,
        &mut marks,
    )?;
    marks.push(("maps", now_ns()));
    // 6. The cgroup's limits while pid 1 mounts; no workspace yet.
    let (created, _) = cgroup_and_workspace(guard.mgr.as_ref(), &id, spec, ids, None);
    let (cg, join) = created?;
    guard.cg = Some(cg);
    let join = join?;
    send_resources(parent_sock.as_fd(), join, None);
    marks.push(("resources sent", now_ns()));
    cgroup::collect_garbage(&guard.mgr.subtree_dirs());
    marks.push(("garbage", now_ns()));
    // pid 1's word that everything caller-independent is done.
    let live = Live { pid1, guard };
    let stages = wait_ready(parent_sock.as_fd(), live.pid1.pidfd.as_fd())?;
    if trace_enabled() {
        print_trace(t0, &marks, &stages, now_ns(), "ready-seen", "(at finish)");
    }
    Ok(Prepared {
        key: template.prepared_key(),
        template: template.clone(),
        live,
        sock: parent_sock,
        id,
        ids,
        enforced,
        signals,
    })
}

/// Waits for pid 1's `Ready` (a prepared sandbox); its failure as `wait_started`'s.
fn wait_ready(
    sock: BorrowedFd<'_>,
    pidfd: BorrowedFd<'_>,
) -> Result<Vec<(Stage, u64)>, LaunchError> {
    match channel::recv(sock) {
        Ok(Some(Msg::Ready { stages })) => Ok(stages),
        Ok(Some(Msg::Failed {
            stage,
            errno,
            detail,
        })) => Err(LaunchError::Setup {
            stage,
            errno,
            detail,
        }),
        Ok(_) => {
            let _ = sys::pidfd_send_signal(pidfd, libc::SIGKILL);
            let st = sys::wait_pidfd(pidfd).unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
            Err(LaunchError::Died(st))
        }
        Err(e) => Err(LaunchError::Channel(e)),
    }
}

impl Prepared {
    /// Host pid of the sandbox's pid 1.
    pub fn pid1(&self) -> i32 {
        self.live.pid1.pid
    }

    /// The cgroup id (`<template name>-<launcher pid>`).
    pub fn cgroup(&self) -> &str {
        &self.id
    }

    /// The template's `SandboxSpec::prepared_key`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The template this sandbox was prepared for.
    pub fn template(&self) -> &SandboxSpec {
        &self.template
    }

    /// Readable when a forwarded signal (SIGINT, SIGTERM, SIGHUP, ...) is pending: they are
    /// blocked from `prepare` on, and forwarded to the agent once it runs.
    pub fn signal_fd(&self) -> BorrowedFd<'_> {
        self.signals.fd.as_fd()
    }

    /// The next pending forwarded signal, if any (taking it).
    pub fn take_signal(&self) -> Option<i32> {
        self.signals.read()
    }

    /// pid 1's descriptor: readable when it died (the sandbox cannot be used).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.live.pid1.pidfd.as_fd()
    }

    /// Runs `final_spec` in this sandbox and waits for it: the caller-dependent stages, then
    /// as `run_with` from stage 7. `final_spec` must have the template's `prepared_key`
    /// (`LaunchError::KeyMismatch` otherwise). `stdio` are the caller's stdin, stdout and
    /// stderr, treated as `aitherctl run` treats its own (stdio.rs: a terminal gets the agent
    /// its own pty, pipes are relayed); `workspace`, when given, is the directory the caller
    /// opened, which must be the one at the final spec's workspace path. On every error the
    /// sandbox is torn down (pid 1 killed, the cgroup removed) before this returns.
    pub fn finish(
        self,
        final_spec: &SandboxSpec,
        stdio: [OwnedFd; 3],
        workspace: Option<OwnedFd>,
        on_started: Option<OnStarted<'_>>,
    ) -> Result<Outcome, LaunchError> {
        self.finish_reporting(final_spec, stdio, workspace, on_started, None)
    }

    /// `finish`, and `on_exited` is called with the outcome as soon as the agent is done: pid 1
    /// has its status, no other process of the sandbox is left, the agent's streams are
    /// drained and the caller's descriptors (and terminal mode) given back. The teardown (pid
    /// 1's exit, its namespaces, the cgroup) follows before this returns. Not called when the
    /// run ends otherwise (pid 1 killed, a process that joined from outside): then the outcome
    /// is only returned, once the sandbox is gone.
    pub fn finish_reporting(
        self,
        final_spec: &SandboxSpec,
        stdio: [OwnedFd; 3],
        workspace: Option<OwnedFd>,
        on_started: Option<OnStarted<'_>>,
        on_exited: Option<OnExited<'_>>,
    ) -> Result<Outcome, LaunchError> {
        self.finish_with(
            final_spec,
            AgentStdio::Caller(stdio),
            workspace,
            None,
            on_started,
            on_exited,
        )
    }

    /// `finish` for a supervised agent (the shim's launch, `aither-init pool` become a shim:
    /// sandbox/shim.rs `run_prepared`): as `run_with` with a `LaunchIo`, the agent's stdin is
    /// /dev/null, its stdout and stderr go to `io.log`, `io.agent_channel` becomes its fd 3.
    /// The workspace is opened here from the final spec's path, as a cold launch opens it.
    /// `io.on_egress` and `io.on_netns` are never called: a prepared sandbox has neither
    /// (`poolable`); nor is `io.on_exited` (as `run_with`, with a log: the status once pid 1
    /// is reaped).
    pub fn finish_supervised(
        self,
        final_spec: &SandboxSpec,
        io: LaunchIo<'_>,
    ) -> Result<Outcome, LaunchError> {
        let LaunchIo {
            agent_channel,
            log,
            on_started,
            during_setup,
            ..
        } = io;
        let Some(sink) = log else {
            return Err(LaunchError::Stdio(io::Error::other(
                "a supervised finish needs a log for the agent's output",
            )));
        };
        if let Some(f) = during_setup {
            f();
        }
        self.finish_with(
            final_spec,
            AgentStdio::Captured(sink),
            None,
            agent_channel,
            on_started,
            None,
        )
    }

    fn finish_with(
        self,
        final_spec: &SandboxSpec,
        stdio: AgentStdio<'_>,
        workspace: Option<OwnedFd>,
        agent_channel: Option<OwnedFd>,
        on_started: Option<OnStarted<'_>>,
        on_exited: Option<OnExited<'_>>,
    ) -> Result<Outcome, LaunchError> {
        let t0 = now_ns();
        let mut marks: Vec<(&str, u64)> = Vec::with_capacity(8);
        let Prepared {
            template,
            key,
            mut live,
            sock,
            id,
            ids,
            enforced,
            signals,
        } = self;
        // Before anything is done for it: the final spec is the template's but for the
        // caller-dependent fields (everything else is already built into the sandbox).
        let got = final_spec.prepared_key();
        if got != key {
            return Err(LaunchError::KeyMismatch { prepared: key, got });
        }
        poolable_final(final_spec)?;
        let spec = final_spec;
        marks.push(("key-checked", now_ns()));
        // The workspace: the id-mapped mount from the directory at the final spec's path,
        // which must be the one the caller presented (host root: the launcher's part).
        let (ws_mount, idmap_helper) = match mounts::prepare_workspace_presented(
            spec,
            ids.agent,
            workspace.as_ref().map(|f| f.as_fd()),
        )
        .map_err(LaunchError::Workspace)?
        {
            Some((fd, helper)) => (Some(fd), Some(helper)),
            None => (None, None),
        };
        drop(workspace);
        marks.push(("workspace", now_ns()));
        // The caller's stdio, as aitherctl run treats its own: relayed, a pty of the agent's
        // own for a terminal, never the caller's terminal itself. Or, supervised, captured
        // into the shim's log as a cold shim's launch captures it.
        let (mut relay, mut log, agent_stdio) = match stdio {
            AgentStdio::Caller(stdio) => {
                let (mut relay, direct) =
                    Relay::for_caller(ids.agent, stdio).map_err(LaunchError::Stdio)?;
                let agent_stdio = match direct {
                    Some(fds) => fds,
                    None => relay.as_mut().and_then(Relay::take_agent).ok_or_else(|| {
                        LaunchError::Stdio(io::Error::other("no stdio for the agent"))
                    })?,
                };
                (relay, None, agent_stdio)
            }
            AgentStdio::Captured(sink) => {
                let c = Capture::new(ids.agent).map_err(LaunchError::Stdio)?;
                let pipes = LogPipes {
                    fds: [Some(c.stdout), Some(c.stderr)],
                    sink,
                };
                (None, Some(pipes), c.agent)
            }
        };
        marks.push(("stdio", now_ns()));
        // The final spec, the agent's stdio and the workspace to pid 1 in one message: it
        // builds the rest of its view, confines itself and execs.
        let ctty = relay.as_ref().and_then(Relay::ctty);
        let mut fds: Vec<BorrowedFd<'_>> = agent_stdio.iter().map(|f| f.as_fd()).collect();
        fds.extend(ws_mount.as_ref().map(|f| f.as_fd()));
        fds.extend(agent_channel.as_ref().map(|f| f.as_fd()));
        let sent = channel::send_with_fds(
            sock.as_fd(),
            &Msg::Final {
                spec: Box::new(spec.clone()),
                ctty,
                workspace: ws_mount.is_some(),
                agent_fd: agent_channel.is_some(),
            },
            &fds,
        );
        drop(fds);
        // pid 1 has its own copy: the agent's socket must not stay open here (its peer would
        // never see EOF), as in a cold launch.
        drop(agent_channel);
        // The last launcher mark: what follows runs in parallel with pid 1 (the trace's
        // sandbox lines are the critical path from here).
        marks.push(("final-sent", now_ns()));
        drop(agent_stdio);
        drop(ws_mount);
        // A send error means pid 1 already failed or died: read below.
        let _ = sent;
        // The agent's ends are pid 1's now; the caller's terminal goes raw (restored when
        // `relay` drops).
        if let Some(r) = relay.as_mut() {
            r.started().map_err(LaunchError::Stdio)?;
        }
        // Long dead (killed once the mount was made); reaped while pid 1 works.
        drop(idmap_helper);
        // wait_started reaps pid 1 on every error.
        let (agent_pid, stages, landlock_status, inside) =
            wait_started(sock.as_fd(), live.pid1.pidfd.as_fd())
                .inspect_err(|_| live.pid1.reaped = true)?;
        let started_at = now_ns();
        if trace_enabled() {
            print_trace(
                t0,
                &marks,
                &stages,
                started_at,
                "started-seen",
                &landlock_status,
            );
        }
        let report = spec.report.then(|| {
            enforcement_report(
                spec,
                &live.guard,
                &id,
                ids,
                &enforced,
                &landlock_status,
                &inside,
            )
        });
        let pid = live.pid1.pid;
        if let Some(cb) = on_started {
            cb(&Started {
                pid1: pid,
                agent_pid: agent_host_pid(pid, agent_pid),
                cgroup: id.clone(),
                report: report.clone(),
            });
        }
        // pid 1 the last process of the cgroup: one read of cgroup.procs.
        let cg = live.guard.cg();
        // pid 1 (it may have left the cgroup already, on its way out) and nothing else.
        let alone = || cg.pids().iter().all(|&p| p == pid);
        let (status, timed_out, ended) = supervise(
            spec,
            live.pid1.pidfd.as_fd(),
            sock.as_fd(),
            &signals,
            log.as_mut(),
            relay.as_mut(),
            on_exited.is_some().then_some(&alone as &dyn Fn() -> bool),
        );
        // Read now, before the status goes out: every OOM kill in the cgroup happened before
        // the process it killed was gone, and all of them are (pid 1 has its status after
        // reaping the rest, or pid 1 itself is reaped).
        let oom_killed = live.guard.mgr.oom_kills(live.guard.cg()) > 0;
        let skipped = skipped_protections(live.guard.cg(), &enforced.landlock_skipped);
        let outcome = Outcome {
            status,
            oom_killed,
            timed_out,
            skipped,
            report,
        };
        let exited_at = now_ns();
        // The caller's descriptors close (and its terminal gets its mode back) before the
        // caller hears of the end: a reader of the caller's pipe sees EOF once the caller is
        // gone too.
        drop(relay);
        let early = matches!(ended, Ended::AgentDone);
        if early {
            if let Some(cb) = on_exited {
                cb(&outcome);
            }
            // The teardown, off the caller's path: pid 1 exits right after its report (its
            // namespaces go with it, all empty), then the cgroup is removed.
            let _ = sys::wait_pidfd(live.pid1.pidfd.as_fd());
        }
        // Signals stay blocked until pid 1 is reaped (a late one must not kill the launcher
        // before its cleanup).
        drop(signals);
        live.pid1.reaped = true;
        live.guard.reaped = true;
        let reaped_at = now_ns();
        drop(live);
        drop(template);
        if trace_enabled() {
            print_exit_trace(t0, exited_at, early.then_some(reaped_at));
        }
        Ok(outcome)
    }
}

/// Where a finished prepared sandbox's agent gets its stdin, stdout and stderr.
enum AgentStdio<'a> {
    /// The caller's (`aitherctl run` through aitherd): relayed as `aitherctl run` relays its
    /// own.
    Caller([OwnedFd; 3]),
    /// /dev/null and two pipes into a supervisor's log (the shim).
    Captured(&'a mut dyn LogSink),
}

/// What preflight decided, for the enforcement report: the Landlock plan and the seccomp
/// filter themselves move into the child at the clone.
struct Enforced {
    landlock_skipped: Vec<Protection>,
    landlock_compensated: Vec<String>,
    landlock_rights: LandlockReport,
    seccomp_report: Option<SeccompReport>,
}

/// Stage 1: the Landlock plan for this kernel and the compiled seccomp filter; refuses what
/// the kernel cannot give.
fn preflight(
    spec: &SandboxSpec,
) -> Result<(landlock::Plan, Option<Filter>, Enforced), LaunchError> {
    let plan = landlock::plan(spec, landlock::kernel_abi())?;
    let landlock_skipped = plan.skipped.clone();
    let landlock_compensated: Vec<String> =
        plan.compensated.iter().map(ToString::to_string).collect();
    let filter = spec
        .seccomp_profile
        .as_deref()
        .map(seccomp::load)
        .transpose()?;
    // For the enforcement report (both move into the child at the clone).
    let landlock_rights = LandlockReport {
        status: String::new(),
        abi: plan.abi,
        filesystem: plan.fs,
        tcp: plan.tcp,
        ioctl_dev: plan.ioctl_dev,
        scopes: plan.scopes,
    };
    let seccomp_report = filter.as_ref().map(|f| SeccompReport {
        profile: spec.seccomp_profile.clone().unwrap_or_default(),
        digest: f.digest.clone(),
        program_digest: f.program_digest(),
        rules: f.rules,
    });
    let enforced = Enforced {
        landlock_skipped,
        landlock_compensated,
        landlock_rights,
        seccomp_report,
    };
    Ok((plan, filter, enforced))
}

/// Stage 2: the cgroup2 directory the sandbox is born in (the guard removes it on every
/// return path), and its descriptor for `clone3`.
fn cgroup_birth(id: &str) -> Result<(CgroupGuard, Option<OwnedFd>), LaunchError> {
    let mgr = cgroup::manager()?;
    let birth = mgr.birth_dir(id)?;
    let guard = CgroupGuard {
        mgr,
        cg: birth.as_ref().map(|d| Cgroup {
            id: id.to_string(),
            dirs: vec![("unified", d.clone())],
            skipped: Vec::new(),
        }),
        reaped: false,
    };
    let into = match &birth {
        Some(d) => Cgroup::open_cgroup2(d)?,
        None => None,
    };
    Ok((guard, into))
}

/// The workspace prepared before the clone: its descriptor, and the id-mapping helper when
/// the mount is id-mapped.
type EarlyWs = (OwnedFd, Option<userns::IdmapHelper>);

/// Stage 3, the --workspace-as-owner fallback: prepares the workspace early when the spec asks
/// for it; when the fallback applies, the agent's host ids become the owner's and the spec
/// returned asks for a plain workspace.
fn workspace_early<'s>(
    spec: &'s SandboxSpec,
    ids: &mut HostIds,
) -> Result<(Cow<'s, SandboxSpec>, Option<EarlyWs>), LaunchError> {
    match mounts::prepare_workspace_early(spec, ids.agent).map_err(LaunchError::Workspace)? {
        None => Ok((Cow::Borrowed(spec), None)),
        Some(mounts::EarlyWorkspace::IdMapped(fd, helper)) => {
            Ok((Cow::Borrowed(spec), Some((fd, Some(helper)))))
        }
        Some(mounts::EarlyWorkspace::AsOwner { fd, uid, gid }) => {
            ids.agent = uid;
            ids.agent_gid = gid;
            let mut s = spec.clone();
            if let Some(w) = s.workspace.as_mut() {
                w.plain = true;
            }
            Ok((Cow::Owned(s), Some((fd, None))))
        }
    }
}

/// Stage 3: the agent's stdio, captured (`LaunchIo::log`) or relayed.
fn stdio(captured: bool, agent: u32) -> Result<(Option<Capture>, Option<Relay>), LaunchError> {
    // A captured agent gets its own stdio, so the caller's pipes (a supervisor's) are not lent.
    let capture = match captured {
        true => Some(Capture::new(agent).map_err(LaunchError::Stdio)?),
        false => None,
    };
    // Otherwise the caller's terminal and pipes are relayed, never handed over (stdio.rs).
    let relay = match capture {
        Some(_) => None,
        None => Relay::new(agent).map_err(LaunchError::Stdio)?,
    };
    Ok((capture, relay))
}

/// Stage 3: the launcher drops its supplementary groups.
fn drop_supplementary_groups() -> Result<(), LaunchError> {
    nix::unistd::setgroups(&[]).map_err(|e| LaunchError::Clone(e.into()))
}

/// Stage 4: forks the sandbox's pid 1 into new namespaces (and into its cgroup2 directory,
/// `into`). Returns in both the parent and the child.
fn clone_pid1(
    spec: &SandboxSpec,
    ids: HostIds,
    into: Option<&OwnedFd>,
) -> Result<Forked, LaunchError> {
    let mut flags = libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWNS;
    if spec.new_net_ns {
        flags |= libc::CLONE_NEWNET;
    }
    if spec.new_ipc_ns {
        flags |= libc::CLONE_NEWIPC;
    }
    if spec.new_uts_ns {
        flags |= libc::CLONE_NEWUTS;
    }
    // The namespace's owner is the creator's euid, and the kernel charges the per-user
    // counters of everything inside to the owner: so the clone runs as the sandbox's own setup
    // id, never as host root (userns::AsOwner). Just around the clone: the maps, the cgroup and
    // the workspace need root again right after it.
    let as_owner = userns::AsOwner::switch_to(ids.root).map_err(LaunchError::Clone)?;
    // SAFETY: the launcher is single-threaded (aitherctl run / aither-init never start threads
    // before this point), so the forked child may run ordinary Rust code.
    let forked = unsafe { sys::clone3_fork(flags, into.map(|f| f.as_fd())) };
    match forked {
        Ok(Forked::Child) => {
            // pid 1 keeps the setup id: the guard's drop (back to root) is for the launcher
            // only, and pid 1 never returns to where it would run (init::run does not return).
            std::mem::forget(as_owner);
            Ok(Forked::Child)
        }
        other => {
            drop(as_owner);
            other.map_err(LaunchError::Clone)
        }
    }
}

/// Stage 4: the launcher's side of a capture, once pid 1 holds the agent's ends.
fn log_pipes<'a>(
    capture: Option<Capture>,
    sink: Option<&'a mut dyn LogSink>,
) -> Option<LogPipes<'a>> {
    match (capture, sink) {
        (Some(c), Some(sink)) => {
            drop(c.agent);
            Some(LogPipes {
                fds: [Some(c.stdout), Some(c.stderr)],
                sink,
            })
        }
        _ => None,
    }
}

/// Kills and reaps pid 1 after a launch error; returns the error.
fn kill_pid1(pidfd: BorrowedFd<'_>, e: LaunchError) -> LaunchError {
    let _ = sys::pidfd_send_signal(pidfd, libc::SIGKILL);
    let _ = sys::wait_pidfd(pidfd);
    e
}

/// Stage 5: pid 1's id maps, the gateway's socket, then Go.
fn maps_then_go<'a>(
    spec: &SandboxSpec,
    pid: i32,
    ids: HostIds,
    sock: BorrowedFd<'_>,
    on_egress: &mut Option<Box<dyn FnOnce(OwnedFd) + 'a>>,
    on_netns: &mut Option<Box<dyn FnOnce(OwnedFd) + 'a>>,
    marks: &mut Vec<(&str, u64)>,
) -> Result<(), LaunchError> {
    userns::write_maps(pid, spec.uid, spec.gid, ids).map_err(LaunchError::IdMaps)?;
    // The gateway's socket before Go: it is listening before the agent can exist, and the
    // clone is behind us, so a gateway thread started by the callee is never forked.
    if let Some(port) = spec.egress_port {
        let fd = netns::listen_in(pid, port).map_err(LaunchError::Egress)?;
        match on_egress.take() {
            Some(f) => f(fd),
            None => drop(fd),
        }
        marks.push(("egress socket", now_ns()));
    }
    // The namespace's descriptor before Go: pid 1 is waiting for Go, unreaped, so
    // /proc/PID/ns/net is its namespace and no other process's (no pid-reuse race).
    if let (true, Some(f)) = (spec.new_net_ns, on_netns.take()) {
        let fd = sys::open(
            std::path::Path::new(&format!("/proc/{pid}/ns/net")),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
        .map_err(LaunchError::Netns)?;
        f(fd);
    }
    channel::send(sock, &Msg::Go).map_err(LaunchError::Channel)
}

/// The sandbox's cgroup with its limits, and the handles pid 1 joins it by.
type CgroupCreated = Result<(Cgroup, Result<Vec<OwnedFd>, CgroupError>), CgroupError>;

/// Stage 6: the cgroup's limits (on a thread) and the workspace mount, in parallel.
fn cgroup_and_workspace(
    mgr: &dyn CgroupManager,
    id: &str,
    spec: &SandboxSpec,
    ids: HostIds,
    early_ws: Option<EarlyWs>,
) -> (CgroupCreated, io::Result<Option<EarlyWs>>) {
    std::thread::scope(|s| {
        let create = move || {
            let cg = mgr.create(id, &spec.limits, &spec.best_effort)?;
            let join = cg.join_handles();
            Ok::<_, CgroupError>((cg, join))
        };
        let thread = std::thread::Builder::new()
            .name("aither-cgroup".into())
            .stack_size(256 * 1024)
            .spawn_scoped(s, create);
        let workspace = match early_ws {
            Some(early) => Ok(Some(early)),
            None => mounts::prepare_workspace(spec, ids.agent)
                .map(|w| w.map(|(fd, helper)| (fd, Some(helper)))),
        };
        let created = match thread {
            Ok(t) => t.join().unwrap_or_else(|_| {
                Err(CgroupError::Create {
                    path: id.into(),
                    source: io::Error::other("the cgroup thread panicked"),
                })
            }),
            // No thread to be had: one after the other.
            Err(_) => create(),
        };
        (created, workspace)
    })
}

/// Stage 6: sends pid 1 the cgroup's join handles and the workspace mount.
fn send_resources(sock: BorrowedFd<'_>, join: Vec<OwnedFd>, workspace: Option<OwnedFd>) {
    let mut fds: Vec<BorrowedFd<'_>> = join.iter().map(|f| f.as_fd()).collect();
    fds.extend(workspace.as_ref().map(|f| f.as_fd()));
    let resources = Msg::Resources {
        cgroup_files: join.len(),
        workspace: workspace.is_some(),
    };
    // A send error means pid 1 already failed: its Failed message is read below.
    let _ = channel::send_with_fds(sock, &resources, &fds);
    drop(fds);
    drop(join);
    drop(workspace);
}

/// What pid 1 reports when the agent has started: the agent's pid in the sandbox, pid 1's
/// stage times, the Landlock status, and what the sandbox saw of itself.
type StartedMsg = (i32, Vec<(Stage, u64)>, String, Option<Inside>);

/// Stage 7: waits for pid 1's word that the agent started; on a failure, pid 1 is killed and
/// reaped.
fn wait_started(sock: BorrowedFd<'_>, pidfd: BorrowedFd<'_>) -> Result<StartedMsg, LaunchError> {
    let early = |e: LaunchError| -> Result<StartedMsg, LaunchError> { Err(kill_pid1(pidfd, e)) };
    match channel::recv(sock) {
        Ok(Some(Msg::Started {
            agent_pid,
            stages,
            landlock,
            inside,
        })) => Ok((agent_pid, stages, landlock, inside)),
        Ok(Some(Msg::Failed {
            stage,
            errno,
            detail,
        })) => early(LaunchError::Setup {
            stage,
            errno,
            detail,
        }),
        Ok(Some(Msg::NotFound { program })) => early(LaunchError::NotFound { program }),
        Ok(Some(Msg::NotExecutable { program, errno })) => {
            early(LaunchError::NotExecutable { program, errno })
        }
        Ok(_) => {
            let st = sys::wait_pidfd(pidfd).unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
            Err(LaunchError::Died(st))
        }
        Err(e) => early(LaunchError::Channel(e)),
    }
}

/// Protections skipped as best-effort: the cgroup's, then Landlock's.
fn skipped_protections(cg: &Cgroup, landlock_skipped: &[Protection]) -> Vec<String> {
    let mut skipped: Vec<String> = cg.skipped.iter().map(|p| p.to_string()).collect();
    skipped.extend(landlock_skipped.iter().map(|p| p.to_string()));
    skipped
}

/// Stage 7: the enforcement report (`spec.report`), once the agent has started.
fn enforcement_report(
    spec: &SandboxSpec,
    guard: &CgroupGuard,
    id: &str,
    ids: HostIds,
    enforced: &Enforced,
    landlock_status: &str,
    inside: &Option<Inside>,
) -> Report {
    let cg = guard.cg();
    let limits = guard.mgr.read_limits(cg).ok().unwrap_or_default();
    let mut namespaces: Vec<String> = vec!["user".into(), "pid".into(), "mnt".into()];
    for (on, ns) in [
        (spec.new_net_ns, "net"),
        (spec.new_ipc_ns, "ipc"),
        (spec.new_uts_ns, "uts"),
        (spec.new_cgroup_ns, "cgroup"),
    ] {
        if on {
            namespaces.push(ns.into());
        }
    }
    Report {
        name: spec.name.clone(),
        policy: spec.policy.clone(),
        namespaces,
        uid: spec.uid,
        gid: spec.gid,
        host_uid: ids.agent,
        host_gid: ids.agent_gid,
        cgroup: CgroupReport {
            id: id.to_string(),
            dirs: cg
                .dirs
                .iter()
                .map(|(_, d)| d.display().to_string())
                .collect(),
            memory_bytes: limits.memory,
            swap_bytes: limits.swap,
            cpu_quota_us: limits.cpu.map(|c| c.quota_us),
            cpu_period_us: limits.cpu.map(|c| c.period_us),
            pids: limits.pids,
        },
        landlock: LandlockReport {
            status: if spec.landlock {
                landlock_status.to_string()
            } else {
                "disabled by the policy".into()
            },
            ..enforced.landlock_rights.clone()
        },
        seccomp: enforced.seccomp_report.clone(),
        best_effort_skipped: skipped_protections(cg, &enforced.landlock_skipped),
        overrides: crate::testhooks::in_force(),
        compensated: enforced.landlock_compensated.clone(),
        inside: inside.clone(),
    }
}

/// Stage 8, with `AITHER_TRACE_LAUNCH=1`: the launcher's times after the agent ran.
/// `reaped_at`: the status went out before pid 1's exit (`finish_with`), which was reaped then.
fn print_exit_trace(t0: u64, exited_at: u64, reaped_at: Option<u64>) {
    let done = now_ns();
    let us = |a: u64, b: u64| (a - b) as f64 / 1000.0;
    match reaped_at {
        None => eprintln!(
            "aither-trace: launcher agent-ran+reaped       {:>9.0}",
            us(exited_at, t0)
        ),
        Some(r) => {
            eprintln!(
                "aither-trace: launcher agent-done+reported    {:>9.0}",
                us(exited_at, t0)
            );
            eprintln!(
                "aither-trace: launcher pid1-reaped            {:>9.0} {:>9.0}",
                us(r, t0),
                us(r, exited_at)
            );
        }
    }
    let from = reaped_at.unwrap_or(exited_at);
    eprintln!(
        "aither-trace: launcher cgroup-removed         {:>9.0} {:>9.0}",
        us(done, t0),
        us(done, from)
    );
}

fn print_trace(
    t0: u64,
    marks: &[(&str, u64)],
    stages: &[(Stage, u64)],
    started: u64,
    last: &str,
    landlock: &str,
) {
    let us = |t: u64| (t.saturating_sub(t0)) as f64 / 1000.0;
    let mut prev = t0;
    eprintln!("aither-trace: stage                         µs(total)  µs(step)");
    for (name, t) in marks {
        eprintln!(
            "aither-trace: launcher {name:<22} {:>9.0} {:>9.0}",
            us(*t),
            (t - prev) as f64 / 1000.0
        );
        prev = *t;
    }
    for (stage, t) in stages {
        eprintln!(
            "aither-trace: sandbox  {:<22} {:>9.0} {:>9.0}",
            format!("{stage:?}"),
            us(*t),
            t.saturating_sub(prev) as f64 / 1000.0
        );
        prev = *t;
    }
    eprintln!(
        "aither-trace: launcher {last:<22} {:>9.0}   landlock={landlock}",
        us(started)
    );
}

/// How `supervise` returned.
enum Ended {
    /// pid 1 was reaped: the sandbox's pid namespace is gone.
    Reaped,
    /// pid 1 reported the agent's status, having killed and reaped every other process of
    /// its namespace, the relay reached EOF on every stream of the agent's, and `alone` said
    /// pid 1 is the last process of the cgroup: nothing of the agent runs any more; pid 1's
    /// exit and the namespaces' teardown are still to come.
    AgentDone,
}

/// Waits for the sandbox, forwarding signals and enforcing the timeout. Returns the agent's
/// status (or pid 1's, if pid 1 was killed), whether the timeout fired, and how it ended:
/// with `alone` (asked once, when pid 1 has reported and the relay is drained: is pid 1 the
/// cgroup's last process?), as soon as the agent is done; otherwise once pid 1 is reaped.
fn supervise(
    spec: &SandboxSpec,
    pidfd: BorrowedFd<'_>,
    sock: BorrowedFd<'_>,
    signals: &SignalGuard,
    mut log: Option<&mut LogPipes<'_>>,
    mut relay: Option<&mut Relay>,
    mut alone: Option<&dyn Fn() -> bool>,
) -> (ExitStatus, bool, Ended) {
    let start = Instant::now();
    let mut agent_status: Option<ExitStatus> = None;
    let mut timed_out = false;
    let mut kill_at: Option<Instant> = None;
    let mut sock_open = true;
    loop {
        let now = Instant::now();
        let deadline = match (spec.timeout, kill_at) {
            (_, Some(k)) => Some(k),
            (Some(t), None) if !timed_out => Some(start + t),
            _ => None,
        };
        let timeout_ms = deadline
            .map(|d| {
                d.saturating_duration_since(now)
                    .as_millis()
                    .min(i32::MAX as u128) as i32
            })
            .unwrap_or(-1);
        let mut fds = vec![
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if sock_open { sock.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: log.as_ref().map_or(-1, |l| l.raw(0)),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: log.as_ref().map_or(-1, |l| l.raw(1)),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // The relay's entries after the five fixed ones.
        fds.extend(relay.as_ref().map(|r| r.pollfds()).unwrap_or_default());
        // Raw: a closed channel's or pipe's entry, and an idle relay pump's, has a negative fd,
        // which nix's PollFd (a BorrowedFd) cannot hold.
        // SAFETY: valid pollfd entries (a negative fd is skipped).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            continue;
        }
        if let Some(r) = relay.as_deref_mut() {
            r.step(&fds[5..]);
        }
        if let Some(l) = log.as_deref_mut() {
            for i in 0..2 {
                if fds[3 + i].revents != 0 {
                    l.pump(i);
                }
            }
        }
        if fds[2].revents != 0 {
            match channel::recv(sock) {
                Ok(Some(Msg::Exited(st))) => agent_status = Some(st),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => sock_open = false,
            }
        }
        if fds[1].revents != 0 {
            while let Some(sig) = signals.read() {
                // With a pty, the new size reaches the agent through it (the kernel signals
                // the pty's foreground group); otherwise pid 1 forwards the signal.
                if sig == libc::SIGWINCH && relay.as_ref().is_some_and(|r| r.winch()) {
                    continue;
                }
                // pid 1 forwards it to the agent.
                let _ = sys::pidfd_send_signal(pidfd, sig);
            }
        }
        if fds[0].revents != 0 {
            // Drain a final Exited message that raced with pid 1's exit.
            if agent_status.is_none() && sock_open {
                if let Ok(Some(Msg::Exited(s))) = channel::recv(sock) {
                    agent_status = Some(s);
                }
            }
            // pid 1 reported and exited (the kernel's kill of its namespace is over when its
            // pidfd turns readable): the agent is done, as below; the caller reaps pid 1.
            if let (Some(st), Some(_), None) = (agent_status, alone, log.as_ref()) {
                if let Some(r) = relay {
                    r.drain();
                }
                return (st, timed_out, Ended::AgentDone);
            }
            let st = sys::wait_pidfd(pidfd).unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
            // The agent's last words are logged before the caller reports its end.
            if let Some(l) = log {
                l.drain();
            }
            if let Some(r) = relay {
                r.drain();
            }
            return (agent_status.unwrap_or(st), timed_out, Ended::Reaped);
        }
        // The agent is done once pid 1 has its status (sent after the rest of the namespace
        // was killed and reaped) and every stream it wrote reached EOF (pid 1 closed its
        // copies at the exec): the caller's output is complete. Only a process that joined
        // from outside the namespace (`aitherctl exec`) can remain; then pid 1's exit, which
        // the kernel's kill of the namespace follows, is waited for as before.
        if let Some(st) = agent_status {
            if log.is_none() && relay.as_ref().is_none_or(|r| r.outbound_done()) {
                if let Some(check) = alone.take() {
                    if check() {
                        if let Some(r) = relay {
                            r.drain();
                        }
                        return (st, timed_out, Ended::AgentDone);
                    }
                }
            }
        }
        let now = Instant::now();
        if let Some(k) = kill_at {
            if now >= k {
                // The grace period is over: SIGKILL to pid 1 ends the whole pid namespace.
                let _ = sys::pidfd_send_signal(pidfd, libc::SIGKILL);
                kill_at = None;
            }
        } else if let Some(t) = spec.timeout {
            if !timed_out && now >= start + t {
                timed_out = true;
                let _ = sys::pidfd_send_signal(pidfd, libc::SIGTERM);
                kill_at = Some(now + KILL_GRACE);
            }
        }
    }
}
