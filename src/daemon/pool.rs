//! Warm start (issue 21, docs/daemon.md "Warm start"): prepared sandboxes for the runs aitherd
//! serves (`aitherctl run` through aitherd, daemon/run.rs) and the agents it spawns
//! (daemon/agent.rs `launch`: the prepared sandbox's launcher becomes the agent's shim,
//! daemon/shim.rs `launch_warm`).
//!
//! A prepared sandbox is one `aither-init pool --control-fd 3` process
//! (crates/aither-core/src/sandbox/pool.rs): it has made everything of a sandbox that does not
//! depend on the caller (cgroups with their limits, the namespaces, pid 1's mounts but the
//! workspace, loopback up) and waits for the final spec. Each is used once.
//!
//! What is prepared, and for whom:
//! - **Shapes are learnt from runs** (and spawns). A sandbox's *shape* is `SandboxSpec::prepared_key`: the
//!   digest of every field but the caller's own (name, hostname, argv, env, cwd, workspace,
//!   timeout, report). The first run of a shape is launched cold and makes the shape known;
//!   later runs of the same shape take a prepared sandbox. A prepared sandbox therefore only
//!   ever serves a spec whose namespaces, limits, mounts, identities, rlimits, Landlock rights
//!   and seccomp filter are those it was built with: the pool launcher checks the key again
//!   against its template before it takes the final spec, and refuses a mismatch.
//! - **Nothing of a caller is in a template**: the caller-dependent fields are placeholders,
//!   and the workspace is none; a prepared sandbox has run nothing, and its /tmp is empty.
//! - **Not pooled**: runs with egress, published ports, GPU devices, a layered workspace or
//!   `--workspace-as-owner` (`launch::prepare` refuses them); they are launched cold.
//!
//! Bounds (aitherd.toml `[pool]`): at most `size` prepared sandboxes per shape, `max_shapes`
//! shapes (the least recently used goes first), and `memory_budget` for all of them together,
//! measured as each prepared sandbox's launcher and pid 1 proportional set size (PSS) once it
//! is ready. A shape not used for `idle` gives its sandboxes back. Dropping a prepared
//! sandbox closes its control socket: the pool launcher tears it down (pid 1 killed, cgroups
//! removed); aitherd's exit does the same for all of them.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use tokio::io::unix::AsyncFd;
use tokio::process::Command;

use crate::sandbox::pool::{self as wire, PoolMsg};
use crate::sandbox::SandboxSpec;

use super::config::PoolSection;

/// Where `aither-init pool` finds its control socket.
const CONTROL_FD: i32 = 3;

/// How long a prepared sandbox may take to become ready before it is given up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a prepared sandbox is assumed to cost before one of its shape has been measured.
const FIRST_ESTIMATE: u64 = 1 << 20;

/// A prepared sandbox, ready for one final spec.
pub struct Ready {
    child: tokio::process::Child,
    control: OwnedFd,
    pid: i32,
    bytes: u64,
    /// Its shape's key (`SandboxSpec::prepared_key`), for the refill after its run.
    shape: String,
}

impl Ready {
    /// Its shape's key: what `Pool::refill` takes once its run has ended.
    pub fn shape(&self) -> &str {
        &self.shape
    }

