//! aither-init builds the same sandbox from a spec on stdin (the path aitherd will use).

use std::io::Write;
use std::process::{Command, Stdio};

use aither_core::policy::Policy;
use aither_core::sandbox::{RunOptions, SandboxSpec};

fn require_root() {
    use std::os::unix::fs::MetadataExt;
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    assert_eq!(
        euid, 0,
        "this test creates sandboxes and must run as root (CI runs it as root)"
    );
}

#[test]
fn a_spec_on_stdin_runs_sandboxed_and_reports_the_exit_status() {
    require_root();
    let ws = tempfile::tempdir().unwrap();
    let policy = Policy::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../policies/strict.toml"
    ))
    .unwrap()
    .policy;
    let opts = RunOptions {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "grep -q '^NoNewPrivs:.*1' /proc/self/status && echo marker > out && exit 3".into(),
        ],
        ..Default::default()
    };
    let spec = SandboxSpec::derive(&policy, &opts, &|_| None, ws.path()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_aither-init"))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&spec).unwrap().as_bytes())
        .unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(3));
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out")).unwrap(),
        "marker\n"
    );
}

#[test]
fn garbage_on_stdin_is_an_error_not_a_crash() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_aither-init"))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{not json").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a SandboxSpec"));
}
