//! Repeated audit records of agents' requests, summarised (docs/audit.md, docs/daemon.md
//! "Bounds"), with the shared summariser of `audit::summary`: per (agent, key) the first
//! record of a window is written as is; the rest of the window is counted, and when the
//! window has ended one record says "N similar denials of KEY in T s" (`data.summary` with
//! the counts). The key is `kind:class`, where the class is named by the daemon, never text
//! the agent chose: a publish denied on a new subject each time is still the same key.
//! A flood of N denials writes about 2 records a window, not N.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::audit::summary::{Offered, Summariser, Summary};
use crate::audit::{Entry, Verdict};

/// How long one summary window lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Records of a key written one by one per window.
const PASS: u64 = 1;
/// Keys followed per agent (more fold into one, `audit::summary::OTHER_KEY`).
const MAX_KEYS: usize = 16;

/// The daemon's summariser of agents' denials (shared by its tasks).
pub struct Denials {
    inner: Mutex<Summariser>,
}

/// What to do with a record.
#[derive(Debug, PartialEq)]
pub enum Admit {
    /// Write it.
    Write,
    /// Counted into the open window's summary.
    Counted,
}

fn to_entry(s: &Summary) -> Entry {
    let kind = s.key.split(':').next().unwrap_or("summary");
    Entry::new(kind, Verdict::Deny, s.message("denials"))
        .agent(&s.agent)
        .actor(format!("agent {}", s.agent))
        .data(json!({
            "summary": {
                "key": s.key,
                "count": s.suppressed,
                "passed": s.passed,
                "window_s": s.span.as_secs_f64(),
            }
        }))
}

impl Denials {
    pub fn new(window: Duration) -> Denials {
        Denials {
            inner: Mutex::new(Summariser::new(PASS, window, MAX_KEYS)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Summariser> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides about `e` (an agent's record; records without an agent are always written).
    pub fn admit(&self, e: &Entry, class: &str, now: Instant) -> Admit {
        let Some(agent) = e.agent.as_deref() else {
            return Admit::Write;
        };
        match self
            .lock()
            .offer(agent, &format!("{}:{class}", e.kind), now)
        {
            Offered::Pass => Admit::Write,
            Offered::Suppress => Admit::Counted,
        }
    }

    /// The summary records of windows that have ended (`all`: of every open one).
    pub fn flush(&self, now: Instant, all: bool) -> Vec<Entry> {
        let mut s = self.lock();
        let out = if all { s.flush_all(now) } else { s.flush(now) };
        out.iter().map(to_entry).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(rule: &str) -> Entry {
        Entry::new("bus", Verdict::Deny, rule).agent("a")
    }

    #[test]
    fn a_flood_is_one_record_and_one_summary_per_window() {
        let s = Denials::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let written = (0..5000)
            .filter(|i| {
                s.admit(&deny(&format!("no publish on s{i}")), "bus.publish", t0) == Admit::Write
            })
            .count();
        assert_eq!(written, 1);
        // Another class is another key.
        assert_eq!(s.admit(&deny("other"), "bus.subscribe", t0), Admit::Write);
        assert!(s.flush(t0 + Duration::from_secs(9), false).is_empty());
        let out = s.flush(t0 + Duration::from_secs(11), false);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].kind, "bus");
        assert_eq!(out[0].data["summary"]["count"], 4999);
        assert!(
            out[0]
                .rule
                .starts_with("5000 similar denials of bus:bus.publish in 11.0 s"),
            "{}",
            out[0].rule
        );
        assert_eq!(out[0].agent.as_deref(), Some("a"));
        // After the window: written again.
        assert_eq!(
            s.admit(&deny("no"), "bus.publish", t0 + Duration::from_secs(12)),
            Admit::Write
        );
    }
}