    /// The pool launcher's pid (signals go there).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Hands a supervised spawn to the prepared sandbox: its launcher becomes the agent's
    /// shim (`cfg`), with the agent's end of the channel, aitherd's end and the shim's stderr.
    /// The child and the control socket (where the shim's one event comes) are the spawn's
    /// from here. A failed send drops the prepared sandbox (torn down).
    pub fn start_shim(
        self,
        cfg: &crate::sandbox::shim::ShimConfig,
        channel: BorrowedFd<'_>,
        keep: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> std::io::Result<(tokio::process::Child, OwnedFd)> {
        wire::send_final_shim(self.control.as_fd(), cfg, channel, keep, stderr)?;
        Ok((self.child, self.control))
    }

    /// Hands the final spec and the caller's descriptors to the prepared sandbox. The child
    /// and the control socket are the run's from here: the launcher exits with the run's code.
    /// A failed send drops the prepared sandbox (torn down).
    pub fn start(
        self,
        spec: &SandboxSpec,
        stdio: [BorrowedFd<'_>; 3],
        workspace: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<(tokio::process::Child, OwnedFd)> {
        // On an error `self` drops here: its control socket closes and the launcher tears
        // the sandbox down.
        wire::send_final(self.control.as_fd(), spec, stdio, workspace)?;
        Ok((self.child, self.control))
    }
}

/// One shape's prepared sandboxes.
struct Shape {
    template: Arc<SandboxSpec>,
    ready: VecDeque<Ready>,
    preparing: usize,
    last_used: Instant,
    /// The PSS of the last one measured (the estimate for the next).
    estimate: u64,
    /// The pool launcher refused the template (not poolable): never prepared again.
    refused: Option<String>,
}

#[derive(Default)]
struct Inner {
    shapes: HashMap<String, Shape>,
    /// Measured bytes of every ready sandbox plus the estimates of those being prepared.
    bytes: u64,
    sweeper: bool,
}

/// The pool: shapes learnt from runs, their prepared sandboxes, the budget.
pub struct Pool {
    init: PathBuf,
    cfg: PoolSection,
    inner: Mutex<Inner>,
}

/// A template's name: the prepared sandboxes' cgroups are `pool-<launcher pid>`, which a warm
/// spawn's keeps (daemon/recover.rs finds its shim by it).
pub const TEMPLATE_NAME: &str = "pool";

/// The template of `spec`'s shape: its caller-dependent fields placeholders, no workspace.
fn template_of(spec: &SandboxSpec) -> SandboxSpec {
    let mut t = spec.clone();
    // The cgroup directories are named after the template: `pool-<launcher pid>`.
    t.name = TEMPLATE_NAME.into();
    t.hostname = "pool".into();
    t.argv = vec!["/bin/true".into()];
    t.env = Vec::new();
    t.cwd = "/".into();
    t.workspace = None;
    t.timeout = None;
    t.report = false;
    t
}

/// Whether `spec` could be served by a prepared sandbox at all (asked here to spare
/// `aither-init pool` a process for a shape it would refuse).
fn poolable(spec: &SandboxSpec) -> bool {
    crate::sandbox::launch::poolable(spec).is_ok()
}

/// The proportional set size of `pid` in bytes (0 when it cannot be read).
fn pss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let rest = l.strip_prefix("Pss:")?;
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kb| kb * 1024)
}

impl Pool {
    pub fn new(init: &Path, cfg: PoolSection) -> Pool {
        Pool {
            init: init.to_path_buf(),
            cfg,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enabled(&self) -> bool {
        self.cfg.size > 0 && self.cfg.max_shapes > 0
    }

    /// A prepared sandbox for `spec`'s shape, if one is waiting. Either way the shape is
    /// (re)learnt and refilled in the background.
    pub fn take(self: &Arc<Self>, spec: &SandboxSpec) -> Option<Ready> {
        if !self.enabled() || !poolable(spec) {
            return None;
        }
        let key = spec.prepared_key();
        let mut g = self.lock();
        let inner = &mut *g;
        let got = match inner.shapes.get_mut(&key) {
            Some(shape) => {
                shape.last_used = Instant::now();
                let mut got = None;
                while let Some(mut r) = shape.ready.pop_front() {
                    inner.bytes = inner.bytes.saturating_sub(r.bytes);
                    // A launcher that died while it waited (its pid 1 killed from outside) is
                    // dropped; the next one is tried.
                    if matches!(r.child.try_wait(), Ok(None)) {
                        got = Some(r);
                        break;
                    }
                }
                got
            }
            None => {
                // A new shape: the least recently used goes when there are too many.
                if inner.shapes.len() >= self.cfg.max_shapes {
                    if let Some(old) = inner
                        .shapes
                        .iter()
                        .min_by_key(|(_, s)| s.last_used)
                        .map(|(k, _)| k.clone())
                    {
                        if let Some(s) = inner.shapes.remove(&old) {
                            let freed: u64 = s.ready.iter().map(|r| r.bytes).sum();
                            inner.bytes = inner.bytes.saturating_sub(freed);
                        }
                    }
                }
                inner.shapes.insert(
                    key.clone(),
                    Shape {
                        template: Arc::new(template_of(spec)),
                        ready: VecDeque::new(),
                        preparing: 0,
                        last_used: Instant::now(),
                        estimate: FIRST_ESTIMATE,
                        refused: None,
                    },
                );
                None
            }
        };
        let sweep = !std::mem::replace(&mut inner.sweeper, true);
        drop(g);
        if sweep {
            let me = Arc::downgrade(self);
            tokio::spawn(async move { sweeper(me).await });
        }
        if got.is_none() {
            // Nothing waiting: start preparing now (a run that found one refills when it ends,
            // so that the preparation does not take the CPU from the run it served).
            self.refill(&key);
        }
        got
    }

    /// Prepares sandboxes for the shape `key` (`Ready::shape`) up to the pool's bounds, in the
    /// background.
    pub fn refill(self: &Arc<Self>, key: &str) {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(shape) = inner.shapes.get_mut(key) else {
            return;
        };
        if shape.refused.is_some() {
            return;
        }
        let mut starts = Vec::new();
        while shape.ready.len() + shape.preparing < self.cfg.size
            && inner.bytes + shape.estimate <= self.cfg.memory_budget.0
        {
            shape.preparing += 1;
            inner.bytes += shape.estimate;
            starts.push((shape.template.clone(), shape.estimate));
        }
        drop(g);
        for (template, estimate) in starts {
            let me = self.clone();
            let key = key.to_string();
            tokio::spawn(async move {
                let got = prepare_one(&me.init, &template, &key).await;
                me.prepared_or_failed(&key, estimate, got);
            });
        }
    }

    fn prepared_or_failed(&self, key: &str, estimate: u64, got: Result<Ready, String>) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.bytes = inner.bytes.saturating_sub(estimate);
        let Some(shape) = inner.shapes.get_mut(key) else {
            // Its shape went (evicted, idle) while it was prepared: dropped, torn down.
            return;
        };
        shape.preparing = shape.preparing.saturating_sub(1);
        match got {
            Ok(r) => {
                shape.estimate = r.bytes.max(1);
                if inner.bytes + r.bytes <= self.cfg.memory_budget.0 {
                    inner.bytes += r.bytes;
                    shape.ready.push_back(r);
                }
                // else: over the budget once measured: dropped here (torn down).
            }
            Err(why) => {
                tracing::warn!(shape = %key, policy = %shape.template.policy, error = %why, "pool: a sandbox could not be prepared");
                // A refusal of the template is final for this shape; anything else (a
                // transient launch failure) is retried by the next run of the shape.
                if why.starts_with("refused: ") {
                    shape.refused = Some(why);
                    let freed: u64 = shape.ready.drain(..).map(|r| r.bytes).sum();
                    inner.bytes = inner.bytes.saturating_sub(freed);
                }
            }
        }
    }

    /// Gives back the sandboxes of shapes not used for `idle`; true while any shape is left.
    fn sweep(&self) -> bool {
        let idle = self.cfg.idle.0;
        let mut g = self.lock();
        let inner = &mut *g;
        let before = inner.shapes.len();
        let mut freed = 0;
        inner.shapes.retain(|_, s| {
            let keep = s.last_used.elapsed() < idle;
            if !keep {
                freed += s.ready.iter().map(|r| r.bytes).sum::<u64>();
            }
            keep
        });
        inner.bytes = inner.bytes.saturating_sub(freed);
        if inner.shapes.len() != before {
            tracing::info!(
                released = before - inner.shapes.len(),
                "pool: idle shapes released"
            );
        }
        if inner.shapes.is_empty() {
            inner.sweeper = false;
        }
        !inner.shapes.is_empty()
    }
}

async fn sweeper(pool: std::sync::Weak<Pool>) {
    loop {
        let period = match pool.upgrade() {
            Some(p) => (p.cfg.idle.0 / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)),
            None => return,
        };
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(p) if p.sweep() => continue,
            _ => return,
        }
    }
}

