//! The hostile agent: `aither-probe` runs inside `aitherctl run --policy strict` and tries one
//! escape per run; each test asserts the exact result line (a specific errno, never just
//! "failed"), next to a control showing the workspace stays writable in the same set of runs.
//! Every run also checks that no cgroup directory of the run and no host mount is left behind
//! (see `common::Workspace::run`). Needs root; fails loudly without it.
//!
//! Why each errno is what it is (observed on Linux 6.18, Landlock ABI 6, cgroup v1 hybrid):
//! - ENOENT for host files: the root is a tmpfs holding only the read-only system directories,
//!   a curated /etc (no shadow) and the workspace; nothing else of the host exists in there.
//! - EROFS for writes to /usr, /etc, / and the stub directories leading to the workspace:
//!   read-only mounts, and the kernel refuses to create on a read-only mount before Landlock or
//!   permissions are consulted.
//! - EACCES for a new file in /dev: the minimal /dev belongs to the sandbox's root, not to the
//!   agent.
//! - EACCES for TCP connect/bind under strict: Landlock (ABI >= 4) denies TCP connect and bind.
//! - ECONNREFUSED for TCP under standard, UDP and abstract unix sockets: the sandbox has its own
//!   network namespace; its loopback has no listener and abstract names are per namespace.
//! - EPERM for mount, unshare, namespace clone, chroot, ptrace, bpf, keys, perf, userfaultfd,
//!   open_by_handle_at, io_uring, TIOCSTI, AF_VSOCK, AF_PACKET, sethostname: the seccomp
//!   allowlist answers EPERM (and the agent has no capabilities anyway).
//! - ENOSYS for clone3: the seccomp profile answers ENOSYS so that libc falls back to clone.
//! - EACCES for /proc/sys/kernel/core_pattern: the file belongs to host root, which is unmapped
//!   in the sandbox's user namespace; the agent is "other" on a 0644 file and has no
//!   CAP_DAC_OVERRIDE.
//! - ESRCH for killing a host pid: the sandbox's pid namespace does not contain it.
//!
//! Four bugs this suite found were fixed and their tests now run with the rest: set-user-ID
//! files planted through the id-mapped workspace, cgroups of a SIGKILLed launcher never
//! collected, a setup failure reported without its cause, /dev/stdout not reopenable.

mod common;

use std::io::ErrorKind;
use std::net::{TcpListener, UdpSocket};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    cgroup_dirs_of, host_mount_count, pids_with_cmdline, poll_until, probe_on_host, require_root,
    unique, wait_with_deadline, Workspace, RUN_DEADLINE,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const STRICT: &str = "strict";

/// Removes a file on drop (secrets the tests plant outside the workspace).
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn plant(dir: &str, tag: &str) -> Planted {
    let p = PathBuf::from(dir).join(format!("aither-secret-{}", unique(tag)));
    std::fs::write(&p, "TOP SECRET\n").expect("plant a secret file");
    Planted(p)
}

// ---------------------------------------------------------------------------------------------
// Filesystem

#[test]
fn host_shadow_is_absent() {
    let ws = Workspace::new();
    assert!(
        std::path::Path::new("/etc/shadow").exists(),
        "the host has /etc/shadow"
    );
    ws.expect(STRICT, &[], &["read-file", "/etc/shadow"], "err ENOENT");
    ws.expect(STRICT, &[], &["read-file", "/etc/gshadow"], "err ENOENT");
    // Control: the curated /etc is there and readable.
    ws.expect(STRICT, &[], &["read-file", "/etc/passwd"], "ok");
    ws.assert_writable(STRICT);
}

#[test]
fn host_secrets_outside_the_workspace_are_absent() {
    let ws = Workspace::new();
    let in_root = plant("/root", "root");
    // A sibling of the workspace: its parent directory is only a path stub in the sandbox.
    let sibling = plant("/var/tmp", "sibling");
    for p in [&in_root.0, &sibling.0] {
        let p = p.to_str().expect("utf-8");
        assert!(
            probe_on_host(&["read-file", p]).ends_with(" ok"),
            "host control for {p}"
        );
        ws.expect(STRICT, &[], &["read-file", p], "err ENOENT");
    }
    ws.expect(
        STRICT,
        &[],
        &["read-file", "/root/.bash_history"],
        "err ENOENT",
    );
    ws.assert_writable(STRICT);
}

