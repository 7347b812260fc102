//! Pure cgroup v2 under systemd: sandboxes in the cgroup systemd delegated to us.
//!
//! systemd owns the cgroup tree where it is pid 1; a unit with `Delegate=yes` owns its own
//! cgroup and everything below it. aitherd's unit (scripts/aitherd.service) also has
//! `DelegateSubgroup=supervisor` (systemd ≥ 254): systemd starts aitherd in the leaf
//! `<unit>/supervisor`, and aitherd builds its sandboxes in `<unit>/aither/<id>`, with the
//! controllers enabled in `<unit>` and `<unit>/aither` only. The unit's cgroup itself never
//! holds a process, so enabling controllers there is allowed (the no-internal-process rule),
//! and a restarted aitherd is again started in the leaf; the shims it forks are born there
//! and find the same subtree from it (docs/kernels.md, "cgroups").
//!
//! aitherd started in a delegated cgroup itself (systemd 251-253, which cannot start a main
//! process in a subgroup) keeps the top-level subtree: were it to enable controllers in its
//! unit's cgroup, systemd could not start it there again (EBUSY) while agents run.
//!
//! A cgroup counts as delegated only when it says so: systemd ≥ 251 marks the cgroup of a unit
//! with `Delegate=yes` with the extended attribute `trusted.delegate` (`user.delegate` for a
//! user manager) = "1". It must also be writable by this process and list the limit
//! controllers (memory, cpu, pids) in `cgroup.controllers`. Anything else (the root cgroup,
//! a login session, an older systemd without the mark, v1 or hybrid) keeps the top-level
//! subtree, and `Placement::TopLevel` says why (doctor prints it).
//!
//! Every other launcher where systemd is pid 1 on pure v2 (`aitherctl run` without the daemon,
//! and the shims of an aitherd that sits in no delegated leaf: systemd 251-253 with the unit's
//! own cgroup, older systemd, aitherd started by hand) re-executes itself in a transient scope
//! of its own with `Delegate=yes` in `aither.slice` (as podman's conmon does), moves itself
//! into the scope's leaf (`enter`) and so builds its sandbox's cgroup below the scope. aitherd
//! then finds its agents' cgroups in those scopes (`Placement::Scopes`), and a restarted
//! aitherd re-adopts them there: the scopes are units of their own, which stopping aitherd's
//! unit leaves alone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{CgroupError, CgroupMode};

/// The leaf a delegated cgroup's own processes move into.
pub const LEAF: &str = "supervisor";

/// The controllers a delegated cgroup must offer to be used.
pub const NEEDED: [&str; 3] = ["memory", "cpu", "pids"];

/// Where this process's sandboxes get their cgroups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Below the delegated cgroup `base` (an absolute directory under the cgroup mount).
    Delegated { base: PathBuf },
    /// systemd is pid 1 and this process sits in no delegated leaf: each launcher runs in a
    /// transient scope of its own (`<slice>/aither-<kind>-<pid>.scope`, `Delegate=yes`) and
    /// builds its sandbox's cgroup there; this process creates none itself. `slice` is the
    /// directory of `aither.slice`; `reason` says why this process is not delegated.
    Scopes { slice: PathBuf, reason: String },
    /// The top-level `aither/` subtree of each hierarchy, as before; `reason` says why.
    TopLevel { reason: String },
}

/// The slice of the transient scopes.
pub const SLICE: &str = "aither.slice";

/// The kinds of launcher that run in scopes of their own: `aitherctl run`, and aitherd's shims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    Run,
    Shim,
}

impl ScopeKind {
    fn prefix(self) -> &'static str {
        match self {
            ScopeKind::Run => "aither-run-",
            ScopeKind::Shim => "aither-shim-",
        }
    }
}

/// The cgroup2 path (`0::<path>`) of a process from its /proc/<pid>/cgroup text.
pub fn own_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Whether `dir` carries systemd's delegation mark (`trusted.delegate` or `user.delegate` =
/// "1"; systemd ≥ 251 sets it on every cgroup it delegates).
pub fn marked_delegated(dir: &Path) -> bool {
    // rustix: nix 0.30 has no xattr calls.
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let mut buf = [0u8; 8];
        matches!(rustix::fs::lgetxattr(dir, *name, &mut buf), Ok(n) if &buf[..n] == b"1")
    })
}

