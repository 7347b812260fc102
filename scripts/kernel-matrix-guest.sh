#!/usr/bin/env bash
# Runs inside one guest of the kernel matrix (scripts/kernel-matrix.sh boots it): the host's
# root is shared read-only, /tmp and /var are the guest's own overlays, OUT is a directory
# shared read-write with the host. Usage: kernel-matrix-guest.sh v2|v1 BIN_DIR OUT KERNEL_DIR
# (KERNEL_DIR: the unpacked kernel package, whose lib/modules the guest loads loop and ext4
# from: the shared root has no modules of these kernels).
#
# Each check writes one line `CHECK <name> pass|FAIL <detail>` to OUT/checks; the host script
# fails the tier on any FAIL or on a missing `DONE` line (a guest that crashed or hung).
set -uo pipefail
mode="$1" bin="$2" out="$3" kdir="${4:-}" devtest="${5:-}"
exec >"$out/log" 2>&1
# The checks run as CI's do, without a terminal: the guest's console is a tty, and a run with
# a terminal on stdin takes it (raw mode, relay) and is stopped by SIGTTOU whenever the script
# is not the console's foreground job. Terminal handling has its own tests on the host
# (tests/host_terminal.rs).
exec </dev/null
export PATH="$bin:/usr/sbin:/usr/bin:/sbin:/bin"
export AITHER_STATE_DIR=/var/lib/aither
export AITHER_AUDIT_LOG=/var/log/aither-audit.jsonl
mkdir -p /var/lib/aither /var/cache/aither
uname -r >"$out/kernel"
: >"$out/checks"

# What every Aither process is doing (state, kernel wait channel, stack, descriptors): written
# for a check that hangs, before it is killed.
hang_dump() {
  local p
  for p in $(pgrep -f 'aitherctl|aitherd|aither-init|aither-probe'); do
    echo "--- pid $p ($(cat "/proc/$p/comm" 2>/dev/null)) state $(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) ppid $(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) wchan $(cat "/proc/$p/wchan" 2>/dev/null)"
    cat "/proc/$p/stack" 2>/dev/null
    ls -l "/proc/$p/fd" 2>/dev/null
  done
}

CHECK_LIMIT="${CHECK_LIMIT:-240}"
check() { # name, then the command; pass when it exits 0
  local name="$1"
  shift
  local detail t=$SECONDS watchdog
  echo "== $name: $*"
  # A hung check fails on its own, with what was running, instead of eating the guest's time.
  # The watchdog acts only while the check's flag is absent: ending its sleep early (below)
  # lets it run on, and it must then do nothing.
  local flag="/tmp/km-check-done-$name"
  rm -f "$flag"
  (
    sleep "$CHECK_LIMIT"
    [ ! -e "$flag" ] || exit 0
    { echo "hung after ${CHECK_LIMIT}s: $*"; hang_dump; } >"$out/hung-$name" 2>&1
    pkill -9 -f 'aitherctl|aither-init|aither-probe'
  ) &
  watchdog=$!
  if detail="$("$@" 2>&1)"; then
    echo "CHECK $name pass $((SECONDS - t))s ${detail//$'\n'/ | }" >>"$out/checks"
  else
    [ ! -e "$out/hung-$name" ] || detail="hung (see hung-$name): $detail"
    echo "CHECK $name FAIL $((SECONDS - t))s ${detail//$'\n'/ | }" >>"$out/checks"
  fi
  touch "$flag"
  pkill -P "$watchdog" sleep 2>/dev/null
  wait "$watchdog" 2>/dev/null
}

# 1. The cgroup mode under test. virtme-ng mounts cgroup2 at /sys/fs/cgroup (pure v2). For
# v1, as systemd.unified_cgroup_hierarchy=0 without the unified mount: every controller on
# its own v1 hierarchy (no controller is in use on the v2 root yet, so they can move).
if [ "$mode" = v1 ]; then
  umount /sys/fs/cgroup
  mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
  for c in cpu,cpuacct cpuset memory pids devices freezer; do
    mkdir -p "/sys/fs/cgroup/$c"
    mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
  done
  # systemd's layout: the co-mounted hierarchy is also reachable by each controller's name.
  ln -s cpu,cpuacct /sys/fs/cgroup/cpu
  ln -s cpu,cpuacct /sys/fs/cgroup/cpuacct
  # aither's v1 backend copies cpuset.cpus/mems from the parent; memsw needs swapaccount.
fi
mount | grep cgroup >"$out/cgroup-mounts"

# 2. The workspace on an ext4 image (9p, the shared root, has no id-mapped mounts).
for m in loop ext4 fuse; do # fuse: /dev/fuse's c 10:229 is the device check's stand-in with a driver
  modprobe ${kdir:+-d "$kdir"} "$m" || modprobe "$m"
done
mkdir -p /tmp/ws
truncate -s 256M /var/ws.img
mkfs.ext4 -q -F /var/ws.img
mount -o loop /var/ws.img /tmp/ws
ws=/tmp/ws/work
mkdir -p "$ws"
cp "$bin/aither-probe" "$ws/"

