"""Handler registration and dispatch, as python-socketio resolves them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import socketio

Handler = Callable[..., Any]

#: Events socket.io-client keeps for itself; a catch-all does not get them.
RESERVED_EVENTS = ("connect", "disconnect", "connect_error", "disconnecting", "newListener", "removeListener")


class Handlers:
    """``on``, ``event``, ``register_namespace`` and finding the handler of an event."""

    handlers: dict[str, dict[str, Handler]]
    namespace_handlers: dict[str, Any]
    namespaces: list[str] | str
    not_handled: object

    def _seen_namespaces(self) -> set[str]:
        return set()

    def on(self, event: str, handler: Handler | None = None, namespace: str | None = None) -> Any:
        """Register an event handler (as a decorator, or with ``handler``)."""
        ns = namespace or "/"

        def set_handler(h: Handler) -> Handler:
            self.handlers.setdefault(ns, {})[event] = h
            return h

        if handler is None:
            return set_handler
        set_handler(handler)
        return None

    def event(self, *args: Any, **kwargs: Any) -> Any:
        """Register a handler named after the function (``@sio.event``)."""
        if len(args) == 1 and not kwargs and callable(args[0]):
            return self.on(args[0].__name__)(args[0])

        def set_handler(h: Handler) -> Handler:
            registered: Handler = self.on(h.__name__, *args, **kwargs)(h)
            return registered

        return set_handler

    def register_namespace(self, namespace_handler: Any) -> None:
        """Register a ``socketio.AsyncNamespace`` instance."""
        if not isinstance(namespace_handler, socketio.AsyncNamespace):
            raise ValueError("Not a namespace instance")
        namespace_handler._set_server(self)
        self.namespace_handlers[namespace_handler.namespace] = namespace_handler

    def known_namespaces(self) -> list[str]:
        names = set(self.handlers) | set(self.namespace_handlers)
        if isinstance(self.namespaces, list):
            names |= set(self.namespaces)
        names |= self._seen_namespaces()
        return sorted(n for n in names if n != "*")

    def _accepts(self, namespace: str) -> bool:
        return (
            namespace in self.handlers
            or namespace in self.namespace_handlers
            or self.namespaces == "*"
            or namespace in self.namespaces
        )

    def _handler(self, event: str, namespace: str, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...], bool]:
        """The handler for an event, its arguments, and whether it is a namespace class.

        As python-socketio resolves them: the namespace's handler for the
        event, its ``'*'``, then the ``'*'`` namespace's, then a class.
        """
        catch_all = event not in RESERVED_EVENTS
        own = self.handlers.get(namespace, {})
        if event in own:
            return own[event], args, False
        if catch_all and "*" in own:
            return own["*"], (event, *args), False
        anyns = self.handlers.get("*", {})
        if event in anyns:
            return anyns[event], (namespace, *args), False
        if catch_all and "*" in anyns:
            return anyns["*"], (event, namespace, *args), False
        if namespace in self.namespace_handlers:
            return self.namespace_handlers[namespace], args, True
        if "*" in self.namespace_handlers:
            return self.namespace_handlers["*"], (namespace, *args), True
        return None, args, False

    async def _trigger_event(self, event: str, namespace: str, *args: Any) -> Any:
        handler, args, is_class = self._handler(event, namespace, args)
        if handler is None:
            return self.not_handled
        if is_class:
            return await handler.trigger_event(event, *args)
        try:
            result = handler(*args)
        except TypeError:
            # disconnect handlers written before python-socketio 5.12 take no reason
            if event != "disconnect":
                raise
            result = handler(*args[:-1])
        if inspect.isawaitable(result):
            result = await result
        return result
