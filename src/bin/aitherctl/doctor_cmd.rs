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
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    report.exit_code()
}
