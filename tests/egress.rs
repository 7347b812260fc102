//! Egress through the gateway (docs/network.md), end to end: real sandboxes (`aitherctl run`
//! and aitherd), the host's real resolver, and real upstreams on a network of their own. Each
//! test moves its thread into a private network and mount namespace ("the host": what the
//! gateway sees), where `/etc/hosts` (bind-mounted over, in that mount namespace only) names
//! the test hosts, and connects it by a veth pair to a second network namespace ("the
//! internet", [`INET_IP`]) where the upstreams listen; the host's own side of the link is
//! [`HOST_IP`], a public-looking address of the host itself. There is no test-only resolver in
//! the code. Every agent-side check runs inside the sandbox (curl, and tests/egress/probe.py
//! for raw sockets) and is asserted on what the agent saw, what the upstream saw, and what the
//! audit log recorded. Needs root; fails loudly without it.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{Workspace, AITHERCTL};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The upstreams' address, in "the internet" namespace.
const INET_IP: &str = "11.1.0.2";
/// The host's own address on the link to "the internet" (public-looking: internal only
/// because it is the host's).
const HOST_IP: &str = "11.1.0.1";

fn sh(what: &str, cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn ip(args: &[&str]) {
    sh(&format!("ip {args:?}"), Command::new("ip").args(args));
}

/// Moves the calling thread into a new network and mount namespace (its children, aitherctl
/// and aitherd, inherit them), makes the mount tree private, bind-mounts `hosts` over
/// /etc/hosts and brings loopback up. Returns "the internet": a second network namespace
/// joined by a veth pair, with `INET_IP`.
fn private_network(hosts: &Path) -> OwnedFd {
    common::require_root();
    // On the calling thread only (CLONE_NEWNS unshares its fs struct first).
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare");
    // The propagation of this namespace's mounts only.
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).expect("private mounts");
    // A bind mount in this thread's own mount namespace.
    mount(Some(hosts), "/etc/hosts", none, MsFlags::MS_BIND, none).expect("bind /etc/hosts");
    ip(&["link", "set", "lo", "up"]);
    // "The internet": a thread of its own unshares a network namespace; its descriptor keeps
    // the namespace once the thread has ended.
    let inet = std::thread::spawn(|| {
        // On this short-lived thread only.
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare inet");
        OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
    })
    .join()
    .unwrap();
    let ns = format!("/proc/{}/fd/{}", std::process::id(), inet.as_raw_fd());
    ip(&["link", "add", "aeh", "type", "veth", "peer", "name", "aei"]);
    sh(
        "move the peer",
        Command::new("ip").args(["link", "set", "aei", "netns", &ns]),
    );
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "aeh"]);
    ip(&["link", "set", "aeh", "up"]);
    let in_inet = |args: &[&str]| {
        sh(
            &format!("inet: ip {args:?}"),
            Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .arg("ip")
                .args(args),
        )
    };
    in_inet(&["link", "set", "lo", "up"]);
    in_inet(&["addr", "add", &format!("{INET_IP}/24"), "dev", "aei"]);
    in_inet(&["link", "set", "aei", "up"]);
    inet
}

/// A listening socket on `addr` in the network namespace `ns` (made on a thread that joins
/// it; the socket stays there).
fn listen_in(ns: &OwnedFd, addr: &str) -> std::net::TcpListener {
    let fd = ns.try_clone().unwrap();
    let addr = addr.to_string();
    std::thread::spawn(move || {
        // On this short-lived thread only, to a namespace descriptor we own.
        nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
        let l = std::net::TcpListener::bind(addr).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    })
    .join()
    .unwrap()
}

/// The host side of a test: its network, upstreams, /etc/hosts, a CA and the configuration
/// file naming it, an audit log and a state directory (secrets), all private to the test.
struct Host {
    http_port: u16,
    /// A "model server" on the host, bound on 0.0.0.0: internal (loopback and the host's own
    /// addresses), reachable only as a granted service.
    llm_port: u16,
    tls_port: u16,
    /// Request heads the upstreams received (lower-cased header names).
    seen: Arc<Mutex<Vec<String>>>,
    /// TCP connections the TLS upstream accepted (handshake or not).
    tls_accepts: Arc<AtomicUsize>,
    dir: tempfile::TempDir,
    _inet: OwnedFd,
    _rt: tokio::runtime::Runtime,
}

const SECRET: &str = "sk-aither-test-SECRET-7f3a9c";

/// /etc/hosts of the tests' host.
const HOSTS: &str = "127.0.0.1 localhost
11.1.0.2 api.example.test other.example.test
10.0.0.1 private.example.test
127.0.0.1 loop.example.test
169.254.169.254 metadata.example.test
11.1.0.1 self.example.test
fed0::1 site6.example.test
11.1.0.2 mixed.example.test
10.0.0.1 mixed.example.test
11.7.7.7 later.example.test
";

impl Host {
    fn new() -> Host {
        Self::with_config("")
    }

    /// `config`: more of the `[egress]` table of the configuration file (the CA is set).
    fn with_config(config: &str) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("aither-egress-host-")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::write(dir.path().join("hosts"), HOSTS).unwrap();
        let inet = private_network(&dir.path().join("hosts"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        // A CA and a certificate for both test names (the SNI test needs the upstream to be
        // able to serve either: only the gateway may refuse).
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![
            "api.example.test".to_string(),
            "other.example.test".to_string(),
        ])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(
            dir.path().join("aitherd.toml"),
            format!(
                "[egress]\nca_file = \"{}\"\n{config}\n",
                dir.path().join("ca.pem").display()
            ),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();

        let http = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(listen_in(&inet, &format!("{INET_IP}:0"))).unwrap()
        };
        let http_port = http.local_addr().unwrap().port();
        let s = seen.clone();
        rt.spawn(async move {
            while let Ok((c, _)) = http.accept().await {
                let s = s.clone();
                tokio::spawn(serve_http(c, s, "upstream-ok".to_string()));
            }
        });

        let llm = rt
            .block_on(tokio::net::TcpListener::bind("0.0.0.0:0"))
            .unwrap();
        let llm_port = llm.local_addr().unwrap().port();
        let s = seen.clone();
        rt.spawn(async move {
            while let Ok((c, _)) = llm.accept().await {
                tokio::spawn(serve_http(c, s.clone(), "llm-ok".to_string()));
            }
        });
        let unix = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(dir.path().join("llm.sock")).unwrap()
        };
        let s = seen.clone();
        rt.spawn(async move {
            while let Ok((c, _)) = unix.accept().await {
                tokio::spawn(serve_http(c, s.clone(), "unix-llm-ok".to_string()));
            }
        });

