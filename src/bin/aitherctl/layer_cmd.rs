//! `aitherctl diff`, `apply`, `discard`: the changes in an agent's layered workspace
//! (docs/workspaces.md). The layer is read beneath descriptors, no link followed
//! (`aither::layer`); `apply` writes as the directory's owner (root's process drops to the
//! owner's ids first), never through a link.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use aither::layer::{self, Change, Kind, What};
use aither::sandbox::layer as core_layer;
use aither::sandbox::workspace;
use aither_proto::control::LayerAction;
use anyhow::{anyhow, bail, Context};
use clap::Args;
use rustix::fs::{Mode, OFlags};
use serde_json::json;

use crate::daemon_cmd::{EXIT_REFUSED, EXIT_USAGE};
use crate::escape;

/// Show what an agent changed in its layered workspace.
///
/// Under a policy with `workspace = "layered"` (ci's default) the agent's writes go into a
/// layer of its own (/var/lib/aither/layers/NAME) and the directory stays as it was until
/// `aitherctl apply`. diff compares the layer with the directory: files, directories and
/// symbolic links added, changed (content, mode, type or link target) and removed. A rename
/// shows as a removal and an addition. Text files get a unified diff; binary files and files
/// over 1 MiB a one-line summary. Paths marked host-run (.git, .envrc, .vscode, .idea,
/// .devcontainer, .husky, .gitmodules, .gitattributes) are files the host runs by itself:
/// `apply` takes them only with --allow-host-run.
///
/// NAME is the agent's name (`aitherctl spawn --name`, `aitherctl run --name`; a run
/// without --name is named after its token's subject). Root acts on any layer; anyone else
/// on layers of their own agents, through aitherd (which checks the owner and hands over a
/// read-only view of the layer, read with their own rights).
///
/// Exit status: 0 shown (with or without changes); 1 no such layer or it could not be read;
/// 2 bad usage.
///
/// Examples:
///   aitherctl diff job1
///   aitherctl diff job1 --stat
///   aitherctl diff job1 --json | jq '.changes[].path'
///   aitherctl diff job1 src/
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct DiffArgs {
    /// The agent.
    name: String,
    /// Only changes at or below these paths (relative to the workspace).
    paths: Vec<PathBuf>,
    /// One line per change with lines added and removed, and a summary.
    #[arg(long, conflicts_with = "json")]
    stat: bool,
    /// The changes as JSON (with each text file's unified diff).
    #[arg(long)]
    json: bool,
}

/// Copy an agent's changes from its layered workspace into the directory.
///
/// Copies every change `aitherctl diff NAME` shows (or those at or below each PATH) into the
/// workspace directory, as the directory's owner (never as root for another user's
/// directory): files are written beside their name and renamed over it, symbolic links are
/// recreated as links (never followed), directories made, removed entries removed; modes
/// keep their permission bits, never set-user-id, set-group-id or sticky. Nothing is
/// written through a symbolic link: one in the directory on the way to a change refuses
/// that change (and stops the apply). Fifos, sockets and devices are not applied.
///
/// Host-run files (.git/…, .envrc, .vscode/…, .idea/…, .devcontainer/…, .husky/…,
/// .gitmodules, .gitattributes: what git, direnv and editors run by themselves) are refused,
/// before anything is written, unless --allow-host-run: review them with `aitherctl diff`.
///
/// Applied changes stop showing in `diff` (the directory now matches the layer); the layer
/// keeps them until `aitherctl discard`.
///
/// Exit status: 0 applied; 1 refused or failed (no such layer or path, a host-run path
/// without --allow-host-run, a link on the way, a write refused); 2 bad usage.
///
/// Examples:
///   aitherctl apply job1
///   aitherctl apply job1 src/lib.rs tests/
///   aitherctl apply job1 --allow-host-run .git/hooks/pre-commit
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ApplyArgs {
    /// The agent.
    name: String,
    /// Only changes at or below these paths (relative to the workspace).
    paths: Vec<PathBuf>,
    /// Also apply files the host runs by itself (.git, .envrc, editor settings).
    #[arg(long)]
    allow_host_run: bool,
    /// What was applied, as JSON.
    #[arg(long)]
    json: bool,
}

/// Throw away an agent's layered workspace changes.
///
/// Empties the agent's layer: the next run starts from the directory as it is. The
/// directory itself is not touched; snapshots are kept (`aitherctl restore` brings one back).
/// Refused while aitherd runs the agent; do not discard the layer of a `run` still going.
///
/// Exit status: 0 discarded (or there was nothing); 1 refused or failed; 2 bad usage.
///
/// Example:
///   aitherctl discard job1
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct DiscardArgs {
    /// The agent.
    name: String,
}

