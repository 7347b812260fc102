//! GPU device access, layer by layer: a leased node opens, a node without a rule gets EPERM,
//! under the v1 devices controller alone, under the BPF device program alone (the real cgroup2
//! hook of this hybrid host, as on a pure v2 host), and under both (the hybrid default).
//!
//! Stand-in nodes: `nvidia0`/`nvidia1` carry NVIDIA's real numbers (c 195:0, c 195:1). A node
//! the rules let through answers inside the sandbox exactly what it answers on the host: ENXIO
//! from the kernel's chrdev lookup without a driver, success (0) on a host whose NVIDIA driver
//! serves that minor; one they stop answers EPERM before either. `gpufuse` (c 10:229,
//! /dev/fuse's numbers) is a stand-in with a driver behind it on every host, so an allowed
//! open really succeeds.

mod support;

use std::path::{Path, PathBuf};

use aither_core::policy::Protection;
use aither_core::sandbox::spec::{DeviceNode, SandboxSpec};
use support::{read_exit, require_root, spec, start_shim_env};

/// Device nodes made for one test, removed when dropped.
struct Nodes {
    dir: tempfile::TempDir,
}

impl Nodes {
    fn new() -> Nodes {
        let dir = tempfile::Builder::new()
            .prefix("aither-gpu-nodes")
            .tempdir_in("/var/tmp")
            .unwrap();
        for (name, major, minor) in [
            ("nvidia0", 195, 0),
            ("nvidia1", 195, 1),
            ("gpufuse", 10, 229),
        ] {
            use nix::sys::stat::{makedev, mknod, Mode, SFlag};
            let rc = mknod(
                &dir.path().join(name),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(major, minor),
            );
            assert_eq!(rc, Ok(()), "mknod {name}");
            // The umask took write bits off; the agent opens read-write.
            std::os::unix::fs::chown(dir.path().join(name), Some(0), Some(0)).unwrap();
            std::fs::set_permissions(
                dir.path().join(name),
                std::os::unix::fs::PermissionsExt::from_mode(0o666),
            )
            .unwrap();
        }
        Nodes { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The errno opening the node read-write gives on the host, outside any sandbox and
    /// device rule (0: it opened): what a node the rules let through must give inside.
    fn host_errno(&self, name: &str) -> i32 {
        let e = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(name))
        {
            Ok(_) => 0,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        };
        assert_ne!(e, libc::EPERM, "the test itself may open {name}");
        e
    }
}

/// Opens each /dev/NAME inside the sandbox and prints `NAME=errno` (0: opened).
const OPENER: &str = r#"
import os, sys
for n in sys.argv[1:]:
    try:
        os.close(os.open("/dev/" + n, os.O_RDWR))
        print(n + "=0")
    except OSError as e:
        print(n + "=" + str(e.errno))
"#;

/// A strict spec whose /dev holds all three nodes but whose lease (device rules) covers
/// `leased` only.
fn gpu_spec(ws: &Path, nodes: &Nodes, tag: &str, leased: &[&str]) -> SandboxSpec {
    let mut s = spec(
        ws,
        tag,
        &[
            "/usr/bin/python3",
            "-c",
            OPENER,
            "nvidia0",
            "nvidia1",
            "gpufuse",
        ],
        None,
    );
    let leased: Vec<PathBuf> = leased.iter().map(|n| nodes.path(n)).collect();
    s.grant_devices(&leased, "GPU-test").unwrap();
    for n in ["nvidia0", "nvidia1", "gpufuse"] {
        if !s.devices.iter().any(|d| d.name == n) {
            s.devices.push(DeviceNode {
                host: nodes.path(n),
                name: n.into(),
            });
        }
    }
    s
}

fn run(s: &SandboxSpec, env: &[(&str, &str)]) -> String {
    let logs = tempfile::tempdir().unwrap();
    let mut shim = start_shim_env(s, logs.path(), 1 << 20, 2, None, env);
    let ev = shim.event();
    assert_eq!(ev["event"], "started", "{ev}");
    assert_eq!(shim.wait(), Some(0), "{}", read_exit(logs.path()));
    support::agent_text(&logs.path().join("agent.log"))
}

fn assert_lease_holds(out: &str, layer: &str, nodes: &Nodes) {
    let host = nodes.host_errno("nvidia0");
    assert!(
        out.contains(&format!("nvidia0={host}")),
        "{layer}: the leased node passes the rules and answers as on the host ({host}: 6 is \
         ENXIO, no driver; 0 opened): {out}"
    );
    assert!(
        out.contains("nvidia1=1"),
        "{layer}: the other GPU is refused with EPERM: {out}"
    );
    assert!(
        out.contains("gpufuse=1"),
        "{layer}: an unleased node with a driver is refused too: {out}"
    );
}

#[test]
fn hybrid_both_layers_allow_only_the_leased_node() {
    require_root();
    let nodes = Nodes::new();
    let ws = support::workspace();
    let out = run(&gpu_spec(ws.path(), &nodes, "dev-both", &["nvidia0"]), &[]);
    assert_lease_holds(&out, "v1 + BPF", &nodes);
    // A lease of the stand-in with a driver: it really opens.
    let out = run(&gpu_spec(ws.path(), &nodes, "dev-open", &["gpufuse"]), &[]);
    assert!(out.contains("gpufuse=0"), "the leased node opens: {out}");
    assert!(
        out.contains("nvidia0=1") && out.contains("nvidia1=1"),
        "{out}"
    );
}

#[test]
fn v1_devices_controller_alone_enforces_the_lease() {
    require_root();
    let nodes = Nodes::new();
    let ws = support::workspace();
    let s = gpu_spec(ws.path(), &nodes, "dev-v1", &["nvidia0"]);
    let out = run(&s, &[("AITHER_CGROUP_MODE", "v1")]);
    assert_lease_holds(&out, "v1 devices controller", &nodes);
}

#[test]
fn bpf_device_program_alone_enforces_the_lease() {
    require_root();
    let nodes = Nodes::new();
    let ws = support::workspace();
    let mut s = gpu_spec(ws.path(), &nodes, "dev-bpf", &["nvidia0"]);
    // The real cgroup2 hierarchy of this host has no resource controllers: run it as a pure v2
    // host whose only enforced layer is the device program.
    s.best_effort.extend([
        Protection::CgroupMemory,
        Protection::CgroupCpu,
        Protection::CgroupPids,
        Protection::CgroupSwap,
    ]);
    let out = run(
        &s,
        &[
            ("AITHER_CGROUP_MODE", "v2"),
            ("AITHER_CGROUP_ROOT", "/sys/fs/cgroup/unified"),
        ],
    );
    assert_lease_holds(&out, "BPF device program", &nodes);
}

#[test]
fn without_device_rules_the_kernel_lets_every_bound_node_through() {
    // The control for the tests above: the EPERMs come from the device rules, not from the
    // nodes or the sandbox's other layers.
    require_root();
    let nodes = Nodes::new();
    let ws = support::workspace();
    let mut s = gpu_spec(ws.path(), &nodes, "dev-none", &["nvidia0"]);
    s.limits.devices = None;
    let out = run(&s, &[]);
    let want = format!(
        "nvidia0={}\nnvidia1={}\ngpufuse=0",
        nodes.host_errno("nvidia0"),
        nodes.host_errno("nvidia1")
    );
    assert!(out.contains(&want), "{want} / {out}");
}

#[test]
fn leased_sandbox_sees_its_visible_devices() {
    require_root();
    let nodes = Nodes::new();
    let ws = support::workspace();
    let mut s = spec(
        ws.path(),
        "dev-env",
        &[
            "/bin/sh",
            "-c",
            "echo $CUDA_VISIBLE_DEVICES $NVIDIA_VISIBLE_DEVICES; ls /dev",
        ],
        None,
    );
    s.grant_devices(&[nodes.path("nvidia1")], "GPU-abc")
        .unwrap();
    let out = run(&s, &[]);
    assert!(out.contains("GPU-abc GPU-abc"), "{out}");
    assert!(out.contains("nvidia1") && !out.contains("nvidia0"), "{out}");
}
