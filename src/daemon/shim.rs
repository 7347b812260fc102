//! The daemon's side of the per-agent launcher (`aither-init shim`, docs/architecture.md
//! "Process model"): aitherd is multithreaded, so it never forks a sandbox itself; it starts
//! one single-threaded shim per run, which builds the sandbox with the same library code as
//! `aitherctl run`, captures the agent's output into size-rotated files, and records how the
//! run ended in `exit.json`. The shim outlives a daemon crash, so agents keep running and
//! logging while aitherd is down.

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::sandbox::SandboxSpec;

/// The descriptor numbers the shim inherits: the agent's end of the channel (it becomes the
/// agent's fd 3) and the daemon's own end, kept by the shim so that a restarted daemon can
/// take it back with pidfd_getfd.
pub const SHIM_CHANNEL_FD: RawFd = crate::sandbox::shim::HANDED_FDS[0];
pub const SHIM_KEEP_FD: RawFd = crate::sandbox::shim::HANDED_FDS[1];
/// Where the shim keeps the egress gateway's socket (docs/network.md).
pub use crate::sandbox::shim::SHIM_EGRESS_FD;
/// Where the shim keeps a descriptor of the sandbox's network namespace.
pub use crate::sandbox::shim::SHIM_NETNS_FD;

/// Log rotation: agent.log grows to this, then rotates; this many files are kept.
pub const LOG_MAX_BYTES: u64 = 1 << 20;
pub const LOG_KEEP: u32 = 3;
/// The most files a reader looks for (`[retention] agent_log_keep` is at most 100): files a
/// run rotated under a larger setting are still read.
pub const LOG_KEEP_MAX: u32 = 101;

/// How an agent's log rotates (`[retention]` of aitherd.toml, for the next run).
#[derive(Clone, Copy, Debug)]
pub struct LogRotation {
    pub max_bytes: u64,
    pub keep: u32,
}

/// Errors of starting or reaching a shim.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("starting the launcher {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the agent channel: {0}")]
    Channel(#[source] io::Error),
    #[error("preparing {path}: {source}")]
    LogDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the launcher said nothing before exiting ({0})")]
    Silent(String),
    #[error("the launcher's report is not understood: {0}")]
    BadReport(String),
    #[error("the sandbox did not start within {0:?}")]
    Timeout(Duration),
    /// The sandbox could not be built (the launcher's exit code: 125, 126, 127).
    #[error("{error}")]
    Launch { code: i32, error: String },
}

/// The shim's one line: the report is parsed as JSON (an internally tagged enum cannot hold
/// a RawValue) and kept as text afterwards.
type Report = aither_proto::ShimEvent<serde_json::Value>;

/// What the shim wrote when the run ended (log_dir/exit.json).
pub use aither_proto::ExitRecord;

/// A running shim: started by us, or adopted after a daemon restart.
pub struct Live {
    pub shim_pid: i32,
    pub pidfd: AsyncFd<OwnedFd>,
    pub pid1: Option<i32>,
    pub agent_pid: Option<i32>,
    pub cgroup_id: String,
    /// The daemon's end of the agent channel.
    pub channel: Option<OwnedFd>,
    /// Our child when we started it (reaped on exit).
    child: Option<Child>,
    pub log_dir: PathBuf,
    /// Adopted from a previous daemon that had seen it ready.
    pub was_ready: bool,
    /// The enforcement report of this run (not known for an adopted run).
    pub report: Option<Box<serde_json::value::RawValue>>,
    /// The egress gateway's listening socket (inside the sandbox's network namespace), taken
    /// from the shim.
    pub egress: Option<OwnedFd>,
    /// The sandbox's network namespace, taken from the shim (its fd 101, opened by the
    /// launcher before the agent existed): where published ports are reached. None for a
    /// sandbox on the host's network, or a shim of an older aitherd.
    pub netns: Option<OwnedFd>,
    /// Served by a prepared sandbox (daemon/pool.rs, `launch_warm`): its launcher is the shim.
    pub warm: bool,
}

impl Live {
    /// Waits for the shim to end; then its exit record (None: it vanished without one).
    pub async fn wait(&mut self) -> Option<ExitRecord> {
        match self.child.as_mut() {
            Some(c) => {
                let _ = c.wait().await;
            }
            None => {
                // A pidfd turns readable when its process exits (Linux ≥ 5.3), child or not.
                if let Ok(mut g) = self.pidfd.readable().await {
                    g.retain_ready();
                }
            }
        }
        read_exit(&self.log_dir)
    }