#[test]
fn writes_outside_the_workspace_are_refused() {
    let ws = Workspace::new();
    let u = unique("w");
    let usr = format!("/usr/aither-{u}");
    let etc = format!("/etc/aither-{u}");
    ws.expect(STRICT, &[], &["write-file", &usr], "err EROFS");
    ws.expect(STRICT, &[], &["mkdir", &format!("{usr}.d")], "err EROFS");
    ws.expect(STRICT, &[], &["write-file", &etc], "err EROFS");
    ws.expect(STRICT, &[], &["write-file", "/etc/passwd"], "err EROFS");
    assert!(!std::path::Path::new(&usr).exists());
    assert!(!std::path::Path::new(&etc).exists());
    // The tmpfs root and the stubs leading to the workspace are read-only too.
    ws.expect(
        STRICT,
        &[],
        &["write-file", &format!("/aither-{u}")],
        "err EROFS",
    );
    ws.expect(
        STRICT,
        &[],
        &["write-file", &format!("/var/tmp/aither-{u}")],
        "err EROFS",
    );
    // The minimal /dev is not writable by the agent (a tmpfs owned by the sandbox's root).
    ws.expect(
        STRICT,
        &[],
        &["write-file", &format!("/dev/aither-{u}")],
        "err EACCES",
    );
    // /tmp and /dev/shm are writable but private: nothing lands in the host's.
    for dir in ["/tmp", "/dev/shm"] {
        let p = format!("{dir}/aither-{u}");
        ws.expect(STRICT, &[], &["write-file", &p], "ok");
        assert!(
            !std::path::Path::new(&p).exists(),
            "the sandbox's {dir} is private"
        );
    }
    ws.assert_writable(STRICT);
}

#[test]
fn core_pattern_is_not_writable() {
    let ws = Workspace::new();
    let before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").expect("read");
    ws.expect(STRICT, &[], &["core-pattern"], "err EACCES");
    let after = std::fs::read_to_string("/proc/sys/kernel/core_pattern").expect("read");
    assert_eq!(before, after);
    ws.assert_writable(STRICT);
}

// ---------------------------------------------------------------------------------------------
// Network

#[test]
fn tcp_connect_to_a_host_listener_is_denied_by_landlock() {
    let ws = Workspace::new();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a host listener");
    l.set_nonblocking(true).expect("nonblocking");
    let addr = l.local_addr().expect("addr").to_string();
    ws.expect(STRICT, &[], &["tcp-connect", &addr], "err EACCES");
    assert_eq!(
        l.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "nothing reached the host listener"
    );
    // Control: the same check from the host connects.
    assert_eq!(
        probe_on_host(&["tcp-connect", &addr]),
        "RESULT tcp-connect ok"
    );
    ws.assert_writable(STRICT);
}

#[test]
fn tcp_connect_under_standard_stays_in_the_sandbox_netns() {
    // standard allows TCP in Landlock: only the network namespace stands between the agent
    // and the host's 127.0.0.1, and the sandbox's own loopback has no listener there.
    let ws = Workspace::new();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a host listener");
    l.set_nonblocking(true).expect("nonblocking");
    let addr = l.local_addr().expect("addr").to_string();
    ws.expect("standard", &[], &["tcp-connect", &addr], "err ECONNREFUSED");
    ws.expect(
        "standard",
        &[],
        &["tcp-connect", "10.0.0.1:80"],
        "err ENETUNREACH",
    );
    assert_eq!(
        l.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "nothing reached the host listener"
    );
    ws.assert_writable("standard");
}

#[test]
fn udp_to_a_host_port_never_arrives() {
    let ws = Workspace::new();
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind a host UDP socket");
    let addr = s.local_addr().expect("addr").to_string();
    // Landlock does not cover UDP: the network namespace does. The sandbox's loopback answers
    // "port unreachable" (nothing listens there), which the probe sees as ECONNREFUSED.
    ws.expect(STRICT, &[], &["udp-send", &addr], "err ECONNREFUSED");
    ws.expect(STRICT, &[], &["udp-send", "10.0.0.1:53"], "err ENETUNREACH");
    // The probe has exited; a datagram sent over loopback would already be queued.
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 256];
    assert_eq!(
        s.recv_from(&mut buf).map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "a datagram from the sandbox reached the host"
    );
    // Control: from the host the same check delivers its datagram.
    assert_eq!(probe_on_host(&["udp-send", &addr]), "RESULT udp-send ok");
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (n, _) = s
        .recv_from(&mut buf)
        .expect("the host control datagram arrives");
    assert_eq!(&buf[..n], b"aither-probe udp datagram");
    ws.assert_writable(STRICT);
}

