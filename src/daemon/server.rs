//! The control socket: who may connect, one reply per request frame, and what each request
//! does. A malformed, truncated or oversized frame gets an error reply; the daemon goes on.

use std::io::SeekFrom;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::agent::{self, Cmd, Record};
use super::proto::{aio, Reply, Request, SpawnRequest};
use super::store::{self, now_ms};
use super::supervise::State;
use super::{check_name, Shared};
use crate::audit::{Decision, Entry};
use crate::policy::Policy;
use crate::sandbox::{RunOptions, SandboxSpec};
use crate::token::{self, Claims};

/// Token lifetime of an agent spawned from a policy: a year (revocation ends it sooner).
pub const SPAWN_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Who may use the socket: root, the daemon's own uid, or a member of group `aither`
/// (checked with SO_PEERCRED beside the socket file's mode, 0660 root:aither).
pub struct Access {
    pub group: Option<u32>,
}

impl Access {
    pub fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        // SAFETY: geteuid has no preconditions.
        if uid == 0 || uid == unsafe { libc::geteuid() } {
            return true;
        }
        let Some(g) = self.group else { return false };
        if gid == g {
            return true;
        }
        let Some(pid) = pid else { return false };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Groups:"))
                    .map(|l| l.split_whitespace().skip(1).any(|x| x == g.to_string()))
            })
            .unwrap_or(false)
    }
}

/// The gid of group `aither`, if it exists.
pub fn aither_gid() -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(super::GROUP)).then(|| f.nth(1)?.parse().ok())?
    })
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
    // Created with no permissions for anyone but root, then opened up: no window in which
    // another user could connect.
    // SAFETY: umask has no preconditions; restored right after bind.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let mut s = stream;
            let _ = aio::write_reply(&mut s, &Reply::err("busy", "too many connections")).await;
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

