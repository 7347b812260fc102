"""Exercises aither.py against the fake daemon of runtime/aither-sdk/tests/python.rs, which
runs this script with a socketpair as fd 3 and checks what arrives. Not runnable alone."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aither  # noqa: E402


def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except aither.AitherError as e:
        assert e.code == code, f"expected code {code!r}, got {e.code!r}: {e}"
        return e
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def main():
    ch = aither.Channel.from_env()
    ch.ready()
    ch.heartbeat()
    ch.pain("error", "oom soon")
    ch.status("step 3/10")
    assert ch.request("memory.get", key="k")["value"] == "v"

    e = expect_error("denied", ch.request, "bus.publish", topic="t")
    assert e.message == "token does not grant bus.publish", e.message
    expect_error("unknown_op", ch.request, "no.such.op")
    assert ch.request("noisy")["ok"] is True  # the daemon sends a stranger's reply first

    # Refused locally, never sent.
    expect_error(None, ch.pain, "fatal", "bad severity")
    expect_error(None, ch.status, "é" * 513)
    expect_error(None, ch.request, "memory.put", value="x" * aither.MAX_FRAME)
    expect_error(None, ch.request, "x", id=1)

    stop = ch.heartbeat_every(0.01)
    time.sleep(0.1)
    stop.set()
    time.sleep(0.03)

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
