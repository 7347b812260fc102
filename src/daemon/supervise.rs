//! Supervision rules, free of I/O: the lifecycle states, the restart policy with backoff and a
//! burst limit (docs/daemon.md; after systemd's Restart=/StartLimitBurst= and Kubernetes'
//! CrashLoopBackOff, docs/architecture.md "Supervision"), and what counts as a failure.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where an agent is in its life.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Accepted, not launched yet.
    Created,
    /// Waiting in the MicroScheduler's queue for its GPUs (`aitherctl gpu queue`).
    Queued,
    /// Launched; waiting for READY (or the first passing health check) when readiness is asked.
    Starting,
    /// Running; no readiness was asked for.
    Running,
    /// Running and ready (READY received, or the health check passed).
    Ready,
    /// Running, but health checks are failing (below the threshold).
    Unhealthy,
    /// Frozen by a user (`aitherctl pause`): every process stopped by the cgroup freezer;
    /// health checks and the watchdog wait until `resume`.
    Paused,
    /// Ended and will not be restarted (restart=never, or a success under on-failure).
    Exited,
    /// Ended; waiting out the backoff before the next start.
    Backoff,
    /// Gave up: the burst limit was hit, or it cannot be launched at all.
    Failed,
    /// Stopped by a user.
    Stopped,
}

impl State {
    /// A sandbox exists for it.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            State::Starting | State::Running | State::Ready | State::Unhealthy | State::Paused
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        write!(f, "{}", s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// The restart policy and the supervision settings are part of a spawn request: defined in
/// the protocol crate.
pub use aither_proto::control::{RestartPolicy, Supervision};

/// Why a run ended, as far as the restart policy cares.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EndReason {
    /// The agent exited with a code.
    Exited {
        code: i32,
    },
    /// Killed by a signal we did not send.
    Signaled {
        signal: i32,
    },
    OomKilled,
    WatchdogMiss,
    StartupTimeout,
    HealthFailed {
        failures: u32,
    },
    /// Stopped on purpose (stop, restart, a pain action): never a failure.
    StoppedByUs,
    /// Ended by a signal an operator sent (`aitherctl kill -s SIG`): killed by it, or exited
    /// with 128+SIG as a shell reports it. Never a failure, never restarted.
    KilledByOperator {
        signal: i32,
    },
    /// The sandbox could not be launched.
    LaunchFailed {
        code: i32,
        error: String,
    },
    /// The shim vanished without recording how the run ended (killed with the sandbox).
    Lost,
    /// The token was revoked or expired.
    TokenInvalid {
        error: String,
    },
    /// A pain signal whose policy action is `restart`.
    Pain {
        signal: String,
        reason: String,
    },
    /// Stopped for a strictly higher GPU priority class; requeued at its original time
    /// (never counted as a failure or a restart).
    GpuPreempted {
        by: String,
    },
    /// Used more VRAM than its lease reserved.
    GpuEvicted {
        device: u32,
        used_mb: u64,
        reserved_mb: u64,
    },
}

impl EndReason {
    pub fn is_failure(&self, sup: &Supervision) -> bool {
        match self {
            EndReason::Exited { code } => !sup.success_codes.contains(code),
            EndReason::StoppedByUs
            | EndReason::KilledByOperator { .. }
            | EndReason::GpuPreempted { .. } => false,
            _ => true,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            EndReason::Exited { code } => format!("exited with code {code}"),
            EndReason::Signaled { signal } => {
                format!("killed by {}", super::signal_name(*signal))
            }
            EndReason::OomKilled => "killed by the OOM killer".into(),
            EndReason::WatchdogMiss => "watchdog: no heartbeat in time".into(),
            EndReason::StartupTimeout => "not ready within the startup timeout".into(),
            EndReason::HealthFailed { failures } => {
                format!("health check failed {failures} times in a row")
            }
            EndReason::StoppedByUs => "stopped".into(),
            EndReason::KilledByOperator { signal } => {
                format!(
                    "ended by {} from aitherctl kill",
                    super::signal_name(*signal)
                )
            }
            EndReason::LaunchFailed { error, .. } => format!("launch failed: {error}"),
            EndReason::Lost => "its launcher vanished".into(),
            EndReason::TokenInvalid { error } => format!("token no longer valid: {error}"),
            EndReason::Pain { signal, reason } => {
                format!(
                    "restarted on pain ({signal}{}{reason})",
                    if reason.is_empty() { "" } else { ": " }
                )
            }
            EndReason::GpuPreempted { by } => {
                format!("preempted for {by} (higher GPU priority class); requeued")
            }
            EndReason::GpuEvicted {
                device,
                used_mb,
                reserved_mb,
            } => format!(
                "evicted: used {used_mb} MiB of VRAM on GPU {device}, {reserved_mb} MiB reserved"
            ),
        }
    }
}

/// What to do after a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start again after this delay.
    Restart(Duration),
    /// Leave it ended (Exited).
    Done,
    /// The burst limit was hit (Failed).
    GiveUp,
}

