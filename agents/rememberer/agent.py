"""Remembers across restarts with aitherd's memory tiers (docs/agents.md).

Every run reads what the earlier runs left, adds its own, and prints what it found:
- active: the run counter (session state, kept 7 days here);
- knowledge: one fact per run, found again by full-text search;
- codegraph: run-1 -> run-2 -> ... (edges "next");
- working: scratch, cleared by aitherd when a run ends (so never seen by the next run).
CRASH_ON_RUN=N makes run N crash after writing (exit 3): the restart policy starts run N+1.
"""

import json
import os
import time

import aither

ch = aither.Channel.from_env()
ch.ready()
beat = ch.heartbeat_every(5.0)

run = ch.mem_get("active", "runs", default=0) + 1
scratch_left = ch.mem_get("working", "scratch")            # always None: a new run
earlier = sorted(h["key"] for h in ch.mem_search("rememberer run started", limit=100))

ch.mem_put("active", "runs", run, ttl_s=7 * 86400)
ch.mem_put("working", "scratch", {"run": run})
ch.mem_put("knowledge", f"run-{run}", f"rememberer run {run} started at {time.ctime()}")
ch.graph_add_node(f"run-{run}", "run", {"pid": os.getpid()})
if run > 1:
    ch.graph_add_edge(f"run-{run - 1}", f"run-{run}", "next")
chain = sorted(n["id"] for n in ch.graph_neighbors("run-1", depth=8, kind="next")["nodes"])

seen = {"run": run, "earlier_facts": earlier, "chain": chain, "scratch_left": scratch_left}
print(f"rememberer: run {run}, remembers {len(earlier)} earlier run(s)", flush=True)
print("REMEMBERED " + json.dumps(seen, sort_keys=True), flush=True)
ch.status(f"run {run}: remembers {len(earlier)} earlier run(s)")

if run == int(os.environ.get("CRASH_ON_RUN", "0")):
    print(f"rememberer: crashing on run {run}", flush=True)
    os._exit(3)
while True:
    time.sleep(3600)
