#!/usr/bin/env bash
# One hostile agent floods each daemon path for DURATION seconds (issue 17, item 6); aitherd's
# RSS and CPU are measured while it does (docs/performance.md, "Hostile floods").
#
# Paths, one agent each, one after the other, in a `strict` sandbox (its [bus] table replaced:
# publish agent.$self.>, subscribe log.>), raw frames on fd 3, pipelined 100 at a time:
#   deny     bus.publish on a subject its token does not grant (a new subject each time)
#   pain     pain reports (severity info)
#   replay   90 subscriptions replaying the log from seq 1 (queue 65536), then reading every
#            push as fast as it can; the log holds LOG_MSGS messages of 8 KiB
#   graph    mem.graph.neighbors depth 8 from a hub with 600 nodes and 5400 edges
#   search   mem.search of 8 words over 900 knowledge entries
# Per path: the agent's replies by code; aitherd's VmRSS before and the peak (sampled every
# 0.5 s); aitherd's CPU (utime+stime from /proc/PID/stat) over the flood, as a share of one
# CPU; audit bytes written; the agent's `daemon_usage` from `aitherctl inspect`.
#
# Usage (as root; after cargo build --release --workspace --bins):
#   scripts/bench/daemon-flood.sh
#   DURATION  seconds per path (default 60)
#   PATHS     which paths (default "deny pain replay graph search")
#   LOG_MSGS  messages in the bus log before the replay path (default 3000)
#   BIN_DIR   aitherd, aitherctl, aither-init (default <repo>/target/release; copied at start)
#   PYTHON    python3 for the operator's side (default python3)
# The daemon is private (state, socket and audit log in a temp dir under /var/tmp); it never
# touches /run/aither or a system aitherd. Exit status: 0 when every path ran, 1 on an error.
set -euo pipefail

DURATION="${DURATION:-60}"
PATHS="${PATHS:-deny pain replay graph search}"
LOG_MSGS="${LOG_MSGS:-3000}"
PYTHON="${PYTHON:-python3}"

die() { echo "daemon-flood.sh: $*" >&2; exit 1; }
say() { echo "daemon-flood.sh: $*" >&2; }

[[ "$DURATION" =~ ^[0-9]+$ ]] && (( DURATION > 0 )) || die "DURATION must be a positive integer"
(( EUID == 0 )) || die "must run as root (aitherd creates sandboxes and cgroups)"
command -v "$PYTHON" >/dev/null 2>&1 || die "python3 not found (set PYTHON)"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
BIN_DIR="${BIN_DIR:-$REPO/target/release}"
for b in aitherd aitherctl aither-init; do
    [[ -x "$BIN_DIR/$b" ]] || die "$b not found in $BIN_DIR (cargo build --release --workspace --bins, or set BIN_DIR)"
done

TMP="$(mktemp -d /var/tmp/aither-flood.XXXXXX)"
chmod 755 "$TMP"
mkdir -p "$TMP/bin" "$TMP/ws"
chmod 777 "$TMP/ws"
for b in aitherd aitherctl aither-init; do cp "$BIN_DIR/$b" "$TMP/bin/$b"; done
CTL="$TMP/bin/aitherctl"
export AITHER_STATE_DIR="$TMP/state"
export AITHER_SOCKET="$TMP/aitherd.sock"
export AITHER_POLICY_DIR="$REPO/policies"
export AITHER_INIT="$TMP/bin/aither-init"
export AITHER_AUDIT_LOG="$TMP/audit.jsonl"
DPID=""
NAMES=()

cleanup() {
    for n in "${NAMES[@]}"; do "$CTL" rm --force "$n" >/dev/null 2>&1 || true; done
    if [[ -n "$DPID" ]] && kill -0 "$DPID" 2>/dev/null; then
        kill -TERM "$DPID"
        wait "$DPID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

"$TMP/bin/aitherd" 2>"$TMP/aitherd.log" &
DPID=$!
for _ in $(seq 1 200); do [[ -S "$AITHER_SOCKET" ]] && break; sleep 0.1; done
[[ -S "$AITHER_SOCKET" ]] || die "aitherd did not come up: $(tail -5 "$TMP/aitherd.log")"

# strict, with its [bus] table replaced.
POLICY="$TMP/flood.toml"
"$PYTHON" - "$REPO/policies/strict.toml" "$POLICY" <<'EOF'
import sys
s = open(sys.argv[1]).read()
head, rest = s.split("\n[bus]", 1)
after = rest[rest.index("\n["):] if "\n[" in rest else ""
head = head.replace('name = "strict"', 'name = "flood"')
open(sys.argv[2], "w").write(head + '\n[bus]\npublish = ["agent.$self.>"]\nsubscribe = ["log.>"]\n' + after)
EOF

# The hostile side's helpers (raw frames on fd 3).
cat >"$TMP/ws/raw.py" <<'EOF'
import json, os, socket, struct, sys, time
s = socket.socket(fileno=3)
codes = {}
def send(objs):
    buf = b""
    for o in objs:
        b = json.dumps(o).encode()
        buf += struct.pack(">I", len(b)) + b
    s.sendall(buf)
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(max(n - len(b), 0))
        if not c:
            raise SystemExit("channel closed")
        b += c
    return b
def frame():
    return json.loads(exact(struct.unpack(">I", exact(4))[0]))
def replies(n):
    out = []
    while len(out) < n:
        r = frame()
        if "push" in r:
            codes["push"] = codes.get("push", 0) + 1
            continue
        out.append(r)
    return out
def count(r):
    c = "ok" if r.get("ok") else r["error"]["code"]
    codes[c] = codes.get(c, 0) + 1
def save(name):
    with open(name + ".tmp", "w") as f:
        json.dump(codes, f)
    os.rename(name + ".tmp", name)
def flood(req, name, batch=100):
    i = 0
    while True:
        send([dict(req, id=i + j) for j in range(batch)])
        for r in replies(batch):
            count(r)
        i += batch
        save(name)
EOF

agent_body() {
    case "$1" in
        deny) echo 'flood({"op": "bus.publish", "subject": "other.x", "data": "x"}, "deny.json")' ;;
        pain) echo 'flood({"op": "pain", "severity": "info", "reason": "flood"}, "pain.json")' ;;
        replay) cat <<'EOF'
