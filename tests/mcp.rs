//! `aitherctl mcp` end to end, as root: the official MCP Python client (tests/mcp/client.py,
//! the `mcp` package that install.sh installs) drives the server over stdio against a real
//! aitherd. It lists the tools; runs `echo hi` and `cat /etc/shadow` under strict; spawns an
//! agent and reads its logs and memory; writes, reads and lists a file in its workspace, where
//! a planted link to a host file is shown as a link and never followed; publishes on the bus;
//! then, with a token for another agent, is refused everything outside it without aitherd
//! acting. The audit log must hold the calls as `mcp` records and aitherd's own records of
//! them tagged `via: mcp`.
//!
//! The client's Python: $AITHER_MCP_PYTHON, else install.sh's test environment
//! (/usr/local/lib/aither/test-venv), else python3. Without the `mcp` package the test fails.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::daemon::TestDaemon as Daemon;
use common::users::Users;
use common::{unique, AITHERCTL};
use serde_json::{json, Value};

/// install.sh's virtual environment for the Python test clients.
const TEST_VENV_PYTHON: &str = "/usr/local/lib/aither/test-venv/bin/python3";

fn python() -> String {
    std::env::var("AITHER_MCP_PYTHON").unwrap_or_else(|_| {
        if Path::new(TEST_VENV_PYTHON).exists() {
            TEST_VENV_PYTHON.into()
        } else {
            "python3".into()
        }
    })
}

#[test]
fn the_official_mcp_client_drives_sandboxes_agents_files_memory_and_is_held_to_its_token() {
    let d = Daemon::start("aitherd-mcp-", &[]);
    let ws = d.ws.path().to_str().expect("utf-8 workspace").to_string();
    // A link an agent could have planted, to a host file the sandbox does not show.
    std::os::unix::fs::symlink("/etc/hostname", d.ws.path().join("escape")).expect("symlink");
    let agent = unique("mcp");
    let subject = unique("mcptok");
    let tok = d.ws.path().join("client.tok");
    d.ok(&[
        "token",
        "mint",
        "--policy",
        "strict",
        "--subject",
        &subject,
        "--ttl",
        "1h",
        "--out",
        tok.to_str().expect("utf-8"),
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/client.py");
    let mut c = Command::new(python());
    d.env(&mut c);
    c.arg(&script)
        .args([
            AITHERCTL,
            &ws,
            &agent,
            tok.to_str().expect("utf-8"),
            &subject,
        ])
        .current_dir(d.ws.path())
        .stdin(Stdio::null());
    let out = c.output().expect("start the Python MCP client");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "the MCP client failed ({}):\n{}\n{}\n--- daemon log ---\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        d.log()
    );
    assert!(text(&out.stdout).contains("all checks passed"));

    let records = d.audit_records();
    let find = |kind: &str, tool: Option<&str>, decision: &str| {
        records.iter().any(|r| {
            r["kind"] == kind
                && r["decision"] == decision
                && r["via"] == "mcp"
                && tool.is_none_or(|t| r["data"]["tool"] == t)
        })
    };
    for tool in [
        "run", "spawn", "logs", "mem_put", "write", "read", "list", "exec", "ps",
    ] {
        assert!(
            find("mcp", Some(tool), "allow"),
            "no allowed mcp record of {tool}"
        );
    }
    // Refusals by the token: recorded, with the token's reason.
    assert!(
        records.iter().any(|r| r["kind"] == "mcp"
            && r["decision"] == "deny"
            && r["data"]["tool"] == "logs"
            && r["data"]["agent"] == agent.as_str()
            && r["rule"].as_str().is_some_and(|s| s.contains("token"))),
        "no denied mcp record of logs on {agent}"
    );
    // aitherd's own records of what the calls did carry the front end.
    for kind in ["spawn", "cp", "exec", "stop", "rm"] {
        assert!(find(kind, None, "allow"), "no {kind} record with via mcp");
    }
    // Nothing the token refused reached aitherd as an action on the other agent.
    assert!(
        !records
            .iter()
            .any(|r| r["kind"] == "stop" && r["agent"] == agent.as_str() && r["via"] == "mcp"),
        "a refused stop reached aitherd"
    );
    let _ = d.ctl(&["rm", "--force", &agent]);
}

/// JSON-RPC lines: the handshake, then each (tool, arguments) as `tools/call` with ids 1, 2, ….
fn session_input(calls: &[(&str, Value)]) -> String {
    let mut lines = vec![
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "tests/mcp.rs", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    ];
    for (i, (tool, args)) in calls.iter().enumerate() {
        lines.push(
            json!({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
            "params": {"name": tool, "arguments": args}}),
        );
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// The results of a session's calls, by id (1, 2, …).
fn results(stdout: &[u8]) -> Vec<Value> {
    let mut replies: Vec<Value> = String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON message per line"))
        .collect();
    replies.sort_by_key(|r| r["id"].as_u64());
    assert_eq!(replies[0]["result"]["protocolVersion"], "2025-06-18");
    replies
        .into_iter()
        .skip(1)
        .map(|r| r["result"].clone())
        .collect()
}

fn text_of(r: &Value) -> String {
    r["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_members_mcp_server_acts_as_that_member_and_sees_only_their_own_agents() {
    let us = Users::create();
    let d = us.daemon();
    let (u1, u2) = (&us.users[0], &us.users[1]);
    let name = unique("mu-mcp");
    us.ok(
        &d,
        0,
        &[
            "spawn", "--json", "--policy", "strict", &name, "--", "sleep", "60",
        ],
    );
    let calls = [
        ("ps", json!({})),
        ("logs", json!({"agent": name})),
        ("stop", json!({"agent": name})),
    ];
    // Another member: the agent does not exist for them, and the attempt is theirs, via mcp.
    let o = us.ctl_input(&d, 1, &["mcp"], &session_input(&calls));
    assert!(o.status.success(), "{o:?}");
    let r = results(&o.stdout);
    assert!(
        !r[0]["structuredContent"].to_string().contains(&name),
        "{}",
        r[0]
    );
    for (i, what) in [(1, "logs"), (2, "stop")] {
        assert_eq!(r[i]["isError"], true, "{what}: {}", r[i]);
        assert!(
            text_of(&r[i]).contains("no agent named"),
            "{what}: {}",
            r[i]
        );
    }
    // The owner sees it.
    let o = us.ctl_input(&d, 0, &["mcp"], &session_input(&calls[..1]));
    let r = results(&o.stdout);
    assert!(
        r[0]["structuredContent"].to_string().contains(&name),
        "{}",
        r[0]
    );

    let records = d.audit_records();
    assert!(
        records.iter().any(|r| r["kind"] == "stop"
            && r["decision"] == "deny"
            && r["caller_uid"] == u2.uid
            && r["owner_uid"] == u1.uid
            && r["via"] == "mcp"),
        "no denied stop of {name} by uid {} via mcp",
        u2.uid
    );
    assert!(
        records.iter().any(|r| r["kind"] == "mcp"
            && r["caller_uid"] == u2.uid
            && r["data"]["tool"] == "stop"),
        "no mcp record of uid {}'s stop",
        u2.uid
    );
    us.ok(&d, 0, &["rm", "--force", &name]);
}
