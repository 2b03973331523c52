"""The demo's model provider: an HTTPS server on 127.0.0.1 that answers the OpenAI chat completions (JSON and
SSE), Anthropic messages and Gemini generateContent APIs the way the official SDKs expect, with usage counts,
so that `clrk demo` shows the gateway's AI features without a provider key or a network.

It plays every provider host at once (its certificate names them all; the gateway reaches it through
`upstreamTLS.hostAliases`). The OpenAI endpoint answers only calls carrying the key the gateway injects
(`PROVIDER_KEY`), as a real provider would refuse an agent that holds none.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROVIDER_KEY = "sk-demo-held-by-the-gateway"


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _sse(events: list[dict | str]) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        self.request.do_handshake()
        super().setup()

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            return self._send(400, b'{"error": {"message": "demo provider: the body is not JSON"}}')
        self.server.calls += 1
        path = self.path.split("?")[0]
        prompt = _tokens(raw.decode("utf-8", "replace"))
        if path == "/v1/chat/completions":
            return self._openai(req, prompt)
        if path == "/v1/messages":
            return self._anthropic(req, prompt)
        if path.startswith(("/v1beta/models/", "/v1/models/")) and path.endswith(":generateContent"):
            return self._gemini(path.rsplit("/", 1)[1].split(":")[0], prompt)
        self._send(404, json.dumps({"error": {"message": f"demo provider: no {path}"}}).encode())

    def _openai(self, req: dict, prompt: int) -> None:
        if self.headers.get("authorization") != f"Bearer {PROVIDER_KEY}":
            body = {"error": {"message": "demo provider: this call carries no valid API key", "type": "invalid_request_error",
                              "code": "invalid_api_key"}}
            return self._send(401, json.dumps(body).encode())
        model = req.get("model", "")
        words = ["Hello", " from", " the", " demo", " provider", f" ({model})."]
        base = {"id": "chatcmpl-demo", "created": 0, "model": model + "-demo"}
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}
        if not req.get("stream"):
            body = {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}]}
            return self._send(200, json.dumps(body).encode())
        chunk = {**base, "object": "chat.completion.chunk"}
        events: list[dict | str] = [{**chunk, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                                    for w in words]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        events.append("[DONE]")
        self._send(200, _sse(events), "text/event-stream")

    def _anthropic(self, req: dict, prompt: int) -> None:
        model = req.get("model", "")
        text = f"Hello from the demo provider ({model})."
        body = {"id": "msg_demo", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": _tokens(text)}}
        self._send(200, json.dumps(body).encode())

    def _gemini(self, model: str, prompt: int) -> None:
        text = f"Hello from the demo provider ({model})."
        out = _tokens(text)
        body = {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": out, "totalTokenCount": prompt + out},
                "modelVersion": model + "-demo", "responseId": "resp-demo"}
        self._send(200, json.dumps(body).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.calls = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        sock.settimeout(30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gives up mid-handshake is no concern of the demo's


class DemoProvider:
    """The server, on 127.0.0.1 at `port`, serving with `server_pem` (certificate and key)."""

    def __init__(self, server_pem: Path):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(server_pem))
        self._server = _Server(ctx)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="clrk-demo-provider", daemon=True)

    @property
    def calls(self) -> int:
        """Requests that reached the provider (a call the gateway refused never does)."""
        return self._server.calls

    def start(self) -> DemoProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