# The kernel has no id-mapped mounts before 5.12: the documented fallback runs the agent as
# the workspace's (non-root) owner, asked for with --workspace-as-owner.
ver="$(uname -r)"
major="${ver%%.*}" rest="${ver#*.}" minor="${rest%%.*}"
ws_flags=()
if [ "$major" -lt 5 ] || { [ "$major" -eq 5 ] && [ "$minor" -lt 12 ]; }; then
  chown -R 4242:4242 "$ws"
  ws_flags=(--workspace-as-owner)
fi

run() { # policy [flags...] -- cmd...: aitherctl run in the workspace
  (cd "$ws" && aitherctl run "${ws_flags[@]}" -w "$ws" "$@")
}

# 3. doctor: strict can run, and every missing Landlock feature has a named stand-in.
aitherctl doctor >"$out/doctor.txt" 2>&1
echo "doctor exit $?" >>"$out/doctor.txt"
aitherctl doctor --json >"$out/doctor.json" 2>/dev/null
doctor_strict() { # strict runs; below 5.12 the one thing missing is the id-mapped workspace
  local block
  block="$(awk '/^  strict /{p=1; print; next} /^  [a-z]/{p=0} p' "$out/doctor.txt")"
  echo "$block"
  if [ "${#ws_flags[@]}" -eq 0 ]; then
    grep -q "^  strict  *OK" <<<"$block"
  else
    [ "$(grep -c 'missing:' <<<"$block")" -eq 1 ] && grep -q 'missing: id-mapped mounts' <<<"$block"
  fi
}
check doctor-strict doctor_strict

# Below 5.12 a daemon's agent cannot start (no id-mapped workspace; spawn has no
# --workspace-as-owner): spawns NAME strict through the aitherctl wrapper CTL and prints the
# launch's failure, refused in the reply or failed just after it (the launch races the reply).
idmap_launch_failure() { # ctl name
  local ctl="$1" name="$2" t=$SECONDS fail
  fail="$("$ctl" spawn --policy strict "$name" -w "$ws" -- sleep 600 2>&1 | grep -o 'id-mapping the workspace mount failed[^;]*')"
  while [ -z "$fail" ] && [ $((SECONDS - t)) -lt 60 ]; do
    fail="$("$ctl" events --json --agent "$name" | grep -o 'id-mapping the workspace mount failed[^;]*')" && break
    sleep 1
  done
  [ -n "$fail" ] || { echo "the launch did not fail on the id-mapped workspace"; "$ctl" events --agent "$name" | tail -3; return 1; }
  echo "$fail"
}

