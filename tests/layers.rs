//! The crate layers Cargo enforces (docs/architecture.md, "Crates"): the launcher `aither-init`
//! and the core `aither-core` link no async runtime, HTTP, TLS, SQLite or NVML, and the launcher
//! depends on the core only, never on the daemon crate `aither`.
//!
//! Read from `cargo metadata` (offline, the workspace's own Cargo.lock, for the host's
//! platform): the resolved graph,
//! walked over the edges `cargo tree -p <crate>` shows (normal and build dependencies
//! everywhere, dev-dependencies of the crate itself).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Packages the lower layers must not reach, and why.
const FORBIDDEN: &[(&str, &str)] = &[
    ("tokio", "async runtime"),
    ("hyper", "HTTP"),
    ("rustls", "TLS"),
    ("rusqlite", "SQLite"),
    ("nvml-wrapper", "NVML"),
];

struct Graph {
    /// Package id -> name.
    names: BTreeMap<String, String>,
    /// Package id -> (dependency id, its kinds: "normal", "build", "dev").
    deps: BTreeMap<String, Vec<(String, Vec<String>)>>,
}

/// The host's target triple (`rustc -vV`): the graph is resolved for it only. Unfiltered,
/// `cargo metadata` wants every platform's packages (Windows-only ones included), which a
/// fresh machine's cache does not hold after a build, and `--offline` then fails.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .unwrap_or_else(|e| panic!("{rustc} -vV: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap_or_else(|| panic!("no host line in {rustc} -vV"))
        .trim()
        .to_string()
}

fn graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host_triple()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{cargo} metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let names = v["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("id").to_string(),
                p["name"].as_str().expect("name").to_string(),
            )
        })
        .collect();
    let deps = v["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| {
            let edges = n["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .map(|d| {
                    let kinds = d["dep_kinds"]
                        .as_array()
                        .expect("dep_kinds")
                        .iter()
                        .map(|k| k["kind"].as_str().unwrap_or("normal").to_string())
                        .collect();
                    (d["pkg"].as_str().expect("pkg").to_string(), kinds)
                })
                .collect();
            (n["id"].as_str().expect("node id").to_string(), edges)
        })
        .collect();
    Graph { names, deps }
}

impl Graph {
    fn id(&self, name: &str) -> String {
        let ids: Vec<&String> = self
            .names
            .iter()
            .filter(|(_, n)| *n == name)
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids.len(), 1, "one package named {name}: {ids:?}");
        ids[0].clone()
    }

    /// Names of every package `root` reaches, as `cargo tree -p root` shows them.
    fn reach(&self, root: &str) -> BTreeSet<String> {
        let start = self.id(root);
        let mut seen = BTreeSet::from([start.clone()]);
        let mut todo = vec![start.clone()];
        while let Some(id) = todo.pop() {
            for (dep, kinds) in self.deps.get(&id).map(Vec::as_slice).unwrap_or_default() {
                let follow = kinds.iter().any(|k| k != "dev" || id == start);
                if follow && seen.insert(dep.clone()) {
                    todo.push(dep.clone());
                }
            }
        }
        seen.iter().map(|id| self.names[id].clone()).collect()
    }
}

fn forbidden_in(reached: &BTreeSet<String>) -> Vec<String> {
    FORBIDDEN
        .iter()
        .filter(|(name, _)| reached.contains(*name))
        .map(|(name, why)| format!("{name} ({why})"))
        .collect()
}

#[test]
fn core_and_launcher_link_no_runtime_http_tls_sqlite_or_nvml() {
    let g = graph();
    // The walk sees what it must refuse: the daemon crate reaches every one of them.
    let daemon = g.reach("aither");
    assert_eq!(
        forbidden_in(&daemon).len(),
        FORBIDDEN.len(),
        "the daemon crate `aither` should reach all of {FORBIDDEN:?}; the graph walk is broken"
    );
    for krate in ["aither-core", "aither-init"] {
        let bad = forbidden_in(&g.reach(krate));
        assert!(
            bad.is_empty(),
            "{krate} depends (directly or not) on {bad:?}: the core and the launcher must not \
             (docs/architecture.md, \"Crates\")"
        );
    }
}

#[test]
fn launcher_depends_on_the_core_not_on_the_daemon_crate() {
    let g = graph();
    let init = g.reach("aither-init");
    assert!(init.contains("aither-core"), "{init:?}");
    assert!(
        !init.contains("aither"),
        "aither-init depends on the daemon crate `aither`: it may use aither-core only"
    );
    let core = g.reach("aither-core");
    for upper in ["aither", "aither-init", "aither-sdk"] {
        assert!(
            !core.contains(upper),
            "aither-core depends on {upper}: the core depends on no workspace crate but aither-proto"
        );
    }
}

/// The wire contract (docs/protocol.md) is one crate that agents, the launcher, the CLI and the
/// daemon all link: it depends on serde, serde_json and thiserror only, and it is the only
/// workspace crate an agent's SDK carries.
#[test]
fn the_protocol_crate_links_serde_only_and_is_all_the_sdk_takes_from_the_workspace() {
    let g = graph();
    let id = g.id("aither-proto");
    let direct: BTreeSet<String> = g.deps[&id]
        .iter()
        .filter(|(_, kinds)| kinds.iter().any(|k| k != "dev"))
        .map(|(d, _)| g.names[d].clone())
        .collect();
    assert_eq!(
        direct,
        BTreeSet::from(["serde".into(), "serde_json".into(), "thiserror".into()]),
        "aither-proto's dependencies"
    );
    let workspace = [
        "aither",
        "aither-core",
        "aither-init",
        "aither-sdk",
        "aither-proto",
    ];
    let proto = g.reach("aither-proto");
    assert!(forbidden_in(&proto).is_empty(), "{proto:?}");
    for w in &workspace[..4] {
        assert!(!proto.contains(*w), "aither-proto depends on {w}");
    }
    let sdk = g.reach("aither-sdk");
    let taken: Vec<&&str> = workspace[..3]
        .iter()
        .filter(|w| sdk.contains(**w))
        .collect();
    assert!(taken.is_empty(), "aither-sdk depends on {taken:?}");
    assert!(sdk.contains("aither-proto"), "{sdk:?}");
    // Those who speak the protocol use its one definition.
    for user in ["aither", "aither-core", "aither-init", "aither-sdk"] {
        assert!(g.reach(user).contains("aither-proto"), "{user}");
    }
}