fn access_w(p: &Path) -> io::Result<()> {
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).map_err(io::Error::from)
}

/// Why a cgroup cannot hold the sandboxes (the placement's reason, said by `doctor` and the
/// daemon's log).
#[derive(Debug, thiserror::Error)]
pub enum NotDelegated {
    #[error("this process is in the root cgroup")]
    RootCgroup,
    #[error("unusable cgroup path {0:?}")]
    BadPath(String),
    #[error("the cgroup {0} was removed")]
    Removed(String),
    #[error("{} is not delegated (no trusted.delegate mark: not a systemd unit with Delegate=yes, or systemd older than 251)", .0.display())]
    NoMark(PathBuf),
    #[error("{} is not writable: {source}", .path.display())]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is delegated but lacks {} in cgroup.controllers ({available:?})", .dir.display(), .missing.join(" "))]
    Lacks {
        dir: PathBuf,
        missing: Vec<&'static str>,
        available: String,
    },
}

/// Checks that the cgroup `rel` (a cgroup2 path such as `/system.slice/aitherd.service`) under
/// the mount `root` was delegated to this process and can hold its sandboxes: the delegation
/// mark, writable `cgroup.procs` and `cgroup.subtree_control`, and memory, cpu and pids in
/// `cgroup.controllers`. Returns its directory, or why not.
pub fn check(root: &Path, rel: &str) -> Result<PathBuf, NotDelegated> {
    let rel = rel.trim_end_matches('\n');
    if rel == "/" || rel.is_empty() {
        return Err(NotDelegated::RootCgroup);
    }
    if !rel.starts_with('/') || rel.split('/').any(|c| c == ".." || c == ".") {
        return Err(NotDelegated::BadPath(rel.into()));
    }
    if rel.ends_with(" (deleted)") {
        return Err(NotDelegated::Removed(rel.into()));
    }
    let dir = root.join(rel.trim_start_matches('/'));
    if !marked_delegated(&dir) && !own_run_scope(&dir) {
        return Err(NotDelegated::NoMark(dir));
    }
    for f in ["cgroup.procs", "cgroup.subtree_control"] {
        let path = dir.join(f);
        access_w(&path).map_err(|source| NotDelegated::NotWritable { path, source })?;
    }
    let available = super::read_ctl(&dir, "cgroup.controllers").unwrap_or_default();
    let missing: Vec<&'static str> = NEEDED
        .iter()
        .copied()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if !missing.is_empty() {
        return Err(NotDelegated::Lacks {
            dir,
            missing,
            available,
        });
    }
    Ok(dir)
}

/// The delegated base for a process in cgroup `rel`: `rel` itself, or its parent when `rel` is
/// already the parent's `supervisor` leaf (aitherd's shims; aitherd started again in it).
pub fn base_of(root: &Path, rel: &str) -> Result<PathBuf, NotDelegated> {
    let rel = rel.trim_end_matches('\n');
    if let Some(parent) = rel.strip_suffix(&format!("/{LEAF}")) {
        if let Ok(d) = check(root, if parent.is_empty() { "/" } else { parent }) {
            return Ok(d);
        }
    }
    check(root, rel)
}

fn read_self() -> Result<String, CgroupError> {
    let p = Path::new("/proc/self/cgroup");
    fs::read_to_string(p).map_err(|source| CgroupError::Read {
        path: p.to_path_buf(),
        source,
    })
}

/// Where the sandboxes of this process go, without moving anything: delegated only when this
/// process already sits in `<base>/supervisor` of a delegated `base` (aitherd started there by
/// systemd, the shims it forks, or `aitherctl run` after `enter`). Used by every launch
/// (`super::manager`).
pub fn placement(root: &Path, mode: CgroupMode) -> Placement {
    match unscoped_placement(root, mode) {
        Placement::TopLevel { reason } if mode == CgroupMode::V2 && scopes_apply(root) => {
            Placement::Scopes {
                slice: root.join(SLICE),
                reason,
            }
        }
        p => p,
    }
}

/// Whether launchers here take transient scopes: systemd is pid 1 (pure v2 is the caller's
/// to check), this process is root (systemd-run --scope on the system manager) and the cgroup
/// root is the real one.
fn scopes_apply(root: &Path) -> bool {
    nix::unistd::geteuid().is_root() && root == Path::new(super::DEFAULT_ROOT) && systemd_booted()
}

