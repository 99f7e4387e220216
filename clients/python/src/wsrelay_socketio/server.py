"""``AsyncServer``: python-socketio's server API over wsrelay.

The sidecar holds the clients' sockets, the rooms and the sessions; this
class keeps only the handlers. Handlers run when wsrelay calls its hooks
(served by :meth:`AsyncServer.handle_request`, so an unchanged
``socketio.ASGIApp(sio, socketio_path=...)`` mounts them where the app
mounted its Socket.IO server), and every call (``emit``, ``enter_room``,
``call`` …) is a request to the local sidecar's admin API.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import inspect
import json as stdjson
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from engineio.base_server import BaseServer as _EngineIOBase
from socketio import exceptions
from socketio.packet import Packet

from . import _environ
from ._admin import AdminClient, WsrelayError
from ._asgi import read_body, respond
from ._handlers import Handler, Handlers
from .manager import RelayManager, channel_of

log = logging.getLogger("wsrelay_socketio")

#: wsrelay's disconnect reasons as python-socketio names them.
_REASONS = {
    "client": _EngineIOBase.reason.CLIENT_DISCONNECT,
    "disconnected": _EngineIOBase.reason.SERVER_DISCONNECT,
    "idle_timeout": _EngineIOBase.reason.PING_TIMEOUT,
    "error": _EngineIOBase.reason.TRANSPORT_ERROR,
    "protocol_error": _EngineIOBase.reason.TRANSPORT_ERROR,
}

#: The session-store namespace that keeps each connection's request.
_ENVIRON_NS = "/wsrelay:environ"

#: How many connections' environs one process keeps at hand.
_ENVIRON_CACHE = 10_000

#: The hook request being served (its scope carries the app for ``environ``).
_scope: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("wsrelay_scope", default=None)


class SocketGone(exceptions.DisconnectedError, exceptions.TimeoutError):
    """``call()`` to a socket that is gone: it will never answer.

    python-socketio waits out the timeout in that case; wsrelay knows at
    once. Both exception types catch it.
    """


class _Connecting:
    """A CONNECT being decided: rooms entered and emits made meanwhile."""

    def __init__(self) -> None:
        self.rooms: list[str] = []
        self.later: list[Callable[[], Awaitable[Any]]] = []


def _env_ns(namespace: str) -> str:
    return _ENVIRON_NS if namespace == "/" else _ENVIRON_NS + namespace


class AsyncServer(Handlers):
    """A drop-in for ``socketio.AsyncServer`` whose sockets live in wsrelay.

    python-socketio's options about transports, pings, CORS and buffer sizes
    are the sidecar's (its flags); they are accepted here and ignored, as is
    ``client_manager`` (wsrelay carries messages between replicas).

    :param admin_url: the local sidecar's admin API (``$WSRELAY_ADMIN_URL``,
        default ``http://127.0.0.1:8081``).
    :param api_token: its ``--api-token`` (``$WSRELAY_API_TOKEN``).
    :param hook_secret: its ``--hook-secret`` (``$WSRELAY_HOOK_SECRET``):
        hook requests without it are refused.
    :param max_hook_bytes: largest hook body read (default 32 MiB).
    """

    reason = _EngineIOBase.reason

    def __init__(
        self,
        client_manager: Any = None,
        logger: bool | logging.Logger = False,
        serializer: Any = "default",
        json: Any = None,
        async_handlers: bool = True,
        always_connect: bool = False,
        namespaces: list[str] | str | None = None,
        *,
        admin_url: str | None = None,
        api_token: str | None = None,
        hook_secret: str | None = None,
        max_hook_bytes: int = 32 * 1024 * 1024,
        **kwargs: Any,
    ) -> None:
        self.packet_class: type[Packet] = (
            Packet if serializer in ("default", None) or isinstance(serializer, str) else serializer
        )
        self._json = json or stdjson
        self.admin = AdminClient(admin_url, api_token, json=self._json)
        secret = hook_secret if hook_secret is not None else os.environ.get("WSRELAY_HOOK_SECRET")
        self.hook_secret = secret or None
        self.max_hook_bytes = max_hook_bytes
        self.logger = logger if isinstance(logger, logging.Logger) else log
        self.async_handlers = async_handlers
        self.always_connect = always_connect
        self.namespaces: list[str] | str = namespaces or ["/"]
        self.handlers: dict[str, dict[str, Handler]] = {}
        self.namespace_handlers: dict[str, Any] = {}
        self.not_handled = object()
        self.manager = RelayManager(self)
        self.manager_initialized = True
        self.async_mode = "asgi"
        if client_manager is not None:
            log.info("wsrelay carries messages between replicas: client_manager %r is not used", client_manager)
        self._connecting: dict[tuple[str, str], _Connecting] = {}
        self._environs: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ignored = sorted(kwargs)

    def _seen_namespaces(self) -> set[str]:
        return {ns for _, ns in self._environs}

    def _binary(self, args: Any) -> bool:
        # A serializer that declares it never carries binary (Open WebUI's
        # JSONOnlyPacket) skips the scan of every emit, as in python-socketio.
        if getattr(self.packet_class, "uses_binary_events", True) is False:
            return False
        return bool(self.packet_class.data_is_binary(args))

    # -- hooks -------------------------------------------------------------

    async def handle_request(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Serve one of wsrelay's hooks (what ``socketio.ASGIApp`` calls)."""
        if scope.get("type") != "http":
            if scope.get("type") == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self._refuse(headers)
        if refused is not None:
            await respond(send, *refused)
            return
        raw = await read_body(receive, self.max_hook_bytes)
        status, answer = await self._hook(headers, raw, scope)
        await respond(send, status, answer, dumps=self._json.dumps)

    def _refuse(self, headers: dict[str, str]) -> tuple[int, Any] | None:
        """A request that is no hook of this app's sidecar, and its answer."""
        if headers.get("x-wsrelay-hook") is None:
            msg = "Socket.IO clients connect to wsrelay, which calls this app's hooks here (see wsrelay's README)"
            return 400, {"error": {"message": msg}}
        if self.hook_secret is not None and headers.get("x-wsrelay-hook-secret") != self.hook_secret:
            return 403, {"error": {"message": "not from wsrelay: bad or missing X-Wsrelay-Hook-Secret"}}
        return None

    async def _hook(self, headers: dict[str, str], raw: bytes | None, scope: dict[str, Any]) -> tuple[int, Any]:
        """Runs one hook: its status and JSON answer. What the connect
        handler did to its own socket is started here and waits until the
        sidecar registered the socket (just after this answer)."""
        kind = headers.get("x-wsrelay-hook")
        try:
            body = self._json.loads(raw) if raw is not None else None
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("connection"), str):
            return 400, {"error": {"message": "a hook body with a connection was expected"}}
        token = _scope.set(scope)
        try:
            later: list[Callable[[], Awaitable[Any]]] = []
            if kind == "connect":
                status, answer = await self._on_connect(body, scope, later)
            elif kind == "message":
                status, answer = await self._on_message(body)
            elif kind == "disconnect":
                status, answer = 200, {}
                self.start_background_task(self._on_disconnect, body)
            else:
                status, answer = 404, {"error": {"message": f"no such hook: {kind}"}}
        except Exception:
            self.logger.exception("wsrelay %s hook failed", kind)
            status, answer = 500, {"error": {"message": "the app's handler failed"}}
        finally:
            _scope.reset(token)
        if later:
            self.start_background_task(self._after_connect, body["connection"], later)
        return status, answer

    async def _on_connect(
        self, body: dict[str, Any], scope: dict[str, Any], later: list[Callable[[], Awaitable[Any]]]
    ) -> tuple[int, Any]:
        sid: str = body["connection"]
        ns = body.get("namespace") or "/"
        if not self._accepts(ns):
            return 401, {"error": {"message": "Unable to connect"}}
        rec = _environ.record(body, scope)
        environ = _environ.build(rec, scope)
        pending = _Connecting()
        self._connecting[(sid, ns)] = pending
        self._remember(sid, ns, rec)
        refusal: dict[str, Any] = {"message": "Connection rejected by server"}
        auth = body.get("auth")
        try:
            if auth:
                ok = await self._trigger_event("connect", ns, sid, environ, auth)
            else:
                try:
                    ok = await self._trigger_event("connect", ns, sid, environ)
                except TypeError:
                    ok = await self._trigger_event("connect", ns, sid, environ, None)
        except exceptions.ConnectionRefusedError as e:
            refusal, ok = e.error_args, False
        except ConnectionRefusedError:
            refusal, ok = {"message": "Connection refused by server"}, False
        finally:
            self._connecting.pop((sid, ns), None)
        if ok is False:
            self._environs.pop((sid, ns), None)
            if not self.always_connect:
                return 401, {"error": refusal}
            # python-socketio sends CONNECT, then DISCONNECT: so does wsrelay.
            later.append(lambda: self.admin.disconnect(sid))
            return 200, {"user": None, "channels": []}
        await self.admin.put_session(sid, _env_ns(ns), rec)
        later.extend(pending.later)
        return 200, {"user": None, "channels": pending.rooms}

    async def _after_connect(self, sid: str, later: list[Callable[[], Awaitable[Any]]]) -> None:
        # What the connect handler did to its own socket waits until the
        # sidecar has registered it (right after the hook's answer).
        for _ in range(250):
            try:
                if await self.admin.channels_of(sid) is not None:
                    break
            except WsrelayError:
                pass
            await asyncio.sleep(0.02)
        for step in later:
            try:
                await step()
            except Exception:
                self.logger.exception("wsrelay: an emit made during connect failed")

    async def _on_message(self, body: dict[str, Any]) -> tuple[int, Any]:
        sid: str = body["connection"]
        ns = body.get("namespace") or "/"
        event = body.get("event")
        if not isinstance(event, str):
            return 400, {"error": {"message": "an event name was expected"}}
        args = self._args_from(body.get("args"), body.get("attachments"))
        if not body.get("ack"):
            if self.async_handlers:
                self.start_background_task(self._run_event, event, ns, sid, args)
            else:
                await self._run_event(event, ns, sid, args)
            return 200, []
        result = await self._trigger_event(event, ns, sid, *args)
        if result is self.not_handled:
            return 404, {"error": {"message": f"no handler for {event!r}"}}
        return 200, self._ack(result)

    async def _run_event(self, event: str, ns: str, sid: str, args: list[Any]) -> None:
        try:
            await self._trigger_event(event, ns, sid, *args)
        except Exception:
            self.logger.exception("handler of %r failed", event)

    def _ack(self, result: Any) -> Any:
        # python-socketio's ack: None is no argument, a tuple several.
        body = self._args_json(result)
        return body if "attachments" in body else body["args"]

    def _args_json(self, data: Any) -> dict[str, Any]:
        """``{"args"}`` (and ``"attachments"``, base64, for bytes) as wsrelay
        carries a value: None no argument, a tuple several, else one."""
        args = [] if data is None else list(data) if isinstance(data, tuple) else [data]
        if not self._binary(args):
            return {"args": args}
        args, atts = self.packet_class.deconstruct_binary(args)
        return {"args": args, "attachments": [base64.b64encode(a).decode() for a in atts]}

    def _args_from(self, args: Any, attachments: Any) -> list[Any]:
        """The arguments wsrelay sent, their binary placeholders filled in."""
        if attachments:
            args = self.packet_class.reconstruct_binary(args, [base64.b64decode(a) for a in attachments])
        return list(args or [])

    async def _on_disconnect(self, body: dict[str, Any]) -> None:
        sid: str = body["connection"]
        reason = _REASONS.get(str(body.get("reason")), self.reason.TRANSPORT_CLOSE)
        for ns in self.known_namespaces():
            if (sid, ns) not in self._environs:
                try:
                    if await self.admin.get_session(sid, _env_ns(ns)) is None:
                        continue
                except WsrelayError:
                    continue
            try:
                await self._trigger_event("disconnect", ns, sid, reason)
            except Exception:
                self.logger.exception("disconnect handler failed")
            self._environs.pop((sid, ns), None)
            for store in (_env_ns(ns), ns):
                try:
                    await self.admin.delete_session(sid, store)
                except WsrelayError:
                    pass

    def _remember(self, sid: str, ns: str, rec: dict[str, Any]) -> None:
        self._environs[(sid, ns)] = rec
        self._environs.move_to_end((sid, ns))
        while len(self._environs) > _ENVIRON_CACHE:
            self._environs.popitem(last=False)

    def _record(self, sid: str, namespace: str | None) -> dict[str, Any] | None:
        ns = namespace or "/"
        rec = self._environs.get((sid, ns))
        if rec is None:
            try:
                rec = self.admin.get_session_sync(sid, _env_ns(ns))
            except WsrelayError:
                return None
            if isinstance(rec, dict):
                self._remember(sid, ns, rec)
        return rec if isinstance(rec, dict) else None

    # -- what the app calls ------------------------------------------------

    def _body(self, event: str, data: Any) -> dict[str, Any]:
        return {"event": event, **self._args_json(data)}

    async def emit(
        self,
        event: str,
        data: Any = None,
        to: Any = None,
        room: Any = None,
        skip_sid: Any = None,
        namespace: str | None = None,
        callback: Callable[..., Any] | None = None,
        ignore_queue: bool = False,
    ) -> None:
        """Emit an event to a room, several rooms, a sid, or the whole namespace.

        Raises :class:`WsrelayError` when the sidecar could not take it (503
        while Redis is unreachable): the message was not sent.
        """
        ns = namespace or "/"
        target = to if to is not None else room
        if callback is not None:
            if not isinstance(target, str):
                raise ValueError("an emit with a callback goes to one sid (to=sid)")
            self.start_background_task(self._emit_with_callback, event, data, target, ns, callback)
            return
        body = self._body(event, data)
        if target is None:
            body["channel"] = ns
        elif isinstance(target, str):
            body["channel"] = channel_of(target, ns)
        else:
            body["channels"] = [channel_of(str(r), ns) for r in target]
        if skip_sid is not None:
            skip = [skip_sid] if isinstance(skip_sid, str) else list(skip_sid)
            if len(skip) > 1:
                raise ValueError("wsrelay skips one sid per emit (skip_sid=sid)")
            if skip:
                body["exclude"] = skip[0]
        pending = self._connecting.get((target, ns)) if isinstance(target, str) else None
        if pending is not None:
            # To a socket whose connect handler runs: after its CONNECT.
            pending.later.append(lambda: self.admin.publish(body))
            return
        await self.admin.publish(body)

    async def send(
        self,
        data: Any,
        to: Any = None,
        room: Any = None,
        skip_sid: Any = None,
        namespace: str | None = None,
        callback: Callable[..., Any] | None = None,
        ignore_queue: bool = False,
    ) -> None:
        """Emit the ``message`` event."""
        await self.emit("message", data, to=to, room=room, skip_sid=skip_sid, namespace=namespace, callback=callback)

    async def _emit_with_callback(self, event: str, data: Any, sid: str, ns: str, callback: Callable[..., Any]) -> None:
        try:
            answer = await self._call_args(event, data, sid, ns, 60)
        except exceptions.SocketIOError:
            return  # python-socketio never calls a callback that got no answer
        result = callback(*answer)
        if inspect.isawaitable(result):
            await result

    async def _call_args(self, event: str, data: Any, sid: str, ns: str, timeout: float | None) -> list[Any]:
        body = self._body(event, data)
        body.update({"connection": sid, "namespace": ns, "timeout": timeout})
        pending = self._connecting.get((sid, ns))
        if pending is not None:
            raise RuntimeError("call() to a socket whose connect handler has not returned cannot be answered")
        try:
            got = await self.admin.call(body, timeout)
        except WsrelayError as e:
            if e.status == 504 or e.code == "timeout":
                raise exceptions.TimeoutError() from None
            if e.status == 404:
                raise SocketGone() from None
            raise
        return self._args_from(got.get("args"), got.get("attachments"))

    async def call(
        self,
        event: str,
        data: Any = None,
        to: str | None = None,
        sid: str | None = None,
        namespace: str | None = None,
        timeout: float | None = 60,
        ignore_queue: bool = False,
    ) -> Any:
        """Emit to one socket and wait for its acknowledgement.

        Raises ``socketio.exceptions.TimeoutError`` when it does not answer
        in time, and :class:`SocketGone` (a ``DisconnectedError`` and a
        ``TimeoutError``) when it is gone.
        """
        target = to or sid
        if target is None:
            raise ValueError("Cannot use call() to broadcast.")
        args = await self._call_args(event, data, target, namespace or "/", timeout)
        return tuple(args) if len(args) > 1 else args[0] if args else None

    async def enter_room(self, sid: str, room: str, namespace: str | None = None) -> None:
        """Put a socket in a room (on whatever node it is connected to)."""
        ns = namespace or "/"
        pending = self._connecting.get((sid, ns))
        if pending is not None:
            if room not in pending.rooms:
                pending.rooms.append(room)
            return
        await self.admin.subscribe(sid, channel_of(room, ns))

    async def leave_room(self, sid: str, room: str, namespace: str | None = None) -> None:
        ns = namespace or "/"
        pending = self._connecting.get((sid, ns))
        if pending is not None:
            if room in pending.rooms:
                pending.rooms.remove(room)
            return
        await self.admin.unsubscribe(sid, channel_of(room, ns))

    async def close_room(self, room: str, namespace: str | None = None) -> None:
        """Every socket of the room leaves it, on every node."""
        await self.admin.close_room(channel_of(room, namespace or "/"))

    def rooms(self, sid: str, namespace: str | None = None) -> list[str]:
        """The rooms a socket is in (its sid among them), asked of the node
        that holds it. Synchronous, as python-socketio's: one blocking call."""
        return self.manager.get_rooms(sid, namespace or "/")

    async def disconnect(self, sid: str, namespace: str | None = None, ignore_queue: bool = False) -> None:
        """Disconnect a socket (all its namespaces: wsrelay closes the connection)."""
        pending = self._connecting.get((sid, namespace or "/"))
        if pending is not None:
            pending.later.append(lambda: self.admin.disconnect(sid))
            return
        await self.admin.disconnect(sid)

    async def get_session(self, sid: str, namespace: str | None = None) -> Any:
        """The session stored for a socket (shared by every worker and replica)."""
        data = await self.admin.get_session(sid, namespace or "/")
        return {} if data is None else data

    async def save_session(self, sid: str, session: Any, namespace: str | None = None) -> None:
        await self.admin.put_session(sid, namespace or "/", session)

    def session(self, sid: str, namespace: str | None = None) -> _SessionContext:
        """``async with sio.session(sid) as s:`` — changes are saved on exit."""
        return _SessionContext(self, sid, namespace)

    def get_environ(self, sid: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The connecting request's environ (see ``_environ``); ``None`` if unknown."""
        rec = self._record(sid, namespace)
        return None if rec is None else _environ.build(rec, _scope.get())

    def transport(self, sid: str, namespace: str | None = None) -> str:
        """The transport the socket connected with (``polling`` may since have upgraded)."""
        rec = self._record(sid, namespace)
        return str(rec.get("transport", "websocket")) if rec else "websocket"

    def start_background_task(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        """Run a coroutine function as a task, kept until it ends."""
        task: asyncio.Task[Any] = asyncio.ensure_future(target(*args, **kwargs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def sleep(self, seconds: float = 0) -> None:
        await asyncio.sleep(seconds)

    async def shutdown(self) -> None:
        """Wait for background tasks started by hooks, then close the HTTP clients."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)
        await self.admin.aclose()

    def instrument(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("Socket.IO's admin UI is not supported: wsrelay's metrics and API replace it")

    def attach(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("mount socketio.ASGIApp(sio, ...) instead")


class _SessionContext:
    def __init__(self, server: AsyncServer, sid: str, namespace: str | None) -> None:
        self.server, self.sid, self.namespace = server, sid, namespace
        self.session: Any = None

    async def __aenter__(self) -> Any:
        self.session = await self.server.get_session(self.sid, self.namespace)
        return self.session

    async def __aexit__(self, *exc: Any) -> None:
        await self.server.save_session(self.sid, self.session, self.namespace)
