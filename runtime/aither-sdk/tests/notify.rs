//! `aither-notify` end to end: the binary gets a socketpair as fd 3, a fake daemon the other end.

mod common;

use std::os::unix::net::UnixStream;
use std::process::{Output, Stdio};

use serde_json::{json, Value};

const NOTIFY: &str = env!("CARGO_BIN_EXE_aither-notify");

/// Runs `aither-notify args` against a daemon that answers with `respond`; returns the
/// process's output and the requests the daemon saw.
fn notify<F>(args: &[&str], respond: F) -> (Output, Vec<Value>)
where
    F: FnMut(&Value, &mut UnixStream) + Send + 'static,
{
    let (ours, theirs) = UnixStream::pair().unwrap();
    let daemon = common::spawn(ours, respond);
    // The Command holds a copy of the descriptor: drop it before joining the daemon.
    let out = common::with_fd3(NOTIFY, args, theirs.into())
        .output()
        .unwrap();
    (out, daemon.join().unwrap())
}

fn notify_ok(args: &[&str]) -> (Output, Vec<Value>) {
    notify(args, |req, s| common::send(s, &common::ok(req)))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn without_id(req: &Value) -> Value {
    let mut req = req.clone();
    assert!(req.as_object_mut().unwrap().remove("id").unwrap().is_u64());
    req
}

#[test]
fn notify_ready() {
    let (out, seen) = notify_ok(&["--ready"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_eq!(
        seen.iter().map(without_id).collect::<Vec<_>>(),
        [json!({"op": "ready"})]
    );
}

#[test]
fn notify_heartbeat() {
    let (out, seen) = notify_ok(&["--heartbeat"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        seen.iter().map(without_id).collect::<Vec<_>>(),
        [json!({"op": "heartbeat"})]
    );
}

#[test]
fn notify_pain() {
    let (out, seen) = notify_ok(&["--pain", "error", "cannot reach the model API"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        seen.iter().map(without_id).collect::<Vec<_>>(),
        [json!({"op": "pain", "severity": "error", "reason": "cannot reach the model API"})]
    );
}

#[test]
fn notify_status() {
    let (out, seen) = notify_ok(&["--status", "step 2 of 5"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        seen.iter().map(without_id).collect::<Vec<_>>(),
        [json!({"op": "status", "text": "step 2 of 5"})]
    );
}

#[test]
fn notify_error_reply_exits_1_with_the_message() {
    let (out, seen) = notify(&["--ready"], |req, s| {
        common::send(s, &common::err(req, "denied", "token does not grant ready"))
    });
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "aither-notify: aitherd refused: token does not grant ready (denied)\n"
    );
    assert_eq!(seen.len(), 1);
}

#[test]
fn notify_closed_channel_exits_1() {
    let (out, _) = notify(&["--heartbeat"], |_, s| {
        s.shutdown(std::net::Shutdown::Both).unwrap()
    });
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "aither-notify: aitherd closed the channel\n");
}

#[test]
fn notify_without_channel_exits_2() {
    let out = std::process::Command::new(NOTIFY)
        .arg("--ready")
        .env_remove("AITHER_FD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "aither-notify: not running under aitherd (AITHER_FD is not set)\n"
    );
}

#[test]
fn notify_help() {
    let out = std::process::Command::new(NOTIFY)
        .arg("--help")
        .env_remove("AITHER_FD")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8(out.stdout).unwrap();
    for option in [
        "--ready",
        "--heartbeat",
        "--pain SEVERITY REASON",
        "--status TEXT",
        "Exit status",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
}

#[test]
fn notify_usage_errors_exit_64_without_sending() {
    for args in [
        &[][..],
        &["--bogus"],
        &["--ready", "extra"],
        &["--pain", "fatal", "why"],
        &["--pain", "error"],
        &["--status"],
        &["--status", "a", "b"],
    ] {
        let (out, seen) = notify_ok(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("aither-notify: "), "{args:?}");
        assert!(seen.is_empty(), "{args:?} sent {seen:?}");
    }
}
