//! The enforcement report of a strict run matches the policy, field by field: the proof that
//! each layer was applied (issue 12). As root.

mod common;

use common::{policy_dir, Workspace};
use serde_json::Value;

#[test]
fn the_report_of_a_strict_run_matches_the_policy_field_by_field() {
    let ws = Workspace::new();
    let report = ws.path().join("report.json");
    let r = ws.run("strict", &["--report", report.to_str().unwrap()], &["true"]);
    assert_eq!(r.code(), 0, "{}", r.describe());
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let policy = aither::policy::Policy::load_file(&policy_dir().join("strict.toml"))
        .unwrap()
        .policy;

    assert_eq!(rep["policy"], "strict");
    let ns: Vec<&str> = rep["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for n in ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"] {
        assert!(ns.contains(&n), "namespace {n} missing: {ns:?}");
    }
    // Ids: the policy's inside, an unprivileged host uid outside.
    assert_eq!(rep["uid"], policy.process.uid);
    assert_eq!(rep["gid"], policy.process.gid);
    let host_uid = rep["host_uid"].as_u64().unwrap();
    assert!(host_uid >= 0x7000_0000, "host uid {host_uid}");
    let inside = &rep["inside"];
    // The map as seen inside: the agent's uid → its host uid, and nothing maps host root.
    let map: Vec<u64> = inside["uid_map"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let ranges: Vec<&[u64]> = map.chunks(3).collect();
    assert!(
        ranges.contains(&&[policy.process.uid as u64, host_uid, 1][..]),
        "{ranges:?}"
    );
    assert!(
        ranges.iter().all(|r| r[1] >= 0x7000_0000),
        "a range maps a privileged host uid: {ranges:?}"
    );
    // The cgroup's limits as the kernel reads them back.
    let cg = &rep["cgroup"];
    assert_eq!(cg["memory_bytes"], policy.resources.memory.0);
    assert_eq!(cg["pids"], policy.resources.pids);
    let quota = cg["cpu_quota_us"].as_f64().unwrap() / cg["cpu_period_us"].as_f64().unwrap();
    assert!((quota - policy.resources.cpus).abs() < 0.01, "{cg}");
    assert_eq!(cg["swap_bytes"], 0);
    // Landlock: fully enforced, with every right class strict asks for.
    let ll = &rep["landlock"];
    assert_eq!(ll["status"], "FullyEnforced", "{ll}");
    assert!(ll["abi"].as_u64().unwrap() >= 6);
    for k in ["filesystem", "tcp", "ioctl_dev", "scopes"] {
        assert_eq!(ll[k], true, "{k}: {ll}");
    }
    // seccomp: the agent profile, its digest and rule count; mode 2 (filter) inside.
    assert_eq!(rep["seccomp"]["profile"], policy.seccomp.profile);
    assert_eq!(rep["seccomp"]["digest"].as_str().unwrap().len(), 64);
    assert!(rep["seccomp"]["rules"].as_u64().unwrap() > 100);
    let st = &inside["status"];
    assert_eq!(st["Seccomp"], "2");
    // No capability in any set; no_new_privs.
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(st[set], "0000000000000000", "{set}");
    }
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(
        st["Uid"],
        format!("{0} {0} {0} {0}", policy.process.uid),
        "real, effective, saved and fs uid"
    );
    assert_eq!(st["Groups"], "", "no supplementary groups");
    // rlimits as the policy sets them.
    let rl = |name: &str| {
        inside["rlimits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .map(|l| {
                (
                    l["soft"].as_str().unwrap().to_string(),
                    l["hard"].as_str().unwrap().to_string(),
                )
            })
            .unwrap()
    };
    let nofile = policy.rlimits.nofile.to_string();
    assert_eq!(rl("Max open files"), (nofile.clone(), nofile));
    assert_eq!(rl("Max core file size"), ("0".into(), "0".into()));
    // Mounts: a tmpfs root; the system directories read-only; the workspace read-write.
    let mounts = inside["mounts"].as_array().unwrap();
    let mount = |t: &str| mounts.iter().rev().find(|m| m["target"] == t).cloned();
    assert_eq!(mount("/").unwrap()["fstype"], "tmpfs");
    let usr = mount("/usr").unwrap_or_else(|| panic!("/usr not mounted: {mounts:?}"));
    assert!(usr["options"].as_str().unwrap().starts_with("ro"), "{usr}");
    let w = mount(ws.path().to_str().unwrap()).expect("workspace mounted");
    assert!(w["options"].as_str().unwrap().starts_with("rw"), "{w}");
    assert_eq!(rep["best_effort_skipped"], serde_json::json!([]));
    // This host's kernel has every Landlock feature strict uses (CI declares landlock>=6): no
    // layer stands in for another. Older kernels: scripts/kernel-matrix.sh.
    assert_eq!(rep["compensated"], serde_json::json!([]), "{rep:#}");
}

/// `AITHER_TRACE_LAUNCH=1` also times aitherctl's own steps before the launcher starts
/// (docs/performance.md, "Launch budget"), from the caller's exec when `AITHER_TRACE_T0` says
/// when that was.
#[test]
fn the_launch_trace_names_aitherctl_s_own_steps_in_order() {
    let ws = Workspace::new();
    let out = ws
        .command("strict", &[], &["true"], &common::unique("trace"))
        .env("AITHER_TRACE_LAUNCH", "1")
        .env(
            "AITHER_TRACE_T0",
            aither::sandbox::channel::now_ns().to_string(),
        )
        .output()
        .expect("run aitherctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let steps: Vec<String> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("aither-trace: ctl "))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len() - 2].join(" ")
        })
        .collect();
    assert_eq!(
        steps,
        [
            "exec→main",
            "args",
            "no daemon",
            "scope",
            "policy named",
            "policy load+parse",
            "claims",
            "token mint+verify",
            "spec",
            "workspace checked",
            "launcher starts"
        ],
        "{stderr}"
    );
}

/// `AITHER_TRACE_LAUNCH=1` names pid 1's stages in the order docs/performance.md's launch
/// budget lists them, each stamp after the step it is named for.
#[test]
fn the_launch_trace_names_pid1s_stages_in_order() {
    let ws = Workspace::new();
    let out = ws
        .command("strict", &[], &["true"], &common::unique("trace"))
        .env("AITHER_TRACE_LAUNCH", "1")
        .output()
        .expect("run aitherctl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stages: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("aither-trace: sandbox "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        stages,
        [
            "WaitForParent",
            "Mounts",
            "JoinCgroup",
            "CloseFds",
            "ParentDeathSignal",
            "Landlock",
            "Seccomp",
            "ForkAgent"
        ],
        "{stderr}"
    );
}
