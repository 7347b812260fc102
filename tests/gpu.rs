//! The MicroScheduler end to end (docs/gpu.md): a real aitherd, stand-in device nodes with
//! NVIDIA's numbers (c 195:N), and strict agents under the `gpu` policy. Every scenario runs
//! twice: on the simulated backend (use declared per agent in gpus.toml) and on the NVML backend
//! over a mock libnvidia-ml.so.1 (tests/nvml_mock/nvml_mock.c, built here with `cc`), which
//! reports use per host pid, as a real driver does, so the pid-to-agent mapping is exercised.
//! Agents that do not fit together are queued and run in priority order, each sees only its
//! own node; `gpu ls` / `gpu queue` show the state; preemption, overuse eviction and admission
//! refusal behave as a user would see them; the queue survives a `kill -9` of the daemon. On
//! NVML alone: use the driver does not report (unknown, not 0), a device that falls off the
//! bus, and a driver that fails at init.
//!
//! The device rules themselves (EPERM for an unleased node, v1 and BPF each alone) are proven
//! in runtime/aither-init/tests/devices.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::daemon::TestDaemon;
use common::poll_until;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Makes a stand-in character node (0666) with the given numbers.
fn mknod(node: &Path, major: u32, minor: u32) {
    use nix::sys::stat::{makedev, Mode, SFlag};
    let dev = makedev(u64::from(major), u64::from(minor));
    let rc = nix::sys::stat::mknod(node, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), dev);
    assert_eq!(rc, Ok(()), "mknod {}", node.display());
    std::fs::set_permissions(node, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
}

/// What opening `node` read-write answers on the host itself, outside any sandbox: "open" on a
/// host whose NVIDIA driver serves that minor, "No such device or address" without a driver.
/// A leased node must answer the same inside the sandbox (the device rules let it through);
/// an unleased one is absent from the sandbox's /dev.
fn host_open(node: &Path) -> String {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(node)
    {
        Ok(_) => "open".into(),
        Err(e) => {
            let s = e.to_string();
            s.split(" (os error").next().unwrap_or(&s).to_string()
        }
    }
}

/// Where the GPUs come from.
enum Gpus {
    /// The simulated backend: `[[device]]` and per-agent `[[usage]]` in gpus.toml.
    Sim { dir: tempfile::TempDir },
    /// NVML over the mock library: its state file lists devices and per-pid use.
    Nvml { dir: tempfile::TempDir },
}

const GIB16: u64 = 16384;

