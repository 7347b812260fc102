//! `aitherctl cp` end to end, as root: a real daemon and supervised strict agents
//! (docs/agents.md "Copying files"). Copies out and in of files and directories; an agent's
//! links and crafted hostile streams (`..`, absolute names, a link then a file through it, a
//! hard link) change nothing on the host outside the destination; set-id bits never arrive;
//! a member of the aither group writes and reads only what they could themselves.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use aither::cp::tar::{EntryKind, Header, Reader, Writer};
use common::daemon::TestDaemon as Daemon;
use common::users::Users;
use common::{poll_until, unique};
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "status {}, stdout {:?}, stderr {:?}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// Spawns a strict agent running `setup` then `sleep 300`, and waits until it printed
/// "ready".
fn spawn_agent(d: &Daemon, name: &str, extra: &[&str], setup: &str) {
    let script = format!("{setup}; echo ready; exec sleep 300");
    let mut args = vec!["spawn", "--json", "--policy", "strict"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[name, "--", "sh", "-c", &script]);
    d.ok(&args);
    let ok = poll_until(Duration::from_secs(20), || {
        d.ok(&["logs", name]).contains("ready")
    });
    assert!(
        ok,
        "{name} did not start: {}\n{}",
        d.ok(&["logs", name]),
        d.log()
    );
}

fn cp(d: &Daemon, src: &str, dest: &str) -> Output {
    d.ctl(&["cp", src, dest])
}

