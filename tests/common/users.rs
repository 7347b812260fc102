//! Test users and groups made with `useradd`/`groupadd` (two members and an admin), the
//! private aitherd that takes them as its member and admin groups, and `aitherctl` run as
//! each of them through `setpriv`. Used by the multi-user and egress suites; removed on drop.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::daemon::TestDaemon;
use super::{poll_until, require_root, AITHERCTL};

const WAIT: Duration = Duration::from_secs(30);

pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Test users and groups, removed on drop.
pub struct Users {
    pub member_group: String,
    pub admin_group: String,
    pub member_gid: u32,
    pub admin_gid: u32,
    pub users: Vec<User>,
    /// A root-owned 0711 directory holding each user's own 0700 directory.
    pub base: tempfile::TempDir,
}

pub fn sh(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn id_of(flag: &str, name: &str) -> u32 {
    let o = Command::new("id").args([flag, name]).output().expect("id");
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {flag} {name}: {o:?}"))
}

pub fn gid_of_group(name: &str) -> u32 {
    let o = Command::new("getent")
        .args(["group", name])
        .output()
        .expect("getent");
    String::from_utf8_lossy(&o.stdout)
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or_else(|| panic!("no group {name}"))
}

impl Users {
    /// Two members (0, 1) and an admin (2).
    pub fn create() -> Users {
        require_root();
        // Tests run in parallel: one set of names per call.
        let tag = format!("aither-t-{}-{}", std::process::id(), super::next_id());
        let member_group = format!("{tag}-m");
        let admin_group = format!("{tag}-a");
        let base = tempfile::Builder::new()
            .prefix("aither-mu-")
            .tempdir_in("/var/tmp")
            .expect("base dir");
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let mut u = Users {
            member_group: member_group.clone(),
            admin_group: admin_group.clone(),
            member_gid: 0,
            admin_gid: 0,
            users: Vec::new(),
            base,
        };
        sh("groupadd", &[&member_group]);
        sh("groupadd", &[&admin_group]);
        u.member_gid = gid_of_group(&member_group);
        u.admin_gid = gid_of_group(&admin_group);
        for i in 1..=3 {
            let name = format!("{tag}-{i}");
            let groups = if i == 3 {
                format!("{member_group},{admin_group}")
            } else {
                member_group.clone()
            };
            sh(
                "useradd",
                &["-M", "-U", "-s", "/usr/sbin/nologin", "-G", &groups, &name],
            );
            let user = User {
                uid: id_of("-u", &name),
                gid: id_of("-g", &name),
                name,
            };
            let dir = u.dir(&user);
            std::fs::create_dir(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            u.users.push(user);
        }
        u
    }

    /// The user's own directory (0700, theirs).
    pub fn dir(&self, user: &User) -> PathBuf {
        self.base.path().join(&user.name)
    }

    /// The private daemon, with the test's groups as member and admin groups, its socket
    /// reachable by them (0660 root:<member group> in a 0711 directory).
    pub fn daemon(&self) -> TestDaemon {
        self.daemon_with(&[])
    }

    pub fn daemon_with(&self, extra: &[&str]) -> TestDaemon {
        self.daemon_env(extra, &[])
    }

    pub fn daemon_env(&self, extra: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        let mut args = vec![
            "--group",
            &self.member_group,
            "--admin-group",
            &self.admin_group,
        ];
        args.extend_from_slice(extra);
        let d = TestDaemon::start_env("aitherd-mu-", &args, env);
        std::fs::set_permissions(d.state.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        // aitherd answers as soon as it listens; the socket's group and then its mode follow
        // right after (two calls: waited for together).
        let sock = d.socket();
        assert!(
            poll_until(WAIT, || std::fs::metadata(&sock).is_ok_and(|m| m.gid()
                == self.member_gid
                && m.mode() & 0o777 == 0o660)),
            "the socket never got group {} and mode 0660: {:?}",
            self.member_group,
            std::fs::metadata(&sock).map(|m| (m.gid(), m.mode() & 0o777))
        );
        d
    }

    /// `aitherctl ARGS` as user `i` (0, 1: members; 2: admin) in their own directory.
    pub fn ctl(&self, d: &TestDaemon, i: usize, args: &[&str]) -> Output {
        self.ctl_in(d, i, &self.dir(&self.users[i]), args)
    }

    /// `aitherctl ARGS` as user `i` in `cwd`, with the daemon's environment: setpriv with the
    /// user's uid and gid and the member group (and the admin group for user 2).
    fn command(&self, d: &TestDaemon, i: usize, cwd: &Path, args: &[&str]) -> Command {
        let u = &self.users[i];
        let groups = if i == 2 {
            format!("{},{}", self.member_gid, self.admin_gid)
        } else {
            self.member_gid.to_string()
        };
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            &u.uid.to_string(),
            "--regid",
            &u.gid.to_string(),
            "--groups",
            &groups,
            "--",
            AITHERCTL,
        ])
        .args(args)
        .current_dir(cwd);
        d.env(&mut c);
        c
    }

    /// `ctl` with `input` on stdin.
    pub fn ctl_input(&self, d: &TestDaemon, i: usize, args: &[&str], input: &str) -> Output {
        let mut child = self
            .command(d, i, &self.dir(&self.users[i]), args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("setpriv aitherctl");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// `aitherctl ARGS` as user `i` in `cwd`, stdin empty.
    pub fn ctl_in(&self, d: &TestDaemon, i: usize, cwd: &Path, args: &[&str]) -> Output {
        self.command(d, i, cwd, args)
            .stdin(Stdio::null())
            .output()
            .expect("setpriv aitherctl")
    }

    pub fn ok(&self, d: &TestDaemon, i: usize, args: &[&str]) -> String {
        let o = self.ctl(d, i, args);
        assert!(
            o.status.success(),
            "{} aitherctl {args:?}: {}{}\n--- daemon ---\n{}",
            self.users[i].name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            d.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Sends one raw frame as user `i` and returns the reply (python3 as the client, so the
    /// request can carry fields aitherctl would never send).
    pub fn raw(&self, d: &TestDaemon, i: usize, frame: &Value) -> Value {
        self.raw_fd(d, i, frame, "")
    }

    /// `raw` with a directory the user opens (O_RDONLY, or O_PATH when `path` starts with
    /// "path:") sent along (SCM_RIGHTS); "" sends none.
    pub fn raw_fd(&self, d: &TestDaemon, i: usize, frame: &Value, path: &str) -> Value {
        let u = &self.users[i];
        let script = r#"
import os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
body = sys.argv[2].encode()
msg = struct.pack(">I", len(body)) + body
p = sys.argv[3]
if p:
    flags = os.O_DIRECTORY | (os.O_PATH if p.startswith("path:") else os.O_RDONLY)
    fd = os.open(p.removeprefix("path:"), flags)
    socket.send_fds(s, [msg], [fd])
else:
    s.sendall(msg)
n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
print(s.recv(n, socket.MSG_WAITALL).decode())
"#;
        let o = Command::new("setpriv")
            .args([
                "--reuid",
                &u.uid.to_string(),
                "--regid",
                &u.gid.to_string(),
                "--groups",
                &self.member_gid.to_string(),
                "--",
                "/usr/bin/python3",
                "-c",
                script,
                &d.socket().display().to_string(),
                &frame.to_string(),
                path,
            ])
            .output()
            .expect("python3");
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
            panic!(
                "raw reply: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = Command::new("userdel").arg(&u.name).output();
            // -U made a group of the same name; userdel removes it when empty.
            let _ = Command::new("groupdel").arg(&u.name).output();
        }
        let _ = Command::new("groupdel").arg(&self.member_group).output();
        let _ = Command::new("groupdel").arg(&self.admin_group).output();
    }
}