    /// A handle that signals the shim while `wait` is pending.
    pub fn signaller(&self) -> io::Result<Signaller> {
        Ok(Signaller(self.pidfd.get_ref().try_clone()?))
    }
}

/// Signals a shim through its pidfd (it forwards SIGTERM and friends to the agent).
pub struct Signaller(OwnedFd);

impl Signaller {
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        crate::sys::pidfd_send_signal(self.0.as_fd(), sig)
    }
}

pub fn read_exit(log_dir: &Path) -> Option<ExitRecord> {
    let text = std::fs::read_to_string(log_dir.join("exit.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn watch_pidfd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open, on the same description, for as long as the AsyncFd
    // that owns it.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Creates the agent's log directory, root-only.
pub fn prepare_log_dir(dir: &Path) -> Result<(), ShimError> {
    use std::os::unix::fs::DirBuilderExt;
    let e = |source| ShimError::LogDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(e)?;
    // Checked through its fd: root's, no group or other access (narrowed if wider), no link.
    let d = crate::hostpath::private_dir(dir).map_err(|x| e(io::Error::other(x)))?;
    match rustix::fs::unlinkat(&d, "exit.json", rustix::fs::AtFlags::empty()) {
        Err(rustix::io::Errno::NOENT) | Ok(()) => {}
        Err(x) => return Err(e(x.into())),
    }
    Ok(())
}

/// Starts a shim for `spec` and waits until the sandbox runs (or failed to start).
pub async fn launch(
    init: &Path,
    spec: &SandboxSpec,
    log_dir: &Path,
    rotation: LogRotation,
    start_timeout: Duration,
) -> Result<Live, ShimError> {
    prepare_log_dir(log_dir)?;
    let (ours, theirs) = crate::sys::stream_pair().map_err(ShimError::Channel)?;
    let config = shim_config(spec, log_dir, rotation);
    let shim_log = open_shim_log(log_dir)?;
    // The shim's stdin is a socket: the two channel ends go over it with the config
    // (`receive_handed_fds` in the shim puts them at 3 and 4), so no `pre_exec` has to move
    // them, and without one the standard library starts the shim with posix_spawn
    // (CLONE_VM|CLONE_VFORK) instead of forking aitherd, its page tables and all, per spawn.
    let (hand, their_hand) = crate::sys::stream_pair().map_err(ShimError::Channel)?;
    let mut cmd = Command::new(init);
    // The shim's working directory is its agent's log directory: that is how a restarted
    // daemon tells its own shims from those of another daemon (another state directory).
    cmd.arg("shim")
        .current_dir(log_dir)
        .stdin(Stdio::from(their_hand))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(shim_log))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .kill_on_drop(false);
    let spawned = cmd.spawn();
    // Our copies of the shim's stdin and stderr go now: the shim must see the end of its
    // config when we close `hand`.
    drop(cmd);
    let mut child = spawned.map_err(|source| ShimError::Spawn {
        path: init.to_path_buf(),
        source,
    })?;
    // The descriptors go with the first byte; a fresh socket's buffer takes it at once, and
    // a shim that died already makes this fail (its report, or silence, tells why below).
    let handed = super::proto::send_with_fds(hand.as_fd(), b"F", &[theirs.as_fd(), ours.as_fd()]);
    drop(theirs);
    let shim_pid = child.id().map(|p| p as i32).unwrap_or(0);
    let pidfd = crate::sys::pidfd_open(shim_pid).map_err(|source| ShimError::Spawn {
        path: init.to_path_buf(),
        source,
    })?;
    let stdout = child.stdout.take().expect("piped stdout");
    let body = serde_json::to_vec(&config).expect("config serialises");
    let report = async {
        // A write error means the shim died: its report (or silence) tells why.
        if handed.is_ok() {
            let sock = std::os::unix::net::UnixStream::from(hand);
            if sock.set_nonblocking(true).is_ok() {
                if let Ok(mut stdin) = tokio::net::UnixStream::from_std(sock) {
                    let _ = stdin.write_all(&body).await;
                }
            }
        } else {
            drop(hand);
        }
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .await
            .map(|_| line)
    };
    let line = match tokio::time::timeout(start_timeout, report).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return Err(ShimError::Silent(e.to_string())),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(ShimError::Timeout(start_timeout));
        }
    };
    reported(&line, spec, log_dir, shim_pid, pidfd, ours, child, false).await
}

