//! `aitherctl diff`, `apply`, `discard`: the changes in an agent's layered workspace
//! (docs/workspaces.md). The layer is read beneath descriptors, no link followed
//! (`aither::layer`); `apply` writes as the directory's owner (root's process drops to the
//! owner's ids first), never through a link.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aither::layer::{self, Change, Kind, What};
use aither::sandbox::layer as core_layer;
use aither::sandbox::workspace;
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
/// without --name is named after its token's subject). Root only for now (the layer is
/// root's); members' agents: see docs/workspaces.md.
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
/// directory itself is not touched. Do not discard the layer of a run that is still going.
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

fn open(name: &str) -> anyhow::Result<Opened> {
    if !rustix::process::geteuid().is_root() {
        bail!("the layers are root's (/var/lib/aither/layers); run diff, apply and discard as root (members' agents: docs/workspaces.md)");
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
    let upper = aither::hostpath::open_at_nofollow(
        fd.as_fd(),
        Path::new(core_layer::UPPER),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )?;
    // The directory as the launcher opened it: no link on the path, the same (dev, ino).
    let ws = workspace::open_checked(&record.workspace, None)?;
    if (ws.id.dev, ws.id.ino) != (record.dev, record.ino) {
        bail!(
            "{}: no longer the directory the layer was made for (replaced or renamed); nothing is applied to another one",
            record.workspace.display()
        );
    }
    let lower = rustix::fs::openat(
        &ws.fd,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", record.workspace.display()))?;
    Ok(Opened {
        record,
        layer,
        upper,
        lower,
    })
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
    if uid == 0 {
        return run();
    }
    match as_owner(uid, gid, run) {
        Ok(c) => c,
        Err(e) => fail(&e),
    }
}

pub fn discard(a: DiscardArgs) -> i32 {
    if !rustix::process::geteuid().is_root() {
        return fail(&anyhow!("the layers are root's; run discard as root"));
    }
    let layer = match layer_path(&a.name) {
        Ok(l) => l,
        Err(e) => {
            crate::print_error(&e);
            return EXIT_USAGE;
        }
    };
    match core_layer::discard(&layer) {
        Ok(()) => {
            eprintln!("discarded the layer of {}", a.name);
            0
        }
        Err(e) => fail(&e.into()),
    }
}
