//! The MicroScheduler end to end (docs/gpu.md): a real aitherd with the simulated backend,
//! stand-in device nodes, and strict agents under the `gpu` policy. Agents that do not fit
//! together are queued and run in priority order, each sees and opens only its own node;
//! `gpu ls` / `gpu queue` show the state; preemption, overuse eviction and admission refusal
//! behave as a user would see them; the queue survives a `kill -9` of the daemon.
//!
//! The device rules themselves (EPERM for an unleased node, v1 and BPF each alone) are proven
//! in runtime/aither-init/tests/devices.rs.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::TestDaemon;
use common::poll_until;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Stand-in nodes and a gpus.toml: two simulated 16 GiB GPUs. nvidia0 has /dev/fuse's numbers
/// (c 10:229) and nvidia1 /dev/zero's (c 1:5): nodes with a driver behind them, so a leased
/// node really opens.
struct Sim {
    dir: tempfile::TempDir,
}

impl Sim {
    fn new(devices: usize, scheduler: &str) -> Sim {
        let dir = tempfile::Builder::new()
            .prefix("aither-gpu-sim")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut toml = format!("backend = \"simulated\"\n[scheduler]\n{scheduler}\n");
        for (i, (major, minor)) in [(10u32, 229u32), (1, 5)].iter().take(devices).enumerate() {
            let node = dir.path().join(format!("nvidia{i}"));
            let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
            // SAFETY: mknod of a new node in our own temporary directory.
            let rc = unsafe {
                libc::mknod(
                    c.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(*major, *minor),
                )
            };
            assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
            std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .unwrap();
            toml.push_str(&format!(
                "[[device]]\nuuid = \"GPU-sim-{i}\"\ntotal_mb = 16384\nnode = \"{}\"\n",
                node.display()
            ));
        }
        std::fs::write(dir.path().join("gpus.toml"), toml).unwrap();
        Sim { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("gpus.toml")
    }

    /// Appends simulated VRAM use of an agent (re-read at every poll).
    fn use_vram(&self, agent: &str, device: u32, used_mb: u64) {
        let mut t = std::fs::read_to_string(self.config()).unwrap();
        t.push_str(&format!(
            "[[usage]]\nagent = \"{agent}\"\ndevice = {device}\nused_mb = {used_mb}\n"
        ));
        std::fs::write(self.config(), t).unwrap();
    }
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

fn daemon(sim: &Sim) -> TestDaemon {
    let d = TestDaemon::start_env(
        "aitherd-gpu-",
        &[],
        &[
            ("AITHER_GPUS", sim.config().to_str().unwrap()),
            ("AITHER_GPU_POLL_MS", "200"),
        ],
    )
    .with_python_sdk();
    std::fs::write(d.ws.path().join("agent.py"), AGENT).unwrap();
    d
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
    let sim = Sim::new(2, "preemption = false");
    let d = daemon(&sim);
    // Both GPUs taken by holders (10 of 16 GiB each).
    spawn(&d, "holder-a", "10G", 0);
    spawn(&d, "holder-b", "10G", 0);
    wait_state(&d, "holder-a", &["ready"]);
    wait_state(&d, "holder-b", &["ready"]);
    let a = lease_line(&d, "holder-a");
    assert_eq!(a["lease"]["devices"], serde_json::json!(["/dev/nvidia0"]));
    assert_eq!(a["seen"]["nvidia0"], "open", "{a}");
    assert_eq!(
        a["seen"]["nvidia1"], "No such file or directory",
        "the other GPU's node is not in its /dev: {a}"
    );
    assert_eq!(a["cuda"], "GPU-sim-0");
    let b = lease_line(&d, "holder-b");
    assert_eq!(b["seen"]["nvidia1"], "open", "{b}");
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
    sim.use_vram("holder-a", 0, 512);
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
    assert_eq!(ls["backend"], "simulated");
    assert_eq!(ls["devices"][0]["reserved_mb"], 10240, "{ls}");
    assert_eq!(ls["devices"][0]["leases"][0]["agent"], "holder-a", "{ls}");
    assert_eq!(ls["queued"], 2);
    let text = d.ok(&["gpu", "ls"]);
    assert!(
        text.contains("GPU-sim-1") && text.contains("holder-b"),
        "{text}"
    );

    // One GPU frees: the higher class gets it, the lower keeps waiting.
    release(&d, "holder-b");
    wait_state(&d, "high", &["ready"]);
    assert_eq!(state(&d, "low"), "queued");
    let h = lease_line(&d, "high");
    assert_eq!(h["lease"]["devices"], serde_json::json!(["/dev/nvidia1"]));
    assert_eq!(h["seen"]["nvidia1"], "open");
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
    let sim = Sim::new(1, "preemption = true\npreempt_grace_ms = 2000");
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
    let sim = Sim::new(1, "preemption = false");
    let d = daemon(&sim);
    spawn(&d, "greedy", "4G", 0);
    wait_state(&d, "greedy", &["ready"]);
    sim.use_vram("greedy", 0, 4000);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(state(&d, "greedy"), "ready", "within its reservation");
    sim.use_vram("greedy", 0, 2000); // 6000 MiB in all on device 0 > 4096 reserved
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
    let sim = Sim::new(1, "");
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
    let sim = Sim::new(1, "preemption = false");
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
    let sim = Sim::new(1, "");
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
        serde_json::json!({"exists": true, "opens": true}),
        "{v}"
    );
    d.ok(&["rm", "--force", "gpu-worker"]);
}
