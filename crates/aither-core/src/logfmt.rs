//! The agent log's format (`log_dir/agent.log`, docs/daemon.md "Logs"): the CRI log format of
//! the kubelet, CRI-O, containerd and podman's `k8s-file` driver, one record per line:
//!
//! ```text
//! 2026-12-04T13:00:00.123456789Z stdout F:aither-run run=3 event=started
//! 2026-12-04T13:00:00.130000000Z stdout F a complete line
//! 2026-12-04T13:00:00.131000000Z stderr P the first 16 KiB of a longer line...
//! 2026-12-04T13:00:00.131000500Z stderr F ...and its end
//! 2026-12-04T13:00:09.000000000Z stdout F:aither-run run=3 event=exited code=0
//! ```
//!
//! The time is RFC 3339 in UTC with nanoseconds (fixed width, as containerd writes it); the
//! stream `stdout` or `stderr`; the tag `F` (the text ends a line) or `P` (a part: the line
//! goes on in the next record of the same stream). The text never holds a newline and is at
//! most [`MAX_TEXT`] bytes: longer lines are stored in parts. The bytes are the agent's, not
//! necessarily UTF-8.
//!
//! Run boundaries use CRI's tag extension (`F:<more>`, which the kubelet's parser accepts and
//! shows as an ordinary line): the shim writes `run=N event=started` before it launches run N,
//! `run=N event=exited ...` (or `event=failed`) when it ended, and `run=N event=continued` at
//! the top of every file it rotates to, so that each file says which run it holds. An agent
//! cannot write such a record: the shim frames each of its lines with `F` or `P`.
//!
//! A line that is not a record (an agent.log written raw, before this format) is read as
//! stdout text without a time.

use std::time::{SystemTime, UNIX_EPOCH};

pub use aither_proto::LogStream as Stream;

/// The most text one record holds; longer lines are split into `P` records.
pub const MAX_TEXT: usize = 16 * 1024;

/// The tag of run boundary records (CRI's `F` with an extension).
const RUN_TAG: &str = "F:aither-run";

/// A run boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEvent {
    /// The shim is about to launch the run.
    Started,
    /// The first record of a file the shim rotated to during the run (not shown to operators).
    Continued,
    /// The sandbox ended: the agent's exit code, or the signal that killed it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        oom_killed: bool,
    },
    /// The launch failed (the shim's status: 125, 126, 127).
    Failed { code: i32 },
}

/// One line of the log, parsed. `text` borrows from the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// What the agent wrote. `ts_ns` is None for a line of the old raw format.
    Output {
        ts_ns: Option<u64>,
        stream: Stream,
        partial: bool,
        text: &'a [u8],
    },
    Run {
        ts_ns: u64,
        run: u64,
        event: RunEvent,
    },
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// The inverse of `units::civil_from_days` (days since 1970-01-01; None before it).
fn days_from_civil(y: u64, m: u64, d: u64) -> Option<u64> {
    let y = if m <= 2 { y.checked_sub(1)? } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

/// `ns` as RFC 3339 in UTC with nine fraction digits: `2026-12-04T13:00:00.123456789Z`.
pub fn format_ts(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (y, m, d) = crate::units::civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ns % 1_000_000_000
    )
}

/// Parses an RFC 3339 time (`2026-12-04T13:00:00Z`, `...00.5+02:00`, any number of fraction
/// digits up to nine) into nanoseconds since the Unix epoch. None for anything else, and for
/// times before 1970.
pub fn parse_ts(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || !b.is_ascii() {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac = 0u64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() || digits.len() > 9 {
            return None;
        }
        frac = digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32);
    }
    let offset: i64 = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let oh = num(i + 1..i + 3)? as i64;
            let om = num(i + 4..i + 6)? as i64;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 3600 + om * 60) * 1_000_000_000;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d)?;
    // In i128: a year up to 9999 passes u64 nanoseconds (2554) and is refused, not wrapped.
    let secs = i128::from(days * 86_400 + h * 3600 + mi * 60 + se);
    let ns = secs * 1_000_000_000 + i128::from(frac) - i128::from(offset);
    u64::try_from(ns).ok()
}

