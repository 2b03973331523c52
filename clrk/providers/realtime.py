"""Realtime model APIs over WebSocket: OpenAI Realtime and Gemini Live (pure: no mitmproxy).

A session is one WebSocket: the handshake names the endpoint (and, for OpenAI, the model), then every
message either way is an event. `RealtimeParser` subclasses `ProviderParser` so that the rest of the gateway
(decision, budget, record) treats a session like any provider call; it reads events instead of bodies:

  OpenAI Realtime   `wss://api.openai.com/v1/realtime?model=M` (Azure: `/openai/realtime?deployment=M`,
                    or `/openai/v1/realtime?model=M`). The model is the URL's, or the last `session.update`'s
                    (client) / `session.created|updated`'s (server). Usage: every `response.done` carries
                    one response's `usage` (input, output, input_token_details.cached_tokens): summed.
  Gemini Live       `wss://generativelanguage.googleapis.com/ws/...BidiGenerateContent` (or
                    `BidiGenerateContentConstrained`). The model is the first client message's `setup.model`.
                    Usage: a server message's `usageMetadata` counts one turn (promptTokenCount,
                    responseTokenCount + thoughtsTokenCount, cachedContentTokenCount): summed.

Cost per message: a byte search for the few event names that matter (`response.done`, `session.*`,
`setup`, `usageMetadata`, `error`) before anything is parsed; audio appends and deltas, most of a session's
bytes, are never parsed. `client_message`/`server_message` return the tokens the message reported (0 if
none), which a token budget charges as they arrive.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import parse_qs

from clrk.providers.base import ProviderParser, as_int, loads

OPERATION = "realtime"
PARSE_LIMIT = 4 * 1024 * 1024  # an event larger than this is not parsed (no usage event comes near it)


class RealtimeParser(ProviderParser):
    """One realtime session's gen_ai facts. Never raises: an unreadable event is noted in `parse_error`."""

    schema: ClassVar[str]  # the ProviderParser name whose hosts and Backends this API is served on
    model_in_path = False

    @classmethod
    def operation(cls, path: str) -> tuple[str, str | None] | None:
        return (OPERATION, None) if cls.serves(path) else None

    @classmethod
    def serves(cls, path: str) -> bool:
        raise NotImplementedError

    def __init__(self, operation: str | None, path_model: str | None, path: str, query: str):
        super().__init__(operation or OPERATION, path_model, path, query)
        self.result.stream = True

    def client_message(self, data: bytes) -> int:
        try:
            return self.on_client(data)
        except Exception as e:  # hostile input must never break the session
            self.result.parse_error = f"unreadable client event: {type(e).__name__}: {str(e)[:200]}"
            return 0

    def server_message(self, data: bytes) -> int:
        try:
            return self.on_server(data)
        except Exception as e:
            self.result.parse_error = f"unreadable server event: {type(e).__name__}: {str(e)[:200]}"
            return 0

    def on_client(self, data: bytes) -> int:
        return 0

    def on_server(self, data: bytes) -> int:
        return 0

    def _add(self, input_tokens: int | None, output_tokens: int | None, cached: int | None,
             reasoning: int | None = None) -> int:
        """Adds one report to the session's totals; returns the tokens it charges (input + output)."""
        r = self.result
        if input_tokens is None and output_tokens is None:
            return 0
        r.usage_visible = True
        r.input_tokens = _count((r.input_tokens or 0) + (input_tokens or 0))
        r.output_tokens = _count((r.output_tokens or 0) + (output_tokens or 0))
        if cached is not None:
            r.cache_read_tokens = _count((r.cache_read_tokens or 0) + cached)
        if reasoning is not None:
            r.reasoning_tokens = _count((r.reasoning_tokens or 0) + reasoning)
        return _count(max(0, (input_tokens or 0)) + max(0, (output_tokens or 0)))


def _count(n: int) -> int:
    """A session's running total, within what a record's BIGINT holds (a hostile upstream may report anything)."""
    return min(max(n, -(2**63)), 2**63 - 1)


def _doc(data: bytes) -> Any:
    if len(data) > PARSE_LIMIT:
        return None
    return loads(data)


def _model(v: Any) -> str | None:
    return v[:256] if isinstance(v, str) and v else None


