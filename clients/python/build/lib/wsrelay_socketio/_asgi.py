"""The little of ASGI the hooks need: read a bounded body, answer JSON."""

from __future__ import annotations

import json as stdjson
from collections.abc import Callable
from typing import Any


async def read_body(receive: Any, limit: int) -> bytes | None:
    """The request body, ``None`` past ``limit`` bytes or if the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(send: Any, status: int, body: Any, dumps: Callable[[Any], Any] = stdjson.dumps) -> None:
    data = dumps(body)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})
