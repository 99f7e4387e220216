#!/usr/bin/env python3
"""What moving Open WebUI's sockets into wsrelay costs or saves the app.

Runs the proof's deployment twice — Open WebUI's own Socket.IO server with
its Redis manager (``native``), then the one-line change behind wsrelay —
and streams the same chats in both: CLIENTS python-socketio clients (one
per simulated browser tab, over WebSocket), each asking for ROUNDS replies
of 130 tokens from the stub model. It reports the app replicas' CPU per
streamed token (utime+stime of the two uvicorn processes, from /proc),
the sidecars' CPU per token, and the time to first token seen by the
client (from the POST to the first streamed delta).

    deploy/openwebui/measure.py --venv V --bin B [--clients 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import socketio

from stack import Stack

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def post(base: str, path: str, body: Any, token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


async def tab(base: str, token: str, rounds: int, ttft: list[float], tokens: list[int]) -> None:
    c = socketio.AsyncClient(reconnection=False)
    first: dict[str, float] = {}
    done: dict[str, asyncio.Event] = {}
    count = [0]

    def on_events(data: dict[str, Any]) -> None:
        d = data.get("data") or {}
        mid = data.get("message_id")
        inner = d.get("data") or {}
        if d.get("type") == "response:completion" and mid in done:
            if inner.get("type", "").endswith(".delta") or inner.get("delta"):
                count[0] += 1
                first.setdefault(mid, time.monotonic())
            if inner.get("done") or inner.get("type") == "response.completed":
                done[mid].set()
        elif d.get("type") == "chat:completion" and mid in done and (d.get("data") or {}).get("done"):
            done[mid].set()

    c.on("events", on_events)
    await c.connect(base, socketio_path="/ws/socket.io", transports=["websocket"], auth={"token": token})
    await c.call("user-join", {"auth": {"token": token}}, timeout=30)
    loop = asyncio.get_running_loop()
    for _ in range(rounds):
        mid = str(uuid.uuid4())
        done[mid] = asyncio.Event()
        body = {"model": "stub", "messages": [{"role": "user", "content": "long"}], "stream": True,
                "session_id": c.get_sid(), "chat_id": "local:" + uuid.uuid4().hex, "id": mid}  # fmt: skip
        t0 = time.monotonic()
        await loop.run_in_executor(None, post, base, "/api/chat/completions", body, token)
        await asyncio.wait_for(done[mid].wait(), 120)
        ttft.append(first.get(mid, time.monotonic()) - t0)
    tokens.append(count[0])
    await c.disconnect()


async def load(base: str, token: str, clients: int, rounds: int) -> tuple[list[float], int]:
    ttft: list[float] = []
    tokens: list[int] = []
    await asyncio.gather(*(tab(base, token, rounds, ttft, tokens) for _ in range(clients)))
    return ttft, sum(tokens)


def run(args: argparse.Namespace, native: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="wsrelay-openwebui-measure-"))
    stack = Stack(Path(args.venv), Path(args.bin).resolve(), workdir, native=native)
    try:
        stack.up()
        admin = post(
            stack.url, "/api/v1/auths/signup", {"name": "A", "email": "a@example.com", "password": "pw-A-123!"}
        )
        apps = [stack.procs[f"openwebui-{r.name}"].pid for r in stack.replicas]
        sidecars = [] if native else [stack.procs[f"wsrelay-{r.name}"].pid for r in stack.replicas]
        asyncio.run(load(stack.url, admin["token"], 2, 1))  # warm-up
        a0, s0, t0 = cpu_seconds(apps), cpu_seconds(sidecars), time.monotonic()
        ttft, tokens = asyncio.run(load(stack.url, admin["token"], args.clients, args.rounds))
        a1, s1, t1 = cpu_seconds(apps), cpu_seconds(sidecars), time.monotonic()
        ttft.sort()
        return {
            "setup": "Open WebUI's own Socket.IO server + Redis manager" if native else "wsrelay-socketio + wsrelay",
            "tokens": tokens,
            "seconds": t1 - t0,
            "app_cpu_s": a1 - a0,
            "app_us_per_token": (a1 - a0) / max(tokens, 1) * 1e6,
            "sidecar_us_per_token": (s1 - s0) / max(tokens, 1) * 1e6,
            "ttft_p50_ms": statistics.median(ttft) * 1000,
            "ttft_p95_ms": ttft[int(len(ttft) * 0.95) - 1] * 1000,
        }
    finally:
        stack.down()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = [run(args, native=True), run(args, native=False)]
    print(f"{args.clients} tabs x {args.rounds} replies of 130 tokens, two replicas, round-robin nginx")
    print("| setup | tokens streamed | app CPU per token | sidecar CPU per token | time to first token p50 / p95 |")
    print("|---|---|---|---|---|")
    for r in rows:
        side = f"{r['sidecar_us_per_token']:.0f} µs" if r["sidecar_us_per_token"] else "—"
        print(f"| {r['setup']} | {r['tokens']} | {r['app_us_per_token']:.0f} µs | {side} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
