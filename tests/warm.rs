//! `aitherctl run` served by aitherd (issue 21, docs/daemon.md "run"): with a real private
//! aitherd on its socket, the run behaves as the standalone one (exit status, streams, stdin,
//! `--timeout`, signals, the agent's own terminal, a fresh /tmp and pid namespace), is the
//! caller's as aitherd knows them (a member in their own directory; refused elsewhere; a
//! non-member refused), ends with its client, and `--no-daemon` still runs it standalone.
//!
//! Each test proves the daemon served it from the daemon's own audit log (a `run` record),
//! or for `--no-daemon`, that it did not.
//!
//! Needs root (the daemon, the sandboxes, the test users).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemon::TestDaemon;
use common::users::Users;
use common::{pids_with_cmdline, poll_until, wait_with_deadline, RUN_DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// The daemon's `run` records whose command has `marker` in an argument (a standalone run
/// records its own in the same log, without the caller aitherd saw).
fn runs_audited(d: &TestDaemon, marker: &str) -> Vec<Value> {
    d.audit_records()
        .into_iter()
        .filter(|r| {
            r["kind"] == "run"
                && r["caller_uid"].is_number()
                && r["data"]["argv"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x.as_str().is_some_and(|s| s.contains(marker)))
                })
        })
        .collect()
}

/// `runs_audited` once it holds at least `n` records (aitherd's audit writer is
/// asynchronous), at most `WAIT`.
fn audited(d: &TestDaemon, marker: &str, n: usize) -> Vec<Value> {
    poll_until(WAIT, || runs_audited(d, marker).len() >= n);
    runs_audited(d, marker)
}

