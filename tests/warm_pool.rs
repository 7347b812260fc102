//! aitherd's pool of prepared sandboxes (issue 21, daemon/pool.rs, docs/daemon.md "Warm
//! start"), seen from outside: the prepared sandboxes are `aither-init pool` children of a
//! real aitherd. A shape's first run is launched cold and makes the shape known; the pool then
//! prepares sandboxes for it; the next run of that shape is served by one of them (that
//! launcher is gone after the run: used once) with the caller's own streams, workspace and a
//! fresh /tmp and pid namespace; a run of another shape never takes one; `[pool] size`
//! bounds them; aitherd's exit tears them down with their cgroups.
//!
//! Needs root (the daemon and the sandboxes).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::daemon::TestDaemon;
use common::poll_until;

const WAIT: Duration = Duration::from_secs(30);

/// The pids of `aither-init pool` processes whose parent is `daemon` (the prepared sandboxes'
/// launchers, and those serving a run).
fn pool_launchers(daemon: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The fields after the command's closing parenthesis: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid != Some(daemon) {
            continue;
        }
        let cl = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cl.split(|b| *b == 0).collect();
        if args.get(1) == Some(&b"pool".as_slice()) {
            v.push(pid);
        }
    }
    v.sort();
    v
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `aitherctl run` against `d` with `flags`, `sh -c script`, in `ws`: (code, stdout, stderr).
fn run_in(
    d: &TestDaemon,
    ws: &std::path::Path,
    flags: &[&str],
    script: &str,
) -> (i32, String, String) {
    let mut args = vec![
        "run",
        "--policy",
        "strict",
        "--workspace",
        ws.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let out = d
        .cmd(&args)
        .stdin(Stdio::null())
        .output()
        .expect("aitherctl run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn workspace() -> tempfile::TempDir {
    let ws = tempfile::Builder::new()
        .prefix("aither-warm-pool-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(ws.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    ws
}

/// Cgroup directories of the pool launcher `pid` left anywhere under the v1 and v2 trees.
fn cgroups_of(pid: i32) -> Vec<String> {
    let out = std::process::Command::new("find")
        .args([
            "/sys/fs/cgroup",
            "-maxdepth",
            "6",
            "-type",
            "d",
            "-name",
            &format!("pool-{pid}"),
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn a_shapes_next_run_is_served_by_a_prepared_sandbox_used_once_and_fresh() {
    let d = TestDaemon::start("aitherd-pool-", &[]);
    let ws = workspace();
    assert!(
        pool_launchers(d.pid()).is_empty(),
        "nothing is prepared before a shape has run"
    );
    let probe = "echo $(readlink /proc/self/ns/pid); ls -A /tmp; touch /tmp/left-behind; echo x > pooled.txt; echo $AITHER_AGENT; exit 5";
    // First run of the shape: cold, and the shape is learnt.
    let (c1, o1, e1) = run_in(&d, ws.path(), &["--name", "first"], probe);
    assert_eq!(c1, 5, "{e1}");
    // The default [pool] size is 2.
    assert!(
        poll_until(WAIT, || pool_launchers(d.pid()).len() == 2),
        "the pool did not prepare 2 sandboxes for the shape: {:?}\n{}",
        pool_launchers(d.pid()),
        d.log()
    );
    let prepared = pool_launchers(d.pid());
    std::fs::remove_file(ws.path().join("pooled.txt")).unwrap();

    // Second run, same shape: one prepared sandbox serves it.
    let (c2, o2, e2) = run_in(&d, ws.path(), &["--name", "second"], probe);
    assert_eq!(c2, 5, "{e2}");
    // Its launcher may still be tearing the sandbox down when the client has the status.
    let gone = || -> Vec<i32> { prepared.iter().copied().filter(|p| !alive(*p)).collect() };
    poll_until(WAIT, || !gone().is_empty());
    let used = gone();
    assert_eq!(
        used.len(),
        1,
        "exactly one prepared sandbox served the run and is gone: {prepared:?}\n{}",
        d.log()
    );
    // Its caller's name and workspace, a fresh /tmp, its own pid namespace.
    assert!(o2.lines().any(|l| l == "second"), "{o2}");
    assert!(
        ws.path().join("pooled.txt").exists(),
        "the workspace was not the caller's"
    );
    assert!(!o2.contains("left-behind"), "/tmp was not fresh: {o2}");
    let ns = |o: &str| o.lines().next().unwrap_or_default().to_string();
    assert_ne!(ns(&o1), ns(&o2), "two runs, one pid namespace");
    assert!(ns(&o2).starts_with("pid:["), "{o2}");
    // Used once: the run's launcher is gone with its cgroups, and the pool is refilled.
    assert!(
        poll_until(WAIT, || cgroups_of(used[0]).is_empty()),
        "the served sandbox's cgroups are left: {:?}",
        cgroups_of(used[0])
    );
    assert!(
        poll_until(WAIT, || pool_launchers(d.pid()).len() == 2),
        "the pool was not refilled: {:?}",
        pool_launchers(d.pid())
    );
    // aitherd's log says how each was served.
    // Refilled once the served launcher is gone; then a warm run's timeout.
    assert!(
        poll_until(WAIT, || pool_launchers(d.pid()).len() == 2),
        "the pool was not refilled: {}",
        d.log()
    );
    let (c3, _, e3) = run_in(&d, ws.path(), &["--timeout", "1s"], "sleep 60");
    assert_eq!(c3, 124, "{e3}\n{}", d.log());
    assert!(
        e3.contains("aither: timeout"),
        "the timeout's message: {e3}"
    );
    let log = d.log();
    let warm: Vec<bool> = log
        .lines()
        .filter(|l| l.contains("run ended"))
        .map(|l| l.contains("warm=true"))
        .collect();
    assert_eq!(warm, [false, true, true], "aitherd's log: {log}");
}

#[test]
fn a_run_of_another_shape_takes_no_prepared_sandbox_and_aitherds_exit_tears_them_down() {
    let mut d = TestDaemon::start("aitherd-pool-shape-", &[]);
    let ws = workspace();
    let (c, _, e) = run_in(&d, ws.path(), &[], "exit 0");
    assert_eq!(c, 0, "{e}");
    assert!(
        poll_until(WAIT, || pool_launchers(d.pid()).len() == 2),
        "{:?}",
        pool_launchers(d.pid())
    );
    let prepared = pool_launchers(d.pid());
    // Another memory limit is another shape: served cold, it takes none of these.
    let (c, out, e) = run_in(&d, ws.path(), &["--memory", "96M"], "echo other-shape");
    assert_eq!((c, out.as_str()), (0, "other-shape\n"), "{e}");
    assert!(
        prepared.iter().all(|p| alive(*p)),
        "a run of another shape took a prepared sandbox: {prepared:?}"
    );
    // aitherd goes: each prepared sandbox sees its control socket close and tears down.
    d.sigterm();
    assert!(
        poll_until(WAIT, || prepared.iter().all(|p| !alive(*p))),
        "prepared sandboxes outlived aitherd: {prepared:?}"
    );
    for p in &prepared {
        assert!(
            poll_until(WAIT, || cgroups_of(*p).is_empty()),
            "cgroups of a prepared sandbox are left: {:?}",
            cgroups_of(*p)
        );
    }
}

#[test]
fn pool_size_in_aitherd_toml_bounds_the_prepared_sandboxes_and_zero_turns_the_pool_off() {
    for (size, want) in [(1usize, 1usize), (0, 0)] {
        let dir = tempfile::Builder::new()
            .prefix("aither-pool-conf-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let conf = dir.path().join("aitherd.toml");
        std::fs::write(&conf, format!("[pool]\nsize = {size}\n")).unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
        let d = TestDaemon::start("aitherd-pool-size-", &["--config", conf.to_str().unwrap()]);
        let ws = workspace();
        for _ in 0..2 {
            let (c, _, e) = run_in(&d, ws.path(), &[], "exit 0");
            assert_eq!(c, 0, "{e}");
        }
        if want > 0 {
            assert!(
                poll_until(WAIT, || pool_launchers(d.pid()).len() == want),
                "size {size}: {:?}",
                pool_launchers(d.pid())
            );
        }
        // Settled: no more than `want`, a while later too.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(pool_launchers(d.pid()).len(), want, "[pool] size = {size}");
    }
}

/// Host pids whose command line mentions `marker`.
fn pids_marked(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cl = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cl).contains(marker).then_some(pid)
        })
        .collect()
}

/// A run's status reaches the client as soon as nothing of its agent is left (the teardown of
/// the sandbox follows), cold (a shape's first run: `aither-init --status-fd`) and warm (a
/// prepared sandbox's `exited`): when `aitherctl run` has exited, a background child the
/// agent left holding its stdout is gone, the output is whole, and the launcher and its
/// cgroups go shortly after. A warm run's timeout is 124 with the cold run's message.
#[test]
fn a_runs_status_comes_once_nothing_of_the_agent_is_left_cold_and_warm() {
    let d = TestDaemon::start("aitherd-pool-early-", &[]);
    let ws = workspace();
    let marker = format!("warm-leftover-{}", std::process::id());
    let script = format!(
        "sh -c 'echo bg-up; touch /tmp/up; sleep 1000; : {marker}' & \
         while [ ! -e /tmp/up ]; do sleep 0.01; done; echo out; exit 3"
    );
    // Cold: the shape is learnt.
    let (c1, o1, e1) = run_in(&d, ws.path(), &[], &script);
    let left = pids_marked(&marker);
    assert!(
        left.is_empty(),
        "cold: the agent's background child {left:?} outlived the status its client got"
    );
    assert_eq!((c1, o1.as_str()), (3, "bg-up\nout\n"), "{e1}");
    assert!(
        poll_until(WAIT, || pool_launchers(d.pid()).len() == 2),
        "the pool did not prepare the shape: {}",
        d.log()
    );
    let prepared = pool_launchers(d.pid());
    // Warm.
    let (c2, o2, e2) = run_in(&d, ws.path(), &[], &script);
    let left = pids_marked(&marker);
    assert!(
        left.is_empty(),
        "the agent's background child {left:?} outlived the status its client got"
    );
    assert_eq!(c2, 3, "{e2}\n{}", d.log());
    assert_eq!(o2, "bg-up\nout\n", "all the output, then EOF");
    let gone = || -> Vec<i32> { prepared.iter().copied().filter(|p| !alive(*p)).collect() };
    assert!(
        poll_until(WAIT, || gone().len() == 1),
        "the prepared sandbox that served the run did not end: {prepared:?}\n{}",
        d.log()
    );
    let used = gone()[0];
    assert!(
        poll_until(WAIT, || cgroups_of(used).is_empty()),
        "the served sandbox's cgroups are left: {:?}",
        cgroups_of(used)
    );
    let log = d.log();
    let warm: Vec<bool> = log
        .lines()
        .filter(|l| l.contains("run ended"))
        .map(|l| l.contains("warm=true"))
        .collect();
    assert_eq!(warm, [false, true], "aitherd's log: {log}");
}
