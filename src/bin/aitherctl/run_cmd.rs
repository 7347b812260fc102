//! `aitherctl run`: one command in one sandbox, in the foreground: handed to aitherd when its
//! socket accepts a connection (run_daemon.rs), else (or with `--no-daemon`) launched here.

use std::path::PathBuf;
use std::time::Duration;

use aither::audit::{Entry, Verdict};
use aither::prepare::{
    prepare, Authority, Egress, HostAuthority, LaunchRequest, OneLaunch, PrepareError, Principal,
    Source, WorkspaceKind,
};
use aither::sandbox::{self, LaunchError, RunOptions, SandboxSpec};
use aither::token::{self, TokenError};
use aither::trace;
use aither::units::{format_duration, Size};
use clap::Args;

/// Run a command in a sandbox built from a capability token or a policy, in the foreground.
///
/// The sandbox is derived from the verified claims of a token only. `--token` takes one
/// (minted with `aitherctl token mint`, perhaps attenuated); `--policy NAME` is a shorthand
/// that mints a 60-second token from the policy and verifies it the same way. With neither,
/// the policy is `strict`. A revoked, expired or forged token is refused before anything
/// starts (exit 125).
///
/// The workspace (default: the current directory) is mounted read-write at the same path and
/// is the working directory; everything else follows the claims. Flags may only narrow what
/// the claims grant. stdin, stdout and stderr pass through; a terminal is never given to the
/// agent: it gets a pseudo-terminal of its own, relayed to yours (in raw mode meanwhile).
/// SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH are forwarded to the
/// agent; if aitherctl dies, the sandbox dies with it.
///
/// With aitherd: when aitherd's control socket ($AITHER_SOCKET, default
/// /run/aither/aitherd.sock) accepts a connection, the launch is aitherd's, with the same
/// behaviour: your descriptors are passed to it over the socket, your signals are forwarded
/// to the agent through it, and the exit status is the agent's. The run is then the caller's
/// as aitherd knows it (SO_PEERCRED): root, aither-admin, or a member of group aither, who may
/// run installed policies only, tokens minted for them, in a workspace they own (opened here
/// with your own rights and passed, never named). Anyone else is refused (exit 125). aitherd
/// uses its own key, policies and audit log, and runs at most 16 runs per user at a time.
/// A refusal by aitherd is final (exit 125, with its reason): the run is never retried
/// without it. Where no aitherd listens (no socket, connection refused), or an older aitherd
/// does not serve runs, or the run needs what only the standalone path gives (egress grants:
/// the in-process gateway; --report; --config), aitherctl launches it itself, which needs
/// root. --no-daemon always does.
///
/// Exit status: the agent's own; 128+N when it was killed by signal N; 124 when --timeout
/// stopped it; 125 when Aither failed or refused (nothing ran, or the result is unknown);
/// 126 when the command cannot be executed; 127 when it is not found in the sandbox; 2 for
/// bad usage.
///
/// Examples:
///   aitherctl run --policy strict -- python3 agent.py
///   aitherctl run --policy ci --timeout 10m --memory 256M -- make test
///   aitherctl run --token agent.tok -- python3 agent.py
///   aitherctl run --no-daemon --policy strict -- ./check.sh
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// Policy name (installed or built-in) or path to a policy file [default: strict].
    #[arg(long, short = 'p', value_name = "NAME|PATH", conflicts_with = "token")]
    pub(crate) policy: Option<String>,
    /// Capability token: its text, a file holding it, or - for stdin.
    #[arg(long, value_name = "TOKEN|FILE|-")]
    pub(crate) token: Option<String>,
    /// Directory mounted read-write at the same path (default: current directory).
    #[arg(long, short = 'w', value_name = "DIR")]
    pub(crate) workspace: Option<PathBuf>,
    /// Host configuration file: its `[egress]` table (trust anchors for route upstreams,
    /// idle timeout) configures the run's egress gateway, as for aitherd
    /// [default: /etc/aither/aitherd.toml, if present].
    #[arg(long, value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
    /// Where the workspace's filesystem has no id-mapped mounts (kernel < 5.12, 9p, NFS…), run
    /// the agent as the workspace's owner instead of refusing; never root or a system account
    /// (docs/kernels.md).
    #[arg(long)]
    pub(crate) workspace_as_owner: bool,
    /// Name of the agent (cgroup name, AITHER_AGENT); with --token, the token's subject.
    #[arg(long, value_name = "NAME", conflicts_with = "token")]
    pub(crate) name: Option<String>,
    /// Set an environment variable inside (repeatable). The environment otherwise starts empty
    /// but for the policy's variables.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub(crate) env: Vec<String>,
    /// Wall-clock limit (e.g. 30s, 10m): SIGTERM, then SIGKILL 2s later; exit status 124.
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// Memory limit (e.g. 256M), at most the policy's.
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
    pub(crate) memory: Option<Size>,
    /// CPU limit in CPUs (e.g. 0.5), at most the policy's.
    #[arg(long, value_name = "N")]
    pub(crate) cpus: Option<f64>,
    /// Maximum number of processes and threads, at most the policy's.
    #[arg(long, value_name = "N")]
    pub(crate) pids: Option<u64>,
    /// Write the enforcement report (JSON) to FILE once the agent has started: namespaces,
    /// id maps, cgroup limits read back from the kernel, Landlock status and rights, the
    /// seccomp filter's digest, and capabilities, no_new_privs, rlimits and mounts as read from
    /// /proc inside the sandbox (docs/audit.md).
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Launch the sandbox here even when aitherd is reachable (needs root).
    #[arg(long)]
    pub(crate) no_daemon: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

