#!/usr/bin/env bash
# aitherd under load, against the daemon issue's targets:
#   1. spawn throughput: N agents (`sleep 3600`, policy strict) spawned with C parallel clients;
#      agents/s = N / wall time from the first request to the last reply. Measured twice, on two
#      separate batches:
#        (a) "aitherctl": C parallel `aitherctl spawn` processes (xargs -P C), one process per
#            agent: what a user gets from the CLI, client process start-up included;
#        (b) "socket": one python3 process with C threads, each on its own connection, sending
#            spawn frames (4-byte big-endian length + JSON, src/daemon/proto.rs) back to back:
#            the daemon's own cost, without N process start-ups of aitherctl.
#      After each batch: how many of the N agents are `running` (must be all of them).
#   2. memory with N agents running (batch a, 5 s after the last spawn so that the first stats
#      samples have been taken): VmRSS of the aitherd pid; for information the VmRSS and PSS
#      summed over the N shims (`aither-init shim`, one per agent, children of aitherd), and
#      separately over the N sandbox pid 1s (forked from the shims, so also `aither-init shim`
#      in ps). PSS divides shared pages (e.g. the static binary's text) among the processes
#      that map them, so the PSS sum is what they cost together.
#   3. `aitherctl ps` latency with N agents: median and p95 over PS_RUNS runs (hyperfine -N, or a
#      date +%s%N loop without hyperfine); for information the same request over the socket from
#      python (connect + Ps + reply), without the aitherctl process. A reply is one frame of at
#      most 64 KiB (MAX_FRAME in src/daemon/proto.rs) and `ps` lists all agents in one reply (~1 KB
#      each): when N agents do not fit, `aitherctl ps` fails; that is recorded in the table, and
#      the latency is then measured after removing agents down to the count that fits. (Done after
#      step 4, which wants all N agents running.) Likewise `aitherctl events` (plain form, all
#      events in one reply) is tried once after the spawns: works or fails.
#   4. crash-to-running with zero backoff, N agents running beside it (events read with the
#      streaming `events` follow form, one event per frame): one agent that exits 1
#      after 50 ms, restart=always, backoff 0, burst limit raised to 100000 (spawned over the
#      socket: the CLI cannot raise the burst limit, and the default of 5 restarts in 10 minutes
#      would mark it failed), until RESTARTS restarts. Per restart:
#        daemon view:  ts_ms of the `exited` event -> ts_ms of the next `started` event (the
#                      daemon's path from noticing the end to a running sandbox; ms resolution);
#        outside view: the agent's last action (date +%s%N into the workspace just before
#                      `exit 1`) -> the next run's first action (same, first thing it does):
#                      sandbox teardown, shim exit, the daemon's restart path, a new shim, a new
#                      sandbox and sh start-up, all included.
#   5. cleanup: every agent rm --force'd, aitherd SIGTERM'd, temp dir removed; then checks that
#      no shim of this run is left (processes whose argv[0] is this run's copy of aither-init) and
#      no cgroup named with this run's prefix is left under /sys/fs/cgroup/*/aither/ (or
#      /sys/fs/cgroup/aither/ on a pure v2 host).
# The final table: metric, value, target, met.
#
# Usage (as root, from anywhere; after cargo build --release --workspace --bins):
#   scripts/bench/daemon.sh
#   N         agents per batch (default 200)
#   C         parallel clients (default 16)
#   RESTARTS  restarts measured in step 4 (default 60, at least 50)
#   PS_RUNS   `aitherctl ps` runs in step 3 (default 50)
#   BIN_DIR   directory with aitherd, aitherctl and aither-init (default <repo>/target/release;
#             with CARGO_TARGET_DIR set, $CARGO_TARGET_DIR/release). The binaries are copied to
#             the temp dir at start, so a concurrent rebuild cannot change them mid-run.
#   PYTHON    python3 interpreter (default python3; only the standard library is used)
#
# The daemon is private: own state dir, socket and lock in a temp dir under /var/tmp (on disk,
# like /var/lib/aither: SQLite's WAL writes are part of what a spawn costs), policies from
# <repo>/policies, default stats interval (2 s). It never touches /run/aither or a system aitherd.
# Exit status: 0 when the run completed (targets met or not: see the table), 1 on any error.
set -euo pipefail

N="${N:-200}"
C="${C:-16}"
RESTARTS="${RESTARTS:-60}"
PS_RUNS="${PS_RUNS:-50}"
PYTHON="${PYTHON:-python3}"
SETTLE_S=5          # after the last spawn, before memory is read
UP_TIMEOUT_S=20     # aitherd must answer a ping within this
RUNNING_TIMEOUT_S=30

# targets (issue 4)
T_SPAWN=100         # agents/s, at least
T_RSS_MIB=40        # aitherd VmRSS with N agents, at most
T_CRASH_MS=20       # crash-to-running median, at most

