"""The app of the tests: python-socketio handlers as an app writes them,
on wsrelay_socketio.AsyncServer, mounted as python-socketio apps mount."""

from __future__ import annotations

import os
from typing import Any

import socketio

import wsrelay_socketio

sio = wsrelay_socketio.AsyncServer(
    cors_allowed_origins="*",
    async_mode="asgi",
    always_connect=os.environ.get("ALWAYS_CONNECT") == "1",
    max_http_buffer_size=16 * 1024 * 1024,
)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any) -> Any:
    auth = auth or {}
    token = auth.get("token")
    if token == "bad":
        return False
    if token == "refuse":
        raise socketio.exceptions.ConnectionRefusedError("go away")
    user = auth.get("user", "anon")
    await sio.save_session(sid, {"user": user, "pid": os.getpid()})
    await sio.enter_room(sid, f"user:{user}")
    if auth.get("observe"):
        await sio.enter_room(sid, "observers")
    scope = environ.get("asgi.scope") or {}
    await sio.emit(
        "welcome",
        {
            "sid": sid,
            "path": environ["PATH_INFO"],
            "app": scope.get("app") is not None,
            "transport": sio.transport(sid),
            "cookie": environ.get("HTTP_COOKIE"),
        },
        to=sid,
    )
    return None


@sio.event
async def disconnect(sid: str, reason: str) -> None:
    await sio.emit("gone", {"sid": sid, "reason": reason}, room="observers")


@sio.on("whoami")
async def whoami(sid: str) -> Any:
    session = await sio.get_session(sid)
    environ = sio.get_environ(sid) or {}
    return {
        "user": session.get("user"),
        "connected_pid": session.get("pid"),
        "pid": os.getpid(),
        "path": environ.get("PATH_INFO"),
        "app": (environ.get("asgi.scope") or {}).get("app") is not None,
        "rooms": sorted(sio.rooms(sid)),
    }


@sio.on("join")
async def join(sid: str, room: str) -> list[str]:
    await sio.enter_room(sid, room)
    return sorted(sio.rooms(sid))


@sio.on("leave")
async def leave(sid: str, room: str) -> list[str]:
    await sio.leave_room(sid, room)
    return sorted(sio.rooms(sid))


@sio.on("members")
async def members(sid: str, room: str) -> list[str]:
    found = sio.manager.rooms["/"].get(room)
    return sorted(found) if found else []


@sio.on("say")
async def say(sid: str, data: dict[str, Any]) -> str:
    await sio.emit("said", data["text"], room=data["room"], skip_sid=sid)
    return "ok"


@sio.on("ask")
async def ask(sid: str, question: str) -> Any:
    return await sio.call("question", question, to=sid, timeout=5)


@sio.on("ask-gone")
async def ask_gone(sid: str, other: str) -> str:
    try:
        await sio.call("question", "anyone?", to=other, timeout=None)
    except wsrelay_socketio.SocketGone:
        return "gone"
    return "answered"


@sio.on("kick")
async def kick(sid: str, target: str) -> None:
    await sio.disconnect(target)


@sio.on("close")
async def close(sid: str, room: str) -> None:
    await sio.close_room(room)


@sio.on("remember")
async def remember(sid: str, value: Any) -> Any:
    async with sio.session(sid) as session:
        session["value"] = value
    return (await sio.get_session(sid)).get("value")


@sio.on("bin")
async def binary(sid: str, data: bytes) -> bytes:
    return data + b"!"


@sio.on("two")
async def two(sid: str) -> tuple[int, str]:
    return 1, "two"


@sio.on("*")
async def catch_all(event: str, sid: str, *args: Any) -> None:
    await sio.emit("caught", {"event": event, "args": list(args)}, to=sid)


class Chat(socketio.AsyncNamespace):
    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        await self.enter_room(sid, "lobby")

    async def on_hello(self, sid: str, data: Any) -> str:
        await self.emit("hi", data, room="lobby")
        return "hello-ack"

    async def on_where(self, sid: str) -> list[str]:
        return sorted(self.server.rooms(sid, namespace="/chat"))


sio.register_namespace(Chat("/chat"))

socket_app = socketio.ASGIApp(sio, socketio_path="/ws/socket.io")


class MainApp:
    """What a framework does (Starlette puts itself in ``scope["app"]``),
    with the Socket.IO app mounted at ``/ws`` as Open WebUI mounts it."""

    def __init__(self) -> None:
        self.state = {"name": "main"}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["app"] = self
        if scope["type"] == "lifespan" or scope.get("path", "").startswith("/ws/"):
            await socket_app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"the app"})


app = MainApp()
