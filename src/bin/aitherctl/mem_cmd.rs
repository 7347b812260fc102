//! `aitherctl mem put|get|rm|ls|usage|search|graph|export|import|clear` (docs/memory.md).
//!
//! Every command is one `mem.*` request on the control socket, on behalf of an operator: any
//! agent's memory, every tier, no quota. The store's benchmark is examples/mem_bench.rs.

use std::io::{BufRead, Read, Write};
use std::time::Duration;

use aither::daemon::proto::Request;
use aither::memory::Tier;
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

fn mem(agent: &str, request: Value) -> Result<Value, i32> {
    call(&Request::Mem {
        agent: agent.to_string(),
        request,
    })
}

/// A bm25 score (SQLite's sign: lower is better) as a relevance, higher is better and never
/// "-0.000": FTS5 scores in a small tier are tiny (its idf floor is 1e-6), so those get
/// scientific notation rather than rounding to zero.
fn relevance(bm25: f64) -> String {
    let r = -bm25;
    if r == 0.0 {
        "0".into()
    } else if r.abs() >= 0.001 {
        format!("{r:.3}")
    } else {
        format!("{r:.2e}")
    }
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
            let value = read_value(value.as_deref(), json_value)?;
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
        } => ls(&agent, tier, prefix.as_deref(), limit, json),
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
            let hits = v["hits"].as_array().map(Vec::len).unwrap_or(0);
            if json {
                print_json(&v);
            } else if hits == 0 {
                eprintln!("aither: no matches");
            } else {
                println!("{:>9}  KEY  SNIPPET", "RELEVANCE");
                for h in v["hits"].as_array().into_iter().flatten() {
                    println!(
                        "{:>9}  {}  {}",
                        relevance(h["score"].as_f64().unwrap_or(0.0)),
                        crate::escape::field(h["key"].as_str().unwrap_or("")),
                        crate::escape::field(h["snippet"].as_str().unwrap_or(""))
                    );
                }
            }
            // As grep: 1 when nothing matched.
            Ok(if hits == 0 { 1 } else { 0 })
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
    }
}

/// `mem put`'s value: the argument, or stdin for `-` or nothing; parsed as JSON when asked.
fn read_value(value: Option<&str>, json_value: bool) -> Result<Value, i32> {
    let text = match value {
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
    Ok(value)
}

/// `mem ls`: the keys of one tier, or of every key-value tier, page by page.
fn ls(
    agent: &str,
    tier: Option<String>,
    prefix: Option<&str>,
    limit: Option<usize>,
    json: bool,
) -> Result<i32, i32> {
    let tiers: Vec<String> = match tier {
        Some(t) => vec![t],
        None => Tier::ALL
            .iter()
            .filter(|t| t.is_kv())
            .map(|t| t.as_str().to_string())
            .collect(),
    };
    let mut out = std::io::stdout().lock();
    // After the first answer: an unknown name prints its error and no table.
    let mut header = !json;
    for t in tiers {
        let mut after: Option<String> = None;
        let mut n = 0usize;
        loop {
            let page = limit.map(|l| (l - n).min(1000)).unwrap_or(1000);
            if page == 0 {
                break;
            }
            let v = mem(
                agent,
                json!({"op": "mem.list", "tier": t, "prefix": prefix, "after": after, "limit": page}),
            )?;
            if std::mem::take(&mut header) {
                let _ = writeln!(out, "{:<10} {:>8}  {:<24}  KEY", "TIER", "SIZE", "EXPIRES");
            }
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
