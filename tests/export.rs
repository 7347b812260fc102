//! One policy, three forms: `aitherctl run` (the local sandbox), `aitherctl export oci` run by
//! crun and by runc, and `aitherctl export k8s`. The hostile agent (`aither-probe`) tries the
//! same escapes in the local sandbox and inside the bundle under both runtimes, and every form
//! must give the same answer (the errno each probe expects is explained in tests/hostile.rs).
//!
//! Needs root, crun and runc (install.sh installs both); fails loudly without them. Each
//! bundle lives in a temporary directory; each container has a unique id and cgroupsPath
//! (/aither/<name>), is deleted with `delete -f`, and must leave no cgroup directory, no
//! runtime state and no host mount behind. On a hybrid cgroup host crun runs in a private
//! mount namespace with /sys/fs/cgroup/unified unmounted (crun 1.8 takes a mounted cgroup2 at
//! that path for a unified host and fails to place the container).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::Duration;

use common::{
    cgroup_dirs_of, host_mount_count, policy_dir, poll_until, require_root, unique,
    wait_with_deadline, StopOnDrop, Workspace, AITHERCTL, PROBE, RUN_DEADLINE,
};
use serde_json::Value;

const CRUN: &str = "/usr/bin/crun";
const RUNC: &str = "/usr/sbin/runc";

/// Hierarchies where a runtime may create the container's cgroup on this host.
const HIERARCHIES: &[&str] = &[
    "memory", "cpu", "cpuacct", "cpuset", "pids", "devices", "freezer", "blkio", "systemd",
    "unified",
];

/// A container being run.
/// One container at a time: a run's check that the host's mount table is as it found it
/// must not see another test's runtime (runc, crun) mid-run.
static HOST_MOUNTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Running {
    _serial: std::sync::MutexGuard<'static, ()>,
    child: std::process::Child,
    rt: Runtime,
    id: String,
    mounts_before: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Runtime {
    Crun,
    Runc,
}

impl Runtime {
    fn bin(self) -> &'static str {
        match self {
            Runtime::Crun => CRUN,
            Runtime::Runc => RUNC,
        }
    }

    fn state_dir(self) -> &'static str {
        match self {
            Runtime::Crun => "/run/crun",
            Runtime::Runc => "/run/runc",
        }
    }

    /// Panics (never skips) when the runtime is missing.
    fn require(self) {
        require_root();
        assert!(
            Path::new(self.bin()).is_file(),
            "{} is not installed: the export tests run the bundle under crun and runc \
             (install.sh installs both: apt-get install crun runc)",
            self.bin()
        );
    }
}

/// An exported bundle with a workspace holding the probe, all under one temporary directory.
struct Bundle {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ws: PathBuf,
    name: String,
    config: Value,
}

fn aitherctl(args: &[&str]) -> std::process::Output {
    Command::new(AITHERCTL)
        .env("AITHER_POLICY_DIR", policy_dir())
        .env("AITHER_AUDIT_LOG", common::test_audit_log())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run aitherctl")
}

