//! Unit tests: the parsers, mode detection by files, and verdicts on hand-made facts.

use std::fs;
use std::path::PathBuf;

use super::facts::{detect_by_files, parse_meminfo_swap_total, parse_mountinfo_root};
use super::*;
use crate::policy::{Policy, Protection, BUILTIN_POLICIES};

fn builtin(name: &str) -> Policy {
    let src = BUILTIN_POLICIES.iter().find(|(n, _)| *n == name).unwrap().1;
    Policy::parse(src, name).unwrap()
}

/// A host that gives everything (this VM's kind: hybrid, Landlock ABI 7).
fn full_host() -> HostFacts {
    HostFacts {
        root: PathBuf::from("/"),
        kernel: Some("6.18.44".into()),
        userns: UserNsFacts {
            max_user_namespaces: Some(63000),
            create: Probe::yes("probed"),
            ..UserNsFacts::default()
        },
        landlock: LandlockFacts {
            abi: Some(7),
            lsm: Some("capability,landlock,yama".into()),
        },
        seccomp: SeccompFacts {
            filter: Some(true),
            mode: Some(0),
        },
        cgroup: CgroupFacts {
            root: PathBuf::from("/sys/fs/cgroup"),
            mode: Some(CgroupMode::Hybrid),
            controllers: vec![
                "cpu".into(),
                "devices".into(),
                "memory".into(),
                "pids".into(),
            ],
            subtree: vec![],
            writable: Probe::yes("probed"),
            delegated: Probe::yes("v1"),
            swap_control: Probe::yes("memsw"),
            freezer: Probe::yes("v1 freezer"),
            placement: None,
        },
        clone3: Probe::yes("probed"),
        pidfd_open: Probe::yes("probed"),
        bpf_cgroup_device: Probe::yes("probed"),
        gpu: GpuFacts {
            nvidia_driver: Some("NVRM version: 570.86".into()),
            devices: vec!["/dev/nvidia0".into()],
            nvml_library: Some("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1".into()),
            simulated: None,
        },
        ..HostFacts::default()
    }
}

#[test]
fn the_gpu_policy_needs_gpus_and_device_control() {
    let mut h = full_host();
    h.gpu = GpuFacts::default();
    let v = verdict(&builtin("gpu"), &h);
    assert!(!v.runnable);
    assert!(
        v.missing[0].what.contains("found 0, no NVIDIA driver"),
        "{v:?}"
    );
    h.gpu.simulated = Some((2, "/etc/aither/gpus.toml".into()));
    assert!(verdict(&builtin("gpu"), &h).runnable);
    h.cgroup.controllers.retain(|c| c != "devices");
    let v = verdict(&builtin("gpu"), &h);
    assert_eq!(
        v.missing[0].protection,
        Some(Protection::CgroupDevices),
        "{v:?}"
    );
    h.cgroup.mode = Some(CgroupMode::V2);
    h.bpf_cgroup_device = Probe::no("BPF_PROG_LOAD: EPERM");
    let v = verdict(&builtin("gpu"), &h);
    assert!(v.missing[0].what.contains("BPF device program"), "{v:?}");
    // Policies without [gpu] need neither.
    assert!(verdict(&builtin("strict"), &h).runnable);
}

#[test]
fn kernel_versions_parse() {
    assert_eq!(parse_kernel_version("6.18.44-fc-v657"), Some((6, 18)));
    assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15)));
    assert_eq!(parse_kernel_version("6.1"), Some((6, 1)));
    assert_eq!(parse_kernel_version("4.19rc1"), Some((4, 19)));
    assert_eq!(parse_kernel_version("  6.12.3+deb13\n"), Some((6, 12)));
    assert_eq!(parse_kernel_version(""), None);
    assert_eq!(parse_kernel_version("linux"), None);
    assert_eq!(parse_kernel_version("6"), None);
}

#[test]
fn proc1_cgroup_names_the_runtime() {
    let docker = "12:memory:/docker/0123abcd\n0::/\n";
    assert_eq!(parse_proc1_cgroup(docker).unwrap().0, "docker");
    let systemd_docker = "0::/system.slice/docker-0123abcd.scope\n";
    assert_eq!(parse_proc1_cgroup(systemd_docker).unwrap().0, "docker");
    let k8s = "0::/kubepods/besteffort/pod12/abcd\n";
    assert_eq!(parse_proc1_cgroup(k8s).unwrap().0, "kubernetes");
    let podman = "0::/machine.slice/libpod-abcd.scope\n";
    assert_eq!(parse_proc1_cgroup(podman).unwrap().0, "podman");
    assert_eq!(parse_proc1_cgroup("0::/lxc.payload.c1\n").unwrap().0, "lxc");
    assert!(parse_proc1_cgroup("9:name=systemd:/\n0::/\n").is_none());
    assert!(parse_proc1_cgroup("0::/init.scope\n").is_none());
    assert!(parse_proc1_cgroup("garbage without colons\n\n::").is_none());
}

