#!/usr/bin/env bash
# The kernel-matrix tier (docs/kernels.md): boots the stock kernels of Debian 11, 12 and 13
# (5.10, 6.1, 6.12, from Debian's kernel packages) under qemu with virtme-ng, the host's root
# shared read-only, and runs scripts/kernel-matrix-guest.sh in each: doctor, the core of the
# hostile probes, real work, the limits. Every kernel boots with pure cgroup v2; one more boot
# mounts cgroup v1 hierarchies instead. KVM when /dev/kvm works, TCG otherwise.
#
# Usage (as root): scripts/kernel-matrix.sh [BIN_DIR]
#   BIN_DIR: the static binaries to test (default: build them into target/<triple>/release).
#   AITHER_KM_CACHE: where kernels are kept (default /var/cache/aither-kernel-matrix).
#   AITHER_KM_KERNELS: which suites to boot (default "bullseye bookworm trixie").
#   AITHER_KM_V1: the suite booted a second time with cgroup v1 (default bookworm; "" = none).
#   AITHER_KM_DEVICES_TEST: the devices test binary (default: built with cargo, debug).
# Exits non-zero when a guest fails a check or does not finish. Results: $CACHE/results/.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${AITHER_KM_CACHE:-/var/cache/aither-kernel-matrix}"
SUITES="${AITHER_KM_KERNELS:-bullseye bookworm trixie}"
V1_SUITE="${AITHER_KM_V1-bookworm}"
TRIPLE=x86_64-unknown-linux-gnu
VIRTME_NG_VERSION=1.42
t0=$(date +%s)
say() { echo "kernel-matrix: $*" >&2; }

# 1. Tools: qemu (Debian), kmod (depmod for the kernels' modules), busybox (virtme-ng's
# initramfs), e2fsprogs (the workspace image, made in the guest), virtme-ng (PyPI).
need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || need_pkgs+=(kmod)
command -v busybox >/dev/null || need_pkgs+=(busybox-static)
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || need_pkgs+=(e2fsprogs)
command -v python3 >/dev/null || need_pkgs+=(python3 python3-pip)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  say "installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if ! command -v vng >/dev/null; then
  say "installing virtme-ng $VIRTME_NG_VERSION (PyPI)"
  python3 -m pip install -q "virtme-ng==$VIRTME_NG_VERSION" ||
    python3 -m pip install -q --break-system-packages "virtme-ng==$VIRTME_NG_VERSION"
fi

# 2. Kernels: each suite's linux-image-amd64 names the current kernel package; it is fetched
# from Debian's archive with a private apt configuration and unpacked into the cache.
mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/archives/partial" "$CACHE/kernels" "$CACHE/results"
src="$CACHE/apt/sources.list"
: >"$src"
for s in $SUITES $V1_SUITE; do
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $s main" >>"$src"
done
sort -u -o "$src" "$src"
APT=(-o "Dir::Etc::sourcelist=$src" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$CACHE/apt/lists"
  -o "Dir::Cache=$CACHE/apt" -o Debug::NoLocking=1)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || apt-get install -y -qq debian-archive-keyring >/dev/null
