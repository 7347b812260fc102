"""A worker that keeps aitherd's watchdog fed from a background thread (docs/agents.md).

Each job hashes a block of data and reports progress on the status line. STALL_AFTER=N (an
environment variable, e.g. `aitherctl spawn -f agents/heartbeat-worker.toml -e STALL_AFTER=3`)
makes it stop heartbeating after job N and hang, to watch the watchdog restart it.
"""

import hashlib
import os
import time

import aither

ch = aither.Channel.from_env()
interval = float(os.environ.get("HEARTBEAT_INTERVAL", "1"))
stall_after = int(os.environ.get("STALL_AFTER", "0"))

ch.ready()
beat = ch.heartbeat_every(interval)
print(f"heartbeat-worker: ready, heartbeat every {interval}s", flush=True)

digest = b""
job = 0
while True:
    job += 1
    for _ in range(2000):
        digest = hashlib.sha256(digest + job.to_bytes(8, "big")).digest()
    ch.status(f"job {job} done: {digest.hex()[:16]}")
    print(f"job {job} done: {digest.hex()[:16]}", flush=True)
    if job == stall_after:
        beat.stop()
        print(f"job {job}: stalling (no more heartbeats)", flush=True)
        while True:
            time.sleep(3600)
    if not beat.running:
        # The daemon refused a heartbeat (a revoked token): nothing more to do here.
        raise SystemExit(f"heartbeat failed: {beat.error}")
    time.sleep(0.5)
