"""Egress probe, run inside the sandbox by tests/egress.rs: one check per argument, one line
`name: result` each (errno names for failures, so the tests assert the exact refusal)."""
import errno
import os
import socket
import ssl
import sys

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


def flood(host, port, n):
    """n idle connections and a half-sent head (slow clients) and an oversized head held
    open, then one real request: it must still be served."""
    idle = []
    for _ in range(int(n)):
        idle.append(socket.create_connection(GW, timeout=10))
    slow = socket.create_connection(GW, timeout=10)
    slow.sendall(b"GET http://x HTTP/1.1\r\nHost: ")
    big = socket.create_connection(GW, timeout=10)
    big.sendall(b"GET http://" + host.encode() + b"/ HTTP/1.1\r\nX-Big: " + b"a" * (256 * 1024) + b"\r\n\r\n")
    try:
        big_status = big.recv(4096).split(b"\r\n")[0].decode(errors="replace")
    except Exception as e:  # noqa: BLE001
        big_status = "cut " + err(e)
    status = get(host, port)
    for s in idle:
        s.close()
    return f"{len(idle)} open; oversized: {big_status}; then: {status}"


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
            "relayed": lambda: relayed(a[0], a[1], a[2]),
            "get": lambda: get(a[0], a[1]),
            "flood": lambda: flood(a[0], a[1], a[2]),
        }[name]
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001
            out = "error " + err(e)
        print(f"{arg}: {out}", flush=True)


main()