fn cp_ok(d: &Daemon, src: &str, dest: &str) {
    let o = cp(d, src, dest);
    assert!(o.status.success(), "cp {src} {dest}: {}", describe(&o));
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn exec_out(d: &Daemon, name: &str, cmd: &str) -> String {
    let o = d.ctl(&["exec", name, "--", "sh", "-c", cmd]);
    assert!(o.status.success(), "exec {cmd}: {}", describe(&o));
    text(&o.stdout)
}

#[test]
// One agent, one scenario: each copy is checked against what the one before left.
#[allow(clippy::too_many_lines)]
fn files_and_directories_are_copied_out_and_in_as_docker_cp_does() {
    let d = Daemon::start("aitherd-cp-", &[]);
    let name = unique("cp");
    spawn_agent(
        &d,
        &name,
        &[],
        "mkdir -p /tmp/d/sub && echo one > /tmp/d/a && echo two > /tmp/d/sub/b && \
         ln -s a /tmp/d/link && echo file > /tmp/f",
    );
    // A set-user-id file the agent sees (the sandbox cannot make one: the host can).
    let suid = d.ws.path().join("suid");
    std::fs::copy("/bin/true", &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let suid = suid.to_str().unwrap().to_string();
    assert_eq!(exec_out(&d, &name, &format!("stat -c %a {suid}")), "4755\n");
    let host = tempfile::tempdir_in("/var/tmp").unwrap();
    let h = |rel: &str| host.path().join(rel);
    let hs = |rel: &str| h(rel).to_str().unwrap().to_string();
    let a = |p: &str| format!("{name}:{p}");

    // A file: into an existing directory, under a new name, over an existing file.
    cp_ok(&d, &a("/tmp/f"), &(hs("") + "/"));
    assert_eq!(read(&h("f")), "file\n");
    cp_ok(&d, &a("/tmp/f"), &hs("renamed"));
    assert_eq!(read(&h("renamed")), "file\n");
    std::fs::write(h("renamed"), "old").unwrap();
    cp_ok(&d, &a("/tmp/d/a"), &hs("renamed"));
    assert_eq!(read(&h("renamed")), "one\n");
    // Files land as the caller's (root here), set-id bits dropped.
    cp_ok(&d, &a(&suid), &hs("suid"));
    let m = std::fs::metadata(h("suid")).unwrap();
    assert_eq!(
        m.permissions().mode() & 0o7777,
        0o755,
        "set-id bits arrived"
    );
    assert_eq!(m.uid(), 0);

    // A directory: created when missing, into an existing one, or its contents (/.).
    cp_ok(&d, &a("/tmp/d"), &hs("dcopy"));
    assert_eq!(read(&h("dcopy/a")), "one\n");
    assert_eq!(read(&h("dcopy/sub/b")), "two\n");
    assert_eq!(std::fs::read_link(h("dcopy/link")).unwrap(), Path::new("a"));
    cp_ok(&d, &a("/tmp/d"), &hs("dcopy"));
    assert_eq!(read(&h("dcopy/d/sub/b")), "two\n");
    std::fs::create_dir(h("contents")).unwrap();
    cp_ok(&d, &a("/tmp/d/."), &hs("contents"));
    assert_eq!(read(&h("contents/sub/b")), "two\n");

    // Errors name the path; exit 1.
    let o = cp(&d, &a("/tmp/nope"), &hs("x"));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(text(&o.stderr).contains("/tmp/nope"), "{}", describe(&o));
    let o = cp(&d, &a("/tmp/f"), &(hs("no-dir") + "/"));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("no such directory"),
        "{}",
        describe(&o)
    );
    let o = cp(&d, &a("/tmp/f"), &(hs("f") + "/"));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("not a directory"),
        "{}",
        describe(&o)
    );
    assert_eq!(read(&h("f")), "file\n");
    let o = cp(&d, &a("/tmp/d"), &hs("f"));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("not a directory"),
        "{}",
        describe(&o)
    );
    let o = cp(&d, "no-such-agent:/tmp/f", &hs("y"));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("no agent named"),
        "{}",
        describe(&o)
    );
    let o = d.ctl(&["cp", &hs("f"), &hs("g")]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));

    // `-`: the tar stream on stdout.
    let o = cp(&d, &a("/tmp/d"), "-");
    assert!(o.status.success(), "{}", describe(&o));
    let mut r = Reader::new(&o.stdout[..]);
    let mut names = vec![];
    while let Some(e) = r.next_entry().unwrap() {
        names.push(text(&e.path));
    }
    assert!(names.contains(&"./d/sub/b".to_string()), "{names:?}");

    // Into the agent: a file into a directory, a directory under a new name.
    std::fs::write(h("in.txt"), "to the agent\n").unwrap();
    std::fs::create_dir_all(h("indir/deep")).unwrap();
    std::fs::write(h("indir/deep/x"), "x\n").unwrap();
    cp_ok(&d, &hs("in.txt"), &a("/tmp/"));
    cp_ok(&d, &hs("indir"), &a("/tmp/newdir"));
    cp_ok(&d, &hs("in.txt"), &a("/tmp/d/a"));
    assert_eq!(
        exec_out(
            &d,
            &name,
            "cat /tmp/in.txt /tmp/newdir/deep/x /tmp/d/a; id -u; stat -c %u /tmp/in.txt"
        ),
        "to the agent\nx\nto the agent\n1000\n1000\n"
    );
    // The policy holds: /usr is read-only for the agent, so for a copy into it.
    let o = cp(&d, &hs("in.txt"), &a("/usr/"));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("agent side failed"),
        "{}",
        describe(&o)
    );
    assert!(!Path::new("/usr/in.txt").exists());
    let o = cp(&d, &hs("in.txt"), &a("/tmp/missing/"));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));

    // Audited as cp, with the direction and the agent's path.
    let audit = std::fs::read_to_string(d.audit_log()).unwrap_or_default();
    let rec: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "cp" && r["agent"] == name.as_str())
        .collect();
    assert!(
        rec.iter()
            .any(|r| r["decision"] == "allow" && r["data"]["copy"]["out"]["path"] == suid.as_str()),
        "{rec:#?}"
    );
    assert!(
        rec.iter()
            .any(|r| r["decision"] == "allow" && r["data"]["copy"]["in"]["dir"] == "/tmp"),
        "{rec:#?}"
    );
}

