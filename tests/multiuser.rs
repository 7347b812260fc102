//! Many users on one host (issue 18) and the workspace opened once (issue 17, finding 2):
//! the real CLI, run as unprivileged users made for the test (`useradd`, then `setpriv`),
//! against a real private aitherd. A member of the member group sees and touches only their
//! own agents, in directories they own, whose files land as them; an admin sees and acts on
//! everything; identity fields in a request are ignored; a planted link or a rename race
//! never gives a sandbox another directory.
//!
//! Needs root (to create the users and the daemon). The users and groups are named
//! `aither-t-<pid>-…` and deleted at the end, also when a test fails.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::TestDaemon;
use common::users::Users;
use common::{poll_until, require_root, unique, AITHERCTL};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn names(ps: &str) -> Vec<String> {
    serde_json::from_str::<Value>(ps)
        .expect("ps --json")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["name"].as_str().map(String::from))
        .collect()
}

#[test]
// One scenario against one daemon: each step acts on the agents the steps before it made.
#[allow(clippy::too_many_lines)]
fn another_users_agents_are_invisible_and_untouchable_and_an_admin_sees_all() {
    let us = Users::create();
    let d = us.daemon();
    let (u1, u2) = (&us.users[0], &us.users[1]);
    let name = unique("mu-own");
    let dir1 = us.dir(u1);
    // Spawned by user 1 in their own directory (the default workspace: where they are).
    us.ok(
        &d,
        0,
        &[
            "spawn",
            "--json",
            "--policy",
            "strict",
            &name,
            "--",
            "sh",
            "-c",
            "echo made > made.txt; echo agent-line; exec sleep 60",
        ],
    );
    let made = dir1.join("made.txt");
    assert!(
        poll_until(WAIT, || made.exists()),
        "the agent never wrote {}: {}",
        made.display(),
        d.log()
    );
    // The agent's files land as the caller.
    let m = std::fs::metadata(&made).unwrap();
    assert_eq!((m.uid(), m.gid()), (u1.uid, u1.gid), "owner of made.txt");

    let own = us.ok(&d, 0, &["ps", "--json"]);
    assert!(names(&own).contains(&name), "{own}");
    let v: Value = serde_json::from_str(&us.ok(&d, 0, &["inspect", &name])).unwrap();
    assert_eq!(v["owner"], u1.uid, "{v}");

    // User 2 sees nothing of it and can do nothing to it.
    let theirs = us.ok(&d, 1, &["ps", "--json"]);
    assert!(!names(&theirs).contains(&name), "{theirs}");
    // `stats` sees what `ps` sees: the owner's agent for the owner and the admin, nothing of
    // it for another member.
    let stats_names = |i: usize| -> Vec<String> {
        us.ok(&d, i, &["stats", "--no-stream", "--json"])
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("stats JSON line");
                v["name"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    };
    assert!(stats_names(0).contains(&name));
    assert!(!stats_names(1).contains(&name));
    assert!(stats_names(2).contains(&name));
    let table = us.ok(&d, 1, &["stats", "--no-stream"]);
    assert!(!table.contains(&name), "{table}");
    for args in [
        vec!["inspect", &name],
        vec!["stats", "--no-stream", &name],
        vec!["stats", "--no-stream", "--json", &name],
        vec!["logs", &name],
        vec!["logs", "-f", &name],
        vec!["stop", &name],
        vec!["kill", &name],
        vec!["restart", &name],
        vec!["pause", &name],
        vec!["resume", &name],
        vec!["rm", "--force", &name],
        vec!["mem", "ls", &name, "--tier", "working"],
        vec!["mem", "put", &name, "--tier", "working", "k", "v"],
        vec!["events", "--agent", &name],
    ] {
        let o = us.ctl(&d, 1, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "user 2 {args:?} succeeded: {err}");
        assert!(err.contains("no agent named"), "user 2 {args:?}: {err}");
    }
    let ev = us.ok(&d, 1, &["events", "--json"]);
    assert!(!ev.contains(&name), "user 2's events show it: {ev}");
    // The bus: a member publishes and subscribes on their own agents' subjects only; another
    // user's agent, a wildcard in the agent's place, anything outside agent.<own>.… and a
    // durable consumer are refused; `bus streams` shows a member their own agents'
    // subscriptions only.
    let own_subject = format!("agent.{name}.jobs");
    let theirs_subject = format!("agent.{name}.jobs");
    let o = us.ctl(
        &d,
        0,
        &["bus", "pub", "--durable", &own_subject, r#"{"job":1}"#],
    );
    assert!(
        o.status.success(),
        "the owner could not publish on {own_subject}: {o:?}"
    );
    let o = us.ctl(
        &d,
        0,
        &[
            "bus",
            "sub",
            "--from",
            "1",
            "-n",
            "1",
            "--json",
            &own_subject,
        ],
    );
    let got = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && got.contains(r#""job":1"#),
        "the owner could not replay {own_subject}: {o:?}"
    );
    for args in [
        vec!["bus", "pub", "x.y", "1"],
        vec!["bus", "pub", &theirs_subject, "1"],
        vec!["bus", "pub", "agent.*.jobs", "1"],
        vec!["bus", "sub", "-n", "1", &theirs_subject],
        vec!["bus", "sub", "-n", "1", "agent.>"],
        vec!["bus", "sub", "-n", "1", "aither.>"],
    ] {
        let o = us.ctl(&d, 1, &args);
        assert!(!o.status.success(), "user 2 {args:?} succeeded: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("aither-admin"),
            "user 2 {args:?}: {o:?}"
        );
    }
    let streams = us.ok(&d, 1, &["bus", "streams", "--json"]);
    let v: Value = serde_json::from_str(&streams).unwrap();
    assert_eq!(v["streams"], serde_json::json!([]), "{v}");
    assert!(!streams.contains(&name), "{v}");
    // Nor can they take the name over.
    let o = us.ctl(
        &d,
        1,
        &[
            "spawn",
            "--policy",
            "strict",
            "--replace",
            &name,
            "--",
            "true",
        ],
    );
    assert!(!o.status.success(), "{o:?}");

    // Still running, untouched.
    let v: Value = serde_json::from_str(&us.ok(&d, 0, &["inspect", &name])).unwrap();
    assert_eq!(v["state"], "running", "{v}");

    // Forged identity fields: the caller is what SO_PEERCRED says. The protocol has no such
    // field, so a request naming an agent with one is refused outright; `ps` (a bare
    // operation) ignores it and still shows only the caller's own agents.
    let r = us.raw(
        &d,
        1,
        &serde_json::json!({"op": "ps", "uid": 0, "owner": u1.uid}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        !r["data"].to_string().contains(&name),
        "forged uid showed {name}: {r}"
    );
    for frame in [
        serde_json::json!({"op": "inspect", "name": name, "caller_uid": u1.uid}),
        serde_json::json!({"op": "stop", "name": name, "uid": u1.uid}),
        serde_json::json!({"op": "rm", "name": name, "force": true, "owner": u2.uid}),
    ] {
        let r = us.raw(&d, 1, &frame);
        assert_eq!(r["ok"], false, "{frame}: {r}");
        assert_eq!(r["error"]["code"], "bad_request", "{frame}: {r}");
    }
    let r = us.raw(&d, 1, &serde_json::json!({"op": "inspect", "name": name}));
    assert_eq!(r["error"]["code"], "not_found", "{r}");

    // The admin sees it, with its owner, and can read its logs.
    let all = us.ok(&d, 2, &["ps", "--json"]);
    let row = serde_json::from_str::<Value>(&all).unwrap();
    let row = row
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name.as_str())
        .unwrap_or_else(|| panic!("admin ps lacks {name}: {all}"))
        .clone();
    assert_eq!(row["owner"], u1.uid);
    assert!(
        poll_until(WAIT, || us
            .ok(&d, 2, &["logs", &name])
            .contains("agent-line")),
        "admin logs"
    );
    // Root's table names the owner.
    let table = d.ok(&["ps"]);
    assert!(table.lines().next().unwrap().contains("OWNER"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&name) && l.contains(&u1.name)),
        "{table}"
    );

    // Every cross-user attempt is a denial carrying both uids.
    // (aitherd's audit writer batches: wait for the records rather than read once.)
    let denied = || {
        d.audit_records()
            .into_iter()
            .filter(|r| {
                r["decision"] == "deny" && r["caller_uid"] == u2.uid && r["owner_uid"] == u1.uid
            })
            .count()
    };
    assert!(
        poll_until(WAIT, || denied() >= 10),
        "cross-user denials in the audit: {}",
        denied()
    );

    // Every record about the agent names its owner.
    let unowned: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["agent"] == name.as_str() && r["owner_uid"] != u1.uid)
        .collect();
    assert!(
        unowned.is_empty(),
        "records of {name} without its owner: {unowned:?}"
    );

    // `aitherctl audit` as a member (the log is root's 0640): through aitherd, only the
    // records they asked for or about their own agents.
    let seen = |i: usize| -> Vec<Value> {
        us.ok(&d, i, &["audit", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit JSON"))
            .collect()
    };
    let mine = seen(0);
    assert!(
        mine.iter().any(|r| r["kind"] == "spawn"
            && r["decision"] == "allow"
            && r["agent"] == name.as_str()),
        "{mine:?}"
    );
    let theirs = seen(1);
    assert!(!theirs.is_empty());
    for r in &theirs {
        assert!(
            r["caller_uid"] == u2.uid || r["owner_uid"] == u2.uid,
            "user 2 sees a record not theirs: {r}"
        );
        // Their own cross-user attempts, without whose agent it was.
        assert!(
            r["owner_uid"].is_null() || r["owner_uid"] == u2.uid,
            "user 2 learns another owner's uid: {r}"
        );
    }
    assert!(
        theirs
            .iter()
            .any(|r| r["caller_uid"] == u2.uid && r["data"]["cross_user"] == true),
        "user 2's own denied attempts are theirs to see: {theirs:?}"
    );

    // The admin may act on it.
    us.ok(&d, 2, &["rm", "--force", &name]);
    let allowed = || {
        d.audit_records().into_iter().any(|r| {
            r["kind"] == "rm"
                && r["decision"] == "allow"
                && r["caller_uid"] == us.users[2].uid
                && r["owner_uid"] == u1.uid
        })
    };
    assert!(
        poll_until(WAIT, allowed),
        "the admin's rm is recorded with both uids"
    );
    // Removed, its memory is kept under the name: still user 1's, not user 2's to take.
    us.ok(&d, 0, &["mem", "ls", &name, "--tier", "working"]);
    let o = us.ctl(&d, 1, &["mem", "ls", &name, "--tier", "working"]);
    assert!(!o.status.success(), "{o:?}");
    let o = us.ctl(&d, 1, &["spawn", "--policy", "strict", &name, "--", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("taken"), "{err}");
}

#[test]
fn members_work_only_in_directories_they_own() {
    let us = Users::create();
    let d = us.daemon();
    let u2 = &us.users[1];
    // A directory anyone may write, owned by root; another user's directory; system ones.
    let shared = us.base.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let other = us.dir(&us.users[0]);
    for ws in [
        other.to_str().unwrap(),
        shared.to_str().unwrap(),
        "/etc/cron.d",
        "/root",
        "/home",
        "/tmp",
    ] {
        let name = unique("mu-ws");
        let o = us.ctl(
            &d,
            1,
            &[
                "spawn",
                "--policy",
                "strict",
                "-w",
                ws,
                &name,
                "--",
                "sh",
                "-c",
                "echo x > planted",
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "user 2 got workspace {ws}");
        assert!(err.contains("workspace"), "{ws}: {err}");
        assert!(!Path::new(ws).join("planted").exists(), "{ws}");
    }
    // Out of the member group, the same user is not served at all (the socket's mode keeps
    // them out; SO_PEERCRED/SO_PEERGROUPS would too), whatever they send.
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        &u2.uid.to_string(),
        "--regid",
        &u2.gid.to_string(),
        "--clear-groups",
        "--",
        AITHERCTL,
        "ps",
    ]);
    d.env(&mut c);
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert!(!o.status.success(), "{o:?}");

    // A policy file of their own is not theirs to load; nor a token minted for someone else.
    let pol = us.dir(u2).join("mine.toml");
    std::fs::copy(common::policy_dir().join("permissive.toml"), &pol).unwrap();
    let o = us.ctl(
        &d,
        1,
        &[
            "spawn",
            "--policy",
            pol.to_str().unwrap(),
            &unique("mu-pol"),
            "--",
            "true",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("installed policy"),
        "{o:?}"
    );
    let name = unique("mu-tok");
    let tok = us.dir(u2).join("t");
    d.ok(&[
        "token",
        "mint",
        "--policy",
        "strict",
        "--subject",
        &name,
        "--out",
        tok.to_str().unwrap(),
    ]);
    std::os::unix::fs::chown(&tok, Some(u2.uid), None).unwrap();
    let o = us.ctl(
        &d,
        1,
        &[
            "spawn",
            "--token",
            tok.to_str().unwrap(),
            &name,
            "--",
            "true",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not minted for uid"),
        "{o:?}"
    );
    d.ok(&[
        "token",
        "mint",
        "--policy",
        "strict",
        "--subject",
        &name,
        "--for-user",
        &u2.name,
        "--out",
        tok.to_str().unwrap(),
    ]);
    std::os::unix::fs::chown(&tok, Some(u2.uid), None).unwrap();
    us.ok(
        &d,
        1,
        &[
            "spawn",
            "--token",
            tok.to_str().unwrap(),
            &name,
            "--",
            "sh",
            "-c",
            "echo ok > tok.txt",
        ],
    );
    let f = us.dir(u2).join("tok.txt");
    assert!(poll_until(WAIT, || f.exists()), "{}", d.log());
    assert_eq!(std::fs::metadata(&f).unwrap().uid(), u2.uid);
}

/// `renameat2(RENAME_EXCHANGE)`: swaps two names atomically.
fn exchange(a: &Path, b: &Path) {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    let _ = renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE);
}

#[test]
fn a_planted_link_or_a_rename_race_never_redirects_the_workspace() {
    require_root();
    let base = tempfile::tempdir_in("/var/tmp").unwrap();
    let real = base.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("mine.txt"), "x").unwrap();
    let out = base.path().join("out");
    std::os::unix::fs::symlink("/root", &out).unwrap();
    let run = |ws: &Path| {
        Command::new(AITHERCTL)
            .env("AITHER_POLICY_DIR", common::policy_dir())
            .env("AITHER_AUDIT_LOG", common::test_audit_log())
            .args(["run", "--policy", "strict", "--workspace"])
            .arg(ws)
            .args(["--", "ls", "-a"])
            .stdin(Stdio::null())
            .output()
            .expect("aitherctl run")
    };
    // `out -> /root`, planted by an earlier agent: refused, naming the rule.
    let o = run(&out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("not its canonical path"), "{err}");
    // Through aitherd too (root's spawn).
    let d = TestDaemon::start("aitherd-mu-link-", &[]);
    let o = d.ctl(&[
        "spawn",
        "--policy",
        "strict",
        "-w",
        out.to_str().unwrap(),
        &unique("mu-link"),
        "--",
        "true",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not its canonical path"),
        "{err}"
    );
    drop(d);

    // A concurrent exchange of `dir` with `flip -> /etc`: each run either is refused or
    // sees the real directory; never /etc.
    let dir = base.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("mine.txt"), "x").unwrap();
    let flip = base.path().join("flip");
    std::os::unix::fs::symlink("/etc", &flip).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, dir, flip) = (stop.clone(), dir.clone(), flip.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                exchange(&dir, &flip);
                n += 1;
            }
            n
        })
    };
    let (mut refused, mut ran) = (0, 0);
    for _ in 0..30 {
        let o = run(&dir);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            !stdout.contains("passwd") && !stdout.contains("hostname"),
            "a sandbox got /etc as its workspace: {stdout}"
        );
        if o.status.success() {
            assert!(stdout.contains("mine.txt"), "{stdout}");
            ran += 1;
        } else {
            assert_eq!(
                o.status.code(),
                Some(125),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
            refused += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    eprintln!(
        "rename race: {swaps} exchanges, {ran} runs on the real directory, {refused} refused"
    );
    assert!(swaps > 30, "the race did not run");
}

#[test]
fn aitherd_reaches_a_members_workspace_only_through_their_own_descriptor() {
    let us = Users::create();
    let d = us.daemon();
    let u2 = &us.users[1];
    let own = us.dir(u2);
    let sub = own.join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::os::unix::fs::chown(&sub, Some(u2.uid), Some(u2.gid)).unwrap();
    let frame = |ws: &Path| {
        serde_json::json!({"op": "spawn", "name": unique("mu-fd"), "policy": "strict",
                           "argv": ["true"], "cwd": own, "workspace": ws})
    };
    // No descriptor: a member's spawn is refused (aitherd does not open it on their behalf).
    let r = us.raw(&d, 1, &frame(&own));
    assert_eq!(r["error"]["code"], "denied", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("opened themselves"),
        "{r}"
    );
    // A descriptor of another directory than the path named, or an O_PATH one (which needs
    // no permission on the directory itself): refused.
    let r = us.raw_fd(&d, 1, &frame(&sub), own.to_str().unwrap());
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not the one at this path"),
        "{r}"
    );
    let r = us.raw_fd(&d, 1, &frame(&own), &format!("path:{}", own.display()));
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not the one at this path"),
        "{r}"
    );
    // Their own directory, passed as they opened it: accepted.
    let r = us.raw_fd(&d, 1, &frame(&own), own.to_str().unwrap());
    assert_eq!(r["ok"], true, "{r}");

    // The directory is pinned: replaced at the same path after the spawn, a restart refuses
    // it rather than mount the new one.
    let name = unique("mu-pin");
    us.ok(
        &d,
        1,
        &[
            "spawn",
            "--policy",
            "strict",
            "-w",
            sub.to_str().unwrap(),
            &name,
            "--",
            "sh",
            "-c",
            "echo run >> runs.txt; exec sleep 60",
        ],
    );
    let runs = sub.join("runs.txt");
    assert!(poll_until(WAIT, || runs.exists()), "{}", d.log());
    std::fs::rename(&sub, own.join("moved")).unwrap();
    std::fs::create_dir(&sub).unwrap();
    std::os::unix::fs::chown(&sub, Some(u2.uid), Some(u2.gid)).unwrap();
    // The restart is answered once asked; its launch fails, and says why.
    let _ = us.ctl(&d, 1, &["restart", &name]);
    let why = || {
        let v: Value = serde_json::from_str(&us.ok(&d, 1, &["inspect", &name])).unwrap();
        v["last_exit"].as_str().unwrap_or("").to_string()
    };
    assert!(
        poll_until(WAIT, || why().contains("no longer the one checked")),
        "{}",
        us.ok(&d, 1, &["inspect", &name])
    );
    assert!(!runs.exists(), "the agent ran in the replacement directory");
    assert_eq!(
        std::fs::read_to_string(own.join("moved/runs.txt")).unwrap(),
        "run\n"
    );
}

