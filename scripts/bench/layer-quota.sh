#!/usr/bin/env bash
# A layered workspace's disk quota (docs/workspaces.md "Disk quota"): what the ext4 image under
# the upper layer costs, interleaved with the same work on a layer without a quota (the peer):
#   launch  `aitherctl run -p ci[+quota] … /bin/true` on an existing layer (attach + mount)
#   write   the agent writing WRITE_MB MiB (dd, conv=fsync) into its workspace
#   diff    `aitherctl diff NAME --stat` of that layer (the image attached read-only)
#
# Usage (as root):  RUNS=10 WRITE_MB=256 QUOTA=1G scripts/bench/layer-quota.sh
#   AITHERCTL  aitherctl binary (default <repo>/target/release/aitherctl)
# Prints one line per measure: median and min in ms, quota'd vs plain.
set -euo pipefail

RUNS="${RUNS:-10}"
WRITE_MB="${WRITE_MB:-256}"
QUOTA="${QUOTA:-1G}"

die() { echo "layer-quota.sh: $*" >&2; exit 1; }
(( EUID == 0 )) || die "must run as root"
for v in RUNS WRITE_MB; do [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be an integer"; done
[[ "$QUOTA" =~ ^[0-9]+[KMGT]?$ ]] || die "QUOTA must be a size (e.g. 1G)"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
AITHERCTL="${AITHERCTL:-$REPO/target/release/aitherctl}"
[[ -x "$AITHERCTL" ]] || die "aitherctl not found at $AITHERCTL (cargo build --release, or set AITHERCTL)"
export AITHER_POLICY_DIR="$REPO/policies"

TMP="$(mktemp -d /var/tmp/aither-bench-quota.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
export AITHER_STATE_DIR="$TMP/state" AITHER_AUDIT_LOG="$TMP/audit.jsonl"
mkdir "$TMP/ws"
printf 'name = "ci-quota"\nextends = "ci"\n\n[resources]\nworkspace_disk = "%s"\n' "$QUOTA" >"$TMP/ci-quota.toml"
QPOL="$TMP/ci-quota.toml"

ms() { date +%s%N; }
run() { "$AITHERCTL" run -p "$1" -w "$TMP/ws" --name "$2" -- /bin/sh -c "$3" >/dev/null; }
# Both layers exist before the first measure (the quota'd one's image made).
run ci plain true
run "$QPOL" quota true

declare -A T
for r in $(seq 1 "$RUNS"); do
    for side in plain quota; do
        pol=ci; [[ $side == quota ]] && pol="$QPOL"
        t0=$(ms); run "$pol" "$side" true; t1=$(ms)
        T[launch_$side]+="$(( (t1 - t0) / 1000000 )) "
        t0=$(ms); run "$pol" "$side" "rm -f big; dd if=/dev/zero of=big bs=1M count=$WRITE_MB conv=fsync 2>/dev/null"; t1=$(ms)
        T[write_$side]+="$(( (t1 - t0) / 1000000 )) "
        t0=$(ms); "$AITHERCTL" diff "$side" --stat >/dev/null; t1=$(ms)
        T[diff_$side]+="$(( (t1 - t0) / 1000000 )) "
    done
done

stat() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {printf "median %d min %d", a[int((NR+1)/2)], a[1]}'; }
echo "runs $RUNS, write ${WRITE_MB} MiB, quota $QUOTA, state on $(findmnt -no FSTYPE -T "$TMP")"
for m in launch write diff; do
    printf '%-7s quota: %-22s plain: %s\n' "$m" "$(echo "${T[${m}_quota]}" | stat)" "$(echo "${T[${m}_plain]}" | stat)"
done
