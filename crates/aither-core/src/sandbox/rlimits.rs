//! Resource limits, set while the sandbox's pid 1 still holds its capabilities: raising a hard
//! limit inside a user namespace fails later (docs/architecture.md, "Pitfalls others hit").

use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use super::spec::SandboxSpec;

/// Sets soft = hard = `value`, or the current hard limit when that is lower: the policy's
/// number is a ceiling, and a lower one inherited from the caller is only narrower.
fn set(resource: Resource, value: u64) -> io::Result<()> {
    let (_, hard) = getrlimit(resource)?;
    let value = value.min(hard);
    Ok(setrlimit(resource, value, value)?)
}

/// Applies the spec's limits (soft = hard).
pub fn apply(spec: &SandboxSpec) -> io::Result<()> {
    set(Resource::RLIMIT_NOFILE, spec.rlimit_nofile)?;
    set(Resource::RLIMIT_CORE, spec.rlimit_core)?;
    if let Some(n) = spec.rlimit_nproc {
        set(Resource::RLIMIT_NPROC, n)?;
    }
    if let Some(n) = spec.rlimit_fsize {
        set(Resource::RLIMIT_FSIZE, n)?;
    }
    Ok(())
}
