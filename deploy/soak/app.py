"""The soak's upstream app: the hooks a real app would answer, counted.

- connect: the user comes from `?user=` (wsrelay.v1) or the Socket.IO
  `auth` (`{"user": …}`); a Socket.IO socket is put in its rooms here (the
  shared soak rooms, the chat room and its own `user:<id>`), a wsrelay.v1
  client subscribes itself.
- publish: `chat:` lets authenticated users publish (policy `hook`).
- message: Socket.IO events and `send` frames, answered `{"ok": n}`.
- disconnect: counted.
Anything else: `200 ok` (the proxied app).
"""

import collections
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

SHARED = [f"soak:{i}" for i in range(4)] + ["chat:0"]
counts: collections.Counter = collections.Counter()
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body=None):
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path == "/counts":
            with lock:
                return self.reply(200, dict(counts))
        self.reply(200, {"ok": True})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))) or b"{}")
        with lock:
            counts[self.path] += 1
        if self.path == "/hook/connect":
            auth = body.get("auth") or {}
            user = auth.get("user") or parse_qs(body.get("query", "")).get("user", [None])[0]
            if not user:
                return self.reply(401)
            rooms = [*SHARED, f"user:{user}"] if "auth" in body else []
            return self.reply(200, {"user": user, "channels": rooms, "info": {"name": user}})
        if self.path == "/hook/publish":
            return self.reply(200 if body.get("user") else 403)
        if self.path == "/hook/message":
            return self.reply(200, {"ok": counts[self.path]})
        if self.path == "/hook/disconnect":
            return self.reply(204)
        self.reply(200, {"ok": True})

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
