"""A WSGI app written with python-socketio's synchronous server API, on
wsrelay_socketio.Server, served by a threaded WSGI server.

    python wsgi_app.py PORT
"""

from __future__ import annotations

import os
import sys
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import socketio

import wsrelay_socketio

sio = wsrelay_socketio.Server(async_mode="threading")


@sio.event
def connect(sid: str, environ: dict[str, Any], auth: Any) -> Any:
    auth = auth or {}
    if auth.get("token") == "bad":
        raise socketio.exceptions.ConnectionRefusedError("not you")
    user = auth.get("user", "anon")
    sio.save_session(sid, {"user": user, "pid": os.getpid()})
    sio.enter_room(sid, f"user:{user}")
    sio.emit("welcome", {"sid": sid, "path": environ["PATH_INFO"], "server": "wsgi"}, to=sid)
    return None


@sio.event
def disconnect(sid: str, reason: str) -> None:
    sio.emit("gone", {"sid": sid, "reason": reason, "server": "wsgi"}, room="observers")


@sio.on("whoami")
def whoami(sid: str) -> Any:
    with sio.session(sid) as session:
        session["seen"] = session.get("seen", 0) + 1
    return {"user": sio.get_session(sid)["user"], "seen": sio.get_session(sid)["seen"], "rooms": sorted(sio.rooms(sid))}


@sio.on("join")
def join(sid: str, room: str) -> list[str]:
    sio.enter_room(sid, room)
    return sorted(sio.rooms(sid))


@sio.on("say")
def say(sid: str, data: dict[str, Any]) -> str:
    sio.emit("said", data["text"], room=data["room"], skip_sid=sid)
    return "ok"


@sio.on("ask")
def ask(sid: str, question: str) -> Any:
    return sio.call("question", question, to=sid, timeout=5)


class Threaded(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


app = socketio.WSGIApp(sio, socketio_path="ws/socket.io")

if __name__ == "__main__":
    make_server("127.0.0.1", int(sys.argv[1]), app, server_class=Threaded, handler_class=Quiet).serve_forever()
