#!/usr/bin/env bash
# Spawn latency: how long it takes to start /bin/true and see it exit, in
#   (a) aitherctl run --policy strict, handed to a private aitherd started by this script
#       (docs/daemon.md "run")             (a') aitherctl run --no-daemon --policy strict
#                                              (the standalone path)
#   (b) bwrap --unshare-all, / read-only
#   (c) crun run of an equivalent OCI bundle (d) unshare(1) with the same namespaces
#   (e) bare fork+exec of /bin/true
# in two modes, both printed: "back-to-back" (launches follow each other immediately) and
# "spaced" (0.2 s sleep before every launch; some kernel paths, e.g. cgroup attach, wait for
# RCU grace periods, and those only show when the system is otherwise idle between launches).
# Within a mode the tools are interleaved round-robin (a b c d e a b c ...) so drift hits all.
#
# Timing: a tiny C helper compiled into a temp dir does fork + execvp + waitpid per launch and
# reads clock_gettime(CLOCK_MONOTONIC) around exactly that; stdin/stdout go to /dev/null, stderr
# to a log. (python3's subprocess.run adds a fork of a large interpreter and pipe plumbing to
# every sample; the C helper's own floor is row (e).)
#
# Usage (as root, from anywhere):  RUNS=100 scripts/bench/spawn.sh
#   RUNS       launches per tool per mode (default 100, at least 50)
#   AITHERCTL  aitherctl binary (default: <repo>/target/release/aitherctl, copied to the temp dir
#              at start so a concurrent rebuild cannot change it mid-run; build it first with
#              cargo build --release --bin aitherctl --bin aitherd; cargo build --release -p aither-init)
#   AITHERD, AITHER_INIT
#              aitherd and aither-init for row (a) (default: beside AITHERCTL; copied likewise)
#
# Row (a)'s aitherd is private: its own state directory, socket and audit log in the temp dir,
# the host's policies (as row a' uses), stopped at exit; it never touches /run/aither or a
# system aitherd. AITHER_SOCKET points every aitherctl of the script at it.
#
# On a cgroup v1/v2 hybrid host (cgroup2 at /sys/fs/cgroup/unified) crun refuses to run
# ("cgroups in hybrid mode not supported"). There, every crun launch is wrapped in
#   unshare -m sh -c 'umount /sys/fs/cgroup/unified && exec crun run ...'
# (a private mount namespace in which the unified hierarchy is detached; the host's mounts are
# untouched). That wrapper costs time, so the script also measures the wrapper alone
# ("crun-wrap", exec'ing /bin/true instead of crun) and prints crun minus wrapper as a note.
#
# Everything created (temp dir, bundle, containers) is removed on exit; host mounts are checked
# to be as found.
set -euo pipefail

RUNS="${RUNS:-100}"
GAP_US=200000   # spaced mode: sleep before every launch
WARMUP=3        # unrecorded rounds per mode

die() { echo "spawn.sh: $*" >&2; exit 1; }