async fn connection(d: Shared, stream: UnixStream, access: &Access) {
    let cred = stream.peer_cred().ok();
    let allowed = cred
        .map(|c| access.allows(c.uid(), c.gid(), c.pid()))
        .unwrap_or(false);
    let actor = actor_of(cred.as_ref());
    let (mut r, mut w) = stream.into_split();
    if !allowed {
        tracing::warn!(uid = cred.map(|c| c.uid()), "control socket: access denied");
        d.emit_daemon(
            "access_denied",
            json!({"uid": cred.map(|c| c.uid()), "pid": cred.and_then(|c| c.pid())}),
        );
        d.audit.record(
            Entry::new(
                "control_connect",
                Decision::Deny,
                "control socket: root, aitherd's uid or group aither only",
            )
            .actor(actor.clone())
            .data(json!({"pid": cred.and_then(|c| c.pid())})),
        );
        let _ = aio::write_reply(
            &mut w,
            &Reply::err(
                "denied",
                "only root and members of group aither may use aitherd",
            ),
        )
        .await;
        return;
    }
    loop {
        let body =
            match tokio::time::timeout(Duration::from_secs(600), aio::read_frame(&mut r)).await {
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
        let req: Request = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                let code = if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
                    "bad_request"
                } else {
                    "bad_json"
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
                follow: true,
                tail,
            } => {
                follow_logs(&d, &name, tail, &mut r, &mut w).await;
                return;
            }
            Request::Events {
                follow: true,
                since_ms,
                name,
            } => {
                follow_events(&d, since_ms, name, &mut r, &mut w).await;
                return;
            }
            req @ (Request::BusPub { .. } | Request::BusSub { .. }) => {
                super::bus::serve(d.clone(), req, actor.clone(), r, w).await;
                return;
            }
            req => {
                let reply = handle(&d, req, &actor).await;
                if aio::write_reply(&mut w, &reply).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn actor_of(cred: Option<&tokio::net::unix::UCred>) -> String {
    match cred {
        Some(c) => format!("uid {}", c.uid()),
        None => "unknown peer".into(),
    }
}

/// Audits an operator's request and its outcome.
fn audit_op(
    d: &Shared,
    kind: &str,
    name: &str,
    actor: &str,
    reply: &Reply,
    data: serde_json::Value,
) {
    let (decision, rule) = match &reply.error {
        None => (Decision::Allow, "control socket: operator".to_string()),
        Some(e) => (Decision::Deny, format!("{}: {}", e.code, e.message)),
    };
    d.audit.record(
        Entry::new(kind, decision, rule)
            .agent(name)
            .actor(actor)
            .data(data),
    );
}

async fn handle(d: &Shared, req: Request, actor: &str) -> Reply {
    let audited = match &req {
        Request::Stop { name, .. } => Some(("stop", name.clone(), json!({}))),
        Request::Kill { name, signal } => Some(("kill", name.clone(), json!({"signal": signal}))),
        Request::Restart { name } => Some(("restart", name.clone(), json!({}))),
        Request::Rm {
            name,
            force,
            purge_memory,
        } => Some((
            "rm",
            name.clone(),
            json!({"force": force, "purge_memory": purge_memory}),
        )),
        _ => None,
    };
    let reply = handle_inner(d, req, actor).await;
    if let Some((kind, name, data)) = audited {
        audit_op(d, kind, &name, actor, &reply, data);
    }
    reply
}

async fn handle_inner(d: &Shared, req: Request, actor: &str) -> Reply {
    match req {
        Request::Ping => {
            Reply::ok(json!({"pid": std::process::id(), "version": env!("CARGO_PKG_VERSION")}))
        }
        Request::Spawn(s) => spawn(d, *s, actor).await,
        Request::GpuLs => Reply::ok(d.gpu.ls()),
        Request::GpuQueue => Reply::ok(json!({"queue": d.gpu.queue()})),
        Request::Ps => {
            let agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
            let mut list: Vec<agent::Info> = agents
                .values()
                .map(|h| {
                    let mut i = h.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    // `inspect` shows the enforcement report; the list stays small.
                    i.report = None;
                    i.gpu = d.gpu.column(&i.name);
                    i
                })
                .collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            Reply::ok(serde_json::to_value(list).unwrap_or_default())
        }
        Request::BusStreams => {
            let d2 = d.clone();
            tokio::task::spawn_blocking(move || super::bus::streams(&d2))
                .await
                .unwrap_or_else(|e| Reply::err("internal", e.to_string()))
        }
        Request::BusAck { durable, seq } => super::bus::operator_ack(d, &durable, seq).await,
        Request::BusPub { .. } | Request::BusSub { .. } => Reply::err(
            "bad_request",
            "bus_pub and bus_sub take over their connection",
        ),
        Request::Inspect { name } => match d.info_of(&name) {
            Some(mut i) => {
                i.gpu = d.gpu.column(&name);
                let mut v = serde_json::to_value(i).unwrap_or_default();
                v["gpu_lease"] = d.gpu.lease_info(&name);
                // What aitherd spends for it (docs/daemon.md "Bounds").
                v["daemon_usage"] =
                    serde_json::to_value(d.usage_of(&name).view()).unwrap_or_default();
                // Egress counters per rule (docs/network.md), while a run is served.
                if let (Some(o), Some(n)) = (v.as_object_mut(), d.net_stats(&name)) {
                    o.insert("net".into(), n);
                }
                Reply::ok(v)
            }
            None => not_found(&name),
        },
        Request::Logs { name, tail, .. } => {
            if d.info_of(&name).is_none() {
                return not_found(&name);
            }
            let text = read_tail(&d.log_dir(&name), tail).await;
            Reply::ok(json!({"text": text}))
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
                return Reply::err("invalid", format!("no such signal: {signal}"));
            }
            command(d, &name, |reply| Cmd::Kill { signal, reply }).await
        }
        Request::Restart { name } => command(d, &name, |reply| Cmd::Restart { reply }).await,
        Request::Mem { agent, request } => mem(d, agent, request).await,
        Request::Rm {
            name,
            force,
            purge_memory,
        } => {
            let Some(info) = d.info_of(&name) else {
                return not_found(&name);
            };
            if !force && (info.state.is_live() || info.state == State::Backoff) {
                return Reply::err(
                    "conflict",
                    format!("{name} is {}: stop it first, or use rm --force", info.state),
                );
            }
            let reply = command(d, &name, |reply| Cmd::Remove { reply }).await;
            if reply.ok && purge_memory {
                let d2 = d.clone();
                let n2 = name.clone();
                let purged = tokio::task::spawn_blocking(move || d2.memory.clear(&n2, None)).await;
                match purged {
                    Ok(Ok(n)) => d.emit(Some(&name), "memory_purged", json!({"entries": n})),
                    Ok(Err(e)) => return Reply::err(e.code(), e.to_string()),
                    Err(e) => return Reply::err("internal", e.to_string()),
                }
            }
            reply
        }
        Request::Events { since_ms, name, .. } => {
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
                Ok(Ok(ev)) => Reply::ok(serde_json::to_value(ev).unwrap_or_default()),
                Ok(Err(e)) => Reply::err("internal", e.to_string()),
                Err(e) => Reply::err("internal", e.to_string()),
            }
        }
    }
}

/// An operator's memory request (any agent's memory, no quota: docs/memory.md).
async fn mem(d: &Shared, agent: String, request: serde_json::Value) -> Reply {
    if let Err(e) = super::check_name(&agent) {
        return Reply::err("invalid", e);
    }
    let op = request.get("op").and_then(|o| o.as_str()).unwrap_or("");
    if !op.starts_with("mem.") {
        return Reply::err("invalid", format!("{op:?} is not a memory op (mem.*)"));
    }
    let d2 = d.clone();
    let res = tokio::task::spawn_blocking(move || {
        crate::memory::service::handle(&d2.memory, crate::memory::Actor::Operator, &agent, &request)
    })
    .await;
    match res {
        Ok(Ok(data)) => Reply::ok(data),
        Ok(Err(e)) => Reply::err(e.code(), e.to_string()),
        Err(e) => Reply::err("internal", e.to_string()),
    }
}

fn not_found(name: &str) -> Reply {
    Reply::err(
        "not_found",
        format!("no agent named {name:?} (`aitherctl ps` lists them)"),
    )
}

async fn command<F>(d: &Shared, name: &str, make: F) -> Reply
where
    F: FnOnce(oneshot::Sender<Result<(), String>>) -> Cmd,
{
    let (tx, rx) = oneshot::channel();
    {
        let agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = agents.get(name) else {
            return not_found(name);
        };
        if h.cmd.send(make(tx)).is_err() {
            return Reply::err("internal", format!("{name}: its supervisor has ended"));
        }
    }
    match rx.await {
        Ok(Ok(())) => match d.info_of(name) {
            Some(i) => Reply::ok(serde_json::to_value(i).unwrap_or_default()),
            None => Reply::ok(json!({"name": name, "removed": true})),
        },
        Ok(Err(e)) => Reply::err("conflict", e),
        Err(_) => Reply::err("internal", format!("{name}: no answer from its supervisor")),
    }
}

/// Builds the agent's spec from a verified token (the same path as `aitherctl run`), then
/// starts its supervisor and waits for the first launch.
async fn spawn(d: &Shared, req: SpawnRequest, actor: &str) -> Reply {
    let name = req.name.clone();
    let argv = req.argv.clone();
    let reply = spawn_inner(d, req).await;
    let (decision, rule) = match &reply.error {
        None => {
            let info = d.info_of(&name);
            (
                Decision::Allow,
                format!(
                    "token {} (policy {})",
                    info.as_ref().map(|i| i.token_id.as_str()).unwrap_or("?"),
                    info.as_ref().map(|i| i.policy.as_str()).unwrap_or("?")
                ),
            )
        }
        Some(e) => (Decision::Deny, format!("{}: {}", e.code, e.message)),
    };
    d.audit.record(
        Entry::new("spawn", decision, rule)
            .agent(&name)
            .actor(actor)
            .data(json!({"argv": argv})),
    );
    reply
}

async fn spawn_inner(d: &Shared, req: SpawnRequest) -> Reply {
    if let Err(e) = check_name(&req.name) {
        return Reply::err("invalid", e);
    }
    if let Err(e) = req.supervision.validate() {
        return Reply::err("invalid", e);
    }
    if req.argv.is_empty() {
        return Reply::err("invalid", "no command to run");
    }
    let d2 = d.clone();
    let req2 = req.clone();
    let built = tokio::task::spawn_blocking(move || build(&d2, &req2)).await;
    let rec = match built {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Reply::err(e.0, e.1),
        Err(e) => return Reply::err("internal", e.to_string()),
    };
    let (tx, rx) = oneshot::channel();
    {
        let mut agents = d.agents.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = agents.get(&req.name) {
            let st = h.info.lock().unwrap_or_else(|e| e.into_inner()).state;
            if !req.replace || st.is_live() || st == State::Backoff {
                return Reply::err(
                    "exists",
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
        Ok(Err(e)) => Reply::err("launch_failed", e),
        Err(_) => Reply::err("internal", "the agent's supervisor ended before starting"),
    }
}

type BuildError = (&'static str, String);

fn build(d: &Shared, req: &SpawnRequest) -> Result<Record, BuildError> {
    let bad = |e: &dyn std::fmt::Display| ("invalid", e.to_string());
    let (text, verified) = match (&req.token, &req.policy) {
        (Some(_), _) if !req.bus_publish.is_empty() || !req.bus_subscribe.is_empty() => {
            return Err((
                "invalid",
                "--bus-publish/--bus-subscribe add to a token aitherd mints from a policy; \
                 a given token already says what it grants (mint it with those subjects)"
                    .into(),
            ))
        }
        (Some(t), _) => {
            let v = d
                .check_token(t)
                .map_err(|e| ("denied", format!("token refused: {e}")))?;
            d.audit.record(
                Entry::new(
                    "token_verify",
                    Decision::Allow,
                    "host key; not revoked; not expired",
                )
                .agent(&req.name)
                .actor("aitherd")
                .data(json!({"token_id": v.id()})),
            );
            if v.effective().subject != req.name {
                return Err((
                    "denied",
                    format!(
                        "the token is for {:?}, not {:?}",
                        v.effective().subject,
                        req.name
                    ),
                ));
            }
            (t.clone(), v)
        }
        (None, p) => {
            let loaded = Policy::load(p.as_deref().unwrap_or("strict")).map_err(|e| bad(&e))?;
            let mut claims = Claims::from_policy(&loaded.policy, &req.name, SPAWN_TOKEN_TTL)
                .map_err(|e| bad(&e))?;
            claims
                .grant_bus(&req.bus_publish, &req.bus_subscribe)
                .map_err(|e| bad(&e))?;
            let t = token::mint(d.key.signing_key(), &claims).map_err(|e| bad(&e))?;
            d.audit.record(
                Entry::new(
                    "token_mint",
                    Decision::Allow,
                    format!("policy {}", loaded.policy.name),
                )
                .agent(&req.name)
                .actor("aitherd")
                .data(
                    json!({"token_id": claims.id, "exp": claims.exp, "source": loaded.source,
                             "bus_publish": req.bus_publish, "bus_subscribe": req.bus_subscribe}),
                ),
            );
            let text = t.encode();
            let v = d.check_token(&text).map_err(|e| bad(&e))?;
            (text, v)
        }
    };
    let claims = verified.effective();
    let policy = claims.to_policy();
    let opts = RunOptions {
        name: Some(req.name.clone()),
        workspace: req.workspace.clone(),
        env: req.env.clone(),
        timeout: None,
        memory: req.memory.map(crate::units::Size),
        cpus: req.cpus,
        pids: req.pids,
        argv: req.argv.clone(),
    };
    let lookup = |k: &str| {
        req.pass_env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let mut spec = SandboxSpec::derive(&policy, &opts, &lookup, &req.cwd).map_err(|e| bad(&e))?;
    // Every supervised run proves what it enforces (`aitherctl inspect`).
    spec.report = true;
    // Egress through the daemon's gateway (docs/network.md).
    crate::net::attach(&mut spec, &claims.net);
    if let Some(w) = &spec.workspace {
        verified
            .check_workspace(&w.path)
            .map_err(|e| ("denied", e.to_string()))?;
    }
    let gpu = gpu_ask(&claims.gpu, req).map_err(|e| ("denied", e))?;
    let mut request = req.clone();
    // Kept only as far as the spec needs them.
    request.pass_env.clear();
    Ok(Record {
        request,
        spec,
        token_id: verified.id().to_string(),
        token: text,
        pain: policy.pain,
        created_ms: now_ms(),
        gpu,
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

/// The last `tail` lines (default 100) of the agent's log, across one rotation.
async fn read_tail(dir: &Path, tail: Option<usize>) -> String {
    let n = tail.unwrap_or(100);
    let mut text = String::new();
    for f in ["agent.log.1", "agent.log"] {
        if let Ok(b) = tokio::fs::read(dir.join(f)).await {
            text.push_str(&String::from_utf8_lossy(&b));
        }
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let start = lines.len().saturating_sub(n);
    let mut out: String = lines[start..].concat();
    // A frame holds at most 64 KiB; keep the newest part.
    if out.len() > 60 * 1024 {
        let mut cut = out.len() - 60 * 1024;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = out[cut..].to_string();
    }
    out
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

async fn follow_logs(
    d: &Shared,
    name: &str,
    tail: Option<usize>,
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
) {
    if d.info_of(name).is_none() {
        let _ = aio::write_reply(w, &not_found(name)).await;
        return;
    }
    let dir = d.log_dir(name);
    let first = read_tail(&dir, tail).await;
    if aio::write_reply(w, &Reply::chunk(json!({"text": first})))
        .await
        .is_err()
    {
        return;
    }
    let path = dir.join("agent.log");
    let meta = tokio::fs::metadata(&path).await.ok();
    let mut pos = meta.as_ref().map(|m| m.len()).unwrap_or(0);
    let mut ino = meta.map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let gone = client_gone(r);
    tokio::pin!(gone);
    loop {
        tokio::select! {
            _ = &mut gone => return,
            _ = tokio::time::sleep(Duration::from_millis(150)) => {}
        }
        if d.info_of(name).is_none() {
            let _ = aio::write_reply(w, &Reply::ok(json!({"text": "", "removed": true}))).await;
            return;
        }
        let Ok(meta) = tokio::fs::metadata(&path).await else {
            continue;
        };
        let now_ino = std::os::unix::fs::MetadataExt::ino(&meta);
        if Some(now_ino) != ino || meta.len() < pos {
            // Rotated (or truncated): read the new file from its start.
            ino = Some(now_ino);
            pos = 0;
        }
        if meta.len() == pos {
            continue;
        }
        let Ok(mut f) = tokio::fs::File::open(&path).await else {
            continue;
        };
        if f.seek(SeekFrom::Start(pos)).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; ((meta.len() - pos) as usize).min(48 * 1024)];
        let Ok(n) = f.read(&mut buf).await else {
            continue;
        };
        pos += n as u64;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if aio::write_reply(w, &Reply::chunk(json!({"text": text})))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn follow_events(
    d: &Shared,
    since_ms: Option<u64>,
    name: Option<String>,
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
) {
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
