"""python-socketio's server API over wsrelay.

Replace ``socketio.AsyncServer(...)`` with ``wsrelay_socketio.AsyncServer(...)``
(or ``socketio.Server(...)`` with ``wsrelay_socketio.Server(...)`` in a WSGI app):
handlers, ``emit``, rooms, ``call`` and sessions work as before, while the
clients' sockets, the rooms and the fan-out across replicas live in the
wsrelay sidecar beside each replica. Mount it with the unchanged
``socketio.ASGIApp(sio, socketio_path=...)``; wsrelay's hooks arrive there.
"""

from socketio import ASGIApp, AsyncNamespace, Namespace, WSGIApp

from ._admin import AdminClient, WsrelayError
from .manager import RelayManager, channel_of, room_of
from .server import AsyncServer, SocketGone
from .sync import Server

__all__ = [
    "ASGIApp",
    "AdminClient",
    "AsyncNamespace",
    "AsyncServer",
    "Namespace",
    "RelayManager",
    "Server",
    "SocketGone",
    "WSGIApp",
    "WsrelayError",
    "channel_of",
    "room_of",
]
__version__ = "0.1.0"
