//! aitherd: the root-level manager that supervises agents. Thin: flags, logging, the
//! single-instance lock, signals; the mechanisms live in `aither::daemon`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use aither::daemon::{self, recover, server, Daemon, DaemonError};
use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

/// The Aither daemon: supervises agents spawned with `aitherctl spawn`.
///
/// Runs in the foreground with logs on stderr (RUST_LOG=debug for more). Listens on
/// /run/aither/aitherd.sock (0660 root:aither when the group exists, else 0600), keeps its state
/// in /var/lib/aither/state.db. Each agent runs in its own sandbox under a small launcher
/// process (aither-init shim) that outlives a daemon crash: when aitherd starts again it
/// re-adopts every running agent through its cgroup, and restarts per policy the ones that
/// ended meanwhile. SIGTERM or SIGINT stop the daemon cleanly and leave the agents running.
///
/// Environment: AITHER_SOCKET (socket path), AITHER_STATE_DIR (state directory),
/// AITHER_INIT (path of aither-init), AITHER_POLICY_DIR (policies). SIGHUP reads the
/// configuration file again (what can change live: docs/daemon.md "Configuration file").
#[derive(Parser)]
#[command(name = "aitherd", version, max_term_width = 100, verbatim_doc_comment)]
struct Args {
    /// Control socket path [default: $AITHER_SOCKET or /run/aither/aitherd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// State directory [default: $AITHER_STATE_DIR or /var/lib/aither].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Write the daemon's pid here (removed at a clean exit).
    #[arg(long, value_name = "PATH")]
    pidfile: Option<PathBuf>,
    /// Configuration file (TOML, docs/daemon.md "Configuration file"): `[daemon]`, `[metrics]`,
    /// `[gpu]`, `[limits]`, `[retention]`, `[users]`, `[egress]`. Root's, not writable by group
    /// or others, no symbolic link on its path. SIGHUP or `aitherctl daemon reload` reads it
    /// again [default: /etc/aither/aitherd.toml, if present].
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Where to serve Prometheus metrics (GET /metrics): `unix:/PATH`, a TCP address such as
    /// 127.0.0.1:9464 (no authentication: loopback or a private network only), or `off`
    /// [default: `[metrics] listen`, else unix:metrics.sock beside the control socket].
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    metrics: Option<daemon::config::Listen>,
    /// The group whose members may use the socket (each acts on their own agents only)
    /// [default: `[daemon] group`, else aither].
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// The group whose members act on every user's agents, as root does [default:
    /// `[daemon] admin_group`, else aither-admin].
    #[arg(long, value_name = "NAME")]
    admin_group: Option<String>,
}

fn parse_listen(s: &str) -> Result<daemon::config::Listen, String> {
    s.parse()
}

fn main() -> ExitCode {
    // Before anything else and before any thread: non-dumpable, no core, no LD_* (the
    // environment may only be edited while single-threaded).
    let hardened = match daemon::harden::harden_process() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("aitherd: error: hardening the daemon process: {e}");
            return ExitCode::from(1);
        }
    };
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    tracing::info!(
        dumpable = hardened.dumpable,
        core = ?hardened.core,
        "hardened: not dumpable, no core dumps"
    );
    // AITHER_TRACE_LAUNCH=1: the request path's marks (docs/performance.md).
    aither::trace::start_as("aitherd");
    if !hardened.scrubbed.is_empty() {
        tracing::warn!(removed = ?hardened.scrubbed, "loader variables removed from the environment");
    }
    for n in aither::testhooks::ignored() {
        tracing::warn!("{n} is a test switch and is ignored by a release build");
    }
    // Two worker threads: the work is I/O and short SQLite writes (on the store's own thread).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aitherd: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aitherd: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Holds an exclusive flock on `<socket>.lock` for the daemon's life: one daemon per socket.