/// A crafted stream with the given members (file data, or a link's target).
fn crafted(entries: &[(&str, EntryKind, &str, u32)]) -> Vec<u8> {
    let mut w = Writer::new(Vec::new());
    for (path, kind, data, mode) in entries {
        let is_file = *kind == EntryKind::File;
        w.header(&Header {
            path: path.as_bytes().to_vec(),
            kind: *kind,
            mode: *mode,
            size: if is_file { data.len() as u64 } else { 0 },
            mtime: 0,
            link: if is_file {
                vec![]
            } else {
                data.as_bytes().to_vec()
            },
        })
        .unwrap();
        if is_file {
            w.data(&mut data.as_bytes(), data.len() as u64).unwrap();
        }
    }
    w.finish().unwrap()
}

#[test]
// The agent's links first, then one crafted stream per attack, against one agent.
#[allow(clippy::too_many_lines)]
fn an_agents_links_and_hostile_streams_change_nothing_outside_the_destination() {
    use EntryKind::*;
    let d = Daemon::start("aitherd-cp-", &[]);
    let ws = d.ws.path().to_str().unwrap().to_string();
    // The hostile agent's own `tar` (first on its PATH) sends a crafted stream when asked
    // for a member that has one in streams/, else the real tar's.
    let victim = tempfile::tempdir_in("/var/tmp").unwrap();
    let v = victim.path().to_str().unwrap().to_string();
    std::fs::create_dir(d.ws.path().join("bin")).unwrap();
    std::fs::create_dir(d.ws.path().join("streams")).unwrap();
    let fake = format!(
        "#!/bin/sh\nfor a; do last=$a; done\nn=${{last#./}}\n\
         [ -f {ws}/streams/$n.tar ] && exec cat {ws}/streams/$n.tar\nexec /usr/bin/tar \"$@\"\n"
    );
    std::fs::write(d.ws.path().join("bin/tar"), fake).unwrap();
    std::fs::set_permissions(
        d.ws.path().join("bin/tar"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let attacks: &[(&str, Vec<u8>, &str)] = &[
        (
            "abs",
            crafted(&[
                ("./abs", Dir, "", 0o755),
                (&format!("{v}/pwned"), File, "x", 0o644),
            ]),
            "absolute",
        ),
        (
            "dotdot",
            crafted(&[("./dotdot/../../pwned", File, "x", 0o644)]),
            "'..'",
        ),
        (
            "through",
            crafted(&[
                ("./through/", Dir, "", 0o755),
                ("./through/out", Symlink, &v, 0o777),
                ("./through/out/pwned", File, "x", 0o644),
            ]),
            "symbolic link",
        ),
        (
            "hard",
            crafted(&[("./hard", HardLink, "/etc/shadow", 0o644)]),
            "hard link",
        ),
        (
            // A name that would retitle the operator's terminal, printed escaped.
            "esc",
            crafted(&[("./esc/\u{1b}]0;owned\u{7}/../../pwned", File, "x", 0o644)]),
            "'..'",
        ),
        (
            "other",
            crafted(&[("./elsewhere/pwned", File, "x", 0o644)]),
            "outside",
        ),
    ];
    for (n, bytes, _) in attacks {
        std::fs::write(d.ws.path().join(format!("streams/{n}.tar")), bytes).unwrap();
    }
    let name = unique("cp-evil");
    let path = format!("PATH={ws}/bin:/usr/bin:/bin");
    spawn_agent(
        &d,
        &name,
        &["--env", &path],
        "ln -s /etc /tmp/out && ln -s /etc/shadow /tmp/sh && mkdir /tmp/abs /tmp/through",
    );
    let host = tempfile::tempdir_in("/var/tmp").unwrap();
    let dest = host.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let ds = dest.to_str().unwrap();

    // The agent's link to /etc arrives as a link; nothing of /etc is read or written.
    cp_ok(&d, &format!("{name}:/tmp/out"), &format!("{ds}/out"));
    assert_eq!(
        std::fs::read_link(dest.join("out")).unwrap(),
        Path::new("/etc")
    );
    cp_ok(&d, &format!("{name}:/tmp/sh"), &format!("{ds}/sh"));
    assert_eq!(
        std::fs::read_link(dest.join("sh")).unwrap(),
        Path::new("/etc/shadow")
    );
    // Through the link: resolved inside the sandbox (its curated /etc has no shadow).
    let o = cp(&d, &format!("{name}:/tmp/out/shadow"), ds);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(!dest.join("shadow").exists());
    // A copy into the link the copy made (dest/out -> /etc) is refused, never followed.
    let o = cp(&d, &format!("{name}:/tmp/sh"), &format!("{ds}/out/"));
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("symbolic link"),
        "{}",
        describe(&o)
    );
    assert!(
        std::fs::symlink_metadata("/etc/sh").is_err(),
        "written through the link"
    );

    for (n, _, why) in attacks {
        let o = cp(&d, &format!("{name}:/tmp/{n}"), ds);
        assert_eq!(o.status.code(), Some(1), "{n}: {}", describe(&o));
        let err = text(&o.stderr);
        assert!(err.contains(why), "{n}: {err}");
        assert!(
            !err.contains('\u{1b}') && !err.contains('\u{7}'),
            "{n}: {err:?}"
        );
    }
    assert_eq!(
        std::fs::read_dir(victim.path()).unwrap().count(),
        0,
        "a hostile stream wrote outside the destination"
    );
    assert!(!host.path().join("pwned").exists() && !Path::new("/var/tmp/pwned").exists());
    assert!(!dest.join("hard").exists() && !dest.join("elsewhere").exists());
    // What is left in dest: the two links, and the directories the attacks made first.
    let mut left: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["abs", "out", "sh", "through"], "{left:?}");
    assert_eq!(std::fs::read_dir(dest.join("abs")).unwrap().count(), 0);
}

