"""Egress probe, run inside the sandbox by tests/egress.rs: one check per argument, one line
`name: result` each (errno names for failures, so the tests assert the exact refusal)."""
import errno
import os
import re
import select
import socket
import ssl
import sys
import time

GW = ("127.0.0.1", 3128)


def err(e):
    if isinstance(e, OSError) and e.errno:
        return "err " + errno.errorcode.get(e.errno, str(e.errno))
    return "err " + type(e).__name__


def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, int(port)))
        return "connected"
    except Exception as e:  # noqa: BLE001
        return err(e)
    finally:
        s.close()


def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # A DNS query for example.com, as a resolver would send it.
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
        s.sendto(q, (host, int(port)))
        return "sent"
    except Exception as e:  # noqa: BLE001
        return err(e)
    finally:
        s.close()


def resolve(name):
    try:
        return "resolved " + socket.gethostbyname(name)
    except Exception as e:  # noqa: BLE001
        return "err " + type(e).__name__


def connect_tunnel(host, port):
    s = socket.create_connection(GW, timeout=5)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(4096)
        if not c:
            break
        head += c
    return s, head.split(b"\r\n")[0].decode(errors="replace")


def tls_sni(host, port, sni):
    """CONNECT to host:port, then a TLS handshake naming `sni`."""
    s, status = connect_tunnel(host, port)
    if " 200" not in status:
        return "refused " + status
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = t.recv(4096)
        return "tls ok " + data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
    except Exception as e:  # noqa: BLE001
        return "cut " + type(e).__name__


def socks_sni(host, port, sni):
    """SOCKS5 (by name) to host:port, then a TLS handshake naming `sni`."""
    s = socket.create_connection(GW, timeout=5)
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        return "refused greeting"
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + int(port).to_bytes(2, "big"))
    rep = s.recv(10)
    if len(rep) < 2 or rep[1] != 0:
        return "refused " + (str(rep[1]) if len(rep) > 1 else "-")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = t.recv(4096)
        return "tls ok " + data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
    except Exception as e:  # noqa: BLE001
        return "cut " + type(e).__name__


def relayed(host, port, inner):
    s, status = connect_tunnel(host, port)
    if " 200" not in status:
        return "refused " + status
    s.sendall(f"CONNECT {inner} HTTP/1.1\r\nHost: {inner}\r\n\r\n".encode())
    try:
        data = s.recv(4096)
        return "cut" if not data else "answered " + data.split(b"\r\n")[0].decode(errors="replace")
    except Exception as e:  # noqa: BLE001
        return "cut " + err(e)


