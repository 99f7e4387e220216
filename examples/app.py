#!/usr/bin/env python3
"""A tiny app behind wsrelay, standard library only: every hook, plus a
publish through wsrelay's admin API. The app has no WebSocket and no Redis code.

Run it beside the sidecar:

    python3 examples/app.py --port 3000 --admin http://127.0.0.1:8081 &
    wsrelay --upstream http://127.0.0.1:3000 --config examples/wsrelay.toml

then open http://127.0.0.1:8080/ in a browser (log in as ?user=alice), or
POST http://127.0.0.1:8080/notify?user=alice to push to alice's channel.
"""

import argparse
import json
import sys
import urllib.request
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

# session cookie -> user id; a real app looks its session store up.
SESSIONS = {"alice-session": "alice", "bob-session": "bob"}
# Who may join which room (namespace "room:" has subscribe = "hook").
ROOMS = {"room:lobby": {"alice", "bob"}, "room:staff": {"alice"}}

ADMIN = "http://127.0.0.1:8081"
API_TOKEN = ""
HOOK_SECRET = ""

PAGE = b"""<!doctype html><meta charset=utf-8><title>wsrelay demo</title>
<pre id=log></pre><script>
const log = (m) => document.getElementById('log').textContent += m + '\\n';
const ws = new WebSocket(`ws://${location.host}/ws`, 'wsrelay.v1');
ws.onmessage = (e) => log(e.data);
ws.onopen = () => ws.send(JSON.stringify({op: 'subscribe', channel: 'room:lobby', id: 1}));
ws.onclose = (e) => log(`closed ${e.code} ${e.reason}`);
</script>"""


def publish(channel, data):
    """Publish through the local sidecar: 200 once every replica's sidecar can deliver it."""
    req = urllib.request.Request(
        ADMIN + "/api/publish",
        data=json.dumps({"channel": channel, "data": data}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    if API_TOKEN:
        req.add_header("authorization", "Bearer " + API_TOKEN)
    with urllib.request.urlopen(req, timeout=5) as resp:  # raises on 4xx/5xx (e.g. 503: Redis down)
        return json.load(resp)


class App(BaseHTTPRequestHandler):
    def reply(self, status, body=None, headers=()):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    # --- wsrelay's hooks --------------------------------------------------

    def connect_hook(self):
        # wsrelay forwards the browser's Cookie, Authorization, Origin and X-Forwarded-*.
        cookie = SimpleCookie(self.headers.get("cookie", ""))
        session = cookie.get("session")
        user = SESSIONS.get(session.value) if session else None
        if user is None:
            return self.reply(401, {"error": "log in first"})
        # Accept: who it is, and the channels wsrelay subscribes it to server-side.
        self.reply(200, {"user": user, "channels": [f"user:{user}"], "info": {"name": user.title()}})

    def subscribe_hook(self):
        req = self.body()  # {"user", "connection", "channel"}
        allowed = req["user"] in ROOMS.get(req["channel"], set())
        self.reply(200 if allowed else 403, {})

    def publish_hook(self):
        req = self.body()  # {"user", "connection", "channel", "data"}
        ok = isinstance(req["data"], dict) and len(str(req["data"].get("text", ""))) <= 500
        self.reply(200 if ok else 403, {})

    def message_hook(self):
        req = self.body()  # {"user", "connection", "data"}: a client's `send`
        data = req["data"]  # any JSON the client sent
        if not isinstance(data, dict):
            return self.reply(400, {"error": {"message": "send an object with an action"}})
        if data.get("action") == "whoami":
            return self.reply(200, {"user": req["user"], "connection": req["connection"]})
        self.reply(404, {"error": {"message": "unknown action"}})

    def disconnect_hook(self):
        req = self.body()  # {"user", "connection", "reason"} — best effort
        print(f"left: {req['user']} ({req['reason']})", file=sys.stderr, flush=True)
        self.reply(204)

    # --- the app itself ----------------------------------------------------

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/":
            user = parse_qs(url.query).get("user", ["alice"])[0]
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("set-cookie", f"session={user}-session; Path=/; HttpOnly; SameSite=Lax")
            self.send_header("content-length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)
        elif url.path == "/health":
            self.reply(200, {"ok": True})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        url = urlparse(self.path)
        hooks = {
            "/internal/ws/connect": self.connect_hook,
            "/internal/ws/subscribe": self.subscribe_hook,
            "/internal/ws/publish": self.publish_hook,
            "/internal/ws/message": self.message_hook,
            "/internal/ws/disconnect": self.disconnect_hook,
        }
        if url.path in hooks:
            # Only wsrelay calls hooks: it sets X-Wsrelay-Hook (and strips any
            # x-wsrelay-* header a client sends through it), and with
            # --hook-secret also X-Wsrelay-Hook-Secret. Refuse anything else,
            # so a client that reaches the app some other way (or through a
            # path spelling a router reads differently) cannot forge a user.
            if self.headers.get("x-wsrelay-hook") is None:
                return self.reply(403, {"error": "hooks are called by wsrelay only"})
            if HOOK_SECRET and self.headers.get("x-wsrelay-hook-secret") != HOOK_SECRET:
                return self.reply(403, {"error": "bad hook secret"})
            return hooks[url.path]()
        if url.path == "/notify":
            user = parse_qs(url.query).get("user", [""])[0]
            try:
                publish(f"user:{user}", {"text": f"hello {user}"})
            except OSError as e:  # URLError / HTTPError: the sidecar said no (e.g. 503)
                return self.reply(503, {"error": str(e)})
            return self.reply(200, {"sent": True})
        self.reply(404, {"error": "not found"})

    def log_message(self, *args):
        pass


def main():
    global ADMIN, API_TOKEN, HOOK_SECRET
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--admin", default=ADMIN, help="wsrelay's admin listener")
    p.add_argument("--api-token", default="")
    p.add_argument("--hook-secret", default="", help="the same value as wsrelay's --hook-secret")
    args = p.parse_args()
    ADMIN, API_TOKEN, HOOK_SECRET = args.admin, args.api_token, args.hook_secret
    server = ThreadingHTTPServer(("127.0.0.1", args.port), App)
    print(f"app listening on 127.0.0.1:{server.server_port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
