//! `aitherctl mcp`: the Model Context Protocol server (docs/mcp.md). The session, the tool
//! list and the token's narrowing are `aither::mcp`; this file carries each call out with the
//! CLI's own client paths: the control protocol's requests on aitherd's socket (as the user who
//! runs it), `aitherctl run` itself for `run`, and `cp`'s agent side for the file tools.

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use aither::audit::{Entry, Verdict};
use aither::daemon;
use aither::daemon::client::Client;
use aither::daemon::proto::{ExecRequest, Reply, Request, SpawnRequest, Via};
use aither::daemon::supervise::{RestartPolicy, Supervision};
use aither::mcp::rpc::{Outcome, Session, Tools};
use aither::mcp::scope::{Access, Scope};
use aither::mcp::tools::Args;
use aither::mcp::ToolError;
use aither::token::{self, Token};
use clap::Args as ClapArgs;
use ed25519_dalek::VerifyingKey;
use serde_json::{json, Map, Value};

use crate::mcp_files;

/// Serve the Model Context Protocol on stdin/stdout, for agent frameworks.
///
/// Speaks MCP (JSON-RPC 2.0, one message per line; protocol versions 2024-11-05 to
/// 2025-11-25, negotiated at `initialize`) so that a framework (Claude Desktop, an IDE, an
/// agent SDK) can run sandboxed commands and drive supervised agents. Configure it as a stdio
/// server whose command is `aitherctl` with the arguments `mcp` (and `--token FILE`).
///
/// Tools: run (one command in a new sandbox, under a policy), spawn, ps, logs, exec, stop,
/// rm; read, write, list (files inside an agent's sandbox, as the agent: nothing on the host
/// side ever follows an agent's link); mem_get, mem_put, mem_search; bus_publish. Each has a
/// JSON schema (`tools/list`); a failed call is a result with isError and a message that
/// names the argument at fault.
///
/// Every call acts as the user running `aitherctl mcp` (aitherd's multi-user rules apply:
/// a member of group aither acts on their own agents only; `run` needs root). With --token,
/// the client is narrowed to the token: its subject is the only agent it may name or spawn,
/// its policy the only one it may run under (the sandbox is the token's), its memory tiers and
/// grants the only memory it may read or write, its bus.publish patterns the only subjects.
/// A call outside the token is refused without asking aitherd to act. The token is verified
/// (signature and expiry; revocation where the host's revocation list is readable, as for
/// `token verify`) at start and before every call.
///
/// Every call is an audit record of kind `mcp` (tool, agent; allow, or deny with the reason),
/// and aitherd's own records of the call (spawn, exec, cp, ...) carry `"via": "mcp"`.
///
/// Nothing but protocol messages is written to stdout; diagnostics go to stderr. The server
/// ends at the end of its input.
///
/// Exit status: 0 the input ended; 1 the token is refused or unreadable; 2 bad usage.
///
/// Examples:
///   aitherctl mcp
///   aitherctl token mint --policy strict --subject worker --ttl 8h --out worker.tok
///   aitherctl mcp --token worker.tok
///
/// A framework's configuration (Claude Desktop's claude_desktop_config.json, any mcpServers):
///   {"mcpServers": {"aither": {"command": "aitherctl",
///                              "args": ["mcp", "--token", "/path/worker.tok"]}}}
///
/// More: docs/mcp.md.
#[derive(ClapArgs)]
#[command(verbatim_doc_comment)]
pub struct McpArgs {
    /// A capability token file that narrows what the client may do.
    #[arg(long, value_name = "FILE")]
    token: Option<String>,
    /// The key the token is verified with (a file, or 64 hex digits / 43 base64url
    /// characters); default: this host's key.
    #[arg(long, value_name = "FILE|KEY", requires = "token")]
    pubkey: Option<String>,
}

/// The token given at start.
struct Given {
    token: Token,
    key: VerifyingKey,
    /// The file's absolute path, for `aitherctl run --token`.
    arg: String,
}

pub fn run(a: McpArgs) -> i32 {
    let given = match a.token.as_deref().map(|t| load(t, a.pubkey.as_deref())) {
        None => None,
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            crate::print_error(&e);
            return 1;
        }
    };
    let server = Server { given };
    if let Err(e) = server.scope() {
        eprintln!("aither: error: {e}");
        return 1;
    }
    let mut session = Session::new(server);
    match session.serve(io::stdin().lock(), io::stdout().lock()) {
        Ok(()) => 0,
        // The client went away.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("aither: error: mcp: {e}");
            1
        }
    }
}