/// Starts one `aither-init pool` for `template` and waits until it is ready.
async fn prepare_one(init: &Path, template: &SandboxSpec, shape: &str) -> Result<Ready, String> {
    let (ours, theirs) = crate::sys::seqpacket_pair().map_err(|e| format!("socketpair: {e}"))?;
    let body = serde_json::to_vec(template).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(init);
    cmd.arg("pool")
        .arg("--control-fd")
        .arg(CONTROL_FD.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_clear()
        // Its end of the control socket closing is what tears a prepared sandbox down; a kill
        // would leave its cgroups to the next launcher's garbage collection.
        .kill_on_drop(false);
    if crate::trace::enabled() {
        // aitherd traced (AITHER_TRACE_LAUNCH=1): its prepared launchers trace their finish on
        // aitherd's stderr (timings only).
        cmd.env("AITHER_TRACE_LAUNCH", "1").stderr(Stdio::inherit());
    }
    let src = theirs.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2), none that
    // allocates, on a descriptor that stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // Moved up first: dup2 onto its own number would keep close-on-exec.
            let high = fcntl(BorrowedFd::borrow_raw(src), FcntlArg::F_DUPFD_CLOEXEC(10))?;
            // Raw: nix's dup2 wants the target as an OwnedFd (nothing owns that number here).
            Errno::result(libc::dup2(high, CONTROL_FD))?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", init.display()))?;
    drop(cmd);
    drop(theirs);
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        // Closed after the write: the launcher reads the template to EOF.
        stdin
            .write_all(&body)
            .await
            .map_err(|e| format!("writing the template: {e}"))?;
    }
    let ready = tokio::time::timeout(READY_TIMEOUT, recv_msg(&ours)).await;
    match ready {
        Ok(Ok(Some(PoolMsg::Ready { pid1, .. }))) => {
            let bytes = pss(pid) + pss(pid1);
            Ok(Ready {
                child,
                control: ours,
                pid,
                bytes,
                shape: shape.to_string(),
            })
        }
        Ok(Ok(Some(PoolMsg::Refused(why)))) => {
            let _ = child.wait().await;
            Err(format!("refused: {why}"))
        }
        Ok(Ok(Some(other))) => Err(format!("unexpected message {other:?}")),
        Ok(Ok(None)) => {
            let st = child.wait().await;
            Err(format!(
                "the pool launcher exited before it was ready ({st:?})"
            ))
        }
        Ok(Err(e)) => Err(format!("reading its control socket: {e}")),
        Err(_) => {
            let _ = child.start_kill();
            Err(format!("not ready within {READY_TIMEOUT:?}"))
        }
    }
}

