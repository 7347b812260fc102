//! `aither-init pool --control-fd N` (issue 21, item 1: warm start), driven as aitherd drives
//! it: a SOCK_SEQPACKET socketpair, the template spec on stdin, `{"ready":...}`, then ONE final
//! spec with the caller's stdio (and workspace) by SCM_RIGHTS (docs/architecture.md, "Warm
//! start"; crates/aither-core/src/sandbox/pool.rs). Needs root and `aither-init` built beside
//! aitherctl (`cargo build --workspace --bins`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use aither::policy::Policy;
use aither::sandbox::pool::{self, PoolMsg};
use aither::sandbox::{RunOptions, SandboxSpec};
use common::daemon::init_path;
use common::{cgroup_dirs_of, policy_dir, unique, wait_with_deadline, Workspace, RUN_DEADLINE};

/// The final spec for `argv` under the strict policy with `ws` as the workspace, and its
/// template: the same spec with every caller-dependent field a placeholder (another name and
/// hostname, `/bin/true`, no env, no workspace, `/` as cwd), as aitherd prepares one.
fn specs(ws: &Workspace, argv: &[&str]) -> (SandboxSpec, SandboxSpec) {
    let policy = Policy::load_file(&policy_dir().join("strict.toml"))
        .expect("load policies/strict.toml")
        .policy;
    let opts = RunOptions {
        name: Some(unique("pool")),
        workspace: Some(ws.path().to_path_buf()),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..RunOptions::default()
    };
    let fin = SandboxSpec::derive(&policy, &opts, &|_| None, ws.path()).expect("derive");
    assert!(fin.workspace.is_some(), "the final spec has the workspace");
    let mut template = fin.clone();
    template.name = unique("tmpl");
    template.hostname = "pool-template".into();
    template.argv = vec!["/bin/true".into()];
    template.env = Vec::new();
    template.cwd = "/".into();
    template.workspace = None;
    assert_eq!(
        template.prepared_key(),
        fin.prepared_key(),
        "only caller-dependent fields differ"
    );
    (template, fin)
}

