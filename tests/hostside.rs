//! The host side never trusts what an agent controls (issue 17): one test per attack on the
//! privileged code around the sandbox, each asserting what changed on the host (nothing).
//! As root, with real sandboxes (`aitherctl run`) and a private aitherd.

mod common;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemon::TestDaemon;
use common::{require_root, test_audit_log, unique, Workspace, RUN_DEADLINE};
use serde_json::Value;

/// A host file outside every workspace, with known content, removed at drop.
struct Victim {
    dir: tempfile::TempDir,
}

const VICTIM_TEXT: &[u8] = b"host file: must not change\n";

impl Victim {
    fn new() -> Victim {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("aither-victim-")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::write(dir.path().join("file"), VICTIM_TEXT).unwrap();
        std::fs::set_permissions(
            dir.path().join("file"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Victim { dir }
    }
    fn file(&self) -> PathBuf {
        self.dir.path().join("file")
    }
    fn assert_untouched(&self) {
        let md = std::fs::symlink_metadata(self.file()).unwrap();
        assert!(md.file_type().is_file());
        assert_eq!(md.mode() & 0o7777, 0o600);
        assert_eq!((md.uid(), md.gid()), (0, 0));
        assert_eq!(std::fs::read(self.file()).unwrap(), VICTIM_TEXT);
        let names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("file")],
            "new files in the victim dir"
        );
    }
}

fn run_with_env(
    ws: &Workspace,
    policy: &str,
    flags: &[&str],
    cmd: &[&str],
    env: &[(&str, &str)],
) -> common::RunResult {
    let name = unique("hostside");
    let mut c = ws.command(policy, flags, cmd, &name);
    c.envs(env.iter().copied());
    let mut child = c.spawn().unwrap();
    let out = std::thread::spawn({
        let mut s = child.stdout.take().unwrap();
        move || {
            let mut v = String::new();
            std::io::Read::read_to_string(&mut s, &mut v).ok();
            v
        }
    });
    let mut e = child.stderr.take().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut e, &mut stderr).ok();
    let status = common::wait_with_deadline(&mut child, "aitherctl run", RUN_DEADLINE);
    common::RunResult {
        name,
        status,
        stdout: out.join().unwrap(),
        stderr,
    }
}

// ---------------------------------------------------------------------------------------------
// Item 1: --report is never written through a link.

#[test]
fn a_report_path_that_is_a_planted_symlink_is_refused_and_the_target_untouched() {
    let ws = Workspace::new();
    let v = Victim::new();
    // Planted by an earlier agent: report.json -> the host file.
    symlink(v.file(), ws.path().join("report.json")).unwrap();
    let r = ws.run("strict", &["--report", &ws.at("report.json")], &["true"]);
    assert_eq!(r.code(), 125, "{}", r.describe());
    assert!(r.stderr.contains("symbolic link"), "{}", r.describe());
    v.assert_untouched();
    // The link itself is left as it was.
    assert_eq!(
        std::fs::read_link(ws.path().join("report.json")).unwrap(),
        v.file()
    );
}

#[test]
fn a_report_path_through_a_planted_directory_link_is_refused() {
    let ws = Workspace::new();
    let v = Victim::new();
    symlink(v.dir.path(), ws.path().join("out")).unwrap();
    let r = ws.run(
        "strict",
        &["--report", &ws.at("out/report.json")],
        &["true"],
    );
    assert_eq!(r.code(), 125, "{}", r.describe());
    assert!(r.stderr.contains("symbolic link"), "{}", r.describe());
    v.assert_untouched();
}

#[test]
fn a_report_hard_linked_to_a_host_file_is_refused() {
    // A hard link in the workspace to a host file (made by anyone who can write both).
    let ws = Workspace::new();
    let v = Victim::new();
    std::fs::hard_link(v.file(), ws.path().join("report.json")).unwrap();
    let r = ws.run("strict", &["--report", &ws.at("report.json")], &["true"]);
    assert_eq!(r.code(), 125, "{}", r.describe());
    assert!(r.stderr.contains("hard links"), "{}", r.describe());
    v.assert_untouched();
}

