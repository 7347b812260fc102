//! `aitherctl run` served by aitherd (docs/daemon.md "run"): one command in a new sandbox, in
//! the foreground, with the caller's streams, as the caller.
//!
//! The stages, in order:
//! 1. Who: the kernel's word on the peer (SO_PEERCRED, read at accept): root, aitherd's uid,
//!    `aither-admin` or a member of group `aither`. A member is held to what spawn holds them
//!    to (installed policies only, tokens minted for them, a workspace they opened themselves
//!    and own), because the spec comes from the same builder (`server::prepare_launch`, the
//!    one `spawn` uses, around `prepare::prepare`, the one `aitherctl run` uses).
//! 2. How many: at most `MAX_RUNS_PER_UID` runs per caller's uid at a time (each holds a
//!    launcher, a connection and descriptors here).
//! 3. What: the command, `KEY=VALUE` pairs, and descriptors sent with the request
//!    (SCM_RIGHTS): stdin, stdout, stderr, each a pipe, a regular file, /dev/null or a
//!    terminal (the agent then gets a pty of its own, relayed to it, never the caller's:
//!    TIOCSTI), and optionally the workspace as the caller opened it. A socket, a directory or
//!    an O_PATH descriptor as a stream is refused, as for `exec` (aitherctl relays those).
//! 4. Launch: `launcher_for` starts the launcher with the caller's descriptors as its stdio;
//!    the launch is then exactly `aitherctl run`'s (the same library code), and the reply
//!    `{"started": true}` tells the client to feed stdin.
//! 5. While it runs: `RunSignal` frames from the client go to the launcher, which forwards them
//!    to the agent. A client that closes the connection gets the launcher killed, and the
//!    sandbox with it (pid 1's parent-death signal; the cgroup is swept as any dead
//!    launcher's).
//! 6. End: `{"exit_code": N}`: the agent's status, 128+N for a signal, 124 for `--timeout`,
//!    125/126/127 for Aither's own failures. Sent as soon as the launcher reports that the
//!    agent is done (no process of its sandbox left, its streams drained and the caller's
//!    descriptors closed: a prepared sandbox's `exited`, a cold launcher's `--status-fd`
//!    line), before the sandbox's teardown; the run keeps its slot until the launcher has
//!    exited (docs/architecture.md, "Warm start").
//!
//! Every request is audited (`run`, allow or deny, with the command and the workspace).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Command;

use super::exec::Terminals;
use super::identity::Caller;
use super::proto::{aio, ErrorCode, Reply, RunRequest, RunSignal};
use super::Shared;
use crate::audit::{Entry, Verdict};
use crate::sandbox::pool::PoolMsg;
use crate::sandbox::{RunOptions, SandboxSpec};

/// At most this many runs per caller's uid at a time (root's included).
pub const MAX_RUNS_PER_UID: usize = 16;

/// Where the cold launcher finds the spec (`aither-init --config-fd 3`).
const CONFIG_FD: RawFd = 3;

/// Where the cold launcher writes the run's code once the agent is done (`--status-fd 4`).
const STATUS_FD: RawFd = 4;

/// A spec this size fits in a pipe's buffer (64 KiB on Linux) with room to spare.
const SMALL_SPEC: usize = 48 * 1024;