#[test]
fn per_user_limits_from_the_configuration_bind_members_not_admins() {
    let us = Users::create();
    let conf = us.base.path().join("aitherd.toml");
    std::fs::write(
        &conf,
        format!(
            "[egress]\n# another part's table: left alone\n\n[users.default]\nagents = 2\nmemory = \"600M\"\n\n[users.user.{}]\nagents = 3\n",
            us.users[1].name
        ),
    )
    .unwrap();
    let d = us.daemon_with(&["--config", conf.to_str().unwrap()]);
    let spawn = |i: usize, extra: &[&str]| {
        let name = unique("mu-lim");
        let mut args = vec!["spawn", "--policy", "strict"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&name, "--", "sleep", "60"]);
        us.ctl(&d, i, &args)
    };
    // User 1 (the default: 2 agents, 600M in all): strict's 512M, then 128M more is over
    // the memory cap, 64M is not, and a third agent is over the count.
    let ok = |o: Output| assert!(o.status.success(), "{o:?}\n{}", d.log());
    let refused = |o: Output, why: &str| {
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && err.contains(why), "{why}: {err}");
    };
    ok(spawn(0, &[]));
    refused(spawn(0, &["--memory", "128M"]), "memory would be");
    ok(spawn(0, &["--memory", "64M"]));
    refused(spawn(0, &["--memory", "8M"]), "you hold 2 agents");
    // User 2 has an entry of their own (3 agents, no memory cap).
    for _ in 0..3 {
        ok(spawn(1, &[]));
    }
    refused(spawn(1, &[]), "you hold 3 agents");
    // The admin is not limited.
    for _ in 0..3 {
        ok(spawn(2, &[]));
    }
    // Concurrent spawns cannot both take the last place: user 1 empties their agents, then
    // asks for six at once under a cap of two.
    for n in names(&us.ok(&d, 0, &["ps", "--json"])) {
        us.ok(&d, 0, &["rm", "--force", &n]);
    }
    let won = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| spawn(0, &["--memory", "8M"]).status.success()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count()
    });
    assert_eq!(won, 2, "concurrent spawns under a cap of 2");
}

