//! Prints the agent's GPU lease, waiting while it is queued (the Python one is
//! agents/gpu-worker/).

use std::time::Duration;

use aither_sdk::{Channel, GpuState, SdkError};

fn main() -> Result<(), SdkError> {
    let ch = Channel::from_env()?;
    ch.ready()?;
    let lease = loop {
        match ch.gpu_lease() {
            Ok(l) if l.state == GpuState::Queued => {
                ch.status("waiting for a GPU")?;
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(l) => break l,
            Err(SdkError::GpuUnavailable(why)) => {
                eprintln!("gpu_lease: GPU service not available in this aitherd: {why}");
                std::process::exit(3);
            }
            Err(e) => return Err(e),
        }
    };
    println!(
        "state {:?}, CUDA_VISIBLE_DEVICES={}",
        lease.state, lease.visible_devices
    );
    for d in &lease.devices {
        println!(
            "GPU {} {} ({}): {} of {} MiB reserved, node {}",
            d.index, d.name, d.uuid, d.vram_mb, d.total_mb, d.node
        );
    }
    Ok(())
}
