#!/usr/bin/env bash
# A/B harness for launch work: two aitherctl builds (A = before, B = after), interleaved with
# bwrap, each launch traced (AITHER_TRACE_LAUNCH=1), so a change to the launch path is judged by
# its stage times and by its wall time against the same bwrap samples.
#
# Per round: A, B, bwrap, the order rotated by one each round (drift and other users' load hit
# all three; back to back, no tool always follows the same one).
# Each launch: a tiny C helper (compiled into a temp dir) reads CLOCK_MONOTONIC, forks, sets
# AITHER_TRACE_T0 to that reading in the child and execs; aitherctl's first trace line
# ("ctl exec→main") is then the time from fork to its main (loader, relocations, libc, Rust
# start-up). The helper waits and records the wall time; stdin/stdout on /dev/null, stderr (the
# trace) to a file per tool.
#
# Printed: per tool the wall-time median / p25 / min and median vs bwrap; then per trace line
# (aitherctl's own "ctl" steps, the launcher's and pid 1's stages) the step's median, p25 and
# minimum in µs for A and B side by side, and B − A of the medians.
#
# Usage (as root, from anywhere):
#   A=/path/to/old/aitherctl B=/path/to/new/aitherctl [PAIRS=150] [GAP_MS=150] \
#       [ARGS='run --policy strict -- /bin/true'] scripts/bench/launch-ab.sh
#   PAIRS   rounds (default 150, at least 20)
#   GAP_MS  sleep before every launch (default 150; 0 = back to back)
#   ARGS    aitherctl's arguments (default: run --policy strict -- /bin/true), split on spaces
# A and B are copied to the temp dir first (a concurrent rebuild cannot change them mid-run).
# B alone (A unset) measures one build against bwrap.
set -euo pipefail

PAIRS="${PAIRS:-150}"
GAP_MS="${GAP_MS:-150}"
ARGS="${ARGS:-run --policy strict -- /bin/true}"
die() { echo "launch-ab.sh: $*" >&2; exit 1; }
[[ "$PAIRS" =~ ^[0-9]+$ ]] && (( PAIRS >= 20 )) || die "PAIRS must be an integer >= 20"
[[ "$GAP_MS" =~ ^[0-9]+$ ]] || die "GAP_MS must be an integer"
(( EUID == 0 )) || die "must run as root"
[[ -n "${B:-}" && -x "$B" ]] || die "B=<aitherctl binary> is required (and A=<another> for a comparison)"
[[ -z "${A:-}" || -x "$A" ]] || die "A=$A is not an executable"
command -v bwrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }
command -v gcc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq gcc >/dev/null; }

TMP="$(mktemp -d /tmp/aither-launch-ab.XXXXXX)"
trap 'rm -rf --one-file-system "$TMP"' EXIT
trap 'exit 130' INT TERM

cat >"$TMP/tracebench.c" <<'EOF'
/* tracebench RUNS GAP_US OUTDIR -- NAME ARGV... [ ::: NAME ARGV... ]...
 * Round-robin, the order rotated by one each round (back to back, a launch pays for what the
 * previous one left to the kernel: no tool always follows the same one); per launch: t0 = CLOCK_MONOTONIC, fork, in the child AITHER_TRACE_T0=t0 and
 * execvp; waitpid; t1. The child's stderr is appended to OUTDIR/NAME.trace after a line
 * "@@ ROUND WALL_NS". Stops at the first failing launch. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long ns(struct timespec t) { return t.tv_sec * 1000000000L + t.tv_nsec; }

int main(int argc, char **argv) {
    if (argc < 6 || strcmp(argv[4], "--")) { fprintf(stderr, "usage: see source\n"); return 2; }
    long runs = atol(argv[1]), gap = atol(argv[2]);
    const char *dir = argv[3];
    int nullfd = open("/dev/null", O_RDWR | O_CLOEXEC);
    int ncmd = 0, starts[16], fds[16];
    for (int i = 5; i < argc && ncmd < 16;) {
        starts[ncmd] = i;
        int j = i;
        while (j < argc && strcmp(argv[j], ":::")) j++;
        argv[j < argc ? j : argc] = NULL; /* terminates this command's argv */
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.trace", dir, argv[i]);
        fds[ncmd] = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (fds[ncmd] < 0) { perror(path); return 2; }
        ncmd++;
        i = j + 1;
    }
    struct timespec gapts = { gap / 1000000, (gap % 1000000) * 1000 };
    for (long r = 0; r < runs; r++) {
        for (int k = 0; k < ncmd; k++) {
            int c = (k + r) % ncmd; /* rotated each round: no tool always follows the same one */
            if (gap > 0) nanosleep(&gapts, NULL);
            struct timespec t0, t1;
            int st;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            pid_t pid = fork();
            if (pid == 0) {
                char env[64];
                snprintf(env, sizeof env, "%ld", ns(t0));
                setenv("AITHER_TRACE_T0", env, 1);
                setenv("AITHER_TRACE_LAUNCH", "1", 1);
                dup2(nullfd, 0); dup2(nullfd, 1); dup2(fds[c], 2);
                execvp(argv[starts[c] + 1], &argv[starts[c] + 1]);
                _exit(127);
            }
            if (pid < 0) { perror("fork"); return 2; }
            while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
            clock_gettime(CLOCK_MONOTONIC, &t1);
            dprintf(fds[c], "@@ %ld %ld\n", r, ns(t1) - ns(t0));
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                fprintf(stderr, "tracebench: %s failed in round %ld; see %s/%s.trace\n",
                        argv[starts[c]], r, dir, argv[starts[c]]);
                return 1;
            }
        }
    }
    return 0;
}
EOF
gcc -O2 -Wall -o "$TMP/tracebench" "$TMP/tracebench.c"

