#!/usr/bin/env bash
# Warm start (issue 21, item 1): a prepared sandbox (`aither-init pool`, driven over its
# control socket as aitherd drives it) against a cold `aither-init` of the same spec and bwrap,
# interleaved (crates/aither-core/examples/pool_bench.rs). Then the same warm runs with AITHER_TRACE_LAUNCH=1: the
# median of each stage of the prepare and of the finish (final spec received → agent started).
#
# Usage (as root, from the repository):
#   [ROUNDS=100] [GAP_MS=100] [TRACE_ROUNDS=40] [POLICY=policies/strict.toml] \
#       [INIT_B=/path/to/another/release/aither-init] scripts/bench/pool.sh
# INIT_B: an A/B of the pool launcher, e.g. a copy of the build before a change; its warm runs
# (`warm B`) are interleaved with this tree's (`warm`) in every round of the first run.
# Builds release aither-init and the example (target/release; remove it afterwards on a
# shared disk).
set -euo pipefail
ROUNDS="${ROUNDS:-100}"
GAP_MS="${GAP_MS:-100}"
TRACE_ROUNDS="${TRACE_ROUNDS:-40}"
POLICY="${POLICY:-policies/strict.toml}"
die() { echo "pool.sh: $*" >&2; exit 1; }
(( EUID == 0 )) || die "must run as root"
[[ -f "$POLICY" ]] || die "$POLICY: not found (run from the repository root)"
command -v bwrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }
cargo build -q --release -p aither-init --bin aither-init
cargo build -q --release -p aither-core --example pool_bench
WS="$(mktemp -d /var/tmp/aither-pool-bench.XXXXXX)"
trap 'rm -rf --one-file-system "$WS"' EXIT
BENCH=target/release/examples/pool_bench
INIT=target/release/aither-init
echo "== wall times (no trace)"
if [[ -n "${INIT_B:-}" ]]; then
    [[ -x "$INIT_B" ]] || die "INIT_B=$INIT_B is not an executable"
    # Copied first: a concurrent rebuild cannot change it mid-run.
    cp "$INIT_B" "$WS.init-b" && trap 'rm -rf --one-file-system "$WS" "$WS.init-b"' EXIT
    env -u AITHER_TRACE_LAUNCH POOL_BENCH_INIT_B="$WS.init-b" \
        "$BENCH" "$INIT" "$POLICY" "$WS" "$ROUNDS" "$GAP_MS"
else
    env -u AITHER_TRACE_LAUNCH "$BENCH" "$INIT" "$POLICY" "$WS" "$ROUNDS" "$GAP_MS"
fi
echo
echo "== with AITHER_TRACE_LAUNCH=1 (pool launchers only)"
AITHER_TRACE_LAUNCH=1 "$BENCH" "$INIT" "$POLICY" "$WS" "$TRACE_ROUNDS" "$GAP_MS"