/// An agent's layer, opened: its record, the upper layer and the directory, each a
/// descriptor checked against the record.
struct Opened {
    record: core_layer::LayerRecord,
    layer: PathBuf,
    upper: OwnedFd,
    lower: OwnedFd,
}

fn layer_path(name: &str) -> anyhow::Result<PathBuf> {
    aither::agent_name::AgentName::parse("NAME", name).map_err(|e| anyhow!("{e}"))?;
    Ok(core_layer::layer_path(&aither::token::state_dir(), name))
}

/// A member's own agent: aitherd checks the owner and hands over a read-only mount of the
/// upper layer (stored as the member's files); the directory is opened here, as the member.
fn open_via_daemon(name: &str) -> anyhow::Result<Opened> {
    use aither::daemon::proto::Request;
    let layer = layer_path(name)?;
    let mut c = aither::daemon::client::Client::connect(&aither::daemon::socket_path())?;
    let (r, mut fds) = c.call_recv_fds(&Request::LayerOpen { name: name.into() })?;
    if !r.ok {
        bail!(
            "{}",
            r.error
                .map(|e| e.message)
                .unwrap_or_else(|| "refused".into())
        );
    }
    let record: core_layer::LayerRecord =
        serde_json::from_value(r.data.unwrap_or_default()).context("aitherd's layer record")?;
    let upper = fds
        .pop()
        .ok_or_else(|| anyhow!("aitherd sent no layer descriptor"))?;
    let lower = open_lower(&record, Some(rustix::process::getuid().as_raw()))?;
    Ok(Opened {
        record,
        layer,
        upper,
        lower,
    })
}

/// The layer's directory as the launcher opened it (no link on the path, the same device and
/// inode) and, for a `member`, theirs: a descriptor of it to read from and apply into.
fn open_lower(record: &core_layer::LayerRecord, member: Option<u32>) -> anyhow::Result<OwnedFd> {
    let ws = workspace::open_checked(&record.workspace, member)?;
    let same = (ws.id.dev, ws.id.ino) == (record.dev, record.ino);
    match member {
        Some(me) if !same || record.owner_uid != me => bail!(
            "{}: not the directory the layer was made for, or not yours; nothing is applied",
            record.workspace.display()
        ),
        None if !same => bail!(
            "{}: no longer the directory the layer was made for (replaced or renamed); nothing is applied to another one",
            record.workspace.display()
        ),
        _ => {}
    }
    rustix::fs::openat(
        &ws.fd,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", record.workspace.display()))
}

fn open(name: &str) -> anyhow::Result<Opened> {
    if !rustix::process::geteuid().is_root() {
        return open_via_daemon(name);
    }
    let layer = layer_path(name)?;
    let fd = core_layer::open_layer_dir(&layer, false).map_err(|e| match &e {
        core_layer::LayerError::Host(h) if h.raw_os_error() == Some(libc::ENOENT) => {
            anyhow!("{name}: no layered workspace (no {}); only agents under a policy with workspace = \"layered\" have one", layer.display())
        }
        _ => anyhow::Error::new(e),
    })?;
    let record = core_layer::read_record(fd.as_fd(), &layer)?.ok_or_else(|| {
        anyhow!("{name}: the layer is empty (discarded, or its agent never started)")
    })?;
    // The layer directory, or its image mounted read-only (a quota'd layer): the upper
    // layer's descriptor keeps that mount's filesystem for as long as it is open.
    let store = core_layer::open_store(fd.as_fd(), &layer, core_layer::Use::Read)?;
    let upper = store.upper(&layer)?;
    let lower = open_lower(&record, None)?;
    Ok(Opened {
        record,
        layer,
        upper,
        lower,
    })
}

/// One audit record of a layer operation (docs/audit.md), as aitherctl records `run`.
fn audit(kind: &str, name: &str, code: i32, data: serde_json::Value) {
    use aither::audit::{Entry, Verdict};
    if !rustix::process::geteuid().is_root() {
        // A member's diff and apply go through aitherd, which records `layer_open`.
        return;
    }
    let (verdict, rule) = if code == 0 {
        (Verdict::Allow, "root: the layers are root's")
    } else {
        (Verdict::Deny, "refused or failed (exit status in data)")
    };
    let mut data = data;
    data["exit"] = json!(code);
    aither::audit::record(
        Entry::new(kind, verdict, rule)
            .agent(name)
            .actor(crate::token_cmd::actor())
            .caller(rustix::process::getuid().as_raw())
            .data(data),
    );
}

fn fail(e: &anyhow::Error) -> i32 {
    crate::print_error(e);
    EXIT_REFUSED
}

fn describe(c: &Change) -> String {
    let side = |s: &layer::Side| match s.kind {
        Kind::File => format!("file {:04o}, {} bytes", s.mode, s.size),
        Kind::Dir => format!("directory {:04o}", s.mode),
        Kind::Symlink => format!("symlink -> {}", s.target.as_deref().unwrap_or("?")),
        Kind::Other => "not a file, directory or link".into(),
    };
    match (&c.before, &c.after) {
        (None, Some(a)) => format!("added {}", side(a)),
        (Some(b), None) => format!("removed {}", side(b)),
        (Some(b), Some(a)) => format!("changed: was {}, now {}", side(b), side(a)),
        (None, None) => String::new(),
    }
}

fn what(w: What) -> &'static str {
    match w {
        What::Added => "added",
        What::Changed => "changed",
        What::Removed => "removed",
    }
}

