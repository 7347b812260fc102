//! Remembers across restarts with the memory tiers, in Rust (the Python one is
//! agents/rememberer/): a run counter in `active`, a fact per run in `knowledge`, a chain of
//! runs in `codegraph`, scratch in `working` (cleared by aitherd at the end of every run).
//!
//! Prints `REMEMBERED {"run": N, "earlier_facts": [...], "chain": [...], "scratch_left": null}`.
//!
//! ```sh
//! cargo build --release -p aither-sdk --example remember
//! cp target/release/examples/remember ./remember
//! aitherctl spawn --wait-ready remember -- ./remember
//! aitherctl restart remember; aitherctl logs remember
//! ```

use aither_sdk::{Channel, SdkError, Tier};
use serde_json::{json, Value};

fn main() -> Result<(), SdkError> {
    let ch = Channel::from_env()?;
    ch.ready()?;
    let run = ch
        .mem_get(Tier::Active, "runs")?
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
        + 1;
    let scratch_left = ch.mem_get(Tier::Working, "scratch")?;
    let mut earlier: Vec<String> = ch
        .mem_search("remember run started", 100)?
        .iter()
        .filter_map(|h| h["key"].as_str().map(str::to_owned))
        .collect();
    earlier.sort();

    ch.mem_put(Tier::Active, "runs", &json!(run), Some(7 * 86400))?;
    ch.mem_put(Tier::Working, "scratch", &json!({"run": run}), None)?;
    let fact = format!("remember run {run} started");
    ch.mem_put(Tier::Knowledge, &format!("run-{run}"), &json!(fact), None)?;
    ch.graph_add_node(&format!("run-{run}"), "run", json!({}))?;
    if run > 1 {
        let (prev, this) = (format!("run-{}", run - 1), format!("run-{run}"));
        ch.graph_add_edge(&prev, &this, "next", json!({}))?;
    }
    let graph = ch.graph_neighbors("run-1", 8, Some("next"))?;
    let mut chain: Vec<String> = graph["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["id"].as_str().map(str::to_owned))
        .collect();
    chain.sort();

    let seen = json!({"run": run, "earlier_facts": earlier, "chain": chain,
                      "scratch_left": scratch_left.unwrap_or(Value::Null)});
    println!("REMEMBERED {seen}");
    ch.status(&format!(
        "run {run}: remembers {} earlier run(s)",
        earlier.len()
    ))?;
    loop {
        std::thread::park();
    }
}
