"""A real HTTPS/1.1 server on 127.0.0.1 that the gateway reaches through `upstreamTLS.hostAliases`.

It records every request it receives (and every TCP connection and TLS server name), so tests can assert
what reached the upstream, and what never did. Behaviour is chosen by path:

  /json...            200 JSON describing the request (method, path, header names, body size)
  /sse?n=N&delay=S    text/event-stream, N events, S seconds apart, chunked; `sse_done` is set at the end
  /big?size=N         200 application/json body of N bytes
  /gzip               gzip-encoded JSON (Content-Encoding: gzip); `gzip_body` holds the exact bytes sent
  /status/N           status N with a JSON body
  /cookie             200 with a Set-Cookie header
  /drop               headers and part of a chunked body, then the connection is cut
  /handler/<name>/... a test-registered handler (see `handlers`)
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    time: float


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: FakeUpstream, addr):
        self.upstream = upstream
        super().__init__(addr, _Handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        with self.upstream.lock:
            self.upstream.connections += 1
        sock.settimeout(30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body are separate writes
        # The handshake happens in the handler thread (setup), so a slow client cannot stall accept().
        return self.upstream.ssl_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):  # TLS failures from tests that expect them
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):
        pass

    def setup(self):
        self.request.do_handshake()
        super().setup()

    def _read_body(self) -> bytes:
        n = int(self.headers.get("content-length") or 0)
        if n:
            return self.rfile.read(n)
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def start_chunked(self, status: int, ctype: str) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def cut(self) -> None:
        """Drops the connection mid-body, as a dying upstream would."""
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _any(self):
        up = self.server.upstream
        body = self._read_body()
        u = urlsplit(self.path)
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
        with up.lock:
            up.requests.append(seen)
        qs = {k: v[-1] for k, v in parse_qs(u.query).items()}
        p = u.path
        for prefix, route in up.routes:
            if p.startswith(prefix):
                return route(self, seen)
        if p.startswith("/handler/"):
            return up.handlers[p[len("/handler/"):].split("/")[0]](self, seen)
        if p.startswith("/sse"):
            n, delay = int(qs.get("n", 3)), float(qs.get("delay", 0.5))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(n):
                if i:
                    time.sleep(delay)
                self._chunk(f"event: tick\ndata: {{\"i\": {i}}}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            up.sse_done.set()
            return
        if p.startswith("/big"):
            size = int(qs.get("size", 100000))
            unit = b'{"pad":"' + b"x" * 1000 + b'"},'
            data = (b"[" + unit * (size // len(unit) + 1))[: size - 1] + b"]"
            return self._send(200, data)
        if p.startswith("/gzip"):
            payload = json.dumps({"message": "hello from gzip", "items": list(range(200))}).encode()
            up.gzip_plain = payload
            up.gzip_body = gzip.compress(payload, mtime=0)
            return self._send(200, up.gzip_body, headers={"content-encoding": "gzip"})
        if p.startswith("/status/"):
            code = int(p.rsplit("/", 1)[1])
            return self._send(code, json.dumps({"status": code}).encode())
        if p.startswith("/cookie"):
            return self._send(200, b'{"ok":true}', headers={"set-cookie": up.cookie_value})
        if p.startswith("/drop"):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self._chunk(b'{"partial": "')
            time.sleep(0.1)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()
            self.close_connection = True
            return
        # Never echo values: tests search every output for secrets the agent sent. (Member names without a
        # sensitive word, so that records keep this body as the client got it.)
        info = {"method": self.command, "path": u.path, "query_names": sorted(qs), "header_names": sorted(seen.headers),
                "body_bytes": len(body)}
        return self._send(200, json.dumps(info).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any


class FakeUpstream:
    def __init__(self, server_pem: Path, cookie_value: str = "session=upstream-cookie-secret-123"):
        self.ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl_ctx.load_cert_chain(str(server_pem))
        self.snis: list[str | None] = []
        self.ssl_ctx.sni_callback = lambda sslobj, name, ctx: self.snis.append(name)
        self.lock = threading.Lock()
        self.requests: list[Seen] = []
        self.connections = 0
        self.handlers: dict = {}
        self.routes: list = []  # (path prefix, handler(request_handler, seen)), checked first
        self.sse_done = threading.Event()
        self.gzip_body = b""
        self.gzip_plain = b""
        self.cookie_value = cookie_value
        self.server = _Server(self, ("127.0.0.1", 0))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests_to(self, prefix: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def requests_with(self, marker: str) -> list[Seen]:
        """The requests whose path or body holds `marker` (an id only one test sends)."""
        with self.lock:
            return [r for r in self.requests if marker in r.path or marker.encode() in r.body]

    def requests_since(self, t: float) -> list[Seen]:
        """The requests received at `time.time()` >= `t`."""
        with self.lock:
            return [r for r in self.requests if r.time >= t]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
