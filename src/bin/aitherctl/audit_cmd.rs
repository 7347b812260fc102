//! `aitherctl audit`: read and verify the audit stream (docs/audit.md).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use aither::audit::{self, ChainedRecord};
use clap::{Args, Subcommand};

/// Read the audit stream: every decision (allow, deny) with the rule or claim that made it.
///
/// The log is /var/log/aither/audit.jsonl (AITHER_AUDIT_LOG overrides), one JSON record per
/// line, each carrying the SHA-256 of the one before: `aitherctl audit verify` detects any
/// edited, removed or reordered record. Exit status of verify: 0 intact, 1 broken.
///
/// Examples:
///   aitherctl audit --since 1h --agent my-agent
///   aitherctl audit -n 20
///   aitherctl audit -f --json | jq 'select(.decision == "deny")'
///   aitherctl audit verify
#[derive(Args)]
#[command(verbatim_doc_comment, args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    cmd: Option<AuditCmd>,
    /// Keep printing new records until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only records about this agent.
    #[arg(long, value_name = "NAME")]
    agent: Option<String>,
    /// Only records since this long ago (e.g. 10m).
    #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
    since: Option<Duration>,
    /// Only `allow`, `deny` or `info` records.
    #[arg(long, value_name = "DECISION")]
    decision: Option<String>,
    /// Only the last N matching records (as `tail -n`), then new ones with -f.
    #[arg(long = "lines", short = 'n', value_name = "N")]
    lines: Option<usize>,
    /// One JSON record per line, as stored.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain of the whole log (all rotated files): exit 1 on any break.
    Verify {
        #[arg(long)]
        json: bool,
    },
}

struct Filter {
    agent: Option<String>,
    since_ms: u64,
    decision: Option<String>,
    json: bool,
}

impl Filter {
    /// Whether a record passes --since, --agent and --decision.
    fn wants(&self, r: &ChainedRecord) -> bool {
        if r.ts_ms < self.since_ms {
            return false;
        }
        if self.agent.is_some() && r.entry.agent != self.agent {
            return false;
        }
        if let Some(d) = &self.decision {
            let rd = serde_json::to_value(r.entry.decision)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string));
            if rd.as_deref() != Some(d.as_str()) {
                return false;
            }
        }
        true
    }

    /// Prints a wanted record; false when stdout is gone.
    fn show(&self, line: &[u8], r: &ChainedRecord) -> bool {
        if !self.wants(r) {
            return true;
        }
        let mut out = std::io::stdout().lock();
        let res = if self.json {
            out.write_all(line).and_then(|()| out.write_all(b"\n"))
        } else {
            let ts = aither::token::format_time(r.ts_ms / 1000);
            writeln!(
                out,
                "{}.{:03}Z {:>6} {:<5} {:<18} {:<16} {} {}",
                ts.trim_end_matches('Z'),
                r.ts_ms % 1000,
                r.seq,
                serde_json::to_value(r.entry.decision)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                r.entry.kind,
                r.entry.agent.as_deref().unwrap_or("-"),
                r.entry.rule,
                if r.entry.data.is_null() {
                    String::new()
                } else {
                    r.entry.data.to_string()
                }
            )
        };
        res.is_ok()
    }
}

pub fn run(a: AuditArgs) -> i32 {
    let path = audit::log_path();
    if let Some(AuditCmd::Verify { json }) = a.cmd {
        return verify(&path, json);
    }
    let f = Filter {
        agent: a.agent,
        since_ms: a
            .since
            .map(|d| aither::units::now_ms().saturating_sub(d.as_millis() as u64))
            .unwrap_or(0),
        decision: a.decision,
        json: a.json,
    };
    // The log is root's (0600): anyone else reads their own records through aitherd.
    if let Err(e) = std::fs::File::open(&path) {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return through_daemon(&f, a.follow, a.lines);
        }
    }
    let lines = match audit::read_lines(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("aither: error: {e}");
            return 1;
        }
    };
    let wanted: Vec<(&[u8], &ChainedRecord)> = lines
        .iter()
        .filter_map(|l| l.record.as_ref().map(|r| (&l.bytes[..], r)))
        .filter(|(_, r)| f.wants(r))
        .collect();
    for (bytes, r) in last(&wanted, a.lines) {
        if !f.show(bytes, r) {
            return 0;
        }
    }
    if a.follow {
        follow(&path, &f);
    }
    0
}

/// The records aitherd lets this user see: those they asked for, or about their agents.
fn through_daemon(f: &Filter, follow: bool, n: Option<usize>) -> i32 {
    if follow {
        eprintln!("aither: error: --follow needs read access to the audit log (root); aitherd gives a user their own records without it");
        return 2;
    }
    let v = match crate::daemon_cmd::call(&aither::daemon::proto::Request::Audit {
        since_ms: Some(f.since_ms),
        agent: f.agent.clone(),
    }) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let parsed: Vec<(&str, ChainedRecord)> = v["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str())
        .filter_map(|t| Some((t, serde_json::from_str::<ChainedRecord>(t).ok()?)))
        .filter(|(_, r)| f.wants(r))
        .collect();
    let wanted: Vec<(&[u8], &ChainedRecord)> =
        parsed.iter().map(|(t, r)| (t.as_bytes(), r)).collect();
    for (bytes, r) in last(&wanted, n) {
        if !f.show(bytes, r) {
            return 0;
        }
    }
    0
}

/// The last `n` of `all` (all of them without -n).
fn last<T>(all: &[T], n: Option<usize>) -> &[T] {
    &all[all.len() - n.unwrap_or(all.len()).min(all.len())..]
}

fn verify(path: &Path, json: bool) -> i32 {
    match audit::verify(path) {
        Ok(v) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if v.ok {
                println!(
                    "audit log intact: {} records{}{}",
                    v.records,
                    v.starts_at
                        .map(|s| format!(", starting at seq {s} (older files rotated away)"))
                        .unwrap_or_default(),
                    if v.torn.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; {} torn write(s) by a crashed writer: {}",
                            v.torn.len(),
                            v.torn.join(", ")
                        )
                    }
                );
            } else {
                println!(
                    "audit log BROKEN after {} good records: {}",
                    v.records,
                    v.error.as_deref().unwrap_or("?")
                );
            }
            if v.ok {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("aither: error: {e}");
            1
        }
    }
}

/// Prints records appended after the current end, following rotation.
fn follow(path: &Path, f: &Filter) {
    let mut pos = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let ino = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    let mut cur = ino(path);
    let mut partial: Vec<u8> = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if ino(path) != cur {
            cur = ino(path);
            pos = 0;
        }
        let Ok(mut file) = std::fs::File::open(path) else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len <= pos {
            continue;
        }
        if file.seek(SeekFrom::Start(pos)).is_err() {
            continue;
        }
        let mut buf = Vec::new();
        if file.read_to_end(&mut buf).is_err() {
            continue;
        }
        pos += buf.len() as u64;
        partial.extend_from_slice(&buf);
        while let Some(i) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            let line = &line[..line.len() - 1];
            if let Ok(r) = serde_json::from_slice::<ChainedRecord>(line) {
                if !f.show(line, &r) {
                    return;
                }
            }
        }
    }
}