def get(url_host, port, path="/"):
    s = socket.create_connection(GW, timeout=10)
    s.sendall(f"GET http://{url_host}:{port}{path} HTTP/1.1\r\nHost: {url_host}:{port}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        data += c
    return data.split(b"\r\n")[0].decode(errors="replace")


def is_closed(s):
    r, _, _ = select.select([s], [], [], 0)
    if not r:
        return False
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def get_retry(host, port, tries=100):
    """get(), retried while the gateway still closes new connections (a bound held by
    connections it has not yet seen closed)."""
    status = ""
    for _ in range(tries):
        try:
            status = get(host, port)
        except OSError as e:
            status = err(e)
        if status.startswith("HTTP/"):
            return status
        time.sleep(0.1)
    return status


def flood(host, port, n):
    """n idle connections (slow clients that never send a head): the gateway keeps at most
    64 of them waiting and closes the rest. Once they are gone, an oversized head is refused
    and a real request is served."""
    idle = []
    for _ in range(int(n)):
        idle.append(socket.create_connection(GW, timeout=10))
    deadline = time.time() + 30
    while True:
        closed = sum(1 for s in idle if is_closed(s))
        if closed >= len(idle) - 64 or time.time() > deadline:
            break
        time.sleep(0.1)
    kept = len(idle) - closed
    for s in idle:
        s.close()
    first = get_retry(host, port)
    big = socket.create_connection(GW, timeout=10)
    big.sendall(b"GET http://" + host.encode() + b"/ HTTP/1.1\r\nX-Big: " + b"a" * (256 * 1024) + b"\r\n\r\n")
    try:
        big_status = big.recv(4096).split(b"\r\n")[0].decode(errors="replace")
    except Exception as e:  # noqa: BLE001
        big_status = "cut " + err(e)
    status = get(host, port)
    return f"{len(idle)} open, {kept} kept waiting; first: {first}; oversized: {big_status}; then: {status}"


def head(host, port, size):
    """A request whose head is exactly `size` bytes: the gateway's answer."""
    start = f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nX-Pad: ".encode()
    pad = int(size) - len(start) - 4
    s = socket.create_connection(GW, timeout=10)
    try:
        s.sendall(start + b"a" * pad + b"\r\n\r\n")
        return s.recv(4096).split(b"\r\n")[0].decode(errors="replace")
    except OSError as e:
        return "cut " + err(e)


def raw(host_port, data):
    """CONNECT to host:port, then `data` (\\r \\n escapes) in the tunnel: what comes back."""
    h, _, p = host_port.rpartition(":")
    s, status = connect_tunnel(h, p)
    if " 200" not in status:
        return "refused " + status
    s.sendall(data.replace("\\r", "\r").replace("\\n", "\n").encode())
    out = b""
    try:
        while True:
            c = s.recv(65536)
            if not c:
                break
            out += c
    except OSError:
        pass
    # Status lines (a body without a line break may precede one).
    lines = [m.decode(errors="replace") for m in re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", out)]
    return "answers " + " | ".join(lines) if lines else "cut"


def tunnels(host, port, n, hold):
    """n tunnels one after the other, each with a TLS handshake, all held open: how many
    completed. Then holds them `hold` seconds (another agent's turn)."""
    held, ok = [], 0
    for _ in range(int(n)):
        try:
            s, status = connect_tunnel(host, port)
            if " 200" not in status:
                continue
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            t = ctx.wrap_socket(s, server_hostname=host)
            held.append(t)
            ok += 1
        except Exception:  # noqa: BLE001
            pass
    print(f"tunnels-established: {ok}", flush=True)
    time.sleep(float(hold))
    return f"{ok} established"


def idle_tunnel(host, port, secs):
    """A TLS tunnel left idle: whether the gateway closed it within `secs` seconds."""
    s, status = connect_tunnel(host, port)
    if " 200" not in status:
        return "refused " + status
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    t = ctx.wrap_socket(s, server_hostname=host)
    t.settimeout(float(secs))
    try:
        data = t.recv(1)
        return "closed" if not data else "data"
    except socket.timeout:
        return "open"
    except (OSError, ssl.SSLError):
        return "closed"


def deny_flood(host, port, n):
    """n requests to a denied host on one keep-alive connection: the status codes seen."""
    s = socket.create_connection(GW, timeout=10)
    f = s.makefile("rb")
    codes = {}
    for _ in range(int(n)):
        s.sendall(f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        line = f.readline()
        if not line:
            break
        code = line.split()[1].decode()
        length = 0
        while True:
            h = f.readline()
            if h in (b"\r\n", b""):
                break
            if h.lower().startswith(b"content-length:"):
                length = int(h.split(b":")[1])
        f.read(length)
        codes[code] = codes.get(code, 0) + 1
    return " ".join(f"{k}={v}" for k, v in sorted(codes.items()))


def main():
    for arg in sys.argv[1:]:
        name, _, rest = arg.partition("=")
        a = rest.split(",") if rest else []
        fn = {
            "tcp": lambda: tcp(a[0], a[1]),
            "tcp6": lambda: tcp(a[0], a[1], socket.AF_INET6),
            "udp": lambda: udp(a[0], a[1]),
            "resolve": lambda: resolve(a[0]),
            "sni": lambda: tls_sni(a[0], a[1], a[2]),
            "socks_sni": lambda: socks_sni(a[0], a[1], a[2]),
            "relayed": lambda: relayed(a[0], a[1], a[2]),
            "get": lambda: get(a[0], a[1]),
            "flood": lambda: flood(a[0], a[1], a[2]),
            "head": lambda: head(a[0], a[1], a[2]),
            "raw": lambda: raw(a[0], ",".join(a[1:])),
            "tunnels": lambda: tunnels(a[0], a[1], a[2], a[3]),
            "idle": lambda: idle_tunnel(a[0], a[1], a[2]),
            "denyflood": lambda: deny_flood(a[0], a[1], a[2]),
        }[name]
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001
            out = "error " + err(e)
        print(f"{arg}: {out}", flush=True)


main()
