"""An OpenAI-compatible model server for other agents (docs/agents.md).

Asks aitherd for its GPU lease, then serves on 127.0.0.1:$PORT (default 8000), published to
other agents as http://model.aither.internal by agents/model-server.toml:

- llama.cpp's `llama-server` when it is on PATH and MODEL names a model file it can load
  (the lease's CUDA_VISIBLE_DEVICES is already set; all layers are offloaded to the GPU);
- otherwise a small stand-in (Python standard library only) that answers
  /v1/chat/completions, /v1/completions, /v1/models and /health deterministically: the
  reply to a prompt of P words with max_tokens N (default 16) is N tokens `tok0 tok1 ...`,
  and `usage` is {prompt_tokens: P, completion_tokens: N, total_tokens: P + N}. With
  "stream": true it answers as OpenAI does, one SSE chunk per token, and with
  "stream_options": {"include_usage": true} a last chunk that carries `usage` (without it,
  no usage: the gateway then charges its byte estimate).

Prints `MODEL-SERVER {json}` once serving: which server, the lease, the port. Outside aitherd
(`PORT=8000 python3 serve.py` on the host, for a service granted with `target`) it serves
without a lease.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aither

PORT = int(os.environ.get("PORT", "8000"))
MODEL = os.environ.get("MODEL", "")
#: Largest request body the stand-in reads.
MAX_BODY = 1 << 20
#: Most tokens the stand-in generates for one request.
MAX_TOKENS = 4096


def lease_of(ch):
    if ch is None:
        return {"granted": False, "state": "not under aitherd"}
    try:
        lease = ch.gpu_lease()
        while lease.state == "queued":
            ch.status("waiting for a GPU")
            time.sleep(1)
            lease = ch.gpu_lease()
        return {"granted": lease.granted, "state": lease.state,
                "devices": [d.node for d in lease.devices]}
    except aither.GpuUnavailable as e:
        return {"granted": False, "state": "unavailable", "error": e.message}


def words(v):
    """The prompt's words: a string, or the contents of chat messages."""
    if isinstance(v, str):
        return v.split()
    if isinstance(v, list):
        out = []
        for m in v:
            c = m.get("content", "") if isinstance(m, dict) else m
            out += words(c)
        return out
    return []


class StandIn(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aither-standin/1"

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status, obj):
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": "standin", "object": "model", "owned_by": "aither"}]})
        else:
            self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            self.send_json(413, {"error": {"message": "request too large", "type": "invalid_request_error"}})
            return
        try:
            req = json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            self.send_json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        prompt = words(req.get("messages") if chat else req.get("prompt"))
        n_out = max(0, min(int(req.get("max_tokens") or 16), MAX_TOKENS))
        toks = [f"tok{i}" for i in range(n_out)]
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                 "total_tokens": len(prompt) + n_out}
        model = req.get("model") or "standin"
        kind = "chat.completion" if chat else "text_completion"
        if req.get("stream"):
            self.stream(chat, kind, model, toks, usage,
                        bool((req.get("stream_options") or {}).get("include_usage")))
            return
        text = " ".join(toks)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                  if chat else {"index": 0, "text": text, "finish_reason": "length"})
        self.send_json(200, {"id": "standin-1", "object": kind, "created": 0, "model": model,
                             "choices": [choice], "usage": usage})

    def stream(self, chat, kind, model, toks, usage, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(obj):
            data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        base = {"id": "standin-1", "object": kind + ".chunk", "created": 0, "model": model}
        for i, t in enumerate(toks):
            piece = t if i == 0 else " " + t
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            chunk = dict(base, choices=[choice])
            if include_usage:
                chunk["usage"] = None
            event(chunk)
        if include_usage:
            event(dict(base, choices=[], usage=usage))
        event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def serve_llama(ch, lease):
    """llama-server on the leased GPU; ready once its /health answers."""
    argv = ["llama-server", "--host", "127.0.0.1", "--port", str(PORT), "-m", MODEL,
            "--n-gpu-layers", "999"]
    proc = subprocess.Popen(argv)
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if ch:
            ch.status("loading " + MODEL)
        time.sleep(1)
    if proc.poll() is not None:
        if ch:
            ch.pain("error", f"llama-server exited with {proc.returncode}")
        sys.exit(proc.returncode or 1)
    print("MODEL-SERVER " + json.dumps({"server": "llama-server", "model": MODEL, "port": PORT, "lease": lease}), flush=True)
    if ch:
        ch.ready()
    sys.exit(proc.wait())


def main():
    try:
        ch = aither.Channel.from_env()
    except aither.NotUnderAitherd:
        ch = None
    lease = lease_of(ch)
    if shutil.which("llama-server") and MODEL and os.path.exists(MODEL):
        serve_llama(ch, lease)
    httpd = ThreadingHTTPServer(("127.0.0.1", PORT), StandIn)
    httpd.daemon_threads = True
    print("MODEL-SERVER " + json.dumps({"server": "standin", "port": PORT, "lease": lease}), flush=True)
    if ch:
        ch.ready()
    httpd.serve_forever()


if __name__ == "__main__":
    main()
