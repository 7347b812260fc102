//! `aitherctl logs` end to end, as root, against a real aitherd (issue 20): the shim stores
//! the agent's output in the CRI log format (time, stream, partial or full line) with the
//! boundaries of its runs; `logs` tells the streams apart (`--json`, `--stream`), prints times
//! (`--timestamps`), run boundaries, filters by time (`--since`), joins long lines stored in
//! parts, follows across rotations, and still reads a log of the old raw format.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aither::logfmt;
use common::daemon::TestDaemon as Daemon;
use common::{poll_until, unique};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn daemon() -> Daemon {
    Daemon::start("aither-logs-", &[])
}

fn spawn(d: &Daemon, name: &str, flags: &[&str], script: &str) {
    let mut args = vec!["spawn", "--json", "--policy", "strict", name];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    d.ok(&args);
}

fn state_of(d: &Daemon, name: &str) -> String {
    let v: Value = serde_json::from_str(&d.ok(&["inspect", name])).unwrap();
    v["state"].as_str().unwrap_or_default().to_string()
}

fn wait_state(d: &Daemon, name: &str, state: &str) {
    assert!(
        poll_until(WAIT, || state_of(d, name) == state),
        "{name} did not reach {state}: {}",
        d.ok(&["inspect", name])
    );
}

fn wait_logs(d: &Daemon, name: &str, what: &str) {
    assert!(
        poll_until(WAIT, || d
            .ok(&["logs", "-n", "100000", name])
            .contains(what)),
        "{name} never logged {what:?}: {}\n{}",
        d.ok(&["logs", name]),
        d.log()
    );
}

