#!/usr/bin/env python3
"""Open WebUI 0.12.4 on wsrelay, proven in headless Chromium.

Two Open WebUI replicas, each with its own wsrelay sidecar, behind a
round-robin nginx (no sticky sessions), Redis, and a stub model. Open
WebUI's ``socket/main.py`` is changed on one line: ``sio`` is a
``wsrelay_socketio.AsyncServer``. Two users on different replicas then:

- sign in through the sign-in form;
- chat: a reply streams from the model and renders;
- channels: a message posted through the other replica appears;
- notes: one note edited in two browsers on different replicas converges;
- a tool confirmation (``__event_call__``, i.e. ``sio.call``) is answered;
- an admin's password change disconnects that user's sockets on both replicas;

over WebSocket, then over long-polling (``ENABLE_WEBSOCKET_SUPPORT=false``).

    make openwebui-proof            (installs open-webui==0.12.4 into a venv outside the repo)
    deploy/openwebui/proof.py --venv V --bin B [--polling-only] [--keep] [--screenshot docs/openwebui.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from browser import Browser, Page
from stack import API_TOKEN, Replica, Stack

ADMIN = ("Admin", "admin@example.com", "pw-Admin-123!")
BOB = ("Bob", "bob@example.com", "pw-Bob-123!")
REPLY = "one token at a time"

FILTER = '''
"""
title: wsrelay proof confirmation
"""


class Filter:
    async def inlet(self, body: dict, __event_call__=None) -> dict:
        last = (body.get("messages") or [{}])[-1].get("content")
        if isinstance(last, str) and last.startswith("confirm"):
            answer = await __event_call__(
                {"type": "confirmation", "data": {"title": "wsrelay proof", "message": "Go ahead through wsrelay?"}}
            )
            if answer is not True:
                raise Exception(f"not confirmed: {answer!r}")
        return body
'''


class Api:
    def __init__(self, base: str, token: str | None = None) -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: Any = None, base: str | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request((base or self.base) + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:300]!r}") from None


def sidecar(r: Replica, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{r.admin}{path}", headers={"Authorization": f"Bearer {API_TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def sockets_of(stack: Stack, user_id: str) -> set[str]:
    """The user's Socket.IO connections on every replica (its user:<id> room)."""
    got = sidecar(stack.replicas[0], f"/api/channels/user:{user_id}/connections")
    return set(got["connections"])


