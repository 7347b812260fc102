//! Repeated audit records summarised (docs/audit.md, docs/daemon.md "Bounds"): the first
//! record of a class (agent, kind, decision and a class the caller names, never text the
//! agent chose: a subject that changes at every publish is still the same class) in a window
//! is written as is; the ones
//! that follow within the window are only counted, and when the window closes one record
//! says `"N similar denials in T s"` (`kind` the same, `data.summary` with the count, the
//! window and the first and last times). A flood of N denials writes 2 records a window,
//! not N.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::audit::{Decision, Entry};

/// How long one summary window lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Most keys followed at once; past it, the oldest window is closed early.
const MAX_KEYS: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    agent: Option<String>,
    kind: String,
    decision: String,
    class: String,
}

struct Window {
    opened: Instant,
    opened_ms: u64,
    last_ms: u64,
    /// Records counted, not written, since the window opened.
    suppressed: u64,
    /// The first record, for the summary's actor and data.
    first: Entry,
}

/// What to do with a record.
#[derive(Debug, PartialEq)]
pub enum Admit {
    /// Write it.
    Write,
    /// Counted into the open window's summary.
    Counted,
}

/// The summariser: shared by the daemon's tasks.
pub struct Summariser {
    window: Duration,
    open: Mutex<HashMap<Key, Window>>,
}

fn key_of(e: &Entry, class: &str) -> Key {
    Key {
        agent: e.agent.clone(),
        kind: e.kind.clone(),
        decision: format!("{:?}", e.decision),
        class: class.to_string(),
    }
}

fn now_ms() -> u64 {
    super::store::now_ms()
}

fn summary(k: &Key, w: &Window, closed: Instant) -> Entry {
    let secs = closed.saturating_duration_since(w.opened).as_secs_f64();
    let what = if w.first.decision == Decision::Deny {
        "denials"
    } else {
        "records"
    };
    let mut e = Entry::new(
        &k.kind,
        w.first.decision,
        format!(
            "{} similar {what} in {secs:.0} s (not written one by one): {}",
            w.suppressed, k.class
        ),
    )
    .data(json!({
        "summary": {
            "count": w.suppressed,
            "window_s": secs,
            "first_ms": w.opened_ms,
            "last_ms": w.last_ms,
        },
        "first": {"rule": w.first.rule, "data": w.first.data},
    }));
    e.agent = k.agent.clone();
    e.actor = w.first.actor.clone();
    e
}

impl Summariser {
    pub fn new(window: Duration) -> Summariser {
        Summariser {
            window,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Decides about `e` of `class` at `now`; summaries of windows that closed meanwhile are
    /// pushed to `out` (to be written before `e`).
    pub fn admit(&self, e: &Entry, class: &str, now: Instant, out: &mut Vec<Entry>) -> Admit {
        let k = key_of(e, class);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = open.get_mut(&k) {
            if now.saturating_duration_since(w.opened) < self.window {
                w.suppressed += 1;
                w.last_ms = now_ms();
                return Admit::Counted;
            }
            if w.suppressed > 0 {
                out.push(summary(&k, w, now));
            }
            open.remove(&k);
        }
        if open.len() >= MAX_KEYS {
            self.close_where(&mut open, now, out, |_| true);
        }
        let t = now_ms();
        open.insert(
            k,
            Window {
                opened: now,
                opened_ms: t,
                last_ms: t,
                suppressed: 0,
                first: e.clone(),
            },
        );
        Admit::Write
    }

    fn close_where(
        &self,
        open: &mut HashMap<Key, Window>,
        now: Instant,
        out: &mut Vec<Entry>,
        pick: impl Fn(&Window) -> bool,
    ) {
        let done: Vec<Key> = open
            .iter()
            .filter(|(_, w)| pick(w))
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            if let Some(w) = open.remove(&k) {
                if w.suppressed > 0 {
                    out.push(summary(&k, &w, now));
                }
            }
        }
    }

    /// Closes the windows older than the window length (every one with `all`); their
    /// summaries go to `out`.
    pub fn flush(&self, now: Instant, all: bool, out: &mut Vec<Entry>) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let len = self.window;
        self.close_where(&mut open, now, out, |w| {
            all || now.saturating_duration_since(w.opened) >= len
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(rule: &str) -> Entry {
        Entry::new("bus", Decision::Deny, rule).agent("a")
    }

    #[test]
    fn a_flood_is_one_record_and_one_summary_per_window() {
        let s = Summariser::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut out = Vec::new();
        let written = (0..5000)
            .filter(|i| {
                s.admit(
                    &deny(&format!("no publish on s{i}")),
                    "bus.publish",
                    t0,
                    &mut out,
                ) == Admit::Write
            })
            .count();
        assert_eq!(written, 1);
        // Another rule is another key.
        assert_eq!(
            s.admit(&deny("other"), "bus.subscribe", t0, &mut out),
            Admit::Write
        );
        assert!(out.is_empty());
        s.flush(t0 + Duration::from_secs(11), false, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].data["summary"]["count"], 4999);
        assert!(out[0].rule.starts_with("4999 similar denials in 11 s"));
        assert_eq!(out[0].data["first"]["rule"], "no publish on s0");
        assert_eq!(out[0].agent.as_deref(), Some("a"));
        // After the window: written again.
        assert_eq!(
            s.admit(
                &deny("no publish"),
                "bus.publish",
                t0 + Duration::from_secs(12),
                &mut out
            ),
            Admit::Write
        );
    }
}
