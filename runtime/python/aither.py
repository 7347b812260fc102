"""Agent side of the aitherd channel (docs/protocol.md), standard library only.

    import aither
    ch = aither.Channel.from_env()      # the socket aitherd passed as fd 3 (AITHER_FD)
    ch.ready()
    ch.pain("warning", "rate-limited")  # raises aither.AitherError on a refusal
    ch.mem_put("active", "step", 3)     # memory tiers (docs/memory.md)
    ch.mem_get("active", "step")        # 3, or None when absent
    ch.mem_search("ownership borrowing", limit=5)

    # The event bus (docs/bus.md): subjects allowed by the agent's token.
    sub = ch.subscribe("agent.me.>")
    ch.publish("agent.me.out", {"n": 1})
    msg = ch.next_message(timeout=5)     # {"subject", "data", "seq", "sub", "ts_ms", ...} or None

Mirrors the Rust crate aither-sdk. One process should own the channel: replies are matched
to requests by id, and replies for another user of the descriptor are skipped.
"""

import collections
import json
import os
import select
import socket
import struct
import threading
import time

MAX_FRAME = 64 * 1024
MAX_TEXT = 1024
MAX_DATA = 32 * 1024
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
        # Server pushes (bus messages) read while waiting for a reply, in order.
        self._pushes = collections.deque()
        # Bus subscriptions by the id the caller knows: the options, the daemon's current id,
        # and the last sequence seen (to resume after the daemon restarts).
        self._subs, self._server_sub = {}, {}

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

    # Memory tiers (docs/memory.md): working, active, spirit, codegraph, knowledge. Refusals
    # raise AitherError with code denied (no claim), quota (nothing written), invalid.

    def mem(self, op, **fields):
        """Runs a mem.* op; returns the reply's data."""
        return self.request(op, **{k: v for k, v in fields.items() if v is not None}).get("data")

    def mem_put(self, tier, key, value, ttl_s=None):
        """Writes key (value: any JSON value); ttl_s only for the active tier (default 24h)."""
        return self.mem("mem.put", tier=tier, key=key, value=value, ttl_s=ttl_s)

    def mem_put_many(self, tier, items, ttl_s=None):
        """Writes a dict (or (key, value) pairs) at once, all or nothing."""
        pairs = items.items() if isinstance(items, dict) else items
        return self.mem("mem.put_many", tier=tier, ttl_s=ttl_s,
                        items=[{"key": k, "value": v} for k, v in pairs])["written"]

    def mem_get(self, tier, key, owner=None, default=None):
        """The value of key, or `default` when absent or expired. `owner`: another agent's
        memory (needs a grant in this agent's token)."""
        try:
            return self.mem("mem.get", tier=tier, key=key, owner=owner)["value"]
        except AitherError as e:
            if e.code == "not_found":
                return default
            raise

    def mem_delete(self, tier, key):
        return self.mem("mem.delete", tier=tier, key=key)["deleted"]

    def mem_list(self, tier, prefix=None, limit=None, owner=None):
        """Entries (key, size, times; no values) in key order, every page unless `limit`."""
        out, after = [], None
        while limit is None or len(out) < limit:
            page = 1000 if limit is None else min(1000, limit - len(out))
            d = self.mem("mem.list", tier=tier, prefix=prefix, after=after, limit=page, owner=owner)
            out.extend(d["entries"])
            if not d.get("more") or not d.get("next"):
                break
            after = d["next"]
        return out

    def mem_search(self, query, limit=10, owner=None, any=False):
        """bm25 search of the knowledge tier: hits (key, score, snippet, value), best first."""
        return self.mem("mem.search", query=query, limit=limit, owner=owner, any=any or None)["hits"]

    def mem_usage(self):
        return self.mem("mem.usage")

    def graph_add_node(self, node, kind, props=None):
        return self.mem("mem.graph.add_node", node=node, kind=kind, props=props or {})

    def graph_add_edge(self, frm, to, kind, props=None):
        return self.mem("mem.graph.add_edge", **{"from": frm, "to": to, "kind": kind, "props": props or {}})

    def graph_neighbors(self, node, depth=1, kind=None, owner=None):
        """{"nodes": [{id, kind, props, depth}], "edges": [{from, to, kind, props}], ...}"""
        return self.mem("mem.graph.neighbors", node=node, depth=depth, kind=kind, owner=owner)

    def graph_remove_node(self, node):
        return self.mem("mem.graph.remove_node", node=node)["deleted"]

    def request(self, op, **fields):
        """Sends {"id", "op", **fields}; returns the reply dict, raises AitherError if not ok."""
        if "id" in fields:
            raise AitherError('request field "id" is set by the SDK')
        with self._lock:
            reply = self._call(op, fields)
            self._after_reset()
        return reply

    def _call(self, op, fields):
        """One request and its reply; the lock is held. Pushes read meanwhile are queued."""
        if self._broken:
            raise AitherError("the channel is unusable after an earlier failure")
        size = len(json.dumps({"id": 1 << 52, "op": op, **fields}).encode())
        if size > MAX_FRAME:
            raise AitherError(f"request of {size} bytes exceeds the {MAX_FRAME}-byte limit")

        def send():
            self._next += 1
            rid = (os.getpid() << 20) | (self._next & 0xFFFFF)
            body = json.dumps({"id": rid, "op": op, **fields}).encode()
            self._sock.sendall(struct.pack(">I", len(body)) + body)
            return rid

        try:
            rids = {send()}
            reset_at = None
            while True:
                if reset_at is not None:
                    # aitherd restarted while this request was in flight. A request it had not
                    # read yet is answered right after the reset; one the old daemon had read
                    # is lost: send it again (ops are idempotent or at-least-once).
                    left = reset_at + 2.0 - time.monotonic()
                    if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                        rids.add(send())
                        reset_at = None
                        continue
                reply = self._read_frame()
                err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
                if reply.get("id") in rids:
                    break
                if reply.get("id") is None and "push" in reply:
                    self._pushes.append(reply)
                    if reply.get("push") == "bus.reset":
                        reset_at = time.monotonic()
                    continue
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

    def _read_frame(self):
        (n,) = struct.unpack(">I", self._recv(4))
        if not 1 <= n <= MAX_FRAME:
            raise AitherError(f"aitherd sent a frame of {n} bytes")
        try:
            reply = json.loads(self._recv(n))
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise AitherError("aitherd sent a reply that is not a JSON object", "bad_reply")
        return reply

    # --- the event bus (docs/bus.md) ---------------------------------------------------

    def publish(self, subject, data, durable=False):
        """Publishes `data` (anything JSON can encode, at most 32 KiB encoded) on `subject`.
        With durable=True the message goes to the log; returns its sequence number once it is
        committed. Raises AitherError ("denied", "invalid", "msg_too_large")."""
        encoded = json.dumps(data)
        if len(encoded.encode()) > MAX_DATA:
            raise AitherError(f"data is {len(encoded.encode())} bytes encoded; the limit is {MAX_DATA}", "msg_too_large")
        fields = {"subject": subject, "data": data}
        if durable:
            fields["durable"] = True
        return self.request("bus.publish", **fields).get("data", {}).get("seq")

    def subscribe(self, pattern, durable=None, from_seq=None, since_ms=None, queue=None):
        """Subscribes to a pattern (`*` one token, `>` the rest); returns the subscription id.
        `durable`: a consumer name whose acked cursor aitherd keeps (resumes after the last
        ack); `from_seq`/`since_ms`: replay the log first. Messages come from next_message()."""
        opts = {"pattern": pattern}
        for k, v in (("durable", durable), ("from_seq", from_seq), ("since_ms", since_ms), ("queue", queue)):
            if v is not None:
                opts[k] = v
        with self._lock:
            sid = self._call("bus.subscribe", opts)["data"]["sub"]
            self._subs[sid] = {"opts": opts, "server": sid, "last_seq": None}
            self._server_sub[sid] = sid
            self._after_reset()
        return sid

    def unsubscribe(self, sub):
        with self._lock:
            s = self._subs.pop(sub, None)
            if s is None:
                raise AitherError(f"no subscription {sub}", "not_found")
            self._server_sub.pop(s["server"], None)
            self._call("bus.unsubscribe", {"sub": s["server"]})

    def ack(self, msg, durable=None):
        """Acks a message of a durable subscription (a message dict), or a sequence number for
        the consumer named `durable`: aitherd resumes that consumer after it."""
        if isinstance(msg, dict):
            seq = msg["seq"]
            if durable is None:
                s = self._subs.get(msg.get("sub"))
                durable = s and s["opts"].get("durable")
        else:
            seq = msg
        if not durable:
            raise AitherError("ack needs a durable consumer (subscribe(..., durable=NAME))")
        self.request("bus.ack", durable=durable, seq=seq)

    def next_message(self, timeout=None):
        """The next bus message as a dict (subject, data, seq, sub, ts_ms, publisher, dropped:
        how many this subscription lost to overflow just before it), or None after `timeout`
        seconds (None: wait for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                while self._pushes:
                    m = self._take(self._pushes.popleft())
                    if m is not None:
                        return m
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                r, _, _ = select.select([self._sock], [], [], left)
                if not r:
                    return None
                frame = self._read_frame()
                if "push" in frame:
                    self._pushes.append(frame)

    def _take(self, p):
        """A queued push as a message, handling resets; None when it is not for the caller."""
        kind = p.get("push")
        if kind == "bus.reset":
            self._resubscribe()
            return None
        if kind != "bus.msg":
            return None
        user = self._server_sub.get(p.get("sub"))
        if user is None:
            return None
        p = dict(p)
        p.pop("push", None)
        p["sub"] = user
        if p.get("seq") is not None:
            self._subs[user]["last_seq"] = p["seq"]
        return p

    def _after_reset(self):
        if any(p.get("push") == "bus.reset" for p in self._pushes):
            self._pushes = collections.deque(p for p in self._pushes if p.get("push") != "bus.reset")
            self._resubscribe()

    def _resubscribe(self):
        """aitherd restarted and forgot this agent's subscriptions: make them again. Durable
        consumers resume after their last ack; replays go on after the last message seen."""
        self._server_sub = {}
        for user, s in self._subs.items():
            opts = dict(s["opts"])
            if "durable" not in opts and s["last_seq"] is not None and ("from_seq" in opts or "since_ms" in opts):
                opts.pop("since_ms", None)
                opts["from_seq"] = s["last_seq"] + 1
            elif "durable" in opts:
                opts.pop("from_seq", None)
                opts.pop("since_ms", None)
            sid = self._call("bus.subscribe", opts)["data"]["sub"]
            s["server"] = sid
            self._server_sub[sid] = user

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