fn load(arg: &str, pubkey: Option<&str>) -> anyhow::Result<Given> {
    // A file only: stdin is the protocol's, and a token's text on a command line (this one, or
    // `run`'s) is readable by every user in the process list.
    if arg == "-" || !Path::new(arg).is_file() {
        anyhow::bail!(
            "--token {}: not a file (give the token as a file, mode 0600)",
            arg.chars().take(40).collect::<String>()
        );
    }
    let token = crate::token_cmd::read_token_arg(arg)?;
    let key = match pubkey {
        Some(k) => token::parse_public_key(k)?,
        None => token::HostKey::load(&token::state_dir())
            .map_err(|e| anyhow::anyhow!("{e} (a member verifies with --pubkey KEY: `aitherctl token pubkey` as root prints it)"))?
            .public(),
    };
    // Absolute, for `aitherctl run --token` from whatever directory.
    let arg = std::fs::canonicalize(arg)?.display().to_string();
    Ok(Given { token, key, arg })
}

struct Server {
    given: Option<Given>,
}

impl Tools for Server {
    fn call(&mut self, name: &str, args: &Map<String, Value>) -> Result<Outcome, ToolError> {
        let a = Args(args);
        // Named in the record of a refusal when it is an agent's name at all.
        let agent = a
            .opt_str("agent")
            .ok()
            .flatten()
            .filter(|n| aither::agent_name::AgentName::parse("agent", n).is_ok())
            .map(str::to_string);
        let res = self
            .scope()
            .and_then(|scope| self.dispatch(name, &a, &scope));
        if let Err(e @ ToolError::Refused { .. }) = &res {
            note(name, agent.as_deref(), Some(&e.to_string()));
        }
        res
    }
}

impl Server {
    /// The narrowing in force: the token verified again now (it may have expired or been
    /// revoked since the last call).
    fn scope(&self) -> Result<Scope, ToolError> {
        let Some(g) = &self.given else {
            return Ok(Scope::Caller);
        };
        let store = aither::revocations::RevocationStore::open_existing(&token::state_dir())
            .map_err(|e| ToolError::Failed(format!("cannot check the token: {e}")))?;
        token::verify(&g.token, &g.key, token::now_unix(), &store)
            .map(|v| Scope::Token(Box::new(v.effective().clone())))
            .map_err(|e| ToolError::refused("token", e.to_string()))
    }

    fn dispatch(&self, name: &str, a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
        match name {
            "run" => self.run(a, scope),
            "spawn" => self.spawn(a, scope),
            "ps" => ps(scope),
            "logs" => logs(a, scope),
            "exec" => exec(a, scope),
            "stop" => {
                let agent = agent_arg(a, scope)?;
                let timeout_ms = a.opt_u64("timeout_s", 3600)?.map(|s| s * 1000);
                simple(
                    "stop",
                    &agent,
                    Request::Stop {
                        name: agent.clone(),
                        timeout_ms,
                    },
                )
            }
            "rm" => {
                let agent = agent_arg(a, scope)?;
                let force = a.opt_bool("force")?;
                let req = Request::Rm {
                    name: agent.clone(),
                    force,
                    purge_memory: false,
                };
                simple("rm", &agent, req)
            }
            "read" => mcp_files::read(a, scope),
            "write" => mcp_files::write(a, scope),
            "list" => mcp_files::list(a, scope),
            "mem_get" | "mem_put" | "mem_search" => mem(name, a, scope),
            "bus_publish" => bus_publish(a, scope),
            _ => Err(ToolError::Failed(format!("{name}: not implemented"))),
        }
    }