pub fn diff(a: DiffArgs) -> i32 {
    let o = match open(&a.name) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let changes = match layer::scan(o.upper.as_fd(), o.lower.as_fd())
        .and_then(|c| layer::select(c, &a.paths))
    {
        Ok(c) => c,
        Err(e) => return fail(&e.into()),
    };
    let diffs: Vec<Option<(String, usize, usize)>> = changes
        .iter()
        .map(|c| layer::text_diff(c, o.upper.as_fd(), o.lower.as_fd()))
        .collect();
    if a.json {
        let list: Vec<serde_json::Value> = changes
            .iter()
            .zip(&diffs)
            .map(|(c, d)| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                if let Some((text, plus, minus)) = d {
                    v["diff"] = json!(text);
                    v["lines_added"] = json!(plus);
                    v["lines_removed"] = json!(minus);
                }
                v
            })
            .collect();
        println!(
            "{}",
            json!({
                "agent": a.name,
                "workspace": o.record.workspace,
                "layer": o.layer,
                "changes": list,
            })
        );
        return 0;
    }
    let count = |w: What| changes.iter().filter(|c| c.change == w).count();
    if a.stat {
        println!("{:<8} {:<8} {:>6} {:>6}  PATH", "CHANGE", "KIND", "+", "-");
        for (c, d) in changes.iter().zip(&diffs) {
            let kind = c.after.as_ref().or(c.before.as_ref()).map(|s| s.kind);
            let kind = match kind {
                Some(Kind::File) => "file",
                Some(Kind::Dir) => "dir",
                Some(Kind::Symlink) => "symlink",
                _ => "other",
            };
            let (p, m) = d
                .as_ref()
                .map(|(_, p, m)| (p.to_string(), m.to_string()))
                .unwrap_or(("-".into(), "-".into()));
            let mark = if c.host_run { "  (host-run)" } else { "" };
            println!(
                "{:<8} {:<8} {:>6} {:>6}  {}{mark}",
                what(c.change),
                kind,
                p,
                m,
                escape::field(&c.path)
            );
        }
        println!(
            "{} added, {} changed, {} removed",
            count(What::Added),
            count(What::Changed),
            count(What::Removed)
        );
        return 0;
    }
    for (c, d) in changes.iter().zip(&diffs) {
        let mark = if c.host_run {
            " (host-run: apply needs --allow-host-run)"
        } else {
            ""
        };
        println!(
            "{}",
            escape::for_stdout(&format!("== {}: {}{mark}", c.path, describe(c)))
        );
        if let Some((text, _, _)) = d {
            print!("{}", escape::for_stdout(text));
        }
    }
    if changes.is_empty() {
        eprintln!("no changes");
    }
    0
}

/// Runs `f` as `uid:gid` with no supplementary groups, in a child process (root applying to
/// another user's directory: the files land as theirs and only what they may write is
/// written). The child's exit status is returned.
fn as_owner(uid: u32, gid: u32, f: impl FnOnce() -> i32) -> anyhow::Result<i32> {
    use nix::unistd::{fork, setgroups, setresgid, setresuid, ForkResult, Gid, Uid};
    // SAFETY: aitherctl is single-threaded here; the child only runs `f` and exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            let dropped = setgroups(&[])
                .and_then(|()| {
                    setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
                })
                .and_then(|()| {
                    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
                });
            let code = match dropped {
                Ok(()) => f(),
                Err(e) => {
                    eprintln!("aither: error: cannot become uid {uid} gid {gid}: {e}");
                    EXIT_REFUSED
                }
            };
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            let st = nix::sys::wait::waitpid(child, None).context("waitpid")?;
            Ok(match st {
                nix::sys::wait::WaitStatus::Exited(_, c) => c,
                _ => EXIT_REFUSED,
            })
        }
    }
}

