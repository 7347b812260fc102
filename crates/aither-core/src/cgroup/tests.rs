//! One table of limits, applied through both backends against fake cgroupfs roots: a value must
//! mean the same on v1 and v2 (STYLE.md practice 4).

use super::*;

use std::time::Duration;

fn fake_v1() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for c in ["memory", "cpu", "pids"] {
        fs::create_dir_all(d.path().join(c)).unwrap();
        fs::write(d.path().join(c).join("cgroup.procs"), "").unwrap();
    }
    d
}

fn fake_v2(controllers: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("cgroup.controllers"), controllers).unwrap();
    fs::write(d.path().join("cgroup.subtree_control"), "").unwrap();
    d
}

fn table() -> Vec<Limits> {
    vec![
        Limits {
            memory: Some(512 << 20),
            swap: Some(0),
            cpu: Some(CpuQuota::from_cpus(1.0)),
            pids: Some(128),
            devices: None,
        },
        Limits {
            memory: Some(64 << 20),
            swap: None,
            cpu: Some(CpuQuota::from_cpus(0.5)),
            pids: Some(2),
            devices: None,
        },
        Limits {
            memory: None,
            swap: None,
            cpu: Some(CpuQuota::from_cpus(2.0)),
            pids: None,
            devices: None,
        },
        Limits {
            memory: Some(1 << 30),
            swap: None,
            cpu: None,
            pids: Some(4096),
            devices: None,
        },
    ]
}

#[test]
fn the_same_limits_read_back_the_same_on_v1_and_v2() {
    for (i, limits) in table().into_iter().enumerate() {
        let r1 = fake_v1();
        let m1 = V1::new(r1.path().to_path_buf(), false);
        let cg1 = m1.create(&format!("t{i}-1"), &limits, &[]).unwrap();
        let r2 = fake_v2("cpu memory pids io");
        let m2 = V2::new(r2.path().to_path_buf());
        let cg2 = m2.create(&format!("t{i}-1"), &limits, &[]).unwrap();
        let mut back1 = m1.read_limits(&cg1).unwrap();
        let back2 = m2.read_limits(&cg2).unwrap();
        // v1 without memsw reports "no swap" through swappiness only when swap was requested 0.
        if limits.swap.is_none() {
            back1.swap = None;
        }
        assert_eq!(back1, limits, "v1 row {i}");
        assert_eq!(back2, limits, "v2 row {i}");
        cg1.remove().unwrap();
        cg2.remove().unwrap();
        assert!(!r1
            .path()
            .join("memory/aither")
            .join(format!("t{i}-1"))
            .exists());
    }
}

#[test]
fn v2_writes_the_kernel_files_and_enables_controllers_in_parents() {
    let r = fake_v2("cpuset cpu io memory pids");
    let m = V2::new(r.path().to_path_buf());
    let cg = m.create("x-1", &table()[0], &[]).unwrap();
    let d = r.path().join("aither/x-1");
    assert_eq!(
        fs::read_to_string(d.join("memory.max")).unwrap(),
        "536870912"
    );
    assert_eq!(fs::read_to_string(d.join("memory.swap.max")).unwrap(), "0");
    assert_eq!(
        fs::read_to_string(d.join("cpu.max")).unwrap(),
        "100000 100000"
    );
    assert_eq!(fs::read_to_string(d.join("pids.max")).unwrap(), "128");
    let sub = fs::read_to_string(r.path().join("aither/cgroup.subtree_control")).unwrap();
    assert_eq!(sub, "+memory +cpu +pids");
    assert_eq!(cg.dirs, vec![("unified", d)]);
}

#[test]
fn a_missing_controller_fails_closed_and_names_it() {
    let r = fake_v2("cpu pids");
    let m = V2::new(r.path().to_path_buf());
    let e = m.create("x-2", &table()[0], &[]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("`memory`") && msg.contains("cgroup-memory"),
        "{msg}"
    );
    // ...unless the policy allows it to be missing, and then it is reported.
    let cg = m
        .create("x-3", &table()[0], &[Protection::CgroupMemory])
        .unwrap();
    assert_eq!(cg.skipped, vec![Protection::CgroupMemory]);
    assert!(!r.path().join("aither/x-3/memory.max").exists());

    let r1 = tempfile::tempdir().unwrap();
    let e = V1::new(r1.path().to_path_buf(), false)
        .create("x-4", &table()[0], &[])
        .unwrap_err();
    assert!(e.to_string().contains("`memory`"), "{e}");
}

