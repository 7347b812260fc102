#!/usr/bin/env bash
# AitherFlux (issues 7, 21) against redis-server PUBLISH/SUBSCRIBE on loopback, interleaved in one
# run with the same client (examples/bus_bench.rs, std + serde_json, one thread per connection):
# each measurement runs on one side, then on the other, the order alternating by round; the
# table shows the median per side and the aither/redis ratio of every round.
#   1. 1→1 throughput: one subscriber, one publisher pipelining N messages of 128 bytes
#      (aither: `bus_pub` frames on the control socket; redis: PUBLISH); msg/s from the first
#      send to the last delivery.
#   2. latency: one message at a time (publish, wait for the delivery), 5,000 samples after
#      200 warm-up: p50/p99/p99.9 of send → delivery (wall clock, one host).
#   3. 1→16 fan-out: 16 subscribers, N/8 messages; deliveries/s.
#   4. durable publish throughput: N/2 pipelined publishes whose reply comes after the commit
#      (aither: `durable: true`, SQLite WAL, synchronous=NORMAL, batched commits); redis: XADD to
#      a stream (redis's log; in memory, no fsync in this configuration: not equally durable).
# Targets (issue 7): 1→1 throughput ≥ redis's; p99 ≤ 1 ms.
# Targets (issue 21): 1→1 and 1→16 ≥ 1× redis; durable ≥ 0.5× redis XADD.
# Usage: sudo scripts/bench/bus.sh [N] [ROUNDS]   (default N=100000, ROUNDS=5)
set -euo pipefail
N="${1:-100000}"
ROUNDS="${2:-5}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
[ "$(id -u)" = 0 ] || { echo "bus.sh: run as root (aitherd needs it)" >&2; exit 2; }
if ! command -v redis-server >/dev/null; then
  echo "bus.sh: installing redis-server (Debian)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release --workspace --bin aitherd --bin aither-init --example bus_bench -q
BIN="$TARGET/release"
TMP="$(mktemp -d /var/tmp/aither-busbench-XXXXXX)"
PORT="${REDIS_PORT:-16379}"
cleanup() {
  [ -n "${APID:-}" ] && kill "$APID" 2>/dev/null || true
  [ -n "${RPID:-}" ] && kill "$RPID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --dir "$TMP" --logfile "$TMP/redis.log" &
RPID=$!
AITHER_STATE_DIR="$TMP/state" AITHER_SOCKET="$TMP/aitherd.sock" AITHER_INIT="$BIN/aither-init" \
  AITHER_AUDIT_LOG="$TMP/audit.jsonl" RUST_LOG=warn "$BIN/aitherd" 2>"$TMP/aitherd.log" &
APID=$!
for _ in $(seq 100); do
  [ -S "$TMP/aitherd.sock" ] && redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "host: $(nproc) CPUs ($CPU), kernel $(uname -r), $(redis-server --version | cut -d' ' -f3)" >&2
RES="$("$BIN/examples/bus_bench" "$TMP/aitherd.sock" "$PORT" "$N" "$ROUNDS")"
echo "$RES"
RSS="$(awk '/VmRSS/{print $2}' /proc/$APID/status)"
python3 - "$RES" "$N" "$RSS" "$CPU" "$(nproc)" "$(uname -r)" "$(redis-server --version | cut -d' ' -f3)" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); a, b = r["aither"], r["redis"]
rows = [
    ("1→1 throughput (msg/s, publisher pipelining)", "one_to_one_msgs_per_s"),
    ("p50 latency, one message at a time (µs)", "p50_us"),
    ("p99 latency (µs)", "p99_us"),
    ("p99.9 latency (µs)", "p999_us"),
    ("1→16 fan-out (deliveries/s)", "fanout16_deliveries_per_s"),
    ("durable publish (msg/s; reply after the SQLite commit; redis: XADD, in memory)", "durable_msgs_per_s"),
]
n = len(r["rounds"])
print(f"\n| median of {n} rounds | aither | redis | aither/redis | per round |\n|---|---:|---:|---:|---|")
for label, k in rows:
    per = ", ".join(f"{x['aither'][k]/x['redis'][k]:.2f}" for x in r["rounds"])
    print(f"| {label} | {a[k]:,.1f} | {b[k]:,.1f} | {a[k]/b[k]:.2f} | {per} |")
def t(k, goal):
    x = a[k] / b[k]
    return f"{'met' if x >= goal else 'NOT met'} ({x:.2f}×)"
print(f"\nTargets (issue 21): 1→1 ≥ 1× redis: {t('one_to_one_msgs_per_s', 1)}; 1→16 ≥ 1×: "
      f"{t('fanout16_deliveries_per_s', 1)}; durable ≥ 0.5× XADD: {t('durable_msgs_per_s', 0.5)}; "
      f"p99 ≤ 1 ms: {'met' if a['p99_us'] <= 1000 else 'NOT met'} ({a['p99_us']:.0f} µs). "
      f"aitherd VmRSS after the run: {int(sys.argv[3])//1024} MiB.")
print(f"Host: {sys.argv[5]} CPUs ({sys.argv[4]}), kernel {sys.argv[6]}, redis {sys.argv[7]}; N={sys.argv[2]}, 128-byte payloads.")
PY
