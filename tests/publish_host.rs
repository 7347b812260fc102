//! `aitherctl spawn --publish-host HOSTADDR:HOSTPORT=AGENTPORT` end to end, as root: a real
//! aitherd listens on the host's loopback and relays to a strict agent's own loopback
//! (docs/network.md "Publishing an agent's port on the host's loopback"). Each test starts its
//! own daemon; host ports are picked free by the kernel (port 0) to avoid other sessions'.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

use common::daemon::TestDaemon as Daemon;
use common::{poll_until, unique};
use serde_json::Value;

/// A threaded line-echo server on the agent's 127.0.0.1:8000: `ping\n` → `echo:ping\n`.
const ECHO: &str = r#"
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"echo:" + line)
            self.wfile.flush()
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
S(("127.0.0.1", 8000), H).serve_forever()
"#;

/// Accepts every connection on 8000 and never reads one (a tiny receive buffer, inherited by
/// the accepted sockets, so that the pressure is on aitherd at once).
const HOG: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.bind(("127.0.0.1", 8000))
s.listen(1024)
open("listening", "w").close()
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"#;

/// A host port nobody holds now (the kernel's pick).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn daemon() -> Daemon {
    Daemon::start("aitherd-pub-", &[])
}

fn inspect(d: &Daemon, name: &str) -> Value {
    serde_json::from_str(&d.ok(&["inspect", name])).expect("inspect JSON")
}

/// One line through the published port: Some(reply) when the agent answered.
fn echo(port: u16, line: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Waits (bounded) until the agent answers through `port`.
fn wait_served(d: &Daemon, port: u16) {
    let ok = poll_until(Duration::from_secs(30), || {
        echo(port, "hello").as_deref() == Some("echo:hello\n")
    });
    assert!(
        ok,
        "the agent was not reachable at 127.0.0.1:{port}\n{}",
        d.log()
    );
}

/// Whether something listens on 127.0.0.1:`port` (a bind there fails while aitherd holds it).
fn held(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_err()
}

#[test]
fn a_strict_agents_port_is_served_on_the_host_loopback_across_restarts_until_stop() {
    let d = daemon();
    std::fs::write(d.ws.path().join("echo.py"), ECHO).unwrap();
    let name = unique("pub");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}=8000");
    d.ok(&[
        "spawn",
        "--policy",
        "strict",
        "--publish-host",
        &publish,
        &name,
        "--",
        "python3",
        "echo.py",
    ]);
    assert!(held(port), "aitherd does not listen on {publish}");
    wait_served(&d, port);

    // Two connections at once: both written before either is read.
    let mut a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    a.write_all(b"one\n").unwrap();
    b.write_all(b"two\n").unwrap();
    let mut buf = [0u8; 64];
    let n = b.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"echo:two\n");
    let n = a.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"echo:one\n");
    drop((a, b));

    // ps and inspect show it, --json too; the spawn's audit record names it.
    let ps = d.ok(&["ps"]);
    assert!(ps.contains("PORTS"), "{ps}");
    assert!(ps.contains(&format!("127.0.0.1:{port}->8000")), "{ps}");
    let list: Value = serde_json::from_str(&d.ok(&["ps", "--json"])).unwrap();
    let me = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name.as_str())
        .unwrap();
    assert_eq!(me["publish_host"], serde_json::json!([publish]));
    // The counters come when a relay ends: wait (bounded) until both have.
    let counted = poll_until(Duration::from_secs(10), || {
        inspect(&d, &name)["host_ports"][0]["active"].as_u64() == Some(0)
    });
    assert!(counted);
    let i = inspect(&d, &name);
    assert_eq!(i["publish_host"], serde_json::json!([publish]));
    assert_eq!(i["host_ports"][0]["publish"], publish.as_str());
    assert!(i["host_ports"][0]["accepted"].as_u64().unwrap() >= 3, "{i}");
    // At least this test's two exchanges: "one\n" and "two\n" in, their echoes out.
    assert!(i["host_ports"][0]["bytes_in"].as_u64().unwrap() >= 8, "{i}");
    assert!(
        i["host_ports"][0]["bytes_out"].as_u64().unwrap() >= 18,
        "{i}"
    );
    assert!(
        i["daemon_usage"]["host_relay_bytes"].as_u64().unwrap() >= 26,
        "{i}"
    );
    let audit = std::fs::read_to_string(d.audit_log()).unwrap();
    let spawn = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["kind"] == "spawn" && e["agent"] == name.as_str())
        .expect("the spawn's audit record");
    assert_eq!(
        spawn["data"]["publish_host"],
        serde_json::json!([publish]),
        "{spawn}"
    );

    // A restart keeps the listener (never released in between) and reaches the new run.
    let pid1 = i["pid1"].as_i64().unwrap();
    d.ok(&["restart", &name]);
    assert!(held(port), "the listener closed across the restart");
    let restarted = poll_until(Duration::from_secs(30), || {
        inspect(&d, &name)["pid1"]
            .as_i64()
            .is_some_and(|p| p != pid1)
    });
    assert!(restarted, "no new run");
    wait_served(&d, port);

    // stop closes it before it returns (refused, no longer held); rm leaves nothing either.
    d.ok(&["stop", &name]);
    let refused = TcpStream::connect(("127.0.0.1", port));
    assert!(
        matches!(&refused, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "127.0.0.1:{port} still accepts after stop: {refused:?}"
    );
    assert!(!held(port));
    assert!(inspect(&d, &name).get("host_ports").is_none());
    d.ok(&["rm", &name]);
    assert!(!held(port));
}

