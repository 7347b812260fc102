//! aitherd's configuration file (issue 20, docs/daemon.md "Configuration file"), end to end as
//! root: a private aitherd on a real socket started with `--config`, the operator's CLI, SIGHUP.
//! A limit from the file holds; `aitherctl daemon reload` and SIGHUP change it for new agents;
//! a bad file at start is refused naming line and field, a bad file at reload keeps the running
//! configuration and the daemon serving; a group-writable, foreign-owned or linked file is
//! refused; metrics are on by default on a Unix socket beside the control socket. Waits are
//! bounded polls for a condition, never sleeps.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::daemon::{init_path, TestDaemon as Daemon, AITHERD};
use common::{poll_until, require_root, unique, wait_with_deadline};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// A configuration file in a private directory under /var/tmp, root's and 0644.
struct Conf {
    dir: tempfile::TempDir,
}

impl Conf {
    fn new(text: &str) -> Conf {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("aither-conf-")
            .tempdir_in("/var/tmp")
            .expect("conf dir");
        let c = Conf { dir };
        c.write(text);
        c
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("aitherd.toml")
    }

    fn arg(&self) -> String {
        self.path().to_str().unwrap().to_string()
    }

    /// Replaces the file whole (a new file renamed over it, as an editor or a package would).
    fn write(&self, text: &str) {
        let tmp = self.dir.path().join("aitherd.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }
}

fn spawn(d: &Daemon, name: &str) -> Output {
    d.ctl(&["spawn", "--policy", "strict", name, "--", "sleep", "300"])
}

fn assert_spawns(d: &Daemon, name: &str) {
    let o = spawn(d, name);
    assert!(
        o.status.success(),
        "spawn {name}: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
}

fn assert_refused(d: &Daemon, name: &str, why: &str) {
    let o = spawn(d, name);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(why),
        "spawn {name} should be refused with {why:?}: {err}"
    );
}

fn config(d: &Daemon) -> Value {
    d.json(&["daemon", "config", "--json"])
}

fn max_agents(d: &Daemon) -> Value {
    config(d)["config"]["limits"]["max_agents"].clone()
}

fn sighup(d: &Daemon) {
    kill(Pid::from_raw(d.pid()), Signal::SIGHUP).expect("SIGHUP to the daemon this test started");
}

fn audit_lines(d: &Daemon, kind: &str) -> Vec<Value> {
    d.audit_records()
        .into_iter()
        .filter(|v| v["kind"] == kind)
        .collect()
}

#[test]
fn a_limit_from_the_file_holds_and_reload_and_sighup_change_it_for_new_agents() {
    let conf = Conf::new("# the host's cap\n[limits]\nmax_agents = 1\n");
    let d = Daemon::start("aitherd-conf-limit-", &["--config", &conf.arg()]);
    let names: Vec<String> = (0..4).map(|_| unique("conf")).collect();
    assert_spawns(&d, &names[0]);
    assert_refused(&d, &names[1], "max_agents");
    let c = config(&d);
    assert_eq!(c["config"]["limits"]["max_agents"], 1, "{c}");
    assert_eq!(c["sources"]["limits.max_agents"], "file", "{c}");
    assert_eq!(c["sources"]["limits.request_rate"], "default", "{c}");

    // `aitherctl daemon reload`: the cap goes up for new agents; a GPU backend change is
    // reported as needing a restart and not applied.
    conf.write("[limits]\nmax_agents = 2\n\n[gpu]\nbackend = \"none\"\n");
    let r = d.json(&["daemon", "reload", "--json"]);
    let fields = |k: &str| -> Vec<String> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(fields("changed"), ["limits.max_agents"], "{r}");
    assert_eq!(r["changed"][0]["old"], 1, "{r}");
    assert_eq!(r["changed"][0]["new"], 2, "{r}");
    assert_eq!(fields("restart_required"), ["gpu.backend"], "{r}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 0, "{r}");
    assert!(config(&d)["config"]["gpu"].get("backend").is_none());
    assert_spawns(&d, &names[1]);
    assert_refused(&d, &names[2], "max_agents");
    let human = d.ok(&["daemon", "reload"]);
    assert!(
        human.contains("need a restart") && human.contains("gpu.backend"),
        "{human}"
    );
    let audited = audit_lines(&d, "daemon_reload");
    assert!(
        audited.iter().any(
            |a| a["data"]["changed"][0]["field"] == "limits.max_agents" && a["caller_uid"] == 0
        ),
        "{audited:?}"
    );

    // SIGHUP does the same; retention applies at once too (the bus log's limits).
    conf.write("[limits]\nmax_agents = 3\n[retention]\nbus_max_bytes = \"64M\"\n");
    sighup(&d);
    assert!(
        poll_until(Duration::from_secs(20), || max_agents(&d) == 3),
        "SIGHUP did not reload: {}",
        d.log()
    );
    assert_spawns(&d, &names[2]);
    assert_refused(&d, &names[3], "holds 3 agents");
    let streams = d.json(&["bus", "streams", "--json"]);
    assert_eq!(
        streams["streams"][0]["log"]["max_bytes"],
        64 << 20,
        "{streams}"
    );
    let c = config(&d);
    assert_eq!(c["config"]["retention"]["bus_max_bytes"], "64M", "{c}");
    assert_eq!(c["sources"]["retention.bus_max_bytes"], "file", "{c}");
}

#[test]
fn only_admins_may_reload_or_read_it_and_flags_win_over_the_file() {
    use common::users::Users;
    let us = Users::create();
    // The file names a group that does not exist; the test's --group flag wins.
    let conf = Conf::new("[daemon]\ngroup = \"no-such-group\"\n[limits]\nmax_agents = 7\n");
    let d = us.daemon_with(&["--config", &conf.arg()]);
    let member = &us.users[0];
    for args in [["daemon", "reload"], ["daemon", "config"]] {
        let o = us.ctl(&d, 0, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("aither-admin"), "{err}");
    }
    assert!(
        audit_lines(&d, "daemon_reload")
            .iter()
            .any(|a| a["decision"] == "deny" && a["caller_uid"] == member.uid),
        "{:?}",
        audit_lines(&d, "daemon_reload")
    );
    assert_eq!(max_agents(&d), 7);
    // The admin may.
    conf.write("[limits]\nmax_agents = 8\n");
    let r: Value = serde_json::from_str(&us.ok(&d, 2, &["daemon", "reload", "--json"])).unwrap();
    assert_eq!(r["changed"][0]["field"], "limits.max_agents", "{r}");
    let c: Value = serde_json::from_str(&us.ok(&d, 2, &["daemon", "config", "--json"])).unwrap();
    assert_eq!(c["sources"]["daemon.group"], "flag", "{c}");
    assert_eq!(
        c["config"]["daemon"]["group"],
        us.member_group.as_str(),
        "{c}"
    );
    assert_eq!(c["config"]["limits"]["max_agents"], 8, "{c}");
}

#[test]
fn a_bad_file_at_reload_keeps_the_running_configuration_and_the_daemon_serving() {
    let conf = Conf::new("[limits]\nmax_agents = 1\n");
    let d = Daemon::start("aitherd-conf-bad-", &["--config", &conf.arg()]);
    let (a, b) = (unique("conf-bad"), unique("conf-bad"));
    assert_spawns(&d, &a);

    // A misspelt field: refused naming file, line and field; nothing changes.
    conf.write("[limits]\nmax_agents = 5\nmax_agnts = 5\n");
    let o = d.ctl(&["daemon", "reload"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("line 3") && err.contains("limits.max_agnts") && err.contains("aitherd.toml"),
        "{err}"
    );
    assert!(err.contains("running one is kept"), "{err}");
    assert_eq!(max_agents(&d), 1);
    assert_refused(&d, &b, "max_agents");
    let audited = audit_lines(&d, "daemon_reload");
    assert!(
        audited.iter().any(|a| a["data"]["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())),
        "{audited:?}"
    );

    // A value out of range, by SIGHUP: the log says why, the daemon goes on serving.
    conf.write("[retention]\naudit_keep = 0\n[limits]\nmax_agents = 5\n");
    sighup(&d);
    assert!(
        poll_until(Duration::from_secs(20), || d
            .log()
            .contains("retention.audit_keep")),
        "{}",
        d.log()
    );
    assert!(d.log().contains("not reloaded"), "{}", d.log());
    assert_eq!(max_agents(&d), 1);

    // Made group-writable: refused at reload too.
    conf.write("[limits]\nmax_agents = 5\n");
    std::fs::set_permissions(conf.path(), std::fs::Permissions::from_mode(0o664)).unwrap();
    let o = d.ctl(&["daemon", "reload"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("go-w"), "{err}");
    assert_eq!(max_agents(&d), 1);

    // Mended: applied.
    std::fs::set_permissions(conf.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    d.ok(&["daemon", "reload"]);
    assert_eq!(max_agents(&d), 5);
    assert_spawns(&d, &b);
}

/// aitherd started with `args` on a private state dir; it must fail: its stderr.
fn start_fails(args: &[&str]) -> String {
    require_root();
    let state = tempfile::Builder::new()
        .prefix("aitherd-conf-start-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let log = state.path().join("aitherd.err");
    let mut c = Command::new(AITHERD);
    c.env("AITHER_STATE_DIR", state.path().join("state"))
        .env("AITHER_SOCKET", state.path().join("aitherd.sock"))
        .env("AITHER_POLICY_DIR", common::policy_dir())
        .env("AITHER_INIT", init_path())
        .env("AITHER_AUDIT_LOG", state.path().join("audit.jsonl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = c.spawn().expect("start aitherd");
    let st = wait_with_deadline(&mut child, "aitherd", Duration::from_secs(30));
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!st.success(), "aitherd started with {args:?}: {err}");
    assert!(
        !state.path().join("aitherd.sock").exists(),
        "a refused start left a socket"
    );
    err
}

#[test]
fn a_bad_file_at_start_is_refused_naming_line_and_field() {
    let conf = Conf::new("[metrics]\nlisten = \"off\"\n\n[limits]\nrequest_rate = \"fast\"\n");
    let err = start_fails(&["--config", &conf.arg()]);
    assert!(
        err.contains("line 5") && err.contains("limits.request_rate") && err.contains(&conf.arg()),
        "{err}"
    );
    conf.write("[limitz]\nmax_agents = 1\n");
    let err = start_fails(&["--config", &conf.arg()]);
    assert!(err.contains("line 1") && err.contains("limitz"), "{err}");
    // The simulated GPU backend cannot be named in aitherd.toml.
    conf.write("[gpu]\nbackend = \"simulated\"\n");
    let err = start_fails(&["--config", &conf.arg()]);
    assert!(err.contains("gpu.backend"), "{err}");
    // An explicit file must exist.
    let missing = conf.dir.path().join("none.toml");
    let err = start_fails(&["--config", missing.to_str().unwrap()]);
    assert!(err.contains("none.toml"), "{err}");
}

#[test]
fn a_group_writable_foreign_or_linked_file_is_refused() {
    let conf = Conf::new("[limits]\nmax_agents = 1\n");
    std::fs::set_permissions(conf.path(), std::fs::Permissions::from_mode(0o664)).unwrap();
    let err = start_fails(&["--config", &conf.arg()]);
    assert!(err.contains("0664") && err.contains("go-w"), "{err}");
    std::fs::set_permissions(conf.path(), std::fs::Permissions::from_mode(0o646)).unwrap();
    let err = start_fails(&["--config", &conf.arg()]);
    assert!(err.contains("0646"), "{err}");
    std::fs::set_permissions(conf.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(conf.path(), Some(65534), None).unwrap();
    let err = start_fails(&["--config", &conf.arg()]);
    assert!(err.contains("owned by uid 65534"), "{err}");
    std::os::unix::fs::chown(conf.path(), Some(0), None).unwrap();
    // A link to a good file, and a good file under a linked directory.
    let link = conf.dir.path().join("link.toml");
    std::os::unix::fs::symlink(conf.path(), &link).unwrap();
    let err = start_fails(&["--config", link.to_str().unwrap()]);
    assert!(err.contains("symbolic link"), "{err}");
    let dirlink = conf.dir.path().join("etc");
    std::os::unix::fs::symlink(conf.dir.path(), &dirlink).unwrap();
    let err = start_fails(&["--config", dirlink.join("aitherd.toml").to_str().unwrap()]);
    assert!(err.contains("symbolic link"), "{err}");
}

fn get_unix(path: &Path) -> String {
    let mut s = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn metrics_are_served_on_a_local_socket_by_default_and_a_reload_moves_them() {
    let conf = Conf::new("# every default\n");
    let d = Daemon::start("aitherd-conf-metrics-", &["--config", &conf.arg()]);
    let sock = d.socket().with_file_name("metrics.sock");
    let m = get_unix(&sock);
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("aither_agents"), "{m}");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o007, 0, "metrics socket mode {mode:o}");
    let c = config(&d);
    assert_eq!(
        c["config"]["metrics"]["listen"],
        format!("unix:{}", sock.display()),
        "{c}"
    );
    assert_eq!(c["sources"]["metrics.listen"], "default", "{c}");
    let human = d.ok(&["daemon", "config"]);
    assert!(
        human.contains(&format!(
            "metrics.listen = \"unix:{}\"  # default",
            sock.display()
        )) && human.contains("limits.request_rate = 200.0  # default"),
        "{human}"
    );

    // Moved by a reload: the new socket serves, the old one is gone.
    let moved = conf.dir.path().join("m2.sock");
    conf.write(&format!(
        "[metrics]\nlisten = \"unix:{}\"\n",
        moved.display()
    ));
    let r = d.json(&["daemon", "reload", "--json"]);
    assert_eq!(r["changed"][0]["field"], "metrics.listen", "{r}");
    assert!(get_unix(&moved).starts_with("HTTP/1.1 200"));
    assert!(!sock.exists());
    // Off.
    conf.write("[metrics]\nlisten = \"off\"\n");
    d.ok(&["daemon", "reload"]);
    assert!(!moved.exists());
}
