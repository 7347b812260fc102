//! One run of a supervised agent as a pure state machine (issue 19): what `Agent::watch` used
//! to keep in twenty mutable locals. The async shell (daemon/agent.rs) feeds it events —
//! `on_command` (a user's stop/kill/restart/remove, the GPU scheduler's eviction), `on_tick`
//! (a deadline passed), `on_probe` (a health check ended), `on_frame` (READY or a heartbeat on
//! the agent channel), `end` (a pain action, a revoked token) — and performs the `Action`s it
//! returns; `finish` says why the run ended. No I/O, no clock: time comes in as `now`. Every
//! transition of docs/daemon.md "Lifecycle" has a unit test below.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::shim::ExitRecord;
use super::supervise::{Decision, EndReason, State, Supervision};

/// What the shell does for the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this signal to the agent (through the shim and the sandbox's pid 1).
    Signal(i32),
    /// Kill every process of the sandbox at once from its cgroup; without a cgroup, SIGKILL
    /// the shim.
    KillAll,
    /// The agent's state, as `ps` shows it.
    State(State),
    /// An event in state.db and on the bus.
    Emit(&'static str, Value),
    /// Run the health check now (its result comes back through `on_probe`).
    StartProbe,
    /// `ready` in `inspect`.
    MarkReady,
    /// `health_failures` and `last_health` in `inspect`.
    Health { failures: u32, last: String },
    /// Preempted: keep the agent's place in the GPU queue for its next run.
    KeepGpuPlace,
    /// Thaw the paused sandbox (before a stop's SIGTERM: the agent must run to act on it).
    Thaw,
}

/// What a user (or the GPU scheduler) asks of a running agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// SIGTERM, then everything killed after `grace`.
    Stop {
        grace: Duration,
    },
    /// One signal; `delivered`: the shim took it.
    Kill {
        signal: i32,
        delivered: bool,
    },
    Restart,
    Remove,
    /// The GPU scheduler takes the devices back: `reason` is `GpuPreempted` or `GpuEvicted`.
    Evict {
        reason: EndReason,
        grace: Duration,
    },
}

/// What comes after the run, as users asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// The restart policy decides.
    Policy,
    Stop,
    Restart,
    Remove,
}

/// An event on the agent channel that the lifecycle cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Ready,
    Heartbeat,
}

/// One run, from its start to its end.
#[derive(Debug, Clone)]
pub struct Run {
    sup: Supervision,
    ready: bool,
    healthy_since: Option<Instant>,
    startup_deadline: Option<Instant>,
    watchdog_deadline: Option<Instant>,
    next_health: Option<Instant>,
    probe_running: bool,
    failures: u32,
    /// Why we end it, if we do (the first reason wins, except a user's restart or remove).
    pending: Option<EndReason>,
    then: Then,
    /// When the grace is over and everything is killed.
    kill_at: Option<Instant>,
    /// Signals an operator sent this run (bit n: signal n): dying of one is not a crash.
    operator_signals: u128,
    /// Frozen by a user: the state to go back to on resume.
    paused: Option<Paused>,
    /// A health check that was running when the agent was paused: its result is not the
    /// agent's (it ran against a frozen sandbox) and is dropped.
    stale_probe: bool,
}

/// What a pause keeps for the resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Paused {
    /// The state before the pause (or what READY, arrived meanwhile, made it).
    was: State,
    /// The startup timeout was still running.
    startup: bool,
}

/// Why a pause or resume is refused by the lifecycle (before any freezer is touched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PauseRefusal {
    #[error("it is being stopped")]
    Ending,
    #[error("it is paused already")]
    AlreadyPaused,
    #[error("it is not paused")]
    NotPaused,
}

impl Run {
    /// A run started at `started`. `was_ready`: adopted from a daemon that had seen it ready.
    pub fn new(sup: &Supervision, started: Instant, was_ready: bool) -> Run {
        let ready = !sup.needs_readiness() || was_ready;
        Run {
            ready,
            healthy_since: ready.then_some(started),
            startup_deadline: match (ready, sup.startup_timeout_ms) {
                (false, Some(ms)) => Some(started + Duration::from_millis(ms)),
                _ => None,
            },
            // The watchdog runs from the start (systemd: from READY or start, whichever is
            // first seen; here from start so that a hung startup is caught too when no
            // timeout is set).
            watchdog_deadline: sup.watchdog_ms.map(|w| started + Duration::from_millis(w)),
            next_health: sup
                .health_cmd
                .as_ref()
                .map(|_| started + Duration::from_millis(sup.health_interval_ms.min(1000))),
            probe_running: false,
            failures: 0,
            pending: None,
            then: Then::Policy,
            kill_at: None,
            operator_signals: 0,
            paused: None,
            stale_probe: false,
            sup: sup.clone(),
        }
    }

    /// The state the run starts in.
    pub fn initial_state(&self) -> State {
        if self.ready {
            State::Running
        } else {
            State::Starting
        }
    }

