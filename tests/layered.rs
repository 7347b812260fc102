//! Layered workspaces (docs/workspaces.md): the agent writes into a layer of its own, the
//! user's directory changes only through `aitherctl apply`, `diff` shows exactly what changed,
//! and `apply` never follows a link the agent made. Real `aitherctl run` sandboxes under the
//! `ci` policy (layered by default), with a state directory of the test's own.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{require_root, unique, Workspace, AITHERCTL};
use serde_json::Value;

/// A workspace, a state directory (where the layers live) and one agent name.
struct Layered {
    ws: Workspace,
    state: tempfile::TempDir,
    name: String,
}

impl Layered {
    fn new(tag: &str) -> Layered {
        require_root();
        let state = tempfile::Builder::new()
            .prefix("aither-layered-state-")
            .tempdir_in("/var/tmp")
            .unwrap();
        Layered {
            ws: Workspace::new(),
            state,
            name: unique(tag),
        }
    }

    fn path(&self) -> &Path {
        self.ws.path()
    }

    fn layer(&self) -> PathBuf {
        self.state.path().join("layers").join(&self.name)
    }

    /// `aitherctl run --policy ci … -- sh -c SCRIPT` in the workspace; asserts success.
    fn agent(&self, script: &str) -> String {
        let out = self.run_policy("ci", script);
        assert!(
            out.status.success(),
            "the agent failed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run_policy(&self, policy: &str, script: &str) -> std::process::Output {
        let mut c = self
            .ws
            .command(policy, &[], &["/bin/sh", "-c", script], &self.name);
        c.env("AITHER_STATE_DIR", self.state.path());
        c.output().expect("run aitherctl")
    }

    /// `aitherctl ARGS` with this state directory: (exit code, stdout, stderr).
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(AITHERCTL)
            .env("AITHER_STATE_DIR", self.state.path())
            .env("AITHER_AUDIT_LOG", common::test_audit_log())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run aitherctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl(args);
        assert_eq!(code, 0, "aitherctl {args:?} failed\n{out}\n{err}");
        out
    }

    /// `diff --json`: path -> (change, kind after or before, mode after, link target after).
    fn changes(&self) -> BTreeMap<String, (String, String, Option<u64>, Option<String>)> {
        let v: Value = serde_json::from_str(&self.ok(&["diff", &self.name, "--json"])).unwrap();
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let side = if c["after"].is_null() {
                    &c["before"]
                } else {
                    &c["after"]
                };
                (
                    c["path"].as_str().unwrap().to_string(),
                    (
                        c["change"].as_str().unwrap().to_string(),
                        side["kind"].as_str().unwrap().to_string(),
                        c["after"]["mode"].as_u64(),
                        c["after"]["target"].as_str().map(String::from),
                    ),
                )
            })
            .collect()
    }
}

