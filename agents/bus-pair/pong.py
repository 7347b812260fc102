"""Answers its peer's requests over the bus (docs/agents.md)."""

import os

import aither

ch = aither.Channel.from_env()
me, peer = os.environ["AITHER_AGENT"], os.environ["PEER"]

requests = ch.subscribe(f"pair.{peer}.request")
ch.ready()
beat = ch.heartbeat_every(2.0)
print(f"{me}: answering {peer}", flush=True)

answered = 0
for msg in requests:  # waits for ever; the heartbeat thread keeps beating meanwhile
    n, text = msg["data"]["n"], msg["data"]["text"]
    ch.publish(f"pair.{me}.reply", {"n": n, "text": text.upper()})
    answered += 1
    print(f"{me}: answered {n} ({answered} so far)", flush=True)
    ch.status(f"answered {answered}")