#[test]
fn tcp_bind_is_denied_in_strict_but_allowed_in_standard() {
    let ws = Workspace::new();
    ws.expect(STRICT, &[], &["tcp-bind-loopback"], "err EACCES");
    ws.expect("standard", &[], &["tcp-bind-loopback"], "ok");
    ws.assert_writable(STRICT);
}

#[test]
fn abstract_unix_socket_of_the_host_is_unreachable() {
    let ws = Workspace::new();
    let name = format!("aither-e2e-{}", unique("abs"));
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
    let l = UnixListener::bind_addr(&addr).expect("bind a host abstract socket");
    l.set_nonblocking(true).expect("nonblocking");
    // Abstract names live in the network namespace: the sandbox's has none of that name.
    ws.expect(
        STRICT,
        &[],
        &["abstract-connect", &name],
        "err ECONNREFUSED",
    );
    assert_eq!(
        l.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "nothing reached the host socket"
    );
    // Control: from the host the check connects.
    assert_eq!(
        probe_on_host(&["abstract-connect", &name]),
        "RESULT abstract-connect ok"
    );
    ws.assert_writable(STRICT);
}

// ---------------------------------------------------------------------------------------------
// Refused system calls (seccomp, no capabilities)

macro_rules! refused {
    ($($test:ident: [$($arg:expr),+] => $expected:expr;)+) => {$(
        #[test]
        fn $test() {
            let ws = Workspace::new();
            ws.expect(STRICT, &[], &[$($arg),+], $expected);
            ws.assert_writable(STRICT);
        }
    )+};
}

refused! {
    mount_is_refused: ["mount-tmpfs"] => "err EPERM";
    unshare_user_is_refused: ["unshare-user"] => "err EPERM";
    unshare_net_is_refused: ["unshare-net"] => "err EPERM";
    clone_with_newuser_is_refused: ["clone-newuser"] => "err EPERM";
    clone3_is_enosys: ["clone3"] => "err ENOSYS";
    chroot_is_refused: ["chroot", "/tmp"] => "err EPERM";
    ptrace_of_the_parent_is_refused: ["ptrace-parent"] => "err EPERM";
    bpf_is_refused: ["bpf"] => "err EPERM";
    add_key_is_refused: ["keyctl"] => "err EPERM";
    keyctl_is_refused: ["keyctl-join"] => "err EPERM";
    perf_event_open_is_refused: ["perf-event-open"] => "err EPERM";
    userfaultfd_is_refused: ["userfaultfd"] => "err EPERM";
    open_by_handle_at_is_refused: ["open-by-handle-at"] => "err EPERM";
    io_uring_setup_is_refused: ["io-uring-setup"] => "err EPERM";
    tiocsti_is_refused: ["tiocsti"] => "err EPERM";
    tiocsti_with_high_bits_is_refused: ["tiocsti-highbits"] => "err EPERM";
    vsock_is_refused: ["vsock"] => "err EPERM";
    vsock_with_high_bits_is_refused: ["vsock-highbits"] => "err EPERM";
    packet_socket_is_refused: ["packet-socket"] => "err EPERM";
    raw_socket_is_refused: ["raw-socket"] => "err EPERM";
    setuid_root_is_refused: ["setuid-root"] => "err EPERM";
    sethostname_is_refused: ["sethostname"] => "err EPERM";
    mknod_of_a_device_is_refused: ["mknod-dev", "/tmp/mem"] => "err EPERM";
}

/// The refusals above come from the sandbox, not from a malformed probe: unsandboxed (as
/// root) the same calls succeed.
#[test]
fn refused_checks_succeed_unsandboxed() {
    require_root();
    for check in [
        "unshare-user",
        "unshare-net",
        "clone-newuser",
        "clone3",
        "bpf",
        "perf-event-open",
        "userfaultfd",
        "open-by-handle-at",
        "io-uring-setup",
        "packet-socket",
        "raw-socket",
    ] {
        assert_eq!(
            probe_on_host(&[check]),
            format!("RESULT {check} ok"),
            "host control"
        );
    }
    // stdin is /dev/null: without seccomp TIOCSTI fails only because it is not a terminal.
    assert_eq!(probe_on_host(&["tiocsti"]), "RESULT tiocsti err ENOTTY");
}

