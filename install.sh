#!/usr/bin/env bash
# Aither installer: on a fresh Debian 12 (or newer) machine, as root. Idempotent.
#
#   ./install.sh                 # build and install to /usr/local, policies to /etc/aither
#   PREFIX=/opt/aither ./install.sh
#   AITHER_POLICY_DIR=/srv/aither/policies ./install.sh
#
# Installs: the system packages the build and the test suite need, a Rust toolchain when none
# is present (rustup from the distribution is not used: Debian 12's rustc is too old), static
# release binaries `aitherctl`, `aitherd`, `aither-init` (static: ≈0.4 ms less per launch) and
# `aither-notify`, the Python SDK (aither.py), the policies, a commented
# /etc/aither/aitherd.toml (never over an existing one), the state and cache directories,
# the group `aither` (members may use aitherd's socket), and starts aitherd: as a systemd
# service where systemd runs, otherwise in the background with a pidfile
# (/run/aither/aitherd.pid, log in /var/log/aither/aitherd.log).
set -euo pipefail

PREFIX="${PREFIX:-/usr/local}"
POLICY_DIR="${AITHER_POLICY_DIR:-/etc/aither/policies}"
STATE_DIR="${AITHER_STATE_DIR:-/var/lib/aither}"
CACHE_DIR="${AITHER_CACHE_DIR:-/var/cache/aither}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (Aither creates namespaces and cgroups and maps agents to unprivileged host uids)"
[ "$(uname -s)" = Linux ] || die "Aither runs on Linux only"

# 1. System packages. Build: a C toolchain and pkg-config. Tests and real agent work under
#    strict: python3, git, make, sqlite3. Benchmarks compare against bubblewrap, crun, runc,
#    the bus against redis-server (scripts/bench/bus.sh), the egress gateway against tinyproxy
#    (scripts/bench/egress.sh, which runs its own instance; the packaged service is not needed);
#    tests/export.rs runs exported OCI bundles under crun and runc; python3-venv holds the
#    Python test clients (installed with the SDK below); e2fsprogs (mke2fs) formats the images
#    of quota'd layered workspaces (docs/workspaces.md "Disk quota").
PKGS=(build-essential pkg-config ca-certificates curl python3 python3-venv git make sqlite3 util-linux e2fsprogs iproute2 procps bubblewrap crun runc redis-server tinyproxy)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get: install them by hand"
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Rust.
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    say "installing the Rust toolchain (rustup, stable, minimal profile)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt >/dev/null
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# 3. Kernel features the default policy needs. Report; `aitherctl run` refuses by itself when
#    a policy's requirement is missing (fail closed), so this is advice, not a gate.
if [ -r /proc/sys/user/max_user_namespaces ] && [ "$(cat /proc/sys/user/max_user_namespaces)" = 0 ]; then
  say "warning: user namespaces are disabled (user.max_user_namespaces = 0); sandboxes cannot start"
fi
grep -qw landlock /sys/kernel/security/lsm 2>/dev/null || say "note: cannot confirm Landlock in /sys/kernel/security/lsm; aitherctl checks the ABI itself at launch"

