//! `aitherctl gpu`: the GPUs aitherd schedules and its queue (docs/gpu.md).

use aither::daemon::proto::Request;
use aither::units::Size;
use clap::{Args, Subcommand};

use crate::daemon_cmd::{call, print_json, print_table};

/// GPUs and the MicroScheduler: devices, VRAM, leases, the queue.
#[derive(Subcommand)]
pub enum GpuCmd {
    Ls(LsArgs),
    Queue(QueueArgs),
}

/// List GPUs: total, reserved (our bookkeeping) and used (the backend's reading) VRAM, and
/// the leases on each.
#[derive(Args)]
pub struct LsArgs {
    /// Print JSON (backend, scheduler settings, every device and lease).
    #[arg(long)]
    json: bool,
}

/// The queue in scheduling order: effective priority (class plus aging), waiting time, and
/// the devices held for a blocked head.
#[derive(Args)]
pub struct QueueArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(c: GpuCmd) -> i32 {
    match c {
        GpuCmd::Ls(a) => ls(a),
        GpuCmd::Queue(a) => queue(a),
    }
}

fn mib(v: &serde_json::Value) -> String {
    v.as_u64()
        .map(|m| Size(m << 20).to_string())
        .unwrap_or_else(|| "-".into())
}

fn ls(a: LsArgs) -> i32 {
    let v = match call(&Request::GpuLs) {
        Ok(v) => v,
        Err(c) => return c,
    };
    if a.json {
        print_json(&v);
        return 0;
    }
    let devices = v["devices"].as_array().cloned().unwrap_or_default();
    if devices.is_empty() {
        println!(
            "no GPUs (backend {}{})",
            v["backend"].as_str().unwrap_or("?"),
            v["note"]
                .as_str()
                .map(|n| format!(": {n}"))
                .unwrap_or_default()
        );
        return 0;
    }
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            let leases: Vec<String> = d["leases"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|l| {
                    format!(
                        "{}({}{}{})",
                        l["agent"].as_str().unwrap_or("?"),
                        mib(&l["vram_mb"]),
                        if l["exclusive"] == true { ",excl" } else { "" },
                        if l["preempting"] == true {
                            ",preempting"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            vec![
                d["index"].to_string(),
                d["uuid"].as_str().unwrap_or("-").to_string(),
                mib(&d["total_mb"]),
                mib(&d["reserved_mb"]),
                match (&d["lost"], d["used_unknown"].as_u64().unwrap_or(0)) {
                    (serde_json::Value::String(_), _) => "lost".into(),
                    (_, 0) => mib(&d["used_mb"]),
                    // Processes whose use the driver does not report: a lower bound.
                    (_, _) => format!("{}+?", mib(&d["used_mb"])),
                },
                if leases.is_empty() {
                    "-".into()
                } else {
                    leases.join(" ")
                },
            ]
        })
        .collect();
    print_table(
        &["GPU", "UUID", "TOTAL", "RESERVED", "USED", "LEASES"],
        &rows,
    );
    println!(
        "backend {}{}; {} queued",
        v["backend"].as_str().unwrap_or("?"),
        v["library"]
            .as_str()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default(),
        v["queued"]
    );
    for d in &devices {
        if let Some(why) = d["lost"].as_str() {
            println!("GPU {} lost: {why}; no new lease goes to it", d["index"]);
        }
    }
    0
}

fn queue(a: QueueArgs) -> i32 {
    let v = match call(&Request::GpuQueue) {
        Ok(v) => v,
        Err(c) => return c,
    };
    if a.json {
        print_json(&v);
        return 0;
    }
    let q = v["queue"].as_array().cloned().unwrap_or_default();
    if q.is_empty() {
        println!("the GPU queue is empty");
        return 0;
    }
    let rows: Vec<Vec<String>> = q
        .iter()
        .map(|e| {
            let r = &e["request"];
            vec![
                e["position"].to_string(),
                r["agent"].as_str().unwrap_or("?").to_string(),
                r["count"].to_string(),
                mib(&r["vram_mb"]),
                format!("{}→{}", r["priority"], e["effective_priority"]),
                format!("{}s", e["waited_ms"].as_u64().unwrap_or(0) / 1000),
                e["reserved_devices"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|a| {
                        a.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or("-".into()),
            ]
        })
        .collect();
    print_table(
        &["POS", "AGENT", "GPUS", "VRAM", "PRIORITY", "WAITED", "HELD"],
        &rows,
    );
    0
}