/// Appends one output record (`text` without a newline, at most [`MAX_TEXT`] bytes) and its
/// newline to `out`.
pub fn encode_output(ts_ns: u64, stream: Stream, partial: bool, text: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(format_ts(ts_ns).as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(text);
    out.push(b'\n');
}

/// Appends one run boundary record to `out`.
pub fn encode_run(ts_ns: u64, run: u64, event: &RunEvent, out: &mut Vec<u8>) {
    let what = match event {
        RunEvent::Started => "event=started".to_string(),
        RunEvent::Continued => "event=continued".to_string(),
        RunEvent::Exited {
            code,
            signal,
            oom_killed,
        } => {
            let mut s = "event=exited".to_string();
            if let Some(c) = code {
                s.push_str(&format!(" code={c}"));
            }
            if let Some(g) = signal {
                s.push_str(&format!(" signal={g}"));
            }
            if *oom_killed {
                s.push_str(" oom_killed");
            }
            s
        }
        RunEvent::Failed { code } => format!("event=failed code={code}"),
    };
    let line = format!(
        "{} {} {RUN_TAG} run={run} {what}\n",
        format_ts(ts_ns),
        Stream::Stdout.as_str()
    );
    out.extend_from_slice(line.as_bytes());
}

/// Splits what the agent wrote in one read into record texts: each complete line (without its
/// newline) as a full one, a trailing piece without a newline as a part, and every line longer
/// than [`MAX_TEXT`] as parts followed by its full end.
pub fn split_output(chunk: &[u8], mut each: impl FnMut(&[u8], bool)) {
    let mut rest = chunk;
    while !rest.is_empty() {
        let (line, ends, next) = match rest.iter().position(|&c| c == b'\n') {
            Some(i) => (&rest[..i], true, &rest[i + 1..]),
            None => (rest, false, &rest[rest.len()..]),
        };
        let mut pieces = line.chunks(MAX_TEXT).peekable();
        if line.is_empty() && ends {
            each(b"", false);
        }
        while let Some(p) = pieces.next() {
            let last = pieces.peek().is_none();
            each(p, !(last && ends));
        }
        rest = next;
    }
}

/// Parses one line of the log (without its newline). Anything that is not a record is stdout
/// text of the old raw format, not partial (the reader decides that from the newline).
pub fn parse_line(line: &[u8]) -> Record<'_> {
    let old = Record::Output {
        ts_ns: None,
        stream: Stream::Stdout,
        partial: false,
        text: line,
    };
    let mut fields = line.splitn(4, |&c| c == b' ');
    let (Some(ts), Some(stream), Some(tag)) = (fields.next(), fields.next(), fields.next()) else {
        return old;
    };
    let text = fields.next().unwrap_or_default();
    let Some(ts_ns) = std::str::from_utf8(ts).ok().and_then(parse_ts) else {
        return old;
    };
    let stream = match stream {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return old,
    };
    if tag == RUN_TAG.as_bytes() && stream == Stream::Stdout {
        if let Some((run, event)) = parse_run(text) {
            return Record::Run { ts_ns, run, event };
        }
    }
    // CRI: the first of the tags separated by ':' says whether the line goes on.
    let first = tag.split(|&c| c == b':').next().unwrap_or_default();
    let partial = match first {
        b"P" => true,
        b"F" => false,
        _ => return old,
    };
    Record::Output {
        ts_ns: Some(ts_ns),
        stream,
        partial,
        text,
    }
}

fn parse_run(text: &[u8]) -> Option<(u64, RunEvent)> {
    let text = std::str::from_utf8(text).ok()?;
    let mut words = text.split(' ');
    let run = words.next()?.strip_prefix("run=")?.parse().ok()?;
    let (mut code, mut signal, mut oom) = (None, None, false);
    let event = words.next()?.strip_prefix("event=")?;
    for w in words {
        match w.split_once('=') {
            Some(("code", v)) => code = Some(v.parse().ok()?),
            Some(("signal", v)) => signal = Some(v.parse().ok()?),
            None if w == "oom_killed" => oom = true,
            _ => return None,
        }
    }
    let event = match event {
        "started" => RunEvent::Started,
        "continued" => RunEvent::Continued,
        "exited" => RunEvent::Exited {
            code,
            signal,
            oom_killed: oom,
        },
        "failed" => RunEvent::Failed { code: code? },
        _ => return None,
    };
    Some((run, event))
}

