"""A consumer of the model service (tests/inference.rs): makes the requests of a plan through
the agent's egress gateway (HTTP_PROXY) to http://model.aither.internal and writes what it saw.

    python3 client.py PLAN.json OUT.json [WAIT_FOR_FILE]

PLAN: a list of {"path": "/v1/...", "body": {...}, "headers": {...}, "chunked": true}
(no body: GET; chunked: the body without Content-Length). OUT: one object per request:
status, and usage (the last SSE usage chunk when streaming), or the error's body, the
X-Aither-Rule and Retry-After headers.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

URL = "http://model.aither.internal"


def call(step):
    body = step.get("body")
    data = None if body is None else json.dumps(body).encode()
    if data is not None and step.get("chunked"):
        # An iterable body: urllib sends it chunked, without Content-Length.
        data = iter([data[i:i + 8192] for i in range(0, len(data), 8192)])
    headers = {"Content-Type": "application/json", **step.get("headers", {})}
    req = urllib.request.Request(URL + step["path"], data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            if body is not None and body.get("stream"):
                usage, chunks = None, 0
                for line in r:
                    line = line.strip()
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        chunks += 1
                        try:
                            o = json.loads(line[6:])
                        except ValueError:
                            continue  # a hostile server's garbage
                        if isinstance(o, dict) and o.get("usage"):
                            usage = o["usage"]
                return {"status": r.status, "usage": usage, "chunks": chunks}
            o = json.loads(r.read())
            return {"status": r.status, "usage": o.get("usage"), "seen": o.get("seen")}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode(errors="replace"),
                "rule": e.headers.get("x-aither-rule"), "retry_after": e.headers.get("retry-after")}
    except Exception as e:  # noqa: BLE001 - a cut response (IncompleteRead) included
        return {"status": 0, "error": repr(e)}


def main():
    plan, out = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.05)
    with open(plan) as f:
        steps = json.load(f)
    results = [call(s) for s in steps]
    with open(out + ".tmp", "w") as f:
        json.dump(results, f)
    os.rename(out + ".tmp", out)
    if os.environ.get("INFER_CLIENT_ONESHOT"):
        return
    while True:  # under aitherd: stays up until stopped, so that `stats` sees its run
        time.sleep(60)


main()
