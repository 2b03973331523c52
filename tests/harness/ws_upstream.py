"""A real TLS WebSocket server on 127.0.0.1 (the `websockets` package) that the gateway reaches through
`upstreamTLS.hostAliases`, speaking the event shapes of the realtime model APIs. By path:

  /v1/realtime?model=M     OpenAI Realtime: `session.created` on connect, `session.updated` after a
                           `session.update`, and for each `response.create` a text delta then `response.done`
                           with `usage` (`realtime_usage`, or the response's `metadata.input|output|cached`)
  /ws/...BidiGenerateContent   Gemini Live: `setupComplete` after `setup`, and for each client turn a model
                           turn then `usageMetadata` (`live_usage`) — as binary frames, as Google sends them
  /echo                    every message back as it came; `close:<code>` closes with that code;
                           `bulk:<n>:<size>` sends n binary messages of size bytes, then `bulk-done`
  /sink                    reads and keeps nothing; `count?` is answered with the bytes read so far, and
                           `bulk:<n>:<size>` as on /echo
  /silent                  reads and never answers, never closes on its own

Every handshake (path, headers) and what each session received and how it ended is kept for the tests.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


@dataclass
class WsSeen:
    path: str
    headers: dict[str, str]
    messages: list[str | bytes] = field(default_factory=list)
    received_bytes: int = 0
    close_code: int | None = None
    close_reason: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)


class WsUpstream:
    def __init__(self, server_pem: Path):
        self.ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl_ctx.load_cert_chain(str(server_pem))
        self.sessions: list[WsSeen] = []
        self.lock = threading.Lock()
        self.realtime_usage = {"input_tokens": 100, "output_tokens": 50, "cached": 20}
        self.live_usage = {"promptTokenCount": 30, "responseTokenCount": 12, "cachedContentTokenCount": 5}
        self.keep_messages = True  # off for bulk tests: only bytes are counted
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self.server = await serve(self._handle, "127.0.0.1", 0, ssl=self.ssl_ctx, max_size=None,
                                      compression=None, ping_interval=None)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sessions_with(self, marker: str) -> list[WsSeen]:
        with self.lock:
            return [s for s in self.sessions if marker in s.path]

    async def _handle(self, conn: ServerConnection) -> None:
        req = conn.request
        assert req is not None
        seen = WsSeen(req.path, {k.lower(): v for k, v in req.headers.raw_items()})
        with self.lock:
            self.sessions.append(seen)
        path = req.path.split("?", 1)[0]
        try:
            if path.endswith("/realtime"):
                await self._realtime(conn, seen)
            elif "BidiGenerateContent" in path:
                await self._live(conn, seen)
            elif path.startswith("/sink"):
                await self._sink(conn, seen)
            elif path.startswith("/silent"):
                async for msg in conn:
                    self._note(seen, msg)
            else:
                await self._echo(conn, seen)
        except ConnectionClosed:
            pass
        finally:
            seen.close_code = conn.close_code
            seen.close_reason = conn.close_reason
            seen.ended.set()

    def _note(self, seen: WsSeen, msg: str | bytes) -> None:
        seen.received_bytes += len(msg.encode() if isinstance(msg, str) else msg)
        if self.keep_messages:
            seen.messages.append(msg)

    async def _echo(self, conn: ServerConnection, seen: WsSeen) -> None:
        async for msg in conn:
            self._note(seen, msg)
            if isinstance(msg, str) and msg.startswith("close:"):
                await conn.close(int(msg.split(":")[1]), "as asked")
                return
            if isinstance(msg, str) and msg.startswith("bulk:"):
                _, n, size = msg.split(":")
                chunk = b"\x00" * int(size)
                for _ in range(int(n)):
                    await conn.send(chunk)
                await conn.send("bulk-done")
                continue
            await conn.send(msg)

    async def _sink(self, conn: ServerConnection, seen: WsSeen) -> None:
        async for msg in conn:
            seen.received_bytes += len(msg.encode() if isinstance(msg, str) else msg)
            if msg == "count?":
                await conn.send(str(seen.received_bytes))
            elif isinstance(msg, str) and msg.startswith("bulk:"):
                _, n, size = msg.split(":")
                chunk = b"\x00" * int(size)
                for _ in range(int(n)):
                    await conn.send(chunk)
                await conn.send("bulk-done")

    async def _realtime(self, conn: ServerConnection, seen: WsSeen) -> None:
        model = seen.path.partition("model=")[2].split("&")[0] or "gpt-realtime"
        n = 0
        await conn.send(json.dumps({"type": "session.created", "event_id": "ev_0",
                                    "session": {"id": "sess_1", "object": "realtime.session", "model": model}}))
        async for msg in conn:
            self._note(seen, msg)
            ev = json.loads(msg)
            if ev.get("type") == "session.update":
                model = (ev.get("session") or {}).get("model") or model
                await conn.send(json.dumps({"type": "session.updated", "event_id": "ev_u",
                                            "session": {"id": "sess_1", "model": model}}))
            elif ev.get("type") == "response.create":
                n += 1
                meta = (ev.get("response") or {}).get("metadata") or {}
                u = {**self.realtime_usage, **{k: int(v) for k, v in meta.items()}}
                rid = f"resp_{n}"
                await conn.send(json.dumps({"type": "response.created", "response": {"id": rid, "status": "in_progress"}}))
                await conn.send(json.dumps({"type": "response.output_text.delta", "response_id": rid, "delta": "hello"}))
                await conn.send(json.dumps({"type": "response.done", "event_id": f"ev_{n}", "response": {
                    "id": rid, "object": "realtime.response", "status": "completed", "output": [],
                    "usage": {"total_tokens": u["input_tokens"] + u["output_tokens"], "input_tokens": u["input_tokens"],
                              "output_tokens": u["output_tokens"],
                              "input_token_details": {"cached_tokens": u["cached"], "text_tokens": u["input_tokens"]},
                              "output_token_details": {"text_tokens": u["output_tokens"], "audio_tokens": 0}}}}))

    async def _live(self, conn: ServerConnection, seen: WsSeen) -> None:
        async for msg in conn:
            self._note(seen, msg)
            ev = json.loads(msg)
            if "setup" in ev:
                await conn.send(json.dumps({"setupComplete": {}}).encode())
            elif "clientContent" in ev or "realtimeInput" in ev:
                await conn.send(json.dumps({"serverContent": {"modelTurn": {"parts": [{"text": "hi there"}]}}}).encode())
                usage = {**self.live_usage}
                usage["totalTokenCount"] = usage["promptTokenCount"] + usage["responseTokenCount"]
                await conn.send(json.dumps({"serverContent": {"turnComplete": True}, "usageMetadata": usage}).encode())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