impl Gpus {
    fn tempdir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(tag)
            .tempdir_in("/var/tmp")
            .unwrap()
    }

    /// Two (or one) simulated 16 GiB GPUs on stand-in nodes nvidia0, nvidia1 (c 195:0, 195:1).
    fn sim(devices: usize, scheduler: &str) -> Gpus {
        let dir = Self::tempdir("aither-gpu-sim");
        let mut toml = format!("backend = \"simulated\"\n[scheduler]\n{scheduler}\n");
        for i in 0..devices {
            let node = dir.path().join(format!("nvidia{i}"));
            mknod(&node, 195, i as u32);
            toml.push_str(&format!(
                "[[device]]\nuuid = \"GPU-sim-{i}\"\ntotal_mb = {GIB16}\nnode = \"{}\"\n",
                node.display()
            ));
        }
        std::fs::write(dir.path().join("gpus.toml"), toml).unwrap();
        Gpus::Sim { dir }
    }

    /// The same GPUs through NVML: the mock library built into the directory, its state file,
    /// the device nodes in `dev/`, gpus.toml (backend nvml, the scheduler) and an aitherd.toml
    /// whose `gpu.nvml_library` names the mock.
    fn nvml(devices: usize, scheduler: &str) -> Gpus {
        let dir = Self::tempdir("aither-gpu-nvml");
        let lib = dir.path().join("libnvidia-ml.so.1");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvml_mock/nvml_mock.c");
        let out = Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("the GPU suite needs a C compiler (cc) to build the mock NVML library: {e}; install.sh installs gcc"));
        assert!(
            out.status.success(),
            "cc {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        let mut state = String::new();
        for i in 0..devices {
            mknod(&dir.path().join(format!("dev/nvidia{i}")), 195, i as u32);
            state.push_str(&format!(
                "device {i} {GIB16} GPU-mock-{i} NVIDIA Mock H100\n"
            ));
        }
        std::fs::write(dir.path().join("state"), state).unwrap();
        std::fs::write(
            dir.path().join("gpus.toml"),
            format!("backend = \"nvml\"\n[scheduler]\n{scheduler}\n"),
        )
        .unwrap();
        let conf = dir.path().join("aitherd.toml");
        std::fs::write(
            &conf,
            format!("[gpu]\nnvml_library = \"{}\"\n", lib.display()),
        )
        .unwrap();
        std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        Gpus::Nvml { dir }
    }

    fn new(kind: Kind, devices: usize, scheduler: &str) -> Gpus {
        match kind {
            Kind::Sim => Self::sim(devices, scheduler),
            Kind::Nvml => Self::nvml(devices, scheduler),
        }
    }

    fn dir(&self) -> &Path {
        match self {
            Gpus::Sim { dir } | Gpus::Nvml { dir } => dir.path(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Gpus::Sim { .. } => "simulated",
            Gpus::Nvml { .. } => "nvml",
        }
    }

    fn uuid(&self, i: u32) -> String {
        match self {
            Gpus::Sim { .. } => format!("GPU-sim-{i}"),
            Gpus::Nvml { .. } => format!("GPU-mock-{i}"),
        }
    }

    /// The stand-in node of device `i` on the host.
    fn node(&self, i: u32) -> PathBuf {
        match self {
            Gpus::Sim { dir } => dir.path().join(format!("nvidia{i}")),
            Gpus::Nvml { dir } => dir.path().join(format!("dev/nvidia{i}")),
        }
    }

    fn mock_state(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// Appends a line to the mock's state (NVML) or gpus.toml (simulated).
    fn append(&self, line: &str) {
        let f = match self {
            Gpus::Sim { dir } => dir.path().join("gpus.toml"),
            Gpus::Nvml { .. } => self.mock_state(),
        };
        let mut t = std::fs::read_to_string(&f).unwrap();
        t.push_str(line);
        std::fs::write(&f, t).unwrap();
    }

    /// Adds VRAM use of an agent on a device (re-read at every poll): declared by name on the
    /// simulated backend; on NVML, by the host pid of the agent's process, as a driver reports
    /// it (None: NVML_VALUE_NOT_AVAILABLE).
    fn use_vram(&self, d: &TestDaemon, agent: &str, device: u32, used_mb: Option<u64>) {
        match self {
            Gpus::Sim { .. } => self.append(&format!(
                "[[usage]]\nagent = \"{agent}\"\ndevice = {device}\nused_mb = {}\n",
                used_mb.expect("the simulated backend has no unknown use")
            )),
            Gpus::Nvml { .. } => {
                let pid = agent_host_pid(d, agent);
                let used = used_mb
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "na".into());
                self.append(&format!("proc {device} {pid} {used}\n"));
            }
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "AITHER_GPUS".to_string(),
                self.dir().join("gpus.toml").display().to_string(),
            ),
            ("AITHER_GPU_POLL_MS".to_string(), "200".to_string()),
        ];
        if let Gpus::Nvml { dir } = self {
            env.push(("AITHER_GPU_ROOT".into(), dir.path().display().to_string()));
            env.push((
                "NVML_MOCK_STATE".into(),
                self.mock_state().display().to_string(),
            ));
        }
        env
    }

    fn args(&self) -> Vec<String> {
        match self {
            Gpus::Sim { .. } => vec![],
            Gpus::Nvml { dir } => vec![
                "--config".into(),
                dir.path().join("aitherd.toml").display().to_string(),
            ],
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sim,
    Nvml,
}

/// The host pid of the agent's process (its sandbox's pid 1 from its last `started` event),
/// checked to be in a cgroup of the agent: what NVML would report for it.
fn agent_host_pid(d: &TestDaemon, agent: &str) -> u32 {
    let pid = events(d)
        .iter()
        .rev()
        .find(|e| e["kind"] == "started" && e["name"] == agent)
        .and_then(|e| e["data"]["pid1"].as_u64())
        .unwrap_or_else(|| panic!("no started event with pid1 for {agent}")) as u32;
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    assert!(
        cg.contains(&format!("aither/{agent}-")),
        "pid {pid} is not in {agent}'s cgroup: {cg}"
    );
    pid
}

/// The agent: prints its lease and what its /dev shows of both GPU nodes, then waits until
/// the file `release-<name>` appears in the workspace (or for ever with "hold").
const AGENT: &str = r#"
import json, os, sys, time
import aither
ch = aither.Channel.from_env()
lease = ch.gpu_lease()
def opens(p):
    try:
        os.close(os.open(p, os.O_RDWR)); return "open"
    except OSError as e:
        return os.strerror(e.errno)
seen = {n: opens("/dev/" + n) for n in ("nvidia0", "nvidia1")}
print("LEASE " + json.dumps({"lease": {"granted": lease.granted, "devices": [d.node for d in lease.devices], "vram": [d.vram_mb for d in lease.devices]}, "seen": seen, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
ch.ready()
name = os.environ["AITHER_AGENT"]
while not os.path.exists("release-" + name):
    time.sleep(0.05)
"#;

fn daemon(gpus: &Gpus) -> TestDaemon {
    let env = gpus.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args = gpus.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = TestDaemon::start_env("aitherd-gpu-", &args, &env).with_python_sdk();
    std::fs::write(d.ws.path().join("agent.py"), AGENT).unwrap();
    d
}

/// What the sandbox must answer when it opens leased device `i`: what the host answers.
fn leased_opens(gpus: &Gpus, i: u32) -> String {
    let want = host_open(&gpus.node(i));
    assert_ne!(
        want,
        "Operation not permitted",
        "the test itself may open {}",
        gpus.node(i).display()
    );
    want
}

fn spawn(d: &TestDaemon, name: &str, vram: &str, priority: u32) -> Value {
    let p = priority.to_string();
    d.json(&[
        "spawn",
        "--json",
        "--policy",
        &policy(d),
        "--restart",
        "never",
        "--gpus",
        "1",
        "--gpu-vram",
        vram,
        "--gpu-priority",
        &p,
        name,
        "--",
        "python3",
        "-u",
        "agent.py",
    ])
}

/// The gpu policy with priority classes up to 5 (the built-in grants class 1).
fn policy(d: &TestDaemon) -> String {
    let p = d.ws.path().join("gpu5.toml");
    if !p.exists() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/gpu.toml"),
        )
        .unwrap()
        .replace("name = \"gpu\"", "name = \"gpu5\"")
        .replace("priority = 1", "priority = 5")
        .replace("vram_mb = 8192", "vram_mb = 16384");
        std::fs::write(&p, text).unwrap();
    }
    p.display().to_string()
}

fn release(d: &TestDaemon, name: &str) {
    std::fs::write(d.ws.path().join(format!("release-{name}")), "").unwrap();
}

fn state(d: &TestDaemon, name: &str) -> String {
    d.json(&["inspect", "--json", name])["state"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

fn wait_state(d: &TestDaemon, name: &str, want: &[&str]) {
    let ok = poll_until(WAIT, || want.contains(&state(d, name).as_str()));
    assert!(
        ok,
        "{name} never reached {want:?} (is {}): {}\n{}",
        state(d, name),
        d.ok(&["logs", name]),
        d.log()
    );
}

fn lease_line(d: &TestDaemon, name: &str) -> Value {
    let mut line = None;
    let ok = poll_until(WAIT, || {
        line = d
            .ok(&["logs", name])
            .lines()
            .find_map(|l| l.strip_prefix("LEASE ").map(str::to_string));
        line.is_some()
    });
    assert!(ok, "{name} printed no lease: {}", d.ok(&["logs", name]));
    serde_json::from_str(&line.unwrap()).unwrap()
}

/// `aitherctl doctor`'s text (its exit status is the host's, not checked here).
fn doctor(d: &TestDaemon) -> String {
    String::from_utf8_lossy(&d.ctl(&["doctor"]).stdout).into_owned()
}

fn stats(d: &TestDaemon, name: &str) -> Value {
    serde_json::from_str(d.ok(&["stats", "--no-stream", "--json", name]).trim())
        .expect("stats JSON")
}

fn events(d: &TestDaemon) -> Vec<Value> {
    d.ok(&["events", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn granted_order(d: &TestDaemon) -> Vec<String> {
    events(d)
        .iter()
        .filter(|e| e["kind"] == "gpu.granted")
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn agents_that_do_not_fit_together_queue_and_run_in_priority_order_on_their_own_nodes() {
    queue_and_priority(Kind::Sim);
}

#[test]
fn nvml_agents_that_do_not_fit_together_queue_and_run_in_priority_order_on_their_own_nodes() {
    queue_and_priority(Kind::Nvml);
}

fn queue_and_priority(kind: Kind) {
    let sim = Gpus::new(kind, 2, "preemption = false");
    let d = daemon(&sim);
    // Both GPUs taken by holders (10 of 16 GiB each).
    spawn(&d, "holder-a", "10G", 0);
    spawn(&d, "holder-b", "10G", 0);
    wait_state(&d, "holder-a", &["ready"]);
    wait_state(&d, "holder-b", &["ready"]);
    let a = lease_line(&d, "holder-a");
    assert_eq!(a["lease"]["devices"], serde_json::json!(["/dev/nvidia0"]));
    assert_eq!(a["seen"]["nvidia0"], leased_opens(&sim, 0).as_str(), "{a}");
    assert_eq!(
        a["seen"]["nvidia1"], "No such file or directory",
        "the other GPU's node is not in its /dev: {a}"
    );
    assert_eq!(a["cuda"], sim.uuid(0).as_str());
    let b = lease_line(&d, "holder-b");
    assert_eq!(b["seen"]["nvidia1"], leased_opens(&sim, 1).as_str(), "{b}");
    assert_eq!(b["seen"]["nvidia0"], "No such file or directory", "{b}");

    // Two more that do not fit: queued, the higher class first, whatever the order of arrival.
    let low = spawn(&d, "low", "10G", 0);
    assert_eq!(low["state"], "queued", "spawn answers once queued: {low}");
    spawn(&d, "high", "10G", 3);
    let q = d.json(&["gpu", "queue", "--json"]);
    let order: Vec<&str> = q["queue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request"]["agent"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["high", "low"], "{q}");
    let ps = d.ok(&["ps"]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("high") && l.contains("queued") && l.contains("queued#1")),
        "{ps}"
    );
    // `stats`: a holder's lease (its device, VRAM reserved and used at the last reading), a
    // waiter's place in the queue.
    sim.use_vram(&d, "holder-a", 0, Some(512));
    let stats = |name: &str| -> Value {
        serde_json::from_str(d.ok(&["stats", "--no-stream", "--json", name]).trim())
            .expect("stats JSON")
    };
    assert!(
        poll_until(Duration::from_secs(20), || stats("holder-a")["gpu"]
            ["devices"][0]["used_mb"]
            == 512),
        "{}",
        stats("holder-a")
    );
    let g = &stats("holder-a")["gpu"];
    assert_eq!(g["state"], "granted", "{g}");
    assert_eq!(g["devices"][0]["index"], 0, "{g}");
    assert_eq!(g["devices"][0]["vram_mb"], 10240, "{g}");
    assert_eq!(g["devices"][0]["total_mb"], 16384, "{g}");
    let g = &stats("high")["gpu"];
    assert_eq!(
        (&g["state"], &g["queue_position"]),
        (&"queued".into(), &1.into()),
        "{g}"
    );
    let table = d.ok(&["stats", "--no-stream", "holder-a", "high"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("holder-a") && l.ends_with("0:512M/10G")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("high") && l.ends_with("queued#1")),
        "{table}"
    );
    let ls = d.json(&["gpu", "ls", "--json"]);
    assert_eq!(ls["backend"], sim.kind());
    assert_eq!(ls["devices"][0]["reserved_mb"], 10240, "{ls}");
    assert_eq!(ls["devices"][0]["leases"][0]["agent"], "holder-a", "{ls}");
    assert_eq!(ls["queued"], 2);
    let text = d.ok(&["gpu", "ls"]);
    assert!(
        text.contains(&sim.uuid(1)) && text.contains("holder-b"),
        "{text}"
    );

    // One GPU frees: the higher class gets it, the lower keeps waiting.
    release(&d, "holder-b");
    wait_state(&d, "high", &["ready"]);
    assert_eq!(state(&d, "low"), "queued");
    let h = lease_line(&d, "high");
    assert_eq!(h["lease"]["devices"], serde_json::json!(["/dev/nvidia1"]));
    assert_eq!(h["seen"]["nvidia1"], leased_opens(&sim, 1).as_str());
    release(&d, "holder-a");
    wait_state(&d, "low", &["ready"]);
    assert_eq!(
        granted_order(&d),
        ["holder-a", "holder-b", "high", "low"],
        "grants in priority order"
    );
    // Queue events and the audit trail name the decisions.
    assert!(events(&d)
        .iter()
        .any(|e| e["kind"] == "gpu.queued" && e["name"] == "low"));
    let audit = std::fs::read_to_string(d.audit_log()).unwrap();
    assert!(audit.contains("\"gpu_grant\"") && audit.contains("\"gpu_queue\""));
    for n in ["high", "low"] {
        release(&d, n);
    }
}

#[test]
fn a_higher_class_preempts_and_the_victim_is_requeued_at_its_place() {
    preemption(Kind::Sim);
}

#[test]
fn nvml_a_higher_class_preempts_and_the_victim_is_requeued_at_its_place() {
    preemption(Kind::Nvml);
}

fn preemption(kind: Kind) {
    let sim = Gpus::new(kind, 1, "preemption = true\npreempt_grace_ms = 2000");
    let d = daemon(&sim);
    spawn(&d, "victim", "12G", 0);
    wait_state(&d, "victim", &["ready"]);
    let first = d.json(&["inspect", "--json", "victim"]);
    spawn(&d, "boss", "12G", 4);
    wait_state(&d, "boss", &["ready"]);
    // The victim was stopped (SIGTERM) and waits again; not a failure, not a restart.
    wait_state(&d, "victim", &["queued"]);
    let v = d.json(&["inspect", "--json", "victim"]);
    assert!(
        v["last_exit"].as_str().unwrap_or("").contains("preempted"),
        "{v}"
    );
    assert_eq!(v["restarts"], first["restarts"]);
    assert!(events(&d).iter().any(|e| e["kind"] == "gpu.preempted"
        && e["name"] == "victim"
        && e["data"]["by"] == "boss"));
    release(&d, "boss");
    wait_state(&d, "victim", &["ready"]);
    release(&d, "victim");
}

#[test]
fn vram_overuse_evicts_the_agent() {
    overuse(Kind::Sim);
}

#[test]
fn nvml_vram_overuse_evicts_the_agent() {
    overuse(Kind::Nvml);
}

fn overuse(kind: Kind) {
    let sim = Gpus::new(kind, 1, "preemption = false");
    let d = daemon(&sim);
    // doctor states what the scheduler guarantees and what it cannot.
    let doc = doctor(&d);
    assert!(
        doc.contains(&format!("backend        {}", sim.kind()))
            && doc.contains("poll interval  200 ms")
            && doc.contains("evicted after the fact"),
        "{doc}"
    );
    let o = d.ctl(&["doctor", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("doctor JSON");
    assert_eq!(v["gpu_service"]["backend"], sim.kind(), "{v}");
    assert_eq!(v["gpu_service"]["poll_ms"], 200, "{v}");
    assert_eq!(v["gpu_service"]["eviction"], "after the fact", "{v}");
    spawn(&d, "greedy", "4G", 0);
    wait_state(&d, "greedy", &["ready"]);
    sim.use_vram(&d, "greedy", 0, Some(4000));
    // Within its reservation: read (stats shows it) and not evicted.
    assert!(
        poll_until(WAIT, || stats(&d, "greedy")["gpu"]["devices"][0]["used_mb"]
            == 4000),
        "{}",
        stats(&d, "greedy")
    );
    assert_eq!(state(&d, "greedy"), "ready", "within its reservation");
    sim.use_vram(&d, "greedy", 0, Some(2000)); // 6000 MiB in all on device 0 > 4096 reserved
    wait_state(&d, "greedy", &["exited", "failed"]);
    let v = d.json(&["inspect", "--json", "greedy"]);
    assert!(
        v["last_exit"].as_str().unwrap_or("").contains("evicted"),
        "{v}"
    );
    let ls = d.json(&["gpu", "ls", "--json"]);
    assert_eq!(
        ls["devices"][0]["reserved_mb"], 0,
        "the lease is released: {ls}"
    );
}

#[test]
fn requests_no_gpu_could_hold_are_refused_and_flags_cannot_widen_the_claim() {
    admission(Kind::Sim);
}

#[test]
fn nvml_requests_no_gpu_could_hold_are_refused_and_flags_cannot_widen_the_claim() {
    admission(Kind::Nvml);
}

fn admission(kind: Kind) {
    let sim = Gpus::new(kind, 1, "");
    let d = daemon(&sim);
    let o = d.ctl(&[
        "spawn",
        "--policy",
        &policy(&d),
        "--gpus",
        "2",
        "two",
        "--",
        "true",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--gpus 2 exceeds"), "{err}");
    // The built-in gpu policy grants 8 GiB; 12 GiB is more than the claim.
    let o = d.ctl(&[
        "spawn",
        "--policy",
        "gpu",
        "--gpu-vram",
        "12G",
        "big",
        "--",
        "true",
    ]);
    assert!(!o.status.success());
    // A claim of 16 GiB on a 16 GiB GPU fits; 2 devices of a 1-GPU host never do.
    let mut t = std::fs::read_to_string(policy(&d)).unwrap();
    t = t
        .replace("count = 1", "count = 2")
        .replace("name = \"gpu5\"", "name = \"gpu5x2\"");
    std::fs::write(d.ws.path().join("gpu5x2.toml"), t).unwrap();
    let p2 = d.ws.path().join("gpu5x2.toml").display().to_string();
    let o = d.ctl(&["spawn", "--policy", &p2, "pair", "--", "true"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("GPU request refused") && err.contains("asks for 2 GPUs"),
        "{err}"
    );
}

#[test]
fn the_queue_survives_a_daemon_crash() {
    crash(Kind::Sim);
}

#[test]
fn nvml_the_queue_survives_a_daemon_crash() {
    crash(Kind::Nvml);
}

fn crash(kind: Kind) {
    let sim = Gpus::new(kind, 1, "preemption = false");
    let mut d = daemon(&sim);
    spawn(&d, "runner", "12G", 0);
    wait_state(&d, "runner", &["ready"]);
    spawn(&d, "waiter", "12G", 0);
    let before = d.json(&["gpu", "queue", "--json"]);
    d.kill9();
    d.launch();
    wait_state(&d, "waiter", &["queued"]);
    let after = d.json(&["gpu", "queue", "--json"]);
    assert_eq!(
        after["queue"][0]["request"]["enqueued_ms"], before["queue"][0]["request"]["enqueued_ms"],
        "{before} / {after}"
    );
    let ls = d.json(&["gpu", "ls", "--json"]);
    assert_eq!(
        ls["devices"][0]["leases"][0]["agent"], "runner",
        "the running lease is held: {ls}"
    );
    release(&d, "runner");
    wait_state(&d, "waiter", &["ready"]);
    release(&d, "waiter");
}

/// agents/gpu-worker (docs/agents.md) under the built-in `gpu` policy: it gets its lease,
/// sees its node and CUDA_VISIBLE_DEVICES, and opens the node.
#[test]
fn the_example_gpu_worker_gets_and_uses_its_lease() {
    worker(Kind::Sim);
}

#[test]
fn nvml_the_example_gpu_worker_gets_and_uses_its_lease() {
    worker(Kind::Nvml);
}

fn worker(kind: Kind) {
    let sim = Gpus::new(kind, 1, "");
    let d = daemon(&sim);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = d.ws.path().join("agents/gpu-worker");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        repo.join("agents/gpu-worker.toml"),
        d.ws.path().join("agents/gpu-worker.toml"),
    )
    .unwrap();
    std::fs::copy(
        repo.join("agents/gpu-worker/agent.py"),
        dir.join("agent.py"),
    )
    .unwrap();
    std::fs::copy(repo.join("runtime/python/aither.py"), dir.join("aither.py")).unwrap();
    d.ok(&["spawn", "--json", "-f", "agents/gpu-worker.toml"]);
    wait_state(&d, "gpu-worker", &["ready"]);
    let mut line = None;
    let ok = poll_until(WAIT, || {
        line = d
            .ok(&["logs", "gpu-worker"])
            .lines()
            .find_map(|l| l.strip_prefix("GPU-LEASE ").map(str::to_string));
        line.is_some()
    });
    assert!(ok, "{}", d.ok(&["logs", "gpu-worker"]));
    let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
    assert_eq!(v["lease"]["granted"], true, "{v}");
    assert_eq!(v["lease"]["devices"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["lease"]["devices"][0]["vram_mb"], 1024, "{v}");
    assert_eq!(
        v["cuda_visible_devices"], v["lease"]["visible_devices"],
        "{v}"
    );
    assert_eq!(
        v["nodes"]["/dev/nvidia0"],
        serde_json::json!({"exists": true, "opens": leased_opens(&sim, 0) == "open"}),
        "{v}"
    );
    d.ok(&["rm", "--force", "gpu-worker"]);
}

/// NVML's "not available" (`UsedGpuMemory::Unavailable`) is unknown, not 0: `stats` and
/// `gpu ls` say so, the known part still counts, and an unknown reading alone evicts no one
/// (docs/gpu.md "What the scheduler guarantees"). Use by a pid of no agent is drift.
#[test]
fn nvml_use_the_driver_does_not_report_is_unknown_and_evicts_no_one() {
    let gpus = Gpus::nvml(2, "preemption = false");
    let d = daemon(&gpus);
    spawn(&d, "quiet", "4G", 0);
    spawn(&d, "loud", "4G", 0);
    wait_state(&d, "quiet", &["ready"]);
    wait_state(&d, "loud", &["ready"]);
    let quiet_dev = stats(&d, "quiet")["gpu"]["devices"][0]["index"]
        .as_u64()
        .unwrap() as u32;
    let loud_dev = stats(&d, "loud")["gpu"]["devices"][0]["index"]
        .as_u64()
        .unwrap() as u32;
    gpus.use_vram(&d, "quiet", quiet_dev, None);
    // A process of no agent (this test's own pid) on the same device: drift.
    gpus.append(&format!("proc {quiet_dev} {} 300\n", std::process::id()));
    assert!(
        poll_until(WAIT, || stats(&d, "quiet")["gpu"]["devices"][0]
            ["used_unknown"]
            == true),
        "{}",
        stats(&d, "quiet")
    );
    let table = d.ok(&["stats", "--no-stream", "quiet"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("quiet") && l.ends_with(&format!("{quiet_dev}:?/4G"))),
        "{table}"
    );
    let ls = d.json(&["gpu", "ls", "--json"]);
    let q = &ls["devices"][quiet_dev as usize];
    assert_eq!(
        (&q["used_unknown"], &q["foreign_mb"]),
        (&1.into(), &300.into()),
        "{ls}"
    );
    assert!(
        d.ok(&["gpu", "ls"]).contains("+?"),
        "{}",
        d.ok(&["gpu", "ls"])
    );
    // Overuse by the other agent is still seen and evicts it; by then several readings have
    // left the unknown one running.
    gpus.use_vram(&d, "loud", loud_dev, Some(5000));
    wait_state(&d, "loud", &["exited", "failed"]);
    assert_eq!(state(&d, "quiet"), "ready", "unknown use evicts no one");
    // Known use beside the unknown still counts: over the reservation, evicted.
    gpus.use_vram(&d, "quiet", quiet_dev, Some(5000));
    wait_state(&d, "quiet", &["exited", "failed"]);
    let v = d.json(&["inspect", "--json", "quiet"]);
    assert!(
        v["last_exit"].as_str().unwrap_or("").contains("evicted"),
        "{v}"
    );
}

/// A device that falls off the bus (NVML_ERROR_GPU_IS_LOST): the daemon keeps running and keeps
/// reading the other device, `gpu ls` and the event stream say it is lost, and no new lease goes
/// to it.
#[test]
fn nvml_a_vanished_device_takes_no_new_lease_and_the_daemon_carries_on() {
    let gpus = Gpus::nvml(2, "preemption = false");
    let d = daemon(&gpus);
    spawn(&d, "first", "10G", 0);
    wait_state(&d, "first", &["ready"]);
    let on = stats(&d, "first")["gpu"]["devices"][0]["index"]
        .as_u64()
        .unwrap() as u32;
    let other = 1 - on;
    gpus.append(&format!("gone {other}\n"));
    assert!(
        poll_until(WAIT, || d.json(&["gpu", "ls", "--json"])["devices"]
            [other as usize]["lost"]
            .is_string()),
        "{}",
        d.ok(&["gpu", "ls", "--json"])
    );
    let ls = d.json(&["gpu", "ls", "--json"]);
    assert!(
        ls["devices"][other as usize]["lost"]
            .as_str()
            .unwrap()
            .contains("fell off the bus"),
        "the driver's reason: {ls}"
    );
    let text = d.ok(&["gpu", "ls"]);
    assert!(text.contains(&format!("GPU {other} lost")), "{text}");
    assert!(events(&d)
        .iter()
        .any(|e| e["kind"] == "gpu.lost" && e["data"]["device"] == other));
    // 10 GiB fits only on the lost device: it waits.
    let second = spawn(&d, "second", "10G", 0);
    assert_eq!(second["state"], "queued", "{second}");
    // The live device is still read: overuse there evicts.
    gpus.use_vram(&d, "first", on, Some(12000));
    wait_state(&d, "first", &["exited", "failed"]);
    wait_state(&d, "second", &["ready"]);
    let s = stats(&d, "second");
    assert_eq!(s["gpu"]["devices"][0]["index"], on, "{s}");
    release(&d, "second");
}

/// A driver that fails at init: aitherd runs without GPUs and says why; a GPU claim is refused
/// with that reason.
#[test]
fn nvml_a_driver_that_fails_at_init_leaves_the_daemon_running_without_gpus() {
    let gpus = Gpus::nvml(1, "");
    gpus.append("init fail 9\n");
    let d = daemon(&gpus);
    let ls = d.json(&["gpu", "ls", "--json"]);
    assert_eq!(ls["backend"], "none", "{ls}");
    let note = ls["note"].as_str().unwrap_or("");
    let lib = gpus.dir().join("libnvidia-ml.so.1").display().to_string();
    assert!(note.contains("NVML") && note.contains(&lib), "{ls}");
    assert!(
        d.ok(&["gpu", "ls"]).contains(note),
        "the table says why too"
    );
    // doctor asks the daemon and says so.
    let doc = doctor(&d);
    assert!(
        doc.contains("GPU service (aitherd)") && doc.contains(&format!("none: no GPUs: {note}")),
        "{doc}"
    );
    // The setting is aitherd.toml's, shown with its source.
    let c = d.json(&["daemon", "config", "--json"]);
    assert_eq!(c["config"]["gpu"]["nvml_library"], lib.as_str(), "{c}");
    assert_eq!(c["sources"]["gpu.nvml_library"], "file", "{c}");
    let o = d.ctl(&["spawn", "--policy", "gpu", "wants-gpu", "--", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("GPU request refused") && err.contains(note),
        "the refusal names the reason: {err}"
    );
    // Agents without a GPU claim run as ever.
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        "strict",
        "--restart",
        "never",
        "plain",
        "--",
        "true",
    ]);
    wait_state(&d, "plain", &["exited"]);
}

/// aitherd loads code from `gpu.nvml_library` into a root process: a library group or others
/// could write is refused, with the reason, and the daemon runs without GPUs.
#[test]
fn nvml_a_library_others_can_write_is_not_loaded() {
    let gpus = Gpus::nvml(1, "");
    let lib = gpus.dir().join("libnvidia-ml.so.1");
    std::fs::set_permissions(&lib, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let d = daemon(&gpus);
    let ls = d.json(&["gpu", "ls", "--json"]);
    assert_eq!(ls["backend"], "none", "{ls}");
    let note = ls["note"].as_str().unwrap_or("");
    assert!(
        note.contains("gpu.nvml_library") && note.contains("mode 0666"),
        "{ls}"
    );
}

/// Prints what each path given answers when opened read-write inside the sandbox, with the
/// lease, then waits for `release-<name>`.
const MIG_AGENT: &str = r#"
import json, os, sys, time
import aither
ch = aither.Channel.from_env()
lease = ch.gpu_lease()
def opens(p):
    try:
        os.close(os.open(p, os.O_RDWR)); return "open"
    except OSError as e:
        return os.strerror(e.errno)
print("MIG " + json.dumps({"devices": [d.node for d in lease.devices], "uuids": [d.uuid for d in lease.devices], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "seen": {p: opens(p) for p in sys.argv[1:]}}), flush=True)
ch.ready()
name = os.environ["AITHER_AGENT"]
while not os.path.exists("release-" + name):
    time.sleep(0.05)
"#;

/// The character major the test's nvidia-caps stand-ins get: one this host's kernel gives no
/// driver (so an allowed open answers ENXIO, as a leased GPU node does without a driver).
fn free_major() -> u32 {
    let devices = std::fs::read_to_string("/proc/devices").unwrap();
    let used: Vec<u32> = devices
        .lines()
        .take_while(|l| !l.starts_with("Block"))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    (234..=254)
        .rev()
        .find(|m| !used.contains(m))
        .expect("a free character major in 234-254")
}

/// GPU 1 of the mock in MIG mode with two 1g.10gb instances (GPU instances 1 and 2, compute
/// instance 0 each), their mig-minors (12/13, 21/22), /proc/devices with an nvidia-caps major
/// and the caps stand-in nodes.
fn mig_layout(gpus: &Gpus) {
    let root = gpus.dir();
    let caps = free_major();
    gpus.append("mig 1 1\nmigdev 1 MIG-mock-1-1 1 0 9984 1\nmigdev 1 MIG-mock-1-2 2 0 9984 1\n");
    std::fs::create_dir_all(root.join("proc/driver/nvidia-caps")).unwrap();
    std::fs::write(
        root.join("proc/driver/nvidia-caps/mig-minors"),
        "config 1\nmonitor 2\ngpu1/gi1/access 12\ngpu1/gi1/ci0/access 13\n\
         gpu1/gi2/access 21\ngpu1/gi2/ci0/access 22\n",
    )
    .unwrap();
    std::fs::write(
        root.join("proc/devices"),
        format!("Character devices:\n195 nvidia\n{caps} nvidia-caps\n\nBlock devices:\n"),
    )
    .unwrap();
    std::fs::create_dir(root.join("dev/nvidia-caps")).unwrap();
    for m in [12, 13, 21, 22] {
        mknod(
            &root.join(format!("dev/nvidia-caps/nvidia-cap{m}")),
            caps,
            m,
        );
    }
}

/// MIG on NVML: GPU 1 is in MIG mode with two 1g.10gb instances. Each instance is a device of
/// its own (numbered after the whole GPUs), leased to one agent at a time by a claim that asks
/// for its profile; the lease binds and allows the GPU's node and the instance's nvidia-caps
/// access nodes (GPU instance and compute instance), nothing of the other instance; a claim
/// without a profile gets a whole GPU; a profile the host lacks is refused.
#[test]
fn nvml_mig_instances_are_leased_by_profile_with_their_caps_nodes() {
    let gpus = Gpus::nvml(2, "preemption = false");
    mig_layout(&gpus);
    let root = gpus.dir();
    let d = daemon(&gpus);
    std::fs::write(d.ws.path().join("mig.py"), MIG_AGENT).unwrap();
    let ls = d.json(&["gpu", "ls", "--json"]);
    let devs = ls["devices"].as_array().unwrap();
    assert_eq!(
        devs.len(),
        3,
        "GPU 0 whole, GPU 1 as its two instances: {ls}"
    );
    assert_eq!(
        (&devs[0]["index"], &devs[0]["mig"]),
        (&0.into(), &Value::Null),
        "{ls}"
    );
    for (dv, gi) in devs[1..].iter().zip([1, 2]) {
        assert_eq!(dv["mig"]["profile"], "1g.10gb", "{ls}");
        assert_eq!(dv["mig"]["parent"], 1, "{ls}");
        assert_eq!(dv["mig"]["gpu_instance"], gi, "{ls}");
        assert_eq!(dv["total_mb"], 9984, "{ls}");
    }
    assert_eq!(
        devs[1]["index"], 2,
        "instances are numbered after the whole GPUs: {ls}"
    );
    // A policy whose claim asks for a 1g.10gb instance (8 GiB of its 9.75).
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/gpu.toml"))
            .unwrap();
    let mig_policy = |name: &str, profile: &str| {
        let p = d.ws.path().join(format!("{name}.toml"));
        let t = text
            .replace("name = \"gpu\"", &format!("name = \"{name}\""))
            .replace(
                "vram_mb = 8192",
                &format!("vram_mb = 8192\nmig_profile = \"{profile}\""),
            );
        std::fs::write(&p, t).unwrap();
        p.display().to_string()
    };
    let p1g = mig_policy("mig1g", "1g.10gb");
    let paths = [
        "/dev/nvidia0",
        "/dev/nvidia1",
        "/dev/nvidia-caps/nvidia-cap12",
        "/dev/nvidia-caps/nvidia-cap13",
        "/dev/nvidia-caps/nvidia-cap21",
        "/dev/nvidia-caps/nvidia-cap22",
    ];
    let spawn_mig = |name: &str, policy: &str| -> Value {
        let mut args = vec![
            "spawn",
            "--json",
            "--policy",
            policy,
            "--restart",
            "never",
            name,
            "--",
            "python3",
            "-u",
            "mig.py",
        ];
        args.extend(paths);
        d.json(&args)
    };
    let mig_line = |name: &str| -> Value {
        let mut line = None;
        let ok = poll_until(WAIT, || {
            line = d
                .ok(&["logs", name])
                .lines()
                .find_map(|l| l.strip_prefix("MIG ").map(str::to_string));
            line.is_some()
        });
        assert!(ok, "{name}: {}", d.ok(&["logs", name]));
        serde_json::from_str(&line.unwrap()).unwrap()
    };
    spawn_mig("mig-a", &p1g);
    wait_state(&d, "mig-a", &["ready"]);
    let a = mig_line("mig-a");
    assert_eq!(a["uuids"], serde_json::json!(["MIG-mock-1-1"]), "{a}");
    assert_eq!(a["cuda"], "MIG-mock-1-1", "{a}");
    assert_eq!(a["devices"], serde_json::json!(["/dev/nvidia1"]), "{a}");
    let host = |rel: &str| host_open(&root.join(rel));
    let seen = &a["seen"];
    assert_eq!(seen["/dev/nvidia1"], host("dev/nvidia1").as_str(), "{a}");
    assert_eq!(
        seen["/dev/nvidia-caps/nvidia-cap12"],
        host("dev/nvidia-caps/nvidia-cap12").as_str(),
        "its GPU instance's access node: {a}"
    );
    assert_eq!(
        seen["/dev/nvidia-caps/nvidia-cap13"],
        host("dev/nvidia-caps/nvidia-cap13").as_str(),
        "its compute instance's access node: {a}"
    );
    for other in [
        "/dev/nvidia0",
        "/dev/nvidia-caps/nvidia-cap21",
        "/dev/nvidia-caps/nvidia-cap22",
    ] {
        assert_eq!(seen[other], "No such file or directory", "{other}: {a}");
    }
    // The other instance to the next; a third waits (one agent per instance).
    spawn_mig("mig-b", &p1g);
    wait_state(&d, "mig-b", &["ready"]);
    let b = mig_line("mig-b");
    assert_eq!(b["uuids"], serde_json::json!(["MIG-mock-1-2"]), "{b}");
    assert_eq!(
        b["seen"]["/dev/nvidia-caps/nvidia-cap22"],
        host("dev/nvidia-caps/nvidia-cap22").as_str(),
        "{b}"
    );
    assert_eq!(
        b["seen"]["/dev/nvidia-caps/nvidia-cap12"], "No such file or directory",
        "{b}"
    );
    let c = spawn_mig("mig-c", &p1g);
    assert_eq!(c["state"], "queued", "{c}");
    // A claim without a profile: the whole GPU 0.
    spawn(&d, "whole", "8G", 0);
    wait_state(&d, "whole", &["ready"]);
    assert_eq!(stats(&d, "whole")["gpu"]["devices"][0]["index"], 0);
    // A profile this host lacks is refused at once, with the reason.
    let p7g = mig_policy("mig7g", "7g.80gb");
    let o = d.ctl(&["spawn", "--policy", &p7g, "big", "--", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("MIG instances of profile 7g.80gb but this host has 0"),
        "{err}"
    );
    // An instance frees: the waiter gets it.
    release(&d, "mig-a");
    wait_state(&d, "mig-c", &["ready"]);
    assert_eq!(
        mig_line("mig-c")["uuids"],
        serde_json::json!(["MIG-mock-1-1"])
    );
    for n in ["mig-b", "mig-c", "whole"] {
        release(&d, n);
    }
}