fn drain(r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let mut r = r;
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// `aither-init pool --control-fd 3` with `template` written to its stdin: the child, our end
/// of its control socket, its stderr being read.
fn spawn_pool(template: &SandboxSpec) -> (Child, OwnedFd, JoinHandle<String>) {
    spawn_pool_with(template, &[])
}

/// `spawn_pool` with `env` added to the launcher's environment.
fn spawn_pool_with(
    template: &SandboxSpec,
    env: &[(&str, &str)],
) -> (Child, OwnedFd, JoinHandle<String>) {
    common::require_root();
    let (ours, theirs) = aither::sys::seqpacket_pair().expect("socketpair");
    let raw = theirs.as_raw_fd();
    let mut cmd = Command::new(init_path());
    cmd.args(["pool", "--control-fd", "3"])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec (dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn aither-init pool");
    drop(theirs);
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(&serde_json::to_vec(template).unwrap())
        .unwrap();
    drop(stdin);
    let stderr = drain(child.stderr.take().unwrap());
    (child, ours, stderr)
}

/// A pool launcher that reported ready.
struct Pool {
    child: Child,
    ctl: Option<OwnedFd>,
    stderr: Option<JoinHandle<String>>,
    pid1: i32,
    cgroup: String,
}

impl Pool {
    /// Starts `aither-init pool --control-fd 3` with `template` on stdin and waits for ready.
    fn start(template: &SandboxSpec) -> Pool {
        Pool::start_with(template, &[])
    }

    /// `start` with `env` added to the launcher's environment.
    fn start_with(template: &SandboxSpec, env: &[(&str, &str)]) -> Pool {
        let (child, ours, stderr) = spawn_pool_with(template, env);
        let stderr = Some(stderr);
        let mut p = Pool {
            child,
            ctl: Some(ours),
            stderr,
            pid1: 0,
            cgroup: String::new(),
        };
        match p.recv() {
            Some(PoolMsg::Ready { pid1, cgroup }) => {
                p.pid1 = pid1;
                p.cgroup = cgroup;
            }
            other => panic!(
                "expected ready, got {other:?}; stderr: {}",
                p.finish_stderr()
            ),
        }
        p
    }

    fn ctl(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ctl.as_ref().expect("control socket open").as_fd()
    }

    /// The next message, or None at EOF; panics after RUN_DEADLINE without one.
    fn recv(&mut self) -> Option<PoolMsg> {
        let mut p = [libc::pollfd {
            fd: self.ctl().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(p.as_mut_ptr(), 1, RUN_DEADLINE.as_millis() as i32) };
        assert!(
            n > 0,
            "no message from the pool launcher within {RUN_DEADLINE:?}"
        );
        pool::recv(self.ctl()).expect("read the control socket")
    }

    fn finish_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default()
    }

    /// Every message until EOF, then the launcher's exit code and its stderr.
    fn rest(mut self) -> (Vec<PoolMsg>, i32, String) {
        let mut msgs = Vec::new();
        while let Some(m) = self.recv() {
            msgs.push(m);
        }
        let st = wait_with_deadline(&mut self.child, "aither-init pool", RUN_DEADLINE);
        let err = self.stderr.take().unwrap().join().unwrap();
        (msgs, st.code().unwrap_or(-1), err)
    }
}

/// The caller's side of one run: its stdout and stderr as pipes read to EOF.
struct Caller {
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
    /// Lines of stdout as they come (for the signal test), alongside `stdout`'s whole text.
    lines: mpsc::Receiver<String>,
}

/// Sends `fin` with /dev/null as stdin, two pipes as stdout and stderr, and the workspace
/// directory opened as the caller would.
fn send_final(p: &Pool, fin: &SandboxSpec) -> Caller {
    let null = std::fs::File::open("/dev/null").unwrap();
    let (out_r, out_w) = aither::sys::pipe().unwrap();
    let (err_r, err_w) = aither::sys::pipe().unwrap();
    let ws = fin
        .workspace
        .as_ref()
        .map(|w| std::fs::File::open(&w.path).expect("open the workspace"));
    pool::send_final(
        p.ctl(),
        fin,
        [null.as_fd(), out_w.as_fd(), err_w.as_fd()],
        ws.as_ref().map(|f| f.as_fd()),
    )
    .expect("send the final spec");
    drop((out_w, err_w));
    let (tx, lines) = mpsc::channel();
    let stdout = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(std::fs::File::from(out_r)).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    Caller {
        stdout,
        stderr: drain(std::fs::File::from(err_r)),
        lines,
    }
}

impl Caller {
    fn output(self) -> (String, String) {
        (self.stdout.join().unwrap(), self.stderr.join().unwrap())
    }
}

fn exited(msgs: &[PoolMsg]) -> Option<(i32, bool)> {
    msgs.iter().find_map(|m| match m {
        PoolMsg::Exited {
            code, timed_out, ..
        } => Some((*code, *timed_out)),
        _ => None,
    })
}

/// A `started` message came (its `agent_pid` is null when the agent was gone before the
/// launcher looked it up: a quick one).
fn started(msgs: &[PoolMsg]) -> bool {
    msgs.iter().any(|m| matches!(m, PoolMsg::Started { .. }))
}

/// Every directory named `id` under an `aither` directory of any hierarchy
/// (/sys/fs/cgroup/*/aither/ID, and /sys/fs/cgroup/aither/ID on pure v2).
fn cgroups_named(id: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut bases = vec![root.join("aither")];
    if let Ok(rd) = std::fs::read_dir(root) {
        bases.extend(rd.flatten().map(|e| e.path().join("aither")));
    }
    bases
        .into_iter()
        .map(|b| b.join(id))
        .filter(|p| p.is_dir())
        .collect()
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_final_spec_runs_with_the_callers_stdio_and_exit_status() {
    let ws = Workspace::new();
    let (template, fin) = specs(&ws, &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    let p = Pool::start(&template);
    assert!(
        !cgroup_dirs_of(&template.name).is_empty(),
        "the prepared sandbox's cgroup exists while it waits"
    );
    let c = send_final(&p, &fin);
    let (msgs, code, err) = p.rest();
    let (out, agent_err) = c.output();
    assert!(started(&msgs), "{msgs:?} {err}");
    assert_eq!(exited(&msgs), Some((7, false)), "{msgs:?} {err}");
    assert_eq!(code, 7, "the launcher exits with the agent's status: {err}");
    assert_eq!(out, "out\n");
    assert_eq!(agent_err, "err\n");
    assert!(
        cgroup_dirs_of(&template.name).is_empty(),
        "no cgroup left: {:?}",
        cgroup_dirs_of(&template.name)
    );
}

/// What a cold launch's agent sees (tests/hostile.rs), the prepared sandbox's agent sees: a
/// fresh /tmp (the previous prepared sandbox's file is not there), its own pid namespace, the
/// workspace read-write, a read-only root, no /etc/shadow, no capabilities, no_new_privs,
/// seccomp, Landlock (no exec from /dev/shm), and the final spec's hostname.
#[test]
fn the_agent_of_a_prepared_sandbox_has_a_cold_launchs_view() {
    let ws = Workspace::new();
    // A first prepared sandbox leaves a file in its /tmp.
    let (t1, f1) = specs(&ws, &["sh", "-c", "echo x > /tmp/left-behind"]);
    let p = Pool::start(&t1);
    let c = send_final(&p, &f1);
    let (msgs, code, err) = p.rest();
    c.output();
    assert_eq!(code, 0, "{msgs:?} {err}");

    let script = format!(
        "echo pid=$$; \
         echo tmp=$(ls -A /tmp | wc -l); \
         touch /rootfile 2>&1; \
         cat /etc/shadow >/dev/null 2>&1 || echo shadow=denied; \
         echo hi > {ws}/written && echo ws=written; \
         echo hostname=$(hostname) etc=$(cat /etc/hostname); \
         {ws}/aither-probe status; \
         cp /bin/true /dev/shm/t && /dev/shm/t && echo landlock=ran; \
         true",
        ws = ws.path().display()
    );
    let (template, fin) = specs(&ws, &["sh", "-c", &script]);
    let p = Pool::start(&template);
    let c = send_final(&p, &fin);
    let (msgs, code, err) = p.rest();
    let (out, agent_err) = c.output();
    let all = format!("stdout: {out}\nstderr: {agent_err}\nmsgs: {msgs:?}\nlauncher: {err}");
    assert_eq!(code, 0, "{all}");
    let pid: i32 = out
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid line: {all}"));
    assert!(
        pid <= 3,
        "the agent has its own pid namespace (pid {pid}): {all}"
    );
    assert!(out.contains("tmp=0\n"), "a fresh /tmp: {all}");
    assert!(
        out.contains("Read-only file system"),
        "the root is read-only: {all}"
    );
    assert!(out.contains("shadow=denied\n"), "{all}");
    assert!(out.contains("ws=written\n"), "{all}");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("written")).unwrap(),
        "hi\n",
        "the write reached the workspace"
    );
    let h = &fin.hostname;
    assert!(
        out.contains(&format!("hostname={h} etc={h}\n")),
        "the final spec's hostname, in the UTS namespace and /etc/hostname: {all}"
    );
    assert!(
        out.contains(
            "RESULT status ok CapInh=0000000000000000 CapPrm=0000000000000000 \
             CapEff=0000000000000000 CapBnd=0000000000000000 CapAmb=0000000000000000 \
             NoNewPrivs=1 Seccomp=2"
        ),
        "{all}"
    );
    assert!(
        !out.contains("landlock=ran"),
        "Landlock: no exec from /dev/shm: {all}"
    );
    assert!(agent_err.contains("Permission denied"), "{all}");
}

#[test]
fn a_prepared_sandbox_runs_once_a_second_final_spec_is_never_read() {
    let ws = Workspace::new();
    let (template, fin) = specs(&ws, &["sh", "-c", "echo one"]);
    let second_marker = ws.path().join("second");
    let mut second = fin.clone();
    second.argv = vec![
        "sh".into(),
        "-c".into(),
        format!("touch {}", second_marker.display()),
    ];
    let p = Pool::start(&template);
    let c = send_final(&p, &fin);
    let c2 = send_final(&p, &second);
    let (msgs, code, err) = p.rest();
    let (out, _) = c.output();
    let (out2, _) = c2.output();
    assert_eq!(code, 0, "{msgs:?} {err}");
    assert_eq!(out, "one\n");
    assert_eq!(out2, "", "the second final spec's stdio saw nothing");
    assert_eq!(
        msgs.iter()
            .filter(|m| matches!(m, PoolMsg::Started { .. }))
            .count(),
        1,
        "{msgs:?}"
    );
    assert!(!second_marker.exists(), "the second final spec never ran");
}

#[test]
fn a_final_spec_that_does_not_match_the_template_is_refused_and_torn_down() {
    let ws = Workspace::new();
    let (template, mut fin) = specs(&ws, &["sh", "-c", "echo ran"]);
    // A field built into the sandbox (its rlimits), not a caller-dependent one.
    fin.rlimit_nofile += 1;
    let p = Pool::start(&template);
    let pid1 = p.pid1;
    let id = p.cgroup.clone();
    assert!(pid_alive(pid1));
    let c = send_final(&p, &fin);
    let (msgs, code, err) = p.rest();
    let (out, _) = c.output();
    assert_eq!(code, 125, "{msgs:?} {err}");
    let why = msgs
        .iter()
        .find_map(|m| match m {
            PoolMsg::Refused(w) => Some(w.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no refusal: {msgs:?}"));
    assert!(
        why.contains("does not match the prepared sandbox") && why.contains("prepared_key"),
        "a clear reason: {why}"
    );
    assert!(!started(&msgs), "{msgs:?}");
    assert_eq!(out, "", "nothing ran");
    assert!(!pid_alive(pid1), "pid 1 {pid1} is gone");
    assert!(cgroups_named(&id).is_empty(), "{:?}", cgroups_named(&id));
}

#[test]
fn eof_before_the_final_spec_leaves_no_process_and_no_cgroup() {
    let ws = Workspace::new();
    let (template, _) = specs(&ws, &["true"]);
    let mut p = Pool::start(&template);
    let pid1 = p.pid1;
    assert!(pid_alive(pid1), "pid 1 waits");
    let dirs = cgroup_dirs_of(&template.name);
    assert!(!dirs.is_empty(), "the cgroup exists while it waits");
    assert!(
        dirs.iter()
            .all(|d| d.file_name().unwrap().to_string_lossy() == p.cgroup),
        "ready names the cgroup: {} vs {dirs:?}",
        p.cgroup
    );
    let id = p.cgroup.clone();
    assert!(
        !cgroups_named(&id).is_empty(),
        "the launcher's cgroup {id} exists"
    );
    drop(p.ctl.take());
    let st = wait_with_deadline(&mut p.child, "aither-init pool", RUN_DEADLINE);
    let err = p.stderr.take().unwrap().join().unwrap();
    assert_eq!(st.code(), Some(0), "a clean teardown: {err}");
    assert!(!pid_alive(pid1), "pid 1 {pid1} is gone");
    assert!(
        cgroup_dirs_of(&template.name).is_empty() && cgroups_named(&id).is_empty(),
        "no cgroup left in any hierarchy: {:?}",
        cgroups_named(&id)
    );
}

#[test]
fn the_final_specs_timeout_gives_124() {
    let ws = Workspace::new();
    let (template, mut fin) = specs(&ws, &["sleep", "60"]);
    fin.timeout = Some(Duration::from_secs(1));
    let p = Pool::start(&template);
    let c = send_final(&p, &fin);
    let (msgs, code, err) = p.rest();
    c.output();
    assert_eq!(exited(&msgs), Some((124, true)), "{msgs:?} {err}");
    assert_eq!(code, 124);
}

#[test]
fn sigterm_to_the_pool_launcher_reaches_the_agent() {
    let ws = Workspace::new();
    let (template, fin) = specs(
        &ws,
        &[
            "sh",
            "-c",
            "trap 'echo trapped; exit 3' TERM; echo ready; while :; do sleep 0.1; done",
        ],
    );
    let p = Pool::start(&template);
    let c = send_final(&p, &fin);
    let first = c
        .lines
        .recv_timeout(RUN_DEADLINE)
        .expect("the agent's first line");
    assert_eq!(first, "ready");
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    let (msgs, code, err) = p.rest();
    let (out, _) = c.output();
    assert_eq!(code, 3, "the agent's trap ran: {msgs:?} {err}");
    assert!(out.contains("trapped"), "{out}");
    assert_eq!(exited(&msgs), Some((3, false)));
    assert!(
        msgs.iter()
            .any(|m| matches!(m, PoolMsg::Started { agent_pid: Some(p) } if *p > 0)),
        "a long-running agent's host pid is reported: {msgs:?}"
    );
}

/// A terminal among the caller's descriptors gets the agent a pty of its own (stdio.rs), never
/// the caller's terminal itself, as with `aitherctl run`.
#[test]
fn a_callers_terminal_gets_the_agent_its_own_pty() {
    use std::os::unix::fs::MetadataExt;
    let ws = Workspace::new();
    let (template, fin) = specs(
        &ws,
        &[
            "sh",
            "-c",
            "test -t 0 && echo stdin-is-a-tty; echo rdev=$(stat -L -c %t:%T /proc/self/fd/0)",
        ],
    );
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let caller_rdev = std::fs::File::from(pty.slave.try_clone().unwrap())
        .metadata()
        .unwrap()
        .rdev();
    let caller = format!(
        "rdev={:x}:{:x}",
        libc::major(caller_rdev),
        libc::minor(caller_rdev)
    );
    let p = Pool::start(&template);
    pool::send_final(
        p.ctl(),
        &fin,
        [pty.slave.as_fd(), pty.slave.as_fd(), pty.slave.as_fd()],
        Some(std::fs::File::open(ws.path()).unwrap().as_fd()),
    )
    .expect("send the final spec");
    drop(pty.slave);
    // What the relay wrote to the caller's terminal, read on its master until the last slave
    // copy (the pool launcher's) is closed (EIO).
    let master = std::fs::File::from(pty.master);
    let out = drain(master);
    let (msgs, code, err) = p.rest();
    let out = out.join().unwrap();
    assert_eq!(code, 0, "{msgs:?} {err} {out}");
    assert!(
        out.contains("stdin-is-a-tty"),
        "the agent has a terminal: {out}"
    );
    assert!(out.contains("rdev="), "{out}");
    assert!(
        !out.contains(&format!("{caller}\r")) && !out.contains(&format!("{caller}\n")),
        "the agent's terminal is not the caller's ({caller}): {out}"
    );
}

/// A template whose setup is per run (here an egress gateway's socket) is refused before
/// anything is built: aitherd launches it cold.
#[test]
fn a_template_that_is_not_poolable_is_refused() {
    let ws = Workspace::new();
    let (mut template, _) = specs(&ws, &["true"]);
    template.egress_port = Some(3128);
    let (mut child, ours, err) = spawn_pool(&template);
    let msg = pool::recv(ours.as_fd()).expect("recv");
    let st = wait_with_deadline(&mut child, "aither-init pool", RUN_DEADLINE);
    let err = err.join().unwrap();
    match msg {
        Some(PoolMsg::Refused(why)) => {
            assert!(
                why.contains("not poolable") && why.contains("egress"),
                "{why}"
            )
        }
        other => panic!("expected a refusal, got {other:?}: {err}"),
    }
    assert_eq!(st.code(), Some(125), "{err}");
    assert!(cgroup_dirs_of(&template.name).is_empty());
}

/// A final spec far above the launcher's usual 8 KiB frame (a large environment) reaches the
/// agent whole: both hops (aitherd → launcher → pid 1) size their buffer to the message.
#[test]
fn a_final_spec_with_a_large_environment_reaches_the_agent_whole() {
    let ws = Workspace::new();
    let (template, mut fin) = specs(&ws, &["sh", "-c", "printf %s \"$BIG\" | wc -c"]);
    fin.env.push(("BIG".into(), "x".repeat(100_000)));
    let p = Pool::start(&template);
    let c = send_final(&p, &fin);
    let (msgs, code, err) = p.rest();
    let (out, _) = c.output();
    assert_eq!(code, 0, "{msgs:?} {err}");
    assert_eq!(out.trim(), "100000");
}

/// `AITHER_TRACE_LAUNCH=1` breaks a warm run down: the prepare's lines up to `ready-seen`,
/// then the finish's (docs/performance.md, "Warm start"), the launcher's marks and pid 1's
/// stages after the final spec, in order.
#[test]
fn the_trace_names_the_finish_stages_in_order() {
    let ws = Workspace::new();
    let (template, fin) = specs(&ws, &["true"]);
    let p = Pool::start_with(&template, &[("AITHER_TRACE_LAUNCH", "1")]);
    let c = send_final(&p, &fin);
    let (msgs, code, err) = p.rest();
    c.output();
    assert_eq!(code, 0, "{msgs:?} {err}");
    let finish: Vec<String> = err
        .lines()
        .filter_map(|l| l.strip_prefix("aither-trace:"))
        .skip_while(|l| !l.contains("ready-seen"))
        .skip(1)
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            (t.len() >= 2 && t[0] != "stage").then(|| format!("{} {}", t[0], t[1]))
        })
        .collect();
    assert_eq!(
        finish,
        [
            "pool final-read+parsed",
            "launcher key-checked",
            "launcher workspace",
            "launcher stdio",
            "launcher final-sent",
            "sandbox FinalSpec",
            "sandbox FinishView",
            "sandbox CloseFds",
            "sandbox ParentDeathSignal",
            "sandbox Landlock",
            "sandbox Seccomp",
            "sandbox ForkAgent",
            "launcher started-seen",
            "launcher agent-done+reported",
            "launcher pid1-reaped",
            "launcher cgroup-removed",
        ],
        "{err}"
    );
}

/// A prepared sandbox whose pid 1 dies while it waits (killed from the host here) is reported
/// unusable and cleaned up: aitherd never hands a caller to it.
#[test]
fn a_prepared_sandbox_whose_pid1_died_is_refused_and_cleaned_up() {
    let ws = Workspace::new();
    let (template, _) = specs(&ws, &["true"]);
    let p = Pool::start(&template);
    let id = p.cgroup.clone();
    // SAFETY: SIGKILL to the sandbox's pid 1, which this test's launcher started.
    unsafe { libc::kill(p.pid1, libc::SIGKILL) };
    let (msgs, code, err) = p.rest();
    assert_eq!(code, 125, "{msgs:?} {err}");
    assert!(
        matches!(msgs.as_slice(), [PoolMsg::Refused(w)] if w.contains("died")),
        "{msgs:?}"
    );
    assert!(cgroups_named(&id).is_empty(), "{:?}", cgroups_named(&id));
}

/// Host pids whose command line mentions `marker`.
fn pids_marked(marker: &str) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cl = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cl).contains(marker).then_some(pid)
        })
        .collect()
}

