"""Agent side of the aitherd channel (docs/protocol.md), standard library only.

Every agent aitherd starts gets a connected unix socket as file descriptor 3 (``AITHER_FD=3``).
This module speaks the protocol on it::

    import aither

    ch = aither.Channel.from_env()      # the socket aitherd passed as fd 3
    ch.ready()                          # READY: the agent has started
    beat = ch.heartbeat_every(5.0)      # a thread feeds the watchdog until beat.stop()
    ch.status("indexing 3/10")
    ch.pain("warning", "rate-limited")  # raises aither.Denied, aither.InvalidRequest, ...

    ch.mem_put("active", "step", 3)     # memory tiers (docs/memory.md)
    ch.mem_get("active", "step")        # 3, or None when absent
    ch.mem_search("ownership borrowing", limit=5)

    sub = ch.subscribe("agent.me.>")    # the event bus (docs/bus.md)
    ch.publish("agent.me.out", {"n": 1})
    for msg in sub.messages(timeout=5): # dicts: subject, data, seq, sub, ts_ms, publisher
        print(msg["subject"], msg["data"])

    lease = ch.gpu_lease()              # aither.GpuLease, or aither.GpuUnavailable

Where agents find it: install.sh puts this file in the system python3's
``/usr/local/lib/python3.11/dist-packages``, which every sandbox sees read-only (the policies
mount ``/usr``), so ``import aither`` works in any agent run by ``/usr/bin/python3``. A copy
beside the agent's script (in its workspace) is found first and works the same.

Errors: every failure is an ``AitherError`` with ``code`` (the daemon's error code, or
``invalid``/``msg_too_large`` for requests refused before sending, None for a broken channel)
and ``message``. Subclasses name the common cases: ``Denied``, ``QuotaExceeded``,
``NotFound``, ``InvalidRequest``, ``MessageTooLarge``, ``UnknownOp``, ``GpuUnavailable``,
``ChannelError``, ``NotUnderAitherd``.

Mirrors the Rust crate aither-sdk. One process should own the channel: replies are matched
to requests by id, and replies for another user of the descriptor are skipped. Within a
process every method is thread-safe (a heartbeat thread and a bus loop may share a channel).
"""

import collections
import dataclasses
import json
import os
import select
import socket
import struct
import threading
import time

__version__ = "0.1.0"

__all__ = [
    "Channel", "Subscription", "Heartbeat", "GpuLease", "GpuDevice",
    "AitherError", "NotUnderAitherd", "ChannelError", "Denied", "QuotaExceeded", "NotFound",
    "InvalidRequest", "MessageTooLarge", "UnknownOp", "GpuUnavailable",
    "TIERS", "SEVERITIES", "MAX_FRAME", "MAX_TEXT", "MAX_DATA",
]

#: The largest frame payload either side may send, in bytes.
MAX_FRAME = 64 * 1024
#: The longest pain ``reason`` or ``status`` text, in bytes (UTF-8).
MAX_TEXT = 1024
#: The largest bus payload (``data`` as JSON), in bytes.
MAX_DATA = 32 * 1024
#: Pain severities, mildest first.
SEVERITIES = ("info", "warning", "error", "critical")
#: Memory tiers (docs/memory.md).
TIERS = ("working", "active", "spirit", "codegraph", "knowledge")
_FATAL = ("bad_frame", "too_large")


# --- errors ------------------------------------------------------------------------------


class AitherError(Exception):
    """A refusal by aitherd or a local failure.

    ``code`` is the daemon's error code (``denied``, ``quota``, ``not_found``, ``invalid``,
    ``unknown_op``, ``msg_too_large``, ...), ``invalid`` or ``msg_too_large`` for a request
    refused here before it was sent, and None when the channel itself failed. ``message`` is
    for people; programs branch on the class or on ``code``.
    """

    def __init__(self, message, code=None):
        super().__init__(f"{code}: {message}" if code else message)
        self.code, self.message = code, message