/// Restart bookkeeping for one agent. Times are milliseconds on a monotonic clock.
#[derive(Clone, Debug, Default)]
pub struct RestartTracker {
    /// Start times of recent restarts (within the burst window).
    recent: VecDeque<u64>,
    /// Consecutive failures since the last reset (drives the backoff exponent).
    pub consecutive: u32,
    /// Total restarts (shown by ps).
    pub total: u32,
    seed: u64,
}

impl RestartTracker {
    pub fn new(seed: u64) -> RestartTracker {
        RestartTracker {
            seed: seed | 1,
            ..RestartTracker::default()
        }
    }

    /// The run that just ended was healthy for `healthy_ms`: long enough, and the backoff
    /// starts over.
    pub fn note_healthy(&mut self, sup: &Supervision, healthy_ms: u64) {
        if healthy_ms >= sup.reset_after_ms {
            self.consecutive = 0;
        }
    }

    /// Decides after a run ended for `reason` at `now`.
    pub fn decide(&mut self, sup: &Supervision, reason: &EndReason, now: u64) -> Decision {
        let failed = reason.is_failure(sup);
        if matches!(
            reason,
            EndReason::StoppedByUs
                | EndReason::KilledByOperator { .. }
                | EndReason::TokenInvalid { .. }
        ) {
            return Decision::Done;
        }
        // A `restart` pain action is a failure like any other: the restart policy decides
        // (issue 20: `--restart never` means never, whatever the pain table says).
        let restart = match sup.restart {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Always => true,
        };
        if !restart {
            return Decision::Done;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_sub(*t) > sup.burst_window_ms)
        {
            self.recent.pop_front();
        }
        if self.recent.len() as u32 >= sup.burst_limit {
            return Decision::GiveUp;
        }
        self.recent.push_back(now);
        self.total += 1;
        if failed {
            self.consecutive += 1;
        } else {
            self.consecutive = 1;
        }
        Decision::Restart(self.backoff(sup))
    }

    /// min(base·2^(n-1), max) with ±10 % jitter (so that agents that crashed together do not
    /// restart in lockstep).
    fn backoff(&mut self, sup: &Supervision) -> Duration {
        let n = self.consecutive.max(1) - 1;
        let base = sup
            .backoff_ms
            .saturating_mul(1u64 << n.min(40))
            .min(sup.backoff_max_ms);
        if base == 0 {
            return Duration::ZERO;
        }
        // xorshift64*: no cryptographic need, just spread.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        let r = self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        let factor = 0.9 + 0.2 * unit;
        Duration::from_millis((base as f64 * factor).round() as u64)
    }

    /// Clears the burst history (a user's `restart` of a Failed agent).
    pub fn reset(&mut self) {
        self.recent.clear();
        self.consecutive = 0;
    }
}

pub use crate::units::to_ms;

#[cfg(test)]
mod tests {
    use super::*;

