#!/usr/bin/env bash
# One policy, three launchers: the time to start /bin/true and see it exit under the same
# protections (policy strict), as
#   (a) aitherctl run --policy strict -- /bin/true          (the local sandbox)
#   (b) crun run of `aitherctl export oci --policy strict`  (the exported bundle)
#   (c) runc run of the same bundle
# plus, on a cgroup v1/v2 hybrid host, (d) the wrapper crun needs there alone
# (`unshare -m sh -c 'umount /sys/fs/cgroup/unified && exec /bin/true'`; see spawn.sh), and
# (e) a bare fork+exec of /bin/true, the timing floor. Launches are interleaved round-robin
# (a b c d e a b c ...) so that drift hits all; one back-to-back mode.
#
# Timing: the fork+execvp+waitpid helper of spawn.sh (its C source is taken from that script,
# so both measure the same way), CLOCK_MONOTONIC around exactly the launch.
#
# Usage (as root):  RUNS=100 scripts/bench/export.sh
#   RUNS       launches per tool (default 100, at least 50)
#   AITHERCTL  aitherctl binary (default <repo>/target/release/aitherctl; copied at start)
#
# Everything created (temp dir, bundle, containers, their cgroups) is removed on exit; host
# mounts are checked to be as found.
set -euo pipefail

RUNS="${RUNS:-100}"
WARMUP=3

die() { echo "export.sh: $*" >&2; exit 1; }