#[test]
fn a_restarted_aitherd_publishes_an_adopted_agents_port_again() {
    let mut d = daemon();
    std::fs::write(d.ws.path().join("echo.py"), ECHO).unwrap();
    let name = unique("pubadopt");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}=8000");
    d.ok(&[
        "spawn",
        "--publish-host",
        &publish,
        &name,
        "--",
        "python3",
        "echo.py",
    ]);
    wait_served(&d, port);
    let pid1 = inspect(&d, &name)["pid1"].as_i64().unwrap();
    d.kill9();
    // Nothing listens while aitherd is down; the agent keeps running.
    assert!(!held(port), "127.0.0.1:{port} held with aitherd dead");
    d.launch();
    // The same run (adopted, not restarted) is reached through the reopened listener.
    wait_served(&d, port);
    let i = inspect(&d, &name);
    assert_eq!(i["pid1"].as_i64(), Some(pid1), "{i}");
    assert_eq!(i["state"], "running", "{i}");
    d.ok(&["rm", "--force", &name]);
    assert!(poll_until(Duration::from_secs(10), || !held(port)));
}

#[test]
fn the_port_is_closed_after_rm_force_of_a_running_agent() {
    let d = daemon();
    std::fs::write(d.ws.path().join("echo.py"), ECHO).unwrap();
    let name = unique("pubrm");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}=8000");
    d.ok(&[
        "spawn",
        "--publish-host",
        &publish,
        &name,
        "--",
        "python3",
        "echo.py",
    ]);
    wait_served(&d, port);
    // Closed when rm returns.
    d.ok(&["rm", "--force", &name]);
    assert!(!held(port), "127.0.0.1:{port} still held after rm --force");
}

