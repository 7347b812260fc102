"""Sends COUNT requests to its peer over the bus and waits for each answer (docs/agents.md).

Its token (strict, plus the [bus] grant of ping.toml) lets it publish only under pair.<its own name>.>: it cannot
answer in the peer's name, which it shows at the end.
"""

import os
import time

import aither

ch = aither.Channel.from_env()
me, peer = os.environ["AITHER_AGENT"], os.environ["PEER"]
count = int(os.environ.get("COUNT", "5"))

replies = ch.subscribe(f"pair.{peer}.reply")
ch.ready()
print(f"{me}: talking to {peer}", flush=True)

for n in range(1, count + 1):
    while True:
        # Live messages reach only subscriptions that exist: until the peer has subscribed,
        # a request is lost, so it is sent again after a second without an answer.
        ch.publish(f"pair.{me}.request", {"n": n, "text": f"hello {n}"})
        answer = next((m for m in replies.messages(timeout=1.0) if m["data"].get("n") == n), None)
        if answer is not None:
            break
    print(f"{me}: {n} -> {answer['data']['text']!r} from {answer['publisher']}", flush=True)
    ch.status(f"{n}/{count} answered")

try:
    ch.publish(f"pair.{peer}.reply", {"n": 0, "text": "forged"})
    print(f"{me}: FORGED a reply as {peer}", flush=True)
except aither.Denied as e:
    print(f"{me}: cannot speak for {peer}: {e.message}", flush=True)

print(f"{me}: {count} of {count} answered", flush=True)
ch.status(f"done: {count} of {count} answered")
while True:
    time.sleep(3600)