        let tls = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(listen_in(&inet, &format!("{INET_IP}:0"))).unwrap()
        };
        let tls_port = tls.local_addr().unwrap().port();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let s = seen.clone();
        let tls_accepts: Arc<AtomicUsize> = Arc::default();
        let accepts = tls_accepts.clone();
        rt.spawn(async move {
            while let Ok((c, _)) = tls.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                let (s, acceptor) = (s.clone(), acceptor.clone());
                tokio::spawn(async move {
                    if let Ok(t) = acceptor.accept(c).await {
                        let sni = t.get_ref().1.server_name().unwrap_or("-").to_string();
                        serve_http(t, s, format!("tls-ok sni={sni}")).await;
                    }
                });
            }
        });
        Host {
            http_port,
            llm_port,
            tls_port,
            seen,
            tls_accepts,
            dir,
            _inet: inet,
            _rt: rt,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config(&self) -> String {
        self.path("aitherd.toml").to_str().unwrap().to_string()
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// A policy file: `base` (a repository policy) plus `net` TOML, in the host's directory.
    fn policy(&self, base: &str, net: &str) -> String {
        let src = std::fs::read_to_string(common::policy_dir().join(format!("{base}.toml")))
            .unwrap()
            .replace(
                &format!("name = \"{base}\""),
                &format!("name = \"{base}-egress\""),
            );
        let p = self.path(&format!("{base}-{}.toml", common::next_id()));
        let net = net
            .replace("HTTP", &self.http_port.to_string())
            .replace("LLM", &self.llm_port.to_string())
            .replace("SOCK", self.path("llm.sock").to_str().unwrap())
            .replace("TLS", &self.tls_port.to_string());
        std::fs::write(&p, format!("{src}\n{net}\n")).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// `aitherctl run --config <the test's>` with the test's state and audit log.
    fn run(&self, ws: &Workspace, policy: &str, cmd: &[&str]) -> Output {
        self.run_with(ws, policy, &["--config", &self.config()], cmd)
    }

    fn run_with(&self, ws: &Workspace, policy: &str, flags: &[&str], cmd: &[&str]) -> Output {
        let name = common::unique("egress");
        let mut c = ws.command(policy, flags, cmd, &name);
        let out = self.env(&mut c).output().expect("run aitherctl");
        assert!(
            common::cgroup_dirs_of(&name).is_empty(),
            "the run left its cgroup behind"
        );
        out
    }

    fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        c.env("AITHER_STATE_DIR", self.path("state"))
            .env("AITHER_AUDIT_LOG", self.path("audit.jsonl"))
    }

    /// The `net` records of the audit log.
    fn net_audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "net")
            .collect()
    }

    fn audit_text(&self) -> String {
        std::fs::read_to_string(self.path("audit.jsonl")).unwrap_or_default()
    }
}

