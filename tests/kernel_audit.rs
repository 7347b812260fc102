//! The kernel's own denials land in the audit stream, joined to the agent (docs/audit.md):
//! with the host's audit on, a strict agent's TCP connect, refused by Landlock, becomes a
//! `kernel_denial` record (actor `kernel`, rule `landlock: net.connect_tcp …`) and event.
//!
//! The test turns the host's audit on for its duration and puts the old state back (audit is
//! host-wide; aitherd itself never changes it).

mod common;

use std::time::Duration;

use aither::audit::kernel;
use common::daemon::TestDaemon;
use common::poll_until;

struct AuditOn {
    was: bool,
}

impl AuditOn {
    fn new() -> AuditOn {
        let was = kernel::enabled().expect(
            "reading the kernel's audit status (AUDIT_GET on NETLINK_AUDIT) failed: this test \
             needs a kernel with CONFIG_AUDIT and root",
        );
        kernel::set_enabled(true).expect("AUDIT_SET enabled=1");
        AuditOn { was }
    }
}

impl Drop for AuditOn {
    fn drop(&mut self) {
        let _ = kernel::set_enabled(self.was);
    }
}

#[test]
fn a_landlock_denial_of_an_agent_is_recorded_with_the_agent() {
    assert!(
        aither::sandbox::landlock::kernel_abi() >= 7,
        "Landlock audit records need Landlock ABI 7 (Linux 6.15); this kernel has {}",
        aither::sandbox::landlock::kernel_abi()
    );
    let _audit = AuditOn::new();
    let d = TestDaemon::start("aitherd-kaudit-", &[]);
    d.ok(&[
        "spawn",
        "--policy",
        "strict",
        "--restart",
        "never",
        "prober",
        "--",
        "/usr/bin/python3",
        "-c",
        "import socket, time\n\
         try: socket.create_connection(('127.0.0.1', 9), timeout=1)\n\
         except OSError as e: print('refused', e.errno, flush=True)\n\
         time.sleep(30)",
    ]);
    let mut entry = None;
    let ok = poll_until(Duration::from_secs(20), || {
        let log = std::fs::read_to_string(d.audit_log()).unwrap_or_default();
        entry = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["kind"] == "kernel_denial" && e["agent"] == "prober");
        entry.is_some()
    });
    assert!(
        ok,
        "no kernel_denial for prober in the audit log; agent log: {}\ndaemon log: {}",
        d.ok(&["logs", "prober"]),
        d.log()
    );
    let e = entry.unwrap();
    assert_eq!(e["decision"], "deny", "{e}");
    assert_eq!(e["actor"], "kernel", "{e}");
    let rule = e["rule"].as_str().unwrap();
    assert!(
        rule.starts_with("landlock: net.connect_tcp") && rule.contains("dest=9"),
        "{e}"
    );
    assert!(d.ok(&["logs", "prober"]).contains("refused 13"));
    let events = d.ok(&["events", "--json", "--agent", "prober"]);
    assert!(events.contains("\"kernel_denial\""), "{events}");
    // The kernel's records join the hash chain like every other decision.
    let v = d.ctl(&["audit", "verify"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}
