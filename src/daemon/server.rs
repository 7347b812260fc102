//! The control socket: who may connect, one reply per request frame, and what each request
//! does. A malformed, truncated or oversized frame gets an error reply; the daemon goes on.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::agent::{self, Cmd, Record};
use super::identity::Caller;
use super::logs;
use super::proto::{aio, ErrorBody, ErrorCode, Reply, Request, SpawnRequest};
use super::store::{self, now_ms};
use super::supervise::State;
use super::Shared;
use crate::agent_name::AgentName;
use crate::audit::{Entry, Verdict};
use crate::sandbox::{RunOptions, SandboxSpec};
use crate::token::{self, Claims};

/// Token lifetime of an agent spawned from a policy: a year (revocation ends it sooner).
pub const SPAWN_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Who may use the socket and who is an admin (daemon/identity.rs): root, the daemon's own
/// uid, members of group `aither` (beside the socket file's mode, 0660 root:aither), and
/// members of `aither-admin`, who act on every user's agents.
pub struct Access {
    pub groups: super::identity::Groups,
}

/// Binds the socket: 0660 root:aither when the group exists, else 0600.
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    // A stale socket of a dead daemon (the single-instance lock is already ours).
    let _ = std::fs::remove_file(path);
    bind_private(path, group)
}

/// Binds a Unix socket at `path` (nothing there now) as 0600 root, then opens it to `group`
/// (0660 root:group) when there is one: the control socket and the metrics socket.
pub fn bind_private(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    // Created with no permissions for anyone but root, then opened up: no window in which
    // another user could connect.
    // Restored right after bind.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l?;
    if let Some(g) = group {
        std::os::unix::fs::chown(path, Some(0), Some(g))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    Ok(l)
}

/// Accepts connections until the listener fails.
pub async fn serve(d: Shared, listener: UnixListener, access: Arc<Access>) {
    // Bounds the file descriptors that connections can take.
    let slots = Arc::new(tokio::sync::Semaphore::new(512));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        crate::trace::mark("aitherd", "accepted");
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let mut s = stream;
            let _ = aio::write_reply(&mut s, &Reply::err(ErrorCode::Busy, "too many connections"))
                .await;
            continue;
        };
        let d = d.clone();
        let access = access.clone();
        tokio::spawn(async move {
            connection(d, stream, &access).await;
            drop(permit);
        });
    }
}

/// A bus connection (`bus_pub`, `bus_sub`): it keeps the connection from its first request on.
async fn serve_bus(
    d: &Shared,
    caller: &Caller,
    actor: String,
    req: Request,
    body: &[u8],
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
) {
    // Root and admins: the whole bus; a member: their own agents' subjects, each publish and
    // the subscription checked in bus::serve (refusals audited here for the first request).
    let scope = if caller.admin {
        super::bus::BusScope::Operator
    } else {
        super::bus::BusScope::Member(caller.uid)
    };
    let (subject, subscribe) = match &req {
        Request::BusPub { subject, .. } => (subject.as_str(), false),
        Request::BusSub { pattern, .. } => (pattern.as_str(), true),
        _ => unreachable!("only bus requests come here"),
    };
    if !scope.allows(d, subject, subscribe) {
        d.audit.record(
            Entry::new(
                "bus",
                Verdict::Deny,
                "owner: a member's bus is their own agents' subjects",
            )
            .actor(caller.actor())
            .caller(caller.uid)
            .via(caller.via_name())
            .data(json!({"subject": subject, "cross_user": true})),
        );
    }
    super::bus::serve(d.clone(), (req, body), actor, (scope, caller.uid), r, w).await;
}

