"""The WSGI-style ``environ`` python-socketio hands to ``connect``, rebuilt
from what wsrelay's connect hook carries.

python-socketio's ASGI driver builds ``environ`` from the client's own HTTP
request. Behind wsrelay the app never sees that request: the connect hook
brings its path, query, address and the headers an app authorizes with
(cookies, ``Authorization``, ``Origin``, ``X-Forwarded-*``). ``asgi.scope``
is the hook request's scope (so ``scope['app']`` is the app, as Open WebUI
reads it) with the client's path, query, scheme and headers in place.
"""

from __future__ import annotations

from typing import Any

#: Headers of the hook request that are wsrelay's, not the client's.
_OWN = ("x-wsrelay-", "content-type", "content-length", "accept", "connection", "transfer-encoding")


def client_headers(scope: dict[str, Any]) -> list[tuple[str, str]]:
    """The client's headers wsrelay forwarded with the connect hook."""
    out = []
    for k, v in scope.get("headers", []):
        name = k.decode("latin-1").lower()
        if not name.startswith(_OWN):
            out.append((name, v.decode("latin-1")))
    return out


def record(body: dict[str, Any], scope: dict[str, Any]) -> dict[str, Any]:
    """What is kept of a connection's request (JSON, shared by every worker)."""
    headers = client_headers(scope)
    proto = next((v for k, v in headers if k == "x-forwarded-proto"), "")
    scheme = proto.split(",")[0].strip() or "http"
    return {
        "path": str(body.get("path") or "/"),
        "query": str(body.get("query") or ""),
        "remote_addr": str(body.get("remote_addr") or ""),
        "headers": [[k, v] for k, v in headers],
        "scheme": scheme,
        "transport": str(body.get("transport") or "websocket"),
    }


def build(rec: dict[str, Any], hook_scope: dict[str, Any] | None) -> dict[str, Any]:
    """The ``environ`` of a recorded connection, bound to the current app."""
    headers: list[tuple[str, str]] = [(str(k), str(v)) for k, v in rec.get("headers", [])]
    host, _, port = str(rec.get("remote_addr", "")).rpartition(":")
    path, query = str(rec.get("path", "/")), str(rec.get("query", ""))
    scope: dict[str, Any] = dict(hook_scope or {})
    scope.update(
        {
            "type": "websocket" if rec.get("transport") == "websocket" else "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "scheme": rec.get("scheme", "http"),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": (host.strip("[]"), int(port)) if port.isdigit() else None,
        }
    )
    environ: dict[str, Any] = {
        "wsgi.url_scheme": rec.get("scheme", "http"),
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "RAW_URI": path + ("?" + query if query else ""),
        "SCRIPT_NAME": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": host.strip("[]"),
        "REMOTE_PORT": port,
        "asgi.scope": scope,
        "wsrelay.transport": rec.get("transport", "websocket"),
    }
    for k, v in headers:
        key = k.upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            environ[key] = v
        elif key not in ("CONTENT_LENGTH",):
            name = "HTTP_" + key
            environ[name] = f"{environ[name]},{v}" if name in environ else v
    return environ
