//! The layer operations aitherd does for an agent's owner (docs/workspaces.md "Who may"):
//! `discard`, `snapshot`, `snapshot_rm`, `restore` on the root-owned layer, and `fork`, which
//! copies the layer (and the memory tiers) and spawns the new agent through the same path as
//! `spawn`. Each is checked against the agent's owner, audited, and announced on the bus
//! (`aither.agent.<name>.layer_*`).

use std::os::fd::OwnedFd;

use serde_json::json;

use super::agent::{Cmd, Record};
use super::identity::Caller;
use super::proto::{ErrorCode, Reply};
use super::server::{authorize, command, not_found, spawn};
use super::supervise::State;
use super::Shared;
use crate::agent_name::AgentName;
use crate::audit::{Entry, Verdict};
use crate::sandbox::layer as core_layer;
use aither_proto::control::{ForkMemory, LayerAction};

fn layer_of(name: &str) -> std::path::PathBuf {
    core_layer::layer_path(&crate::token::state_dir(), name)
}

/// One audit record of a layer operation done by aitherd.
fn audit(
    d: &Shared,
    kind: &str,
    name: &str,
    caller: &Caller,
    owner: Option<u32>,
    reply: &Reply,
    data: serde_json::Value,
) {
    let (verdict, rule) = match &reply.error {
        None => (
            Verdict::Allow,
            "owner: the agent's owner, root or aither-admin".to_string(),
        ),
        Some(e) => (Verdict::Deny, format!("{}: {}", e.code, e.message)),
    };
    let mut e = Entry::new(kind, verdict, rule)
        .agent(name)
        .actor(caller.actor())
        .caller(caller.uid)
        .via(caller.via_name())
        .data(data);
    if let Some(o) = owner {
        e = e.owner(o);
    }
    d.audit.record(e);
}