/// The agent's text of a whole log, as it wrote it (records joined, a newline after each full
/// one, run boundaries left out): what `aitherctl logs` prints without options.
pub fn plain_text(log: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(log.len());
    for l in log.split_inclusive(|&c| c == b'\n') {
        let ended = l.ends_with(b"\n");
        let body = l.strip_suffix(b"\n").unwrap_or(l);
        if let Record::Output {
            ts_ns,
            partial,
            text,
            ..
        } = parse_line(body)
        {
            out.extend_from_slice(text);
            // An old-format line keeps its own newline (or its lack of one, at the end).
            let newline = if ts_ns.is_none() { ended } else { !partial };
            if newline {
                out.push(b'\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_as_rfc3339_with_nanoseconds() {
        let t = 1_764_853_200_123_456_789;
        assert_eq!(format_ts(t), "2025-12-04T13:00:00.123456789Z");
        assert_eq!(parse_ts("2025-12-04T13:00:00.123456789Z"), Some(t));
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            parse_ts("2000-02-29T00:00:00Z"),
            Some(951_782_400_000_000_000)
        );
        assert_eq!(
            parse_ts("2025-12-04T15:00:00.5+02:00"),
            Some(1_764_853_200_500_000_000)
        );
        assert_eq!(
            parse_ts("2025-12-04T12:30:00-00:30"),
            Some(1_764_853_200_000_000_000)
        );
        for bad in [
            "",
            "2025-12-04",
            "2025-12-04T13:00:00",
            "2025-13-04T13:00:00Z",
            "2025-12-04T13:00:00.Z",
            "2025-12-04T13:00:00.1234567891Z",
            "1969-12-31T23:59:59Z",
            "2025-12-04T13:00:00+2:00",
            "2025-12-04 13:00:00Z",
            "２０25-12-04T13:00:00Z",
        ] {
            assert_eq!(parse_ts(bad), None, "{bad:?}");
        }
        for secs in [0u64, 951_782_400, 1_800_000_000, 4_102_444_799] {
            let ns = secs * 1_000_000_000 + 7;
            assert_eq!(parse_ts(&format_ts(ns)), Some(ns));
        }
    }

    #[test]
    fn records_round_trip_and_run_boundaries_cannot_be_forged_by_text() {
        let mut out = Vec::new();
        encode_output(5, Stream::Stderr, true, b"half", &mut out);
        encode_output(
            6,
            Stream::Stdout,
            false,
            b"F:aither-run run=9 event=started",
            &mut out,
        );
        encode_run(7, 3, &RunEvent::Started, &mut out);
        let exit = RunEvent::Exited {
            code: None,
            signal: Some(9),
            oom_killed: true,
        };
        encode_run(8, 3, &exit, &mut out);
        encode_run(9, 4, &RunEvent::Failed { code: 127 }, &mut out);
        let text = String::from_utf8(out.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "1970-01-01T00:00:00.000000005Z stderr P half");
        assert_eq!(
            lines[3],
            "1970-01-01T00:00:00.000000008Z stdout F:aither-run run=3 event=exited signal=9 oom_killed"
        );
        let parsed: Vec<Record> = out
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .map(parse_line)
            .collect();
        assert_eq!(
            parsed,
            vec![
                Record::Output {
                    ts_ns: Some(5),
                    stream: Stream::Stderr,
                    partial: true,
                    text: b"half"
                },
                Record::Output {
                    ts_ns: Some(6),
                    stream: Stream::Stdout,
                    partial: false,
                    text: b"F:aither-run run=9 event=started"
                },
                Record::Run {
                    ts_ns: 7,
                    run: 3,
                    event: RunEvent::Started
                },
                Record::Run {
                    ts_ns: 8,
                    run: 3,
                    event: exit
                },
                Record::Run {
                    ts_ns: 9,
                    run: 4,
                    event: RunEvent::Failed { code: 127 }
                },
            ]
        );
        // CRI's own tags parse too; a bad tag or stream is an old line.
        assert!(matches!(
            parse_line(b"2025-12-04T13:00:00Z stdout F:x y"),
            Record::Output {
                partial: false,
                text: b"y",
                ..
            }
        ));
        for old in [
            &b"plain words here"[..],
            b"2025-12-04T13:00:00Z stdin F x",
            b"2025-12-04T13:00:00Z stdout Q x",
            b"\xff\xfe binary",
            b"",
        ] {
            assert_eq!(
                parse_line(old),
                Record::Output {
                    ts_ns: None,
                    stream: Stream::Stdout,
                    partial: false,
                    text: old
                }
            );
        }
    }

    #[test]
    fn any_prefix_or_garbage_parses_without_panicking() {
        let mut line = Vec::new();
        encode_run(
            1_764_853_200_123_456_789,
            12,
            &RunEvent::Exited {
                code: Some(-1),
                signal: None,
                oom_killed: true,
            },
            &mut line,
        );
        encode_output(
            u64::MAX / 2,
            Stream::Stderr,
            true,
            "ünï \u{9b}".as_bytes(),
            &mut line,
        );
        for end in 0..line.len() {
            let _ = parse_line(&line[..end]);
            let _ = parse_line(&line[end..]);
            let mut bent = line.clone();
            bent[end] ^= 0x80;
            let _ = parse_line(&bent);
            let _ = plain_text(&bent);
        }
        for s in [
            "2025-12-04T13:00:00+99:99",
            "9999-12-31T23:59:60.999999999Z",
        ] {
            let _ = parse_ts(s);
        }
    }

    #[test]
    fn output_is_split_at_newlines_and_at_max_text() {
        let mut got: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut long = vec![b'x'; MAX_TEXT * 2 + 3];
        long.push(b'\n');
        let chunk = [&b"a\n\nb"[..], &long, b"tail"].concat();
        split_output(&chunk, |t, p| got.push((t.to_vec(), p)));
        let joined: Vec<u8> = got
            .iter()
            .flat_map(|(t, p)| {
                let mut v = t.clone();
                if !p {
                    v.push(b'\n');
                }
                v
            })
            .collect();
        assert_eq!(joined, chunk, "parts and lines join back to the bytes");
        assert!(got
            .iter()
            .all(|(t, _)| t.len() <= MAX_TEXT && !t.contains(&b'\n')));
        assert_eq!(got[0], (b"a".to_vec(), false));
        assert_eq!(got[1], (b"".to_vec(), false));
        // "b" and the x's are one line of 2 * MAX_TEXT + 4 bytes: two parts and its end.
        assert_eq!(
            got.len(),
            6,
            "{:?}",
            got.iter().map(|g| (g.0.len(), g.1)).collect::<Vec<_>>()
        );
        assert!(
            got[2].1 && got[2].0.len() == MAX_TEXT,
            "a long line in parts"
        );
        assert!(got[3].1 && got[3].0.len() == MAX_TEXT);
        assert_eq!(got[4], (vec![b'x'; 4], false));
        assert_eq!(got[5], (b"tail".to_vec(), true));
    }

    #[test]
    fn plain_text_is_the_agents_bytes_for_both_formats() {
        let mut log = Vec::new();
        encode_run(1, 1, &RunEvent::Started, &mut log);
        encode_output(2, Stream::Stdout, true, b"abc", &mut log);
        encode_output(3, Stream::Stderr, false, b"err", &mut log);
        encode_output(4, Stream::Stdout, false, b"def", &mut log);
        encode_run(5, 1, &RunEvent::Failed { code: 1 }, &mut log);
        assert_eq!(plain_text(&log), b"abcerr\ndef\n");
        assert_eq!(plain_text(b"old line\nno newline"), b"old line\nno newline");
    }
}
