//! `aitherctl cp`: files and directories between an agent's sandbox and the host
//! (docs/agents.md "Copying files"). The agent side is a `tar` that aitherd runs in the
//! sandbox as the agent (an exec whose command aitherd derives, audited as `cp`); the host
//! side is done here, with the caller's own privileges, by `aither::cp` (hostile stream,
//! no link followed).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use aither::cp::extract::{Extractor, Names};
use aither::cp::tar::{EntryKind, Reader, Writer};
use aither::daemon;
use aither::daemon::client::{Client, ClientError};
use aither::daemon::proto::{CopyOp, ExecRequest, Request};
use aither::hostpath;
use clap::Args;

use crate::daemon_cmd::{EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE};
use crate::escape;

/// Copy files and directories between an agent's sandbox and the host.
///
/// One of SRC and DEST is NAME:PATH, a path in the sandbox of the running agent NAME
/// (relative: to the agent's working directory); the other is a host path, or - for a tar
/// stream on stdout (from an agent) or stdin (into an agent: DEST must then be an existing
/// directory there). A host path with a colon is written with a slash before it (./a:b).
///
/// What lands where, as `docker cp`:
///   SRC a file:       DEST missing: written as DEST (its parent must exist; DEST/ with a
///                     trailing slash must be an existing directory); DEST a file:
///                     replaced; DEST a directory: written as DEST/NAME-OF-SRC.
///   SRC a directory:  DEST missing: created as DEST with SRC's contents; DEST a
///                     directory: copied as DEST/NAME-OF-SRC, or with SRC ending in /.
///                     its contents go into DEST; DEST a file: an error.
///
/// The agent's side runs inside its sandbox, as the agent, with its confinement: the agent's
/// links are resolved there and can never reach a host file, and a copy into the agent can
/// only write where the agent can (a read-only path stays read-only). It uses `tar` from the
/// agent's PATH. The host side runs as you, never as aitherd: you can only read and write
/// what you could yourself, and the files you get are yours.
///
/// What comes from an agent is treated as hostile. Refused, stopping the copy (what was
/// written before stays): absolute names, names with .., names outside SRC, hard links,
/// anything that would be written through a symbolic link (one already on the host below
/// DEST, or one the copy itself made: a link is copied as a link, and never followed
/// afterwards). DEST itself is given without links (use its real path). Device nodes and
/// fifos are skipped and named on stderr. Set-user-id, set-group-id and sticky bits are
/// dropped; modification times are kept; owners are not (files are yours; in the agent,
/// the agent's). Links inside a host SRC directory are sent as links, not followed.
///
/// Only the agent's owner, root and members of aither-admin may copy; every copy is audited
/// (kind "cp") with its direction and the agent's path.
///
/// Exit status: 0 copied; 1 failed or refused (no such agent or path, the agent side
/// failed, a member refused, a host path not writable); 2 bad usage; 3 aitherd not
/// reachable.
///
/// Examples:
///   aitherctl cp web:/work/report.txt .
///   aitherctl cp web:out/ ./results          # directory: ./results is created
///   aitherctl cp web:out/. ./results         # its contents into existing ./results
///   aitherctl cp ./input.csv web:/work/data/
///   aitherctl cp web:/work/logs - | tar -t -v
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct CpArgs {
    /// NAME:PATH in an agent, a host path, or - (a tar stream on stdin).
    src: String,
    /// NAME:PATH in an agent, a host path, or - (a tar stream on stdout).
    dest: String,
}

/// One side of a copy as given.
enum Side<'a> {
    Agent { name: &'a str, path: &'a str },
    Host(&'a str),
}

fn side(s: &str) -> Side<'_> {
    match s.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => Side::Agent { name, path },
        _ => Side::Host(s),
    }
}

/// A copy that failed, and how aitherctl exits.
pub(crate) struct Failed(pub(crate) i32, pub(crate) String);

