"""OpenAI (api.openai.com, and any Backend with `schema.name: openai`, e.g. an OpenAI-compatible server).

Endpoints: /v1/chat/completions and /v1/responses -> chat, /v1/completions -> text_completion,
/v1/embeddings -> embeddings (matched on the path's end, so a compatible server's prefix does not matter).
Usage: `usage` of a JSON body; in a chat/completions stream, the final chunk's `usage` (present only with
`stream_options.include_usage`); in a Responses stream, `response.completed` (or `.incomplete`/`.failed`).
prompt_tokens already include cached tokens and completion_tokens reasoning tokens, as the semconv wants.

Budget estimate: output multipliers `n` and `best_of` (legacy completions generate best_of server-side and bill
them all), times each prompt of a legacy completions batch; input the provider holds: Responses
`previous_response_id`, `conversation` and stored `prompt` templates, Assistants runs on a thread (their
`max_prompt_tokens` caps it). Batches, fine-tuning jobs and eval runs are billed after the answer.
"""

from __future__ import annotations

import re
from typing import Any

from clrk.hostnames import loose_path
from clrk.memo import remember
from clrk.providers.base import ProviderParser, as_int, loads, object_after_key
from clrk.providers.shallow import Elided

_ENDPOINTS = (
    ("/chat/completions", "chat"),
    ("/responses", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
)
# Assistants: creating a run (also with a new thread) or resuming one bills the model on the thread it holds.
_THREAD_RUN = re.compile(r"/threads(?:/[^/]+)?/runs(?:/[^/]+/submit_tool_outputs)?$")
_JOBS = re.compile(r"/(?:batches|fine_tuning/jobs|evals/[^/]+/runs)$")
_USAGE = re.compile(r'"usage"\s*:\s*\{')
_FINISH = re.compile(r'"finish_reason"\s*:\s*"')
_RESPONSE_EVENTS = frozenset({"response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed", "error"})


_KINDS: dict[str, str] = {}  # path -> _path_kind (clrk.memo: bounded)


def _path_kind(path: str) -> str:
    """"thread" (an Assistants run: input held on a thread), "job" (billed after the answer) or "": read from
    the path as the provider reads it (%-escapes, dot segments), a pure function of it."""
    loose = loose_path(path).rstrip("/")
    return "thread" if _THREAD_RUN.search(loose) else "job" if _JOBS.search(loose) else ""


class OpenAIParser(ProviderParser):
    name = "openai"
    system = "openai"
    provider_name = "openai"
    hosts = ("api.openai.com",)
    _first_chunk = True  # until the first stream chunk was read (a class default: one store less per call)

    @classmethod
    def operation(cls, path: str) -> tuple[str, str | None] | None:
        p = path.rstrip("/")
        for suffix, op in _ENDPOINTS:
            if p.endswith(suffix):
                return op, None
        return None

    def __init__(self, operation: str | None, path_model: str | None, path: str, query: str) -> None:
        super().__init__(operation, path_model, path, query)  # (named, not *args: a parser is made per call)
        self._responses_api = self.path.rstrip("/").endswith("/responses")
        self._finish: dict[int, str] = {}

    def on_request(self, doc: dict) -> None:
        if isinstance(doc.get("model"), str):
            self.result.request_model = doc["model"]
        if doc.get("stream") is True:
            self.result.stream = True
        # (`in` first: most requests name none of these, and each count is a call)
        if "max_completion_tokens" in doc or "max_tokens" in doc or "max_output_tokens" in doc:
            self.max_output_tokens = self.largest_count(doc, ("max_completion_tokens", "max_tokens", "max_output_tokens"))
        choices = max(self.count(doc, "n") or 1, self.count(doc, "best_of") or 1) if "n" in doc or "best_of" in doc else 1
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            choices *= len(prompt)  # a batch of prompts (strings or token lists): n choices each
        elif isinstance(prompt, Elided) and prompt.kind == "[":
            choices *= max(1, prompt.count)  # the same, counted in a body too large to parse whole
        self.choices = choices
        if doc.get("previous_response_id") is not None:
            self.server_context = "previous_response_id"
        elif doc.get("conversation") is not None:
            self.server_context = "conversation"
        elif isinstance(prompt, dict):
            self.server_context = "prompt"  # a stored prompt template, by id
        kind = _KINDS.get(self.path)
        if kind is None:
            kind = remember(_KINDS, self.path, len(self.path), _path_kind(self.path))
        if kind == "thread":
            self.server_context = "thread"
            self.max_input_tokens = self.count(doc, "max_prompt_tokens")
        elif kind == "job":
            self.unbudgetable = "batch, fine-tuning and eval jobs are billed after this request is answered"

    def stream_usage_change(self) -> dict[str, Any]:
        # Chat and text completion streams carry usage only when asked; the Responses API always does.
        doc = self.request_doc
        if (doc is None or self._responses_api or doc.get("stream") is not True
                or self.result.operation not in ("chat", "text_completion")):
            return {}
        opts = doc.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            return {}
        return {"stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}

    # ------------------------------------------------------------------ usage

    def _usage(self, u: Any) -> None:
        if not isinstance(u, dict):
            return
        r = self.result
        if self._responses_api:
            i, o = u.get("input_tokens"), u.get("output_tokens")
            in_details, out_details = u.get("input_tokens_details"), u.get("output_tokens_details")
        else:
            i, o = u.get("prompt_tokens"), u.get("completion_tokens")
            in_details, out_details = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
        # as_int's answer, without its call for the plain in-range int every parsed count is (once per call)
        r.input_tokens = i if type(i) is int and -(2**63) <= i < 2**63 else as_int(i)
        r.output_tokens = o if type(o) is int and -(2**63) <= o < 2**63 else as_int(o)
        if isinstance(in_details, dict):
            r.cache_read_tokens = as_int(in_details.get("cached_tokens"))
        if isinstance(out_details, dict):
            r.reasoning_tokens = as_int(out_details.get("reasoning_tokens"))
        r.usage_visible = r.input_tokens is not None or r.output_tokens is not None

    def _ids(self, doc: dict) -> None:
        if isinstance(v := doc.get("id"), str):
            self.result.response_id = v
        if isinstance(v := doc.get("model"), str):
            self.result.response_model = v

    def _choices(self, choices: Any) -> None:
        if not isinstance(choices, list):
            return
        finish = self._finish
        for c in choices:
            if isinstance(c, dict) and isinstance(reason := c.get("finish_reason"), str):
                finish[as_int(c.get("index")) or 0] = reason
        # one index (most calls): its reason alone, without sorting
        self.result.finish_reasons = list(finish.values()) if len(finish) == 1 else [finish[i] for i in sorted(finish)]

    def _response_object(self, resp: Any) -> None:
        if not isinstance(resp, dict):
            return
        self._ids(resp)
        status = resp.get("status")
        incomplete = resp.get("incomplete_details")
        if isinstance(incomplete, dict) and isinstance(incomplete.get("reason"), str):
            self.result.finish_reasons = [incomplete["reason"]]
        elif isinstance(status, str) and status not in ("in_progress", "queued"):
            self.result.finish_reasons = [status]
        if isinstance(resp.get("error"), dict):
            self.on_error(resp)
        self._usage(resp.get("usage"))

    # ------------------------------------------------------------------ bodies

    def on_json(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            return
        if self._responses_api:
            self._response_object(doc)
            return
        self._ids(doc)
        self._choices(doc.get("choices"))
        self._usage(doc.get("usage"))

    def on_event(self, event: str, data: str) -> None:
        if self._responses_api:
            if event and event not in _RESPONSE_EVENTS:
                return  # deltas: nothing the record needs
            doc = loads(data)
            if doc.get("type") == "error" or event == "error":
                self.on_error(doc)
            else:
                self._response_object(doc.get("response"))
            return
        if data == "[DONE]":
            return
        # Most chunks are content deltas; parse only the first, finish-reason and usage chunks.
        if not (self._first_chunk or _FINISH.search(data) or _USAGE.search(data) or '"error"' in data):
            return
        doc = loads(data)
        if not isinstance(doc, dict):
            return
        if "error" in doc and isinstance(doc["error"], dict):
            self.on_error(doc)
            return
        if self._first_chunk:
            self._first_chunk = False
            self._ids(doc)
        self._choices(doc.get("choices"))
        if doc.get("usage") is not None:
            self._usage(doc["usage"])

    def on_error(self, doc: Any) -> None:
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            code = err.get("code") or err.get("type")
            self.result.error_type = str(code)[:64] if code else "error"  # the upstream writes it: bounded

    def on_truncated_json(self, tail: str) -> None:
        self._usage(object_after_key(tail, "usage"))