die() { echo "daemon.sh: $*" >&2; exit 1; }
say() { echo "daemon.sh: $*" >&2; }

for v in N C RESTARTS PS_RUNS; do
    [[ "${!v}" =~ ^[0-9]+$ ]] && (( ${!v} > 0 )) || die "$v must be a positive integer (got '${!v}')"
done
(( RESTARTS >= 50 )) || die "RESTARTS must be >= 50 (got $RESTARTS)"
(( EUID == 0 )) || die "must run as root (aitherd creates sandboxes and cgroups)"
command -v "$PYTHON" >/dev/null 2>&1 || die "python3 not found (set PYTHON)"
command -v xargs >/dev/null 2>&1 || die "xargs not found"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
if [[ -z "${BIN_DIR:-}" ]]; then
    if [[ -n "${CARGO_TARGET_DIR:-}" && -x "$CARGO_TARGET_DIR/release/aitherd" ]]; then
        BIN_DIR="$CARGO_TARGET_DIR/release"
    else
        BIN_DIR="$REPO/target/release"
    fi
fi
[[ "$BIN_DIR" == /* ]] || BIN_DIR="$PWD/$BIN_DIR"
for b in aitherd aitherctl aither-init; do
    [[ -x "$BIN_DIR/$b" ]] || die "$b not found in $BIN_DIR (run: cargo build --release --workspace --bins, or set BIN_DIR)"
done
[[ -d "$REPO/policies" ]] || die "no policies directory at $REPO/policies"

# --- state and cleanup -----------------------------------------------------------------------
TMP="$(mktemp -d /var/tmp/aither-daemon-bench.XXXXXX)"
chmod 755 "$TMP"
PREFIX="abench$$"           # every agent's name starts with "$PREFIX-"; cgroups are <name>-<pid>
mkdir -p "$TMP/bin" "$TMP/ws"
for b in aitherd aitherctl aither-init; do cp "$BIN_DIR/$b" "$TMP/bin/$b"; done
INIT="$TMP/bin/aither-init"
CTL="$TMP/bin/aitherctl"
export AITHER_STATE_DIR="$TMP/state"
export AITHER_SOCKET="$TMP/aitherd.sock"
export AITHER_POLICY_DIR="$REPO/policies"
export AITHER_INIT="$INIT"
DPID=""
TORN_DOWN=0

# Processes whose argv[0] is this run's aither-init (shims, and anything they left behind).
our_shims() {
    local p a0
    for p in /proc/[0-9]*; do
        a0=""
        IFS= read -r -d '' a0 <"$p/cmdline" 2>/dev/null || true
        [[ "$a0" == "$INIT" ]] && echo "${p#/proc/}"
    done
    return 0
}

# cgroup directories of this run (v1: <root>/<controller>/aither/<id>, v2: <root>/aither/<id>).
our_cgroups() {
    find /sys/fs/cgroup -mindepth 2 -maxdepth 3 -type d -path '*/aither/*' -name "$PREFIX-*" 2>/dev/null | sort
    return 0
}

daemon_alive() { [[ -n "$DPID" ]] && kill -0 "$DPID" 2>/dev/null; }

# rm --force, with aitherctl (C in parallel), every agent this run asked for ($TMP/names-all:
# written before each spawn, so it also holds agents whose spawn failed; their "not found" is
# expected). Then every one of them must be gone (inspect: not_found).
rm_all() {
    [[ -s "$TMP/names-all" ]] || return 0
    timeout 180 xargs -P "$C" -n 1 "$CTL" rm --force <"$TMP/names-all" >/dev/null 2>>"$TMP/rm.err" || true
    local left
    left="$("$PYTHON" "$TMP/client.py" count "$TMP/names-all" absent 0)" || return 1
    [[ "$(jget "$left" 'd["count"] == d["total"]')" == True ]] || { echo "still there: $left" >&2; return 1; }
}

# Removes agents, stops the daemon, and records what is left; used by the normal path (whose
# results go into the table) and, when that did not run, by the exit trap.
LEFT_SHIMS=""; LEFT_CGROUPS=""; TEARDOWN_ERR=""
teardown() {
    TORN_DOWN=1
    if daemon_alive; then
        rm_all || TEARDOWN_ERR+="rm --force of the agents failed; "
        kill -TERM "$DPID" 2>/dev/null
        local i
        for ((i = 0; i < 100; i++)); do daemon_alive || break; sleep 0.1; done
        if daemon_alive; then
            TEARDOWN_ERR+="aitherd did not exit within 10 s of SIGTERM (killed); "
            kill -KILL "$DPID" 2>/dev/null
        fi
        wait "$DPID" 2>/dev/null || true
    fi
    # Shims exit with their sandboxes; give the last ones a moment.
    local t
    for ((t = 0; t < 50; t++)); do [[ -z "$(our_shims)" ]] && break; sleep 0.1; done
    LEFT_SHIMS="$(our_shims | tr '\n' ' ')"
    LEFT_CGROUPS="$(our_cgroups)"
    if [[ -n "$LEFT_SHIMS" ]]; then
        # Only processes of this run (argv[0] is our private copy of aither-init), by pid.
        local p
        for p in $LEFT_SHIMS; do kill -KILL "$p" 2>/dev/null; done
        sleep 0.5
    fi
    if [[ -n "$LEFT_CGROUPS" ]]; then
        local d
        while read -r d; do
            [[ -w "$d/cgroup.kill" ]] && echo 1 >"$d/cgroup.kill" 2>/dev/null
            xargs -r kill -KILL <"$d/cgroup.procs" 2>/dev/null
        done <<<"$LEFT_CGROUPS"
        sleep 0.5
        # Deepest first (a sandbox may have made sub-cgroups in its namespace).
        find /sys/fs/cgroup -mindepth 2 -maxdepth 6 -type d -path "*/aither/$PREFIX-*" 2>/dev/null |
            awk '{print length($0), $0}' | sort -rn | cut -d' ' -f2- |
            while read -r d; do rmdir "$d" 2>/dev/null; done
    fi
    [[ -n "${TMP:-}" && -d "$TMP" ]] && rm -rf --one-file-system "$TMP"
    return 0
}

on_exit() {
    local rc=$?
    set +e
    if (( ! TORN_DOWN )); then
        if [[ -f "$TMP/aitherd.log" && $rc -ne 0 ]]; then
            echo "--- aitherd log (last 30 lines) ---" >&2
            tail -n 30 "$TMP/aitherd.log" >&2
        fi
        teardown
        [[ -n "$TEARDOWN_ERR" ]] && echo "daemon.sh: WARNING: $TEARDOWN_ERR" >&2
        [[ -n "$LEFT_SHIMS" ]] && echo "daemon.sh: WARNING: $(wc -w <<<"$LEFT_SHIMS") processes of this run's aither-init were left (killed)" >&2
        [[ -n "$LEFT_CGROUPS" ]] && echo "daemon.sh: WARNING: $(wc -l <<<"$LEFT_CGROUPS") cgroup directories of this run were left (removed), e.g. $(head -n1 <<<"$LEFT_CGROUPS")" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# --- the socket client -------------------------------------------------------------------------
cat >"$TMP/client.py" <<'EOF'
"""Speaks aitherd's control protocol: frames of a 4-byte big-endian length + one JSON object;
one reply frame per request (src/daemon/proto.rs). Prints JSON results on stdout."""
import json, math, os, socket, struct, sys, threading, time

SOCK = os.environ["AITHER_SOCKET"]


class Conn:
    def __init__(self, timeout=120.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(SOCK)

    def _read(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("aitherd closed the connection")
            buf += chunk
        return bytes(buf)

    def send(self, req):
        body = json.dumps(req).encode()
        self.s.sendall(struct.pack(">I", len(body)) + body)

    def recv(self):
        (n,) = struct.unpack(">I", self._read(4))
        return json.loads(self._read(n))

    def call(self, req):
        self.send(req)
        return self.recv()

    def close(self):
        self.s.close()


def call(req):
    c = Conn()
    try:
        return c.call(req)
    finally:
        c.close()


def data(reply):
    if not reply.get("ok"):
        e = reply.get("error") or {}
        raise RuntimeError(f"aitherd: {e.get('message')} ({e.get('code')})")
    return reply.get("data")


def stats(xs):
    """median (mean of the two middle values) and p95 (nearest rank)."""
    v = sorted(xs)
    n = len(v)
    if n == 0:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None}
    med = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return {"n": n, "median": med, "p95": v[math.ceil(0.95 * n) - 1], "min": v[0], "max": v[-1]}


def spawn_req(name, argv, cwd, supervision=None):
    r = {"op": "spawn", "name": name, "policy": "strict", "argv": argv, "cwd": cwd,
         "env": [], "pass_env": []}
    if supervision is not None:
        r["supervision"] = supervision
    return r


def cmd_ping():
    d = data(call({"op": "ping"}))
    print(json.dumps(d))


def cmd_spawn(prefix, n, c, cwd):
    """n agents named <prefix>NNNN over c threads, one connection each; wall time from the
    first request to the last reply."""
    n, c = int(n), int(c)
    names = [f"{prefix}{i:04d}" for i in range(n)]
    lock = threading.Lock()
    errors, ok = [], [0]
    it = iter(names)
    conns = [Conn() for _ in range(min(c, n))]  # connected before the clock starts
    barrier = threading.Barrier(len(conns) + 1)

    def worker(conn):
        barrier.wait()
        while True:
            with lock:
                name = next(it, None)
            if name is None:
                return
            try:
                data(conn.call(spawn_req(name, ["sleep", "3600"], cwd)))
                with lock:
                    ok[0] += 1
            except Exception as e:  # noqa: BLE001 - reported, counted
                with lock:
                    errors.append(f"{name}: {e}")

    ts = [threading.Thread(target=worker, args=(cn,)) for cn in conns]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.monotonic_ns()
    for t in ts:
        t.join()
    t1 = time.monotonic_ns()
    for cn in conns:
        cn.close()
    print(json.dumps({"elapsed_ns": t1 - t0, "ok": ok[0], "errors": errors[:5], "n_errors": len(errors)}))


def read_names(path):
    with open(path) as f:
        return f.read().split()


def cmd_count(names_file, state, timeout_s):
    """Waits (up to timeout_s) until every agent named in names_file is in state (asked with
    `inspect`, one per agent: `ps` may not fit in a frame); prints the count, the states seen,
    and the size a `ps` reply listing them would have (compact JSON, as serde writes it)."""
    names, deadline = read_names(names_file), time.monotonic() + float(timeout_s)
    c = Conn()
    try:
        while True:
            infos, seen = [], {}
            for n in names:
                r = c.call({"op": "inspect", "name": n})
                st = r["data"]["state"] if r.get("ok") else "absent"
                seen[st] = seen.get(st, 0) + 1
                if r.get("ok"):
                    infos.append(r["data"])
            hit = seen.get(state, 0)
            if hit >= len(names) or time.monotonic() > deadline:
                sizes = [len(json.dumps(i, separators=(",", ":"))) for i in infos]
                ps_bytes = len('{"ok":true,"data":[]}') + sum(sizes) + max(len(sizes) - 1, 0)
                print(json.dumps({"count": hit, "total": len(names), "states": seen,
                                  "ps_reply_bytes": ps_bytes,
                                  "info_bytes": (sum(sizes) / len(sizes)) if sizes else 0}))
                return
            time.sleep(0.2)
    finally:
        c.close()


def cmd_pslat(runs):
    """Connect + Ps + reply, fresh connection per run (as aitherctl does)."""
    xs = []
    for i in range(int(runs) + 3):
        t0 = time.monotonic_ns()
        c = Conn()
        d = data(c.call({"op": "ps"}))
        c.close()
        t1 = time.monotonic_ns()
        if i >= 3:
            xs.append((t1 - t0) / 1e6)
    st = stats(xs)
    st["agents"] = len(d)
    print(json.dumps(st))


def cmd_crash(name, cwd, restarts, timeout_s):
    """One crash-looping agent; per restart the exited->started gap in the event stream, and
    the agent's own last-action -> next-first-action gap from timestamps it writes."""
    restarts, deadline = int(restarts), time.monotonic() + float(timeout_s)
    script = "date +%s%N >>starts; sleep 0.05; date +%s%N >>exits; exit 1"
    sup = {"restart": "always", "backoff_ms": 0, "burst_limit": 100000}
    # The follow form streams one event per frame (the plain form answers with all events in
    # one frame, which outgrows the 64 KiB frame limit after ~50 restarts).
    ev = Conn(timeout=2.0)
    ev.send({"op": "events", "follow": True, "since_ms": int(time.time() * 1000) - 1000,
             "name": name})
    data(call(spawn_req(name, ["sh", "-c", script], cwd, sup)))
    evs, started, r = [], 0, None
    while True:
        if r is not None:
            d = data(r)
            if d.get("name") == name:
                evs.append(d)
                started += d["kind"] == "started"
                if d["kind"] == "state" and d["data"].get("to") in ("failed", "exited", "stopped"):
                    raise SystemExit(f"crash: the agent went {d['data']['to']}; "
                                     f"last events: {[e['kind'] for e in evs[-8:]]}")
        if started >= restarts + 1:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"crash: only {max(started - 1, 0)} restarts within {timeout_s} s; "
                             f"last events: {[e['kind'] for e in evs[-8:]]}")
        try:
            r = ev.recv()
        except socket.timeout:
            r = None
    ev.close()
    data(call({"op": "rm", "name": name, "force": True}))
    daemon_ms, pending = [], None
    for e in evs:
        if e["kind"] == "exited":
            pending = e["ts_ms"]
        elif e["kind"] == "started" and pending is not None:
            daemon_ms.append(e["ts_ms"] - pending)
            pending = None
    daemon_ms = daemon_ms[:restarts]

    def read(f):
        try:
            with open(os.path.join(cwd, f)) as fh:
                return [int(x) for x in fh.read().split()]
        except FileNotFoundError:
            return []

    starts, exits = read("starts"), read("exits")
    outside = [(starts[i + 1] - exits[i]) / 1e6 for i in range(min(len(exits), len(starts) - 1))]
    outside = outside[:restarts]
    print(json.dumps({"daemon": stats(daemon_ms), "outside": stats(outside)}))


def cmd_stats(path):
    with open(path) as f:
        print(json.dumps(stats([float(x) for x in f.read().split()])))


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def cmd_mem(dpid, init):
    """aitherd's VmRSS; VmRSS and PSS summed over the shims (children of aitherd running this
    run's aither-init) and, separately, over the sandboxes' pid 1s (children of the shims,
    forked from them, so with the same argv)."""
    out = {"daemon_rss_kib": rss_kib(dpid), "daemon_hwm_kib": rss_kib(dpid, "VmHWM"),
           "daemon_threads": rss_kib(dpid, "Threads")}
    for k in ("shim", "pid1"):
        out.update({k + "s": 0, k + "_rss_kib": 0, k + "_pss_kib": 0})
    procs = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if argv[0].decode(errors="replace") != init:
                continue
            procs[p] = rss_kib(p, "PPid")
        except (FileNotFoundError, ProcessLookupError):
            continue
    for p, ppid in procs.items():
        k = "shim" if str(ppid) == str(dpid) else "pid1" if str(ppid) in procs else None
        if k is None:
            continue
        try:
            out[k + "_rss_kib"] += rss_kib(p)
            out[k + "_pss_kib"] += pss_kib(p)
            out[k + "s"] += 1
        except (FileNotFoundError, ProcessLookupError):
            continue
    print(json.dumps(out))


if __name__ == "__main__":
    cmds = {"ping": cmd_ping, "spawn": cmd_spawn, "count": cmd_count,
            "pslat": cmd_pslat, "crash": cmd_crash, "mem": cmd_mem, "stats": cmd_stats}
    try:
        cmds[sys.argv[1]](*sys.argv[2:])
    except (OSError, RuntimeError, ConnectionError) as e:
        print(f"client.py {sys.argv[1]}: {e}", file=sys.stderr)
        sys.exit(1)
EOF
client() { "$PYTHON" "$TMP/client.py" "$@"; }
# jq-free field access: jget JSON EXPR (EXPR in python, on the parsed object "d")
jget() { "$PYTHON" -c 'import json,sys; d=json.loads(sys.argv[1]); v=eval(sys.argv[2]); print(v)' "$1" "$2"; }

# --- start the daemon --------------------------------------------------------------------------
HOST="$(uname -r), $(nproc) CPUs, cgroup $(
    if [[ "$(stat -f -c %T /sys/fs/cgroup)" == cgroup2fs ]]; then echo v2
    elif [[ -d /sys/fs/cgroup/unified ]]; then echo 'v1/v2 hybrid'
    else echo v1; fi)"
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
say "host $HOST; load average $LOAD_BEFORE"
say "binaries from $BIN_DIR (copied to $TMP/bin; aitherd sha256 $(sha256sum "$TMP/bin/aitherd" | cut -c1-12), built $(date -u -r "$BIN_DIR/aitherd" +%FT%TZ))"
say "N=$N C=$C RESTARTS=$RESTARTS PS_RUNS=$PS_RUNS; agent names $PREFIX-*"

"$TMP/bin/aitherd" </dev/null >/dev/null 2>"$TMP/aitherd.log" &
DPID=$!
up=0
for ((i = 0; i < UP_TIMEOUT_S * 10; i++)); do
    daemon_alive || { cat "$TMP/aitherd.log" >&2; die "aitherd (pid $DPID) exited during start-up (its log is above)"; }
    if client ping >/dev/null 2>&1; then up=1; break; fi
    sleep 0.1
done
(( up )) || { cat "$TMP/aitherd.log" >&2; die "aitherd (pid $DPID) did not answer a ping on $AITHER_SOCKET within ${UP_TIMEOUT_S}s (its log is above)"; }
IDLE_MEM="$(client mem "$DPID" "$INIT")"
say "aitherd up (pid $DPID), idle VmRSS $(jget "$IDLE_MEM" 'd["daemon_rss_kib"]') KiB"

# Sanity: one agent through the CLI, and removed again.
echo "$PREFIX-check" >>"$TMP/names-all"
(cd "$TMP/ws" && "$CTL" spawn --policy strict "$PREFIX-check" -- sleep 3600 >/dev/null 2>"$TMP/check.err") ||
    { cat "$TMP/check.err" >&2; die "sanity spawn with aitherctl failed"; }
"$CTL" rm --force "$PREFIX-check" >/dev/null 2>>"$TMP/check.err" || { cat "$TMP/check.err" >&2; die "sanity rm failed"; }

ns_to_rate() { awk -v n="$1" -v ns="$2" 'BEGIN {printf "%.1f", n / (ns / 1e9)}'; }

# --- 1a. spawn throughput, aitherctl clients ------------------------------------------------------
say "1a. spawning $N agents with $C parallel 'aitherctl spawn' ..."
seq -f "$PREFIX-c%04g" 0 $((N - 1)) >"$TMP/names-a"
cat "$TMP/names-a" >>"$TMP/names-all"
cd "$TMP/ws"
t0=$(date +%s%N)
set +e
timeout 300 xargs -P "$C" -I{} "$CTL" spawn --policy strict {} -- sleep 3600 \
    <"$TMP/names-a" >"$TMP/spawn-a.out" 2>"$TMP/spawn-a.err"
xrc=$?
set -e
t1=$(date +%s%N)
cd "$REPO"
A_NS=$((t1 - t0))
A_RATE=$(ns_to_rate "$N" "$A_NS")
if (( xrc != 0 )); then
    say "WARNING: some aitherctl spawn failed (xargs rc $xrc); first errors:"
    head -n 5 "$TMP/spawn-a.err" >&2
fi
A_RUN="$(client count "$TMP/names-a" running "$RUNNING_TIMEOUT_S")"
A_RUNNING=$(jget "$A_RUN" 'd["count"]')
say "    $N in $(awk -v ns=$A_NS 'BEGIN {printf "%.2f", ns / 1e9}') s = $A_RATE agents/s; running: $A_RUNNING/$N $(jget "$A_RUN" 'd["states"]')"
daemon_alive || die "aitherd died during the spawns"

# `aitherctl events` (the plain form) also answers in one frame; informational check.
EV_FAIL=""
"$CTL" events >/dev/null 2>"$TMP/events.err" || EV_FAIL="$(head -c 200 "$TMP/events.err" | tr '\n' ' ')"
[[ -z "$EV_FAIL" ]] || say "    aitherctl events (all events, after $N spawns) FAILED: $EV_FAIL"

# --- 2. memory with N agents ---------------------------------------------------------------------
sleep "$SETTLE_S"
MEM="$(client mem "$DPID" "$INIT")"
D_RSS_KIB=$(jget "$MEM" 'd["daemon_rss_kib"]')
say "2.  aitherd VmRSS $D_RSS_KIB KiB (HWM $(jget "$MEM" 'd["daemon_hwm_kib"]'), $(jget "$MEM" 'd["daemon_threads"]') threads);" \
    "$(jget "$MEM" 'd["shims"]') shims: VmRSS sum $(jget "$MEM" 'd["shim_rss_kib"]') KiB, PSS sum $(jget "$MEM" 'd["shim_pss_kib"]') KiB;" \
    "$(jget "$MEM" 'd["pid1s"]') sandbox pid 1s: VmRSS sum $(jget "$MEM" 'd["pid1_rss_kib"]') KiB, PSS sum $(jget "$MEM" 'd["pid1_pss_kib"]') KiB"

fmt2() { awk -v x="$1" 'BEGIN {printf "%.2f", x}'; }

# --- 4. crash-to-running (before 3: 3 may have to remove agents) -------------------------------
say "4.  crash loop: $RESTARTS restarts with backoff 0 ($A_RUNNING other agents running) ..."
mkdir "$TMP/ws-crash"
echo "$PREFIX-crash" >>"$TMP/names-all"
CRASH="$(client crash "$PREFIX-crash" "$TMP/ws-crash" "$RESTARTS" $((RESTARTS + 60)))" ||
    die "crash-loop measurement failed"
CR_MED=$(fmt2 "$(jget "$CRASH" 'd["daemon"]["median"]')"); CR_P95=$(fmt2 "$(jget "$CRASH" 'd["daemon"]["p95"]')")
CR_N=$(jget "$CRASH" 'd["daemon"]["n"]')
CO_MED=$(fmt2 "$(jget "$CRASH" 'd["outside"]["median"]')"); CO_P95=$(fmt2 "$(jget "$CRASH" 'd["outside"]["p95"]')")
CO_N=$(jget "$CRASH" 'd["outside"]["n"]')
say "    exited->started (events, n=$CR_N): median $CR_MED ms, p95 $CR_P95 ms;" \
    "agent exit->next agent start (outside, n=$CO_N): median $CO_MED ms, p95 $CO_P95 ms"

# --- 3. ps latency -----------------------------------------------------------------------------
# A reply is one frame of at most 64 KiB (src/daemon/proto.rs MAX_FRAME), and `ps` lists every
# agent in one reply. When the list of N agents does not fit, aitherd drops the connection and
# aitherctl ps fails: that is recorded, and the latency is then measured with as many agents as
# fit (agents of batch a are removed down to that count).
PS_AGENTS=$N
PS_BYTES=$(jget "$A_RUN" 'd["ps_reply_bytes"]')
PS_FAIL=""
say "3.  aitherctl ps with $N agents (reply would be ~$PS_BYTES bytes; frame limit 65536) ..."
if ! "$CTL" ps >/dev/null 2>"$TMP/ps.err"; then
    PS_FAIL="$(head -c 200 "$TMP/ps.err" | tr '\n' ' ')"
    say "    aitherctl ps FAILED with $N agents: $PS_FAIL"
    INFO_B=$(jget "$A_RUN" 'd["info_bytes"]')
    PS_AGENTS=$(awk -v b="$INFO_B" 'BEGIN {m = int((65536 - 64) / (b + 1) * 0.95); print (m < 1) ? 1 : m}')
    (( PS_AGENTS < N )) || PS_AGENTS=$((N - 1))
    tail -n +$((PS_AGENTS + 1)) "$TMP/names-a" | timeout 180 xargs -P "$C" -n 1 "$CTL" rm --force >/dev/null 2>>"$TMP/rm.err" || true
    head -n "$PS_AGENTS" "$TMP/names-a" >"$TMP/names-a-ps"
    say "    removed batch-a agents down to $PS_AGENTS (~$INFO_B bytes per agent in the reply)"
    "$CTL" ps >/dev/null 2>"$TMP/ps.err" || die "aitherctl ps fails even with $PS_AGENTS agents: $(head -c 200 "$TMP/ps.err")"
fi
say "    aitherctl ps latency with $PS_AGENTS agents, $PS_RUNS runs ..."
if command -v hyperfine >/dev/null 2>&1; then
    hyperfine -N --style none --warmup 3 --runs "$PS_RUNS" --export-json "$TMP/ps.json" "$CTL ps" >/dev/null 2>&1 ||
        die "hyperfine of aitherctl ps failed"
    "$PYTHON" -c 'import json, sys; print(*(t * 1e3 for t in json.load(open(sys.argv[1]))["results"][0]["times"]))' \
        "$TMP/ps.json" >"$TMP/ps.ms"
    PS_TOOL=hyperfine
else
    for ((i = 0; i < 3; i++)); do "$CTL" ps >/dev/null; done
    : >"$TMP/ps.ms"
    for ((i = 0; i < PS_RUNS; i++)); do
        s=$(date +%s%N); "$CTL" ps >/dev/null; e=$(date +%s%N)
        awk -v ns=$((e - s)) 'BEGIN {print ns / 1e6}' >>"$TMP/ps.ms"
    done
    PS_TOOL="date loop"
fi
PS_STATS="$(client stats "$TMP/ps.ms")"
PS_SOCK="$(client pslat "$PS_RUNS")"
PS_MED=$(fmt2 "$(jget "$PS_STATS" 'd["median"]')"); PS_P95=$(fmt2 "$(jget "$PS_STATS" 'd["p95"]')")
PSS_MED=$(fmt2 "$(jget "$PS_SOCK" 'd["median"]')"); PSS_P95=$(fmt2 "$(jget "$PS_SOCK" 'd["p95"]')")
say "    aitherctl ps ($PS_TOOL): median $PS_MED ms, p95 $PS_P95 ms; socket Ps: median $PSS_MED ms, p95 $PSS_P95 ms ($(jget "$PS_SOCK" 'd["agents"]') agents listed)"

# --- remove batch a ----------------------------------------------------------------------------
say "    removing the remaining agents (aitherctl rm --force, $C parallel) ..."
t0=$(date +%s%N)
rm_all || { tail -n 5 "$TMP/rm.err" >&2; die "rm --force of the agents failed"; }
t1=$(date +%s%N)
RM_S=$(awk -v ns=$((t1 - t0)) 'BEGIN {printf "%.2f", ns / 1e9}')
say "    removed in $RM_S s"

# --- 1b. spawn throughput, one socket client ----------------------------------------------------
say "1b. spawning $N agents over the socket from one python3 process, $C connections ..."
seq -f "$PREFIX-s%04g" 0 $((N - 1)) >"$TMP/names-b"
cat "$TMP/names-b" >>"$TMP/names-all"
B="$(client spawn "$PREFIX-s" "$N" "$C" "$TMP/ws")" || die "socket spawn failed"
B_NS=$(jget "$B" 'd["elapsed_ns"]')
B_RATE=$(ns_to_rate "$N" "$B_NS")
(( $(jget "$B" 'd["n_errors"]') == 0 )) || say "WARNING: socket spawns failed: $(jget "$B" 'd["errors"]')"
B_RUN="$(client count "$TMP/names-b" running "$RUNNING_TIMEOUT_S")"
B_RUNNING=$(jget "$B_RUN" 'd["count"]')
say "    $N in $(awk -v ns=$B_NS 'BEGIN {printf "%.2f", ns / 1e9}') s = $B_RATE agents/s; running: $B_RUNNING/$N $(jget "$B_RUN" 'd["states"]')"
sleep "$SETTLE_S"
MEM_B="$(client mem "$DPID" "$INIT")"
say "    aitherd VmRSS after batch b: $(jget "$MEM_B" 'd["daemon_rss_kib"]') KiB (HWM $(jget "$MEM_B" 'd["daemon_hwm_kib"]'))"

# --- 5. cleanup ----------------------------------------------------------------------------------
say "5.  cleanup: rm --force, SIGTERM aitherd, remove $TMP ..."
AITHERD_LOG_TAIL="$(grep -ci 'error\|panic' "$TMP/aitherd.log" || true)"
teardown
[[ -z "$TEARDOWN_ERR" ]] || say "WARNING: $TEARDOWN_ERR"
CLEAN_SHIMS=yes; [[ -n "$LEFT_SHIMS" ]] && CLEAN_SHIMS="no (left: $LEFT_SHIMS, killed)"
CLEAN_CG=yes; [[ -n "$LEFT_CGROUPS" ]] && CLEAN_CG="no ($(echo "$LEFT_CGROUPS" | wc -l) left, removed)"

# --- summary -------------------------------------------------------------------------------------
yn() { awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN { ok = (op == ">=") ? (a >= b) : (a <= b); print ok ? "yes" : "no" }'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
row() { printf '| %-52s | %-22s | %-16s | %-4s |\n' "$@"; }

echo
echo "aitherd benchmark, N=$N, C=$C, $(date -u +%Y-%m-%dT%H:%MZ), $HOST, load average at start $LOAD_BEFORE"
echo
row metric value target met
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..54})" "$(printf -- '-%.0s' {1..24})" \
    "$(printf -- '-%.0s' {1..18})" "$(printf -- '-%.0s' {1..6})"
