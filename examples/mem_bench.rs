//! The memory store's benchmark (scripts/bench/memory.sh): the store aitherd uses, on a
//! scratch database (the daemon's memory.db is not touched), at N entries:
//! - batched puts (put_many, 1000 per transaction, knowledge tier with FTS5), entries/s;
//! - single acknowledged puts from 16 writer threads (group commit) and one writer's
//!   latency, with synchronous=NORMAL and FULL;
//! - get, FTS search (specific and common words) and neighbourhood (depth 1–3) p50/p99.
//!
//! Prints one line per measurement and a last line `JSON {...}` with every number.
//!
//! Usage: cargo run --release --example mem_bench -- [--n N] [--dir DIR]
//!   --n    entries in the knowledge tier and nodes in the graph (default 100000, at least 1000)
//!   --dir  where the scratch database goes (default /var/tmp)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use aither::memory::store::{ExportLine, SyncMode};
use aither::memory::{MemoryStore, Tier};
use anyhow::Context;
use serde_json::{json, Value};

struct BenchArgs {
    n: usize,
    dir: Option<PathBuf>,
}

fn args() -> anyhow::Result<BenchArgs> {
    let mut a = BenchArgs {
        n: 100_000,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--n" => a.n = value.parse().with_context(|| format!("--n {value:?}"))?,
            "--dir" => a.dir = Some(value.into()),
            _ => anyhow::bail!("unknown argument {flag:?}; usage: mem_bench [--n N] [--dir DIR]"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    bench(args()?)
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

fn bench(a: BenchArgs) -> anyhow::Result<()> {
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

    for sync in [SyncMode::Normal, SyncMode::Full] {
        let label = if sync == SyncMode::Normal {
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
        let singles = if sync == SyncMode::Normal {
            20_000
        } else {
            4_000
        };
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
        if sync == SyncMode::Full {
            break;
        }

        // 3. get p50 at n entries.
        let (g50, g99) = bench_get(&store, n, &mut rng)?;

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
        let graph = bench_graph(&store, n, &mut rng)?;
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
    Ok(())
}

/// Step 3 of `bench`: `get` latency (p50, p99, in µs) at `n` entries.
fn bench_get(store: &MemoryStore, n: usize, rng: &mut Rng) -> anyhow::Result<(f64, f64)> {
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
    Ok((g50, g99))
}

/// Step 5 of `bench`: builds a graph of `n` nodes with 3 outgoing edges each, then times
/// neighbourhood queries of depth 1 to 3.
fn bench_graph(
    store: &MemoryStore,
    n: usize,
    rng: &mut Rng,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let t = Instant::now();
    let mut b = 0;
    while b < n {
        let recs: Vec<ExportLine> = (b..(b + 1000).min(n))
            .map(|i| ExportLine::Node {
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
        let recs: Vec<ExportLine> = (b..(b + 1000).min(n))
            .flat_map(|i| {
                let targets: Vec<usize> = (0..3).map(|_| rng.below(n)).collect();
                targets.into_iter().map(move |j| ExportLine::Edge {
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
    Ok(graph)
}

fn tempfile_in(base: &std::path::Path) -> anyhow::Result<PathBuf> {
    let d = base.join(format!("aither-mem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
