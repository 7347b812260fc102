//! Answers requests over the bus, in Rust (the Python pair is agents/bus-pair/): every message
//! on `pair.<PEER>.request` gets a reply on `pair.<own name>.reply` with the text upper-cased.
//! Spawn it with agents/policies/strict-pair.toml (strict, plus the pair.> subjects) in place
//! of agents/pong.toml's Python script.

use std::sync::Arc;
use std::time::Duration;

use aither_sdk::{Channel, Heartbeat, SdkError};
use serde_json::json;

fn main() -> Result<(), SdkError> {
    let me = std::env::var("AITHER_AGENT").unwrap_or_else(|_| "pong".into());
    let peer = std::env::var("PEER").unwrap_or_else(|_| "ping".into());
    let ch = Arc::new(Channel::from_env()?);
    let requests = ch.subscribe(&format!("pair.{peer}.request"))?;
    ch.ready()?;
    let _beat = Heartbeat::spawn(Arc::clone(&ch), Duration::from_secs(2))?;
    let mut answered = 0u64;
    for msg in ch.messages(Some(requests), None) {
        let msg = msg?;
        let text = msg.data["text"].as_str().unwrap_or_default().to_uppercase();
        ch.publish(
            &format!("pair.{me}.reply"),
            &json!({"n": msg.data["n"], "text": text}),
        )?;
        answered += 1;
        println!("{me}: answered {} ({answered} so far)", msg.data["n"]);
        ch.status(&format!("answered {answered}"))?;
    }
    Ok(())
}
