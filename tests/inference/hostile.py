"""A hostile "model server" (tests/inference.rs): every path answers the gateway's usage
reader with something wrong. Listens on 127.0.0.1:8000 of its sandbox.

/v1/lie        usage.total_tokens 10**15 (clamped by the gateway)
/v1/overflow   usage.total_tokens 10**30 (not a u64: malformed, estimated)
/v1/negative   usage.total_tokens -5 (malformed, estimated)
/v1/none       no usage (estimated; the test sends one with a large chunked body)
/v1/nested     "usage" only inside a nested object and inside a string (estimated)
/v1/sse        an SSE stream of garbage: a 1 MiB data line, unterminated JSON, comments,
               bare CRs; then one honest usage chunk of 7 tokens (charged 7)
/v1/cut        Content-Length 100000, 10 bytes, then the connection closes (estimated)
/v1/ok         an honest answer of 5 tokens, and the Accept-Encoding it was sent (`seen`)
"""

import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def send_body(self, body, ctype="application/json", length=None):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                self.rfile.read(n + 2)
                if n == 0:
                    return
        self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):
        self.read_body()
        p = self.path
        if p == "/v1/lie":
            self.send_body(json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 10**15}}).encode())
        elif p == "/v1/overflow":
            self.send_body(json.dumps({"usage": {"total_tokens": 10**30}}).encode())
        elif p == "/v1/negative":
            self.send_body(b'{"usage": {"prompt_tokens": -5, "total_tokens": -5}}')
        elif p == "/v1/none":
            self.send_body(b'{"choices": [{"text": "no usage here"}]}')
        elif p == "/v1/nested":
            self.send_body(b'{"x": {"usage": {"total_tokens": 1}}, "text": "\\"usage\\": {\\"total_tokens\\": 2}"}')
        elif p == "/v1/sse":
            body = (b"data: " + b"x" * (1 << 20) + b"\n\n"
                    + b'data: {"usage": {"total_tokens": 99\n\n'
                    + b": comment\r\rdata: {\"unterminated\": \"str\n\n"
                    + b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}\n\n'
                    + b"data: [DONE]\n\n")
            self.send_body(body, "text/event-stream")
        elif p == "/v1/cut":
            self.send_body(b'{"usage": ', length=100000)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            seen = {"accept-encoding": self.headers.get("Accept-Encoding")}
            self.send_body(json.dumps({"usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
                                       "seen": seen}).encode())


httpd = ThreadingHTTPServer(("127.0.0.1", 8000), Hostile)
httpd.daemon_threads = True
print("HOSTILE up", flush=True)
httpd.serve_forever()