/// The config a shim (cold or warm) gets for `spec`.
fn shim_config(
    spec: &SandboxSpec,
    log_dir: &Path,
    rotation: LogRotation,
) -> crate::sandbox::shim::ShimConfig {
    crate::sandbox::shim::ShimConfig {
        spec: spec.clone(),
        log_dir: log_dir.to_path_buf(),
        log_max_bytes: rotation.max_bytes,
        log_keep: rotation.keep,
        channel_fd: Some(SHIM_CHANNEL_FD),
        keep_fd: Some(SHIM_KEEP_FD),
    }
}

/// log_dir/shim.log, the shim's stderr (appended to).
fn open_shim_log(log_dir: &Path) -> Result<std::fs::File, ShimError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(log_dir.join("shim.log"))
        .map_err(|source| ShimError::LogDir {
            path: log_dir.join("shim.log"),
            source,
        })
}

/// A spawn served by a prepared sandbox of its shape (daemon/pool.rs): its launcher becomes
/// the agent's shim (crates/aither-core/src/sandbox/pool.rs `become_shim`) with this config
/// and these descriptors, exactly what a cold shim gets, and reports `started` or `failed` on
/// its control socket instead of its stdout. `None`: the prepared sandbox did not take the
/// spawn (it went away meanwhile; dropped, torn down): launch cold instead.
pub async fn launch_warm(
    ready: super::pool::Ready,
    spec: &SandboxSpec,
    log_dir: &Path,
    rotation: LogRotation,
    start_timeout: Duration,
) -> Option<Result<Live, ShimError>> {
    let setup = (|| {
        prepare_log_dir(log_dir)?;
        let pair = crate::sys::stream_pair().map_err(ShimError::Channel)?;
        Ok::<_, ShimError>((pair, open_shim_log(log_dir)?))
    })();
    let ((ours, theirs), shim_log) = match setup {
        Ok(x) => x,
        // `ready` drops: torn down; the cold launch reports the same error.
        Err(_) => return None,
    };
    let shim_pid = ready.pid();
    let config = shim_config(spec, log_dir, rotation);
    let (mut child, control) = match ready.start_shim(
        &config,
        theirs.as_fd(),
        ours.as_fd(),
        shim_log.as_fd(),
    ) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "pool: a prepared sandbox did not take the spawn; launching cold");
            return None;
        }
    };
    // The shim (and pid 1 through the final message) hold their own copies.
    drop(theirs);
    drop(shim_log);
    // Our unreaped child: its pid names it.
    let pidfd = match crate::sys::pidfd_open(shim_pid) {
        Ok(p) => p,
        Err(source) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Some(Err(ShimError::Spawn {
                path: PathBuf::from("aither-init pool"),
                source,
            }));
        }
    };
    let event =
        match tokio::time::timeout(start_timeout, super::pool::recv_shim_event(&control)).await {
            Ok(Ok(e)) => e.unwrap_or_default(),
            Ok(Err(e)) => return Some(Err(ShimError::Silent(e.to_string()))),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Some(Err(ShimError::Timeout(start_timeout)));
            }
        };
    // Nothing more comes on it: the shim no longer depends on aitherd.
    drop(control);
    let line = String::from_utf8_lossy(&event);
    Some(reported(&line, spec, log_dir, shim_pid, pidfd, ours, child, true).await)
}

/// A shim's one report (`started` or `failed`, or nothing), as a `Live` or the launch's error.
#[allow(clippy::too_many_arguments)]
async fn reported(
    line: &str,
    spec: &SandboxSpec,
    log_dir: &Path,
    shim_pid: i32,
    pidfd: OwnedFd,
    ours: OwnedFd,
    mut child: Child,
    warm: bool,
) -> Result<Live, ShimError> {
    if line.trim().is_empty() {
        let st = child.wait().await;
        let tail = std::fs::read_to_string(log_dir.join("shim.log"))
            .ok()
            .and_then(|t| t.lines().last().map(str::to_string))
            .unwrap_or_default();
        return Err(ShimError::Silent(format!(
            "{}{}",
            st.map(|s| s.to_string()).unwrap_or_default(),
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            }
        )));
    }
    match serde_json::from_str::<Report>(line.trim()) {
        Ok(Report::Started {
            pid1,
            agent_pid,
            cgroup,
            report,
        }) => Ok(Live {
            egress: spec
                .egress_port
                .and_then(|_| crate::sys::pidfd_getfd(pidfd.as_fd(), SHIM_EGRESS_FD).ok()),
            netns: spec
                .new_net_ns
                .then(|| crate::sys::pidfd_getfd(pidfd.as_fd(), SHIM_NETNS_FD).ok())
                .flatten(),
            report: report.and_then(|r| serde_json::value::to_raw_value(&r).ok()),
            shim_pid,
            pidfd: watch_pidfd(pidfd).map_err(ShimError::Channel)?,
            pid1: Some(pid1),
            agent_pid,
            cgroup_id: cgroup,
            channel: Some(ours),
            child: Some(child),
            log_dir: log_dir.to_path_buf(),
            was_ready: false,
            warm,
        }),
        Ok(Report::Failed { code, error }) => {
            let _ = child.wait().await;
            Err(ShimError::Launch { code, error })
        }
        Err(e) => {
            let _ = child.wait().await;
            Err(ShimError::BadReport(format!("{e}: {line:?}")))
        }
    }
}