#[test]
fn agent_has_no_capabilities_and_is_filtered() {
    let ws = Workspace::new();
    ws.expect(
        STRICT,
        &[],
        &["status"],
        "ok CapInh=0000000000000000 CapPrm=0000000000000000 CapEff=0000000000000000 \
         CapBnd=0000000000000000 CapAmb=0000000000000000 NoNewPrivs=1 Seccomp=2",
    );
    ws.assert_writable(STRICT);
}

#[test]
fn id_maps_never_map_host_root() {
    let ws = Workspace::new();
    for map in ["/proc/self/uid_map", "/proc/self/gid_map"] {
        let r = ws.run(STRICT, &[], &["cat", map]);
        let out = r.ok();
        let mut lines = 0;
        for l in out.lines() {
            let f: Vec<u64> = l
                .split_whitespace()
                .map(|x| x.parse().expect("number"))
                .collect();
            assert_eq!(f.len(), 3, "{map}: {l:?}");
            let (outside, count) = (f[1], f[2]);
            assert!(count >= 1);
            // Never host root, nor any ordinary host account: only a reserved high range.
            assert!(
                outside >= 0x10000,
                "{map} maps {l:?} onto a low host id\n{}",
                r.describe()
            );
            lines += 1;
        }
        assert!(lines >= 1, "{map} is empty\n{}", r.describe());
    }
    let r = ws.run(STRICT, &[], &["id", "-u"]);
    assert_eq!(r.ok().trim(), "1000");
}

// ---------------------------------------------------------------------------------------------
// Processes

#[test]
fn only_sandbox_pids_are_visible() {
    let ws = Workspace::new();
    let line = ws.probe(STRICT, &[], &["list-pids"]);
    let list = line
        .strip_prefix("RESULT list-pids ok ")
        .unwrap_or_else(|| panic!("unexpected {line:?}"));
    let pids: Vec<u32> = list.split(',').map(|p| p.parse().expect("pid")).collect();
    assert!(pids.contains(&1), "{line}");
    assert!(pids.iter().all(|&p| p < 100), "{line}");
    assert!(!pids.contains(&std::process::id()), "{line}");
    ws.assert_writable(STRICT);
}

#[test]
fn killing_a_host_pid_finds_no_such_process() {
    let ws = Workspace::new();
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let pid = sleeper.id().to_string();
    ws.expect(STRICT, &[], &["kill-pid", &pid, "9"], "err ESRCH");
    ws.expect(STRICT, &[], &["kill-pid", &pid, "15"], "err ESRCH");
    let alive = sleeper.try_wait().expect("try_wait").is_none();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(alive, "the host's sleep was killed from inside the sandbox");
    ws.assert_writable(STRICT);
}

#[test]
fn fork_bomb_hits_the_pids_limit() {
    let ws = Workspace::new();
    let line = ws.probe(STRICT, &["--pids", "32"], &["fork-bomb", "200"]);
    let n: usize = line
        .strip_prefix("RESULT fork-bomb err EAGAIN ")
        .unwrap_or_else(|| panic!("expected EAGAIN, got {line:?}"))
        .parse()
        .expect("count");
    assert!((1..32).contains(&n), "{line}");
    ws.assert_writable(STRICT);
}

#[test]
fn memory_limit_kills_with_the_oom_killer() {
    let ws = Workspace::new();
    // Control: well under the limit the same allocation loop survives.
    ws.expect(STRICT, &["--memory", "64M"], &["alloc", "16"], "ok 16");
    let r = ws.run(
        STRICT,
        &["--memory", "64M"],
        &["./aither-probe", "alloc", "200"],
    );
    assert_eq!(r.code(), 137, "SIGKILL by the OOM killer\n{}", r.describe());
    assert!(
        r.stderr.contains("killed by the OOM killer"),
        "{}",
        r.describe()
    );
    assert!(!r.stdout.contains("RESULT"), "{}", r.describe());
    ws.assert_writable(STRICT);
}

#[test]
fn cpu_quota_throttles() {
    let ws = Workspace::new();
    let line = ws.probe(STRICT, &["--cpus", "0.5"], &["burn-threads", "2", "2"]);
    let used: f64 = line
        .strip_prefix("RESULT burn-threads ok ")
        .unwrap_or_else(|| panic!("unexpected {line:?}"))
        .parse()
        .expect("seconds");
    // Unthrottled, two busy threads for 2 s use up to 4 s of CPU; 0.5 CPUs allow about 1 s.
    assert!(used <= 1.3, "cpu used {used}s with --cpus 0.5: {line}");
    assert!(used >= 0.2, "the burn did run: {line}");
}