/// Installed policies (`standard` plus one credential route) in a directory of the test's.
fn route_policies(dir: &Path) -> String {
    let base = std::fs::read_to_string(common::policy_dir().join("standard.toml")).unwrap();
    for (name, secret) in [("mu-own-route", "apikey"), ("mu-root-route", "root:shared")] {
        let src = base.replace("name = \"standard\"", &format!("name = \"{name}\""));
        std::fs::write(
            dir.join(format!("{name}.toml")),
            format!(
                "{src}\n[[net.routes]]\nname = \"api\"\nupstream = \"https://api.example.test/v1\"\nsecret = \"{secret}\"\n"
            ),
        )
        .unwrap();
    }
    format!("{}:{}", dir.display(), common::policy_dir().display())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
// One scenario against one daemon: each step acts on what the steps before it stored.
#[allow(clippy::too_many_lines)]
fn members_own_their_secrets_and_durable_consumers_and_an_admin_sees_all() {
    let us = Users::create();
    let pdir = tempfile::tempdir().unwrap();
    let dirs = route_policies(pdir.path());
    let d = us.daemon_env(&[], &[("AITHER_POLICY_DIR", &dirs)]);
    let (u1, u2, admin) = (&us.users[0], &us.users[1], &us.users[2]);
    const VALUE: &str = "a-secret-value-4711";
    const ROTATED: &str = "a-rotated-value-4712";

    // User 1 sets and rotates their own secret through aitherd (the store's files are root's
    // 0700: the client could not read or write them).
    let o = us.ctl_input(&d, 0, &["secret", "set", "apikey"], &format!("{VALUE}\n"));
    assert!(o.status.success(), "{o:?}");
    let o = us.ctl_input(&d, 0, &["secret", "set", "apikey"], ROTATED);
    assert!(o.status.success(), "{o:?}");
    let store = d.state.path().join("state/secrets");
    let file = store.join(format!(".users/{}/apikey", u1.uid));
    let m = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (m.uid(), m.mode() & 0o777),
        (0, 0o600),
        "{}",
        file.display()
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), ROTATED);
    assert_eq!(std::fs::metadata(&store).unwrap().mode() & 0o777, 0o700);
    let mine: Value = serde_json::from_str(&us.ok(&d, 0, &["secret", "ls", "--json"])).unwrap();
    assert_eq!(mine.as_array().map(Vec::len), Some(1), "{mine}");
    assert_eq!(mine[0]["owner"], u1.uid, "{mine}");
    assert_eq!(mine[0]["name"], "apikey", "{mine}");

    // User 2 sees none of it and can touch none of it.
    let theirs: Value = serde_json::from_str(&us.ok(&d, 1, &["secret", "ls", "--json"])).unwrap();
    assert_eq!(theirs, serde_json::json!([]), "{theirs}");
    let uid1 = u1.uid.to_string();
    for args in [
        vec!["secret", "rm", "apikey"],
        vec!["secret", "rm", "apikey", "--owner", &uid1],
    ] {
        let o = us.ctl(&d, 1, &args);
        assert!(!o.status.success(), "user 2 {args:?}: {o:?}");
        assert!(
            stderr(&o).contains("no secret named"),
            "user 2 {args:?}: {o:?}"
        );
    }
    let o = us.ctl_input(&d, 1, &["secret", "set", "apikey", "--owner", &uid1], "x");
    assert!(
        !o.status.success() && stderr(&o).contains("no secret named"),
        "user 2 set user 1's: {o:?}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), ROTATED);

    // A route names its agent owner's secret: user 1's agent launches with it, user 2's
    // (same installed policy, no secret of that name of their own) is refused.
    let a1 = unique("mu-sec-a");
    us.ok(
        &d,
        0,
        &[
            "spawn",
            "--policy",
            "mu-own-route",
            &a1,
            "--",
            "sleep",
            "60",
        ],
    );
    let a2 = unique("mu-sec-b");
    let o = us.ctl(
        &d,
        1,
        &[
            "spawn",
            "--policy",
            "mu-own-route",
            &a2,
            "--",
            "sleep",
            "60",
        ],
    );
    assert!(
        !o.status.success(),
        "user 2's agent used user 1's secret: {o:?}"
    );
    assert!(stderr(&o).contains("no secret named \"apikey\""), "{o:?}");
    // root:NAME is root's secret, shared through a policy root installed.
    let o = us.ctl(
        &d,
        1,
        &[
            "spawn",
            "--policy",
            "mu-root-route",
            &a2,
            "--",
            "sleep",
            "60",
        ],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("of root's"),
        "root's secret is not set yet: {o:?}"
    );
    let mut set = Command::new(AITHERCTL);
    d.env(&mut set);
    let mut child = set
        .args(["secret", "set", "shared"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"root-shared-value").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "root's secret set without aitherd's help: {o:?}"
    );
    us.ok(
        &d,
        1,
        &[
            "spawn",
            "--policy",
            "mu-root-route",
            &a2,
            "--",
            "sleep",
            "60",
        ],
    );

    // The admin sees everyone's with owners; root's table has an OWNER column.
    let all: Value = serde_json::from_str(&us.ok(&d, 2, &["secret", "ls", "--json"])).unwrap();
    let pairs: Vec<(u64, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["owner"].as_u64().unwrap(),
                s["name"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(pairs.contains(&(0, "shared".into())), "{all}");
    assert!(
        pairs.contains(&(u64::from(u1.uid), "apikey".into())),
        "{all}"
    );
    let table = d.ok(&["secret", "ls"]);
    assert!(table.lines().next().unwrap().contains("OWNER"), "{table}");
    assert!(table.contains(&uid1), "{table}");

    // Values are never shown back: not in listings, the owner's inspect, or the audit log.
    let inspect = us.ok(&d, 0, &["inspect", &a1]);
    for text in [&inspect, &all.to_string(), &table, &mine.to_string()] {
        assert!(!text.contains(VALUE) && !text.contains(ROTATED), "{text}");
    }

    // Durable consumers: user 1's, on their own agent's subject, survives a reconnect.
    let subject = format!("agent.{a1}.jobs");
    let publish = |n: u32| -> u64 {
        let out = us.ok(
            &d,
            0,
            &[
                "bus",
                "pub",
                "--durable",
                &subject,
                &format!("{{\"n\":{n}}}"),
            ],
        );
        out.split(|c: char| !c.is_ascii_digit())
            .filter_map(|t| t.parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no sequence number in {out:?}"))
    };
    let s1 = publish(1);
    us.ok(&d, 0, &["bus", "ack", "c1", &s1.to_string()]);
    publish(2);
    publish(3);
    let got = us.ok(
        &d,
        0,
        &[
            "bus",
            "sub",
            "--durable",
            "c1",
            "--ack",
            "-n",
            "1",
            "--json",
            &subject,
        ],
    );
    assert!(got.contains(r#""n":2"#), "first read after the ack: {got}");
    let got = us.ok(
        &d,
        0,
        &[
            "bus",
            "sub",
            "--durable",
            "c1",
            "-n",
            "1",
            "--json",
            &subject,
        ],
    );
    assert!(got.contains(r#""n":3"#), "after reconnecting: {got}");
    let consumers = |i: usize| -> Value {
        let v: Value = serde_json::from_str(&us.ok(&d, i, &["bus", "streams", "--json"])).unwrap();
        v["consumers"].clone()
    };
    let own = consumers(0);
    assert!(
        own.as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "c1" && c["owner"] == u1.uid),
        "{own}"
    );
    // Invisible and untouchable for user 2.
    assert!(!consumers(1).to_string().contains("c1"), "{}", consumers(1));
    for args in [
        vec!["bus", "consumer-rm", "c1"],
        vec!["bus", "consumer-rm", "c1", "--owner", &uid1],
        vec!["bus", "ack", "c1", "1", "--owner", &uid1],
    ] {
        let o = us.ctl(&d, 1, &args);
        assert!(
            !o.status.success() && stderr(&o).contains("no durable consumer named"),
            "user 2 {args:?}: {o:?}"
        );
    }
    let o = us.ctl(
        &d,
        1,
        &["bus", "sub", "--durable", "c1", "-n", "1", &subject],
    );
    assert!(!o.status.success(), "user 2 read user 1's subject: {o:?}");
    // The admin sees it with its owner and may delete it.
    let seen = consumers(2);
    assert!(
        seen.as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "c1" && c["owner"] == u1.uid),
        "{seen}"
    );
    us.ok(&d, 2, &["bus", "consumer-rm", "c1", "--owner", &uid1]);
    assert!(
        !consumers(0).to_string().contains("\"c1\""),
        "{}",
        consumers(0)
    );

    // Every cross-user attempt is a denial with both uids; no record holds a value.
    let denied = |kind: &str| {
        d.audit_records().into_iter().any(|r| {
            r["kind"] == kind
                && r["decision"] == "deny"
                && r["caller_uid"] == u2.uid
                && r["owner_uid"] == u1.uid
        })
    };
    for kind in ["secret_rm", "secret_set", "bus"] {
        assert!(
            poll_until(WAIT, || denied(kind)),
            "no audited {kind} denial"
        );
    }
    // The records user 2 may read say what they tried, never that user 1 holds the name.
    assert!(
        poll_until(WAIT, || d.audit_records().into_iter().any(|r| r["kind"]
            == "secret_use"
            && r["decision"] == "deny"
            && r["caller_uid"] == u2.uid
            && r["owner_uid"] == u2.uid
            && r["data"]["secret"] == "apikey")),
        "user 2's agent naming apikey is not an audited denial"
    );
    for l in us.ok(&d, 1, &["audit", "--json"]).lines() {
        let r: Value = serde_json::from_str(l).expect("audit JSON");
        // (Their `--owner UID` attempts name user 1 themselves.)
        // A record about user 1's secret reaches user 2 without its owner (owner_uid absent).
        assert_ne!(r["owner_uid"], u1.uid, "user 2 learns user 1's uid: {r}");
        if r["data"]["secret"] == "apikey"
            && (r["kind"] == "secret_use"
                || (r["kind"] == "secret_rm" && !r["owner_uid"].is_null()))
        {
            assert_eq!(
                r["owner_uid"], u2.uid,
                "user 2 learns whose apikey it is: {r}"
            );
            assert!(r["data"].get("cross_user").is_none(), "{r}");
        }
    }
    assert!(
        poll_until(WAIT, || d
            .audit_records()
            .into_iter()
            .any(|r| r["kind"] == "secret_set"
                && r["decision"] == "allow"
                && r["caller_uid"] == u1.uid)),
        "user 1's set is not recorded"
    );
    let log = std::fs::read_to_string(d.audit_log()).unwrap_or_default();
    assert!(
        !log.contains(VALUE) && !log.contains(ROTATED) && !log.contains("root-shared-value"),
        "a secret's value is in the audit log"
    );
    let _ = admin;
}

#[test]
fn exec_reaches_only_the_callers_own_agents_or_an_admins() {
    let us = Users::create();
    let d = us.daemon();
    let (u1, u2) = (&us.users[0], &us.users[1]);
    let name = unique("mu-exec");
    us.ok(
        &d,
        0,
        &[
            "spawn",
            "--json",
            "--policy",
            "strict",
            &name,
            "--",
            "sh",
            "-c",
            "echo up > up.txt; exec sleep 60",
        ],
    );
    let dir1 = us.dir(u1);
    assert!(
        poll_until(WAIT, || dir1.join("up.txt").exists()),
        "the agent never started: {}",
        d.log()
    );
    // The owner: the command writes in the workspace as the agent does, as the caller.
    let o = us.ctl(
        &d,
        0,
        &[
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "echo mine > by-exec.txt; cat up.txt",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "up\n");
    let m = std::fs::metadata(dir1.join("by-exec.txt")).unwrap();
    assert_eq!((m.uid(), m.gid()), (u1.uid, u1.gid), "owner of by-exec.txt");

    // Another member: as if the agent did not exist, and audited as a cross-user attempt.
    let o = us.ctl(&d, 1, &["exec", &name, "--", "touch", "theirs.txt"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(err.contains("no agent named"), "{err}");
    assert!(!dir1.join("theirs.txt").exists());
    let denied = || {
        d.audit_records().into_iter().any(|r| {
            r["kind"] == "exec"
                && r["decision"] == "deny"
                && r["caller_uid"] == u2.uid
                && r["owner_uid"] == u1.uid
                && r["data"]["cross_user"] == true
        })
    };
    assert!(poll_until(WAIT, denied), "user 2's exec is not audited");

    // The admin may.
    let o = us.ctl(&d, 2, &["exec", &name, "--", "cat", "by-exec.txt"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "mine\n");
    let allowed = || {
        d.audit_records().into_iter().any(|r| {
            r["kind"] == "exec"
                && r["decision"] == "allow"
                && r["caller_uid"] == us.users[2].uid
                && r["owner_uid"] == u1.uid
                && r["data"]["argv"][0] == "cat"
        })
    };
    assert!(poll_until(WAIT, allowed), "the admin's exec is not audited");
}

/// Installed policies for the published-service test: `mu-svc-client` is `standard` granted
/// the service `svc` (no target: whatever an agent publishes under that name).
fn service_policies(dir: &Path) -> String {
    let base = std::fs::read_to_string(common::policy_dir().join("standard.toml")).unwrap();
    let src = base.replace("name = \"standard\"", "name = \"mu-svc-client\"");
    std::fs::write(
        dir.join("mu-svc-client.toml"),
        format!("{src}\n[[net.services]]\nname = \"svc\"\n"),
    )
    .unwrap();
    format!("{}:{}", dir.display(), common::policy_dir().display())
}

/// A server agent answering every GET with `body`, published as `svc` on port 8123.
fn spawn_svc_server(us: &Users, d: &TestDaemon, i: usize, name: &str, body: &str) -> Output {
    let script = format!(
        "import http.server\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200); self.end_headers(); self.wfile.write(b'{body}')\n\
         \x20   def log_message(self, *a): pass\n\
         print('SERVING', flush=True)\n\
         http.server.HTTPServer(('127.0.0.1', 8123), H).serve_forever()\n"
    );
    us.ctl(
        d,
        i,
        &[
            "spawn",
            "--policy",
            "standard",
            "--publish",
            "svc=8123",
            name,
            "--",
            "python3",
            "-u",
            "-c",
            &script,
        ],
    )
}

/// What an agent of user `i` granted `svc` gets from http://svc.aither.internal/.
fn call_svc(us: &Users, d: &TestDaemon, i: usize, name: &str) -> String {
    let script = "import urllib.request\n\
                  try:\n\
                  \x20   print('GOT', urllib.request.urlopen('http://svc.aither.internal:8123/', timeout=10).read().decode())\n\
                  except Exception as e:\n\
                  \x20   print('ERR', e, getattr(e, 'read', lambda: b'')().decode(errors='replace'))\n";
    us.ok(
        d,
        i,
        &[
            "spawn",
            "--policy",
            "mu-svc-client",
            name,
            "--",
            "python3",
            "-u",
            "-c",
            script,
        ],
    );
    let mut out = String::new();
    let done = poll_until(WAIT, || {
        out = us.ok(d, i, &["logs", name]);
        out.contains("GOT") || out.contains("ERR")
    });
    assert!(done, "{name} never called the service: {out}\n{}", d.log());
    out
}

#[test]
// One scenario against one daemon: each step depends on what is published before it.
#[allow(clippy::too_many_lines)]
fn a_published_service_name_is_its_owners_and_another_member_cannot_take_it() {
    let us = Users::create();
    let pdir = tempfile::tempdir().unwrap();
    let dirs = service_policies(pdir.path());
    let d = us.daemon_env(&[], &[("AITHER_POLICY_DIR", &dirs)]);
    let wait_serving = |i: usize, name: &str| {
        assert!(
            poll_until(WAIT, || us.ok(&d, i, &["logs", name]).contains("SERVING")),
            "{name} never served: {}",
            d.log()
        );
    };

    // A hostile member publishes `svc` first: user 1's agents granted `svc` never reach it
    // (nothing of user 1's or root's publishes it).
    let evil = unique("mu-svc-evil");
    let o = spawn_svc_server(&us, &d, 1, &evil, "from-user-2");
    assert!(o.status.success(), "{o:?}");
    wait_serving(1, &evil);
    let out = call_svc(&us, &d, 0, &unique("mu-svc-c1"));
    assert!(
        !out.contains("from-user-2"),
        "user 2's server answered user 1: {out}"
    );
    assert!(out.contains("nothing publishes it now"), "{out}");
    // User 2's own agent, granted `svc` by the same installed policy, reaches user 2's
    // server: the publication itself works.
    let out = call_svc(&us, &d, 1, &unique("mu-svc-c2"));
    assert!(out.contains("GOT from-user-2"), "{out}");

    // User 1 publishes `svc` themselves: their agents reach theirs, user 2's still reach
    // user 2's, and neither took the other's.
    let own = unique("mu-svc-own");
    let o = spawn_svc_server(&us, &d, 0, &own, "from-user-1");
    assert!(o.status.success(), "{o:?}");
    wait_serving(0, &own);
    let out = call_svc(&us, &d, 0, &unique("mu-svc-c3"));
    assert!(out.contains("GOT from-user-1"), "{out}");
    let out = call_svc(&us, &d, 1, &unique("mu-svc-c4"));
    assert!(out.contains("GOT from-user-2"), "{out}");

    // A second agent of user 1 publishing the same name is refused at spawn, not swapped in.
    let o = spawn_svc_server(&us, &d, 0, &unique("mu-svc-dup"), "dup");
    assert!(
        !o.status.success(),
        "a second publisher of svc was accepted"
    );
    assert!(
        stderr(&o).contains(&format!("agent \"{own}\" already publishes \"svc\"")),
        "{o:?}"
    );
    // And when user 2's server goes, user 1's publication stays.
    us.ok(&d, 1, &["rm", "--force", &evil]);
    let out = call_svc(&us, &d, 0, &unique("mu-svc-c5"));
    assert!(out.contains("GOT from-user-1"), "{out}");
}