/// `aitherctl run ARGS` parsed by the `run` subcommand alone, without the rest of the command
/// tree. None for any other command line, and wherever this parser stops (help, version, a
/// usage error): the full parser then parses it again and prints what it prints. The same
/// argument definitions, so whatever this accepts the full parser accepts the same way
/// (main.rs's tests compare the two).
pub fn parse_alone(mut args: impl Iterator<Item = std::ffi::OsString>) -> Option<RunArgs> {
    use clap::{Args, FromArgMatches};
    let _bin = args.next()?;
    let sub = args.next()?;
    if sub != "run" {
        return None;
    }
    let cmd = RunArgs::augment_args(clap::Command::new("run"));
    let m = cmd
        .try_get_matches_from(std::iter::once(sub).chain(args))
        .ok()?;
    RunArgs::from_arg_matches(&m).ok()
}

pub fn run(mut a: RunArgs) -> i32 {
    // Read once (stdin), whichever path runs it.
    if a.token.as_deref() == Some("-") {
        match crate::token_cmd::read_token_arg("-") {
            Ok(t) => a.token = Some(t.encode()),
            Err(e) => {
                crate::print_error(&e);
                return 125;
            }
        }
    }
    // --report and --config are the standalone path's (a report file opened here, this
    // host's gateway settings for the in-process gateway).
    if !a.no_daemon && a.report.is_none() && a.config.is_none() {
        if let crate::run_daemon::Handoff::Done(code) = crate::run_daemon::try_daemon(&a) {
            return code;
        }
    }
    // systemd as pid 1 on pure v2: never write into cgroups systemd owns. Re-executed in a
    // transient scope with Delegate=yes, then the sandbox's cgroup goes below that scope
    // (src/cgroup/delegate.rs). First: before anything is read, created or started.
    use aither::cgroup::delegate;
    if let Err(e) = delegate::into_own_scope(delegate::ScopeKind::Run) {
        crate::print_error(&anyhow::Error::new(e));
        return 125;
    }
    trace::mark("ctl", "scope");
    let (spec, grants, egress_needed) = match build_spec(&a) {
        Ok(s) => s,
        Err(e) => {
            aither::audit::record_unsynced(
                Entry::new("run", Verdict::Deny, format!("{e:#}"))
                    .agent(a.name.as_deref().unwrap_or("run"))
                    .actor(crate::token_cmd::actor())
                    .data(serde_json::json!({"argv": a.command})),
            );
            match e.downcast_ref::<TokenError>() {
                Some(t) if t.is_refusal() => eprintln!("aither: token refused: {t}"),
                _ => crate::print_error(&e),
            }
            return 125;
        }
    };
    if let Some(w) = &spec.warning {
        eprintln!("aither: WARNING: {w}");
    }
    // Egress: the gateway's settings are checked now (a bad resolver table or CA file refuses
    // the run); the gateway itself starts once the sandbox is cloned (the launcher must stay
    // single-threaded until then).
    // Attached to the spec by `prepare`, as for spawn.
    let egress = if egress_needed {
        let (config, explicit) = match &a.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(aither::net::config::DEFAULT_CONFIG), false),
        };
        match aither::net::InProcessGateway::prepare(&spec.name, grants, &config, explicit) {
            Ok(g) => Some(g),
            Err(e) => {
                crate::print_error(&anyhow::Error::new(e));
                return 125;
            }
        }
    } else {
        None
    };
    let mut egress_running: Option<aither::net::inprocess::Running> = None;
    // The report file is opened now, before the agent exists, without following a link
    // anywhere in its path, and written through this fd only (docs/security-model.md, "The
    // host side"): a link the agent plants or races in at that name is never followed.
    let report_to = match a.report.as_deref().map(aither::hostpath::open_output_file) {
        None => None,
        Some(Ok(f)) => Some((f, a.report.clone().unwrap_or_default())),
        Some(Err(e)) => {
            eprintln!("aither: the report file: {e}");
            return 125;
        }
    };
    let mut report_err: Option<String> = None;
    // Recorded while the sandbox is being built (before the launcher waits for the agent): a
    // run that never returns (killed aitherctl) is in the log, and the launch is no longer.
    let audit_entry = Entry::new(
        "run",
        Verdict::Allow,
        format!("policy {} via a verified token", spec.policy),
    )
    .agent(&spec.name)
    .actor(crate::token_cmd::actor())
    .data(serde_json::json!({"argv": spec.argv, "overrides": aither::testhooks::in_force()}));
    let io = sandbox::LaunchIo {
        during_setup: Some(Box::new(move || {
            aither::audit::record_unsynced(audit_entry)
        })),
        on_started: report_to.map(|(mut file, path)| {
            let err = &mut report_err;
            Box::new(move |s: &sandbox::Started| {
                use std::io::Write;
                let text = serde_json::to_string_pretty(&s.report).unwrap_or_default();
                if let Err(e) = file.write_all((text + "\n").as_bytes()) {
                    *err = Some(format!("writing the report {}: {e}", path.display()));
                }
            }) as sandbox::launch::OnStarted<'_>
        }),
        on_egress: egress.map(|g| {
            let slot = &mut egress_running;
            Box::new(move |fd: std::os::fd::OwnedFd| *slot = Some(g.start(fd)))
                as Box<dyn FnOnce(std::os::fd::OwnedFd) + '_>
        }),
        ..Default::default()
    };
    trace::mark("ctl", "launcher starts");
    let outcome = sandbox::run_with(&spec, io);
    // Every egress decision of the run is in the audit log before aitherctl exits.
    if let Some(g) = egress_running.take() {
        g.finish();
    }
    if let Some(e) = report_err {
        eprintln!("aither: warning: {e}");
    }
    match outcome {
        Ok(out) => {
            for s in &out.skipped {
                eprintln!("aither: best-effort: {s} was not enforced on this host (policy {:?} allows it)", spec.policy);
            }
            if out.timed_out {
                let t = spec.timeout.map(format_duration).unwrap_or_default();
                eprintln!("aither: timeout: the agent was stopped after {t}");
                return 124;
            }
            if out.oom_killed {
                let m = spec
                    .limits
                    .memory
                    .map(|m| Size(m).to_string())
                    .unwrap_or_default();
                eprintln!("aither: the agent was killed by the OOM killer (memory limit {m})");
            }
            out.status.code()
        }
        Err(e) => {
            let code = e.exit_code();
            match &e {
                LaunchError::NotFound { .. } | LaunchError::NotExecutable { .. } => {
                    eprintln!("aither: {e}")
                }
                _ => crate::print_error(&anyhow::Error::new(e)),
            }
            code
        }
    }
}