pub fn apply(a: ApplyArgs) -> i32 {
    let o = match open(&a.name) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let (uid, gid) = (o.record.owner_uid, o.record.owner_gid);
    let run = || -> i32 {
        let changes = match layer::scan(o.upper.as_fd(), o.lower.as_fd())
            .and_then(|c| layer::select(c, &a.paths))
        {
            Ok(c) => c,
            Err(e) => return fail(&e.into()),
        };
        match layer::apply(&changes, o.upper.as_fd(), o.lower.as_fd(), a.allow_host_run) {
            Ok(done) => {
                if a.json {
                    println!(
                        "{}",
                        json!({"agent": a.name, "workspace": o.record.workspace, "applied": done})
                    );
                } else {
                    for d in &done {
                        let note = d
                            .note
                            .as_deref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default();
                        println!(
                            "{}",
                            escape::for_stdout(&format!("{:<8} {}{note}", what(d.change), d.path))
                        );
                    }
                    eprintln!(
                        "applied {} change(s) to {}",
                        done.iter().filter(|d| d.applied).count(),
                        o.record.workspace.display()
                    );
                }
                0
            }
            Err(e) => fail(&e.into()),
        }
    };
    let root = rustix::process::geteuid().is_root();
    // A member is the owner already (checked in open_via_daemon); root drops to the owner.
    let code = if uid == 0 || !root {
        run()
    } else {
        match as_owner(uid, gid, run) {
            Ok(c) => c,
            Err(e) => fail(&e),
        }
    };
    if code == 0 && use_daemon(&a.name) {
        // aitherd audits and announces it (event `layer_applied`) as the caller's report:
        // the apply itself was done here, with the owner's rights.
        let asked = if a.paths.is_empty() {
            vec![".".to_string()]
        } else {
            a.paths.iter().map(|p| p.display().to_string()).collect()
        };
        if let Err(e) = layer_op(&a.name, LayerAction::Applied, None, None, asked) {
            eprintln!("aither: warning: the apply was done but aitherd did not record it: {e:#}");
        }
    } else {
        audit(
            "layer_apply",
            &a.name,
            code,
            json!({"paths": a.paths, "allow_host_run": a.allow_host_run, "workspace": o.record.workspace, "as_uid": uid}),
        );
    }
    code
}

pub fn discard(a: DiscardArgs) -> i32 {
    if use_daemon(&a.name) {
        return match layer_op(&a.name, LayerAction::Discard, None, None, Vec::new()) {
            Ok(_) => {
                eprintln!("discarded the layer of {}", a.name);
                0
            }
            Err(e) => fail(&e),
        };
    }
    let layer = match layer_path(&a.name) {
        Ok(l) => l,
        Err(e) => {
            crate::print_error(&e);
            return EXIT_USAGE;
        }
    };
    let code = match refuse_live(&a.name).and_then(|()| Ok(core_layer::discard(&layer)?)) {
        Ok(()) => {
            eprintln!("discarded the layer of {}", a.name);
            0
        }
        Err(e) => fail(&e),
    };
    audit("layer_discard", &a.name, code, json!({}));
    code
}

/// Copy an agent's layered workspace changes into a snapshot.
///
/// Copies the agent's layer (its changes over the directory) into a snapshot named TAG (by
/// default s1, s2, …). A running daemon agent is frozen through the cgroup freezer while
/// the copy is made (`aitherctl pause`/`resume`), so the snapshot is one moment of its
/// files. Files are shared with the layer by reflink (FICLONE) where the filesystem of the
/// state directory has it (btrfs, xfs), else copied; the output says which, and how long
/// the copy took.
///
/// Exit status: 0 taken; 1 refused or failed (no layer, the tag exists); 2 bad usage;
/// 3 aitherd needed to freeze a running agent and not reachable.
///
/// Examples:
///   aitherctl snapshot fix1
///   aitherctl snapshot fix1 --tag before-refactor --json
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct SnapshotArgs {
    /// The agent.
    name: String,
    /// The snapshot's tag (letters, digits, '.', '_', '-'; default: the next free sN).
    #[arg(long)]
    tag: Option<String>,
    /// Retention: after taking it, keep only the newest N snapshots (older ones removed).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep: Option<u32>,
    /// The snapshot's record as JSON.
    #[arg(long)]
    json: bool,
}

