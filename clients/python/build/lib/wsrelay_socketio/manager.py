"""``sio.manager`` as apps read it, answered by the sidecars.

python-socketio's manager keeps this process's rooms in a dict; apps read
``sio.manager.rooms[namespace][room]`` to find a room's sids. Behind wsrelay
the rooms live in the sidecars, so every read asks the local sidecar, which
asks every node: the answer covers every replica, not just this process.
The reads are synchronous (as the dict is), so each is one blocking HTTP
call to the local sidecar (bounded by its 2 s fan-out).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._admin import WsrelayError

if TYPE_CHECKING:
    from .server import AsyncServer


def channel_of(room: str, namespace: str) -> str:
    """The wsrelay channel of a Socket.IO room (``/chat#room`` in ``/chat``)."""
    return room if namespace == "/" else f"{namespace}#{room}"


def room_of(channel: str, namespace: str) -> str | None:
    """The room of ``namespace`` a channel stands for, ``None`` if another's."""
    if namespace == "/":
        return None if channel.startswith("/") else channel
    prefix = namespace + "#"
    return channel[len(prefix) :] if channel.startswith(prefix) else None


class _Rooms(Mapping[str, dict[str, str]]):
    """The rooms of one namespace: ``room -> {sid: sid}`` on every node.

    Only lookups are answered (``rooms[room]``, ``.get(room)``, ``in``);
    iterating over every room of a deployment is not offered.
    """

    def __init__(self, server: AsyncServer, namespace: str) -> None:
        self._server = server
        self._namespace = namespace

    def __getitem__(self, room: str) -> dict[str, str]:
        sids = self._server.admin.members_sync(channel_of(room, self._namespace))
        if not sids:
            raise KeyError(room)
        return {sid: sid for sid in sids}

    def __iter__(self) -> Iterator[str]:
        raise TypeError("wsrelay answers room lookups, not a list of every room")

    def __len__(self) -> int:
        raise TypeError("wsrelay answers room lookups, not a count of every room")

    def __contains__(self, room: object) -> bool:
        return isinstance(room, str) and self.get(room) is not None


class _Namespaces(Mapping[str, _Rooms]):
    def __init__(self, server: AsyncServer) -> None:
        self._server = server

    def __getitem__(self, namespace: str) -> _Rooms:
        return _Rooms(self._server, namespace or "/")

    def __iter__(self) -> Iterator[str]:
        return iter(self._server.known_namespaces())

    def __len__(self) -> int:
        return len(self._server.known_namespaces())

    def __contains__(self, namespace: object) -> bool:
        return isinstance(namespace, str)


class RelayManager:
    """The part of python-socketio's client manager apps call directly."""

    def __init__(self, server: AsyncServer) -> None:
        self.server = server
        self.rooms = _Namespaces(server)

    def initialize(self) -> None:
        """Nothing to start: the sidecar holds the connections and Redis."""

    def get_namespaces(self) -> list[str]:
        return self.server.known_namespaces()

    def get_participants(self, namespace: str, room: str | None) -> Iterator[tuple[str, str]]:
        """``(sid, eio_sid)`` of a room's sockets on every node (the sid is both)."""
        channel = namespace if room is None else channel_of(room, namespace)
        for sid in self.server.admin.members_sync(channel):
            yield sid, sid

    def get_rooms(self, sid: str, namespace: str) -> list[str]:
        try:
            channels = self.server.admin.channels_of_sync(sid) or []
        except WsrelayError:
            return []
        return [r for r in (room_of(c, namespace) for c in channels) if r is not None]

    def is_connected(self, sid: str, namespace: str) -> bool:
        try:
            channels = self.server.admin.channels_of_sync(sid)
        except WsrelayError:
            return False
        return channels is not None and namespace in channels

    def sid_from_eio_sid(self, eio_sid: str, namespace: str) -> str:
        return eio_sid

    def eio_sid_from_sid(self, sid: str, namespace: str) -> str:
        return sid

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"wsrelay's manager has no {name!r}: the sidecar holds the rooms (see the README)")