async fn connection(d: Shared, stream: UnixStream, access: &Access) {
    // The kernel's word on the peer, read once at accept: no field of any request changes it.
    crate::trace::mark("aitherd", "connection task");
    let caller = Caller::of_socket(stream.as_fd(), &access.groups).ok();
    crate::trace::mark("aitherd", "peer credentials");
    let actor = caller
        .as_ref()
        .map(Caller::actor)
        .unwrap_or_else(|| "unknown peer".into());
    let (mut r, mut w) = stream.into_split();
    let mut caller = match caller {
        Some(c) if c.allowed => c,
        other => return refuse_peer(&d, other.as_ref(), actor, &mut w).await,
    };
    loop {
        // recvmsg: a spawn's frame carries the workspace the caller opened (SCM_RIGHTS).
        let (body, fds) =
            match tokio::time::timeout(Duration::from_secs(600), aio::read_frame_fds(r.as_ref()))
                .await
            {
                Err(_) | Ok(Ok(None)) => return,
                Ok(Ok(Some(b))) => b,
                Ok(Err(e)) => {
                    let _ = aio::write_reply(&mut w, &Reply::err(e.code(), e.to_string())).await;
                    if e.recoverable() {
                        continue;
                    }
                    // A stream that lost its framing cannot be resynchronised.
                    return;
                }
            };
        crate::trace::mark("aitherd", "frame read");
        let req: Request = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                let code = if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
                    ErrorCode::BadRequest
                } else {
                    ErrorCode::BadJson
                };
                if aio::write_reply(&mut w, &Reply::err(code, e.to_string()))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        match req {
            Request::Logs {
                name,
                follow,
                tail,
                since_ns,
                stream,
                records,
            } if follow || records => {
                if let Err(reply) = authorize(&d, &caller, "logs", &name) {
                    let _ = aio::write_reply(&mut w, &reply).await;
                    return;
                }
                let q = logs::Query {
                    tail,
                    since_ns,
                    stream,
                };
                let form = if records {
                    LogForm::Records
                } else {
                    LogForm::Text
                };
                if !serve_logs(&d, &name, q, form, follow, &mut r, &mut w).await || follow {
                    return;
                }
            }
            Request::Events {
                follow: true,
                since_ms,
                name,
            } => {
                follow_events(&d, &caller, since_ms, name, &mut r, &mut w).await;
                return;
            }
            req @ (Request::BusPub { .. } | Request::BusSub { .. }) => {
                serve_bus(&d, &caller, actor.clone(), req, &body, r, w).await;
                return;
            }
            Request::Via {
                via,
                tool,
                agent,
                refused,
            } => {
                let reply = match check_via(&tool, agent.as_deref(), refused.as_deref()) {
                    Ok(()) => {
                        caller.via = Some(via);
                        record_via(&d, &caller, &tool, agent.as_deref(), refused.as_deref());
                        Reply::ok(json!({}))
                    }
                    Err(why) => Reply::err(ErrorCode::BadRequest, why),
                };
                if aio::write_reply(&mut w, &reply).await.is_err() {
                    return;
                }
            }
            Request::LayerOpen { name } => {
                if !serve_layer_open(&d, &caller, &name, &mut w).await {
                    return;
                }
            }
            Request::Exec(req) => {
                // The reply comes when the command ends; a closed connection kills it.
                super::exec::serve(&d, &caller, req, fds, &mut r, &mut w).await;
                return;
            }
            Request::Run(req) => {
                crate::trace::mark("aitherd", "request parsed");
                // The replies come when the launcher starts and when the agent ends; frames
                // after the request are signals; a closed connection kills the run.
                super::run::serve(&d, &caller, *req, fds, &mut r, &mut w).await;
                return;
            }
            req => {
                let reply = handle(&d, req, &caller, fds).await;
                if aio::write_reply(&mut w, &reply).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// `layer_open`: an agent's layer for its owner, the reply carrying a read-only mount of the
/// upper layer (docs/workspaces.md, "Who may"). False when the connection is gone.
async fn serve_layer_open(
    d: &Shared,
    caller: &Caller,
    name: &str,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> bool {
    let (reply, fd) = match authorize(d, caller, "layer_open", name) {
        Err(reply) => (reply, None),
        Ok(_) if d.info_of(name).is_none() => (not_found(name), None),
        Ok(_) => {
            let layer = crate::sandbox::layer::layer_path(&crate::token::state_dir(), name);
            match tokio::task::spawn_blocking(move || layer_open(&layer)).await {
                Ok(Ok((data, fd))) => (Reply::ok(data), Some(fd)),
                Ok(Err(e)) => (
                    Reply::err(ErrorCode::NotFound, format!("{name}: {e}")),
                    None,
                ),
                Err(e) => (Reply::err(ErrorCode::Internal, e.to_string()), None),
            }
        }
    };
    d.audit.record(
        Entry::new(
            "layer_open",
            if reply.ok {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            "owner: the agent's owner, root or aither-admin",
        )
        .agent(name)
        .actor(caller.actor())
        .caller(caller.uid)
        .via(caller.via_name()),
    );
    let sent = match &fd {
        Some(f) => aio::write_reply_fds(w.as_ref(), &reply, &[f.as_fd()]).await,
        None => aio::write_reply(w, &reply).await,
    };
    sent.is_ok()
}

/// Answers a peer that may not use the socket (neither root nor in group `aither`), with an
/// audited denial.
async fn refuse_peer(
    d: &Shared,
    other: Option<&Caller>,
    actor: String,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) {
    let uid = other.map(|c| c.uid);
    let pid = other.and_then(|c| c.pid);
    tracing::warn!(uid, "control socket: access denied");
    d.emit_daemon("access_denied", json!({"uid": uid, "pid": pid}));
    let mut e = Entry::new(
        "control_connect",
        Verdict::Deny,
        "control socket: root, aitherd's uid or group aither only",
    )
    .actor(actor)
    .data(json!({"pid": pid}));
    if let Some(u) = uid {
        e = e.caller(u);
    }
    d.audit.record(e);
    let _ = aio::write_reply(
        w,
        &Reply::err(
            ErrorCode::Denied,
            "only root and members of group aither may use aitherd",
        ),
    )
    .await;
}

/// What a front end may write into the audit stream through `via`: a tool's name (1-32
/// lower-case letters and `_`), an agent's name, and a refusal of at most 1 KiB.
fn check_via(tool: &str, agent: Option<&str>, refused: Option<&str>) -> Result<(), String> {
    if tool.is_empty()
        || tool.len() > 32
        || !tool.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        return Err("via: `tool` must be 1 to 32 lower-case letters and _".into());
    }
    if let Some(a) = agent {
        crate::agent_name::AgentName::parse("agent", a).map_err(|e| format!("via: {e}"))?;
    }
    if refused.is_some_and(|r| r.len() > 1024) {
        return Err("via: `refused` is over 1024 bytes".into());
    }
    Ok(())
}

/// The audit record of one call of a front end (`Request::Via`, docs/mcp.md "Audit"): kind
/// `via` (`mcp`), allow, or deny with the front end's own refusal. The agent is named in the
/// record's `agent` only when the caller may act on it (another user's agent stays in `data`,
/// unowned, as the caller wrote it).
fn record_via(d: &Shared, caller: &Caller, tool: &str, agent: Option<&str>, refused: Option<&str>) {
    let (decision, rule) = match refused {
        None => (Verdict::Allow, "control socket: operator".to_string()),
        Some(why) => (Verdict::Deny, why.to_string()),
    };
    let kind = caller.via_name().unwrap_or("via");
    let mut e = Entry::new(kind, decision, rule)
        .actor(caller.actor())
        .caller(caller.uid)
        .via(caller.via_name())
        .data(json!({"tool": tool, "agent": agent}));
    if let Some(name) = agent {
        if let Some(owner) = d.name_owner(name).filter(|o| caller.may_act_on(*o)) {
            e = e.agent(name).owner(owner);
        }
    }
    d.audit.record(e);
}

/// Lets the caller act on agent `name` when it owns it (or is an admin). Another user's agent
/// is answered as if it did not exist, and the attempt is recorded as a denial.
pub(super) fn authorize(
    d: &Shared,
    caller: &Caller,
    kind: &str,
    name: &str,
) -> Result<Option<u32>, Reply> {
    // A removed agent's name stays its owner's (its memory is kept under it).
    let Some(owner) = d.name_owner(name) else {
        return Ok(None);
    };
    if caller.may_act_on(owner) {
        return Ok(Some(owner));
    }
    d.audit.record(
        Entry::new(
            kind,
            Verdict::Deny,
            "owner: only the agent's owner, root or aither-admin",
        )
        .agent(name)
        .actor(caller.actor())
        .caller(caller.uid)
        .via(caller.via_name())
        .owner(owner)
        .data(json!({"cross_user": true})),
    );
    Err(not_found(name))
}

/// Whose durable consumer a request names: the caller's own, or `owner`'s for an admin. A
/// member naming anyone else gets "no durable consumer named …" and an audited denial.
fn consumer_owner(
    d: &Shared,
    caller: &Caller,
    durable: &str,
    owner: Option<u32>,
) -> Result<u32, Reply> {
    let target = owner.unwrap_or(caller.uid);
    if caller.may_act_on(target) {
        return Ok(target);
    }
    d.audit.record(
        Entry::new(
            "bus",
            Verdict::Deny,
            "owner: only the consumer's owner, root or aither-admin",
        )
        .actor(caller.actor())
        .caller(caller.uid)
        .via(caller.via_name())
        .owner(target)
        .data(json!({"durable": durable, "cross_user": true})),
    );
    Err(Reply::err(
        ErrorCode::NotFound,
        format!("no durable consumer named {durable:?} (`aitherctl bus streams` lists them)"),
    ))
}

/// Audits an operator's request and its outcome.
fn audit_op(
    d: &Shared,
    kind: &str,
    name: &str,
    caller: &Caller,
    owner: Option<u32>,
    reply: &Reply,
    data: serde_json::Value,
) {
    let (decision, rule) = match &reply.error {
        None => (Verdict::Allow, "control socket: operator".to_string()),
        Some(e) => (Verdict::Deny, format!("{}: {}", e.code, e.message)),
    };
    let mut e = Entry::new(kind, decision, rule)
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

/// An operator's memory write that can change an agent's spirit tier (its instructions, read at
/// every start) is audited with the caller: put, put_many and delete in `spirit`, a clear of
/// `spirit` or of every tier, any import. Returns the record's data.
fn spirit_write(request: &serde_json::Value) -> Option<serde_json::Value> {
    let op = request.get("op")?.as_str()?;
    let tier = request.get("tier").and_then(|t| t.as_str());
    let touches = match op {
        "mem.put" | "mem.put_many" | "mem.delete" => tier == Some("spirit"),
        "mem.clear" => tier.is_none() || tier == Some("spirit"),
        "mem.import" => true,
        _ => false,
    };
    touches.then(|| {
        let mut data = json!({"op": op, "tier": tier.unwrap_or("all")});
        if let Some(k) = request.get("key").and_then(|k| k.as_str()) {
            data["key"] = json!(k);
        }
        data
    })
}

async fn handle(d: &Shared, req: Request, caller: &Caller, fds: Vec<OwnedFd>) -> Reply {
    let audited = match &req {
        Request::Stop { name, .. } => Some(("stop", name.clone(), json!({}))),
        Request::Kill { name, signal } => Some(("kill", name.clone(), json!({"signal": signal}))),
        Request::Restart { name } => Some(("restart", name.clone(), json!({}))),
        Request::Pause { name } => Some(("pause", name.clone(), json!({}))),
        Request::Resume { name } => Some(("resume", name.clone(), json!({}))),
        Request::Rm {
            name,
            force,
            purge_memory,
        } => Some((
            "rm",
            name.clone(),
            json!({"force": force, "purge_memory": purge_memory}),
        )),
        Request::Mem { agent, request } => {
            spirit_write(request).map(|data| ("mem", agent.clone(), data))
        }
        _ => None,
    };
    // Every request that names an agent: only its owner (or an admin) gets past here.
    let target = match &req {
        Request::Stop { name, .. }
        | Request::Kill { name, .. }
        | Request::Restart { name }
        | Request::Pause { name }
        | Request::Resume { name }
        | Request::Rm { name, .. }
        | Request::Inspect { name }
        | Request::Logs { name, .. } => Some(("control", name.clone())),
        Request::Mem { agent, .. } => Some(("mem", agent.clone())),
        Request::Events {
            name: Some(name), ..
        } => Some(("events", name.clone())),
        _ => None,
    };
    // `stats NAME...`: each name as `inspect` would have it (another user's agent does not
    // exist for the caller, and asking is an audited denial); the first refusal answers.
    if let Request::Stats { names } = &req {
        for name in names {
            if let Err(reply) = authorize(d, caller, "control", name) {
                return reply;
            }
        }
    }
    let mut owner = None;
    if let Some((kind, name)) = &target {
        let kind = audited.as_ref().map(|a| a.0).unwrap_or(kind);
        match authorize(d, caller, kind, name) {
            Ok(o) => owner = o,
            Err(reply) => return reply,
        }
        // Memory outlives its agent; a name nobody owns is the admins'.
        if owner.is_none() && !caller.admin && matches!(req, Request::Mem { .. }) {
            return not_found(name);
        }
    }
    let reply = handle_inner(d, req, caller, fds).await;
    if let Some((kind, name, data)) = audited {
        audit_op(d, kind, &name, caller, owner, &reply, data);
    }
    reply
}

/// Refuses `what` on aitherd's configuration to anyone but an admin (root, aitherd's uid,
/// aither-admin), with an audited denial.
fn admin_only(d: &Shared, caller: &Caller, kind: &str) -> Result<(), Reply> {
    if caller.admin {
        return Ok(());
    }
    d.audit.record(
        Entry::new(
            kind,
            Verdict::Deny,
            "admin: aitherd's configuration is root's, aitherd's uid's or aither-admin's",
        )
        .agent("aitherd")
        .actor(caller.actor())
        .caller(caller.uid)
        .via(caller.via_name()),
    );
    Err(Reply::err(
        ErrorCode::Denied,
        "only root and members of aither-admin may read or reload aitherd's configuration",
    ))
}

/// `aitherctl daemon reload`: aitherd.toml again (daemon/reload.rs).
fn daemon_reload(d: &Shared, caller: &Caller) -> Reply {
    if let Err(r) = admin_only(d, caller, "daemon_reload") {
        return r;
    }
    let report = super::reload::reload(
        d,
        &super::reload::Trigger::Control {
            uid: caller.uid,
            actor: caller.actor(),
        },
    );
    let data = serde_json::to_value(&report).unwrap_or_default();
    if report.errors.is_empty() {
        return Reply::ok(data);
    }
    let mut r = Reply::err(
        ErrorCode::Invalid,
        format!(
            "the configuration was not reloaded (the running one is kept): {}",
            report.errors.join("; ")
        ),
    );
    r.data = Some(data);
    r
}

/// `aitherctl daemon config`: the configuration in force and each value's source.
fn daemon_config(d: &Shared, caller: &Caller) -> Reply {
    if let Err(r) = admin_only(d, caller, "daemon_config") {
        return r;
    }
    Reply::ok(d.config().show(&d.settings.spec))
}

/// Keeps what the caller may see: every agent for admins, their own for anyone else.
fn visible(d: &Shared, caller: &Caller, name: &str) -> bool {
    caller.admin || d.name_owner(name).is_some_and(|o| o == caller.uid)
}

/// Every agent the caller may see (as `ps` lists them: admins all, anyone else their own),
/// by name, without their enforcement reports (`inspect` shows those; the list stays small).
fn visible_agents(d: &Shared, caller: &Caller) -> Vec<agent::Info> {
    let mut list: Vec<agent::Info> = {
        let agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
        agents
            .values()
            .filter_map(|h| {
                let i = h.info.lock().unwrap_or_else(|e| e.into_inner());
                (caller.admin || i.owner == caller.uid).then(|| {
                    let mut i = i.clone();
                    i.report = None;
                    i
                })
            })
            .collect()
    };
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

/// `stats`: one sample per agent (src/daemon/stats.rs), every visible agent or the `names`
/// (already authorized by `handle`), in the order asked. A name that has no agent (a removed
/// one whose name is kept) is `not_found`, as for `inspect`.
fn stats(d: &Shared, caller: &Caller, names: &[String]) -> Reply {
    let infos = if names.is_empty() {
        visible_agents(d, caller)
    } else {
        let mut v = Vec::with_capacity(names.len());
        for n in names {
            match d.info_of(n) {
                Some(i) => v.push(i),
                None => return not_found(n),
            }
        }
        v
    };
    let agents: Vec<super::stats::AgentStats> =
        infos.iter().map(|i| super::stats::of(d, i)).collect();
    Reply::ok(json!({ "agents": agents }))
}

async fn handle_inner(d: &Shared, req: Request, caller: &Caller, fds: Vec<OwnedFd>) -> Reply {
    match req {
        Request::Ping => {
            Reply::ok(json!({"pid": std::process::id(), "version": env!("CARGO_PKG_VERSION")}))
        }
        Request::Spawn(s) => spawn(d, *s, caller, fds).await,
        Request::LayerOp {
            name,
            action,
            tag,
            keep,
            paths,
        } => super::layer_ops::op(d, caller, name, action, tag, keep, paths).await,
        Request::Fork {
            name,
            new,
            from,
            argv,
            memory,
            token,
        } => {
            let ask = super::layer_ops::ForkAsk {
                name,
                new,
                from,
                argv,
                memory,
                token,
            };
            super::layer_ops::fork(d, caller, ask, fds).await
        }
        Request::GpuLs => gpu_ls(d, caller),
        Request::GpuQueue => gpu_queue(d, caller),
        Request::Ps => ps(d, caller),
        Request::DaemonReload => daemon_reload(d, caller),
        Request::DaemonConfig => daemon_config(d, caller),
        Request::Stats { names } => stats(d, caller, &names),
        Request::BusStreams => bus_streams(d, caller).await,
        // Durable consumers are per user: the caller's own, or (admins) `owner`'s.
        Request::BusAck {
            durable,
            seq,
            owner,
        } => match consumer_owner(d, caller, &durable, owner) {
            Ok(o) => super::bus::operator_ack(d, o, &durable, seq).await,
            Err(r) => r,
        },
        Request::BusConsumerRm { durable, owner } => {
            bus_consumer_rm(d, caller, durable, owner).await
        }
        Request::SecretSet { name, value, owner } => super::secret_ops::handle(
            d,
            caller,
            super::secret_ops::Op::Set {
                name: &name,
                value: &value.0,
            },
            owner,
        ),
        Request::SecretLs => super::secret_ops::handle(d, caller, super::secret_ops::Op::Ls, None),
        Request::SecretRm { name, owner } => {
            super::secret_ops::handle(d, caller, super::secret_ops::Op::Rm { name: &name }, owner)
        }
        Request::BusPub { .. } | Request::BusSub { .. } | Request::Exec(_) | Request::Run(_) => {
            Reply::err(
                ErrorCode::BadRequest,
                "bus_pub, bus_sub, exec and run take over their connection",
            )
        }
        Request::Via { .. } => Reply::err(
            ErrorCode::BadRequest,
            "via is answered by the connection itself",
        ),
        Request::LayerOpen { .. } => Reply::err(
            ErrorCode::BadRequest,
            "layer_open is answered on the connection itself",
        ),
        Request::Inspect { name } => {
            let mut reply = inspect(d, &name);
            // Its layered workspace, when it has one (docs/workspaces.md): size and snapshots.
            if let Some(v) = reply.data.as_mut().filter(|_| reply.ok) {
                let layer = crate::sandbox::layer::layer_path(&crate::token::state_dir(), &name);
                if let Ok(Some(info)) =
                    tokio::task::spawn_blocking(move || layer_info(&layer)).await
                {
                    v["layer"] = info;
                }
            }
            reply
        }
        Request::Logs {
            name,
            tail,
            since_ns,
            stream,
            ..
        } => {
            if d.info_of(&name).is_none() {
                return not_found(&name);
            }
            let q = logs::Query {
                tail,
                since_ns,
                stream,
            };
            let entries = read_logs(&d.log_dir(&name), q).await;
            Reply::ok(json!({"text": logs::text_reply(&entries)}))
        }
        Request::Stop { name, timeout_ms } => {
            command(d, &name, |reply| Cmd::Stop {
                timeout: timeout_ms.map(Duration::from_millis),
                reply,
            })
            .await
        }
        Request::Kill { name, signal } => {
            if !(1..=64).contains(&signal) {
                return Reply::err(ErrorCode::Invalid, format!("no such signal: {signal}"));
            }
            command(d, &name, |reply| Cmd::Kill { signal, reply }).await
        }
        Request::Restart { name } => command(d, &name, |reply| Cmd::Restart { reply }).await,
        Request::Pause { name } => command(d, &name, |reply| Cmd::Pause { reply }).await,
        Request::Resume { name } => command(d, &name, |reply| Cmd::Resume { reply }).await,
        Request::Mem { agent, request } => mem(d, agent, request).await,
        Request::Rm {
            name,
            force,
            purge_memory,
        } => rm(d, name, force, purge_memory).await,
        Request::Audit { since_ms, agent } => audit_lines(caller, since_ms, agent).await,
        Request::Events { since_ms, name, .. } => events(d, caller, since_ms, name).await,
    }
}

/// `gpu_ls`: the devices, with the leases the caller may see.
fn gpu_ls(d: &Shared, caller: &Caller) -> Reply {
    let mut v = d.gpu.ls();
    // How often use is read: eviction happens at most this long after the fact.
    v["poll_ms"] = json!(d.config().config.gpu.poll_ms);
    if !caller.admin {
        // Devices are the host's; the leases on them are their owners'.
        for dev in v["devices"].as_array_mut().into_iter().flatten() {
            if let Some(l) = dev["leases"].as_array_mut() {
                l.retain(|x| x["agent"].as_str().is_some_and(|n| visible(d, caller, n)));
            }
        }
    }
    Reply::ok(v)
}

/// `gpu_queue`: the waiting requests the caller may see.
fn gpu_queue(d: &Shared, caller: &Caller) -> Reply {
    let mut q = d.gpu.queue();
    q.retain(|e| visible(d, caller, &e.request.agent));
    Reply::ok(json!({"queue": q}))
}

/// `ps`: the agents the caller may see, by name.
fn ps(d: &Shared, caller: &Caller) -> Reply {
    let mut list = visible_agents(d, caller);
    for i in &mut list {
        i.gpu = d.gpu.column(&i.name);
    }
    Reply::ok(serde_json::to_value(list).unwrap_or_default())
}

/// `bus_streams`: the bus's streams, consumers and subscriptions, as the caller may see them.
async fn bus_streams(d: &Shared, caller: &Caller) -> Reply {
    let d2 = d.clone();
    let mut reply = tokio::task::spawn_blocking(move || super::bus::streams(&d2))
        .await
        .unwrap_or_else(|e| Reply::err(ErrorCode::Internal, e.to_string()));
    if let Some(v) = reply.data.as_mut() {
        // Durable consumers with their owners: an admin's view, everyone's; anyone
        // else's, their own and their agents'.
        v["consumers"] = super::bus::consumers_for(d, caller, v);
    }
    if !caller.admin {
        // A member sees the subscriptions of their own agents; the shared log's
        // statistics and the operators' subscriptions are not theirs.
        if let Some(v) = reply.data.as_mut() {
            v["streams"] = json!([]);
            if let Some(subs) = v["subscriptions"].as_array_mut() {
                subs.retain(|x| {
                    x["owner"]
                        .as_str()
                        .is_some_and(|n| d.owner_of(n) == Some(caller.uid))
                });
            }
        }
    }
    reply
}

/// `bus_consumer_rm`: forgets a durable consumer (the caller's own, or an admin's pick).
async fn bus_consumer_rm(
    d: &Shared,
    caller: &Caller,
    durable: String,
    owner: Option<u32>,
) -> Reply {
    match consumer_owner(d, caller, &durable, owner) {
        Ok(o) => {
            let reply = super::bus::operator_forget(d, o, &durable).await;
            audit_op(
                d,
                "bus_consumer_rm",
                "operator",
                caller,
                Some(o),
                &reply,
                json!({"durable": durable}),
            );
            reply
        }
        Err(r) => r,
    }
}

/// `inspect`: one agent, with its GPU lease, what aitherd spends for it and its egress.
fn inspect(d: &Shared, name: &str) -> Reply {
    match d.info_of(name) {
        Some(mut i) => {
            i.gpu = d.gpu.column(name);
            let mut v = serde_json::to_value(i).unwrap_or_default();
            v["gpu_lease"] = d.gpu.lease_info(name);
            // What aitherd spends for it (docs/daemon.md "Bounds").
            v["daemon_usage"] = serde_json::to_value(d.usage_of(name).view()).unwrap_or_default();
            // Egress counters per rule (docs/network.md), while a run is served.
            if let (Some(o), Some(n)) = (v.as_object_mut(), d.net_stats(name)) {
                o.insert("net".into(), n);
            }
            // Its ports on the host's loopback with their counters, while they are open.
            let host_ports = d
                .host_ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .map(|h| h.stats());
            if let (Some(o), Some(h)) = (v.as_object_mut(), host_ports) {
                o.insert(
                    "host_ports".into(),
                    serde_json::to_value(h).unwrap_or_default(),
                );
            }
            Reply::ok(v)
        }
        None => not_found(name),
    }
}

/// An agent's layer for its owner (`Request::LayerOpen`): its record, and a read-only
/// detached mount of its upper layer (open_tree of the descriptor opened beneath the layer
/// directory without following links, then MOUNT_ATTR_RDONLY | NOSUID | NODEV | NOEXEC): the
/// owner reads the files, which are stored as theirs, with their own rights, and can change
/// nothing through it.
fn layer_open(layer: &std::path::Path) -> Result<(serde_json::Value, OwnedFd), String> {
    use crate::sandbox::layer;
    use std::os::fd::AsRawFd;
    let fd = layer::open_layer_dir(layer, false).map_err(|e| e.to_string())?;
    let record = layer::read_record(fd.as_fd(), layer)
        .map_err(|e| e.to_string())?
        .ok_or("the layer is empty (discarded, or its agent never started)")?;
    // A quota'd layer's upper layer is in its image, mounted (read-only) for the clone.
    let store =
        layer::open_store(fd.as_fd(), layer, layer::Use::Read).map_err(|e| e.to_string())?;
    let upper = store.upper(layer).map_err(|e| e.to_string())?;
    use rustix::mount::OpenTreeFlags;
    let clone = match rustix::mount::open_tree(
        &upper,
        c"",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    ) {
        Ok(c) => c,
        // A quota'd layer's image mount is detached, and kernels before detached mounts could
        // be cloned refuse: its `upper` on that read-only (nosuid, nodev, noexec) mount is
        // handed over as it is (the image's root above it is root's 0700).
        Err(rustix::io::Errno::INVAL) if store.mount.is_some() => {
            let data = serde_json::to_value(&record).map_err(|e| e.to_string())?;
            return Ok((data, upper));
        }
        Err(e) => return Err(format!("cloning the layer: {e}")),
    };
    crate::sys::mount_setattr(
        clone.as_raw_fd(),
        std::path::Path::new(""),
        false,
        crate::sys::MOUNT_ATTR_RDONLY
            | crate::sys::MOUNT_ATTR_NOSUID
            | crate::sys::MOUNT_ATTR_NODEV
            | crate::sys::MOUNT_ATTR_NOEXEC,
        0,
        None,
    )
    .map_err(|e| format!("making the layer read-only: {e}"))?;
    let data = serde_json::to_value(&record).map_err(|e| e.to_string())?;
    Ok((data, clone))
}

/// What `inspect` shows of an agent's layer: where it is, its upper layer's size and entries,
/// and its snapshots. None when it has none.
fn layer_info(layer: &std::path::Path) -> Option<serde_json::Value> {
    use crate::sandbox::layer;
    use std::os::fd::AsFd;
    let fd = layer::open_layer_dir(layer, false).ok()?;
    // Never attaches a quota'd layer's image (that would hold the lock a launch needs): its
    // tree is walked only while mounted, its quota and disk use are always shown.
    let store = layer::peek_store(fd.as_fd(), layer).ok().flatten();
    let upper = store.as_ref().and_then(|s| s.upper(layer).ok());
    let size = upper.and_then(|u| layer::tree_size(u.as_fd(), layer).ok());
    let image = layer::image_usage(fd.as_fd(), layer).ok().flatten();
    let snapshots = layer::snapshots(layer).unwrap_or_default();
    Some(json!({
        "path": layer,
        "bytes": size.map(|s| s.0),
        "entries": size.map(|s| s.1),
        "quota": image.map(|i| i.0),
        "disk_used": image.map(|i| i.1),
        "fs_used": store.as_ref().and_then(|s| s.used()),
        "snapshots": snapshots,
    }))
}

/// `rm`: removes a stopped agent (or, forced, a live one), and with `purge_memory` its memory.
async fn rm(d: &Shared, name: String, force: bool, purge_memory: bool) -> Reply {
    let Some(info) = d.info_of(&name) else {
        return not_found(&name);
    };
    if !force && (info.state.is_live() || info.state == State::Backoff) {
        return Reply::err(
            ErrorCode::Conflict,
            format!("{name} is {}: stop it first, or use rm --force", info.state),
        );
    }
    let reply = command(d, &name, |reply| Cmd::Remove { reply }).await;
    if reply.ok {
        // Its layered workspace's changes go with it (docs/workspaces.md): a later agent of
        // the same name starts from its directory.
        let layer = crate::sandbox::layer::layer_path(&crate::token::state_dir(), &name);
        let removed =
            tokio::task::spawn_blocking(move || crate::sandbox::layer::remove(&layer)).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(agent = %name, error = %e, "removing the agent's layer");
        }
    }
    if reply.ok && purge_memory {
        let d2 = d.clone();
        let n2 = name.clone();
        let purged = tokio::task::spawn_blocking(move || d2.memory.clear(&n2, None)).await;
        match purged {
            Ok(Ok(n)) => {
                d.emit(Some(&name), "memory_purged", json!({"entries": n}));
                // Nothing is kept under the name any more: it is free.
                d.store.delete_owner(&name);
                d.owners
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name);
            }
            Ok(Err(e)) => return Reply::err(e.code(), e.to_string()),
            Err(e) => return Reply::err(ErrorCode::Internal, e.to_string()),
        }
    }
    reply
}

/// `audit`: the audit records the caller may see (`audit_for`).
async fn audit_lines(caller: &Caller, since_ms: Option<u64>, agent: Option<String>) -> Reply {
    let c = caller.clone();
    let res = tokio::task::spawn_blocking(move || audit_for(&c, since_ms, agent)).await;
    match res {
        Ok(Ok(lines)) => Reply::ok(json!({ "lines": lines })),
        Ok(Err(e)) => Reply::err(ErrorCode::Internal, e.to_string()),
        Err(e) => Reply::err(ErrorCode::Internal, e.to_string()),
    }
}

/// `events`: the stored events the caller may see.
async fn events(d: &Shared, caller: &Caller, since_ms: Option<u64>, name: Option<String>) -> Reply {
    let d2 = d.clone();
    let res = tokio::task::spawn_blocking(move || {
        let c = d2.store.reader()?;
        store::load_events(
            &c,
            d2.store.path(),
            since_ms.unwrap_or(0),
            name.as_deref(),
            10_000,
        )
    })
    .await;
    match res {
        Ok(Ok(mut ev)) => {
            if !caller.admin {
                ev.retain(|e| e.name.as_deref().is_some_and(|n| visible(d, caller, n)));
            }
            Reply::ok(serde_json::to_value(ev).unwrap_or_default())
        }
        Ok(Err(e)) => Reply::err(ErrorCode::Internal, e.to_string()),
        Err(e) => Reply::err(ErrorCode::Internal, e.to_string()),
    }
}

/// The newest records of the audit log (at most 10,000, 16 MiB) the caller may see.
fn audit_for(
    caller: &Caller,
    since_ms: Option<u64>,
    agent: Option<String>,
) -> Result<Vec<String>, crate::audit::AuditError> {
    let lines = crate::audit::read_lines(&crate::audit::log_path())?;
    let mut out: Vec<String> = Vec::new();
    let mut bytes = 0usize;
    for l in lines.iter().rev() {
        let Some(r) = &l.record else { continue };
        let e = &r.entry;
        let theirs =
            caller.admin || e.caller_uid == Some(caller.uid) || e.owner_uid == Some(caller.uid);
        if !theirs
            || r.ts_ms < since_ms.unwrap_or(0)
            || agent.as_ref().is_some_and(|a| e.agent.as_ref() != Some(a))
        {
            continue;
        }
        bytes += l.bytes.len();
        if out.len() >= 10_000 || bytes > 16 << 20 {
            break;
        }
        // A member's denied attempt on another user's agent, secret or consumer is theirs to
        // see, but not whose it was: the record loses `owner_uid` (the root-only log keeps it).
        let foreign = !caller.admin && e.owner_uid.is_some_and(|o| o != caller.uid);
        match serde_json::from_slice::<serde_json::Value>(&l.bytes) {
            Ok(mut v) if foreign => {
                if let Some(m) = v.as_object_mut() {
                    m.remove("owner_uid");
                }
                out.push(v.to_string());
            }
            _ => out.push(String::from_utf8_lossy(&l.bytes).into_owned()),
        }
    }
    out.reverse();
    Ok(out)
}

/// An operator's memory request (any agent's memory, no quota: docs/memory.md).
async fn mem(d: &Shared, agent: String, request: serde_json::Value) -> Reply {
    let name = agent.clone();
    if let Err(e) = AgentName::parse("agent", &agent) {
        return Reply::err(ErrorCode::Invalid, e.to_string());
    }
    let op = request.get("op").and_then(|o| o.as_str()).unwrap_or("");
    if !op.starts_with("mem.") {
        return Reply::err(
            ErrorCode::Invalid,
            format!("{op:?} is not a memory op (mem.*)"),
        );
    }
    // A read of a name that is no agent, was none (a removed agent's name stays its owner's,
    // with its memory) and holds no memory is an error naming it, not an empty answer.
    let read = matches!(
        op,
        "mem.get"
            | "mem.list"
            | "mem.search"
            | "mem.usage"
            | "mem.export"
            | "mem.graph.neighbors"
            | "mem.graph.neighbours"
    );
    let known = d.info_of(&agent).is_some() || d.name_owner(&agent).is_some();
    let d2 = d.clone();
    let res = tokio::task::spawn_blocking(move || {
        if read && !known {
            let usage = d2.memory.usage(&agent)?;
            if usage.values().all(|u| u.entries == 0) {
                return Ok(None);
            }
        }
        crate::memory::service::handle(&d2.memory, crate::memory::Actor::Operator, &agent, &request)
            .map(Some)
    })
    .await;
    match res {
        Ok(Ok(None)) => Reply::err(
            ErrorCode::NotFound,
            format!("no agent named {name:?} and no memory held for that name (`aitherctl ps` lists agents)"),
        ),
        Ok(Ok(Some(data))) => Reply::ok(data),
        Ok(Err(e)) => Reply::err(e.code(), e.to_string()),
        Err(e) => Reply::err(ErrorCode::Internal, e.to_string()),
    }
}

pub(super) fn not_found(name: &str) -> Reply {
    Reply::err(
        ErrorCode::NotFound,
        format!("no agent named {name:?} (`aitherctl ps` lists them)"),
    )
}

/// How an agent's refusal reads as a reply: a plain message is a `conflict` (the agent's
/// state does not allow it); an `ErrorBody` carries its own code.
pub(super) trait Refusal {
    fn into_reply(self) -> Reply;
}

impl Refusal for agent::CmdError {
    fn into_reply(self) -> Reply {
        Reply::err(self.code(), self.to_string())
    }
}

impl Refusal for ErrorBody {
    fn into_reply(self) -> Reply {
        Reply::err(self.code, self.message)
    }
}

pub(super) async fn command<F, E>(d: &Shared, name: &str, make: F) -> Reply
where
    F: FnOnce(oneshot::Sender<Result<(), E>>) -> Cmd,
    E: Refusal,
{
    let (tx, rx) = oneshot::channel();
    {
        let agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = agents.get(name) else {
            return not_found(name);
        };
        if h.cmd.send(make(tx)).is_err() {
            return Reply::err(
                ErrorCode::Internal,
                format!("{name}: its supervisor has ended"),
            );
        }
    }
    match rx.await {
        Ok(Ok(())) => match d.info_of(name) {
            Some(i) => Reply::ok(serde_json::to_value(i).unwrap_or_default()),
            None => Reply::ok(json!({"name": name, "removed": true})),
        },
        Ok(Err(e)) => e.into_reply(),
        Err(_) => Reply::err(
            ErrorCode::Internal,
            format!("{name}: no answer from its supervisor"),
        ),
    }
}

/// Builds the agent's spec from a verified token (the same path as `aitherctl run`), then
/// starts its supervisor and waits for the first launch.
pub(super) async fn spawn(
    d: &Shared,
    req: SpawnRequest,
    caller: &Caller,
    fds: Vec<OwnedFd>,
) -> Reply {
    let name = req.name.clone();
    let argv = req.argv.clone();
    // Ports published on the host (`--publish-host`), as given: part of what was allowed.
    let publish_host: Vec<String> = req.publish_host.iter().map(ToString::to_string).collect();
    // The workspace asked for (the client's directory by default); the one in use on success.
    let mut workspace = req.workspace.clone().unwrap_or_else(|| req.cwd.clone());
    let reply = spawn_inner(d, req, caller, fds).await;
    let (decision, rule) = match &reply.error {
        None => {
            let info = d.info_of(&name);
            if let Some(w) = info.as_ref().and_then(|i| i.workspace.clone()) {
                workspace = w;
            }
            (
                Verdict::Allow,
                format!(
                    "token {} (policy {})",
                    info.as_ref().map(|i| i.token_id.as_str()).unwrap_or("?"),
                    info.as_ref().map(|i| i.policy.as_str()).unwrap_or("?")
                ),
            )
        }
        Some(e) => (Verdict::Deny, format!("{}: {}", e.code, e.message)),
    };
    d.audit.record(
        Entry::new("spawn", decision, rule)
            .agent(&name)
            .actor(caller.actor())
            .caller(caller.uid)
            .via(caller.via_name())
            // The agent's owner: the caller's new agent, or whoever holds the name.
            .owner(d.name_owner(&name).unwrap_or(caller.uid))
            .data(json!({"argv": argv, "workspace": workspace, "publish_host": publish_host})),
    );
    reply
}

async fn spawn_inner(
    d: &Shared,
    req: SpawnRequest,
    caller: &Caller,
    mut fds: Vec<OwnedFd>,
) -> Reply {
    if let Err(e) = AgentName::parse("name", &req.name) {
        return Reply::err(ErrorCode::Invalid, e.to_string());
    }
    if let Err(e) = req.supervision.validate() {
        return Reply::err(ErrorCode::Invalid, e.to_string());
    }
    if let Err(e) = crate::labels::validate(&req.labels) {
        return Reply::err(ErrorCode::Invalid, e.to_string());
    }
    if req.argv.is_empty() {
        return Reply::err(ErrorCode::Invalid, "no command to run");
    }
    if let Err(e) = check_publish_host(&req.publish_host, caller) {
        return e;
    }
    // Another user's name (a live agent's, or one whose memory is kept) is refused before
    // anything is minted for it.
    if d.name_owner(&req.name)
        .is_some_and(|o| !caller.may_act_on(o))
    {
        return Reply::err(
            ErrorCode::Exists,
            format!("the name {:?} is taken; pick another", req.name),
        );
    }
    let d2 = d.clone();
    let req2 = req.clone();
    let caller2 = caller.clone();
    // The first descriptor, if any, is the workspace as the caller opened it.
    let presented = (!fds.is_empty()).then(|| fds.swap_remove(0));
    drop(fds);
    let built =
        tokio::task::spawn_blocking(move || build(&d2, &req2, &caller2, presented.as_ref())).await;
    let rec = match built {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Reply::err(e.0, e.1),
        Err(e) => return Reply::err(ErrorCode::Internal, e.to_string()),
    };
    let (tx, rx) = oneshot::channel();
    {
        let mut agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
        // Per-user limits (aitherd.toml [users]), under the same lock as the insertion, so
        // concurrent spawns cannot both take the last place; an agent this spawn replaces
        // does not count.
        if !caller.admin {
            if let Err(e) = over_limits(d, &agents, caller, &rec) {
                return Reply::err(ErrorCode::Denied, e.to_string());
            }
        }
        // The host's cap (aitherd.toml [limits] max_agents), for everyone, root included.
        if let Some(max) = d.config().config.limits.max_agents {
            let held = agents.len() - usize::from(agents.contains_key(&req.name));
            if held >= max {
                return Reply::err(
                    ErrorCode::Denied,
                    format!(
                        "host limit: aitherd holds {held} agents, the most allowed is {max} \
                         (aitherd.toml [limits] max_agents)"
                    ),
                );
            }
        }
        if let Some(h) = agents.get(&req.name) {
            let (st, owner) = {
                let i = h.info.lock().unwrap_or_else(|e| e.into_inner());
                (i.state, i.owner)
            };
            if !caller.may_act_on(owner) {
                // Names are one namespace on the host: say it is taken, nothing more.
                return Reply::err(
                    ErrorCode::Exists,
                    format!("the name {:?} is taken; pick another", req.name),
                );
            }
            if !req.replace || st.is_live() || st == State::Backoff {
                return Reply::err(
                    ErrorCode::Exists,
                    format!(
                        "an agent named {:?} exists ({st}); `aitherctl rm {}` it first{}",
                        req.name,
                        req.name,
                        if st.is_live() {
                            ""
                        } else {
                            ", or spawn with --replace"
                        }
                    ),
                );
            }
            // Its supervisor is resting; dropping the handle ends it.
            agents.remove(&req.name);
        }
        d.store.put_owner(&req.name, caller.uid);
        d.store.put_agent(
            &req.name,
            &serde_json::to_value(&rec).unwrap_or_default(),
            "created",
        );
        d.emit(
            Some(&req.name),
            "created",
            json!({"policy": rec.spec.policy, "argv": rec.spec.argv, "token_id": rec.token_id}),
        );
        let h = agent::start(d.clone(), rec, None, None, Some(tx), 0);
        agents.insert(req.name.clone(), h);
    }
    match rx.await {
        Ok(Ok(())) => Reply::ok(serde_json::to_value(d.info_of(&req.name)).unwrap_or_default()),
        Ok(Err(e)) => Reply::err(e.code(), e.to_string()),
        Err(_) => Reply::err(
            ErrorCode::Internal,
            "the agent's supervisor ended before starting",
        ),
    }
}

pub(super) type BuildError = (ErrorCode, String);

/// `--publish-host`: loopback addresses only, each once, and a host port below 1024 only for
/// root (as binding it would be on Linux). Checked here whatever the client checked.
fn check_publish_host(
    list: &[aither_proto::publish::HostPublish],
    caller: &Caller,
) -> Result<(), Reply> {
    aither_proto::publish::HostPublish::check_all(list)
        .map_err(|e| Reply::err(ErrorCode::Invalid, format!("--publish-host: {e}")))?;
    if let Some(p) = list.iter().find(|p| p.privileged()) {
        if caller.uid != 0 {
            return Err(Reply::err(
                ErrorCode::Denied,
                format!("--publish-host {p}: a host port below 1024 needs root, as binding it does on Linux; pick a port of 1024 or more"),
            ));
        }
    }
    Ok(())
}

/// The spec's part of `--publish-host`: refused where the policy forbids it or the agent has
/// no network namespace of its own; else its agent ports are the ones it may bind (under a
/// Landlock-confined `none` network, the only ones).
fn publish_ports(
    req: &SpawnRequest,
    policy: &crate::policy::Policy,
    spec: &mut SandboxSpec,
) -> Result<(), BuildError> {
    // `--publish NAME=PORT` (a service for other agents, reached through the gateway): the
    // agent may bind PORT, as for --publish-host; inbound from granted agents only, so the
    // policy's publish_host switch (the host's loopback) does not apply to it.
    if !req.publish.is_empty() && spec.new_net_ns {
        spec.publish_ports
            .extend(req.publish.iter().map(|(_, p)| *p));
        spec.publish_ports.sort_unstable();
        spec.publish_ports.dedup();
    }
    if req.publish_host.is_empty() {
        return Ok(());
    }
    if !policy.network.publish_host {
        return Err((
            ErrorCode::Denied,
            format!(
                "--publish-host: policy {} forbids publishing an agent's ports on the host ([network] publish_host = false)",
                policy.name
            ),
        ));
    }
    if !spec.new_net_ns {
        return Err((
            ErrorCode::Invalid,
            format!(
                "--publish-host: policy {} gives the agent the host's network (network.mode = host): it listens on the host itself, there is nothing to publish",
                policy.name
            ),
        ));
    }
    let mut ports: Vec<u16> = req.publish_host.iter().map(|p| p.agent_port).collect();
    ports.extend(spec.publish_ports.iter().copied());
    ports.sort_unstable();
    ports.dedup();
    spec.publish_ports = ports;
    Ok(())
}

/// Refuses a member's new agent over their per-user limits.
fn over_limits(
    d: &Shared,
    agents: &std::collections::HashMap<String, agent::Handle>,
    caller: &Caller,
    rec: &Record,
) -> Result<(), super::users::LimitError> {
    let loaded = d.config();
    let cfg = &loaded.config.users;
    let mut held = super::usage_in(agents, caller.uid);
    if let Some(h) = agents.get(&rec.request.name) {
        let i = h.info.lock().unwrap_or_else(|e| e.into_inner());
        if i.owner == caller.uid {
            held.agents = held.agents.saturating_sub(1);
            held.memory = held.memory.saturating_sub(i.charged.0.unwrap_or(0));
            held.cpus = (held.cpus - i.charged.1.unwrap_or(0.0)).max(0.0);
        }
    }
    let name = super::users::user_name(caller.uid);
    let limits = &rec.spec.limits;
    super::users::check(
        cfg.limits_of(name.as_deref()),
        held,
        limits.memory,
        limits
            .cpu
            .map(|c| c.quota_us as f64 / c.period_us.max(1) as f64),
        rec.gpu.as_ref().map(|g| g.priority),
    )
}

/// aitherd's signing key and its revocation list, for `prepare`.
struct DaemonAuthority<'a> {
    d: &'a Shared,
    /// The launch's token never leaves aitherd (a foreground `run` from a policy): its claims
    /// are checked as a token's are, unsigned, as `aitherctl run` does for its own launch
    /// (`prepare::OneLaunch`, docs/tokens.md "One-launch tokens"): a signature made and
    /// checked by the same process proves only that this process made the claims. A token the
    /// caller gives is verified with the host key and the revocations, as always.
    one_launch: bool,
}

impl crate::prepare::Authority for DaemonAuthority<'_> {
    fn verify(&self, text: &str) -> Result<token::Verified, token::TokenError> {
        self.d.check_token(text)
    }

    fn sign(&self, claims: &Claims) -> Result<String, token::TokenError> {
        Ok(token::mint(self.d.key.signing_key(), claims)?.encode())
    }

    fn mint_verified(
        &self,
        claims: &Claims,
    ) -> Result<(Option<String>, token::Verified), token::TokenError> {
        if self.one_launch {
            return Ok((None, token::verified_here(claims, token::now_unix())?));
        }
        let text = self.sign(claims)?;
        let v = self.verify(&text)?;
        Ok((Some(text), v))
    }
}

/// The one launch path (`prepare::prepare`) as aitherd runs it for `spawn` and `run`: the
/// caller's identity as the kernel gave it, aitherd's key and revocations, a member's routes
/// checked against their secrets, and the token minted or verified audited.
pub(super) fn prepare_launch(
    d: &Shared,
    caller: &Caller,
    name: &str,
    launch: &crate::prepare::LaunchRequest<'_>,
) -> Result<crate::prepare::PreparedLaunch, BuildError> {
    prepare_launch_as(d, caller, name, launch, false)
}

/// `prepare_launch`, for a launch whose minted token stays in aitherd when `one_launch`
/// (a foreground `run`; see `DaemonAuthority`).
pub(super) fn prepare_launch_as(
    d: &Shared,
    caller: &Caller,
    name: &str,
    launch: &crate::prepare::LaunchRequest<'_>,
    one_launch: bool,
) -> Result<crate::prepare::PreparedLaunch, BuildError> {
    use crate::prepare::{self, PrepareError, Principal, Source};
    let principal = Principal {
        uid: caller.uid,
        gid: caller.gid,
        admin: caller.admin,
    };
    let p =
        prepare::prepare(launch, &principal, &DaemonAuthority { d, one_launch }).map_err(|e| {
            let text = match (&e, launch.source) {
                (PrepareError::Token(_), Source::Token(_)) => format!("token refused: {e}"),
                _ => e.to_string(),
            };
            (e.code(), text)
        })?;
    if !caller.admin {
        // A member's routes name their own secrets (or root's, as root:NAME).
        super::secret_ops::check_routes(d, &d.secrets(), name, caller, &p.net)
            .map_err(|e| (e.code(), e.to_string()))?;
    }
    let (kind, rule) = match &p.minted {
        Some((policy, _)) => ("token_mint", format!("policy {policy}")),
        None => ("token_verify", "host key; not revoked; not expired".into()),
    };
    let root = p.verified.root();
    d.audit.record(
        Entry::new(kind, Verdict::Allow, rule)
            .agent(name)
            .actor("aitherd")
            .caller(caller.uid)
            .via(caller.via_name())
            .owner(root.owner.unwrap_or(caller.uid))
            .data(json!({"token_id": p.verified.id(), "exp": root.exp,
                         "source": p.minted.as_ref().map(|m| m.1.clone()),
                         "bus_publish": launch.bus_publish, "bus_subscribe": launch.bus_subscribe})),
    );
    Ok(p)
}

/// The spawn's record, from the one launch path shared with `run` and `export`
/// (`prepare::prepare`), plus what only a supervised agent has: the report always on (for
/// `inspect`) and the GPU ask.
fn build(
    d: &Shared,
    req: &SpawnRequest,
    caller: &Caller,
    presented: Option<&OwnedFd>,
) -> Result<Record, BuildError> {
    use crate::prepare::{Egress, LaunchRequest, Source, WorkspaceKind};
    let lookup = |k: &str| crate::prepare::passed_env(&req.pass_env, k);
    let source = Source::of(req.token.as_deref(), req.policy.as_deref());
    let launch = LaunchRequest {
        name: Some(&req.name),
        source,
        ttl: SPAWN_TOKEN_TTL,
        bus_publish: &req.bus_publish,
        bus_subscribe: &req.bus_subscribe,
        opts: RunOptions {
            name: None,
            workspace: req.workspace.clone(),
            env: req.env.clone(),
            timeout: None,
            memory: req.memory.map(crate::units::Size),
            cpus: req.cpus,
            pids: req.pids,
            argv: req.argv.clone(),
        },
        cwd: &req.cwd,
        env: &lookup,
        workspace: WorkspaceKind::presented_or_host(presented.map(AsFd::as_fd)),
        egress: Egress::Gateway,
    };
    let p = prepare_launch(d, caller, &req.name, &launch)?;
    let claims = p.verified.effective();
    let policy = claims.to_policy();
    let mut spec = p.spec;
    // Every supervised run proves what it enforces (`aitherctl inspect`).
    spec.report = true;
    publish_ports(req, &policy, &mut spec)?;
    // A service name is the owner's: another of their agents that publishes it now keeps it
    // (refused here with a clear error rather than taken over at run time).
    for (service, _) in &req.publish {
        if let Some(by) = d.gateway().publisher(caller.uid, service) {
            if by != req.name {
                return Err((
                    ErrorCode::Conflict,
                    format!("--publish {service}: agent {by:?} already publishes {service:?}"),
                ));
            }
        }
    }
    let gpu = gpu_ask(&claims.gpu, req).map_err(|e| (ErrorCode::Denied, e))?;
    let mut request = req.clone();
    // Kept only as far as the spec needs them.
    request.pass_env.clear();
    Ok(Record {
        request,
        spec,
        token_id: p.verified.id().to_string(),
        // The host key's tokens always have a text (only a `OneLaunch` has none).
        token: p.token.unwrap_or_default(),
        pain: policy.pain,
        created_ms: now_ms(),
        gpu,
        owner: caller.uid,
    })
}

/// The GPU ask: the token's claim, narrowed by the spawn flags (which may never widen it).
fn gpu_ask(
    claim: &crate::policy::GpuGrant,
    req: &SpawnRequest,
) -> Result<Option<crate::policy::GpuGrant>, String> {
    let over = |flag: &str, asked: u64, granted: u64| {
        if asked > granted {
            Err(format!(
                "--{flag} {asked} exceeds the token's gpu claim ({granted}): flags may only narrow it"
            ))
        } else {
            Ok(())
        }
    };
    let mut ask = claim.clone();
    if let Some(n) = req.gpus {
        over("gpus", n as u64, claim.count as u64)?;
        ask.count = n;
    }
    if let Some(v) = req.gpu_vram_mb {
        over("gpu-vram (MiB)", v, claim.vram_mb)?;
        ask.vram_mb = v;
    }
    if let Some(p) = req.gpu_priority {
        over("gpu-priority", p as u64, claim.priority as u64)?;
        ask.priority = p;
    }
    match req.gpu_exclusive {
        Some(true) if !claim.exclusive => {
            return Err("--gpu-exclusive: the token's gpu claim grants shared devices only".into())
        }
        Some(x) => ask.exclusive = x,
        None => {}
    }
    if ask.count > 0 && ask.vram_mb == 0 {
        return Err("a GPU request needs VRAM (--gpu-vram)".into());
    }
    Ok((ask.count > 0).then_some(ask))
}

/// The kept log files read (off the async threads), filtered and tailed; and where to follow
/// from.
async fn read_logs_from(dir: &Path, q: logs::Query) -> (Vec<logs::Entry>, Option<logs::Follower>) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (entries, follower) = logs::read_all(&dir, super::shim::LOG_KEEP_MAX, &q);
        (entries, Some(follower))
    })
    .await
    .unwrap_or_default()
}