    /// Whether the run is being ended (no new probe, no token check).
    pub fn ending(&self) -> bool {
        self.pending.is_some()
    }

    /// The next deadline `on_tick` must be called at, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.startup_deadline,
            self.watchdog_deadline,
            self.kill_at,
            self.next_health,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn kill_by(&mut self, at: Instant) {
        self.kill_at = Some(self.kill_at.map_or(at, |k| k.min(at)));
    }

    /// Whether the agent is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Whether a pause may start (asked before the freezer is touched).
    pub fn may_pause(&self) -> Result<(), PauseRefusal> {
        if self.pending.is_some() {
            return Err(PauseRefusal::Ending);
        }
        if self.paused.is_some() {
            return Err(PauseRefusal::AlreadyPaused);
        }
        Ok(())
    }

    /// The sandbox is frozen (`was`: the state it was in). Health checks, the watchdog and the
    /// startup timeout are suspended: a frozen agent cannot answer, and that is no failure.
    pub fn on_paused(&mut self, was: State, _now: Instant) -> Vec<Action> {
        if self.paused.is_some() || self.pending.is_some() {
            return Vec::new();
        }
        self.paused = Some(Paused {
            was,
            startup: self.startup_deadline.is_some(),
        });
        self.startup_deadline = None;
        self.watchdog_deadline = None;
        self.next_health = None;
        self.stale_probe = self.probe_running;
        vec![
            Action::State(State::Paused),
            Action::Emit("paused", json!({"was": was})),
        ]
    }

    /// Whether a resume may start.
    pub fn may_resume(&self) -> Result<(), PauseRefusal> {
        match self.paused {
            Some(_) => Ok(()),
            None => Err(PauseRefusal::NotPaused),
        }
    }

    /// The sandbox is thawed: back to the state before the pause, with the watchdog, the
    /// health checks and the startup timeout armed again from `now` (the paused time is not
    /// held against the agent).
    pub fn on_resumed(&mut self, now: Instant) -> Vec<Action> {
        let Some(p) = self.paused.take() else {
            return Vec::new();
        };
        self.rearm(p, now);
        vec![
            Action::State(p.was),
            Action::Emit("resumed", json!({"to": p.was})),
        ]
    }

    fn rearm(&mut self, p: Paused, now: Instant) {
        if self.pending.is_some() {
            return;
        }
        if p.startup && !self.ready {
            self.startup_deadline = self
                .sup
                .startup_timeout_ms
                .map(|ms| now + Duration::from_millis(ms));
        }
        self.watchdog_deadline = self.sup.watchdog_ms.map(|w| now + Duration::from_millis(w));
        if self.sup.health_cmd.is_some() && !self.probe_running {
            self.next_health = Some(now + Duration::from_millis(self.sup.health_interval_ms));
        }
    }

    /// A stop, restart or remove of a paused agent thaws it first (the agent must run to act
    /// on SIGTERM; on v1 a frozen task would hold even SIGKILL until thawed).
    fn thaw_for_end(&mut self) -> Vec<Action> {
        match self.paused.take() {
            Some(p) => vec![Action::Thaw, Action::State(p.was)],
            None => Vec::new(),
        }
    }

    pub fn on_command(&mut self, cmd: Command, now: Instant) -> Vec<Action> {
        let mut a = match &cmd {
            Command::Stop { .. } | Command::Restart | Command::Remove | Command::Evict { .. } => {
                self.thaw_for_end()
            }
            // Another signal waits, pending, until the resume; SIGKILL kills it frozen
            // (`kill_all` thaws on v1).
            Command::Kill { .. } => Vec::new(),
        };
        a.extend(self.command(cmd, now));
        a
    }

    fn command(&mut self, cmd: Command, now: Instant) -> Vec<Action> {
        match cmd {
            Command::Stop { grace } => {
                self.pending.get_or_insert(EndReason::StoppedByUs);
                // A restart or remove asked before stays what comes after.
                if !matches!(self.then, Then::Remove | Then::Restart) {
                    self.then = Then::Stop;
                }
                self.kill_by(now + grace);
                vec![Action::Signal(libc::SIGTERM)]
            }
            Command::Kill { signal, delivered } => {
                if !delivered {
                    return Vec::new();
                }
                // A signal the user asked for is never a failure (issue 20).
                self.operator_signals |= 1u128 << signal.clamp(0, 127);
                if signal == libc::SIGKILL {
                    self.pending.get_or_insert(EndReason::StoppedByUs);
                    return vec![Action::KillAll];
                }
                Vec::new()
            }
            Command::Restart | Command::Remove => {
                self.pending = Some(EndReason::StoppedByUs);
                self.then = if cmd == Command::Restart {
                    Then::Restart
                } else {
                    Then::Remove
                };
                self.kill_by(now + self.sup.stop_timeout());
                vec![Action::Signal(libc::SIGTERM)]
            }
            Command::Evict { reason, grace } => {
                if self.pending.is_some() {
                    return Vec::new();
                }
                let keep = matches!(reason, EndReason::GpuPreempted { .. });
                self.pending = Some(reason);
                self.kill_by(now + grace);
                let mut a = Vec::new();
                if keep {
                    a.push(Action::KeepGpuPlace);
                }
                a.push(Action::Signal(libc::SIGTERM));
                a
            }
        }
    }