class NotUnderAitherd(AitherError):
    """The process was not started by aitherd (``AITHER_FD`` is not set)."""


class ChannelError(AitherError):
    """The channel failed: aitherd closed it, an I/O error, or a malformed reply."""


class Denied(AitherError):
    """The agent's capability token does not allow this (code ``denied``)."""


class QuotaExceeded(AitherError):
    """A memory write would pass a tier's quota; nothing was written (code ``quota``)."""


class NotFound(AitherError):
    """No such memory key, graph node or bus subscription (code ``not_found``)."""


class InvalidRequest(AitherError):
    """A field is missing, malformed or too long (code ``invalid`` or ``bad_json``)."""


class MessageTooLarge(AitherError):
    """A bus payload over ``MAX_DATA`` bytes (code ``msg_too_large``)."""


class RateLimited(AitherError):
    """Over the agent's budget on its channel (code ``rate_limited``): nothing was done. The
    message says which budget and in how many ms to try again (docs/daemon.md, "Bounds")."""


class LimitReached(AitherError):
    """A bound of aitherd was reached (code ``limit``: e.g. 64 bus subscriptions on one
    channel; ``too_costly``: a memory query stopped at its cost budget)."""


class UnknownOp(AitherError):
    """This aitherd does not know the op (code ``unknown_op``): an older daemon."""


class GpuUnavailable(UnknownOp):
    """This aitherd has no GPU service (it answered ``gpu.lease`` with ``unknown_op``)."""


_BY_CODE = {
    "denied": Denied,
    "quota": QuotaExceeded,
    "not_found": NotFound,
    "invalid": InvalidRequest,
    "bad_json": InvalidRequest,
    "msg_too_large": MessageTooLarge,
    "unknown_op": UnknownOp,
    "rate_limited": RateLimited,
    "limit": LimitReached,
    "too_costly": LimitReached,
    "bad_frame": ChannelError,
    "too_large": ChannelError,
    "bad_reply": ChannelError,
}


def _error(code, message):
    """The AitherError subclass for a daemon error code."""
    return _BY_CODE.get(code, AitherError)(message, code)


