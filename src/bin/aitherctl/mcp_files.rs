//! `aitherctl mcp`'s file tools: read, write and list inside a running agent's sandbox. Each is
//! one `cp` agent side (a `tar` aitherd runs in the sandbox as the agent, audited as `cp` with
//! `via: mcp`): the agent's paths are resolved only there, so a link the agent planted can
//! never reach a host file, and the host side holds the stream in memory, never on disk.

use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use aither::cp::tar::{EntryKind, Header, Reader, Writer};
use aither::daemon::proto::CopyOp;
use aither::mcp::rpc::Outcome;
use aither::mcp::scope::Scope;
use aither::mcp::tools::Args;
use aither::mcp::ToolError;
use serde_json::{json, Value};

use crate::cp_cmd::{null, AgentSide, Failed};
use crate::mcp_cmd::{agent_arg, connect, fail};

/// The most `read` returns by default, and at most.
const READ_DEFAULT: u64 = 1 << 20;
const READ_MAX: u64 = 16 << 20;
/// The most entries `list` returns, and the most bytes of find's output it reads.
const LIST_MAX: usize = 1000;
const LIST_BYTES: usize = 1 << 20;
/// The most bytes of the stream read after the one entry `read` wanted.
const DRAIN_MAX: u64 = 1 << 20;
/// The most `write` sends.
const WRITE_MAX: usize = 16 << 20;

fn waited(side: AgentSide) -> Result<(), ToolError> {
    side.wait().map_err(|Failed(_, m)| ToolError::Failed(m))
}

fn kind_name(k: EntryKind) -> &'static str {
    match k {
        EntryKind::File => "file",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
        EntryKind::HardLink => "hardlink",
        EntryKind::CharDevice => "char_device",
        EntryKind::BlockDevice => "block_device",
        EntryKind::Fifo => "fifo",
    }
}

/// Starts `op` in the agent with its stdout on a pipe; the reader of that pipe.
fn stream_out(
    tool: &str,
    agent: &str,
    op: CopyOp,
) -> Result<(AgentSide, Reader<BufReader<std::fs::File>>), ToolError> {
    let (r, w) = aither::sys::pipe().map_err(fail)?;
    let client = connect(tool, Some(agent))?;
    let side =
        AgentSide::start_on(client, agent, op, null(false).map_err(fail)?, w).map_err(fail)?;
    Ok((side, Reader::new(BufReader::new(std::fs::File::from(r)))))
}

/// Reads what is left of the stream (at most DRAIN_MAX bytes: the end of the archive), so
/// that the agent side can end; past that the pipe is closed and the agent side fails.
fn drain(reader: Reader<BufReader<std::fs::File>>) {
    let _ = io::copy(&mut reader.into_inner().take(DRAIN_MAX), &mut io::sink());
}

pub fn read(a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
    let agent = agent_arg(a, scope)?;
    let path = a.str("path")?.to_string();
    let max = a.opt_u64("max_bytes", READ_MAX)?.unwrap_or(READ_DEFAULT);
    let op = CopyOp::Out {
        path: PathBuf::from(&path),
        contents: false,
    };
    let (side, mut reader) = stream_out("read", &agent, op)?;
    let first = reader.next_entry();
    let mut content = Vec::new();
    let mut dropped = 0;
    let header = match first {
        Ok(Some(h)) => {
            if h.kind == EntryKind::File {
                let mut sink = Bounded {
                    kept: &mut content,
                    max: max as usize,
                    dropped: &mut dropped,
                };
                reader.copy_data(&mut sink).map_err(fail)?;
            }
            Some(h)
        }
        _ => None,
    };
    drain(reader);
    // A directory's stream is cut short (its agent side then fails): the kind says more.
    let side = waited(side);
    let h = match header {
        Some(h) => h,
        None => {
            side?;
            return Err(ToolError::Failed(format!("{path}: the agent sent nothing")));
        }
    };
    match h.kind {
        EntryKind::File => {
            side?;
            let text = String::from_utf8(content);
            let (text, encoding) = match text {
                Ok(t) => (t, "utf-8"),
                Err(e) => {
                    use base64::Engine;
                    let b = base64::engine::general_purpose::STANDARD.encode(e.into_bytes());
                    (b, "base64")
                }
            };
            Ok(Outcome {
                text: text.clone(),
                structured: json!({"agent": agent, "path": path, "content": text,
                    "encoding": encoding, "size": h.size, "dropped_bytes": dropped}),
                is_error: false,
            })
        }
        EntryKind::Symlink => Err(ToolError::arg(
            "path",
            format!(
                "{path} is a symbolic link (to {}) in the agent: not followed; read its target's path instead",
                String::from_utf8_lossy(&h.link)
            ),
        )),
        k => Err(ToolError::arg(
            "path",
            format!("{path} is a {} in the agent, not a file (`list` shows a directory)", kind_name(k)),
        )),
    }
}

