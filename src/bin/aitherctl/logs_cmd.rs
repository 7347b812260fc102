//! `aitherctl logs`: an agent's output (docs/agents.md "Logs", docs/daemon.md "Logs").
//!
//! Without options the agent's text is printed as it wrote it (stdout and stderr in the order
//! the shim read them): raw to a pipe, escaped on a terminal (crate::escape). `--timestamps`
//! and `--runs` ask aitherd for the records and print each line with its time and the run
//! boundaries; `--json` prints the records themselves, one object a line.

use std::collections::HashMap;
use std::io::Write;

use aither::daemon::proto::{LogStream, Request};
use aither::logfmt;
use clap::Args;
use serde_json::Value;

use crate::daemon_cmd::{client_err, connect, reply_data, EXIT_REFUSED};

/// Print an agent's output (stdout and stderr, in order, across restarts).
///
/// Every line is stored with its time and stream (the CRI log format); each start and end of
/// a run is stored too. Without options: the agent's text as it wrote it.
#[derive(Args)]
pub struct LogsArgs {
    name: String,
    /// Keep printing new output until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Number of lines from the end [default: 100].
    #[arg(long, short = 'n', value_name = "N")]
    tail: Option<usize>,
    /// Put each line's time (RFC 3339, UTC, nanoseconds) in front of it, as `docker logs -t`,
    /// and show where each run started and ended.
    #[arg(long, short = 't')]
    timestamps: bool,
    /// Show where each run started and ended (`-- run 3 started TIME --`).
    #[arg(long)]
    runs: bool,
    /// Only lines written since: a duration ago (30s, 10m, 2h) or an RFC 3339 time
    /// (2026-12-04T13:00:00Z). Lines of a log from before timestamps are left out.
    #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
    since: Option<u64>,
    /// Only one stream: stdout or stderr.
    #[arg(long, value_name = "STREAM")]
    stream: Option<LogStream>,
    /// One JSON object a line: {"ts", "stream", "run", "text"} ("partial": true for a part of
    /// a longer line, "ts": null for a line of an old log), and {"ts", "run", "event"} where a
    /// run started or ended ("exited" with "code" or "signal", "failed" with "code").
    #[arg(long)]
    json: bool,
}

/// `--since`: a duration ago, or an RFC 3339 time; nanoseconds since the epoch.
fn parse_since(s: &str) -> Result<u64, String> {
    if let Ok(d) = aither::units::parse_duration(s) {
        let ago = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        return Ok(logfmt::now_ns().saturating_sub(ago));
    }
    logfmt::parse_ts(s).ok_or_else(|| {
        format!("{s:?}: expected a duration (10m, 1h) or an RFC 3339 time (2026-12-04T13:00:00Z)")
    })
}

pub fn logs(a: LogsArgs) -> i32 {
    let shows_runs = a.timestamps || a.runs;
    let req = Request::Logs {
        name: a.name.clone(),
        follow: a.follow,
        tail: a.tail,
        since_ns: a.since,
        stream: a.stream,
        records: a.json || shows_runs,
    };
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut status = 0;
    let mut lines = Lines {
        timestamps: a.timestamps,
        runs: shows_runs,
        open: HashMap::new(),
    };
    let res = c.stream(&req, |r| {
        if !r.ok {
            let _ = reply_data(r.clone());
            status = EXIT_REFUSED;
            return false;
        }
        let data = r.data.clone().unwrap_or_default();
        let mut out = std::io::stdout().lock();
        if let Some(t) = data.get("text").and_then(|t| t.as_str()) {
            // Raw to a pipe; escaped on a terminal (crate::escape).
            let _ = out.write_all(crate::escape::for_stdout(t).as_bytes());
        }
        let records = data.get("records").and_then(|v| v.as_array());
        let mut text = String::new();
        for rec in records.into_iter().flatten() {
            if a.json {
                let _ = writeln!(out, "{}", ordered(rec));
            } else {
                lines.record(rec, &mut text);
            }
        }
        if !r.more {
            lines.finish(&mut text);
        }
        let _ = out.write_all(crate::escape::for_stdout(&text).as_bytes());
        out.flush().is_ok()
    });
    if let Err(e) = res {
        return client_err(e);
    }
    status
}

/// Records printed as lines: parts of a line are joined (per stream) and printed when the
/// line ends, with the time of its first part.
struct Lines {
    timestamps: bool,
    runs: bool,
    /// The open line of each stream: its time and text so far.
    open: HashMap<String, (String, String)>,
}

/// A line joined from parts is printed as it is once it holds this much.
const MAX_JOINED: usize = 1 << 20;

impl Lines {
    fn record(&mut self, r: &Value, out: &mut String) {
        let ts = r["ts"].as_str().unwrap_or_default().to_string();
        if let Some(event) = r["event"].as_str() {
            if self.runs {
                out.push_str(&boundary(r, event, &ts));
            }
            return;
        }
        let stream = r["stream"].as_str().unwrap_or("stdout").to_string();
        let text = r["text"].as_str().unwrap_or_default();
        let partial = r["partial"].as_bool().unwrap_or(false);
        let entry = self
            .open
            .entry(stream.clone())
            .or_insert_with(|| (ts, String::new()));
        entry.1.push_str(text);
        if !partial || entry.1.len() >= MAX_JOINED {
            if let Some((ts, line)) = self.open.remove(&stream) {
                self.line(&ts, &line, out);
            }
        }
    }