/// The race of the red team (won 5 of 10 before): the agent replaces report.json with a link
/// to a host file while the launcher is about to write it. Bounded loop: 10 runs, each
/// swapping the name 300 times; the host file never changes and the report still arrives
/// where it was opened (when the agent did not delete it, it is a plain file).
#[test]
fn a_report_raced_by_the_agent_never_reaches_the_host_file() {
    let ws = Workspace::new();
    let v = Victim::new();
    let script = format!(
        "i=0; while [ $i -lt 300 ]; do rm -f report.json; ln -s {} report.json; i=$((i+1)); done",
        v.file().display()
    );
    for round in 0..10 {
        let _ = std::fs::remove_file(ws.path().join("report.json"));
        let r = ws.run(
            "strict",
            &["--report", &ws.at("report.json")],
            &["sh", "-c", &script],
        );
        assert_eq!(r.code(), 0, "round {round}: {}", r.describe());
        v.assert_untouched();
    }
}

#[test]
fn a_report_is_written_to_a_plain_path_and_replaces_an_old_one() {
    let ws = Workspace::new();
    std::fs::write(ws.path().join("report.json"), vec![b'x'; 100_000]).unwrap();
    let r = ws.run("strict", &["--report", &ws.at("report.json")], &["true"]);
    r.ok();
    let rep: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path().join("report.json")).unwrap())
            .expect("a whole report, the old content truncated");
    assert_eq!(rep["policy"], "strict");
}

// ---------------------------------------------------------------------------------------------
// Item 2: the seccomp cache is root-only and the report names the program loaded.

/// A cache entry in the file layout, holding `allowlist` and `args` (8-byte instructions).
fn forged_entry(prog: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut progs = prog.to_vec();
    progs.extend_from_slice(prog);
    let mut b = 400u32.to_le_bytes().to_vec();
    b.extend_from_slice(&((prog.len() / 8) as u32).to_le_bytes());
    b.extend_from_slice(&sha2::Sha256::digest(&progs));
    b.extend(progs);
    b
}

/// `RET SECCOMP_RET_ALLOW`: a program that allows every system call.
const ALLOW_ALL: [u8; 8] = [0x06, 0, 0, 0, 0x00, 0x00, 0xff, 0x7f];

fn report_of(ws: &Workspace, cache: &Path, cmd: &[&str]) -> (common::RunResult, Value) {
    let report = ws.at("report.json");
    let r = run_with_env(
        ws,
        "strict",
        &["--report", &report],
        cmd,
        &[("AITHER_CACHE_DIR", cache.to_str().unwrap())],
    );
    let rep = serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_default())
        .unwrap_or(Value::Null);
    (r, rep)
}

