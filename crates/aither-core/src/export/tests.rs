//! The exported forms carry the sandbox's protections: checked on the generated JSON, and the
//! seccomp translation checked by evaluating its rules with libseccomp's semantics against the
//! profile's own compiled BPF for every syscall and the interesting argument values.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use super::k8s::{manifest, K8sOptions};
use super::oci::{config, OciOptions, EXPORT_ID_BASE};
use super::seccomp::{complement_for_tests, oci_profile};
use super::*;
use crate::policy::{Policy, BUILTIN_POLICIES};
use crate::sandbox::{seccomp as bpf, RunOptions};
use crate::token::GpuClaim;

fn policy(name: &str) -> Policy {
    let src = BUILTIN_POLICIES.iter().find(|p| p.0 == name).unwrap().1;
    Policy::parse(src, name).unwrap()
}

fn spec(name: &str, ws: &std::path::Path) -> SandboxSpec {
    SandboxSpec::derive(
        &policy(name),
        &RunOptions {
            name: Some("agent-1".into()),
            workspace: Some(ws.to_path_buf()),
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            ..Default::default()
        },
        &|_| None,
        ws,
    )
    .unwrap()
}

fn oci_opts() -> OciOptions {
    OciOptions {
        rootfs: None,
        host_id: EXPORT_ID_BASE,
        cgroups_path: "/aither/agent-1".into(),
        token_id: Some("abc".into()),
        net: Default::default(),
    }
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn oci_config_carries_every_protection_of_strict() {
    let ws = tempfile::tempdir().unwrap();
    let s = spec("strict", ws.path());
    let c = config(&s, &oci_opts(), Some((0, 0))).unwrap();
    let p = &c["process"];
    assert_eq!(p["noNewPrivileges"], true);
    for set in [
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    ] {
        assert_eq!(p["capabilities"][set], serde_json::json!([]), "{set}");
    }
    assert_eq!(p["user"]["uid"], 1000);
    assert_eq!(p["user"]["gid"], 1000);
    assert_eq!(c["root"]["readonly"], true);
    let ns: BTreeSet<String> = c["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap().to_string())
        .collect();
    for want in ["pid", "mount", "user", "network", "ipc", "uts", "cgroup"] {
        assert!(ns.contains(want), "namespace {want}: {ns:?}");
    }
    // Never host root: container root and the agent map to the export range only.
    for m in ["uidMappings", "gidMappings"] {
        for line in c["linux"][m].as_array().unwrap() {
            assert!(line["hostID"].as_u64().unwrap() >= u64::from(EXPORT_ID_BASE));
            assert_eq!(line["size"], 1);
        }
    }
    let r = &c["linux"]["resources"];
    assert_eq!(r["memory"]["limit"], 512u64 << 20);
    assert_eq!(
        r["memory"]["swap"],
        512u64 << 20,
        "no swap: memory+swap = memory"
    );
    assert_eq!(r["cpu"]["quota"], 100_000);
    assert_eq!(r["cpu"]["period"], 100_000);
    assert_eq!(r["pids"]["limit"], 128);
    assert_eq!(
        r["devices"][0],
        serde_json::json!({"allow": false, "access": "rwm"})
    );
    let rl: Vec<(String, u64)> = p["rlimits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["hard"], r["soft"]);
            (
                r["type"].as_str().unwrap().into(),
                r["hard"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        rl.contains(&("RLIMIT_NOFILE".into(), s.rlimit_nofile)),
        "{rl:?}"
    );
    assert!(rl.contains(&("RLIMIT_CORE".into(), 0)), "{rl:?}");
    let masked = strs(&c["linux"]["maskedPaths"]);
    assert!(masked.contains(&"/proc/kcore".to_string()));
    let ro = strs(&c["linux"]["readonlyPaths"]);
    for p in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"] {
        assert!(ro.contains(&p.to_string()), "{p}");
    }
    assert_eq!(c["linux"]["cgroupsPath"], "/aither/agent-1");
    assert_eq!(c["hostname"], s.hostname);
    assert!(c["annotations"]["org.aither.not-expressed"]
        .as_str()
        .unwrap()
        .contains("landlock"));
}

#[test]
fn oci_mounts_are_the_curated_view() {
    let ws = tempfile::tempdir().unwrap();
    let s = spec("strict", ws.path());
    let c = config(&s, &oci_opts(), Some((0, 0))).unwrap();
    let mounts = c["mounts"].as_array().unwrap();
    let by_dst = |d: &str| {
        mounts
            .iter()
            .find(|m| m["destination"] == d)
            .unwrap_or_else(|| panic!("no mount at {d}"))
    };
    let usr = by_dst("/usr");
    assert_eq!(usr["type"], "bind");
    let o = strs(&usr["options"]);
    for want in ["ro", "nosuid", "nodev"] {
        assert!(o.contains(&want.to_string()), "/usr {o:?}");
    }
    // Nothing of the host but the policy's read-only list, the /etc directories it names and
    // the workspace.
    for m in mounts {
        if m["type"] == "bind" {
            let src = m["source"].as_str().unwrap();
            let listed = s.mounts.read_only.iter().any(|p| p.to_str() == Some(src))
                || s.mounts.etc.iter().any(|e| format!("/etc/{e}") == src)
                || src == ws.path().canonicalize().unwrap().to_str().unwrap();
            assert!(listed, "unexpected host bind {src}");
            assert!(!src.contains("shadow"));
        }
    }
    let tmp = strs(&by_dst("/tmp")["options"]);
    assert!(
        tmp.contains(&format!("size={}", s.mounts.tmp_size)),
        "{tmp:?}"
    );
    // The workspace is last (nothing can cover it), read-write and id-mapped to the agent.
    let last = mounts.last().unwrap();
    let wsp = s
        .workspace
        .as_ref()
        .unwrap()
        .path
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(last["destination"], wsp.as_str());
    assert!(strs(&last["options"]).contains(&"rw".to_string()));
    assert_eq!(last["uidMappings"][0]["containerID"], 0);
    assert_eq!(last["uidMappings"][0]["hostID"], EXPORT_ID_BASE + 1);
}

#[test]
fn a_zero_host_id_is_refused() {
    let ws = tempfile::tempdir().unwrap();
    let s = spec("strict", ws.path());
    let mut o = oci_opts();
    o.host_id = 0;
    let e = config(&s, &o, None).unwrap_err();
    assert!(e.to_string().contains("--host-id"), "{e}");
}

#[test]
fn default_host_ids_stay_in_the_export_range() {
    for n in ["a", "agent-1", "x".repeat(48).as_str()] {
        let id = oci::default_host_id(n);
        assert!(id >= EXPORT_ID_BASE && id + 1 < EXPORT_ID_BASE + 2 * oci::EXPORT_SLOTS);
        assert_eq!(id % 2, 0);
        assert_eq!(id, oci::default_host_id(n), "stable");
    }
}

// ---------------------------------------------------------------------------------------------
// seccomp: the OCI rules decide exactly as the compiled BPF

/// libseccomp's evaluation of an OCI profile: a syscall is allowed when any ALLOW rule naming
/// it has every argument comparison true; an ERRNO rule gives its errno; else the default.
fn oci_decide(p: &Value, name: &str, args: [u64; 6]) -> i64 {
    let mut errno = None;
    for r in p["syscalls"].as_array().unwrap() {
        if !strs(&r["names"]).iter().any(|n| n == name) {
            continue;
        }
        let ok = r["args"].as_array().is_none_or(|conds| {
            conds.iter().all(|c| {
                let a = args[c["index"].as_u64().unwrap() as usize];
                let v = c["value"].as_u64().unwrap();
                match c["op"].as_str().unwrap() {
                    "SCMP_CMP_EQ" => a == v,
                    "SCMP_CMP_MASKED_EQ" => a & v == c["valueTwo"].as_u64().unwrap(),
                    op => panic!("unexpected op {op}"),
                }
            })
        });
        if ok {
            match r["action"].as_str().unwrap() {
                "SCMP_ACT_ALLOW" => return 0,
                _ => errno = Some(r["errnoRet"].as_i64().unwrap()),
            }
        }
    }
    errno.unwrap_or(p["defaultErrnoRet"].as_i64().unwrap())
}

/// The compiled BPF's answer as 0 (allow) or an errno.
fn bpf_decide(f: &bpf::Filter, name: &str, args: [u64; 6]) -> i64 {
    bpf::tests_decide(f, name, args)
}

#[test]
fn oci_seccomp_decides_as_the_compiled_filter() {
    let p = oci_profile("agent").unwrap();
    let f = bpf::load_from("agent", tempfile::tempdir().unwrap().path()).unwrap();
    let rules = bpf::rules("agent").unwrap();
    let mut names: BTreeSet<String> = rules
        .allow
        .iter()
        .flat_map(|r| r.names.iter().cloned())
        .collect();
    names.extend(rules.never.iter().cloned());
    names.extend(rules.enosys.iter().cloned());
    // Argument values that matter to some rule, with and without high bits.
    let mut vals: Vec<u64> = vec![
        0, 1, 2, 10, 16, 17, 40, 0x5412, 0x5413, 0x541B, 0x541C, 0x541D, 0x5401,
    ];
    vals.extend([
        0o4755, 0o2755, 0o755, 0o644, 0x10000000, 0x20000, 0x20008, 0xffffffff, 0x8,
    ]);
    vals.extend([0x7E020080, 0x00000100 | 17, 0x10000000 | 17, 0x01000000]);
    let high: Vec<u64> = vals.iter().map(|v| v | (1 << 32)).collect();
    vals.extend(high);
    let mut checked = 0;
    for name in &names {
        for i in 0..4 {
            for &v in &vals {
                let mut args = [0u64; 6];
                args[i] = v;
                let want = bpf_decide(&f, name, args);
                let got = oci_decide(&p, name, args);
                assert_eq!(got, want, "{name} arg{i}={v:#x}: OCI {got}, BPF {want}");
                checked += 1;
            }
        }
    }
    assert!(checked > 10_000, "{checked}");
    // The named escapes: never allowed whatever the arguments.
    for n in [
        "mount",
        "unshare",
        "ptrace",
        "bpf",
        "keyctl",
        "init_module",
        "setns",
    ] {
        assert_eq!(oci_decide(&p, n, [0; 6]), libc::EPERM as i64, "{n}");
    }
    assert_eq!(oci_decide(&p, "clone3", [0; 6]), libc::ENOSYS as i64);
}

#[test]
fn complement_blocks_cover_everything_but_the_excluded_values() {
    let blocks = complement_for_tests(&[0x5412, 0x541C]);
    let covered = |x: u64| blocks.iter().filter(|(m, v)| x & m == *v).count();
    for x in [
        0u64,
        1,
        0x5411,
        0x5413,
        0x541B,
        0x541D,
        0xffff_ffff,
        0x8000_5412,
    ] {
        assert_eq!(covered(x), 1, "{x:#x} covered once");
    }
    assert_eq!(covered(0x5412), 0);
    assert_eq!(covered(0x541C), 0);
    assert!(blocks.len() <= 64, "{}", blocks.len());
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn k8s_opts() -> K8sOptions {
    K8sOptions {
        name: "agent-1".into(),
        image: "debian:12".into(),
        namespace: Some("agents".into()),
        runtime_class: Some("aither-crun".into()),
        token_id: None,
        net: Default::default(),
    }
}

#[test]
fn pod_is_locked_down() {
    let ws = tempfile::tempdir().unwrap();
    let mut s = spec("ci", ws.path());
    s.timeout = Some(Duration::from_secs(90));
    let gpu = GpuClaim {
        count: 2,
        vram_mb: 8000,
        priority: 0,
        exclusive: false,
        mig_profile: None,
    };
    let m = manifest(&s, &gpu, &k8s_opts()).unwrap();
    let items = m.list["items"].as_array().unwrap();
    let pod = items.iter().find(|i| i["kind"] == "Pod").unwrap();
    let spec_ = &pod["spec"];
    assert_eq!(spec_["automountServiceAccountToken"], false);
    assert_eq!(spec_["hostNetwork"], false);
    assert_eq!(spec_["hostPID"], false);
    assert_eq!(spec_["hostIPC"], false);
    assert_eq!(spec_["activeDeadlineSeconds"], 90);
    assert_eq!(spec_["runtimeClassName"], "aither-crun");
    let c = &spec_["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 1000);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(sc["capabilities"].get("add").is_none());
    let (path, profile) = m.seccomp.clone().unwrap();
    assert_eq!(sc["seccompProfile"]["type"], "Localhost");
    assert_eq!(sc["seccompProfile"]["localhostProfile"], path.as_str());
    assert!(
        path.starts_with("aither/agent-") && path.ends_with(".json"),
        "{path}"
    );
    assert_eq!(profile, oci_profile("agent").unwrap());
    let lim = &c["resources"]["limits"];
    assert_eq!(lim["memory"], (1u64 << 30).to_string());
    assert_eq!(lim["cpu"], "2000m");
    assert_eq!(lim["nvidia.com/gpu"], "2");
    assert_eq!(c["resources"]["requests"], *lim, "Guaranteed QoS");
    let mig = GpuClaim {
        mig_profile: Some("1g.10gb".into()),
        ..gpu.clone()
    };
    let m = manifest(&s, &mig, &k8s_opts()).unwrap();
    let pod = m.list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "Pod")
        .unwrap()
        .clone();
    let lim = &pod["spec"]["containers"][0]["resources"]["limits"];
    assert_eq!(lim["nvidia.com/mig-1g.10gb"], "2", "{lim}");
    assert!(lim.get("nvidia.com/gpu").is_none(), "{lim}");
    assert_eq!(c["command"], serde_json::json!(["/bin/sh", "-c", "true"]));
    assert_eq!(c["workingDir"], "/workspace");
    let vols = spec_["volumes"].as_array().unwrap();
    let ws_vol = vols.iter().find(|v| v["name"] == "workspace").unwrap();
    assert_eq!(ws_vol["emptyDir"], serde_json::json!({}));
    assert!(vols.iter().all(|v| v.get("hostPath").is_none()));
    let netpol = items.iter().find(|i| i["kind"] == "NetworkPolicy").unwrap();
    assert_eq!(netpol["spec"]["egress"], serde_json::json!([]));
    assert_eq!(
        netpol["spec"]["podSelector"]["matchLabels"]["aither.dev/agent"],
        "agent-1"
    );
    let cm = items.iter().find(|i| i["kind"] == "ConfigMap").unwrap();
    let file = path.rsplit('/').next().unwrap();
    let text: Value = serde_json::from_str(cm["data"][file].as_str().unwrap()).unwrap();
    assert_eq!(text, profile);
    let gaps = pod["metadata"]["annotations"]["aither.dev/not-expressed"]
        .as_str()
        .unwrap();
    for g in ["landlock", "pids", "rlimits"] {
        assert!(gaps.contains(g), "{g} in {gaps}");
    }
}

#[test]
fn pod_without_gpu_claim_asks_for_none_and_bad_names_are_refused() {
    let ws = tempfile::tempdir().unwrap();
    let s = spec("strict", ws.path());
    let m = manifest(&s, &GpuClaim::default(), &k8s_opts()).unwrap();
    let lim = &m.list["items"][0]["spec"]["containers"][0]["resources"]["limits"];
    assert!(lim.get("nvidia.com/gpu").is_none());
    assert_eq!(lim["cpu"], "1000m");
    for bad in ["Agent", "-a", "a_b", ""] {
        let mut o = k8s_opts();
        o.name = bad.into();
        let e = manifest(&s, &GpuClaim::default(), &o).unwrap_err();
        assert!(e.to_string().contains("--name"), "{bad}: {e}");
    }
    let mut o = k8s_opts();
    o.image = "a b".into();
    assert!(manifest(&s, &GpuClaim::default(), &o).is_err());
}
