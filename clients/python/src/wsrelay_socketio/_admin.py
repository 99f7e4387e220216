"""The local sidecar's admin API (`/api/*`), asynchronous and blocking.

Every outbound call of :class:`~wsrelay_socketio.AsyncServer` goes through
here: one pooled HTTP client per process, bearer token when configured,
errors turned into :class:`WsrelayError` with the sidecar's code and message.
"""

from __future__ import annotations

import json as stdjson
import os
from typing import Any
from urllib.parse import quote

import httpx

#: Default admin listener of a sidecar in the same pod or compose service.
DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"


class WsrelayError(Exception):
    """The sidecar answered an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"wsrelay {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _error(resp: httpx.Response) -> WsrelayError:
    try:
        err = resp.json()["error"]
        return WsrelayError(resp.status_code, str(err.get("code", "")), str(err.get("message", "")))
    except (ValueError, KeyError, TypeError):
        return WsrelayError(resp.status_code, "", resp.text[:200])


class AdminClient:
    """Calls to one sidecar's admin API.

    ``url`` defaults to ``$WSRELAY_ADMIN_URL`` (else ``http://127.0.0.1:8081``)
    and ``token`` to ``$WSRELAY_API_TOKEN``. ``timeout`` bounds every call but
    :meth:`call`, which waits as long as the sidecar does (its own bound).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        json: Any = None,
    ) -> None:
        self.url = (url or os.environ.get("WSRELAY_ADMIN_URL") or DEFAULT_ADMIN_URL).rstrip("/")
        token = token if token is not None else os.environ.get("WSRELAY_API_TOKEN")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self._json = json or stdjson
        self._async: httpx.AsyncClient | None = None
        self._sync: httpx.Client | None = None

    def _aclient(self) -> httpx.AsyncClient:
        # Created lazily: it binds to the running event loop's transport.
        if self._async is None:
            self._async = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self.timeout)
        return self._async

    def _client(self) -> httpx.Client:
        if self._sync is None:
            self._sync = httpx.Client(base_url=self.url, headers=self._headers, timeout=self.timeout)
        return self._sync

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def _encode(self, body: dict[str, Any]) -> bytes:
        data = self._json.dumps(body)
        return data.encode() if isinstance(data, str) else bytes(data)

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """One call; the decoded JSON answer, ``None`` for a tolerated 404."""
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["content"] = self._encode(body)
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            resp = await self._aclient().request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            raise WsrelayError(0, "timeout", f"{method} {path}: {e!r}") from e
        except httpx.HTTPError as e:
            raise WsrelayError(0, "unavailable", f"{method} {path}: the sidecar is unreachable ({e!r})") from e
        return self._answer(resp, missing_ok)

    def request_sync(self, method: str, path: str, *, missing_ok: bool = False) -> Any:
        """As :meth:`request`, blocking (for python-socketio's synchronous methods)."""
        try:
            resp = self._client().request(method, path)
        except httpx.HTTPError as e:
            raise WsrelayError(0, "unavailable", f"{method} {path}: the sidecar is unreachable ({e!r})") from e
        return self._answer(resp, missing_ok)

    def _answer(self, resp: httpx.Response, missing_ok: bool) -> Any:
        if resp.status_code == 404 and missing_ok:
            return None
        if resp.status_code != 200:
            raise _error(resp)
        return self._json.loads(resp.content) if resp.content.strip() else {}

    # -- the endpoints -----------------------------------------------------

    async def publish(self, body: dict[str, Any]) -> Any:
        return await self.request("POST", "/api/publish", body)

    async def call(self, body: dict[str, Any], wait: float | None) -> Any:
        # The sidecar bounds the wait (600 s at most); give it a margin.
        limit = 600.0 if wait is None else min(wait, 600.0)
        return await self.request("POST", "/api/call", body, timeout=httpx.Timeout(self.timeout, read=limit + 10))

    async def subscribe(self, connection: str, channel: str) -> None:
        await self.request("POST", "/api/subscribe", {"connection": connection, "channel": channel})

    async def unsubscribe(self, connection: str, channel: str) -> None:
        await self.request("POST", "/api/unsubscribe", {"connection": connection, "channel": channel})

    async def close_room(self, channel: str) -> None:
        await self.request("POST", "/api/close_room", {"channel": channel})

    async def disconnect(self, connection: str) -> None:
        await self.request("POST", "/api/disconnect", {"connection": connection})

    async def channels_of(self, connection: str) -> list[str] | None:
        """A connection's channels on whatever node, ``None`` when it is gone."""
        got = await self.request("GET", f"/api/connections/{quote(connection, safe='')}", missing_ok=True)
        return None if got is None else list(got.get("channels", []))

    def channels_of_sync(self, connection: str) -> list[str] | None:
        got = self.request_sync("GET", f"/api/connections/{quote(connection, safe='')}", missing_ok=True)
        return None if got is None else list(got.get("channels", []))

    def members_sync(self, channel: str) -> list[str]:
        """The connections subscribed to a channel on every live node."""
        got = self.request_sync("GET", f"/api/channels/{quote(channel, safe='')}/connections")
        return list(got.get("connections", []))

    async def members(self, channel: str) -> list[str]:
        got = await self.request("GET", f"/api/channels/{quote(channel, safe='')}/connections")
        return list(got.get("connections", []))

    @staticmethod
    def _session_path(connection: str, namespace: str) -> str:
        return f"/api/connections/{quote(connection, safe='')}/session?namespace={quote(namespace, safe='')}"

    async def get_session(self, connection: str, namespace: str) -> Any:
        got = await self.request("GET", self._session_path(connection, namespace))
        return got.get("data")

    def get_session_sync(self, connection: str, namespace: str) -> Any:
        got = self.request_sync("GET", self._session_path(connection, namespace))
        return got.get("data")

    async def put_session(self, connection: str, namespace: str, data: Any) -> None:
        await self.request("PUT", self._session_path(connection, namespace), {"data": data})

    async def delete_session(self, connection: str, namespace: str) -> None:
        await self.request("DELETE", self._session_path(connection, namespace), missing_ok=True)