#[test]
fn the_seccomp_cache_is_root_only_and_a_planted_allow_all_filter_is_never_loaded() {
    let ws = Workspace::new();
    let cache = tempfile::Builder::new()
        .prefix("aither-cache-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let probe = ["./aither-probe", "clone3"];
    // A first run fills the cache: 0700 directory, 0600 files, root's.
    let (r, rep) = report_of(&ws, cache.path(), &probe);
    assert_eq!(
        r.result_line("clone3"),
        "RESULT clone3 err ENOSYS",
        "{}",
        r.describe()
    );
    let genuine = rep["seccomp"]["program_digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(genuine.len(), 64);
    assert!(
        rep["overrides"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o.as_str().unwrap().starts_with("AITHER_CACHE_DIR=")),
        "the test switch in force is in the report: {rep}"
    );
    let dir = cache.path().join("seccomp");
    let md = std::fs::metadata(&dir).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o700, 0));
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    let md = std::fs::metadata(entry).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o600, 0));

    // The attacks: the entry rewritten with an allow-all program whose embedded digest
    // matches (as the red team did), (a) owned by a non-root uid, (b) with group/other
    // access, (c) as a link to an allow-all file elsewhere; (d) the directory taken over by a
    // non-root uid. Each time the sandbox still gets the genuine program (clone3 answers
    // ENOSYS only through seccomp) and the report names its digest.
    let forged = forged_entry(&ALLOW_ALL);
    let elsewhere = cache.path().join("forged.bpf");
    std::fs::write(&elsewhere, &forged).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
    let plant = |how: &str| {
        let _ = std::fs::remove_file(entry);
        match how {
            "uid" => {
                std::fs::write(entry, &forged).unwrap();
                std::fs::set_permissions(entry, std::fs::Permissions::from_mode(0o600)).unwrap();
                std::os::unix::fs::chown(entry, Some(4242), Some(4242)).unwrap();
            }
            "mode" => {
                std::fs::write(entry, &forged).unwrap();
                std::fs::set_permissions(entry, std::fs::Permissions::from_mode(0o666)).unwrap();
            }
            "link" => symlink(&elsewhere, entry).unwrap(),
            "dir" => {
                std::fs::write(entry, &forged).unwrap();
                std::fs::set_permissions(entry, std::fs::Permissions::from_mode(0o600)).unwrap();
                std::os::unix::fs::chown(entry, Some(4242), Some(4242)).unwrap();
                std::os::unix::fs::chown(&dir, Some(4242), Some(4242)).unwrap();
            }
            _ => unreachable!(),
        }
    };
    for how in ["uid", "mode", "link", "dir"] {
        plant(how);
        let (r, rep) = report_of(&ws, cache.path(), &probe);
        assert_eq!(
            r.result_line("clone3"),
            "RESULT clone3 err ENOSYS",
            "{how}: the planted filter was loaded\n{}",
            r.describe()
        );
        assert_eq!(rep["seccomp"]["program_digest"], genuine.as_str(), "{how}");
        if how == "dir" {
            // Not repaired, not used: still the attacker's, and nothing written into it.
            assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 4242);
            assert_eq!(std::fs::read(entry).unwrap(), forged);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Item 5: the git files the host runs are read-only to the agent under strict.

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn git_workspace() -> (Workspace, Vec<u8>) {
    let ws = Workspace::new();
    git(ws.path(), &["init", "-q"]);
    std::fs::write(ws.path().join("a.txt"), b"a\n").unwrap();
    git(ws.path(), &["add", "a.txt"]);
    git(ws.path(), &["commit", "-qm", "first"]);
    let config = std::fs::read(ws.path().join(".git/config")).unwrap();
    (ws, config)
}

fn sh(ws: &Workspace, policy: &str, script: &str) -> common::RunResult {
    ws.run(policy, &[], &["sh", "-c", script])
}

#[test]
fn the_agent_cannot_write_git_config_or_add_a_hook_but_git_commit_works() {
    let (ws, config) = git_workspace();
    // A linked worktree's pointer back to the repository (what `git worktree add` makes).
    std::fs::create_dir_all(ws.path().join(".git/worktrees/wt")).unwrap();
    std::fs::write(ws.path().join(".git/worktrees/wt/commondir"), b"../..\n").unwrap();
    let hooks_before: Vec<_> = std::fs::read_dir(ws.path().join(".git/hooks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // Each attempt prints the shell's verdict; every one must fail.
    let r = sh(
        &ws,
        "strict",
        "printf '[core]\\n\\tfsmonitor = touch /tmp/pwned\\n' >> .git/config && echo CONFIG-WRITTEN; \
         printf '#!/bin/sh\\n' > .git/hooks/post-checkout && echo HOOK-WRITTEN; \
         mv .git/config .git/config.old && echo CONFIG-MOVED; \
         rm -rf .git/hooks && echo HOOKS-REMOVED; \
         mv .git .git-old && echo GIT-MOVED; \
         mkdir .git/info/x 2>/dev/null && echo INFO-WRITTEN; \
         echo /tmp/evil > .git/worktrees/wt/commondir && echo WORKTREE-WRITTEN; \
         echo b > b.txt && git add b.txt && git -c user.name=a -c user.email=a@a commit -qm second && echo COMMITTED",
    );
    assert_eq!(r.code(), 0, "{}", r.describe());
    for bad in [
        "CONFIG-WRITTEN",
        "HOOK-WRITTEN",
        "CONFIG-MOVED",
        "HOOKS-REMOVED",
        "GIT-MOVED",
        "INFO-WRITTEN",
        "WORKTREE-WRITTEN",
    ] {
        assert!(!r.stdout.contains(bad), "{bad}\n{}", r.describe());
    }
    assert!(
        r.stderr.contains("Read-only file system"),
        "{}",
        r.describe()
    );
    assert!(
        r.stdout.contains("COMMITTED"),
        "git commit must work inside\n{}",
        r.describe()
    );
    // On the host: the config and hooks are as they were, and the commit is there.
    assert_eq!(
        std::fs::read(ws.path().join(".git/config")).unwrap(),
        config
    );
    let hooks_after: Vec<_> = std::fs::read_dir(ws.path().join(".git/hooks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(hooks_before, hooks_after);
    assert!(git(ws.path(), &["log", "--format=%s"]).starts_with("second\n"));
    assert!(!ws.path().join(".git-old").exists());
    assert_eq!(
        std::fs::read(ws.path().join(".git/worktrees/wt/commondir")).unwrap(),
        b"../..\n"
    );
}

#[test]
fn a_missing_hooks_directory_cannot_be_created_by_the_agent() {
    let (ws, _) = git_workspace();
    std::fs::remove_dir_all(ws.path().join(".git/hooks")).unwrap();
    let r = sh(
        &ws,
        "strict",
        "printf '#!/bin/sh\\n' > .git/hooks/post-checkout && echo HOOK-WRITTEN; true",
    );
    assert_eq!(r.code(), 0, "{}", r.describe());
    assert!(!r.stdout.contains("HOOK-WRITTEN"), "{}", r.describe());
    // Created empty (as git init does) and left empty.
    assert_eq!(
        std::fs::read_dir(ws.path().join(".git/hooks"))
            .unwrap()
            .count(),
        0
    );
}

/// A directory on the host, outside the workspace, where the agent's command would leave its
/// marker if the host's git ran it.
fn marker_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("aither-gitmarker-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// The agent's attack on a repository's missing names: a directory of its own with a config
/// whose `core.fsmonitor` leaves `marker`, named by `.git/commondir`; the same setting in
/// `.git/config.worktree` (read when the user's config enables it). Each step prints what it
/// did.
fn commondir_attack(marker: &Path) -> String {
    let cfg = format!(
        "[core]\\n\\trepositoryformatversion = 0\\n\\tfsmonitor = touch {}\\n",
        marker.display()
    );
    format!(
        "mkdir evil && cp -r .git/. evil/ && printf '{cfg}' > evil/config && echo EVIL-READY; \
         printf '../evil\\n' > .git/commondir && echo COMMONDIR-WRITTEN; \
         printf '{cfg}' > .git/config.worktree && echo WORKTREE-CONFIG-WRITTEN; "
    )
}

#[test]
fn the_agent_cannot_create_commondir_or_config_worktree_and_the_hosts_git_runs_nothing_of_its() {
    let (ws, config) = git_workspace();
    // The user's repository reads config.worktree (the variation that needs it).
    git(ws.path(), &["config", "extensions.worktreeConfig", "true"]);
    let config_after_user = std::fs::read(ws.path().join(".git/config")).unwrap();
    assert_ne!(config, config_after_user);
    let marks = marker_dir();
    let marker = marks.path().join("ran");
    let script = format!(
        "rm -f .git/commondir && echo COMMONDIR-REMOVED; \
         mv .git/commondir .git/cd && echo COMMONDIR-MOVED; \
         rm -f .git/config.worktree && echo WORKTREE-CONFIG-REMOVED; \
         {} \
         echo b > b.txt && git add b.txt && git -c user.name=a -c user.email=a@a commit -qm second \
           && echo COMMITTED; \
         git worktree list && echo WORKTREES-LISTED",
        commondir_attack(&marker)
    );
    let r = sh(&ws, "strict", &script);
    assert_eq!(r.code(), 0, "{}", r.describe());
    assert!(r.stdout.contains("EVIL-READY"), "{}", r.describe());
    for bad in [
        "COMMONDIR-WRITTEN",
        "COMMONDIR-REMOVED",
        "COMMONDIR-MOVED",
        "WORKTREE-CONFIG-WRITTEN",
        "WORKTREE-CONFIG-REMOVED",
    ] {
        assert!(!r.stdout.contains(bad), "{bad}\n{}", r.describe());
    }
    assert!(
        r.stdout.contains("COMMITTED") && r.stdout.contains("WORKTREES-LISTED"),
        "git commit and git worktree must work inside\n{}",
        r.describe()
    );
    // On the host: the placeholders are git's own meaning (commondir names .git itself) and
    // belong to .git's owner; the owner's git status, log and worktree run nothing of the
    // agent's.
    let g = ws.path().join(".git");
    assert_eq!(std::fs::read(g.join("commondir")).unwrap(), b".\n");
    assert_eq!(std::fs::read(g.join("config.worktree")).unwrap(), b"");
    let owner = std::fs::metadata(&g).unwrap();
    for name in ["commondir", "config.worktree"] {
        let md = std::fs::symlink_metadata(g.join(name)).unwrap();
        assert!(md.file_type().is_file(), "{name}");
        assert_eq!((md.uid(), md.gid()), (owner.uid(), owner.gid()), "{name}");
        assert_eq!(md.mode() & 0o7777, 0o644, "{name}");
    }
    assert_eq!(std::fs::read(g.join("config")).unwrap(), config_after_user);
    git(ws.path(), &["status"]);
    assert!(git(ws.path(), &["log", "--format=%s"]).starts_with("second\n"));
    let wt = marks.path().join("wt");
    git(ws.path(), &["worktree", "add", "-q", wt.to_str().unwrap()]);
    git(&wt, &["status"]);
    assert!(git(ws.path(), &["worktree", "list"]).contains(wt.to_str().unwrap()));
    git(ws.path(), &["worktree", "remove", wt.to_str().unwrap()]);
    assert!(
        !marker.exists(),
        "the host's git ran the agent's fsmonitor\n{}",
        r.describe()
    );
}

#[test]
fn the_same_attack_with_writable_git_files_runs_the_agents_command_on_the_host() {
    // The attack is real with this git: where the policy grants the git files (standard says
    // workspace_git = "writable"), the host's next git status runs the agent's command.
    let (ws, _) = git_workspace();
    let marks = marker_dir();
    let marker = marks.path().join("ran");
    let r = sh(&ws, "standard", &commondir_attack(&marker));
    assert_eq!(r.code(), 0, "{}", r.describe());
    assert!(r.stdout.contains("COMMONDIR-WRITTEN"), "{}", r.describe());
    git(ws.path(), &["status"]);
    assert!(marker.exists(), "{}", r.describe());
}

#[test]
fn a_repository_without_a_config_gets_an_empty_read_only_one() {
    // git works without .git/config and reads one that appears.
    let (ws, _) = git_workspace();
    std::fs::remove_file(ws.path().join(".git/config")).unwrap();
    let marks = marker_dir();
    let marker = marks.path().join("ran");
    let r = sh(
        &ws,
        "strict",
        &format!(
            "printf '[core]\\n\\tfsmonitor = touch {}\\n' > .git/config \
             && echo CONFIG-WRITTEN; true",
            marker.display()
        ),
    );
    assert_eq!(r.code(), 0, "{}", r.describe());
    assert!(!r.stdout.contains("CONFIG-WRITTEN"), "{}", r.describe());
    assert_eq!(std::fs::read(ws.path().join(".git/config")).unwrap(), b"");
    git(ws.path(), &["status"]);
    assert!(!marker.exists());
}

#[test]
fn a_symlinked_git_config_refuses_the_launch() {
    let (ws, _) = git_workspace();
    std::fs::rename(ws.path().join(".git/config"), ws.path().join("cfg")).unwrap();
    symlink("../cfg", ws.path().join(".git/config")).unwrap();
    let r = sh(&ws, "strict", "echo RAN");
    assert_ne!(r.code(), 0, "{}", r.describe());
    assert!(!r.stdout.contains("RAN"), "{}", r.describe());
    assert!(r.stderr.contains("symbolic link"), "{}", r.describe());
}

#[test]
fn a_policy_with_writable_git_lets_the_agent_change_git_config() {
    // The grant is what decides: standard says workspace_git = "writable".
    let (ws, config) = git_workspace();
    let r = sh(
        &ws,
        "standard",
        "echo '# agent' >> .git/config && echo CONFIG-WRITTEN",
    );
    assert!(r.ok().contains("CONFIG-WRITTEN"), "{}", r.describe());
    assert_ne!(
        std::fs::read(ws.path().join(".git/config")).unwrap(),
        config
    );
}

// ---------------------------------------------------------------------------------------------
// Item 8: aitherd is non-dumpable, has no core limit, and its shims get no key.

fn status_field(pid: i32, file: &str, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("{key} not in /proc/{pid}/{file}"))
        .to_string()
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let rest = &s[s.rfind(')').unwrap() + 2..];
            if rest.split(' ').nth(1) == Some(&pid.to_string()) {
                v.push(p);
            }
        }
    }
    v
}

#[test]
fn aitherd_is_not_dumpable_has_no_core_and_its_shims_hold_no_key() {
    let d = TestDaemon::start_env("aither-hostside-", &[], &[("LD_BIND_NOW", "1")]);
    let pid = d.pid();
    // RLIMIT_CORE 0, soft and hard.
    let core = status_field(pid, "limits", "Max core file size");
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    assert_eq!(core.split_whitespace().nth(5), Some("0"), "{core}");
    // Non-dumpable, as read back from the kernel by aitherd itself (PR_GET_DUMPABLE): on
    // this host a root reader without CAP_SYS_PTRACE could read a dumpable and a
    // non-dumpable root process's environ alike, so /proc gives no outside check.
    assert!(
        d.log().contains("dumpable=0") && d.log().contains("core=(Some(0), Some(0))"),
        "{}",
        d.log()
    );
    // The loader variable was scrubbed (the daemon says so in its log).
    assert!(d.log().contains("LD_BIND_NOW"), "{}", d.log());

    // A running agent: its shim has the documented environment and no descriptor of the
    // daemon's key directory or state.
    let name = unique("keys");
    d.ok(&["spawn", "--policy", "strict", &name, "--", "sleep", "30"]);
    let keys = d.state.path().join("state/keys");
    let shims: Vec<i32> = children_of(pid)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| c.ends_with(b"shim\0"))
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(shims.len(), 1, "one shim for one agent");
    let shim = shims[0];
    let env = std::fs::read(format!("/proc/{shim}/environ")).unwrap();
    let env: Vec<&[u8]> = env.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
    assert_eq!(
        env.len(),
        1,
        "{:?}",
        env.iter()
            .map(|e| String::from_utf8_lossy(e))
            .collect::<Vec<_>>()
    );
    assert!(env[0].starts_with(b"PATH="));
    // The shim opens its own files (logs, cgroup, pidfds); none is the daemon's key or
    // databases.
    let mut targets = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{shim}/fd"))
        .unwrap()
        .flatten()
    {
        targets.push(std::fs::read_link(e.path()).unwrap_or_default());
    }
    assert!(targets.len() >= 3, "{targets:?}");
    for t in &targets {
        let s = t.to_string_lossy();
        assert!(
            !t.starts_with(&keys) && !s.contains("ed25519") && !s.ends_with(".db"),
            "the shim holds {s}: {targets:?}"
        );
    }
    d.ok(&["rm", "--force", &name]);
}

// ---------------------------------------------------------------------------------------------
// Item 9: test switches are recorded where they are in force.

#[test]
fn a_test_switch_in_force_is_in_the_audit_stream() {
    let ws = Workspace::new();
    let cache = tempfile::Builder::new()
        .prefix("aither-cache-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let r = run_with_env(
        &ws,
        "strict",
        &[],
        &["true"],
        &[("AITHER_CACHE_DIR", cache.path().to_str().unwrap())],
    );
    r.ok();
    let log = std::fs::read_to_string(test_audit_log()).unwrap();
    let entry: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["agent"] == r.name.as_str() && e["kind"] == "run")
        .expect("the run's audit entry");
    let want = format!("AITHER_CACHE_DIR={}", cache.path().display());
    assert!(
        entry["data"]["overrides"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == want.as_str()),
        "{entry}"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 1: export bundles are written through fds; item 5 carried into the bundle.

fn export_oci(ws: &Workspace, out: &Path) -> std::process::Output {
    Command::new(common::AITHERCTL)
        .env("AITHER_POLICY_DIR", common::policy_dir())
        .env("AITHER_AUDIT_LOG", test_audit_log())
        .args([
            "export",
            "oci",
            "--policy",
            "strict",
            "--name",
            &unique("exp"),
        ])
        .args(["--workspace", ws.path().to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--", "true"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn an_export_out_dir_that_is_a_planted_link_is_refused_and_its_target_untouched() {
    let ws = Workspace::new();
    // The target: an empty root-only host directory (an empty one, so that "never overwrite a
    // non-empty bundle" is not what stops the export).
    let victim = tempfile::Builder::new()
        .prefix("aither-victim-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(victim.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    symlink(victim.path(), ws.path().join("bundle")).unwrap();
    for out in ["bundle", "bundle/sub"] {
        let o = export_oci(&ws, &ws.path().join(out));
        assert!(!o.status.success(), "{out}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("symbolic link"),
            "{out}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Neither written into nor chmodded through the link.
        let md = std::fs::metadata(victim.path()).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o700, "{out}");
        assert_eq!(
            std::fs::read_dir(victim.path()).unwrap().count(),
            0,
            "{out}"
        );
    }
}

#[test]
fn an_exported_bundle_keeps_the_git_files_read_only() {
    let (ws, _) = git_workspace();
    let out = ws.path().join("out-bundle");
    let o = export_oci(&ws, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let mounts = cfg["mounts"].as_array().unwrap();
    let pos = |dst: &Path| {
        mounts
            .iter()
            .position(|m| m["destination"] == dst.to_str().unwrap())
            .unwrap_or_else(|| panic!("no mount at {}: {mounts:?}", dst.display()))
    };
    let opts = |i: usize| mounts[i]["options"].to_string();
    let (w, g) = (pos(ws.path()), pos(&ws.path().join(".git")));
    assert!(w < g && opts(g).contains("\"rw\""), "{mounts:?}");
    for e in ["config", "hooks", "info", "commondir", "config.worktree"] {
        let i = pos(&ws.path().join(".git").join(e));
        assert!(i > g && opts(i).contains("\"ro\""), "{e}: {}", opts(i));
        assert_eq!(mounts[i]["uidMappings"], mounts[w]["uidMappings"], "{e}");
    }
}

#[test]
fn an_etc_skeleton_cache_someone_else_can_write_is_not_bound() {
    let ws = Workspace::new();
    let cache = tempfile::Builder::new()
        .prefix("aither-cache-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = [("AITHER_CACHE_DIR", cache.path().to_str().unwrap())];
    let passwd = ["cat", "/etc/passwd"];
    // A first run prepares the skeleton: root's, 0755 (pid 1 must traverse it).
    let first = run_with_env(&ws, "strict", &[], &passwd, &env);
    assert!(first.ok().contains("agent"), "{}", first.describe());
    let etc = cache.path().join("etc");
    let md = std::fs::metadata(&etc).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o755));
    let skeletons: Vec<PathBuf> = std::fs::read_dir(&etc)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!skeletons.is_empty());
    // Taken over: the directory is another uid's and a skeleton's passwd is edited.
    for s in &skeletons {
        let p = s.join("passwd");
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("pwned:x:0:0::/:/bin/sh\n");
        std::fs::write(&p, text).unwrap();
    }
    std::os::unix::fs::chown(&etc, Some(4242), Some(4242)).unwrap();
    let second = run_with_env(&ws, "strict", &[], &passwd, &env);
    assert!(second.ok().contains("agent"), "{}", second.describe());
    assert!(!second.stdout.contains("pwned"), "{}", second.describe());
    // A group- or other-writable one of root's is narrowed, then used.
    std::os::unix::fs::chown(&etc, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o777)).unwrap();
    let third = run_with_env(&ws, "strict", &[], &["true"], &env);
    third.ok();
    assert_eq!(std::fs::metadata(&etc).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn a_git_config_or_hook_hard_linked_into_the_workspace_refuses_the_launch() {
    // A hard link made earlier (e.g. by an agent under a writable policy): through its other
    // name the file would stay writable under the read-only bind.
    for victim in [".git/config", ".git/hooks/pre-commit"] {
        let (ws, _) = git_workspace();
        let p = ws.path().join(victim);
        if !p.exists() {
            std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        }
        std::fs::hard_link(&p, ws.path().join("other-name")).unwrap();
        let r = sh(&ws, "strict", "echo RAN");
        assert_ne!(r.code(), 0, "{victim}: {}", r.describe());
        assert!(!r.stdout.contains("RAN"), "{victim}: {}", r.describe());
        assert!(
            r.stderr.contains("hard links"),
            "{victim}: {}",
            r.describe()
        );
    }
}