[[ "$RUNS" =~ ^[0-9]+$ ]] || die "RUNS must be an integer (got '$RUNS')"
(( RUNS >= 50 )) || die "RUNS must be >= 50 (got $RUNS)"
(( EUID == 0 )) || die "must run as root"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
AITHERCTL="${AITHERCTL:-$REPO/target/release/aitherctl}"
[[ "$AITHERCTL" == /* ]] || AITHERCTL="$PWD/$AITHERCTL"
[[ -x "$AITHERCTL" ]] || die "aitherctl not found at $AITHERCTL (run: cargo build --release, or set AITHERCTL)"
AITHERD="${AITHERD:-$(dirname "$AITHERCTL")/aitherd}"
AITHER_INIT_BIN="${AITHER_INIT:-$(dirname "$AITHERCTL")/aither-init}"
[[ -x "$AITHERD" ]] || die "aitherd not found at $AITHERD (cargo build --release --bin aitherd, or set AITHERD)"
[[ -x "$AITHER_INIT_BIN" ]] || die "aither-init not found at $AITHER_INIT_BIN (cargo build --release --bin aither-init, or set AITHER_INIT)"

# --- dependencies (install only what is missing) -------------------------------------------
missing=()
command -v bwrap   >/dev/null 2>&1 || missing+=(bubblewrap)
command -v crun    >/dev/null 2>&1 || missing+=(crun)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v gcc     >/dev/null 2>&1 || missing+=(gcc)
if (( ${#missing[@]} )); then
    echo "installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- state and cleanup -----------------------------------------------------------------------
mounts_snapshot() { awk '{print $5, $9}' /proc/self/mountinfo | sort; }
MOUNTS_BEFORE="$(mounts_snapshot)"
TMP="$(mktemp -d /tmp/aither-spawn-bench.XXXXXX)"
ID_PREFIX="aither-spawn-$$"

DPID=""
cleanup() {
    local rc=$?
    set +e
    if [[ -n "$DPID" ]]; then
        kill -TERM "$DPID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DPID" 2>/dev/null
        wait "$DPID" 2>/dev/null
    fi
    if command -v crun >/dev/null 2>&1; then
        crun list 2>/dev/null | awk -v p="$ID_PREFIX-" 'index($1, p) == 1 {print $1}' |
            while read -r id; do crun delete -f "$id" >/dev/null 2>&1; done
    fi
    # crun's cgroupfs manager names cgroups after the container; remove any left behind.
    find /sys/fs/cgroup -mindepth 2 -maxdepth 4 -type d -name "$ID_PREFIX-*" 2>/dev/null |
        sort -r | while read -r d; do rmdir "$d" 2>/dev/null; done
    # Nothing is ever mounted under $TMP on the host (bundle mounts live in the containers'
    # own mount namespaces), so --one-file-system is only a guard.
    [[ -n "${TMP:-}" && -d "$TMP" ]] && rm -rf --one-file-system "$TMP"
    local after
    after="$(mounts_snapshot)"
    if [[ "$after" != "$MOUNTS_BEFORE" ]]; then
        echo "spawn.sh: WARNING: host mount table differs from when the script started:" >&2
        diff <(echo "$MOUNTS_BEFORE") <(echo "$after") >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- timing helper ---------------------------------------------------------------------------
cat >"$TMP/spawnbench.c" <<'EOF'
/* spawnbench RUNS WARMUP GAP_US ERRLOG IDBASE -- NAME ARGV... [ ::: NAME ARGV... ]...
 * Round-robin over the commands RUNS times (after WARMUP unrecorded rounds); per launch,
 * fork + execvp + waitpid timed with CLOCK_MONOTONIC; prints "NAME NS" per recorded launch.
 * "@ID@" inside an argument becomes IDBASE-<round> (unique per launch of that command).
 * GAP_US > 0: sleep that long before every launch. Stops at the first failing launch. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char *subst(const char *arg, const char *id) {
    const char *p = strstr(arg, "@ID@");
    if (!p) return (char *)arg;
    size_t n = strlen(arg) - 4 + strlen(id) + 1;
    char *s = malloc(n);
    snprintf(s, n, "%.*s%s%s", (int)(p - arg), arg, id, p + 4);
    return s;
}

int main(int argc, char **argv) {
    if (argc < 8 || strcmp(argv[6], "--")) { fprintf(stderr, "usage: see source\n"); return 2; }
    long runs = atol(argv[1]), warm = atol(argv[2]), gap = atol(argv[3]);
    const char *idbase = argv[5];
    int errfd = open(argv[4], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int nullfd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (errfd < 0 || nullfd < 0) { perror("open"); return 2; }

    int ncmd = 0, starts[64], ends[64];
    for (int i = 7; i < argc && ncmd < 64;) {
        starts[ncmd] = i;
        int j = i;
        while (j < argc && strcmp(argv[j], ":::")) j++;
        ends[ncmd++] = j;
        i = j + 1;
    }
    struct timespec gapts = { gap / 1000000, (gap % 1000000) * 1000 };
    char **cargv = calloc(argc + 1, sizeof *cargv);
    long *ns = calloc((size_t)runs * ncmd, sizeof *ns);

    for (long r = -warm; r < runs; r++) {
        char id[256];
        if (r < 0) snprintf(id, sizeof id, "%s-warm%ld", idbase, -r);
        else snprintf(id, sizeof id, "%s-%ld", idbase, r);
        for (int c = 0; c < ncmd; c++) {
            int k = 0;
            for (int i = starts[c] + 1; i < ends[c]; i++) cargv[k++] = subst(argv[i], id);
            cargv[k] = NULL;
            if (gap > 0) nanosleep(&gapts, NULL);

            struct timespec t0, t1;
            int st;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            pid_t pid = fork();
            if (pid == 0) {
                dup2(nullfd, 0); dup2(nullfd, 1); dup2(errfd, 2);
                execvp(cargv[0], cargv);
                _exit(127);
            }
            if (pid < 0) { perror("fork"); return 2; }
            while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
            clock_gettime(CLOCK_MONOTONIC, &t1);

            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                fprintf(stderr, "spawnbench: %s failed (round %ld, %s %d); stderr is in %s\n",
                        argv[starts[c]], r, WIFEXITED(st) ? "exit" : "signal",
                        WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st), argv[4]);
                return 1;
            }
            if (r >= 0)
                ns[r * ncmd + c] = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
            for (int i = 0; i < k; i++)
                if (cargv[i] != argv[starts[c] + 1 + i]) free(cargv[i]);
        }
    }
    for (long r = 0; r < runs; r++)
        for (int c = 0; c < ncmd; c++) printf("%s %ld\n", argv[starts[c]], ns[r * ncmd + c]);
    return 0;
}
EOF
gcc -O2 -Wall -o "$TMP/spawnbench" "$TMP/spawnbench.c"

# Measure a private copy: target/release/aitherctl may be rebuilt while the benchmark runs.
cp "$AITHERCTL" "$TMP/aitherctl"
AITHERCTL_SRC="$AITHERCTL"
AITHERCTL="$TMP/aitherctl"
cp "$AITHERD" "$TMP/aitherd"
cp "$AITHER_INIT_BIN" "$TMP/aither-init"

# --- the private aitherd of row (a) -------------------------------------------------------------
export AITHER_SOCKET="$TMP/aitherd.sock"
AITHER_STATE_DIR="$TMP/state" AITHER_INIT="$TMP/aither-init" AITHER_AUDIT_LOG="$TMP/audit.jsonl" \
    "$TMP/aitherd" </dev/null >/dev/null 2>"$TMP/aitherd.log" &
DPID=$!
up=0
for _ in $(seq 200); do
    kill -0 "$DPID" 2>/dev/null || { cat "$TMP/aitherd.log" >&2; die "aitherd exited during start-up"; }
    if "$AITHERCTL" ps >/dev/null 2>&1; then up=1; break; fi
    sleep 0.1
done
(( up )) || { cat "$TMP/aitherd.log" >&2; die "aitherd did not answer on $AITHER_SOCKET within 20 s"; }

# --- workspace for aitherctl (its workspace defaults to the cwd) -------------------------------
mkdir "$TMP/workspace"

# --- OCI bundle for crun -----------------------------------------------------------------------
# rootfs: a directory with /usr and /etc bind-mounted read-only (inside the container's mount
# namespace, via config.json) and the merged-usr symlinks (/bin -> usr/bin, ...) copied from the
# host. (root.path "/" does not work here: crun's pivot_root on it fails with EINVAL.)
BUNDLE="$TMP/bundle"
mkdir -p "$BUNDLE/rootfs"/{usr,etc,proc,dev,sys,tmp}
extra_binds=""
for d in bin sbin lib lib32 lib64 libx32; do
    if [[ -L "/$d" ]]; then
        ln -s "$(readlink "/$d")" "$BUNDLE/rootfs/$d"
    elif [[ -d "/$d" ]]; then
        mkdir "$BUNDLE/rootfs/$d"
        extra_binds+="{\"destination\": \"/$d\", \"type\": \"bind\", \"source\": \"/$d\", \"options\": [\"rbind\", \"ro\", \"nosuid\", \"nodev\"]}, "
    fi
done
(cd "$BUNDLE" && crun spec)
# Patch crun's default spec: no terminal, args /bin/true, rootfs as above, user namespace mapped
# to host 100000-165535 (non-root) and a cgroup namespace on top of crun's default
# pid/network/ipc/uts/mount.
MAP='[{"containerID": 0, "hostID": 100000, "size": 65536}]'
BINDS="{\"destination\": \"/usr\", \"type\": \"bind\", \"source\": \"/usr\", \"options\": [\"rbind\", \"ro\", \"nosuid\", \"nodev\"]}, {\"destination\": \"/etc\", \"type\": \"bind\", \"source\": \"/etc\", \"options\": [\"rbind\", \"ro\", \"nosuid\", \"nodev\"]}, $extra_binds"
sed -i \
    -e 's/"terminal": true/"terminal": false/' \
    -e 's|^\([[:space:]]*\)"sh"$|\1"/bin/true"|' \
    -e "s|\"mounts\": \[|\"mounts\": [ $BINDS|" \
    -e 's/"namespaces": \[/"namespaces": [ {"type": "user"}, {"type": "cgroup"},/' \
    -e "s/\"linux\": {/\"linux\": { \"uidMappings\": $MAP, \"gidMappings\": $MAP,/" \
    "$BUNDLE/config.json"
for want in '"terminal": false' '"/bin/true"' '"path": "rootfs"' '"readonly": true' \
            '"type": "user"' '"type": "cgroup"' '"uidMappings"' '"destination": "/usr", "type": "bind"'; do
    grep -qF "$want" "$BUNDLE/config.json" || die "patching crun's config.json failed (no $want); crun spec format changed?"
done

HYBRID=0
if [[ -d /sys/fs/cgroup/unified ]] && [[ "$(stat -f -c %T /sys/fs/cgroup/unified 2>/dev/null)" == cgroup2fs ]] \
   && [[ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]]; then
    HYBRID=1
fi

# --- the commands ------------------------------------------------------------------------------
# Each: NAME ARGV... ; separated by ":::". @ID@ = a container id unique to the launch.
build_cmds() {  # $1 = mode tag, used in crun container ids
    local m="$1"
    CMDS=(
        aither   "$AITHERCTL" run --policy strict -- /bin/true :::
        aither-nd "$AITHERCTL" run --no-daemon --policy strict -- /bin/true :::
        bwrap    bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc /bin/true :::
    )
    if (( HYBRID )); then
        CMDS+=(
            crun unshare -m sh -c 'umount /sys/fs/cgroup/unified && exec crun run --bundle "$0" "$1"' "$BUNDLE" "$ID_PREFIX-$m-@ID@" :::
        )
    else
        CMDS+=( crun crun run --bundle "$BUNDLE" "$ID_PREFIX-$m-@ID@" ::: )
    fi
    CMDS+=(
        unshare  unshare --user --map-root-user --pid --fork --mount --net --ipc --uts /bin/true :::
        true     /bin/true
    )
    if (( HYBRID )); then
        CMDS+=( ::: crun-wrap unshare -m sh -c 'umount /sys/fs/cgroup/unified && exec /bin/true' )
    fi
}

ERRLOG="$TMP/stderr.log"
cd "$TMP/workspace"

# Sanity: every command once, outside timing, with its stderr shown on failure.
build_cmds check
"$TMP/spawnbench" 1 0 0 "$ERRLOG" "x" -- "${CMDS[@]}" >/dev/null || { cat "$ERRLOG" >&2; die "sanity run failed"; }
: >"$ERRLOG"
# Row (a) must be served by aitherd: its audit log holds the sanity run's `run` record.
for _ in $(seq 50); do grep -q '"kind":"run"' "$TMP/audit.jsonl" 2>/dev/null && break; sleep 0.1; done
grep -q '"kind":"run"' "$TMP/audit.jsonl" 2>/dev/null || die "row (a) was not served by aitherd (no run record in its audit log)"

echo "spawn.sh: RUNS=$RUNS per tool per mode, $WARMUP warm-up rounds; host $(uname -r), $(nproc) CPUs, cgroup $( ((HYBRID)) && echo 'v1/v2 hybrid' || stat -f -c %T /sys/fs/cgroup)" >&2
echo "spawn.sh: timing helper: inline C, fork+execvp+waitpid, CLOCK_MONOTONIC" >&2
echo "spawn.sh: aitherd = $AITHERD (copied; sha256 $(sha256sum "$TMP/aitherd" | cut -c1-12)), pid $DPID, socket $AITHER_SOCKET" >&2
echo "spawn.sh: aitherctl = $AITHERCTL_SRC (copied; sha256 $(sha256sum "$AITHERCTL" | cut -c1-12), built $(date -u -r "$AITHERCTL_SRC" +%FT%TZ))" >&2

for mode in back-to-back spaced; do
    gap=0; [[ "$mode" == spaced ]] && gap=$GAP_US
    tag=b2b; [[ "$mode" == spaced ]] && tag=spc
    build_cmds "$tag"
    echo "spawn.sh: measuring $mode ..." >&2
    "$TMP/spawnbench" "$RUNS" "$WARMUP" "$gap" "$ERRLOG" "r" -- "${CMDS[@]}" |
        sed "s/^/$mode /" >>"$TMP/samples" || { cat "$ERRLOG" >&2; die "$mode run failed"; }
done

# --- report ------------------------------------------------------------------------------------
# median: mean of the two middle samples for even N; p90: nearest rank ceil(0.9 N).
stats() {  # $1 mode, $2 tool -> "median_ns p90_ns"
    awk -v m="$1" -v t="$2" '$1 == m && $2 == t {print $3}' "$TMP/samples" | sort -n |
        awk '{v[NR] = $1} END {
            n = NR; if (n == 0) { print "nan nan"; exit }
            med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
            k = int(0.9 * n); if (k < 0.9 * n) k++
            printf "%.0f %.0f\n", med, v[k] }'
}

TOOLS=(aither aither-nd bwrap crun unshare true)
(( HYBRID )) && TOOLS+=(crun-wrap)
declare -A LABEL=(
    [aither]="aitherctl run --policy strict (via aitherd)"
    [aither-nd]="aitherctl run --no-daemon"
    [bwrap]="bwrap --unshare-all"
    [crun]="crun run (OCI bundle)"
    [unshare]="unshare (same namespaces)"
    [true]="bare /bin/true fork+exec"
    [crun-wrap]="crun hybrid wrapper alone"
)
(( HYBRID )) && LABEL[crun]="crun run (OCI bundle) + wrapper *"

declare -A MED P90
for mode in back-to-back spaced; do
    for t in "${TOOLS[@]}"; do
        read -r "MED[$mode/$t]" "P90[$mode/$t]" < <(stats "$mode" "$t")
    done
done

ms() { awk -v n="$1" 'BEGIN {printf "%.2f", n / 1e6}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2fx", a / b}'; }

echo
echo "Spawn latency of /bin/true, N=$RUNS per row, $(date -u +%Y-%m-%d), $(uname -r), $(nproc) CPUs"
echo
printf '| %-44s | %-12s | %9s | %9s | %9s |\n' tool mode "median ms" "p90 ms" "vs bwrap"
printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..46})" "$(printf -- '-%.0s' {1..14})" \
    "$(printf -- '-%.0s' {1..10})-" "$(printf -- '-%.0s' {1..10})-" "$(printf -- '-%.0s' {1..10})-"
for mode in back-to-back spaced; do
    for t in "${TOOLS[@]}"; do
        printf '| %-44s | %-12s | %9s | %9s | %9s |\n' "${LABEL[$t]}" "$mode" \
            "$(ms "${MED[$mode/$t]}")" "$(ms "${P90[$mode/$t]}")" \
            "$(ratio "${MED[$mode/$t]}" "${MED[$mode/bwrap]}")"
    done
done
echo
if (( HYBRID )); then
    echo "* cgroup v1/v2 hybrid host: each crun launch is 'unshare -m sh -c \"umount /sys/fs/cgroup/unified && exec crun run ...\"'"
    echo "  and its time includes that wrapper (measured alone as 'crun hybrid wrapper alone')."
    for mode in back-to-back spaced; do
        echo "  crun minus wrapper, $mode: ~$(ms $(( ${MED[$mode/crun]} - ${MED[$mode/crun-wrap]} ))) ms" \
             "($(ratio $(( ${MED[$mode/crun]} - ${MED[$mode/crun-wrap]} )) "${MED[$mode/bwrap]}") bwrap)"
    done
    echo
fi
echo "Ratios are median/median against bwrap in the same mode; the timing floor is the bare /bin/true row."
echo
echo "==> Aither strict via aitherd / bwrap (median): back-to-back $(ratio "${MED[back-to-back/aither]}" "${MED[back-to-back/bwrap]}")," \
     "spaced $(ratio "${MED[spaced/aither]}" "${MED[spaced/bwrap]}")"
echo "==> Aither strict --no-daemon / bwrap (median): back-to-back $(ratio "${MED[back-to-back/aither-nd]}" "${MED[back-to-back/bwrap]}")," \
     "spaced $(ratio "${MED[spaced/aither-nd]}" "${MED[spaced/bwrap]}")"
exit 0
