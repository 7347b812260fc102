//! The warm-start benchmark client (scripts/bench/pool.sh): a prepared sandbox
//! (`aither-init pool`, driven as aitherd drives it) against a cold `aither-init` of the same
//! spec and bwrap, interleaved.
//!
//! usage: pool_bench AITHER_INIT POLICY_TOML WORKSPACE ROUNDS [GAP_MS]
//!
//! Per round, the order of the three rotated by one (load and drift hit all three alike):
//! - warm: a pool launcher started and ready beforehand (not timed: aitherd refills its pool
//!   off the request path); timed from the final spec sent to `{"exited":...}` received
//!   (`final→exited`), and on to the launcher's own exit (`final→reaped`: teardown included);
//!   the preparation (spawn → ready) is reported apart;
//! - cold: `aither-init < spec.json`, the same final spec, spawn → exit;
//! - bwrap: `bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc /bin/true`, spawn → exit.
//!
//! With `POOL_BENCH_INIT_B=/path/to/another/aither-init` a fourth tool, `warm B`, runs the
//! warm rows with that launcher in the same rotation (an A/B of two builds of the pool
//! launcher against the same bwrap and cold samples; the trace is of A's launchers only).
//!
//! The agent is /bin/true with /dev/null as stdin, stdout and stderr everywhere. With
//! `AITHER_TRACE_LAUNCH=1` in the environment the pool launchers trace their stages, and the
//! medians of each trace line (prepare and finish apart) are printed after the table.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aither_core::policy::Policy;
use aither_core::sandbox::pool::{self, PoolMsg};
use aither_core::sandbox::{RunOptions, SandboxSpec};

fn usage() -> ! {
    eprintln!("usage: pool_bench AITHER_INIT POLICY_TOML WORKSPACE ROUNDS [GAP_MS]");
    std::process::exit(2)
}

struct Ready {
    child: Child,
    ctl: std::os::fd::OwnedFd,
    prepare: Duration,
    stderr: std::thread::JoinHandle<String>,
}

