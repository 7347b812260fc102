//! `aitherctl doctor` against fake /proc and /sys roots (AITHER_HOST_ROOT): pure v1, hybrid,
//! v2, v2 without pids, v2 inside a container's cgroup namespace, no user namespaces, no
//! Landlock, inside Docker; and once against this host (as root). Each checks the verdict, the
//! fix text, the exit status and the JSON shape. The fake-root tests need no root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const AITHERCTL: &str = env!("CARGO_BIN_EXE_aitherctl");

/// Facts only a system call could tell, as a healthy host would answer them.
const HEALTHY_FACTS: &str = r#"
landlock_abi = 6
clone3 = true
pidfd_open = true
userns_create = true
bpf_cgroup_device = true
euid = 0
[env]
"#;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    V1,
    Hybrid,
    V2,
}

struct FakeHost {
    dir: tempfile::TempDir,
    policies: tempfile::TempDir,
}

impl FakeHost {
    /// A host with everything: kernel 6.8, user namespaces, Landlock in the LSM list, seccomp,
    /// no swap, and the cgroup layout of `mode`.
    fn new(mode: Mode) -> FakeHost {
        let dir = tempfile::tempdir().unwrap();
        let h = FakeHost {
            dir,
            policies: tempfile::tempdir().unwrap(),
        };
        h.write("proc/sys/kernel/osrelease", "6.8.0-45-generic\n");
        h.write("proc/sys/user/max_user_namespaces", "63000\n");
        h.write(
            "proc/self/status",
            "Name:\taitherctl\nSeccomp:\t0\nSeccomp_filters:\t0\n",
        );
        h.write(
            "proc/sys/kernel/seccomp/actions_avail",
            "kill_process kill_thread trap errno user_notif trace log allow\n",
        );
        h.write("proc/meminfo", "MemTotal: 8000000 kB\nSwapTotal: 0 kB\n");
        h.write("proc/1/cgroup", "0::/init.scope\n");
        h.write(
            "proc/self/mountinfo",
            "27 1 254:0 / / rw,relatime - ext4 /dev/sda1 rw\n",
        );
        h.write(
            "sys/kernel/security/lsm",
            "lockdown,capability,landlock,yama,apparmor",
        );
        match mode {
            Mode::V2 => {
                h.write(
                    "sys/fs/cgroup/cgroup.controllers",
                    "cpuset cpu io memory hugetlb pids rdma misc\n",
                );
                h.write("sys/fs/cgroup/cgroup.subtree_control", "\n");
                h.write("sys/fs/cgroup/cgroup.procs", "1\n");
            }
            Mode::V1 | Mode::Hybrid => {
                for c in ["memory", "cpu", "cpuacct", "pids", "devices", "freezer"] {
                    h.write(&format!("sys/fs/cgroup/{c}/cgroup.procs"), "1\n");
                }
                h.write("sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", "");
                if mode == Mode::Hybrid {
                    h.write("sys/fs/cgroup/unified/cgroup.controllers", "");
                    h.write("sys/fs/cgroup/unified/cgroup.procs", "1\n");
                }
            }
        }
        h.write("aither-doctor-facts.toml", HEALTHY_FACTS);
        h
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.dir.path().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// Replaces `key = ...` in the facts file (or adds it before the [env] table).
    fn fact(&self, key: &str, value: &str) {
        let p = self.dir.path().join("aither-doctor-facts.toml");
        let text = fs::read_to_string(&p).unwrap();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .map(str::to_string)
            .collect();
        let env_at = lines.iter().position(|l| l == "[env]").unwrap();
        lines.insert(env_at, format!("{key} = {value}"));
        fs::write(p, lines.join("\n") + "\n").unwrap();
    }

    fn env(&self, key: &str, value: &str) {
        let p = self.dir.path().join("aither-doctor-facts.toml");
        let mut text = fs::read_to_string(&p).unwrap();
        text.push_str(&format!("{key} = {value:?}\n"));
        fs::write(p, text).unwrap();
    }

    /// A policy file in the fake host's policy directory.
    fn policy(&self, name: &str, text: &str) {
        fs::write(self.policies.path().join(format!("{name}.toml")), text).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(AITHERCTL);
        c.arg("doctor")
            .args(args)
            .env("AITHER_HOST_ROOT", self.path())
            .env(
                "AITHER_POLICY_DIR",
                format!(
                    "{}:{}",
                    self.policies.path().display(),
                    repo_policies().display()
                ),
            )
            .env_remove("AITHER_CGROUP_ROOT")
            .env_remove("AITHER_CGROUP_MODE");
        c
    }

    /// The JSON report and the exit status.
    fn json(&self) -> (Value, i32) {
        let out = self.command(&["--json"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}); stderr: {stderr}"));
        check_shape(&v);
        (v, out.status.code().unwrap())
    }

    fn text(&self) -> (String, i32) {
        let out = self.command(&[]).output().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.code().unwrap(),
        )
    }
}

fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// The documented shape of `doctor --json`.
fn check_shape(v: &Value) {
    for k in ["host", "policies", "default_policy", "default_runnable"] {
        assert!(v.get(k).is_some(), "no {k:?} in {v:#}");
    }
    let host = &v["host"];
    for k in [
        "root",
        "kernel",
        "euid",
        "userns",
        "landlock",
        "seccomp",
        "cgroup",
        "clone3",
        "pidfd_open",
        "bpf_cgroup_device",
        "gpu",
        "container",
    ] {
        assert!(host.get(k).is_some(), "no host.{k} in {host:#}");
    }
    for k in [
        "mode",
        "controllers",
        "subtree",
        "writable",
        "delegated",
        "swap_control",
        "freezer",
    ] {
        assert!(host["cgroup"].get(k).is_some(), "no host.cgroup.{k}");
    }
    assert!(host["clone3"].get("ok").is_some() && host["clone3"].get("detail").is_some());
    assert_eq!(v["default_policy"], "strict");
    for p in v["policies"].as_array().unwrap() {
        assert!(p["name"].is_string());
        if p["valid"] == true {
            assert!(p["runnable"].is_boolean(), "{p:#}");
            for list in ["missing", "best_effort_skipped"] {
                for m in p[list].as_array().unwrap() {
                    assert!(m["what"].is_string() && m["fix"].is_string(), "{m:#}");
                    assert!(m.get("protection").is_some(), "{m:#}");
                }
            }
        } else {
            assert!(p["error"].is_string(), "{p:#}");
        }
    }
}

fn policy<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("policy {name} not listed: {v:#}"))
}

fn missing<'a>(v: &'a Value, name: &str) -> &'a Vec<Value> {
    policy(v, name)["missing"].as_array().unwrap()
}

/// The `missing` entry whose `what` contains `needle`.
fn missing_item<'a>(v: &'a Value, name: &str, needle: &str) -> &'a Value {
    missing(v, name)
        .iter()
        .find(|m| m["what"].as_str().unwrap().contains(needle))
        .unwrap_or_else(|| {
            panic!(
                "{name}: nothing missing about {needle:?}: {:#}",
                policy(v, name)
            )
        })
}

fn assert_all_runnable(v: &Value) {
    for name in ["strict", "standard", "ci", "permissive"] {
        let p = policy(v, name);
        assert_eq!(p["runnable"], true, "{p:#}");
        assert!(p["missing"].as_array().unwrap().is_empty());
    }
    assert_eq!(v["default_runnable"], true);
}

/// strict, with every Landlock protection best-effort (strict-full: no stand-ins).
fn lenient_policy() -> String {
    let strict = fs::read_to_string(repo_policies().join("strict-full.toml")).unwrap();
    strict
        .replace("name = \"strict-full\"", "name = \"lenient\"")
        .replace(
        "best_effort = []",
        "best_effort = [\"landlock\", \"landlock-net\", \"landlock-ioctl\", \"landlock-scope\"]",
    )
}

#[test]
fn pure_v2_host_runs_every_policy() {
    let h = FakeHost::new(Mode::V2);
    let (v, code) = h.json();
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["host"]["cgroup"]["mode"], "v2");
    assert_eq!(v["host"]["kernel"], "6.8.0-45-generic");
    let ctrls: Vec<&str> = v["host"]["cgroup"]["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for c in ["memory", "cpu", "pids"] {
        assert!(ctrls.contains(&c), "{ctrls:?}");
    }
    assert_eq!(v["host"]["cgroup"]["delegated"]["ok"], true);
    assert_eq!(v["host"]["landlock"]["abi"], 6);
    assert_eq!(v["host"]["container"]["kind"], Value::Null);
    assert_all_runnable(&v);
    let (text, code) = h.text();
    assert_eq!(code, 0);
    assert!(text.contains("v2 at "), "{text}");
    assert!(text.contains("strict       OK (default)"), "{text}");
    assert!(
        text.contains("The default policy, strict, can run here."),
        "{text}"
    );
}