/// List an agent's layered workspace snapshots.
///
/// With --rm TAG, removes that snapshot instead.
///
/// Exit status: 0 listed (or removed); 1 no layer; 2 bad usage.
///
/// Examples:
///   aitherctl snapshots fix1 [--json]
///   aitherctl snapshots fix1 --rm s1
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct SnapshotsArgs {
    /// The agent.
    name: String,
    #[arg(long)]
    json: bool,
    /// Remove this snapshot.
    #[arg(long, value_name = "TAG", conflicts_with = "json")]
    rm: Option<String>,
}

/// Put an agent's layered workspace back to a snapshot.
///
/// Replaces the agent's layer with snapshot TAG (the snapshots stay). The agent must not
/// be running (stop it first); its next start sees the files as they were at the snapshot.
///
/// Exit status: 0 restored; 1 refused or failed (running, no such snapshot); 2 bad usage.
///
/// Example:
///   aitherctl restore fix1 s1
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct RestoreArgs {
    /// The agent.
    name: String,
    /// The snapshot.
    tag: String,
}

/// Make a new agent from another: a copy of its layered workspace and memory.
///
/// For an agent aitherd runs (spawned), aitherd copies NAME's layer (its current changes, with
/// NAME frozen for the copy, or snapshot --from TAG) into NEW's, bound to the same directory,
/// copies NAME's memory tiers (all but `working`; --memory none: none), and spawns NEW with
/// NAME's policy, workspace, environment, limits and supervision, running NAME's command or
/// the one after `--`. NEW starts at once, where NAME was; from then on neither sees the
/// other's writes, and nothing reaches the directory without `aitherctl apply`. Published
/// services and host ports are not copied.
///
/// NEW runs on a token of its own: from NAME's policy when NAME was spawned from one; when
/// NAME was spawned with a token (which names its agent), give one minted for NEW with
/// --token. A member forks their own agents (NEW is theirs); an admin any (NEW is the
/// admin's).
///
/// For a `run` (an agent aitherd does not know), root's fork copies the layer only: start NEW
/// with the same policy and workspace (`aitherctl run … --name NEW`).
///
/// Exit status: 0 forked; 1 refused or failed (NEW taken, no such agent or snapshot, the
/// spawn refused: nothing of NEW is left); 2 bad usage.
///
/// Examples:
///   aitherctl fork fix1 fix1-b
///   aitherctl fork fix1 fix1-b --from s1 -- ./agent.sh --approach b
///   aitherctl fork fix1 fix1-b --memory none --json
///   aitherctl fork tok1 tok1-b --token tok1-b.tok
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ForkArgs {
    /// The agent to copy from.
    name: String,
    /// The new agent's name.
    new: String,
    /// A snapshot of NAME instead of its current changes.
    #[arg(long)]
    from: Option<String>,
    /// NAME's memory tiers: copied into NEW (all but `working`), or none.
    #[arg(long, value_enum, default_value = "copy")]
    memory: MemoryArg,
    /// A token file for NEW (subject NEW): needed when NAME was spawned with a token, which
    /// names its agent and so cannot be NEW's.
    #[arg(long, value_name = "FILE")]
    token: Option<PathBuf>,
    /// The result as JSON.
    #[arg(long)]
    json: bool,
    /// NEW's command (default: NAME's).
    #[arg(last = true, value_name = "CMD")]
    argv: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryArg {
    Copy,
    None,
}

/// Whether aitherd does this layer operation: always for a member (the layers are root's),
/// and for root when aitherd knows the agent (so the operation is announced on the bus).
fn use_daemon(name: &str) -> bool {
    !rustix::process::geteuid().is_root() || daemon_state(name).is_some()
}

/// `Request::LayerOp`: aitherd checks the owner, does it, audits it; its reply's data.
fn layer_op(
    name: &str,
    action: LayerAction,
    tag: Option<String>,
    keep: Option<u32>,
    paths: Vec<String>,
) -> anyhow::Result<serde_json::Value> {
    use aither::daemon::proto::Request;
    aither::agent_name::AgentName::parse("NAME", name).map_err(|e| anyhow!("{e}"))?;
    let mut c = aither::daemon::client::Client::connect(&aither::daemon::socket_path())?;
    let r = c.call(&Request::LayerOp {
        name: name.into(),
        action,
        tag,
        keep,
        paths,
    })?;
    if !r.ok {
        bail!(
            "{}",
            r.error
                .map(|e| e.message)
                .unwrap_or_else(|| "refused".into())
        );
    }
    Ok(r.data.unwrap_or_default())
}

fn daemon_inspect(name: &str) -> anyhow::Result<serde_json::Value> {
    use aither::daemon::proto::Request;
    let mut c = aither::daemon::client::Client::connect(&aither::daemon::socket_path())?;
    let r = c.call(&Request::Inspect { name: name.into() })?;
    if !r.ok {
        bail!(
            "{}",
            r.error
                .map(|e| e.message)
                .unwrap_or_else(|| "refused".into())
        );
    }
    Ok(r.data.unwrap_or_default())
}

/// A fork of a spawned agent: aitherd copies the layer and memory and spawns NEW. A member
/// presents the workspace directory, opened with their own rights, as `spawn` does.
fn fork_via_daemon(a: &ForkArgs) -> i32 {
    use aither::daemon::proto::Request;
    use aither_proto::control::ForkMemory;
    let r = (|| -> anyhow::Result<serde_json::Value> {
        let token = match &a.token {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("--token {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let ws = if rustix::process::geteuid().is_root() {
            None
        } else {
            // No such agent (or not the caller's): the fork goes without a directory, and
            // aitherd refuses it (and records the refusal). A directory the caller cannot
            // open goes without one too: aitherd takes that from an admin only.
            let info = daemon_inspect(&a.name).unwrap_or_default();
            info.get("workspace")
                .and_then(|w| w.as_str())
                .and_then(|w| {
                    use std::os::unix::fs::OpenOptionsExt;
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                        .open(w)
                        .ok()
                })
        };
        let fds: Vec<std::os::fd::BorrowedFd<'_>> = ws.iter().map(|f| f.as_fd()).collect();
        let mut c = aither::daemon::client::Client::connect(&aither::daemon::socket_path())?;
        let req = Request::Fork {
            name: a.name.clone(),
            new: a.new.clone(),
            from: a.from.clone(),
            argv: a.argv.clone(),
            memory: match a.memory {
                MemoryArg::Copy => ForkMemory::Copy,
                MemoryArg::None => ForkMemory::None,
            },
            token,
        };
        let r = c.call_with_fds(&req, &fds)?;
        if !r.ok {
            bail!(
                "{}",
                r.error
                    .map(|e| e.message)
                    .unwrap_or_else(|| "refused".into())
            );
        }
        Ok(r.data.unwrap_or_default())
    })();
    match r {
        Ok(v) if a.json => {
            println!("{v}");
            0
        }
        Ok(v) => {
            let layer = match v.get("layer").filter(|l| !l.is_null()) {
                Some(l) => format!(
                    "layer copied ({} entries, {} bytes)",
                    l["entries"].as_u64().unwrap_or(0),
                    l["bytes"].as_u64().unwrap_or(0)
                ),
                None => "no layer to copy".into(),
            };
            eprintln!(
                "{}: forked from {}{}: {layer}, {} memory record(s) copied; {}",
                a.new,
                a.name,
                a.from
                    .as_deref()
                    .map(|t| format!(" (snapshot {t})"))
                    .unwrap_or_default(),
                v["memory_entries"].as_u64().unwrap_or(0),
                v["agent"]["state"].as_str().unwrap_or("started")
            );
            0
        }
        Err(e) => fail(&e),
    }
}

fn root_only(what: &str) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("the layers are root's; run {what} as root (members' agents: docs/workspaces.md)");
    }
    Ok(())
}

