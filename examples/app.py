#!/usr/bin/env python3
"""A small chat app behind wsrelay, standard library only: every hook, a
publish through wsrelay's admin API, and a page that uses the browser client
(clients/js/wsrelay.js). The app has no WebSocket and no Redis code.

Run it beside the sidecar:

    python3 examples/app.py --port 3000 --admin http://127.0.0.1:8081 &
    wsrelay --upstream http://127.0.0.1:3000 --config examples/wsrelay.toml

then open http://127.0.0.1:8080/?user=alice in a browser (and ?user=bob in
another), or POST http://127.0.0.1:8080/notify?user=alice to push to
alice's personal channel. `make demo` runs two replicas behind nginx.
"""

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
# Logging in is `/?user=<name>`: the cookie `session=<name>-session` names the
# user. A real app looks its session store up instead.
USER_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")
# Who may join which room (namespace "room:" has subscribe = "hook"); None: everyone.
ROOMS = {"room:lobby": None, "room:random": None, "room:staff": {"alice"}}

# The page's files: examples/static/, and the browser client from
# clients/js/ (or beside the app, where a container image copies it).
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
    "/wsrelay.js": ("wsrelay.js", "text/javascript; charset=utf-8"),
}
STATIC_DIRS = [os.path.join(HERE, "static"), os.path.join(HERE, "..", "clients", "js"), HERE]

ADMIN = "http://127.0.0.1:8081"
API_TOKEN = ""
HOOK_SECRET = ""


def admin(method, path, body=None):
    """One call to the local sidecar's admin API; raises OSError on failure (e.g. 503: Redis down)."""
    req = urllib.request.Request(
        ADMIN + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"content-type": "application/json"} if body is not None else {},
        method=method,
    )
    if API_TOKEN:
        req.add_header("authorization", "Bearer " + API_TOKEN)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


def publish(channel, data):
    """Publish through the local sidecar: 200 once every replica's sidecar can deliver it."""
    return admin("POST", "/api/publish", {"channel": channel, "data": data})


def may_join(user, channel):
    if channel not in ROOMS:
        return False
    members = ROOMS[channel]
    return user is not None and (members is None or user in members)


def user_of_session(value):
    name = value.removesuffix("-session") if value and value.endswith("-session") else ""
    return name if USER_NAME.fullmatch(name) else None


def read_static(name):
    for d in STATIC_DIRS:
        try:
            with open(os.path.join(d, name), "rb") as f:
                return f.read()
        except OSError:
            continue
    return None


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

    def session_user(self):
        session = SimpleCookie(self.headers.get("cookie", "")).get("session")
        return user_of_session(session.value) if session else None

    # --- wsrelay's hooks --------------------------------------------------

    def connect_hook(self):
        # wsrelay forwards the browser's Cookie, Authorization, Origin and X-Forwarded-*.
        user = self.session_user()
        if user is None:
            return self.reply(401, {"error": "log in first"})
        # Accept: who it is, and the channels wsrelay subscribes it to server-side.
        self.reply(200, {"user": user, "channels": [f"user:{user}"], "info": {"name": user.title()}})

    def subscribe_hook(self):
        req = self.body()  # {"user", "connection", "channel"}
        self.reply(200 if may_join(req["user"], req["channel"]) else 403, {})

    def publish_hook(self):
        req = self.body()  # {"user", "connection", "channel", "data"}
        data = req["data"]
        ok = (
            may_join(req["user"], req["channel"])
            and isinstance(data, dict)
            and len(str(data.get("text", ""))) <= 500
            # A chat line says who wrote it; nobody may speak for someone else.
            and data.get("from", req["user"]) == req["user"]
        )
        self.reply(200 if ok else 403, {})

    def message_hook(self):
        req = self.body()  # {"user", "connection", "data"}: a client's `send`
        data = req["data"]  # any JSON the client sent
        if not isinstance(data, dict):
            return self.reply(400, {"error": {"message": "send an object with an action"}})
        action = data.get("action")
        if action == "whoami":
            return self.reply(200, {"user": req["user"], "connection": req["connection"]})
        if action == "rooms":
            rooms = [c.removeprefix("room:") for c in ROOMS if may_join(req["user"], c)]
            return self.reply(200, {"rooms": rooms})
        self.reply(404, {"error": {"message": "unknown action"}})

    def disconnect_hook(self):
        req = self.body()  # {"user", "connection", "reason"} — best effort
        print(f"left: {req['user']} ({req['reason']})", file=sys.stderr, flush=True)
        self.reply(204)

    # --- the app itself ----------------------------------------------------

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if url.path in STATIC:
            name, ctype = STATIC[url.path]
            data = read_static(name)
            if data is None:
                return self.reply(404, {"error": f"{name} is missing"})
            self.send_response(200)
            self.send_header("content-type", ctype)
            self.send_header("cache-control", "no-cache")
            if url.path == "/":
                user = query.get("user", ["alice"])[0]
                if not USER_NAME.fullmatch(user):
                    return self.reply(400, {"error": "a user name is a-z and 0-9, up to 16"})
                self.send_header("set-cookie", f"session={user}-session; Path=/; HttpOnly; SameSite=Lax")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif url.path == "/history":
            # The page loads a room's last messages, then subscribes from their
            # offset: nothing between the two is missed or shown twice.
            channel = "room:" + query.get("room", [""])[0]
            if not may_join(self.session_user(), channel):
                return self.reply(403, {"error": "not a member"})
            try:
                h = admin("GET", f"/api/channels/{quote(channel, safe=':')}/history?limit=50")
            except OSError as e:
                return self.reply(503, {"error": str(e)})
            self.reply(200, {"messages": h["messages"], "offset": h["offset"] if h["epoch"] else None})
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
            # An app-side event for one user: it reaches that user's tabs on
            # whatever replica they are connected to, and nobody else.
            user = parse_qs(url.query).get("user", [""])[0]
            if not USER_NAME.fullmatch(user):
                return self.reply(400, {"error": "bad user"})
            sender = self.session_user()
            text = f"hello {user}" + (f" from {sender}" if sender else "")
            try:
                result = publish(f"user:{user}", {"text": text})
            except OSError as e:  # URLError / HTTPError: the sidecar said no (e.g. 503)
                return self.reply(503, {"error": str(e)})
            return self.reply(200, {"sent": True, "offset": result.get("offset")})
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