#[test]
fn hybrid_host_runs_every_policy() {
    let h = FakeHost::new(Mode::Hybrid);
    let (v, code) = h.json();
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["host"]["cgroup"]["mode"], "hybrid");
    let subtree = v["host"]["cgroup"]["subtree"].to_string();
    assert!(subtree.contains("unified/aither"), "{subtree}");
    assert!(subtree.contains("memory/aither"), "{subtree}");
    assert_eq!(v["host"]["cgroup"]["swap_control"]["ok"], true);
    assert_all_runnable(&v);
}

#[test]
fn pure_v1_host_runs_every_policy() {
    let h = FakeHost::new(Mode::V1);
    let (v, code) = h.json();
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["host"]["cgroup"]["mode"], "v1");
    assert!(!v["host"]["cgroup"]["subtree"]
        .to_string()
        .contains("unified"));
    assert_all_runnable(&v);
}

#[test]
fn a_v1_host_without_the_freezer_runs_every_policy_and_names_the_missing_freezer() {
    let h = FakeHost::new(Mode::V1);
    let (v, _) = h.json();
    assert_eq!(v["host"]["cgroup"]["freezer"]["ok"], true, "{v:#}");
    fs::remove_dir_all(h.path().join("sys/fs/cgroup/freezer")).unwrap();
    let (v, code) = h.json();
    // Pause is a convenience, not a protection: every policy still runs.
    assert_eq!(code, 0, "{v:#}");
    assert_all_runnable(&v);
    let fz = &v["host"]["cgroup"]["freezer"];
    assert_eq!(fz["ok"], false, "{fz:#}");
    let detail = fz["detail"].as_str().unwrap();
    assert!(
        detail.contains("sys/fs/cgroup/freezer") && detail.contains("aitherctl pause is refused"),
        "{detail}"
    );
    let (text, _) = h.text();
    assert!(
        text.lines()
            .any(|l| l.contains("freezer") && l.contains("pause is refused")),
        "{text}"
    );
}

#[test]
fn v1_host_with_swap_and_no_accounting_cannot_promise_no_swap() {
    let h = FakeHost::new(Mode::V1);
    fs::remove_file(
        h.path()
            .join("sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
    )
    .unwrap();
    h.write("proc/meminfo", "SwapTotal: 1048572 kB\n");
    let (v, code) = h.json();
    assert_eq!(code, 1);
    let m = missing_item(&v, "strict", "no swap");
    assert_eq!(m["protection"], "cgroup-swap");
    assert!(
        m["fix"].as_str().unwrap().contains("swapaccount=1"),
        "{m:#}"
    );
    // permissive sets no swap limit.
    assert_eq!(policy(&v, "permissive")["runnable"], true);
}

#[test]
fn no_user_namespaces_refuses_strict_with_the_sysctl_fix() {
    let h = FakeHost::new(Mode::V2);
    h.write("proc/sys/user/max_user_namespaces", "0\n");
    h.fact("userns_create", "false");
    let (v, code) = h.json();
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["default_runnable"], false);
    assert_eq!(v["host"]["userns"]["max_user_namespaces"], 0);
    for name in ["strict", "standard", "ci", "permissive"] {
        assert_eq!(policy(&v, name)["runnable"], false);
        let m = missing_item(&v, name, "namespaces");
        assert_eq!(
            m["protection"],
            Value::Null,
            "not something best_effort can waive"
        );
        assert!(
            m["fix"]
                .as_str()
                .unwrap()
                .contains("sysctl -w user.max_user_namespaces=15000"),
            "{m:#}"
        );
    }
    // Without a probe answer (nothing stated), the sysctl alone decides.
    let h = FakeHost::new(Mode::V2);
    h.write("proc/sys/user/max_user_namespaces", "0\n");
    let facts = fs::read_to_string(h.path().join("aither-doctor-facts.toml")).unwrap();
    h.write(
        "aither-doctor-facts.toml",
        &facts.replace("userns_create = true\n", ""),
    );
    let (v, code) = h.json();
    assert_eq!(code, 1);
    let m = missing_item(&v, "strict", "user.max_user_namespaces = 0");
    assert!(m["fix"].as_str().unwrap().starts_with("sysctl -w"));
    let (text, _) = h.text();
    assert!(text.contains("strict       CANNOT RUN (default)"), "{text}");
    assert!(
        text.contains("fix: sysctl -w user.max_user_namespaces=15000"),
        "{text}"
    );
    assert!(text.contains("cannot run here (exit status 1)"), "{text}");
}