    /// `aitherctl run` itself, as a child: same checks, same sandbox, same audit record.
    fn run(&self, a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
        let argv = a.argv("argv")?;
        let policy = a.opt_str("policy")?;
        scope.policy("policy", policy)?;
        let workspace = a.opt_str("workspace")?;
        if let Some(w) = workspace {
            if !Path::new(w).is_absolute() {
                return Err(ToolError::arg("workspace", "must be an absolute path"));
            }
        }
        let timeout = a.opt_u64("timeout_s", 86_400)?;
        let max = max_output(a)?;
        let exe = std::env::current_exe()
            .map_err(|e| ToolError::Failed(format!("cannot find aitherctl itself: {e}")))?;
        let mut c = Command::new(exe);
        c.arg("run");
        match &self.given {
            Some(g) => c.args(["--token", &g.arg]),
            None => c.args(["--policy", policy.unwrap_or("strict")]),
        };
        if let Some(w) = workspace {
            c.args(["--workspace", w]);
        }
        if let Some(t) = timeout {
            c.args(["--timeout", &format!("{t}s")]);
        }
        c.arg("--").args(&argv);
        // A server that goes away (its client closed it, or killed it) takes the run with it:
        // `aitherctl run` forwards the SIGTERM to the sandbox.
        // SAFETY: prctl is async-signal-safe and nix's wrapper allocates nothing; nothing else
        // runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| Ok(nix::sys::prctl::set_pdeathsig(nix::sys::signal::SIGTERM)?));
        }
        note("run", None, None);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ToolError::Failed(format!("cannot start aitherctl run: {e}")))?;
        let out = Capture::start(child.stdout.take().map(OwnedFd::from), max);
        let err = Capture::start(child.stderr.take().map(OwnedFd::from), max);
        let status = child
            .wait()
            .map_err(|e| ToolError::Failed(format!("waiting for aitherctl run: {e}")))?;
        let code = exit_code(status);
        Ok(command_outcome(
            code,
            out.finish(),
            err.finish(),
            code == 125,
        ))
    }

    fn spawn(&self, a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
        let agent = agent_arg(a, scope)?;
        let argv = a.argv("argv")?;
        let policy = a.opt_str("policy")?;
        scope.policy("policy", policy)?;
        let mut supervision = Supervision::default();
        if let Some(r) = a.opt_str("restart")? {
            supervision.restart = serde_json::from_value::<RestartPolicy>(json!(r))
                .map_err(|_| ToolError::arg("restart", "must be never, on-failure or always"))?;
        }
        let workspace = match a.opt_str("workspace")? {
            Some(w) if !Path::new(w).is_absolute() => {
                return Err(ToolError::arg("workspace", "must be an absolute path"))
            }
            w => w.map(PathBuf::from),
        };
        let cwd = std::env::current_dir().map_err(|e| ToolError::Failed(e.to_string()))?;
        let req = SpawnRequest {
            name: agent.clone(),
            policy: match &self.given {
                Some(_) => None,
                None => Some(policy.unwrap_or("strict").to_string()),
            },
            token: self.given.as_ref().map(|g| g.token.encode()),
            argv,
            workspace,
            cwd,
            env: a.strings("env")?,
            labels: Default::default(),
            pass_env: std::env::vars().collect(),
            supervision,
            memory: None,
            cpus: None,
            pids: None,
            replace: a.opt_bool("replace")?,
            gpus: None,
            gpu_vram_mb: None,
            gpu_priority: None,
            gpu_exclusive: None,
            bus_publish: vec![],
            bus_subscribe: vec![],
            publish: vec![],
            publish_host: vec![],
        };
        let explicit = req.workspace.is_some();
        let ws = crate::daemon_cmd::open_workspace(&req, explicit)
            .map_err(|e| ToolError::arg("workspace", format!("{e:#}")))?;
        let fds: Vec<_> = ws.iter().map(AsFd::as_fd).collect();
        let mut c = connect("spawn", Some(&agent))?;
        let v = data(c.call_with_fds(&Request::Spawn(Box::new(req)), &fds))?;
        Ok(Outcome::json(brief(&v)))
    }
}

/// The agent argument, within the token.
pub(crate) fn agent_arg(a: &Args<'_>, scope: &Scope) -> Result<String, ToolError> {
    let agent = a.str("agent")?;
    aither::agent_name::AgentName::parse("agent", agent)
        .map_err(|e| ToolError::arg("agent", e.to_string()))?;
    scope.agent("agent", agent)?;
    Ok(agent.to_string())
}

/// Records a call aitherd does not act on: a refusal by the token, or `run` (no daemon
/// involved). Through aitherd when it is reachable; else, for root, in the audit log directly
/// (as `aitherctl run` does); else nowhere (a member cannot write the log).
fn note(tool: &str, agent: Option<&str>, refused: Option<&str>) {
    let req = Request::Via {
        via: Via::Mcp,
        tool: tool.into(),
        agent: agent.map(str::to_string),
        refused: refused.map(str::to_string),
    };
    let sent = Client::connect(&daemon::socket_path()).and_then(|mut c| c.call(&req));
    if sent.is_err() && nix::unistd::geteuid().as_raw() == 0 {
        let (decision, rule) = match refused {
            Some(r) => (Verdict::Deny, r.to_string()),
            None => (Verdict::Allow, "mcp: operator".to_string()),
        };
        aither::audit::record(
            Entry::new("mcp", decision, rule)
                .actor(crate::token_cmd::actor())
                .via(Some("mcp"))
                .data(json!({"tool": tool, "agent": agent})),
        );
    }
}

