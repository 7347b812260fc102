#!/usr/bin/env bash
# A/B of `aitherctl run` through aitherd: two builds (A = before, B = after), each with its own
# private aitherd (own state directory, socket, audit log; the host's policies), and bwrap,
# interleaved in one run (the order of the three rotated each round). What a caller waits
# for: spawn of `aitherctl run --policy strict -- /bin/true` to its exit (stdin /dev/null,
# stdout /dev/null or, with PIPE=1, a pipe read to EOF, as `aitherctl run ... | cat`).
# The first runs of each daemon make the shape known (cold); the rest are served by its pool.
#
# Usage (as root, from the repository):
#   A=/dir/with/old/binaries B=/dir/with/new/binaries [ROUNDS=100] [GAP_MS=100] [PIPE=0] \
#       scripts/bench/run-ab.sh
#   A, B: directories holding aitherctl, aitherd and aither-init (copied to a temp dir first).
set -euo pipefail
ROUNDS="${ROUNDS:-100}"
GAP_MS="${GAP_MS:-100}"
PIPE="${PIPE:-0}"
die() { echo "run-ab.sh: $*" >&2; exit 1; }
(( EUID == 0 )) || die "must run as root"
[[ "$ROUNDS" =~ ^[0-9]+$ ]] && (( ROUNDS >= 20 )) || die "ROUNDS must be an integer >= 20"
for d in "${A:-}" "${B:-}"; do
    for b in aitherctl aitherd aither-init; do
        [[ -n "$d" && -x "$d/$b" ]] || die "A and B must be directories holding $b"
    done
done
command -v bwrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }
command -v python3 >/dev/null 2>&1 || die "python3 is needed"

TMP="$(mktemp -d /tmp/aither-run-ab.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf --one-file-system "$TMP"
}
trap cleanup EXIT

for side in A B; do
    src="${!side}"
    mkdir -p "$TMP/$side/bin" "$TMP/$side/workspace"
    cp "$src/aitherctl" "$src/aitherd" "$src/aither-init" "$TMP/$side/bin/"
    AITHER_SOCKET="$TMP/$side/aitherd.sock" AITHER_STATE_DIR="$TMP/$side/state" \
        AITHER_INIT="$TMP/$side/bin/aither-init" AITHER_AUDIT_LOG="$TMP/$side/audit.jsonl" \
        "$TMP/$side/bin/aitherd" </dev/null >/dev/null 2>"$TMP/$side/aitherd.log" &
    PIDS+=("$!")
    up=0
    for _ in $(seq 200); do
        if AITHER_SOCKET="$TMP/$side/aitherd.sock" "$TMP/$side/bin/aitherctl" ps >/dev/null 2>&1; then
            up=1; break
        fi
        sleep 0.1
    done
    (( up )) || { cat "$TMP/$side/aitherd.log" >&2; die "aitherd $side did not answer"; }
done

TMP="$TMP" ROUNDS="$ROUNDS" GAP_MS="$GAP_MS" PIPE="$PIPE" python3 - <<'EOF'
import os, subprocess, time
tmp, rounds, gap, pipe = os.environ["TMP"], int(os.environ["ROUNDS"]), int(os.environ["GAP_MS"]) / 1000, os.environ["PIPE"] == "1"
def aither(side):
    env = {"PATH": "/usr/bin:/bin", "AITHER_SOCKET": f"{tmp}/{side}/aitherd.sock"}
    return ([f"{tmp}/{side}/bin/aitherctl", "run", "--policy", "strict", "--", "/bin/true"], env, f"{tmp}/{side}/workspace")
tools = {
    "A (before)": aither("A"),
    "B (after)": aither("B"),
    "bwrap": (["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "/bin/true"], None, "/"),
}
def once(argv, env, cwd):
    t = time.perf_counter()
    p = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE if pipe else subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if pipe:
        p.stdout.read()
    code = p.wait()
    d = time.perf_counter() - t
    assert code == 0, (argv, code)
    return d * 1e3
times = {k: [] for k in tools}
order = list(tools)
for k in order:          # warm-up: the shape is learnt, the pools filled
    for _ in range(3):
        once(*tools[k]); time.sleep(0.5)
for _ in range(rounds):
    for k in order:
        time.sleep(gap)
        times[k].append(once(*tools[k]))
    order = order[1:] + order[:1]
def med(v):
    v = sorted(v); return v[round((len(v) - 1) * .5)]
bw = med(times["bwrap"])
print(f"run-ab: {rounds} rounds, {int(gap*1000)} ms apart, stdout {'a pipe read to EOF' if pipe else '/dev/null'}; load {open('/proc/loadavg').read().split()[:3]}")
print("| ms | median | p25 | p90 | min | median vs bwrap |\n|---|--:|--:|--:|--:|--:|")
for k, v in times.items():
    v.sort(); q = lambda p: v[round((len(v) - 1) * p)]
    print(f"| {k} | {q(.5):.2f} | {q(.25):.2f} | {q(.9):.2f} | {v[0]:.2f} | {q(.5)/bw:.2f}× |")
EOF
for side in A B; do
    echo "aitherd $side: $(grep -c 'warm=true' "$TMP/$side/aitherd.log" || true) runs warm, $(grep -c 'warm=false' "$TMP/$side/aitherd.log" || true) cold"
done
