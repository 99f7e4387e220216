"""Headless Chromium over the DevTools protocol (flat sessions), enough to
drive Open WebUI pages: one browser context (own cookies and storage) per
page, evaluate JavaScript, wait for a condition, screenshot."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp


class CDP:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.calls: dict[int, asyncio.Future[Any]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("method") == "Page.javascriptDialogOpening":
                # "Leave site?" and friends: accept, as a user clicking on would.
                params = {"accept": True}
                i = next(self.ids)
                out = {"id": i, "method": "Page.handleJavaScriptDialog", "params": params}
                out["sessionId"] = data.get("sessionId")
                await self.ws.send_str(json.dumps(out))
                continue
            fut = self.calls.pop(data.get("id", -1), None)
            if fut is None or fut.done():
                continue
            if "error" in data:
                fut.set_exception(RuntimeError(data["error"].get("message")))
            else:
                fut.set_result(data.get("result", {}))

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        i = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls[i] = fut
        msg: dict[str, Any] = {"id": i, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        return await asyncio.wait_for(fut, 60)


class Page:
    def __init__(self, cdp: CDP, session: str, name: str) -> None:
        self.cdp, self.session, self.name = cdp, session, name

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.cdp.send(method, params, self.session)

    async def eval(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError(f"{self.name}: {expression[:80]}: {d.get('exception', {}).get('description') or d}")
        return r["result"].get("value")

    async def until(self, expression: str, what: str, timeout: float = 30) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                v = await self.eval(expression)
                if v:
                    return v
            except RuntimeError:
                pass  # navigating
            if asyncio.get_running_loop().time() > deadline:
                text = await self.eval("document.body ? document.body.innerText.slice(0, 600) : ''")
                raise AssertionError(f"{self.name}: timed out waiting for {what}; page text: {text!r}")
            await asyncio.sleep(0.2)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))

    async def key(self, key: str, code: str, vk: int) -> None:
        for t in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent", {"type": t, "key": key, "code": code, "windowsVirtualKeyCode": vk}
            )

    async def type(self, text: str) -> None:
        await self.send("Input.insertText", {"text": text})


class Browser:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.cdp: CDP | None = None

    async def start(self) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.workdir / 'chromium'}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        url = None
        loop = asyncio.get_running_loop()
        while url is None:
            line = (await loop.run_in_executor(None, self.proc.stderr.readline)).decode()
            if not line:
                raise RuntimeError("chromium exited before its DevTools endpoint was up")
            m = re.search(r"(ws://127\.0\.0\.1:\d+/devtools/browser/\S+)", line)
            url = m.group(1) if m else None
        # Keep draining its stderr so it never blocks on a full pipe.
        loop.run_in_executor(None, self.proc.stderr.read)
        self.http = aiohttp.ClientSession()
        ws = await self.http.ws_connect(url, max_msg_size=64 << 20)
        self.cdp = CDP(ws)

    async def page(self, name: str) -> Page:
        assert self.cdp is not None
        ctx = (await self.cdp.send("Target.createBrowserContext"))["browserContextId"]
        target = (await self.cdp.send("Target.createTarget", {"url": "about:blank", "browserContextId": ctx}))[
            "targetId"
        ]
        session = (await self.cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self.cdp, session, name)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        return page

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            import os
            import signal

            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