    fn line(&self, ts: &str, text: &str, out: &mut String) {
        // A line of an old log has no time: it is printed as it is.
        if self.timestamps && !ts.is_empty() {
            out.push_str(ts);
            out.push(' ');
        }
        out.push_str(text);
        out.push('\n');
    }

    /// The end of the output: lines still open are printed as they are.
    fn finish(&mut self, out: &mut String) {
        let mut open: Vec<(String, String)> = self.open.drain().map(|(_, v)| v).collect();
        open.sort();
        for (ts, line) in open {
            self.line(&ts, &line, out);
        }
    }
}

/// A record as one JSON line, its fields in reading order (time, stream, run, event and its
/// details, text, partial) rather than the alphabetical order of a parsed object.
fn ordered(rec: &Value) -> String {
    const ORDER: [&str; 9] = [
        "ts",
        "stream",
        "run",
        "event",
        "code",
        "signal",
        "oom_killed",
        "text",
        "partial",
    ];
    let Some(o) = rec.as_object() else {
        return rec.to_string();
    };
    let field = |k: &str, v: &Value| format!("{}:{v}", Value::from(k));
    let mut parts: Vec<String> = ORDER
        .iter()
        .filter_map(|k| o.get(*k).map(|v| field(k, v)))
        .collect();
    parts.extend(
        o.iter()
            .filter(|(k, _)| !ORDER.contains(&k.as_str()))
            .map(|(k, v)| field(k, v)),
    );
    // JSON leaves DEL and the C1 controls raw, which a terminal may act on (crate::escape):
    // written as \u escapes, the line is the same JSON and safe to print anywhere.
    let line = format!("{{{}}}", parts.join(","));
    if !line.chars().any(|c| c.is_control()) {
        return line;
    }
    line.chars()
        .map(|c| {
            if c.is_control() {
                format!("\\u{:04x}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `-- run 3 started 2026-12-04T13:00:00.123456789Z --` and its kin.
fn boundary(r: &Value, event: &str, ts: &str) -> String {
    let run = r["run"].as_u64().unwrap_or(0);
    let how = match event {
        "exited" => match (r["code"].as_i64(), r["signal"].as_i64()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "exited".into(),
        },
        "failed" => format!(
            "failed to start (status {})",
            r["code"].as_i64().unwrap_or(125)
        ),
        other => other.to_string(),
    };
    let oom = if r["oom_killed"].as_bool() == Some(true) {
        " (out of memory)"
    } else {
        ""
    };
    format!("-- run {run} {how}{oom} {ts} --\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parts_are_joined_per_stream_and_boundaries_shown() {
        let mut l = Lines {
            timestamps: true,
            runs: true,
            open: HashMap::new(),
        };
        let mut out = String::new();
        for r in [
            json!({"ts": "T1", "run": 2, "event": "started"}),
            json!({"ts": "T2", "stream": "stdout", "run": 2, "text": "ab", "partial": true}),
            json!({"ts": "T3", "stream": "stderr", "run": 2, "text": "err"}),
            json!({"ts": "T4", "stream": "stdout", "run": 2, "text": "cd"}),
            json!({"ts": null, "stream": "stdout", "run": null, "text": "old"}),
            json!({"ts": "T5", "run": 2, "event": "exited", "signal": 9, "oom_killed": true}),
            json!({"ts": "T6", "stream": "stdout", "run": 3, "text": "open", "partial": true}),
        ] {
            l.record(&r, &mut out);
        }
        l.finish(&mut out);
        assert_eq!(
            out,
            "-- run 2 started T1 --\nT3 err\nT2 abcd\nold\n-- run 2 killed by signal 9 (out of memory) T5 --\nT6 open\n"
        );
        assert!(parse_since("10m").unwrap() < logfmt::now_ns());
        assert_eq!(
            parse_since("2026-12-04T13:00:00Z").unwrap(),
            logfmt::parse_ts("2026-12-04T13:00:00Z").unwrap()
        );
        assert!(parse_since("yesterday").is_err());
        assert_eq!(
            ordered(
                &json!({"text": "a\"b", "run": 1, "ts": "T", "stream": "stderr", "partial": true})
            ),
            r#"{"ts":"T","stream":"stderr","run":1,"text":"a\"b","partial":true}"#
        );
        let c1 = ordered(&json!({"text": "csi\u{9b}31m del\u{7f} nl\n"}));
        assert_eq!(c1, r#"{"text":"csi\u009b31m del\u007f nl\n"}"#);
        let back: Value = serde_json::from_str(&c1).unwrap();
        assert_eq!(back["text"], "csi\u{9b}31m del\u{7f} nl\n");
    }
}
