"""python-socketio's AsyncClient, driven by the Rust tests over
stdin/stdout (one JSON object per line), like client.mjs.

    python client.py <url> '<options JSON>'   (options: path, auth, transports, namespace)
"""

import asyncio
import json
import sys

import socketio


def out(obj):
    print(json.dumps(obj), flush=True)


async def main():
    url, opts = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    ns = opts.get("namespace", "/")
    sio = socketio.AsyncClient(reconnection=opts.get("reconnection", True), reconnection_delay=0.1)

    @sio.event(namespace=ns)
    async def connect():
        out({"type": "connect", "id": sio.get_sid(ns), "transport": sio.transport()})

    @sio.event(namespace=ns)
    async def connect_error(data):
        out({"type": "connect_error", "message": data.get("message") if isinstance(data, dict) else data})

    @sio.event(namespace=ns)
    async def disconnect(reason=None):
        out({"type": "disconnect", "reason": str(reason)})

    @sio.on("*", namespace=ns)
    async def any_event(event, *args):
        out({"type": "event", "event": event, "args": list(args)})
        answer = opts.get("answers", {}).get(event)
        if answer is not None:
            return tuple(answer)

    try:
        await sio.connect(url, socketio_path=opts.get("path", "socket.io"), auth=opts.get("auth"),
                          transports=opts.get("transports"), namespaces=[ns], wait_timeout=5)
    except socketio.exceptions.ConnectionError as e:
        out({"type": "connect_error", "message": str(e)})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["op"] == "emit":
            if cmd.get("ack"):
                try:
                    res = await sio.call(cmd["event"], data=tuple(cmd.get("args", [])), namespace=ns, timeout=5)
                    out({"type": "ack", "id": cmd.get("id"), "args": res if isinstance(res, list) else [res]})
                except Exception as e:  # noqa: BLE001
                    out({"type": "ack", "id": cmd.get("id"), "error": str(e)})
            else:
                await sio.emit(cmd["event"], data=tuple(cmd.get("args", [])), namespace=ns)
        elif cmd["op"] == "disconnect":
            await sio.disconnect()
        elif cmd["op"] == "exit":
            break
    await sio.disconnect()


asyncio.run(main())