/// `exited` means that nothing of the agent runs any more: a background child the agent
/// left (holding its stdout) is killed and reaped by pid 1 before the status goes out, the
/// caller's stdout has all the output and EOF, and the teardown (pid 1, the cgroup, the
/// launcher) completes after (docs/architecture.md, "Warm start").
#[test]
fn exited_comes_once_no_process_of_the_sandbox_is_left_and_the_teardown_follows() {
    let ws = Workspace::new();
    let marker = unique("leftover");
    let script = format!(
        "sh -c 'echo bg-up; touch /tmp/up; sleep 1000; : {marker}' & \
         while [ ! -e /tmp/up ]; do sleep 0.01; done; echo out; exit 3"
    );
    let (template, fin) = specs(&ws, &["sh", "-c", &script]);
    let mut p = Pool::start(&template);
    let pid1 = p.pid1;
    let c = send_final(&p, &fin);
    let mut msgs = Vec::new();
    let left_at_exited = loop {
        match p.recv() {
            Some(m @ PoolMsg::Exited { .. }) => {
                // At the moment the caller would see the status.
                let left = pids_marked(&marker);
                msgs.push(m);
                break left;
            }
            Some(m) => msgs.push(m),
            None => panic!("EOF before exited: {msgs:?}; {}", p.finish_stderr()),
        }
    };
    assert!(
        left_at_exited.is_empty(),
        "the agent's background child {left_at_exited:?} still existed when `exited` came"
    );
    assert_eq!(exited(&msgs), Some((3, false)), "{msgs:?}");
    let (out, err) = c.output();
    assert_eq!(
        out, "bg-up\nout\n",
        "all the output, then EOF; stderr: {err}"
    );
    let (rest, code, lerr) = p.rest();
    assert!(rest.is_empty(), "nothing after exited: {rest:?}");
    assert_eq!(code, 3, "{lerr}");
    assert!(!pid_alive(pid1), "pid 1 reaped by its launcher");
    assert!(
        common::poll_until(RUN_DEADLINE, || cgroup_dirs_of(&template.name).is_empty()),
        "the cgroup is removed: {:?}",
        cgroup_dirs_of(&template.name)
    );
}