class Proof:
    def __init__(self, stack: Stack, browser: Browser, shots: Path) -> None:
        self.stack, self.browser, self.shots = stack, browser, shots
        self.results: list[tuple[str, str]] = []
        self.api = Api(stack.url)

    def ok(self, what: str, detail: str = "") -> None:
        self.results.append((what, detail))
        print(f"  ok  {what}{': ' + detail if detail else ''}", flush=True)

    async def signin(self, page: Page, who: tuple[str, str, str]) -> None:
        """Through the sign-in form, as a user does."""
        _, email, password = who
        await page.goto(f"{self.stack.url}/auth")
        await page.until("!!document.querySelector('input[type=email]')", "the sign-in form")
        await page.eval("document.querySelector('input[type=email]').focus(); true")
        await page.type(email)
        await page.eval("document.querySelector('input[type=password]').focus(); true")
        await page.type(password)
        await page.eval("document.querySelector('button[type=submit]').click(); true")
        await page.until("!!localStorage.token && !location.pathname.startsWith('/auth')", f"{email} signed in")
        await page.eval("localStorage.version = '0.12.4'; true")
        await self.dismiss(page)

    async def dismiss(self, page: Page) -> None:
        # The "What's New" dialog of a first visit.
        for _ in range(20):
            clicked = await page.eval(
                "(() => { const b = [...document.querySelectorAll('button')]"
                '.find(b => b.innerText.includes("Okay, Let\'s Go")); b?.click(); return !!b })()'
            )
            if clicked:
                return
            await asyncio.sleep(0.2)

    async def placed(self, page: Page, user_id: str, url: str, avoid: str | None = None) -> str:
        """Loads ``url`` until the page's socket is on another replica than
        ``avoid``; returns its sid (the one socket that is new once the page settled)."""
        for _ in range(8):
            before = sockets_of(self.stack, user_id)
            await page.goto(url)
            await self.dismiss(page)
            new: set[str] = set()
            for _ in range(50):
                await asyncio.sleep(0.2)
                new = sockets_of(self.stack, user_id) - before
                if len(new) == 1:
                    # Settled: the same one a second later.
                    await asyncio.sleep(1)
                    if sockets_of(self.stack, user_id) - before == new:
                        break
            if len(new) != 1:
                raise AssertionError(f"{page.name}: expected one new socket, saw {new}")
            sid = new.pop()
            if avoid is None or not sid.startswith(avoid + "."):
                return sid
        raise AssertionError(f"{page.name}: round-robin never put it on another replica than {avoid}")

    async def run(self) -> None:
        s, api = self.stack, self.api
        admin = api.call("POST", "/api/v1/auths/signup", dict(zip(("name", "email", "password"), ADMIN, strict=True)))
        admin_api = Api(s.url, admin["token"])
        # The first sign-up is the admin; the admin adds the other user.
        new = dict(zip(("name", "email", "password"), BOB, strict=True))
        admin_api.call("POST", "/api/v1/auths/add", {**new, "role": "user"})
        bob = api.call("POST", "/api/v1/auths/signin", {"email": BOB[1], "password": BOB[2]})
        self.ok("sign-up", f"admin {admin['id'][:8]}, bob {bob['id'][:8]} ({bob['role']})")

        a1 = await self.browser.page("admin@r?")
        await self.signin(a1, ADMIN)
        sid_a1 = await self.placed(a1, admin["id"], s.url + "/?models=stub")
        node_a1 = sid_a1.split(".")[0]
        b1 = await self.browser.page("bob@r?")
        await self.signin(b1, BOB)
        sid_b1 = await self.placed(b1, bob["id"], s.url + "/", node_a1)
        self.ok("sign-in through the form, two users", f"admin's socket {sid_a1}, bob's {sid_b1}")

        # 1. A chat reply streams and renders.
        await a1.until("!!document.querySelector('#chat-input')", "the chat input")
        await a1.eval("document.querySelector('#chat-input').focus(); true")
        await a1.type("hello through wsrelay")
        t0 = time.monotonic()
        await a1.key("Enter", "Enter", 13)
        await a1.until(f"document.body.innerText.includes({json.dumps(REPLY)})", "the streamed reply", 60)
        self.ok("chat reply streamed and rendered", f"{time.monotonic() - t0:.1f}s")
        await a1.screenshot(self.shots / "chat.png")

        # 2. Channel: bob posts through the other replica, admin's page shows it.
        ch = admin_api.call(
            "POST", "/api/v1/channels/create", {"name": "wsrelay-proof", "type": "group", "user_ids": [bob["id"]]}
        )
        await a1.goto(f"{s.url}/channels/{ch['id']}")
        await a1.until("document.body.innerText.includes('wsrelay-proof')", "the channel page")
        await asyncio.sleep(1)
        sid_a1 = await self.placed(a1, admin["id"], f"{s.url}/channels/{ch['id']}")
        node_a1 = sid_a1.split(".")[0]
        other = next(r for r in s.replicas if r.name != node_a1)
        text = f"posted through {other.name} at {time.time():.0f}"
        Api(s.url, bob["token"]).call(
            "POST",
            f"/api/v1/channels/{ch['id']}/messages/post",
            {"content": text},
            base=f"http://127.0.0.1:{other.public}",
        )
        await a1.until(f"document.body.innerText.includes({json.dumps(text)})", "bob's channel message", 20)
        self.ok("channel message through the other replica appeared", f"admin on {node_a1}, posted via {other.name}")

        # 3. A note edited in two browsers on different replicas converges.
        note = admin_api.call(
            "POST",
            "/api/v1/notes/create",
            {"title": "wsrelay proof note", "data": {"content": {"json": None, "html": "", "md": ""}}},
        )
        url = f"{s.url}/notes/{note['id']}"
        sid_n1 = await self.placed(a1, admin["id"], url)
        a2 = await self.browser.page("admin-2")
        await a2.goto(s.url + "/auth")
        await a2.until("document.readyState === 'complete'", "a page")
        await a2.eval(f"localStorage.token = {json.dumps(admin['token'])}; localStorage.version = '0.12.4'; true")
        sid_n2 = await self.placed(a2, admin["id"], url, sid_n1.split(".")[0])
        editor = "document.querySelector('.ProseMirror')"
        for p in (a1, a2):
            await p.until(f"!!{editor}", f"{p.name}: the note editor")
        await asyncio.sleep(1.5)
        await a1.eval(f"{editor}.focus(); true")
        await a1.type("Typed on one replica. ")
        await a2.until(f"{editor}.innerText.includes('Typed on one replica.')", "the edit on the other replica", 20)
        await a2.eval(f"{editor}.focus(); true")
        await a2.key("End", "End", 35)
        await a2.type("Answered from the other.")
        await a1.until(f"{editor}.innerText.includes('Answered from the other.')", "the answer", 20)
        paragraphs = f"[...{editor}.querySelectorAll('p')].map(p => p.textContent).join('/')"
        t1, t2 = await a1.eval(paragraphs), await a2.eval(paragraphs)
        assert t1 == t2, (t1, t2)
        self.ok("note converged across replicas", f"{sid_n1.split('.')[0]} and {sid_n2.split('.')[0]}: {t1.strip()!r}")
        await a2.screenshot(self.shots / "note.png")

        # 4. A tool confirmation: __event_call__ is sio.call to the browser's socket.
        admin_api.call("POST", "/api/v1/functions/create", {"id": "wsrelay_confirm", "name": "wsrelay confirm",
                       "content": FILTER, "meta": {"description": "asks the browser before each chat"}})  # fmt: skip
        admin_api.call("POST", "/api/v1/functions/id/wsrelay_confirm/toggle")
        admin_api.call("POST", "/api/v1/functions/id/wsrelay_confirm/toggle/global")
        await a1.goto(s.url + "/?models=stub")
        await self.dismiss(a1)
        await a1.until("!!document.querySelector('#chat-input')", "the chat input")
        await a1.eval("document.querySelector('#chat-input').focus(); true")
        await a1.type("confirm this chat")
        await a1.key("Enter", "Enter", 13)
        await a1.until("document.body.innerText.includes('Go ahead through wsrelay?')", "the confirmation dialog", 30)
        await a1.eval(
            "[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Confirm').click(); true"
        )
        await a1.until(f"document.body.innerText.includes({json.dumps(REPLY)})", "the reply after confirming", 60)
        self.ok("tool confirmation (sio.call) answered in the browser")
        admin_api.call("POST", "/api/v1/functions/id/wsrelay_confirm/toggle")

        # 5. A password change disconnects that user's sockets on both replicas.
        b2 = await self.browser.page("bob-2")
        await self.signin(b2, BOB)
        # One of bob's pages on each replica.
        mine = sockets_of(s, bob["id"])
        assert sid_b1 in mine, f"bob's first socket {sid_b1} is gone: {mine}"
        await self.placed(b2, bob["id"], s.url + "/", sid_b1.split(".")[0])
        old = sockets_of(s, bob["id"])
        nodes = {sid.split(".")[0] for sid in old}
        assert nodes == {"r1", "r2"}, old
        admin_api.call("POST", f"/api/v1/users/{bob['id']}/update", {"password": "pw-Bob-changed-1!"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sockets_of(s, bob["id"]) & old:
            await asyncio.sleep(0.2)
        left = sockets_of(s, bob["id"]) & old
        assert not left, f"still connected: {left}"
        self.ok("password change disconnected the user on both replicas", f"{len(old)} sockets on {sorted(nodes)}")


async def prove(args: argparse.Namespace, polling: bool) -> list[tuple[str, str]]:
    workdir = Path(tempfile.mkdtemp(prefix=f"wsrelay-openwebui-{'polling' if polling else 'ws'}-"))
    stack = Stack(Path(args.venv), Path(args.bin).resolve(), workdir, polling=polling)
    browser = Browser(workdir)
    print(f"== Open WebUI over {'long-polling' if polling else 'WebSocket'} ({workdir})", flush=True)
    try:
        stack.up()
        print(f"  up: nginx {stack.url}, replicas {[(r.name, r.public) for r in stack.replicas]}", flush=True)
        await browser.start()
        proof = Proof(stack, browser, workdir)
        await proof.run()
        if args.screenshot and not polling:
            shutil.copy(workdir / "chat.png", args.screenshot)
        return proof.results
    except BaseException:
        for name in stack.procs:
            print(f"--- {name}\n{stack.log(name, 25)}", file=sys.stderr)
        raise
    finally:
        await browser.stop()
        if args.keep:
            print(f"  kept running: {stack.url} (stop: kill the process groups in {workdir})")
        else:
            stack.down()
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", required=True, help="a venv with open-webui==0.12.4 and wsrelay-socketio")
    ap.add_argument("--bin", required=True, help="the wsrelay binary")
    ap.add_argument("--polling-only", action="store_true")
    ap.add_argument("--websocket-only", action="store_true")
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    ap.add_argument("--screenshot", help="copy the chat screenshot here")
    args = ap.parse_args()
    modes = [False, True]
    if args.polling_only:
        modes = [True]
    if args.websocket_only:
        modes = [False]
    for polling in modes:
        asyncio.run(prove(args, polling))
    print("Open WebUI proof: all passed")


if __name__ == "__main__":
    main()
