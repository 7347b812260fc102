# shellcheck shell=bash
# Sourced by `egress.sh hostile [SECS]`, inside its private network (see egress.sh): aitherd
# under one hostile agent for SECS seconds, a well-behaved agent beside it, the operator's
# `aitherctl ps` once a second. Sampled once a second from /proc/<aitherd>: descriptors
# (entries of fd/), VmRSS, CPU (utime+stime over the second, % of one core).
#   hostile agent (python3, standard library, policy standard + one egress rule for
#   bench.test): holds as many tunnels as the gateway lets it (CONNECT, a ClientHello, then
#   silence), keeps up to 300 connections with half-sent request heads, and from 10 s on
#   floods denied requests on two keep-alive connections.
#   well-behaved agent: one GET a second to bench.test; its failures are counted.
# Upstream: a sink in "the internet" that answers HTTP requests and holds anything else open.
# BIN_DIR: directory with aitherd, aitherctl, aither-init (default <repo>/target/release).
# EGRESS_CONFIG_EXTRA: lines added to the [egress] table of aitherd's configuration file.
BIN="${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
HT="$(mktemp -d /var/tmp/aither-egresshostile-XXXXXX)"
PORT=18080
hcleanup() {
  for a in hostile polite; do
    "$BIN/aitherctl" rm --force "$a" >/dev/null 2>&1 || true
  done
  [ -n "${DPID:-}" ] && kill "$DPID" 2>/dev/null || true
  [ -n "${SPID:-}" ] && kill "$SPID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$HT"
}
trap hcleanup EXIT
export AITHER_STATE_DIR="$HT/state" AITHER_SOCKET="$HT/aitherd.sock" \
  AITHER_INIT="$BIN/aither-init" AITHER_POLICY_DIR="$ROOT/policies" \
  AITHER_AUDIT_LOG="$HT/audit.jsonl"
"${INET[@]}" python3 - 11.1.0.2 "$PORT" <<'PY' &
import asyncio, sys
async def conn(r, w):
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            if data[:4] in (b"GET ", b"HEAD"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(conn, sys.argv[1], int(sys.argv[2]), backlog=4096)
    await s.serve_forever()
asyncio.run(main())
PY
SPID=$!
for _ in $(seq 200); do (exec 3<>"/dev/tcp/11.1.0.2/$PORT") 2>/dev/null && break; sleep 0.1; done
printf '[egress]\n%s\n' "${EGRESS_CONFIG_EXTRA:-}" >"$HT/aitherd.toml"
# HOSTILE_NO_CONFIG=1: no --config (an aitherd from before the flag, for a comparison).
if [ -n "${HOSTILE_NO_CONFIG:-}" ]; then
  "$BIN/aitherd" 2>"$HT/aitherd.log" &
else
  "$BIN/aitherd" --config "$HT/aitherd.toml" 2>"$HT/aitherd.log" &
fi
DPID=$!
for _ in $(seq 200); do [ -S "$AITHER_SOCKET" ] && break; sleep 0.1; done
mkdir "$HT/ws"
{ sed 's/^name = "standard"/name = "bench-hostile"/' "$ROOT/policies/standard.toml"
  printf '\n[[net.egress]]\nhosts = ["bench.test"]\nports = [%s]\n' "$PORT"; } >"$HT/policy.toml"
cat >"$HT/ws/hostile.py" <<'PY'
import socket, ssl, sys, threading, time
GW = ("127.0.0.1", 3128)
PORT, SECS = int(sys.argv[1]), float(sys.argv[2])
end = time.time() + SECS
stats = {"tunnels": 0, "denials": 0, "slow": 0}
def hello():
    ctx = ssl.create_default_context()
    i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
    t = ctx.wrap_bio(i, o, server_hostname="bench.test")
    try:
        t.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return o.read()
HELLO = hello()
def tunnels():
    held = []
    while time.time() < end:
        try:
            s = socket.create_connection(GW, timeout=5)
            s.sendall(f"CONNECT bench.test:{PORT} HTTP/1.1\r\nHost: bench.test\r\n\r\n".encode())
            if not s.recv(4096).startswith(b"HTTP/1.1 200"):
                s.close(); time.sleep(0.05); continue
            s.sendall(HELLO)
            held.append(s); stats["tunnels"] = len(held)
        except OSError:
            time.sleep(0.05)
def flood():
    time.sleep(min(10, SECS / 4))  # the tunnels first
    while time.time() < end:
        try:
            s = socket.create_connection(GW, timeout=5)
            f = s.makefile("rb")
            while time.time() < end:
                s.sendall(b"GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n")
                line = f.readline()
                if not line:
                    break
                n = 0
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b""):
                        break
                    if h.lower().startswith(b"content-length:"):
                        n = int(h.split(b":")[1])
                f.read(n); stats["denials"] += 1
        except OSError:
            time.sleep(0.01)
