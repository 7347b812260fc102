#!/usr/bin/env bash
# Mutation testing of the protection code (issue 17, item 10; docs/testing.md "Mutation
# testing"): cargo-mutants changes one thing at a time in the named files (a function body
# replaced by a default, an operator swapped, a match arm deleted) and runs the tests that cover
# them; a mutant the tests still pass is a protection no test checks.
#
# Usage (as root: the suites make sandboxes):
#   scripts/mutants.sh [FILE...]        default: crates/aither-core/src/hostpath.rs
#                                       crates/aither-core/src/sandbox/workspace.rs
# Environment:
#   MUTANTS_TESTS    arguments of `cargo test` in the mutated package for every mutant
#                    (default: "--lib": aither-core's unit tests)
#   MUTANTS_RE       only mutants whose description matches this regex (cargo mutants --re),
#                    e.g. ' -> .* with ' for whole-function replacements only
#   MUTANTS_TIMEOUT  seconds per mutant's tests (default 600); builds get 1200
#   MUTANTS_OUT      where results go (default target/mutants): mutants.out/{caught,missed,
#                    timeout,unviable}.txt and outcomes.json
# Installs cargo-mutants from crates.io when absent. Runs in place (the mutated file is restored
# after each mutant; the tree is checked clean before and after), reusing target/, one mutant
# at a time. Re-runnable: every run starts over and replaces MUTANTS_OUT. Exit status: 0 when
# every mutant was caught (or unviable), 2 when some were missed (cargo-mutants' code).
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo mutants --version >/dev/null 2>&1; then
    cargo install --locked cargo-mutants
fi

files=("$@")
[ "${#files[@]}" -gt 0 ] || files=(crates/aither-core/src/hostpath.rs crates/aither-core/src/sandbox/workspace.rs)
tests="${MUTANTS_TESTS:---lib}"
timeout="${MUTANTS_TIMEOUT:-600}"
out="${MUTANTS_OUT:-target/mutants}"

# In place means the working tree is the scratch copy: start from a clean one, and check
# that every mutation was undone.
if ! git diff --quiet -- "${files[@]}"; then
    echo "mutants: uncommitted changes in ${files[*]}: commit or stash them first" >&2
    exit 1
fi

# --workspace: the files are in aither-core since the crate split (issue 19). cargo-mutants
# runs the mutated package's tests (aither-core: MUTANTS_TESTS there); the end-to-end suites
# are the daemon crate's, so a mutant missed here is re-checked with them (docs/testing.md).
args=(--workspace --in-place --no-shuffle --timeout "$timeout" --build-timeout 1200 --output "$out")
for f in "${files[@]}"; do args+=(--file "$f"); done
[ -z "${MUTANTS_RE:-}" ] || args+=(--re "$MUTANTS_RE")
mkdir -p "$out"
echo "mutants: ${files[*]} with cargo test $tests${MUTANTS_RE:+ (only /$MUTANTS_RE/)}"
set +e
# shellcheck disable=SC2086 # MUTANTS_TESTS is a list of arguments
cargo mutants "${args[@]}" -- $tests
rc=$?
set -e
if ! git diff --quiet -- "${files[@]}"; then
    echo "mutants: FAIL: ${files[*]} still differ from HEAD after the run" >&2
    exit 1
fi
for k in caught missed timeout unviable; do
    f="$out/mutants.out/$k.txt"
    printf '%-9s %s\n' "$k" "$( [ -f "$f" ] && wc -l <"$f" || echo 0)"
done
if [ -s "$out/mutants.out/missed.txt" ]; then
    echo "missed (each needs a test or a line in docs/testing.md):"
    cat "$out/mutants.out/missed.txt"
fi
exit "$rc"
