#!/usr/bin/env bash
# Warm spawns (issue 21, item 1: "spawn uses the same pool"; docs/daemon.md "Warm start"):
# `aitherctl spawn --policy strict NAME -- sleep 600` until its reply (the reply comes once
# the agent has been exec'ed) against two private aitherds started from the same binaries:
# "warm" with the default `[pool]` (a prepared sandbox's launcher becomes the agent's shim)
# and "cold" with `[pool] size = 0` (an `aither-init shim` per spawn, as before). Interleaved:
# per round both, in rotated order; each spawn is followed by `aitherctl rm --force` and a
# GAP_MS pause, so that the pool's refill (started once a warm spawn is served) is not on the
# next spawn's path. Each daemon's first spawn (cold for both: it teaches the shape) is not
# counted. aitherctl's own start is in both columns alike. At the end, how many of the warm
# daemon's spawns aitherd logged as `warm=true` (all of them, or the table says so).
#
# With BURST=N (and C, default 16): instead, bursts of N spawns from C parallel `aitherctl
# spawn` processes (as daemon.sh's batch (a)), agents/s = N / wall time, alternating warm and
# cold batches REPS times (default 2), every agent removed between batches: what the pool does
# to a burst that drains it at once (each warm spawn starts one preparation).
#
# Usage (as root, from the repository):
#   [ROUNDS=60] [GAP_MS=300] scripts/bench/spawn-warm.sh
#   BURST=100 [C=16] [REPS=2] scripts/bench/spawn-warm.sh
# Builds release aitherd, aitherctl and aither-init (target/release; remove it afterwards on a
# shared disk), or takes them from BIN_DIR.
set -euo pipefail
ROUNDS="${ROUNDS:-60}"
GAP_MS="${GAP_MS:-300}"
die() { echo "spawn-warm.sh: $*" >&2; exit 1; }
(( EUID == 0 )) || die "must run as root"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
if [[ -z "${BIN_DIR:-}" ]]; then
    cargo build -q --release --bin aitherd --bin aitherctl
    cargo build -q --release -p aither-init --bin aither-init
    BIN_DIR="$REPO/target/release"
fi
TMP="$(mktemp -d /var/tmp/aither-spawn-warm.XXXXXX)"
mkdir -p "$TMP/bin" "$TMP/ws"
cp "$BIN_DIR/aitherd" "$BIN_DIR/aitherctl" "$BIN_DIR/aither-init" "$TMP/bin/"
PIDS=()
cleanup() {
    for k in warm cold; do
        env_for "$k"
        for n in $("$TMP/bin/aitherctl" ps --json 2>/dev/null | grep -o '"name":"[^"]*"' | cut -d'"' -f4); do
            "$TMP/bin/aitherctl" rm --force "$n" >/dev/null 2>&1 || true
        done
    done
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf --one-file-system "$TMP"
}
trap cleanup EXIT
env_for() {
    export AITHER_STATE_DIR="$TMP/$1/state" AITHER_SOCKET="$TMP/$1/aitherd.sock"
    export AITHER_AUDIT_LOG="$TMP/$1/audit.jsonl" AITHER_POLICY_DIR="$REPO/policies"
    # A release aitherd takes the aither-init beside it ($TMP/bin).
}
for k in warm cold; do
    mkdir -p "$TMP/$k"
    if [[ $k == cold ]]; then printf '[pool]\nsize = 0\n' >"$TMP/$k/aitherd.toml"; else : >"$TMP/$k/aitherd.toml"; fi
    chmod 644 "$TMP/$k/aitherd.toml"
    env_for "$k"
    "$TMP/bin/aitherd" --config "$TMP/$k/aitherd.toml" </dev/null >/dev/null 2>"$TMP/$k/aitherd.log" &
    PIDS+=($!)
    for _ in $(seq 100); do [[ -S "$AITHER_SOCKET" ]] && break; sleep 0.1; done
    [[ -S "$AITHER_SOCKET" ]] || { cat "$TMP/$k/aitherd.log" >&2; die "$k aitherd did not come up"; }