/// An agent killed by the OOM killer is reported as such in `exited` (the cgroup's count is
/// read before the status goes out).
#[test]
fn an_oom_killed_agent_is_reported_in_exited() {
    let ws = Workspace::new();
    let (mut template, mut fin) = specs(&ws, &["./aither-probe", "alloc", "200"]);
    for s in [&mut template, &mut fin] {
        s.limits.memory = Some(64 << 20);
    }
    let p = Pool::start(&template);
    let c = send_final(&p, &fin);
    let (msgs, code, err) = p.rest();
    let (out, _) = c.output();
    assert_eq!(code, 137, "SIGKILL by the OOM killer: {msgs:?} {err}");
    assert!(
        msgs.iter().any(|m| matches!(
            m,
            PoolMsg::Exited {
                code: 137,
                oom_killed: true,
                ..
            }
        )),
        "{msgs:?}"
    );
    assert!(!out.contains("RESULT"), "{out}");
}

/// aitherd's cold launcher, `aither-init --config-fd 3 --status-fd 4`: the run's code comes on
/// the status descriptor as soon as nothing of the agent is left (a background child it left
/// holding stdout is gone by then, the output is whole and the launcher holds the caller's
/// stdout no more), and the launcher's teardown follows. Without that early path nothing
/// would be written there (the code would only be the exit status).
#[test]
fn the_cold_launcher_writes_the_code_once_nothing_of_the_agent_is_left() {
    common::require_root();
    let ws = Workspace::new();
    let marker = unique("cold-leftover");
    let script = format!(
        "sh -c 'echo bg-up; touch /tmp/up; sleep 1000; : {marker}' & \
         while [ ! -e /tmp/up ]; do sleep 0.01; done; echo out; exit 3"
    );
    let (template, fin) = specs(&ws, &["sh", "-c", &script]);
    let (config_r, config_w) = aither::sys::pipe().unwrap();
    let (status_r, status_w) = aither::sys::pipe().unwrap();
    std::fs::File::from(config_w)
        .write_all(&serde_json::to_vec(&fin).unwrap())
        .unwrap();
    let (cfg, st) = (config_r.as_raw_fd(), status_w.as_raw_fd());
    let mut cmd = Command::new(init_path());
    cmd.args(["--config-fd", "3", "--status-fd", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec (fcntl, dup2).
    unsafe {
        cmd.pre_exec(move || {
            let a = libc::fcntl(cfg, libc::F_DUPFD_CLOEXEC, 10);
            let b = libc::fcntl(st, libc::F_DUPFD_CLOEXEC, 10);
            if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn aither-init --config-fd");
    drop((config_r, status_w));
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let mut line = String::new();
    BufReader::new(std::fs::File::from(status_r))
        .read_line(&mut line)
        .expect("read the status descriptor");
    // At the moment the caller would get the code.
    let left = pids_marked(&marker);
    assert_eq!(line, "3\n", "the code before the teardown");
    assert!(
        left.is_empty(),
        "the agent's background child {left:?} still existed when the code came"
    );
    assert_eq!(
        stdout.join().unwrap(),
        "bg-up\nout\n",
        "all the output, then EOF"
    );
    let code = wait_with_deadline(&mut child, "aither-init --config-fd", RUN_DEADLINE);
    assert_eq!(code.code(), Some(3), "{}", stderr.join().unwrap());
    assert!(
        common::poll_until(RUN_DEADLINE, || cgroup_dirs_of(&template.name).is_empty()
            && cgroup_dirs_of(&fin.name).is_empty()),
        "the cgroup is removed"
    );
}

/// A command `aither-init exec` started in the sandbox (joined from outside its pid
/// namespace: its parent is not pid 1, and it is in a Landlock domain of its own) is still
/// running when the agent exits: `exited` waits until it is gone too (pid 1's exit, whose
/// kill of the namespace ends it), as before the status came ahead of the teardown.
#[test]
fn exited_waits_for_a_command_execd_into_the_sandbox() {
    let ws = Workspace::new();
    let marker = unique("execd");
    let (template, fin) = specs(
        &ws,
        &[
            "sh",
            "-c",
            "echo ready; until [ -e /tmp/go ]; do sleep 0.02; done; exit 4",
        ],
    );
    let mut p = Pool::start(&template);
    let c = send_final(&p, &fin);
    let first = c
        .lines
        .recv_timeout(RUN_DEADLINE)
        .expect("the agent's first line");
    assert_eq!(first, "ready");
    let cfg = aither::sandbox::ExecConfig::new(
        fin.clone(),
        p.pid1,
        vec![
            "sh".into(),
            "-c".into(),
            format!("touch /tmp/go; sleep 1000; : {marker}"),
        ],
        None,
    );
    let mut exec = Command::new(init_path())
        .arg("exec")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn aither-init exec");
    exec.stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&cfg).unwrap())
        .unwrap();
    let exec_err = drain(exec.stderr.take().unwrap());
    let mut msgs = Vec::new();
    let left_at_exited = loop {
        match p.recv() {
            Some(m @ PoolMsg::Exited { .. }) => {
                let left = pids_marked(&marker);
                msgs.push(m);
                break left;
            }
            Some(m) => msgs.push(m),
            None => panic!("EOF before exited: {msgs:?}; {}", p.finish_stderr()),
        }
    };
    let st = wait_with_deadline(&mut exec, "aither-init exec", RUN_DEADLINE);
    let exec_err = exec_err.join().unwrap();
    assert!(
        left_at_exited.is_empty(),
        "the exec'd command {left_at_exited:?} still existed when `exited` came"
    );
    assert_eq!(
        exited(&msgs),
        Some((4, false)),
        "{msgs:?}; exec: {st:?} {exec_err}"
    );
    let (_, code, err) = p.rest();
    assert_eq!(code, 4, "{err}");
    c.output();
}

/// What an exec'd command left behind when it exited is re-parented to pid 1 but sits in the
/// command's Landlock domain, which pid 1 may not signal: pid 1 must not wait for it before
/// it reports (its own exit, right after, ends it with the namespace).
#[test]
fn an_orphan_of_an_execd_command_does_not_hold_up_the_status() {
    let ws = Workspace::new();
    let marker = unique("orphan");
    let (template, fin) = specs(
        &ws,
        &[
            "sh",
            "-c",
            "echo ready; until [ -e /tmp/go ]; do sleep 0.02; done; exit 4",
        ],
    );
    let mut p = Pool::start(&template);
    let c = send_final(&p, &fin);
    let first = c
        .lines
        .recv_timeout(RUN_DEADLINE)
        .expect("the agent's first line");
    assert_eq!(first, "ready");
    let cfg = aither::sandbox::ExecConfig::new(
        fin.clone(),
        p.pid1,
        vec![
            "sh".into(),
            "-c".into(),
            // The background sleep outlives its shell: an orphan of the exec'd command.
            format!("sh -c 'sleep 1000; : {marker}' </dev/null >/dev/null 2>&1 & touch /tmp/go"),
        ],
        None,
    );
    let mut exec = Command::new(init_path())
        .arg("exec")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn aither-init exec");
    exec.stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&cfg).unwrap())
        .unwrap();
    let exec_err = drain(exec.stderr.take().unwrap());
    let mut msgs = Vec::new();
    // `recv` fails the test after RUN_DEADLINE without a message.
    loop {
        match p.recv() {
            Some(m @ PoolMsg::Exited { .. }) => {
                msgs.push(m);
                break;
            }
            Some(m) => msgs.push(m),
            None => panic!("EOF before exited: {msgs:?}; {}", p.finish_stderr()),
        }
    }
    let st = wait_with_deadline(&mut exec, "aither-init exec", RUN_DEADLINE);
    let exec_err = exec_err.join().unwrap();
    assert_eq!(
        exited(&msgs),
        Some((4, false)),
        "{msgs:?}; exec: {st:?} {exec_err}"
    );
    let (_, code, err) = p.rest();
    assert_eq!(code, 4, "{err}");
    let left = pids_marked(&marker);
    assert!(left.is_empty(), "the orphan {left:?} outlived the sandbox");
    c.output();
}