[[ "$RUNS" =~ ^[0-9]+$ ]] || die "RUNS must be an integer (got '$RUNS')"
(( RUNS >= 50 )) || die "RUNS must be >= 50 (got $RUNS)"
(( EUID == 0 )) || die "must run as root"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
AITHERCTL="${AITHERCTL:-$REPO/target/release/aitherctl}"
[[ "$AITHERCTL" == /* ]] || AITHERCTL="$PWD/$AITHERCTL"
[[ -x "$AITHERCTL" ]] || die "aitherctl not found at $AITHERCTL (run: cargo build --release, or set AITHERCTL)"
for t in crun runc gcc unshare; do
    command -v "$t" >/dev/null 2>&1 || die "$t is missing (install.sh installs crun and runc; gcc: build-essential)"
done

mounts_snapshot() { awk '{print $5, $9}' /proc/self/mountinfo | sort; }
MOUNTS_BEFORE="$(mounts_snapshot)"
TMP="$(mktemp -d /var/tmp/aither-export-bench.XXXXXX)"
chmod 755 "$TMP"   # the containers' root (an unprivileged host id) must reach the bundle
NAME="aither-xbench-$$"

cleanup() {
    local rc=$?
    set +e
    for rt in crun runc; do
        "$rt" list 2>/dev/null | awk -v p="$NAME-" 'index($1, p) == 1 {print $1}' |
            while read -r id; do "$rt" delete -f "$id" >/dev/null 2>&1; done
    done
    find /sys/fs/cgroup -mindepth 2 -maxdepth 4 -type d -name "$NAME*" 2>/dev/null |
        sort -r | while read -r d; do rmdir "$d" 2>/dev/null; done
    [[ -n "${TMP:-}" && -d "$TMP" ]] && rm -rf --one-file-system "$TMP"
    if [[ "$(mounts_snapshot)" != "$MOUNTS_BEFORE" ]]; then
        echo "export.sh: WARNING: host mount table differs from when the script started" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the timing helper, from spawn.sh --------------------------------------------------------
awk '/^cat >"\$TMP\/spawnbench.c" <<.EOF.$/ {on = 1; next} on && /^EOF$/ {exit} on {print}' \
    "$SCRIPT_DIR/spawn.sh" >"$TMP/spawnbench.c"
grep -q 'int main' "$TMP/spawnbench.c" || die "could not take the timing helper from spawn.sh"
gcc -O2 -Wall -o "$TMP/spawnbench" "$TMP/spawnbench.c"

cp "$AITHERCTL" "$TMP/aitherctl"
AITHERCTL_SRC="$AITHERCTL"
AITHERCTL="$TMP/aitherctl"

mkdir "$TMP/workspace"
chmod 777 "$TMP/workspace"
"$AITHERCTL" export oci --policy strict --name "$NAME" --workspace "$TMP/workspace" \
    --out "$TMP/bundle" -- /bin/true 2>/dev/null

HYBRID=0
if [[ "$(stat -f -c %T /sys/fs/cgroup/unified 2>/dev/null)" == cgroup2fs ]] \
   && [[ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]]; then
    HYBRID=1
fi

CMDS=( aither "$AITHERCTL" run --policy strict --workspace "$TMP/workspace" -- /bin/true ::: )
if (( HYBRID )); then
    CMDS+=( crun unshare -m sh -c 'umount /sys/fs/cgroup/unified && exec crun run --bundle "$0" "$1"' "$TMP/bundle" "$NAME-c-@ID@" ::: )
else
    CMDS+=( crun crun run --bundle "$TMP/bundle" "$NAME-c-@ID@" ::: )
fi
CMDS+=( runc runc run --bundle "$TMP/bundle" "$NAME-r-@ID@" ::: true /bin/true )
(( HYBRID )) && CMDS+=( ::: crun-wrap unshare -m sh -c 'umount /sys/fs/cgroup/unified && exec /bin/true' )

ERRLOG="$TMP/stderr.log"
cd "$TMP/workspace"
"$TMP/spawnbench" 1 0 0 "$ERRLOG" "check" -- "${CMDS[@]}" >/dev/null || { cat "$ERRLOG" >&2; die "sanity run failed"; }
: >"$ERRLOG"
echo "export.sh: RUNS=$RUNS per tool, $WARMUP warm-up rounds; host $(uname -r), $(nproc) CPUs; $(crun --version | head -1), $(runc --version | head -1)" >&2
echo "export.sh: aitherctl = $AITHERCTL_SRC (sha256 $(sha256sum "$AITHERCTL" | cut -c1-12))" >&2
"$TMP/spawnbench" "$RUNS" "$WARMUP" 0 "$ERRLOG" "r" -- "${CMDS[@]}" >"$TMP/samples" ||
    { cat "$ERRLOG" >&2; die "run failed"; }

stats() {  # $1 tool -> "median_ns p90_ns"
    awk -v t="$1" '$1 == t {print $2}' "$TMP/samples" | sort -n |
        awk '{v[NR] = $1} END {
            n = NR; med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
            k = int(0.9 * n); if (k < 0.9 * n) k++
            printf "%.0f %.0f\n", med, v[k] }'
}
ms() { awk -v n="$1" 'BEGIN {printf "%.2f", n / 1e6}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2fx", a / b}'; }

TOOLS=(aither crun runc true)
(( HYBRID )) && TOOLS+=(crun-wrap)
declare -A LABEL=(
    [aither]="aitherctl run --policy strict"
    [crun]="crun run (exported strict bundle)"
    [runc]="runc run (exported strict bundle)"
    [true]="bare /bin/true fork+exec"
    [crun-wrap]="crun hybrid wrapper alone"
)
(( HYBRID )) && LABEL[crun]="crun run (exported bundle) + wrapper *"
declare -A MED P90
for t in "${TOOLS[@]}"; do read -r "MED[$t]" "P90[$t]" < <(stats "$t"); done

echo
echo "Launch of /bin/true under policy strict, N=$RUNS per row, $(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs"
echo
printf '| %-40s | %9s | %9s | %10s |\n' tool "median ms" "p90 ms" "vs aither"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..42})" "$(printf -- '-%.0s' {1..11})" \
    "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..12})"
for t in "${TOOLS[@]}"; do
    printf '| %-40s | %9s | %9s | %10s |\n' "${LABEL[$t]}" "$(ms "${MED[$t]}")" \
        "$(ms "${P90[$t]}")" "$(ratio "${MED[$t]}" "${MED[aither]}")"
done
echo
if (( HYBRID )); then
    echo "* hybrid cgroup host: each crun launch includes the wrapper; crun minus wrapper ~$(ms $(( ${MED[crun]} - ${MED[crun-wrap]} ))) ms"
    echo
fi
echo "Same protections in every row but the floor (the bundles lack Landlock: docs/scaling.md)."
