"""Exercises aither.py against the fake daemon of runtime/aither-sdk/tests/python.rs, which
runs this script with a socketpair as fd 3 and checks what arrives. Not runnable alone."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aither  # noqa: E402


def expect_error(cls, code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except aither.AitherError as e:
        assert type(e) is cls, f"expected {cls.__name__}, got {type(e).__name__}: {e}"
        assert e.code == code, f"expected code {code!r}, got {e.code!r}: {e}"
        return e
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def main():
    ch = aither.Channel.from_env()
    ch.ready()
    ch.heartbeat()
    assert ch.pain("error", "oom soon") == "log"
    ch.status("step 3/10")
    assert ch.request("memory.get", key="k")["value"] == "v"

    # Refusals come back typed.
    e = expect_error(aither.Denied, "denied", ch.request, "bus.publish", topic="t")
    assert e.message == "token does not grant bus.publish", e.message
    expect_error(aither.UnknownOp, "unknown_op", ch.request, "no.such.op")
    expect_error(aither.QuotaExceeded, "quota", ch.mem_put, "active", "big", "x")
    assert ch.mem_get("active", "absent", default=5) == 5
    assert ch.request("noisy")["ok"] is True  # the daemon sends a stranger's reply first

    # GPU lease: an aitherd without the GPU service, then one with it.
    e = expect_error(aither.GpuUnavailable, "unknown_op", ch.gpu_lease)
    assert isinstance(e, aither.UnknownOp) and "GPU service not available" in e.message, e
    lease = ch.gpu_lease()
    assert lease.granted and lease.state == "granted" and lease.visible_devices == "0", lease
    assert lease.devices == (aither.GpuDevice(index=0, uuid="GPU-sim-0", name="Simulated GPU",
                                              vram_mb=1024, total_mb=16384, node="/dev/nvidia0"),), lease
    none = ch.gpu_lease()
    assert (none.granted, none.state, none.devices) == (False, "none", ()), none

    # Refused locally, never sent.
    expect_error(aither.InvalidRequest, "invalid", ch.pain, "fatal", "bad severity")
    expect_error(aither.InvalidRequest, "invalid", ch.status, "é" * 513)
    expect_error(aither.InvalidRequest, "invalid", ch.request, "memory.put", value="x" * aither.MAX_FRAME)
    expect_error(aither.InvalidRequest, "invalid", ch.request, "x", id=1)
    expect_error(aither.MessageTooLarge, "msg_too_large", ch.publish, "a.b", "x" * aither.MAX_DATA)

    # Two subscriptions; the daemon pushes a, b, a, b around the second subscribe's reply.
    a = ch.subscribe("a.>", durable="worker")
    b = ch.subscribe("b.>")
    assert (int(a), int(b), a.id) == (7, 8, 7) and isinstance(a, int), (a, b)
    first_b = b.next(timeout=5)
    assert (first_b["sub"], first_b["data"]) == (8, "b1"), first_b
    got = [m["data"] for m in a.messages(timeout=0.2)]
    assert got == ["a1", "a2"], got
    assert [m["data"] for m in ch.messages(timeout=0.2)] == ["b2"]
    a.ack({"seq": 41, "sub": 7})
    expect_error(aither.InvalidRequest, "invalid", b.ack, {"seq": 1, "sub": 8})
    b.unsubscribe()
    expect_error(aither.NotFound, "not_found", ch.unsubscribe, 8)

    # A thread heartbeats while the main thread waits for bus messages.
    ch.request("mark")
    with ch.heartbeat_every(0.02) as beat:
        assert ch.next_message(timeout=0.6) is None
        assert beat.running
    assert not beat.running
    ch.request("mark")

    # A heartbeat thread stops at the first refusal and keeps the error.
    ch.request("refuse-heartbeats")
    beat = ch.heartbeat_every(0.01)
    beat._thread.join(5)
    assert not beat.running and isinstance(beat.error, aither.Denied), beat.error
    expect_error(aither.InvalidRequest, "invalid", ch.heartbeat_every, 0)

    del os.environ["AITHER_FD"]
    try:
        aither.Channel.from_env()
        raise AssertionError("from_env without AITHER_FD")
    except aither.NotUnderAitherd as e:
        assert str(e) == "not running under aitherd (AITHER_FD is not set)", str(e)

    ch.status("python done")
    ch.close()
    print("test_aither: ok")


if __name__ == "__main__":
    main()
