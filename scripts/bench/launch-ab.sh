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
#
# Through aitherd (issue 21's warm path): AITHERD_A / AITHERD_B name an aitherd for each build
# (its aither-init beside it, or AITHER_INIT_A / AITHER_INIT_B). Each build then gets a private,
# traced aitherd of its own (own state dir, socket, audit log, the default [pool]; started with
# AITHER_TRACE_T0=1 so its trace totals are CLOCK_MONOTONIC, as the client's fork time is), its
# client is pointed at it (AITHER_SOCKET), and a third table lines up, per round, the daemon's
# marks and the prepared launcher's with the client's: the median time of each mark from the
# client's "daemon request sent" (python3). Without AITHERD_*, the clients get AITHER_SOCKET
# pointing at a path where nothing listens: the standalone path, whatever runs on the host.
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
 * execvp (AITHER_SOCKET from $AB_SOCKET_NAME when set); waitpid; t1. The child's stderr is
 * appended to OUTDIR/NAME.trace, then a line "@@ ROUND WALL_NS T0_NS". Stops at the first
 * failing launch. */
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
                char key[64];
                snprintf(key, sizeof key, "AB_SOCKET_%s", argv[starts[c]]);
                const char *sock = getenv(key);
                if (sock) setenv("AITHER_SOCKET", sock, 1);
                dup2(nullfd, 0); dup2(nullfd, 1); dup2(fds[c], 2);
                execvp(argv[starts[c] + 1], &argv[starts[c] + 1]);
                _exit(127);
            }
            if (pid < 0) { perror("fork"); return 2; }
            while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
            clock_gettime(CLOCK_MONOTONIC, &t1);
            dprintf(fds[c], "@@ %ld %ld %ld\n", r, ns(t1) - ns(t0), ns(t0));
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

# --- a private aitherd per build (AITHERD_A / AITHERD_B) ------------------------------------------
DPIDS=()
trap 'for p in "${DPIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf --one-file-system "$TMP"' EXIT
DAEMONS=()
for t in "${TOOLS[@]}"; do
    d="AITHERD_$t"; i="AITHER_INIT_$t"
    if [[ -z "${!d:-}" ]]; then
        export "AB_SOCKET_$t=$TMP/$t.nodaemon.sock"
        continue
    fi
    init="${!i:-$(dirname "${!d}")/aither-init}"
    [[ -x "${!d}" && -x "$init" ]] || die "$d=${!d}: it or its aither-init ($init) is not executable"
    command -v python3 >/dev/null 2>&1 || die "python3 is needed to line up aitherd's trace"
    cp "${!d}" "$TMP/aitherd-$t"
    cp "$init" "$TMP/aither-init-$t"
    mkdir "$TMP/state-$t"
    export "AB_SOCKET_$t=$TMP/$t.sock"
    AITHER_SOCKET="$TMP/$t.sock" AITHER_STATE_DIR="$TMP/state-$t" AITHER_INIT="$TMP/aither-init-$t" \
        AITHER_AUDIT_LOG="$TMP/audit-$t.jsonl" AITHER_TRACE_LAUNCH=1 AITHER_TRACE_T0=1 \
        "$TMP/aitherd-$t" </dev/null >/dev/null 2>>"$TMP/out/$t.daemon" &
    DPIDS+=($!)
    up=0
    for _ in $(seq 200); do
        kill -0 "${DPIDS[-1]}" 2>/dev/null || { cat "$TMP/out/$t.daemon" >&2; die "aitherd $t exited during start-up"; }
        if AITHER_SOCKET="$TMP/$t.sock" "$TMP/aitherctl-$t" ps >/dev/null 2>&1; then up=1; break; fi
        sleep 0.1
    done
    (( up )) || die "aitherd $t did not answer within 20 s"
    DAEMONS+=("$t")
    echo "launch-ab.sh: $t served by a private aitherd (${!d}, sha256 $(sha256sum "${!d}" | cut -c1-12))" >&2
done

