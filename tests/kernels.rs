//! Kernels and filesystems without a layer (issue 27, docs/kernels.md), on this host:
//!
//! - a workspace on a filesystem without id-mapped mounts (ramfs has none on any kernel, as 9p,
//!   NFS or any filesystem before 5.12): refused by default with the way out named; with
//!   `--workspace-as-owner` the agent runs as the workspace's owner (never root, never a system
//!   account), writes there as that owner, and its mount is still nosuid and nodev.
//!
//! The ramfs is mounted in a private mount namespace of its own (`unshare -m`), where aitherctl
//! then runs, so the host's mount table never sees it. The kernels without Landlock features
//! are covered by scripts/kernel-matrix.sh (real Debian kernels under qemu).

mod common;

use std::process::{Command, Stdio};

use common::*;

/// Runs `aitherctl run -p strict --workspace <ramfs> FLAGS -- CMD` inside a private mount
/// namespace whose <ramfs> is owned by `owner` (uid:gid), after `prep` (shell, with $W set).
fn on_ramfs(owner: &str, prep: &str, flags: &[&str], cmd: &[&str]) -> RunResult {
    require_root();
    let name = unique("ramfs");
    let dir = tempfile::Builder::new()
        .prefix("aither-ramfs-")
        .tempdir_in("/var/tmp")
        .expect("mountpoint");
    let w = dir.path().to_str().unwrap().to_string();
    let mut script = format!(
        "set -e; W={w}; mount -t ramfs ramfs \"$W\"; cp {PROBE} \"$W/aither-probe\"; chmod 755 \"$W/aither-probe\"; {prep}; chown -R {owner} \"$W\"; exec {AITHERCTL} run --policy strict --workspace \"$W\" --name {name}"
    );
    for f in flags {
        script.push_str(&format!(" '{f}'"));
    }
    script.push_str(" --");
    for c in cmd {
        script.push_str(&format!(" '{c}'"));
    }
    let mounts_before = host_mount_count();
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env("AITHER_AUDIT_LOG", test_audit_log())
        .env("AITHER_POLICY_DIR", policy_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    let r = RunResult {
        name,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_clean_after(&r, mounts_before);
    r
}

#[test]
fn a_workspace_without_idmapped_mounts_is_refused_and_the_way_out_named() {
    let r = on_ramfs("4242:4242", "true", &[], &["./aither-probe", "status"]);
    assert_eq!(r.code(), 125, "{}", r.describe());
    assert!(
        r.stderr.contains("id-mapping the workspace mount failed")
            && r.stderr.contains("--workspace-as-owner"),
        "{}",
        r.describe()
    );
    assert!(!r.stdout.contains("RESULT"), "{}", r.describe());
}

#[test]
fn as_owner_the_agent_writes_its_workspace_as_the_owner_and_stays_confined() {
    // The agent writes a file, then shows its ids and the workspace's mount options. It is
    // still uid 1000 inside; on the host its file belongs to the workspace's owner.
    let r = on_ramfs(
        "4242:4343",
        "true",
        &["--workspace-as-owner"],
        &[
            "sh",
            "-c",
            "echo hi > made-by-agent && id -u && id -g && grep \" $PWD \" /proc/self/mountinfo && ./aither-probe read-file /etc/shadow && ./aither-probe chmod-suid \"$PWD/suid\"",
        ],
    );
    assert_eq!(r.code(), 0, "{}", r.describe());
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(&lines[..2], ["1000", "1000"], "{}", r.describe());
    let mountinfo = lines[2];
    assert!(
        mountinfo.contains("nosuid") && mountinfo.contains("nodev"),
        "the workspace must stay nosuid,nodev: {mountinfo}"
    );
    assert!(
        r.stdout.contains("RESULT read-file err ENOENT /etc/shadow")
            || r.stdout.contains("RESULT read-file err ENOENT"),
        "{}",
        r.describe()
    );
    assert!(
        r.stdout.contains("RESULT chmod-suid err EPERM"),
        "{}",
        r.describe()
    );
}

#[test]
fn as_owner_files_land_as_the_owner_on_the_host() {
    // The ramfs lives only in the private namespace: look from inside it, after the run.
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("aither-ramfs-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let w = dir.path().to_str().unwrap();
    let name = unique("ramfs-owner");
    let script = format!(
        "set -e; mount -t ramfs ramfs {w}; chown 4242:4343 {w}; {AITHERCTL} run --policy strict --workspace {w} --name {name} --workspace-as-owner -- sh -c 'echo hi > {w}/f'; stat -c '%u:%g' {w}/f"
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env("AITHER_AUDIT_LOG", test_audit_log())
        .env("AITHER_POLICY_DIR", policy_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "4242:4343");
}

#[test]
fn as_owner_never_runs_the_agent_as_root_or_a_system_account() {
    for (owner, why) in [
        ("0:0", "host root's"),
        ("4242:0", "host root's"),
        ("4242:6", "a system account's"),
        ("33:4242", "a system account's"),
    ] {
        let r = on_ramfs(
            owner,
            "true",
            &["--workspace-as-owner"],
            &["./aither-probe", "status"],
        );
        assert_eq!(r.code(), 125, "{owner}: {}", r.describe());
        assert!(
            r.stderr.contains(why) && r.stderr.contains("Aither never does"),
            "{owner}: {}",
            r.describe()
        );
        assert!(!r.stdout.contains("RESULT"), "{owner}: {}", r.describe());
    }
}

#[test]
fn as_owner_on_a_filesystem_with_idmapped_mounts_changes_nothing() {
    // /var/tmp here takes id-mapped mounts: the flag is a fallback only, never a way to run as
    // the owner where the usual mapping works.
    let ws = Workspace::new();
    let r = ws.run(
        "strict",
        &["--workspace-as-owner", "--report", &ws.at("report.json")],
        &["true"],
    );
    assert_eq!(r.code(), 0, "{}", r.describe());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.at("report.json")).unwrap()).unwrap();
    let host_uid = report["host_uid"].as_u64().unwrap();
    assert!(host_uid >= 0x7000_0000, "{report:#}");
}
