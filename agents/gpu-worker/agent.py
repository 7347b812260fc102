"""Asks for its GPU lease, waits while it is queued, then uses the leased device (docs/agents.md).

Prints one line `GPU-LEASE {json}` with the lease and what the sandbox shows of it:
CUDA_VISIBLE_DEVICES, and for each device whether its node exists and opens read-write.
Without a GPU service in aitherd it says so, reports pain and exits 3.
"""

import dataclasses
import json
import os
import sys
import time

import aither

ch = aither.Channel.from_env()
ch.ready()
beat = ch.heartbeat_every(5.0)

try:
    lease = ch.gpu_lease()
    while lease.state == "queued":
        ch.status("waiting for a GPU")
        time.sleep(1)
        lease = ch.gpu_lease()
except aither.GpuUnavailable as e:
    print(f"gpu-worker: {e.message}", flush=True)
    ch.pain("error", "no GPU service in this aitherd")
    sys.exit(3)

if not lease.granted:
    print(f"gpu-worker: no GPU granted (state {lease.state}): the token has no GPU claim", flush=True)
    ch.pain("error", f"no GPU lease (state {lease.state})")
    sys.exit(3)


def node_opens(path):
    try:
        os.close(os.open(path, os.O_RDWR))
        return True
    except OSError:
        return False


report = {
    "lease": dataclasses.asdict(lease),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "nodes": {d.node: {"exists": os.path.exists(d.node), "opens": node_opens(d.node)} for d in lease.devices},
}
print("GPU-LEASE " + json.dumps(report, sort_keys=True), flush=True)
names = ", ".join(f"{d.index}: {d.name} ({d.vram_mb} of {d.total_mb} MiB)" for d in lease.devices)
print(f"gpu-worker: leased {names}", flush=True)
ch.status(f"working on GPU {lease.visible_devices}")
while True:
    time.sleep(3600)
