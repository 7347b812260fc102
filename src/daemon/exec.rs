//! `aitherctl exec` (docs/daemon.md "exec"): a command inside a running agent's sandbox,
//! confined exactly as the agent is, with the caller's streams.
//!
//! The stages, in order:
//! 1. Who: the agent's owner, root or an admin (server.rs `authorize`; anyone else is told
//!    "no agent named …" and the attempt is audited).
//! 2. What: a command, `KEY=VALUE` pairs, and three descriptors (stdin, stdout, stderr) sent
//!    with the request (SCM_RIGHTS): each a pipe, a regular file or /dev/null. A terminal
//!    only with `tty`, and then the command gets a new pty of its own (`aither-init exec`
//!    relays it), never the caller's terminal (TIOCSTI, docs/security-model.md). A socket,
//!    a directory or an O_PATH descriptor is refused: it could lead out of the sandbox's
//!    network or mount namespace.
//! 3. Where: the agent must have a sandbox (starting, running, ready or unhealthy), and fewer
//!    than `MAX_EXECS_PER_AGENT` exec'd commands running.
//! 4. Run: `aither-init exec --config-fd 3` (crates/aither-core/src/sandbox/exec.rs) joins the
//!    agent's cgroups (its pids limit counts the command) and namespaces and confines the
//!    command as the agent (uid, no capabilities, no_new_privs, Landlock, seccomp). aitherd
//!    is multithreaded and never forks into a sandbox itself.
//! 5. End: the reply `{"exit_code": N}` (the command's status, 128+N for a signal, 125/126/127
//!    for Aither's own failures, as `aitherctl run`). A client that closes the connection
//!    first gets its command killed: aither-init exec is killed, and the command with it (its
//!    parent-death signal).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Command;

use super::identity::Caller;
use super::proto::{aio, CopyOp, ErrorCode, ExecRequest, Reply};
use super::supervise::State;
use super::Shared;
use crate::audit::{Entry, Verdict};
use crate::sandbox::{ExecConfig, SandboxSpec};

/// At most this many exec'd commands run in one agent at a time.
pub const MAX_EXECS_PER_AGENT: usize = 4;

/// Where `aither-init exec` finds its config.
const CONFIG_FD: RawFd = 3;

/// An exec refused before anything ran.
#[derive(Debug, thiserror::Error)]
pub enum ExecRefused {
    #[error("no command given (aitherctl exec NAME -- CMD [ARG...])")]
    NoCommand,
    #[error("--env {0:?}: expected KEY=VALUE, KEY not empty and without '='")]
    BadEnv(String),
    #[error("{0}: contains a NUL byte")]
    Nul(&'static str),
    #[error("expected 3 descriptors with the request (stdin, stdout, stderr), got {0}")]
    FdCount(usize),
    #[error("{stream} is {what}: {fix}")]
    BadStream {
        stream: &'static str,
        what: &'static str,
        fix: &'static str,
    },
    #[error("{stream} is a file of {fs} (a handle on processes or kernel state, not data): pass a pipe, a regular file or /dev/null")]
    PseudoFile {
        stream: &'static str,
        fs: &'static str,
    },
    #[error("reading the descriptor passed as {stream}: {source}")]
    Stat {
        stream: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no agent named {0:?} (`aitherctl ps` lists them)")]
    NoAgent(String),
    #[error(
        "agent {name:?} is {state}: exec needs a running sandbox (`aitherctl restart {name}`)"
    )]
    NotRunning { name: String, state: State },
    /// A command joining a frozen cgroup would be frozen with it until `resume` (podman
    /// refuses exec into a paused container too).
    #[error(
        "agent {name:?} is paused: its processes are frozen (`aitherctl resume {name}` first)"
    )]
    Paused { name: String },
    #[error("cp: {0}")]
    BadCopy(&'static str),
    #[error("agent {name:?} already runs {max} commands from exec (the most at a time); wait for one to end")]
    TooMany { name: String, max: usize },
}