#[test]
fn garbage_collection_only_takes_dead_owners() {
    let r = tempfile::tempdir().unwrap();
    let dead = r.path().join("run-999999999");
    let live = r.path().join(format!("run-{}", std::process::id()));
    fs::create_dir_all(&dead).unwrap();
    fs::create_dir_all(&live).unwrap();
    collect_garbage(&[r.path().to_path_buf()]);
    assert!(!dead.exists());
    assert!(live.exists());
    // Several hierarchies with the same names (one pid check per name): each keeps the live
    // owner's directory and loses the dead one's; a dead owner's directory that still holds a
    // process (a cgroup.procs that is not empty) is kept.
    let (h1, h2) = (r.path().join("memory"), r.path().join("pids"));
    for h in [&h1, &h2] {
        fs::create_dir_all(h.join("run-999999998")).unwrap();
        fs::create_dir_all(h.join(format!("run-{}", std::process::id()))).unwrap();
    }
    fs::create_dir_all(h1.join("busy-999999997")).unwrap();
    fs::write(h1.join("busy-999999997/cgroup.procs"), "12\n").unwrap();
    collect_garbage(&[h1.clone(), h2.clone()]);
    for h in [&h1, &h2] {
        assert!(!h.join("run-999999998").exists(), "{}", h.display());
        assert!(h.join(format!("run-{}", std::process::id())).exists());
    }
    assert!(h1.join("busy-999999997").exists());
}

#[test]
fn membership_maps_proc_cgroup_lines_to_aither_directories_only() {
    let root = tempfile::tempdir().unwrap();
    for d in [
        "memory/aither/a-1",
        "cpu,cpuacct/aither/a-1",
        "unified/aither/a-1",
        "blkio/user",
    ] {
        fs::create_dir_all(root.path().join(d)).unwrap();
        fs::write(root.path().join(d).join("cgroup.procs"), "").unwrap();
    }
    let text = "9:blkio:/user\n4:memory:/aither/a-1\n3:cpu,cpuacct:/aither/a-1\n\
                2:pids:/aither/../escape\n1:name=systemd:/aither/missing\n0::/aither/a-1\n";
    let got = super::parse_membership(root.path(), text);
    assert_eq!(
        got,
        vec![
            root.path().join("memory/aither/a-1"),
            root.path().join("cpu,cpuacct/aither/a-1"),
            root.path().join("unified/aither/a-1"),
        ]
    );
}

#[test]
fn membership_in_a_delegated_subtree_is_found_and_nothing_else_below_it() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("system.slice/aitherd.service/aither/a-1");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("cgroup.procs"), "").unwrap();
    let sup = root.path().join("system.slice/aitherd.service/supervisor");
    fs::create_dir_all(&sup).unwrap();
    fs::write(sup.join("cgroup.procs"), "").unwrap();
    let got = super::parse_membership(root.path(), "0::/system.slice/aitherd.service/aither/a-1\n");
    assert_eq!(got, vec![d]);
    // aitherd's own leaf is not a sandbox's cgroup.
    assert!(
        super::parse_membership(root.path(), "0::/system.slice/aitherd.service/supervisor\n")
            .is_empty()
    );
}