#[test]
fn no_landlock_refuses_strict_full_but_strict_runs_with_named_stand_ins() {
    let h = FakeHost::new(Mode::Hybrid);
    h.write(
        "sys/kernel/security/lsm",
        "lockdown,capability,yama,apparmor",
    );
    h.fact("landlock_abi", "0");
    h.policy("lenient", &lenient_policy());
    let (v, code) = h.json();
    // The default policy, strict, runs: another layer stands in for each missing feature.
    assert_eq!(code, 0, "{v:#}");
    let strict = policy(&v, "strict");
    assert_eq!(strict["runnable"], true, "{strict:#}");
    let stand_ins: Vec<&str> = strict["compensated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(stand_ins.len(), 4, "{strict:#}");
    assert!(
        stand_ins[0].starts_with(
            "landlock (Landlock filesystem rules, ABI ≥ 3): stood in for by read-only-view"
        ),
        "{stand_ins:?}"
    );
    assert!(
        stand_ins[1].contains("stood in for by net-namespace"),
        "{stand_ins:?}"
    );
    assert!(
        stand_ins[3].contains("stood in for by net-namespace + pid-namespace"),
        "{stand_ins:?}"
    );
    // strict-full insists on every layer.
    let full = missing(&v, "strict-full");
    let prots: Vec<&str> = full
        .iter()
        .map(|m| m["protection"].as_str().unwrap())
        .collect();
    assert_eq!(
        prots,
        ["landlock", "landlock-net", "landlock-scope"],
        "{full:#?}"
    );
    let fs_rules = missing_item(&v, "strict-full", "Landlock filesystem rules");
    let fix = fs_rules["fix"].as_str().unwrap();
    assert!(
        fix.contains("boot with lsm=lockdown,capability,yama,apparmor,landlock"),
        "{fix}"
    );
    assert!(fix.contains("best_effort = [\"landlock\"]"), "{fix}");
    let lenient = policy(&v, "lenient");
    assert_eq!(lenient["runnable"], true, "{lenient:#}");
    assert_eq!(lenient["best_effort_skipped"].as_array().unwrap().len(), 3);
    // permissive turns Landlock off: it still runs.
    assert_eq!(policy(&v, "permissive")["runnable"], true);
    let (text, _) = h.text();
    assert!(
        text.contains("lenient      OK, with best-effort protections skipped"),
        "{text}"
    );
    assert!(
        text.contains("skipped (best-effort): Landlock filesystem rules"),
        "{text}"
    );
    assert!(
        text.contains("strict       OK, with stand-in layers for what this kernel lacks (default)"),
        "{text}"
    );
    assert!(
        text.contains("stand-in: landlock-scope (Landlock abstract-socket and signal scoping, ABI ≥ 6): stood in for by net-namespace + pid-namespace"),
        "{text}"
    );
}

#[test]
fn old_landlock_names_the_kernel_that_has_it() {
    let h = FakeHost::new(Mode::V2);
    h.fact("landlock_abi", "3");
    let (v, code) = h.json();
    assert_eq!(code, 0, "strict runs with stand-ins: {v:#}");
    let tcp = missing_item(&v, "strict-full", "TCP");
    assert!(
        tcp["fix"].as_str().unwrap().contains("kernel ≥ 6.7"),
        "{tcp:#}"
    );
    // standard (loopback network) needs no TCP rules; scoping (ABI 6) is stood in for.
    let standard = policy(&v, "standard");
    assert!(missing(&v, "standard").is_empty(), "{standard:#}");
    let stand_ins = standard["compensated"].as_array().unwrap();
    assert!(
        !stand_ins
            .iter()
            .any(|c| c.as_str().unwrap().starts_with("landlock-net")),
        "{standard:#}"
    );
    assert!(
        stand_ins
            .iter()
            .any(|c| c.as_str().unwrap().starts_with("landlock-scope")),
        "{standard:#}"
    );
}

#[test]
fn inside_docker_is_reported_with_the_container_options() {
    let h = FakeHost::new(Mode::Hybrid);
    h.write(".dockerenv", "");
    h.write(
        "proc/1/cgroup",
        "12:memory:/docker/4f1c2d3e4f5a\n0::/docker/4f1c2d3e4f5a\n",
    );
    h.write(
        "proc/self/mountinfo",
        "500 400 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/docker/x\n",
    );
    h.write("proc/self/status", "Seccomp:\t2\nSeccomp_filters:\t1\n");
    h.fact("userns_create", "false");
    h.fact("clone3", "false");
    h.fact("cgroup_writable", "false");
    let (v, code) = h.json();
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["host"]["container"]["kind"], "docker");
    assert_eq!(v["host"]["seccomp"]["mode"], 2);
    let ns = missing_item(&v, "strict", "namespaces");
    let fix = ns["fix"].as_str().unwrap();
    assert!(fix.contains("docker run --privileged"), "{fix}");
    assert!(fix.contains("--security-opt seccomp=unconfined"), "{fix}");
    let clone3 = missing_item(&v, "strict", "clone3");
    assert!(
        clone3["fix"]
            .as_str()
            .unwrap()
            .contains("docker run --security-opt seccomp=unconfined"),
        "{clone3:#}"
    );
    let cg = missing_item(&v, "strict", "writable cgroup subtree");
    assert!(cg["fix"]
        .as_str()
        .unwrap()
        .contains("--privileged --cgroupns=private"));
    let (text, _) = h.text();
    assert!(
        text.contains("container        docker (/proc/1/cgroup: 12:memory:/docker/"),
        "{text}"
    );
}

#[test]
fn dockerenv_on_a_block_device_root_is_not_counted_as_a_container() {
    let h = FakeHost::new(Mode::Hybrid);
    h.write(".dockerenv", "");
    let (v, code) = h.json();
    assert_eq!(code, 0);
    assert_eq!(v["host"]["container"]["kind"], Value::Null);
    assert!(v["host"]["container"]["evidence"]
        .to_string()
        .contains("not counted"));
}

#[test]
fn kubernetes_and_ci_come_from_the_environment() {
    let h = FakeHost::new(Mode::V2);
    h.env("KUBERNETES_SERVICE_HOST", "10.96.0.1");
    h.env("GITHUB_ACTIONS", "true");
    h.fact("userns_create", "false");
    let (v, code) = h.json();
    assert_eq!(code, 1);
    assert_eq!(v["host"]["container"]["kind"], "kubernetes");
    assert_eq!(v["host"]["container"]["ci"], "github-actions");
    let ns = missing_item(&v, "strict", "namespaces");
    assert!(
        ns["fix"].as_str().unwrap().contains("securityContext"),
        "{ns:#}"
    );
}

#[test]
fn v2_without_pids_refuses_strict_naming_cgroup_pids() {
    let h = FakeHost::new(Mode::V2);
    h.write("sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory\n");
    let (v, code) = h.json();
    assert_eq!(code, 1, "{v:#}");
    for name in ["strict", "standard", "ci", "permissive"] {
        let m = missing_item(&v, name, "pids");
        assert_eq!(m["protection"], "cgroup-pids");
        let fix = m["fix"].as_str().unwrap();
        assert!(
            fix.contains("echo +pids > …/cgroup.subtree_control"),
            "{fix}"
        );
        assert!(fix.contains("best_effort = [\"cgroup-pids\"]"), "{fix}");
    }
    // With pids best-effort, it runs and says what it skips.
    let strict = fs::read_to_string(repo_policies().join("strict.toml")).unwrap();
    h.policy(
        "nopids",
        &strict
            .replace("name = \"strict\"", "name = \"nopids\"")
            .replace("best_effort = []", "best_effort = [\"cgroup-pids\"]"),
    );
    let (v, _) = h.json();
    let p = policy(&v, "nopids");
    assert_eq!(p["runnable"], true, "{p:#}");
    assert_eq!(p["best_effort_skipped"][0]["protection"], "cgroup-pids");
}

#[test]
fn v2_namespace_root_with_processes_is_not_delegated() {
    // What a container sees with its own cgroup namespace: not the real root (cgroup.type
    // exists), processes inside, nothing enabled for children.
    let h = FakeHost::new(Mode::V2);
    h.write("sys/fs/cgroup/cgroup.type", "domain\n");
    h.write("sys/fs/cgroup/cgroup.procs", "1\n7\n");
    let (v, code) = h.json();
    assert_eq!(code, 1);
    assert_eq!(v["host"]["cgroup"]["delegated"]["ok"], false);
    let m = missing_item(&v, "strict", "not delegated");
    assert!(
        m["fix"]
            .as_str()
            .unwrap()
            .contains("cgroup.subtree_control"),
        "{m:#}"
    );
    // Once the controllers are enabled for children, it is delegated.
    h.write("sys/fs/cgroup/cgroup.subtree_control", "cpu memory pids\n");
    let (v, code) = h.json();
    assert_eq!(code, 0, "{v:#}");
}

#[test]
fn fake_root_without_stated_facts_fails_closed() {
    let h = FakeHost::new(Mode::V2);
    h.write("aither-doctor-facts.toml", "[env]\n");
    let (v, code) = h.json();
    assert_eq!(code, 1);
    assert_eq!(v["host"]["clone3"]["ok"], Value::Null);
    let m = missing_item(&v, "strict", "clone3");
    assert!(m["fix"]
        .as_str()
        .unwrap()
        .contains("aither-doctor-facts.toml"));
}

#[test]
fn an_invalid_installed_policy_is_listed_not_fatal() {
    let h = FakeHost::new(Mode::V2);
    h.policy("broken", "name = \"broken\"\n");
    let (v, code) = h.json();
    assert_eq!(code, 0);
    let p = policy(&v, "broken");
    assert_eq!(p["valid"], false);
    assert!(p["error"].as_str().unwrap().contains("broken.toml"));
    let (text, _) = h.text();
    assert!(text.contains("broken       INVALID: "), "{text}");
}

#[test]
fn a_malformed_facts_file_is_an_error() {
    let h = FakeHost::new(Mode::V2);
    h.write("aither-doctor-facts.toml", "landlock_abi = \"six\"\n");
    let out = h.command(&[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("aither: error: reading the host"), "{err}");
    assert!(err.contains("aither-doctor-facts.toml"), "{err}");
}

/// The real doctor on this host: strict runs, and the facts are this host's.
#[test]
fn on_this_host_strict_runs_and_the_facts_are_true() {
    let euid = nix::unistd::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "this test runs the real doctor and must run as root (CI runs it as root)"
    );
    let out = Command::new(AITHERCTL)
        .args(["doctor", "--json"])
        .env_remove("AITHER_HOST_ROOT")
        .env("AITHER_POLICY_DIR", repo_policies())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_shape(&v);
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    assert_eq!(policy(&v, "strict")["runnable"], true, "{v:#}");
    let host = &v["host"];
    let mode = aither::cgroup::detect(&aither::cgroup::root()).unwrap();
    assert_eq!(host["cgroup"]["mode"], serde_json::to_value(mode).unwrap());
    let abi = aither::sandbox::landlock::kernel_abi();
    assert_eq!(host["landlock"]["abi"], abi);
    assert!(abi >= 6, "strict needs Landlock ABI 6");
    assert_eq!(host["seccomp"]["filter"], true);
    assert_eq!(host["userns"]["create"]["ok"], true);
    assert_eq!(host["clone3"]["ok"], true);
    assert_eq!(host["pidfd_open"]["ok"], true);
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(host["kernel"], release.trim());
    if let Ok(expect) = std::env::var("AITHER_TEST_EXPECT") {
        if let Some(m) = expect
            .split(',')
            .find_map(|i| i.trim().strip_prefix("cgroup="))
        {
            assert_eq!(host["cgroup"]["mode"], m);
        }
    }
}