# 3b. aitherd in a cgroup delegated to it (pure v2), made as systemd >= 254 makes one for
# scripts/aitherd.service (Delegate=yes, DelegateSubgroup=supervisor): the unit's cgroup under
# a slice, memory/cpu/pids enabled down to it, marked with trusted.delegate, aitherd started
# in its `supervisor` leaf. Before any `run`, so that a top-level aither/ could only be
# aitherd's. Agents (strict): a sleeper (its cgroup under aitherd's, its limits as
# written, ps/inspect), a fork bomb (pids), the freezer (pause), PSI pain (memory.high).
if [ "$mode" = v2 ]; then
  unit=/sys/fs/cgroup/km.slice/aitherd.service
  dsock=/tmp/aither-km/aitherd.sock dstate=/var/lib/aither-km
  mkdir -p "$unit" /tmp/aither-km "$dstate"
  echo "+memory +cpu +pids" >/sys/fs/cgroup/cgroup.subtree_control
  echo "+memory +cpu +pids" >/sys/fs/cgroup/km.slice/cgroup.subtree_control
  python3 -c 'import os, sys; os.setxattr(sys.argv[1], "trusted.delegate", b"1")' "$unit"
  cg_outside() { # every cgroup outside the unit's, with what it enables for its children
    find /sys/fs/cgroup -name cgroup.subtree_control ! -path "$unit/*" | sort |
      while read -r f; do echo "$f: $(cat "$f")"; done
  }
  cg_outside >"$out/cgroups-before"
  mkdir -p "$unit/supervisor"
  dctl() { (cd "$ws" && AITHER_SOCKET="$dsock" AITHER_STATE_DIR="$dstate" aitherctl "$@"); }
  start_aitherd() { # as systemd starts the unit: in its leaf
    (echo "$BASHPID" >"$unit/supervisor/cgroup.procs" && exec aitherd --socket "$dsock" --state-dir "$dstate" --pidfile /tmp/aither-km/aitherd.pid) \
      >>"$out/aitherd.log" 2>&1 &
    dpid=$!
    for i in $(seq 300); do
      dctl ps >/dev/null 2>&1 && break
      sleep 0.1
    done
  }
  start_aitherd
  agent_dir() { # the host cgroup directory of an agent's pid 1
    local pid1 cg
    pid1="$(dctl inspect "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid1"])')"
    cg="$(grep '^0::' "/proc/$pid1/cgroup")"
    echo "/sys/fs/cgroup${cg#0::}"
  }
  daemon_delegated() {
    local own d lim
    own="$(cat "/proc/$dpid/cgroup")"
    [ "$own" = "0::/km.slice/aitherd.service/supervisor" ] || { echo "aitherd is in $own"; return 1; }
    if [ "${#ws_flags[@]}" -gt 0 ]; then
      local fail
      fail="$(idmap_launch_failure dctl km-sleeper)" || { echo "$fail"; return 1; }
      echo "aitherd in $own; below 5.12 the agent's launch fails: $fail"
    else
      dctl spawn --policy strict km-sleeper -w "$ws" --memory 64M --pids 32 --cpus 0.5 -- sleep 600 >/dev/null || return 1
      d="$(agent_dir km-sleeper)"
      [[ "$d" =~ ^$unit/aither/km-sleeper-[0-9]+$ ]] || { echo "the agent's cgroup is $d"; return 1; }
      lim="memory.max=$(cat "$d/memory.max") pids.max=$(cat "$d/pids.max") cpu.max=$(cat "$d/cpu.max")"
      [ "$lim" = "memory.max=67108864 pids.max=32 cpu.max=50000 100000" ] || { echo "limits: $lim"; return 1; }
      dctl ps | grep -q '^km-sleeper .*running' || { dctl ps; return 1; }
      echo "aitherd in $own; agent in $d; $lim"
    fi
    [ ! -e /sys/fs/cgroup/aither ] || { echo "a top-level /sys/fs/cgroup/aither was created"; return 1; }
    cg_outside | diff "$out/cgroups-before" - || { echo "cgroups outside the unit changed"; return 1; }
  }
  check daemon-delegated daemon_delegated
  if [ "${#ws_flags[@]}" -eq 0 ]; then
    daemon_pids() {
      local line i
      dctl spawn --policy strict km-forkbomb -w "$ws" --pids 32 -- ./aither-probe fork-bomb 200 >/dev/null || return 1
      for i in $(seq 600); do
        line="$(dctl logs km-forkbomb 2>/dev/null | grep '^RESULT')" && break
        sleep 0.1
      done
      [[ "$line" =~ err\ EAGAIN\ ([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -lt 32 ] || { echo "got: $line"; return 1; }
      echo "$line"
    }
    check daemon-pids-limit daemon_pids
    daemon_restart() { # a restarted aitherd (back in the leaf) re-adopts the running agent
      local d0 d1
      d0="$(agent_dir km-sleeper)"
      kill "$dpid" || return 1
      for i in $(seq 100); do # not this subshell's child: polled
        kill -0 "$dpid" 2>/dev/null || break
        sleep 0.1
      done
      start_aitherd
      dctl ps | grep -q '^km-sleeper .*running' || { dctl ps; return 1; }
      d1="$(agent_dir km-sleeper)"
      [ "$d0" = "$d1" ] || { echo "$d0 became $d1"; return 1; }
      echo "aitherd $dpid re-adopted km-sleeper in $d1"
    }
    check daemon-restart daemon_restart
    daemon_pause() { # the cgroup v2 freezer: pause freezes the agent's cgroup, resume thaws it
      local d
      d="$(agent_dir km-sleeper)"
      dctl pause km-sleeper >/dev/null || return 1
      # pause answers once the kernel says the whole cgroup is frozen.
      grep -qx 'frozen 1' "$d/cgroup.events" || { echo "after pause: $(tr '\n' ' ' <"$d/cgroup.events")"; return 1; }
      dctl ps | grep -q '^km-sleeper .*paused' || { dctl ps; return 1; }
      dctl resume km-sleeper >/dev/null || return 1
      grep -qx 'frozen 0' "$d/cgroup.events" || { echo "after resume: $(tr '\n' ' ' <"$d/cgroup.events")"; return 1; }
      dctl ps | grep -q '^km-sleeper .*running' || { dctl ps; return 1; }
      echo "km-sleeper frozen in $d (cgroup.events frozen 1) and thawed"
    }
    check daemon-pause daemon_pause
    # PSI into pain: an agent that keeps faulting in new pages while its usage stays above
    # memory.high is throttled by the kernel (the throttling sleeps count as memory stalls),
    # so its cgroup's memory.pressure rises and aitherd must turn it into a memory_pressure
    # pain event. memory.high is written by this check, as root, because no policy sets it and
    # reclaiming clean pages under TCG did not stall enough to move PSI (docs/kernels.md).
    daemon_psi() {
      local d ev i
      dctl spawn --policy strict km-pressure -w "$ws" --memory 256M -- python3 -c '
import mmap
keep = b"k" * (64 << 20)
blk = b"x" * (8 << 20)
while True:
    m = mmap.mmap(-1, len(blk))
    m.write(blk)
    m.close()
' >/dev/null || return 1
      d="$(agent_dir km-pressure)"
      [ -n "$d" ] && [ -d "$d" ] || { echo "no cgroup for km-pressure"; return 1; }
      echo 32M >"$d/memory.high" || return 1
      for i in $(seq 120); do
        ev="$(dctl events --json --agent km-pressure | grep '"memory_pressure"')" && break
        sleep 1
      done
      [ -n "$ev" ] || { echo "no memory_pressure pain in 120 s; $(head -1 "$d/memory.pressure")"; dctl events --agent km-pressure | tail -5; return 1; }
      echo "$ev" | python3 -c '
import json, sys
e = json.loads(sys.stdin.readline())
avg = e["data"]["data"]["psi_some_avg10"]
print("memory_pressure pain:", json.dumps(e["data"]))
sys.exit(0 if e["kind"] == "pain" and avg >= 10 else 1)'
    }
    check daemon-psi daemon_psi
    daemon_cleanup() {
      local n d b pid left=()
      for n in km-sleeper km-forkbomb km-pressure; do dctl rm --force "$n" >/dev/null || return 1; done
      # What may be left is the pool's prepared sandboxes only (spawns teach the pool their
      # shape, docs/daemon.md "Warm start"): `pool-<pid>` whose launcher has not become an
      # agent's shim (a warm shim works in its agent's log directory, $dstate/agents/NAME).
      for d in "$unit"/aither/*/; do
        [ -d "$d" ] || continue
        b="$(basename "$d")"
        pid="${b#pool-}"
        if [ "$b" != "$pid" ] && [ -e "/proc/$pid" ]; then
          case "$(readlink "/proc/$pid/cwd")" in "$dstate"/agents/*) ;; *) continue ;; esac
        fi
        left+=("$b")
      done
      [ "${#left[@]}" -eq 0 ] || { echo "${#left[@]} agent cgroups left in $unit/aither: ${left[*]}"; return 1; }
      n="$(find "$unit/aither" -mindepth 1 -maxdepth 1 -type d -name 'pool-*' | wc -l)"
      echo "agents removed, their cgroups gone ($n prepared sandboxes of the pool kept)"
    }
    check daemon-cleanup daemon_cleanup
  fi
  # `aitherctl run` through aitherd (docs/daemon.md "run", "Warm start"): the first run of a
  # shape is launched cold, the pool then prepares sandboxes for it and the next runs take
  # one each, confined as a cold run is. Below 5.12 the run needs --workspace-as-owner, which
  # no prepared sandbox serves: every run is cold, and still runs.
  daemon_warm() {
    local i o n prepared
    for i in 1 2 3; do
      o="$(dctl run "${ws_flags[@]}" --policy strict -- sh -c 'grep -E "^(NoNewPrivs|Seccomp):" /proc/self/status; echo km-warm-run' 2>&1)" ||
        { echo "run $i: $o"; return 1; }
      grep -q '^km-warm-run$' <<<"$o" && grep -q '^NoNewPrivs:.*1$' <<<"$o" && grep -q '^Seccomp:.*2$' <<<"$o" ||
        { echo "run $i: $o"; return 1; }
      # The pool prepares in the background (slow under TCG): a moment before the next run.
      for _ in $(seq 50); do
        prepared="$(pgrep -f -c '^[^ ]*aither-init pool --control-fd' || true)"
        [ "${prepared:-0}" -gt 0 ] && break
        [ "${#ws_flags[@]}" -gt 0 ] && break
        sleep 0.1
      done
    done
    n="$(grep -c 'run ended.*warm=true' "$out/aitherd.log" || true)"
    if [ "${#ws_flags[@]}" -eq 0 ]; then
      [ "$n" -ge 1 ] || { echo "no run was served by a prepared sandbox"; grep 'run ended\|pool' "$out/aitherd.log" | tail -5; return 1; }
      echo "3 runs through aitherd, $n served warm; NoNewPrivs 1, Seccomp 2 in each; $prepared prepared now"
    else
      [ "$n" -eq 0 ] || { echo "a --workspace-as-owner run was served warm"; return 1; }
      echo "3 runs through aitherd with --workspace-as-owner, all cold (not poolable)"
    fi
  }
  check daemon-warm daemon_warm
  # The last aitherd (daemon-restart started another in its check's subshell): by its pidfile.
  dpid="$(cat /tmp/aither-km/aitherd.pid 2>/dev/null || echo "$dpid")"
  kill "$dpid"
  for i in $(seq 100); do
    kill -0 "$dpid" 2>/dev/null || break
    sleep 0.1
  done
fi

# 3c. `aitherctl run` where systemd is pid 1 (pure v2): systemd runs as pid 1 of its own pid,
# mount and cgroup namespaces (as in a container: the guest's own pid 1 is virtme-ng's), in a
# cgroup of its own with memory/cpu/pids; `run`, entered into those namespaces, must
# re-execute itself in a transient scope with Delegate=yes and build the sandbox's cgroup
# below it, writing nothing anywhere else. Its systemd-tmpfiles-setup is masked (a runtime
# mask in the namespace's own /run): it empties /tmp at boot (`D /tmp`), and this namespace
# shares the guest's /tmp, where a CI clone (its binaries, the devices test's policies) may
# live; every later check then failed to find them.
if [ "$mode" = v2 ]; then
  sd=/sys/fs/cgroup/km-systemd sdpid="" upid=""
  start_ns_systemd() { # sets sdpid (systemd, guest's view) and upid (its unshare)
    local i moved=
    [ -x /lib/systemd/systemd ] || { echo "no /lib/systemd/systemd on the shared root"; return 1; }
    mkdir -p "$sd"
    echo "+memory +cpu +pids" >/sys/fs/cgroup/cgroup.subtree_control
    (echo "$BASHPID" >"$sd/cgroup.procs" && exec unshare --pid --fork --mount --cgroup --propagation private \
      sh -c 'mount -t proc proc /proc && umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup &&
        mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system &&
        ln -s /dev/null /run/systemd/system/systemd-tmpfiles-setup.service &&
        exec env container=aither-km /lib/systemd/systemd --unit=sysinit.target --log-target=console' \
      ) >"$out/systemd.log" 2>&1 &
    upid=$!
    for i in $(seq 600); do # systemd is the unshare's child: pid 1 of the new namespace
      sdpid="$(pgrep -P "$upid" | head -n1)"
      # Once it has forked, unshare leaves systemd's cgroup (back to the guest's root): a
      # process there would keep systemd from enabling controllers for its units (EBUSY).
      [ -n "$sdpid" ] && [ -z "$moved" ] && echo "$upid" >/sys/fs/cgroup/cgroup.procs && moved=1
      [ -n "$sdpid" ] && [ -S "/proc/$sdpid/root/run/systemd/private" ] && return 0
      kill -0 "$upid" 2>/dev/null || break
      sleep 0.2
    done
    echo "systemd did not start"
    tail -n 20 "$out/systemd.log"
    return 1
  }
  in_ns() { timeout 120 nsenter -t "$sdpid" -m -p -C -- env PATH="$PATH" "$@"; }
  cg_outside_sd() { # every cgroup outside systemd's, with what it enables for its children
    find /sys/fs/cgroup -name cgroup.subtree_control ! -path "$sd/*" | sort |
      while read -r f; do echo "$f: $(cat "$f")"; done
  }
  # In this shell (not a check's subshell): both checks below use this systemd.
  if start_ns_systemd >"$out/systemd-start" 2>&1; then
    sd_started=yes
  else
    sd_started="$(cat "$out/systemd-start")" sdpid="" upid=""
  fi
  run_systemd_scope() {
    local i d scope rc
    [ -n "$sdpid" ] || { echo "$sd_started"; return 1; }
    cg_outside_sd >"$out/cgroups-before-scope"
    rm -f "$ws/scope-started"
    (cd "$ws" && in_ns aitherctl run "${ws_flags[@]}" -w "$ws" \
      -p strict --name km-scoped --memory 64M --pids 32 -- sh -c ': > scope-started; sleep 8') &
    local rpid=$!
    for i in $(seq 300); do
      [ -e "$ws/scope-started" ] && break
      sleep 0.1
    done
    d="$(find "$sd/aither.slice" -maxdepth 3 -type d -path '*/aither-run-*.scope/aither/km-scoped-*' | head -n1)"
    scope="${d%/aither/*}"
    local mark lim procs
    mark="$(python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "trusted.delegate").decode())' "$scope" 2>&1)"
    lim="memory.max=$(cat "$d/memory.max" 2>&1) pids.max=$(cat "$d/pids.max" 2>&1)"
    procs="$(find "$scope" -maxdepth 1 -mindepth 1 -type d -printf '%f ' 2>&1)"
    wait "$rpid"
    rc=$?
    find "$sd" -maxdepth 3 -type d >"$out/systemd-cgroups"
    [ "$rc" -eq 0 ] || { echo "run exited $rc"; return 1; }
    [ -n "$d" ] || { echo "no sandbox cgroup under $sd/aither.slice/aither-run-*.scope"; return 1; }
    [ "$lim" = "memory.max=67108864 pids.max=32" ] || { echo "limits: $lim"; return 1; }
    [ ! -e /sys/fs/cgroup/aither ] || { echo "a top-level /sys/fs/cgroup/aither was created"; return 1; }
    cg_outside_sd | diff "$out/cgroups-before-scope" - || { echo "cgroups outside systemd's changed"; return 1; }
    echo "sandbox cgroup ${d#"$sd"}; $lim; the scope holds: $procs; trusted.delegate=$mark"
  }
  check run-systemd-scope run_systemd_scope
  # 3d. aitherd started by systemd 252 (this root's, pid 1 of the namespaces above) from
  # scripts/aitherd.service as installed: Delegate=yes, KillMode=process; 252 ignores
  # DelegateSubgroup=, so aitherd runs in its unit's own cgroup. Each shim must then take a
  # transient scope of its own (aither.slice/aither-shim-<pid>.scope, Delegate=yes) and build
  # its sandbox there; aitherd finds it there, and a restarted aitherd (systemctl restart)
  # re-adopts it; nothing is written outside those scopes (no top-level aither/, nothing
  # enabled in the unit's cgroup).
  daemon_systemd_scopes() {
    local i sock=/tmp/aither-km-sd/aitherd.sock st=/var/lib/aither-km-sd mpid own pid1 cg d lim scope mark
    [ -n "$sdpid" ] || { echo "$sd_started"; return 1; }
    mkdir -p /tmp/aither-km-sd "$st"
    sctl() { (cd "$ws" && in_ns env AITHER_SOCKET="$sock" AITHER_STATE_DIR="$st" aitherctl "$@"); }
    cg_outside_sd >"$out/cgroups-before-daemon-scopes"
    # The installed unit, with this checkout's binaries and a socket and state of its own.
    sed -e "s|^ExecStart=.*|ExecStart=$bin/aitherd --socket $sock --state-dir $st --pidfile /tmp/aither-km-sd/aitherd.pid|" \
      -e "s|^Environment=RUST_LOG=info|Environment=RUST_LOG=info PATH=$PATH|" \
      "$(dirname "$0")/aitherd.service" >"/proc/$sdpid/root/run/systemd/system/aitherd.service" || return 1
    in_ns systemctl daemon-reload || return 1
    in_ns systemctl start aitherd.service || { in_ns systemctl status aitherd.service --no-pager; return 1; }
    for i in $(seq 300); do
      sctl ps >/dev/null 2>&1 && break
      sleep 0.1
    done
    mpid="$(in_ns systemctl show -p MainPID --value aitherd.service)"
    own="$(in_ns cat "/proc/$mpid/cgroup")"
    [ "$own" = "0::/system.slice/aitherd.service" ] || { echo "aitherd is in $own"; return 1; }
    in_ns journalctl -u aitherd.service --no-pager >"$out/aitherd-systemd.log" 2>&1
    if [ "${#ws_flags[@]}" -gt 0 ]; then
      # After the shim took its scope: the failure named must be the workspace's.
      local fail
      fail="$(idmap_launch_failure sctl km-sd-sleeper)" || { echo "$fail"; return 1; }
      cg="below 5.12 the launch fails: $fail"
    else
      sctl spawn --policy strict km-sd-sleeper -w "$ws" --memory 64M --pids 32 -- sleep 600 >/dev/null || return 1
      pid1="$(sctl inspect --json km-sd-sleeper | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid1"])')"
      cg="$(in_ns cat "/proc/$pid1/cgroup")"
      [[ "$cg" =~ ^0::/aither.slice/aither-shim-[0-9]+.scope/aither/km-sd-sleeper-[0-9]+$ ]] || { echo "the agent's cgroup is $cg"; return 1; }
      d="$sd${cg#0::}"
      scope="${d%/aither/*}"
      lim="memory.max=$(cat "$d/memory.max") pids.max=$(cat "$d/pids.max")"
      [ "$lim" = "memory.max=67108864 pids.max=32" ] || { echo "limits: $lim"; return 1; }
      mark="$(python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "trusted.delegate").decode())' "$scope" 2>&1)"
      [ "$mark" = 1 ] || { echo "the scope's trusted.delegate: $mark"; return 1; }
      # systemctl restart: KillMode=process stops aitherd only; the scope is a unit of its own.
      in_ns systemctl restart aitherd.service || { in_ns systemctl status aitherd.service --no-pager; return 1; }
      for i in $(seq 300); do
        sctl ps 2>/dev/null | grep -q '^km-sd-sleeper .*running' && break
        sleep 0.1
      done
      [ "$(in_ns systemctl show -p MainPID --value aitherd.service)" != "$mpid" ] || { echo "aitherd was not restarted"; return 1; }
      sctl ps | grep -q '^km-sd-sleeper .*running' || { sctl ps; return 1; }
      [ "$(sctl inspect --json km-sd-sleeper | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid1"])')" = "$pid1" ] ||
        { echo "the restarted aitherd did not re-adopt pid $pid1"; return 1; }
      sctl pause km-sd-sleeper >/dev/null || return 1
      grep -qx 'frozen 1' "$d/cgroup.events" || { echo "after pause: $(tr '\n' ' ' <"$d/cgroup.events")"; return 1; }
      [ -z "$(cat "$sd/system.slice/aitherd.service/cgroup.subtree_control")" ] ||
        { echo "controllers enabled in aitherd's unit cgroup"; return 1; }
      sctl rm --force km-sd-sleeper >/dev/null || return 1
      for i in $(seq 100); do # the empty scope is collected by systemd
        [ -e "$scope" ] || break
        sleep 0.1
      done
      [ ! -e "$scope" ] || { echo "the scope $scope is left"; return 1; }
      cg="agent in ${cg#0::}, $lim, trusted.delegate=1; re-adopted by the restarted aitherd, paused, removed, its scope collected"
    fi
    in_ns systemctl stop aitherd.service
    [ ! -e "$sd/aither" ] && [ ! -e /sys/fs/cgroup/aither ] || { echo "a top-level aither/ was created"; return 1; }
    cg_outside_sd | diff "$out/cgroups-before-daemon-scopes" - || { echo "cgroups outside systemd's changed"; return 1; }
    echo "aitherd (systemd 252 unit) in ${own#0::}; $cg"
  }
  check daemon-systemd-scopes daemon_systemd_scopes
  if [ -n "$sdpid" ]; then
    timeout 20 nsenter -t "$sdpid" -m -p -- systemctl list-jobs --no-pager >"$out/systemd-jobs" 2>&1
    kill -s SIGRTMIN+4 "$sdpid" 2>/dev/null # systemd's poweroff: ends its namespace
    for i in $(seq 100); do
      kill -0 "$upid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$upid" "$sdpid" 2>/dev/null
  fi