for i in range(90):
    send([{"id": i, "op": "bus.subscribe", "pattern": "log.>", "from_seq": 1, "queue": 65536}])
    count(replies(1)[0])
save("replay.json")
while True:
    for _ in range(1000):
        r = frame()
        codes["push"] = codes.get("push", 0) + ("push" in r)
    save("replay.json")
EOF
        ;;
        graph) echo 'flood({"op": "mem.graph.neighbors", "node": "hub", "depth": 8}, "graph.json", batch=20)' ;;
        search) echo 'flood({"op": "mem.search", "query": "common words in document alpha beta gamma delta"}, "search.json", batch=20)' ;;
    esac
}

prepare() {
    local name="$1" path="$2"
    case "$path" in
        replay)
            say "filling the bus log: $LOG_MSGS messages of 8 KiB"
            "$PYTHON" - "$AITHER_SOCKET" "$LOG_MSGS" <<'EOF'
import json, socket, struct, sys, threading
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); n = int(sys.argv[2])
body = json.dumps({"op": "bus_pub", "subject": "log.x", "data": "y" * 8192, "durable": True}).encode()
t = threading.Thread(target=lambda: s.sendall((struct.pack(">I", len(body)) + body) * n)); t.start()
f = s.makefile("rb")
for i in range(n):
    r = json.loads(f.read(struct.unpack(">I", f.read(4))[0]))
    assert r["ok"], r
t.join()
EOF
            ;;
        graph)
            "$PYTHON" - "$TMP/hub.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    f.write(json.dumps({"type": "node", "id": "hub", "kind": "fn", "props": {}}) + "\n")
    for i in range(600):
        f.write(json.dumps({"type": "node", "id": "n%d" % i, "kind": "fn", "props": {}}) + "\n")
        for k in range(9):
            f.write(json.dumps({"type": "edge", "from": "hub", "to": "n%d" % i, "kind": "k%d" % k, "props": {}}) + "\n")
EOF
            "$CTL" mem import "$name" "$TMP/hub.jsonl" >/dev/null
            ;;
        search)
            "$PYTHON" - "$TMP/docs.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(900):
        f.write(json.dumps({"type": "kv", "tier": "knowledge", "key": "doc%d" % i,
                            "value": "common words in document %d alpha beta gamma delta" % i}) + "\n")
EOF
            "$CTL" mem import "$name" "$TMP/docs.jsonl" >/dev/null
            ;;
    esac
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$DPID/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$DPID/stat"; }
audit_bytes() {
    local t=0 f
    for f in "$AITHER_AUDIT_LOG"*; do [[ -f "$f" ]] && t=$(( t + $(stat -c %s "$f") )); done
    echo "$t"
}
HZ="$(getconf CLK_TCK)"

printf '%-7s %9s %9s %10s %10s %9s %11s  %s\n' path ok refused rss0_KiB peak_KiB cpu_% audit_KiB replies >"$TMP/table"
for path in $PATHS; do
    name="flood-$path-$$"
    NAMES+=("$name")
    prepare "$name" "$path"
    { cat "$TMP/ws/raw.py"; agent_body "$path"; } >"$TMP/ws/$path.py"
    rm -f "$TMP/ws/$path.json"
    rss0="$(rss_kib)"; peak="$rss0"; audit0="$(audit_bytes)"
    (cd "$TMP/ws" && "$CTL" spawn --policy "$POLICY" "$name" -- python3 -u "$path.py" >/dev/null)
    c0="$(cpu_ticks)"
    end=$(( $(date +%s) + DURATION ))
    while (( $(date +%s) < end )); do
        r="$(rss_kib)"; (( r > peak )) && peak="$r"
        sleep 0.5
    done
    c1="$(cpu_ticks)"
    usage="$("$CTL" inspect "$name" | "$PYTHON" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["daemon_usage"]))')"
    "$CTL" rm --force "$name" >/dev/null
    replies="$(cat "$TMP/ws/$path.json" 2>/dev/null || echo '{}')"
    ok="$("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1]).get("ok", 0))' "$replies")"
    refused="$("$PYTHON" -c 'import json,sys; d=json.loads(sys.argv[1]); print(sum(v for k, v in d.items() if k not in ("ok", "push")))' "$replies")"
    cpu="$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" -v t="$DURATION" 'BEGIN {printf "%.1f", 100 * (b - a) / hz / t}')"
    audit=$(( ($(audit_bytes) - audit0) / 1024 ))
    printf '%-7s %9s %9s %10s %10s %9s %11s  %s\n' "$path" "$ok" "$refused" "$rss0" "$peak" "$cpu" "$audit" "$replies" >>"$TMP/table"
    echo "$path daemon_usage: $usage" >>"$TMP/usage"
    say "$path done: $replies"
done
cat "$TMP/table"
cat "$TMP/usage"