/// The spec through the one launch path shared with `spawn` and `export`
/// (`aither::prepare`): the token verified (or, from a policy, the claims checked as a token's
/// are, `OneLaunch`), the subject, the spec, the workspace checked as a descriptor.
fn build_spec(a: &RunArgs) -> anyhow::Result<(SandboxSpec, aither::net::NetGrants, bool)> {
    let text;
    let (source, auth): (Source<'_>, Box<dyn Authority>) = match &a.token {
        Some(arg) => {
            text = crate::token_cmd::read_token_arg(arg)?.encode();
            trace::mark("ctl", "read+decode");
            let auth = HostAuthority::load(&token::state_dir())?;
            trace::mark("ctl", "host key+revocations");
            (Source::Token(&text), Box::new(auth))
        }
        // One launch: the token would never leave this process, so it needs no host key
        // (which would cost a file read, ≈0.2 ms, and create /var/lib/aither/keys on a first
        // `run`) and no signature (`OneLaunch`); its claims are checked as any token's are.
        None => (
            Source::Policy(a.policy.as_deref().unwrap_or("strict")),
            Box::new(OneLaunch::new()),
        ),
    };
    let cwd = std::env::current_dir()?;
    let env = |k: &str| std::env::var(k).ok();
    let req = LaunchRequest {
        name: match &a.token {
            Some(_) => None,
            None => Some(a.name.as_deref().unwrap_or("run")),
        },
        source,
        ttl: Duration::from_secs(token::RUN_TOKEN_TTL_SECS),
        bus_publish: &[],
        bus_subscribe: &[],
        opts: RunOptions {
            name: None,
            workspace: a.workspace.clone(),
            env: a.env.clone(),
            timeout: a.timeout,
            memory: a.memory,
            cpus: a.cpus,
            pids: a.pids,
            argv: a.command.clone(),
        },
        cwd: &cwd,
        env: &env,
        workspace: WorkspaceKind::Host,
        egress: Egress::Gateway,
    };
    let p = prepare(&req, &Principal::current(), auth.as_ref()).map_err(|e| match e {
        PrepareError::Token(t) => anyhow::Error::new(t),
        e => anyhow::Error::new(e),
    })?;
    let claims = p.verified.effective();
    if claims.gpu.count > 0 {
        // GPUs are leased by aitherd's scheduler; a one-shot run never opens one.
        eprintln!(
            "aither: note: the token claims {} GPU(s), but GPUs are leased through aitherd \
             (`aitherctl spawn`, docs/gpu.md); this run gets none",
            claims.gpu.count
        );
    }
    let mut spec = p.spec;
    spec.report = a.report.is_some();
    if let Some(w) = spec.workspace.as_mut() {
        w.as_owner = a.workspace_as_owner;
    }
    Ok((spec, p.net, p.egress))
}
