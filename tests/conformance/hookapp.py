#!/usr/bin/env python3
"""Hook app that plays the socket.io-protocol test suite's reference server
behind wsrelay (Python 3 standard library only).

The reference server (socket.io-protocol README, "Test suite"):

    io.on("connection", (socket) => {
      socket.emit("auth", socket.handshake.auth);
      socket.on("message", (...args) => socket.emit("message-back", ...args));
      socket.on("message-with-ack", (...args) => { const ack = args.pop(); ack(...args); });
    });
    io.of("/custom").on("connection", (socket) => socket.emit("auth", socket.handshake.auth));

Mapping onto wsrelay's hooks:

- connect hook: namespaces "/" and "/custom" get 200 {"user": null, ...};
  any other gets 403 {"error":{"message":"Invalid namespace"}}.
- "auth" on connection: the connect hook body has no connection id (only
  path, query, remote_addr, namespace, auth), so the socket's own room
  (its sid) cannot be named there. Workaround: the hook puts the socket in a
  fresh single-use room (returned in "channels"), and a thread publishes
  "auth" to that room's channel (room r in "/" is channel r, in "/custom" it
  is "/custom#r") a little after answering, once wsrelay has joined it.
- message hook: event "message" -> publish "message-back" with the same args
  to the sender's own room (channel <connection> in "/", "<ns>#<connection>"
  elsewhere); "message-with-ack" -> the answer (the args list) is the ACK.

Usage: hookapp.py --listen 127.0.0.1:PORT --admin http://127.0.0.1:APORT
       [--token TOKEN] [--auth-delay 0.1]
Every hook call is logged to stderr as one JSON line.
"""

import argparse
import json
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAMESPACES = {"/", "/custom"}
ARGS = None


def dumps(obj):
    # Compact, as JSON.stringify: wsrelay relays the app's JSON text verbatim,
    # and the suite compares packets as strings.
    return json.dumps(obj, separators=(",", ":"))


def log(**kw):
    sys.stderr.write(json.dumps(kw) + "\n")
    sys.stderr.flush()


def room_channel(namespace, room):
    return room if namespace == "/" else f"{namespace}#{room}"


def publish(channel, event, args, attachments=None):
    msg = {"channel": channel, "event": event, "args": args}
    if attachments:
        msg["attachments"] = attachments
    body = dumps(msg).encode()
    req = urllib.request.Request(ARGS.admin + "/api/publish", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    if ARGS.token:
        req.add_header("Authorization", "Bearer " + ARGS.token)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            log(publish=channel, event=event, status=r.status)
    except urllib.error.HTTPError as e:
        log(publish=channel, event=event, status=e.code, error=e.read().decode(errors="replace"))
    except Exception as e:  # noqa: BLE001 - report, never crash the server
        log(publish=channel, event=event, error=repr(e))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *a):  # quiet: our own JSON log is enough
        pass

    def answer(self, status, obj=None):
        data = b"" if obj is None else dumps(obj).encode()
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            return self.answer(200, {"ok": True})
        self.answer(404, {"error": {"message": "not found"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        # Only wsrelay calls hooks (it sets X-Wsrelay-Hook, strips it from clients).
        if self.headers.get("x-wsrelay-hook") is None:
            return self.answer(403, {"error": {"message": "not a wsrelay hook call"}})
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return self.answer(400, {"error": {"message": "bad JSON"}})
        if self.path == "/hooks/connect":
            return self.connect(body)
        if self.path == "/hooks/message":
            return self.message(body)
        if self.path == "/hooks/disconnect":
            log(hook="disconnect", body=body)
            return self.answer(204)
        self.answer(404, {"error": {"message": "unknown hook"}})

    def connect(self, body):
        ns = body.get("namespace")
        auth = body.get("auth")
        log(hook="connect", body=body)
        if ns not in NAMESPACES:
            return self.answer(403, {"error": {"message": "Invalid namespace"}})
        # socket.handshake.auth is {} when the CONNECT has no payload.
        auth = auth if isinstance(auth, dict) else {}
        room = "auth-" + uuid.uuid4().hex
        self.answer(200, {"user": None, "channels": [room], "info": None})

        def later():
            time.sleep(ARGS.auth_delay)
            publish(room_channel(ns, room), "auth", [auth])

        threading.Thread(target=later, daemon=True).start()

    def message(self, body):
        log(hook="message", body=body)
        event, args = body.get("event"), body.get("args") or []
        ns, conn = body.get("namespace", "/"), body.get("connection")
        attachments = body.get("attachments")
        if event == "message":
            publish(room_channel(ns, conn), "message-back", args, attachments)
            return self.answer(200, {})
        if event == "message-with-ack":
            # The JSON answer is the ACK's argument list (with the binary
            # attachments beside it, for a binary event).
            if attachments:
                return self.answer(200, {"args": args, "attachments": attachments})
            return self.answer(200, args)
        return self.answer(200, {})


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--admin", required=True, help="wsrelay admin base URL")
    p.add_argument("--token", default="")
    p.add_argument("--auth-delay", type=float, default=0.1, help="seconds between the connect answer and 'auth'")
    ARGS = p.parse_args()
    host, port = ARGS.listen.rsplit(":", 1)
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    log(listening=f"{host}:{srv.server_address[1]}")
    srv.serve_forever()


if __name__ == "__main__":
    main()
