"""Anthropic (api.anthropic.com): /v1/messages -> chat, /v1/complete -> text_completion.

Usage: a message's `usage`; in a stream, `message_start` gives the input side (and a first output count),
each `message_delta` carries cumulative counts that replace what came before. Per the semconv, input tokens
include cache reads and cache creations.

Budget estimate: no output multiplier and no conversation state held by id; Message Batches are billed after
the answer.
"""

from __future__ import annotations

from typing import Any

from clrk.hostnames import loose_path
from clrk.providers.base import ProviderParser, as_int, loads, object_after_key

_STREAM_EVENTS = frozenset({"message_start", "message_delta", "error", "completion"})


class AnthropicParser(ProviderParser):
    name = "anthropic"
    system = "anthropic"
    provider_name = "anthropic"
    hosts = ("api.anthropic.com",)

    @classmethod
    def operation(cls, path: str) -> tuple[str, str | None] | None:
        p = path.rstrip("/")
        if p.endswith("/v1/messages"):
            return "chat", None
        if p.endswith("/v1/complete"):
            return "text_completion", None
        return None

    def __init__(self, operation: str | None, path_model: str | None, path: str, query: str) -> None:
        super().__init__(operation, path_model, path, query)  # (named, not *args: a parser is made per call)
        self._usage_raw: dict[str, int] = {}

    def on_request(self, doc: dict) -> None:
        if isinstance(doc.get("model"), str):
            self.result.request_model = doc["model"]
        if doc.get("stream") is True:
            self.result.stream = True
        self.max_output_tokens = self.largest_count(doc, ("max_tokens", "max_tokens_to_sample"))
        if loose_path(self.path).rstrip("/").endswith("/messages/batches"):
            self.unbudgetable = "message batches are billed after this request is answered"

    def _usage(self, u: Any) -> None:
        if not isinstance(u, dict):
            return
        for k in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
            v = as_int(u.get(k))
            if v is not None:
                self._usage_raw[k] = v  # message_delta counts are cumulative: latest wins
        raw = self._usage_raw
        r = self.result
        if "input_tokens" in raw or "output_tokens" in raw:
            cache_read = raw.get("cache_read_input_tokens")
            cache_creation = raw.get("cache_creation_input_tokens")
            if "input_tokens" in raw:
                # Anthropic counts cached input apart; the record's input is all of it (within what a count can be).
                total = raw["input_tokens"] + (cache_read or 0) + (cache_creation or 0)
                r.input_tokens = min(max(total, -(2**63)), 2**63 - 1)
            r.output_tokens = raw.get("output_tokens")
            r.cache_read_tokens = cache_read
            r.cache_creation_tokens = cache_creation
            r.usage_visible = True

    def _message(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        if isinstance(msg.get("id"), str):
            self.result.response_id = msg["id"]
        if isinstance(msg.get("model"), str):
            self.result.response_model = msg["model"]
        if isinstance(msg.get("stop_reason"), str):
            self.result.finish_reasons = [msg["stop_reason"]]
        self._usage(msg.get("usage"))

    def on_json(self, doc: Any) -> None:
        if isinstance(doc, dict):
            if doc.get("type") == "error":
                self.on_error(doc)
            else:
                self._message(doc)

    def on_event(self, event: str, data: str) -> None:
        if event and event not in _STREAM_EVENTS:
            return  # content deltas and pings
        doc = loads(data)
        if not isinstance(doc, dict):
            return
        kind = doc.get("type") or event
        if kind == "message_start":
            self._message(doc.get("message"))
        elif kind == "message_delta":
            delta = doc.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self.result.finish_reasons = [delta["stop_reason"]]
            self._usage(doc.get("usage"))
        elif kind == "error":
            self.on_error(doc)
        elif kind == "completion":  # legacy /v1/complete stream
            self._message(doc)

    def on_error(self, doc: Any) -> None:
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and isinstance(err.get("type"), str):
            self.result.error_type = str(err["type"])[:64]  # the upstream writes it: bounded
        elif isinstance(doc, dict):
            self.result.error_type = "error"

    def on_truncated_json(self, tail: str) -> None:
        self._usage(object_after_key(tail, "usage"))
        reason = object_after_key(tail, "stop_reason")
        if isinstance(reason, str):
            self.result.finish_reasons = [reason]
