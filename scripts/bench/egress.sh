#!/usr/bin/env bash
# Egress gateway (docs/network.md) against tinyproxy (Debian) and a direct loopback connection,
# in the same run, with the same client (examples/egress_bench.rs, std, blocking sockets):
#   1. latency: N sequential keep-alive GETs of a 2-byte body (after N/10 warm-up); p50/p99.
#      direct: client → upstream. gateway: client inside an `aitherctl run --policy standard`
#      sandbox with one egress rule → the gateway's socket in the sandbox's netns → upstream
#      (by name, via the resolver table, every request decided, counted and audited).
#      tinyproxy: client on the host → tinyproxy 127.0.0.1 → upstream (by address: tinyproxy
#      resolves by itself; the address keeps name resolution out of its numbers).
#   2. bulk: one GET of MIB MiB through each path (plain HTTP proxying); MiB/s.
# Targets (egress issue): p50 added by the gateway ≤ 0.2 ms; bulk throughput ≥ tinyproxy's.
# Usage: sudo scripts/bench/egress.sh [N] [MIB]   (defaults 20000, 2048)
#        sudo scripts/bench/egress.sh hostile [SECS]   (default 60; see hostile() below)
# The whole run happens in a private network and mount namespace (the script re-executes itself
# under unshare): /etc/hosts is bind-mounted over there to name the upstream `bench.test`, which
# listens at 11.1.0.2 in a second network namespace ("the internet", a veth pair away); the
# gateway resolves it with the host's real resolver. Nothing of the machine's network changes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
[ "$(id -u)" = 0 ] || { echo "egress.sh: run as root (aitherctl run needs it)" >&2; exit 2; }
if [ -z "${AITHER_BENCH_PRIVATE_NET:-}" ]; then
  exec env AITHER_BENCH_PRIVATE_NET=1 unshare --net --mount --propagation private "$0" "$@"
fi
ip link set lo up
# "The internet": a process holding a network namespace of its own.
unshare --net sleep infinity &
INETPID=$!
for _ in $(seq 100); do
  [ "$(readlink /proc/$INETPID/ns/net)" != "$(readlink /proc/self/ns/net)" ] && break
  sleep 0.05
done
INET=(nsenter "--net=/proc/$INETPID/ns/net")
ip link add aeh type veth peer name aei netns "/proc/$INETPID/ns/net"
ip addr add 11.1.0.1/24 dev aeh
ip link set aeh up
"${INET[@]}" ip link set lo up
"${INET[@]}" ip addr add 11.1.0.2/24 dev aei
"${INET[@]}" ip link set aei up
HOSTS="$(mktemp /var/tmp/aither-egressbench-hosts-XXXXXX)"
printf '127.0.0.1 localhost\n11.1.0.2 bench.test\n' >"$HOSTS"
mount --bind "$HOSTS" /etc/hosts
if [ "${1:-}" = hostile ]; then
  SECS="${2:-60}"
  # shellcheck source=scripts/bench/egress_hostile.sh
  . "$ROOT/scripts/bench/egress_hostile.sh"
  kill "$INETPID" 2>/dev/null || true
  rm -f "$HOSTS"
  exit 0