/// The daemon's state of agent `name`, when aitherd runs and knows it.
fn daemon_state(name: &str) -> Option<String> {
    use aither::daemon::proto::Request;
    let mut c = aither::daemon::client::Client::connect(&aither::daemon::socket_path()).ok()?;
    let r = c
        .call(&Request::Inspect {
            name: name.to_string(),
        })
        .ok()?;
    r.ok.then(|| r.data?.get("state")?.as_str().map(String::from))
        .flatten()
}

fn daemon_act(req: aither::daemon::proto::Request) -> anyhow::Result<()> {
    let mut c = aither::daemon::client::Client::connect(&aither::daemon::socket_path())?;
    let r = c.call(&req)?;
    if !r.ok {
        bail!(
            "{}",
            r.error
                .map(|e| e.message)
                .unwrap_or_else(|| "refused".into())
        );
    }
    Ok(())
}

/// Refuses while aitherd runs a sandbox of agent `name` (or is about to: backoff).
fn refuse_live(name: &str) -> anyhow::Result<()> {
    if let Some(s) = daemon_state(name) {
        if matches!(
            s.as_str(),
            "starting" | "running" | "ready" | "unhealthy" | "paused" | "backoff" | "queued"
        ) {
            bail!("{name} is {s}: stop it first (`aitherctl stop {name}`)");
        }
    }
    Ok(())
}

