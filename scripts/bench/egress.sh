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
#        ROUNDS=N (default 3): rounds of the three paths, interleaved
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
# tinyproxy closes every client connection and opens a new upstream one per request: over
# several rounds that is more connections in TIME_WAIT than one ephemeral port range holds.
# These sysctls are the private network namespace's own.
sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65000"
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
# Interleaved: ROUNDS rounds, the three paths in a rotated order each round (latency, then
# bulk), so that a load change on the host moves all three alike; per path the median over the
# rounds, and the gateway/tinyproxy ratios of each round.
ROUNDS="${ROUNDS:-3}"
measure() { # path kind
  local arg="$N"
  [ "$2" = bulk ] && arg="$MIB"
  case "$1" in
    direct) "$BIN/examples/egress_bench" "$2" direct "11.1.0.2:$UP_PORT" "$arg" ;;
    gateway) ARG="$arg" gateway "$2" ;;
    tinyproxy) "$BIN/examples/egress_bench" "$2" "127.0.0.1:$TP_PORT" "11.1.0.2:$UP_PORT" "$arg" ;;
  esac
}
ORDERS=("direct gateway tinyproxy" "gateway tinyproxy direct" "tinyproxy direct gateway")
: >"$TMP/results.jsonl"
for r in $(seq "$ROUNDS"); do
  for kind in latency bulk; do
    for path in ${ORDERS[$(((r - 1) % 3))]}; do
      printf '{"round":%d,"path":"%s","kind":"%s","m":%s}\n' "$r" "$path" "$kind" "$(measure "$path" "$kind")" >>"$TMP/results.jsonl"
    done
  done
done
AUDITED="$(grep -c '"kind":"net"' "$TMP/audit.jsonl" || true)"
python3 - "$TMP/results.jsonl" "$AUDITED" "$ROUNDS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
audited, rounds = sys.argv[2], int(sys.argv[3])
def get(path, kind, key):
    return [r["m"][key] for r in sorted(rows, key=lambda r: r["round"]) if r["path"] == path and r["kind"] == kind]
med = lambda v: statistics.median(v)
print(f"{rounds} rounds, paths interleaved in a rotated order; medians over the rounds")
print()
print("| path | p50 µs | p99 µs | p50 added µs | bulk MiB/s |")
print("|---|---:|---:|---:|---:|")
d50 = med(get("direct", "latency", "p50_us"))
for name, path in (("direct loopback", "direct"), ("aither gateway (from a sandbox)", "gateway"), ("tinyproxy", "tinyproxy")):
    p50 = med(get(path, "latency", "p50_us"))
    print(f"| {name} | {p50:.1f} | {med(get(path, 'latency', 'p99_us')):.1f} | {p50 - d50:.1f} | {med(get(path, 'bulk', 'mib_per_s')):.0f} |")
print()
added = [g - d for g, d in zip(get("gateway", "latency", "p50_us"), get("direct", "latency", "p50_us"))]
bulk = [g / t for g, t in zip(get("gateway", "bulk", "mib_per_s"), get("tinyproxy", "bulk", "mib_per_s"))]
lat = [g / t for g, t in zip(get("gateway", "latency", "p50_us"), get("tinyproxy", "latency", "p50_us"))]
print("per round: gateway p50 added µs " + ", ".join(f"{x:.1f}" for x in added) + " (target ≤ 200); "
      "bulk gateway/tinyproxy " + ", ".join(f"{x:.2f}" for x in bulk) + " (target ≥ 1.0); "
      "p50 gateway/tinyproxy " + ", ".join(f"{x:.2f}" for x in lat) + f"; net audit records: {audited}")
PY
