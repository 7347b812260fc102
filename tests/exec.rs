//! `aitherctl exec` end to end, as root: a real daemon, supervised strict agents, and commands
//! run in their sandboxes (docs/daemon.md "exec"). What the command gets is compared with what
//! the agent itself has: the same uid, capabilities, seccomp mode, no_new_privs and cgroups.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use aither::daemon::client::Client;
use aither::daemon::proto::{ExecRequest, Request};
use common::daemon::TestDaemon as Daemon;
use common::{pids_with_cmdline, poll_until, unique};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn daemon() -> Daemon {
    Daemon::start("aitherd-exec-", &[])
}

/// The identity lines of /proc/self/status that exec must share with the agent.
const IDENTITY: &str = "grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status";

/// Spawns a strict agent that prints its identity lines, then `sleep 300`, and waits until it
/// runs and its lines are in its log. Returns the lines.
fn spawn_agent(d: &Daemon, name: &str) -> String {
    let script = format!("{IDENTITY}; echo from-agent > /tmp/agent-file; exec sleep 300");
    d.ok(&[
        "spawn", "--json", "--policy", "strict", name, "--", "sh", "-c", &script,
    ]);
    let mut lines = String::new();
    let ok = poll_until(Duration::from_secs(20), || {
        let state = d.json(&["inspect", name])["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        lines = d.ok(&["logs", name]);
        state == "running" && lines.contains("Seccomp:")
    });
    assert!(ok, "{name} did not start: {lines}\n{}", d.log());
    lines
}

fn exec(d: &Daemon, args: &[&str]) -> Output {
    let mut a = vec!["exec"];
    a.extend_from_slice(args);
    d.ctl(&a)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

#[test]
fn exec_runs_in_the_agents_sandbox_with_its_confinement_and_returns_its_status() {
    let d = daemon();
    let name = unique("exec");
    std::fs::write(d.ws.path().join("ws-file"), "from-workspace\n").unwrap();
    let agent_identity = spawn_agent(&d, &name);

    // Output and exit status.
    let o = exec(
        &d,
        &[&name, "--", "sh", "-c", "echo hi; echo err >&2; exit 3"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", describe(&o));
    assert_eq!(text(&o.stdout), "hi\n");
    assert_eq!(text(&o.stderr), "err\n");

    // Exactly the agent's identity: uid, capabilities (none), no_new_privs, seccomp mode 2.
    let o = exec(&d, &[&name, "--", "sh", "-c", IDENTITY]);
    assert!(o.status.success(), "{}", describe(&o));
    let mine = text(&o.stdout);
    assert_eq!(
        mine, agent_identity,
        "exec's identity differs from the agent's"
    );
    assert!(mine.contains("CapEff:\t0000000000000000"), "{mine}");
    assert!(mine.contains("Seccomp:\t2"), "{mine}");
    assert!(mine.contains("NoNewPrivs:\t1"), "{mine}");

    // The agent's mount namespace (its own /tmp) and its workspace.
    let ws_file = d.ws.path().join("ws-file");
    let o = exec(
        &d,
        &[
            &name,
            "--",
            "cat",
            "/tmp/agent-file",
            ws_file.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(text(&o.stdout), "from-agent\nfrom-workspace\n");

    // Not more than the agent: /etc/shadow stays unreadable (it is there on the host).
    assert!(std::path::Path::new("/etc/shadow").exists());
    let o = exec(&d, &[&name, "--", "cat", "/etc/shadow"]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(o.stdout.is_empty(), "{}", describe(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("Permission denied") || err.contains("No such file"),
        "{err}"
    );

    // 127 for a command that is not there, 128+N for a signal.
    let o = exec(&d, &[&name, "--", "no-such-command-here"]);
    assert_eq!(o.status.code(), Some(127), "{}", describe(&o));
    assert!(text(&o.stderr).contains("not found"), "{}", describe(&o));
    let o = exec(&d, &[&name, "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(o.status.code(), Some(137), "{}", describe(&o));

    // --env on top of the agent's environment, -w for the working directory.
    let o = exec(
        &d,
        &[
            "--env",
            "GREETING=hello there",
            "-w",
            "/tmp",
            &name,
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"; pwd; ls",
        ],
    );
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(text(&o.stdout), "hello there\n/tmp\nagent-file\n");
    // A directory that is not there: Aither's error, nothing ran.
    let o = exec(&d, &["-w", "/no/such/dir", &name, "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("working directory"),
        "{}",
        describe(&o)
    );

    // The record of who ran what.
    let audit = std::fs::read_to_string(d.audit_log()).unwrap_or_default();
    let rec: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "exec" && r["agent"] == name.as_str())
        .collect();
    assert!(
        rec.iter().any(|r| r["decision"] == "allow"
            && r["data"]["argv"][0] == "no-such-command-here"
            && r["caller_uid"] == 0),
        "{rec:#?}"
    );
    // Values of --env are not recorded, their names are.
    assert!(!audit.contains("hello there"));
    assert!(rec.iter().any(|r| r["data"]["env"][0] == "GREETING"));
}

#[test]
fn exec_passes_stdin_only_with_i() {
    let d = daemon();
    let name = unique("stdin");
    spawn_agent(&d, &name);
    let run = |args: &[&str]| {
        let mut a = vec!["exec"];
        a.extend_from_slice(args);
        let mut c = d
            .cmd(&a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Without -i nothing reads it: aitherctl may be gone already.
        let _ = c.stdin.take().unwrap().write_all(b"data\n");
        c.wait_with_output().unwrap()
    };
    let o = run(&["-i", &name, "--", "cat"]);
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(text(&o.stdout), "data\n");
    // Without -i the command reads /dev/null.
    let o = run(&[&name, "--", "sh", "-c", "cat; readlink /proc/self/fd/0"]);
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(text(&o.stdout), "/dev/null\n");
}

#[test]
fn exec_into_a_missing_or_stopped_agent_is_aithers_error() {
    let d = daemon();
    let o = exec(&d, &["no-such-agent", "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("no agent named"),
        "{}",
        describe(&o)
    );

    let name = unique("stopped");
    spawn_agent(&d, &name);
    d.ok(&["stop", &name, "--timeout", "1s"]);
    let o = exec(&d, &[&name, "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("stopped") && err.contains("running sandbox"),
        "{err}"
    );

    // Removed: its name is kept (with its memory), the agent is gone.
    d.ok(&["rm", &name]);
    let o = exec(&d, &[&name, "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("no agent named"),
        "{}",
        describe(&o)
    );
}

/// Starts `aitherctl exec NAME -- sleep SECS` and waits for the sleep to run on the host.
fn exec_sleep(d: &Daemon, name: &str, secs: &str) -> (Child, i32) {
    let child = d
        .cmd(&["exec", name, "--", "sleep", secs])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pid = 0;
    let ok = poll_until(Duration::from_secs(10), || {
        pid = pids_with_cmdline(&["sleep", secs])
            .first()
            .copied()
            .unwrap_or(0);
        pid != 0
    });
    assert!(ok, "sleep {secs} did not start\n{}", d.log());
    (child, pid)
}

fn cgroups(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

#[test]
fn execs_count_in_the_agents_cgroup_are_bounded_and_die_with_their_client() {
    let d = daemon();
    let name = unique("bounds");
    spawn_agent(&d, &name);
    let agent_pid = d.json(&["inspect", &name])["agent_pid"].as_i64().unwrap() as i32;

    let mut running = Vec::new();
    for i in 0..4 {
        let secs = format!("{}", 3000 + i);
        let (c, pid) = exec_sleep(&d, &name, &secs);
        // In the agent's cgroups (its pids limit counts it), from its birth.
        assert_eq!(cgroups(pid), cgroups(agent_pid), "exec {i}");
        running.push((c, pid));
    }
    // A fifth at once is refused, with the reason.
    let o = exec(&d, &[&name, "--", "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("already runs 4"),
        "{}",
        describe(&o)
    );

    // A client that goes away takes its command with it.
    for (mut c, pid) in running {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
        let _ = c.wait();
        assert!(
            poll_until(Duration::from_secs(10), || !std::path::Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))),
            "the command {pid} outlived its client"
        );
    }
    // The slots are free again.
    let ok = poll_until(Duration::from_secs(5), || {
        exec(&d, &[&name, "--", "true"]).status.success()
    });
    assert!(ok, "no exec possible after the clients went away");
}

#[test]
fn aitherd_refuses_a_socket_a_directory_or_a_proc_file_as_a_commands_stream() {
    let d = daemon();
    let name = unique("fds");
    spawn_agent(&d, &name);
    let null = std::fs::File::open("/dev/null").unwrap();
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let req = Request::Exec(ExecRequest {
        name: name.clone(),
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        tty: false,
        copy: None,
    });
    let mut c = Client::connect(&d.socket()).unwrap();
    let r = c
        .call_with_fds(&req, &[null.as_fd(), sock.as_fd(), null.as_fd()])
        .unwrap();
    assert!(!r.ok, "{r:?}");
    let e = r.error.unwrap();
    assert_eq!(e.code, "invalid");
    assert!(e.message.contains("stdout is a socket"), "{}", e.message);

    // A directory would be a way out of the mount namespace.
    let dir = std::fs::File::open("/").unwrap();
    let mut c = Client::connect(&d.socket()).unwrap();
    let r = c
        .call_with_fds(&req, &[dir.as_fd(), null.as_fd(), null.as_fd()])
        .unwrap();
    let e = r.error.expect("refused");
    assert!(e.message.contains("stdin is a directory"), "{}", e.message);

    // A file of /proc is a handle on a process, not data.
    let status = std::fs::File::open("/proc/self/status").unwrap();
    let mut c = Client::connect(&d.socket()).unwrap();
    let r = c
        .call_with_fds(&req, &[status.as_fd(), null.as_fd(), null.as_fd()])
        .unwrap();
    let e = r.error.expect("refused");
    assert!(
        e.message.contains("stdin is a file of procfs"),
        "{}",
        e.message
    );

    // Too few descriptors.
    let mut c = Client::connect(&d.socket()).unwrap();
    let r = c.call_with_fds(&req, &[null.as_fd()]).unwrap();
    let e = r.error.expect("refused");
    assert!(e.message.contains("got 1"), "{}", e.message);

    // aitherctl itself relays a socket on stdout through a pipe.
    let (out, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let o = d
        .cmd(&[
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "echo via-relay; readlink /proc/self/fd/1",
        ])
        .stdin(Stdio::null())
        .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(out)))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", describe(&o));
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = String::new();
    let _ = std::io::Read::read_to_string(&mut &peer, &mut got);
    assert!(got.starts_with("via-relay\npipe:["), "{got:?}");

    // ... and a /proc file on stdin.
    let o = d
        .cmd(&[
            "exec",
            "-i",
            &name,
            "--",
            "sh",
            "-c",
            "head -c 6; readlink /proc/self/fd/0",
        ])
        .stdin(std::fs::File::open("/proc/self/status").unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", describe(&o));
    assert!(
        text(&o.stdout).starts_with("Name:\tpipe:["),
        "{}",
        describe(&o)
    );
}

#[test]
fn an_exec_ends_when_aitherd_stops_and_the_client_says_so() {
    let mut d = daemon();
    let name = unique("dstop");
    spawn_agent(&d, &name);
    let (child, pid) = exec_sleep(&d, &name, "4321");
    d.sigterm();
    // The agent keeps running (as always when aitherd stops); the exec'd command does not.
    assert!(
        poll_until(Duration::from_secs(10), || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        }),
        "the command {pid} outlived aitherd"
    );
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("without a reply"),
        "{}",
        describe(&o)
    );
    // Back, so that the fixture can remove the agent.
    d.launch();
}

#[test]
fn exec_reaches_an_agent_that_a_restarted_aitherd_adopted() {
    let mut d = daemon();
    let name = unique("adopted");
    let identity = spawn_agent(&d, &name);
    d.kill9();
    d.launch();
    assert!(
        poll_until(Duration::from_secs(20), || d.json(&["inspect", &name])
            ["state"]
            == "running"),
        "{name} was not adopted\n{}",
        d.log()
    );
    let o = exec(&d, &[&name, "--", "sh", "-c", IDENTITY]);
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(text(&o.stdout), identity);
}

/// The agent and an exec'd command share a uid, but not a Landlock domain (whose ptrace
/// restriction guards /proc/PID/environ, mem and the fd links): the agent cannot read the
/// command's environment (a secret passed with --env), its memory or its descriptors.
#[test]
fn the_agent_cannot_read_an_execd_commands_environment_or_descriptors() {
    let d = daemon();
    let name = unique("snoop");
    // The agent waits for /tmp/go (its sandbox's own /tmp), then looks for the command.
    let script = r#"echo up
while [ ! -e /tmp/go ]; do sleep 0.05; done
for p in /proc/[0-9]*; do
  if [ "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" = "sleep 4343 " ]; then
    echo "found ${p#/proc/}"
    cat $p/environ > /tmp/stolen 2>/dev/null; echo "environ=$?"
    readlink $p/fd/1 > /dev/null 2>&1; echo "fdlink=$?"
    (: < $p/fd/1) 2>/dev/null; echo "fdopen=$?"
    head -c 1 $p/mem > /dev/null 2>&1; echo "mem=$?"
  fi
done
echo snooped
exec sleep 300"#;
    d.ok(&[
        "spawn", "--policy", "strict", &name, "--", "sh", "-c", script,
    ]);
    assert!(
        poll_until(Duration::from_secs(20), || d
            .ok(&["logs", &name])
            .contains("up")),
        "{name} did not start"
    );
    let mut secret = d
        .cmd(&[
            "exec",
            "--env",
            "API_TOKEN=s3cret-exec",
            &name,
            "--",
            "sleep",
            "4343",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(poll_until(Duration::from_secs(10), || !pids_with_cmdline(
        &["sleep", "4343"]
    )
    .is_empty()));
    let o = exec(&d, &[&name, "--", "touch", "/tmp/go"]);
    assert!(o.status.success(), "{}", describe(&o));
    let mut log = String::new();
    assert!(
        poll_until(Duration::from_secs(20), || {
            log = d.ok(&["logs", &name]);
            log.contains("snooped")
        }),
        "{log}"
    );
    let _ = kill(Pid::from_raw(secret.id() as i32), Signal::SIGKILL);
    let _ = secret.wait();
    assert!(
        log.contains("found "),
        "the agent never saw the command: {log}"
    );
    assert!(log.contains("environ=1"), "{log}");
    // (It may list the descriptors' numbers, as for any process of its uid; not follow them.)
    assert!(log.contains("fdlink=1"), "{log}");
    assert!(!log.contains("fdopen=0"), "{log}");
    assert!(log.contains("mem=1"), "{log}");
    let stolen = exec(&d, &[&name, "--", "cat", "/tmp/stolen"]);
    assert!(
        !text(&stolen.stdout).contains("s3cret"),
        "{}",
        describe(&stolen)
    );
}