/// A connection to aitherd on which this call is declared (`via`), which aitherd records.
pub(crate) fn connect(tool: &str, agent: Option<&str>) -> Result<Client, ToolError> {
    let mut c = Client::connect(&daemon::socket_path()).map_err(fail)?;
    let req = Request::Via {
        via: Via::Mcp,
        tool: tool.into(),
        agent: agent.map(str::to_string),
        refused: None,
    };
    data(c.call(&req))?;
    Ok(c)
}

pub(crate) fn fail(e: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(e.to_string())
}

/// A reply's data, or aitherd's reason.
pub(crate) fn data(
    r: Result<Reply, aither::daemon::client::ClientError>,
) -> Result<Value, ToolError> {
    let r = r.map_err(fail)?;
    match (r.ok, r.error) {
        (true, _) => Ok(r.data.unwrap_or_default()),
        (false, Some(e)) => Err(ToolError::Failed(format!("{} ({})", e.message, e.code))),
        (false, None) => Err(ToolError::Failed("aitherd refused without a reason".into())),
    }
}

/// One request on agent `agent`, its reply as the result.
fn simple(tool: &str, agent: &str, req: Request) -> Result<Outcome, ToolError> {
    let v = data(connect(tool, Some(agent))?.call(&req))?;
    Ok(Outcome::json(
        json!({"agent": agent, "done": tool, "reply": v}),
    ))
}

/// The fields of an agent worth a model's attention.
fn brief(v: &Value) -> Value {
    json!({
        "name": v["name"], "state": v["state"], "pid": v["pid1"], "policy": v["policy"],
        "restarts": v["restarts"], "owner": v["owner"], "last_exit": v["last_exit"],
        "argv": v["argv"], "workspace": v["workspace"],
    })
}

fn ps(scope: &Scope) -> Result<Outcome, ToolError> {
    let v = data(connect("ps", None)?.call(&Request::Ps))?;
    let agents: Vec<Value> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["name"].as_str().is_some_and(|n| scope.shows(n)))
        .map(brief)
        .collect();
    Ok(Outcome::json(json!({"agents": agents})))
}

fn logs(a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
    let agent = agent_arg(a, scope)?;
    let tail = a.opt_u64("tail", 10_000)?.unwrap_or(100) as usize;
    let stream = a
        .opt_str("stream")?
        .map(str::parse)
        .transpose()
        .map_err(|e: String| ToolError::arg("stream", e))?;
    let req = Request::Logs {
        name: agent.clone(),
        follow: false,
        tail: Some(tail),
        since_ns: None,
        stream,
        records: false,
    };
    let v = data(connect("logs", Some(&agent))?.call(&req))?;
    let text = v["text"].as_str().unwrap_or_default().to_string();
    Ok(Outcome {
        text: text.clone(),
        structured: json!({"agent": agent, "text": text}),
        is_error: false,
    })
}

fn exec(a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
    let agent = agent_arg(a, scope)?;
    let argv = a.argv("argv")?;
    let cwd = a.opt_str("cwd")?.map(PathBuf::from);
    let (code, out, err) = exec_capture("exec", &agent, argv, cwd, max_output(a)?)?;
    Ok(command_outcome(code, out, err, false))
}

/// `argv` in agent `agent`'s sandbox (an `exec`, confined as the agent) with stdin from
/// /dev/null; its exit status and the first `max` bytes of stdout and stderr.
pub(crate) fn exec_capture(
    tool: &str,
    agent: &str,
    argv: Vec<String>,
    cwd: Option<PathBuf>,
    max: usize,
) -> Result<(i32, Captured, Captured), ToolError> {
    let (or, ow) = aither::sys::pipe().map_err(fail)?;
    let (er, ew) = aither::sys::pipe().map_err(fail)?;
    let null = crate::cp_cmd::null(false).map_err(fail)?;
    let mut c = connect(tool, Some(agent))?;
    let out = Capture::start(Some(or), max);
    let err = Capture::start(Some(er), max);
    let req = Request::Exec(ExecRequest {
        name: agent.to_string(),
        argv,
        env: vec![],
        cwd,
        tty: false,
        copy: None,
    });
    let reply = c.call_with_fds(&req, &[null.as_fd(), ow.as_fd(), ew.as_fd()]);
    // Our write ends close: the captures end once the command's do.
    drop((null, ow, ew));
    let v = data(reply);
    let (out, err) = (out.finish(), err.finish());
    let code = v?["exit_code"].as_i64().unwrap_or(-1) as i32;
    Ok((code, out, err))
}

