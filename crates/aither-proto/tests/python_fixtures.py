"""Runs the Python SDK (runtime/python/aither.py) against the protocol fixtures: each agent
request it sends must be the fixture's JSON (its id aside), and it must read each fixture
reply and push as the Rust types do. Run by tests/python.rs:

    python3 python_fixtures.py FIXTURES_DIR PYTHON_SDK_DIR MAX_FRAME
"""

import json
import os
import socket
import struct
import sys
import threading

FIX, SDK, MAX_FRAME = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, SDK)
import aither  # noqa: E402

USED = set()


def load(name):
    USED.add(name)
    with open(os.path.join(FIX, name + ".json"), "rb") as f:
        return f.read()


def frame(body):
    return struct.pack(">I", len(body)) + body


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "the SDK closed the channel"
        buf += chunk
    return buf


def read_frame(sock):
    (n,) = struct.unpack(">I", recv_exact(sock, 4))
    assert 1 <= n <= MAX_FRAME, n
    return recv_exact(sock, n)


def with_id(body, rid):
    """The fixture's bytes with the request's id in place of the fixture's."""
    fid = json.loads(body).get("id")
    if fid is None:
        return body
    old = b'"id":%d' % fid
    assert body.count(old) == 1, body
    return body.replace(old, b'"id":%d' % rid)


def exchange(daemon, call, request, reply, pushes=()):
    """Runs `call` while playing aitherd: reads one request, checks it against the fixture
    `request`, sends the fixture pushes and then the fixture `reply` (with the request's id).
    Returns what `call` returned, or the AitherError it raised."""
    out = {}

    def run():
        try:
            out["value"] = call()
        except aither.AitherError as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    got = json.loads(read_frame(daemon))
    want = json.loads(load(request))
    rid = got.pop("id")
    assert isinstance(rid, int) and 0 <= rid < 1 << 53, rid
    want.pop("id")
    assert got == want, f"{request}: the SDK sent {got}, the fixture is {want}"
    for p in pushes:
        daemon.sendall(frame(load(p)))
    if reply is not None:
        daemon.sendall(frame(with_id(load(reply), rid)))
    t.join(10)
    assert not t.is_alive(), f"{request}: no result"
    return out.get("error", out.get("value"))


def main():
    assert aither.MAX_FRAME == MAX_FRAME, (aither.MAX_FRAME, MAX_FRAME)
    assert list(aither.TIERS) == json.loads(load("memory.tiers"))

    # Every error code becomes an AitherError carrying the code; the typed ones their class.
    classes = {"denied": aither.Denied, "quota": aither.QuotaExceeded,
               "not_found": aither.NotFound, "invalid": aither.InvalidRequest,
               "msg_too_large": aither.MessageTooLarge, "unknown_op": aither.UnknownOp,
               "rate_limited": aither.RateLimited, "limit": aither.LimitReached,
               "too_costly": aither.LimitReached, "bad_frame": aither.ChannelError,
               "too_large": aither.ChannelError}
    for code in json.loads(load("error.codes")):
        e = aither._error(code, "m")
        assert isinstance(e, classes.get(code, aither.AitherError)) and e.code == code, code

    daemon, agent = socket.socketpair()
    ch = aither.Channel(agent)
    assert exchange(daemon, ch.ready, "agent.request.ready", "agent.reply.ok") is None
    e = exchange(daemon, ch.heartbeat, "agent.request.heartbeat", "agent.reply.rate_limited")
    assert type(e) is aither.RateLimited and e.code == "rate_limited", e
    assert exchange(daemon, lambda: ch.status("indexing 3/10"), "agent.request.status",
                    "agent.reply.ok") is None
    assert exchange(daemon, lambda: ch.pain("warning", "rate-limited upstream"),
                    "agent.request.pain", "agent.reply.pain") == "log"

    lease = exchange(daemon, ch.gpu_lease, "agent.request.gpu_lease", "agent.reply.gpu_lease")
    data = json.loads(load("agent.reply.gpu_lease"))["data"]
    assert lease == aither.GpuLease(
        granted=True, state="granted", visible_devices=data["visible_devices"],
        devices=tuple(aither.GpuDevice(**d) for d in data["devices"])), lease

    e = exchange(daemon, lambda: ch.publish("agent.indexer.done", {"files": 3}, durable=True),
                 "agent.request.bus_publish", "agent.reply.error")
    want = json.loads(load("agent.reply.error"))["error"]
    assert type(e) is aither.Denied and (e.code, e.message) == (want["code"], want["message"]), e

    sub = exchange(daemon, lambda: ch.subscribe("agent.indexer.jobs", durable="worker", queue=64),
                   "agent.request.bus_subscribe", "agent.reply.bus_subscribe")
    assert int(sub) == 7, sub
    daemon.sendall(frame(load("agent.push.bus_msg")))
    msg = ch.next_message(timeout=10)
    push = json.loads(load("agent.push.bus_msg"))
    push.pop("push")
    assert msg == push, (msg, push)
    assert exchange(daemon, lambda: ch.ack(msg), "agent.request.bus_ack", "agent.reply.ok") is None
    assert exchange(daemon, lambda: ch.unsubscribe(sub), "agent.request.bus_unsubscribe",
                    "agent.reply.ok") is None

    # An id-less too_large reply ends the channel for the request waiting on it.
    daemon.sendall(frame(load("agent.reply.fatal")))
    e = exchange(daemon, ch.heartbeat, "agent.request.heartbeat", None)
    assert type(e) is aither.ChannelError and e.code == "too_large", e
    e = exchange_local(ch.ready)
    assert type(e) is aither.ChannelError, e

    # A frame over the limit is refused from its header.
    d2, a2 = socket.socketpair()
    ch2 = aither.Channel(a2)
    d2.sendall(struct.pack(">I", MAX_FRAME + 1))
    try:
        ch2.next_message(timeout=5)
        raise AssertionError("a frame over MAX_FRAME was read")
    except aither.ChannelError:
        pass

    agent_fixtures = {f[:-5] for f in os.listdir(FIX) if f.startswith("agent.")}
    # bus.reset is covered by the Rust SDK's tests and the Rust round trip only.
    missing = agent_fixtures - USED - {"agent.push.bus_reset"}
    assert not missing, f"agent fixtures the Python SDK was not run against: {sorted(missing)}"
    print(f"ok: {len(USED)} fixtures")


def exchange_local(call):
    try:
        call()
    except aither.AitherError as e:
        return e
    raise AssertionError("expected a refusal")


if __name__ == "__main__":
    main()