    /// Ends the run now for `reason` (a pain action, a revoked token), unless it is ending.
    pub fn end(&mut self, reason: EndReason, now: Instant) {
        if self.pending.is_none() {
            self.pending = Some(reason);
            self.kill_at = Some(now);
        }
    }

    /// A deadline may have passed. One step per call (the shell calls again at the next
    /// deadline).
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        if self.kill_at.is_some_and(|k| now >= k) {
            // The grace is over: every process of the sandbox, at once (v1: each member; v2:
            // cgroup.kill). pid 1 dies, the shim records the end.
            self.kill_at = None;
            return vec![Action::KillAll];
        }
        if self.startup_deadline.is_some_and(|t| now >= t) {
            self.startup_deadline = None;
            if self.pending.is_none() {
                self.end(EndReason::StartupTimeout, now);
                return vec![Action::Emit(
                    "startup_timeout",
                    json!({"timeout_ms": self.sup.startup_timeout_ms}),
                )];
            }
            return Vec::new();
        }
        if self.watchdog_deadline.is_some_and(|t| now >= t) {
            self.watchdog_deadline = None;
            if self.pending.is_none() {
                self.end(EndReason::WatchdogMiss, now);
                return vec![Action::Emit(
                    "watchdog_miss",
                    json!({"watchdog_ms": self.sup.watchdog_ms}),
                )];
            }
            return Vec::new();
        }
        if self.next_health.is_some_and(|t| now >= t) {
            self.next_health = None;
            if !self.probe_running && self.pending.is_none() && self.sup.health_cmd.is_some() {
                self.probe_running = true;
                return vec![Action::StartProbe];
            }
        }
        Vec::new()
    }

    /// A health check ended: `ok`, else its exit code and output.
    pub fn on_probe(
        &mut self,
        ok: bool,
        code: Option<i32>,
        output: &str,
        now: Instant,
    ) -> Vec<Action> {
        self.probe_running = false;
        if self.paused.is_some() || std::mem::take(&mut self.stale_probe) {
            // It ran against a frozen sandbox: not the agent's answer. Paused, the next one
            // is armed by the resume; resumed since, it is armed now.
            if self.paused.is_none() && self.pending.is_none() {
                self.next_health = Some(now + Duration::from_millis(self.sup.health_interval_ms));
            }
            return Vec::new();
        }
        self.next_health = Some(now + Duration::from_millis(self.sup.health_interval_ms));
        let mut a = Vec::new();
        if ok {
            if self.failures > 0 {
                a.push(Action::Emit(
                    "health",
                    json!({"ok": true, "after_failures": self.failures}),
                ));
            }
            self.failures = 0;
            a.push(Action::Health {
                failures: 0,
                last: "ok".into(),
            });
            if !self.ready {
                self.ready = true;
                self.startup_deadline = None;
                a.push(Action::MarkReady);
                a.push(Action::Emit("ready", json!({"by": "health_cmd"})));
            }
            self.healthy_since.get_or_insert(now);
            a.push(Action::State(State::Ready));
            return a;
        }
        self.failures += 1;
        a.push(Action::Health {
            failures: self.failures,
            last: output.to_string(),
        });
        a.push(Action::Emit(
            "health",
            json!({"ok": false, "failures": self.failures, "code": code, "output": output}),
        ));
        // Before readiness a failing check is just "not ready yet" (the startup timeout
        // bounds it); after, it counts toward the threshold.
        if self.ready {
            self.healthy_since = None;
            a.push(Action::State(State::Unhealthy));
            if self.failures >= self.sup.health_threshold {
                self.end(
                    EndReason::HealthFailed {
                        failures: self.failures,
                    },
                    now,
                );
            }
        }
        a
    }

    /// READY or a heartbeat arrived on the agent channel.
    pub fn on_frame(&mut self, f: Frame, now: Instant) -> Vec<Action> {
        match f {
            Frame::Ready => {
                let mut a = Vec::new();
                if !self.ready {
                    self.ready = true;
                    a.push(Action::MarkReady);
                    a.push(Action::Emit("ready", json!({"by": "agent"})));
                }
                self.startup_deadline = None;
                self.healthy_since.get_or_insert(now);
                match self.paused.as_mut() {
                    // Sent just before the freeze: ready once resumed.
                    Some(p) => {
                        p.was = State::Ready;
                        p.startup = false;
                    }
                    None => a.push(Action::State(State::Ready)),
                }
                a
            }
            // A heartbeat read after the freeze was sent before it: the watchdog stays off
            // until the resume arms it.
            Frame::Heartbeat if self.paused.is_some() => Vec::new(),
            Frame::Heartbeat => {
                if let Some(w) = self.sup.watchdog_ms {
                    self.watchdog_deadline = Some(now + Duration::from_millis(w));
                }
                Vec::new()
            }
        }
    }

    /// The run ended (`record`: the shim's exit record, None if it vanished without one):
    /// why, since when it was healthy, and what comes next. Our own reason (a kill we made)
    /// takes precedence over the record.
    pub fn finish(self, record: Option<&ExitRecord>) -> (EndReason, Option<Instant>, Then) {
        let reason = match (self.pending, record) {
            (Some(p), _) => p,
            (None, None) => EndReason::Lost,
            (None, Some(r)) => reason_of(r, self.operator_signals),
        };
        (reason, self.healthy_since, self.then)
    }
}