impl From<anyhow::Error> for Failed {
    fn from(e: anyhow::Error) -> Self {
        let code = if e.downcast_ref::<ClientError>().is_some() {
            EXIT_UNREACHABLE
        } else {
            EXIT_REFUSED
        };
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg.push_str(&format!(": {c}"));
            }
        }
        Failed(code, msg)
    }
}

pub fn run(a: CpArgs) -> i32 {
    let res = match (side(&a.src), side(&a.dest)) {
        (Side::Agent { name, path }, Side::Host(dest)) => copy_out(name, path, dest),
        (Side::Host(src), Side::Agent { name, path }) => copy_in(src, name, path),
        _ => Err(Failed(
            EXIT_USAGE,
            "exactly one of SRC and DEST is NAME:PATH in an agent (the other a host path or -)"
                .into(),
        )),
    };
    match res {
        Ok(()) => 0,
        Err(Failed(code, msg)) => {
            // Member names in the message are the agent's text.
            eprintln!(
                "aither: error: cp {} {}: {}",
                a.src,
                a.dest,
                escape::text(&msg)
            );
            code
        }
    }
}

/// The agent side while it runs: the exec call and a reader of its stderr. `aitherctl mcp`'s
/// file tools use it too (on a connection that said `via`).
pub(crate) struct AgentSide {
    call: JoinHandle<anyhow::Result<i32>>,
    err: JoinHandle<Vec<u8>>,
}

impl AgentSide {
    /// Starts `op` in agent `name` with `stdin` and `stdout`.
    fn start(name: &str, op: CopyOp, stdin: OwnedFd, stdout: OwnedFd) -> anyhow::Result<Self> {
        Self::start_on(
            Client::connect(&daemon::socket_path())?,
            name,
            op,
            stdin,
            stdout,
        )
    }

    /// [`AgentSide::start`] on a connection already made.
    pub(crate) fn start_on(
        mut client: Client,
        name: &str,
        op: CopyOp,
        stdin: OwnedFd,
        stdout: OwnedFd,
    ) -> anyhow::Result<Self> {
        let (er, ew) = aither::sys::pipe()?;
        let req = Request::Exec(ExecRequest {
            name: name.to_string(),
            argv: vec![],
            env: vec![],
            cwd: None,
            tty: false,
            copy: Some(op),
        });
        let call = std::thread::spawn(move || {
            let reply = client.call_with_fds(&req, &[stdin.as_fd(), stdout.as_fd(), ew.as_fd()]);
            // Our copies close: the far ends see EOF once the command's do.
            drop((stdin, stdout, ew));
            let reply = reply?;
            match (reply.ok, reply.error) {
                (true, _) => reply
                    .data
                    .as_ref()
                    .and_then(|d| d.get("exit_code"))
                    .and_then(|c| c.as_i64())
                    .map(|c| c as i32)
                    .ok_or_else(|| anyhow::anyhow!("aitherd's reply has no exit code")),
                (false, Some(e)) => anyhow::bail!("{} ({})", e.message, e.code),
                (false, None) => anyhow::bail!("aitherd refused without a reason"),
            }
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let mut f = File::from(er);
            let _ = Read::by_ref(&mut f).take(16 * 1024).read_to_end(&mut v);
            let _ = io::copy(&mut f, &mut io::sink());
            v
        });
        Ok(AgentSide { call, err })
    }

    /// Waits for the agent side: Ok when it exited 0, else what it said.
    pub(crate) fn wait(self) -> Result<(), Failed> {
        let code = self
            .call
            .join()
            .map_err(|_| Failed(EXIT_REFUSED, "the exec thread panicked".into()))??;
        let err = self.err.join().unwrap_or_default();
        if code == 0 {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&err);
        let said = escape::text(said.trim_end());
        Err(Failed(
            EXIT_REFUSED,
            match code {
                127 => "the agent side failed: `tar` is not on the agent's PATH".to_string(),
                _ => format!("the agent side failed (exit {code}): {said}"),
            },
        ))
    }
}