fn mem(tool: &str, a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
    // Another agent's memory may be granted: the scope is checked per tier below.
    let agent = agent_arg(a, &Scope::Caller)?;
    let request = match tool {
        "mem_get" => {
            let tier = a.str("tier")?;
            scope.memory(&agent, tier, Access::Read)?;
            json!({"op": "mem.get", "tier": tier, "key": a.str("key")?})
        }
        "mem_put" => {
            let tier = a.str("tier")?;
            scope.memory(&agent, tier, Access::Write)?;
            let mut r = json!({"op": "mem.put", "tier": tier, "key": a.str("key")?, "value": a.value("value")?});
            if let Some(t) = a.opt_u64("ttl_s", u64::from(u32::MAX))? {
                r["ttl_s"] = json!(t.max(1));
            }
            r
        }
        _ => {
            let tier = a.opt_str("tier")?;
            // The one searchable tier is the default.
            scope.memory(&agent, tier.unwrap_or("knowledge"), Access::Read)?;
            let limit = a.opt_u64("limit", 1000)?.unwrap_or(10);
            json!({"op": "mem.search", "tier": tier, "query": a.str("query")?, "limit": limit})
        }
    };
    let req = Request::Mem {
        agent: agent.clone(),
        request,
    };
    let v = data(connect(tool, Some(&agent))?.call(&req))?;
    Ok(Outcome::json(v))
}

fn bus_publish(a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
    let subject = a.str("subject")?;
    scope.publish(subject)?;
    let req = Request::BusPub {
        subject: subject.to_string(),
        data: a.value("data")?,
        durable: a.opt_bool("durable")?,
    };
    let v = data(connect("bus_publish", None)?.call(&req))?;
    Ok(Outcome::json(json!({"subject": subject, "reply": v})))
}

fn max_output(a: &Args<'_>) -> Result<usize, ToolError> {
    Ok(a.opt_u64("max_output", 1 << 20)?.unwrap_or(64 << 10) as usize)
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().or(s.signal().map(|n| 128 + n)).unwrap_or(-1)
}

/// A command's result: exit status, and each stream's first bytes with how many were dropped.
fn command_outcome(code: i32, out: Captured, err: Captured, is_error: bool) -> Outcome {
    let text = format!(
        "exit status {code}\n--- stdout{} ---\n{}\n--- stderr{} ---\n{}",
        out.note(),
        out.text(),
        err.note(),
        err.text()
    );
    Outcome {
        text,
        structured: json!({
            "exit_code": code,
            "stdout": out.text(), "stdout_dropped_bytes": out.dropped,
            "stderr": err.text(), "stderr_dropped_bytes": err.dropped,
        }),
        is_error,
    }
}

/// One stream read to its end: the first `max` bytes kept, the rest counted.
pub(crate) struct Captured {
    pub bytes: Vec<u8>,
    pub dropped: u64,
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn note(&self) -> String {
        if self.dropped > 0 {
            format!(" ({} more bytes dropped)", self.dropped)
        } else {
            String::new()
        }
    }
}

/// A thread reading one stream while the command runs (so that neither pipe fills).
pub(crate) struct Capture(Option<JoinHandle<Captured>>);

impl Capture {
    pub(crate) fn start(fd: Option<OwnedFd>, max: usize) -> Capture {
        Capture(fd.map(|fd| {
            std::thread::spawn(move || {
                let mut f = std::fs::File::from(fd);
                let mut bytes = Vec::new();
                let _ = Read::by_ref(&mut f)
                    .take(max as u64)
                    .read_to_end(&mut bytes);
                let dropped = io::copy(&mut f, &mut io::sink()).unwrap_or(0);
                Captured { bytes, dropped }
            })
        }))
    }

    pub(crate) fn finish(self) -> Captured {
        self.0.and_then(|h| h.join().ok()).unwrap_or(Captured {
            bytes: vec![],
            dropped: 0,
        })
    }
}
