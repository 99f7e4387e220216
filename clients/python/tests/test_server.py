"""python-socketio clients against two sidecars, each in front of an app
written with wsrelay_socketio.AsyncServer (two worker processes each)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import socketio
from conftest import PATH, TOKEN, Deployment

import wsrelay_socketio

WAIT = 10.0


class Client:
    """A python-socketio AsyncClient that records the events it gets."""

    def __init__(self, events: tuple[str, ...] = ("welcome", "said", "caught", "gone", "hi")) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.queues: dict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        for name in events:
            self._record(name)
        self.answer: Callable[[Any], Any] = lambda q: f"answer to {q}"
        self.sio.on("question", lambda q: self.answer(q))
        self.closed: asyncio.Queue[Any] = asyncio.Queue()
        self.sio.on("disconnect", lambda *reason: self.closed.put_nowait(reason))
        self.errors: list[Any] = []
        self.sio.on("connect_error", self.errors.append)

    def _record(self, name: str, namespace: str = "/") -> None:
        self.sio.on(name, lambda *args: self.queues[f"{namespace}{name}"].put_nowait(args), namespace=namespace)

    async def connect(
        self,
        url: str,
        auth: Any = None,
        transports: list[str] | None = None,
        namespaces: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Client:
        await self.sio.connect(
            url,
            auth=auth,
            socketio_path=PATH,
            transports=transports or ["websocket"],
            namespaces=namespaces,
            headers=headers or {},
            wait_timeout=WAIT,
        )
        return self

    async def next(self, name: str, namespace: str = "/") -> Any:
        args = await asyncio.wait_for(self.queues[f"{namespace}{name}"].get(), WAIT)
        return args[0] if len(args) == 1 else args

    async def nothing(self, name: str, within: float = 0.5) -> None:
        await asyncio.sleep(within)
        assert self.queues[f"/{name}"].empty(), f"unexpected {name}: {self.queues[f'/{name}'].get_nowait()}"

    async def call(self, event: str, *args: Any, namespace: str = "/") -> Any:
        data = args[0] if len(args) == 1 else args if args else None
        return await self.sio.call(event, data, namespace=namespace, timeout=WAIT)

    @property
    def sid(self) -> str:
        sid = self.sio.get_sid()
        assert sid is not None
        return sid


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test(), 60)

    asyncio.run(bounded())


def test_connect_runs_the_handler_with_environ_session_and_rooms(deployment: Deployment) -> None:
    a, b, _ = deployment.nodes

    async def scenario() -> None:
        c = await Client().connect(a.url, auth={"user": "ann"}, headers={"Cookie": "token=abc"})
        welcome = await c.next("welcome")
        # The sid is the wsrelay connection id; the emit made inside connect
        # arrived after CONNECT; environ is the client's request.
        assert welcome["sid"] == c.sid and c.sid.startswith("a.")
        assert welcome["path"] == PATH
        assert welcome["app"] is True
        assert welcome["transport"] == "websocket"
        assert welcome["cookie"] == "token=abc"
        me = await c.call("whoami")
        assert me["user"] == "ann"
        assert me["path"] == PATH and me["app"] is True
        assert me["rooms"] == sorted([c.sid, "user:ann"])
        # Another process (this one), through the other replica's sidecar,
        # reads what the app's worker stored: sessions and environs are not
        # held by the process that handled the connect.
        other = wsrelay_socketio.AsyncServer(admin_url=b.admin, api_token=TOKEN)
        session = await other.get_session(c.sid)
        assert session == {"user": "ann", "pid": me["connected_pid"]}
        environ = other.get_environ(c.sid)
        assert environ is not None and environ["PATH_INFO"] == PATH and environ["HTTP_COOKIE"] == "token=abc"
        assert other.transport(c.sid) == "websocket"
        assert sorted(other.rooms(c.sid)) == sorted([c.sid, "user:ann"])
        await other.shutdown()
        await c.sio.disconnect()

    run(scenario)


def test_refusals_reach_the_client_as_connect_error(deployment: Deployment) -> None:
    a, b, _ = deployment.nodes

    async def scenario() -> None:
        for token, message in (("bad", "Connection rejected by server"), ("refuse", "go away")):
            c = Client()
            with pytest.raises(socketio.exceptions.ConnectionError):
                await c.connect(b.url, auth={"token": token})
            assert c.errors == [{"message": message}]
        # With always_connect=True (replica a's app), python-socketio accepts
        # first and disconnects when the handler refuses: so does wsrelay.
        c = await Client().connect(a.url, auth={"token": "bad"})
        await asyncio.wait_for(c.closed.get(), WAIT)
        assert not c.sio.connected

    run(scenario)


def test_rooms_emits_and_membership_across_replicas(deployment: Deployment) -> None:
    a, b, _ = deployment.nodes

    async def scenario() -> None:
        ann = await Client().connect(a.url, auth={"user": "ann"})
        bob = await Client().connect(b.url, auth={"user": "bob"}, transports=["polling"])
        assert (await bob.next("welcome"))["transport"] == "polling"
        assert await ann.call("join", "room1") == sorted([ann.sid, "room1", "user:ann"])
        assert await bob.call("join", "room1") == sorted([bob.sid, "room1", "user:bob"])
        # manager.rooms answers for every replica.
        assert await bob.call("members", "room1") == sorted([ann.sid, bob.sid])
        assert await ann.call("members", "nobody-here") == []
        # emit(room=..., skip_sid=sid) reaches the other replica's socket, not the sender.
        assert await ann.call("say", {"room": "room1", "text": "hello"}) == "ok"
        assert await bob.next("said") == "hello"
        await ann.nothing("said")
        # to a user room, from the other replica
        assert await bob.call("say", {"room": "user:ann", "text": "psst"}) == "ok"
        assert await ann.next("said") == "psst"
        # leave_room and close_room
        assert await bob.call("leave", "room1") == sorted([bob.sid, "user:bob"])
        await ann.call("close", "room1")
        assert await ann.call("members", "room1") == []
        await ann.sio.disconnect()
        await bob.sio.disconnect()

    run(scenario)


def test_call_catch_all_binary_and_tuple_acks(deployment: Deployment) -> None:
    a, b, _ = deployment.nodes

    async def scenario() -> None:
        c = await Client().connect(b.url, auth={"user": "cy"})
        # sio.call: the app asks the client, the client's answer comes back.
        assert await c.call("ask", "why?") == "answer to why?"
        # '*' catch-all handler
        await c.sio.emit("no-such-handler", {"x": 1})
        assert await c.next("caught") == {"event": "no-such-handler", "args": [{"x": 1}]}
        # binary arguments and a binary ack
        assert await c.call("bin", b"\x00\x01") == b"\x00\x01!"
        # a tuple return is several ack arguments
        assert await c.call("two") == (1, "two")
        # the session context manager
        assert await c.call("remember", {"k": [1, 2]}) == {"k": [1, 2]}
        # call() to a socket that is gone answers at once
        other = await Client().connect(a.url, auth={"user": "dee"})
        gone = other.sid
        await other.sio.disconnect()
        await asyncio.sleep(0.3)
        assert await c.call("ask-gone", gone) == "gone"
        await c.sio.disconnect()

    run(scenario)


def test_disconnect_handler_and_server_disconnect(deployment: Deployment) -> None:
    a, b, _ = deployment.nodes

    async def scenario() -> None:
        watcher = await Client().connect(a.url, auth={"user": "w", "observe": True})
        victim = await Client().connect(b.url, auth={"user": "v"})
        sid = victim.sid
        await watcher.call("kick", sid)
        await asyncio.wait_for(victim.closed.get(), WAIT)
        assert await watcher.next("gone") == {"sid": sid, "reason": "server disconnect"}
        leaver = await Client().connect(a.url, auth={"user": "l"})
        sid = leaver.sid
        await leaver.sio.disconnect()
        assert await watcher.next("gone") == {"sid": sid, "reason": "client disconnect"}
        await watcher.sio.disconnect()

    run(scenario)


def test_class_based_namespace(deployment: Deployment) -> None:
    a, b, _ = deployment.nodes

    async def scenario() -> None:
        x = Client(events=())
        x._record("hi", "/chat")
        await x.connect(a.url, namespaces=["/chat"])
        y = Client(events=())
        y._record("hi", "/chat")
        await y.connect(b.url, namespaces=["/chat"])
        sid = x.sio.get_sid("/chat")
        assert await x.call("where", namespace="/chat") == sorted([sid, "lobby"])
        assert await y.call("hello", "all", namespace="/chat") == "hello-ack"
        assert await x.next("hi", "/chat") == "all"
        assert await y.next("hi", "/chat") == "all"
        await x.sio.disconnect()
        await y.sio.disconnect()

    run(scenario)


def test_hooks_only_from_wsrelay(deployment: Deployment) -> None:
    app = deployment.nodes[0].app

    def post(headers: dict[str, str]) -> tuple[int, Any]:
        req = urllib.request.Request(f"{app}{PATH}hooks/connect", data=b'{"connection":"a.x"}', headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    # A request that is no hook (a client reaching the app's old Socket.IO path).
    status, body = post({"Content-Type": "application/json"})
    assert status == 400 and "wsrelay" in body["error"]["message"]
    # A forged hook without the secret.
    status, body = post({"Content-Type": "application/json", "X-Wsrelay-Hook": "connect"})
    assert status == 403 and "X-Wsrelay-Hook-Secret" in body["error"]["message"]


def test_the_synchronous_server_in_a_wsgi_app(deployment: Deployment) -> None:
    a, _, c = deployment.nodes

    async def scenario() -> None:
        watcher = await Client().connect(a.url, auth={"user": "w2", "observe": True})
        # Connected through the WSGI app's sidecar: its connect handler ran
        # in a thread, entered a room, stored a session, emitted after CONNECT.
        x = await Client().connect(c.url, auth={"user": "xena"}, transports=["polling"])
        welcome = await x.next("welcome")
        assert welcome == {"sid": x.sid, "path": PATH, "server": "wsgi"} and x.sid.startswith("c.")
        assert await x.call("whoami") == {"user": "xena", "seen": 1, "rooms": sorted([x.sid, "user:xena"])}
        assert (await x.call("whoami"))["seen"] == 2
        # Rooms and emits across replicas: the async app's socket hears the sync app's emit.
        assert await x.call("join", "mixed") == sorted([x.sid, "mixed", "user:xena"])
        assert await watcher.call("join", "mixed") == sorted([watcher.sid, "mixed", "observers", "user:w2"])
        assert await x.call("say", {"room": "mixed", "text": "from wsgi"}) == "ok"
        assert await watcher.next("said") == "from wsgi"
        # call() from a handler thread, answered by the client.
        assert await x.call("ask", "sync?") == "answer to sync?"
        # Refusal with a message, and the disconnect handler.
        refused = Client()
        with pytest.raises(socketio.exceptions.ConnectionError):
            await refused.connect(c.url, auth={"token": "bad"})
        assert refused.errors == [{"message": "not you"}]
        sid = x.sid
        await x.sio.disconnect()
        assert await watcher.next("gone") == {"sid": sid, "reason": "client disconnect", "server": "wsgi"}
        await watcher.sio.disconnect()

    run(scenario)
