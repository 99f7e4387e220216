"""``Server``: python-socketio's synchronous server API over wsrelay, for
WSGI apps (Flask and the like), mounted with ``socketio.WSGIApp(sio)``.

It runs :class:`~wsrelay_socketio.AsyncServer`'s machinery on a private
event loop thread and the app's handlers in worker threads (as a threaded
WSGI server runs requests), so a handler may call ``sio.emit`` and friends,
which block on that loop until the sidecar answered.
"""

from __future__ import annotations

import asyncio
import functools
import http
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import socketio

from ._handlers import Handler
from .server import AsyncServer

T = TypeVar("T")


class _Core(AsyncServer):
    """The async server, with handlers run in threads instead of awaited."""

    def __init__(self, facade: Server, executor: ThreadPoolExecutor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._facade = facade
        self._executor = executor

    def register_namespace(self, namespace_handler: Any) -> None:
        if not isinstance(namespace_handler, socketio.Namespace):
            raise ValueError("Not a namespace instance (a socketio.Namespace for a synchronous server)")
        namespace_handler._set_server(self._facade)
        self.namespace_handlers[namespace_handler.namespace] = namespace_handler

    async def _trigger_event(self, event: str, namespace: str, *args: Any) -> Any:
        handler, args, is_class = self._handler(event, namespace, args)
        if handler is None:
            return self.not_handled
        run = functools.partial(_call, handler, event, args, is_class)
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)


def _call(handler: Any, event: str, args: tuple[Any, ...], is_class: bool) -> Any:
    if is_class:
        return handler.trigger_event(event, *args)
    try:
        return handler(*args)
    except TypeError:
        # disconnect handlers written before python-socketio 5.12 take no reason
        if event != "disconnect":
            raise
        return handler(*args[:-1])


class Server:
    """A drop-in for ``socketio.Server`` whose sockets live in wsrelay.

    Takes :class:`AsyncServer`'s arguments, plus ``handler_threads`` (the
    most handlers running at once, default 32).
    """

    reason = AsyncServer.reason

    def __init__(self, *args: Any, handler_threads: int = 32, **kwargs: Any) -> None:
        self._executor = ThreadPoolExecutor(handler_threads, thread_name_prefix="wsrelay-handler")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wsrelay-loop", daemon=True)
        self._thread.start()
        if args:
            kwargs["client_manager"] = args[0]
        self._core = _Core(self, self._executor, **kwargs)
        self.manager = self._core.manager
        self.manager_initialized = True
        self.async_mode = "threading"
        self.handlers = self._core.handlers
        self.namespace_handlers = self._core.namespace_handlers

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("wsrelay_socketio.Server: a blocking call from its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- handlers ----------------------------------------------------------

    def on(self, event: str, handler: Handler | None = None, namespace: str | None = None) -> Any:
        return self._core.on(event, handler, namespace)

    def event(self, *args: Any, **kwargs: Any) -> Any:
        return self._core.event(*args, **kwargs)

    def register_namespace(self, namespace_handler: Any) -> None:
        self._core.register_namespace(namespace_handler)

    # -- hooks (WSGI) ------------------------------------------------------

    def handle_request(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """Serve one of wsrelay's hooks (what ``socketio.WSGIApp`` calls)."""
        headers = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = str(environ["CONTENT_TYPE"])
        refused = self._core._refuse(headers)
        if refused is not None:
            return self._respond(start_response, *refused)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > self._core.max_hook_bytes:
            return self._respond(start_response, 413, {"error": {"message": "hook body too large"}})
        raw = environ["wsgi.input"].read(length) if length else b""
        scope = {"type": "http", "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]}
        status, answer = self._run(self._core._hook(headers, raw, scope))
        return self._respond(start_response, status, answer)

    def _respond(self, start_response: Callable[..., Any], status: int, body: Any) -> list[bytes]:
        data = self._core._json.dumps(body)
        raw = data.encode() if isinstance(data, str) else bytes(data)
        start_response(
            f"{status} {http.HTTPStatus(status).phrase}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(raw)))],
        )
        return [raw]

    # -- what the app calls ------------------------------------------------

    def emit(self, event: str, data: Any = None, to: Any = None, room: Any = None, skip_sid: Any = None,
             namespace: str | None = None, callback: Callable[..., Any] | None = None,
             ignore_queue: bool = False) -> None:  # fmt: skip
        self._run(self._core.emit(event, data, to=to, room=room, skip_sid=skip_sid, namespace=namespace,
                                  callback=callback))  # fmt: skip

    def send(self, data: Any, to: Any = None, room: Any = None, skip_sid: Any = None,
             namespace: str | None = None, callback: Callable[..., Any] | None = None,
             ignore_queue: bool = False) -> None:  # fmt: skip
        self.emit("message", data, to=to, room=room, skip_sid=skip_sid, namespace=namespace, callback=callback)

    def call(self, event: str, data: Any = None, to: str | None = None, sid: str | None = None,
             namespace: str | None = None, timeout: float | None = 60, ignore_queue: bool = False) -> Any:  # fmt: skip
        return self._run(self._core.call(event, data, to=to, sid=sid, namespace=namespace, timeout=timeout))

    def enter_room(self, sid: str, room: str, namespace: str | None = None) -> None:
        self._run(self._core.enter_room(sid, room, namespace))

    def leave_room(self, sid: str, room: str, namespace: str | None = None) -> None:
        self._run(self._core.leave_room(sid, room, namespace))

    def close_room(self, room: str, namespace: str | None = None) -> None:
        self._run(self._core.close_room(room, namespace))

    def rooms(self, sid: str, namespace: str | None = None) -> list[str]:
        return self._core.rooms(sid, namespace)

    def disconnect(self, sid: str, namespace: str | None = None, ignore_queue: bool = False) -> None:
        self._run(self._core.disconnect(sid, namespace))

    def get_session(self, sid: str, namespace: str | None = None) -> Any:
        return self._run(self._core.get_session(sid, namespace))

    def save_session(self, sid: str, session: Any, namespace: str | None = None) -> None:
        self._run(self._core.save_session(sid, session, namespace))

    @contextmanager
    def session(self, sid: str, namespace: str | None = None) -> Iterator[Any]:
        """``with sio.session(sid) as s:`` — changes are saved on exit."""
        value = self.get_session(sid, namespace)
        yield value
        self.save_session(sid, value, namespace)

    def get_environ(self, sid: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self._core.get_environ(sid, namespace)

    def transport(self, sid: str, namespace: str | None = None) -> str:
        return self._core.transport(sid, namespace)

    def start_background_task(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
        thread.start()
        return thread

    def sleep(self, seconds: float = 0) -> None:
        time.sleep(seconds)

    def shutdown(self) -> None:
        """Wait for the hooks' background work, then stop the loop and the threads."""
        self._run(self._core.shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._executor.shutdown(wait=True)