apt-get "${APT[@]}" update -qq
kernel_dir() { # suite → the unpacked kernel's root, fetched once
  local suite="$1" pkg dir
  pkg="$(apt-cache "${APT[@]}" show "linux-image-amd64/$suite" | sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -n1)"
  [ -n "$pkg" ] || { say "no kernel package for $suite"; return 1; }
  dir="$CACHE/kernels/$pkg"
  if [ ! -d "$dir/boot" ]; then
    (cd "$CACHE/apt/archives" && apt-get "${APT[@]}" download -qq "$pkg/$suite" 2>/dev/null)
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    dpkg-deb -x "$CACHE/apt/archives/${pkg}"_*.deb "$dir.tmp"
    rm -f "$CACHE/apt/archives/${pkg}"_*.deb
    # Debian 13 keeps modules under /usr/lib; virtme-ng looks in <root>/lib/modules.
    [ -d "$dir.tmp/lib/modules" ] || ln -s usr/lib "$dir.tmp/lib"
    mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

# 3. The binaries: static (glibc static-pie), so the guest needs nothing from the host's
# library versions; the tier tests exactly what install.sh installs.
BIN="${1:-}"
if [ -z "$BIN" ]; then
  (cd "$HERE" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$TRIPLE" --workspace --bins 2>&1 | tail -n 3) >&2
  BIN="$HERE/target/$TRIPLE/release"
fi
BIN="$(cd "$BIN" && pwd)"
for b in aitherctl aitherd aither-init aither-probe; do
  [ -x "$BIN/$b" ] || { say "$BIN/$b missing"; exit 1; }
done
# The BPF device program is tested through aither-init with a spec (no GPU, and release builds
# refuse the simulated backend): runtime/aither-init/tests/devices.rs, a debug test binary
# (built here if needed; .ci/run has built it already), run in each pure-v2 guest.
DEVTEST="${AITHER_KM_DEVICES_TEST:-}"
if [ -z "$DEVTEST" ]; then
  DEVTEST="$(cd "$HERE" && cargo test --locked -p aither-init --test devices --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "devices":
        print(m["executable"])' | tail -n1)"
fi
[ -x "$DEVTEST" ] || { say "the devices test binary was not built ($DEVTEST)"; exit 1; }

# 4. Boot each kernel. KVM only when it answers (nested KVM has hung on some hosts: TCG is
# the fallback, ~15-25 s a boot, and what CI gets on most cloud runners).
kvm=(--disable-kvm)
if [ -w /dev/kvm ] && [ "${AITHER_KM_KVM:-auto}" != off ]; then
  probe_k="$(ls "$(kernel_dir "${SUITES%% *}")"/boot/vmlinuz-*)"
  if timeout 120 vng --run "$probe_k" --memory 1G --exec true </dev/null >/dev/null 2>&1; then
    kvm=()
  fi
fi
say "accelerator: $([ "${#kvm[@]}" -eq 0 ] && echo KVM || echo "TCG (no working KVM)")"
failed=0
table="$CACHE/results/table.md"
echo "| kernel | cgroup | Landlock ABI | stand-ins in strict | checks |" >"$table"
echo "|---|---|---|---|---|" >>"$table"
boot() { # suite mode
  local suite="$1" mode="$2" dir kimg out t rc
  dir="$(kernel_dir "$suite")"
  kimg="$(ls "$dir"/boot/vmlinuz-*)"
  out="$CACHE/results/$suite-$mode"
  rm -rf "$out" && mkdir -p "$out"
  t=$(date +%s)
  say "booting $(basename "$kimg") ($suite, cgroup $mode)"
  local try
  # A guest that never reached its script (no checks file: qemu or the guest's init failed,
  # seen once in about ten TCG boots here) or that died before finishing without any check
  # failing (qemu ended with an empty console 25 s into a 6.12 run once in about twenty) is
  # booted again, at most twice, and the retry is said; a guest that failed a check is never
  # retried, and a guest that dies three times fails the tier.
  for try in 1 2 3; do
    rc=0
    rm -f "$out/checks"
    # --rodir: the kernel's own modules (loop, ext4) for the guest: the cache is under /var,
    # which the guest does not see through the shared root, and the host has no modules of
    # these kernels.
    timeout 900 vng --run "$kimg" "${kvm[@]}" --memory 2G --cpus 2 --rwdir "$out" --rodir "$dir" \
      --exec "$HERE/scripts/kernel-matrix-guest.sh $mode $BIN $out $dir $DEVTEST" >"$out/console" 2>&1 </dev/null || rc=$?
    if [ ! -e "$out/checks" ]; then
      say "$suite/$mode: the guest never ran its checks (boot $try, vng exit $rc): $(tail -n 3 "$out/console" | tr '\n' ' ')"
    elif grep -qx DONE "$out/checks" || grep -q '^CHECK .* FAIL' "$out/checks"; then
      break
    else
      say "$suite/$mode: the guest died after $(grep -c '^CHECK ' "$out/checks") checks, none failed (boot $try, vng exit $rc): $(tail -n 3 "$out/console" | tr '\n' ' ')"
    fi
    cp "$out/console" "$out/console.boot$try" 2>/dev/null || true
  done
  local secs=$(($(date +%s) - t)) abi stand pass fail
  pass="$(grep -c '^CHECK .* pass' "$out/checks" 2>/dev/null || true)"
  fail="$(grep -c '^CHECK .* FAIL' "$out/checks" 2>/dev/null || true)"
  abi="$(sed -n 's/^landlock kernel=\([0-9]*\).*/\1/p' "$out/stand-ins" 2>/dev/null || true)"
  stand="$(sed -n 's/^stand-in: \([a-z-]*\) .*stood in for by \(.*\)/\1 → \2/p' "$out/stand-ins" 2>/dev/null | paste -sd ';' - || true)"
  say "$suite/$mode: ${pass:-0} passed, ${fail:-0} failed, ${secs}s (vng exit $rc)"
  grep '^CHECK .* FAIL' "$out/checks" >&2 || true
  if ! grep -qx DONE "$out/checks" 2>/dev/null; then
    say "$suite/$mode: the guest did not finish; see $out/log and $out/console"
    fail=$((${fail:-0} + 1))
  fi
  echo "| $(cat "$out/kernel" 2>/dev/null || echo "$suite") | $mode | ${abi:-?} | ${stand:-none} | ${pass:-0} pass, ${fail:-0} fail |" >>"$table"
  [ "${fail:-0}" -eq 0 ] || failed=1
}
for s in $SUITES; do boot "$s" v2; done
[ -z "$V1_SUITE" ] || boot "$V1_SUITE" v1
cat "$table"
say "total $(($(date +%s) - t0))s"
exit "$failed"