fi

# 4. The report of a strict run names its stand-ins.
check report run -p strict --report "$out/report.json" -- true
cp "$out/report.json" "$out/report-strict.json" 2>/dev/null

# 5. The hostile core: one attempt each, the exact answer the suite expects (or, where a
# stand-in answers instead of Landlock, the stand-in's answer: both deny).
probe() { # expected-regex, then probe args
  local want="$1"
  shift
  local line
  line="$(run -p strict -- ./aither-probe "$@" 2>&1 | grep '^RESULT')"
  [[ "$line" =~ $want ]] || { echo "want /$want/, got: $line"; return 1; }
  echo "$line"
}
python3 -c 'import socket,time; s=socket.socket(); s.bind(("127.0.0.1",47011)); s.listen(); time.sleep(3600)' &
listener=$!
sleeper_pid=$listener
check shadow-absent probe 'err ENOENT' read-file /etc/shadow
check usr-read-only probe 'err EROFS' write-file /usr/aither-matrix
check etc-read-only probe 'err EROFS' write-file /etc/passwd
check workspace-writable probe '^RESULT write-file ok' write-file "$ws/made-by-agent"
check host-tcp-unreachable probe 'err (EACCES|ECONNREFUSED)' tcp-connect 127.0.0.1:47011
check outside-tcp-unreachable probe 'err (EACCES|ENETUNREACH)' tcp-connect 10.0.2.2:80
check udp-unreachable probe 'err ENETUNREACH' udp-send 10.0.0.1:53
check host-pid-invisible probe 'err ESRCH' kill-pid "$sleeper_pid" 9
check mount-refused probe 'err EPERM' mount-tmpfs
check unshare-refused probe 'err EPERM' unshare-user
check ptrace-refused probe 'err EPERM' ptrace-parent
check bpf-refused probe 'err EPERM' bpf
check keyctl-refused probe 'err EPERM' keyctl
check io-uring-refused probe 'err EPERM' io-uring-setup
check tiocsti-refused probe 'err EPERM' tiocsti
check vsock-refused probe 'err EPERM' vsock
check raw-socket-refused probe 'err EPERM' raw-socket
check setuid-root-refused probe 'err EPERM' setuid-root
check mknod-refused probe 'err EPERM' mknod-dev /tmp/mem
check chmod-suid-refused probe 'err EPERM' chmod-suid "$ws/suid-target"
kill "$listener"

