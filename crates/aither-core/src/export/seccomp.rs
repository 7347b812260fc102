//! The seccomp profile in the OCI runtime spec's JSON (`linux.seccomp`), which is also the
//! format of Docker, containerd and CRI-O localhost profiles (Kubernetes `seccompProfile`).
//!
//! Built from [`crate::sandbox::seccomp::rules`], the same parsed and checked rules the BPF
//! compiler uses, so the syscall set cannot drift. Default action EPERM; `enosys` names get
//! their own ENOSYS rule.
//!
//! libseccomp (under crun and runc) ANDs the conditions of one rule but rejects, or (runc)
//! ORs, two conditions on the same argument. So each rule emitted here has at most one
//! condition per argument, and:
//! - an `any_of` group becomes one rule per condition (OR);
//! - an `all_of` group becomes one rule holding all its conditions, when they name distinct
//!   arguments and compare for equality;
//! - an `all_of` group of "not equal" conditions on one argument (ioctl: not TIOCSTI, not
//!   TIOCLINUX) becomes the complement of those values as masked-equality prefix blocks, one
//!   rule each (about 32 per value).
//!
//! A `dword` condition compares the low 32 bits, as the kernel truncates an `int` argument
//! (and as our BPF does): it is emitted as SCMP_CMP_MASKED_EQ with a 32-bit mask, so that
//! 0x1_0000_5412 cannot pass for an allowed ioctl.

use serde_json::{json, Value};

use super::ExportError;
use crate::sandbox::seccomp::{self, ArgType, Cond, Op};

#[cfg(target_arch = "x86_64")]
const SCMP_ARCH: &str = "SCMP_ARCH_X86_64";
#[cfg(target_arch = "aarch64")]
const SCMP_ARCH: &str = "SCMP_ARCH_AARCH64";

const LOW32: u64 = 0xffff_ffff;

fn masked_eq(index: u8, mask: u64, value: u64) -> Value {
    json!({"index": index, "value": mask, "valueTwo": value & mask, "op": "SCMP_CMP_MASKED_EQ"})
}

/// A positive condition (eq, masked_eq) as one OCI argument comparison.
fn positive(c: &Cond) -> Option<Value> {
    let width = match c.ty {
        ArgType::Dword => LOW32,
        ArgType::Qword => u64::MAX,
    };
    match c.op {
        Op::Eq if c.ty == ArgType::Qword => {
            Some(json!({"index": c.index, "value": c.val, "op": "SCMP_CMP_EQ"}))
        }
        Op::Eq => Some(masked_eq(c.index, width, c.val)),
        Op::MaskedEq(m) => Some(masked_eq(c.index, m & width, c.val)),
        Op::Ne => None,
    }
}

/// Prefix blocks (mask, value) over the low 32 bits covering every value except `excluded`.
fn complement(excluded: &[u32]) -> Vec<(u64, u64)> {
    fn walk(prefix: u64, depth: u32, points: &[u32], out: &mut Vec<(u64, u64)>) {
        if points.is_empty() {
            let mask = if depth == 0 {
                0
            } else {
                (LOW32 << (32 - depth)) & LOW32
            };
            out.push((mask, prefix));
            return;
        }
        if depth == 32 {
            return; // the excluded value itself
        }
        let bit = 31 - depth;
        for b in [0u64, 1] {
            let sub: Vec<u32> = points
                .iter()
                .copied()
                .filter(|p| u64::from((p >> bit) & 1) == b)
                .collect();
            walk(prefix | (b << bit), depth + 1, &sub, out);
        }
    }
    let mut pts = excluded.to_vec();
    pts.sort_unstable();
    pts.dedup();
    let mut out = Vec::new();
    walk(0, 0, &pts, &mut out);
    out
}

fn rule(names: &[String], args: Vec<Value>) -> Value {
    if args.is_empty() {
        json!({"names": names, "action": "SCMP_ACT_ALLOW"})
    } else {
        json!({"names": names, "action": "SCMP_ACT_ALLOW", "args": args})
    }
}

/// The OCI `linux.seccomp` object for a built-in profile.
pub fn oci_profile(profile: &str) -> Result<Value, ExportError> {
    let rules = seccomp::rules(profile)?;
    let fail = |detail: String| ExportError::SeccompFormat {
        profile: profile.to_string(),
        detail,
    };
    let mut syscalls = Vec::new();
    for r in &rules.allow {
        if r.conds.is_empty() {
            syscalls.push(rule(&r.names, vec![]));
        } else if r.any {
            for c in &r.conds {
                let arg = positive(c)
                    .ok_or_else(|| fail(format!("{:?}: \"ne\" inside any_of", r.names)))?;
                syscalls.push(rule(&r.names, vec![arg]));
            }
        } else if r.conds.iter().all(|c| c.op == Op::Ne) {
            let index = r.conds[0].index;
            if r.conds
                .iter()
                .any(|c| c.index != index || c.ty != ArgType::Dword)
            {
                return Err(fail(format!(
                    "{:?}: \"ne\" conditions must all be dword on one argument",
                    r.names
                )));
            }
            let excluded: Vec<u32> = r.conds.iter().map(|c| c.val as u32).collect();
            for (mask, value) in complement(&excluded) {
                syscalls.push(rule(&r.names, vec![masked_eq(index, mask, value)]));
            }
        } else {
            let mut args = Vec::new();
            for (i, c) in r.conds.iter().enumerate() {
                if r.conds[..i].iter().any(|o| o.index == c.index) {
                    return Err(fail(format!(
                        "{:?}: two conditions on argument {}",
                        r.names, c.index
                    )));
                }
                args.push(positive(c).ok_or_else(|| {
                    fail(format!("{:?}: \"ne\" mixed with other conditions", r.names))
                })?);
            }
            syscalls.push(rule(&r.names, args));
        }
    }
    if !rules.enosys.is_empty() {
        syscalls.push(json!({
            "names": rules.enosys,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::ENOSYS,
        }));
    }
    Ok(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "architectures": [SCMP_ARCH],
        "syscalls": syscalls,
    }))
}

#[cfg(test)]
pub(crate) fn complement_for_tests(excluded: &[u32]) -> Vec<(u64, u64)> {
    complement(excluded)
}