/// A minimal keep-alive HTTP/1.1 upstream: records each request head, answers
/// `<tag> <path>` (test code; the gateway under test uses hyper).
async fn serve_http<S>(c: S, seen: Arc<Mutex<Vec<String>>>, tag: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut r = BufReader::new(c);
    loop {
        let mut head = String::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            head.push_str(&line);
        }
        let mut body = vec![0u8; len];
        if tokio::io::AsyncReadExt::read_exact(&mut r, &mut body)
            .await
            .is_err()
        {
            return;
        }
        let path = head.split_whitespace().nth(1).unwrap_or("?").to_string();
        seen.lock().unwrap().push(head);
        let text = format!("{tag} {path}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if r.get_mut().write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The probe's answer for one check.
fn probe_line(out: &str, check: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{check}: ")))
        .unwrap_or_else(|| panic!("no result for {check} in\n{out}"))
        .to_string()
}

fn workspace_with_probe() -> Workspace {
    let ws = Workspace::new();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/egress/probe.py"),
        ws.path().join("probe.py"),
    )
    .unwrap();
    ws
}

const ONE_RULE: &str = r#"
[[net.egress]]
hosts = ["api.example.test"]
ports = [HTTP, TLS]
"#;

#[test]
fn an_allowed_host_is_reached_over_plain_http_connect_and_socks5() {
    let host = Host::new();
    let ws = Workspace::new();
    let policy = host.policy("standard", ONE_RULE);
    let script = format!(
        "curl -sS -m 10 http://api.example.test:{h}/plain; echo; \
         curl -sS -m 10 -o /dev/null -H 'Host: fronted.example' http://api.example.test:{h}/fronted; \
         curl -sSk -m 10 https://api.example.test:{t}/connect; echo; \
         curl -sSk -m 10 -x socks5h://127.0.0.1:3128 https://api.example.test:{t}/socks; echo; \
         curl -sS -m 10 -x socks5h://127.0.0.1:3128 http://api.example.test:{h}/socks-plain; echo",
        h = host.http_port,
        t = host.tls_port
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    assert_eq!(
        stdout(&out),
        "upstream-ok /plain\ntls-ok sni=api.example.test /connect\ntls-ok sni=api.example.test /socks\nupstream-ok /socks-plain\n",
        "{}",
        describe(&out)
    );
    // The agent's own Host header never reaches the upstream (no domain fronting).
    let fronted = host
        .seen()
        .into_iter()
        .find(|h| h.starts_with("GET /fronted"))
        .unwrap();
    assert!(
        fronted
            .to_ascii_lowercase()
            .contains(&format!("host: api.example.test:{}", host.http_port))
            && !fronted.contains("fronted.example"),
        "{fronted}"
    );
    let vias: Vec<(String, String)> = host
        .net_audit()
        .iter()
        .filter(|v| v["decision"] == "allow")
        .map(|v| {
            (
                v["data"]["via"].as_str().unwrap().to_string(),
                v["rule"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for via in ["http", "connect", "socks5"] {
        assert!(
            vias.contains(&(via.to_string(), "egress[0]".to_string())),
            "no allowed {via} event by egress[0] in {vias:?}"
        );
    }
}

#[test]
fn a_host_without_a_rule_is_refused_with_a_clear_error() {
    let host = Host::new();
    let ws = Workspace::new();
    let policy = host.policy("standard", ONE_RULE);
    let script = format!(
        "curl -sS -m 10 http://other.example.test:{h}/; echo \"plain=$?\"; \
         curl -sSk -m 10 https://other.example.test:{t}/; echo \"connect=$?\"; \
         curl -sSk -m 10 https://api.example.test:443/; echo \"port=$?\"",
        h = host.http_port,
        t = host.tls_port
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "aither egress denied (default-deny): no net.egress rule allows GET http://other.example.test:{}",
            host.http_port
        )),
        "{}",
        describe(&out)
    );
    // curl: 56 = the proxy refused the CONNECT (403).
    assert!(text.contains("connect=56"), "{}", describe(&out));
    assert!(text.contains("port=56"), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        describe(&out)
    );
    assert!(
        host.seen().is_empty(),
        "the upstream was reached: {:?}",
        host.seen()
    );
    let denied: Vec<String> = host
        .net_audit()
        .iter()
        .filter(|v| v["decision"] == "deny" && v["rule"] == "default-deny")
        .map(|v| v["data"]["host"].as_str().unwrap().to_string())
        .collect();
    assert!(
        denied.iter().filter(|h| *h == "other.example.test").count() == 2
            && denied.contains(&"api.example.test".to_string()),
        "{denied:?}"
    );
}

#[test]
fn direct_ip_ipv6_udp_and_dns_from_inside_get_nowhere() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy("standard", ONE_RULE);
    let upstream = format!("tcp={INET_IP},{}", host.http_port);
    let checks = [
        upstream.as_str(),
        "tcp=93.184.216.34,80",
        "tcp=10.0.0.1,80",
        "tcp=169.254.169.254,80",
        "tcp6=2606:4700::1111,443",
        "tcp6=::1,3128",
        "udp=8.8.8.8,53",
        "udp=10.0.0.1,53",
    ];
    let mut cmd = vec!["python3", "probe.py"];
    cmd.extend_from_slice(&checks);
    let out = host.run(&ws, &policy, &cmd);
    let text = stdout(&out);
    for c in [
        upstream.as_str(),
        "tcp=93.184.216.34,80",
        "tcp=10.0.0.1,80",
        "tcp=169.254.169.254,80",
        "tcp6=2606:4700::1111,443",
        "udp=8.8.8.8,53",
        "udp=10.0.0.1,53",
    ] {
        assert_eq!(
            probe_line(&text, c),
            "err ENETUNREACH",
            "{c}\n{}",
            describe(&out)
        );
    }
    // The gateway listens on 127.0.0.1 only.
    assert_eq!(probe_line(&text, "tcp6=::1,3128"), "err ECONNREFUSED");
    assert!(
        host.seen().is_empty(),
        "the upstream was reached: {:?}",
        host.seen()
    );
}

#[test]
fn names_resolving_inside_or_to_the_hosts_own_addresses_and_ip_literals_are_refused() {
    let host = Host::new();
    let ws = Workspace::new();
    let policy = host.policy(
        "standard",
        r#"
[[net.egress]]
hosts = ["*.example.test"]
ports = [HTTP, 80, LLM]
"#,
    );
    let (h, l) = (host.http_port, host.llm_port);
    // self.example.test is the host's own public-looking address, where the "model server"
    // listens (0.0.0.0); mixed.example.test has an external and an internal address.
    let script = format!(
        "curl -sS -m 10 http://private.example.test:{h}/; \
         curl -sS -m 10 http://loop.example.test:{h}/; \
         curl -sS -m 10 http://metadata.example.test/latest/meta-data/; \
         curl -sS -m 10 http://self.example.test:{l}/; \
         curl -sS -m 10 http://site6.example.test:{h}/; \
         curl -sS -m 10 http://mixed.example.test:{h}/; \
         curl -sS -m 10 http://{INET_IP}:{h}/; \
         curl -sS -m 10 -x socks5://127.0.0.1:3128 http://{INET_IP}:{h}/; echo \"socks-ip=$?\""
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    for name in ["private", "loop", "metadata", "self", "site6", "mixed"] {
        let want = format!(
            "aither egress denied (egress[0]): {name}.example.test resolves to an internal address or one of this host's own: reachable only as a granted service"
        );
        assert!(text.contains(&want), "missing {want:?}\n{}", describe(&out));
    }
    for want in [
        &format!("(ip-literal): {INET_IP} is an IP address"),
        // curl 97: the SOCKS5 proxy refused (0x02, not allowed by ruleset).
        "socks-ip=97",
    ] {
        assert!(text.contains(want), "missing {want:?}\n{}", describe(&out));
    }
    // No denial tells the agent what a name resolved to.
    for addr in ["10.0.0.1", "127.0.0.1", "169.254", HOST_IP, "fed0"] {
        assert!(!text.contains(addr), "{addr} told\n{}", describe(&out));
    }
    assert!(
        host.seen().is_empty(),
        "an upstream was reached: {:?}",
        host.seen()
    );
}

#[test]
fn an_address_the_host_gains_while_the_gateway_runs_becomes_internal() {
    let host = Host::new();
    let ws = Workspace::new();
    let policy = host.policy(
        "standard",
        "[[net.egress]]\nhosts = [\"later.example.test\"]\nports = [LLM]\n",
    );
    let l = host.llm_port;
    // Before: 11.7.7.7 is nobody's (no route: the upstream does not answer). Then the host
    // gains it (on loopback, where the model server listens on 0.0.0.0): refused within the
    // refresh interval; the agent retries a bounded number of times.
    let script = format!(
        "curl -sS -m 10 http://later.example.test:{l}/ > before.txt; \
         while [ ! -f go ]; do sleep 0.1; done; \
         for i in $(seq 100); do curl -sS -m 10 http://later.example.test:{l}/ > after.txt; \
           grep -q \"this host's own\" after.txt && break; sleep 0.1; done; cat before.txt after.txt"
    );
    let name = common::unique("egress");
    let mut c = ws.command(
        &policy,
        &["--config", &host.config()],
        &["sh", "-c", &script],
        &name,
    );
    let child = host.env(&mut c).spawn().unwrap();
    let before = ws.path().join("before.txt");
    assert!(common::poll_until(
        std::time::Duration::from_secs(60),
        || std::fs::metadata(&before).is_ok_and(|m| m.len() > 0)
    ));
    ip(&["addr", "add", "11.7.7.7/32", "dev", "lo"]);
    std::fs::write(ws.path().join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(
        text.starts_with("aither egress (egress[0]): the upstream did not answer\n"),
        "{}",
        describe(&out)
    );
    assert!(
        text.ends_with("aither egress denied (egress[0]): later.example.test resolves to an internal address or one of this host's own: reachable only as a granted service\n"),
        "{}",
        describe(&out)
    );
    assert!(host.seen().is_empty(), "{:?}", host.seen());
}

#[test]
fn a_tls_hello_for_another_name_and_a_relayed_connect_are_cut() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy("standard", ONE_RULE);
    let t = host.tls_port;
    let good = format!("sni=api.example.test,{t},api.example.test");
    let bad = format!("sni=api.example.test,{t},other.example.test");
    let relay = format!("relayed=api.example.test,{t},other.example.test:{t}");
    let out = host.run(&ws, &policy, &["python3", "probe.py", &good, &bad, &relay]);
    let text = stdout(&out);
    assert_eq!(
        probe_line(&text, &good),
        "tls ok tls-ok sni=api.example.test /",
        "{}",
        describe(&out)
    );
    assert!(
        probe_line(&text, &bad).starts_with("cut"),
        "{}",
        describe(&out)
    );
    assert!(
        probe_line(&text, &relay).starts_with("cut"),
        "{}",
        describe(&out)
    );
    let reasons: Vec<String> = host
        .net_audit()
        .iter()
        .filter(|v| v["rule"] == "tunnel-inspection")
        .map(|v| v["data"]["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains(
            "TLS SNI \"other.example.test\" does not match the tunnel's host \"api.example.test\""
        )),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("relayed proxying")),
        "{reasons:?}"
    );
    // Only the honest handshake reached the upstream.
    assert_eq!(host.seen().len(), 1, "{:?}", host.seen());
}

#[test]
fn oversized_heads_slow_clients_and_a_thousand_connections_leave_the_gateway_serving() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy("standard", ONE_RULE);
    let flood = format!("flood=api.example.test,{},1000", host.http_port);
    let out = host.run(&ws, &policy, &["python3", "probe.py", &flood]);
    assert_eq!(
        probe_line(&stdout(&out), &flood),
        "1000 open, 64 kept waiting; first: HTTP/1.1 200 OK; oversized: HTTP/1.1 431 Request Header Fields Too Large; then: HTTP/1.1 200 OK",
        "{}",
        describe(&out)
    );
    // The closed ones are one summarised record, not 936.
    let bounds: Vec<serde_json::Value> = host
        .net_audit()
        .into_iter()
        .filter(|v| v["rule"] == "bounds")
        .collect();
    let one_by_one = bounds
        .iter()
        .filter(|v| v["data"]["via"] == "accept")
        .count();
    let summarised: u64 = bounds
        .iter()
        .filter_map(|v| v["data"]["suppressed"].as_u64())
        .sum();
    assert_eq!(one_by_one, 20, "{bounds:?}");
    assert_eq!(one_by_one as u64 + summarised, 936, "{bounds:?}");
}

#[test]
fn request_heads_are_limited_to_64_kib_exactly() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy("standard", ONE_RULE);
    let h = host.http_port.to_string();
    let sizes = [4096, 57344, 65537, 100_000, 131_072];
    let checks: Vec<String> = sizes
        .iter()
        .map(|n| format!("head=api.example.test,{h},{n}"))
        .collect();
    let mut cmd = vec!["python3", "probe.py"];
    cmd.extend(checks.iter().map(String::as_str));
    let out = host.run(&ws, &policy, &cmd);
    let text = stdout(&out);
    let got: Vec<String> = checks.iter().map(|c| probe_line(&text, c)).collect();
    let too_large = "HTTP/1.1 431 Request Header Fields Too Large";
    assert_eq!(
        got,
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
            too_large,
            too_large,
            too_large
        ],
        "{}",
        describe(&out)
    );
    assert_eq!(host.seen().len(), 2, "{:?}", host.seen());
}

