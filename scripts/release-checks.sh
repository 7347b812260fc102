#!/usr/bin/env bash
# Checks against the *release* binaries (what install.sh builds and installs) that no test
# switch weakens them (src/testhooks.rs, docs/security-model.md "No test switch in a release
# build"):
#   1. `aitherctl run` with every switch set: each is named in a warning and ignored (the run
#      succeeds although AITHER_TEST_FAIL_STAGE would fail it, nothing is written under the
#      fake cgroup root or cache dir) and the report's `overrides` is empty;
#   2. aitherd with a gpus.toml asking for the simulated backend refuses to start.
# Usage: scripts/release-checks.sh BIN_DIR   (as root; .ci/run passes
# target/x86_64-unknown-linux-gnu/release). Given debug binaries it fails: they honour the
# switches. Nothing of the host changes: a private workspace under /var/tmp, the gpus.toml on
# an overlay of /etc in a private mount namespace, a private socket and state dir.
set -euo pipefail

bin="${1:?usage: scripts/release-checks.sh BIN_DIR}"
bin="$(cd "$bin" && pwd)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
for b in aitherctl aitherd; do
    [ -x "$bin/$b" ] || { echo "release-checks: FAIL: no $bin/$b" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "release-checks: FAIL: run as root" >&2; exit 1; }

t="$(mktemp -d /var/tmp/aither-release-checks.XXXXXX)"
trap 'rm -rf "$t"' EXIT
failed=0
fail() { echo "release-checks: FAIL: $*" >&2; failed=1; }

# 1. Every switch set, each to a value that would show in a debug build.
ws="$t/ws"
mkdir -p "$ws" "$t/cgroot" "$t/cache"
switches=(
    "AITHER_CGROUP_MODE=v2"
    "AITHER_CGROUP_ROOT=$t/cgroot"
    "AITHER_HOST_ROOT=$t/hostroot"
    "AITHER_TEST_FAIL_STAGE=Rlimits"
    "AITHER_GPUS=$t/gpus.toml"
    "AITHER_GPU_ROOT=$t/gpuroot"
    "AITHER_CACHE_DIR=$t/cache"
    "AITHER_INIT=$t/no-such-init"
)
set +e
env "${switches[@]}" AITHER_POLICY_DIR="$repo/policies" AITHER_AUDIT_LOG="$t/audit.log" \
    "$bin/aitherctl" run --policy strict --workspace "$ws" --name "release-checks-$$" \
    --report "$ws/report.json" -- /bin/sh -c 'echo RAN' \
    </dev/null >"$t/run.out" 2>"$t/run.err"
rc=$?
set -e
[ "$rc" -eq 0 ] || fail "aitherctl run exited $rc (a switch was honoured?): $(cat "$t/run.err")"
grep -qx RAN "$t/run.out" || fail "the agent did not run: $(cat "$t/run.out" "$t/run.err")"
for s in "${switches[@]}"; do
    n="${s%%=*}"
    grep -q "warning: $n is a test switch and is ignored by a release build" "$t/run.err" ||
        fail "no warning that $n is ignored"
done
if [ -f "$ws/report.json" ]; then
    ov="$(jq -c '.overrides' "$ws/report.json")"
    [ "$ov" = "[]" ] || fail "the report's overrides is $ov, not []"
else
    fail "no report written"
fi
[ -z "$(ls -A "$t/cgroot")" ] || fail "something was written under AITHER_CGROUP_ROOT"
[ -z "$(ls -A "$t/cache")" ] || fail "something was written under AITHER_CACHE_DIR"

# 2. The simulated GPU backend, declared where a release build reads it (/etc/aither/gpus.toml),
# seen only by this aitherd: an overlay of /etc in a private mount namespace.
mkdir -p "$t/state"
set +e
unshare --mount --propagation private -- /bin/sh -ec '
    t="$1"; bin="$2"
    mount -t tmpfs tmpfs "$t/state"
    mkdir "$t/state/up" "$t/state/work" "$t/state/lib"
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$t/state/up,workdir=$t/state/work" /etc
    mkdir -p /etc/aither
    printf "backend = \"simulated\"\n" >/etc/aither/gpus.toml
    exec timeout 20 "$bin/aitherd" --socket "$t/state/aitherd.sock" --state-dir "$t/state/lib"
' sh "$t" "$bin" </dev/null >"$t/d.out" 2>"$t/d.err"
rc=$?
set -e
if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ]; then
    fail "aitherd started (exit $rc) with backend = \"simulated\": $(tail -5 "$t/d.err")"
fi
grep -q 'backend = \\\?"simulated\\\?" is a test backend' "$t/d.err" ||
    fail "aitherd did not say why it refused (exit $rc): $(tail -5 "$t/d.err")"

if [ "$failed" -ne 0 ]; then
    echo "release-checks: FAILED for $bin" >&2
    exit 1
fi
echo "release-checks: ok ($bin: 7 switches ignored with warnings, overrides [], simulated GPUs refused)"
