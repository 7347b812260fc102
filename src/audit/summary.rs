//! Keeping a flood of similar records from drowning the rest (docs/network.md, "Bounds").
//!
//! Two small pieces, used by the egress gateway for its denials and meant for any other source
//! of per-agent denials (the daemon's fd-3 channel):
//!
//! - [`Summariser`]: per (agent, key) it lets the first `pass` records of each interval
//!   through; the rest of the interval is counted, not recorded, and once the interval has
//!   ended [`Summariser::flush`] returns one [`Summary`] per (agent, key) that suppressed any:
//!   "N similar denials of KEY in T s". The caller turns summaries into its own records.
//! - [`TokenBucket`]: a per-agent budget (capacity, refill per second), to refuse outright once
//!   an agent has spent it.
//!
//! Neither does I/O nor reads the clock itself: every call takes `now`, so tests drive time.
//! Memory is bounded: at most `max_keys` keys per agent are tracked (the rest fold into the
//! key [`OTHER_KEY`]), and a slot is dropped when its interval is flushed. Call `flush` at least
//! once per interval (a ticker): until then an ended interval keeps summarising.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The key that records fold into once an agent has `max_keys` keys in one interval.
pub const OTHER_KEY: &str = "*";

/// What to do with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// Record it as usual.
    Pass,
    /// Do not record it: it is counted in the (agent, key)'s next summary.
    Suppress,
}

/// Records suppressed for one (agent, key) in one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub agent: String,
    pub key: String,
    /// Records suppressed (not counting the ones that passed).
    pub suppressed: u64,
    /// Records passed in the same interval.
    pub passed: u64,
    /// From the interval's first record to its end (or to the forced flush).
    pub span: Duration,
}

impl Summary {
    /// "N similar denials of KEY in T s" (N counts every record of the interval).
    pub fn message(&self, what: &str) -> String {
        format!(
            "{} similar {what} of {} in {:.1} s ({} recorded, {} summarised here)",
            self.passed + self.suppressed,
            self.key,
            self.span.as_secs_f64(),
            self.passed,
            self.suppressed
        )
    }
}

#[derive(Debug)]
struct Slot {
    start: Instant,
    passed: u64,
    suppressed: u64,
}

/// Per (agent, key): the first `pass` records of each `interval` pass, the rest are summarised.
#[derive(Debug)]
pub struct Summariser {
    pass: u64,
    interval: Duration,
    max_keys: usize,
    slots: HashMap<String, HashMap<String, Slot>>,
}

impl Summariser {
    /// `pass` records per (agent, key) and `interval`; at most `max_keys` keys per agent.
    pub fn new(pass: u64, interval: Duration, max_keys: usize) -> Summariser {
        Summariser {
            pass,
            interval,
            max_keys: max_keys.max(1),
            slots: HashMap::new(),
        }
    }

    /// Decides one record of `agent` under `key` at `now`. An interval starts at the first
    /// record after the previous one was flushed (or ended).
    pub fn offer(&mut self, agent: &str, key: &str, now: Instant) -> Offered {
        let keys = match self.slots.get_mut(agent) {
            Some(k) => k,
            None => self.slots.entry(agent.to_string()).or_default(),
        };
        let key = if keys.contains_key(key) || keys.len() < self.max_keys {
            key
        } else {
            OTHER_KEY
        };
        let slot = match keys.get_mut(key) {
            Some(s) => s,
            None => keys.entry(key.to_string()).or_insert(Slot {
                start: now,
                passed: 0,
                suppressed: 0,
            }),
        };
        if now.saturating_duration_since(slot.start) >= self.interval && slot.suppressed == 0 {
            // An ended interval that summarised nothing: a new one starts here.
            *slot = Slot {
                start: now,
                passed: 0,
                suppressed: 0,
            };
        }
        if slot.passed < self.pass {
            slot.passed += 1;
            Offered::Pass
        } else {
            slot.suppressed += 1;
            Offered::Suppress
        }
    }

    /// The summaries of every interval that has ended by `now` (suppressed > 0 only); their
    /// slots are dropped, so the next record starts a new interval.
    pub fn flush(&mut self, now: Instant) -> Vec<Summary> {
        let interval = self.interval;
        self.take(|s| now.saturating_duration_since(s.start) >= interval, now)
    }