pub(crate) fn null(write: bool) -> io::Result<OwnedFd> {
    aither::sys::open(
        Path::new("/dev/null"),
        if write {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        },
    )
}

/// What the host destination is (opened without following a link anywhere).
enum HostDest {
    Dir(OwnedFd),
    NotDir,
    Missing,
}

fn host_dest(p: &Path) -> anyhow::Result<HostDest> {
    match hostpath::open_dir_nofollow(p) {
        Ok(fd) => Ok(HostDest::Dir(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(HostDest::NotDir),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(HostDest::Missing),
        Err(e) => Err(e.into()),
    }
}

/// The parent directory of `p` (opened without links) and `p`'s last name.
fn parent_and_name(p: &Path) -> anyhow::Result<(OwnedFd, OsString)> {
    let norm = hostpath::normalise(p)?;
    let name = norm
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{}: has no name to copy to", p.display()))?;
    let parent = norm.parent().unwrap_or(Path::new("/"));
    Ok((hostpath::open_dir_nofollow(parent)?, name.to_owned()))
}

/// The agent path's last name, and whether its contents are meant (`DIR/.`, `/`).
fn agent_base(path: &str) -> (Option<OsString>, bool) {
    let p = Path::new(path);
    if path.ends_with("/.") || path == "." {
        return (None, true);
    }
    match (p.parent(), p.file_name()) {
        (Some(_), Some(n)) => (Some(n.to_owned()), false),
        _ => (None, true),
    }
}

/// NAME:PATH → host DEST (or - for the stream itself on stdout).
fn copy_out(name: &str, apath: &str, dest: &str) -> Result<(), Failed> {
    let (base, contents) = agent_base(apath);
    let op = CopyOp::Out {
        path: PathBuf::from(apath),
        contents,
    };
    let (r, w) = aither::sys::pipe().map_err(anyhow::Error::from)?;
    if dest == "-" {
        let agent = AgentSide::start(name, op, null(false).map_err(anyhow::Error::from)?, w)?;
        let copied = io::copy(&mut File::from(r), &mut io::stdout().lock());
        agent.wait()?;
        copied.map_err(|e| Failed(EXIT_REFUSED, format!("writing to stdout: {e}")))?;
        return Ok(());
    }
    let dest_p = Path::new(dest);
    let state = host_dest(dest_p)?;
    let agent = AgentSide::start(name, op, null(false).map_err(anyhow::Error::from)?, w)?;
    let mut reader = Reader::new(io::BufReader::new(File::from(r)));
    let first = match reader.next_entry() {
        Ok(Some(h)) => h,
        other => {
            // Nothing came: the agent side's own reason first.
            agent.wait()?;
            other.map_err(anyhow::Error::from)?;
            return Err(Failed(EXIT_REFUSED, "the agent sent nothing".into()));
        }
    };
    let is_dir = first.kind == EntryKind::Dir;
    let base = base.unwrap_or_default();
    let top = |to: OsString| Names::Top {
        from: base.clone(),
        to,
    };
    let refuse = |m: String| Err(Failed(EXIT_REFUSED, m));
    let (root, names) = match (state, is_dir, contents) {
        (HostDest::Dir(fd), _, false) => (fd, top(base.clone())),
        (HostDest::Dir(fd), true, true) => (fd, Names::Contents),
        (HostDest::NotDir, _, _) if dest.ends_with('/') => {
            return refuse(format!("{dest}: not a directory"))
        }
        (HostDest::NotDir, true, _) => {
            return refuse(format!(
                "{dest}: not a directory (cannot copy a directory onto a file)"
            ))
        }
        (HostDest::Missing, false, _) if dest.ends_with('/') => {
            return refuse(format!("{dest}: no such directory"))
        }
        (HostDest::Missing, true, true) => {
            let (parent, n) = parent_and_name(dest_p)?;
            let fd =
                hostpath::mkdirs_at(parent.as_fd(), Path::new(&n), (first.mode & 0o777) | 0o700)
                    .map_err(anyhow::Error::from)?;
            (fd, Names::Contents)
        }
        (_, _, true) => return refuse(format!("{apath}: not a directory in the agent")),
        (HostDest::NotDir | HostDest::Missing, _, false) => {
            let (parent, n) = parent_and_name(dest_p)?;
            (parent, top(n))
        }
    };
    let mut x = Extractor::new(root, dest_p.to_owned(), names);
    let mut next = Some(first);
    while let Some(h) = next {
        x.entry(&h, &mut reader).map_err(anyhow::Error::from)?;
        next = reader.next_entry().map_err(anyhow::Error::from)?;
    }
    for s in &x.skipped {
        eprintln!("aither: warning: {}", escape::text(s));
    }
    agent.wait()
}

/// The agent path is a directory there (`test -d`, run as the agent).
fn agent_is_dir(name: &str, apath: &str) -> Result<bool, Failed> {
    let op = CopyOp::IsDir {
        path: PathBuf::from(apath),
    };
    let agent = AgentSide::start(
        name,
        op,
        null(false).map_err(anyhow::Error::from)?,
        null(true).map_err(anyhow::Error::from)?,
    )?;
    match agent.wait() {
        Ok(()) => Ok(true),
        Err(Failed(_, m)) if m.contains("(exit 1)") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Host SRC (or - for a tar stream on stdin) → NAME:PATH.
fn copy_in(src: &str, name: &str, apath: &str) -> Result<(), Failed> {
    let is_dir = agent_is_dir(name, apath)?;
    if src == "-" {
        if !is_dir {
            return Err(Failed(
                EXIT_REFUSED,
                format!(
                    "{name}:{apath}: not a directory in the agent (a stream is extracted into one)"
                ),
            ));
        }
        let (r, w) = aither::sys::pipe().map_err(anyhow::Error::from)?;
        let op = CopyOp::In { dir: apath.into() };
        let agent = AgentSide::start(name, op, r, null(true).map_err(anyhow::Error::from)?)?;
        let copied = io::copy(&mut io::stdin().lock(), &mut File::from(w));
        agent.wait()?;
        copied.map_err(|e| Failed(EXIT_REFUSED, format!("reading stdin: {e}")))?;
        return Ok(());
    }
    let src_p = Path::new(src);
    let contents = src.ends_with("/.");
    // Checked before the agent side starts: a link on the way is refused, never followed.
    hostpath::open_nofollow(src_p, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty())
        .map_err(anyhow::Error::from)?;
    let (dir, top): (PathBuf, Option<OsString>) = if is_dir {
        let base = hostpath::normalise(src_p)
            .map_err(anyhow::Error::from)?
            .file_name()
            .map(OsStr::to_owned);
        (apath.into(), if contents { None } else { base })
    } else if apath.ends_with('/') {
        return Err(Failed(
            EXIT_REFUSED,
            format!("{name}:{apath}: no such directory in the agent"),
        ));
    } else {
        let p = Path::new(apath);
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (parent, p.file_name().map(OsStr::to_owned))
    };
    if top.is_none() && !contents {
        return Err(Failed(
            EXIT_REFUSED,
            format!("{src}: has no name to copy as"),
        ));
    }
    let (r, w) = aither::sys::pipe().map_err(anyhow::Error::from)?;
    let op = CopyOp::In { dir };
    let agent = AgentSide::start(name, op, r, null(true).map_err(anyhow::Error::from)?)?;
    let mut tw = Writer::new(BufWriter::new(File::from(w)));
    let mut skipped = vec![];
    let packed = aither::cp::pack::pack(src_p, top.as_deref(), &mut tw, &mut skipped)
        .map_err(anyhow::Error::from)
        .and_then(|()| tw.finish().map(drop).map_err(anyhow::Error::from));
    for s in &skipped {
        eprintln!("aither: warning: {}", escape::text(s));
    }
    // The agent side's failure (it read a broken stream) says less than ours.
    let waited = agent.wait();
    packed?;
    waited
}