/// Whether aitherd's spawns may be served warm here: a cold shim that re-executes itself in a
/// systemd scope of its own (`delegate::into_own_scope`, older systemd with aitherd in no
/// delegated leaf) could not be stood in for by a pool launcher, which stays in aitherd's
/// cgroup; those hosts keep the cold shim for every spawn. Asked once.
pub fn warm_spawns() -> bool {
    static WARM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WARM.get_or_init(|| {
        use crate::cgroup::delegate;
        delegate::scope_command(delegate::ScopeKind::Shim, Path::new("aither-init"), &[]).is_none()
    })
}

/// The shim's event from a prepared sandbox become a shim (`Ready::start_shim`); `None`: it
/// exited without one.
pub async fn recv_shim_event(fd: &OwnedFd) -> std::io::Result<Option<Vec<u8>>> {
    recv_async(fd, wire::recv_shim_event).await
}

/// One message of the pool launcher, without holding a thread while it prepares.
async fn recv_msg(fd: &OwnedFd) -> std::io::Result<Option<PoolMsg>> {
    recv_async(fd, wire::recv).await
}

/// `recv` (a blocking receive of one packet) on the runtime: waits for `fd` to be readable.
async fn recv_async<T>(
    fd: &OwnedFd,
    recv: impl Fn(std::os::fd::BorrowedFd<'_>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    // A copy of the same open description: non-blocking for both (the final spec's send is
    // one small packet into an empty socket buffer, which does not block either way).
    let dup = fd.try_clone()?;
    nix::fcntl::fcntl(&dup, FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
    // SAFETY: an OwnedFd stays open, on the same description, for as long as the AsyncFd
    // that owns it.
    let afd = unsafe { AsyncFd::register(dup) }.map_err(std::io::Error::from)?;
    loop {
        let mut guard = afd.readable().await?;
        match guard.try_io(|inner| recv(inner.get_ref().as_fd())) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}