/// Everything under a directory: relative path -> (kind, mode, content or link target), the
/// aither-probe copy left out.
fn tree(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "aither-probe" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(rel, ('l', 0, t.into_os_string().into_encoded_bytes()));
            } else if m.is_dir() {
                out.insert(rel, ('d', mode, Vec::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, ('f', mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn seed(root: &Path) {
    std::fs::create_dir_all(root.join("src/old")).unwrap();
    std::fs::write(root.join("README"), "hello\n").unwrap();
    std::fs::write(root.join("src/lib.rs"), "fn a() {}\nfn b() {}\n").unwrap();
    std::fs::write(root.join("src/gone.rs"), "bye\n").unwrap();
    std::fs::write(root.join("src/old/name.rs"), "renamed\n").unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o644)).unwrap();
}

const EDITS: &str = "set -e
printf 'fn a() {}\\nfn b2() {}\\n' > src/lib.rs
echo new > src/new.rs
rm src/gone.rs
mv src/old/name.rs src/old/renamed.rs
ln -s ../README src/readme-link
chmod 755 run.sh
mkdir -p docs && echo doc > docs/a.md
echo hostile > README.tmp && rm README.tmp";

#[test]
fn the_agents_writes_reach_the_directory_only_through_apply_and_diff_is_exact() {
    let l = Layered::new("layered-diff");
    seed(l.path());
    let before = tree(l.path());
    let inside = l.agent(&format!("{EDITS}\ncat src/lib.rs; ls src"));
    // The agent sees its own writes…
    assert!(
        inside.contains("fn b2()") && inside.contains("new.rs"),
        "{inside}"
    );
    // …and the directory is exactly as it was.
    assert_eq!(
        tree(l.path()),
        before,
        "the agent's writes reached the directory"
    );

    let got = l.changes();
    let want: BTreeMap<String, (String, String, Option<u64>, Option<String>)> = [
        ("docs", ("added", "dir", Some(0o755), None)),
        ("docs/a.md", ("added", "file", Some(0o644), None)),
        ("run.sh", ("changed", "file", Some(0o755), None)),
        ("src/gone.rs", ("removed", "file", None, None)),
        ("src/lib.rs", ("changed", "file", Some(0o644), None)),
        ("src/new.rs", ("added", "file", Some(0o644), None)),
        ("src/old/name.rs", ("removed", "file", None, None)),
        ("src/old/renamed.rs", ("added", "file", Some(0o644), None)),
        (
            "src/readme-link",
            ("added", "symlink", Some(0o777), Some("../README")),
        ),
    ]
    .into_iter()
    .map(|(p, (c, k, m, t))| {
        (
            p.to_string(),
            (c.to_string(), k.to_string(), m, t.map(String::from)),
        )
    })
    .collect();
    assert_eq!(got, want);
    // The unified diff of the edited file.
    let text = l.ok(&["diff", &l.name, "src/lib.rs"]);
    assert!(
        text.contains("-fn b() {}") && text.contains("+fn b2() {}"),
        "{text}"
    );
    let stat = l.ok(&["diff", &l.name, "--stat"]);
    assert!(stat.contains("5 added, 2 changed, 2 removed"), "{stat}");

    // A subset first: only src/lib.rs changes in the directory.
    l.ok(&["apply", &l.name, "src/lib.rs"]);
    let mut expect = before.clone();
    expect.get_mut("src/lib.rs").unwrap().2 = b"fn a() {}\nfn b2() {}\n".to_vec();
    assert_eq!(tree(l.path()), expect);
    assert!(!l.changes().contains_key("src/lib.rs"));

    // Then the rest: the directory is what the agent saw.
    l.ok(&["apply", &l.name]);
    let after = tree(l.path());
    assert_eq!(after["run.sh"].1, 0o755);
    assert_eq!(after["src/readme-link"], ('l', 0, b"../README".to_vec()));
    assert!(!after.contains_key("src/gone.rs") && !after.contains_key("src/old/name.rs"));
    assert_eq!(after["src/old/renamed.rs"].2, b"renamed\n");
    assert_eq!(after["docs/a.md"].2, b"doc\n");
    assert!(l.changes().is_empty(), "applied changes still show");
}

#[test]
fn apply_never_follows_a_link_the_agent_made() {
    let l = Layered::new("layered-links");
    // Host files outside the workspace: one the test owns (compared exactly), and /etc.
    let host_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::write(host_dir.path().join("victim"), "host data\n").unwrap();
    let host_file = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    std::fs::write(host_file.path(), "host secret\n").unwrap();
    let pwned = || {
        String::from_utf8_lossy(&std::fs::read("/etc/passwd").unwrap()).contains("pwned")
            || std::fs::read_to_string(host_dir.path().join("victim")).unwrap() != "host data\n"
            || std::fs::read_to_string(host_file.path()).unwrap() != "host secret\n"
    };
    // First run: links to /etc, to a host directory and to a host file, applied as links.
    l.agent(&format!(
        "ln -s /etc out && ln -s {} od && ln -s {} hf",
        host_dir.path().display(),
        host_file.path().display()
    ));
    l.ok(&["apply", &l.name]);
    assert_eq!(
        std::fs::read_link(l.path().join("out")).unwrap(),
        Path::new("/etc")
    );
    assert_eq!(
        std::fs::read_link(l.path().join("od")).unwrap(),
        host_dir.path()
    );
    // Second run, same layer: the directory links become directories with a file in them,
    // and the file link a file.
    l.agent(
        "rm out od hf && mkdir out od && echo pwned > out/passwd && echo pwned > od/victim \
         && echo pwned > hf",
    );
    // Only the files below the links: their parents in the directory are still the links,
    // which are refused, not followed.
    for p in ["out/passwd", "od/victim"] {
        let (code, _, err) = l.ctl(&["apply", &l.name, p]);
        assert_eq!(code, 1, "{p}: {err}");
        assert!(err.contains("symbolic link"), "{p}: {err}");
        assert!(!pwned(), "apply of {p} wrote through a link");
    }
    // Everything: the links are replaced, never written through.
    l.ok(&["apply", &l.name]);
    assert!(!pwned(), "apply wrote through a link");
    for d in ["out", "od"] {
        assert!(std::fs::symlink_metadata(l.path().join(d))
            .unwrap()
            .is_dir());
    }
    assert_eq!(
        std::fs::read(l.path().join("out/passwd")).unwrap(),
        b"pwned\n"
    );
    assert!(std::fs::symlink_metadata(l.path().join("hf"))
        .unwrap()
        .is_file());
}

#[test]
fn set_id_bits_are_dropped_and_host_run_files_need_the_flag() {
    let l = Layered::new("layered-hostrun");
    std::fs::create_dir_all(l.path().join(".git/hooks")).unwrap();
    // The agent's own mode bits (seccomp refuses set-id modes inside, so the layer is given
    // one directly, as a hostile layer could be): apply keeps rwx only.
    l.agent("echo x > tool && chmod 0755 tool && printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > .git/hooks/post-checkout && chmod 755 .git/hooks/post-checkout && echo 'eval x' > .envrc");
    let upper_tool = l.layer().join("upper/tool");
    std::fs::set_permissions(&upper_tool, std::fs::Permissions::from_mode(0o6755)).unwrap();
    let (code, _, err) = l.ctl(&["apply", &l.name]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(".git/hooks/post-checkout") && err.contains("--allow-host-run"),
        "{err}"
    );
    assert!(
        !l.path().join("tool").exists(),
        "a refused apply wrote something"
    );
    l.ok(&["apply", &l.name, "tool"]);
    assert_eq!(
        std::fs::metadata(l.path().join("tool")).unwrap().mode() & 0o7777,
        0o755
    );
    assert!(!l.path().join(".git/hooks/post-checkout").exists());
    l.ok(&["apply", &l.name, "--allow-host-run"]);
    assert!(l.path().join(".git/hooks/post-checkout").exists());
    assert!(l.path().join(".envrc").exists());
}

#[test]
fn a_members_directory_gets_files_as_the_member_and_discard_forgets_the_changes() {
    let l = Layered::new("layered-owner");
    std::os::unix::fs::chown(l.path(), Some(4321), Some(4321)).unwrap();
    l.agent("echo mine > f && id -u");
    let upper = l.layer().join("upper");
    // The layer is root's; the upper layer's files are stored as the directory's owner.
    let layer_meta = std::fs::metadata(l.layer()).unwrap();
    assert_eq!((layer_meta.uid(), layer_meta.mode() & 0o777), (0, 0o700));
    assert_eq!(std::fs::metadata(upper.join("f")).unwrap().uid(), 4321);
    l.ok(&["apply", &l.name, "f"]);
    let m = std::fs::metadata(l.path().join("f")).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (4321, 4321),
        "apply wrote as someone else"
    );
    // Another change, then discard: nothing of it is left, and the next run starts from the
    // directory.
    l.agent("echo later > g && rm f");
    assert_eq!(l.changes().len(), 2);
    l.ok(&["discard", &l.name]);
    let (code, _, err) = l.ctl(&["diff", &l.name]);
    assert_eq!(code, 1, "{err}");
    let seen = l.agent("ls");
    assert!(seen.contains('f') && !seen.contains('g'), "{seen}");
    assert!(!l.path().join("g").exists());
}

#[test]
fn a_layer_is_bound_to_its_directory() {
    let l = Layered::new("layered-bound");
    l.agent("echo x > f");
    // The same agent name over another directory: refused, nothing mounted.
    let other = Workspace::new();
    let mut c = other.command("ci", &[], &["/bin/true"], &l.name);
    c.env("AITHER_STATE_DIR", l.state.path());
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("holds the changes to"), "{err}");
}