async fn read_logs(dir: &Path, q: logs::Query) -> Vec<logs::Entry> {
    read_logs_from(dir, q).await.0
}

/// How log replies carry the agent's output.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LogForm {
    /// `{"text": ...}`: the agent's bytes as it wrote them.
    Text,
    /// `{"records": [...]}`: one object per record and run boundary.
    Records,
}

/// `entries` as reply frames of this form, each bounded: records in as many frames as needed;
/// text too while following, but the first answer keeps only the newest frame's worth, as
/// `logs` always did.
fn log_frames(entries: &[logs::Entry], form: LogForm, whole: bool) -> Vec<serde_json::Value> {
    match form {
        LogForm::Text if whole => logs::text_frames(entries)
            .into_iter()
            .map(|t| json!({"text": t}))
            .collect(),
        LogForm::Text => vec![json!({"text": logs::text_reply(entries)})],
        LogForm::Records => logs::record_chunks(entries)
            .into_iter()
            .map(|c| json!({"records": c}))
            .collect(),
    }
}

/// Whether the client has gone (EOF or error on its side of the socket).
async fn client_gone(r: &mut OwnedReadHalf) {
    let mut b = [0u8; 64];
    loop {
        match r.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A log request answered in frames: the kept records, then (`follow`) what the shim
/// appends, until the client goes or the agent is removed. False when the connection is done.
async fn serve_logs(
    d: &Shared,
    name: &str,
    q: logs::Query,
    form: LogForm,
    follow: bool,
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
) -> bool {
    if d.info_of(name).is_none() {
        return aio::write_reply(w, &not_found(name)).await.is_ok();
    }
    let (first, follower) = read_logs_from(&d.log_dir(name), q).await;
    let mut frames = log_frames(&first, form, false);
    if !follow {
        let last = frames.pop().unwrap_or_else(|| json!({"records": []}));
        for f in frames {
            if aio::write_reply(w, &Reply::chunk(f)).await.is_err() {
                return false;
            }
        }
        return aio::write_reply(w, &Reply::ok(last)).await.is_ok();
    }
    for f in frames {
        if aio::write_reply(w, &Reply::chunk(f)).await.is_err() {
            return false;
        }
    }
    let Some(mut follower) = follower else {
        return false;
    };
    let gone = client_gone(r);
    tokio::pin!(gone);
    loop {
        tokio::select! {
            _ = &mut gone => return false,
            _ = tokio::time::sleep(Duration::from_millis(150)) => {}
        }
        if d.info_of(name).is_none() {
            let last = match form {
                LogForm::Text => json!({"text": "", "removed": true}),
                LogForm::Records => json!({"records": [], "removed": true}),
            };
            let _ = aio::write_reply(w, &Reply::ok(last)).await;
            return false;
        }
        // Catch up in frames of FOLLOW_READ bytes read (at most 1 MiB a tick).
        for _ in 0..21 {
            let (f, new) = match tokio::task::spawn_blocking(move || {
                let new = follower.step(logs::FOLLOW_READ);
                (follower, new)
            })
            .await
            {
                Ok(x) => x,
                Err(_) => return false,
            };
            follower = f;
            let new: Vec<logs::Entry> = new.into_iter().filter(|e| e.passes(&q)).collect();
            if !new.is_empty() {
                for frame in log_frames(&new, form, true) {
                    if aio::write_reply(w, &Reply::chunk(frame)).await.is_err() {
                        return false;
                    }
                }
            }
            if !follower.behind() {
                break;
            }
        }
    }
}

async fn follow_events(
    d: &Shared,
    caller: &Caller,
    since_ms: Option<u64>,
    name: Option<String>,
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
) {
    if let Some(n) = &name {
        if let Err(reply) = authorize(d, caller, "events", n) {
            let _ = aio::write_reply(w, &reply).await;
            return;
        }
    }
    // Another user's events (and the daemon's own) are not shown to a non-admin.
    let shown =
        |e: &store::Event| caller.admin || e.name.as_deref().is_some_and(|n| visible(d, caller, n));
    // Subscribed before the history is read, so nothing falls between the two.
    let mut rx = d.events.subscribe();
    let mut last_ts = 0;
    if let Some(since) = since_ms {
        let d2 = d.clone();
        let n2 = name.clone();
        let hist = tokio::task::spawn_blocking(move || {
            let c = d2.store.reader()?;
            store::load_events(&c, d2.store.path(), since, n2.as_deref(), 10_000)
        })
        .await;
        if let Ok(Ok(events)) = hist {
            for e in events {
                last_ts = e.ts_ms;
                if !shown(&e) {
                    continue;
                }
                if aio::write_reply(
                    w,
                    &Reply::chunk(serde_json::to_value(&e).unwrap_or_default()),
                )
                .await
                .is_err()
                {
                    return;
                }
            }
        }
    }
    let gone = client_gone(r);
    tokio::pin!(gone);
    loop {
        let e = tokio::select! {
            _ = &mut gone => return,
            e = rx.recv() => e,
        };
        let e = match e {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let _ = aio::write_reply(
                    w,
                    &Reply::chunk(
                        json!({"ts_ms": now_ms(), "kind": "lagged", "data": {"missed": n}}),
                    ),
                )
                .await;
                continue;
            }
            Err(_) => return,
        };
        if e.ts_ms < last_ts
            || !shown(&e)
            || name
                .as_deref()
                .is_some_and(|n| e.name.as_deref() != Some(n))
        {
            continue;
        }
        if aio::write_reply(
            w,
            &Reply::chunk(serde_json::to_value(&e).unwrap_or_default()),
        )
        .await
        .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_via;

    #[test]
    fn via_takes_only_a_tool_name_an_agent_name_and_a_bounded_refusal() {
        assert!(check_via("mem_get", Some("w-1"), None).is_ok());
        assert!(check_via("logs", None, Some("refused by the token: agent: …")).is_ok());
        assert!(check_via("", None, None).is_err());
        assert!(check_via("Logs\n", None, None).is_err());
        assert!(check_via(&"a".repeat(33), None, None).is_err());
        assert!(check_via("logs", Some("../x"), None).is_err());
        assert!(check_via("logs", None, Some(&"x".repeat(1025))).is_err());
    }
}