def slow():
    held = []
    while time.time() < end:
        held = [s for s in held if s.fileno() >= 0]
        if len(held) < 300:
            try:
                s = socket.create_connection(GW, timeout=5)
                s.sendall(b"GET http://bench.test/ HTTP/1.1\r\nX-Slow: ")
                held.append(s); stats["slow"] = len(held)
            except OSError:
                time.sleep(0.05)
        else:
            time.sleep(0.5)
ts = [threading.Thread(target=f, daemon=True) for f in (tunnels, flood, flood, slow)]
for t in ts: t.start()
while time.time() < end:
    time.sleep(1)
    print(stats, flush=True)
PY
"$BIN/aitherctl" spawn --policy "$HT/policy.toml" -w "$HT/ws" --restart never hostile -- \
  python3 hostile.py "$PORT" "$SECS" >/dev/null
"$BIN/aitherctl" spawn --policy "$HT/policy.toml" -w "$HT/ws" --restart never polite -- sh -c \
  "ok=0; bad=0; for i in \$(seq $SECS); do c=\$(curl -s -m 5 -o /dev/null -w '%{http_code}' http://bench.test:$PORT/); if [ \"\$c\" = 200 ]; then ok=\$((ok+1)); else bad=\$((bad+1)); echo \"\$i \$c\" >> polite-failures.txt; fi; echo \"\$ok \$bad\" > polite.txt; sleep 1; done" >/dev/null
CLK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$DPID/stat"; }
PS_FAIL=0
echo "t_s fds rss_kib cpu_pct" >"$HT/samples.txt"
prev=$(cpu)
for t in $(seq "$SECS"); do
  sleep 1
  now=$(cpu)
  fds=$(find "/proc/$DPID/fd" -mindepth 1 -maxdepth 1 | wc -l)
  rss=$(awk '/VmRSS/{print $2}' "/proc/$DPID/status")
  echo "$t $fds $rss $(( (now - prev) * 100 / CLK ))" >>"$HT/samples.txt"
  prev=$now
  "$BIN/aitherctl" ps >/dev/null 2>&1 || PS_FAIL=$((PS_FAIL + 1))
done
sleep 2
python3 - "$HT/samples.txt" "$(cat "$HT/ws/polite.txt" 2>/dev/null || echo '? ?')" "$PS_FAIL" \
  "$("$BIN/aitherctl" logs hostile 2>/dev/null | tail -n1 || true)" \
  "$(grep -c '"kind":"net"' "$AITHER_AUDIT_LOG" || true)" \
  "$({ tr '\n' ';' <"$HT/ws/polite-failures.txt"; } 2>/dev/null || true)" \
  "$(for f in bus.db state.db; do printf '%s (with its WAL) %s KiB; ' "$f" "$(cat "$HT/state/$f"* | wc -c | awk '{print int($1/1024)}')"; done; printf 'audit.jsonl %s KiB' "$(($(wc -c <"$AITHER_AUDIT_LOG") / 1024))")" <<'PYS'
import statistics, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]).read().split("\n")[1:] if l.strip()]
fds, rss, cpu = ([r[i] for r in rows] for i in (1, 2, 3))
print("| aitherd, one hostile agent | min | median | max |")
print("|---|---:|---:|---:|")
print(f"| descriptors | {min(fds)} | {statistics.median(fds):.0f} | {max(fds)} |")
print(f"| VmRSS MiB | {min(rss)/1024:.1f} | {statistics.median(rss)/1024:.1f} | {max(rss)/1024:.1f} |")
print(f"| CPU % of one core | {min(cpu)} | {statistics.median(cpu):.0f} | {max(cpu)} |")
ok, bad = sys.argv[2].split()
print(f"\npolite agent: {ok} requests answered, {bad} failed ({sys.argv[6] or 'none'}); aitherctl ps failures: {sys.argv[3]}; "
      f"hostile agent's last report: {sys.argv[4] or '?'}; net audit records: {sys.argv[5]}; "
      f"sizes at the end: {sys.argv[7]}")
PYS
