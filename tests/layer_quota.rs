//! A layered workspace's disk quota (policy `resources.workspace_disk`, docs/workspaces.md
//! "Disk quota"): the agent's writes past it fail with ENOSPC inside, what it wrote before
//! stays, the state directory's filesystem holds at most the quota for the layer, nothing is
//! left mounted or attached on the host, and `diff`, `apply`, `snapshot`, `restore`, `fork`
//! and `inspect` work on the quota'd layer. Real `aitherctl run` sandboxes and a real daemon.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{require_root, unique, Workspace, AITHERCTL};
use serde_json::Value;

const QUOTA: u64 = 16 << 20;

/// A policy file: `ci` with a 16M layer quota.
fn quota_policy(dir: &Path) -> String {
    let file = dir.join("ci-q16.toml");
    std::fs::write(
        &file,
        "name = \"ci-q16\"\nextends = \"ci\"\n\n[resources]\nworkspace_disk = \"16M\"\n",
    )
    .unwrap();
    file.to_str().unwrap().to_string()
}

struct Quota {
    ws: Workspace,
    state: tempfile::TempDir,
    policy: String,
    name: String,
}

impl Quota {
    fn new(tag: &str) -> Quota {
        require_root();
        let state = tempfile::Builder::new()
            .prefix("aither-quota-state-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let policy = quota_policy(state.path());
        Quota {
            ws: Workspace::new(),
            state,
            policy,
            name: unique(tag),
        }
    }

    fn layer(&self, name: &str) -> PathBuf {
        self.state.path().join("layers").join(name)
    }

    fn run(&self, policy: &str, name: &str, script: &str) -> (bool, String, String) {
        let mut c = self
            .ws
            .command(policy, &[], &["/bin/sh", "-c", script], name);
        c.env("AITHER_STATE_DIR", self.state.path());
        let out = c.output().expect("run aitherctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(AITHERCTL)
            .env("AITHER_STATE_DIR", self.state.path())
            .env("AITHER_AUDIT_LOG", common::test_audit_log())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run aitherctl");
        assert!(
            out.status.success(),
            "aitherctl {args:?} failed\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn diff_paths(&self, name: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ok(&["diff", name, "--json"])).unwrap();
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["path"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Bytes a directory's files take on disk (allocated blocks), no link followed.
fn disk_bytes(p: &Path) -> u64 {
    let m = std::fs::symlink_metadata(p).unwrap();
    let mut n = m.blocks() * 512;
    if m.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            n += disk_bytes(&e.unwrap().path());
        }
    }
    n
}

/// Loop devices whose backing file is below `dir`.
fn loops_below(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let f = e.path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(&f) {
            if b.trim().starts_with(dir.to_str().unwrap()) {
                v.push(format!("{}: {}", e.file_name().to_string_lossy(), b.trim()));
            }
        }
    }
    v
}

#[test]
fn writes_past_the_quota_fail_inside_and_the_host_holds_at_most_the_quota() {
    let q = Quota::new("quota");
    std::fs::write(q.ws.path().join("base"), "base\n").unwrap();
    let (ok, out, err) = q.run(
        &q.policy,
        &q.name,
        "echo early > early.txt; dd if=/dev/zero of=big bs=1M count=64 2>&1; echo dd=$?; \
         cat early.txt; echo loops=$(ls /dev | grep -c loop); \
         echo images=$(grep -c -e layer.img -e /dev/loop /proc/self/mountinfo)",
    );
    assert!(ok, "the agent failed\n{out}\n{err}");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(out.contains("dd=1"), "{out}");
    assert!(out.contains("early\n"), "{out}");
    // Inside, no loop device and no trace of the image: only the overlay.
    assert!(out.contains("loops=0") && out.contains("images=0"), "{out}");

    // The layer on the host: a 16M image, nothing else of the agent's.
    let layer = q.layer(&q.name);
    let img = std::fs::metadata(layer.join("layer.img")).unwrap();
    assert_eq!(img.len(), QUOTA);
    assert!(
        !layer.join("upper").exists(),
        "an upper layer outside the image"
    );
    let used = disk_bytes(&layer);
    assert!(
        used <= QUOTA + (64 << 10),
        "the layer takes {used} bytes on the host, over the {QUOTA} quota"
    );
    // Nothing left attached or mounted once the sandbox is gone.
    assert_eq!(loops_below(q.state.path()), Vec::<String>::new());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(q.state.path().to_str().unwrap()),
        "{mountinfo}"
    );

    // The earlier files are intact, and diff / apply read the image.
    let mut paths = q.diff_paths(&q.name);
    paths.sort();
    assert_eq!(paths, ["big", "early.txt"]);
    q.ok(&["apply", &q.name, "early.txt"]);
    assert_eq!(
        std::fs::read_to_string(q.ws.path().join("early.txt")).unwrap(),
        "early\n"
    );
    assert_eq!(
        std::fs::read_to_string(q.ws.path().join("base")).unwrap(),
        "base\n"
    );

    // The next run finds its files; removing one gives the space back.
    let (ok, out, err) = q.run(
        &q.policy,
        &q.name,
        "cat early.txt; rm big; dd if=/dev/zero of=again bs=1M count=4 2>&1; echo dd=$?",
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("early\n") && out.contains("dd=0"), "{out}");

    // snapshot, restore, fork: the fork gets an image of the same size.
    q.ok(&["snapshot", &q.name, "--tag", "t1"]);
    let (ok, out, err) = q.run(&q.policy, &q.name, "rm again; echo x > later");
    assert!(ok, "{out}\n{err}");
    q.ok(&["restore", &q.name, "t1"]);
    let mut paths = q.diff_paths(&q.name);
    paths.sort();
    assert_eq!(paths, ["again"]);
    let fork = format!("{}-b", q.name);
    q.ok(&["fork", &q.name, &fork]);
    assert_eq!(
        std::fs::metadata(q.layer(&fork).join("layer.img"))
            .unwrap()
            .len(),
        QUOTA
    );
    assert_eq!(q.diff_paths(&fork), ["again"]);
    q.ok(&["discard", &q.name]);
    assert!(!q.layer(&q.name).join("layer.img").exists());
    assert_eq!(loops_below(q.state.path()), Vec::<String>::new());
}

#[test]
fn a_layer_made_without_a_quota_is_not_run_under_one() {
    let q = Quota::new("quota-old");
    let (ok, out, err) = q.run("ci", &q.name, "echo x > f");
    assert!(ok, "{out}\n{err}");
    let (ok, out, err) = q.run(&q.policy, &q.name, "echo y > g");
    assert!(!ok, "a quota'd run over an unquota'd layer ran\n{out}");
    assert!(err.contains("without a disk quota"), "{err}");
    // After a discard it runs, under the quota.
    q.ok(&["discard", &q.name]);
    let (ok, out, err) = q.run(&q.policy, &q.name, "echo y > g");
    assert!(ok, "{out}\n{err}");
    assert!(q.layer(&q.name).join("layer.img").exists());
}

#[test]
fn inspect_shows_a_spawned_agents_quota_and_use() {
    let d = common::daemon::TestDaemon::start("aither-quota-d-", &[]);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let policy = quota_policy(dir.path());
    let name = unique("quota-spawn");
    let ws = d.ws.path().to_str().unwrap().to_string();
    d.ok(&[
        "spawn",
        "--policy",
        &policy,
        "--workspace",
        &ws,
        &name,
        "--",
        "/bin/sh",
        "-c",
        "dd if=/dev/zero of=four bs=1M count=4 && echo ready && exec sleep 300",
    ]);
    let ready = common::poll_until(std::time::Duration::from_secs(60), || {
        d.ok(&["logs", &name]).contains("ready")
    });
    assert!(ready, "{}\n{}", d.ok(&["logs", &name]), d.log());
    let v: Value = serde_json::from_str(&d.ok(&["inspect", &name])).unwrap();
    let l = &v["layer"];
    assert_eq!(l["quota"], QUOTA, "{v}");
    let fs_used = l["fs_used"].as_u64().unwrap_or(0);
    assert!((4 << 20..QUOTA).contains(&fs_used), "{v}");
    assert!(l["disk_used"].as_u64().unwrap() <= QUOTA, "{v}");
    assert_eq!(l["bytes"], 4 << 20, "{v}");
    // A member-style read of the running agent's layer: diff shares the mounted image.
    let out: Value = serde_json::from_str(&d.ok(&["diff", &name, "--json"])).unwrap();
    assert_eq!(out["changes"][0]["path"], "four", "{out}");
    d.ok(&["rm", "--force", &name]);
}

#[test]
fn a_member_diffs_and_applies_their_quotad_layer_through_aitherd() {
    use std::os::unix::fs::PermissionsExt;
    // An installed policy (members cannot launch from a file): the repository's, and ci-q16.
    let pdir = tempfile::tempdir_in("/var/tmp").unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", common::policy_dir().display()))
        .arg(pdir.path())
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::set_permissions(pdir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    quota_policy(pdir.path());
    let policy = "ci-q16";
    let us = common::users::Users::create();
    let d = us.daemon_env(&[], &[("AITHER_POLICY_DIR", pdir.path().to_str().unwrap())]);
    let u = &us.users[1];
    let dir = us.dir(u);
    let name = unique("quota-member");
    let ok = |args: &[&str]| us.ok(&d, 1, args);
    ok(&[
        "spawn",
        "--policy",
        policy,
        "-w",
        dir.to_str().unwrap(),
        &name,
        "--",
        "/bin/sh",
        "-c",
        "echo new > added; dd if=/dev/zero of=big bs=1M count=64 2>/dev/null; echo dd=$?",
    ]);
    assert!(common::poll_until(
        std::time::Duration::from_secs(60),
        || {
            let v: Value = serde_json::from_str(&ok(&["inspect", &name])).unwrap();
            v["state"] == "exited"
        }
    ));
    assert!(ok(&["logs", &name]).contains("dd=1"));
    // Not running: aitherd attaches the image read-only for the member's diff.
    let v: Value = serde_json::from_str(&ok(&["diff", &name, "--json"])).unwrap();
    let paths: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["added", "big"], "{v}");
    ok(&["apply", &name, "added"]);
    let m = std::fs::metadata(dir.join("added")).unwrap();
    assert_eq!((m.uid(), m.gid()), (u.uid, u.gid));
    assert_eq!(std::fs::read_to_string(dir.join("added")).unwrap(), "new\n");
}

#[test]
fn aitherds_fork_of_a_quotad_agent_gets_an_image_of_the_same_quota() {
    let d = common::daemon::TestDaemon::start("aither-quota-f-", &[]);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let policy = quota_policy(dir.path());
    let name = unique("quota-fork");
    let new = format!("{name}-b");
    let ws = d.ws.path().to_str().unwrap().to_string();
    d.ok(&[
        "spawn",
        "--policy",
        &policy,
        "--workspace",
        &ws,
        &name,
        "--",
        "/bin/sh",
        "-c",
        "echo one > a",
    ]);
    let exited = common::poll_until(std::time::Duration::from_secs(60), || {
        let v: Value = serde_json::from_str(&d.ok(&["inspect", &name])).unwrap();
        v["state"] == "exited"
    });
    assert!(exited, "{}", d.ok(&["inspect", &name]));
    // NEW starts where NAME was, under the same quota: past it, ENOSPC inside.
    d.ok(&[
        "fork",
        &name,
        &new,
        "--",
        "/bin/sh",
        "-c",
        "cat a; dd if=/dev/zero of=big bs=1M count=64 2>&1; echo dd=$?",
    ]);
    let mut logs = String::new();
    let done = common::poll_until(std::time::Duration::from_secs(60), || {
        logs = d.ok(&["logs", &new]);
        logs.contains("dd=")
    });
    assert!(done, "{logs}\n{}", d.log());
    assert!(logs.contains("one\n"), "{logs}");
    assert!(
        logs.contains("No space left on device") && logs.contains("dd=1"),
        "{logs}"
    );
    let img = d
        .state
        .path()
        .join("state/layers")
        .join(&new)
        .join("layer.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), QUOTA);
    // The original's image is untouched by NEW's writes.
    let v: Value = serde_json::from_str(&d.ok(&["diff", &name, "--json"])).unwrap();
    assert_eq!(v["changes"].as_array().unwrap().len(), 1, "{v}");
    d.ok(&["rm", "--force", &new]);
    d.ok(&["rm", "--force", &name]);
}