fi
N="${1:-20000}"
MIB="${2:-2048}"
if ! command -v tinyproxy >/dev/null; then
  echo "egress.sh: installing tinyproxy (Debian)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tinyproxy >/dev/null
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release --workspace --bins --example egress_bench -q
BIN="$TARGET/release"
TMP="$(mktemp -d /var/tmp/aither-egressbench-XXXXXX)"
UP_PORT="${EGRESS_BENCH_PORT:-18080}"
TP_PORT="${EGRESS_BENCH_TINYPROXY_PORT:-18888}"
cleanup() {
  [ -n "${UPID:-}" ] && kill "$UPID" 2>/dev/null || true
  [ -n "${TPID:-}" ] && kill "$TPID" 2>/dev/null || true
  kill "$INETPID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP" "$HOSTS"
}
trap cleanup EXIT
"${INET[@]}" "$BIN/examples/egress_bench" serve "11.1.0.2:$UP_PORT" &
UPID=$!
cat >"$TMP/tinyproxy.conf" <<CONF
User nobody
Group nogroup
Port $TP_PORT
Listen 127.0.0.1
Timeout 600
MaxClients 100
Allow 127.0.0.1
LogLevel Critical
LogFile "$TMP/tinyproxy.log"
DisableViaHeader Yes
ConnectPort $UP_PORT
CONF
touch "$TMP/tinyproxy.log"; chmod 666 "$TMP/tinyproxy.log"
tinyproxy -d -c "$TMP/tinyproxy.conf" 2>"$TMP/tinyproxy.err" &
TPID=$!
mkdir "$TMP/ws"
cp "$BIN/examples/egress_bench" "$TMP/ws/"
{ sed 's/^name = "standard"/name = "bench-egress"/' policies/standard.toml
  printf '\n[[net.egress]]\nhosts = ["bench.test"]\nports = [%s]\n' "$UP_PORT"; } >"$TMP/policy.toml"
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/11.1.0.2/$UP_PORT") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$TP_PORT") 2>/dev/null && break
  sleep 0.1
done
gateway() {
  AITHER_AUDIT_LOG="$TMP/audit.jsonl" \
    "$BIN/aitherctl" run --policy "$TMP/policy.toml" -w "$TMP/ws" -- ./egress_bench "$@" 127.0.0.1:3128 "bench.test:$UP_PORT" "${ARG}"
}
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
TPV="$(tinyproxy -v 2>&1 | awk '{print $2}')"
echo "host: $(nproc) CPUs ($CPU), kernel $(uname -r), tinyproxy $TPV; N=$N, bulk ${MIB} MiB" >&2
ARG="$N"
L_DIRECT="$("$BIN/examples/egress_bench" latency direct "11.1.0.2:$UP_PORT" "$N")"
L_GW="$(gateway latency)"
L_TP="$("$BIN/examples/egress_bench" latency "127.0.0.1:$TP_PORT" "11.1.0.2:$UP_PORT" "$N")"
ARG="$MIB"
B_DIRECT="$("$BIN/examples/egress_bench" bulk direct "11.1.0.2:$UP_PORT" "$MIB")"
B_GW="$(gateway bulk)"
B_TP="$("$BIN/examples/egress_bench" bulk "127.0.0.1:$TP_PORT" "11.1.0.2:$UP_PORT" "$MIB")"
AUDITED="$(grep -c '"kind":"net"' "$TMP/audit.jsonl" || true)"
python3 - "$L_DIRECT" "$L_GW" "$L_TP" "$B_DIRECT" "$B_GW" "$B_TP" "$AUDITED" <<'PY'
import json, sys
ld, lg, lt, bd, bg, bt = (json.loads(x) for x in sys.argv[1:7])
audited = sys.argv[7]
print("| path | p50 µs | p99 µs | p50 added µs | reconnects | bulk MiB/s |")
print("|---|---:|---:|---:|---:|---:|")
for name, l, b in (("direct loopback", ld, bd), ("aither gateway (from a sandbox)", lg, bg), ("tinyproxy", lt, bt)):
    added = l["p50_us"] - ld["p50_us"]
    print(f"| {name} | {l['p50_us']:.1f} | {l['p99_us']:.1f} | {added:.1f} | {l['reconnects']} | {b['mib_per_s']:.0f} |")
print()
print(f"gateway p50 added: {lg['p50_us'] - ld['p50_us']:.1f} µs (target ≤ 200); "
      f"bulk gateway/tinyproxy: {bg['mib_per_s'] / bt['mib_per_s']:.2f} (target ≥ 1.0); "
      f"gateway p50 / tinyproxy p50: {lg['p50_us'] / lt['p50_us']:.2f}; net audit records: {audited}")
PY
