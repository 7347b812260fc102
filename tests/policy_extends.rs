//! A policy written as `extends = "strict"` plus one override, end to end with a real daemon
//! (docs/policies.md "Extending a policy"): the agent runs with strict's protections and
//! the new limit, and `policy show` says what it extends.

mod common;

use std::time::Duration;

use common::daemon::TestDaemon as Daemon;
use common::{cgroup_dirs_of, poll_until, unique};

#[test]
fn a_policy_extending_strict_keeps_its_protections_with_the_new_memory_limit() {
    let d = Daemon::start("aitherd-extends-", &[]);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("strict-768m.toml");
    std::fs::write(
        &file,
        "name = \"strict-768m\"\nextends = \"strict\"\n\n[resources]\nmemory = \"768M\"\n",
    )
    .unwrap();
    let policy = file.to_str().unwrap();

    let show = d.ok(&["policy", "show", policy]);
    assert!(show.contains("extends       strict ("), "{show}");
    assert!(
        show.contains("memory 768M (swap 0), 1 CPUs, 128 pids"),
        "{show}"
    );

    let name = unique("extends");
    let script = "cat /etc/shadow; echo shadow=$?; \
                  grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status; \
                  echo ready; exec sleep 300";
    d.ok(&[
        "spawn", "--json", "--policy", policy, &name, "--", "sh", "-c", script,
    ]);
    let mut logs = String::new();
    let ok = poll_until(Duration::from_secs(20), || {
        logs = d.ok(&["logs", &name]);
        logs.contains("ready")
    });
    assert!(ok, "{name} did not start: {logs}\n{}", d.log());
    // strict's protections: no /etc/shadow, no capabilities, no_new_privs, seccomp.
    assert!(logs.contains("shadow=1"), "{logs}");
    assert!(!logs.contains("root:"), "{logs}");
    assert!(logs.contains("CapEff:\t0000000000000000"), "{logs}");
    assert!(logs.contains("NoNewPrivs:\t1"), "{logs}");
    assert!(logs.contains("Seccomp:\t2"), "{logs}");
    // The new limit, in the agent's memory cgroup.
    let limits: Vec<u64> = cgroup_dirs_of(&name)
        .iter()
        .flat_map(|c| ["memory.limit_in_bytes", "memory.max"].map(|f| c.join(f)))
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    assert!(!limits.is_empty(), "no memory cgroup of {name}");
    assert!(
        limits.iter().all(|&l| l == 768 << 20),
        "memory limits {limits:?}"
    );
    let v = d.json(&["inspect", &name]);
    assert_eq!(v["policy"], "strict-768m", "{v}");
}