row "spawn throughput, $C parallel aitherctl spawn" "$A_RATE agents/s" ">= $T_SPAWN/s" "$(yn "$A_RATE" '>=' "$T_SPAWN")"
row "  agents running afterwards" "$A_RUNNING/$N" "all" "$( ((A_RUNNING == N)) && echo yes || echo no)"
row "spawn throughput, 1 socket client, $C connections" "$B_RATE agents/s" "(daemon alone)" "$(yn "$B_RATE" '>=' "$T_SPAWN")"
row "  agents running afterwards" "$B_RUNNING/$N" "all" "$( ((B_RUNNING == N)) && echo yes || echo no)"
row "aitherd VmRSS, $N agents running" "$(mib "$D_RSS_KIB") MiB" "<= $T_RSS_MIB MiB" "$(yn "$(mib "$D_RSS_KIB")" '<=' "$T_RSS_MIB")"
row "  $(jget "$MEM" 'd["shims"]') shims: VmRSS sum / PSS sum (info)" "$(mib "$(jget "$MEM" 'd["shim_rss_kib"]')") / $(mib "$(jget "$MEM" 'd["shim_pss_kib"]')") MiB" "-" "-"
row "  $(jget "$MEM" 'd["pid1s"]') sandbox pid 1s: VmRSS / PSS sum (info)" "$(mib "$(jget "$MEM" 'd["pid1_rss_kib"]')") / $(mib "$(jget "$MEM" 'd["pid1_pss_kib"]')") MiB" "-" "-"
if [[ -n "$PS_FAIL" ]]; then
    row "aitherctl ps, $N agents" "FAILS (reply > 64 KiB)" "works" "no"
