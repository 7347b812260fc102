//! A worker under aitherd's watchdog, in Rust (the Python one is agents/heartbeat-worker/).
//!
//! READY once started, a [`Heartbeat`] thread every second, a status line per job.
//!
//! ```sh
//! cargo build --release -p aither-sdk --example heartbeat_worker
//! cp target/release/examples/heartbeat_worker ./worker
//! aitherctl spawn --wait-ready --watchdog 5s worker -- ./worker
//! ```

use std::sync::Arc;
use std::time::Duration;

use aither_sdk::{Channel, Heartbeat, SdkError};

fn main() -> Result<(), SdkError> {
    let ch = Arc::new(Channel::from_env()?);
    ch.ready()?;
    let beat = Heartbeat::spawn(Arc::clone(&ch), Duration::from_secs(1))?;
    let mut acc: u64 = 0;
    for job in 1u64.. {
        for i in 0..1_000_000u64 {
            acc = acc.wrapping_mul(6364136223846793005).wrapping_add(i ^ job);
        }
        ch.status(&format!("job {job} done: {acc:016x}"))?;
        println!("job {job} done: {acc:016x}");
        if !beat.is_running() {
            // A heartbeat was refused (a revoked token): say why and stop.
            return beat.stop();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}