/// Runs `f` with daemon agent `name` frozen if it is running (thawed again whatever `f`
/// returns); `f` learns whether it was.
fn frozen<T>(name: &str, f: impl FnOnce(bool) -> anyhow::Result<T>) -> anyhow::Result<T> {
    use aither::daemon::proto::Request;
    let state = daemon_state(name);
    let running = matches!(
        state.as_deref(),
        Some("starting" | "running" | "ready" | "unhealthy")
    );
    if running {
        daemon_act(Request::Pause { name: name.into() }).context("freezing the agent")?;
    }
    // A paused agent is frozen already, and stays so.
    let r = f(running || state.as_deref() == Some("paused"));
    if running {
        daemon_act(Request::Resume { name: name.into() }).context("thawing the agent")?;
    }
    r
}

pub fn snapshot(a: SnapshotArgs) -> i32 {
    if use_daemon(&a.name) {
        let r = layer_op(
            &a.name,
            LayerAction::Snapshot,
            a.tag.clone(),
            a.keep,
            Vec::new(),
        )
        .and_then(|v| {
            if let Some(p) = v.get("pruned").and_then(|p| p.as_array()) {
                for old in p.iter().filter_map(|t| t.as_str()) {
                    eprintln!("{}: removed snapshot {old} (--keep)", a.name);
                }
            }
            serde_json::from_value::<core_layer::Snapshot>(v).context("aitherd's snapshot record")
        });
        return print_snapshot(&a, r);
    }
    let r = (|| -> anyhow::Result<core_layer::Snapshot> {
        root_only("snapshot")?;
        let layer = layer_path(&a.name)?;
        let tag = match &a.tag {
            Some(t) => t.clone(),
            None => core_layer::next_tag(&layer)?,
        };
        let snap = frozen(&a.name, |was| Ok(core_layer::snapshot(&layer, &tag, was)?))?;
        if let Some(keep) = a.keep {
            for old in core_layer::prune_snapshots(&layer, keep as usize)? {
                eprintln!("{}: removed snapshot {old} (--keep {keep})", a.name);
            }
        }
        Ok(snap)
    })();
    audit(
        "layer_snapshot",
        &a.name,
        i32::from(r.is_err()),
        json!({"tag": r.as_ref().ok().map(|s| s.tag.clone()).or(a.tag.clone()), "stats": r.as_ref().ok().map(|s| s.stats.clone()), "frozen": r.as_ref().ok().map(|s| s.frozen)}),
    );
    print_snapshot(&a, r)
}

fn print_snapshot(a: &SnapshotArgs, r: anyhow::Result<core_layer::Snapshot>) -> i32 {
    match r {
        Ok(s) if a.json => {
            println!("{}", serde_json::to_string(&s).unwrap_or_default());
            0
        }
        Ok(s) => {
            println!(
                "{}: snapshot {} ({} entries, {} bytes; {} reflinked, {} copied; {} ms{})",
                a.name,
                s.tag,
                s.stats.entries,
                s.stats.bytes,
                s.stats.reflinked,
                s.stats.copied,
                s.copy_ms,
                if s.frozen { ", agent frozen" } else { "" }
            );
            0
        }
        Err(e) => fail(&e),
    }
}