#[test]
fn a_flood_of_denials_is_answered_429_and_recorded_as_summaries() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy("standard", ONE_RULE);
    let flood = format!("denyflood=other.example.test,{},2000", host.http_port);
    let out = host.run(&ws, &policy, &["python3", "probe.py", &flood]);
    let got = probe_line(&stdout(&out), &flood);
    let count = |code: &str| -> u64 {
        got.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{code}=")))
            .map_or(0, |v| v.parse().unwrap())
    };
    let (forbidden, limited) = (count("403"), count("429"));
    assert_eq!(forbidden + limited, 2000, "{got}\n{}", describe(&out));
    // The budget: 200 at once, then 20 a second.
    assert!((200..1000).contains(&forbidden), "{got}");
    assert!(limited > 0, "{got}");
    // Every denial is accounted for, but at most 20 per rule one by one.
    let audit = host.net_audit();
    let mut total = 0u64;
    for rule in ["default-deny", "denial-budget"] {
        let recs: Vec<&serde_json::Value> = audit.iter().filter(|v| v["rule"] == rule).collect();
        let single = recs
            .iter()
            .filter(|v| v["data"]["via"] != "summary")
            .count() as u64;
        let summarised: u64 = recs
            .iter()
            .filter_map(|v| v["data"]["suppressed"].as_u64())
            .sum();
        assert!(single <= 20 * 2, "{rule}: {single} single records");
        total += single + summarised;
    }
    assert_eq!(total, 2000);
    let summary = audit
        .iter()
        .find(|v| v["data"]["via"] == "summary" && v["rule"] == "default-deny")
        .expect("a summary record");
    assert!(
        summary["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("similar denials of default-deny in"),
        "{summary}"
    );
    assert!(host.seen().is_empty());
}

#[test]
fn a_flood_of_allowed_requests_is_recorded_as_summaries_too() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy("standard", ONE_RULE);
    let flood = format!("denyflood=api.example.test,{},300", host.http_port);
    let out = host.run(&ws, &policy, &["python3", "probe.py", &flood]);
    assert_eq!(
        probe_line(&stdout(&out), &flood),
        "200=300",
        "{}",
        describe(&out)
    );
    assert_eq!(host.seen().len(), 300);
    let allowed: Vec<serde_json::Value> = host
        .net_audit()
        .into_iter()
        .filter(|v| v["decision"] == "allow")
        .collect();
    let single = allowed
        .iter()
        .filter(|v| v["data"]["via"] != "summary")
        .count() as u64;
    let summarised: u64 = allowed
        .iter()
        .filter_map(|v| v["data"]["suppressed"].as_u64())
        .sum();
    // 20 per 10 s one by one (the run may straddle an interval's end), the rest summarised.
    assert!((20..=60).contains(&single), "{single}");
    assert_eq!(single + summarised, 300);
}

#[test]
fn an_idle_tunnel_is_closed_after_the_configured_timeout() {
    let host = Host::with_config("idle_timeout_s = 2");
    let ws = workspace_with_probe();
    let policy = host.policy("standard", ONE_RULE);
    let idle = format!("idle=api.example.test,{},60", host.tls_port);
    let out = host.run(&ws, &policy, &["python3", "probe.py", &idle]);
    assert_eq!(
        probe_line(&stdout(&out), &idle),
        "closed",
        "{}",
        describe(&out)
    );
}

#[test]
fn method_override_and_forwarding_headers_never_reach_the_upstream() {
    let host = Host::new();
    let ws = Workspace::new();
    let policy = host.policy(
        "standard",
        "[[net.egress]]\nhosts = [\"api.example.test\"]\nports = [HTTP]\nmethods = [\"GET\"]\n",
    );
    let script = format!(
        "curl -sS -m 10 -X GET --data 'x=1' -H 'X-HTTP-Method-Override: DELETE' -H 'X-HTTP-Method: DELETE' \
           -H 'X-Method-Override: DELETE' -H 'X-Forwarded-Host: evil.example' -H 'Forwarded: host=evil.example' \
           -H 'X-Forwarded-For: 10.0.0.1' http://api.example.test:{h}/get; echo; \
         curl -sS -m 10 -X DELETE http://api.example.test:{h}/del; echo",
        h = host.http_port
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    assert!(text.starts_with("upstream-ok /get\n"), "{}", describe(&out));
    assert!(
        text.contains("aither egress denied (default-deny): no net.egress rule allows DELETE"),
        "{}",
        describe(&out)
    );
    let seen = host.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let head = seen[0].to_ascii_lowercase();
    for h in ["override", "x-http-method", "forwarded", "evil.example"] {
        assert!(!head.contains(h), "{h} reached the upstream: {head}");
    }
}

#[test]
fn a_tunnel_to_a_service_refuses_connect_anywhere_in_its_requests() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy(
        "standard",
        "[[net.services]]\nname = \"llm\"\ntarget = \"127.0.0.1:LLM\"\n",
    );
    let checks = [
        "raw=llm.aither.internal:80,\\r\\nCONNECT api.example.test:443 HTTP/1.1\\r\\n\\r\\n",
        "raw=llm.aither.internal:80, CONNECT api.example.test:443 HTTP/1.1\\r\\n\\r\\n",
        "raw=llm.aither.internal:80,GET /first HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nCONNECT api.example.test:443 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
    ];
    let mut cmd = vec!["python3", "probe.py"];
    cmd.extend_from_slice(&checks);
    let out = host.run(&ws, &policy, &cmd);
    let text = stdout(&out);
    assert_eq!(probe_line(&text, checks[0]), "cut", "{}", describe(&out));
    assert_eq!(probe_line(&text, checks[1]), "cut", "{}", describe(&out));
    assert_eq!(
        probe_line(&text, checks[2]),
        "answers HTTP/1.1 200 OK | HTTP/1.1 403 Forbidden",
        "{}",
        describe(&out)
    );
    // The service saw the one plain request, never a CONNECT.
    let seen = host.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("GET /first "), "{seen:?}");
}

#[test]
fn connect_errors_tell_nothing_of_the_port_and_no_upstream_is_opened_before_the_first_flight() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy(
        "standard",
        "[[net.egress]]\nhosts = [\"api.example.test\"]\nports = [HTTP, TLS, 1]\n",
    );
    let t = host.tls_port;
    // Port 1 is closed on the upstream's host: the agent sees what it sees for a tunnel
    // refused after its first flight, and plain HTTP gets the rule's generic answer.
    let closed = "sni=api.example.test,1,api.example.test".to_string();
    let bad = format!("sni=api.example.test,{t},other.example.test");
    let socks_closed = "socks_sni=api.example.test,1,api.example.test".to_string();
    let socks_bad = format!("socks_sni=api.example.test,{t},other.example.test");
    let out = host.run(
        &ws,
        &policy,
        &[
            "sh",
            "-c",
            &format!(
                "python3 probe.py {closed} {bad} {socks_closed} {socks_bad}; curl -sS -m 10 http://api.example.test:1/"
            ),
        ],
    );
    let text = stdout(&out);
    for c in [&closed, &bad, &socks_closed, &socks_bad] {
        assert!(
            probe_line(&text, c).starts_with("cut"),
            "{c}\n{}",
            describe(&out)
        );
    }
    assert!(
        text.contains("aither egress (egress[0]): the upstream did not answer"),
        "{}",
        describe(&out)
    );
    assert!(!text.to_ascii_lowercase().contains("refused"), "{text}");
    // The refused first flight never cost an upstream connection.
    assert_eq!(host.tls_accepts.load(Ordering::SeqCst), 0);
}

