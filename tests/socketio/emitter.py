"""An app process that keeps python-socketio's Redis manager (write only)
and no Socket.IO server: what the tests check wsrelay relays.

    python emitter.py <redis url> <channel> '<JSON list of operations>' [room-channels]

With "room-channels", emits to one room go out on `<channel>#<namespace>#<room>`,
as Open WebUI 0.12.4's AsyncRedisRoomChannelManager (its default) publishes them.

operations: {"op": "emit", "event", "data" (or "data_size": a string of that many
bytes; {"$bin": "<base64>"} anywhere in "data" is bytes), "room", "skip_sid", "namespace"},
{"op": "enter_room" | "leave_room", "sid", "room", "namespace"},
{"op": "close_room", "room", "namespace"}, {"op": "disconnect", "sid", "namespace"}.
"""

import asyncio
import base64
import json
import sys

import socketio


def unjson(v):
    """{"$bin": "<base64>"} in the operations is bytes (a binary emit)."""
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return base64.b64decode(v["$bin"])
        return {k: unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [unjson(x) for x in v]
    return v


class RoomChannelManager(socketio.AsyncRedisManager):
    """The publishing half of Open WebUI's room-channel manager: same wire format."""

    async def _publish(self, data):
        if data.get("method") == "emit" and isinstance(data.get("room"), str):
            channel = f"{self.channel}#{data['namespace']}#{data['room']}"
        else:
            channel = self.channel
        if not self.connected:
            self._redis_connect()
        return await self.redis.publish(channel, json.dumps(data))


async def main():
    url, channel, ops = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cls = RoomChannelManager if sys.argv[4:] == ["room-channels"] else socketio.AsyncRedisManager
    mgr = cls(url, channel=channel, write_only=True)
    for op in ops:
        ns = op.get("namespace", "/")
        kind = op["op"]
        if kind == "emit":
            data = "x" * op["data_size"] if "data_size" in op else unjson(op.get("data"))
            await mgr.emit(op["event"], data=data, namespace=ns, room=op.get("room"),
                           skip_sid=op.get("skip_sid"))
        elif kind == "enter_room":
            await mgr.enter_room(op["sid"], ns, op["room"])
        elif kind == "leave_room":
            await mgr.leave_room(op["sid"], ns, op["room"])
        elif kind == "close_room":
            await mgr.close_room(op["room"], namespace=ns)
        elif kind == "disconnect":
            # As AsyncServer.disconnect() does for a sid of another server.
            await mgr.can_disconnect(op["sid"], ns)
        elif kind == "sleep":
            await asyncio.sleep(op["seconds"])
    print(json.dumps({"type": "done"}), flush=True)


asyncio.run(main())
