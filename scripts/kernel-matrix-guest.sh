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
mode="$1" bin="$2" out="$3" kdir="${4:-}"
exec >"$out/log" 2>&1
export PATH="$bin:/usr/sbin:/usr/bin:/sbin:/bin"
export AITHER_STATE_DIR=/var/lib/aither
export AITHER_AUDIT_LOG=/var/log/aither-audit.jsonl
mkdir -p /var/lib/aither /var/cache/aither
uname -r >"$out/kernel"
: >"$out/checks"

check() { # name, then the command; pass when it exits 0
  local name="$1"
  shift
  local detail t=$SECONDS
  echo "== $name: $*"
  if detail="$("$@" 2>&1)"; then
    echo "CHECK $name pass $((SECONDS - t))s ${detail//$'\n'/ | }" >>"$out/checks"
  else
    echo "CHECK $name FAIL $((SECONDS - t))s ${detail//$'\n'/ | }" >>"$out/checks"
  fi
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
for m in loop ext4; do
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

# 8. The stand-ins each kernel needed, for the support table.
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