/// `aitherctl secret set openai` with [`SECRET`], in the test's state directory.
fn set_secret(host: &Host) {
    let mut set = Command::new(AITHERCTL);
    host.env(&mut set);
    secret_set(set, &["openai"], &format!("{SECRET}\n"));
}

/// `aitherctl secret set ARGS` as `c` is set up (environment), the value on stdin; must succeed.
fn secret_set(mut c: Command, args: &[&str], value: &str) {
    let mut child = c
        .args(["secret", "set"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", describe(&o));
}

#[test]
fn a_route_forwards_no_trace_and_nothing_outside_its_prefix_and_trusts_only_configured_anchors() {
    let host = Host::new();
    let ws = Workspace::new();
    set_secret(&host);
    let policy = host.policy(
        "standard",
        r#"
[[net.routes]]
name = "api"
upstream = "https://api.example.test:TLS/v1"
secret = "openai"
"#,
    );
    let r = "http://127.0.0.1:3128";
    let script = format!(
        "for m in TRACE TRACK OPTIONS CONNECT; do curl -s -o /dev/null -w \"$m=%{{http_code}} \" -X $m {r}/api/x; done; echo; \
         for p in //api/x ///api /api//x /api/../x /api/./x /api/%2e%2e/x /api/%2F/x /api/.. '/api/..;/x'; do \
           curl -s --path-as-is -o /dev/null -w \"$p=%{{http_code}} \" {r}$p; done; echo; \
         curl -sS -m 10 -H 'X-Forwarded-Host: evil.example' -H 'X-HTTP-Method-Override: TRACE' {r}/api/ok?q=1; echo"
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].trim(),
        "TRACE=405 TRACK=405 OPTIONS=405 CONNECT=400",
        "{}",
        describe(&out)
    );
    assert_eq!(
        lines[1].trim(),
        "//api/x=400 ///api=400 /api//x=400 /api/../x=400 /api/./x=400 /api/%2e%2e/x=400 /api/%2F/x=400 /api/..=400 /api/..;/x=400",
        "{}",
        describe(&out)
    );
    assert_eq!(
        lines[2],
        "tls-ok sni=api.example.test /v1/ok?q=1",
        "{}",
        describe(&out)
    );
    // The upstream saw the one normalised request, with the secret and no forwarding header.
    let seen = host.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let head = seen[0].to_ascii_lowercase();
    assert!(head.contains(&SECRET.to_ascii_lowercase()), "{head}");
    assert!(
        !head.contains("evil.example") && !head.contains("override"),
        "{head}"
    );

    // Without the configuration file naming the CA, the upstream's certificate is not
    // trusted (the system store does not hold the test CA): the secret never leaves.
    let empty = host.path("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = host.run_with(
        &ws,
        &policy,
        &["--config", empty.to_str().unwrap()],
        &["sh", "-c", &format!("curl -sS -m 10 {r}/api/ok")],
    );
    assert!(
        stdout(&out)
            .contains("aither egress (route:api): the upstream's TLS certificate is not trusted"),
        "{}",
        describe(&out)
    );
    assert_eq!(host.seen().len(), 1);
    // A configuration file with a bad CA file stops the run, naming the file and field.
    let bad = host.path("bad.toml");
    std::fs::write(&bad, "[egress]\nca_file = \"/nonexistent/ca.pem\"\n").unwrap();
    let out = host.run_with(
        &ws,
        &policy,
        &["--config", bad.to_str().unwrap()],
        &["true"],
    );
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("egress.ca_file"),
        "{err}"
    );
}

#[test]
fn a_route_adds_the_secret_on_the_way_out_and_the_agent_never_sees_it() {
    let host = Host::new();
    let ws = Workspace::new();
    set_secret(&host);
    let policy = host.policy(
        "standard",
        r#"
[[net.routes]]
name = "openai"
upstream = "https://api.example.test:TLS/v1"
secret = "openai"
"#,
    );
    // The agent calls its route with a placeholder key, as an SDK would, then looks for the
    // secret everywhere it can read: its environment, pid 1's, /tmp, the workspace, /etc.
    let script = format!(
        "curl -sS -m 10 -H 'Authorization: Bearer placeholder' \"$AITHER_ROUTE_OPENAI/chat/completions\"; echo; \
         echo \"route=$AITHER_ROUTE_OPENAI\"; \
         cat /proc/self/environ /proc/1/environ 2>/dev/null | tr '\\0' '\\n' > /tmp/env.txt; \
         if grep -rqs 'SECRET-7f3a9c' /tmp /etc {ws} /proc/self/environ; then echo LEAK; else echo clean; fi",
        ws = ws.path().display()
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    assert!(
        text.starts_with("tls-ok sni=api.example.test /v1/chat/completions\n"),
        "{}",
        describe(&out)
    );
    assert!(
        text.contains("route=http://127.0.0.1:3128/openai\n"),
        "{}",
        describe(&out)
    );
    assert!(text.ends_with("clean\n"), "{}", describe(&out));
    assert!(!describe(&out).contains(SECRET));
    // The upstream got the real key, and never the placeholder.
    let seen = host.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].contains(&format!("authorization: Bearer {SECRET}"))
            || seen[0].contains(&format!("Authorization: Bearer {SECRET}")),
        "{seen:?}"
    );
    assert!(!seen[0].contains("placeholder"), "{seen:?}");
    // Nor is it in the gateway's log (the audit records of every decision).
    let audit = host.audit_text();
    assert!(audit.contains("route:openai"), "{audit}");
    assert!(!audit.contains(SECRET));
}

/// `secret = "root:NAME"` is root's secret whoever runs the agent, and another user's secret
/// of the same name (set by root with `--owner`) is never the one sent.
#[test]
fn a_root_prefixed_route_sends_roots_secret_and_never_another_users() {
    let host = Host::new();
    let ws = Workspace::new();
    set_secret(&host);
    let mut set = Command::new(AITHERCTL);
    host.env(&mut set);
    secret_set(set, &["openai", "--owner", "4242"], "OTHER-USERS-KEY");
    let policy = host.policy(
        "standard",
        r#"
[[net.routes]]
name = "openai"
upstream = "https://api.example.test:TLS/v1"
secret = "root:openai"
"#,
    );
    let out = host.run(
        &ws,
        &policy,
        &[
            "sh",
            "-c",
            "curl -sS -m 10 \"$AITHER_ROUTE_OPENAI/x\"; echo",
        ],
    );
    assert!(
        stdout(&out).starts_with("tls-ok sni=api.example.test /v1/x\n"),
        "{}",
        describe(&out)
    );
    let seen = host.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].to_ascii_lowercase().contains(&format!(
            "authorization: bearer {}",
            SECRET.to_ascii_lowercase()
        )),
        "{seen:?}"
    );
    assert!(!seen[0].contains("OTHER-USERS-KEY"), "{seen:?}");
}