#[test]
fn cgroup_has_the_limits_while_running_and_is_removed_after() {
    let ws = Workspace::new();
    let name = unique("cg");
    let ready = ws.at("cg-ready");
    let stop = ws.at("cg-stop");
    let script = format!("touch {ready}; while [ ! -e {stop} ]; do sleep 0.05; done");
    let mounts_before = host_mount_count();
    let mut child = ws
        .command(
            STRICT,
            &["--memory", "64M", "--cpus", "0.5", "--pids", "32"],
            &["sh", "-c", &script],
            &name,
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn aitherctl");
    let _stop_guard = common::StopOnDrop(stop.clone());
    assert!(
        poll_until(Duration::from_secs(30), || std::path::Path::new(&ready)
            .exists()),
        "the sandboxed shell never started"
    );
    let dir = |h: &str| PathBuf::from(format!("/sys/fs/cgroup/{h}/aither/{name}-{}", child.id()));
    let read = |h: &str, f: &str| {
        std::fs::read_to_string(dir(h).join(f))
            .unwrap_or_else(|e| panic!("{h}/{f}: {e}"))
            .trim()
            .to_string()
    };
    let limits = (
        read("memory", "memory.limit_in_bytes"),
        read("cpu", "cpu.cfs_quota_us"),
        read("cpu", "cpu.cfs_period_us"),
        read("pids", "pids.max"),
    );
    std::fs::write(&stop, "").expect("stop file");
    let st = wait_with_deadline(&mut child, "aitherctl", RUN_DEADLINE);
    assert_eq!(st.code(), Some(0));
    assert_eq!(
        limits,
        (
            "67108864".to_string(),
            "50000".to_string(),
            "100000".to_string(),
            "32".to_string()
        )
    );
    assert_eq!(cgroup_dirs_of(&name), Vec::<PathBuf>::new());
    assert_eq!(host_mount_count(), mounts_before);
}

// ---------------------------------------------------------------------------------------------
// Exit status and signals

#[test]
fn exit_code_propagates() {
    let ws = Workspace::new();
    assert_eq!(ws.run(STRICT, &[], &["sh", "-c", "exit 7"]).code(), 7);
}

#[test]
fn death_by_signal_is_128_plus_n() {
    let ws = Workspace::new();
    assert_eq!(
        ws.run(STRICT, &[], &["sh", "-c", "kill -TERM $$"]).code(),
        143
    );
}

#[test]
fn missing_command_is_127_with_one_line() {
    let ws = Workspace::new();
    let r = ws.run(STRICT, &[], &["aither-no-such-command"]);
    assert_eq!(r.code(), 127, "{}", r.describe());
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", r.describe());
    assert!(
        lines[0].contains("aither-no-such-command"),
        "{}",
        r.describe()
    );
}

#[test]
fn non_executable_file_is_126() {
    let ws = Workspace::new();
    std::fs::write(ws.at("not-exec.sh"), "#!/bin/sh\necho hi\n").expect("write");
    let r = ws.run(STRICT, &[], &["./not-exec.sh"]);
    assert_eq!(r.code(), 126, "{}", r.describe());
    assert!(!r.stdout.contains("hi"), "{}", r.describe());
}

#[test]
fn timeout_is_124() {
    let ws = Workspace::new();
    let t = Instant::now();
    let r = ws.run(STRICT, &["--timeout", "1s"], &["sleep", "30"]);
    assert_eq!(r.code(), 124, "{}", r.describe());
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(r.stderr.contains("timeout"), "{}", r.describe());
}

#[test]
fn widening_flag_is_125() {
    let ws = Workspace::new();
    let r = ws.run(STRICT, &["--memory", "4G"], &["true"]);
    assert_eq!(r.code(), 125, "{}", r.describe());
    assert!(r.stderr.contains("narrow"), "{}", r.describe());
}

#[test]
fn sigint_is_forwarded() {
    let ws = Workspace::new();
    let name = unique("sigint");
    let ready = ws.at("sigint-ready");
    let script = format!("trap 'exit 42' INT; touch {ready}; while true; do sleep 0.1; done");
    let mounts_before = host_mount_count();
    let mut child = ws
        .command(STRICT, &[], &["sh", "-c", &script], &name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn aitherctl");
    let started = poll_until(Duration::from_secs(30), || {
        std::path::Path::new(&ready).exists()
    });
    if !started {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the sandboxed shell never wrote its marker");
    }
    // Our own child, not yet reaped.
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT to aitherctl");
    let st = wait_with_deadline(
        &mut child,
        "aitherctl after SIGINT",
        Duration::from_secs(30),
    );
    assert_eq!(st.code(), Some(42), "{st}");
    assert_eq!(cgroup_dirs_of(&name), Vec::<PathBuf>::new());
    assert_eq!(host_mount_count(), mounts_before);
}

/// SIGKILLs aitherctl while `sleep <arg>` runs inside; returns the run's name (for the
/// cgroup checks) once no process of the sandbox is left.
fn sigkill_launcher(ws: &Workspace) -> String {
    let name = unique("sigkill");
    // A unique argument to find this sandbox's sleep among all host processes.
    let arg = format!("1000.{}{:04}", std::process::id(), common::next_id());
    let mut child = ws
        .command(STRICT, &[], &["sleep", &arg], &name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn aitherctl");
    let started = poll_until(Duration::from_secs(30), || {
        !pids_with_cmdline(&["sleep", &arg]).is_empty()
    });
    if !started {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the sandboxed sleep never showed up");
    }
    child.kill().expect("SIGKILL aitherctl");
    let _ = child.wait();
    let gone = poll_until(Duration::from_secs(5), || {
        pids_with_cmdline(&["sleep", &arg]).is_empty()
    });
    let left = pids_with_cmdline(&["sleep", &arg]);
    for p in &left {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    assert!(
        gone,
        "sandboxed processes survived aitherctl's SIGKILL: {left:?}"
    );
    name
}

#[test]
fn sigkill_of_aitherctl_leaves_no_sandbox_process() {
    let ws = Workspace::new();
    let mounts_before = host_mount_count();
    let name = sigkill_launcher(&ws);
    assert_eq!(host_mount_count(), mounts_before);
    // Nothing could clean up the cgroups of a SIGKILLed launcher; remove them (empty now) so
    // the host stays tidy. Whether the next run collects them is tested separately.
    for d in cgroup_dirs_of(&name) {
        let _ = std::fs::remove_dir(&d);
    }
}

#[test]
fn cgroups_of_a_sigkilled_aitherctl_are_collected_by_the_next_run() {
    let ws = Workspace::new();
    let name = sigkill_launcher(&ws);
    if cgroup_dirs_of(&name).is_empty() {
        // Already collected, by a run of a test running in parallel.
        return;
    }
    let r = ws.run(STRICT, &[], &["true"]);
    r.ok();
    let left = cgroup_dirs_of(&name);
    for d in &left {
        let _ = std::fs::remove_dir(d);
    }
    assert_eq!(
        left,
        Vec::<PathBuf>::new(),
        "stale cgroups were not collected"
    );
}

#[test]
fn setup_failure_reports_its_cause() {
    let ws = Workspace::new();
    let name = unique("setupfail");
    // A debug-build fault injection makes pid 1's Rlimits stage fail with EPERM.
    let r = Command::new(common::AITHERCTL)
        .env("AITHER_TEST_FAIL_STAGE", "Rlimits")
        .args(["run", "--policy", STRICT, "--name", &name, "--workspace"])
        .arg(ws.path())
        .args(["--", "true"])
        .env("AITHER_POLICY_DIR", common::policy_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run aitherctl");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(125), "{stderr}");
    assert_eq!(cgroup_dirs_of(&name), Vec::<PathBuf>::new());
    assert!(
        stderr.contains("setting resource limits (EPERM)"),
        "the error names the stage and its errno: {stderr}"
    );
}

#[test]
fn workspace_files_belong_to_the_workspace_owner() {
    let ws = Workspace::new();
    ws.expect(STRICT, &[], &["mkdir", &ws.at("made-dir")], "ok");
    let md = std::fs::metadata(ws.at("made-dir")).expect("dir exists on the host");
    assert_eq!((md.uid(), md.gid()), (0, 0));
    ws.assert_writable(STRICT);
}

#[test]
fn agent_cannot_plant_setuid_root_files_on_the_host() {
    let ws = Workspace::new();
    let chmodded = ws.at("suid-by-chmod");
    let created = ws.at("suid-by-create");
    let l1 = ws.probe(STRICT, &[], &["chmod-suid", &chmodded]);
    let l2 = ws.probe(STRICT, &[], &["create-suid", &created]);
    for p in [&chmodded, &created] {
        if let Ok(md) = std::fs::metadata(p) {
            assert_eq!(
                md.mode() & 0o6000,
                0,
                "{p} is {:o} owned by {}:{} on the host ({l1}; {l2})",
                md.mode(),
                md.uid(),
                md.gid()
            );
        }
    }
    ws.assert_writable(STRICT);
}

// ---------------------------------------------------------------------------------------------
// One test per layer that only that layer stops (so that removing any one protection from the
// code fails a test: checked by mutation testing, see docs/testing.md).

/// Landlock's file rules: /dev/shm is writable and not mounted noexec, so only Landlock (no
/// Execute right there) stops running a binary copied into it.
#[test]
fn landlock_forbids_executing_from_dev_shm() {
    let ws = Workspace::new();
    let r = ws.run(
        STRICT,
        &[],
        &[
            "sh",
            "-c",
            "cp /bin/true /dev/shm/t && /dev/shm/t && echo ran",
        ],
    );
    assert_eq!(r.code(), 126, "{}", r.describe());
    assert!(r.stderr.contains("Permission denied"), "{}", r.describe());
    assert!(!r.stdout.contains("ran"));
}

/// Landlock's scoping: with the host's network namespace (so the namespace cannot be what
/// stops it), an abstract unix socket of the host is still out of reach.
#[test]
fn landlock_scopes_abstract_sockets_even_on_the_host_network() {
    let ws = Workspace::new();
    // strict-full: with the host's network, the network namespace cannot stand in for
    // scoping, so only a policy that requires Landlock's scoping may be used here.
    let strict = std::fs::read_to_string(common::policy_dir().join("strict-full.toml"))
        .expect("strict-full.toml");
    let hostnet = strict
        .replace("name = \"strict-full\"", "name = \"strict-hostnet\"")
        .replace("net = true", "net = false")
        .replace("mode = \"none\"", "mode = \"host\"");
    let policy = ws.path().join("strict-hostnet.toml");
    std::fs::write(&policy, hostnet).expect("write the test policy");
    let policy = policy.to_string_lossy().into_owned();
    let name = format!("aither-e2e-{}", unique("scope"));
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
    let _l = UnixListener::bind_addr(&addr).expect("bind a host abstract socket");
    ws.expect(&policy, &[], &["abstract-connect", &name], "err EPERM");
    assert_eq!(
        probe_on_host(&["abstract-connect", &name]),
        "RESULT abstract-connect ok"
    );
}

/// The IPC namespace: a System V segment of the host is invisible inside.
#[test]
fn host_sysv_ipc_is_invisible() {
    let ws = Workspace::new();
    // Raw (and the shmctl below): nix 0.30 and rustix 1 have no System V shared memory.
    // SAFETY: creates a private 4 KiB segment, removed below.
    let id = unsafe { libc::shmget(libc::IPC_PRIVATE, 4096, libc::IPC_CREAT | 0o666) };
    assert!(id >= 0, "shmget on the host");
    let host = std::fs::read_to_string("/proc/sysvipc/shm").expect("host /proc/sysvipc/shm");
    let r = ws.run(STRICT, &[], &["cat", "/proc/sysvipc/shm"]);
    // SAFETY: removes the segment created above.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    assert!(host.lines().count() >= 2, "the host sees its segment");
    assert_eq!(
        r.ok().lines().count(),
        1,
        "only the header inside: {}",
        r.describe()
    );
}

/// The UTS namespace: the policy's hostname.
#[test]
fn hostname_is_the_policys() {
    let ws = Workspace::new();
    assert_eq!(ws.run(STRICT, &[], &["uname", "-n"]).ok().trim(), "aither");
}

/// The cgroup namespace: the sandbox sees itself at the root of every hierarchy.
#[test]
fn cgroup_namespace_hides_the_host_hierarchy() {
    let ws = Workspace::new();
    let r = ws.run(STRICT, &[], &["cat", "/proc/self/cgroup"]);
    let out = r.ok();
    assert!(out.lines().count() >= 3, "{}", r.describe());
    for l in out.lines() {
        assert!(l.ends_with(":/"), "{l:?} in\n{}", r.describe());
    }
}

/// no_new_privs is set by the launcher itself, not only as a side effect of seccomp or
/// Landlock: permissive has neither and still shows it.
#[test]
fn no_new_privs_without_seccomp_or_landlock() {
    let ws = Workspace::new();
    ws.expect(
        "permissive",
        &[],
        &["status"],
        "ok CapInh=0000000000000000 CapPrm=0000000000000000 CapEff=0000000000000000 \
         CapBnd=0000000000000000 CapAmb=0000000000000000 NoNewPrivs=1 Seccomp=0",
    );
}

/// The host's root is detached, not merely hidden.
#[test]
fn the_old_root_is_detached() {
    let ws = Workspace::new();
    ws.expect(
        STRICT,
        &[],
        &["read-file", "/.oldroot/etc/hostname"],
        "err ENOENT",
    );
    let r = ws.run(
        STRICT,
        &[],
        &["sh", "-c", "grep -c oldroot /proc/self/mountinfo; true"],
    );
    assert_eq!(r.ok().trim(), "0", "{}", r.describe());
}

/// Kernel tunables are read-only mounts inside, not only unwritable by permissions.
#[test]
fn proc_sys_is_mounted_read_only() {
    let ws = Workspace::new();
    let r = ws.run(STRICT, &[], &["cat", "/proc/self/mountinfo"]);
    let out = r.ok();
    for p in ["/proc/sys", "/proc/irq", "/proc/bus"] {
        let line = out.lines().find(|l| l.split_whitespace().nth(4) == Some(p));
        let Some(line) = line else {
            assert!(
                !std::path::Path::new(p).exists(),
                "{p} exists on the host but is not mounted inside"
            );
            continue;
        };
        let opts = line.split_whitespace().nth(5).unwrap_or_default();
        assert!(opts.starts_with("ro,") || opts == "ro", "{p}: {line}");
    }
}

/// Descriptors the caller leaks (not close-on-exec) never reach the agent (runc
/// CVE-2024-21626: a leaked directory fd is a way out of the mount namespace).
#[test]
fn inherited_descriptors_are_closed() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let ws = Workspace::new();
    let etc = std::fs::File::open("/etc").expect("open /etc");
    let raw = etc.as_raw_fd();
    let mut cmd = ws.command(
        STRICT,
        &[],
        &["./aither-probe", "read-file", "/proc/self/fd/7/shadow"],
        &unique("fd"),
    );
    // SAFETY: dup2 in the child between fork and exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // Raw: nix's dup2 wants the target as an OwnedFd (nothing owns 7 here) and its
            // dup2_raw does not check dup2's result.
            nix::errno::Errno::result(libc::dup2(raw, 7))?;
            Ok(())
        });
    }
    let out = cmd.output().expect("run aitherctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "RESULT read-file err ENOENT",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new session: the agent has no controlling terminal of the caller (TIOCSTI, /dev/tty).
#[test]
fn the_agent_runs_in_a_new_session() {
    let ws = Workspace::new();
    let r = ws.run(STRICT, &[], &["sh", "-c", "cut -d' ' -f6 /proc/self/stat"]);
    assert_eq!(
        r.ok().trim(),
        "1",
        "session of sandbox pid 1: {}",
        r.describe()
    );
}

/// rlimits: the policy's (or the caller's lower hard limit), soft = hard, no core dumps.
#[test]
fn rlimits_are_the_policys() {
    let ws = Workspace::new();
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit on the host");
    let n = hard.min(1024);
    let r = ws.run(
        STRICT,
        &[],
        &["sh", "-c", "ulimit -Sn; ulimit -Hn; ulimit -Hc"],
    );
    assert_eq!(r.ok().trim(), format!("{n}\n{n}\n0"), "{}", r.describe());
}

/// coreutils' chmod uses fchmodat (mode in argument 2): no set-user-ID through it either.
#[test]
fn chmod_cannot_set_setuid_or_setgid_bits() {
    let ws = Workspace::new();
    let r = ws.run(
        STRICT,
        &[],
        &[
            "sh",
            "-c",
            "touch f; chmod 6755 f; chmod 755 f && echo plain-ok",
        ],
    );
    assert!(
        r.stderr.contains("Operation not permitted"),
        "{}",
        r.describe()
    );
    assert_eq!(r.stdout.trim(), "plain-ok", "{}", r.describe());
    let mode = std::fs::metadata(ws.at("f")).expect("f on the host").mode();
    assert_eq!(mode & 0o6000, 0, "mode {mode:o}");
}