/// How the shim's record reads as an end reason, given the signals an operator sent.
fn reason_of(r: &ExitRecord, operator_signals: u128) -> EndReason {
    let was_sent = |s: i32| (1..128).contains(&s) && operator_signals & (1u128 << s) != 0;
    if let Some(e) = &r.launch_error {
        return EndReason::LaunchFailed {
            code: r.code.unwrap_or(125),
            error: e.clone(),
        };
    }
    if r.oom_killed && (r.signal == Some(libc::SIGKILL) || r.code == Some(137)) {
        return EndReason::OomKilled;
    }
    match (r.signal, r.code) {
        // Killed by an operator's signal, or exited 128+N as a shell reports it.
        (Some(s), _) if was_sent(s) => EndReason::KilledByOperator { signal: s },
        (None, Some(c)) if was_sent(c - 128) => EndReason::KilledByOperator { signal: c - 128 },
        (Some(s), _) => EndReason::Signaled { signal: s },
        (None, c) => EndReason::Exited {
            code: c.unwrap_or(0),
        },
    }
}

/// Where an agent rests after the restart policy decided `d` on a run that ended for
/// `reason`; None: it restarts (after the backoff).
pub fn resting_state(d: Decision, reason: &EndReason) -> Option<State> {
    match d {
        Decision::Restart(_) => None,
        Decision::Done => Some(match reason {
            EndReason::TokenInvalid { .. } => State::Failed,
            _ => State::Exited,
        }),
        Decision::GiveUp => Some(State::Failed),
    }
}

/// Where an agent is when a user's command reaches it between runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Stopped, exited or failed.
    Resting,
    /// Waiting out a backoff.
    Backoff,
    /// Waiting for its GPUs.
    Queued,
}

/// How a command is answered between runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdleReply {
    /// Answer ok and stay.
    Ok,
    /// Refuse with this message and stay.
    Refuse(String),
    /// Nothing to answer (an eviction of nothing).
    Ignore,
    /// Leave the wait: stop (answered once stopped), restart now, remove.
    Leave(Then),
}

/// A user's command between runs (the reply channels stay with the shell).
pub fn idle_command(at: Idle, name: &str, cmd: &Command) -> IdleReply {
    match (cmd, at) {
        (Command::Stop { .. }, Idle::Resting) => IdleReply::Ok,
        (Command::Stop { .. }, _) => IdleReply::Leave(Then::Stop),
        (Command::Kill { .. }, Idle::Resting) => {
            IdleReply::Refuse(format!("{name} is not running"))
        }
        (Command::Kill { .. }, Idle::Backoff) => {
            IdleReply::Refuse(format!("{name} is in backoff, not running"))
        }
        (Command::Kill { .. }, Idle::Queued) => {
            IdleReply::Refuse(format!("{name} is queued for a GPU, not running"))
        }
        // Queued, it starts as soon as its GPUs are free anyway.
        (Command::Restart, Idle::Queued) => IdleReply::Ok,
        (Command::Restart, _) => IdleReply::Leave(Then::Restart),
        (Command::Remove, _) => IdleReply::Leave(Then::Remove),
        (Command::Evict { .. }, _) => IdleReply::Ignore,
    }
}