echo "launch-ab.sh: $PAIRS rounds of ${TOOLS[*]} bwrap, ${GAP_MS} ms apart; aitherctl $ARGS; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
[[ -n "${A:-}" ]] && echo "launch-ab.sh: A = $A (sha256 $(sha256sum "$A" | cut -c1-12))" >&2
echo "launch-ab.sh: B = $B (sha256 $(sha256sum "$B" | cut -c1-12))" >&2
# One unrecorded round first (page cache, the seccomp and /etc caches).
"$TMP/tracebench" 1 0 "$TMP" -- "${CMDS[@]}" || { cat "$TMP"/*.trace >&2; die "warm-up failed"; }
rm -f "$TMP"/*.trace
# The daemons' logs from here on (they append: O_APPEND survives the truncation).
for t in "${DAEMONS[@]}"; do : >"$TMP/out/$t.daemon"; done
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

# --- through aitherd: the client's and the daemon's marks on one clock ---------------------------
for t in "${DAEMONS[@]}"; do
    grep -c '"kind":"run"' "$TMP/audit-$t.jsonl" >/dev/null 2>&1 ||
        die "$t was not served by its aitherd (no run record in its audit log)"
    echo
    echo "$t through aitherd: each mark's time from the client's \"daemon request sent\" (µs): median / p25 / min"
    echo
    python3 - "$TMP/out/$t.trace" "$TMP/out/$t.daemon" <<'PY'
import re, sys
line = re.compile(r"^aither-trace: (.*?)\s+(-?[0-9.]+)\s+(-?[0-9.]+)$")
def q(v):
    v = sorted(v); n = len(v)
    m = v[(n - 1) // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return "%.0f / %.0f / %.0f" % (m, v[max(int(0.25 * n), 1) - 1], v[0])
# the client: per round, its marks' totals (µs since its fork) and the fork time
rounds, cur = [], {}
for l in open(sys.argv[1]):
    if l.startswith("@@ "):
        _, _, wall, t0 = l.split()
        t0 = int(t0) / 1000
        r = {k: t0 + v for k, v in cur.items()}
        r["@t0"], r["@end"] = t0, t0 + int(wall) / 1000
        rounds.append(r); cur = {}
    elif (m := line.match(l)):
        cur.setdefault(" ".join(m.group(1).split()), float(m.group(2)))
# the daemon (totals are CLOCK_MONOTONIC µs): a run's marks from its "accepted" on; the
# prepared launchers' lines (their totals count from their own start) are left out
runs, cur = [], None
for l in open(sys.argv[2]):
    m = line.match(l)
    if not m:
        continue
    key = " ".join(m.group(1).split())
    if key == "aitherd accepted":
        if cur and "aitherd request parsed" in cur:
            runs.append(cur)
        cur = {}
    if cur is not None and key.startswith(("aitherd ", "ctl ")):
        cur.setdefault(key, float(m.group(2)))
if cur and "aitherd request parsed" in cur:
    runs.append(cur)
# each run to the round whose client was running when aitherd parsed its request (a line of
# aitherd's that a launcher's write split is lost, not the pairing)
pairs = []
for d in runs:
    t = d["aitherd request parsed"]
    c = next((c for c in rounds if "ctl daemon request sent" in c
              and c["@t0"] <= t <= c["@end"]), None)
    if c is not None:
        pairs.append((c, d))
print("(%d of %d rounds paired with a run in aitherd's trace)" % (len(pairs), len(rounds)))
print()
rel, order = {}, []
for c, d in pairs:
    base = c["ctl daemon request sent"]
    for k, v in [x for x in c.items() if not x[0].startswith("@")] + list(d.items()):
        who = "client" if k in c and k.startswith("ctl ") and k not in d else "aitherd"
        key = (who, k.replace("ctl ", "", 1) if who == "aitherd" else k)
        if key not in rel:
            rel[key] = []; order.append(key)
        rel[key].append(v - base)
order.sort(key=lambda k: sorted(rel[k])[len(rel[k]) // 2])
print("| %-8s | %-34s | %22s |" % ("who", "mark", "from request sent"))
print("|---|---|--:|")
for k in order:
    print("| %-8s | %-34s | %22s |" % (k[0], k[1], q(rel[k])))
PY
done
