//! `AITHER_TRACE_LAUNCH=1`: microseconds of each step before the launcher starts, on stderr, in
//! the launcher's trace format (`aither-trace: WHO NAME total step`, docs/performance.md,
//! "Launch budget"). `total` counts from the process's start when the caller says when that
//! was (`AITHER_TRACE_T0`: CLOCK_MONOTONIC nanoseconds read just before its `execve`, as
//! scripts/bench/launch-ab.sh does), else from `start()`; `step` from the previous mark.
//!
//! Off (one cached environment lookup) unless the variable is exactly `1`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::sandbox::channel::now_ns;

static ON: OnceLock<bool> = OnceLock::new();
static ORIGIN: AtomicU64 = AtomicU64::new(0);
static LAST: AtomicU64 = AtomicU64::new(0);

/// Whether `AITHER_TRACE_LAUNCH=1`.
pub fn enabled() -> bool {
    *ON.get_or_init(|| std::env::var_os("AITHER_TRACE_LAUNCH").is_some_and(|v| v == "1"))
}

/// The first mark: called first thing in `main`. With `AITHER_TRACE_T0` it prints the time
/// from the caller's `execve` to here (the dynamic loader, relocations, libc and Rust start-up).
pub fn start() {
    start_as("ctl");
}

/// `start` for a process other than aitherctl (`who` names it in the first line). aitherd
/// calls it: with `AITHER_TRACE_T0=1` its totals are CLOCK_MONOTONIC itself, comparable with
/// a client's (scripts/bench/launch-ab.sh lines the two up).
pub fn start_as(who: &str) {
    if !enabled() {
        return;
    }
    let now = now_ns();
    let t0 = std::env::var("AITHER_TRACE_T0")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&t| t <= now);
    ORIGIN.store(t0.unwrap_or(now), Ordering::Relaxed);
    LAST.store(t0.unwrap_or(now), Ordering::Relaxed);
    if t0.is_some() {
        mark(who, "exec→main");
    }
}

/// Prints the line for the step that ends now.
pub fn mark(who: &str, name: &str) {
    if !enabled() {
        return;
    }
    let now = now_ns();
    let origin = ORIGIN.load(Ordering::Relaxed);
    let last = LAST.swap(now, Ordering::Relaxed);
    if origin == 0 {
        // start() was not called (a library user): totals count from the first mark.
        ORIGIN.store(now, Ordering::Relaxed);
        return mark_line(who, name, 0, 0);
    }
    mark_line(who, name, now - origin, now.saturating_sub(last));
}

fn mark_line(who: &str, name: &str, total: u64, step: u64) {
    use std::io::Write;
    // One write: stderr is unbuffered, and aitherd's is shared with the prepared launchers it
    // starts (O_APPEND), whose lines must not split this one.
    let line = format!(
        "aither-trace: {who:<8} {name:<22} {:>9.0} {:>9.0}\n",
        total as f64 / 1000.0,
        step as f64 / 1000.0
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}