# 6. Real work: Python multiprocessing, SQLite, subprocesses, in the strict sandbox.
cat >"$ws/work.py" <<'EOF'
import multiprocessing, sqlite3, subprocess, os
def sq(x):
    return x * x
if __name__ == "__main__":
    with multiprocessing.Pool(4) as p:
        assert sum(p.map(sq, range(1000))) == 332833500
    db = sqlite3.connect("work.db")
    db.execute("create table if not exists t (k integer primary key, v text)")
    db.executemany("insert into t (v) values (?)", [(str(i),) for i in range(5000)])
    db.commit()
    n = db.execute("select count(*) from t").fetchone()[0]
    out = subprocess.run(["sh", "-c", "echo $((6 * 7)) | cat"], capture_output=True, text=True)
    assert out.stdout.strip() == "42", out
    print("work ok", n, os.getuid())
EOF
check real-work run -p strict -- python3 work.py

# 7. Limits hold: pids (EAGAIN below the limit), memory (the OOM killer, exit 137), CPU
# (two busy threads for 2 s under 0.5 CPUs use about 1 s, not 4).
forkbomb() {
  local line
  line="$(run -p strict --pids 32 -- ./aither-probe fork-bomb 200 | grep '^RESULT')"
  [[ "$line" =~ err\ EAGAIN\ ([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -lt 32 ] || {
    echo "got: $line"
    return 1
  }
  echo "$line"
}
check pids-limit forkbomb
oom() {
  local code
  run -p strict --memory 64M -- ./aither-probe alloc 16 | grep -q 'ok 16' || {
    echo "control allocation failed"
    return 1
  }
  run -p strict --memory 64M -- ./aither-probe alloc 200
  code=$?
  [ "$code" -eq 137 ] || {
    echo "exit $code, want 137"
    return 1
  }
  echo "exit 137"
}
check memory-limit-oom oom
cpu() {
  local line used
  line="$(run -p strict --cpus 0.5 -- ./aither-probe burn-threads 2 2 | grep '^RESULT')"
  used="${line##* }"
  awk -v u="$used" 'BEGIN { exit !(u > 0.2 && u <= 1.3) }' || {
    echo "got: $line"
    return 1
  }
  echo "$line"
}
check cpu-quota cpu

# 7b. The live cgroup while a sandbox runs: the limits as written, PSI readable (pure v2),
# and the directory gone after the run.
live_cgroup() {
  local name="cgcheck-$$" d= i out mark="$ws/cgcheck-started"
  rm -f "$mark"
  # The agent marks its start in the workspace: the limits are read once it runs (they are
  # written before the agent is let go), not while the launcher is still creating the cgroup.
  run -p strict --name "$name" --memory 64M --pids 32 --cpus 0.5 -- sh -c ': > cgcheck-started; sleep 6' &
  local pid=$!
  for i in $(seq 200); do
    [ -e "$mark" ] && break
    sleep 0.1
  done
  [ -e "$mark" ] || { echo "the agent never started"; wait "$pid"; return 1; }
  rm -f "$mark"
  d="$(ls -d /sys/fs/cgroup/aither/"$name"-* /sys/fs/cgroup/memory/aither/"$name"-* 2>/dev/null | head -n1)"
  [ -n "$d" ] || { echo "no cgroup directory for $name"; wait "$pid"; return 1; }
  if [ "$mode" = v2 ]; then
    out="memory.max=$(cat "$d/memory.max") pids.max=$(cat "$d/pids.max") cpu.max=$(cat "$d/cpu.max") swap.max=$(cat "$d/memory.swap.max" 2>/dev/null || echo none)"
    grep -q '^some avg10=' "$d/memory.pressure" || { echo "no PSI in $d/memory.pressure"; wait "$pid"; return 1; }
    out="$out psi=yes"
    [ "$out" = "${out/memory.max=67108864 pids.max=32 cpu.max=50000 100000/}" ] && {
      echo "limits differ: $out"
      wait "$pid"
      return 1
    }
  else
    out="memory.limit=$(cat "$d/memory.limit_in_bytes") pids.max=$(cat /sys/fs/cgroup/pids/aither/"$name"-*/pids.max) cfs_quota=$(cat /sys/fs/cgroup/cpu/aither/"$name"-*/cpu.cfs_quota_us)"
    [ "$out" = "memory.limit=67108864 pids.max=32 cfs_quota=50000" ] || {
      echo "limits differ: $out"
      wait "$pid"
      return 1
    }
  fi
  wait "$pid" || { echo "the run failed"; return 1; }
  [ ! -e "$d" ] || { echo "$d left behind"; return 1; }
  echo "$out; removed after the run"
}
check live-cgroup live_cgroup

# 7c. The BPF device program on pure v2 (the only device layer there): a sandbox whose /dev
# holds three stand-in nodes (c 195:0, c 195:1 with no driver, c 10:229 /dev/fuse's) with a
# lease of one; the others answer EPERM, and without rules all pass. Through aither-init with
# a spec (runtime/aither-init/tests/devices.rs): release builds refuse the simulated GPU
# backend, and without a GPU nothing else leases a device. Its workspaces and nodes are under
# /var/tmp, here on the ext4 image (the guest's /var cannot be id-mapped); from 5.12.
if [ "$mode" = v2 ] && [ "${#ws_flags[@]}" -eq 0 ]; then
  bpf_devices() {
    local o
    [ -x "$devtest" ] || { echo "no devices test binary ($devtest)"; return 1; }
    mkdir -p /tmp/ws/vartmp && mount --bind /tmp/ws/vartmp /var/tmp || return 1
    o="$("$devtest" --exact hybrid_both_layers_allow_only_the_leased_node \
      without_device_rules_the_kernel_lets_every_bound_node_through --test-threads=1 2>&1)"
    local rc=$?
    umount /var/tmp
    echo "$o" | grep -E '^test |test result'
    [ "$rc" -eq 0 ] && grep -q 'test result: ok. 2 passed' <<<"$o" && return 0
    # Why, in the checks file: the assertion and the shim's event or exit record.
    echo "$o" | grep -E -A2 'panicked at' | head -n 12
    return 1
  }
  check bpf-devices bpf_devices
fi

# 8. Layered workspaces (`ci`, docs/workspaces.md): with id-mapped overlay layers (≥ 5.19)
# the agent's writes stay in its layer, `diff` shows them exactly and `apply` copies them;
# below, the launch is refused naming the kernel, and nothing reaches the directory. The state
# directory is on the ext4 image: the guest's /var is an overlay, which cannot be an upper layer.
layered() {
  local st=/tmp/ws/state-layered o
  mkdir -p "$st"
  if [ "$major" -lt 5 ] || { [ "$major" -eq 5 ] && [ "$minor" -lt 19 ]; }; then
    if o="$(AITHER_STATE_DIR="$st" run -p ci --name km-layer -- sh -c 'echo agent >layered.txt' 2>&1)"; then
      echo "ci ran on $ver without id-mapped overlay layers: $o"
      return 1
    fi
    [ ! -e "$ws/layered.txt" ] || { echo "the agent's file reached the directory"; return 1; }
    grep -q 'kernel ≥ 5.19' <<<"$o" || { echo "unclear refusal: $o"; return 1; }
    echo "refused: $(grep -o 'overlayfs refused[^.]*' <<<"$o" | head -n 1)"
    return 0
  fi
  AITHER_STATE_DIR="$st" run -p ci --name km-layer -- \
    sh -c 'echo agent >layered.txt && rm aither-probe && test ! -e aither-probe' ||
    { dmesg | grep -i overlay | tail -n 5; return 1; }
  [ ! -e "$ws/layered.txt" ] || { echo "the agent's new file reached the directory"; return 1; }
  [ -e "$ws/aither-probe" ] || { echo "the agent's removal reached the directory"; return 1; }
  o="$(cd "$ws" && AITHER_STATE_DIR="$st" aitherctl diff km-layer --json)" || { echo "diff: $o"; return 1; }
  python3 -c '
import json, sys
got = sorted((c["path"], c["change"]) for c in json.loads(sys.argv[1])["changes"])
want = [("aither-probe", "removed"), ("layered.txt", "added")]
assert got == want, got
print("diff", got)' "$o" || return 1
  (cd "$ws" && AITHER_STATE_DIR="$st" aitherctl apply km-layer layered.txt) || return 1
  [ "$(cat "$ws/layered.txt")" = agent ] && [ -e "$ws/aither-probe" ] || { echo "apply of one path"; return 1; }
  rm -f "$ws/layered.txt"
  (cd "$ws" && AITHER_STATE_DIR="$st" aitherctl discard km-layer) || return 1
}
check layered layered

# 9. The stand-ins each kernel needed, for the support table.
python3 - "$out/report-strict.json" "$out/doctor.json" >"$out/stand-ins" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
kernel_abi = json.load(open(sys.argv[2]))["host"]["landlock"]["abi"]
ll = r["landlock"]
print("landlock kernel=%s enforced-abi=%s fs=%s tcp=%s ioctl=%s scopes=%s" % (kernel_abi, ll["abi"], ll["filesystem"], ll["tcp"], ll["ioctl_dev"], ll["scopes"]))
print("host_uid=%s" % r["host_uid"])
for c in r.get("compensated", []):
    print("stand-in: " + c)
EOF
echo DONE >>"$out/checks"