/// Refuses while aitherd runs a sandbox of `name` (or is about to).
fn refuse_live(d: &Shared, name: &str) -> Result<(), Reply> {
    match d.info_of(name) {
        Some(i) if i.state.is_live() || i.state == State::Backoff || i.state == State::Queued => {
            Err(Reply::err(
                ErrorCode::Conflict,
                format!(
                    "{name} is {}: stop it first (`aitherctl stop {name}`)",
                    i.state
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Runs `f` off the async threads with agent `name` frozen if it runs (thawed whatever `f`
/// returns); `f` learns whether it was frozen.
async fn frozen<T: Send + 'static>(
    d: &Shared,
    name: &str,
    f: impl FnOnce(bool) -> Result<T, String> + Send + 'static,
) -> Result<T, Reply> {
    let state = d.info_of(name).map(|i| i.state);
    let running = matches!(
        state,
        Some(State::Starting | State::Running | State::Ready | State::Unhealthy)
    );
    if running {
        let r = command(d, name, |reply| Cmd::Pause { reply }).await;
        if !r.ok {
            return Err(r);
        }
    }
    let was = running || state == Some(State::Paused);
    let out = tokio::task::spawn_blocking(move || f(was)).await;
    if running {
        let r = command(d, name, |reply| Cmd::Resume { reply }).await;
        if !r.ok {
            tracing::warn!(agent = name, error = ?r.error, "thawing the agent after a layer copy");
        }
    }
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Reply::err(ErrorCode::Invalid, format!("{name}: {e}"))),
        Err(e) => Err(Reply::err(ErrorCode::Internal, e.to_string())),
    }
}

async fn blocking<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Reply> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Reply::err(ErrorCode::Invalid, format!("{name}: {e}"))),
        Err(e) => Err(Reply::err(ErrorCode::Internal, e.to_string())),
    }
}

/// `Request::LayerOp`.
pub(super) async fn op(
    d: &Shared,
    caller: &Caller,
    name: String,
    action: LayerAction,
    tag: Option<String>,
    keep: Option<u32>,
    paths: Vec<String>,
) -> Reply {
    let kind = match action {
        LayerAction::Discard => "layer_discard",
        LayerAction::Snapshot => "layer_snapshot",
        LayerAction::SnapshotRm => "layer_snapshot_rm",
        LayerAction::Restore => "layer_restore",
        LayerAction::Applied => "layer_apply",
    };
    let owner = match authorize(d, caller, kind, &name) {
        // Refused (audited there) as if there were no such agent.
        Err(reply) => return reply,
        Ok(o) => o,
    };
    let reply = match owner {
        None => not_found(&name),
        Some(_) => match run_op(d, &name, action, tag.clone(), keep, paths).await {
            Ok(data) => Reply::ok(data),
            Err(r) => r,
        },
    };
    audit(
        d,
        kind,
        &name,
        caller,
        owner,
        &reply,
        json!({"tag": reply.data.as_ref().and_then(|v| v.get("tag").cloned()).or(tag.map(serde_json::Value::from)), "keep": keep, "via_daemon": true}),
    );
    if let Some(data) = reply.data.as_ref().filter(|_| reply.ok) {
        let event = match action {
            LayerAction::Discard => "layer_discarded",
            LayerAction::Snapshot => "layer_snapshot",
            LayerAction::SnapshotRm => "layer_snapshot_removed",
            LayerAction::Restore => "layer_restored",
            LayerAction::Applied => "layer_applied",
        };
        d.emit(Some(&name), event, data.clone());
    }
    reply
}

async fn run_op(
    d: &Shared,
    name: &str,
    action: LayerAction,
    tag: Option<String>,
    keep: Option<u32>,
    mut paths: Vec<String>,
) -> Result<serde_json::Value, Reply> {
    let layer = layer_of(name);
    let need_tag = || {
        tag.clone()
            .ok_or_else(|| Reply::err(ErrorCode::Invalid, "this layer operation needs a tag"))
    };
    match action {
        // The caller's own report of what it applied (as the owner, with their rights):
        // recorded as theirs, bounded, nothing done to the layer.
        LayerAction::Applied => {
            const MAX_PATHS: usize = 10_000;
            let total = paths.len();
            paths.truncate(MAX_PATHS);
            for p in &mut paths {
                if p.len() > 4096 {
                    let cut = (0..=4096)
                        .rev()
                        .find(|&i| p.is_char_boundary(i))
                        .unwrap_or(0);
                    p.truncate(cut);
                }
            }
            Ok(json!({"paths": paths, "count": total, "reported": true}))
        }
        LayerAction::Discard => {
            refuse_live(d, name)?;
            blocking(name, move || {
                core_layer::discard(&layer).map_err(|e| e.to_string())
            })
            .await?;
            Ok(json!({"discarded": true}))
        }
        LayerAction::Restore => {
            refuse_live(d, name)?;
            let tag = need_tag()?;
            let t2 = tag.clone();
            let stats = blocking(name, move || {
                core_layer::restore(&layer, &t2).map_err(|e| e.to_string())
            })
            .await?;
            Ok(json!({"tag": tag, "stats": stats}))
        }
        LayerAction::SnapshotRm => {
            let tag = need_tag()?;
            let t2 = tag.clone();
            blocking(name, move || {
                core_layer::remove_snapshot(&layer, &t2).map_err(|e| e.to_string())
            })
            .await?;
            Ok(json!({"tag": tag}))
        }
        LayerAction::Snapshot => {
            let (snap, pruned) = frozen(d, name, move |was| {
                let tag = match tag {
                    Some(t) => t,
                    None => core_layer::next_tag(&layer).map_err(|e| e.to_string())?,
                };
                let snap = core_layer::snapshot(&layer, &tag, was).map_err(|e| e.to_string())?;
                let pruned = match keep {
                    Some(k) => core_layer::prune_snapshots(&layer, k as usize)
                        .map_err(|e| e.to_string())?,
                    None => Vec::new(),
                };
                Ok((snap, pruned))
            })
            .await?;
            let mut v = serde_json::to_value(&snap).unwrap_or_default();
            v["pruned"] = json!(pruned);
            Ok(v)
        }
    }
}

/// Refuses a fork the spawn would refuse for the number of agents (the caller's per-user
/// limit, the host's cap), before anything is copied.
fn precheck_limits(d: &Shared, caller: &Caller) -> Result<(), Reply> {
    let loaded = d.config();
    let (held, total) = {
        let agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
        (super::usage_in(&agents, caller.uid), agents.len())
    };
    if !caller.admin {
        let name = super::users::user_name(caller.uid);
        if let Some(max) = loaded.config.users.limits_of(name.as_deref()).agents {
            if held.agents >= max {
                return Err(Reply::err(
                    ErrorCode::Denied,
                    format!("per-user limit: you hold {} agents, the most allowed is {max} (aitherd.toml [users])", held.agents),
                ));
            }
        }
    }
    if let Some(max) = loaded.config.limits.max_agents {
        if total >= max {
            return Err(Reply::err(
                ErrorCode::Denied,
                format!("host limit: aitherd holds {total} agents, the most allowed is {max} (aitherd.toml [limits] max_agents)"),
            ));
        }
    }
    Ok(())
}

/// The uids with a fork in progress: a user's forks run one at a time, so the daemon's
/// copying work for one user is one layer and one memory at a time.
static FORKING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

struct OneForkPerUser(u32);

impl OneForkPerUser {
    fn take(uid: u32) -> Result<OneForkPerUser, Reply> {
        let mut f = FORKING.lock().unwrap_or_else(|e| e.into_inner());
        if f.contains(&uid) {
            return Err(Reply::err(
                ErrorCode::Conflict,
                "a fork of yours is in progress; try again when it is done",
            ));
        }
        f.push(uid);
        Ok(OneForkPerUser(uid))
    }
}

impl Drop for OneForkPerUser {
    fn drop(&mut self) {
        let mut f = FORKING.lock().unwrap_or_else(|e| e.into_inner());
        f.retain(|u| *u != self.0);
    }
}

/// NAME's stored record (the one its supervisor was started with).
fn record_of(d: &Shared, name: &str) -> Option<Record> {
    let c = d.store.reader().ok()?;
    let rows = super::store::load_agents(&c, d.store.path()).ok()?;
    rows.into_iter()
        .find(|r| r.name == name)
        .and_then(|r| serde_json::from_value(r.record).ok())
}

/// What a fork asks for.
pub(super) struct ForkAsk {
    pub name: String,
    pub new: String,
    pub from: Option<String>,
    pub argv: Vec<String>,
    pub memory: ForkMemory,
    pub token: Option<String>,
}

/// `Request::Fork`.
pub(super) async fn fork(d: &Shared, caller: &Caller, ask: ForkAsk, fds: Vec<OwnedFd>) -> Reply {
    let owner = match authorize(d, caller, "layer_fork", &ask.name) {
        Err(reply) => return reply,
        Ok(o) => o,
    };
    let data = json!({"new": ask.new, "from": ask.from, "argv": ask.argv,
                      "memory": ask.memory, "token_given": ask.token.is_some()});
    let reply = match owner {
        None => not_found(&ask.name),
        Some(owner) => match fork_inner(d, caller, owner, &ask, fds).await {
            Ok(v) => Reply::ok(v),
            Err(r) => r,
        },
    };
    audit(d, "layer_fork", &ask.name, caller, owner, &reply, data);
    if let Some(v) = reply.data.as_ref().filter(|_| reply.ok) {
        let ev = json!({"new": ask.new, "from": ask.from, "memory": ask.memory,
                        "layer": v.get("layer"), "memory_entries": v.get("memory_entries")});
        d.emit(Some(&ask.name), "layer_forked", ev.clone());
        d.emit(
            Some(&ask.new),
            "forked_from",
            json!({"name": ask.name, "from": ask.from}),
        );
    }
    reply
}

async fn fork_inner(
    d: &Shared,
    caller: &Caller,
    owner: u32,
    ask: &ForkAsk,
    fds: Vec<OwnedFd>,
) -> Result<serde_json::Value, Reply> {
    AgentName::parse("NEW", &ask.new).map_err(|e| Reply::err(ErrorCode::Invalid, e.to_string()))?;
    if ask.new == ask.name {
        return Err(Reply::err(ErrorCode::Invalid, "NEW must differ from NAME"));
    }
    // `authorize` let through the owner and admins only. NEW is the caller's agent: a
    // member's fork of their own, or an admin's, who could spawn on that directory and read
    // that memory anyway (admins act on every agent).
    debug_assert!(owner == caller.uid || caller.admin);
    let Some(rec) = record_of(d, &ask.name) else {
        return Err(not_found(&ask.name));
    };
    // The name must be free: no agent, no kept memory, no layer (checked by the copy).
    if d.name_owner(&ask.new).is_some() {
        return Err(Reply::err(
            ErrorCode::Exists,
            format!("the name {:?} is taken; pick another", ask.new),
        ));
    }
    if rec.request.token.is_some() && ask.token.is_none() {
        return Err(Reply::err(
            ErrorCode::Invalid,
            format!(
                "{} was spawned with a token of its own, and a token names its agent (subject {:?}): \
                 mint one for {} (`aitherctl token mint … --subject {}`) and give it with --token",
                ask.name, ask.name, ask.new, ask.new
            ),
        ));
    }
    // The copies are daemon work done before the spawn's own checks: the caller's agent
    // limits and the host's are checked first, and one fork per user runs at a time.
    precheck_limits(d, caller)?;
    let _one = OneForkPerUser::take(caller.uid)?;
    // Hold the name for the caller while the copies are made: nobody else may take it and
    // inherit what is copied under it.
    {
        let mut owners = d.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.contains_key(&ask.new) || d.owner_of(&ask.new).is_some() {
            return Err(Reply::err(
                ErrorCode::Exists,
                format!("the name {:?} is taken; pick another", ask.new),
            ));
        }
        owners.insert(ask.new.clone(), caller.uid);
    }
    d.store.put_owner(&ask.new, caller.uid);
    let r = fork_copy_and_spawn(d, caller, ask, rec, fds).await;
    if r.is_err() {
        // Nothing is left under NEW: its layer and memory copies go, the name is free again.
        if d.owner_of(&ask.new).is_none() {
            let layer = layer_of(&ask.new);
            let _ = tokio::task::spawn_blocking(move || core_layer::remove(&layer)).await;
            let d2 = d.clone();
            let n2 = ask.new.clone();
            let _ = tokio::task::spawn_blocking(move || d2.memory.clear(&n2, None)).await;
            d.store.delete_owner(&ask.new);
            d.owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ask.new);
        }
    }
    r
}