fn start_pool(init: &Path, template: &[u8]) -> Ready {
    let t = Instant::now();
    let (ours, theirs) = aither_core::sys::seqpacket_pair().expect("socketpair");
    let raw = theirs.as_raw_fd();
    let mut cmd = Command::new(init);
    cmd.args(["pool", "--control-fd", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: async-signal-safe calls only (dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn aither-init pool");
    drop(theirs);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(template).unwrap();
    drop(stdin);
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    match pool::recv(ours.as_fd()) {
        Ok(Some(PoolMsg::Ready { .. })) => {}
        other => {
            let _ = child.kill();
            panic!("pool launcher not ready: {other:?}");
        }
    }
    Ready {
        child,
        ctl: ours,
        prepare: t.elapsed(),
        stderr,
    }
}

/// (final→exited, final→reaped, the launcher's stderr)
fn run_warm(r: Ready, fin: &SandboxSpec, null: &std::fs::File) -> (Duration, Duration, String) {
    let Ready {
        mut child,
        ctl,
        stderr,
        ..
    } = r;
    let ws = fin
        .workspace
        .as_ref()
        .map(|w| std::fs::File::open(&w.path).expect("open the workspace"));
    let t = Instant::now();
    pool::send_final(
        ctl.as_fd(),
        fin,
        [null.as_fd(), null.as_fd(), null.as_fd()],
        ws.as_ref().map(|f| f.as_fd()),
    )
    .expect("send the final spec");
    let exited = loop {
        match pool::recv(ctl.as_fd()).expect("recv") {
            Some(PoolMsg::Exited { code: 0, .. }) => break t.elapsed(),
            Some(PoolMsg::Started { .. }) => {}
            other => panic!("warm run: {other:?}"),
        }
    };
    let st = child.wait().expect("wait");
    let reaped = t.elapsed();
    assert!(st.success(), "warm run: {st}");
    (exited, reaped, stderr.join().unwrap_or_default())
}

fn run_cmd(mut cmd: Command, what: &str) -> Duration {
    let t = Instant::now();
    let st = cmd.status().unwrap_or_else(|e| panic!("{what}: {e}"));
    let d = t.elapsed();
    assert!(st.success(), "{what}: {st}");
    d
}

fn quantiles(v: &mut [f64]) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (q(0.5), q(0.25), q(0.9), v[0])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        usage();
    }
    let init = PathBuf::from(&args[1]);
    let policy = Policy::load_file(Path::new(&args[2]))
        .expect("load the policy")
        .policy;
    let ws = PathBuf::from(&args[3]);
    let rounds: usize = args[4].parse().unwrap_or_else(|_| usage());
    let gap = Duration::from_millis(args.get(5).and_then(|g| g.parse().ok()).unwrap_or(100));
    let opts = RunOptions {
        name: Some("bench".into()),
        workspace: Some(ws.clone()),
        argv: vec!["/bin/true".into()],
        ..RunOptions::default()
    };
    let fin = SandboxSpec::derive(&policy, &opts, &|_| None, &ws).expect("derive the spec");
    let mut template = fin.clone();
    template.name = "bench-pool".into();
    template.workspace = None;
    template.cwd = "/".into();
    let template_json = serde_json::to_vec(&template).unwrap();
    let spec_path = std::env::temp_dir().join(format!("pool-bench-{}.json", std::process::id()));
    std::fs::write(&spec_path, serde_json::to_vec(&fin).unwrap()).unwrap();
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();

    let mut times: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut trace: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let init_b = std::env::var_os("POOL_BENCH_INIT_B").map(PathBuf::from);
    let mut order = vec!["warm", "cold", "bwrap"];
    if init_b.is_some() {
        order.insert(1, "warm B");
    }
    for _ in 0..rounds {
        for tool in order.clone() {
            std::thread::sleep(gap);
            match tool {
                "warm" | "warm B" => {
                    let b = tool == "warm B";
                    let which = if b {
                        init_b.as_deref().expect("INIT_B")
                    } else {
                        &init
                    };
                    let r = start_pool(which, &template_json);
                    let row = |what: &str| format!("{tool} {what}");
                    times
                        .entry(row("prepare (spawn→ready)"))
                        .or_default()
                        .push(r.prepare.as_secs_f64() * 1e3);
                    // A prepared sandbox waits for its caller: let it settle as in a pool.
                    std::thread::sleep(gap);
                    let (exited, reaped, err) = run_warm(r, &fin, &null);
                    times
                        .entry(row("final→exited"))
                        .or_default()
                        .push(exited.as_secs_f64() * 1e3);
                    times
                        .entry(row("final→reaped"))
                        .or_default()
                        .push(reaped.as_secs_f64() * 1e3);
                    if !b {
                        collect_trace(&err, &mut trace);
                    }
                }
                "cold" => {
                    let mut c = Command::new(&init);
                    c.stdin(std::fs::File::open(&spec_path).unwrap())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .env_remove("AITHER_TRACE_LAUNCH");
                    let d = run_cmd(c, "cold aither-init");
                    times
                        .entry("cold aither-init".into())
                        .or_default()
                        .push(d.as_secs_f64() * 1e3);
                }
                _ => {
                    let mut c = Command::new("bwrap");
                    c.args([
                        "--unshare-all",
                        "--ro-bind",
                        "/",
                        "/",
                        "--dev",
                        "/dev",
                        "--proc",
                        "/proc",
                        "/bin/true",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                    let d = run_cmd(c, "bwrap");
                    times
                        .entry("bwrap".into())
                        .or_default()
                        .push(d.as_secs_f64() * 1e3);
                }
            }
        }
        order.rotate_left(1);
    }
    let _ = std::fs::remove_file(&spec_path);
    let bw = quantiles(&mut times.get("bwrap").cloned().unwrap_or_default()).0;
    println!(
        "pool_bench: {rounds} rounds, {} ms apart; load {}",
        gap.as_millis(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "| {:<28} | {:>9} | {:>9} | {:>9} | {:>9} | {:>8} |",
        "", "median ms", "p25 ms", "p90 ms", "min ms", "vs bwrap"
    );
    println!(
        "|{:-<30}|{:-<11}|{:-<11}|{:-<11}|{:-<11}|{:-<10}|",
        "", "", "", "", "", ""
    );
    for (k, v) in &mut times {
        let (med, p25, p90, min) = quantiles(v);
        println!(
            "| {k:<28} | {med:>9.2} | {p25:>9.2} | {p90:>9.2} | {min:>9.2} | {:>7.2}× |",
            med / bw
        );
    }
    if !trace.is_empty() {
        println!("\nAITHER_TRACE_LAUNCH=1 of the pool launchers: median step µs (p25), per line");
        for ((section, line), v) in &mut trace {
            let n = v.len();
            let (med, p25, _, _) = quantiles(v);
            println!("{section:<8} {line:<40} {med:>8.0} ({p25:.0}) n={n}");
        }
    }
}

/// The pool launcher's trace lines: `aither-trace: WHO NAME TOTAL [STEP]`; the lines after
/// "ready-seen" are the finish's.
fn collect_trace(err: &str, trace: &mut BTreeMap<(String, String), Vec<f64>>) {
    let mut section = "prepare";
    let mut seq = 0;
    for line in err.lines() {
        let Some(rest) = line.strip_prefix("aither-trace:") else {
            continue;
        };
        let t: Vec<&str> = rest.split_whitespace().collect();
        if t.len() < 3 || t[0] == "stage" {
            continue;
        }
        let nums: Vec<f64> = t[2..].iter().filter_map(|x| x.parse().ok()).collect();
        // The step when printed, else the total.
        let Some(v) = nums.get(1).or(nums.first()) else {
            continue;
        };
        seq += 1;
        let key = format!("{seq:02} {} {}", t[0], t[1]);
        trace
            .entry((section.to_string(), key))
            .or_default()
            .push(*v);
        if t[1] == "ready-seen" {
            section = "finish";
            seq = 0;
        }
    }
}