done
cd "$TMP/ws"
# One spawn + rm against daemon $1; prints the spawn's wall time in µs.
one() {
    env_for "$1"
    local n="b$2" t0 t1
    t0=$(date +%s%N)
    "$TMP/bin/aitherctl" spawn --policy strict "$n" -- sleep 600 >/dev/null
    t1=$(date +%s%N)
    "$TMP/bin/aitherctl" rm --force "$n" >/dev/null
    echo $(( (t1 - t0) / 1000 ))
}
# The shape's first spawn on each (cold for both), then a pause for the pool to prepare.
one warm 0 >/dev/null; one cold 0 >/dev/null; sleep 1
if [[ -n "${BURST:-}" ]]; then
    C="${C:-16}"
    REPS="${REPS:-2}"
    echo "bursts of $BURST \`aitherctl spawn --policy strict\` from $C parallel clients, load $(cut -d' ' -f1-3 /proc/loadavg)"
    printf '| batch | daemon | agents/s | running after |\n|---|---|--:|--:|\n'
    for rep in $(seq "$REPS"); do
        if (( rep % 2 )); then order="warm cold"; else order="cold warm"; fi
        for k in $order; do
            env_for "$k"
            t0=$(date +%s%N)
            seq "$BURST" | xargs -P "$C" -I{} "$TMP/bin/aitherctl" spawn --policy strict "r$rep-{}" -- sleep 600 >/dev/null
            t1=$(date +%s%N)
            running=$("$TMP/bin/aitherctl" ps --json | grep -o '"state": *"running"' | wc -l || true)
            awk -v n="$BURST" -v ns=$((t1 - t0)) -v r="$rep" -v k="$k" -v run="$running" \
                'BEGIN{printf "| %d | %s | %.1f | %d |\n", r, k, n / (ns / 1e9), run}'
            seq "$BURST" | xargs -P "$C" -I{} "$TMP/bin/aitherctl" rm --force "r$rep-{}" >/dev/null
            sleep 2
        done
    done
    echo "warm daemon: $(grep -c 'agent launched.*warm=true' "$TMP/warm/aitherd.log" || true) spawns served warm in all"
    exit 0
fi
: >"$TMP/warm.us"; : >"$TMP/cold.us"
for r in $(seq "$ROUNDS"); do
    if (( r % 2 )); then order="warm cold"; else order="cold warm"; fi
    for k in $order; do
        one "$k" "$r" >>"$TMP/$k.us"
        sleep "$(awk "BEGIN{print $GAP_MS/1000}")"
    done
done
stats() { sort -n "$1" | awk '{a[NR]=$1} END {printf "%.2f %.2f %.2f %.2f\n", a[int(NR/2)+1]/1000, a[int(NR/4)+1]/1000, a[int(NR*0.9)+1]/1000, a[1]/1000}'; }
read -r wm wp wn wmin < <(stats "$TMP/warm.us")
read -r cm cp cn cmin < <(stats "$TMP/cold.us")
served=$(grep -c 'agent launched.*warm=true' "$TMP/warm/aitherd.log" || true)
echo "aitherctl spawn --policy strict (reply = agent exec'ed), $ROUNDS rounds ${GAP_MS} ms apart, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| ms | median | p25 | p90 | min |\n|---|--:|--:|--:|--:|\n'
printf '| cold (`[pool] size = 0`) | %s | %s | %s | %s |\n' "$cm" "$cp" "$cn" "$cmin"
printf '| warm (default pool) | %s | %s | %s | %s |\n' "$wm" "$wp" "$wn" "$wmin"
awk -v w="$wm" -v c="$cm" -v wp="$wp" -v cp="$cp" 'BEGIN{printf "warm/cold: median %.2fx, p25 %.2fx\n", w/c, wp/cp}'
echo "warm daemon: $served of $ROUNDS measured spawns logged warm=true (plus 0 for its first)"