impl ExecRefused {
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            ExecRefused::NoAgent(_) => ErrorCode::NotFound,
            ExecRefused::NotRunning { .. } | ExecRefused::Paused { .. } => ErrorCode::Conflict,
            ExecRefused::TooMany { .. } => ErrorCode::Limit,
            ExecRefused::Stat { .. } => ErrorCode::Io,
            _ => ErrorCode::Invalid,
        }
    }
}

/// Errors of running `aither-init exec` (after the exec was allowed).
#[derive(Debug, thiserror::Error)]
pub enum ExecFailed {
    #[error("creating the config pipe: {0}")]
    Pipe(#[source] io::Error),
    #[error("starting the launcher {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for the command: {0}")]
    Wait(#[source] io::Error),
    #[error("the client went away; the command was killed")]
    Disconnected,
}

/// The exec'd commands running per agent.
pub type Slots = super::slots::Slots<String>;
type SlotGuard = super::slots::SlotGuard<String>;

/// A slot for one more command in `name`, freed when the guard drops.
fn take_slot(slots: &Arc<Slots>, name: &str) -> Result<SlotGuard, ExecRefused> {
    slots
        .take(&name.to_string(), MAX_EXECS_PER_AGENT)
        .ok_or_else(|| ExecRefused::TooMany {
            name: name.to_string(),
            max: MAX_EXECS_PER_AGENT,
        })
}

/// What the request asks for, checked.
struct Wanted {
    name: String,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: Option<PathBuf>,
    tty: bool,
    stdio: [OwnedFd; 3],
}

/// Serves one `exec` request; the connection ends with its reply.
pub async fn serve(
    d: &Shared,
    caller: &Caller,
    req: ExecRequest,
    fds: Vec<OwnedFd>,
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
) {
    let ExecRequest {
        name,
        argv,
        env,
        cwd,
        tty,
        copy,
    } = req;
    let kind = if copy.is_some() { "cp" } else { "exec" };
    let owner = match super::server::authorize(d, caller, kind, &name) {
        Ok(Some(o)) => o,
        Ok(None) => {
            let _ = aio::write_reply(w, &super::server::not_found(&name)).await;
            return;
        }
        Err(reply) => {
            let _ = aio::write_reply(w, &reply).await;
            return;
        }
    };
    // A copy's command is aitherd's own (and is what is recorded).
    let (argv, bad_copy) = match copy_argv(copy.as_ref(), argv, tty) {
        Ok(a) => (a, None),
        Err(e) => (vec![], Some(e)),
    };
    let audit = |verdict: Verdict, rule: String, extra: serde_json::Value| {
        let mut data = json!({
            "argv": argv,
            // Values can be secrets: only the keys are recorded.
            "env": env.iter().map(|kv| kv.split('=').next().unwrap_or("")).collect::<Vec<_>>(),
            "cwd": cwd,
            "tty": tty,
        });
        if let (Some(o), Some(c)) = (data.as_object_mut(), &copy) {
            o.insert("copy".into(), json!(c));
        }
        if let (Some(o), Some(x)) = (data.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        d.audit.record(
            Entry::new(kind, verdict, rule)
                .agent(&name)
                .actor(caller.actor())
                .caller(caller.uid)
                .via(caller.via_name())
                .owner(owner)
                .data(data),
        );
    };
    if let Some(e) = bad_copy {
        audit(Verdict::Deny, format!("{}: {e}", e.code()), json!({}));
        let _ = aio::write_reply(w, &Reply::err(e.code(), e.to_string())).await;
        return;
    }
    let checked =
        check(&argv, &env, cwd.as_deref(), Terminals::with_tty(tty), fds).and_then(|stdio| {
            let (spec, pid1) = sandbox_of(d, &name)?;
            let slot = take_slot(&d.execs, &name)?;
            Ok((stdio, spec, pid1, slot))
        });
    let (stdio, spec, pid1, _slot) = match checked {
        Ok(x) => x,
        Err(e) => {
            audit(Verdict::Deny, format!("{}: {e}", e.code()), json!({}));
            let _ = aio::write_reply(w, &Reply::err(e.code(), e.to_string())).await;
            return;
        }
    };
    audit(
        Verdict::Allow,
        "owner: the agent's owner, root or aither-admin".into(),
        json!({"pid1": pid1}),
    );
    let want = Wanted {
        name: name.clone(),
        argv,
        env,
        cwd,
        tty,
        stdio,
    };
    let reply = match run(&d.init, (*spec).clone(), pid1, want, r).await {
        Ok(code) => {
            d.emit(
                Some(&name),
                "exec_exited",
                json!({"exit_code": code, "caller": caller.uid}),
            );
            Reply::ok(json!({"exit_code": code}))
        }
        Err(ExecFailed::Disconnected) => {
            tracing::info!(agent = %name, "exec: the client went away; command killed");
            return;
        }
        Err(e) => Reply::err(ErrorCode::LaunchFailed, e.to_string()),
    };
    let _ = aio::write_reply(w, &reply).await;
}

/// The command of an `aitherctl cp` request (`copy`), which aitherd derives itself: the
/// client's `argv` must be empty and there is no terminal. Without `copy`, `argv` as it is.
///
/// The agent side runs inside the sandbox as the agent, so a link in the agent's files is
/// resolved there, under the agent's own confinement, never on the host; the tar stream it
/// writes is parsed by aitherctl as hostile (src/cp). `tar` is the one on the agent's PATH
/// (as `kubectl cp` runs the container's): an agent that replaces it only makes its own
/// stream lie, which the host side expects anyway.
pub fn copy_argv(
    copy: Option<&CopyOp>,
    argv: Vec<String>,
    tty: bool,
) -> Result<Vec<String>, ExecRefused> {
    let Some(op) = copy else { return Ok(argv) };
    if !argv.is_empty() {
        return Err(ExecRefused::BadCopy("a copy carries no command of its own"));
    }
    if tty {
        return Err(ExecRefused::BadCopy("a copy has no terminal"));
    }
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let empty = |p: &Path| p.as_os_str().is_empty();
    Ok(match op {
        CopyOp::Out { path, .. } | CopyOp::IsDir { path } | CopyOp::In { dir: path }
            if empty(path) =>
        {
            return Err(ExecRefused::BadCopy("an empty path"));
        }
        CopyOp::Out {
            path,
            contents: true,
        } => [
            "tar",
            "-c",
            "-f",
            "-",
            "--hard-dereference",
            "-C",
            &s(path),
            ".",
        ]
        .map(String::from)
        .to_vec(),
        CopyOp::Out {
            path,
            contents: false,
        } => {
            let (dir, name) = match (path.parent(), path.file_name()) {
                (Some(p), Some(n)) => (if empty(p) { Path::new(".") } else { p }, n),
                // "/", "..", "x/..": the path itself, as a directory's contents.
                _ => (path.as_path(), std::ffi::OsStr::new(".")),
            };
            let mut member = std::ffi::OsString::from("./");
            member.push(name);
            let member = if name == "." {
                ".".into()
            } else {
                s(Path::new(&member))
            };
            vec![
                "tar".into(),
                "-c".into(),
                "-f".into(),
                "-".into(),
                "--hard-dereference".into(),
                "-C".into(),
                s(dir),
                member,
            ]
        }
        CopyOp::IsDir { path } => vec!["test".into(), "-d".into(), s(path)],
        CopyOp::In { dir } => ["tar", "-x", "-f", "-", "-C", &s(dir)]
            .map(String::from)
            .to_vec(),
    })
}

/// The request's fields and descriptors, checked (stage 2).
pub(super) fn check(
    argv: &[String],
    env: &[String],
    cwd: Option<&Path>,
    terminals: Terminals,
    fds: Vec<OwnedFd>,
) -> Result<[OwnedFd; 3], ExecRefused> {
    if argv.is_empty() {
        return Err(ExecRefused::NoCommand);
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(ExecRefused::Nul("the command"));
    }
    for kv in env {
        match kv.split_once('=') {
            Some((k, _)) if !k.is_empty() && !kv.contains('\0') => {}
            _ => return Err(ExecRefused::BadEnv(kv.clone())),
        }
    }
    if cwd.is_some_and(|c| c.as_os_str().as_encoded_bytes().contains(&0)) {
        return Err(ExecRefused::Nul("the working directory"));
    }
    let stdio: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|v: Vec<OwnedFd>| ExecRefused::FdCount(v.len()))?;
    for (fd, stream) in stdio.iter().zip(["stdin", "stdout", "stderr"]) {
        check_stream(fd.as_fd(), stream, terminals)?;
    }
    Ok(stdio)
}

/// Whether a terminal may be one of the command's streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terminals {
    /// Without `-t`: never (aitherctl relays its terminal through a pipe).
    Refused,
    /// With `-t`: `aither-init exec` gives the command a new pty and relays it to the
    /// terminal, which the command never gets.
    Relayed,
}

impl Terminals {
    /// What `exec`'s `tty` (`-t`) allows.
    pub fn with_tty(tty: bool) -> Terminals {
        if tty {
            Terminals::Relayed
        } else {
            Terminals::Refused
        }
    }
}

/// Files of the kernel's pseudo-filesystems are handles on processes, namespaces and kernel
/// state, not data: never a command's stream, even as regular files.
const PSEUDO_FS: &[(i64, &str)] = &[
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x0027_e0eb, "cgroupfs"),
    (0x6367_7270, "cgroup2"),
    (0x6e73_6673, "nsfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0xcafe_4a11, "bpffs"),
    (0x5049_5045, "pidfs"),
];

/// One of the command's streams (`stream`: "stdin", "stdout" or "stderr"): Ok when it may be
/// passed as it is (a pipe, a regular file of a real filesystem, /dev/null, or with
/// `Terminals::Relayed` a terminal). aitherctl relays anything else through a pipe.
pub fn check_stream(
    fd: BorrowedFd<'_>,
    stream: &'static str,
    terminals: Terminals,
) -> Result<(), ExecRefused> {
    let e = |source: rustix::io::Errno| ExecRefused::Stat {
        stream,
        source: source.into(),
    };
    let bad = |what, fix| ExecRefused::BadStream { stream, what, fix };
    let plain = "pass a pipe, a regular file or /dev/null";
    if rustix::fs::fcntl_getfl(fd)
        .map_err(e)?
        .contains(rustix::fs::OFlags::PATH)
    {
        return Err(bad("an O_PATH descriptor", plain));
    }
    let st = rustix::fs::fstat(fd).map_err(e)?;
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::Fifo => Ok(()),
        rustix::fs::FileType::RegularFile => {
            let fs = rustix::fs::fstatfs(fd).map_err(e)?.f_type as i64;
            match PSEUDO_FS.iter().find(|(magic, _)| *magic == fs) {
                Some((_, name)) => Err(ExecRefused::PseudoFile { stream, fs: name }),
                None => Ok(()),
            }
        }
        rustix::fs::FileType::CharacterDevice => {
            let rdev = st.st_rdev;
            if (rustix::fs::major(rdev), rustix::fs::minor(rdev)) == (1, 3) {
                return Ok(());
            }
            let is_tty = nix::unistd::isatty(fd).unwrap_or(false);
            match (is_tty, terminals) {
                (true, Terminals::Relayed) => Ok(()),
                (true, Terminals::Refused) => Err(bad(
                    "a terminal",
                    "with -t the command gets a pty of its own; without, aitherctl relays it",
                )),
                (false, _) => Err(bad("a character device other than /dev/null", plain)),
            }
        }
        rustix::fs::FileType::Socket => Err(bad(
            "a socket (one of the host's could reach networks the sandbox cannot)",
            plain,
        )),
        _ => Err(bad("a directory or device", plain)),
    }
}

