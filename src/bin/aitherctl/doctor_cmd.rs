//! `aitherctl doctor`.

use aither::doctor::{HostFacts, Report};
use aither::policy::Policy;
use anyhow::Context;
use clap::Args;

/// Check what this host gives, and whether each installed policy can run on it.
///
/// Reports the kernel; user namespaces (and the sysctls that restrict them); the Landlock ABI;
/// seccomp; the cgroup mode (v1, hybrid, v2), its controllers and whether Aither's subtree can
/// be created and delegated; clone3 and pidfd_open; BPF device programs; NVIDIA GPUs; and
/// whether this runs in a container (Docker, Podman, Kubernetes, LXC) or a CI runner. Then,
/// for every installed policy (the ones `aitherctl policy ls` lists), whether it can run here
/// and, if not, exactly what is missing and how to fix it: the flag, sysctl, boot parameter or
/// container option. Protections the policy lists as best-effort are reported as skipped.
///
/// The facts come from the running system: files under /proc and /sys, and a few harmless
/// system calls (a Landlock version query, clone3 and bpf calls the kernel refuses or that
/// return a descriptor closed at once, unshare in a throwaway child). AITHER_HOST_ROOT=DIR
/// reads a fake root instead (tests); the facts only a system call could tell then come from
/// DIR/aither-doctor-facts.toml (docs/doctor.md).
///
/// When aitherd answers on its socket, doctor also asks it about its GPU service: the backend
/// (NVML and the library it loaded, or why there are no GPUs: no driver, a driver that failed
/// at init), the devices, and what the MicroScheduler guarantees and what it cannot: VRAM use
/// is read every poll interval and an agent over its reservation is evicted after the fact.
///
/// Exit status: 0 when the default policy (strict) can run here; 1 when it cannot (or the
/// host could not be read); 2 on bad usage.
#[derive(Args)]
pub struct DoctorArgs {
    /// Print JSON: {"host": {...}, "policies": [{"name", "source", "valid", "runnable",
    /// "missing": [{"what", "protection", "fix"}], "best_effort_skipped": [...]}],
    /// "default_policy", "default_runnable"}.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DoctorArgs) -> i32 {
    let facts = match HostFacts::gather_default().context("reading the host") {
        Ok(f) => f,
        Err(e) => {
            crate::print_error(&e);
            return 1;
        }
    };
    let report = Report::build(facts, Policy::list());
    let service = gpu_service();
    if a.json {
        let mut v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap_or_default();
        v["gpu_service"] = service.json;
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        );
    } else {
        print!("{}", report.to_text());
        print!("{}", service.text);
    }
    report.exit_code()
}

/// What the scheduler cannot do, in doctor's words (docs/gpu.md "What the scheduler
/// guarantees").
pub const AFTER_THE_FACT: &str = "VRAM use is read once per poll interval and an agent above \
     its reservation is evicted after the fact: until then it can allocate past its share, and \
     a neighbour's allocation can fail with out-of-memory; use the driver does not report \
     (NVML \"not available\") is shown as unknown and evicts no one";

struct Service {
    json: serde_json::Value,
    text: String,
}

/// aitherd's GPU service, when aitherd answers (no error printed when it does not).
fn gpu_service() -> Service {
    use aither::daemon::client::Client;
    use aither::daemon::proto::Request;
    use serde_json::json;
    let socket = aither::daemon::socket_path();
    let reply = Client::connect(&socket)
        .map_err(|e| e.to_string())
        .and_then(|mut c| c.call(&Request::GpuLs).map_err(|e| e.to_string()))
        .and_then(|r| {
            if r.ok {
                Ok(r.data.unwrap_or_default())
            } else {
                Err(r.error.map(|e| e.message).unwrap_or_default())
            }
        });
    let v = match reply {
        Ok(v) => v,
        Err(e) => {
            return Service {
                json: json!({"reachable": false, "socket": socket, "error": e}),
                text: format!(
                    "\nGPU service: aitherd not reachable at {} ({e}); not checked\n",
                    socket.display()
                ),
            }
        }
    };
    let backend = v["backend"].as_str().unwrap_or("none").to_string();
    let devices = v["devices"].as_array().map(Vec::len).unwrap_or(0);
    let lost = v["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["lost"].is_string())
        .count();
    let poll_ms = v["poll_ms"].as_u64();
    let mut text = String::from("\nGPU service (aitherd)\n");
    let backend_line = match (v["library"].as_str(), v["note"].as_str()) {
        (_, Some(note)) if devices == 0 => format!("{backend}: no GPUs: {note}"),
        (Some(lib), _) => format!("{backend} ({lib}), {devices} devices"),
        _ => format!("{backend}, {devices} devices"),
    };
    text.push_str(&format!("  {:<14} {backend_line}\n", "backend"));
    if lost > 0 {
        text.push_str(&format!(
            "  {:<14} {lost} device(s) lost (aitherctl gpu ls): no new lease goes to them\n",
            "lost"
        ));
    }
    if devices > 0 {
        text.push_str(&format!(
            "  {:<14} {} ms\n  {:<14} {AFTER_THE_FACT}\n",
            "poll interval",
            poll_ms.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            "eviction",
        ));
    }
    Service {
        json: json!({"reachable": true, "backend": backend, "library": v["library"],
                     "note": v["note"], "devices": devices, "lost": lost, "poll_ms": poll_ms,
                     "eviction": "after the fact", "guarantee": AFTER_THE_FACT}),
        text,
    }
}
