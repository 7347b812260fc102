#!/usr/bin/env bash
# Token verification throughput on one core (examples/token_bench.rs). Measures, with an
# ephemeral key (the host key is not touched), decode + full verification (signature chain,
# proof, claims parsing and narrowing, time; not the revocation lookup) of
#   (a) a root token (1 block) minted from the repository's strict policy, and
#   (b) a 3-block token (strict, attenuated twice: --memory 256M --pids 64, then --read and --ttl),
#   (c) the root token presented again to aitherd's cache of verified tokens (token::VerifiedCache:
#       its digest, a lookup, the time check),
# and, as the floor that bounds (a) on this CPU, one ed25519 verification and one proof-key
# derivation alone. Target: >= 20,000 root tokens/s (TARGET to change it).
#
# Usage (from anywhere):  scripts/bench/tokens.sh
#   N          verifications per case (default 20000)
#   CPU        the core to pin to with taskset (default 0)
#   TARGET     tokens/s the root token must reach (default 20000)
#   STRICT=1   exit 1 when the target is missed (default: report only)
#   TOKEN_BENCH  the token_bench example binary (default: build it in release mode)
set -euo pipefail

N="${N:-20000}"
CPU="${CPU:-0}"
TARGET="${TARGET:-20000}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() { echo "tokens.sh: $*" >&2; exit 1; }
[[ "$N" =~ ^[0-9]+$ ]] && (( N >= 1000 )) || die "N must be an integer >= 1000 (got '$N')"
command -v taskset >/dev/null || die "taskset (util-linux) is needed to pin to one core"

if [ -z "${TOKEN_BENCH:-}" ]; then
  (cd "$HERE" && cargo build --release --quiet --example token_bench) >&2
  TOKEN_BENCH="${CARGO_TARGET_DIR:-$HERE/target}/release/examples/token_bench"
fi
[ -x "$TOKEN_BENCH" ] || die "no token_bench at $TOKEN_BENCH"

echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1), pinned to core $CPU; load: $(cut -d' ' -f1-3 /proc/loadavg)"
out="$(AITHER_POLICY_DIR="$HERE/policies" taskset -c "$CPU" "$TOKEN_BENCH" "$N")"
echo "$out"

rate() { awk -v k="$1" 'index($0, k) { for (i = 1; i <= NF; i++) if ($i == "/s") { print int($(i-1)); exit } }' <<<"$out"; }
root="$(rate "root token")"
floor="$(rate "ed25519 verify")"
[ -n "$root" ] || die "could not read the root token's rate"
if (( root >= TARGET )); then
  echo "target: root tokens ${root}/s >= ${TARGET}/s: met"
else
  echo "target: root tokens ${root}/s < ${TARGET}/s: MISSED (one ed25519 verification alone runs at ${floor}/s on this core)"
  if [ "${STRICT:-0}" = 1 ]; then exit 1; fi
fi