read -r -a ARGV <<<"$ARGS"
CMDS=()
TOOLS=()
if [[ -n "${A:-}" ]]; then
    cp "$A" "$TMP/aitherctl-A"
    CMDS+=(A "$TMP/aitherctl-A" "${ARGV[@]}" :::)
    TOOLS+=(A)
fi
cp "$B" "$TMP/aitherctl-B"
CMDS+=(B "$TMP/aitherctl-B" "${ARGV[@]}" :::)
TOOLS+=(B)
CMDS+=(bwrap bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc /bin/true)
mkdir "$TMP/ws" "$TMP/out"
cd "$TMP/ws"

echo "launch-ab.sh: $PAIRS rounds of ${TOOLS[*]} bwrap, ${GAP_MS} ms apart; aitherctl $ARGS; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
[[ -n "${A:-}" ]] && echo "launch-ab.sh: A = $A (sha256 $(sha256sum "$A" | cut -c1-12))" >&2
echo "launch-ab.sh: B = $B (sha256 $(sha256sum "$B" | cut -c1-12))" >&2
# One unrecorded round first (page cache, the seccomp and /etc caches).
"$TMP/tracebench" 1 0 "$TMP" -- "${CMDS[@]}" || { cat "$TMP"/*.trace >&2; die "warm-up failed"; }
rm -f "$TMP"/*.trace
"$TMP/tracebench" "$PAIRS" $((GAP_MS * 1000)) "$TMP/out" -- "${CMDS[@]}" ||
    { tail -20 "$TMP"/out/*.trace >&2; die "run failed"; }

# quantiles of a column of numbers on stdin: "median p25 min" (median: mean of the middle two)
q() { sort -n | awk '{v[NR]=$1} END {n=NR; if (!n) {print "- - -"; exit}
        m=(n%2)?v[(n+1)/2]:(v[n/2]+v[n/2+1])/2; k=int(0.25*n); if (k<1) k=1
        printf "%.0f %.0f %.0f\n", m, v[k], v[1]}'; }

echo
echo "Wall time per launch (µs), $PAIRS launches each, $(date -u +%Y-%m-%dT%H:%MZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '| %-6s | %9s | %9s | %9s | %8s |\n' tool median p25 min "vs bwrap"
printf '|---|--:|--:|--:|--:|\n'
BW_MED=$(awk '$1=="@@" {print $3/1000}' "$TMP/out/bwrap.trace" | q | cut -d' ' -f1)
for t in "${TOOLS[@]}" bwrap; do
    read -r m p n < <(awk '$1=="@@" {print $3/1000}' "$TMP/out/$t.trace" | q)
    printf '| %-6s | %9s | %9s | %9s | %7.2fx |\n' "$t" "$m" "$p" "$n" "$(awk -v a="$m" -v b="$BW_MED" 'BEGIN{print a/b}')"
done

# Trace lines: "aither-trace: WHO NAME... TOTAL STEP"; the key is WHO NAME, the value the step
# (the last field), or the total for lines with one number (started-seen, agent-ran+reaped).
steps() {  # $1 tool -> "KEY<TAB>µs" per line
    awk '/^aither-trace: / && $2 != "stage" {
            n = NF; single = 0
            if ($n ~ /^landlock=/) { n--; single = 1 }
            num = "^-?[0-9.]+$"
            keyend = (!single && $(n-1) ~ num) ? n - 2 : n - 1
            key = $2; for (i = 3; i <= keyend; i++) key = key " " $i
            printf "%s\t%s\n", key, $n
         }' "$TMP/out/$1.trace"
}
for t in "${TOOLS[@]}"; do steps "$t" >"$TMP/$t.steps"; done
echo
echo "Trace steps (µs): median / p25 / min"
echo
if [[ -n "${A:-}" ]]; then
    printf '| %-34s | %-20s | %-20s | %7s |\n' step "A" "B" "B−A med"
    printf '|---|--:|--:|--:|\n'
else
    printf '| %-34s | %-20s |\n' step "B"
    printf '|---|--:|\n'
fi
cat "$TMP"/*.steps | cut -f1 | awk '!seen[$0]++' | while IFS= read -r key; do
    read -r bm bp bn < <(awk -F'\t' -v k="$key" '$1==k {print $2}' "$TMP/B.steps" | q)
    if [[ -n "${A:-}" ]]; then
        read -r am ap an < <(awk -F'\t' -v k="$key" '$1==k {print $2}' "$TMP/A.steps" | q)
        d=$([[ "$am" == - || "$bm" == - ]] && echo "-" || echo $((bm - am)))
        printf '| %-34s | %20s | %20s | %7s |\n' "$key" "$am / $ap / $an" "$bm / $bp / $bn" "$d"
    else
        printf '| %-34s | %20s |\n' "$key" "$bm / $bp / $bn"
    fi
done
echo
echo "Lines with one number (started-seen, agent-ran+reaped) are totals from the launcher's start."
