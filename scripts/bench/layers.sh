#!/usr/bin/env bash
# Layered workspaces (docs/workspaces.md): the cost of `aitherctl snapshot` and `aitherctl fork`
# for an agent layer of FILES files totalling SIZE_MB MiB, on the state directory's
# filesystem as found (ext4 here: no reflink, a copy) and on an XFS image (reflink=1: FICLONE
# shares the extents), each interleaved with the peer tool `cp -a --reflink=auto` of the same
# upper layer (what an operator would do by hand).
#
# The layer is written by a real agent (`aitherctl run -p ci` writing FILES files of
# SIZE_MB/FILES each), so it is an upper layer as overlayfs made it.
#
# Usage (as root):  RUNS=5 FILES=10000 SIZE_MB=1024 scripts/bench/layers.sh
#   RUNS       snapshots (and forks, and cp runs) per filesystem (default 5)
#   FILES      files in the layer (default 10000)
#   SIZE_MB    their total size in MiB (default 1024)
#   AITHERCTL  aitherctl binary (default <repo>/target/release/aitherctl)
# Needs: mkfs.xfs (xfsprogs) for the reflink half (skipped, and said so, without it);
# free disk: about (2·RUNS+3)·SIZE_MB on ext4 and an XFS image of 3·SIZE_MB+1 GiB (sparse).
#
# The XFS image is loop-mounted in a mount namespace of the script's own (nothing is mounted
# on the host); everything is removed on exit.
set -euo pipefail

RUNS="${RUNS:-5}"
FILES="${FILES:-10000}"
SIZE_MB="${SIZE_MB:-1024}"

die() { echo "layers.sh: $*" >&2; exit 1; }
(( EUID == 0 )) || die "must run as root"
for v in RUNS FILES SIZE_MB; do [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be an integer"; done

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
AITHERCTL="${AITHERCTL:-$REPO/target/release/aitherctl}"
[[ -x "$AITHERCTL" ]] || die "aitherctl not found at $AITHERCTL (cargo build --release, or set AITHERCTL)"
export AITHER_POLICY_DIR="$REPO/policies"

# The inner part: one filesystem, given as the state directory.
if [[ "${1:-}" == "--inner" ]]; then
    STATE="$2"; LABEL="$3"
    export AITHER_STATE_DIR="$STATE" AITHER_AUDIT_LOG="$STATE/audit.jsonl"
    WS="$(mktemp -d /var/tmp/aither-bench-ws.XXXXXX)"
    trap 'rm -rf "$WS"' EXIT
    per_kb=$(( SIZE_MB * 1024 / FILES ))
    "$AITHERCTL" run -p ci -w "$WS" --name bench -- /bin/sh -c "
        head -c ${per_kb}K /dev/urandom > /tmp/one
        i=0; while [ \$i -lt $FILES ]; do
            d=d\$((i / 100)); [ -d \$d ] || mkdir \$d; cp /tmp/one \$d/f\$i; i=\$((i + 1)); done" \
        || die "the agent that writes the layer failed"
    sync
    ms() { date +%s%N; }
    snap=(); fork=(); cpt=()
    for r in $(seq 1 "$RUNS"); do
        t0=$(ms); "$AITHERCTL" snapshot bench --tag "r$r" >/dev/null; t1=$(ms)
        snap+=($(( (t1 - t0) / 1000000 )))
        t0=$(ms); "$AITHERCTL" fork bench "bench-f$r" >/dev/null 2>&1; t1=$(ms)
        fork+=($(( (t1 - t0) / 1000000 )))
        t0=$(ms); cp -a --reflink=auto "$STATE/layers/bench/upper" "$STATE/cp-$r"; t1=$(ms)
        cpt+=($(( (t1 - t0) / 1000000 )))
        sync
        "$AITHERCTL" discard "bench-f$r" >/dev/null 2>&1
        rm -rf "$STATE/layers/bench-f$r" "$STATE/cp-$r"
    done
    reflinked=$("$AITHERCTL" snapshots bench --json | python3 -c 'import json,sys; s=json.load(sys.stdin)["snapshots"]; print(s[0]["stats"]["reflinked"], s[0]["stats"]["copied"])')
    rm -rf "$STATE/layers/bench/snapshots"
    median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
    printf '%-8s files=%s size=%sMiB  reflinked/copied=%s  median ms: snapshot %s  fork %s  cp -a --reflink=auto %s  (runs: %s | %s | %s)\n' \
        "$LABEL" "$FILES" "$SIZE_MB" "${reflinked// //}" "$(median "${snap[@]}")" "$(median "${fork[@]}")" \
        "$(median "${cpt[@]}")" "${snap[*]}" "${fork[*]}" "${cpt[*]}"
    "$AITHERCTL" discard bench >/dev/null 2>&1
    rm -rf "$STATE/layers"
    exit 0
fi

TMP="$(mktemp -d /var/tmp/aither-bench-layers.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
echo "kernel $(uname -r); $(nproc) CPUs; aitherctl $AITHERCTL"
fs=$(findmnt -no FSTYPE -T /var/tmp)
"$0" --inner "$TMP/state" "$fs"
if command -v mkfs.xfs >/dev/null 2>&1; then
    img="$TMP/xfs.img"
    truncate -s $(( 3 * SIZE_MB + 1024 ))M "$img"
    mkfs.xfs -q -m reflink=1 "$img"
    mkdir -p "$TMP/xfs"
    unshare -m --propagation private /bin/sh -c "mount -o loop '$img' '$TMP/xfs' && '$0' --inner '$TMP/xfs/state' xfs"
else
    echo "xfs      skipped: mkfs.xfs (xfsprogs) is missing, so no filesystem with reflink was measured"
fi