/// The signals a client may have forwarded: those the launcher forwards to the agent
/// (crates/aither-core/src/sandbox/launch.rs `FORWARDED`); any other would end the launcher.
const FORWARDED: &[i32] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// A run refused before anything started.
#[derive(Debug, thiserror::Error)]
pub enum RunRefused {
    #[error("expected 3 or 4 descriptors with the request (stdin, stdout, stderr, and the workspace), got {0}")]
    FdCount(usize),
    #[error(transparent)]
    Request(#[from] super::exec::ExecRefused),
    #[error("uid {uid} already has {max} runs through aitherd (the most at a time); wait for one to end")]
    TooMany { uid: u32, max: usize },
    #[error("{1}")]
    Build(ErrorCode, String),
    /// The run needs what only the standalone path gives it today: aitherctl runs it itself.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl RunRefused {
    fn code(&self) -> ErrorCode {
        match self {
            RunRefused::TooMany { .. } => ErrorCode::Limit,
            RunRefused::Build(c, _) => c.clone(),
            RunRefused::Unsupported(_) => ErrorCode::Unsupported,
            RunRefused::Request(e) => e.code(),
            RunRefused::FdCount(_) => ErrorCode::Invalid,
        }
    }
}

/// Errors of starting or waiting for the launcher (after the run was allowed).
#[derive(Debug, thiserror::Error)]
pub enum RunFailed {
    #[error("creating the config pipe: {0}")]
    Pipe(#[source] std::io::Error),
    #[error("starting the launcher {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the launcher: {0}")]
    Wait(#[source] std::io::Error),
}

/// The runs per caller's uid.
pub type Slots = super::slots::Slots<u32>;
type SlotGuard = super::slots::SlotGuard<u32>;

/// A slot for one more run of `uid`, freed when the guard drops.
fn take_slot(slots: &Arc<Slots>, uid: u32) -> Result<SlotGuard, RunRefused> {
    slots
        .take(&uid, MAX_RUNS_PER_UID)
        .ok_or(RunRefused::TooMany {
            uid,
            max: MAX_RUNS_PER_UID,
        })
}

/// Serves one `run` request; the connection ends with its last reply.
pub async fn serve(
    d: &Shared,
    caller: &Caller,
    req: RunRequest,
    fds: Vec<OwnedFd>,
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
) {
    let label = req
        .name
        .clone()
        .unwrap_or_else(|| if req.token.is_some() { "" } else { "run" }.into());
    let workspace = req.workspace.clone().unwrap_or_else(|| req.cwd.clone());
    let audit = |verdict: Verdict, rule: String, name: &str, extra: serde_json::Value| {
        let mut data = json!({
            "argv": req.argv,
            "workspace": workspace,
            // Values can be secrets: only the keys are recorded.
            "env": req.env.iter().map(|kv| kv.split('=').next().unwrap_or("")).collect::<Vec<_>>(),
            "timeout_ms": req.timeout_ms,
        });
        if let (Some(o), Some(x)) = (data.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        let mut e = Entry::new("run", verdict, rule)
            .actor(caller.actor())
            .caller(caller.uid)
            .via(caller.via_name())
            .owner(caller.uid)
            .data(data);
        if !name.is_empty() {
            e = e.agent(name);
        }
        d.audit.record(e);
    };
    // aitherd's own stages with AITHER_TRACE_LAUNCH=1 in its environment, on its stderr
    // (docs/performance.md "aitherctl run through aitherd"); nothing otherwise.
    crate::trace::mark("aitherd", "run request");
    let admitted = admit(d, caller, &req, fds).await;
    crate::trace::mark("aitherd", "run admitted+spec");
    let (spec, stdio, presented, _slot) = match admitted {
        Ok(x) => x,
        Err(e) => {
            // Declined, not refused: aitherctl runs it standalone, which audits it itself.
            if !matches!(e, RunRefused::Unsupported(_)) {
                audit(
                    Verdict::Deny,
                    format!("{}: {e}", e.code()),
                    &label,
                    json!({}),
                );
            }
            let _ = aio::write_reply(w, &Reply::err(e.code(), e.to_string())).await;
            return;
        }
    };
    audit(
        Verdict::Allow,
        format!("policy {} via a verified token", spec.policy),
        &spec.name,
        json!({}),
    );
    // The caller's AITHER_TRACE_LAUNCH=1 traces the launcher's stages on their stderr, as
    // without aitherd (timings only).
    let trace = req
        .pass_env
        .iter()
        .any(|(k, v)| k == "AITHER_TRACE_LAUNCH" && v == "1");
    crate::trace::mark("aitherd", "run audited");
    let mut launcher = match launcher_for(d, &spec, stdio, presented, trace) {
        Ok(l) => l,
        Err(e) => {
            let _ = aio::write_reply(w, &Reply::err(ErrorCode::LaunchFailed, e.to_string())).await;
            return;
        }
    };
    crate::trace::mark("aitherd", "launcher spawned");
    // The client feeds stdin only from here: a daemon that refused would leave it unread.
    // Replied before the log line: its formatting and its write to aitherd's stderr (a pipe to
    // the journal, which can be full) are not the client's to wait for.
    if aio::write_reply(w, &Reply::ok(json!({"started": true})))
        .await
        .is_err()
    {
        launcher.kill().await;
        return;
    }
    crate::trace::mark("aitherd", "started written");
    tracing::info!(agent = %spec.name, uid = caller.uid, pid = launcher.pid(), "run started");
    // The launcher says the run's code as soon as the agent is done (no process of its
    // sandbox left, the streams drained): a prepared sandbox's `exited`, a cold launcher's
    // status pipe. The client is answered then, and the launcher's teardown (pid 1's exit,
    // the empty namespaces and cgroup) goes on without it.
    let control = launcher.ends.take().and_then(|e| {
        let (fd, pool) = match e {
            Ends::Pool(fd) => (fd, true),
            Ends::Status(fd) => (fd, false),
        };
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open on the same description for
        // as long as it is registered.
        match unsafe { AsyncFd::register(fd) } {
            Ok(a) => Some((a, pool)),
            Err(e) => {
                tracing::warn!(error = %e, "run: watching the launcher's end");
                None
            }
        }
    });
    let mut watch = control.is_some();
    let (code, early) = loop {
        tokio::select! {
            c = exited(control.as_ref()), if watch => match c {
                Some(c) => break (c, true),
                // Gone without `exited` (a refusal, a crash): its exit status says it.
                None => watch = false,
            },
            st = launcher.wait() => match st {
                Ok(c) => break (c, false),
                Err(e) => {
                    let _ = aio::write_reply(w, &Reply::err(ErrorCode::LaunchFailed, e.to_string())).await;
                    return;
                }
            },
            f = aio::read_frame_fds(r.as_ref()) => match f {
                Ok(Some((body, _fds))) => {
                    // Only a known signal is passed on; anything else is dropped (the
                    // launcher's own signals must not become the client's).
                    if let Ok(RunSignal { signal }) = serde_json::from_slice(&body) {
                        if FORWARDED.contains(&signal) {
                            launcher.signal(signal);
                        }
                    }
                }
                // Gone (or a broken stream): the run ends with it.
                _ => {
                    tracing::info!(agent = %spec.name, "run: the client went away; launcher killed");
                    launcher.kill().await;
                    return;
                }
            },
        }
    };
    let warm = launcher.shape.is_some();
    tracing::info!(agent = %spec.name, uid = caller.uid, exit_code = code, warm, "run ended");
    let _ = aio::write_reply(w, &Reply::ok(json!({"exit_code": code}))).await;
    if early {
        // The run keeps its slot (MAX_RUNS_PER_UID) and the pool its accounting until the
        // launcher has exited: a caller cannot pile up teardowns by running again at once.
        let _ = launcher.wait().await;
    }
    drop(control);
    // The pool refills the shape it served only now: a preparation started with the run (or
    // its teardown) would take a CPU from it.
    if let Some(shape) = &launcher.shape {
        d.pool.refill(shape);
    }
}

/// The run's code as the launcher reports it before its teardown: a prepared sandbox's
/// `{"exited":...}` (or `{"failed":...}`, after its text went to the caller's stderr) on its
/// control socket (`pool`), or the line a cold launcher writes to its status pipe. `None`
/// when that end closes (or fails) first: the launcher's exit status says it then.
/// Cancel-safe: a message is read whole or not at all.
async fn exited(end: Option<&(AsyncFd<OwnedFd>, bool)>) -> Option<i32> {
    let (fd, pool) = end?;
    loop {
        let mut guard = fd.readable().await.ok()?;
        let got = guard.try_io(|fd| {
            let fd = fd.get_ref().as_fd();
            if *pool {
                return crate::sandbox::pool::recv(fd).map(|m| match m {
                    Some(PoolMsg::Exited { code, .. } | PoolMsg::Failed { code, .. }) => {
                        Some(Some(code))
                    }
                    // `started`: read on.
                    Some(_) => None,
                    None => Some(None),
                });
            }
            // "N\n" in one write (atomic: far below PIPE_BUF); EOF without it is None.
            let mut buf = [0u8; 16];
            let n = nix::unistd::read(fd, &mut buf)?;
            Ok(Some(
                std::str::from_utf8(&buf[..n])
                    .ok()
                    .and_then(|t| t.trim().parse().ok()),
            ))
        });
        match got {
            Ok(Ok(Some(code))) => return code,
            Ok(Ok(None)) => continue,
            Ok(Err(_)) => return None,
            Err(_would_block) => continue,
        }
    }
}

/// Where a launcher reports the run's code before its teardown (`exited`).
enum Ends {
    /// A prepared sandbox's control socket.
    Pool(OwnedFd),
    /// A cold launcher's status pipe (`--status-fd`), its read end.
    Status(OwnedFd),
}

/// `fd` non-blocking (our own end: a pipe's read end, a socketpair's end), for `exited`.
fn nonblocking(fd: OwnedFd) -> Option<OwnedFd> {
    fcntl(&fd, FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map(|_| fd)
        .map_err(|e| tracing::warn!(error = %e, "run: the launcher's end"))
        .ok()
}

/// A run allowed: its spec, the caller's three streams, the presented workspace, its slot.
type Admitted = (SandboxSpec, [OwnedFd; 3], Option<OwnedFd>, SlotGuard);

/// Stages 1–3: a slot for the caller, the request checked, the spec built.
async fn admit(
    d: &Shared,
    caller: &Caller,
    req: &RunRequest,
    mut fds: Vec<OwnedFd>,
) -> Result<Admitted, RunRefused> {
    let slot = take_slot(&d.runs, caller.uid)?;
    if !(3..=4).contains(&fds.len()) {
        return Err(RunRefused::FdCount(fds.len()));
    }
    let presented = (fds.len() == 4).then(|| fds.pop()).flatten();
    let stdio = super::exec::check(&req.argv, &req.env, None, Terminals::Relayed, fds)?;
    if let Some(ws) = &presented {
        // The workspace as the caller opened it: a directory, nothing else.
        let st = rustix::fs::fstat(ws).map_err(|e| {
            RunRefused::Build(ErrorCode::Io, format!("the workspace descriptor: {e}"))
        })?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
            return Err(RunRefused::Build(
                ErrorCode::Invalid,
                "the fourth descriptor (the workspace) is not a directory".into(),
            ));
        }
    }
    crate::trace::mark("aitherd", "run checked");
    let spec = build_off_the_workers(d, caller, req, presented.as_ref()).await?;
    Ok((spec, stdio, presented, slot))
}

/// `build`, where it may block (the policy file, the workspace's lookups) without holding up
/// the other connections: on a multi-threaded runtime (aitherd's) it runs right here with this
/// worker's other tasks handed to another thread (`block_in_place`), so the request goes on to
/// the prepared launcher and the `started` reply on this thread, without the two wake-ups of a
/// hand-over to the blocking pool and back (≈0.2 ms on a 2-vCPU VM, docs/performance.md
/// "aitherctl run through aitherd, warm"); a current-thread runtime cannot hand its tasks
/// over, so there it takes the blocking pool as before.
async fn build_off_the_workers(
    d: &Shared,
    caller: &Caller,
    req: &RunRequest,
    presented: Option<&OwnedFd>,
) -> Result<SandboxSpec, RunRefused> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        return tokio::task::block_in_place(|| {
            crate::trace::mark("aitherd", "workers handed over");
            build(d, req, caller, presented)
        });
    }
    let (d2, req2, caller2) = (d.clone(), req.clone(), caller.clone());
    let ws = presented
        .map(|f| f.try_clone())
        .transpose()
        .map_err(|e| RunRefused::Build(ErrorCode::Io, format!("the workspace descriptor: {e}")))?;
    tokio::task::spawn_blocking(move || build(&d2, &req2, &caller2, ws.as_ref()))
        .await
        .map_err(|e| RunRefused::Build(ErrorCode::Internal, e.to_string()))?
}

/// The run's spec, through the builder `spawn` uses (`server::prepare_launch`).
fn build(
    d: &Shared,
    req: &RunRequest,
    caller: &Caller,
    presented: Option<&OwnedFd>,
) -> Result<SandboxSpec, RunRefused> {
    use crate::prepare::{Egress, LaunchRequest, Source, WorkspaceKind};
    let lookup = |k: &str| crate::prepare::passed_env(&req.pass_env, k);
    let source = Source::of(req.token.as_deref(), req.policy.as_deref());
    // As `aitherctl run`: a token names its subject; a policy run is `run` unless named.
    let name = match &req.token {
        Some(_) => None,
        None => Some(req.name.as_deref().unwrap_or("run")),
    };
    let launch = LaunchRequest {
        name,
        source,
        ttl: Duration::from_secs(crate::token::RUN_TOKEN_TTL_SECS),
        bus_publish: &[],
        bus_subscribe: &[],
        opts: RunOptions {
            name: None,
            workspace: req.workspace.clone(),
            env: req.env.clone(),
            timeout: req.timeout_ms.map(Duration::from_millis),
            memory: req.memory.map(crate::units::Size),
            cpus: req.cpus,
            pids: req.pids,
            argv: req.argv.clone(),
        },
        cwd: &req.cwd,
        env: &lookup,
        workspace: WorkspaceKind::presented_or_host(presented.map(AsFd::as_fd)),
        egress: Egress::Gateway,
    };
    let audit_name = name.unwrap_or("run");
    let p = super::server::prepare_launch_as(d, caller, audit_name, &launch, true)
        .map_err(|(c, m)| RunRefused::Build(c, m))?;
    if p.egress {
        // aitherd's gateway keys its state by agent name (a run's name is not unique) and the
        // cold launcher has no channel for the listener yet: `aitherctl run` serves this run's
        // egress in-process, as without aitherd.
        return Err(RunRefused::Unsupported(
            "a run with egress grants is served by aitherctl itself (its in-process gateway)",
        ));
    }
    let mut spec = p.spec;
    spec.report = false;
    if let Some(w) = spec.workspace.as_mut() {
        w.as_owner = req.workspace_as_owner;
    }
    Ok(spec)
}

/// A started launcher: the process that runs the sandbox for the caller's descriptors, gets
/// the forwarded signals, and exits with the run's code.
pub struct Launcher {
    child: tokio::process::Child,
    pid: i32,
    /// Where it reports the run's code before its teardown (non-blocking; `serve` reads it).
    /// A prepared sandbox's control socket stays open until the launcher exits (its closing
    /// before the final spec would mean "dismissed").
    ends: Option<Ends>,
    /// Served by a prepared sandbox of this shape (daemon/pool.rs): it is refilled when the
    /// run ends.
    shape: Option<String>,
}

impl Launcher {
    /// The launcher's pid (signals go there; never reused while `child` is unreaped).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` to the launcher, which forwards it to the agent.
    fn signal(&self, sig: i32) {
        // Still our unreaped child (wait has not returned): its pid names it.
        if self.child.id().is_some() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::try_from(sig).ok(),
            );
        }
    }