#[test]
fn status_seccomp_parses() {
    assert_eq!(
        parse_status_seccomp("Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n"),
        (Some(2), true)
    );
    assert_eq!(parse_status_seccomp("Seccomp:\t0\n"), (Some(0), false));
    assert_eq!(parse_status_seccomp("Name:\tx\n"), (None, false));
    assert_eq!(parse_status_seccomp("Seccomp:\tbogus\n"), (None, false));
}

#[test]
fn meminfo_and_mountinfo_parse() {
    assert_eq!(
        parse_meminfo_swap_total("MemTotal: 10 kB\nSwapTotal:       2048 kB\n"),
        Some(2048)
    );
    assert_eq!(parse_meminfo_swap_total("MemTotal: 10 kB\n"), None);
    let mi = "22 27 0:21 / /proc rw,relatime - proc proc rw\n27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n";
    assert_eq!(
        parse_mountinfo_root(mi),
        Some(("ext4".to_string(), "/dev/vda".to_string()))
    );
    let over = "1 0 0:1 / / rw - overlay overlay rw,lowerdir=/x\n";
    assert_eq!(parse_mountinfo_root(over).unwrap().0, "overlay");
    assert_eq!(parse_mountinfo_root("nonsense\n - \n"), None);
}

#[test]
fn cgroup_mode_by_files() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(detect_by_files(d.path()), None);
    assert_eq!(detect_by_files(&d.path().join("absent")), None);
    fs::create_dir_all(d.path().join("memory")).unwrap();
    fs::write(d.path().join("memory/cgroup.procs"), "").unwrap();
    assert_eq!(detect_by_files(d.path()), Some(CgroupMode::V1));
    fs::create_dir_all(d.path().join("unified")).unwrap();
    fs::write(d.path().join("unified/cgroup.controllers"), "").unwrap();
    assert_eq!(detect_by_files(d.path()), Some(CgroupMode::Hybrid));
    fs::write(d.path().join("cgroup.controllers"), "memory").unwrap();
    assert_eq!(detect_by_files(d.path()), Some(CgroupMode::V2));
}

#[test]
fn every_builtin_policy_runs_on_a_full_host() {
    let h = full_host();
    for (name, _) in BUILTIN_POLICIES {
        let v = verdict(&builtin(name), &h);
        assert!(v.runnable, "{name}: {v:?}");
        assert!(v.best_effort_skipped.is_empty(), "{name}: {v:?}");
    }
}

#[test]
fn landlock_abi_5_misses_only_scoping_and_names_the_kernel() {
    let mut h = full_host();
    h.landlock.abi = Some(5);
    // strict lets the network and pid namespaces stand in, and says so.
    let v = verdict(&builtin("strict"), &h);
    assert!(v.runnable, "{v:?}");
    assert_eq!(v.compensated.len(), 1, "{v:?}");
    assert!(
        v.compensated[0].starts_with("landlock-scope")
            && v.compensated[0].contains("net-namespace + pid-namespace")
            && v.compensated[0].contains("ABI 5"),
        "{v:?}"
    );
    // strict-full insists on every layer.
    let v = verdict(&builtin("strict-full"), &h);
    assert!(!v.runnable);
    assert_eq!(v.missing.len(), 1, "{v:?}");
    assert_eq!(v.missing[0].protection, Some(Protection::LandlockScope));
    assert!(
        v.missing[0].fix.contains("kernel ≥ 6.12"),
        "{}",
        v.missing[0].fix
    );
    let mut p = builtin("strict-full");
    p.best_effort = vec![Protection::LandlockScope];
    let v = verdict(&p, &h);
    assert!(v.runnable, "{v:?}");
    assert_eq!(v.best_effort_skipped.len(), 1);
    // The permissive policy has Landlock off: nothing to miss.
    h.landlock.abi = Some(0);
    assert!(verdict(&builtin("permissive"), &h).runnable);
}

