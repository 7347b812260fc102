//! The MicroScheduler's decision cost with a long queue (scripts/bench/gpu.sh).
//!
//! 8 GPUs of 80 GiB, full of 10 GiB leases (64), and QUEUED requests (default 10,000) of mixed
//! classes (0–7), sizes (1–40 GiB) and counts (1, some 2 and 4, some exclusive). Measures, in
//! ns per call:
//! - submit: a new request arrives and a pass runs (the head is blocked: nothing fits);
//! - release→pass: a lease on a device the blocked head does not hold ends and the pass
//!   backfills what now fits from the 10,000 behind the head (a lazy walk in rank order),
//!   then the granted leases end again so that the state stays the same;
//! - aging pass: the periodic pass with nothing released.
//!
//! Usage: cargo run --release --example gpu_sched_bench [QUEUED] [ROUNDS]

use std::time::Instant;

use aither::gpu::scheduler::{Config, DeviceSlot, Request, Scheduler, SchedulerAction};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let queued: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let devices: Vec<DeviceSlot> = (0..8)
        .map(|index| DeviceSlot {
            index,
            total_mb: 80 * 1024,
            profile: None,
        })
        .collect();
    let cfg = Config {
        preemption: false,
        ..Config::default()
    };
    let mut s = Scheduler::new(&devices, cfg);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Fill every GPU with 8 leases of 10 GiB.
    for i in 0..64 {
        s.submit(Request {
            agent: format!("run-{i}"),
            count: 1,
            vram_mb: 10 * 1024,
            priority: 9,
            exclusive: false,
            enqueued_ms: 0,
            seq: 0,
            profile: None,
        })
        .unwrap();
    }
    s.schedule(0);
    let mk = |rng: &mut Rng, name: String, at: u64| {
        let count = match rng.below(20) {
            0 => 4,
            1..=3 => 2,
            _ => 1,
        };
        Request {
            agent: name,
            count,
            vram_mb: (1 + rng.below(40)) * 1024,
            priority: rng.below(8) as u32,
            exclusive: rng.below(50) == 0,
            enqueued_ms: at,
            seq: 0,
            profile: None,
        }
    };
    for i in 0..queued {
        let r = mk(&mut rng, format!("q-{i}"), 1 + i as u64);
        s.submit(r).unwrap();
    }
    // The head: a class-8 gang of four whole GPUs, blocked until four devices empty; it holds
    // devices 0-3, so releases on devices 4-7 are backfilled from the queue behind it.
    s.submit(Request {
        agent: "head".into(),
        count: 4,
        vram_mb: 80 * 1024,
        priority: 8,
        exclusive: true,
        enqueued_ms: 1,
        seq: 0,
        profile: None,
    })
    .unwrap();
    let now = 1_000_000u64;
    assert!(s.schedule(now).is_empty(), "the queue must start blocked");

    // submit + pass (blocked).
    let mut t_submit = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let r = mk(&mut rng, format!("new-{i}"), now + i as u64);
        let t = Instant::now();
        s.submit(r).unwrap();
        let d = s.schedule(now + i as u64);
        t_submit.push(t.elapsed().as_nanos() as u64);
        assert!(d.iter().all(|d| matches!(d, SchedulerAction::Grant { .. })));
        for d in d {
            if let SchedulerAction::Grant { agent, .. } = d {
                s.release(&agent);
            }
        }
        s.cancel(&format!("new-{i}"));
    }

    // release → pass, then put the state back (the granted leave, the released comes back).
    let mut t_release = Vec::with_capacity(rounds);
    let mut granted_total = 0usize;
    for i in 0..rounds {
        let victim = format!("run-{}", 32 + i % 32);
        let lease = s.release(&victim).expect("running lease");
        let t = Instant::now();
        let d = s.schedule(now);
        t_release.push(t.elapsed().as_nanos() as u64);
        granted_total += d.len();
        // Undo: the granted go back to the queue at their places, the lease returns.
        for dec in d {
            if let SchedulerAction::Grant { agent, .. } = dec {
                let l = s.release(&agent).unwrap();
                s.submit(l.request).unwrap();
            }
        }
        s.restore_lease(lease);
    }

    // The periodic pass with nothing released.
    let mut t_tick = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        let d = s.schedule(now + 60_000 * (i as u64 % 4));
        t_tick.push(t.elapsed().as_nanos() as u64);
        assert!(d.is_empty());
    }

    println!("queued={} leases=64 gpus=8 rounds={rounds}", s.queue_len());
    for (name, v) in [
        ("submit+pass (blocked)", &mut t_submit),
        ("release+pass (grants)", &mut t_release),
        ("periodic pass", &mut t_tick),
    ] {
        println!(
            "{name:<24} p50 {:>7.2} µs   p99 {:>7.2} µs   max {:>8.2} µs",
            percentile(v, 0.5) as f64 / 1000.0,
            percentile(v, 0.99) as f64 / 1000.0,
            percentile(v, 1.0) as f64 / 1000.0
        );
    }
    println!(
        "grants per release+pass: {:.2}",
        granted_total as f64 / rounds as f64
    );
}
