//! After a restart (a crash included), aitherd takes back what it supervised: every agent in
//! the state database whose sandbox still runs is re-adopted through its cgroup
//! (`aither/<name>-<shim pid>`) and its shim; one whose sandbox ended while the daemon was down
//! is judged by the shim's exit record and restarted per its policy; a shim nobody knows is
//! killed. No agent is left unsupervised, and none is started twice: adoption comes first.

use std::collections::HashMap;

use serde_json::json;

use super::agent::{self, Record};
use super::shim::{self, ExitRecord};
use super::store;
use super::supervise::{RestartPolicy, State};
use super::{DaemonError, Shared};
use crate::cgroup::stats;

/// What recovery did.
#[derive(Debug, Default)]
pub struct Recovered {
    pub adopted: usize,
    pub restarted: usize,
    pub resting: usize,
    pub killed_strays: usize,
}

fn parse_state(s: &str) -> State {
    serde_json::from_value(json!(s)).unwrap_or(State::Created)
}

/// Whether a run that ended while the daemon was down should start again now.
fn should_restart(rec: &Record, exit: Option<&ExitRecord>) -> bool {
    let sup = &rec.request.supervision;
    match sup.restart {
        RestartPolicy::Never => false,
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => match exit {
            Some(e) if e.launch_error.is_none() && e.signal.is_none() => {
                !e.code.is_some_and(|c| sup.success_codes.contains(&c))
            }
            _ => true,
        },
    }
}

pub fn recover(d: &Shared) -> Result<Recovered, DaemonError> {
    let mut out = Recovered::default();
    let rows = {
        let c = d.store.reader()?;
        store::load_agents(&c, d.store.path())?
    };
    // Live shims by agent name, found through their cgroups: `<agent>-<shim pid>` for a cold
    // shim, `pool-<shim pid>` for a prepared sandbox's launcher that became a spawn's shim
    // (daemon/pool.rs; its agent is named by its working directory).
    let mut shims: HashMap<String, Vec<(i32, String)>> = HashMap::new();
    for id in stats::list_ids(&*d.cgroups) {
        let Some((prefix, pid)) = id.rsplit_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        // Only shims of this daemon (working in our state directory): another daemon's, or
        // `aitherctl run` sandboxes, are not ours to adopt or kill.
        let Some(name) = agent_of_shim(d, pid, prefix) else {
            continue;
        };
        shims.entry(name).or_default().push((pid, id.clone()));
    }
    // The GPU queue and leases before any agent asks again: a lease whose sandbox still runs
    // is held again; a queued request keeps its place.
    {
        let c = d.store.reader()?;
        let gpu_rows = store::load_gpu(&c, d.store.path())?;
        let running: Vec<String> = shims.keys().cloned().collect();
        d.gpu.restore(d, gpu_rows, &running);
    }
    let mut agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
    for row in rows {
        let rec: Record = match serde_json::from_value(row.record.clone()) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(agent = %row.name, error = %e, "unreadable agent record; left in the database, not supervised");
                d.emit(
                    Some(&row.name),
                    "corrupt_record",
                    json!({"error": e.to_string()}),
                );
                continue;
            }
        };
        let state = parse_state(&row.state);
        let log_dir = d.log_dir(&row.name);
        let mut adopted = None;
        for (pid, id) in shims.remove(&row.name).unwrap_or_default() {
            if adopted.is_none() {
                match shim::adopt(pid, &id, &log_dir) {
                    Ok(mut l) => {
                        l.was_ready = matches!(
                            state,
                            State::Ready | State::Running | State::Unhealthy | State::Paused
                        );
                        adopted = Some(l);
                        continue;
                    }
                    Err(e) => tracing::warn!(agent = %row.name, pid, error = %e, "cannot adopt"),
                }
            }
            kill_stray(d, pid, &id);
            out.killed_strays += 1;
        }
        let handle = if let Some(l) = adopted {
            d.emit(
                Some(&row.name),
                "adopted",
                json!({"shim_pid": l.shim_pid, "pid1": l.pid1, "cgroup": l.cgroup_id}),
            );
            out.adopted += 1;
            agent::start(d.clone(), rec, Some(l), None, None, row.restarts)
        } else if state == State::Queued {
            // Waiting for a GPU when the daemon stopped: back in the queue at its place.
            out.restarted += 1;
            agent::start(d.clone(), rec, None, None, None, row.restarts)
        } else if matches!(state, State::Stopped | State::Exited | State::Failed) {
            out.resting += 1;
            agent::start(d.clone(), rec, None, Some(state), None, row.restarts)
        } else {
            // It was running (or about to) and its sandbox is gone.
            let exit = shim::read_exit(&log_dir);
            let reason = match &exit {
                Some(e) => format!("{e:?}"),
                None => "no exit record".into(),
            };
            d.emit(Some(&row.name), "ended_while_down", json!({"exit": reason}));
            d.clear_working_memory(&row.name);
            if should_restart(&rec, exit.as_ref()) {
                out.restarted += 1;
                agent::start(d.clone(), rec, None, None, None, row.restarts)
            } else {
                out.resting += 1;
                agent::start(
                    d.clone(),
                    rec,
                    None,
                    Some(State::Exited),
                    None,
                    row.restarts,
                )
            }
        };
        agents.insert(row.name.clone(), handle);
    }
    // Shims of agents the database does not know (spawned just before a crash, before their
    // record was committed; or removed): ours, and unsupervised, so they go.
    for pids in shims.into_values() {
        for (pid, id) in pids {
            kill_stray(d, pid, &id);
            out.killed_strays += 1;
        }
    }
    Ok(out)
}

/// The agent whose shim `pid` is, when it is one of this daemon's: a shim working in
/// `log_dir(name)`, in the cgroup named after that agent or, for a warm one, after the pool's
/// template (`pool`).
fn agent_of_shim(d: &Shared, pid: i32, prefix: &str) -> Option<String> {
    if !shim::is_shim(pid) {
        return None;
    }
    let dir = shim::shim_dir(pid)?;
    let name = dir.file_name()?.to_str()?.to_string();
    let ours = dir == d.log_dir(&name);
    (ours && (prefix == name || prefix == super::pool::TEMPLATE_NAME)).then_some(name)
}

fn kill_stray(d: &Shared, pid: i32, id: &str) {
    tracing::warn!(pid, cgroup = id, "killing a sandbox no agent record owns");
    if let Some(cg) = stats::open_existing(&*d.cgroups, id) {
        d.cgroups.kill_all(&cg);
    }
    // A pid verified just now to be an aither-init shim in our cgroup subtree; gone meanwhile
    // is no error.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}