#[test]
// One member's agent, then what that member and another may copy.
#[allow(clippy::too_many_lines)]
fn a_member_copies_only_where_they_could_read_and_write_themselves() {
    let us = Users::create();
    let d = us.daemon();
    let (u1, u2) = (&us.users[0], &us.users[1]);
    let name = unique("cp-mu");
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
            "echo secret-of-agent > /tmp/x; echo ready; exec sleep 300",
        ],
    );
    assert!(
        poll_until(Duration::from_secs(20), || us
            .ok(&d, 0, &["logs", &name])
            .contains("ready")),
        "{}",
        d.log()
    );
    let src = format!("{name}:/tmp/x");
    // Into their own directory: works, and the file is theirs.
    let mine = us.dir(u1).join("got");
    let o = us.ctl(&d, 0, &["cp", &src, mine.to_str().unwrap()]);
    assert!(o.status.success(), "{}", describe(&o));
    assert_eq!(read(&mine), "secret-of-agent\n");
    let m = std::fs::metadata(&mine).unwrap();
    assert_eq!((m.uid(), m.gid()), (u1.uid, u1.gid));

    // Where they cannot write: root's directory, another member's 0700 directory.
    let roots = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(roots.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let theirs = us.dir(u2).join("planted");
    for dest in [roots.path().join("planted"), theirs.clone()] {
        let o = us.ctl(&d, 0, &["cp", &src, dest.to_str().unwrap()]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}: {}",
            dest.display(),
            describe(&o)
        );
        assert!(
            text(&o.stderr).contains("Permission denied"),
            "{}",
            describe(&o)
        );
        assert!(!dest.exists(), "{} was written", dest.display());
    }
    // What they cannot read does not go in: /etc/shadow.
    let o = us.ctl(&d, 0, &["cp", "/etc/shadow", &format!("{name}:/tmp/")]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("Permission denied"),
        "{}",
        describe(&o)
    );
    let o = us.ctl(&d, 0, &["exec", &name, "--", "ls", "/tmp"]);
    assert_eq!(text(&o.stdout), "x\n", "{}", describe(&o));
    // Another member's agent does not exist for them.
    let o = us.ctl(&d, 1, &["cp", &src, us.dir(u2).join("y").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        text(&o.stderr).contains("no agent named"),
        "{}",
        describe(&o)
    );
    assert!(!us.dir(u2).join("y").exists());
}