    /// The summaries of `agent`'s open intervals, ended now (its run ended).
    pub fn flush_agent(&mut self, agent: &str, now: Instant) -> Vec<Summary> {
        let Some(keys) = self.slots.remove(agent) else {
            return Vec::new();
        };
        let mut out: Vec<Summary> = keys
            .into_iter()
            .filter(|(_, s)| s.suppressed > 0)
            .map(|(key, s)| summary(agent, key, &s, now))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Every open interval's summary, ended now (the process is stopping).
    pub fn flush_all(&mut self, now: Instant) -> Vec<Summary> {
        self.take(|_| true, now)
    }

    fn take(&mut self, due: impl Fn(&Slot) -> bool, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        for (agent, keys) in self.slots.iter_mut() {
            keys.retain(|key, s| {
                if !due(s) {
                    return true;
                }
                if s.suppressed > 0 {
                    out.push(summary(agent, key.clone(), s, now));
                }
                false
            });
        }
        self.slots.retain(|_, k| !k.is_empty());
        out.sort_by(|a, b| (&a.agent, &a.key).cmp(&(&b.agent, &b.key)));
        out
    }
}

fn summary(agent: &str, key: String, s: &Slot, now: Instant) -> Summary {
    Summary {
        agent: agent.to_string(),
        key,
        suppressed: s.suppressed,
        passed: s.passed,
        span: now.saturating_duration_since(s.start),
    }
}

/// A budget that refills continuously: `capacity` at most, `per_second` added back.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Full at `now`.
    pub fn new(capacity: u32, per_second: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            capacity: f64::from(capacity),
            per_second: f64::from(per_second),
            tokens: f64::from(capacity),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_second).min(self.capacity);
        self.last = now.max(self.last);
    }

    /// Takes one token: false when the budget is spent (nothing is taken then).
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a token is available now (takes none).
    pub fn has(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_records_pass_and_the_rest_are_one_summary_per_interval() {
        let t0 = Instant::now();
        let mut s = Summariser::new(3, Duration::from_secs(10), 8);
        let v: Vec<Offered> = (0..1000).map(|_| s.offer("a", "deny", t0)).collect();
        assert_eq!(v.iter().filter(|v| **v == Offered::Pass).count(), 3);
        assert_eq!(v[..3], [Offered::Pass; 3]);
        // Another agent and another key have their own allowance.
        assert_eq!(s.offer("b", "deny", t0), Offered::Pass);
        assert_eq!(s.offer("a", "quota", t0), Offered::Pass);
        // Nothing is due before the interval ends.
        assert!(s.flush(t0 + Duration::from_secs(9)).is_empty());
        let out = s.flush(t0 + Duration::from_secs(10));
        assert_eq!(
            out,
            vec![Summary {
                agent: "a".into(),
                key: "deny".into(),
                suppressed: 997,
                passed: 3,
                span: Duration::from_secs(10)
            }]
        );
        assert!(out[0]
            .message("denials")
            .starts_with("1000 similar denials of deny in 10.0 s"));
        // A new interval: records pass again.
        assert_eq!(
            s.offer("a", "deny", t0 + Duration::from_secs(11)),
            Offered::Pass
        );
    }

    #[test]
    fn keys_beyond_the_limit_fold_into_one() {
        let t0 = Instant::now();
        let mut s = Summariser::new(1, Duration::from_secs(1), 2);
        for k in 0..100 {
            s.offer("a", &format!("k{k}"), t0);
        }
        let out = s.flush_agent("a", t0);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].key.as_str(), out[0].suppressed), (OTHER_KEY, 97));
        assert!(s.flush_all(t0).is_empty());
    }

    #[test]
    fn a_bucket_refuses_once_spent_and_refills_over_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, 2, t0);
        assert_eq!((0..10).filter(|_| b.take(t0)).count(), 5);
        assert!(!b.has(t0));
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!(!b.take(t0 + Duration::from_millis(500)));
        // Never above capacity.
        assert_eq!(
            (0..10)
                .filter(|_| b.take(t0 + Duration::from_secs(100)))
                .count(),
            5
        );
    }
}
