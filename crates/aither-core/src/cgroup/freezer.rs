//! The cgroup freezer, behind `CgroupManager::freeze` / `thaw` (`aitherctl pause` / `resume`):
//! the two kernel interfaces, each a write and a bounded wait for the kernel to confirm.
//!
//! - cgroup2: `cgroup.freeze` "1" / "0"; the cgroup is frozen once `cgroup.events` reads
//!   `frozen 1`. A fatal signal still kills a frozen task, and `cgroup.kill` works frozen.
//! - v1: `freezer.state` "FROZEN" / "THAWED"; it reads `FREEZING` until every task is frozen.
//!   A frozen task does not act on SIGKILL until it is thawed: `V1::kill_all` signals, then
//!   thaws.
//!
//! A freeze that is not confirmed within the bound is undone (thawed), so that an agent is
//! never left half frozen, and reported as `FreezeTimeout`.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{keyed, read_ctl, write_ctl, CgroupError};

/// How long a freeze may take before it is given up. The kernel freezes a cgroup as soon as
/// each task reaches a safe point (microseconds to milliseconds); a task stuck in an
/// uninterruptible sleep (a hung NFS read) can hold it off indefinitely.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// Freezes the cgroup2 directory `dir` and waits until `cgroup.events` says `frozen 1`.
pub(crate) fn freeze_v2(dir: &Path, bound: Duration) -> Result<(), CgroupError> {
    if super::fs_magic(dir).ok() == Some(super::CGROUP2_SUPER_MAGIC)
        && !dir.join("cgroup.freeze").exists()
    {
        return Err(CgroupError::FreezerMissing {
            detail: format!("{} has no cgroup.freeze (Linux before 5.2)", dir.display()),
        });
    }
    write_ctl(
        dir,
        "cgroup.freeze",
        "1",
        " (cgroup.freeze needs Linux 5.2)",
    )?;
    let frozen = wait(bound, || keyed(dir, "cgroup.events", "frozen") == Some(1));
    if frozen {
        return Ok(());
    }
    let _ = thaw_v2(dir);
    Err(CgroupError::FreezeTimeout {
        path: dir.join("cgroup.events"),
        waited_ms: bound.as_millis() as u64,
        last: format!(
            "frozen {}",
            keyed(dir, "cgroup.events", "frozen").unwrap_or(0)
        ),
    })
}

/// Thaws the cgroup2 directory `dir` (no wait: a thaw takes effect at once).
pub(crate) fn thaw_v2(dir: &Path) -> Result<(), CgroupError> {
    write_ctl(dir, "cgroup.freeze", "0", "")
}

/// Whether the cgroup2 directory `dir` is frozen, or being frozen, by us.
pub(crate) fn frozen_v2(dir: &Path) -> bool {
    read_ctl(dir, "cgroup.freeze").is_ok_and(|v| v == "1")
}

/// Freezes the v1 freezer cgroup `dir` and waits until `freezer.state` reads `FROZEN`.
pub(crate) fn freeze_v1(dir: &Path, bound: Duration) -> Result<(), CgroupError> {
    write_ctl(dir, "freezer.state", "FROZEN", "")?;
    let mut last = String::new();
    let frozen = wait(bound, || {
        last = read_ctl(dir, "freezer.state").unwrap_or_default();
        last == "FROZEN"
    });
    if frozen {
        return Ok(());
    }
    let _ = thaw_v1(dir);
    Err(CgroupError::FreezeTimeout {
        path: dir.join("freezer.state"),
        waited_ms: bound.as_millis() as u64,
        last,
    })
}

/// Thaws the v1 freezer cgroup `dir`.
pub(crate) fn thaw_v1(dir: &Path) -> Result<(), CgroupError> {
    write_ctl(dir, "freezer.state", "THAWED", "")
}

/// Whether the v1 freezer cgroup `dir` is frozen or freezing.
pub(crate) fn frozen_v1(dir: &Path) -> bool {
    read_ctl(dir, "freezer.state").is_ok_and(|v| v != "THAWED")
}

/// Polls `done` until it holds or `bound` has passed, with a growing delay (100 µs to 10 ms):
/// a freeze usually completes within the first few polls.
fn wait(bound: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    let mut delay = Duration::from_micros(100);
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(10));
    }
}