/// A pause or resume between runs: refused, saying where the agent is.
pub fn idle_pause(at: Idle, name: &str, state: State) -> String {
    match at {
        Idle::Resting => format!("{name} is not running ({state}): only a running agent can be paused or resumed"),
        Idle::Backoff => format!("{name} is in backoff, not running: only a running agent can be paused or resumed"),
        Idle::Queued => format!("{name} is queued for a GPU, not running: only a running agent can be paused or resumed"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::supervise::{RestartPolicy, RestartTracker};
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn sup() -> Supervision {
        Supervision::default()
    }

    fn exit(code: Option<i32>, signal: Option<i32>) -> ExitRecord {
        ExitRecord {
            code,
            signal,
            oom_killed: false,
            timed_out: false,
            launch_error: None,
            finished_unix_ms: 0,
        }
    }

    fn emitted(a: &[Action], kind: &str) -> bool {
        a.iter()
            .any(|x| matches!(x, Action::Emit(k, _) if *k == kind))
    }

    #[test]
    fn a_run_without_readiness_starts_running_and_one_with_it_starting() {
        let t0 = Instant::now();
        let r = Run::new(&sup(), t0, false);
        assert_eq!(r.initial_state(), State::Running);
        assert_eq!(r.next_deadline(), None);
        let s = Supervision {
            wait_ready: true,
            ..sup()
        };
        assert_eq!(Run::new(&s, t0, false).initial_state(), State::Starting);
        // Adopted from a daemon that had seen it ready.
        assert_eq!(Run::new(&s, t0, true).initial_state(), State::Running);
    }

    #[test]
    fn ready_on_the_channel_makes_it_ready_once_and_clears_the_startup_timeout() {
        let t0 = Instant::now();
        let s = Supervision {
            wait_ready: true,
            startup_timeout_ms: Some(100),
            ..sup()
        };
        let mut r = Run::new(&s, t0, false);
        assert_eq!(r.next_deadline(), Some(t0 + 100 * MS));
        let a = r.on_frame(Frame::Ready, t0 + 10 * MS);
        assert_eq!(
            a,
            vec![
                Action::MarkReady,
                Action::Emit("ready", json!({"by": "agent"})),
                Action::State(State::Ready)
            ]
        );
        assert_eq!(r.next_deadline(), None);
        assert!(r.on_tick(t0 + 200 * MS).is_empty());
        // A second READY: no second event.
        assert_eq!(
            r.on_frame(Frame::Ready, t0 + 300 * MS),
            vec![Action::State(State::Ready)]
        );
        let (reason, healthy, then) = r.finish(Some(&exit(Some(0), None)));
        assert_eq!(reason, EndReason::Exited { code: 0 });
        assert_eq!(healthy, Some(t0 + 10 * MS));
        assert_eq!(then, Then::Policy);
    }

    #[test]
    fn no_ready_within_the_startup_timeout_ends_the_run() {
        let t0 = Instant::now();
        let s = Supervision {
            wait_ready: true,
            startup_timeout_ms: Some(100),
            ..sup()
        };
        let mut r = Run::new(&s, t0, false);
        assert!(r.on_tick(t0 + 99 * MS).is_empty());
        let a = r.on_tick(t0 + 100 * MS);
        assert!(emitted(&a, "startup_timeout"), "{a:?}");
        assert!(r.ending());
        // The kill follows at once.
        assert_eq!(r.on_tick(t0 + 100 * MS), vec![Action::KillAll]);
        let (reason, _, _) = r.finish(Some(&exit(None, Some(libc::SIGKILL))));
        assert_eq!(reason, EndReason::StartupTimeout);
    }

    #[test]
    fn heartbeats_keep_the_watchdog_off_and_a_miss_ends_the_run() {
        let t0 = Instant::now();
        let s = Supervision {
            watchdog_ms: Some(100),
            ..sup()
        };
        let mut r = Run::new(&s, t0, false);
        r.on_frame(Frame::Heartbeat, t0 + 90 * MS);
        assert!(r.on_tick(t0 + 150 * MS).is_empty());
        assert!(!r.ending());
        let a = r.on_tick(t0 + 190 * MS);
        assert!(emitted(&a, "watchdog_miss"), "{a:?}");
        let (reason, _, _) = r.finish(None);
        assert_eq!(reason, EndReason::WatchdogMiss);
    }

    #[test]
    fn health_checks_make_it_ready_then_unhealthy_then_end_it_at_the_threshold() {
        let t0 = Instant::now();
        let s = Supervision {
            health_cmd: Some(vec!["true".into()]),
            health_interval_ms: 200,
            health_threshold: 2,
            ..sup()
        };
        let mut r = Run::new(&s, t0, false);
        assert_eq!(r.initial_state(), State::Starting);
        assert_eq!(r.on_tick(t0 + 200 * MS), vec![Action::StartProbe]);
        // Running already: no second probe at the same time.
        assert_eq!(r.next_deadline(), None);
        // A failure before readiness is "not ready yet".
        let a = r.on_probe(false, Some(1), "no", t0 + 210 * MS);
        assert!(!a.contains(&Action::State(State::Unhealthy)));
        assert!(!r.ending());
        assert_eq!(r.next_deadline(), Some(t0 + 410 * MS));
        r.on_tick(t0 + 410 * MS);
        let a = r.on_probe(true, Some(0), "", t0 + 420 * MS);
        assert!(a.contains(&Action::MarkReady) && a.contains(&Action::State(State::Ready)));
        assert!(emitted(&a, "ready") && emitted(&a, "health"), "{a:?}");
        let a = r.on_probe(false, Some(1), "down", t0 + 620 * MS);
        assert!(a.contains(&Action::State(State::Unhealthy)));
        assert!(!r.ending(), "below the threshold");
        r.on_probe(false, Some(1), "down", t0 + 820 * MS);
        assert!(r.ending());
        // Ending: no new probe.
        assert_eq!(r.on_tick(t0 + 820 * MS), vec![Action::KillAll]);
        assert!(r.on_tick(t0 + 1100 * MS).is_empty());
        let (reason, healthy, _) = r.finish(None);
        assert_eq!(reason, EndReason::HealthFailed { failures: 2 });
        assert_eq!(healthy, None, "unhealthy at the end");
    }

    #[test]
    fn stop_sends_term_kills_after_the_grace_and_stays_stopped() {
        let t0 = Instant::now();
        let mut r = Run::new(&sup(), t0, false);
        let a = r.on_command(Command::Stop { grace: 50 * MS }, t0);
        assert_eq!(a, vec![Action::Signal(libc::SIGTERM)]);
        assert!(r.on_tick(t0 + 49 * MS).is_empty());
        assert_eq!(r.on_tick(t0 + 50 * MS), vec![Action::KillAll]);
        let (reason, _, then) = r.finish(Some(&exit(None, Some(libc::SIGTERM))));
        assert_eq!(reason, EndReason::StoppedByUs);
        assert_eq!(then, Then::Stop);
    }

    #[test]
    fn restart_and_remove_win_over_a_stop_and_use_the_stop_timeout() {
        let t0 = Instant::now();
        let mut r = Run::new(&sup(), t0, false);
        r.on_command(Command::Restart, t0);
        r.on_command(Command::Stop { grace: 5 * MS }, t0);
        assert_eq!(r.next_deadline(), Some(t0 + 5 * MS), "the shorter grace");
        assert_eq!(r.clone().finish(None).2, Then::Restart);
        r.on_command(Command::Remove, t0);
        let (reason, _, then) = r.finish(None);
        assert_eq!((reason, then), (EndReason::StoppedByUs, Then::Remove));
        let mut r = Run::new(&sup(), t0, false);
        r.on_command(Command::Remove, t0);
        assert_eq!(r.next_deadline(), Some(t0 + sup().stop_timeout()));
    }

    #[test]
    fn an_operators_term_is_not_a_crash() {
        // Issue 20: `kill -s TERM` then the agent dies of it (or exits 143 from a shell).
        let t0 = Instant::now();
        for rec in [
            exit(None, Some(libc::SIGTERM)),
            exit(Some(128 + libc::SIGTERM), None),
        ] {
            let mut r = Run::new(&sup(), t0, false);
            let a = r.on_command(
                Command::Kill {
                    signal: libc::SIGTERM,
                    delivered: true,
                },
                t0,
            );
            assert!(a.is_empty(), "the shell sent it: {a:?}");
            assert!(!r.ending(), "the agent may handle it");
            let (reason, _, then) = r.finish(Some(&rec));
            assert_eq!(
                reason,
                EndReason::KilledByOperator {
                    signal: libc::SIGTERM
                }
            );
            assert_eq!(then, Then::Policy);
            for restart in [RestartPolicy::OnFailure, RestartPolicy::Always] {
                let s = Supervision { restart, ..sup() };
                let d = RestartTracker::new(1).decide(&s, &reason, 0);
                assert_eq!(resting_state(d, &reason), Some(State::Exited));
            }
        }
        // A signal nobody sent is a crash; one not delivered was not sent.
        let mut r = Run::new(&sup(), t0, false);
        r.on_command(
            Command::Kill {
                signal: libc::SIGTERM,
                delivered: false,
            },
            t0,
        );
        assert_eq!(
            r.finish(Some(&exit(None, Some(libc::SIGTERM)))).0,
            EndReason::Signaled {
                signal: libc::SIGTERM
            }
        );
    }

    #[test]
    fn an_operators_sigkill_kills_everything_and_is_a_stop() {
        let t0 = Instant::now();
        let mut r = Run::new(&sup(), t0, false);
        let a = r.on_command(
            Command::Kill {
                signal: libc::SIGKILL,
                delivered: true,
            },
            t0,
        );
        assert_eq!(a, vec![Action::KillAll]);
        let (reason, _, then) = r.finish(Some(&exit(None, Some(libc::SIGKILL))));
        assert_eq!((reason, then), (EndReason::StoppedByUs, Then::Policy));
    }

    #[test]
    fn preemption_keeps_the_queue_place_and_a_second_eviction_is_ignored() {
        let t0 = Instant::now();
        let mut r = Run::new(&sup(), t0, false);
        let pre = EndReason::GpuPreempted { by: "b".into() };
        let a = r.on_command(
            Command::Evict {
                reason: pre.clone(),
                grace: 10 * MS,
            },
            t0,
        );
        assert_eq!(a, vec![Action::KeepGpuPlace, Action::Signal(libc::SIGTERM)]);
        let over = EndReason::GpuEvicted {
            device: 0,
            used_mb: 2,
            reserved_mb: 1,
        };
        assert!(r
            .on_command(
                Command::Evict {
                    reason: over,
                    grace: MS
                },
                t0
            )
            .is_empty());
        assert_eq!(r.next_deadline(), Some(t0 + 10 * MS));
        assert_eq!(r.finish(None).0, pre);
    }

    #[test]
    fn pain_and_a_revoked_token_end_the_run_at_once_first_reason_wins() {
        let t0 = Instant::now();
        let mut r = Run::new(&sup(), t0, false);
        let pain = EndReason::Pain {
            signal: "agent".into(),
            reason: "x".into(),
        };
        r.end(pain.clone(), t0);
        r.end(
            EndReason::TokenInvalid {
                error: "revoked".into(),
            },
            t0,
        );
        assert_eq!(r.on_tick(t0), vec![Action::KillAll]);
        assert_eq!(r.finish(None).0, pain.clone());
        // Issue 20: under --restart never, pain ends it exited.
        let never = Supervision {
            restart: RestartPolicy::Never,
            ..sup()
        };
        let d = RestartTracker::new(1).decide(&never, &pain, 0);
        assert_eq!(resting_state(d, &pain), Some(State::Exited));
        let d = RestartTracker::new(1).decide(&sup(), &pain, 0);
        assert_eq!(resting_state(d, &pain), None, "on-failure restarts it");
    }

    #[test]
    fn the_exit_record_reads_as_the_end_reason() {
        let t0 = Instant::now();
        let r = || Run::new(&sup(), t0, false);
        assert_eq!(r().finish(None).0, EndReason::Lost);
        assert_eq!(
            r().finish(Some(&exit(Some(3), None))).0,
            EndReason::Exited { code: 3 }
        );
        let mut oom = exit(None, Some(libc::SIGKILL));
        oom.oom_killed = true;
        assert_eq!(r().finish(Some(&oom)).0, EndReason::OomKilled);
        let mut failed = exit(Some(127), None);
        failed.launch_error = Some("not found".into());
        assert_eq!(
            r().finish(Some(&failed)).0,
            EndReason::LaunchFailed {
                code: 127,
                error: "not found".into()
            }
        );
    }

    #[test]
    fn resting_states_after_the_policy_decided() {
        let ex = EndReason::Exited { code: 1 };
        assert_eq!(resting_state(Decision::Done, &ex), Some(State::Exited));
        assert_eq!(resting_state(Decision::GiveUp, &ex), Some(State::Failed));
        assert_eq!(resting_state(Decision::Restart(MS), &ex), None);
        let tok = EndReason::TokenInvalid { error: "x".into() };
        assert_eq!(resting_state(Decision::Done, &tok), Some(State::Failed));
    }

    #[test]
    fn commands_between_runs() {
        let stop = Command::Stop { grace: MS };
        let kill = Command::Kill {
            signal: 15,
            delivered: false,
        };
        let t = |at, c: &Command| idle_command(at, "a", c);
        assert_eq!(t(Idle::Resting, &stop), IdleReply::Ok);
        assert_eq!(t(Idle::Backoff, &stop), IdleReply::Leave(Then::Stop));
        assert_eq!(t(Idle::Queued, &stop), IdleReply::Leave(Then::Stop));
        assert_eq!(
            t(Idle::Resting, &kill),
            IdleReply::Refuse("a is not running".into())
        );
        assert_eq!(
            t(Idle::Backoff, &kill),
            IdleReply::Refuse("a is in backoff, not running".into())
        );
        assert_eq!(
            t(Idle::Queued, &kill),
            IdleReply::Refuse("a is queued for a GPU, not running".into())
        );
        assert_eq!(
            t(Idle::Resting, &Command::Restart),
            IdleReply::Leave(Then::Restart)
        );
        assert_eq!(
            t(Idle::Backoff, &Command::Restart),
            IdleReply::Leave(Then::Restart)
        );
        assert_eq!(t(Idle::Queued, &Command::Restart), IdleReply::Ok);
        for at in [Idle::Resting, Idle::Backoff, Idle::Queued] {
            assert_eq!(t(at, &Command::Remove), IdleReply::Leave(Then::Remove));
        }
    }

    #[test]
    fn a_pause_suspends_the_watchdog_and_health_checks_and_the_resume_rearms_them_from_now() {
        let t0 = Instant::now();
        let s = Supervision {
            watchdog_ms: Some(100),
            health_cmd: Some(vec!["true".into()]),
            health_interval_ms: 200,
            ..sup()
        };
        let mut r = Run::new(&s, t0, true);
        assert_eq!(r.may_pause(), Ok(()));
        let a = r.on_paused(State::Ready, t0 + 50 * MS);
        assert_eq!(a[0], Action::State(State::Paused));
        assert!(emitted(&a, "paused"), "{a:?}");
        assert_eq!(
            r.next_deadline(),
            None,
            "nothing runs against a frozen agent"
        );
        // Long past every deadline: no miss, no probe, no failure.
        assert!(r.on_tick(t0 + 10_000 * MS).is_empty());
        assert!(!r.ending());
        // A heartbeat read after the freeze does not arm the watchdog.
        assert!(r.on_frame(Frame::Heartbeat, t0 + 10_000 * MS).is_empty());
        assert_eq!(r.next_deadline(), None);
        assert_eq!(r.may_pause(), Err(PauseRefusal::AlreadyPaused));

        let t1 = t0 + 20_000 * MS;
        let a = r.on_resumed(t1);
        assert_eq!(a[0], Action::State(State::Ready));
        assert!(emitted(&a, "resumed"), "{a:?}");
        assert_eq!(
            r.next_deadline(),
            Some(t1 + 100 * MS),
            "the watchdog, from now"
        );
        assert!(r.on_tick(t1 + 99 * MS).is_empty());
        assert_eq!(r.may_resume(), Err(PauseRefusal::NotPaused));
        let a = r.on_tick(t1 + 100 * MS);
        assert!(emitted(&a, "watchdog_miss"), "{a:?}");
    }

    #[test]
    fn a_probe_running_at_the_pause_is_not_counted() {
        let t0 = Instant::now();
        let s = Supervision {
            health_cmd: Some(vec!["true".into()]),
            health_interval_ms: 200,
            health_threshold: 1,
            ..sup()
        };
        let mut r = Run::new(&s, t0, true);
        assert_eq!(r.on_tick(t0 + 200 * MS), vec![Action::StartProbe]);
        r.on_paused(State::Running, t0 + 210 * MS);
        // It timed out against the frozen sandbox: dropped, while paused...
        assert!(r.on_probe(false, None, "timeout", t0 + 400 * MS).is_empty());
        assert!(!r.ending());
        // ...and also when it comes back after the resume.
        let mut r2 = Run::new(&s, t0, true);
        r2.on_tick(t0 + 200 * MS);
        r2.on_paused(State::Running, t0 + 210 * MS);
        r2.on_resumed(t0 + 300 * MS);
        assert!(r2
            .on_probe(false, None, "timeout", t0 + 400 * MS)
            .is_empty());
        assert!(!r2.ending());
        assert_eq!(r2.next_deadline(), Some(t0 + 600 * MS));
        // The next one counts.
        r2.on_tick(t0 + 600 * MS);
        r2.on_probe(false, Some(1), "down", t0 + 610 * MS);
        assert!(r2.ending());
    }

    #[test]
    fn stop_restart_and_remove_of_a_paused_agent_thaw_it_first() {
        let t0 = Instant::now();
        for cmd in [
            Command::Stop { grace: 5 * MS },
            Command::Restart,
            Command::Remove,
        ] {
            let mut r = Run::new(&sup(), t0, false);
            r.on_paused(State::Running, t0);
            let a = r.on_command(cmd.clone(), t0);
            assert_eq!(
                a[..3],
                [
                    Action::Thaw,
                    Action::State(State::Running),
                    Action::Signal(libc::SIGTERM)
                ],
                "{cmd:?}"
            );
            assert!(!r.is_paused());
            assert_eq!(r.may_pause(), Err(PauseRefusal::Ending));
        }
        // SIGKILL kills it frozen (kill_all thaws on v1); another signal waits for the resume.
        let mut r = Run::new(&sup(), t0, false);
        r.on_paused(State::Running, t0);
        let term = Command::Kill {
            signal: libc::SIGTERM,
            delivered: true,
        };
        assert!(r.on_command(term, t0).is_empty());
        assert!(r.is_paused());
        let kill = Command::Kill {
            signal: libc::SIGKILL,
            delivered: true,
        };
        assert_eq!(r.on_command(kill, t0), vec![Action::KillAll]);
    }

    #[test]
    fn ready_while_paused_is_kept_for_the_resume() {
        let t0 = Instant::now();
        let s = Supervision {
            wait_ready: true,
            startup_timeout_ms: Some(100),
            ..sup()
        };
        let mut r = Run::new(&s, t0, false);
        r.on_paused(State::Starting, t0 + 10 * MS);
        assert_eq!(r.next_deadline(), None, "the startup timeout waits too");
        let a = r.on_frame(Frame::Ready, t0 + 20 * MS);
        assert!(!a.iter().any(|x| matches!(x, Action::State(_))), "{a:?}");
        assert_eq!(r.on_resumed(t0 + 30 * MS)[0], Action::State(State::Ready));
        assert_eq!(r.next_deadline(), None, "ready: no startup timeout");
        // Not ready yet at the resume: the startup timeout starts again from then.
        let mut r = Run::new(&s, t0, false);
        r.on_paused(State::Starting, t0 + 10 * MS);
        assert_eq!(
            r.on_resumed(t0 + 500 * MS)[0],
            Action::State(State::Starting)
        );
        assert_eq!(r.next_deadline(), Some(t0 + 600 * MS));
    }

    #[test]
    fn pause_between_runs_is_refused_saying_where_the_agent_is() {
        assert_eq!(
            idle_pause(Idle::Resting, "a", State::Stopped),
            "a is not running (stopped): only a running agent can be paused or resumed"
        );
        assert!(idle_pause(Idle::Backoff, "a", State::Backoff).contains("backoff"));
        assert!(idle_pause(Idle::Queued, "a", State::Queued).contains("queued for a GPU"));
    }
}