# 4. Build static release binaries (glibc static-pie; proc-macros stay dynamic via --target).
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
say "building release binaries for $TRIPLE"
(cd "$HERE" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$TRIPLE" --workspace --bins 2>&1 | tail -n 3) >&2
OUT="$HERE/target/$TRIPLE/release"
for b in aitherctl aitherd aither-init aither-notify; do
  [ -x "$OUT/$b" ] || die "build produced no $b in $OUT"
done
# With an NVIDIA driver, aitherd must load libnvidia-ml at run time, which a static binary
# cannot (dlopen would bring a second libc): that host gets a dynamic aitherd (docs/gpu.md).
AITHERD="$OUT/aitherd"
if [ -e /proc/driver/nvidia/version ] || ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  say "NVIDIA driver found: building a dynamically linked aitherd for NVML"
  (cd "$HERE" && cargo build --release --locked --bin aitherd 2>&1 | tail -n 3) >&2
  AITHERD="$HERE/target/release/aitherd"
fi

# 5. Install.
install -d -m 0755 "$PREFIX/bin" "$POLICY_DIR" "$POLICY_DIR/seccomp"
for b in aitherctl aitherd aither-init aither-notify; do
  src="$OUT/$b"; [ "$b" = aitherd ] && src="$AITHERD"
  # Replaced by rename, so that running copies (a daemon, shims) keep their old inode.
  install -m 0755 "$src" "$PREFIX/bin/.$b.new" && mv -f "$PREFIX/bin/.$b.new" "$PREFIX/bin/$b"
done
# GPUs: NVML by default; an example of simulated devices beside it (docs/gpu.md).
install -m 0644 "$HERE/scripts/gpus.toml.example" "$(dirname "$POLICY_DIR")/gpus.toml.example"
# The Python SDK where the system python3 finds it (inside sandboxes too: /usr is mounted).
# (The distribution's python3: it is the one agents see in their sandboxes.)
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3
PYSITE="$("$PY" -c 'import site; print(next((p for p in site.getsitepackages() if p.startswith("/usr/local")), ""))' 2>/dev/null || true)"
if [ -n "$PYSITE" ]; then
  install -d -m 0755 "$PYSITE" && install -m 0644 "$HERE/runtime/python/aither.py" "$PYSITE/aither.py"
fi
# The Python clients the test suite drives the binaries with, in a virtual environment of
# their own (the system python3 is externally managed, PEP 668): the official MCP client
# (`mcp` from PyPI) for tests/mcp.rs (docs/mcp.md). Not needed to run Aither; the test fails,
# never skips, without it.
TEST_VENV=/usr/local/lib/aither/test-venv
if ! "$TEST_VENV/bin/python3" -c 'import mcp' 2>/dev/null; then
  say "installing the MCP Python client for the tests in $TEST_VENV"
  "$PY" -m venv "$TEST_VENV" && "$TEST_VENV/bin/pip" install -q 'mcp>=1.9' ||
    say "warning: could not install the MCP Python client (pip install mcp); tests/mcp.rs will fail"
fi
getent group aither >/dev/null || groupadd --system aither
# Members act on every user's agents, as root does (docs/security-model.md, who may do what).
getent group aither-admin >/dev/null || groupadd --system aither-admin
for f in "$HERE"/policies/*.toml; do install -m 0644 "$f" "$POLICY_DIR/"; done
install -m 0644 "$HERE"/policies/seccomp/*.toml "$POLICY_DIR/seccomp/"
# aitherd's configuration, every default shown commented out (docs/daemon.md "Configuration
# file"). An existing file is the operator's and is never overwritten: the shipped one goes
# beside it as aitherd.toml.default for comparison.
install -d -m 0755 /etc/aither
if [ -e /etc/aither/aitherd.toml ] || [ -L /etc/aither/aitherd.toml ]; then
  install -m 0644 -o root -g root "$HERE/scripts/aitherd.toml" /etc/aither/aitherd.toml.default
  say "kept /etc/aither/aitherd.toml (the shipped defaults: /etc/aither/aitherd.toml.default)"
else
  install -m 0644 -o root -g root "$HERE/scripts/aitherd.toml" /etc/aither/aitherd.toml
fi
install -d -m 0700 "$STATE_DIR"
install -d -m 0755 "$CACHE_DIR"
# Compiled seccomp filters and /etc views are per-version caches: start clean.
rm -rf "${CACHE_DIR:?}/seccomp" "${CACHE_DIR:?}/etc"

say "installed aitherctl, aitherd, aither-init, aither-notify in $PREFIX/bin, policies in $POLICY_DIR"
"$PREFIX/bin/aitherctl" --version >&2
# Man pages and shell completions, generated from the CLI itself (docs/agents.md). Bash's
# directory exists where bash-completion is installed; zsh and fish get theirs when present.
"$PREFIX/bin/aitherctl" man --out "$PREFIX/share/man/man1" >/dev/null
[ -d /usr/share/bash-completion/completions ] &&
  "$PREFIX/bin/aitherctl" completions bash >/usr/share/bash-completion/completions/aitherctl
if command -v zsh >/dev/null; then
  install -d -m 0755 "$PREFIX/share/zsh/site-functions"
  "$PREFIX/bin/aitherctl" completions zsh >"$PREFIX/share/zsh/site-functions/_aitherctl"
fi
if command -v fish >/dev/null; then
  install -d -m 0755 /usr/share/fish/vendor_completions.d
  "$PREFIX/bin/aitherctl" completions fish >/usr/share/fish/vendor_completions.d/aitherctl.fish
fi
say "man pages in $PREFIX/share/man/man1 (man aitherctl-spawn); completions for bash$(command -v zsh >/dev/null && echo ", zsh")$(command -v fish >/dev/null && echo ", fish")"

# 6. Start (or restart, onto the new binary) aitherd. Running agents survive a daemon restart.
RUN_DIR=/run/aither
PIDFILE="$RUN_DIR/aitherd.pid"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  sed "s#/usr/local/bin/aitherd#$PREFIX/bin/aitherd#" "$HERE/scripts/aitherd.service" > /etc/systemd/system/aitherd.service
  systemctl daemon-reload
  systemctl enable aitherd >/dev/null 2>&1 || true
  systemctl restart aitherd
else
  install -d -m 0755 "$RUN_DIR" /var/log/aither
  if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    old="$(cat "$PIDFILE")"
    say "stopping the running aitherd ($old)"
    kill -TERM "$old"
    for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
  fi
  say "starting aitherd in the background (no systemd here); log: /var/log/aither/aitherd.log"
  setsid "$PREFIX/bin/aitherd" --pidfile "$PIDFILE" </dev/null >>/var/log/aither/aitherd.log 2>&1 &
fi
for _ in $(seq 100); do
  AITHER_SOCKET="$RUN_DIR/aitherd.sock" "$PREFIX/bin/aitherctl" ps >/dev/null 2>&1 && break
  sleep 0.1
done
AITHER_SOCKET="$RUN_DIR/aitherd.sock" "$PREFIX/bin/aitherctl" ps >/dev/null 2>&1 \
  || die "aitherd did not start; see /var/log/aither/aitherd.log (or journalctl -u aitherd)"
say "aitherd is running (socket $RUN_DIR/aitherd.sock)"
say "try: aitherctl run --policy strict -- sh -c 'id; ls /'"
say " or: aitherctl spawn --policy strict hello -- sh -c 'while :; do date; sleep 5; done'; aitherctl logs -f hello"