fn describe(o: &std::process::Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Bundle {
    /// `aitherctl export oci --policy P` into a fresh temporary directory.
    fn export(policy: &str) -> Bundle {
        Bundle::make(policy, false)
    }

    /// As `export`, with `--rootfs` an image root filesystem made of the probe, the shared
    /// libraries it needs (as `ldd` lists them), a two-line /etc and the usual mountpoints:
    /// none of the host's system directories.
    fn export_with_image(policy: &str) -> Bundle {
        Bundle::make(policy, true)
    }

    fn make(policy: &str, image: bool) -> Bundle {
        require_root();
        let tmp = tempfile::Builder::new()
            .prefix("aither-export-")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        // The container's root is an unprivileged host id: it must traverse to the bundle.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        // Writable by anyone: runc 1.1 has no id-mapped mounts, so there the agent's host id
        // writes as "other" (crun id-maps the workspace and ignores this mode).
        std::fs::set_permissions(&ws, std::fs::Permissions::from_mode(0o777)).unwrap();
        let probe = ws.join("aither-probe");
        std::fs::copy(PROBE, &probe).expect("copy the probe");
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = tmp.path().join("bundle");
        let name = unique("oci");
        let image_dir = tmp.path().join("image");
        let mut args = vec![
            "export".to_string(),
            "oci".into(),
            "--policy".into(),
            policy.into(),
            "--name".into(),
            name.clone(),
            "--workspace".into(),
            ws.to_str().unwrap().into(),
            "--out".into(),
            dir.to_str().unwrap().into(),
        ];
        if image {
            build_image(&image_dir);
            args.extend(["--rootfs".into(), image_dir.to_str().unwrap().into()]);
        }
        args.extend(["--".into(), probe.to_str().unwrap().into(), "status".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = aitherctl(&args);
        assert!(o.status.success(), "export oci\n{}", describe(&o));
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .expect("config.json is JSON");
        Bundle {
            _tmp: tmp,
            dir,
            ws,
            name,
            config,
        }
    }

    fn agent_host_id(&self) -> u32 {
        let maps = self.config["linux"]["uidMappings"].as_array().unwrap();
        maps.iter()
            .find(|m| m["containerID"] != 0)
            .and_then(|m| m["hostID"].as_u64())
            .unwrap() as u32
    }

    /// Starts `argv` in the bundle (only process.args changes) under `rt`.
    fn spawn(&self, rt: Runtime, argv: &[&str]) -> Running {
        rt.require();
        let mut cfg = self.config.clone();
        cfg["process"]["args"] = serde_json::json!(argv);
        std::fs::write(
            self.dir.join("config.json"),
            serde_json::to_string_pretty(&cfg).unwrap(),
        )
        .unwrap();
        let id = format!("{}-{}", self.name, common::next_id());
        let bundle = self.dir.to_str().unwrap();
        let hybrid = aither::cgroup::detect(Path::new("/sys/fs/cgroup")).ok()
            == Some(aither::cgroup::CgroupMode::Hybrid);
        let script = format!(
            "{unmount}{bin} run --bundle {bundle} {id}; rc=$?; {bin} delete -f {id} 2>/dev/null; exit $rc",
            unmount = if rt == Runtime::Crun && hybrid {
                "umount /sys/fs/cgroup/unified || exit 99; "
            } else {
                ""
            },
            bin = rt.bin(),
        );
        let serial = HOST_MOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let mounts_before = host_mount_count();
        let mut cmd = if rt == Runtime::Crun {
            // A private mount namespace: the unmount is invisible to the host.
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        let child = cmd
            .current_dir(&self.ws)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the runtime");
        Running {
            _serial: serial,
            child,
            rt,
            id,
            mounts_before,
        }
    }

    /// Waits for the container and returns (code, stdout, stderr), after checking that it
    /// left no cgroup, no runtime state and no host mount behind.
    fn finish(&self, r: Running) -> (i32, String, String) {
        let Running {
            _serial,
            child,
            rt,
            id,
            mounts_before,
        } = r;
        let out = wait_output(child);
        let code = out.status.code().unwrap_or(-1);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_ne!(code, 99, "could not unmount the cgroup2 mount\n{stderr}");
        assert_eq!(
            cgroup_dirs_of(&self.name),
            Vec::<PathBuf>::new(),
            "{rt:?} left a cgroup of {id}"
        );
        let left: Vec<PathBuf> = HIERARCHIES
            .iter()
            .map(|h| self.cgroup(h))
            .filter(|p| p.exists())
            .collect();
        assert_eq!(left, Vec::<PathBuf>::new(), "{rt:?} left cgroups");
        assert!(
            !Path::new(rt.state_dir()).join(&id).exists(),
            "{rt:?} left its state for {id}"
        );
        assert_eq!(
            host_mount_count(),
            mounts_before,
            "the host's mount table changed"
        );
        (code, stdout, stderr)
    }

    /// Runs `argv` in the bundle to completion (see `finish`).
    fn run(&self, rt: Runtime, argv: &[&str]) -> (i32, String, String) {
        let r = self.spawn(rt, argv);
        self.finish(r)
    }

    /// The container's cgroup in one v1 hierarchy (cgroupsPath /aither/<name>).
    fn cgroup(&self, hierarchy: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join("aither")
            .join(&self.name)
    }

    /// The probe's RESULT line for one check.
    fn probe(&self, rt: Runtime, check: &[&str]) -> String {
        let probe = self.ws.join("aither-probe");
        let mut argv = vec![probe.to_str().unwrap()];
        argv.extend_from_slice(check);
        let (code, out, err) = self.run(rt, &argv);
        assert_eq!(code, 0, "{rt:?} {check:?}: exit {code}\n{out}\n{err}");
        out.lines()
            .find(|l| l.starts_with(&format!("RESULT {} ", check[0])))
            .unwrap_or_else(|| panic!("{rt:?} {check:?}: no RESULT line\n{out}\n{err}"))
            .to_string()
    }
}

/// A minimal image: the probe's shared libraries at their host paths, /etc with passwd and
/// group only, mountpoints (/tmp 1777, as images have it).
fn build_image(root: &Path) {
    let ldd = Command::new("ldd").arg(PROBE).output().expect("run ldd");
    let text = String::from_utf8_lossy(&ldd.stdout);
    for lib in text
        .split_whitespace()
        .filter(|w| w.starts_with('/') && !w.starts_with("(0x"))
    {
        let at = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::copy(lib, &at).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
    for d in ["etc", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "agent:x:1000:1000::/tmp:/nonexistent\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "agent:x:1000:\n").unwrap();
    for p in [root.to_path_buf(), root.join("etc")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn wait_output(mut child: std::process::Child) -> std::process::Output {
    use std::io::Read;
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = wait_with_deadline(&mut child, "the OCI runtime", RUN_DEADLINE);
    std::process::Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    }
}

/// The escapes that make sense in an OCI container, with the answer the local sandbox gives
/// (tests/hostile.rs explains each errno).
fn hostile_table(u: &str) -> Vec<(Vec<String>, &'static str)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        (
            s(&["status"]),
            "ok CapInh=0000000000000000 CapPrm=0000000000000000 CapEff=0000000000000000 \
             CapBnd=0000000000000000 CapAmb=0000000000000000 NoNewPrivs=1 Seccomp=2",
        ),
        (s(&["read-file", "/etc/shadow"]), "err ENOENT"),
        (s(&["read-file", "/etc/gshadow"]), "err ENOENT"),
        (s(&["read-file", "/root/.bash_history"]), "err ENOENT"),
        (s(&["read-file", "/etc/passwd"]), "ok"),
        (s(&["write-file", &format!("/usr/aither-{u}")]), "err EROFS"),
        (s(&["write-file", &format!("/etc/aither-{u}")]), "err EROFS"),
        (s(&["write-file", "/etc/passwd"]), "err EROFS"),
        (s(&["write-file", &format!("/aither-{u}")]), "err EROFS"),
        (s(&["write-file", &format!("/tmp/aither-{u}")]), "ok"),
        (s(&["core-pattern"]), "err EACCES"),
        (s(&["mount-tmpfs"]), "err EPERM"),
        (s(&["unshare-user"]), "err EPERM"),
        (s(&["unshare-net"]), "err EPERM"),
        (s(&["clone-newuser"]), "err EPERM"),
        (s(&["clone3"]), "err ENOSYS"),
        (s(&["chroot", "/tmp"]), "err EPERM"),
        (s(&["ptrace-parent"]), "err EPERM"),
        (s(&["bpf"]), "err EPERM"),
        (s(&["keyctl"]), "err EPERM"),
        (s(&["keyctl-join"]), "err EPERM"),
        (s(&["perf-event-open"]), "err EPERM"),
        (s(&["userfaultfd"]), "err EPERM"),
        (s(&["open-by-handle-at"]), "err EPERM"),
        (s(&["io-uring-setup"]), "err EPERM"),
        (s(&["tiocsti"]), "err EPERM"),
        (s(&["tiocsti-highbits"]), "err EPERM"),
        (s(&["vsock"]), "err EPERM"),
        (s(&["vsock-highbits"]), "err EPERM"),
        (s(&["packet-socket"]), "err EPERM"),
        (s(&["raw-socket"]), "err EPERM"),
        (s(&["setuid-root"]), "err EPERM"),
        (s(&["sethostname"]), "err EPERM"),
        (s(&["mknod-dev", &format!("/tmp/mem-{u}")]), "err EPERM"),
    ]
}

/// The same probes in the bundle under `rt` answer as the table says.
fn hostile_suite_in_the_bundle(rt: Runtime) {
    rt.require();
    let b = Bundle::export("strict");
    let u = unique("h");
    let mut failures = Vec::new();
    for (check, want) in hostile_table(&u) {
        let args: Vec<&str> = check.iter().map(String::as_str).collect();
        let got = b.probe(rt, &args);
        let want = format!("RESULT {} {want}", check[0]);
        if got != want {
            failures.push(format!("{check:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{rt:?}:\n{}", failures.join("\n"));
    // Nothing the probes wrote reached the host.
    for p in [
        format!("/usr/aither-{u}"),
        format!("/etc/aither-{u}"),
        format!("/tmp/aither-{u}"),
    ] {
        assert!(!Path::new(&p).exists(), "{p} appeared on the host");
    }
}

#[test]
fn hostile_suite_passes_in_the_bundle_under_crun() {
    hostile_suite_in_the_bundle(Runtime::Crun);
}

#[test]
fn hostile_suite_passes_in_the_bundle_under_runc() {
    hostile_suite_in_the_bundle(Runtime::Runc);
}

/// The local sandbox gives the answers of the table too: the three forms agree.
#[test]
fn the_local_sandbox_gives_the_same_answers() {
    let ws = Workspace::new();
    let u = unique("l");
    for (check, want) in hostile_table(&u) {
        let args: Vec<&str> = check.iter().map(String::as_str).collect();
        ws.expect("strict", &[], &args, want);
    }
}

/// The network namespace keeps the host's listeners out of reach. What Landlock adds in the
/// local sandbox (no TCP even on the sandbox's own loopback under strict) has no OCI form:
/// binding its loopback succeeds in the bundle, the documented gap (docs/scaling.md).
fn host_network_is_unreachable(rt: Runtime) {
    use std::net::TcpListener;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
    let b = Bundle::export("strict");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a host listener");
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let name = format!("aither-export-{}", unique("abs"));
    let ul = UnixListener::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap())
        .expect("bind a host abstract socket");
    ul.set_nonblocking(true).unwrap();
    for (check, want) in [
        (vec!["tcp-connect", addr.as_str()], "err ECONNREFUSED"),
        (vec!["tcp-connect", "10.0.0.1:80"], "err ENETUNREACH"),
        (vec!["udp-send", addr.as_str()], "err ECONNREFUSED"),
        (vec!["abstract-connect", name.as_str()], "err ECONNREFUSED"),
        (vec!["tcp-bind-loopback"], "ok"),
    ] {
        assert_eq!(
            b.probe(rt, &check),
            format!("RESULT {} {want}", check[0]),
            "{rt:?}"
        );
    }
    assert!(l.accept().is_err(), "nothing reached the host listener");
    assert!(ul.accept().is_err(), "nothing reached the host socket");
}

#[test]
fn host_network_is_unreachable_under_crun() {
    host_network_is_unreachable(Runtime::Crun);
}

#[test]
fn host_network_is_unreachable_under_runc() {
    host_network_is_unreachable(Runtime::Runc);
}

/// Host pids are invisible and unkillable, the pid namespace holds only the container, and
/// neither map names host root or an ordinary host account.
fn processes_and_ids(rt: Runtime) {
    let b = Bundle::export("strict");
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let pid = sleeper.id().to_string();
    let got = b.probe(rt, &["kill-pid", &pid, "9"]);
    let alive = sleeper.try_wait().expect("try_wait").is_none();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(got, "RESULT kill-pid err ESRCH");
    assert!(alive, "the host's sleep was killed from inside the bundle");
    let line = b.probe(rt, &["list-pids"]);
    let pids: Vec<u32> = line
        .strip_prefix("RESULT list-pids ok ")
        .unwrap_or_else(|| panic!("{line}"))
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1) && pids.iter().all(|&p| p < 100), "{line}");
    for map in ["/proc/self/uid_map", "/proc/self/gid_map"] {
        let (code, out, err) = b.run(rt, &["/bin/cat", map]);
        assert_eq!(code, 0, "{err}");
        for l in out.lines() {
            let f: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            assert!(
                f[1] >= 0x7080_0000,
                "{map}: {l:?} maps a host id outside the export range"
            );
        }
    }
    let (code, out, _) = b.run(rt, &["/usr/bin/id", "-u"]);
    assert_eq!((code, out.trim()), (0, "1000"));
}

#[test]
fn processes_and_ids_under_crun() {
    processes_and_ids(Runtime::Crun);
}

#[test]
fn processes_and_ids_under_runc() {
    processes_and_ids(Runtime::Runc);
}

/// The workspace is writable; under crun it is id-mapped like the local sandbox's (the file
/// belongs on the host to the workspace's owner), under runc 1.1 (no id-mapped mounts) to the
/// agent's unprivileged host id.
fn workspace_is_writable(rt: Runtime, owner: fn(&Bundle) -> u32) {
    let b = Bundle::export("strict");
    let target = b.ws.join(format!("written-{}", unique("w")));
    let got = b.probe(rt, &["write-file", target.to_str().unwrap()]);
    assert_eq!(got, "RESULT write-file ok");
    let md = std::fs::metadata(&target).expect("the file exists on the host");
    assert_eq!(md.uid(), owner(&b), "{rt:?}: owner of the written file");
}

#[test]
fn workspace_is_id_mapped_under_crun() {
    workspace_is_writable(Runtime::Crun, |_| 0);
}

#[test]
fn workspace_is_writable_under_runc() {
    workspace_is_writable(Runtime::Runc, Bundle::agent_host_id);
}

/// The policy's cgroup limits, device rule and rlimits are in force while the container runs.
fn limits_are_in_force(rt: Runtime) {
    let b = Bundle::export("strict");
    let ws = b.ws.to_str().unwrap().to_string();
    let ready = b.ws.join("ready");
    let stop = b.ws.join("stop");
    let _stop = StopOnDrop(stop.to_str().unwrap().to_string());
    let script = format!(
        "ulimit -n > {ws}/rl; ulimit -c >> {ws}/rl; touch {r}; \
         while [ ! -e {s} ]; do sleep 0.05; done",
        r = ready.display(),
        s = stop.display()
    );
    let running = b.spawn(rt, &["/bin/sh", "-c", &script]);
    let started = poll_until(Duration::from_secs(60), || ready.exists());
    let read = |h: &str, f: &str| {
        std::fs::read_to_string(b.cgroup(h).join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("{h}/{f}: {e}"))
    };
    let limits = [
        read("memory", "memory.limit_in_bytes"),
        read("memory", "memory.memsw.limit_in_bytes"),
        read("cpu", "cpu.cfs_quota_us"),
        read("cpu", "cpu.cfs_period_us"),
        read("pids", "pids.max"),
    ];
    let devices = read("devices", "devices.list");
    std::fs::write(&stop, "").unwrap();
    let (code, out, err) = b.finish(running);
    assert!(started, "{rt:?}: the container never started\n{out}\n{err}");
    assert_eq!(code, 0, "{out}\n{err}");
    let mem = (512u64 << 20).to_string();
    assert_eq!(
        limits,
        [
            mem.clone(),
            mem,
            "100000".into(),
            "100000".into(),
            "128".into()
        ],
        "{rt:?}: strict's limits (memory+swap = memory: no swap)"
    );
    // Deny by default: no "a *:* rwm" line, only the listed character devices.
    assert!(!devices.contains("a *:*"), "{rt:?}: {devices}");
    assert!(devices.contains("c 1:3 rwm"), "{rt:?}: {devices}");
    let rl = std::fs::read_to_string(b.ws.join("rl")).unwrap();
    assert_eq!(
        rl, "1024\n0\n",
        "{rt:?}: RLIMIT_NOFILE and RLIMIT_CORE of strict"
    );
}

#[test]
fn limits_are_in_force_under_crun() {
    limits_are_in_force(Runtime::Crun);
}

#[test]
fn limits_are_in_force_under_runc() {
    limits_are_in_force(Runtime::Runc);
}

/// With `--rootfs`, an image replaces the host view: none of the host's system directories
/// is bound (the host's /usr and its shadow file are absent), and every protection holds.
fn image_rootfs(rt: Runtime) {
    let b = Bundle::export_with_image("strict");
    assert_eq!(
        b.config["root"]["path"],
        b.dir.parent().unwrap().join("image").to_str().unwrap()
    );
    assert!(!b.dir.join("rootfs").exists(), "no rootfs of our own");
    for m in b.config["mounts"].as_array().unwrap() {
        if m["type"] == "bind" {
            assert_eq!(
                m["source"],
                b.ws.to_str().unwrap(),
                "only the workspace is bound"
            );
        }
    }
    let u = unique("img");
    for (check, want) in [
        (vec!["read-file", "/usr/bin/cat"], "err ENOENT"),
        (vec!["read-file", "/etc/shadow"], "err ENOENT"),
        (vec!["read-file", "/etc/passwd"], "ok"),
        (vec!["write-file", "/etc/passwd"], "err EROFS"),
        (vec!["mount-tmpfs"], "err EPERM"),
        (vec!["unshare-user"], "err EPERM"),
        (vec!["ptrace-parent"], "err EPERM"),
        (vec!["clone3"], "err ENOSYS"),
    ] {
        assert_eq!(
            b.probe(rt, &check),
            format!("RESULT {} {want}", check[0]),
            "{rt:?}"
        );
    }
    let target = format!("/tmp/aither-{u}");
    assert_eq!(
        b.probe(rt, &["write-file", &target]),
        "RESULT write-file ok"
    );
    assert!(!Path::new(&target).exists());
    assert_eq!(
        b.probe(rt, &["status"]),
        "RESULT status ok CapInh=0000000000000000 CapPrm=0000000000000000 \
         CapEff=0000000000000000 CapBnd=0000000000000000 CapAmb=0000000000000000 NoNewPrivs=1 \
         Seccomp=2"
    );
}

#[test]
fn an_image_rootfs_replaces_the_host_view_under_crun() {
    image_rootfs(Runtime::Crun);
}

#[test]
fn an_image_rootfs_replaces_the_host_view_under_runc() {
    image_rootfs(Runtime::Runc);
}

// ---------------------------------------------------------------------------------------------
// Tokens and Kubernetes

struct State(tempfile::TempDir);

impl State {
    fn new() -> State {
        State(tempfile::tempdir().expect("temp state dir"))
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(AITHERCTL)
            .env("AITHER_STATE_DIR", self.0.path())
            .env("AITHER_POLICY_DIR", policy_dir())
            .env("AITHER_AUDIT_LOG", self.0.path().join("audit.jsonl"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run aitherctl")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(o.status.success(), "{args:?}\n{}", describe(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

fn pod(list: &Value) -> &Value {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "Pod")
        .expect("a Pod")
}

#[test]
fn k8s_manifest_from_a_policy() {
    let st = State::new();
    let text = st.ok(&[
        "export",
        "k8s",
        "--policy",
        "strict",
        "--name",
        "job-1",
        "--image",
        "debian:12",
        "--runtime-class",
        "aither",
        "--",
        "python3",
        "agent.py",
    ]);
    let list: Value = serde_json::from_str(&text).expect("the manifest is JSON");
    assert_eq!(list["kind"], "List");
    let p = pod(&list);
    let sc = &p["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "Localhost");
    assert_eq!(p["spec"]["runtimeClassName"], "aither");
    assert_eq!(
        p["spec"]["containers"][0]["resources"]["limits"]["memory"],
        (512u64 << 20).to_string()
    );
    assert_eq!(
        p["spec"]["containers"][0]["command"],
        serde_json::json!(["python3", "agent.py"])
    );
    // The ConfigMap's profile is the OCI bundle's seccomp, the same syscall set.
    let cm = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "ConfigMap")
        .unwrap();
    let (_, text) = cm["data"].as_object().unwrap().iter().next().unwrap();
    let profile: Value = serde_json::from_str(text.as_str().unwrap()).unwrap();
    let b = Bundle::export("strict");
    assert_eq!(profile, b.config["linux"]["seccomp"]);
}

#[test]
fn k8s_out_dir_holds_the_kubelet_profile() {
    let st = State::new();
    let out = st.0.path().join("k8s");
    st.ok(&[
        "export",
        "k8s",
        "--policy",
        "ci",
        "--name",
        "ci-job",
        "--image",
        "debian:12",
        "--out",
        out.to_str().unwrap(),
        "--",
        "make",
        "test",
    ]);
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let rel = pod(&list)["spec"]["containers"][0]["securityContext"]["seccompProfile"]
        ["localhostProfile"]
        .as_str()
        .unwrap()
        .to_string();
    let profile: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("seccomp").join(&rel)).unwrap())
            .expect("the profile is at seccomp/<localhostProfile>");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(
        pod(&list)["spec"]["activeDeadlineSeconds"],
        1800,
        "ci's 30-minute timeout"
    );
}

#[test]
// One scenario: each step uses the tokens the steps before it issued or revoked.
#[allow(clippy::too_many_lines)]
fn export_from_a_token_follows_its_attenuation_and_refuses_a_revoked_one() {
    let st = State::new();
    let tok = st.0.path().join("a.tok");
    st.ok(&[
        "token",
        "mint",
        "--policy",
        "strict",
        "--subject",
        "tok-agent",
        "--out",
        tok.to_str().unwrap(),
    ]);
    let narrowed = st.ok(&[
        "token",
        "attenuate",
        "--memory",
        "256M",
        "--pids",
        "64",
        tok.to_str().unwrap(),
    ]);
    let nt = st.0.path().join("n.tok");
    std::fs::write(&nt, &narrowed).unwrap();
    let text = st.ok(&[
        "export",
        "k8s",
        "--token",
        nt.to_str().unwrap(),
        "--name",
        "tok-agent",
        "--image",
        "x/y:1",
        "--",
        "true",
    ]);
    let list: Value = serde_json::from_str(&text).unwrap();
    let p = pod(&list);
    assert_eq!(
        p["spec"]["containers"][0]["resources"]["limits"]["memory"],
        (256u64 << 20).to_string()
    );
    assert!(p["metadata"]["annotations"]["aither.dev/token-id"].is_string());
    // The bundle from the same token carries the narrowed limits and the token's subject.
    let ws = tempfile::tempdir().unwrap();
    let dir = st.0.path().join("bundle");
    st.ok(&[
        "export",
        "oci",
        "--token",
        nt.to_str().unwrap(),
        "--workspace",
        ws.path().to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["linux"]["resources"]["memory"]["limit"], 256u64 << 20);
    assert_eq!(cfg["linux"]["resources"]["pids"]["limit"], 64);
    assert_eq!(cfg["linux"]["cgroupsPath"], "/aither/tok-agent");
    // Another host verifies it with the minting host's public key (and refuses it without).
    let other = State::new();
    let pubkey = st.ok(&["token", "pubkey"]);
    let args = [
        "export",
        "k8s",
        "--token",
        nt.to_str().unwrap(),
        "--name",
        "tok-agent",
        "--image",
        "x/y:1",
        "--",
        "true",
    ];
    let o = other.cmd(&args);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    let mut with_key = args.to_vec();
    with_key.splice(4..4, ["--pubkey", pubkey.as_str()]);
    other.ok(&with_key);
    // Widening past the token is refused, as for `run`.
    let o = st.cmd(&[
        "export",
        "k8s",
        "--token",
        nt.to_str().unwrap(),
        "--name",
        "tok-agent",
        "--image",
        "x/y:1",
        "--memory",
        "1G",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--memory"),
        "{}",
        describe(&o)
    );
    // Revoked: refused before anything is written.
    let inspect: Value =
        serde_json::from_str(&st.ok(&["token", "inspect", "--json", tok.to_str().unwrap()]))
            .unwrap();
    let id = inspect["id"]
        .as_str()
        .or(inspect["token_id"].as_str())
        .expect("token id in inspect --json")
        .to_string();
    st.ok(&["token", "revoke", &id]);
    let dir2 = st.0.path().join("bundle2");
    let o = st.cmd(&[
        "export",
        "oci",
        "--token",
        nt.to_str().unwrap(),
        "--workspace",
        ws.path().to_str().unwrap(),
        "--out",
        dir2.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("token refused"),
        "{}",
        describe(&o)
    );
    assert!(!dir2.exists(), "nothing is written for a refused token");
    // Both decisions are in the audit stream.
    let audit = std::fs::read_to_string(st.0.path().join("audit.jsonl")).unwrap();
    let kinds: Vec<(String, String)> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("export_")))
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("export_oci".into(), "allow".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("export_oci".into(), "deny".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("export_k8s".into(), "allow".into())),
        "{kinds:?}"
    );
}

#[test]
fn export_never_overwrites_a_bundle() {
    let st = State::new();
    let ws = tempfile::tempdir().unwrap();
    let dir = st.0.path().join("b");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    let o = st.cmd(&[
        "export",
        "oci",
        "--policy",
        "strict",
        "--workspace",
        ws.path().to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not empty"),
        "{}",
        describe(&o)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("config.json")).unwrap(),
        "{}"
    );
}

/// Issue 20: a policy's `[net]` grants are listed among what a bundle cannot express (they
/// were dropped silently), and the `run it with` hint printed by `export oci` works on this
/// host as printed (on a hybrid cgroup host plain `crun run` fails to place the container).
#[test]
fn net_grants_are_listed_and_the_printed_hint_runs_the_bundle() {
    require_root();
    let tmp = tempfile::Builder::new()
        .prefix("aither-export-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ws = tmp.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::set_permissions(&ws, std::fs::Permissions::from_mode(0o777)).unwrap();
    let strict = std::fs::read_to_string(policy_dir().join("strict.toml")).unwrap();
    let pol = tmp.path().join("withnet.toml");
    std::fs::write(
        &pol,
        strict.replace("name = \"strict\"", "name = \"withnet\"")
            + "\n[[net.egress]]\nhosts = [\"api.openai.com\"]\nports = [443]\n\n\
               [[net.services]]\nname = \"llm\"\ntarget = \"127.0.0.1:11434\"\n",
    )
    .unwrap();
    let dir = tmp.path().join("bundle");
    let name = unique("hint");
    let o = aitherctl(&[
        "export",
        "oci",
        "--policy",
        pol.to_str().unwrap(),
        "--name",
        &name,
        "--workspace",
        ws.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "exit 7",
    ]);
    assert!(o.status.success(), "export oci\n{}", describe(&o));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let gaps = config["annotations"]["org.aither.not-expressed"]
        .as_str()
        .unwrap();
    assert!(
        gaps.contains("net: ")
            && gaps.contains("egress api.openai.com")
            && gaps.contains("service llm"),
        "{gaps}"
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let hint = err
        .split("run it with `")
        .nth(1)
        .and_then(|h| h.split('`').next())
        .unwrap_or_else(|| panic!("no hint: {err}"))
        .to_string();
    let _serial = HOST_MOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let run = Command::new("sh")
        .args(["-c", &hint])
        .current_dir(&ws)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = Command::new(CRUN).args(["delete", "-f", &name]).output();
    assert_eq!(run.status.code(), Some(7), "{hint}\n{}", describe(&run));
}