pub fn snapshots(a: SnapshotsArgs) -> i32 {
    if let (Some(tag), true) = (&a.rm, use_daemon(&a.name)) {
        return match layer_op(
            &a.name,
            LayerAction::SnapshotRm,
            Some(tag.clone()),
            None,
            Vec::new(),
        ) {
            Ok(_) => {
                eprintln!("{}: removed snapshot {tag}", a.name);
                0
            }
            Err(e) => fail(&e),
        };
    }
    if a.rm.is_none() && !rustix::process::geteuid().is_root() {
        // A member's own agent: its snapshots as `inspect` shows them.
        let r = daemon_inspect(&a.name).and_then(|v| {
            serde_json::from_value::<Vec<core_layer::Snapshot>>(
                v.get("layer")
                    .and_then(|l| l.get("snapshots"))
                    .cloned()
                    .ok_or_else(|| anyhow!("{}: no layered workspace", a.name))?,
            )
            .context("aitherd's snapshot list")
        });
        return print_snapshots(&a, r);
    }
    if let Some(tag) = &a.rm {
        let r = root_only("snapshots --rm")
            .and_then(|()| layer_path(&a.name))
            .and_then(|l| Ok(core_layer::remove_snapshot(&l, tag)?));
        audit(
            "layer_snapshot_rm",
            &a.name,
            i32::from(r.is_err()),
            json!({"tag": tag}),
        );
        return match r {
            Ok(()) => {
                eprintln!("{}: removed snapshot {tag}", a.name);
                0
            }
            Err(e) => fail(&e),
        };
    }
    let r = root_only("snapshots")
        .and_then(|()| layer_path(&a.name))
        .and_then(|l| Ok(core_layer::snapshots(&l)?));
    print_snapshots(&a, r)
}

fn print_snapshots(a: &SnapshotsArgs, r: anyhow::Result<Vec<core_layer::Snapshot>>) -> i32 {
    match r {
        Ok(list) if a.json => {
            println!("{}", json!({"agent": a.name, "snapshots": list}));
            0
        }
        Ok(list) => {
            println!(
                "{:<20} {:>20} {:>8} {:>12} {:>9} {:>8}",
                "TAG", "CREATED", "ENTRIES", "BYTES", "REFLINKED", "COPY_MS"
            );
            for s in list {
                println!(
                    "{:<20} {:>20} {:>8} {:>12} {:>9} {:>8}",
                    s.tag, s.created, s.stats.entries, s.stats.bytes, s.stats.reflinked, s.copy_ms
                );
            }
            0
        }
        Err(e) => fail(&e),
    }
}

pub fn restore(a: RestoreArgs) -> i32 {
    if use_daemon(&a.name) {
        return match layer_op(
            &a.name,
            LayerAction::Restore,
            Some(a.tag.clone()),
            None,
            Vec::new(),
        ) {
            Ok(v) => {
                eprintln!(
                    "{}: restored snapshot {} ({} entries)",
                    a.name,
                    a.tag,
                    v["stats"]["entries"].as_u64().unwrap_or(0)
                );
                0
            }
            Err(e) => fail(&e),
        };
    }
    let r = (|| -> anyhow::Result<core_layer::CopyStats> {
        root_only("restore")?;
        let layer = layer_path(&a.name)?;
        refuse_live(&a.name)?;
        Ok(core_layer::restore(&layer, &a.tag)?)
    })();
    audit(
        "layer_restore",
        &a.name,
        i32::from(r.is_err()),
        json!({"tag": a.tag}),
    );
    match r {
        Ok(s) => {
            eprintln!(
                "{}: restored snapshot {} ({} entries)",
                a.name, a.tag, s.entries
            );
            0
        }
        Err(e) => fail(&e),
    }
}

pub fn fork(a: ForkArgs) -> i32 {
    if use_daemon(&a.name) {
        return fork_via_daemon(&a);
    }
    if !a.argv.is_empty() || a.token.is_some() || a.memory == MemoryArg::None {
        crate::print_error(&anyhow!(
            "{}: not an agent of aitherd (a `run`): fork copies its layer only; start {} yourself \
             (a command, --token and --memory are for forks of spawned agents)",
            a.name,
            a.new
        ));
        return EXIT_USAGE;
    }
    let r = (|| -> anyhow::Result<core_layer::CopyStats> {
        root_only("fork")?;
        let layer = layer_path(&a.name)?;
        let new = layer_path(&a.new)?;
        if a.from.is_some() {
            return Ok(core_layer::fork(&layer, &new, a.from.as_deref())?);
        }
        frozen(&a.name, |_| Ok(core_layer::fork(&layer, &new, None)?))
    })();
    audit(
        "layer_fork",
        &a.name,
        i32::from(r.is_err()),
        json!({"new": a.new, "from": a.from}),
    );
    match r {
        Ok(s) if a.json => {
            println!(
                "{}",
                json!({"agent": a.name, "new": a.new, "from": a.from, "stats": s})
            );
            0
        }
        Ok(s) => {
            eprintln!(
                "{}: layer of {} copied ({} entries, {} bytes); start {} with the same policy and workspace",
                a.new, a.name, s.entries, s.bytes, a.new
            );
            0
        }
        Err(e) => fail(&e),
    }
}