# --- GPU lease ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    """One leased GPU: ``index`` on the host, ``uuid``, ``name``, ``vram_mb`` reserved for
    this agent, ``total_mb`` of the device, and its device ``node`` (``/dev/nvidia0``)."""

    index: int
    uuid: str = ""
    name: str = ""
    vram_mb: int = 0
    total_mb: int = 0
    node: str = ""


@dataclasses.dataclass(frozen=True)
class GpuLease:
    """The agent's GPU lease. ``state`` is ``none`` (no GPU claim in the token), ``queued``
    (waiting for the scheduler) or ``granted``; ``devices`` are the leased GPUs and
    ``visible_devices`` the value for ``CUDA_VISIBLE_DEVICES`` (a convenience, not a
    boundary: the sandbox only has the leased device nodes)."""

    granted: bool
    state: str
    devices: tuple = ()
    visible_devices: str = ""

    @classmethod
    def from_reply(cls, d):
        """Parses the ``data`` of a ``gpu.lease`` reply; unknown fields are ignored."""
        if not isinstance(d, dict):
            raise ChannelError("gpu.lease replied without a data object", "bad_reply")
        names = {f.name for f in dataclasses.fields(GpuDevice)}
        devices = tuple(GpuDevice(**{k: v for k, v in dev.items() if k in names})
                        for dev in d.get("devices") or () if isinstance(dev, dict) and "index" in dev)
        return cls(granted=bool(d.get("granted")), state=str(d.get("state", "none")),
                   devices=devices, visible_devices=str(d.get("visible_devices") or ""))


# --- the channel -------------------------------------------------------------------------


class Channel:
    """The agent's end of the aitherd channel. Use ``Channel.from_env()`` in an agent;
    ``Channel(sock)`` wraps any connected stream socket (tests). Usable as a context manager
    (closes the socket)."""

    def __init__(self, sock):
        self._sock, self._lock, self._next, self._broken = sock, threading.Lock(), 0, False
        # Server pushes (bus messages, resets) read while waiting for a reply, in order.
        self._pushes = collections.deque()
        # Messages already taken from _pushes (mapped to the caller's subscription ids) that
        # wait for a reader of their own subscription, in order.
        self._ready = collections.deque()
        # Bus subscriptions by the id the caller knows: the options, the daemon's current id,
        # and the last sequence seen (to resume after the daemon restarts).
        self._subs, self._server_sub = {}, {}

    @classmethod
    def from_env(cls):
        """The channel aitherd passed to this process (the descriptor named by AITHER_FD).
        Raises NotUnderAitherd when the variable is not set."""
        fd = os.environ.get("AITHER_FD")
        if fd is None:
            raise NotUnderAitherd("not running under aitherd (AITHER_FD is not set)")
        try:
            return cls(socket.socket(fileno=int(fd)))
        except (ValueError, OSError) as e:
            raise ChannelError(f"AITHER_FD={fd!r} is not a usable socket: {e}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- lifecycle -----------------------------------------------------------------------

    def ready(self):
        """Tells aitherd the agent has started (like ``sd_notify("READY=1")``); with
        ``wait_ready`` the agent is ``starting`` until then."""
        self.request("ready")

    def heartbeat(self):
        """Feeds the watchdog (like ``sd_notify("WATCHDOG=1")``)."""
        self.request("heartbeat")

    def heartbeat_every(self, interval):
        """Starts a daemon thread that sends a heartbeat now and then every ``interval``
        seconds; returns its ``Heartbeat`` (``stop()`` it, or use it as a context manager).
        The thread ends at the first failed heartbeat (``Heartbeat.error`` says why)."""
        return Heartbeat(self, interval)

    def pain(self, severity, reason):
        """Reports a pain signal (``severity`` in SEVERITIES, ``reason`` at most 1024 bytes);
        returns the action the policy chose (``log``, ``throttle``, ``restart``, ``stop``)."""
        if severity not in SEVERITIES:
            raise InvalidRequest(f"unknown severity {severity!r} (expected one of {SEVERITIES})", "invalid")
        reply = self.request("pain", severity=severity, reason=_text("reason", reason))
        return (reply.get("data") or {}).get("action")

    def status(self, text):
        """Sets the agent's status line (at most 1024 bytes), shown by ``aitherctl ps``."""
        self.request("status", text=_text("text", text))

    # --- GPU -----------------------------------------------------------------------------

    def gpu_lease(self):
        """The agent's GPU lease as a ``GpuLease`` (``state`` none, queued or granted).
        Raises GpuUnavailable when this aitherd has no GPU service."""
        try:
            reply = self.request("gpu.lease")
        except UnknownOp as e:
            raise GpuUnavailable(f"GPU service not available in this aitherd ({e.message})", e.code) from None
        return GpuLease.from_reply(reply.get("data"))

    # --- memory tiers (docs/memory.md) ---------------------------------------------------
    # working, active, spirit, codegraph, knowledge. Refusals raise Denied (no claim),
    # QuotaExceeded (nothing written), InvalidRequest.

    def mem(self, op, **fields):
        """Runs any ``mem.*`` op (fields that are None are left out); returns the reply's
        ``data``."""
        return self.request(op, **{k: v for k, v in fields.items() if v is not None}).get("data")

    def mem_put(self, tier, key, value, ttl_s=None):
        """Writes ``key`` (``value``: any JSON value, at most 48 KiB); ``ttl_s`` only for the
        active tier (default 24 h). Returns ``{tier, key, size, expires_ms?}``."""
        return self.mem("mem.put", tier=tier, key=key, value=value, ttl_s=ttl_s)

    def mem_put_many(self, tier, items, ttl_s=None):
        """Writes a dict (or (key, value) pairs) at once, all or nothing; returns how many."""
        pairs = items.items() if isinstance(items, dict) else items
        return self.mem("mem.put_many", tier=tier, ttl_s=ttl_s,
                        items=[{"key": k, "value": v} for k, v in pairs])["written"]

    def mem_get(self, tier, key, owner=None, default=None):
        """The value of ``key``, or ``default`` when absent or expired. ``owner``: another
        agent's memory (needs a grant in this agent's token)."""
        try:
            return self.mem("mem.get", tier=tier, key=key, owner=owner)["value"]
        except NotFound:
            return default

    def mem_delete(self, tier, key):
        """Deletes ``key``; returns whether it was there."""
        return self.mem("mem.delete", tier=tier, key=key)["deleted"]

    def mem_list(self, tier, prefix=None, limit=None, owner=None):
        """Entries (key, size, times; no values) in key order, every page unless ``limit``."""
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
        """bm25 search of the knowledge tier (every word must match; ``any=True``: any word):
        hits ``{key, score, snippet, value}``, best first."""
        return self.mem("mem.search", query=query, limit=limit, owner=owner, any=any or None)["hits"]

    def mem_usage(self):
        """Per tier: ``{bytes, entries, read, write, quota_bytes, quota_entries}``."""
        return self.mem("mem.usage")

    def graph_add_node(self, node, kind, props=None):
        """Adds (or replaces) a codegraph node."""
        return self.mem("mem.graph.add_node", node=node, kind=kind, props=props or {})

    def graph_add_edge(self, frm, to, kind, props=None):
        """Adds (or replaces) a typed edge ``frm -> to``; both nodes must exist."""
        return self.mem("mem.graph.add_edge", **{"from": frm, "to": to, "kind": kind, "props": props or {}})

    def graph_neighbors(self, node, depth=1, kind=None, owner=None):
        """The nodes within ``depth`` hops (edges followed both ways):
        ``{"nodes": [{id, kind, props, depth}], "edges": [{from, to, kind, props}], ...}``."""
        return self.mem("mem.graph.neighbors", node=node, depth=depth, kind=kind, owner=owner)

    def graph_remove_node(self, node):
        """Removes a node and its edges; returns whether it was there."""
        return self.mem("mem.graph.remove_node", node=node)["deleted"]

    # --- the event bus (docs/bus.md) -----------------------------------------------------

    def publish(self, subject, data, durable=False):
        """Publishes ``data`` (anything JSON can encode, at most 32 KiB encoded) on
        ``subject``. With ``durable=True`` the message goes to the log; returns its sequence
        number once it is committed (None for a live message). Raises Denied (the token's
        ``bus.publish``), InvalidRequest, MessageTooLarge."""
        n = len(json.dumps(data).encode())
        if n > MAX_DATA:
            raise MessageTooLarge(f"data is {n} bytes encoded; the limit is {MAX_DATA}", "msg_too_large")
        fields = {"subject": subject, "data": data}
        if durable:
            fields["durable"] = True
        return (self.request("bus.publish", **fields).get("data") or {}).get("seq")

    def subscribe(self, pattern, durable=None, from_seq=None, since_ms=None, queue=None):
        """Subscribes to a pattern (``*`` one token, ``>`` the rest); returns a
        ``Subscription`` (an int, the subscription id, that can also iterate its messages).
        ``durable``: a consumer name whose acked cursor aitherd keeps (resumes after the last
        ack); ``from_seq``/``since_ms``: replay the log first; ``queue``: capacity."""
        opts = {"pattern": pattern}
        for k, v in (("durable", durable), ("from_seq", from_seq), ("since_ms", since_ms), ("queue", queue)):
            if v is not None:
                opts[k] = v
        with self._lock:
            sid = self._call("bus.subscribe", opts)["data"]["sub"]
            self._subs[sid] = {"opts": opts, "server": sid, "last_seq": None}
            self._server_sub[sid] = sid
            self._after_reset()
        return Subscription(sid, self, pattern, durable)

    def unsubscribe(self, sub):
        """Ends a subscription (its id or ``Subscription``); its queued messages are dropped."""
        with self._lock:
            s = self._subs.pop(int(sub), None)
            if s is None:
                raise NotFound(f"no subscription {sub}", "not_found")
            self._server_sub.pop(s["server"], None)
            self._ready = collections.deque(m for m in self._ready if m["sub"] != int(sub))
            self._call("bus.unsubscribe", {"sub": s["server"]})

    def ack(self, msg, durable=None):
        """Acks a message of a durable subscription (a message dict), or a sequence number
        for the consumer named ``durable``: aitherd resumes that consumer after it."""
        if isinstance(msg, dict):
            seq = msg["seq"]
            if durable is None:
                s = self._subs.get(msg.get("sub"))
                durable = s and s["opts"].get("durable")
        else:
            seq = msg
        if not durable:
            raise InvalidRequest("ack needs a durable consumer (subscribe(..., durable=NAME))", "invalid")
        self.request("bus.ack", durable=durable, seq=seq)

    def next_message(self, timeout=None, sub=None):
        """The next bus message as a dict (``subject``, ``data``, ``seq``, ``sub``, ``ts_ms``,
        ``publisher``, ``dropped``: how many this subscription lost to overflow just before
        it), or None after ``timeout`` seconds (None: wait for ever). With ``sub``, only that
        subscription's messages; the others stay queued for their readers.

        Waits without holding the channel, so a heartbeat thread keeps beating meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        want = None if sub is None else int(sub)
        while True:
            with self._lock:
                m = self._pop_ready(want)
                if m is not None:
                    return m
                # Read whatever has arrived, without blocking: only holders of the lock read.
                while select.select([self._sock], [], [], 0)[0]:
                    frame = self._read_frame()
                    if "push" in frame:
                        self._pushes.append(frame)
                    m = self._pop_ready(want)
                    if m is not None:
                        return m
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            # Wait for data with the lock released; another thread may read it first, and
            # then the loop finds its pushes queued.
            select.select([self._sock], [], [], left)

    def messages(self, timeout=None, sub=None):
        """Iterates over bus messages as they come; stops after ``timeout`` seconds without
        one (None: never). ``sub`` as for next_message."""
        while True:
            m = self.next_message(timeout=timeout, sub=sub)
            if m is None:
                return
            yield m

    # --- requests ------------------------------------------------------------------------

    def request(self, op, **fields):
        """Sends ``{"id", "op", **fields}``; returns the reply dict (``ok`` true, data in
        ``data``). Raises an AitherError subclass when aitherd refuses."""
        if "id" in fields:
            raise InvalidRequest('request field "id" is set by the SDK', "invalid")
        with self._lock:
            reply = self._call(op, fields)
            self._after_reset()
        return reply

    def close(self):
        """Closes the channel: aitherd sees the agent hang up (it cannot reconnect)."""
        self._sock.close()

    def _call(self, op, fields):
        """One request and its reply; the lock is held. Pushes read meanwhile are queued."""
        if self._broken:
            raise ChannelError("the channel is unusable after an earlier failure")
        size = len(json.dumps({"id": 1 << 52, "op": op, **fields}).encode())
        if size > MAX_FRAME:
            raise InvalidRequest(f"request of {size} bytes exceeds the {MAX_FRAME}-byte limit", "invalid")

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
        except OSError as e:
            self._broken = True
            raise ChannelError(f"the aitherd channel failed: {e}") from None
        except AitherError as e:
            # A bad JSON payload leaves the framing intact; anything else may not.
            self._broken = e.code != "bad_reply"
            raise
        if reply.get("ok") is True:
            return reply
        raise _error(err.get("code", "bad_reply"), err.get("message", "malformed reply"))

    def _read_frame(self):
        (n,) = struct.unpack(">I", self._recv(4))
        if not 1 <= n <= MAX_FRAME:
            self._broken = True
            raise ChannelError(f"aitherd sent a frame of {n} bytes")
        try:
            reply = json.loads(self._recv(n))
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise ChannelError("aitherd sent a reply that is not a JSON object", "bad_reply")
        return reply

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                self._broken = True
                raise ChannelError("aitherd closed the channel")
            buf += chunk
        return buf

    def _pop_ready(self, want):
        """The first message for ``want`` (None: any), taking queued pushes in order; the lock
        is held."""
        for i, m in enumerate(self._ready):
            if want is None or m["sub"] == want:
                del self._ready[i]
                return m
        while self._pushes:
            m = self._take(self._pushes.popleft())
            if m is None:
                continue
            if want is None or m["sub"] == want:
                return m
            self._ready.append(m)
        return None

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
            # Messages before the reset belong to the old subscriptions: take them first.
            while self._pushes and self._pushes[0].get("push") != "bus.reset":
                m = self._take(self._pushes.popleft())
                if m is not None:
                    self._ready.append(m)
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


class Subscription(int):
    """A bus subscription: the int id ``Channel.subscribe`` returned (messages carry it in
    ``sub``), with its messages, ack and unsubscribe at hand::

        jobs = ch.subscribe("jobs.>", durable="worker")
        for msg in jobs:                     # waits for ever; jobs.messages(timeout=5) stops
            handle(msg["data"])
            jobs.ack(msg)
    """

    def __new__(cls, sid, channel, pattern, durable=None):
        self = super().__new__(cls, sid)
        self.channel, self.pattern, self.durable = channel, pattern, durable
        return self

    @property
    def id(self):
        """The subscription id (as in each message's ``sub``)."""
        return int(self)

    def next(self, timeout=None):
        """This subscription's next message, or None after ``timeout`` seconds."""
        return self.channel.next_message(timeout=timeout, sub=self)

    def messages(self, timeout=None):
        """Iterates over this subscription's messages; stops after ``timeout`` seconds
        without one (None: never)."""
        return self.channel.messages(timeout=timeout, sub=self)

    def __iter__(self):
        return self.messages()

    def ack(self, msg):
        """Acks ``msg`` (a message dict or a sequence number) for this durable consumer."""
        self.channel.ack(msg, durable=self.durable)

    def unsubscribe(self):
        """Ends the subscription."""
        self.channel.unsubscribe(self)

    def __repr__(self):
        return f"Subscription({int(self)}, {self.pattern!r})"


class Heartbeat:
    """A daemon thread that sends a heartbeat at once and then every ``interval`` seconds
    until ``stop()`` (or the end of a ``with`` block), or until a heartbeat fails: then
    ``running`` is False and ``error`` holds the AitherError."""

    def __init__(self, channel, interval):
        if not interval > 0:
            raise InvalidRequest(f"heartbeat interval must be more than 0 seconds, not {interval!r}", "invalid")
        self.interval, self.error = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(channel,), name="aither-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, channel):
        while not self._stop.is_set():
            try:
                channel.heartbeat()
            except AitherError as e:
                self.error = e
                return
            self._stop.wait(self.interval)

    @property
    def running(self):
        """Whether the thread is still beating."""
        return self._thread.is_alive()

    def stop(self, timeout=None):
        """Stops the thread and waits for it (at most ``timeout`` seconds)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # threading.Event-like, as heartbeat_every returned an Event before.
    set = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _text(field, text):
    if len(text.encode()) > MAX_TEXT:
        raise InvalidRequest(f"{field} is {len(text.encode())} bytes; the limit is {MAX_TEXT}", "invalid")
    return text