/// A fake v1 root with the freezer hierarchy mounted too.
fn fake_v1_with_freezer() -> tempfile::TempDir {
    let d = fake_v1();
    fs::create_dir_all(d.path().join("freezer")).unwrap();
    fs::write(d.path().join("freezer/cgroup.procs"), "").unwrap();
    d
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

#[test]
fn v1_freeze_and_thaw_write_freezer_state_and_the_freezer_dir_is_created_and_joined() {
    let r = fake_v1_with_freezer();
    let m = V1::new(r.path().to_path_buf(), false);
    let cg = m.create("p-1", &table()[0], &[]).unwrap();
    let d = r.path().join("freezer/aither/p-1");
    assert!(cg.dirs.contains(&("freezer", d.clone())), "{:?}", cg.dirs);
    // The sandbox joins the freezer cgroup like any other v1 hierarchy.
    assert_eq!(cg.join_handles().unwrap().len(), cg.dirs.len());
    assert!(!m.frozen(&cg));
    m.freeze(&cg).unwrap();
    assert_eq!(read(&d.join("freezer.state")), "FROZEN");
    assert!(m.frozen(&cg));
    m.thaw(&cg).unwrap();
    assert_eq!(read(&d.join("freezer.state")), "THAWED");
    assert!(!m.frozen(&cg));
    // The daemon finds the freezer directory again from the id alone.
    let again = stats::open_existing(&m, "p-1").unwrap();
    assert!(again.dirs.iter().any(|(c, _)| *c == "freezer"));
    assert_eq!(m.freezer().unwrap(), r.path().join("freezer"));
    cg.remove().unwrap();
    assert!(!d.exists());
}

#[test]
fn v2_freeze_writes_cgroup_freeze_and_waits_for_frozen_in_cgroup_events() {
    let r = fake_v2("cpu memory pids");
    let m = V2::new(r.path().to_path_buf());
    let cg = m.create("p-2", &table()[0], &[]).unwrap();
    let d = r.path().join("aither/p-2");
    // The kernel's confirmation, as a real cgroup.events would show it after the write.
    fs::write(d.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
    m.freeze(&cg).unwrap();
    assert_eq!(read(&d.join("cgroup.freeze")), "1");
    assert!(m.frozen(&cg));
    m.thaw(&cg).unwrap();
    assert_eq!(read(&d.join("cgroup.freeze")), "0");
    assert!(!m.frozen(&cg));
}

#[test]
fn a_v2_freeze_the_kernel_never_confirms_is_undone_and_named() {
    let r = tempfile::tempdir().unwrap();
    let d = r.path();
    fs::write(d.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    let e = freezer::freeze_v2(d, Duration::from_millis(30)).unwrap_err();
    assert!(
        matches!(&e, CgroupError::FreezeTimeout { waited_ms: 30, last, .. } if last == "frozen 0"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("cgroup.events") && msg.contains("thawed"),
        "{msg}"
    );
    // Not left half frozen.
    assert_eq!(read(&d.join("cgroup.freeze")), "0");
}

#[test]
fn the_same_pause_means_the_same_on_v1_and_v2() {
    // One table: after freeze the cgroup is frozen, after thaw it is not, on both backends.
    let r1 = fake_v1_with_freezer();
    let m1 = V1::new(r1.path().to_path_buf(), false);
    let r2 = fake_v2("cpu memory pids");
    let m2 = V2::new(r2.path().to_path_buf());
    let cg1 = m1.create("t-1", &table()[1], &[]).unwrap();
    let cg2 = m2.create("t-1", &table()[1], &[]).unwrap();
    fs::write(
        r2.path().join("aither/t-1/cgroup.events"),
        "populated 1\nfrozen 1\n",
    )
    .unwrap();
    let both: [(&dyn CgroupManager, &Cgroup); 2] = [(&m1, &cg1), (&m2, &cg2)];
    for (m, cg) in both {
        m.freeze(cg).unwrap();
        assert!(m.frozen(cg), "{:?}", m.mode());
        // A second freeze of a frozen cgroup is fine (pause is idempotent).
        m.freeze(cg).unwrap();
        m.thaw(cg).unwrap();
        assert!(!m.frozen(cg), "{:?}", m.mode());
        // So is a thaw of a thawed one.
        m.thaw(cg).unwrap();
    }
}

#[test]
fn a_v1_host_without_the_freezer_refuses_pause_and_names_the_hierarchy() {
    let r = fake_v1();
    let m = V1::new(r.path().to_path_buf(), false);
    let cg = m.create("p-3", &table()[0], &[]).unwrap();
    assert!(!cg.dirs.iter().any(|(c, _)| *c == "freezer"));
    let e = m.freeze(&cg).unwrap_err();
    assert!(matches!(e, CgroupError::FreezerMissing { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&r.path().join("freezer").display().to_string())
            && msg.contains("mount -t cgroup -o freezer"),
        "{msg}"
    );
    assert!(m.freezer().is_err());
    assert!(!m.frozen(&cg));
    // A hybrid host without the v1 freezer freezes through its unified directory.
    let h = V1::new(r.path().to_path_buf(), true);
    let cg = h.create("p-4", &table()[0], &[]).unwrap();
    let u = r.path().join("unified/aither/p-4");
    fs::write(u.join("cgroup.events"), "frozen 1\n").unwrap();
    h.freeze(&cg).unwrap();
    assert_eq!(read(&u.join("cgroup.freeze")), "1");
    assert_eq!(h.freezer().unwrap(), r.path().join("unified"));
}

#[test]
fn the_same_task_count_and_limit_read_back_the_same_on_v1_and_v2() {
    // One table: the pids controller's count and limit mean the same on both backends
    // (`pids.max` "max", or no pids directory on v1: no limit, None, as in `Limits`).
    for (i, limits) in table().into_iter().enumerate() {
        let r1 = fake_v1();
        let m1 = V1::new(r1.path().to_path_buf(), false);
        let r2 = fake_v2("cpu memory pids io");
        let m2 = V2::new(r2.path().to_path_buf());
        let cg1 = m1.create(&format!("s{i}-1"), &limits, &[]).unwrap();
        let cg2 = m2.create(&format!("s{i}-1"), &limits, &[]).unwrap();
        let p1 = r1.path().join("pids/aither").join(format!("s{i}-1"));
        let p2 = r2.path().join("aither").join(format!("s{i}-1"));
        for p in [&p1, &p2] {
            if p.is_dir() {
                fs::write(p.join("pids.current"), "3\n").unwrap();
                if limits.pids.is_none() {
                    fs::write(p.join("pids.max"), "max\n").unwrap();
                }
            }
        }
        let both: [(&dyn CgroupManager, &Cgroup); 2] = [(&m1, &cg1), (&m2, &cg2)];
        for (m, cg) in both {
            let s = stats::read(m, cg);
            assert_eq!(s.pids_limit, limits.pids, "{:?} row {i}", m.mode());
            if limits.pids.is_some() {
                assert_eq!(s.pids_current, Some(3), "{:?} row {i}", m.mode());
            }
        }
    }
}