fn lock(socket: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = socket.with_extension("lock");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // rustix: nix 0.30 has only the consuming `Flock` guard.
    if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(DaemonError::AlreadyRunning {
            pid: pid.trim().to_string(),
            path,
        }
        .into());
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if nix::unistd::geteuid().as_raw() != 0 {
        anyhow::bail!("aitherd must run as root (it creates sandboxes and cgroups)");
    }
    if let Some(dir) = &args.state_dir {
        std::env::set_var("AITHER_STATE_DIR", dir);
    }
    let socket = args.socket.clone().unwrap_or_else(daemon::socket_path);
    // The configuration is read before anything is served: a bad file stops the start.
    let spec = daemon::config::Spec {
        path: args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(daemon::config::DEFAULT_PATH)),
        explicit: args.config.is_some(),
        overrides: daemon::config::Overrides {
            metrics: args.metrics.clone(),
            group: args.group.clone(),
            admin_group: args.admin_group.clone(),
        },
        socket: socket.clone(),
    };
    let loaded = spec.load()?;
    let cfg = loaded.config.clone();
    let egress = aither::net::config::Egress::from_section(&cfg.egress, &spec.path)?;
    // Installed before the socket exists: a SIGHUP from then on reloads, never kills.
    let mut hup = signal(SignalKind::hangup())?;
    let _lock = lock(&socket)?;
    let state_dir = aither::token::state_dir();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    raise_nofile();
    let init = daemon::find_init()?;
    let settings = daemon::config::Live::new(spec, loaded);
    let d = Arc::new(Daemon::new(&state_dir, init.clone(), settings)?);
    d.init_gateway(egress);
    let rec = recover::recover(&d)?;
    tracing::info!(
        adopted = rec.adopted,
        restarted = rec.restarted,
        resting = rec.resting,
        killed_strays = rec.killed_strays,
        "recovered"
    );
    daemon::started_event(&d, rec.adopted, rec.restarted);
    record_overrides();
    tokio::spawn(daemon::gpu::GpuService::ticker(d.clone()));
    tokio::spawn(daemon::Daemon::summary_ticker(d.clone()));
    daemon::kernel_audit::start(d.clone());
    let group = daemon::identity::group_gid(&cfg.daemon.group);
    // Metrics first: an address that cannot be bound stops the start before the control
    // socket exists.
    if let Some(listen) = &cfg.metrics.listen {
        d.metrics.start(&d, listen, group)?;
    }
    let listener =
        server::bind(&socket, group).with_context(|| format!("binding {}", socket.display()))?;
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    tracing::info!(socket = %socket.display(), state = %state_dir.display(), init = %init.display(), "aitherd ready");
    let access = Arc::new(server::Access {
        groups: daemon::identity::Groups {
            member: group,
            admin: daemon::identity::group_gid(&cfg.daemon.admin_group),
        },
    });
    let reloader = {
        let d = d.clone();
        async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                daemon::reload::reload(&d, &daemon::reload::Trigger::Signal);
            }
            // The signal stream cannot end while the runtime runs; if it did, the daemon
            // would go on serving, without reloads.
            std::future::pending::<()>().await
        }
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = server::serve(d.clone(), listener, access) => {}
        _ = reloader => {}
        _ = term.recv() => tracing::info!("SIGTERM: shutting down; agents keep running"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down; agents keep running"),
    }
    d.emit_daemon(
        "daemon_stopped",
        serde_json::json!({"pid": std::process::id()}),
    );
    d.metrics.stop();
    // Open summary windows are written before the audit writer stops.
    d.flush_summaries(true);
    let _ = d.store.flush().await;
    let bus = d.bus.clone();
    let _ = tokio::task::spawn_blocking(move || bus.log.close()).await;
    let _ = std::fs::remove_file(&socket);
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Test switches in force (debug builds only) are on the record, once per daemon start.
fn record_overrides() {
    let overrides = aither::testhooks::in_force();
    if !overrides.is_empty() {
        aither::audit::record(
            aither::audit::Entry::new(
                "test-overrides",
                aither::audit::Verdict::Info,
                "aitherd runs with test switches in force (a debug build)",
            )
            .agent("aitherd")
            .data(serde_json::json!({ "overrides": overrides })),
        );
    }
}

/// Each agent holds a few descriptors in the daemon (its channel, its pidfd): lift the soft
/// limit to the hard one.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