#[test]
fn a_state_directory_on_overlayfs_is_refused_with_what_to_do() {
    // The upper layer cannot live on overlayfs: in a mount namespace of the test's own, the
    // state directory is an overlay mount; the run is refused (no fallback gives the agent
    // the directory itself).
    let l = Layered::new("layered-refused");
    let base = tempfile::Builder::new()
        .prefix("aither-layered-ovl-")
        .tempdir_in("/var/tmp")
        .unwrap();
    for d in ["l", "u", "w", "m"] {
        std::fs::create_dir(base.path().join(d)).unwrap();
    }
    let b = base.path().display();
    let script = format!(
        "mount -t overlay overlay -o lowerdir={b}/l,upperdir={b}/u,workdir={b}/w {b}/m && \
         AITHER_STATE_DIR={b}/m AITHER_POLICY_DIR={} {AITHERCTL} run --policy ci --workspace {} --name {} -- /bin/sh -c 'echo x > f'",
        common::policy_dir().display(),
        l.path().display(),
        l.name
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "/bin/sh", "-c", &script])
        .env("AITHER_AUDIT_LOG", common::test_audit_log())
        .stdin(Stdio::null())
        .output()
        .expect("unshare(1) from util-linux");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("overlayfs refused the layers") && err.contains("no fallback"),
        "{err}"
    );
    assert!(!l.path().join("f").exists());
}