/// Keeps the first `max` bytes, counts the rest.
struct Bounded<'a> {
    kept: &'a mut Vec<u8>,
    max: usize,
    dropped: &'a mut u64,
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.max.saturating_sub(self.kept.len()).min(buf.len());
        self.kept.extend_from_slice(&buf[..room]);
        *self.dropped += (buf.len() - room) as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn write(a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
    let agent = agent_arg(a, scope)?;
    let path = a.str("path")?.to_string();
    let content = a
        .opt_str("content")?
        .ok_or_else(|| ToolError::arg("content", "is required"))?;
    if content.len() > WRITE_MAX {
        return Err(ToolError::arg(
            "content",
            format!("is over {WRITE_MAX} bytes"),
        ));
    }
    let mode = a.opt_u64("mode", 0o777)?.unwrap_or(0o644) as u32;
    let p = Path::new(&path);
    let (Some(name), false) = (p.file_name(), path.ends_with('/')) else {
        return Err(ToolError::arg(
            "path",
            "must name a file (not end in / or ..)",
        ));
    };
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // The stream: one file member, its name a plain name below DIR (tar -x -C DIR).
    let mut tw = Writer::new(Vec::new());
    let header = Header {
        path: name.as_encoded_bytes().to_vec(),
        kind: EntryKind::File,
        mode,
        size: content.len() as u64,
        mtime: aither::units::now_ms() as i64 / 1000,
        link: vec![],
    };
    let stream = tw
        .header(&header)
        .and_then(|()| tw.data(&mut content.as_bytes(), content.len() as u64))
        .and_then(|()| tw.finish())
        .map_err(fail)?;
    let (r, w) = aither::sys::pipe().map_err(fail)?;
    let client = connect("write", Some(&agent))?;
    let op = CopyOp::In { dir };
    let side =
        AgentSide::start_on(client, &agent, op, r, null(true).map_err(fail)?).map_err(fail)?;
    let sent = std::fs::File::from(w).write_all(&stream);
    waited(side)?;
    sent.map_err(|e| ToolError::Failed(format!("sending the file to the agent: {e}")))?;
    Ok(Outcome::json(
        json!({"agent": agent, "path": path, "written_bytes": content.len()}),
    ))
}

/// `list` is GNU find on the agent's PATH, run as an exec (audited as `exec`): one level,
/// never following a link (`-P`), each entry as five NUL-terminated fields.
pub fn list(a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
    let agent = agent_arg(a, scope)?;
    let path = a.opt_str("path")?.unwrap_or(".").to_string();
    // A relative path is written ./PATH, so that it can never read as one of find's options.
    let start = if path.starts_with('/') || path.starts_with("./") {
        path.clone()
    } else {
        format!("./{path}")
    };
    let argv: Vec<String> = [
        "find",
        "-P",
        &start,
        "-mindepth",
        "1",
        "-maxdepth",
        "1",
        "-printf",
        "%y\\0%s\\0%m\\0%P\\0%l\\0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (code, out, err) = crate::mcp_cmd::exec_capture("list", &agent, argv, None, LIST_BYTES)?;
    if code != 0 {
        return Err(ToolError::Failed(format!(
            "{path}: find failed in the agent (exit {code}): {}",
            String::from_utf8_lossy(&err.bytes).trim_end()
        )));
    }
    let fields: Vec<&[u8]> = out.bytes.split(|b| *b == 0).collect();
    let mut entries: Vec<Value> = fields
        .chunks_exact(5)
        .take(LIST_MAX)
        .map(|f| {
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let kind = match f[0] {
                b"f" => "file",
                b"d" => "dir",
                b"l" => "symlink",
                b"p" => "fifo",
                b"s" => "socket",
                b"c" => "char_device",
                b"b" => "block_device",
                _ => "other",
            };
            let mut e = json!({"name": s(f[3]), "kind": kind,
                "size": s(f[1]).parse::<u64>().unwrap_or(0), "mode": s(f[2])});
            if kind == "symlink" {
                e["target"] = json!(s(f[4]));
            }
            e
        })
        .collect();
    entries.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
    let truncated = out.dropped > 0 || fields.len() / 5 > LIST_MAX;
    Ok(Outcome::json(
        json!({"agent": agent, "path": path, "entries": entries, "truncated": truncated}),
    ))
}