/// `logs --json ARGS NAME` (all lines unless ARGS has `-n`): one object per line.
fn records(d: &Daemon, name: &str, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["logs", "--json"];
    if !args.contains(&"-n") {
        a.extend_from_slice(&["-n", "100000"]);
    }
    a.extend_from_slice(args);
    a.push(name);
    d.ok(&a)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn log_dir(d: &Daemon, name: &str) -> PathBuf {
    d.state.path().join("state/agents").join(name)
}

#[test]
fn logs_tell_stdout_from_stderr_with_rfc3339_times_and_filter_by_stream() {
    let d = daemon();
    let name = unique("streams");
    let before = logfmt::now_ns();
    spawn(
        &d,
        &name,
        &[],
        "echo out-1; echo err-1 >&2; echo out-2; echo err-2 >&2; exec sleep 300",
    );
    wait_logs(&d, &name, "out-2");
    wait_logs(&d, &name, "err-2");
    let after = logfmt::now_ns();

    // --json: every line an object; the agent's lines with their stream, run and a time
    // between the spawn and now; the run's start first.
    let recs = records(&d, &name, &[]);
    assert_eq!(recs[0]["event"], "started", "{recs:?}");
    assert_eq!(recs[0]["run"], 1);
    let line = |text: &str| {
        recs.iter()
            .find(|r| r["text"] == text)
            .unwrap_or_else(|| panic!("no {text}: {recs:?}"))
            .clone()
    };
    for (text, stream) in [
        ("out-1", "stdout"),
        ("err-1", "stderr"),
        ("out-2", "stdout"),
        ("err-2", "stderr"),
    ] {
        let r = line(text);
        assert_eq!(r["stream"], stream, "{r}");
        assert_eq!(r["run"], 1, "{r}");
        assert!(r.get("partial").is_none(), "{r}");
        let ts = r["ts"].as_str().expect("ts");
        let ns = logfmt::parse_ts(ts).unwrap_or_else(|| panic!("not RFC 3339: {ts}"));
        assert!(ts.ends_with('Z') && ts.len() == 30, "{ts}");
        assert!(before <= ns && ns <= after, "{ts} not within the run");
    }

    // --timestamps: each line behind its time, as `docker logs -t`; the run's start shown.
    let shown = d.ok(&["logs", "--timestamps", &name]);
    let mut saw = 0;
    for l in shown.lines() {
        if l.starts_with("-- run 1 started ") && l.ends_with(" --") {
            continue;
        }
        let (ts, text) = l.split_once(' ').unwrap_or_else(|| panic!("{l:?}"));
        assert!(logfmt::parse_ts(ts).is_some(), "{l:?}");
        assert!(
            text.starts_with("out-") || text.starts_with("err-"),
            "{l:?}"
        );
        saw += 1;
    }
    assert_eq!(saw, 4, "{shown}");
    assert!(shown.starts_with("-- run 1 started "), "{shown}");

    // One stream alone, in the agent's order; plain output is the agent's text and nothing
    // else.
    assert_eq!(
        d.ok(&["logs", "--stream", "stderr", &name]),
        "err-1\nerr-2\n"
    );
    assert_eq!(
        d.ok(&["logs", "--stream", "stdout", &name]),
        "out-1\nout-2\n"
    );
    let plain = d.ok(&["logs", &name]);
    let mut lines: Vec<&str> = plain.lines().collect();
    lines.sort();
    assert_eq!(lines, ["err-1", "err-2", "out-1", "out-2"], "{plain}");
}

#[test]
fn a_restarted_agent_shows_where_each_run_started_and_how_it_ended() {
    let d = daemon();
    let name = unique("runs");
    // Restarted at once each time until the burst limit fails it: a known end.
    spawn(
        &d,
        &name,
        &["--restart", "always", "--backoff", "0"],
        "echo line-of-run; echo bye >&2; exit 3",
    );
    wait_state(&d, &name, "failed");
    let recs = records(&d, &name, &[]);
    let started: Vec<u64> = recs
        .iter()
        .filter(|r| r["event"] == "started")
        .map(|r| r["run"].as_u64().unwrap())
        .collect();
    assert!(started.len() >= 2, "{recs:?}");
    assert_eq!(
        started,
        (1..=started.len() as u64).collect::<Vec<_>>(),
        "runs numbered from 1"
    );
    // Every run: started, its lines (marked with its number), exited with status 3.
    let mut run = 0;
    for r in &recs {
        match r["event"].as_str() {
            Some("started") => {
                run += 1;
                assert_eq!(r["run"], run, "{r}");
            }
            Some("exited") => {
                assert_eq!(r["run"], run, "{r}");
                assert_eq!(r["code"], 3, "{r}");
            }
            Some(e) => panic!("unexpected event {e}: {r}"),
            None => assert_eq!(r["run"], run, "{r}"),
        }
    }
    assert_eq!(
        recs.iter().filter(|r| r["event"] == "exited").count(),
        started.len()
    );

    let shown = d.ok(&["logs", "-t", "-n", "1000", &name]);
    assert!(shown.contains("-- run 1 started "), "{shown}");
    assert!(shown.contains("-- run 1 exited with status 3 "), "{shown}");
    assert!(shown.contains("-- run 2 started "), "{shown}");
    let runs_only = d.ok(&["logs", "--runs", "-n", "1000", &name]);
    assert!(
        runs_only.contains("\nline-of-run\nbye\n-- run 1 exited with status 3 ")
            || runs_only.contains("\nbye\nline-of-run\n-- run 1 exited with status 3 "),
        "{runs_only}"
    );
    // Plain: the agent's text only, one pair of lines per run.
    let plain = d.ok(&["logs", "-n", "1000", &name]);
    assert_eq!(plain.lines().count(), 2 * started.len(), "{plain}");
    assert!(!plain.contains("--"), "{plain}");
}

#[test]
fn since_leaves_out_older_lines() {
    let d = daemon();
    let name = unique("since");
    spawn(
        &d,
        &name,
        &[],
        "echo early; while [ ! -e go ]; do sleep 0.05; done; echo late; exec sleep 300",
    );
    wait_logs(&d, &name, "early");
    let early = records(&d, &name, &[])
        .into_iter()
        .find(|r| r["text"] == "early")
        .unwrap();
    let t = logfmt::parse_ts(early["ts"].as_str().unwrap()).unwrap();
    let after_early = logfmt::format_ts(t + 1);
    // Nothing written since: nothing printed (the run's start is older too).
    assert_eq!(d.ok(&["logs", "--since", &after_early, &name]), "");
    std::fs::write(d.ws.path().join("go"), "").unwrap();
    wait_logs(&d, &name, "late");
    assert_eq!(d.ok(&["logs", "--since", &after_early, &name]), "late\n");
    let recs = records(&d, &name, &["--since", &after_early]);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["text"], "late");
    // A duration: an hour ago holds both; an exact time is inclusive.
    assert_eq!(d.ok(&["logs", "--since", "1h", &name]), "early\nlate\n");
    let at_early = logfmt::format_ts(t);
    assert_eq!(
        d.ok(&["logs", "--since", &at_early, &name]),
        "early\nlate\n"
    );
    let bad = d.ctl(&["logs", "--since", "yesterday", &name]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn a_long_line_is_stored_in_parts_and_printed_whole() {
    let d = daemon();
    let name = unique("long");
    // 40000 bytes and no newline: more than two records' worth (16 KiB each).
    spawn(
        &d,
        &name,
        &[],
        "head -c 40000 /dev/zero | tr '\\0' x; echo tail-line >&2; exec sleep 300",
    );
    wait_logs(&d, &name, "tail-line");
    let long = "x".repeat(40000);
    assert!(
        poll_until(WAIT, || d.ok(&["logs", "--stream", "stdout", &name]).len()
            == 40000),
        "{}",
        d.ok(&["logs", &name]).len()
    );
    assert_eq!(d.ok(&["logs", "--stream", "stdout", &name]), long);

    // In the file: parts (P) of at most 16 KiB, each a record of its own.
    let file = std::fs::read_to_string(log_dir(&d, &name).join("agent.log")).unwrap();
    let parts: Vec<&str> = file.lines().filter(|l| l.contains(" stdout P ")).collect();
    assert!(parts.len() >= 3, "{file:.300}");
    assert!(parts.iter().all(|l| l.len() <= 31 + 9 + logfmt::MAX_TEXT));
    let recs = records(&d, &name, &["--stream", "stdout"]);
    let texts: Vec<&Value> = recs.iter().filter(|r| r.get("text").is_some()).collect();
    assert!(texts.len() >= 3);
    assert!(texts.iter().all(|r| r["partial"] == true), "{recs:?}");
    let joined: String = texts.iter().map(|r| r["text"].as_str().unwrap()).collect();
    assert_eq!(joined, long);
    // --timestamps joins the parts behind the time of the first.
    let shown = d.ok(&["logs", "-t", "--stream", "stdout", &name]);
    let shown = shown
        .strip_prefix("-- run 1 started ")
        .and_then(|s| s.split_once(" --\n"))
        .unwrap_or_else(|| panic!("{shown:.200}"))
        .1;
    let (ts, text) = shown.split_once(' ').unwrap();
    assert!(logfmt::parse_ts(ts).is_some(), "{ts}");
    assert_eq!(text, format!("{long}\n"));
}

#[test]
fn a_log_of_the_old_raw_format_still_prints_and_is_continued() {
    let d = daemon();
    let name = unique("oldfmt");
    spawn(&d, &name, &["--restart", "never"], "echo first-run");
    wait_state(&d, &name, "exited");
    // The log as an aitherd before issue 20 left it: raw bytes, the last line unfinished.
    let dir = log_dir(&d, &name);
    std::fs::write(dir.join("agent.log"), "legacy line\nunfinished").unwrap();
    std::fs::remove_file(dir.join("run")).unwrap();
    assert_eq!(d.ok(&["logs", &name]), "legacy line\nunfinished");
    let recs = records(&d, &name, &[]);
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0]["ts"], Value::Null);
    assert_eq!(recs[0]["stream"], "stdout");
    assert_eq!(recs[0]["run"], Value::Null);
    assert_eq!(recs[0]["text"], "legacy line");
    assert_eq!(recs[1]["partial"], true);
    assert_eq!(d.ok(&["logs", "-t", &name]), "legacy line\nunfinished\n");
    // Lines without a time are never "since" anything.
    assert_eq!(d.ok(&["logs", "--since", "1h", &name]), "");

    // The next run appends records to the same file, on a line of their own.
    d.ok(&["restart", &name]);
    assert!(poll_until(WAIT, || d
        .ok(&["logs", &name])
        .contains("first-run")));
    wait_state(&d, &name, "exited");
    assert_eq!(
        d.ok(&["logs", &name]),
        "legacy line\nunfinished\nfirst-run\n"
    );
    assert_eq!(d.ok(&["logs", "--since", "1h", &name]), "first-run\n");
}