/// The agent's spec and its sandbox's pid 1 (stage 3).
fn sandbox_of(d: &Shared, name: &str) -> Result<(Arc<SandboxSpec>, i32), ExecRefused> {
    let agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
    // A removed agent whose name (and memory) is kept.
    let h = agents
        .get(name)
        .ok_or_else(|| ExecRefused::NoAgent(name.to_string()))?;
    let info = h.info.lock().unwrap_or_else(|e| e.into_inner());
    match info.pid1 {
        _ if info.state == State::Paused => Err(ExecRefused::Paused {
            name: name.to_string(),
        }),
        Some(pid1) if info.state.is_live() => Ok((h.spec.clone(), pid1)),
        _ => Err(ExecRefused::NotRunning {
            name: name.to_string(),
            state: info.state,
        }),
    }
}

/// Runs the command through `aither-init exec` and waits for it, or for the client to go
/// (stage 4 and 5). Returns the exit code to report.
async fn run(
    init: &Path,
    spec: SandboxSpec,
    pid1: i32,
    want: Wanted,
    r: &mut OwnedReadHalf,
) -> Result<i32, ExecFailed> {
    let mut cfg = ExecConfig::new(spec, pid1, want.argv, None);
    cfg.env = want.env;
    cfg.cwd = want.cwd;
    cfg.tty = want.tty;
    let (config_r, config_w) = crate::sys::pipe().map_err(ExecFailed::Pipe)?;
    let [stdin, stdout, stderr] = want.stdio;
    let mut cmd = Command::new(init);
    cmd.arg("exec")
        .arg("--config-fd")
        .arg(CONFIG_FD.to_string())
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .env_clear()
        .kill_on_drop(true);
    let src = config_r.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2), none that
    // allocates (nix's fcntl and Errno conversions do not), on a descriptor that stays open
    // in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // Moved up first: dup2 onto its own number would keep close-on-exec.
            let high = fcntl(BorrowedFd::borrow_raw(src), FcntlArg::F_DUPFD_CLOEXEC(10))?;
            // Raw: nix's dup2 wants the target as an OwnedFd (nothing owns that number here)
            // and its dup2_raw does not check dup2's result.
            Errno::result(libc::dup2(high, CONFIG_FD))?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| ExecFailed::Spawn {
        path: init.to_path_buf(),
        source,
    })?;
    // Our copies of the passed descriptors close now: the client sees EOF on its pipes
    // when the command's copies close.
    drop(cmd);
    drop(config_r);
    let body = serde_json::to_vec(&cfg).expect("config serialises");
    // A write error means the launcher died: its exit status says why.
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let _ = std::fs::File::from(config_w).write_all(&body);
    });
    tracing::info!(agent = %want.name, pid1, "exec started");
    let mut buf = [0u8; 256];
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.map_err(ExecFailed::Wait)?,
            n = r.read(&mut buf) => match n {
                // Anything the client sends is ignored; its end of the connection is all that
                // counts.
                Ok(n) if n > 0 => continue,
                _ => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    let _ = writer.await;
                    return Err(ExecFailed::Disconnected);
                }
            },
        }
    };
    let _ = writer.await;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(125))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn null3() -> Vec<OwnedFd> {
        (0..3)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect()
    }

    #[test]
    fn at_most_four_commands_per_agent_and_a_slot_frees_on_drop() {
        let slots = Arc::new(Slots::default());
        let held: Vec<SlotGuard> = (0..MAX_EXECS_PER_AGENT)
            .map(|_| take_slot(&slots, "a").unwrap())
            .collect();
        assert!(matches!(
            take_slot(&slots, "a"),
            Err(ExecRefused::TooMany { max: 4, .. })
        ));
        // Another agent's are its own.
        drop(take_slot(&slots, "b").unwrap());
        drop(held);
        assert!(slots.is_empty(), "no entry left behind");
        assert!(take_slot(&slots, "a").is_ok());
    }

    #[test]
    fn the_request_is_checked_before_anything_runs() {
        let ok = |argv: &[&str], env: &[&str]| {
            let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
            let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
            check(&argv, &env, None, Terminals::Refused, null3())
        };
        assert!(ok(&["true"], &["A=1", "B="]).is_ok());
        assert!(matches!(ok(&[], &[]), Err(ExecRefused::NoCommand)));
        assert!(matches!(ok(&["a\0b"], &[]), Err(ExecRefused::Nul(_))));
        for bad in ["NOEQUALS", "=value", "A=\0"] {
            assert!(
                matches!(ok(&["true"], &[bad]), Err(ExecRefused::BadEnv(_))),
                "{bad:?}"
            );
        }
        let two: Vec<OwnedFd> = null3().into_iter().take(2).collect();
        let argv = vec!["true".to_string()];
        assert!(matches!(
            check(&argv, &[], None, Terminals::Refused, two),
            Err(ExecRefused::FdCount(2))
        ));
    }

    #[test]
    fn a_copys_command_is_aitherds_own_and_the_clients_is_refused() {
        let out = |p: &str, contents| CopyOp::Out {
            path: p.into(),
            contents,
        };
        let argv = |op: &CopyOp| copy_argv(Some(op), vec![], false).unwrap().join(" ");
        assert_eq!(
            argv(&out("/w/d", false)),
            "tar -c -f - --hard-dereference -C /w ./d"
        );
        assert_eq!(
            argv(&out("rel", false)),
            "tar -c -f - --hard-dereference -C . ./rel"
        );
        assert_eq!(
            argv(&out("/w/d/.", true)),
            "tar -c -f - --hard-dereference -C /w/d/. ."
        );
        assert_eq!(
            argv(&out("/", false)),
            "tar -c -f - --hard-dereference -C / ."
        );
        assert_eq!(argv(&CopyOp::In { dir: "/w".into() }), "tar -x -f - -C /w");
        assert_eq!(argv(&CopyOp::IsDir { path: "x".into() }), "test -d x");
        let op = out("/w", false);
        assert!(matches!(
            copy_argv(Some(&op), vec!["sh".into()], false),
            Err(ExecRefused::BadCopy(_))
        ));
        assert!(matches!(
            copy_argv(Some(&op), vec![], true),
            Err(ExecRefused::BadCopy(_))
        ));
        assert!(matches!(
            copy_argv(Some(&out("", false)), vec![], false),
            Err(ExecRefused::BadCopy(_))
        ));
        assert_eq!(copy_argv(None, vec!["ls".into()], false).unwrap(), ["ls"]);
    }

    #[test]
    fn streams_are_pipes_files_or_dev_null_and_nothing_else() {
        let kind = |fd: BorrowedFd<'_>| check_stream(fd, "stdin", Terminals::Refused);
        let (r, w) = crate::sys::pipe().unwrap();
        assert!(kind(r.as_fd()).is_ok() && kind(w.as_fd()).is_ok());
        let file = tempfile::tempfile().unwrap();
        assert!(kind(file.as_fd()).is_ok());
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(kind(null.as_fd()).is_ok());
        let refused = |fd: BorrowedFd<'_>, what: &str| {
            let e = kind(fd).expect_err(what).to_string();
            assert!(e.contains(what), "{e}");
        };
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        refused(sock.as_fd(), "a socket");
        let dir = std::fs::File::open("/").unwrap();
        refused(dir.as_fd(), "a directory");
        let proc = std::fs::File::open("/proc/self/status").unwrap();
        refused(proc.as_fd(), "procfs");
        let path = crate::sys::open(Path::new("/etc/hostname"), libc::O_PATH).unwrap();
        refused(path.as_fd(), "O_PATH");
        let zero = std::fs::File::open("/dev/zero").unwrap();
        refused(zero.as_fd(), "other than /dev/null");
    }
}
