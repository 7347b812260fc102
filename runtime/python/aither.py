"""Agent side of the aitherd channel (docs/protocol.md), standard library only.

    import aither
    ch = aither.Channel.from_env()      # the socket aitherd passed as fd 3 (AITHER_FD)
    ch.ready()
    ch.pain("warning", "rate-limited")  # raises aither.AitherError on a refusal

Mirrors the Rust crate aither-sdk. One process should own the channel: replies are matched
to requests by id, and replies for another user of the descriptor are skipped.
"""

import json
import os
import socket
import struct
import threading

MAX_FRAME = 64 * 1024
MAX_TEXT = 1024
SEVERITIES = ("info", "warning", "error", "critical")
_FATAL = ("bad_frame", "too_large")


class AitherError(Exception):
    """A refusal by aitherd (``code`` is its error code) or a local failure (``code`` None)."""

    def __init__(self, message, code=None):
        super().__init__(f"{code}: {message}" if code else message)
        self.code, self.message = code, message


class NotUnderAitherd(AitherError):
    pass


class Channel:
    def __init__(self, sock):
        self._sock, self._lock, self._next, self._broken = sock, threading.Lock(), 0, False

    @classmethod
    def from_env(cls):
        fd = os.environ.get("AITHER_FD")
        if fd is None:
            raise NotUnderAitherd("not running under aitherd (AITHER_FD is not set)")
        try:
            return cls(socket.socket(fileno=int(fd)))
        except (ValueError, OSError) as e:
            raise AitherError(f"AITHER_FD={fd!r} is not a usable socket: {e}") from None

    def ready(self):
        self.request("ready")

    def heartbeat(self):
        self.request("heartbeat")

    def pain(self, severity, reason):
        if severity not in SEVERITIES:
            raise AitherError(f"unknown severity {severity!r} (expected one of {SEVERITIES})")
        self.request("pain", severity=severity, reason=_text("reason", reason))

    def status(self, text):
        self.request("status", text=_text("text", text))

    def request(self, op, **fields):
        """Sends {"id", "op", **fields}; returns the reply dict, raises AitherError if not ok."""
        if "id" in fields:
            raise AitherError('request field "id" is set by the SDK')
        with self._lock:
            if self._broken:
                raise AitherError("the channel is unusable after an earlier failure")
            self._next += 1
            rid = (os.getpid() << 20) | (self._next & 0xFFFFF)
            body = json.dumps({"id": rid, "op": op, **fields}).encode()
            if len(body) > MAX_FRAME:
                raise AitherError(f"request of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
            try:
                self._sock.sendall(struct.pack(">I", len(body)) + body)
                while True:
                    (n,) = struct.unpack(">I", self._recv(4))
                    if not 1 <= n <= MAX_FRAME:
                        raise AitherError(f"aitherd sent a frame of {n} bytes")
                    try:
                        reply = json.loads(self._recv(n))
                    except ValueError:
                        reply = None
                    if not isinstance(reply, dict):
                        raise AitherError("aitherd sent a reply that is not a JSON object", "bad_reply")
                    err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
                    if reply.get("id") == rid:
                        break
                    if reply.get("id") is None and err.get("code") in _FATAL:
                        self._broken = True  # the daemon closes the channel after these
                        break
            except (OSError, AitherError) as e:
                # A bad JSON payload leaves the framing intact; anything else may not.
                self._broken = getattr(e, "code", None) != "bad_reply"
                raise
        if reply.get("ok") is True:
            return reply
        raise AitherError(err.get("message", "malformed reply"), err.get("code", "bad_reply"))

    def heartbeat_every(self, interval):
        """Sends heartbeats from a daemon thread every `interval` seconds; returns an Event
        to set to stop it. The thread ends at the first failed heartbeat."""
        stop = threading.Event()

        def beat():
            while not stop.is_set():
                self.heartbeat()
                stop.wait(interval)

        threading.Thread(target=beat, name="aither-heartbeat", daemon=True).start()
        return stop

    def close(self):
        self._sock.close()

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise AitherError("aitherd closed the channel")
            buf += chunk
        return buf


def _text(field, text):
    if len(text.encode()) > MAX_TEXT:
        raise AitherError(f"{field} is {len(text.encode())} bytes; the limit is {MAX_TEXT}")
    return text