/// Waits until a run served after everything before it is in the audit log (the log is
/// written in order), so an absent record is absent.
fn barrier(d: &TestDaemon, tag: &str) {
    let marker = format!("warm-barrier-{tag}");
    let (code, _, err) = run_sh(d, &[], &format!("exit 0 # {marker}"), "");
    assert_eq!(code, 0, "{err}");
    assert_eq!(audited(d, &marker, 1).len(), 1);
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `aitherctl run --policy strict -- sh -c SCRIPT` against `d`, in its workspace, with
/// `input` on stdin; (exit code, stdout, stderr).
fn run_sh(d: &TestDaemon, flags: &[&str], script: &str, input: &str) -> (i32, String, String) {
    let mut args = vec!["run", "--policy", "strict"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let mut child = d
        .cmd(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("aitherctl run");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    // Fed from a thread: the agent may not read it all before it exits.
    let feeder = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut stdin, input.as_bytes());
    });
    let out = child.wait_with_output().expect("aitherctl run");
    let _ = feeder.join();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// `aitherctl run --policy strict -- sh -c "echo ready; exec sleep SECS"` against `d`, once the
/// agent has said `ready` (its stdout is read no further).
fn start_sleeper(d: &TestDaemon, secs: &str) -> std::process::Child {
    let mut c = d
        .cmd(&[
            "run",
            "--policy",
            "strict",
            "--",
            "sh",
            "-c",
            &format!("echo ready; exec sleep {secs}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("aitherctl run");
    let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    c
}

#[test]
fn through_aitherd_the_status_streams_and_stdin_are_the_agents() {
    let d = TestDaemon::start("aitherd-warm-", &[]);
    for (want, script) in [
        (0, "exit 0 # warm-zero"),
        (3, "exit 3 # warm-three"),
        (137, "kill -9 $$ # warm-nine"),
    ] {
        let (code, _, err) = run_sh(&d, &[], script, "");
        assert_eq!(code, want, "{script}: {err}\n{}", d.log());
        let marker = script.split("# ").nth(1).unwrap();
        assert_eq!(
            audited(&d, marker, 1).len(),
            1,
            "{script}: aitherd served it (one `run` record in its audit log)"
        );
    }
    let (code, out, err) = run_sh(
        &d,
        &[],
        "echo to-stdout; echo to-stderr >&2; tr a-z A-Z; echo warm-streams",
        "piped through\n",
    );
    assert_eq!(code, 0, "{err}\n{}", d.log());
    assert_eq!(out, "to-stdout\nPIPED THROUGH\nwarm-streams\n");
    assert_eq!(err, "to-stderr\n");
    let rec = &audited(&d, "warm-streams", 1)[0];
    assert_eq!(rec["decision"], "allow", "{rec}");
    assert_eq!(rec["caller_uid"], 0, "{rec}");
}

#[test]
fn through_aitherd_timeout_gives_124_and_sigterm_reaches_the_agent() {
    let d = TestDaemon::start("aitherd-warm-", &[]);
    let (code, _, err) = run_sh(&d, &["--timeout", "1s"], "sleep 60 # warm-timeout", "");
    assert_eq!(code, 124, "{err}\n{}", d.log());
    assert!(err.contains("timeout"), "{err}");
    assert_eq!(audited(&d, "warm-timeout", 1).len(), 1);

    // The agent says when its trap is set; SIGTERM to aitherctl then reaches it through
    // aitherd and its launcher, and its own exit status comes back.
    let mut child = d
        .cmd(&[
            "run",
            "--policy",
            "strict",
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done # warm-term",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("aitherctl run");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("ready"),
        "{}",
        d.log()
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let st = wait_with_deadline(&mut child, "aitherctl run after SIGTERM", RUN_DEADLINE);
    assert_eq!(st.code(), Some(7), "the agent's own status after its trap");
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("got-term")
    );
    assert_eq!(audited(&d, "warm-term", 1).len(), 1);
}

#[test]
fn a_client_killed_mid_run_leaves_no_sandbox_process() {
    let d = TestDaemon::start("aitherd-warm-", &[]);
    let secs = format!("{}", 900_000 + std::process::id() % 10_000);
    let mut child = start_sleeper(&d, &secs);
    assert!(
        poll_until(WAIT, || !pids_with_cmdline(&["sleep", &secs]).is_empty()),
        "the agent is not running"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        poll_until(WAIT, || pids_with_cmdline(&["sleep", &secs]).is_empty()),
        "the agent outlived its client: {:?}",
        pids_with_cmdline(&["sleep", &secs])
    );
    // aitherd itself is fine and serves the next run.
    let (code, _, err) = run_sh(&d, &[], "exit 5 # warm-after-kill", "");
    assert_eq!(code, 5, "{err}");
}

#[test]
fn each_run_gets_a_fresh_tmp_and_pid_namespace_and_no_daemon_runs_standalone() {
    let d = TestDaemon::start("aitherd-warm-", &[]);
    let probe = "echo $(readlink /proc/self/ns/pid); ls -A /tmp; touch /tmp/left-by-the-last-run; echo warm-fresh";
    let (c1, o1, e1) = run_sh(&d, &[], probe, "");
    let (c2, o2, e2) = run_sh(&d, &[], probe, "");
    assert_eq!((c1, c2), (0, 0), "{e1}{e2}");
    let ns = |o: &str| o.lines().next().unwrap_or_default().to_string();
    let host = std::fs::read_link("/proc/self/ns/pid")
        .unwrap()
        .display()
        .to_string();
    assert!(ns(&o1).starts_with("pid:["), "{o1}");
    assert_ne!(ns(&o1), ns(&o2), "two runs, one pid namespace");
    assert_ne!(ns(&o1), host, "the host's pid namespace");
    for o in [&o1, &o2] {
        assert!(
            !o.contains("left-by-the-last-run"),
            "/tmp was not fresh: {o}"
        );
    }
    assert_eq!(audited(&d, "warm-fresh", 2).len(), 2);

    // --no-daemon: the same run, launched by aitherctl itself while aitherd listens.
    let (code, out, err) = run_sh(
        &d,
        &["--no-daemon"],
        "echo standalone; exit 4 # warm-standalone",
        "",
    );
    assert_eq!(code, 4, "{err}");
    assert_eq!(out, "standalone\n");
    barrier(&d, "standalone");
    assert!(
        runs_audited(&d, "warm-standalone").is_empty(),
        "--no-daemon went through aitherd"
    );
}

#[test]
fn with_a_terminal_the_agent_gets_one_of_its_own() {
    let d = TestDaemon::start("aitherd-warm-", &[]);
    // script(1) gives aitherctl a pty as its terminal; the agent reports what its stdin is.
    let ctl = common::AITHERCTL;
    let line = format!(
        "stat -L -c 'caller %t:%T' /proc/self/fd/0; {ctl} run --policy strict -- sh -c \
         'test -t 0 && echo agent-tty; stat -L -c \"agent %t:%T\" /proc/self/fd/0 # warm-pty'"
    );
    let mut c = Command::new("script");
    d.env(&mut c);
    let o = c
        .args(["-qec", &line, "/dev/null"])
        .current_dir(d.ws.path())
        .stdin(Stdio::null())
        .output()
        .expect("script(1) is needed (bsdutils: Essential on Debian; util-linux elsewhere)");
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}\n{}", text(&o.stderr), d.log());
    assert!(
        out.contains("agent-tty"),
        "the agent has no terminal: {out}"
    );
    let field = |who: &str| {
        out.lines()
            .find_map(|l| {
                // script(1) echoes its stdin's EOF as `^@`, which may land before a line.
                l.trim()
                    .trim_start_matches("^@")
                    .strip_prefix(who)
                    .map(str::trim)
                    .map(String::from)
            })
            .unwrap_or_else(|| panic!("no {who} line: {out}"))
    };
    assert_ne!(
        field("agent "),
        field("caller "),
        "the agent was given the caller's terminal"
    );
    assert_eq!(audited(&d, "warm-pty", 1).len(), 1);
}

#[test]
fn a_member_runs_in_their_own_directory_and_is_refused_elsewhere_and_a_non_member_is_refused() {
    let us = Users::create();
    let d = us.daemon();
    let u = &us.users[0];
    // In their own directory (the default workspace): it runs, and its files are theirs.
    let o = us.ctl(
        &d,
        0,
        &[
            "run",
            "--policy",
            "strict",
            "--",
            "sh",
            "-c",
            "echo hi > made-by-run.txt; exit 6 # warm-member",
        ],
    );
    assert_eq!(o.status.code(), Some(6), "{}{}", text(&o.stderr), d.log());
    let m = std::fs::metadata(us.dir(u).join("made-by-run.txt")).expect("the agent's file");
    assert_eq!((m.uid(), m.gid()), (u.uid, u.gid));
    let rec = &audited(&d, "warm-member", 1)[0];
    assert_eq!(rec["caller_uid"], u.uid, "{rec}");

    // A directory they can open but not write (root's): aitherd refuses, nothing runs, and
    // aitherctl does not retry it standalone.
    let roots = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(
        roots.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ws = roots.path().display().to_string();
    let o = us.ctl(
        &d,
        0,
        &[
            "run",
            "--policy",
            "strict",
            "--workspace",
            &ws,
            "--",
            "sh",
            "-c",
            "touch x # warm-refused",
        ],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("aitherd refused the run"), "{err}");
    let recs = audited(&d, "warm-refused", 1);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["decision"], "deny");
    assert!(std::fs::read_dir(roots.path()).unwrap().next().is_none());

    // Not in group aither (nobody, no groups): refused, and nothing is launched for them.
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--",
        common::AITHERCTL,
        "run",
        "--policy",
        "strict",
        "--",
        "sh",
        "-c",
        "exit 0 # warm-nonmember",
    ])
    .current_dir("/");
    d.env(&mut c);
    let o = c.stdin(Stdio::null()).output().expect("setpriv");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("only root and members of group aither"),
        "{err}"
    );
    barrier(&d, "nonmember");
    assert!(runs_audited(&d, "warm-nonmember").is_empty());
}

/// A stand-in for an aitherd that answers every request with `reply` (python3 on a unix
/// socket in `dir`): an older aitherd that does not know `run`, or one that refuses it.
struct FakeDaemon {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl FakeDaemon {
    fn start(dir: &std::path::Path, reply: &Value) -> FakeDaemon {
        let socket = dir.join("fake.sock");
        let script = r#"
import os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(8)
print("listening", flush=True)
body = sys.argv[2].encode()
while True:
    c, _ = s.accept()
    msg, fds, _, _ = socket.recv_fds(c, 1 << 20, 8)
    for fd in fds:
        os.close(fd)
    c.sendall(struct.pack(">I", len(body)) + body)
    c.close()
"#;
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(&socket)
            .arg(reply.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (install.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        FakeDaemon { child, socket }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_older_aitherd_means_standalone_and_a_refusal_is_final() {
    common::require_root();
    let ws = common::Workspace::new();
    let run = |socket: &std::path::Path| {
        let mut child = Command::new(common::AITHERCTL)
            .env("AITHER_SOCKET", socket)
            .env("AITHER_POLICY_DIR", common::policy_dir())
            .env("AITHER_AUDIT_LOG", common::test_audit_log())
            .args(["run", "--policy", "strict", "--workspace"])
            .arg(ws.path())
            .args(["--", "sh", "-c", "cat; exit 9"])
            .current_dir(ws.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("aitherctl run");
        // A refused run exits without reading it: a broken pipe is that case's, not an error
        // (what the run printed and its status are asserted below).
        let _ =
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"kept for the agent\n");
        let o = child.wait_with_output().unwrap();
        (o.status.code(), text(&o.stdout), text(&o.stderr))
    };
    // An aitherd from before `run`: serde's "unknown variant" → the standalone path, with
    // stdin unread by the attempt.
    let dir = tempfile::tempdir().unwrap();
    let old = FakeDaemon::start(
        dir.path(),
        &serde_json::json!({"ok": false, "error": {"code": "bad_request",
            "message": "unknown variant `run`, expected one of `ping`, `spawn`"}}),
    );
    let (code, out, err) = run(&old.socket);
    assert_eq!(code, Some(9), "{err}");
    assert_eq!(out, "kept for the agent\n", "{err}");
    drop(old);
    // A refusal: its message, 125, and nothing ran (never retried without aitherd).
    let dir = tempfile::tempdir().unwrap();
    let refusing = FakeDaemon::start(
        dir.path(),
        &serde_json::json!({"ok": false, "error": {"code": "denied",
            "message": "the fake daemon says no"}}),
    );
    let (code, out, err) = run(&refusing.socket);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("the fake daemon says no"), "{err}");
    assert_eq!(out, "", "the agent ran after a refusal");
    // A stale socket (nobody listening): standalone.
    drop(refusing);
    let (code, out, err) = run(&dir.path().join("fake.sock"));
    assert_eq!(
        (code, out.as_str()),
        (Some(9), "kept for the agent\n"),
        "{err}"
    );
}

#[test]
fn aitherd_runs_at_most_sixteen_runs_per_user_at_a_time() {
    let d = TestDaemon::start("aitherd-warm-", &[]);
    let secs = format!("{}", 800_000 + std::process::id() % 10_000);
    let mut held: Vec<std::process::Child> = (0..16).map(|_| start_sleeper(&d, &secs)).collect();
    let (code, out, err) = run_sh(&d, &[], "echo ran # warm-seventeenth", "");
    assert_eq!(code, 125, "{out}{err}");
    assert!(err.contains("16 runs through aitherd"), "{err}");
    assert_eq!(out, "");
    // One ends: the next is served.
    let mut first = held.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        poll_until(WAIT, || run_sh(&d, &[], "exit 0 # warm-after-limit", "").0
            == 0),
        "no run was served after one of the 16 ended"
    );
    for mut c in held {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(
        poll_until(WAIT, || pids_with_cmdline(&["sleep", &secs]).is_empty()),
        "runs outlived their clients"
    );
}

/// A run whose preparation blocks holds up its own request, not aitherd: root names a policy
/// file that is a FIFO nobody writes, twice (as many as aitherd has async workers), and another
/// client's run is served meanwhile (aitherd prepares a run off its workers, docs/daemon.md
/// "run"); the stuck ones end refused once the FIFO gives them a broken policy.
#[test]
fn a_run_stuck_in_its_preparation_does_not_hold_up_other_clients() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let d = TestDaemon::start("aitherd-warm-", &[]);
    let dir = tempfile::tempdir().unwrap();
    let fifos: Vec<std::path::PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("stuck{i}.toml")))
        .collect();
    for f in &fifos {
        nix::unistd::mkfifo(f, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }
    let stuck: Vec<std::process::Child> = fifos
        .iter()
        .map(|f| {
            d.cmd(&["run", "--policy", f.to_str().unwrap(), "--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("aitherctl run")
        })
        .collect();
    // A writer's non-blocking open succeeds only once a reader has the FIFO open: aitherd's
    // policy read, which then waits for bytes that this open writer does not send.
    let mut writers: Vec<std::fs::File> = fifos
        .iter()
        .map(|f| {
            let mut w = None;
            assert!(
                poll_until(WAIT, || {
                    w = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(f)
                        .ok();
                    w.is_some()
                }),
                "aitherd never opened {}",
                f.display()
            );
            w.unwrap()
        })
        .collect();
    // Bounded: with aitherd's workers held, this run would wait for ever.
    let mut beside = d
        .cmd(&[
            "run",
            "--policy",
            "strict",
            "--",
            "sh",
            "-c",
            "echo served # warm-beside-stuck",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("aitherctl run");
    let status = wait_with_deadline(&mut beside, "a run beside two stuck ones", RUN_DEADLINE);
    let out = beside.wait_with_output().unwrap();
    assert!(status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "served\n");
    assert_eq!(audited(&d, "warm-beside-stuck", 1).len(), 1);
    let ps = d.ctl(&["ps"]);
    assert!(ps.status.success(), "{ps:?}");
    for w in &mut writers {
        w.write_all(b"[[[ not a policy\n").unwrap();
    }
    drop(writers);
    for mut c in stuck {
        let status = wait_with_deadline(&mut c, "a run with a FIFO for a policy", RUN_DEADLINE);
        let mut err = String::new();
        std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(125), "{err}");
        assert!(err.contains("aitherd refused the run"), "{err}");
    }
}