/// A member's route under aitherd sends that member's own secret, set by them through aitherd:
/// never root's secret of the same name, never another member's (issue 18). The policy is an
/// installed one (members use policies by name); the agent runs in the member's directory.
#[test]
fn a_members_route_sends_their_own_secret_and_never_roots_or_another_members() {
    use common::users::Users;
    let host = Host::new();
    let us = Users::create();
    let pdir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(common::policy_dir().join("standard.toml"))
        .unwrap()
        .replace("name = \"standard\"", "name = \"eg-member-route\"");
    std::fs::write(
        pdir.path().join("eg-member-route.toml"),
        format!(
            "{src}\n[[net.routes]]\nname = \"openai\"\nupstream = \"https://api.example.test:{}/v1\"\nsecret = \"openai\"\n",
            host.tls_port
        ),
    )
    .unwrap();
    let dirs = format!(
        "{}:{}",
        pdir.path().display(),
        common::policy_dir().display()
    );
    let d = us.daemon_env(
        &["--config", &host.config()],
        &[("AITHER_POLICY_DIR", &dirs)],
    );
    // Root's and member 2's secrets of the same name, and member 1's own.
    let mut root_set = Command::new(AITHERCTL);
    d.env(&mut root_set);
    secret_set(root_set, &["openai"], "ROOTS-KEY-5150\n");
    for (i, value) in [(0, "MEMBER-ONE-KEY-7001\n"), (1, "MEMBER-TWO-KEY-7002\n")] {
        let o = us.ctl_input(&d, i, &["secret", "set", "openai"], value);
        assert!(o.status.success(), "{}", describe(&o));
    }
    let script = "curl -sS -m 10 -H 'Authorization: Bearer placeholder' \"$AITHER_ROUTE_OPENAI/x\" > out.tmp; echo >> out.tmp; mv out.tmp out.txt; sleep 60";
    let name = common::unique("eg-member");
    let o = us.ctl(
        &d,
        0,
        &[
            "spawn",
            "--policy",
            "eg-member-route",
            &name,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    assert!(o.status.success(), "{}\n{}", describe(&o), d.log());
    let out = us.dir(&us.users[0]).join("out.txt");
    let done = common::poll_until(std::time::Duration::from_secs(30), || out.exists());
    assert!(done, "the agent wrote nothing: {}", d.log());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.starts_with("tls-ok sni=api.example.test /v1/x\n"),
        "{text}"
    );
    let seen = host.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let head = seen[0].to_ascii_lowercase();
    assert!(
        head.contains("authorization: bearer member-one-key-7001"),
        "{seen:?}"
    );
    for other in ["roots-key-5150", "member-two-key-7002", "placeholder"] {
        assert!(
            !head.contains(other),
            "{other} reached the upstream: {seen:?}"
        );
    }
    // The agent's file is the member's, and the secret is nowhere in it.
    assert!(!text.contains("MEMBER-ONE-KEY"), "{text}");
    us.ok(&d, 0, &["rm", "--force", &name]);
}

#[test]
fn the_request_quota_stops_the_agent_at_its_limit_and_not_before() {
    let host = Host::new();
    let ws = Workspace::new();
    let policy = host.policy(
        "standard",
        &format!("{ONE_RULE}\n[net.quota]\nrequests_per_minute = 5\n"),
    );
    let script = format!(
        "for i in 1 2 3 4 5 6 7; do curl -s -o /dev/null -w '%{{http_code}} ' http://api.example.test:{}/; done; echo; \
         curl -s http://api.example.test:{}/",
        host.http_port, host.http_port
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    assert!(
        text.starts_with("200 200 200 200 200 429 429 \n"),
        "{}",
        describe(&out)
    );
    assert!(
        text.contains("aither egress denied (quota): request quota reached: 5 per minute"),
        "{}",
        describe(&out)
    );
    assert_eq!(host.seen().len(), 5);
}

#[test]
fn strict_grants_no_egress_at_all() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let out = host.run(
        &ws,
        "strict",
        &[
            "sh",
            "-c",
            "env | grep -ci proxy; python3 probe.py tcp=127.0.0.1,3128",
        ],
    );
    let text = stdout(&out);
    assert!(text.starts_with("0\n"), "{}", describe(&out));
    // Landlock: a `none` network denies every TCP connect.
    assert_eq!(probe_line(&text, "tcp=127.0.0.1,3128"), "err EACCES");
}

#[test]
fn under_a_none_network_the_agent_may_connect_to_the_gateway_only() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy("strict", ONE_RULE);
    let script = format!(
        "curl -sS -m 10 http://api.example.test:{}/strict; echo; python3 probe.py tcp=127.0.0.1,8080",
        host.http_port
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    assert!(
        text.starts_with("upstream-ok /strict\n"),
        "{}",
        describe(&out)
    );
    assert_eq!(probe_line(&text, "tcp=127.0.0.1,8080"), "err EACCES");
}

#[test]
fn granted_host_services_appear_by_name_and_keep_their_quota() {
    let host = Host::new();
    let ws = workspace_with_probe();
    let policy = host.policy(
        "standard",
        r#"
[[net.services]]
name = "llm"
target = "127.0.0.1:LLM"
requests_per_minute = 3

[[net.services]]
name = "vec"
target = "unix:SOCK"
"#,
    );
    let script = format!(
        "for i in 1 2 3 4; do curl -sS -m 10 http://llm.aither.internal/v1/models; echo; done; \
         curl -sS -m 10 http://vec.aither.internal:8000/query; echo; \
         curl -sS -m 10 http://other.aither.internal/; echo; \
         python3 probe.py tcp=127.0.0.1,{llm}",
        llm = host.llm_port
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        &lines[..4],
        &[
            "llm-ok /v1/models",
            "llm-ok /v1/models",
            "llm-ok /v1/models",
            "aither egress denied (quota): request quota reached: 3 per minute (net.services.llm.requests_per_minute); retry later",
        ],
        "{}",
        describe(&out)
    );
    assert_eq!(lines[4], "unix-llm-ok /query", "{}", describe(&out));
    assert_eq!(
        lines[5],
        "aither egress denied (default-deny): no net.services grant for \"other\"",
        "{}",
        describe(&out)
    );
    // The service's host address is not reachable directly.
    assert_eq!(
        probe_line(&text, &format!("tcp=127.0.0.1,{}", host.llm_port)),
        "err ECONNREFUSED"
    );
}

#[test]
fn old_tokens_mean_no_egress_and_attenuation_only_removes_rules() {
    use aither::net::NetGrants;
    use aither::policy::Policy;
    let host = Host::new();
    let p = Policy::load_file(Path::new(&host.policy(
        "standard",
        r#"
[[net.egress]]
hosts = ["*.example.test"]
ports = [443]

[[net.services]]
name = "llm"
target = "127.0.0.1:11434"
"#,
    )))
    .unwrap()
    .policy;
    let claims =
        aither::token::Claims::from_policy(&p, "a", std::time::Duration::from_secs(60)).unwrap();
    assert_eq!(claims.net, p.net);
    // A payload without `net` (a token minted before egress) decodes to no egress at all.
    let mut v: serde_json::Value = serde_json::from_slice(&claims.to_payload()).unwrap();
    v.as_object_mut().unwrap().remove("net");
    let old = aither::token::Claims::from_payload(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(old.net.is_empty() && old.net == NetGrants::default());
    // Narrower: one exact host below the wildcard, no service.
    let mut child = claims.clone();
    child.net.egress[0].hosts = vec!["api.example.test".into()];
    child.net.services.clear();
    aither::token::claims::narrows(&child, &claims).unwrap();
    // Wider: another port, or a service the parent lacks.
    let mut wide = claims.clone();
    wide.net.egress[0].ports.push(80);
    let e = aither::token::claims::narrows(&wide, &claims)
        .unwrap_err()
        .to_string();
    assert!(e.contains("net.egress[0]"), "{e}");
    let mut wide = claims.clone();
    wide.net.services.push(aither::net::ServiceGrant {
        name: "db".into(),
        target: Some("127.0.0.1:5432".into()),
        ..Default::default()
    });
    let e = aither::token::claims::narrows(&wide, &claims)
        .unwrap_err()
        .to_string();
    assert!(e.contains("net.services.db"), "{e}");
    // `token attenuate --net-drop`: the result narrows and lacks what was dropped.
    let now = aither::token::now_unix();
    let dropped = aither::token::attenuate::Attenuation {
        net_drop: vec!["service:llm".into(), "egress[0]".into()],
        ..Default::default()
    }
    .apply(&claims, now)
    .unwrap();
    assert!(dropped.net.egress.is_empty() && dropped.net.services.is_empty());
    aither::token::claims::narrows(&dropped, &claims).unwrap();
    let bad = aither::token::attenuate::Attenuation {
        net_drop: vec!["egress[7]".into()],
        ..Default::default()
    }
    .apply(&claims, now);
    assert!(bad.is_err());
}

#[test]
fn aitherd_agents_egress_through_the_daemons_gateway_across_a_restart_and_publish_services() {
    use common::daemon::TestDaemon;
    let host = Host::new();
    let mut d = TestDaemon::start("aither-egress-d-", &["--config", &host.config()]);
    let policy = host.policy("standard", ONE_RULE);
    let ws = d.ws.path().to_str().unwrap().to_string();
    // Then, each time `go` appears, one more request (after the daemon's restart below).
    let script = format!(
        "curl -sS -m 10 http://api.example.test:{h}/daemon > out.tmp; echo >> out.tmp; \
         curl -sS -m 10 http://other.example.test:{h}/ >> out.tmp; mv out.tmp out.txt; \
         while true; do if [ -f go ]; then rm go; curl -sS -m 10 http://api.example.test:{h}/again > again.tmp; mv again.tmp again.txt; fi; sleep 0.1; done",
        h = host.http_port
    );
    d.ok(&[
        "spawn", "--json", "--policy", &policy, "-w", &ws, "egress-d", "--", "sh", "-c", &script,
    ]);
    let out = d.ws.path().join("out.txt");
    let done = common::poll_until(std::time::Duration::from_secs(30), || out.exists());
    assert!(done, "the agent wrote nothing: {}", d.log());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("upstream-ok /daemon\n"), "{text}");
    assert!(
        text.contains("aither egress denied (default-deny)"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["inspect", "egress-d"])).unwrap();
    let rules = &v["net"]["rules"];
    assert_eq!(rules["egress[0]"]["requests"], 1, "{v}");
    assert_eq!(rules["default-deny"]["denials"], 1, "{v}");
    assert!(rules["egress[0]"]["bytes_in"].as_u64().unwrap() > 0, "{v}");
    // `stats`: the same counters, every rule together, and in the table.
    let s: serde_json::Value =
        serde_json::from_str(d.ok(&["stats", "--no-stream", "--json", "egress-d"]).trim()).unwrap();
    let net = &s["net"];
    assert_eq!(net["requests"], 1, "{s}");
    assert_eq!(net["denials"], 1, "{s}");
    let sum = |k: &str| -> u64 {
        let all = rules.as_object().unwrap().values();
        all.map(|r| r[k].as_u64().unwrap()).sum()
    };
    assert_eq!(net["bytes_in"], sum("bytes_in"), "{s} {v}");
    assert_eq!(net["bytes_out"], sum("bytes_out"), "{s} {v}");
    assert!(net["bytes_out"].as_u64().unwrap() > 0, "{s}");
    // Root's table: NAME OWNER STATE CPU % MEM… MEM % PIDS "NET IN / OUT" REQUESTS GPU.
    let table = d.ok(&["stats", "--no-stream", "egress-d"]);
    let row = table.lines().nth(1).unwrap_or_default();
    let cells: Vec<&str> = row
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert!(cells[7].contains(" / ") && cells[8] == "1", "{table}");
    let events = d.ok(&["events", "--json", "--agent", "egress-d"]);
    assert!(events.contains("\"net.allowed\""), "{events}");
    assert!(events.contains("\"net.denied\""), "{events}");
    let audit = std::fs::read_to_string(d.audit_log()).unwrap_or_default();
    assert!(
        audit.contains("\"kind\":\"net\"") && audit.contains("other.example.test"),
        "{audit}"
    );
    // aitherd killed and restarted: it adopts the shim and takes the run's gateway socket
    // back from it (fd 100, pidfd_getfd); the agent's egress works again.
    d.kill9();
    d.launch();
    std::fs::write(d.ws.path().join("go"), "").unwrap();
    let again = d.ws.path().join("again.txt");
    let done = common::poll_until(std::time::Duration::from_secs(30), || again.exists());
    assert!(done, "no egress after the daemon's restart: {}", d.log());
    assert_eq!(
        std::fs::read_to_string(&again).unwrap(),
        "upstream-ok /again"
    );
    d.ok(&["stop", "egress-d"]);
    d.ok(&["rm", "egress-d"]);

    // An agent's port published as a service: a "model server" in one sandbox serves another
    // sandbox whose token grants the service (and only that one).
    std::fs::write(d.ws.path().join("model.txt"), "weights\n").unwrap();
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        "standard",
        "-w",
        &ws,
        "--publish",
        "llm=8000",
        "model",
        "--",
        "python3",
        "-m",
        "http.server",
        "8000",
        "--bind",
        "127.0.0.1",
    ]);
    let consumer = host.policy("standard", "[[net.services]]\nname = \"llm\"\n");
    let script = "for i in $(seq 50); do curl -sf -m 5 http://llm.aither.internal/model.txt > got.tmp && break; sleep 0.2; done; \
                  curl -sS -m 5 http://nope.aither.internal/ >> got.tmp; mv got.tmp got.txt; sleep 60";
    d.ok(&[
        "spawn", "--json", "--policy", &consumer, "-w", &ws, "consumer", "--", "sh", "-c", script,
    ]);
    let got = d.ws.path().join("got.txt");
    let done = common::poll_until(std::time::Duration::from_secs(30), || got.exists());
    assert!(done, "the consumer wrote nothing: {}", d.log());
    let text = std::fs::read_to_string(&got).unwrap();
    assert!(text.starts_with("weights\n"), "{text}");
    assert!(
        text.contains("no net.services grant for \"nope\""),
        "{text}"
    );
    for a in ["consumer", "model"] {
        d.ok(&["stop", a]);
        d.ok(&["rm", a]);
    }
}

