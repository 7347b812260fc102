//! A whole launch through the cgroup v2 backend, against a fake cgroupfs root (this host is
//! hybrid; most users' hosts are pure v2): the limits of the policy land in the v2 files, the
//! controllers are enabled in the parents, and the directory is removed afterwards.

// Only for its test-wide setting: no aitherd of the host serves these runs.
mod common;

use std::fs;
use std::process::Command;

fn require_root() {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "this test launches sandboxes and must run as root (CI runs it as root)"
    );
}

#[test]
fn strict_writes_its_limits_through_the_v2_backend() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    fs::write(
        root.path().join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma misc",
    )
    .unwrap();
    fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
    let ws = tempfile::tempdir().unwrap();
    // The agent stays alive until told to stop, so the files can be read while it runs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_aitherctl"))
        .args([
            "run",
            "--policy",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies/strict.toml"),
            "--name",
            "v2fake",
            "--pids",
            "64",
            "--workspace",
        ])
        .arg(ws.path())
        .args([
            "--",
            "/bin/sh",
            "-c",
            "touch started; while [ ! -e stop ]; do sleep 0.05; done",
        ])
        .env("AITHER_CGROUP_ROOT", root.path())
        .env("AITHER_CGROUP_MODE", "v2")
        .spawn()
        .unwrap();
    // Ends the sandboxed loop even when an assertion below fails first.
    struct StopOnDrop(std::path::PathBuf);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = fs::write(&self.0, "");
        }
    }
    let _stop = StopOnDrop(ws.path().join("stop"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ws.path().join("started").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let dir = root
        .path()
        .join("aither")
        .join(format!("v2fake-{}", child.id()));
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    assert_eq!(read("memory.max"), "536870912");
    assert_eq!(read("memory.swap.max"), "0");
    assert_eq!(read("cpu.max"), "100000 100000");
    assert_eq!(read("pids.max"), "64");
    assert_eq!(
        read("cgroup.procs"),
        "0",
        "pid 1 joined through cgroup.procs (no CLONE_INTO_CGROUP on a fake root)"
    );
    assert_eq!(
        fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
        "+memory +cpu +pids"
    );
    assert_eq!(
        fs::read_to_string(root.path().join("aither/cgroup.subtree_control")).unwrap(),
        "+memory +cpu +pids"
    );
    fs::write(ws.path().join("stop"), "").unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        !dir.exists(),
        "the cgroup directory is removed after the run"
    );
}

#[test]
fn a_v2_host_without_the_memory_controller_refuses_strict() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    fs::write(root.path().join("cgroup.controllers"), "cpu pids").unwrap();
    let ws = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aitherctl"))
        .args([
            "run",
            "--policy",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies/strict.toml"),
            "--workspace",
        ])
        .arg(ws.path())
        .args(["--", "/bin/sh", "-c", "touch ran"])
        .env("AITHER_CGROUP_ROOT", root.path())
        .env("AITHER_CGROUP_MODE", "v2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`memory`") && err.contains("cgroup-memory"),
        "{err}"
    );
    assert!(!ws.path().join("ran").exists(), "nothing ran");
}