#[test]
fn non_loopback_addresses_ports_in_use_and_forbidding_policies_are_refused_clearly() {
    let d = daemon();
    std::fs::write(d.ws.path().join("echo.py"), ECHO).unwrap();
    let name = unique("pubno");
    let spawn = |publish: &str, extra: &[&str]| {
        let mut args = vec!["spawn", "--publish-host", publish];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&name, "--", "python3", "echo.py"]);
        let o = d.ctl(&args);
        assert!(!o.status.success(), "{publish} was accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    for addr in ["0.0.0.0", "10.1.2.3", "[::]", "[::ffff:127.0.0.1]"] {
        let err = spawn(&format!("{addr}:{}=8000", free_port()), &[]);
        assert!(err.contains("is not a loopback address"), "{addr}: {err}");
    }
    // Nothing reached aitherd: no agent by that name.
    assert!(!d.ok(&["ps"]).contains(&name));

    // A host port in use: the spawn fails and says so; the holder keeps it.
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let err = spawn(&format!("127.0.0.1:{port}=8000"), &[]);
    assert!(
        err.contains(&format!("127.0.0.1:{port} is already in use on the host")),
        "{err}"
    );
    d.ok(&["rm", "--force", &name]);
    drop(holder);

    // A policy with `[network] publish_host = false` forbids it.
    let strict = std::fs::read_to_string(common::policy_dir().join("strict.toml")).unwrap();
    let closed = strict
        .replace("name = \"strict\"", "name = \"strict-closed\"")
        .replace(
            "[network]\nmode = \"none\"",
            "[network]\nmode = \"none\"\npublish_host = false",
        );
    assert!(closed.contains("publish_host = false"));
    let file = d.ws.path().join("strict-closed.toml");
    std::fs::write(&file, closed).unwrap();
    let err = spawn(
        &format!("127.0.0.1:{}=8000", free_port()),
        &["--policy", file.to_str().unwrap()],
    );
    assert!(
        err.contains("forbids publishing an agent's ports on the host"),
        "{err}"
    );
}

/// Writes until the socket stays full (no room within 100 ms after a WouldBlock); the bytes
/// the host side accepted in all.
fn push_until_full(s: &mut TcpStream) -> usize {
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0x61u8; 64 * 1024];
    let mut total = 0;
    loop {
        match s.write(&chunk) {
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                use nix::poll::{poll, PollFd, PollFlags};
                let mut p = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
                if !matches!(poll(&mut p, 100u16), Ok(n) if n > 0) {
                    return total;
                }
            }
            Err(_) => return total,
        }
        // Far past any bound: stop, the assertion below reports it.
        if total > 64 << 20 {
            return total;
        }
    }
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Small send buffers on the test's own sockets: the pressure lands on aitherd's side.
fn small_sndbuf(s: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &(16 * 1024));
}