/// A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid, it
/// names one process for good (pids are reused).
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is a shim: `aither-init shim`, or `aither-init pool` (a prepared sandbox's
/// launcher, which becomes a spawn's shim: `launch_warm`; one still waiting is told apart by
/// its working directory, `shim_dir`, which only a shim sets to an agent's log directory).
pub fn is_shim(pid: i32) -> bool {
    shim_kind(pid).is_some()
}

/// `Some(true)` for a pool launcher (a warm shim), `Some(false)` for `aither-init shim`.
fn shim_kind(pid: i32) -> Option<bool> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmd.split(|b| *b == 0);
    let prog = args.next().unwrap_or_default();
    if !prog.ends_with(b"aither-init") {
        return None;
    }
    match args.next() {
        Some(b"shim") => Some(false),
        Some(b"pool") => Some(true),
        _ => None,
    }
}

/// The log directory a shim works in (its cwd), naming the daemon and agent it serves.
pub fn shim_dir(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The first child of `pid` (the sandbox's pid 1 for a shim).
fn first_child(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Takes over a shim that a previous daemon started: its pidfd, its sandbox's pid 1, and our
/// end of the agent channel (from the shim's fd 4).
pub fn adopt(shim_pid: i32, cgroup_id: &str, log_dir: &Path) -> io::Result<Live> {
    let Some(warm) = shim_kind(shim_pid) else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("pid {shim_pid} is not an aither-init shim"),
        ));
    };
    let pidfd = crate::sys::pidfd_open(shim_pid)?;
    let channel = crate::sys::pidfd_getfd(pidfd.as_fd(), SHIM_KEEP_FD).ok();
    // Absent when the run has no egress.
    let egress = crate::sys::pidfd_getfd(pidfd.as_fd(), SHIM_EGRESS_FD).ok();
    // Absent on the host's network, and in shims of an aitherd before published ports.
    let netns = crate::sys::pidfd_getfd(pidfd.as_fd(), SHIM_NETNS_FD).ok();
    let pid1 = first_child(shim_pid);
    Ok(Live {
        egress,
        netns,
        shim_pid,
        pidfd: watch_pidfd(pidfd)?,
        pid1,
        agent_pid: pid1.and_then(first_child),
        cgroup_id: cgroup_id.to_string(),
        channel,
        child: None,
        log_dir: log_dir.to_path_buf(),
        was_ready: false,
        warm,
        // Kept beside the logs by the daemon that saw the start.
        report: std::fs::read(log_dir.join("report.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
    })
}

/// The outcome of one health check.
#[derive(Clone, Debug)]
pub struct Probe {
    pub ok: bool,
    pub code: Option<i32>,
    pub output: String,
}

/// Runs `argv` inside the running sandbox (`aither-init exec`: its namespaces, cgroup, uid,
/// Landlock and seccomp), with a timeout.
pub async fn exec_in(
    init: &Path,
    spec: &SandboxSpec,
    pid1: i32,
    argv: &[String],
    timeout: Duration,
) -> Probe {
    let req = crate::sandbox::ExecConfig::new(spec.clone(), pid1, argv.to_vec(), Some(timeout));
    let mut cmd = Command::new(init);
    cmd.arg("exec")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .kill_on_drop(true);
    let run = async {
        let mut child = cmd.spawn()?;
        let mut stdin = child.stdin.take().expect("piped");
        let body = serde_json::to_vec(&req).expect("config serialises");
        let _ = stdin.write_all(&body).await;
        drop(stdin);
        child.wait_with_output().await
    };
    match tokio::time::timeout(timeout + Duration::from_secs(1), run).await {
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let text: String = text
                .chars()
                .rev()
                .take(512)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Probe {
                ok: out.status.success(),
                code: out.status.code(),
                output: text.trim().to_string(),
            }
        }
        Ok(Err(e)) => Probe {
            ok: false,
            code: None,
            output: format!("cannot run the health check: {e}"),
        },
        Err(_) => Probe {
            ok: false,
            code: None,
            output: format!("timed out after {timeout:?}"),
        },
    }
}
