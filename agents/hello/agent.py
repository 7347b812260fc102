import os
import aither

ch = aither.Channel.from_env()             # fd 3; aither.NotUnderAitherd outside aitherd
me = os.environ["AITHER_AGENT"]

ch.ready()                                  # "I have started": state starting -> ready
beat = ch.heartbeat_every(1.0)              # a thread feeds the watchdog every second

runs = ch.mem_get("active", "runs", default=0) + 1   # what the last run left
ch.mem_put("active", "runs", runs)
print(f"{me}: run {runs}", flush=True)

inbox = ch.subscribe(f"agent.{me}.inbox")  # strict: the agent's own subjects only
for msg in inbox:                           # waits for ever; dicts: subject, data, seq, ...
    ch.status(f"got {msg['data']!r}")
    ch.publish(f"agent.{me}.outbox", {"echo": msg["data"], "run": runs})
