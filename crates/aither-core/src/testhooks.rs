//! Test switches: environment variables that point Aither at fake roots or inject faults so
//! that the test suites can exercise code paths a real host cannot (cgroup v2 on a hybrid
//! host, a failing launch stage, simulated GPUs, a private cache). Each of them changes what
//! is enforced, so they are **compiled out of release builds** (`cfg(debug_assertions)`;
//! install.sh builds with `--release`): there [`var_os`] answers `None` whatever the
//! environment says. In a debug build, every switch in force is named in the enforcement
//! report (`overrides`) and in the audit stream ([`in_force`]).
//!
//! Configuration that belongs to the root caller (AITHER_POLICY_DIR, AITHER_STATE_DIR,
//! AITHER_SOCKET, AITHER_AUDIT_LOG) is not a test switch: it is documented in the README and
//! read in every build.

use std::ffi::OsString;

/// Every test switch. A name not listed here cannot be read through [`var_os`].
pub const SWITCHES: &[&str] = &[
    "AITHER_CGROUP_MODE",
    "AITHER_CGROUP_ROOT",
    "AITHER_HOST_ROOT",
    "AITHER_TEST_FAIL_STAGE",
    "AITHER_GPUS",
    "AITHER_GPU_ROOT",
    "AITHER_CACHE_DIR",
    "AITHER_INIT",
];

/// Whether this build honours test switches (debug builds only).
pub const ENABLED: bool = cfg!(debug_assertions);

/// The value of the test switch `name` (non-empty), or `None`: always `None` in a release
/// build.
pub fn var_os(name: &str) -> Option<OsString> {
    gated(ENABLED, name, |n| std::env::var_os(n))
}

/// [`var_os`] for a build that does (`enabled`) or does not honour switches.
fn gated(enabled: bool, name: &str, env: impl Fn(&str) -> Option<OsString>) -> Option<OsString> {
    assert!(
        SWITCHES.contains(&name),
        "{name} is not a listed test switch"
    );
    if !enabled {
        return None;
    }
    env(name).filter(|v| !v.is_empty())
}

/// [`var_os`] as UTF-8 (a non-UTF-8 value counts as unset).
pub fn var(name: &str) -> Option<String> {
    var_os(name).and_then(|v| v.into_string().ok())
}

/// The switches in force in this process, as `NAME=value`, for the enforcement report and the
/// audit stream. Empty in a release build.
pub fn in_force() -> Vec<String> {
    SWITCHES
        .iter()
        .filter_map(|n| var_os(n).map(|v| format!("{n}={}", v.to_string_lossy())))
        .collect()
}

/// Test switches set in the environment of a release build, which ignores them (for a warning,
/// so that nobody believes a switch is in effect).
pub fn ignored() -> Vec<&'static str> {
    if ENABLED {
        return Vec::new();
    }
    SWITCHES
        .iter()
        .copied()
        .filter(|n| std::env::var_os(n).is_some_and(|v| !v.is_empty()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_switches_are_readable() {
        let r = std::panic::catch_unwind(|| var_os("AITHER_SOMETHING_ELSE"));
        assert!(r.is_err());
    }

    #[test]
    fn a_build_without_switches_ignores_the_environment() {
        let env = |n: &str| (n == "AITHER_HOST_ROOT").then(|| OsString::from("/fake"));
        // What a release build does (`ENABLED` is `cfg!(debug_assertions)`).
        assert_eq!(gated(false, "AITHER_HOST_ROOT", env), None);
        // What a debug build does.
        assert_eq!(
            gated(true, "AITHER_HOST_ROOT", env),
            Some(OsString::from("/fake"))
        );
        assert_eq!(gated(true, "AITHER_GPUS", env), None);
    }
}
