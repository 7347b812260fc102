//! Resource limits, set while the sandbox's pid 1 still holds its capabilities: raising a hard
//! limit inside a user namespace fails later (docs/architecture.md, "Pitfalls others hit").

use std::io;

use super::spec::SandboxSpec;

/// Sets soft = hard = `value`, or the current hard limit when that is lower: the policy's
/// number is a ceiling, and a lower one inherited from the caller is only narrower.
fn set(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    // SAFETY: zeroed rlimit is a valid out-parameter.
    let mut cur: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into `cur`.
    if unsafe { libc::getrlimit(resource, &mut cur) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let value = value.min(cur.rlim_max);
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(resource, &lim) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Applies the spec's limits (soft = hard).
pub fn apply(spec: &SandboxSpec) -> io::Result<()> {
    set(libc::RLIMIT_NOFILE, spec.rlimit_nofile)?;
    set(libc::RLIMIT_CORE, spec.rlimit_core)?;
    if let Some(n) = spec.rlimit_nproc {
        set(libc::RLIMIT_NPROC, n)?;
    }
    if let Some(n) = spec.rlimit_fsize {
        set(libc::RLIMIT_FSIZE, n)?;
    }
    Ok(())
}
