"""A small, fast HTTPS/1.1 keep-alive upstream for benchmarks (asyncio; no per-request allocations to speak of).

  POST/GET /v1/chat/completions   a fixed OpenAI-style JSON chat completion
  GET /sse?n=N&delay=S            N SSE events S seconds apart (chunked)
  GET /bytes?size=N               N bytes of application/octet-stream, chunked in 256 KiB pieces

Usage: python bench/upstream.py CERT_AND_KEY.pem PORT
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from urllib.parse import parse_qs, urlsplit

BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello there!"}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}).encode()
JSON_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            target = head.split(b" ", 2)[1].decode()
            if target.startswith("/bytes"):
                size = int(parse_qs(urlsplit(target).query).get("size", ["1048576"])[0])
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                piece = b"\0" * 262144
                while size > 0:
                    n = min(size, len(piece))
                    writer.write(b"%x\r\n" % n + piece[:n] + b"\r\n")
                    size -= n
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            elif target.startswith("/sse"):
                qs = parse_qs(urlsplit(target).query)
                n, delay = int(qs.get("n", ["10"])[0]), float(qs.get("delay", ["0.05"])[0])
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(n):
                    if i:
                        await asyncio.sleep(delay)
                    ev = b'data: {"i": %d}\n\n' % i
                    writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(JSON_RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main(pem: str, port: int) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pem)
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
