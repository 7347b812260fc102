#!/usr/bin/env bash
# Memory tiers (issue 6) at N entries (default 100,000), on a scratch database (the daemon's
# memory.db is not touched), through the same store aitherd uses (examples/mem_bench.rs):
#   - batched put: put_many of 1000 entries per transaction into the knowledge tier (FTS5
#     indexed), entries/s; target >= 25,000/s (issue 21)
#   - single acknowledged puts from 16 writer threads (group commit) and one writer's latency,
#     with synchronous=NORMAL (the default) and FULL (AITHER_MEMORY_SYNC=full)
#   - get p50/p99 at N entries
#   - FTS search p50/p99 (1-2 words, top 10) at N documents; target p50 <= 2 ms
#   - neighbourhood query p50/p99 at depth 1, 2, 3 on a graph of N nodes and 3N edges
#
# Usage (from anywhere):  scripts/bench/memory.sh
#   N          entries (default 100000)
#   DIR        where the scratch database goes (default /var/tmp)
#   STRICT=1   exit 1 when a target is missed (default: report only)
#   MEM_BENCH  the mem_bench example binary (default: build it in release mode)
set -euo pipefail

N="${N:-100000}"
DIR="${DIR:-/var/tmp}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() { echo "memory.sh: $*" >&2; exit 1; }
[[ "$N" =~ ^[0-9]+$ ]] && (( N >= 1000 )) || die "N must be an integer >= 1000 (got '$N')"

if [ -z "${MEM_BENCH:-}" ]; then
  (cd "$HERE" && cargo build --release --quiet --example mem_bench) >&2
  MEM_BENCH="${CARGO_TARGET_DIR:-$HERE/target}/release/examples/mem_bench"
fi
[ -x "$MEM_BENCH" ] || die "no mem_bench at $MEM_BENCH"

echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1) x $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "disk: $(df -h --output=source,fstype "$DIR" | tail -n1)"
tmp="$(mktemp)"; trap 'rm -f "$tmp"' EXIT
"$MEM_BENCH" --n "$N" --dir "$DIR" | tee "$tmp"
out="$(cat "$tmp")"

json="$(sed -n 's/^JSON //p' <<<"$out")"
[ -n "$json" ] || die "no JSON summary in the output"
batched="$(python3 -c 'import json,sys; print(int(json.loads(sys.argv[1])["sync_normal"]["batched_put_per_s"]))' "$json")"
search="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["search_p50_us"])' "$json")"
miss=0
if (( batched < 25000 )); then echo "MISSED: batched put $batched/s < 25000/s"; miss=1; else echo "ok: batched put $batched/s >= 25000/s"; fi
if python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= 2000 else 1)' "$search"; then
  echo "ok: FTS search p50 ${search} us <= 2 ms"
else
  echo "MISSED: FTS search p50 ${search} us > 2 ms"; miss=1
fi
if [ "${STRICT:-0}" = 1 ] && (( miss )); then exit 1; fi