#[test]
fn no_landlock_names_every_feature_once() {
    let mut h = full_host();
    h.landlock = LandlockFacts {
        abi: Some(0),
        lsm: Some("capability,yama,apparmor".into()),
    };
    // strict: a named stand-in for each of the four features, and it runs.
    let v = verdict(&builtin("strict"), &h);
    assert!(v.runnable && v.missing.is_empty(), "{v:?}");
    let stand_ins: Vec<&str> = v
        .compensated
        .iter()
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        stand_ins,
        [
            "landlock",
            "landlock-net",
            "landlock-ioctl",
            "landlock-scope"
        ],
        "{v:?}"
    );
    assert!(v.compensated[0].contains("read-only-view"), "{v:?}");
    assert!(
        v.compensated[2].contains("minimal-dev + own-pty + seccomp-ioctl"),
        "{v:?}"
    );
    let v = verdict(&builtin("strict-full"), &h);
    let prots: Vec<_> = v.missing.iter().filter_map(|m| m.protection).collect();
    assert_eq!(
        prots,
        vec![
            Protection::Landlock,
            Protection::LandlockNet,
            Protection::LandlockScope
        ],
        "{v:?}"
    );
    assert!(v.missing[0]
        .fix
        .contains("lsm=capability,yama,apparmor,landlock"));
    // standard has loopback networking: no TCP rules are needed.
    let mut p = builtin("standard");
    p.compensated.clear();
    let v = verdict(&p, &h);
    assert!(!v
        .missing
        .iter()
        .any(|m| m.protection == Some(Protection::LandlockNet)));
}

#[test]
fn v1_with_swap_but_no_accounting_misses_no_swap() {
    let mut h = full_host();
    h.cgroup.mode = Some(CgroupMode::V1);
    h.cgroup.swap_control = Probe::no("the host has swap but no swap accounting");
    let v = verdict(&builtin("strict"), &h);
    assert_eq!(v.missing.len(), 1, "{v:?}");
    assert_eq!(v.missing[0].protection, Some(Protection::CgroupSwap));
    assert!(v.missing[0].fix.contains("swapaccount=1"));
    // permissive sets no swap limit.
    assert!(verdict(&builtin("permissive"), &h).runnable);
}

#[test]
fn unknown_facts_fail_closed() {
    let mut h = full_host();
    h.clone3 = Probe::unknown("not probed");
    h.kernel = None;
    let v = verdict(&builtin("strict"), &h);
    assert!(!v.runnable);
    assert!(v.missing.iter().any(|m| m.what == "clone3"));
    assert!(v.missing.iter().any(|m| m.what.contains("kernel version")));
}

#[test]
fn old_kernel_misses_clone_into_cgroup_and_idmapped_mounts() {
    let mut h = full_host();
    h.kernel = Some("5.4.0-150-generic".into());
    let v = verdict(&builtin("strict"), &h);
    let whats: Vec<_> = v.missing.iter().map(|m| m.what.as_str()).collect();
    assert!(
        whats.iter().any(|w| w.contains("CLONE_INTO_CGROUP")),
        "{whats:?}"
    );
    assert!(whats.iter().any(|w| w.contains("id-mapped")), "{whats:?}");
}

#[test]
fn a_layered_workspace_needs_id_mapped_overlay_layers_and_says_what_to_do() {
    // 5.15: id-mapped mounts, but overlayfs takes no id-mapped layers before 5.19.
    let mut h = full_host();
    h.kernel = Some("5.15.0".into());
    let ci = verdict(&builtin("ci"), &h);
    let m = ci
        .missing
        .iter()
        .find(|m| m.what.contains("layered workspace"))
        .expect("ci's layered workspace is named as missing");
    assert!(m.fix.contains("read-write"), "{}", m.fix);
    let strict = verdict(&builtin("strict"), &h);
    assert!(
        strict.missing.iter().all(|m| !m.what.contains("layered")),
        "a read-write policy needs no overlay"
    );
    h.kernel = Some("5.19.0".into());
    assert!(verdict(&builtin("ci"), &h)
        .missing
        .iter()
        .all(|m| !m.what.contains("layered")));
}

#[test]
fn a_missing_root_gathers_without_panicking() {
    let d = tempfile::tempdir().unwrap();
    let h = HostFacts::gather(&d.path().join("nothing-here")).unwrap();
    assert_eq!(h.kernel, None);
    assert_eq!(h.cgroup.mode, None);
    assert_eq!(h.clone3.ok, None);
    let v = verdict(&builtin("strict"), &h);
    assert!(!v.runnable);
}

#[test]
fn a_malformed_facts_file_is_an_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(FACTS_FILE), "landlock_abi = \"six\"\n").unwrap();
    let e = HostFacts::gather(d.path()).unwrap_err().to_string();
    assert!(e.contains(FACTS_FILE), "{e}");
    fs::write(d.path().join(FACTS_FILE), "cgroup_mode = \"v3\"\n").unwrap();
    let e = HostFacts::gather(d.path()).unwrap_err().to_string();
    assert!(e.contains("v3"), "{e}");
}
