//! `aitherctl mem put|get|rm|ls|usage|search|graph|export|import|clear` (docs/memory.md).
//!
//! Every command is one `mem.*` request on the control socket, on behalf of an operator: any
//! agent's memory, every tier, no quota. `bench` (hidden) measures the store directly.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aither::daemon::proto::Request;
use aither::memory::store::Sync;
use aither::memory::{MemoryStore, Tier};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::daemon_cmd::{call, print_json, EXIT_REFUSED, EXIT_USAGE};

/// Read and write agents' memory tiers (working, active, spirit, codegraph, knowledge).
///
/// Operators (root, group aither) act on any agent's memory, with no quota. Agents reach
/// their own through their channel (mem.* ops, docs/protocol.md), within their token's claims.
///
/// Examples:
///   aitherctl mem put my-agent --tier spirit persona "You are a careful reviewer."
///   echo '{"step": 3}' | aitherctl mem put my-agent --tier active --json-value state -
///   aitherctl mem get my-agent --tier active state --json
///   aitherctl mem ls my-agent --tier knowledge
///   aitherctl mem search my-agent --tier knowledge "ownership borrowing" --limit 5
///   aitherctl mem graph my-agent neighbors src/main.rs --depth 2
///   aitherctl mem export my-agent > my-agent.jsonl
///   aitherctl mem import other-agent my-agent.jsonl
#[derive(Subcommand)]
#[command(verbatim_doc_comment)]
pub enum MemCmd {
    /// Write KEY in a tier (VALUE, or - for stdin; a string unless --json-value).
    Put {
        agent: String,
        #[arg(long, value_name = "TIER")]
        tier: String,
        key: String,
        /// The value; - (or nothing) reads stdin.
        #[arg(value_name = "VALUE|-", allow_hyphen_values = true)]
        value: Option<String>,
        /// Parse the value as JSON instead of taking it as a string.
        #[arg(long)]
        json_value: bool,
        /// Lifetime of an active entry (default 24h).
        #[arg(long, value_name = "DURATION", value_parser = crate::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Print KEY's value (strings as they are, other values as JSON).
    Get {
        agent: String,
        #[arg(long, value_name = "TIER")]
        tier: String,
        key: String,
        /// Print the whole entry as JSON (value, size, times).
        #[arg(long)]
        json: bool,
    },
    /// Delete KEY from a tier.
    Rm {
        agent: String,
        #[arg(long, value_name = "TIER")]
        tier: String,
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// List keys (all key/value tiers unless --tier).
    Ls {
        agent: String,
        #[arg(long, value_name = "TIER")]
        tier: Option<String>,
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<String>,
        /// At most N keys per tier [default: all].
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Bytes and entries held per tier.
    Usage {
        agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Full-text search (bm25) of the knowledge tier: every word must match (--any: one).
    Search {
        agent: String,
        #[arg(long, value_name = "TIER", default_value = "knowledge")]
        tier: String,
        query: String,
        #[arg(long, value_name = "N", default_value_t = 10)]
        limit: u64,
        #[arg(long)]
        any: bool,
        #[arg(long)]
        json: bool,
    },
    /// The code graph: add-node, add-edge, neighbors, rm-node.
    Graph(GraphArgs),
    /// Write the agent's memory as JSON lines (one entry, node or edge per line).
    Export { agent: String },
    /// Read JSON lines (from `mem export`) into the agent's memory.
    Import {
        agent: String,
        /// The file, or - for stdin.
        #[arg(value_name = "FILE|-", default_value = "-")]
        file: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete the agent's memory: one tier, or every tier with --all.
    Clear {
        agent: String,
        #[arg(long, value_name = "TIER", required_unless_present = "all")]
        tier: Option<String>,
        #[arg(long, conflicts_with = "tier")]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Measure the store on a scratch database (scripts/bench/memory.sh).
    #[command(hide = true)]
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct GraphArgs {
    agent: String,
    #[command(subcommand)]
    cmd: GraphCmd,
}

#[derive(Subcommand)]
pub enum GraphCmd {
    /// Add (or replace) a node.
    AddNode {
        id: String,
        #[arg(long, value_name = "KIND")]
        kind: String,
        /// Properties, a JSON object.
        #[arg(long, value_name = "JSON")]
        props: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Add (or replace) a typed edge FROM -> TO; both nodes must exist.
    AddEdge {
        from: String,
        to: String,
        #[arg(long, value_name = "KIND")]
        kind: String,
        #[arg(long, value_name = "JSON")]
        props: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The nodes within --depth hops of ID (edges followed both ways).
    #[command(alias = "neighbours")]
    Neighbors {
        id: String,
        #[arg(long, default_value_t = 1)]
        depth: u32,
        /// Follow only edges of this kind.
        #[arg(long, value_name = "KIND")]
        kind: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a node and its edges.
    RmNode {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct BenchArgs {
    /// Entries in the knowledge tier (and nodes in the graph).
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Directory for the scratch database [default: a new one under /var/tmp].
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn mem(agent: &str, request: Value) -> Result<Value, i32> {
    call(&Request::Mem {
        agent: agent.to_string(),
        request,
    })
}

fn usage_err(msg: impl std::fmt::Display) -> i32 {
    eprintln!("aither: error: {msg}");
    EXIT_USAGE
}

fn props(p: Option<String>) -> Result<Value, i32> {
    match p {
        None => Ok(json!({})),
        Some(s) => match serde_json::from_str::<Value>(&s) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(usage_err(format!("--props {s:?} is not a JSON object"))),
        },
    }
}

fn done(v: Value, json: bool, what: impl FnOnce(&Value) -> String) -> i32 {
    if json {
        print_json(&v);
    } else {
        println!("{}", what(&v));
    }
    0
}

pub fn run(cmd: MemCmd) -> i32 {
    match exec(cmd) {
        Ok(code) => code,
        Err(code) => code,
    }
}

fn exec(cmd: MemCmd) -> Result<i32, i32> {
    match cmd {
        MemCmd::Put {
            agent,
            tier,
            key,
            value,
            json_value,
            ttl,
            json,
        } => {
            let text = match value.as_deref() {
                None | Some("-") => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .map_err(|e| usage_err(format!("reading stdin: {e}")))?;
                    s
                }
                Some(v) => v.to_string(),
            };
            let value = if json_value {
                serde_json::from_str::<Value>(&text)
                    .map_err(|e| usage_err(format!("the value is not JSON: {e}")))?
            } else {
                Value::String(text)
            };
            let mut req = json!({"op": "mem.put", "tier": tier, "key": key, "value": value});
            if let Some(t) = ttl {
                req["ttl_s"] = json!(t.as_secs().max(1));
            }
            let v = mem(&agent, req)?;
            Ok(done(v, json, |v| {
                format!(
                    "put {}/{} ({} bytes)",
                    v["tier"].as_str().unwrap_or(""),
                    key,
                    v["size"]
                )
            }))
        }
        MemCmd::Get {
            agent,
            tier,
            key,
            json,
        } => {
            let v = mem(&agent, json!({"op": "mem.get", "tier": tier, "key": key}))?;
            if json {
                print_json(&v);
            } else {
                match &v["value"] {
                    Value::String(s) => {
                        // Raw to a pipe; escaped on a terminal (crate::escape).
                        print!("{}", crate::escape::for_stdout(s));
                        if !s.ends_with('\n') {
                            println!();
                        }
                    }
                    other => print_json(other),
                }
            }
            Ok(0)
        }
        MemCmd::Rm {
            agent,
            tier,
            key,
            json,
        } => {
            let v = mem(
                &agent,
                json!({"op": "mem.delete", "tier": tier, "key": key}),
            )?;
            if v["deleted"] != true && !json {
                eprintln!("aither: error: no key {key:?} in tier {tier} of {agent:?} (not_found)");
                return Ok(EXIT_REFUSED);
            }
            Ok(done(v, json, |_| format!("deleted {tier}/{key}")))
        }
        MemCmd::Ls {
            agent,
            tier,
            prefix,
            limit,
            json,
        } => {
            let tiers: Vec<String> = match tier {
                Some(t) => vec![t],
                None => Tier::ALL
                    .iter()
                    .filter(|t| t.is_kv())
                    .map(|t| t.as_str().to_string())
                    .collect(),
            };
            let mut out = std::io::stdout().lock();
            if !json {
                let _ = writeln!(out, "{:<10} {:>8}  {:<24}  KEY", "TIER", "SIZE", "EXPIRES");
            }
            for t in tiers {
                let mut after: Option<String> = None;
                let mut n = 0usize;
                loop {
                    let page = limit.map(|l| (l - n).min(1000)).unwrap_or(1000);
                    if page == 0 {
                        break;
                    }
                    let v = mem(
                        &agent,
                        json!({"op": "mem.list", "tier": t, "prefix": prefix, "after": after, "limit": page}),
                    )?;
                    for e in v["entries"].as_array().into_iter().flatten() {
                        n += 1;
                        let r = if json {
                            let mut e = e.clone();
                            e["tier"] = json!(t);
                            writeln!(out, "{e}")
                        } else {
                            let exp = e["expires_ms"]
                                .as_u64()
                                .map(|ms| aither::token::format_time(ms / 1000))
                                .unwrap_or_else(|| "-".into());
                            writeln!(
                                out,
                                "{:<10} {:>8}  {:<24}  {}",
                                t,
                                e["size"].as_u64().unwrap_or(0),
                                exp,
                                crate::escape::field(e["key"].as_str().unwrap_or(""))
                            )
                        };
                        if r.is_err() {
                            return Ok(0);
                        }
                    }
                    match v["next"].as_str() {
                        Some(next) if v["more"] == true => after = Some(next.to_string()),
                        _ => break,
                    }
                }
            }
            Ok(0)
        }
        MemCmd::Usage { agent, json } => {
            let v = mem(&agent, json!({"op": "mem.usage"}))?;
            if json {
                print_json(&v);
            } else {
                println!("{:<10} {:>12} {:>9}", "TIER", "BYTES", "ENTRIES");
                for t in Tier::ALL {
                    let u = &v[t.as_str()];
                    println!(
                        "{:<10} {:>12} {:>9}",
                        t.as_str(),
                        u["bytes"].as_u64().unwrap_or(0),
                        u["entries"].as_u64().unwrap_or(0)
                    );
                }
            }
            Ok(0)
        }
        MemCmd::Search {
            agent,
            tier,
            query,
            limit,
            any,
            json,
        } => {
            let v = mem(
                &agent,
                json!({"op": "mem.search", "tier": tier, "query": query, "limit": limit, "any": any}),
            )?;
            if json {
                print_json(&v);
            } else {
                for h in v["hits"].as_array().into_iter().flatten() {
                    println!(
                        "{:>8.3}  {}  {}",
                        h["score"].as_f64().unwrap_or(0.0),
                        crate::escape::field(h["key"].as_str().unwrap_or("")),
                        crate::escape::field(h["snippet"].as_str().unwrap_or(""))
                    );
                }
            }
            Ok(0)
        }
        MemCmd::Graph(GraphArgs { agent, cmd }) => graph(&agent, cmd),
        MemCmd::Export { agent } => export(&agent),
        MemCmd::Import { agent, file, json } => import(&agent, &file, json),
        MemCmd::Clear {
            agent,
            tier,
            all: _,
            json,
        } => {
            let v = mem(&agent, json!({"op": "mem.clear", "tier": tier}))?;
            Ok(done(v, json, |v| {
                format!("removed {} entries", v["removed"])
            }))
        }
        MemCmd::Bench(a) => bench(a).map_err(|e| {
            crate::print_error(&e);
            EXIT_REFUSED
        }),
    }
}

fn graph(agent: &str, cmd: GraphCmd) -> Result<i32, i32> {
    match cmd {
        GraphCmd::AddNode {
            id,
            kind,
            props: p,
            json,
        } => {
            let v = mem(
                agent,
                json!({"op": "mem.graph.add_node", "node": id, "kind": kind, "props": props(p)?}),
            )?;
            Ok(done(v, json, |_| format!("node {id} ({kind})")))
        }
        GraphCmd::AddEdge {
            from,
            to,
            kind,
            props: p,
            json,
        } => {
            let v = mem(
                agent,
                json!({"op": "mem.graph.add_edge", "from": from, "to": to, "kind": kind, "props": props(p)?}),
            )?;
            Ok(done(v, json, |_| format!("edge {from} -[{kind}]-> {to}")))
        }
        GraphCmd::Neighbors {
            id,
            depth,
            kind,
            json,
        } => {
            let v = mem(
                agent,
                json!({"op": "mem.graph.neighbors", "node": id, "depth": depth, "kind": kind}),
            )?;
            if json {
                print_json(&v);
            } else {
                for n in v["nodes"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {}  ({})",
                        n["depth"],
                        crate::escape::field(n["id"].as_str().unwrap_or("")),
                        crate::escape::field(n["kind"].as_str().unwrap_or(""))
                    );
                }
                for e in v["edges"].as_array().into_iter().flatten() {
                    println!(
                        "   {} -[{}]-> {}",
                        crate::escape::field(e["from"].as_str().unwrap_or("")),
                        crate::escape::field(e["kind"].as_str().unwrap_or("")),
                        crate::escape::field(e["to"].as_str().unwrap_or(""))
                    );
                }
            }
            Ok(0)
        }
        GraphCmd::RmNode { id, json } => {
            let v = mem(agent, json!({"op": "mem.graph.remove_node", "node": id}))?;
            if v["deleted"] != true && !json {
                eprintln!(
                    "aither: error: no node {id:?} in the codegraph of {agent:?} (not_found)"
                );
                return Ok(EXIT_REFUSED);
            }
            Ok(done(v, json, |_| format!("removed node {id}")))
        }
    }
}

fn export(agent: &str) -> Result<i32, i32> {
    let mut out = std::io::stdout().lock();
    let mut after: Option<String> = None;
    loop {
        let v = mem(agent, json!({"op": "mem.export", "after": after}))?;
        for r in v["records"].as_array().into_iter().flatten() {
            if writeln!(out, "{r}").is_err() {
                return Ok(EXIT_REFUSED);
            }
        }
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok(0),
        }
    }
}

/// Sends the lines in chunks that fit a frame (each chunk is all-or-nothing).
fn import(agent: &str, file: &str, json: bool) -> Result<i32, i32> {
    let input: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).map_err(|e| usage_err(format!("cannot open {file}: {e}")))?,
        ))
    };
    let mut chunk: Vec<Value> = Vec::new();
    let mut bytes = 0usize;
    let mut total = 0u64;
    let send = |chunk: &mut Vec<Value>, total: &mut u64| -> Result<(), i32> {
        if chunk.is_empty() {
            return Ok(());
        }
        let v = mem(agent, json!({"op": "mem.import", "records": chunk}))?;
        *total += v["imported"].as_u64().unwrap_or(0);
        chunk.clear();
        Ok(())
    };
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| usage_err(format!("reading {file}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: Value = serde_json::from_str(&line)
            .map_err(|e| usage_err(format!("{file}:{}: not JSON: {e}", i + 1)))?;
        if bytes + line.len() > 40 * 1024 || chunk.len() >= 1000 {
            send(&mut chunk, &mut total)?;
            bytes = 0;
        }
        bytes += line.len();
        chunk.push(rec);
    }
    send(&mut chunk, &mut total)?;
    Ok(done(json!({"imported": total}), json, |_| {
        format!("imported {total} records into {agent}")
    }))
}

/// A small xorshift generator: the benchmark needs no cryptographic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

fn bench(a: BenchArgs) -> anyhow::Result<i32> {
    use anyhow::Context;
    let n = a.n.max(1000);
    let dir = match a.dir {
        Some(d) => tempfile_in(&d)?,
        None => tempfile_in(std::path::Path::new("/var/tmp"))?,
    };
    // A vocabulary of 20,000 words with a Zipf-like frequency (as in prose): documents of 20
    // words; queries of one or two words drawn uniformly from the vocabulary (the specific
    // terms one searches for), and separately the 100 most common words (the worst case:
    // each matches a large share of all documents).
    let words: Vec<String> = (0..20_000).map(|i| format!("w{i}")).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let text = |rng: &mut Rng| -> String {
        (0..20)
            .map(|_| {
                let u = (rng.below(1_000_000) as f64 + 1.0) / 1_000_001.0;
                // Inverse of a power law with exponent ~1 over 20,000 ranks.
                let r = ((words.len() as f64).powf(u) - 1.0) as usize;
                words[r.min(words.len() - 1)].as_str()
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut report = serde_json::Map::new();
    println!("memory bench: {n} entries, database in {}", dir.display());

    for sync in [Sync::Normal, Sync::Full] {
        let label = if sync == Sync::Normal {
            "normal"
        } else {
            "full"
        };
        let path = dir.join(format!("memory-{label}.db"));
        let store = MemoryStore::open_with(&path, sync).context("opening the scratch database")?;

        // 1. Batched puts: put_many of 1000 entries per transaction (FTS indexed: knowledge).
        let items: Vec<(String, String)> = (0..n)
            .map(|i| {
                (
                    format!("doc/{i:08}"),
                    Value::String(text(&mut rng)).to_string(),
                )
            })
            .collect();
        let t = Instant::now();
        for ch in items.chunks(1000) {
            store.put_many("bench", Tier::Knowledge, ch.to_vec(), None, None)?;
        }
        let batched = n as f64 / t.elapsed().as_secs_f64();
        println!("[sync={label}] batched put (1000/txn, knowledge+FTS): {batched:>10.0} entries/s");

        // 2. Single puts from 16 threads (each acknowledged after its commit; group commit).
        let singles = if sync == Sync::Normal { 20_000 } else { 4_000 };
        let store = std::sync::Arc::new(store);
        let t = Instant::now();
        let threads: Vec<_> = (0..16)
            .map(|th| {
                let s = store.clone();
                std::thread::spawn(move || -> anyhow::Result<()> {
                    for i in 0..singles / 16 {
                        s.put(
                            "bench",
                            Tier::Working,
                            &format!("w/{th}/{i}"),
                            format!("\"v{i}\""),
                            None,
                            None,
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        for th in threads {
            th.join()
                .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        }
        let single = singles as f64 / t.elapsed().as_secs_f64();
        println!("[sync={label}] single acknowledged puts, 16 writers:    {single:>10.0} puts/s");
        let mut lat = Vec::new();
        for i in 0..500 {
            let t = Instant::now();
            store.put(
                "bench",
                Tier::Active,
                &format!("seq/{i}"),
                "1".into(),
                Some(i64::MAX),
                None,
            )?;
            lat.push(t.elapsed());
        }
        println!(
            "[sync={label}] single put latency, one writer: p50 {:.0} us, p99 {:.0} us",
            pct(lat.clone(), 0.5),
            pct(lat.clone(), 0.99)
        );
        report.insert(
            format!("sync_{label}"),
            json!({"batched_put_per_s": batched, "single_put_16_writers_per_s": single,
                   "single_put_p50_us": pct(lat.clone(), 0.5), "single_put_p99_us": pct(lat, 0.99)}),
        );
        if sync == Sync::Full {
            break;
        }

        // 3. get p50 at n entries.
        let mut lat = Vec::with_capacity(20_000);
        for _ in 0..20_000 {
            let k = format!("doc/{:08}", rng.below(n));
            let t = Instant::now();
            let e = store.get("bench", Tier::Knowledge, &k)?;
            lat.push(t.elapsed());
            anyhow::ensure!(e.is_some(), "{k} missing");
        }
        let (g50, g99) = (pct(lat.clone(), 0.5), pct(lat, 0.99));
        println!("get at {n} entries:               p50 {g50:>7.1} us, p99 {g99:>7.1} us");

        // 4. FTS search p50 (one or two words, top 10).
        let mut search =
            |pick: &dyn Fn(&mut Rng) -> String, runs: usize| -> anyhow::Result<(f64, f64, f64)> {
                let mut lat = Vec::with_capacity(runs);
                let mut hits = 0;
                for _ in 0..runs {
                    let q = pick(&mut rng);
                    let t = Instant::now();
                    hits += store.search("bench", &q, false, 10)?.len();
                    lat.push(t.elapsed());
                }
                Ok((
                    pct(lat.clone(), 0.5),
                    pct(lat, 0.99),
                    hits as f64 / runs as f64,
                ))
            };
        let specific = |r: &mut Rng| {
            if r.below(2) == 0 {
                words[r.below(words.len())].clone()
            } else {
                format!(
                    "{} {}",
                    words[r.below(words.len())],
                    words[r.below(words.len())]
                )
            }
        };
        let common = |r: &mut Rng| words[r.below(100)].clone();
        let (s50, s99, sh) = search(&specific, 2000)?;
        println!("FTS search (top 10) at {n} docs:  p50 {s50:>7.1} us, p99 {s99:>7.1} us ({sh:.1} hits/query; 1-2 words from the vocabulary)");
        let (c50, c99, ch) = search(&common, 200)?;
        println!("FTS search, 100 most common words: p50 {c50:>7.1} us, p99 {c99:>7.1} us ({ch:.1} hits/query)");
        report.insert("search_common_p50_us".into(), json!(c50));
        report.insert("search_common_p99_us".into(), json!(c99));

        // 5. Neighbourhood queries: n nodes, 3 outgoing edges each.
        let t = Instant::now();
        let mut b = 0;
        while b < n {
            let recs: Vec<aither::memory::store::Record> = (b..(b + 1000).min(n))
                .map(|i| aither::memory::store::Record::Node {
                    id: format!("sym{i}"),
                    kind: "fn".into(),
                    props: json!({"line": i}),
                })
                .collect();
            store.import("bench", recs)?;
            b += 1000;
        }
        let mut b = 0;
        while b < n {
            let recs: Vec<aither::memory::store::Record> = (b..(b + 1000).min(n))
                .flat_map(|i| {
                    let targets: Vec<usize> = (0..3).map(|_| rng.below(n)).collect();
                    targets
                        .into_iter()
                        .map(move |j| aither::memory::store::Record::Edge {
                            from: format!("sym{i}"),
                            to: format!("sym{j}"),
                            kind: "calls".into(),
                            props: json!({}),
                        })
                })
                .collect();
            store.import("bench", recs)?;
            b += 1000;
        }
        println!(
            "graph of {n} nodes, {} edges built in {:.1} s",
            3 * n,
            t.elapsed().as_secs_f64()
        );
        let mut graph = serde_json::Map::new();
        for depth in [1u32, 2, 3] {
            let mut lat = Vec::with_capacity(1000);
            let mut size = 0;
            for _ in 0..1000 {
                let id = format!("sym{}", rng.below(n));
                let t = Instant::now();
                size += store.neighbours("bench", &id, depth, None)?.nodes.len();
                lat.push(t.elapsed());
            }
            let (p50, p99) = (pct(lat.clone(), 0.5), pct(lat, 0.99));
            println!(
                "neighbours depth {depth}:                p50 {p50:>7.1} us, p99 {p99:>7.1} us ({:.0} nodes)",
                size as f64 / 1000.0
            );
            graph.insert(
                format!("depth_{depth}"),
                json!({"p50_us": p50, "p99_us": p99, "nodes": size as f64 / 1000.0}),
            );
        }
        report.insert("entries".into(), json!(n));
        report.insert("get_p50_us".into(), json!(g50));
        report.insert("get_p99_us".into(), json!(g99));
        report.insert("search_p50_us".into(), json!(s50));
        report.insert("search_p99_us".into(), json!(s99));
        report.insert("neighbours".into(), Value::Object(graph));
        let db = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        report.insert("db_bytes".into(), json!(db));
    }
    println!("JSON {}", Value::Object(report));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(0)
}

fn tempfile_in(base: &std::path::Path) -> anyhow::Result<PathBuf> {
    let d = base.join(format!("aither-mem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