    fn sup() -> Supervision {
        Supervision::default()
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let s = sup();
        let mut t = RestartTracker::new(42);
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..5 {
            match t.decide(&s, &EndReason::Exited { code: 1 }, now) {
                Decision::Restart(d) => delays.push(d.as_millis() as u64),
                d => panic!("{d:?}"),
            }
            now += 700_000; // outside the burst window each time
        }
        for (i, d) in delays.iter().enumerate() {
            let base = 1000u64 << i;
            assert!(
                *d >= base * 9 / 10 && *d <= base * 11 / 10,
                "delay {i}: {d} vs {base}"
            );
        }
        let mut capped = RestartTracker::new(1);
        capped.consecutive = 30;
        assert!(capped.backoff(&s) <= Duration::from_millis(330_000));
        assert!(capped.backoff(&s) >= Duration::from_millis(270_000));
    }

    #[test]
    fn burst_limit_gives_up_and_reset_clears_it() {
        let s = sup();
        let mut t = RestartTracker::new(7);
        for i in 0..5 {
            assert!(matches!(
                t.decide(&s, &EndReason::Signaled { signal: 9 }, i * 1000),
                Decision::Restart(_)
            ));
        }
        assert_eq!(
            t.decide(&s, &EndReason::Exited { code: 3 }, 6000),
            Decision::GiveUp
        );
        // Outside the window the history has aged out.
        assert!(matches!(
            t.decide(&s, &EndReason::Exited { code: 3 }, 6000 + 700_000),
            Decision::Restart(_)
        ));
        t.reset();
        assert_eq!(t.consecutive, 0);
    }

    #[test]
    fn policies_decide_as_documented() {
        let mut s = sup();
        let mut t = RestartTracker::new(3);
        assert_eq!(
            t.decide(&s, &EndReason::Exited { code: 0 }, 0),
            Decision::Done
        );
        assert_eq!(t.decide(&s, &EndReason::StoppedByUs, 0), Decision::Done);
        // An operator's signal is never a failure, under any policy (issue 20).
        let op = EndReason::KilledByOperator {
            signal: libc::SIGTERM,
        };
        assert!(!op.is_failure(&s));
        for restart in [
            RestartPolicy::Never,
            RestartPolicy::OnFailure,
            RestartPolicy::Always,
        ] {
            let s = Supervision { restart, ..sup() };
            assert_eq!(t.decide(&s, &op, 0), Decision::Done, "{restart:?}");
        }
        assert_eq!(t.total, 0);
        assert!(matches!(
            t.decide(&s, &EndReason::OomKilled, 0),
            Decision::Restart(_)
        ));
        s.restart = RestartPolicy::Never;
        assert_eq!(t.decide(&s, &EndReason::OomKilled, 0), Decision::Done);
        s.restart = RestartPolicy::Always;
        assert!(matches!(
            t.decide(&s, &EndReason::Exited { code: 0 }, 0),
            Decision::Restart(_)
        ));
        s.success_codes = vec![0, 3];
        assert!(!EndReason::Exited { code: 3 }.is_failure(&s));
    }

    #[test]
    fn pain_restarts_only_where_the_restart_policy_restarts() {
        let pain = EndReason::Pain {
            signal: "agent".into(),
            reason: "critical".into(),
        };
        let mut t = RestartTracker::new(11);
        let never = Supervision {
            restart: RestartPolicy::Never,
            ..sup()
        };
        assert_eq!(t.decide(&never, &pain, 0), Decision::Done);
        assert_eq!(t.total, 0, "no restart counted under never");
        assert!(matches!(t.decide(&sup(), &pain, 0), Decision::Restart(_)));
        let always = Supervision {
            restart: RestartPolicy::Always,
            ..sup()
        };
        assert!(matches!(t.decide(&always, &pain, 0), Decision::Restart(_)));
    }

    #[test]
    fn a_long_healthy_run_resets_the_backoff() {
        let s = sup();
        let mut t = RestartTracker::new(9);
        t.consecutive = 4;
        t.note_healthy(&s, 599_999);
        assert_eq!(t.consecutive, 4);
        t.note_healthy(&s, 600_000);
        assert_eq!(t.consecutive, 0);
    }

    #[test]
    fn zero_backoff_is_immediate() {
        let s = Supervision {
            backoff_ms: 0,
            ..sup()
        };
        let mut t = RestartTracker::new(5);
        assert_eq!(
            t.decide(&s, &EndReason::Exited { code: 1 }, 0),
            Decision::Restart(Duration::ZERO)
        );
    }
}
