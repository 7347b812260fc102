//! `aitherctl fork NAME NEW` of a spawned agent (docs/workspaces.md "fork"): aitherd copies
//! NAME's layer (or a snapshot of it) and memory and spawns NEW with NAME's policy and
//! workspace; and members' own discard/snapshot/restore/fork through aitherd, another
//! member's refused and audited. Real aitherd, real sandboxes under the `ci` policy.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::unique;
use serde_json::Value;

fn wait_state(state: impl Fn() -> String, want: &str) -> bool {
    common::poll_until(Duration::from_secs(60), || state() == want)
}

/// Events of agent `name` (kinds), as `aitherctl events --json --agent NAME` lists them.
fn event_kinds(d: &common::daemon::TestDaemon, name: &str) -> Vec<String> {
    d.ok(&["events", "--json", "--agent", name])
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["kind"].as_str().map(String::from))
        .collect()
}

/// Whether agent `name` has (or gets, within 10 s) an event of `kind`.
fn has_event(d: &common::daemon::TestDaemon, name: &str, kind: &str) -> bool {
    common::poll_until(Duration::from_secs(10), || {
        event_kinds(d, name).iter().any(|k| k == kind)
    })
}

fn audit_of(d: &common::daemon::TestDaemon, kind: &str) -> Vec<(String, String, u64)> {
    d.audit_records()
        .iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| {
            (
                r["agent"].as_str().unwrap_or("").to_string(),
                r["decision"].as_str().unwrap_or("").to_string(),
                r["caller_uid"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// Whether aitherd's audit log has (or gets, within 10 s: its own thread writes it) a record
/// of `kind` for `agent` with `decision` by caller `uid`.
fn audited(
    d: &common::daemon::TestDaemon,
    kind: &str,
    agent: &str,
    decision: &str,
    uid: u32,
) -> bool {
    let want = (agent.to_string(), decision.to_string(), u64::from(uid));
    common::poll_until(Duration::from_secs(10), || {
        audit_of(d, kind).contains(&want)
    })
}

/// On the bus: a subscriber to NAME's `layer_discarded` gets one (discards of the empty
/// layer are repeated until the subscription, attached at some point, sees one).
fn discard_is_on_the_bus(d: &common::daemon::TestDaemon, name: &str) {
    let mut sub = d
        .cmd(&[
            "bus",
            "sub",
            &format!("aither.agent.{name}.layer_discarded"),
            "--json",
            "-n",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let got = common::poll_until(Duration::from_secs(30), || {
        d.ok(&["discard", name]);
        matches!(sub.try_wait(), Ok(Some(_)))
    });
    if !got {
        let _ = sub.kill();
    }
    let out = sub.wait_with_output().unwrap();
    assert!(got, "no layer_discarded on the bus");
    let m: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(
        m["subject"],
        format!("aither.agent.{name}.layer_discarded"),
        "{m}"
    );
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

#[test]
fn a_fork_from_a_snapshot_is_a_new_agent_with_the_snapshots_files_and_memory() {
    let d = common::daemon::TestDaemon::start("aither-fork-", &[]);
    let name = unique("fork-a");
    let new = unique("fork-b");
    let ws = d.ws.path().to_str().unwrap().to_string();
    std::fs::write(d.ws.path().join("base"), "base\n").unwrap();
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(d.ws.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = listing();
    // First run: writes `a`; every later run (a restart) writes `later`.
    d.ok(&[
        "spawn",
        "--policy",
        "ci",
        "--workspace",
        &ws,
        &name,
        "--",
        "/bin/sh",
        "-c",
        "if [ -e a ]; then echo later > later; else echo one > a; fi",
    ]);
    let state = |n: &str| {
        let v: Value = serde_json::from_str(&d.ok(&["inspect", n])).unwrap();
        v["state"].as_str().unwrap_or("").to_string()
    };
    assert!(wait_state(|| state(&name), "exited"), "{}", d.log());
    d.ok(&[
        "mem", "put", &name, "--tier", "spirit", "persona", "careful",
    ]);
    d.ok(&[
        "mem",
        "put",
        &name,
        "--tier",
        "knowledge",
        "fact",
        "forks copy memory",
    ]);
    d.ok(&["snapshot", &name, "--tag", "t1"]);
    // NAME goes on after the snapshot: its later write is in its layer only.
    let layers = d.state.path().join("state/layers");
    d.ok(&["restart", &name]);
    assert!(
        common::poll_until(Duration::from_secs(60), || layers
            .join(&name)
            .join("upper/later")
            .exists()),
        "{}",
        d.log()
    );
    assert!(wait_state(|| state(&name), "exited"), "{}", d.log());

    // The fork: from t1, with a command of its own.
    let out = d.json(&[
        "fork",
        &name,
        &new,
        "--from",
        "t1",
        "--json",
        "--",
        "/bin/sh",
        "-c",
        "cat a > seen; echo two > mine; if [ -e later ]; then echo yes > saw-later; fi",
    ]);
    assert_eq!(out["new"], new.as_str(), "{out}");
    assert!(out["memory_entries"].as_u64().unwrap() >= 2, "{out}");
    assert!(wait_state(|| state(&new), "exited"), "{}", d.log());
    let v: Value = serde_json::from_str(&d.ok(&["inspect", &new])).unwrap();
    assert_eq!(v["policy"], "ci", "{v}");
    assert_eq!(v["workspace"], ws.as_str(), "{v}");
    assert_eq!(v["last_exit"], "exited with code 0", "{v}");
    assert_eq!(v["argv"][0], "/bin/sh", "{v}");
    assert!(v["argv"][2].as_str().unwrap().contains("seen"), "{v}");

    // NEW saw the snapshot's files, not NAME's later write; NAME's layer has none of NEW's.
    let (a, b) = (
        layers.join(&name).join("upper"),
        layers.join(&new).join("upper"),
    );
    assert_eq!(read(&b.join("seen")).as_deref(), Some("one\n"));
    assert_eq!(read(&b.join("mine")).as_deref(), Some("two\n"));
    assert!(!b.join("later").exists() && !b.join("saw-later").exists());
    assert!(a.join("later").exists());
    assert!(!a.join("mine").exists() && !a.join("seen").exists());
    // Nothing reached the directory.
    assert_eq!(listing(), before, "the directory changed");
    assert_eq!(read(&d.ws.path().join("base")).as_deref(), Some("base\n"));
    // `diff` of NEW shows its changes over the same directory.
    let v: Value = serde_json::from_str(&d.ok(&["diff", &new, "--json"])).unwrap();
    let paths: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a", "mine", "seen"], "{v}");

    // The memory tiers were copied.
    assert_eq!(
        d.ok(&["mem", "get", &new, "--tier", "spirit", "persona"])
            .trim(),
        "careful"
    );
    assert_eq!(
        d.ok(&["mem", "get", &new, "--tier", "knowledge", "fact"])
            .trim(),
        "forks copy memory"
    );
    // A fork onto a taken name is refused, and nothing of it is made.
    let o = d.ctl(&["fork", &name, &new]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("taken"));
    // --memory none: a fork with no memory.
    let third = unique("fork-c");
    d.ok(&["fork", &name, &third, "--memory", "none", "--", "/bin/true"]);
    let o = d.ctl(&["mem", "get", &third, "--tier", "spirit", "persona"]);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // Audited, and announced as events of the agents (aitherd's `emit`, which also publishes
    // them on the bus as aither.agent.<name>.<kind>).
    assert!(audited(&d, "layer_fork", &name, "allow", 0));
    for k in ["layer_snapshot", "layer_forked"] {
        assert!(
            has_event(&d, &name, k),
            "{k} not in {:?}",
            event_kinds(&d, &name)
        );
    }
    assert!(has_event(&d, &new, "forked_from"));
    d.ok(&["discard", &name]);
    assert!(!a.join("later").exists());
    assert!(has_event(&d, &name, "layer_discarded"));
    discard_is_on_the_bus(&d, &name);
}

#[test]
fn members_fork_snapshot_and_discard_their_own_agents_and_no_one_elses() {
    let us = common::users::Users::create();
    let d = us.daemon();
    let (u1, u2) = (&us.users[0], &us.users[1]);
    let dir = us.dir(u2);
    let name = unique("fork-member");
    let new = unique("fork-member-b");
    let ok = |i: usize, args: &[&str]| us.ok(&d, i, args);
    ok(
        1,
        &[
            "spawn",
            "--policy",
            "ci",
            "-w",
            dir.to_str().unwrap(),
            &name,
            "--",
            "/bin/sh",
            "-c",
            "echo one > a",
        ],
    );
    let state = |n: &str| {
        let v: Value = serde_json::from_str(&ok(1, &["inspect", n])).unwrap();
        v["state"].as_str().unwrap_or("").to_string()
    };
    assert!(wait_state(|| state(&name), "exited"), "{}", d.log());
    let layers = d.state.path().join("state/layers");

    // Another member: every layer operation on it is refused as if it did not exist.
    for args in [
        vec!["fork", name.as_str(), "stolen"],
        vec!["discard", name.as_str()],
        vec!["snapshot", name.as_str()],
        vec!["restore", name.as_str(), "s1"],
    ] {
        let o = us.ctl(&d, 0, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("no agent named"),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(!layers.join("stolen").exists());
    assert!(layers.join(&name).join("upper/a").exists());
    for kind in [
        "layer_fork",
        "layer_discard",
        "layer_snapshot",
        "layer_restore",
    ] {
        assert!(
            audited(&d, kind, &name, "deny", u1.uid),
            "{kind}: {:?}",
            audit_of(&d, kind)
        );
    }

    // The owner: snapshot, fork (NEW is theirs), discard and restore their own.
    ok(1, &["snapshot", &name]);
    let listed = ok(1, &["snapshots", &name, "--json"]);
    assert!(listed.contains("\"s1\""), "{listed}");
    ok(
        1,
        &["fork", &name, &new, "--", "/bin/sh", "-c", "cat a > seen"],
    );
    assert!(wait_state(|| state(&new), "exited"), "{}", d.log());
    let v: Value = serde_json::from_str(&ok(1, &["inspect", &new])).unwrap();
    assert_eq!(v["owner"], u2.uid, "{v}");
    let seen = layers.join(&new).join("upper/seen");
    assert_eq!(read(&seen).as_deref(), Some("one\n"));
    let m = std::fs::metadata(&seen).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (u2.uid, u2.gid),
        "stored as the member's"
    );
    assert!(!dir.join("a").exists() && !dir.join("seen").exists());
    // An admin may fork it (as they may spawn on that directory): the fork is the admin's.
    let by_admin = unique("fork-member-adm");
    us.ok(&d, 2, &["fork", &name, &by_admin, "--", "/bin/true"]);
    let v: Value = serde_json::from_str(&us.ok(&d, 2, &["inspect", &by_admin])).unwrap();
    assert_eq!(v["owner"], us.users[2].uid, "{v}");
    assert!(layers.join(&by_admin).join("upper/a").exists());
    ok(1, &["discard", &name]);
    assert!(!layers.join(&name).join("upper/a").exists());
    ok(1, &["restore", &name, "s1"]);
    assert!(layers.join(&name).join("upper/a").exists());
    for kind in [
        "layer_fork",
        "layer_discard",
        "layer_snapshot",
        "layer_restore",
    ] {
        assert!(
            audited(&d, kind, &name, "allow", u2.uid),
            "{kind}: {:?}",
            audit_of(&d, kind)
        );
    }
    // The other member cannot reach the fork either.
    let o = us.ctl(&d, 0, &["discard", &new]);
    assert_eq!(o.status.code(), Some(1));
    assert!(layers.join(&new).join("upper/seen").exists());
}

#[test]
fn a_token_names_its_agent_so_a_fork_of_a_token_spawned_agent_needs_a_token_for_new() {
    let d = common::daemon::TestDaemon::start("aither-fork-tok-", &[]);
    let name = unique("fork-tok");
    let new = unique("fork-tok-b");
    let ws = d.ws.path().to_str().unwrap().to_string();
    let mint = |subject: &str| {
        let tok = d.state.path().join(format!("{subject}.tok"));
        d.ok(&[
            "token",
            "mint",
            "--policy",
            "ci",
            "--subject",
            subject,
            "--out",
            tok.to_str().unwrap(),
        ]);
        tok.to_str().unwrap().to_string()
    };
    let t1 = mint(&name);
    d.ok(&[
        "spawn",
        "--token",
        &t1,
        "--workspace",
        &ws,
        &name,
        "--",
        "/bin/sh",
        "-c",
        "echo one > a",
    ]);
    let state = |n: &str| {
        let v: Value = serde_json::from_str(&d.ok(&["inspect", n])).unwrap();
        v["state"].as_str().unwrap_or("").to_string()
    };
    assert!(wait_state(|| state(&name), "exited"), "{}", d.log());
    // NAME's token is NAME's: the fork is refused without one for NEW, and nothing is made.
    let o = d.ctl(&["fork", &name, &new]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("give it with --token"), "{err}");
    let layers = d.state.path().join("state/layers");
    assert!(!layers.join(&new).exists());
    assert!(!d.ctl(&["inspect", &new]).status.success());
    // A token for another name than NEW: refused by the spawn, and the copies are removed.
    let wrong = mint("someone-else");
    let o = d.ctl(&["fork", &name, &new, "--token", &wrong]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        !layers.join(&new).exists(),
        "a failed fork left NEW's layer"
    );
    // With NEW's own token: forked, its layer a copy of NAME's.
    let t2 = mint(&new);
    d.ok(&["fork", &name, &new, "--token", &t2]);
    assert!(wait_state(|| state(&new), "exited"), "{}", d.log());
    assert_eq!(
        read(&layers.join(&new).join("upper/a")).as_deref(),
        Some("one\n")
    );
    let v: Value = serde_json::from_str(&d.ok(&["inspect", &new])).unwrap();
    assert_ne!(v["token_id"], serde_json::json!(null));
    let v0: Value = serde_json::from_str(&d.ok(&["inspect", &name])).unwrap();
    assert_ne!(v["token_id"], v0["token_id"], "NEW runs on its own token");
}

#[test]
fn a_fork_over_the_members_agent_limit_is_refused_before_anything_is_copied() {
    let us = common::users::Users::create();
    let conf = us.base.path().join("aitherd.toml");
    std::fs::write(&conf, "[users.default]\nagents = 1\n").unwrap();
    let d = us.daemon_with(&["--config", conf.to_str().unwrap()]);
    let dir = us.dir(&us.users[1]);
    let name = unique("fork-limit");
    let new = unique("fork-limit-b");
    us.ok(
        &d,
        1,
        &[
            "spawn",
            "--policy",
            "ci",
            "-w",
            dir.to_str().unwrap(),
            &name,
            "--",
            "/bin/sh",
            "-c",
            "echo one > a",
        ],
    );
    let layers = d.state.path().join("state/layers");
    assert!(common::poll_until(Duration::from_secs(60), || layers
        .join(&name)
        .join("upper/a")
        .exists()));
    let o = us.ctl(&d, 1, &["fork", &name, &new]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("per-user limit"), "{err}");
    assert!(
        !layers.join(&new).exists(),
        "a refused fork copied the layer"
    );
    assert!(
        audited(&d, "layer_fork", &name, "deny", us.users[1].uid),
        "{:?}",
        audit_of(&d, "layer_fork")
    );
}

#[test]
fn a_fork_onto_a_replaced_directory_is_refused() {
    let d = common::daemon::TestDaemon::start("aither-fork-moved-", &[]);
    let base = tempfile::Builder::new()
        .prefix("aither-fork-moved-ws-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let ws = base.path().join("proj");
    std::fs::create_dir(&ws).unwrap();
    let name = unique("fork-moved");
    let new = unique("fork-moved-b");
    d.ok(&[
        "spawn",
        "--policy",
        "ci",
        "--workspace",
        ws.to_str().unwrap(),
        &name,
        "--",
        "/bin/sh",
        "-c",
        "echo one > a",
    ]);
    let layers = d.state.path().join("state/layers");
    assert!(common::poll_until(Duration::from_secs(60), || layers
        .join(&name)
        .join("upper/a")
        .exists()));
    // Another directory at the same path since: the fork would run NEW over it.
    std::fs::rename(&ws, base.path().join("proj.old")).unwrap();
    std::fs::create_dir(&ws).unwrap();
    let o = d.ctl(&["fork", &name, &new]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no longer the directory"), "{err}");
    assert!(!layers.join(&new).exists());
    assert!(!d.ctl(&["inspect", &new]).status.success());
    assert_eq!(std::fs::read_dir(&ws).unwrap().count(), 0);
}
