//! Declares which kernel features this host must have. CI sets AITHER_TEST_EXPECT (e.g.
//! "userns,landlock>=6,seccomp,cgroup=hybrid"); a feature that is missing then fails here,
//! loudly, instead of letting a privileged test pass vacuously somewhere else.

use aither::cgroup;
use aither::sandbox::landlock;

#[test]
fn the_host_has_what_ci_declares() {
    let Ok(expect) = std::env::var("AITHER_TEST_EXPECT") else {
        eprintln!("AITHER_TEST_EXPECT is not set: nothing declared, nothing checked (CI sets it in .ci/run)");
        return;
    };
    for item in expect.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some(v) = item.strip_prefix("landlock>=") {
            let want: u8 = v.parse().expect("landlock>=N");
            let has = landlock::kernel_abi();
            assert!(
                has >= want,
                "declared Landlock ABI >= {want}, kernel has {has}"
            );
        } else if let Some(mode) = item.strip_prefix("cgroup=") {
            let got = cgroup::detect(std::path::Path::new(cgroup::DEFAULT_ROOT))
                .expect("cgroup detection");
            assert_eq!(
                format!("{got:?}").to_lowercase(),
                mode,
                "declared cgroup mode"
            );
        } else if item == "userns" {
            let max: u64 = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(max > 0, "user namespaces are disabled");
        } else if item == "seccomp" {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            assert!(status.contains("Seccomp:"), "kernel without seccomp");
        } else {
            panic!("unknown feature {item:?} in AITHER_TEST_EXPECT");
        }
    }
}