async fn fork_copy_and_spawn(
    d: &Shared,
    caller: &Caller,
    ask: &ForkAsk,
    rec: Record,
    fds: Vec<OwnedFd>,
) -> Result<serde_json::Value, Reply> {
    // 0. The same directory: the one NAME was spawned on (its pinned identity), not whatever
    //    is at the path now. A member's presented descriptor is what is checked (the spawn
    //    then checks the path against it); root's and an admin's path is opened here.
    if let Some(w) = rec.spec.workspace.as_ref() {
        if let Some(pinned) = w.pinned {
            let now = match fds.first() {
                Some(fd) => rustix::fs::fstat(fd)
                    .map(|st| (st.st_dev, st.st_ino))
                    .map_err(|e| e.to_string()),
                None => crate::sandbox::workspace::open_checked(&w.path, None)
                    .map(|o| (o.id.dev, o.id.ino))
                    .map_err(|e| e.to_string()),
            };
            if now.as_ref().ok() != Some(&(pinned.dev, pinned.ino)) {
                return Err(Reply::err(
                    ErrorCode::Conflict,
                    format!(
                        "{}: no longer the directory {} was spawned on (replaced or moved{}); nothing is forked",
                        w.path.display(),
                        ask.name,
                        now.err().map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                ));
            }
        }
    }
    // 1. The layer, when NAME has one (a layered workspace): from the snapshot, or its
    //    current state with NAME frozen for the copy.
    let (src, dst, from) = (layer_of(&ask.name), layer_of(&ask.new), ask.from.clone());
    let has_layer = src.exists();
    let layer = if has_layer || from.is_some() {
        let stats = if from.is_some() {
            blocking(&ask.name, move || {
                core_layer::fork(&src, &dst, from.as_deref()).map_err(|e| e.to_string())
            })
            .await?
        } else {
            frozen(d, &ask.name, move |_| {
                core_layer::fork(&src, &dst, None).map_err(|e| e.to_string())
            })
            .await?
        };
        Some(stats)
    } else {
        None
    };
    // 2. The memory tiers (not `working`: the scratch of NAME's current run), before NEW
    //    starts, so its first run reads them.
    let memory_entries = match ask.memory {
        ForkMemory::None => 0,
        ForkMemory::Copy => {
            let d2 = d.clone();
            let (from, to) = (ask.name.clone(), ask.new.clone());
            blocking(&ask.name, move || copy_memory(&d2, &from, &to)).await?
        }
    };
    // 3. NEW, spawned as NAME was: same policy (or the given token), workspace, supervision,
    //    environment and limits; the command given, else NAME's. Published services and host
    //    ports are NAME's alone.
    let mut req = rec.request.clone();
    req.name = ask.new.clone();
    if !ask.argv.is_empty() {
        req.argv = ask.argv.clone();
    }
    if ask.token.is_some() {
        req.token = ask.token.clone();
    }
    req.replace = false;
    req.publish.clear();
    req.publish_host.clear();
    let reply = spawn(d, req, caller, fds).await;
    if !reply.ok {
        return Err(reply);
    }
    Ok(json!({
        "name": ask.name,
        "new": ask.new,
        "from": ask.from,
        "layer": layer,
        "memory": ask.memory,
        "memory_entries": memory_entries,
        "agent": reply.data,
    }))
}

/// Copies `from`'s memory (every tier but `working`) to `to`, all or nothing; how many
/// records.
fn copy_memory(d: &Shared, from: &str, to: &str) -> Result<u64, String> {
    use crate::memory::store::ExportLine;
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = d
            .memory
            .export_page(from, after.as_deref(), 1 << 20)
            .map_err(|e| format!("reading the memory: {e}"))?;
        all.extend(
            page.into_iter()
                .filter(|l| !matches!(l, ExportLine::Kv { tier, .. } if tier == "working")),
        );
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    if all.is_empty() {
        return Ok(0);
    }
    d.memory
        .import(to, all)
        .map_err(|e| format!("copying the memory: {e}"))
}
