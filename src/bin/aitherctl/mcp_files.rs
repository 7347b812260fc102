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
/// The most entries `list` returns, and the most bytes of stream it reads.
const LIST_MAX: usize = 1000;
const LIST_STREAM_MAX: u64 = 256 << 20;
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
    let side = AgentSide::start_on(client, agent, op, null(false).map_err(fail)?, w).map_err(fail)?;
    Ok((side, Reader::new(BufReader::new(std::fs::File::from(r)))))
}

/// Reads what is left of the stream (at most LIST_STREAM_MAX bytes), so that the agent side
/// can end; past that the pipe is closed (the agent side then fails, and the caller knows
/// whether that matters).
fn drain(reader: Reader<BufReader<std::fs::File>>) {
    let _ = io::copy(
        &mut reader.into_inner().take(LIST_STREAM_MAX),
        &mut io::sink(),
    );
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
    waited(side)?;
    let h = header.ok_or_else(|| ToolError::Failed(format!("{path}: the agent sent nothing")))?;
    match h.kind {
        EntryKind::File => {
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
    let content = a.opt_str("content")?.ok_or_else(|| ToolError::arg("content", "is required"))?;
    if content.len() > WRITE_MAX {
        return Err(ToolError::arg("content", format!("is over {WRITE_MAX} bytes")));
    }
    let mode = a.opt_u64("mode", 0o777)?.unwrap_or(0o644) as u32;
    let p = Path::new(&path);
    let (Some(name), false) = (p.file_name(), path.ends_with('/')) else {
        return Err(ToolError::arg("path", "must name a file (not end in / or ..)"));
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
    let side = AgentSide::start_on(client, &agent, op, r, null(true).map_err(fail)?).map_err(fail)?;
    let sent = std::fs::File::from(w).write_all(&stream);
    waited(side)?;
    sent.map_err(|e| ToolError::Failed(format!("sending the file to the agent: {e}")))?;
    Ok(Outcome::json(json!({"agent": agent, "path": path, "written_bytes": content.len()})))
}

pub fn list(a: &Args<'_>, scope: &Scope) -> Result<Outcome, ToolError> {
    let agent = agent_arg(a, scope)?;
    let path = a.opt_str("path")?.unwrap_or(".").to_string();
    let op = CopyOp::Out {
        path: PathBuf::from(&path),
        contents: true,
    };
    let (side, mut reader) = stream_out("list", &agent, op)?;
    let mut entries: Vec<Value> = Vec::new();
    let mut more = false;
    let mut read_bytes = 0u64;
    loop {
        let h = match reader.next_entry() {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => {
                drain(reader);
                let _ = side.wait();
                return Err(fail(e));
            }
        };
        read_bytes += h.size;
        if h.kind == EntryKind::File {
            let _ = reader.copy_data(&mut io::sink());
        }
        // Members are `./NAME` (and `./NAME/...` below: not this listing's).
        let name = String::from_utf8_lossy(&h.path).into_owned();
        let name = name.trim_start_matches("./").trim_end_matches('/').to_string();
        if name.is_empty() || name == "." || name.contains('/') {
            continue;
        }
        if entries.len() == LIST_MAX || read_bytes > LIST_STREAM_MAX {
            more = true;
            break;
        }
        let mut e = json!({"name": name, "kind": kind_name(h.kind), "size": h.size, "mode": format!("{:o}", h.mode)});
        if h.kind == EntryKind::Symlink {
            e["target"] = json!(String::from_utf8_lossy(&h.link));
        }
        entries.push(e);
    }
    drain(reader);
    let res = waited(side);
    if !more {
        res?;
    }
    Ok(Outcome::json(json!({"agent": agent, "path": path, "entries": entries, "truncated": more})))
}