#[test]
fn a_daemon_agent_under_ci_writes_into_its_layer_and_rm_removes_it() {
    let d = common::daemon::TestDaemon::start("aither-layered-d-", &[]);
    let name = unique("layered-spawn");
    let ws = d.ws.path().to_str().unwrap().to_string();
    std::fs::write(d.ws.path().join("keep"), "as it was\n").unwrap();
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
        "echo changed > keep && echo new > added",
    ]);
    let exited = common::poll_until(std::time::Duration::from_secs(60), || {
        let v: Value = serde_json::from_str(&d.ok(&["inspect", &name])).unwrap();
        v["state"] == "exited"
    });
    assert!(exited, "{}", d.ok(&["inspect", &name]));
    assert_eq!(
        std::fs::read_to_string(d.ws.path().join("keep")).unwrap(),
        "as it was\n"
    );
    assert!(!d.ws.path().join("added").exists());
    let v: Value = serde_json::from_str(&d.ok(&["diff", &name, "--json"])).unwrap();
    let paths: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["added", "keep"]);
    d.ok(&["apply", &name, "keep"]);
    assert_eq!(
        std::fs::read_to_string(d.ws.path().join("keep")).unwrap(),
        "changed\n"
    );
    let layer = d.state.path().join("state/layers").join(&name);
    assert!(layer.join("upper/added").exists());
    d.ok(&["rm", &name]);
    assert!(!layer.exists(), "rm left the agent's layer");
}

