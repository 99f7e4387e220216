"""A small OpenAI-compatible model server for the Open WebUI proof: one
model, ``stub``, whose streamed reply is a fixed sentence, one word per
chunk, so no model is downloaded. Standard library only.

    python3 llm_stub.py --port 0   (prints "listening on <port>")
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = "Hello from the stub model, streamed through wsrelay one token at a time."
TOKEN_DELAY = 0.05


def words(n: int = 1) -> list[str]:
    out = []
    for _ in range(n):
        out += [w + " " for w in REPLY.split(" ")]
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def _json(self, status: int, body: object) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "wsrelay"}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": "not found"})
            return
        repeat = 1
        last = (req.get("messages") or [{}])[-1].get("content")
        if isinstance(last, str) and last.startswith("long"):
            repeat = 10
        if not req.get("stream"):
            text = "".join(words(repeat)).strip()
            self._json(
                200,
                {
                    "id": "stub-1",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": "stub",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    ],
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for w in words(repeat):
            chunk = {
                "id": "stub-1",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": "stub",
                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(TOKEN_DELAY)
        end = {
            "id": "stub-1",
            "object": "chat.completion.chunk",
            "model": "stub",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