#[test]
fn a_bad_net_rule_in_a_policy_names_the_file_line_and_field() {
    let base = std::fs::read_to_string(common::policy_dir().join("standard.toml")).unwrap();
    let src = format!("{base}\n[[net.egress]]\nhosts = [\"10.0.0.1\"]\nports = [443]\n");
    let e = aither::policy::Policy::parse(&src, "bad.toml")
        .unwrap_err()
        .to_string();
    // base, an empty line, the table header, then `hosts`.
    let line = base.lines().count() + 3;
    assert!(
        e.starts_with(&format!("bad.toml:{line}:"))
            && e.contains("field `net.egress[0].hosts`")
            && e.contains("an IP address"),
        "{e}"
    );
}

#[test]
fn the_byte_quota_stops_the_agent_once_spent() {
    let host = Host::new();
    let ws = Workspace::new();
    let policy = host.policy(
        "standard",
        &format!("{ONE_RULE}\n[net.quota]\nbytes = 1000\n"),
    );
    // Each request and its answer are well under 250 bytes: at least 4 fit in 1000.
    let script = format!(
        "for i in $(seq 20); do curl -s -o /dev/null -w '%{{http_code}} ' http://api.example.test:{h}/; done; echo; \
         curl -s http://api.example.test:{h}/",
        h = host.http_port
    );
    let out = host.run(&ws, &policy, &["sh", "-c", &script]);
    let text = stdout(&out);
    let codes: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    let ok = codes.iter().take_while(|c| **c == "200").count();
    assert!(ok >= 4, "{}", describe(&out));
    assert_eq!(codes.last(), Some(&"429"), "{}", describe(&out));
    assert!(
        text.contains("aither egress denied (quota): byte quota reached:")
            && text.contains("of 1000 bytes used"),
        "{}",
        describe(&out)
    );
}