/// `placement` without systemd's scopes: delegated, or the top-level subtree and why.
fn unscoped_placement(root: &Path, mode: CgroupMode) -> Placement {
    if mode != CgroupMode::V2 {
        return Placement::TopLevel {
            reason: "not pure cgroup v2 (v1 or hybrid): the top-level subtree of each hierarchy"
                .into(),
        };
    }
    if root != Path::new(super::DEFAULT_ROOT) {
        return Placement::TopLevel {
            reason: format!("the cgroup root {} was set explicitly", root.display()),
        };
    }
    let text = match read_self() {
        Ok(t) => t,
        Err(e) => {
            return Placement::TopLevel {
                reason: e.to_string(),
            }
        }
    };
    let Some(rel) = own_path(&text) else {
        return Placement::TopLevel {
            reason: "no cgroup2 line in /proc/self/cgroup".into(),
        };
    };
    match rel.strip_suffix(&format!("/{LEAF}")) {
        Some(parent) if !parent.is_empty() => match check(root, parent) {
            Ok(base) => Placement::Delegated { base },
            Err(e) => Placement::TopLevel {
                reason: e.to_string(),
            },
        },
        _ => match check(root, rel) {
            // Delegated, but this process runs in it: enabling controllers there would make a
            // restart impossible (systemd attaches the next aitherd to it: EBUSY).
            Ok(base) => Placement::TopLevel {
                reason: format!(
                    "{} is delegated, but this process runs in it, not in its {LEAF} leaf (DelegateSubgroup={LEAF} needs systemd >= 254)",
                    base.display()
                ),
            },
            Err(e) => Placement::TopLevel {
                reason: e.to_string(),
            },
        },
    }
}

