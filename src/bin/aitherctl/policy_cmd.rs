//! `aitherctl policy ls|show|check`.

use aither::policy::{LoadedPolicy, NetworkMode, Policy};
use aither::sandbox::landlock;
use aither::sandbox::seccomp;
use aither::units::Size;
use clap::Subcommand;
use serde_json::json;

/// List, show and check policies.
#[derive(Subcommand)]
pub enum PolicyCmd {
    /// List the policies `--policy NAME` can use (installed, then built-in).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the effective rules of a policy: for one that extends another (`extends =
    /// "NAME"`), the resolved policy (the parent's rules with the overrides applied) and the
    /// chain of what it extends.
    Show {
        /// Policy name or file.
        policy: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a policy (an installed or built-in name, or a file); every error is reported, each
    /// with file:line:column and the field. Exit 0 when valid, 1 when not.
    Check {
        /// Policy name or file.
        policy: String,
    },
}

pub fn run(cmd: PolicyCmd) -> i32 {
    match cmd {
        PolicyCmd::Ls { json } => ls(json),
        PolicyCmd::Show { policy, json } => match Policy::load(&policy) {
            Ok(p) => show(&p, json),
            Err(e) => {
                crate::print_error(&e.into());
                1
            }
        },
        PolicyCmd::Check { policy } => match Policy::load(&policy) {
            Ok(p) => {
                println!("{}: ok (policy {:?})", p.source, p.policy.name);
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
    }
}

fn ls(as_json: bool) -> i32 {
    let all = Policy::list();
    if as_json {
        let v: Vec<_> = all
            .iter()
            .map(|(name, r)| match r {
                Ok(p) => json!({"name": name, "source": p.source, "description": p.policy.description, "valid": true}),
                Err(e) => json!({"name": name, "valid": false, "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    println!("{:<12} {:<34} DESCRIPTION", "NAME", "SOURCE");
    for (name, r) in &all {
        match r {
            Ok(p) => println!("{:<12} {:<34} {}", name, p.source, p.policy.description),
            Err(e) => println!("{:<12} {:<34} INVALID: {e}", name, "-"),
        }
    }
    0
}

fn show(lp: &LoadedPolicy, as_json: bool) -> i32 {
    let p = &lp.policy;
    let abi = landlock::kernel_abi();
    let seccomp_rules = (p.seccomp.profile != "none").then(|| {
        seccomp::profile_names(&p.seccomp.profile)
            .map(|(a, _)| a.len())
            .unwrap_or(0)
    });
    if as_json {
        let v = json!({
            "source": lp.source,
            "extends": lp.extends,
            "policy": p,
            "effective": {
                "seccomp_allowed_syscalls": seccomp_rules,
                "kernel_landlock_abi": abi,
            }
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    let yn = |b: bool| if b { "new" } else { "host" };
    println!("policy        {} ({})", p.name, lp.source);
    if !lp.extends.is_empty() {
        let chain: Vec<String> = lp
            .extends
            .iter()
            .map(|e| format!("{} ({})", e.name, e.source))
            .collect();
        println!(
            "extends       {} (shown resolved: its rules with this policy's overrides)",
            chain.join(" <- ")
        );
    }
    println!("description   {}", p.description);
    if let Some(w) = &p.warning {
        println!("WARNING       {w}");
    }
    println!(
        "namespaces    user new, pid new, mount new, net {}, ipc {}, uts {}, cgroup {}",
        yn(p.namespaces.net),
        yn(p.namespaces.ipc),
        yn(p.namespaces.uts),
        yn(p.namespaces.cgroup)
    );
    println!("identity      uid {} gid {} inside, an unprivileged host uid per sandbox; no capabilities; no_new_privs", p.process.uid, p.process.gid);
    println!("read-only     {}", p.filesystem.read_only.join(" "));
    println!(
        "/etc          {}",
        if p.filesystem.etc.is_empty() {
            "-".to_string()
        } else {
            p.filesystem.etc.join(" ")
        }
    );
    println!(
        "workspace     {:?}, exec {}",
        p.filesystem.workspace, p.filesystem.exec_workspace
    );
    println!(
        "tmp           /tmp {} tmpfs, /dev/shm {}",
        p.filesystem.tmp_size, p.filesystem.dev_shm_size
    );
    print_network(p);
    println!(
        "landlock      {} (kernel ABI {abi})",
        if p.landlock.enabled {
            "on: files, TCP, device ioctls, abstract sockets and signals as the ABI allows"
        } else {
            "OFF"
        }
    );
    match seccomp_rules {
        Some(n) => println!(
            "seccomp       profile {:?}: {n} syscalls allowed, everything else EPERM",
            p.seccomp.profile
        ),
        None => println!("seccomp       OFF"),
    }
    println!(
        "resources     memory {} (swap {}), {} CPUs, {} pids",
        p.resources.memory,
        p.resources
            .swap
            .map(|s: Size| s.to_string())
            .unwrap_or_else(|| "host default".into()),
        p.resources.cpus,
        p.resources.pids
    );
    if let Some(d) = p.resources.workspace_disk {
        println!("workspace     disk quota {d} (a layered workspace's writes)");
    }
    println!(
        "rlimits       nofile {}, core {}",
        p.rlimits.nofile, p.rlimits.core
    );
    if let Some(t) = p.process.timeout {
        println!("timeout       {t}");
    }
    println!(
        "best-effort   {}",
        if p.best_effort.is_empty() {
            "none (every protection required)".to_string()
        } else {
            format!("{:?}", p.best_effort)
        }
    );
    0
}

/// The network mode and, when the policy grants any, its `[net]` egress rules, services,
/// credential routes and quota (docs/network.md).
fn print_network(p: &Policy) {
    let mode = match p.network.mode {
        NetworkMode::None => "none",
        NetworkMode::Loopback => "loopback",
        NetworkMode::Host => "host",
    };
    let n = &p.net;
    if n.egress.is_empty() && n.services.is_empty() && n.routes.is_empty() {
        println!("network       {mode}");
        return;
    }
    println!(
        "network       {mode}, plus through the egress gateway: {} egress rule(s), {} service(s), {} route(s)",
        n.egress.len(),
        n.services.len(),
        n.routes.len()
    );
    for r in &n.egress {
        let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
        let methods = if r.methods.is_empty() {
            String::new()
        } else {
            format!(" {}", r.methods.join(","))
        };
        println!(
            "  egress      {} port {}{methods}",
            r.hosts.join(" "),
            ports.join(",")
        );
    }
    for s in &n.services {
        let mut rate = s
            .requests_per_minute
            .map(|r| format!(", {r}/min"))
            .unwrap_or_default();
        if let Some(api) = s.api {
            rate.push_str(&format!(", api {api:?}").to_lowercase());
        }
        if let Some(t) = s.tokens_per_minute {
            rate.push_str(&format!(", {t} tokens/min"));
        }
        if let Some(t) = s.tokens_per_day {
            rate.push_str(&format!(", {t} tokens/day"));
        }
        println!(
            "  service     {}.aither.internal -> {}{rate}",
            s.name,
            s.target.as_deref().unwrap_or("published by an agent")
        );
    }
    for r in &n.routes {
        println!(
            "  route       /{}/ -> {} (secret {:?} in {})",
            r.name, r.upstream, r.secret, r.header
        );
    }
    if let Some(rpm) = n.quota.requests_per_minute {
        println!("  quota       {rpm} requests/min");
    }
    if let Some(b) = n.quota.bytes {
        println!("  quota       {} bytes", Size(b));
    }
}