#[test]
fn aitherd_quotas_hold_across_the_agents_restarts_and_the_daemons() {
    use common::daemon::TestDaemon;
    let host = Host::new();
    let mut d = TestDaemon::start("aither-egress-q-", &["--config", &host.config()]);
    let policy = host.policy(
        "standard",
        &format!("{ONE_RULE}\n[net.quota]\nrequests_per_minute = 5\n"),
    );
    let ws = d.ws.path().to_str().unwrap().to_string();
    // Each run: 3 requests, then `exit 1` (restart on failure, at once). The third run waits
    // for `go`, so that the daemon can be killed and restarted first.
    let script = format!(
        "n=$(cat n 2>/dev/null || echo 0); n=$((n+1)); echo $n > n; \
         if [ $n -ge 3 ]; then while [ ! -f go ]; do sleep 0.1; done; fi; \
         for i in 1 2 3; do curl -s -o /dev/null -w '%{{http_code}} ' http://api.example.test:{}/; done >> codes.tmp; \
         echo >> codes.tmp; cp codes.tmp codes.txt; exit 1",
        host.http_port
    );
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        &policy,
        "-w",
        &ws,
        "--restart",
        "on-failure",
        "--backoff",
        "0",
        "quota-q",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let codes = d.ws.path().join("codes.txt");
    let lines = |n: usize| {
        common::poll_until(std::time::Duration::from_secs(60), || {
            std::fs::read_to_string(&codes).is_ok_and(|t| t.lines().count() >= n)
        })
    };
    assert!(lines(2), "two runs did not finish: {}", d.log());
    // The state the second run left is in the daemon's database before the daemon dies.
    let db = d.state.path().join("state/state.db");
    let stored = common::poll_until(std::time::Duration::from_secs(30), || {
        rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row(
                    "SELECT state FROM net_quota WHERE name = 'quota-q'",
                    [],
                    |r| r.get::<_, String>(0),
                )
            })
            .is_ok_and(|s| {
                serde_json::from_str::<serde_json::Value>(&s).unwrap()["requests_ms"]
                    .as_array()
                    .is_some_and(|a| a.len() == 5)
            })
    });
    assert!(stored, "the quota state was not stored");
    d.kill9();
    d.launch();
    std::fs::write(d.ws.path().join("go"), "").unwrap();
    assert!(lines(4), "no runs after the daemon's restart: {}", d.log());
    let text = std::fs::read_to_string(&codes).unwrap();
    let got: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(
        got[..4],
        ["200 200 200", "200 200 429", "429 429 429", "429 429 429"],
        "{text}"
    );
    assert_eq!(host.seen().len(), 5, "{:?}", host.seen());
    d.ok(&["stop", "quota-q"]);
    d.ok(&["rm", "quota-q"]);
}

#[test]
fn one_hostile_agent_under_aitherd_changes_nothing_another_agent_or_the_operator_sees() {
    use common::daemon::TestDaemon;
    // 200 descriptors for the gateway: 25 per agent.
    let host = Host::with_config("max_descriptors = 200");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let d = TestDaemon::start(
        "aither-egress-h-",
        &["--config", &host.config(), "--metrics", &metrics],
    );
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/egress/probe.py"),
        d.ws.path().join("probe.py"),
    )
    .unwrap();
    let policy = host.policy("standard", ONE_RULE);
    let ws = d.ws.path().to_str().unwrap().to_string();
    let (h, t) = (host.http_port, host.tls_port);
    // The hostile agent: 40 tunnels held open, then 3000 denials as fast as it can.
    let hostile = format!(
        "python3 probe.py tunnels=api.example.test,{t},40,300 > hostile.txt & \
         while ! grep -q established hostile.txt; do sleep 0.1; done; \
         python3 probe.py denyflood=other.example.test,{h},3000 > flood.txt; wait"
    );
    d.ok(&[
        "spawn",
        "--json",
        "--policy",
        &policy,
        "-w",
        &ws,
        "--restart",
        "never",
        "hostile",
        "--",
        "sh",
        "-c",
        &hostile,
    ]);
    let out = d.ws.path().join("hostile.txt");
    let held = common::poll_until(std::time::Duration::from_secs(120), || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("tunnels-established"))
    });
    assert!(
        held,
        "the hostile agent did not get to its tunnels: {}",
        d.log()
    );
    let text = std::fs::read_to_string(&out).unwrap();
    // Tunnels count until they close: 12 tunnels are 24 of its 25 descriptors.
    assert!(text.contains("tunnels-established: 12\n"), "{text}");
    let flood = d.ws.path().join("flood.txt");
    assert!(
        common::poll_until(std::time::Duration::from_secs(120), || {
            std::fs::read_to_string(&flood).is_ok_and(|t| t.contains("429="))
        }),
        "{}",
        d.log()
    );
    let settled = common::poll_until(std::time::Duration::from_secs(30), || {
        let v: serde_json::Value = serde_json::from_str(&d.ok(&["inspect", "hostile"])).unwrap();
        v["net"]["descriptors"] == 24 && v["net"]["connections"] == 12
    });
    assert!(settled, "{}", d.ok(&["inspect", "hostile"]));
    // Another agent is served meanwhile, and the operator's commands answer.
    let victim = format!(
        "curl -sS -m 10 http://api.example.test:{h}/victim > victim.tmp; mv victim.tmp victim.txt; sleep 300"
    );
    d.ok(&[
        "spawn", "--json", "--policy", &policy, "-w", &ws, "victim", "--", "sh", "-c", &victim,
    ]);
    let got = d.ws.path().join("victim.txt");
    assert!(
        common::poll_until(std::time::Duration::from_secs(30), || got.exists()),
        "{}",
        d.log()
    );
    assert_eq!(
        std::fs::read_to_string(&got).unwrap(),
        "upstream-ok /victim"
    );
    assert!(d.ok(&["ps"]).contains("victim"));
    // The flood is a few records: at most 20 per rule and 10 s one by one (default-deny,
    // denial-budget, bounds; the flood may straddle an interval's end), the rest summarised.
    let events = d.ok(&["events", "--json", "--agent", "hostile"]);
    let denied = events.matches("\"net.denied\"").count();
    assert!((20..=130).contains(&denied), "{denied} denial events");
    let victim_events = d.ok(&["events", "--json", "--agent", "victim"]);
    assert!(victim_events.contains("\"net.allowed\""), "{victim_events}");
    for a in ["hostile", "victim"] {
        d.ok(&["stop", a]);
    }
    // Once the run has ended its summaries are out: the metric counts every denial, the
    // summarised ones included (3000 of the flood, and the connections its bounds closed).
    let denied = common::poll_until(std::time::Duration::from_secs(10), || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut m = String::new();
        s.read_to_string(&mut m).unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix("aither_egress_decisions_total{decision=\"denied\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n >= 3000)
    });
    assert!(
        denied,
        "the denial metric does not count the summarised denials"
    );
    for a in ["hostile", "victim"] {
        d.ok(&["rm", a]);
    }
}