fi
row "aitherctl events (plain form) after $N spawns" "$([[ -z $EV_FAIL ]] && echo works || echo 'FAILS (reply > 64 KiB)')" "works" "$([[ -z $EV_FAIL ]] && echo yes || echo no)"
row "aitherctl ps, $PS_AGENTS agents: median / p95" "$PS_MED / $PS_P95 ms" "-" "-"
row "  same request over the socket (info)" "$PSS_MED / $PSS_P95 ms" "-" "-"
row "crash-to-running, exited->started: median / p95" "$CR_MED / $CR_P95 ms" "median <= $T_CRASH_MS ms" "$(yn "$CR_MED" '<=' "$T_CRASH_MS")"
row "  agent exit -> next agent start (outside)" "$CO_MED / $CO_P95 ms" "-" "-"
row "cleanup: no shim of this run left" "$CLEAN_SHIMS" "none left" "$([[ $CLEAN_SHIMS == yes ]] && echo yes || echo no)"
row "cleanup: no cgroup $PREFIX-* left" "$CLEAN_CG" "none left" "$([[ $CLEAN_CG == yes ]] && echo yes || echo no)"
echo
echo "Spawn throughput: N / wall time from the first request to the last reply. crash-to-running:"
echo "n=$CR_N restarts, one agent (exit 1 after 50 ms, restart always, backoff 0) beside $N running agents;"
echo "event timestamps have 1 ms resolution. aitherd idle VmRSS: $(mib "$(jget "$IDLE_MEM" 'd["daemon_rss_kib"]') ") MiB;"
echo "after the second batch: $(mib "$(jget "$MEM_B" 'd["daemon_rss_kib"]')") MiB (HWM $(mib "$(jget "$MEM_B" 'd["daemon_hwm_kib"]')") MiB). Removing the remaining agents of batch a (rm --force) took $RM_S s."
echo "aitherd log lines with 'error' or 'panic': $AITHERD_LOG_TAIL."
[[ -z "$TEARDOWN_ERR$LEFT_SHIMS$LEFT_CGROUPS" ]] || exit 1
exit 0