#[test]
fn an_agent_that_never_reads_holds_aitherd_to_its_connection_and_buffer_bounds() {
    // aitherd's limits (src/daemon/publish.rs).
    const MAX_CONNECTIONS: u64 = 64;
    const OPENED: u64 = 100;
    let d = daemon();
    std::fs::write(d.ws.path().join("hog.py"), HOG).unwrap();
    let name = unique("pubhog");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}=8000");
    d.ok(&[
        "spawn",
        "--publish-host",
        &publish,
        &name,
        "--",
        "python3",
        "hog.py",
    ]);
    // The hog says when it listens (a file in the workspace): no probe connection, which it
    // would hold.
    let listening = poll_until(Duration::from_secs(30), || {
        d.ws.path().join("listening").exists()
    });
    assert!(listening, "the agent never listened\n{}", d.log());
    let stats = |d: &Daemon| inspect(d, &name)["host_ports"][0].clone();
    let (acc0, ref0) = (0, 0);
    assert_eq!(stats(&d)["accepted"].as_u64(), Some(0));
    let rss_before = rss_kib(d.pid());

    let mut conns: Vec<TcpStream> = (0..OPENED)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            small_sndbuf(&s);
            s
        })
        .collect();
    let counted = poll_until(Duration::from_secs(30), || {
        let s = stats(&d);
        s["accepted"].as_u64().unwrap() - acc0 + s["refused"].as_u64().unwrap() - ref0 == OPENED
    });
    assert!(counted, "not every connection was counted: {}", stats(&d));
    let s = stats(&d);
    assert_eq!(
        s["accepted"].as_u64().unwrap() - acc0,
        MAX_CONNECTIONS,
        "{s}"
    );
    assert_eq!(
        s["refused"].as_u64().unwrap() - ref0,
        OPENED - MAX_CONNECTIONS,
        "{s}"
    );
    assert_eq!(s["active"].as_u64().unwrap(), MAX_CONNECTIONS, "{s}");
    // Charged to the agent with aitherd's other spending on it.
    let usage = inspect(&d, &name)["daemon_usage"].clone();
    assert_eq!(
        usage["host_relays"].as_u64(),
        Some(MAX_CONNECTIONS),
        "{usage}"
    );

    // The refused ones read EOF (or a reset); the relayed ones stay open. Push every relayed
    // one until it is full: each takes a bounded number of bytes, whatever is sent.
    let mut open = 0;
    let mut pushed = Vec::new();
    for c in conns.iter_mut() {
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match c.read(&mut [0u8; 1]) {
            Ok(0) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => continue,
            Ok(_) => panic!("the hog sent bytes"),
            Err(_) => open += 1,
        }
        pushed.push(push_until_full(c));
    }
    assert_eq!(open, MAX_CONNECTIONS, "relayed connections left open");
    // Per connection: the test's send buffer (16 KiB, doubled), aitherd's two sockets
    // (64 KiB each, doubled), its 16 KiB buffer and the agent's 4 KiB receive buffer, less
    // the kernel's overhead per packet: about 220 KB here, under 512 KiB always. Autotuned
    // buffers (without aitherd's SO_RCVBUF/SO_SNDBUF) took 3 to 4 MB each here.
    let most = *pushed.iter().max().unwrap();
    assert!(
        most < 512 << 10,
        "a connection took {most} bytes into a hog: {pushed:?}"
    );
    assert!(pushed.iter().all(|n| *n > 0), "{pushed:?}");
    // aitherd's own memory: 64 connections' buffers and tasks, far under 32 MiB.
    let grown = rss_kib(d.pid()).saturating_sub(rss_before);
    assert!(grown < 32 * 1024, "aitherd grew by {grown} KiB");

    // Still at the limit: more connections are closed at once, none relayed.
    let more: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let counted = poll_until(Duration::from_secs(30), || {
        stats(&d)["refused"].as_u64().unwrap() - ref0 == OPENED - MAX_CONNECTIONS + 20
    });
    assert!(counted, "{}", stats(&d));
    assert_eq!(stats(&d)["active"].as_u64().unwrap(), MAX_CONNECTIONS);
    drop(more);

    // The hog's run ends (a restart): its relays end with it, the listener stays, and the
    // slots are free for the next run.
    d.ok(&["restart", &name]);
    let freed = poll_until(Duration::from_secs(30), || {
        stats(&d)["active"].as_u64() == Some(0)
    });
    assert!(freed, "{}", stats(&d));
    drop(conns);
    d.ok(&["rm", "--force", &name]);
}

#[test]
fn a_member_publishes_their_agent_on_a_high_port_and_no_one_but_root_below_1024() {
    let us = common::users::Users::create();
    let d = us.daemon();
    let member = &us.users[0];
    let script = us.dir(member).join("echo.py");
    std::fs::write(&script, ECHO).unwrap();
    std::os::unix::fs::chown(&script, Some(member.uid), Some(member.gid)).unwrap();
    let spawn = |i: usize, name: &str, publish: &str| {
        us.ctl(
            &d,
            i,
            &[
                "spawn",
                "--publish-host",
                publish,
                name,
                "--",
                "python3",
                "echo.py",
            ],
        )
    };
    // Below 1024: a member and an admin alike are refused, before anything is made.
    for i in [0, 2] {
        let name = unique("publow");
        let o = spawn(i, &name, "127.0.0.1:80=8000");
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("a host port below 1024 needs root"), "{err}");
        assert!(!d.ok(&["ps"]).contains(&name));
    }
    // Above: the member's own agent is served from the host.
    let name = unique("pubmem");
    let port = free_port();
    let o = spawn(0, &name, &format!("127.0.0.1:{port}=8000"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_served(&d, port);
    d.ok(&["rm", "--force", &name]);
    assert!(poll_until(Duration::from_secs(10), || !held(port)));
}