/// Takes the delegated cgroup this process runs in (`aitherctl run` in its own transient
/// scope, which nothing else will join): creates `<base>/supervisor` and moves every process
/// of `<base>` itself into it, this one first. Afterwards `placement` answers `Delegated` here
/// and in every child. Not delegated: nothing is written, `TopLevel` with the reason.
pub fn enter(root: &Path, mode: CgroupMode) -> Result<Placement, CgroupError> {
    if mode != CgroupMode::V2 || root != Path::new(super::DEFAULT_ROOT) {
        return Ok(placement(root, mode));
    }
    let text = read_self()?;
    let Some(rel) = own_path(&text) else {
        return Ok(placement(root, mode));
    };
    let base = match base_of(root, rel) {
        Ok(b) => b,
        Err(e) => {
            return Ok(Placement::TopLevel {
                reason: e.to_string(),
            })
        }
    };
    let leaf = base.join(LEAF);
    super::mkdir_p(&leaf)?;
    let hint = " (moving into the delegated cgroup's leaf)";
    // Ourselves first: once we are out, `base` can only empty further.
    super::write_ctl(&leaf, "cgroup.procs", "0", hint)?;
    let others = super::read_ctl(&base, "cgroup.procs").unwrap_or_default();
    for pid in others.lines().map(str::trim).filter(|p| !p.is_empty()) {
        match super::write_ctl(&leaf, "cgroup.procs", pid, hint) {
            Ok(()) => {}
            // Gone meanwhile.
            Err(CgroupError::Write { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Placement::Delegated { base })
}

/// Set on the command a launcher re-executes in its transient scope: the scope's unit name.
pub const SCOPE_ENV: &str = "AITHER_SYSTEMD_SCOPE";

/// The unit name of the transient scope of the launcher of `kind` with process id `pid`.
pub fn scope_unit(kind: ScopeKind, pid: u32) -> String {
    format!("{}{pid}.scope", kind.prefix())
}

/// The subtree directories of every shim's scope under `slice` that exist: where aitherd
/// finds its agents' cgroups (`<slice>/aither-shim-<pid>.scope/aither`).
pub fn shim_subtrees(slice: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(slice) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(ScopeKind::Shim.prefix())
                    .and_then(|r| r.strip_suffix(".scope"))
                    .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .map(|e| e.path().join(super::SUBTREE))
        .filter(|d| d.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Whether systemd is pid 1 (sd_booted(3): /run/systemd/system exists).
pub fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `aitherctl run` without the daemon, where systemd is pid 1 on pure v2 and this process is
/// root and not in a delegated cgroup already: the command that re-executes `exe args` in a
/// transient scope of its own with `Delegate=yes` (`systemd-run --scope` registers its own pid
/// as the scope and execs in place: same pid, stdio, terminal and signals). None otherwise
/// (and in the re-executed process, which carries `SCOPE_ENV`).
pub fn scope_command(
    kind: ScopeKind,
    exe: &Path,
    args: &[std::ffi::OsString],
) -> Option<std::process::Command> {
    let root = super::root();
    if std::env::var_os(SCOPE_ENV).is_some()
        || super::detect(&root).ok() != Some(CgroupMode::V2)
        || !matches!(placement(&root, CgroupMode::V2), Placement::Scopes { .. })
    {
        return None;
    }
    let unit = scope_unit(kind, std::process::id());
    let mut c = std::process::Command::new("systemd-run");
    c.args(["--scope", "--quiet", "--collect", "--property=Delegate=yes"])
        .arg(format!("--slice={SLICE}"))
        .arg(format!("--unit={unit}"))
        .arg("--")
        .arg(exe)
        .args(args)
        .env(SCOPE_ENV, unit);
    Some(c)
}

/// In the re-executed `aitherctl run` (`SCOPE_ENV` set): takes the scope (`enter`) and fails
/// closed when it cannot be used: the sandbox's cgroup is then never written into a cgroup
/// systemd owns. Without `SCOPE_ENV`: `Ok(None)`, nothing done.
pub fn enter_run_scope() -> Result<Option<PathBuf>, CgroupError> {
    if std::env::var_os(SCOPE_ENV).is_none() {
        return Ok(None);
    }
    let root = super::root();
    let mode = super::detect(&root)?;
    match enter(&root, mode)? {
        Placement::Delegated { base } => Ok(Some(base)),
        Placement::TopLevel { reason } | Placement::Scopes { reason, .. } => {
            Err(CgroupError::Create {
                path: root,
                source: io::Error::other(format!(
                    "running in a systemd scope, but it cannot hold the sandbox's cgroup: {reason}"
                )),
            })
        }
    }
}

/// Why a launcher could not run in its transient scope (`into_own_scope`).
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("cannot run in a systemd scope (systemd-run): {0}")]
    Exec(io::Error),
    #[error(transparent)]
    Enter(#[from] CgroupError),
}

/// The first step of a launcher (`aitherctl run`, aitherd's shim) where systemd is pid 1:
/// re-executes this process in a transient scope of its own (`scope_command`; no return when
/// that works) or, in the re-executed process, takes the scope (`enter_run_scope`). Elsewhere
/// nothing is done.
pub fn into_own_scope(kind: ScopeKind) -> Result<(), ScopeError> {
    if let Ok(exe) = std::env::current_exe() {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        if let Some(mut c) = scope_command(kind, &exe, &args) {
            use std::os::unix::process::CommandExt;
            return Err(ScopeError::Exec(c.exec()));
        }
    }
    enter_run_scope()?;
    Ok(())
}

/// Our own transient scope stands for the delegation mark (older systemd sets none): its
/// name carries this process's pid and `scope_command` asked for `Delegate=yes`.
fn own_run_scope(dir: &Path) -> bool {
    let Some(unit) = std::env::var_os(SCOPE_ENV) else {
        return false;
    };
    let pid = std::process::id();
    [ScopeKind::Run, ScopeKind::Shim]
        .into_iter()
        .map(|k| scope_unit(k, pid))
        .any(|u| *unit == *u.as_str() && dir.file_name().and_then(|n| n.to_str()) == Some(&u))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{CgroupManager, Limits, V2};

    /// A fake cgroup2 mount with `/test.slice/aitherd.service`, its controllers listed.
    fn fake(controllers: &str, mark: bool) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpu memory pids io").unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let unit = root.path().join("test.slice/aitherd.service");
        fs::create_dir_all(&unit).unwrap();
        for (f, v) in [
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", ""),
        ] {
            fs::write(unit.join(f), v).unwrap();
        }
        if mark {
            // Tests run as root: trusted.* can be set.
            rustix::fs::setxattr(
                &unit,
                "trusted.delegate",
                b"1",
                rustix::fs::XattrFlags::empty(),
            )
            .expect("setxattr trusted.delegate");
        }
        (root, unit)
    }

    #[test]
    fn the_cgroup2_line_names_the_own_cgroup() {
        let text = "12:pids:/user.slice\n0::/system.slice/aitherd.service/supervisor\n";
        assert_eq!(
            own_path(text),
            Some("/system.slice/aitherd.service/supervisor")
        );
        assert_eq!(own_path("4:memory:/x\n"), None);
    }

    #[test]
    fn only_a_marked_writable_cgroup_with_the_limit_controllers_is_delegated() {
        let (root, unit) = fake("cpu memory pids", true);
        let rel = "/test.slice/aitherd.service";
        assert_eq!(check(root.path(), rel).unwrap(), unit.clone());
        // From the leaf (aitherd's shims), the same base.
        assert_eq!(
            base_of(root.path(), &format!("{rel}/{LEAF}")).unwrap(),
            unit
        );
        assert!(matches!(
            check(root.path(), "/"),
            Err(NotDelegated::RootCgroup)
        ));
        assert!(check(root.path(), "/test.slice/../test.slice/aitherd.service").is_err());

        let (root, _) = fake("cpu memory pids", false);
        let e = check(root.path(), rel).unwrap_err().to_string();
        assert!(
            e.contains("is not delegated (no trusted.delegate mark"),
            "{e}"
        );

        let (root, _) = fake("cpu memory", true);
        let e = check(root.path(), rel).unwrap_err().to_string();
        assert!(
            e.ends_with("lacks pids in cgroup.controllers (\"cpu memory\")"),
            "{e}"
        );
    }

    #[test]
    fn a_delegated_base_gets_controllers_enabled_in_its_own_subtree_only() {
        let (root, unit) = fake("cpu memory pids", true);
        let mgr = V2::new(unit.clone());
        let limits = Limits {
            memory: Some(64 << 20),
            swap: Some(0),
            cpu: None,
            pids: Some(32),
            devices: None,
        };
        let cg = mgr.create("a-1", &limits, &[]).unwrap();
        assert_eq!(cg.dirs[0].1, unit.join("aither/a-1"));
        assert_eq!(mgr.subtree_dirs(), vec![unit.join("aither")]);
        // The mount's root (systemd's) is never written; the unit's cgroup and aither/ are.
        assert_eq!(
            fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            ""
        );
        assert_eq!(
            fs::read_to_string(unit.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        assert_eq!(
            fs::read_to_string(unit.join("aither/a-1/pids.max")).unwrap(),
            "32"
        );
    }

    #[test]
    fn in_scopes_the_agents_are_found_in_the_shims_scopes_and_nothing_is_created_outside() {
        let root = tempfile::tempdir().unwrap();
        let slice = root.path().join(SLICE);
        for d in [
            "aither-shim-41.scope/aither/a-41",
            "aither-shim-42.scope/aither/b-42",
            // Not a shim's: `aitherctl run`'s scope and a unit someone else named alike.
            "aither-run-43.scope/aither/c-43",
            "aither-shim-x.scope/aither/d-1",
        ] {
            fs::create_dir_all(slice.join(d)).unwrap();
        }
        let mgr = V2::in_scopes(root.path().to_path_buf(), slice.clone());
        assert_eq!(
            mgr.subtree_dirs(),
            vec![
                slice.join("aither-shim-41.scope/aither"),
                slice.join("aither-shim-42.scope/aither")
            ]
        );
        assert_eq!(crate::cgroup::stats::list_ids(&mgr), vec!["a-41", "b-42"]);
        let cg = crate::cgroup::stats::open_existing(&mgr, "b-42").unwrap();
        assert_eq!(cg.dirs[0].1, slice.join("aither-shim-42.scope/aither/b-42"));
        assert!(crate::cgroup::stats::open_existing(&mgr, "c-43").is_none());

        // This process builds no sandbox cgroup itself: refused, and nothing written.
        let e = mgr
            .create("e-44", &Limits::default(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("transient scope of its own"), "{e}");
        assert!(mgr.birth_dir("e-44").unwrap().is_none());
        assert!(!root.path().join("aither").exists());
    }

    #[test]
    fn a_scope_name_is_the_launchers_kind_and_pid() {
        assert_eq!(scope_unit(ScopeKind::Run, 7), "aither-run-7.scope");
        assert_eq!(scope_unit(ScopeKind::Shim, 8), "aither-shim-8.scope");
    }
}