class OpenAIRealtimeParser(RealtimeParser):
    name = "openai"
    schema = "openai"
    system = "openai"
    provider_name = "openai"
    hosts = ("api.openai.com",)

    @classmethod
    def serves(cls, path: str) -> bool:
        return path.rstrip("/").endswith("/realtime")

    def __init__(self, operation: str | None, path_model: str | None, path: str, query: str):
        q = parse_qs(query)
        model = (q.get("model") or q.get("deployment") or [None])[-1]
        super().__init__(operation, path_model or _model(model), path, query)

    def on_client(self, data: bytes) -> int:
        if b'"session.update"' in data:
            doc = _doc(data)
            if isinstance(doc, dict) and doc.get("type") == "session.update":
                session = doc.get("session")
                model = _model(session.get("model")) if isinstance(session, dict) else None
                if model is not None:
                    self.result.request_model = model
        return 0

    def on_server(self, data: bytes) -> int:
        if b'"response.done"' in data:
            doc = _doc(data)
            if isinstance(doc, dict) and doc.get("type") == "response.done":
                return self._response_done(doc.get("response"))
        elif b'"session.created"' in data or b'"session.updated"' in data:
            doc = _doc(data)
            if isinstance(doc, dict) and doc.get("type") in ("session.created", "session.updated"):
                session = doc.get("session")
                model = _model(session.get("model")) if isinstance(session, dict) else None
                if model is not None:
                    self.result.response_model = model
                    if self.result.request_model is None:
                        self.result.request_model = model
        elif b'"error"' in data:
            doc = _doc(data)
            if isinstance(doc, dict) and doc.get("type") == "error":
                err = doc.get("error")
                kind = err.get("type") if isinstance(err, dict) else None
                self.result.error_type = kind[:64] if isinstance(kind, str) and kind else "error"
        return 0

    def _response_done(self, resp: Any) -> int:
        if not isinstance(resp, dict):
            return 0
        r = self.result
        if isinstance(resp.get("id"), str):
            r.response_id = resp["id"][:256]
        status = resp.get("status")
        if isinstance(status, str) and status and status[:64] not in r.finish_reasons and len(r.finish_reasons) < 16:
            r.finish_reasons.append(status[:64])
        usage = resp.get("usage")
        if not isinstance(usage, dict):
            return 0
        details = usage.get("input_token_details")
        cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else None
        out_details = usage.get("output_token_details")
        reasoning = as_int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else None
        return self._add(as_int(usage.get("input_tokens")), as_int(usage.get("output_tokens")), cached, reasoning)


class GeminiLiveParser(RealtimeParser):
    name = "google_genai"
    schema = "google_genai"
    system = "google_genai"
    provider_name = "gcp.gemini"
    hosts = ("generativelanguage.googleapis.com",)

    @classmethod
    def serves(cls, path: str) -> bool:
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        return tail.endswith((".BidiGenerateContent", ".BidiGenerateContentConstrained"))

    def on_client(self, data: bytes) -> int:
        if self.result.request_model is None and b'"setup"' in data:
            doc = _doc(data)
            setup = doc.get("setup") if isinstance(doc, dict) else None
            model = _model(setup.get("model")) if isinstance(setup, dict) else None
            if model is not None:
                self.result.request_model = model.removeprefix("models/")
        return 0

    def on_server(self, data: bytes) -> int:
        if b'"usageMetadata"' not in data and b'"error"' not in data:
            return 0
        doc = _doc(data)
        if not isinstance(doc, dict):
            return 0
        err = doc.get("error")
        if isinstance(err, dict):
            status = err.get("status")
            self.result.error_type = status[:64] if isinstance(status, str) and status else "error"
        u = doc.get("usageMetadata")
        if not isinstance(u, dict):
            return 0
        prompt = as_int(u.get("promptTokenCount"))
        tools = as_int(u.get("toolUsePromptTokenCount"))
        response = as_int(u.get("responseTokenCount"))
        thoughts = as_int(u.get("thoughtsTokenCount"))
        inp = None if prompt is None and tools is None else (prompt or 0) + (tools or 0)
        out = None if response is None and thoughts is None else (response or 0) + (thoughts or 0)
        return self._add(inp, out, as_int(u.get("cachedContentTokenCount")), thoughts)


REALTIME: tuple[type[RealtimeParser], ...] = (OpenAIRealtimeParser, GeminiLiveParser)


def realtime_parser(schema: str, path: str) -> RealtimeParser | None:
    """A fresh parser when `path` (with its query) is a realtime endpoint of the provider `schema`, else None."""
    path_only, _, query = path.partition("?")
    for cls in REALTIME:
        if cls.schema == schema and cls.serves(path_only):
            return cls(OPERATION, None, path_only, query)
    return None