#[test]
fn follow_goes_on_across_rotations_without_a_gap() {
    let d = daemon();
    let name = unique("follow");
    // About 2.6 MB of records once `go` exists: agent.log rotates (1 MiB) twice.
    spawn(
        &d,
        &name,
        &[],
        "echo waiting; while [ ! -e go ]; do sleep 0.05; done; \
         seq 1 30000 | sed 's/$/ padding-padding-padding-padding-padding/'; echo END; exec sleep 300",
    );
    wait_logs(&d, &name, "waiting");
    let mut child = d
        .cmd(&["logs", "-f", "-n", "1", &name])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let mut out = child.stdout.take().unwrap();
    let s2 = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            s2.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    assert!(poll_until(WAIT, || seen
        .lock()
        .unwrap()
        .contains("waiting\n")));
    std::fs::write(d.ws.path().join("go"), "").unwrap();
    let done = poll_until(Duration::from_secs(120), || {
        seen.lock().unwrap().contains("END\n")
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let got = seen.lock().unwrap().clone();
    assert!(done, "follow stopped: {} bytes", got.len());
    assert!(
        log_dir(&d, &name).join("agent.log.2").exists(),
        "the log rotated twice"
    );
    let want: String = std::iter::once("waiting\n".to_string())
        .chain((1..=30000).map(|i| format!("{i} padding-padding-padding-padding-padding\n")))
        .chain(std::iter::once("END\n".to_string()))
        .collect();
    if got != want {
        let _ = std::fs::write("/tmp/wt-logs-follow-got.txt", &got);
    }
    assert!(
        got == want,
        "lines lost or repeated across rotation ({} of {} bytes)",
        got.len(),
        want.len()
    );
}

#[test]
fn ten_megabytes_of_binary_without_a_newline_stay_bounded_records() {
    let d = daemon();
    let name = unique("flood");
    spawn(
        &d,
        &name,
        &["--restart", "never"],
        "head -c 10000000 /dev/urandom | tr -d '\\n'; echo done; echo after",
    );
    wait_state(&d, &name, "exited");
    // The kept files: whole records of at most 16 KiB of text each, files near 1 MiB.
    let dir = log_dir(&d, &name);
    let mut count = 0;
    for f in ["agent.log", "agent.log.1", "agent.log.2"] {
        let b = std::fs::read(dir.join(f)).unwrap();
        assert!(
            b.len() <= (1 << 20) + 2 * logfmt::MAX_TEXT,
            "{f}: {}",
            b.len()
        );
        assert!(b.ends_with(b"\n"), "{f}");
        for l in b.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            assert!(l.len() <= 30 + 10 + logfmt::MAX_TEXT, "{f}: {}", l.len());
            assert!(
                matches!(
                    logfmt::parse_line(l),
                    logfmt::Record::Output { ts_ns: Some(_), .. } | logfmt::Record::Run { .. }
                ),
                "{f}: not a record"
            );
            count += 1;
        }
    }
    assert!(count > 150, "{count}");
    // aitherd answers, in bounded frames, with the end of the line and what followed.
    let plain = d.ok(&["logs", "-n", "2", &name]);
    assert!(
        plain.ends_with("done\nafter\n"),
        "{:?}",
        &plain[plain.len() - 20..]
    );
    let recs = records(&d, &name, &["-n", "2"]);
    let last = &recs[recs.len() - 2];
    assert_eq!(last["text"], "after", "{last}");
    assert_eq!(recs.last().unwrap()["event"], "exited");
    let texts: Vec<&Value> = recs.iter().filter(|r| r.get("text").is_some()).collect();
    assert!(texts.len() > 100, "the line's kept parts: {}", texts.len());
    assert!(texts[..texts.len() - 2]
        .iter()
        .all(|r| r["partial"] == true && r["stream"] == "stdout"));
    assert!(texts[texts.len() - 2]["text"]
        .as_str()
        .unwrap()
        .ends_with("done"));
    assert!(d.ok(&["ps"]).contains(&name));
}