    /// The run's exit code: the launcher's status, 128+N when it was killed by signal N.
    async fn wait(&mut self) -> Result<i32, RunFailed> {
        let st = self.child.wait().await.map_err(RunFailed::Wait)?;
        use std::os::unix::process::ExitStatusExt;
        Ok(st
            .code()
            .or_else(|| st.signal().map(|s| 128 + s))
            .unwrap_or(125))
    }

    /// Kills the launcher (the sandbox dies with it: pid 1's parent-death signal) and reaps it.
    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The ONE place a run's launcher comes from: a prepared sandbox of the spec's shape when the
/// pool has one waiting (daemon/pool.rs: the final spec and the descriptors go to it on its
/// control socket), else a cold `aither-init --config-fd 3` (a single-threaded process:
/// aitherd is multithreaded and never forks into a sandbox) with the caller's three
/// descriptors as its stdio and the spec on fd 3. Either process forwards the signals it gets
/// to the agent and exits with the run's code.
pub fn launcher_for(
    d: &Shared,
    spec: &SandboxSpec,
    stdio: [OwnedFd; 3],
    workspace: Option<OwnedFd>,
    trace: bool,
) -> Result<Launcher, RunFailed> {
    // Warm: a prepared sandbox of this shape, if one waits (daemon/pool.rs). It gets the
    // workspace as the caller presented it and opens it itself, checked against that
    // descriptor, as the cold launcher does.
    if let Some(ready) = d.pool.take(spec) {
        let (pid, shape) = (ready.pid(), ready.shape().to_string());
        let [a, b, c] = &stdio;
        match ready.start(
            spec,
            [a.as_fd(), b.as_fd(), c.as_fd()],
            workspace.as_ref().map(|w| w.as_fd()),
        ) {
            Ok((child, control)) => {
                // Non-blocking for `exited`'s reads: the launcher reads nothing more from it.
                return Ok(Launcher {
                    child,
                    pid,
                    ends: nonblocking(control).map(Ends::Pool),
                    shape: Some(shape),
                });
            }
            // It went away between the check and the send: dropped (torn down), cold instead.
            Err(e) => {
                tracing::warn!(error = %e, "pool: a prepared sandbox did not take the final spec; launching cold");
            }
        }
    }
    let init = d.init.as_path();
    // The cold launcher opens the workspace itself, checked against the identity `prepare`
    // pinned from the descriptor the caller presented.
    drop(workspace);
    let (config_r, config_w) = crate::sys::pipe().map_err(RunFailed::Pipe)?;
    let (status_r, status_w) = crate::sys::pipe().map_err(RunFailed::Pipe)?;
    let [stdin, stdout, stderr] = stdio;
    let mut cmd = Command::new(init);
    cmd.arg("--config-fd")
        .arg(CONFIG_FD.to_string())
        .arg("--status-fd")
        .arg(STATUS_FD.to_string())
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .env_clear()
        .kill_on_drop(true);
    if trace {
        cmd.env("AITHER_TRACE_LAUNCH", "1");
    }
    let (src, st) = (config_r.as_raw_fd(), status_w.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2), none that
    // allocates, on descriptors that stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // Both moved up first: dup2 onto its own number would keep close-on-exec, and the
            // first dup2 must not land on the second's source.
            let high = fcntl(BorrowedFd::borrow_raw(src), FcntlArg::F_DUPFD_CLOEXEC(10))?;
            let high_st = fcntl(BorrowedFd::borrow_raw(st), FcntlArg::F_DUPFD_CLOEXEC(10))?;
            // Raw: nix's dup2 wants the target as an OwnedFd (nothing owns that number here).
            Errno::result(libc::dup2(high, CONFIG_FD))?;
            Errno::result(libc::dup2(high_st, STATUS_FD))?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| RunFailed::Spawn {
        path: init.to_path_buf(),
        source,
    })?;
    // Our copies of the caller's descriptors close now: the client sees EOF on its pipes when
    // the agent's copies close.
    drop(cmd);
    drop(config_r);
    // Ours closes: EOF on the status pipe when the launcher is gone without a status.
    drop(status_w);
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let body = serde_json::to_vec(spec).expect("a spec serialises");
    // A write error means the launcher died: its exit status says why.
    if body.len() <= SMALL_SPEC {
        // Fits in the pipe: one write that never waits for the launcher.
        let _ = crate::sys::write_all_once(config_w.as_fd(), &body);
    } else {
        // Would block until the launcher reads: off the async workers.
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let _ = std::fs::File::from(config_w).write_all(&body);
        });
    }
    Ok(Launcher {
        child,
        pid,
        ends: nonblocking(status_r).map(Ends::Status),
        shape: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_sixteen_runs_per_uid_and_a_slot_frees_on_drop() {
        let slots = Arc::new(Slots::default());
        let held: Vec<SlotGuard> = (0..MAX_RUNS_PER_UID)
            .map(|_| take_slot(&slots, 1000).unwrap())
            .collect();
        assert!(matches!(
            take_slot(&slots, 1000),
            Err(RunRefused::TooMany { uid: 1000, .. })
        ));
        // Another uid's are its own.
        drop(take_slot(&slots, 1001).unwrap());
        drop(held);
        assert!(slots.is_empty(), "no entry left behind");
        assert!(take_slot(&slots, 1000).is_ok());
    }
}