#[test]
fn snapshot_restore_and_fork_round_trip() {
    let l = Layered::new("layered-snap");
    std::fs::write(l.path().join("base"), "base\n").unwrap();
    l.agent("echo one > a && rm base && mkdir d && ln -s a d/link");
    let s: Value = serde_json::from_str(&l.ok(&["snapshot", &l.name, "--json"])).unwrap();
    assert_eq!(s["tag"], "s1");
    assert!(
        s["stats"]["reflinked"].as_u64().unwrap() + s["stats"]["copied"].as_u64().unwrap() >= 1
    );
    let at_s1 = l.changes();
    // Later work, then back to s1: the layer is as it was, whiteout and link included.
    l.agent("echo two > a && echo more > b && rm -r d");
    assert_ne!(l.changes(), at_s1);
    l.ok(&["restore", &l.name, "s1"]);
    assert_eq!(l.changes(), at_s1);
    let seen = l.agent("cat a; ls; readlink d/link");
    assert_eq!(seen, "one\na\naither-probe\nd\na\n", "{seen}");
    let list: Value = serde_json::from_str(&l.ok(&["snapshots", &l.name, "--json"])).unwrap();
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1);
    // A discard forgets the layer's directory; a restore binds it again from the snapshot,
    // so diff (and a fork) see the changes at once, not only after the agent runs.
    l.ok(&["discard", &l.name]);
    let (code, _, err) = l.ctl(&["diff", &l.name]);
    assert!(code != 0 && err.contains("the layer is empty"), "{err}");
    l.ok(&["restore", &l.name, "s1"]);
    assert_eq!(l.changes(), at_s1);
    // Retention: --keep 2 leaves the newest two; --rm removes one by tag.
    let tags = |l: &Layered| -> Vec<String> {
        let v: Value = serde_json::from_str(&l.ok(&["snapshots", &l.name, "--json"])).unwrap();
        v["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["tag"].as_str().unwrap().to_string())
            .collect()
    };
    l.ok(&["snapshot", &l.name, "--tag", "t2"]);
    l.ok(&["snapshot", &l.name, "--tag", "t3", "--keep", "2"]);
    assert_eq!(tags(&l), ["t2", "t3"]);
    l.ok(&["snapshots", &l.name, "--rm", "t2"]);
    assert_eq!(tags(&l), ["t3"]);
    l.ok(&["snapshot", &l.name, "--tag", "s1"]);

    // A fork from the snapshot: a new agent that starts where s1 was, its own layer.
    l.agent("echo three > a");
    let fork = unique("layered-fork");
    l.ok(&["fork", &l.name, &fork, "--from", "s1"]);
    let mut c = l.ws.command(
        "ci",
        &[],
        &["/bin/sh", "-c", "cat a; echo forked > f"],
        &fork,
    );
    c.env("AITHER_STATE_DIR", l.state.path());
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\n");
    // The original kept its own changes; the directory has none of either.
    assert_eq!(
        l.agent("cat a; ls f 2>/dev/null || echo no-f"),
        "three\nno-f\n"
    );
    assert_eq!(
        std::fs::read_to_string(l.path().join("base")).unwrap(),
        "base\n"
    );
    assert!(!l.path().join("a").exists());
    // A second fork onto an existing layer is refused.
    let (code, _, err) = l.ctl(&["fork", &l.name, &fork]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already has a layer"), "{err}");
}

#[test]
fn a_running_daemon_agent_is_frozen_while_it_is_snapshotted() {
    let d = common::daemon::TestDaemon::start("aither-layered-snap-", &[]);
    let name = unique("layered-live");
    let ws = d.ws.path().to_str().unwrap().to_string();
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
        "i=0; while true; do i=$((i+1)); echo $i > c.tmp; mv c.tmp counter; sleep 0.01; done",
    ]);
    let layer = d.state.path().join("state/layers").join(&name);
    assert!(common::poll_until(
        std::time::Duration::from_secs(30),
        || layer.join("upper/counter").exists()
    ));
    let s: Value = serde_json::from_str(&d.ok(&["snapshot", &name, "--json"])).unwrap();
    assert_eq!(s["frozen"], true, "{s}");
    // Thawed again: it goes on counting.
    let v: Value = serde_json::from_str(&d.ok(&["inspect", &name])).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    let snap = std::fs::read_to_string(layer.join("snapshots/s1/upper/counter")).unwrap();
    assert!(snap.trim().parse::<u64>().is_ok(), "{snap:?}");
    // restore is refused while it runs.
    let o = d.ctl(&["restore", &name, "s1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("stop it first"));
    d.ok(&["stop", &name]);
    d.ok(&["restore", &name, "s1"]);
    assert_eq!(
        std::fs::read_to_string(layer.join("upper/counter")).unwrap(),
        snap
    );
    // inspect shows the layer and its snapshot; the audit log has both operations.
    let v: Value = serde_json::from_str(&d.ok(&["inspect", &name])).unwrap();
    assert_eq!(v["layer"]["snapshots"][0]["tag"], "s1", "{v}");
    assert!(v["layer"]["bytes"].as_u64().unwrap() > 0, "{v}");
    let kinds: Vec<(String, String)> = d
        .audit_records()
        .iter()
        .filter(|r| r["agent"] == name.as_str())
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or("").to_string(),
                r["decision"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for k in [
        ("layer_snapshot", "allow"),
        ("layer_restore", "deny"),
        ("layer_restore", "allow"),
    ] {
        assert!(
            kinds.contains(&(k.0.to_string(), k.1.to_string())),
            "{k:?} not in {kinds:?}"
        );
    }
}

#[test]
fn an_oci_export_of_a_layered_policy_is_refused() {
    let l = Layered::new("layered-oci");
    let out = l.state.path().join("bundle");
    let mut c = Command::new(AITHERCTL);
    c.env("AITHER_POLICY_DIR", common::policy_dir()).args([
        "export",
        "oci",
        "--policy",
        "ci",
        "--workspace",
        l.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot be exported to an OCI bundle"), "{err}");
}

#[test]
fn a_member_diffs_and_applies_their_own_agents_layer_and_no_one_elses() {
    let us = common::users::Users::create();
    let d = us.daemon();
    let (u1, u2) = (&us.users[0], &us.users[1]);
    let dir = us.dir(u2);
    std::fs::write(dir.join("keep"), "as it was\n").unwrap();
    std::os::unix::fs::chown(dir.join("keep"), Some(u2.uid), Some(u2.gid)).unwrap();
    let name = unique("layered-member");
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
            "echo changed > keep && echo new > added",
        ],
    );
    assert!(common::poll_until(
        std::time::Duration::from_secs(60),
        || {
            let v: Value = serde_json::from_str(&ok(1, &["inspect", &name])).unwrap();
            v["state"] == "exited"
        }
    ));
    // Another member: no such agent, and nothing of the layer.
    let o = us.ctl(&d, 0, &["diff", &name]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("changed"));
    let _ = u1;
    // The owner: the exact changes, then an apply that lands as them.
    let v: Value = serde_json::from_str(&ok(1, &["diff", &name, "--json"])).unwrap();
    let paths: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["added", "keep"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("keep")).unwrap(),
        "as it was\n"
    );
    ok(1, &["apply", &name]);
    assert_eq!(
        std::fs::read_to_string(dir.join("keep")).unwrap(),
        "changed\n"
    );
    // aitherd announced and recorded the member's apply (done by the member's aitherctl).
    let ev = ok(1, &["events", "--agent", &name, "--json"]);
    assert!(ev.contains("layer_applied"), "{ev}");
    assert!(
        d.audit_records().iter().any(|r| r["kind"] == "layer_apply"
            && r["agent"] == name.as_str()
            && r["caller_uid"].as_u64() == Some(u64::from(u2.uid))),
        "no layer_apply record by the member"
    );
    let m = std::fs::metadata(dir.join("added")).unwrap();
    assert_eq!((m.uid(), m.gid()), (u2.uid, u2.gid));
    // aitherd recorded both openings, the other member's as a denial.
    let opens: Vec<(String, u64)> = d
        .audit_records()
        .iter()
        .filter(|r| r["kind"] == "layer_open")
        .map(|r| {
            (
                r["decision"].as_str().unwrap_or("").to_string(),
                r["caller_uid"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        opens.contains(&("deny".into(), u64::from(u1.uid))),
        "{opens:?}"
    );
    assert!(
        opens.contains(&("allow".into(), u64::from(u2.uid))),
        "{opens:?}"
    );
}

#[test]
fn a_layer_in_use_by_a_running_sandbox_is_neither_shared_nor_discarded() {
    let l = Layered::new("layered-lock");
    let mut c = l.ws.command(
        "ci",
        &[],
        &["/bin/sh", "-c", "echo x > started; sleep 60"],
        &l.name,
    );
    c.env("AITHER_STATE_DIR", l.state.path());
    let mut first = c.spawn().unwrap();
    assert!(
        common::poll_until(std::time::Duration::from_secs(30), || l
            .layer()
            .join("upper/started")
            .exists()),
        "the first run never started"
    );
    // A second sandbox of the same name: refused, not a second overlay on the same layer.
    let out = l.run_policy("ci", "echo y > second");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("in use"), "{err}");
    // Nor is it emptied under the running sandbox.
    let (code, _, err) = l.ctl(&["discard", &l.name]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use"), "{err}");
    assert!(l.layer().join("upper/started").exists());
    first.kill().unwrap();
    first.wait().unwrap();
    // Once it is gone (its sandbox dies with its launcher), the layer is free again.
    assert!(common::poll_until(
        std::time::Duration::from_secs(30),
        || l.ctl(&["discard", &l.name]).0 == 0
    ));
}
